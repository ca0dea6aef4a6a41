//! Restarting the units whose secrets changed: one `systemctl try-restart` call for all
//! of them, one `systemctl try-reload-or-restart` for those whose rules say `reload`.
//!
//! The command is configurable (`--systemctl`, `AGEX_SYSTEMCTL`) so tests record the
//! calls instead of touching the machine's units.

pub use agex_core::systemctl::Systemctl;

use crate::error::ActivateError;

/// What happened to the units after a switch.
#[derive(Debug)]
pub enum Restarts {
    /// Restarts were not attempted, and why.
    Skipped {
        /// Why.
        reason: String,
        /// Units that would have been restarted.
        restart: Vec<String>,
        /// Units that would have been reloaded.
        reload: Vec<String>,
    },
    /// The commands ran.
    Done {
        /// Each command line that ran.
        commands: Vec<String>,
        /// Units restarted.
        restart: Vec<String>,
        /// Units reloaded.
        reload: Vec<String>,
    },
    /// A command failed (the switch itself had succeeded).
    Failed(ActivateError),
}

/// Runs at most two commands: `try-restart` for `restart`, `try-reload-or-restart`
/// (reload, only if running) for `reload`.
pub fn apply(systemctl: &Systemctl, restart: Vec<String>, reload: Vec<String>) -> Restarts {
    let mut commands = Vec::new();
    for (verb, units) in [
        ("try-restart", &restart),
        ("try-reload-or-restart", &reload),
    ] {
        if units.is_empty() {
            continue;
        }
        let mut args = vec![verb];
        args.extend(units.iter().map(String::as_str));
        match systemctl.run(&args) {
            Ok(shown) => commands.push(shown),
            Err(e) => return Restarts::Failed(e.into()),
        }
    }
    Restarts::Done {
        commands,
        restart,
        reload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_fail_with_stderr() {
        assert_eq!(Systemctl::parse("  "), None);
        let failing = Systemctl::parse("false").unwrap();
        let e = failing.run(&["try-restart", "a.service"]).unwrap_err();
        assert!(e.to_string().contains("false try-restart a.service"), "{e}");
        assert!(e.to_string().contains("status 1"), "{e}");
        let ok = Systemctl::parse("true").unwrap();
        match apply(&ok, vec!["a.service".into()], vec![]) {
            Restarts::Done { commands, .. } => {
                assert_eq!(commands, vec!["true try-restart a.service"])
            }
            other => panic!("{other:?}"),
        }
    }
}
