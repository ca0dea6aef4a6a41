//! The Restic side, in-process with rustic_core: one snapshot per service per run holding
//! the policy's paths (read under `--root`, stored under their host paths) and the
//! database dumps streamed into it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agex_core::Retention;
use rustic_core::repofile::{FileType, KeyId, MasterKey, SnapshotFile};
use rustic_core::{
    BackupOptions, BytesList, CheckOptions, ConfigOptions, Credentials, ErrorKind, Id, KeepOptions,
    KeyOptions, LocalDestination, LocalSource, LocalSourceFilterOptions, LocalSourceSaveOptions,
    LsOptions, OpenStatus, PruneOptions, ReadBackend, ReadSource, ReadSourceEntry, ReadSourceOpen,
    ReadSubsetOption, Repository, RepositoryBackends, RepositoryOptions, RestoreOptions,
    RusticError, RusticResult, SnapshotOptions, WriteBackend,
};

use crate::access::RepoAccess;
use crate::error::BackupError;
use crate::paths::{host_path, under};
use crate::progress::{Meter, ResticBars};
use crate::tee::Completion;

/// Target size of data packs in repositories agex creates. rustic_core holds a pack being
/// filled and packs being written in memory per packer; at 16 MiB (restic 0.14's target)
/// a first backup peaked at 169 MiB against the restic binary's ~150, at 8 MiB at 140
/// (bench/backup.sh). 8 MiB packs still keep the file count of a 1 TB repository near
/// 125,000, which every backend agex supports handles.
const DATA_PACK_SIZE: bytesize::ByteSize = bytesize::ByteSize::mib(8);

/// An open Restic-format repository.
pub struct Restic {
    name: String,
    repo: Repository<OpenStatus>,
    be: Arc<dyn WriteBackend>,
    gate: Gate,
    meter: Option<Arc<Meter>>,
    /// Threads that read and chunk files in a backup (0: one per core).
    read_threads: usize,
}

/// A snapshot as agex shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    /// Snapshot id (hex).
    pub id: String,
    /// When it was taken (RFC 3339).
    pub time: String,
    /// Its tags (`service=…`, `run=…`).
    pub tags: Vec<String>,
    /// Paths it holds.
    pub paths: Vec<String>,
    /// Bytes it added to the repository (after dedup and compression), when recorded.
    pub bytes_added: Option<u64>,
    /// Its description (agex records files that changed late in a backup there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Turns a rustic_core error into agex's, naming the repository and keeping the
/// first line of what rustic_core said.
pub fn restic_err(repo: &str) -> impl Fn(Box<rustic_core::RusticError>) -> BackupError + '_ {
    move |e| {
        let said = e.display_log();
        if said.contains("No repository config file found") {
            return BackupError::NotInitialised {
                repo: repo.to_string(),
            };
        }
        BackupError::Restic {
            repo: repo.to_string(),
            message: said.lines().next().unwrap_or("error").to_string(),
            source: Some(e),
        }
    }
}

/// A repository not opened yet, its backend (also for writing files rustic_core would
/// not write the way agex wants: key files, see [`crate::restic_key`]) and the gate on
/// that backend's snapshot writes.
struct Unopened {
    repo: Repository<()>,
    be: Arc<dyn WriteBackend>,
    gate: Gate,
}

fn unopened(access: &RepoAccess, meter: Option<&Arc<Meter>>) -> Result<Unopened, BackupError> {
    let err = restic_err(&access.repo.name);
    let gate = Gate::default();
    let gated: Arc<dyn WriteBackend> = Arc::new(Gated {
        inner: crate::backend::open(access)?,
        gate: gate.clone(),
    });
    let backends = RepositoryBackends::new(Arc::clone(&gated), None);
    let opts = RepositoryOptions::default();
    let repo = match meter {
        Some(m) => Repository::new_with_progress(&opts, &backends, ResticBars(Arc::clone(m))),
        None => Repository::new(&opts, &backends),
    }
    .map_err(err)?;
    Ok(Unopened {
        repo,
        be: gated,
        gate,
    })
}

