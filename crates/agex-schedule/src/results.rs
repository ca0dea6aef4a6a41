//! The last result of each job, whoever ran it (a systemd unit, the daemon, someone at a
//! shell): `agex backup` and `agex repo check` record it when they end, so `agex
//! schedule` can show it for jobs that leave no run record.

use std::fs::File;
use std::path::Path;

use crate::daemon::{JobState, State};
use crate::error::ScheduleError;

/// Where results are kept, under `--root`.
pub const RESULTS_FILE: &str = "var/lib/agex/jobs.json";
const LOCK_FILE: &str = "var/lib/agex/jobs.lock";

/// Every recorded result.
pub fn load(root: &Path) -> Result<State, ScheduleError> {
    State::load_from(&root.join(RESULTS_FILE))
}

/// Records the result of `job`; concurrent jobs serialise on a lock so none is lost.
pub fn record(root: &Path, job: &str, state: JobState) -> Result<(), ScheduleError> {
    let lock_path = root.join(LOCK_FILE);
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(ScheduleError::io(dir))?;
    }
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(ScheduleError::io(&lock_path))?;
    // Released when `lock` closes.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| ScheduleError::io(&lock_path)(e.into()))?;
    let path = root.join(RESULTS_FILE);
    let mut all = State::load_from(&path)?;
    all.jobs.insert(job.to_string(), state);
    all.save_to(&path)
}
