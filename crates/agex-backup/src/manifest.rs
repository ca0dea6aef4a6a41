//! What a snapshot holds, stored inside it: every file's path, size and digest, and each
//! dump's size, digest and table row counts. Restore drills verify against it.
//!
//! The file list comes from a walk made while the engines read (after the policy's units
//! stopped), the dump entries from the dumps as they were streamed; the manifest is the
//! last stream of a snapshot, so it is complete when either engine reads it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agex_core::{Database, Policy};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BackupError;
use crate::paths::{host_path, under};
use crate::walk_file::{self, CacheReader, Record, Records, Stamp, Taken, Unsealed, WalkWriter};

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

/// A host path as bytes (Unix names need not be UTF-8). In JSON it is a plain string when
/// it is valid UTF-8, else `{"hex": "<bytes>"}`, so every name round-trips and the common
/// case stays readable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPath(PathBuf);

impl HostPath {
    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        use std::os::unix::ffi::OsStrExt;
        self.0.as_os_str().as_bytes()
    }

    /// The path for messages (invalid UTF-8 shown as `\xNN`).
    pub fn shown(&self) -> String {
        shown(&self.0)
    }
}

impl From<PathBuf> for HostPath {
    fn from(p: PathBuf) -> Self {
        HostPath(p)
    }
}

impl From<&str> for HostPath {
    fn from(p: &str) -> Self {
        HostPath(PathBuf::from(p))
    }
}

impl std::fmt::Display for HostPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

/// A path for messages: its UTF-8 text, other bytes as `\xNN`.
pub fn shown(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in p.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PathRepr {
    Text(String),
    Bytes { hex: String },
}

impl Serialize for HostPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.as_bytes()) {
            Ok(text) => s.serialize_str(text),
            Err(_) => PathRepr::Bytes {
                hex: agex_secrets::header::hex(self.as_bytes()),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for HostPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use std::os::unix::ffi::OsStringExt;
        match PathRepr::deserialize(d)? {
            PathRepr::Text(t) => Ok(HostPath(PathBuf::from(t))),
            PathRepr::Bytes { hex } => {
                let bytes = unhex(&hex)
                    .ok_or_else(|| serde::de::Error::custom(format!("bad hex path `{hex}`")))?;
                Ok(HostPath(PathBuf::from(std::ffi::OsString::from_vec(bytes))))
            }
        }
    }
}

/// The bytes of a hex string.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One regular file of the backed-up paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Host path.
    pub path: HostPath,
    /// Size in bytes (as agex read it).
    pub size: u64,
    /// `sha256:<hex>` of the content (as agex read it).
    pub digest: String,
    /// The file changed between agex's read and the repository's (or during either):
    /// the repository holds it as its engine read it, which the digest does not
    /// describe; a drill verifies it by the repository's own record (its extraction).
    #[serde(default, skip_serializing_if = "is_false")]
    pub changed: bool,
}

/// What a special file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecialKind {
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device node.
    Char,
    /// A block device node.
    Block,
}

