//! One run of a job command (`agex backup`, `agex repo check`) as the schedule sees it:
//! the start ping when it begins; when it ends, its result recorded for `agex schedule`
//! and notified. Problems come back as warnings: they never change the job's result.

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::daemon::JobState;
use crate::notify::{tail, Event, Notifier, Outcome};

/// The variable systemd sets to the id of a unit's current invocation.
pub const INVOCATION_ID: &str = "INVOCATION_ID";
/// The variable systemd sets, in an `OnFailure=` unit, to the failed unit's invocation.
pub const MONITOR_INVOCATION_ID: &str = "MONITOR_INVOCATION_ID";

/// Whether the failure of `job`'s invocation `invocation` was notified by the job itself.
pub fn notified_itself(root: &std::path::Path, job: &str, invocation: &str) -> bool {
    crate::results::load(root)
        .ok()
        .and_then(|s| s.jobs.get(job).cloned())
        .and_then(|s| s.notified_invocation)
        .is_some_and(|id| id == invocation)
}

/// A job command in progress.
pub struct JobRun {
    notifier: Notifier,
    started: Instant,
    started_at: DateTime<Utc>,
    job: String,
    root: PathBuf,
}

impl JobRun {
    /// Sends the start ping of `job`; returns the run and the warnings met.
    pub fn start(notifier: Notifier, job: &str, root: PathBuf) -> (JobRun, Vec<String>) {
        let mut warnings = notifier.warnings.clone();
        if !notifier.is_empty() {
            warnings.extend(notifier.send(&Event::Start));
        }
        let run = JobRun {
            notifier,
            started: Instant::now(),
            started_at: Utc::now(),
            job: job.to_string(),
            root,
        };
        (run, warnings)
    }

    /// Notifies the result (exit `code`) with the lines the command printed and records
    /// it; returns the warnings met.
    ///
    /// A failure that reached every notification target is recorded with the systemd
    /// invocation it belongs to (`$INVOCATION_ID`, set in every unit's environment), so
    /// the `OnFailure=` unit started next (`agex notify --failed-unit`) knows it was
    /// told already. A run that was killed never gets here and is reported by that unit.
    pub fn finish(self, code: i32, log: &[String]) -> Vec<String> {
        let outcome = Outcome::from_exit(Some(code));
        let secs = self.started.elapsed().as_secs_f64();
        let mut warnings = Vec::new();
        let mut notified = false;
        if !self.notifier.is_empty() {
            let failed = self.notifier.send(&Event::Finish {
                result: outcome,
                exit_code: Some(code),
                duration_seconds: secs,
                log_tail: tail(&log.join("\n")),
            });
            notified = failed.is_empty();
            warnings.extend(failed);
        }
        let state = JobState {
            last_run: self.started_at,
            result: Some(outcome.word().into()),
            exit_code: Some(code),
            duration_seconds: Some(secs),
            notified_invocation: (notified && outcome != Outcome::Success)
                .then(|| std::env::var(INVOCATION_ID).ok())
                .flatten(),
        };
        if let Err(e) = crate::results::record(&self.root, &self.job, state) {
            warnings.push(format!("the job's result was not recorded: {e}"));
        }
        warnings
    }
}
