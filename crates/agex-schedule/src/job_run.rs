//! One run of a job command (`agex backup`, `agex repo check`) as the schedule sees it:
//! the start ping when it begins; when it ends, its result recorded for `agex schedule`
//! and notified. Problems come back as warnings: they never change the job's result.

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::daemon::JobState;
use crate::notify::{tail, Event, Notifier, Outcome};

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

    /// Records the result (exit `code`) and notifies it with the lines the command
    /// printed; returns the warnings met.
    pub fn finish(self, code: i32, log: &[String]) -> Vec<String> {
        let outcome = Outcome::from_exit(Some(code));
        let secs = self.started.elapsed().as_secs_f64();
        let mut warnings = Vec::new();
        let state = JobState {
            last_run: self.started_at,
            result: Some(outcome.word().into()),
            exit_code: Some(code),
            duration_seconds: Some(secs),
        };
        if let Err(e) = crate::results::record(&self.root, &self.job, state) {
            warnings.push(format!("the job's result was not recorded: {e}"));
        }
        if !self.notifier.is_empty() {
            warnings.extend(self.notifier.send(&Event::Finish {
                result: outcome,
                exit_code: Some(code),
                duration_seconds: secs,
                log_tail: tail(&log.join("\n")),
            }));
        }
        warnings
    }
}