/// A fifo, socket or device node of the backed-up paths: what it is, never its content
/// (it has none to read). Kept in the manifest so a restore can put it back from a
/// repository whose engine could not store it (borg next to agex's dump pipes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialEntry {
    /// Host path.
    pub path: HostPath,
    /// What it is.
    pub kind: SpecialKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (devices only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SpecialEntry {
    /// The entry of `host` if its metadata says it is a special file.
    fn of(host: PathBuf, meta: &std::fs::Metadata) -> Option<SpecialEntry> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let ft = meta.file_type();
        let kind = if ft.is_fifo() {
            SpecialKind::Fifo
        } else if ft.is_socket() {
            SpecialKind::Socket
        } else if ft.is_char_device() {
            SpecialKind::Char
        } else if ft.is_block_device() {
            SpecialKind::Block
        } else {
            return None;
        };
        Some(SpecialEntry {
            path: HostPath(host),
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: if matches!(kind, SpecialKind::Char | SpecialKind::Block) {
                meta.rdev()
            } else {
                0
            },
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    /// Creates it at `at` (which must not exist) with its mode, owner (as root) and
    /// mtime.
    pub fn create(&self, at: &Path) -> io::Result<()> {
        use rustix::fs::{FileType, Mode, Timespec, Timestamps, UTIME_OMIT};
        let ft = match self.kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Socket => FileType::Socket,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        if let Some(dir) = at.parent() {
            std::fs::create_dir_all(dir)?;
        }
        rustix::fs::mknodat(
            rustix::fs::CWD,
            at,
            ft,
            Mode::from_raw_mode(self.mode & 0o7777),
            self.rdev,
        )?;
        // mknod applies the umask: the mode is set again, on the node just made. chmod
        // follows a symlink, and whoever owns the directory could put one in its place
        // (aiming root's chmod at any file): the node is held by an O_PATH handle
        // without following, checked, and changed through that handle.
        let node = rustix::fs::openat(
            rustix::fs::CWD,
            at,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if FileType::from_raw_mode(rustix::fs::fstat(&node)?.st_mode) != ft {
            return Err(io::Error::other(
                "replaced by something else while it was restored",
            ));
        }
        rustix::fs::chmodat(
            rustix::fs::CWD,
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&node)).as_str(),
            Mode::from_raw_mode(self.mode & 0o7777),
            rustix::fs::AtFlags::empty(),
        )?;
        if agex_core::users::is_root() {
            let _ = std::os::unix::fs::lchown(at, Some(self.uid), Some(self.gid));
        }
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_OMIT,
            },
            last_modification: Timespec {
                tv_sec: self.mtime_ns.div_euclid(1_000_000_000) as i64,
                tv_nsec: self.mtime_ns.rem_euclid(1_000_000_000) as _,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            at,
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }
}

/// The kind of database a dump was taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DumpKind {
    /// An SQLite file (online backup API).
    Sqlite,
    /// A PostgreSQL database (`pg_dump -Fc`).
    Postgres,
}

impl DumpKind {
    /// The kind of a policy database.
    pub fn of(db: &Database) -> DumpKind {
        match db {
            Database::Sqlite { .. } => DumpKind::Sqlite,
            Database::Postgres { .. } => DumpKind::Postgres,
        }
    }
}

/// One database dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEntry {
    /// The database's name in the policy.
    pub name: String,
    /// Which kind of database.
    pub kind: DumpKind,
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

/// The manifest of one service's snapshot in one repository.
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
    /// Fifos, sockets and device nodes, by host path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub specials: Vec<SpecialEntry>,
}

impl Manifest {
    /// Marks `paths` (sorted) as changed during the backup.
    pub fn mark_changed(&mut self, paths: &[HostPath]) {
        for f in &mut self.files {
            if paths.binary_search(&f.path).is_ok() {
                f.changed = true;
            }
        }
    }
}

/// What a walk of a policy's paths found: the regular files, in walk order, in a file
/// on disk ([`crate::walk_file`]: never held whole in memory) with the digests the last
/// walk vouched for (the others are taken by [`Walked::digest_pending`]), the special
/// files (never opened), and what could not be listed.
#[derive(Debug)]
pub struct Walked {
    /// The walk file (open to read and complete), and where it goes once complete.
    records: Arc<File>,
    unsealed: Mutex<Option<Unsealed>>,
    path: PathBuf,
    /// Files whose digest is still to be taken.
    pending: u64,
    /// Regular files found.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Fifos, sockets and device nodes: stored as what they are, never read.
    pub specials: Vec<SpecialEntry>,
    /// What could not be listed, one message each.
    pub warnings: Vec<String>,
    /// When the walk started, nanoseconds since the epoch.
    started_ns: i128,
}

/// How close to the walk a change must be for a stamp not to prove the file unchanged:
/// the kernel stamps writes with a coarse clock (a few milliseconds), so a second write
/// within one tick of the first leaves mtime and ctime as they were.
pub(crate) const RACY_NS: i128 = 100_000_000;

/// Files handled together: the reads of one batch run on every core, and memory holds
/// one batch, not the tree.
const BATCH: usize = 4096;

impl Walked {
    /// The regular files read, in walk order.
    pub(crate) fn records(&self) -> io::Result<Records> {
        Records::of(Arc::clone(&self.records))
    }

    /// The manifest entry of a record; none for a file agex could not read.
    pub(crate) fn entry(r: &Record) -> Option<FileEntry> {
        (r.taken != Taken::Unread).then(|| FileEntry {
            path: HostPath(r.path().to_path_buf()),
            size: r.size,
            digest: r.digest_text(),
            changed: r.taken != Taken::Stable,
        })
    }

