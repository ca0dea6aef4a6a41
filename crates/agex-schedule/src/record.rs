//! The small JSON records the scheduler keeps under `--root` (the daemon's state, job
//! results, installed units, the overdue check's first sightings): read with a default
//! when absent, written atomically.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ScheduleError;

/// Reads the record at `path`; its default when there is none. `what` names it in the
/// error for a file that is not such a record ("agex's daemon state").
pub fn load<T: DeserializeOwned + Default>(path: &Path, what: &str) -> Result<T, ScheduleError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ScheduleError::State {
            path: path.to_path_buf(),
            why: format!("not {what}: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(ScheduleError::io(path)(e)),
    }
}

/// Writes `record` to `path` atomically, creating its directory.
pub fn save<T: Serialize>(path: &Path, record: &T) -> Result<(), ScheduleError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ScheduleError::io(dir))?;
    }
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    agex_core::atomic::write_atomic(path, &bytes, 0o644).map_err(ScheduleError::io(path))
}