/// While a backup's streams are being read: how many there are and how many have ended
/// complete (unset, snapshots are written freely); and, for a backup run, how its
/// requests are watched ([`Gated::watched`]).
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<GateState>>);

#[derive(Default)]
struct GateState {
    streams: Option<(Completion, usize)>,
    watch: Option<Watch>,
}

/// A backup run's watch over the requests of its repository.
struct Watch {
    /// Left behind by the run's streams: every request fails at once.
    completion: Completion,
    /// No request answered for this long while one waits: the server stopped answering.
    stall: Option<std::time::Duration>,
    /// When a request last ended (or the watch began).
    last_done: std::time::Instant,
    /// The stall was seen: every request fails at once.
    stalled: bool,
}

/// Why a watched request failed without an answer.
enum Unanswered {
    LeftBehind,
    Stalled(std::time::Duration),
}

impl Gate {
    fn set(&self, completion: Completion, streams: usize) {
        self.state().streams = Some((completion, streams));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching requests for the run `completion` counts.
    fn watch(&self, completion: Completion, stall: Option<std::time::Duration>) {
        self.state().watch = Some(Watch {
            completion,
            stall,
            last_done: std::time::Instant::now(),
            stalled: false,
        });
    }

    fn watching(&self) -> bool {
        self.state().watch.is_some()
    }

    /// Why a request that began at `started` should be given up now, if it should.
    fn given_up(&self, started: std::time::Instant) -> Option<Unanswered> {
        let mut state = self.state();
        let w = state.watch.as_mut()?;
        if w.completion.left_behind() {
            return Some(Unanswered::LeftBehind);
        }
        let stall = w.stall?;
        if w.stalled || w.last_done.max(started).elapsed() >= stall {
            w.stalled = true;
            return Some(Unanswered::Stalled(stall));
        }
        None
    }

    /// A request ended (with an answer or an error of its own): the side is at work.
    fn answered(&self) {
        if let Some(w) = self.state().watch.as_mut() {
            w.last_done = std::time::Instant::now();
            w.completion.active();
        }
    }

    /// Whether a snapshot may be written now: every stream of the backup ended complete.
    fn open(&self) -> bool {
        match &self.state().streams {
            Some((completion, streams)) => completion.count() >= *streams,
            None => true,
        }
    }
}

/// The repository's backend with one rule added: no snapshot file is written while the
/// [`Gate`] is shut. rustic_core skips a file whose reader fails (a dump that broke off)
/// and saves the snapshot anyway; this is what keeps such a snapshot out of the
/// repository. Its data packs stay unreferenced until the next prune, as after a kill.
struct Gated {
    inner: Arc<dyn WriteBackend>,
    gate: Gate,
}

impl Gated {
    /// Runs `op` on the backend. During a backup run, the request runs on a thread of
    /// its own, waited for until the run leaves this repository behind (its server
    /// hangs: [`crate::tee`]) or no request of it was answered for the stall timeout
    /// (the server stopped answering after it had taken the streams); from then on
    /// every request fails at once, so rustic_core ends the backup now instead of after
    /// one request timeout after another. A request given up ends on its own timeout,
    /// unheard.
    fn watched<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn WriteBackend) -> RusticResult<T> + Send + 'static,
    ) -> RusticResult<T> {
        if !self.gate.watching() {
            return op(&*self.inner);
        }
        let unanswered = |why: Unanswered| {
            match why {
            Unanswered::LeftBehind => RusticError::new(
                ErrorKind::Backend,
                "left behind: it took no data and showed no sign of work for the stall timeout while the other repository waited",
            ),
            Unanswered::Stalled(d) => RusticError::new(
                ErrorKind::Backend,
                "left behind: its server answered no request for {seconds} s (`[backup] stall_timeout`)",
            )
            .attach_context("seconds", d.as_secs().to_string()),
        }
        };
        let started = std::time::Instant::now();
        if let Some(why) = self.gate.given_up(started) {
            return Err(unanswered(why));
        }
        let inner = Arc::clone(&self.inner);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("agex-request".into())
            .spawn(move || {
                let _ = tx.send(op(&*inner));
            })
            .map_err(|e| {
                RusticError::new(ErrorKind::Backend, "cannot start a request thread: {error}")
                    .attach_context("error", e.to_string())
            })?;
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(r) => {
                    self.gate.answered();
                    return r;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(why) = self.gate.given_up(started) {
                        return Err(unanswered(why));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(RusticError::new(
                        ErrorKind::Backend,
                        "a request thread died",
                    ))
                }
            }
        }
    }
}