    /// Reads the files the walk found without a digest, on every core, while the engines
    /// read them too; then puts the walk file in place as the next run's cache. Returns a
    /// warning per file that could not be read (vanished, unreadable): it is in no
    /// manifest.
    ///
    /// Why a digest taken after the engines started still describes what they stored:
    /// every engine starts after the walk, and a file's record keeps the walk's stamp. A
    /// file whose stamp after agex's read, and again after an engine read it
    /// ([`Walked::changed_since`]), is the walk's was not written since the walk (or
    /// within [`RACY_NS`] before it, which the stamps cannot tell and which is marked
    /// changed), so agex and the engine read the same bytes in whichever order. A file
    /// whose stamp moved is marked changed, and a drill checks it against the
    /// repository's own record.
    pub fn digest_pending(&self, root: &Path) -> Result<Vec<String>, BackupError> {
        let damaged = |e| BackupError::io(&self.path)(e);
        let mut warnings = Vec::new();
        if self.pending > 0 {
            let mut records = self.records().map_err(damaged)?;
            loop {
                let mut batch = Vec::with_capacity(BATCH);
                while batch.len() < BATCH {
                    match records.next_placed().map_err(damaged)? {
                        Some((at, r)) if r.taken == Taken::Pending => batch.push((at, r)),
                        Some(_) => {}
                        None => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let read: Vec<io::Result<Option<String>>> = batch
                    .into_par_iter()
                    .map(|(at, mut r)| {
                        let unread = match read_as_walked(&under(root, r.path()), &r.stamp) {
                            Ok((size, digest, stable)) => {
                                r.size = size;
                                r.digest = digest;
                                r.taken = if stable {
                                    Taken::Stable
                                } else {
                                    Taken::Changed
                                };
                                None
                            }
                            Err(e) => {
                                r.taken = Taken::Unread;
                                let host = r.path().to_path_buf();
                                Some(match e.kind() {
                                    io::ErrorKind::NotFound => Unread::Vanished(host),
                                    _ => Unread::Failed(host, e),
                                })
                            }
                        };
                        walk_file::patch(&self.records, at, &r)?;
                        Ok(unread.map(|u| u.to_string()))
                    })
                    .collect();
                for r in read {
                    warnings.extend(r.map_err(damaged)?);
                }
            }
        }
        let unsealed = self
            .unsealed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(u) = unsealed {
            u.seal(&self.records, &self.path).map_err(damaged)?;
        }
        Ok(warnings)
    }

    /// Whether each file of `batch` looks different now from when the walk saw it (or is
    /// gone), or was written so shortly before the walk that its stamp cannot tell, or
    /// agex saw it change. On every core, a few dozen files at a time, each looked up in
    /// its directory (opened once for the neighbours that share it) instead of by its
    /// whole path: this check runs once per repository over every file of the tree.
    pub(crate) fn changed_now(&self, root: &Path, batch: &[Record]) -> Vec<bool> {
        const GROUP: usize = 64;
        batch
            .par_chunks(GROUP)
            .flat_map_iter(|group| {
                let mut dir: Option<(&Path, Option<rustix::fd::OwnedFd>)> = None;
                group.iter().map(move |r| {
                    if r.taken != Taken::Stable
                        || r.stamp.mtime_ns.max(r.stamp.ctime_ns) >= self.started_ns - RACY_NS
                    {
                        return true;
                    }
                    let (Some(parent), Some(name)) = (r.path().parent(), r.path().file_name())
                    else {
                        return true;
                    };
                    if dir.as_ref().is_none_or(|(p, _)| *p != parent) {
                        let opened = rustix::fs::open(
                            under(root, parent),
                            rustix::fs::OFlags::PATH
                                | rustix::fs::OFlags::DIRECTORY
                                | rustix::fs::OFlags::CLOEXEC,
                            rustix::fs::Mode::empty(),
                        );
                        dir = Some((parent, opened.ok()));
                    }
                    let Some((_, Some(fd))) = &dir else {
                        return true;
                    };
                    rustix::fs::statat(fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .map(|st| Stamp::of_stat(&st) != r.stamp)
                        .unwrap_or(true)
                })
            })
            .collect()
    }

    /// The files that look different now from when the walk saw them (or are gone), and
    /// those written so shortly before the walk that their stamp cannot tell: the
    /// repository read since then may hold another version. Only files after `after`
    /// in walk order are looked at, if it is given. Sorted.
    pub fn changed_since(
        &self,
        root: &Path,
        after: Option<&Path>,
    ) -> Result<Vec<HostPath>, BackupError> {
        let unreadable = |e| BackupError::io(&self.path)(e);
        let mut records = self.records().map_err(unreadable)?;
        let mut out: Vec<HostPath> = Vec::new();
        loop {
            let batch = records
                .by_ref()
                .take(BATCH)
                .collect::<io::Result<Vec<Record>>>()
                .map_err(unreadable)?;
            if batch.is_empty() {
                break;
            }
            let batch: Vec<Record> = batch
                .into_iter()
                .filter(|r| r.taken != Taken::Unread)
                .filter(|r| after.is_none_or(|a| r.path() > a))
                .collect();
            let now = self.changed_now(root, &batch);
            out.extend(
                batch
                    .iter()
                    .zip(now)
                    .filter(|(_, now)| *now)
                    .map(|(r, _)| HostPath(r.path().to_path_buf())),
            );
        }
        out.sort();
        Ok(out)
    }
}

/// The warning of a run in which files changed while they were backed up.
pub fn changed_warning(changed: &[HostPath]) -> Option<String> {
    const SHOWN: usize = 5;
    if changed.is_empty() {
        return None;
    }
    let first: Vec<String> = changed.iter().take(SHOWN).map(HostPath::shown).collect();
    let more = if changed.len() > SHOWN { ", ..." } else { "" };
    Some(format!(
        "{} file(s) changed while they were backed up (stored as read; a policy's \
         `stop_units` keep files consistent with each other): {}{more}",
        changed.len(),
        first.join(", ")
    ))
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

    /// A selection of `paths`, nothing excluded.
    #[cfg(test)]
    pub(crate) fn of_paths(paths: Vec<PathBuf>) -> Selection {
        Selection {
            paths,
            excludes: Vec::new(),
            set: GlobSet::empty(),
        }
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

    /// Walks the selection under `root` and records every regular file, in walk order
    /// (by path, component by component), into a new walk file that replaces `cache`
    /// once [`Walked::digest_pending`] completed it. Nothing is opened here: fifos,
    /// sockets and devices are listed in [`Walked::specials`]. A directory that cannot
    /// be listed is a warning, not a failure; a path of the policy that does not exist
    /// is an error naming it: a policy that silently backs up nothing is worse than a
    /// failed run. A file whose size, mtime, ctime and inode are those the last walk
    /// recorded in `cache` keeps its digest (as borg's files cache does); the others
    /// are pending.
    pub fn walk(&self, root: &Path, cache: &Path) -> Result<Walked, BackupError> {
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let mut found = Found {
            // The last walk is read alongside, never held whole.
            old: CacheReader::open(cache),
            new: WalkWriter::create(cache, started_ns).map_err(BackupError::io(cache))?,
            cache,
            files: 0,
            bytes: 0,
            pending: 0,
            warnings: Vec::new(),
        };
        let mut specials = Vec::new();
        let could_not = |host: &Path, e: &walkdir::Error| {
            format!(
                "{} could not be read: {}",
                shown(host),
                e.io_error().map(ToString::to_string).unwrap_or_default()
            )
        };
        for host in self.roots() {
            let local = under(root, &host);
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
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        // A directory that cannot be listed or vanished: the engines
                        // meet the same and store what they can.
                        let path = e.path().map(|p| host_path(root, p));
                        let warning = could_not(path.as_deref().unwrap_or(&host), &e);
                        found.warnings.push(warning);
                        continue;
                    }
                };
                let ft = entry.file_type();
                let path = host_path(root, entry.path());
                if ft.is_dir() || ft.is_symlink() {
                    continue;
                }
                match entry.metadata() {
                    Ok(meta) if ft.is_file() => {
                        found.add(path, Stamp::of(&meta))?;
                    }
                    Ok(meta) => specials.extend(SpecialEntry::of(path, &meta)),
                    Err(e) => found.warnings.push(could_not(&path, &e)),
                }
            }
        }
        specials.sort_by(|a, b| a.path.cmp(&b.path));
        let Found {
            new,
            files,
            bytes,
            pending,
            warnings,
            ..
        } = found;
        let (records, unsealed) = new.finish().map_err(BackupError::io(cache))?;
        Ok(Walked {
            records,
            unsealed: Mutex::new(Some(unsealed)),
            path: cache.to_path_buf(),
            pending,
            files,
            bytes,
            specials,
            warnings,
            started_ns,
        })
    }

    /// The policy's paths in walk order, each once: a path below another one is walked
    /// as part of it.
    fn roots(&self) -> Vec<PathBuf> {
        let mut roots = self.paths.clone();
        roots.sort();
        let mut out: Vec<PathBuf> = Vec::with_capacity(roots.len());
        for r in roots {
            if !out.last().is_some_and(|last| r.starts_with(last)) {
                out.push(r);
            }
        }
        out
    }
}

/// A file the walk found but could not read: the run warns and leaves it out.
#[derive(Debug, thiserror::Error)]
enum Unread {
    #[error("{} vanished before it was read", shown(.0))]
    Vanished(PathBuf),
    #[error("{} could not be read: {}", shown(.0), .1)]
    Failed(PathBuf, #[source] io::Error),
}

/// The regular files a walk found, recorded as they come.
struct Found<'a> {
    old: CacheReader,
    new: WalkWriter,
    cache: &'a Path,
    files: u64,
    bytes: u64,
    /// Files without a digest from the last walk.
    pending: u64,
    warnings: Vec<String>,
}

impl Found<'_> {
    /// Records a file the walk saw as `stamp`, with the last walk's digest if it vouches
    /// for it, pending otherwise.
    fn add(&mut self, host: PathBuf, stamp: Stamp) -> Result<(), BackupError> {
        use std::os::unix::ffi::OsStringExt;
        let path = host.into_os_string().into_vec();
        let cached = self.old.lookup(&path, &stamp);
        let record = Record {
            size: stamp.size,
            digest: cached.unwrap_or([0; 32]),
            taken: if cached.is_some() {
                Taken::Stable
            } else {
                Taken::Pending
            },
            path,
            stamp,
        };
        self.new.add(&record).map_err(BackupError::io(self.cache))?;
        self.files += 1;
        self.bytes += record.size;
        self.pending += u64::from(record.taken == Taken::Pending);
        Ok(())
    }
}

