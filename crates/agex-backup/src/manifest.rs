//! What a snapshot holds, stored inside it: every file's path, size and digest, and each
//! dump's size, digest and table row counts. Restore drills verify against it.
//!
//! The file list comes from a walk made just before the engines start, the dump entries
//! from the finished dumps, so the manifest is complete before either engine starts and
//! goes into the same snapshot.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use agex_core::{Database, Policy};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BackupError;

/// Where dumps and manifests appear inside snapshots and archives.
pub use agex_core::policy::DUMPS_DIR;
/// Format version of the manifest.
pub const FORMAT: u32 = 1;

/// Where a service's dump `file` appears in its snapshots.
pub fn dump_path(service: &str, file: &str) -> PathBuf {
    Path::new(DUMPS_DIR).join(service).join("db").join(file)
}

/// Where a service's manifest appears in its snapshots.
pub fn manifest_path(service: &str) -> PathBuf {
    Path::new(DUMPS_DIR).join(service).join("manifest.json")
}

/// One regular file of the backed-up paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Host path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the content.
    pub digest: String,
}

/// One database dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEntry {
    /// The database's name in the policy.
    pub name: String,
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// Path inside the snapshot.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the dump.
    pub digest: String,
    /// Rows per table at dump time (SQLite `table`, PostgreSQL `schema.table`, counted in
    /// the dump's own snapshot; empty where not known).
    pub row_counts: BTreeMap<String, u64>,
}

/// The manifest of one service's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The service.
    pub service: String,
    /// The run that wrote it.
    pub run_id: String,
    /// Regular files, by host path.
    pub files: Vec<FileEntry>,
    /// Dumps.
    pub dumps: Vec<DumpEntry>,
}

/// Which host paths of a policy are backed up: its paths minus its excludes, minus the
/// live files of its SQLite databases (their consistent dump is in the snapshot; a copy
/// of the live file taken mid-write would be torn). A path may not hold agex's own dump
/// directory, where borg's named pipes live during a run.
pub struct Selection {
    paths: Vec<PathBuf>,
    excludes: Vec<String>,
    set: GlobSet,
}

impl Selection {
    /// The selection of `policy`.
    pub fn new(policy: &Policy) -> Result<Selection, BackupError> {
        let mut excludes = policy.exclude.clone();
        for db in &policy.databases {
            if let Database::Sqlite { path, .. } = db {
                let p = escape(&path.to_string_lossy());
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    excludes.push(format!("{p}{suffix}"));
                }
            }
        }
        let mut builder = GlobSetBuilder::new();
        for e in &excludes {
            let glob = GlobBuilder::new(e)
                .literal_separator(true)
                .build()
                .map_err(|err| BackupError::Output {
                    tool: format!("policies/{}.toml", policy.service),
                    detail: format!("exclude `{e}`: {err}"),
                })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|err| BackupError::Output {
            tool: format!("policies/{}.toml", policy.service),
            detail: err.to_string(),
        })?;
        Ok(Selection {
            paths: policy.paths.clone(),
            excludes,
            set,
        })
    }

    /// Host paths to back up.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Exclude patterns (host paths or globs), including the implicit ones.
    pub fn excludes(&self) -> &[String] {
        &self.excludes
    }

    /// Whether a host path is left out.
    pub fn excluded(&self, host_path: &Path) -> bool {
        self.set.is_match(host_path)
    }

    /// Walks the selection under `root` and digests every regular file, sorted by path.
    /// A path that does not exist is an error naming it: a policy that silently backs up
    /// nothing is worse than a failed run.
    pub fn walk(&self, root: &Path) -> Result<Vec<FileEntry>, BackupError> {
        let mut out = Vec::new();
        for host in &self.paths {
            let local = under(root, host);
            if std::fs::symlink_metadata(&local).is_err() {
                return Err(BackupError::io(&local)(io::Error::new(
                    io::ErrorKind::NotFound,
                    "path of the policy does not exist",
                )));
            }
            let walker = walkdir::WalkDir::new(&local)
                .follow_links(false)
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| !self.excluded(&host_path(root, e.path())));
            for entry in walker {
                let entry = entry.map_err(|e| {
                    let path = e
                        .path()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| local.clone());
                    BackupError::io(path)(io::Error::other(e.to_string()))
                })?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let (size, digest) = digest_file(entry.path())?;
                out.push(FileEntry {
                    path: host_path(root, entry.path()).to_string_lossy().into_owned(),
                    size,
                    digest,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out.dedup_by(|a, b| a.path == b.path);
        Ok(out)
    }
}

/// Size and `sha256:<hex>` of a file.
pub fn digest_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut f = std::fs::File::open(path).map_err(BackupError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(BackupError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((
        size,
        format!("sha256:{}", agex_secrets::header::hex(&hasher.finalize())),
    ))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `p` (a host path) under `root`.
pub fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// A path read under `root`, as the host sees it.
pub fn host_path(root: &Path, p: &Path) -> PathBuf {
    match p.strip_prefix(root) {
        Ok(rel) => Path::new("/").join(rel),
        Err(_) => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_paths_literal() {
        assert_eq!(escape("/a/b[1]*.db"), "/a/b\\[1\\]\\*.db");
    }
}