impl ReadBackend for Gated {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.watched(move |b| b.list_with_size(tpe))
    }
    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        self.watched(move |b| b.list(tpe))
    }
    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<bytes::Bytes> {
        let id = *id;
        self.watched(move |b| b.read_full(tpe, &id))
    }
    fn read_partial(
        &self,
        tpe: FileType,
        id: &Id,
        cacheable: bool,
        offset: u32,
        length: u32,
    ) -> RusticResult<bytes::Bytes> {
        let id = *id;
        self.watched(move |b| b.read_partial(tpe, &id, cacheable, offset, length))
    }
    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }
    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }
    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for Gated {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }
    fn write_bytes(
        &self,
        tpe: FileType,
        id: &Id,
        cacheable: bool,
        content: BytesList,
    ) -> RusticResult<()> {
        if tpe == FileType::Snapshot && !self.gate.open() {
            return Err(RusticError::new(
                ErrorKind::MissingInput,
                "a database dump or the manifest did not arrive whole; no snapshot was written",
            ));
        }
        let id = *id;
        self.watched(move |b| b.write_bytes(tpe, &id, cacheable, content))
    }
    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        let id = *id;
        self.watched(move |b| b.remove(tpe, &id, cacheable))
    }
}

impl Restic {
    /// Creates a new repository at the URL with the password.
    pub fn init(access: &RepoAccess) -> Result<Restic, BackupError> {
        let err = restic_err(&access.repo.name);
        let Unopened { repo, be, gate } = unopened(access, None)?;
        let repo = repo
            .init(
                &Credentials::password(access.password.as_str()),
                &KeyOptions::default(),
                // Smaller packs than rustic_core's default (32 MiB), see DATA_PACK_SIZE.
                // Packs are not decrypted again before upload (rustic_core's extra_verify: 7% of a first
                // backup's CPU here; restic 0.14 does not either): `agex drill` checks every
                // file of a snapshot end to end against its manifest, and `agex repo check`
                // runs weekly.
                &ConfigOptions::default()
                    .set_datapack_size(DATA_PACK_SIZE)
                    .set_extra_verify(false),
            )
            .map_err(&err)?;
        // rustic_core's key (scrypt at 128 MiB) is replaced by agex's (restic's 32 MiB):
        // the new key is written and read back first, so the repository always has a
        // key that opens with the password.
        let first = *repo.key_id();
        let restic = Restic {
            name: access.repo.name.clone(),
            repo,
            be: Arc::clone(&be),
            gate,
            meter: None,
            read_threads: 0,
        };
        restic.add_key(access.password.as_str())?;
        if let Some(first) = first {
            be.remove(FileType::Key, &first, false).map_err(&err)?;
        }
        Restic::open(access)
    }

    /// Adds a key file that opens this repository with `password` (see
    /// [`crate::restic_key`]); returns its id.
    pub fn add_key(&self, password: &str) -> Result<KeyId, BackupError> {
        crate::restic_key::add(&self.be, &self.repo.key(), password).map_err(|e| {
            BackupError::Restic {
                repo: self.name.clone(),
                message: format!("writing a repository key: {e}"),
                source: None,
            }
        })
    }