/// Reads a regular file the walk saw as `walked`: size, digest, and whether it still
/// looked as the walk saw it once read (else agex may have read another version than
/// an engine did). It is opened without following a link and without blocking (a fifo
/// put in its place is not waited on), and must still be a regular file once open.
fn read_as_walked(local: &Path, walked: &Stamp) -> io::Result<(u64, [u8; 32], bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(local)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("it is no longer a regular file"));
    }
    let (size, digest) = digest_reader(f)?;
    let after = Stamp::of(&std::fs::symlink_metadata(local)?);
    Ok((size, digest, after == *walked && size == walked.size))
}

fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY)
        .bits() as i32
}

fn digest_reader(mut f: std::fs::File) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().into()))
}

/// Size and `sha256:<hex>` of a file.
pub fn digest_file(path: &Path) -> Result<(u64, String), BackupError> {
    let f = std::fs::File::open(path).map_err(BackupError::io(path))?;
    let (size, digest) = digest_reader(f).map_err(BackupError::io(path))?;
    Ok((
        size,
        format!("sha256:{}", agex_secrets::header::hex(&digest)),
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

/// Why the manifest inside an extracted snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestUnreadable {
    /// The snapshot holds no manifest where agex writes it.
    #[error("the snapshot holds no manifest at {} ({source})", .path.display())]
    Missing {
        /// Where it should be, as a host path.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The manifest is not JSON agex reads.
    #[error("the manifest does not parse: {0}")]
    Parse(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_bytes_and_stay_readable_when_they_are_text() {
        use std::os::unix::ffi::OsStringExt;
        let odd = HostPath(PathBuf::from(std::ffi::OsString::from_vec(
            b"/srv/caf\xe9/-rf\n*[x]\\".to_vec(),
        )));
        let json = serde_json::to_string(&odd).unwrap();
        assert!(json.starts_with("{\"hex\":"), "{json}");
        assert_eq!(serde_json::from_str::<HostPath>(&json).unwrap(), odd);
        assert_eq!(odd.shown(), "/srv/caf\\xe9/-rf\n*[x]\\");
        let plain = HostPath::from("/srv/app/a b\n\"c\"");
        let json = serde_json::to_string(&plain).unwrap();
        assert_eq!(json, "\"/srv/app/a b\\n\\\"c\\\"\"");
        assert_eq!(serde_json::from_str::<HostPath>(&json).unwrap(), plain);
        assert!(serde_json::from_str::<HostPath>("{\"hex\": \"zz\"}").is_err());
    }

    #[test]
    fn escaping_keeps_paths_literal() {
        assert_eq!(escape("/a/b[1]*.db"), "/a/b\\[1\\]\\*.db");
    }
}
