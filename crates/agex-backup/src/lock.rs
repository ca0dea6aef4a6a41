//! One agex run per repository at a time: an exclusive `flock` on
//! `<root>/var/lib/agex/locks/<repo>.lock`. The kernel drops the lock when its holder
//! dies, so a killed run never leaves a stale agex lock behind; a live holder makes the
//! next run wait a bounded time and then fail clearly.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::error::BackupError;

/// A held repository lock; released when dropped.
#[derive(Debug)]
pub struct RepoLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
}

/// Takes the lock of `repo`, waiting up to `wait`.
pub fn acquire(state: &Path, repo: &str, wait: Duration) -> Result<RepoLock, BackupError> {
    let dir = state.join("locks");
    std::fs::create_dir_all(&dir).map_err(BackupError::io(&dir))?;
    let path = dir.join(format!("{repo}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(BackupError::io(&path))?;
    let start = Instant::now();
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(RepoLock { _file: file, path }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if start.elapsed() >= wait {
                    return Err(BackupError::Busy {
                        repo: repo.to_string(),
                        lock: path,
                        waited: wait.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(BackupError::io(&path)(e.into())),
        }
    }
}

/// Where the first sighting of a foreign lock on `repo` is remembered.
fn sighting(state: &Path, repo: &str) -> PathBuf {
    state.join("locks").join(format!("{repo}.held-since"))
}

/// Called when a repository was found locked by another process (not an agex run on
/// this host, which the flock above excludes): remembers when that was first seen, and
/// answers how long ago, so a lock seen held for longer than `[backup] stale_lock_age`
/// across runs can be broken.
pub fn foreign_lock_seen(state: &Path, repo: &str) -> Result<Duration, BackupError> {
    let path = sighting(state, repo);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let first = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    match first {
        Some(t) => Ok(Duration::from_secs(now.saturating_sub(t))),
        None => {
            agex_core::atomic::write_atomic(&path, format!("{now}\n").as_bytes(), 0o644)
                .map_err(BackupError::io(&path))?;
            Ok(Duration::ZERO)
        }
    }
}

/// The repository was written: forget any earlier sighting of a foreign lock.
pub fn foreign_lock_cleared(state: &Path, repo: &str) {
    let _ = std::fs::remove_file(sighting(state, repo));
}