    /// Opens an existing repository.
    pub fn open(access: &RepoAccess) -> Result<Restic, BackupError> {
        Restic::open_metered(access, None, None)
    }

    /// The repository's master key, for opening it again in this run without the KDF.
    pub fn master_key(&self) -> MasterKey {
        self.repo.key()
    }

    /// Opens an existing repository whose backups count their progress into `meter`.
    /// With the master `key` of an earlier open in the same run, the password's scrypt
    /// derivation (128 MiB and most of a second for keys rustic_core made) is skipped.
    pub fn open_metered(
        access: &RepoAccess,
        meter: Option<&Arc<Meter>>,
        key: Option<MasterKey>,
    ) -> Result<Restic, BackupError> {
        Restic::open_with(access, meter, key, None)
    }

    /// Opens an existing repository for the backup run `completion` counts, its
    /// requests watched from the first one on (see [`Gate::watch`]): a server that
    /// hangs while the repository is opened is left behind like one that hangs later.
    pub fn open_watched(
        access: &RepoAccess,
        meter: Option<&Arc<Meter>>,
        key: Option<MasterKey>,
        completion: Completion,
        stall: Option<std::time::Duration>,
    ) -> Result<Restic, BackupError> {
        Restic::open_with(access, meter, key, Some((completion, stall)))
    }

    fn open_with(
        access: &RepoAccess,
        meter: Option<&Arc<Meter>>,
        key: Option<MasterKey>,
        watch: Option<(Completion, Option<std::time::Duration>)>,
    ) -> Result<Restic, BackupError> {
        let err = restic_err(&access.repo.name);
        let credentials = match key {
            Some(k) => Credentials::Masterkey(k),
            None => Credentials::password(access.password.as_str()),
        };
        let Unopened { repo, be, gate } = unopened(access, meter)?;
        if let Some((completion, stall)) = watch {
            gate.watch(completion, stall);
        }
        let repo = repo.open(&credentials).map_err(err)?;
        Ok(Restic {
            name: access.repo.name.clone(),
            repo,
            be,
            gate,
            meter: meter.cloned(),
            read_threads: 0,
        })
    }

    /// Backups read and chunk files on `threads` threads (0, the default: one per core).
    pub fn read_with(mut self, threads: usize) -> Restic {
        self.read_threads = threads;
        self
    }

