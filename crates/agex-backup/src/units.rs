//! A policy's `stop_units`, stopped for as long as a backup or an in-place restore needs
//! the service quiet, and started again exactly once: when the guard is finished, when it
//! is dropped on an early return, or by [`crate::cancel::undo`] when SIGTERM or SIGINT
//! ends agex first. Backup and restore share this one guard, so a signal can never leave
//! a service stopped behind either of them.

use agex_core::systemctl::{Systemctl, SystemctlError};

/// Why units could not be stopped or started again.
#[derive(Debug, thiserror::Error)]
pub enum UnitsError {
    /// The policy names units but no systemctl command is configured (a test root).
    #[error("the policy stops units ({}) but no systemctl command is set (--systemctl)", .units.join(", "))]
    NoSystemctl {
        /// The policy's units.
        units: Vec<String>,
    },
    /// `systemctl stop` failed; the units were started again.
    #[error("stopping units failed: {0}")]
    Stop(#[source] SystemctlError),
    /// `systemctl start` failed after the work was done.
    #[error("starting {} again failed: {source}", .units.join(", "))]
    Start {
        /// The units that did not start.
        units: Vec<String>,
        /// What systemctl said.
        #[source]
        source: SystemctlError,
    },
}

/// Units stopped by [`StoppedUnits::stop`]; started again by [`StoppedUnits::start`] or
/// on drop.
#[derive(Debug)]
#[must_use = "dropping the guard starts the units again at once"]
pub struct StoppedUnits {
    /// `None` when there was nothing to stop.
    held: Option<(Systemctl, Vec<String>)>,
}

impl StoppedUnits {
    /// Stops `units` with `systemctl`. They are registered with [`crate::cancel`] before
    /// `systemctl stop` runs, so a signal arriving while it runs starts them again (a start
    /// of a unit that never stopped is harmless; a unit left stopped is not).
    pub fn stop(systemctl: Option<&Systemctl>, units: &[String]) -> Result<Self, UnitsError> {
        if units.is_empty() {
            return Ok(StoppedUnits { held: None });
        }
        let Some(sc) = systemctl else {
            return Err(UnitsError::NoSystemctl {
                units: units.to_vec(),
            });
        };
        crate::cancel::units_stopped(sc, units);
        let guard = StoppedUnits {
            held: Some((sc.clone(), units.to_vec())),
        };
        let args: Vec<&str> = std::iter::once("stop")
            .chain(units.iter().map(String::as_str))
            .collect();
        match sc.run(&args) {
            Ok(_) => Ok(guard),
            // The guard's drop starts whatever part of them did stop.
            Err(e) => Err(UnitsError::Stop(e)),
        }
    }

    /// Starts the units again; an error names the units that did not start.
    pub fn start(mut self) -> Result<(), UnitsError> {
        match self.held.take() {
            Some((sc, units)) => start_once(&sc, units),
            None => Ok(()),
        }
    }
}

impl Drop for StoppedUnits {
    fn drop(&mut self) {
        if let Some((sc, units)) = self.held.take() {
            // An early return has its own error to report; this start's failure is
            // secondary, and systemd's journal has it.
            let _ = start_once(&sc, units);
        }
    }
}

/// Starts `units` unless [`crate::cancel::undo`] already did.
fn start_once(sc: &Systemctl, units: Vec<String>) -> Result<(), UnitsError> {
    crate::cancel::start_units_once(&units, || {
        let args: Vec<&str> = std::iter::once("start")
            .chain(units.iter().map(String::as_str))
            .collect();
        sc.run(&args).map(|_| ())
    })
    .unwrap_or(Ok(()))
    .map_err(|source| UnitsError::Start { units, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_units_needs_no_systemctl_and_starts_nothing() {
        let guard = StoppedUnits::stop(None, &[]);
        assert!(matches!(guard, Ok(StoppedUnits { held: None })));
    }

    #[test]
    fn units_without_systemctl_are_refused_by_name() {
        let units = vec!["app.service".to_string()];
        let err = StoppedUnits::stop(None, &units)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the policy stops units (app.service) but no systemctl command is set (--systemctl)")
        );
    }
}
