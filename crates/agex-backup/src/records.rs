//! Records kept under `--root` as one JSON file each (backup runs, drills): written
//! atomically, read back oldest first, a file that does not parse named in the error.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::BackupError;
use crate::paths::under;

/// Writes `record` as `<root><dir>/<id>.json`; `what` names it in errors.
pub fn save<T: Serialize>(
    root: &Path,
    dir: &str,
    id: &str,
    record: &T,
    what: &str,
) -> Result<(), BackupError> {
    let dir = under(root, Path::new(dir));
    std::fs::create_dir_all(&dir).map_err(BackupError::io(&dir))?;
    let path = dir.join(format!("{id}.json"));
    let text = serde_json::to_vec_pretty(record).map_err(|e| BackupError::Output {
        tool: what.into(),
        detail: e.to_string(),
    })?;
    agex_core::atomic::write_atomic(&path, &text, 0o644).map_err(BackupError::io(&path))
}

/// Every record in `<root><dir>`, oldest first (ids sort by time). A file that does not
/// parse is an error naming it.
pub fn load_all<T: DeserializeOwned>(
    root: &Path,
    dir: &str,
    what: &str,
) -> Result<Vec<T>, BackupError> {
    let dir = under(root, Path::new(dir));
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(BackupError::io(&dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read(&p).map_err(BackupError::io(&p))?;
        out.push(
            serde_json::from_slice::<T>(&text).map_err(|e| BackupError::Output {
                tool: p.display().to_string(),
                detail: format!("not a {what}: {e}"),
            })?,
        );
    }
    Ok(out)
}