    /// The repository's name in agex.toml.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, BackupError> {
        let mut snaps = self
            .repo
            .get_all_snapshots()
            .map_err(restic_err(&self.name))?;
        snaps.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(snaps.iter().map(info).collect())
    }

    /// Takes one snapshot of `paths` (host paths, read under `root`) plus `streams`
    /// (virtual files filled from readers while they are produced), tagged with the
    /// service and run id. The snapshot is written only if every stream ended complete
    /// (counted in `complete`). Once it is, `describe` may give it a description (what
    /// the run learned while it was written): it is then written again with it.
    #[allow(clippy::too_many_arguments)]
    pub fn backup(
        self,
        root: &Path,
        paths: &[PathBuf],
        excludes: &[String],
        streams: Vec<Stream>,
        complete: Completion,
        tags: &[String],
        describe: impl FnOnce() -> Option<String>,
    ) -> Result<SnapshotInfo, BackupError> {
        let err = restic_err(&self.name);
        self.gate.set(complete.clone(), streams.len());
        let indexed = self.repo.to_indexed_ids().map_err(&err)?;
        let mut snap_opts = SnapshotOptions::default();
        snap_opts = snap_opts.add_tags(&tags.join(",")).map_err(&err)?;
        let snap = SnapshotFile::from_options(&snap_opts).map_err(&err)?;
        let source = Combined::new(root, paths, excludes, streams, self.meter.clone(), complete)
            .map_err(&err)?;
        let mut backup_paths: Vec<PathBuf> = paths.to_vec();
        backup_paths.extend(source.stream_paths());
        if backup_paths.is_empty() {
            backup_paths.push(PathBuf::from("/"));
        }
        let opts = BackupOptions::default().read_threads(self.read_threads);
        let mut snap = indexed
            .archive(&opts, &source, snap, &backup_paths)
            .map_err(&err)?;
        if let Some(description) = describe() {
            let old = snap.id;
            snap.description = Some(description);
            indexed.save_snapshots(vec![snap.clone()]).map_err(&err)?;
            indexed.delete_snapshots(&[old]).map_err(&err)?;
            // save_snapshots does not say the new id: it is this run's other snapshot.
            let run = tags.iter().find(|t| t.starts_with("run="));
            let rewritten = indexed
                .get_all_snapshots()
                .map_err(&err)?
                .into_iter()
                .find(|s| {
                    s.id != old
                        && s.description == snap.description
                        && run.is_some_and(|r| s.tags.contains(r))
                });
            if let Some(new) = rewritten {
                snap = new;
            }
        }
        Ok(info(&snap))
    }

    /// Applies `retention` to the snapshots of `service` (tag `service=<name>`); returns
    /// the ids forgotten. With `prune`, the space they held is freed at once.
    pub fn forget(
        &self,
        service: &str,
        retention: &Retention,
        prune: bool,
        dry_run: bool,
    ) -> Result<Vec<String>, BackupError> {
        let err = restic_err(&self.name);
        let tag = format!("service={service}");
        let snaps: Vec<SnapshotFile> = self
            .repo
            .get_all_snapshots()
            .map_err(&err)?
            .into_iter()
            .filter(|s| s.tags.contains(&tag))
            .collect();
        let keep = keep_options(retention);
        let now = rustic_core::jiff::Zoned::now();
        let decided = keep.apply(snaps, &now).map_err(&err)?;
        let doomed: Vec<_> = decided
            .iter()
            .filter(|f| !f.keep)
            .map(|f| f.snapshot.id)
            .collect();
        let ids = doomed
            .iter()
            .map(|i| i.to_hex().as_str().to_string())
            .collect();
        if dry_run || doomed.is_empty() {
            return Ok(ids);
        }
        self.repo.delete_snapshots(&doomed).map_err(&err)?;
        if prune {
            let opts = PruneOptions::default();
            let plan = self.repo.prune_plan(&opts).map_err(&err)?;
            self.repo.prune(&opts, plan).map_err(&err)?;
        }
        Ok(ids)
    }

    /// Checks the repository's structure and, with `read_data` (`all`, `5%`, `1/7`, a
    /// size), the content of that share of its pack files.
    pub fn check(&self, read_data: Option<&str>) -> Result<(), BackupError> {
        let err = restic_err(&self.name);
        let mut opts = CheckOptions::default();
        if let Some(subset) = read_data {
            let subset: ReadSubsetOption = subset.parse().map_err(&err)?;
            opts = opts.read_data(true).read_data_subset(subset);
        }
        let results = self.repo.check(opts).map_err(&err)?;
        if results.is_ok().is_ok() {
            return Ok(());
        }
        let findings: Vec<String> = results.0.iter().map(|(_, e)| e.to_string()).collect();
        Err(BackupError::Restic {
            repo: self.name.clone(),
            message: format!("check found errors: {}", findings.join("; ")),
            source: None,
        })
    }

    /// The rustic_core repository, for key rotation.
    pub fn inner(&self) -> &Repository<OpenStatus> {
        &self.repo
    }

    /// The rustic_core repository, consumed (restore needs it indexed).
    pub fn into_inner(self) -> Repository<OpenStatus> {
        self.repo
    }

    /// Deletes snapshots by id (used to discard one whose dump failed).
    pub fn delete(&self, ids: &[String]) -> Result<(), BackupError> {
        let err = restic_err(&self.name);
        let all = self.repo.get_all_snapshots().map_err(&err)?;
        let doomed: Vec<_> = all
            .iter()
            .filter(|s| ids.iter().any(|i| i.as_str() == s.id.to_hex().as_str()))
            .map(|s| s.id)
            .collect();
        self.repo.delete_snapshots(&doomed).map_err(err)
    }
}

