//! Restarting the units whose secrets changed: one `systemctl try-restart` call for all
//! of them, one `systemctl try-reload-or-restart` for those whose rules say `reload`.
//!
//! The command is configurable (`--systemctl`, `AGEX_SYSTEMCTL`) so tests record the
//! calls instead of touching the machine's units.

use std::process::{Command, Stdio};

use crate::error::ActivateError;

/// How to run systemctl: a program and leading arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Systemctl {
    argv: Vec<String>,
}

impl Systemctl {
    /// Parses a command line like `systemctl` or `/usr/bin/systemctl --no-block`
    /// (split on whitespace). `None` for an empty string.
    pub fn parse(command: &str) -> Option<Systemctl> {
        let argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        (!argv.is_empty()).then_some(Systemctl { argv })
    }

    /// Runs `<command> <verb> <units...>`; a non-zero exit is an error quoting stderr.
    pub fn run(&self, verb: &str, units: &[String]) -> Result<String, ActivateError> {
        let shown = format!("{} {verb} {}", self.argv.join(" "), units.join(" "));
        let out = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .arg(verb)
            .args(units)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| ActivateError::Restart {
                command: shown.clone(),
                status: format!("could not start: {e}"),
                stderr: String::new(),
            })?;
        if !out.status.success() {
            return Err(ActivateError::Restart {
                command: shown,
                status: match out.status.code() {
                    Some(c) => format!("exited with status {c}"),
                    None => "was killed by a signal".into(),
                },
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(shown)
    }
}

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
        match systemctl.run(verb, units) {
            Ok(shown) => commands.push(shown),
            Err(e) => return Restarts::Failed(e),
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
        let s = Systemctl::parse("sh -c 'echo").unwrap();
        assert_eq!(s.argv.len(), 3);
        let failing = Systemctl::parse("false").unwrap();
        let e = failing
            .run("try-restart", &["a.service".into()])
            .unwrap_err();
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
