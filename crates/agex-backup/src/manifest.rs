//! What a snapshot holds, stored inside it: every file's path, size and digest, and each
//! dump's size, digest and table row counts. Restore drills verify against it.
//!
//! The file list comes from a walk made while the engines read (after the policy's units
//! stopped), the dump entries from the dumps as they were streamed; the manifest is the
//! last stream of a snapshot, so it is complete when either engine reads it.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use agex_core::{Database, Policy};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
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
    /// nothing is worse than a failed run. With a `cache` file, a file whose size, mtime,
    /// ctime and inode are those of the last run keeps its digest (as borg's files cache
    /// does); the others are read, on every core.
    pub fn walk(&self, root: &Path, cache: Option<&Path>) -> Result<Vec<FileEntry>, BackupError> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let mut found = Vec::new();
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
                let meta = entry
                    .metadata()
                    .map_err(|e| BackupError::io(entry.path())(io::Error::other(e.to_string())))?;
                let host = host_path(root, entry.path()).to_string_lossy().into_owned();
                found.push((host, entry.into_path(), Stamp::of(&meta)));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        let old = cache.map(DigestCache::load).unwrap_or_default();
        let out: Vec<FileEntry> = found
            .par_iter()
            .map(|(host, local, stamp)| {
                let (size, digest) = match old.0.get(host) {
                    Some(c) if c.stamp == *stamp => (stamp.size, c.digest.clone()),
                    _ => digest_file(local)?,
                };
                Ok(FileEntry {
                    path: host.clone(),
                    size,
                    digest,
                })
            })
            .collect::<Result<_, BackupError>>()?;
        if let Some(path) = cache {
            let new = DigestCache(
                found
                    .iter()
                    .zip(&out)
                    // Racy entries stay out: a file changed within the file system's
                    // timestamp granularity of this walk could change again unseen.
                    .filter(|((_, _, stamp), _)| !stamp.recent(started))
                    .map(|((host, _, stamp), f)| {
                        let c = Cached {
                            stamp: stamp.clone(),
                            digest: f.digest.clone(),
                        };
                        (host.clone(), c)
                    })
                    .collect(),
            );
            // A cache that cannot be written only costs the next run a full read.
            let _ = new.save(path);
        }
        Ok(out)
    }
}

/// What says a file is unchanged since its digest was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

impl Stamp {
    /// Changed less than two seconds before `now_ns` (or after it).
    fn recent(&self, now_ns: i128) -> bool {
        let limit = now_ns - 2_000_000_000;
        self.mtime_ns >= limit || self.ctime_ns >= limit
    }

    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    #[serde(flatten)]
    stamp: Stamp,
    digest: String,
}

/// The digests of the last run of a service, by host path.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DigestCache(std::collections::HashMap<String, Cached>);

impl DigestCache {
    /// The cache at `path`; missing or unreadable is empty (every file is read).
    fn load(path: &Path) -> DigestCache {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) -> Result<(), BackupError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(BackupError::io(dir))?;
        }
        let bytes = serde_json::to_vec(self).map_err(|e| BackupError::Output {
            tool: "digest cache".into(),
            detail: e.to_string(),
        })?;
        agex_core::atomic::write_atomic(path, &bytes, 0o600).map_err(BackupError::io(path))
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