fn keep_options(r: &Retention) -> KeepOptions {
    let n = |v: u32| (v > 0).then(|| i32::try_from(v).unwrap_or(i32::MAX));
    KeepOptions::default()
        .keep_last(n(r.keep_last))
        .keep_hourly(n(r.keep_hourly))
        .keep_daily(n(r.keep_daily))
        .keep_weekly(n(r.keep_weekly))
        .keep_monthly(n(r.keep_monthly))
        .keep_yearly(n(r.keep_yearly))
}

/// Restores snapshot `id` into `dest` (see [`crate::engine::extract`]), counting into
/// `meter`.
pub fn extract(
    access: &RepoAccess,
    id: &str,
    dest: &Path,
    meter: Option<&Arc<Meter>>,
    key: Option<MasterKey>,
) -> Result<(), BackupError> {
    let err = restic_err(&access.repo.name);
    let repo = Restic::open_metered(access, meter, key)?
        .into_inner()
        .to_indexed()
        .map_err(&err)?;
    let snap = repo.get_snapshot_from_str(id, |_| true).map_err(&err)?;
    let node = repo.node_from_snapshot_and_path(&snap, "").map_err(&err)?;
    let ls = repo.ls(&node, &LsOptions::default()).map_err(&err)?;
    let mut target = dest.to_string_lossy().into_owned();
    if !target.ends_with('/') {
        target.push('/');
    }
    let dest = LocalDestination::new(&target, true, false).map_err(&err)?;
    let opts = RestoreOptions::default();
    let plan = repo
        .prepare_restore(&opts, ls.clone(), &dest, false)
        .map_err(&err)?;
    // A pack that fails to decrypt (a damaged repository) is an error of this restore
    // (vendored rustic_core, change 2), not a panic in its threads; it is said plainly.
    repo.restore(plan, &opts, ls, &dest)
        .map_err(&err)
        .map_err(|e| match e {
            BackupError::Restic {
                repo,
                message,
                source,
            } if message.contains("MAC check failed") => BackupError::Restic {
                repo,
                message: "restore failed: data decryption failed (MAC check failed): the \
                          repository is damaged"
                    .into(),
                source,
            },
            other => other,
        })
}

/// What agex reads of a snapshot file (the fuzz target `restic_snapshot` drives this).
pub fn info(s: &SnapshotFile) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.to_hex().as_str().to_string(),
        time: s.time.to_string(),
        tags: s.tags.iter().map(ToString::to_string).collect(),
        paths: s.paths.iter().map(ToString::to_string).collect(),
        bytes_added: s.summary.as_ref().map(|x| x.data_added_packed),
        description: s.description.clone(),
    }
}

/// A virtual file of a snapshot whose bytes come from a reader while they are produced
/// (a database dump, the manifest); its size is what the reader gave (see
/// vendor/rustic_core/VENDORED.md).
pub struct Stream {
    /// Where it appears in the snapshot (absolute).
    pub path: PathBuf,
    /// Its content.
    pub reader: Box<dyn Read + Send>,
}

/// The entries of local paths and of streams, in the order the archiver needs (sorted by
/// path, component-wise, as a directory walk yields them).
struct Combined {
    local: Option<LocalSource>,
    root: PathBuf,
    streams: std::sync::Mutex<Vec<Stream>>,
    stream_paths: Vec<PathBuf>,
    meter: Option<Arc<Meter>>,
    /// Told of every entry the archiver takes: the side is at work.
    complete: Completion,
}

