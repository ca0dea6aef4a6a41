//! Restarting the units whose secrets changed: one `systemctl try-restart` call for all
//! of them, one `systemctl try-reload-or-restart` for those whose rules say `reload`.
//!
//! The command is configurable (`--systemctl`, `AGEX_SYSTEMCTL`) so tests record the
//! calls instead of touching the machine's units.

pub use agex_core::systemctl::Systemctl;

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ActivateError;

/// File on the secrets filesystem naming the units a switch still owes a restart.
pub const OWED_FILE: &str = ".restarts-owed";

/// The units a switch to `number` owes a restart or reload. Written on the secrets
/// filesystem before `/run/agex` switches and removed once systemctl ran, so an
/// activation killed between the two leaves the debt to the next run instead of units
/// running on the old secrets for good; a reboot, which starts every unit afresh,
/// clears it with the filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owed {
    /// The generation switched to.
    pub number: u64,
    /// Units to restart.
    pub restart: Vec<String>,
    /// Units to reload.
    pub reload: Vec<String>,
}

impl Owed {
    /// What a killed run left on `secrets_fs`, if anything (unreadable counts as none).
    pub fn load(secrets_fs: &Path) -> Option<Owed> {
        serde_json::from_slice(&std::fs::read(secrets_fs.join(OWED_FILE)).ok()?).ok()
    }

    /// Records the debt, atomically.
    pub fn save(&self, secrets_fs: &Path) -> Result<(), ActivateError> {
        let path = secrets_fs.join(OWED_FILE);
        let json = serde_json::to_vec(self)
            .map_err(|e| ActivateError::io(&path)(std::io::Error::other(e.to_string())))?;
        agex_core::atomic::write_atomic(&path, &json, 0o600).map_err(ActivateError::io(&path))
    }

    /// Forgets the debt (paid, or waived by `--no-restart`).
    pub fn clear(secrets_fs: &Path) {
        let _ = std::fs::remove_file(secrets_fs.join(OWED_FILE));
    }

    /// `restart` and `reload` with this debt added; a unit owed both is restarted.
    pub fn added_to(
        &self,
        restart: Vec<String>,
        reload: Vec<String>,
    ) -> (Vec<String>, Vec<String>) {
        let restart: BTreeSet<String> = restart.into_iter().chain(self.restart.clone()).collect();
        let reload: BTreeSet<String> = reload
            .into_iter()
            .chain(self.reload.clone())
            .filter(|u| !restart.contains(u))
            .collect();
        (restart.into_iter().collect(), reload.into_iter().collect())
    }

    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.restart.is_empty() && self.reload.is_empty()
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
    fn owed_units_are_added_and_restart_wins() {
        let owed = Owed {
            number: 2,
            restart: vec!["a.service".into()],
            reload: vec!["b.service".into(), "c.service".into()],
        };
        let (restart, reload) = owed.added_to(
            vec!["c.service".into(), "d.service".into()],
            vec!["e.service".into()],
        );
        assert_eq!(restart, ["a.service", "c.service", "d.service"]);
        assert_eq!(reload, ["b.service", "e.service"]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Owed::load(dir.path()), None);
        owed.save(dir.path()).unwrap();
        assert_eq!(Owed::load(dir.path()), Some(owed));
        Owed::clear(dir.path());
        assert_eq!(Owed::load(dir.path()), None);
    }

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