impl Combined {
    fn new(
        root: &Path,
        paths: &[PathBuf],
        excludes: &[String],
        streams: Vec<Stream>,
        meter: Option<Arc<Meter>>,
        complete: Completion,
    ) -> RusticResult<Combined> {
        let under_root: Vec<PathBuf> = paths.iter().map(|p| under(root, p)).collect();
        let local = if under_root.is_empty() {
            None
        } else {
            let mut ex = rustic_core::Excludes::default();
            ex.globs = excludes
                .iter()
                .map(|g| format!("!{}", under(root, Path::new(g)).display()))
                .collect();
            Some(LocalSource::new(
                LocalSourceSaveOptions::default(),
                &ex,
                &LocalSourceFilterOptions::default(),
                &under_root,
            )?)
        };
        let stream_paths = streams.iter().map(|s| s.path.clone()).collect();
        Ok(Combined {
            local,
            root: root.to_path_buf(),
            streams: std::sync::Mutex::new(streams),
            stream_paths,
            meter,
            complete,
        })
    }

    fn stream_paths(&self) -> Vec<PathBuf> {
        self.stream_paths.clone()
    }
}

/// How an entry is opened: a local file, or a stream handed over once.
pub enum Open {
    /// A file under the root, in flight until it is read or dropped.
    Local(LocalOpen, Ticket),
    /// A dump stream or a manifest.
    Stream(Box<dyn Read + Send>),
}

impl ReadSourceOpen for Open {
    type Reader = Box<dyn Read + Send>;

    fn open(self) -> RusticResult<Self::Reader> {
        match self {
            Open::Local(o, ticket) => Ok(Box::new(Ticketed {
                reader: o.open()?,
                _ticket: ticket,
            })),
            Open::Stream(r) => Ok(r),
        }
    }
}

/// The files the archiver took and has not finished reading, by their place in the walk.
///
/// rustic_core reads files on several threads, so a stream could be opened while a file
/// before it in path order is still being read. A stream waits for those first
/// ([`AfterFiles`]): the manifest is made only once the snapshot holds what it read of
/// every file before it, so its check that a file was not written since agex read it
/// comes after the engine's read, as it must (the files after it are checked once the
/// snapshot is written).
#[derive(Clone, Default)]
pub struct InFlight(Arc<(Mutex<std::collections::BTreeSet<u64>>, std::sync::Condvar)>);

impl InFlight {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket for the file at `place`, in flight until the ticket is dropped.
    fn take(&self, place: u64) -> Ticket {
        self.set().insert(place);
        Ticket {
            place,
            in_flight: self.clone(),
        }
    }

    /// Waits until no file before `place` is in flight.
    fn wait_before(&self, place: u64) {
        let mut set = self.set();
        while set.first().is_some_and(|first| *first < place) {
            set = self.0 .1.wait(set).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One file in flight (see [`InFlight`]).
pub struct Ticket {
    place: u64,
    in_flight: InFlight,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.set().remove(&self.place);
        self.in_flight.0 .1.notify_all();
    }
}

/// A local file's reader, in flight until it is dropped.
struct Ticketed<R> {
    reader: R,
    _ticket: Ticket,
}

impl<R: Read> Read for Ticketed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

/// A stream that is read only once no file before it is in flight.
struct AfterFiles {
    inner: Box<dyn Read + Send>,
    wait: Option<(InFlight, u64)>,
}

impl Read for AfterFiles {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some((in_flight, place)) = self.wait.take() {
            in_flight.wait_before(place);
        }
        self.inner.read(buf)
    }
}

impl ReadSource for Combined {
    type Open = Open;
    type Iter = Merged;

    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(None)
    }

    fn entries(&self) -> Self::Iter {
        let now = rustic_core::jiff::Zoned::now().timestamp();
        let mut streams: Vec<ReadSourceEntry<Box<dyn Read + Send>>> =
            std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .map(|s| {
                    let name = s
                        .path
                        .file_name()
                        .map(|n| n.to_os_string())
                        .unwrap_or_default();
                    // The time of this run: a stream never matches the parent snapshot's
                    // node, so its content is always read, never reused from a stale dump.
                    // Its size is unknown until it ends; the archiver records the bytes read.
                    let meta = rustic_core::repofile::Metadata {
                        size: 0,
                        mode: Some(0o600),
                        mtime: Some(now),
                        ..Default::default()
                    };
                    let node = rustic_core::repofile::Node::new_node(
                        &name,
                        rustic_core::repofile::NodeType::File,
                        meta,
                    );
                    ReadSourceEntry {
                        path: s.path,
                        node,
                        open: Some(s.reader),
                    }
                })
                .collect();
        // Popped from the back: keep the greatest path first.
        streams.sort_by(|a, b| b.path.cmp(&a.path));
        let root = self.root.clone();
        let local: Box<dyn Iterator<Item = RusticResult<ReadSourceEntry<LocalOpen>>> + Send> =
            match &self.local {
                Some(l) => Box::new(l.entries().map(move |e| {
                    e.map(|e| ReadSourceEntry {
                        path: host_path(&root, &e.path),
                        ..e
                    })
                })),
                None => Box::new(std::iter::empty()),
            };
        Merged {
            local: local.peekable(),
            streams,
            meter: self.meter.clone(),
            complete: self.complete.clone(),
            in_flight: InFlight::default(),
            place: 0,
        }
    }
}

type LocalOpen = <LocalSource as ReadSource>::Open;

/// The local walk (already in path order) merged with the few stream entries, lazily:
/// memory stays flat however many files the paths hold.
pub struct Merged {
    local: std::iter::Peekable<
        Box<dyn Iterator<Item = RusticResult<ReadSourceEntry<LocalOpen>>> + Send>,
    >,
    streams: Vec<ReadSourceEntry<Box<dyn Read + Send>>>,
    meter: Option<Arc<Meter>>,
    complete: Completion,
    /// The files taken and not yet read, by their place in this walk.
    in_flight: InFlight,
    place: u64,
}

impl Iterator for Merged {
    type Item = RusticResult<ReadSourceEntry<Open>>;

    fn next(&mut self) -> Option<Self::Item> {
        let stream_first = match (self.local.peek(), self.streams.last()) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(Err(_)), Some(_)) => false,
            (Some(Ok(l)), Some(s)) => s.path < l.path,
        };
        self.place += 1;
        let (in_flight, place) = (&self.in_flight, self.place);
        let next = if stream_first {
            self.streams.pop().map(|e| {
                Ok(ReadSourceEntry {
                    open: e.open.map(|inner| {
                        Open::Stream(Box::new(AfterFiles {
                            inner,
                            wait: Some((in_flight.clone(), place)),
                        }))
                    }),
                    path: e.path,
                    node: e.node,
                })
            })
        } else {
            self.local.next().map(|e| {
                e.map(|e| ReadSourceEntry {
                    open: e.open.map(|o| Open::Local(o, in_flight.take(place))),
                    path: e.path,
                    node: e.node,
                })
            })
        };
        self.complete.active();
        if let (Some(meter), Some(Ok(e))) = (&self.meter, &next) {
            if e.node.node_type == rustic_core::repofile::NodeType::File {
                meter.add_file();
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stream is read only once every file before it in the walk was read, whichever
    /// thread reads what; files after it do not hold it.
    #[test]
    fn a_stream_waits_for_the_files_before_it_only() {
        let in_flight = InFlight::default();
        let first = in_flight.take(1);
        let second = in_flight.take(2);
        let after = in_flight.take(4);
        let stream = AfterFiles {
            inner: Box::new(&b"manifest"[..]),
            wait: Some((in_flight.clone(), 3)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut stream = stream;
            let mut out = Vec::new();
            stream.read_to_end(&mut out).unwrap();
            tx.send(out).unwrap();
        });
        drop(first);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(second);
        let read = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(read, b"manifest");
        reader.join().unwrap();
        drop(after);
        assert!(in_flight.set().is_empty());
    }
}
