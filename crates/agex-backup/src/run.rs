//! One backup run: for each selected service, dump each database once, fan the dump out
//! to every selected repository, write one snapshot/archive per repository concurrently,
//! discard any snapshot whose dump did not complete, apply retention, and record the
//! result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agex_core::systemctl::Systemctl;
use agex_core::{Database, Policy, Project, RepositoryKind};
use rustic_core::repofile::MasterKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::access::{RepoAccess, Unlocked};
use crate::dump;
use crate::engine::borg::{Borg, Create, CreateFailure};
use crate::engine::restic::{Restic, Stream};
use crate::engine::Engine;
use crate::error::BackupError;
use crate::lock;
use crate::manifest::{self, DumpEntry, DumpKind, HostPath, Selection, SpecialEntry, Walked};
use crate::manifest_stream::{ManifestSource, Marks};
use crate::paths::{self, RUNS_DIR, STATE_DIR};
use crate::process;
use crate::progress::{Meter, Progress};
use crate::tee::{self, Completion, Tee};
use crate::units::StoppedUnits;
use crate::verdict::Verdict;

/// Which services and repositories a run covers, and how it treats the system.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only this service (default: every policy).
    pub service: Option<String>,
    /// Only this repository (default: each policy's repositories).
    pub repo: Option<String>,
    /// The `systemctl` command used for a policy's `stop_units` (None: units are not
    /// touched, and a policy that names some fails rather than back up a live service).
    pub systemctl: Option<Systemctl>,
    /// How long to wait for another run holding a repository.
    pub lock_wait: Duration,
    /// A Borg lock held by someone else for longer than this is broken (None: never).
    pub stale_lock_age: Option<Duration>,
    /// How long a repository may take no data from a dump while another waits before it
    /// is left out of the service's run (None: never).
    pub stall_timeout: Option<Duration>,
    /// Where each repository reports how far it has got (None: nowhere).
    pub progress: Option<Arc<dyn Progress>>,
}

/// One service to back up to some repositories. Pure: building it touches nothing.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedService {
    /// The service.
    pub service: String,
    /// Repositories to write to.
    pub repositories: Vec<String>,
    /// Host paths.
    pub paths: Vec<PathBuf>,
    /// Dump file names.
    pub dumps: Vec<String>,
}

/// Decides what a run does.
pub fn plan(project: &Project, opts: &RunOptions) -> Result<Vec<PlannedService>, BackupError> {
    if let Some(r) = &opts.repo {
        crate::access::repository(project, r)?;
    }
    let policies: Vec<&Policy> = match &opts.service {
        Some(s) => vec![crate::access::policy(project, s)?],
        None => project.policies.values().collect(),
    };
    Ok(policies
        .into_iter()
        .map(|p| PlannedService {
            service: p.service.clone(),
            repositories: p
                .repositories
                .iter()
                .filter(|r| opts.repo.as_ref().is_none_or(|only| only == *r))
                .cloned()
                .collect(),
            paths: p.paths.clone(),
            dumps: p.databases.iter().map(Database::dump_file).collect(),
        })
        .filter(|p| !p.repositories.is_empty())
        .collect())
}

/// The outcome for one service in one repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoResult {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// `ok` or `failed`.
    pub result: Verdict,
    /// Why it failed.
    pub error: Option<String>,
    /// Snapshot id or archive name.
    pub snapshot: Option<String>,
    /// Wall time in seconds.
    pub duration_seconds: f64,
    /// Bytes the snapshot added to the repository (when the engine reports it).
    pub bytes_added: Option<u64>,
    /// Things that went wrong without failing the backup (retention, say).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Storage operations retried after a transient error (a reset connection, a 5xx):
    /// a run that needed many completed, but the network or the provider is ailing.
    #[serde(default)]
    pub retries: u64,
}

impl RepoResult {
    fn failed(service: &str, repo: &str, why: String, secs: f64) -> RepoResult {
        RepoResult {
            service: service.to_string(),
            repo: repo.to_string(),
            result: Verdict::Failed,
            error: Some(why),
            snapshot: None,
            duration_seconds: secs,
            bytes_added: None,
            warnings: vec![],
            retries: 0,
        }
    }

    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// The record of one run, written as JSON under `/var/lib/agex/runs/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// `YYYYMMDDTHHMMSS.mmmZ` of the start.
    pub run_id: String,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    pub finished: String,
    /// One entry per service and repository.
    pub results: Vec<RepoResult>,
    /// Every complete dump taken.
    pub dumps: Vec<DumpEntry>,
}

impl RunRecord {
    /// How many entries failed and how many there were.
    pub fn failures(&self) -> (usize, usize) {
        (
            self.results.iter().filter(|r| !r.ok()).count(),
            self.results.len(),
        )
    }
}

/// How one repository's side of a service backup ended: the snapshot id (or archive)
/// and bytes added or the error, wall seconds, warnings.
type SideOutcome = (Result<Written, SideError>, f64, Vec<String>);

/// Why a repository's side of a service backup wrote no snapshot.
#[derive(Debug, thiserror::Error)]
enum SideError {
    #[error(transparent)]
    Engine(#[from] BackupError),
    #[error("the backup thread died")]
    Died,
}

/// Why a service could not be made ready to be read: nothing was backed up.
#[derive(Debug, thiserror::Error)]
enum QuiesceError {
    /// The policy's paths or excludes cannot be used.
    #[error(transparent)]
    Selection(BackupError),
    #[error(transparent)]
    Units(#[from] crate::units::UnitsError),
    #[error("before command failed: {0}")]
    Before(#[source] BackupError),
    /// The walk failed; `after` says what failed while undoing the rest.
    #[error("reading the paths failed: {source}{}", .after.as_deref().map(|a| format!("; {a}")).unwrap_or_default())]
    Walk {
        source: BackupError,
        after: Option<String>,
    },
}

/// Why a service's dumps are not complete; every repository's side is judged by it.
#[derive(Debug, Clone, thiserror::Error)]
enum DumpFailure {
    #[error("dump of {file} failed: {source}")]
    Dump {
        file: String,
        source: Arc<BackupError>,
    },
    #[error("the thread taking the dumps died")]
    Died,
}

/// A snapshot id (or archive name) and the bytes it added, when the engine says.
type Written = (String, Option<u64>);

/// What a service backup needs besides its policy.
struct Env<'a> {
    root: &'a Path,
    state: PathBuf,
    access: &'a Unlocked,
    db_passwords: &'a BTreeMap<String, Zeroizing<Vec<u8>>>,
    run_id: String,
    opts: &'a RunOptions,
    /// Master keys of the Restic repositories this run writes, derived once each (in the
    /// background from the start of the run, while paths are walked and databases dumped).
    restic_keys: BTreeMap<String, Arc<OnceLock<Option<MasterKey>>>>,
    /// Per repository, the retries already reported in an earlier result of this run.
    retries_reported: Mutex<BTreeMap<String, u64>>,
}

/// Runs a planned backup. Repository credentials were decrypted by the caller; a
/// repository whose credentials failed is reported failed for each of its services.
pub fn execute(
    project: &Project,
    root: &Path,
    planned: &[PlannedService],
    access: &Unlocked,
    db_passwords: &BTreeMap<String, Zeroizing<Vec<u8>>>,
    opts: &RunOptions,
) -> Result<RunRecord, BackupError> {
    let started = chrono::Utc::now();
    let env = Env {
        root,
        state: paths::state_dir(root),
        access,
        db_passwords,
        run_id: started.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
        opts,
        restic_keys: planned
            .iter()
            .flat_map(|p| p.repositories.iter())
            .filter(
                |r| matches!(access.get(*r), Some(Ok(a)) if a.repo.kind == RepositoryKind::Restic),
            )
            .map(|r| (r.clone(), Arc::default()))
            .collect(),
        retries_reported: Mutex::default(),
    };
    // Reached without following a symlink: the dumps, records and locks stay below the
    // root.
    agex_core::beneath::Dir::open(root, Path::new(STATE_DIR), Some(0o755))?;
    let mut results = Vec::new();
    let mut dumps = Vec::new();
    {
        // The password's key derivation (scrypt: most of a second) overlaps the walk
        // and the dumps of the first service instead of delaying its snapshot. It is
        // not waited for at the end: a server that hangs while it is opened is left
        // behind by the run, and the thread ends on its own request timeout, unheard.
        for (name, cell) in &env.restic_keys {
            let Some(Ok(access)) = env.access.get(name) else {
                let _ = cell.set(None);
                continue;
            };
            let (cell, access) = (Arc::clone(cell), access.clone());
            let derive = std::thread::Builder::new().name("agex-key".into()).spawn({
                let cell = Arc::clone(&cell);
                move || {
                    cell.get_or_init(|| Restic::open(&access).ok().map(|r| r.master_key()));
                }
            });
            if derive.is_err() {
                let _ = cell.set(None);
            }
        }
        for item in planned {
            let Some(policy) = project.policies.get(&item.service) else {
                continue;
            };
            let (mut r, mut d) = backup_service(&env, policy, &item.repositories);
            results.append(&mut r);
            dumps.append(&mut d);
        }
    }
    let record = RunRecord {
        run_id: env.run_id.clone(),
        started: started.to_rfc3339(),
        finished: chrono::Utc::now().to_rfc3339(),
        results,
        dumps,
    };
    crate::records::save(root, RUNS_DIR, &record.run_id, &record, "run record")?;
    Ok(record)
}

/// Every run record under the root, oldest first. A record that does not parse (a
/// foreign file) is an error naming it.
pub fn records(root: &Path) -> Result<Vec<RunRecord>, BackupError> {
    crate::records::load_all(root, RUNS_DIR, "run record")
}

fn stop_units(env: &Env<'_>, policy: &Policy) -> Result<StoppedUnits, QuiesceError> {
    Ok(StoppedUnits::stop(
        env.opts.systemctl.as_ref(),
        &policy.stop_units,
    )?)
}

fn run_hooks(cmds: &[String]) -> Result<(), BackupError> {
    for cmd in cmds {
        process::run(std::process::Command::new("/bin/sh").arg("-c").arg(cmd))?;
    }
    Ok(())
}

/// Takes a service's dumps while the repositories read them: dumps each database once
/// into its tee, in the order the engines read them, then hands the dump entries (or why
/// one failed) to the manifests. After a failed dump the later ones are not taken and
/// the manifests fail too, so no repository gets a whole set.
fn produce(
    env: &Env<'_>,
    service: &str,
    dumps: Vec<(&Database, Tee)>,
    source: &ManifestSource,
) -> Result<Vec<DumpEntry>, DumpFailure> {
    let mut entries = Vec::new();
    let mut failed: Option<DumpFailure> = None;
    for (db, tee) in dumps {
        if let Some(why) = &failed {
            tee.fail(&format!("{} was not dumped: {why}", db.dump_file()));
            continue;
        }
        let password = match db {
            Database::Postgres {
                password_secret: Some(secret),
                ..
            } => env.db_passwords.get(secret).cloned(),
            _ => None,
        };
        match dump::stream(db, env.root, password, tee) {
            Ok(d) => entries.push(DumpEntry {
                name: db.name().to_string(),
                kind: DumpKind::of(db),
                path: manifest::dump_path(service, &db.dump_file())
                    .to_string_lossy()
                    .into_owned(),
                size: d.copied.size,
                digest: d.copied.digest,
                row_counts: d.row_counts,
            }),
            Err(e) => {
                failed = Some(DumpFailure::Dump {
                    file: db.dump_file(),
                    source: Arc::new(e),
                })
            }
        }
    }
    let result = match failed {
        Some(why) => Err(why),
        None => Ok(entries),
    };
    source.set_dumps(result.clone().map_err(|e| e.to_string()));
    result
}

/// A repository a service backup writes to, locked by agex for the service's run.
struct Live<'a> {
    name: &'a str,
    access: &'a RepoAccess,
    _lock: lock::RepoLock,
}

/// Threads a Restic side reads and chunks files on: one per core, but one core fewer
/// while a `borg create` runs beside it. borg reads, chunks and compresses on one
/// thread, and the run ends when borg does: a Restic side on every core took a fifth
/// of borg's core while both read files (measured per second on 150,000 files), and
/// the Restic side, done long before borg, did not need it.
fn restic_read_threads(live: &[Live<'_>]) -> usize {
    let beside_borg = live
        .iter()
        .any(|l| l.access.repo.kind == RepositoryKind::Borg);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if beside_borg {
        cores.saturating_sub(1).max(1)
    } else {
        cores
    }
}

/// Locks each repository whose credentials opened; the others fail at once.
fn lock_repositories<'a>(
    env: &Env<'a>,
    service: &str,
    repos: &'a [String],
) -> (Vec<Live<'a>>, Vec<RepoResult>) {
    let mut results = Vec::new();
    let mut live = Vec::new();
    for r in repos {
        match env.access.get(r) {
            Some(Ok(access)) => match lock::acquire(&env.state, r, env.opts.lock_wait) {
                Ok(l) => live.push(Live {
                    name: r,
                    access,
                    _lock: l,
                }),
                Err(e) => results.push(RepoResult::failed(service, r, e.to_string(), 0.0)),
            },
            Some(Err(e)) => results.push(RepoResult::failed(service, r, e.to_string(), 0.0)),
            None => results.push(RepoResult::failed(
                service,
                r,
                "repository is not open".into(),
                0.0,
            )),
        }
    }
    (live, results)
}

/// A service made ready to be read: its units stopped, its `before` commands run, every
/// file of its selection read once.
struct Quiesced {
    selection: Selection,
    units: StoppedUnits,
    walked: Walked,
}

/// Stops the policy's units, runs its `before` commands and reads its paths; on failure
/// says why, after undoing what it did (the units start again, `after` runs once the
/// `before` commands did).
fn quiesce(env: &Env<'_>, policy: &Policy) -> Result<Quiesced, QuiesceError> {
    let service = policy.service.as_str();
    let selection = Selection::new(policy).map_err(QuiesceError::Selection)?;
    let cache = env.state.join("cache").join(format!("{service}.walk"));
    // The digest caches of earlier versions, replaced by the walk file, and the walk
    // files of killed runs.
    for old in ["digests", "digests.json"] {
        let _ = std::fs::remove_file(env.state.join("cache").join(format!("{service}.{old}")));
    }
    agex_core::atomic::remove_dead_temps(&env.state.join("cache"));
    let units = stop_units(env, policy)?;
    if let Err(e) = run_hooks(&policy.before) {
        drop(units);
        return Err(QuiesceError::Before(e));
    }
    // agex sees every file first, after the units stopped and before any engine reads
    // one (it reads the new ones while the engines run): a file an engine later finds as
    // the walk saw it holds the bytes agex digested, one that changed since is marked so
    // in that repository's manifest (crate::manifest_stream). A walk is stats only.
    match selection.walk(env.root, &cache) {
        Ok(walked) => Ok(Quiesced {
            selection,
            units,
            walked,
        }),
        Err(source) => Err(QuiesceError::Walk {
            source,
            after: resume(policy, units),
        }),
    }
}

/// Runs the policy's `after` commands and starts its units again; says what failed.
fn resume(policy: &Policy, units: StoppedUnits) -> Option<String> {
    let mut after = Vec::new();
    if let Err(e) = run_hooks(&policy.after) {
        after.push(format!("after command failed: {e}"));
    }
    if let Err(e) = units.start() {
        after.push(e.to_string());
    }
    (!after.is_empty()).then(|| after.join("; "))
}

/// Every stream of a service backup, fanned out to its repositories.
struct Wiring<'p> {
    /// Per repository, how much of its streams it has taken.
    completions: Vec<Completion>,
    /// Per repository, its streams in path order: every dump, then its manifest.
    streams: Vec<Vec<Stream>>,
    /// The database each tee is to be fed from, in the order the engines read them.
    dumps: Vec<(&'p Database, Tee)>,
    /// Per repository, the files its manifest marked changed.
    marks: Vec<Marks>,
}

/// Each stream (every dump, then the manifest) reaches every live repository through
/// its own tee; the engines read the dumps in path order, so they are taken in it.
fn wire<'p>(
    env: &Env<'_>,
    policy: &'p Policy,
    repos: usize,
    source: &Arc<ManifestSource>,
) -> Wiring<'p> {
    let service = policy.service.as_str();
    let completions: Vec<Completion> = (0..repos).map(|_| Completion::default()).collect();
    let mut streams: Vec<Vec<Stream>> = (0..repos).map(|_| Vec::new()).collect();
    let mut add_stream = |path: PathBuf| {
        let (tee, readers) = tee::tee(&completions, env.opts.stall_timeout);
        for (list, reader) in streams.iter_mut().zip(readers) {
            list.push(Stream {
                path: path.clone(),
                reader: Box::new(reader),
            });
        }
        tee
    };
    let mut databases: Vec<&Database> = policy.databases.iter().collect();
    databases.sort_by_key(|db| db.dump_file());
    let dumps: Vec<(&Database, Tee)> = databases
        .into_iter()
        .map(|db| {
            (
                db,
                add_stream(manifest::dump_path(service, &db.dump_file())),
            )
        })
        .collect();
    // Each repository's manifest is its own stream, made when its engine reaches it.
    let marks: Vec<Marks> = streams
        .iter_mut()
        .zip(&completions)
        .map(|(list, completion)| {
            let (reader, marks) = source.reader(completion.clone());
            list.push(Stream {
                path: manifest::manifest_path(service),
                reader: Box::new(reader),
            });
            marks
        })
        .collect();
    Wiring {
        completions,
        streams,
        dumps,
        marks,
    }
}

/// What every repository's side of one service backup shares.
struct Shared<'a> {
    selection: &'a Selection,
    specials: &'a [SpecialEntry],
    source: &'a ManifestSource,
    tags: &'a [String],
    archive: &'a str,
    walk_warnings: &'a [String],
    /// Threads a Restic side reads files on (see [`restic_read_threads`]).
    restic_read_threads: usize,
}

/// One repository's part of a service backup.
struct Side<'a> {
    access: &'a RepoAccess,
    streams: Vec<Stream>,
    complete: &'a Completion,
    meter: Option<&'a Arc<Meter>>,
    marks: &'a Marks,
}

/// Writes one repository's snapshot of a service; returns its id and bytes added (or why
/// not), the wall seconds and the warnings for it.
fn write_side(env: &Env<'_>, shared: &Shared<'_>, side: Side<'_>) -> SideOutcome {
    let (access, complete, meter, marks) = (side.access, side.complete, side.meter, side.marks);
    let t = Instant::now();
    let mut warnings = Vec::new();
    let r = match access.repo.kind {
        RepositoryKind::Restic => restic_side(env, shared, side),
        RepositoryKind::Borg => borg_with_retries(
            env,
            shared,
            access,
            side.streams,
            complete,
            meter,
            &mut warnings,
        )
        .map(|(id, added)| (id, added, None)),
    };
    if r.is_ok() {
        lock::foreign_lock_cleared(&env.state, &access.repo.name);
        warnings.extend(shared.walk_warnings.iter().cloned());
        warnings.extend(shared.source.read_warnings());
        let changed = match &r {
            Ok((_, _, Some(late))) => {
                let mut all = marks.get().unwrap_or_default();
                all.extend(late.iter().cloned());
                all.sort();
                all.dedup();
                all
            }
            _ => marks.get().unwrap_or_default(),
        };
        warnings.extend(manifest::changed_warning(&changed));
    }
    let r = r.map(|(id, added, _)| (id, added));
    if let Some(m) = meter {
        m.finish(r.is_ok());
    }
    let secs = t.elapsed().as_secs_f64();
    (r.map_err(SideError::from), secs, warnings)
}

/// Borg's side: `borg create`, run again when the network failed before borg read a
/// stream, and once more after breaking a stale lock that kept borg out (said in
/// `warnings`).
fn borg_with_retries(
    env: &Env<'_>,
    shared: &Shared<'_>,
    access: &RepoAccess,
    streams: Vec<Stream>,
    complete: &Completion,
    meter: Option<&Arc<Meter>>,
    warnings: &mut Vec<String>,
) -> Result<Written, BackupError> {
    let attempt = |streams| {
        borg_side(
            access,
            env,
            (shared.selection, shared.specials),
            streams,
            complete,
            shared.archive,
            meter,
        )
    };
    // The streams of a borg that never opened any of them, for another attempt; gone
    // once one was read.
    let unread = std::cell::RefCell::new(Some(streams));
    let tried = crate::backend::Retry::COMMAND.run(
        &access.repo.name,
        "borg create",
        &access.retries,
        || {
            let Some(streams) = unread.borrow_mut().take() else {
                return Err(BackupError::Output {
                    tool: "borg create".into(),
                    detail: "its streams were read already".into(),
                });
            };
            attempt(streams).map_err(|(e, left)| {
                *unread.borrow_mut() = left;
                e
            })
        },
        // The network failed before borg read a stream: borg runs again (it resumes from
        // what reached the server).
        |e| {
            unread
                .borrow()
                .is_some()
                .then(|| crate::engine::borg::transient(e))
                .flatten()
        },
    );
    let tried = tried.map_err(|e| match Borg::new(access, &env.state) {
        Ok(b) => b.settle(e),
        Err(_) => e,
    });
    match (tried, unread.into_inner()) {
        // borg gave up on the lock before reading any stream: a stale lock is broken and
        // borg tries once more with them.
        (Err(e @ BackupError::Locked { .. }), Some(streams)) => match break_stale_lock(env, access)
        {
            Some(w) => {
                warnings.push(w);
                attempt(streams).map_err(|(e, _)| e)
            }
            None => Err(e),
        },
        (r, _) => r,
    }
}

/// How one repository's side came out, once the fate of the service's dumps is known.
#[derive(Debug, PartialEq)]
enum Judged {
    /// A snapshot stands.
    Written {
        snapshot: String,
        added: Option<u64>,
    },
    /// A snapshot was written although a dump failed: it is to be removed.
    Unwanted { snapshot: String, why: String },
    /// No snapshot was written.
    Failed(String),
}

/// Judges a repository's side. A broken dump or manifest shut both engines out (no
/// snapshot was written, no archive committed): that is said in the dump's words, not
/// the engine's; a side the run left behind (`left_behind`, after `stall`) says so.
fn judge(
    side: Result<Written, SideError>,
    left_behind: bool,
    stall: Option<Duration>,
    dump_failure: Option<&DumpFailure>,
) -> Judged {
    match (side, dump_failure) {
        (Err(_), _) if left_behind => Judged::Failed(format!(
            "left behind: it took no data and showed no sign of work for {} s while the \
             other repository waited (`[backup] stall_timeout`); no snapshot was written",
            stall.unwrap_or_default().as_secs()
        )),
        (Err(_), Some(why)) => Judged::Failed(format!("{why}; no snapshot was written")),
        (Ok((snapshot, _)), Some(why)) => Judged::Unwanted {
            snapshot,
            why: why.to_string(),
        },
        (Ok((snapshot, added)), None) => Judged::Written { snapshot, added },
        (Err(e), None) => Judged::Failed(e.to_string()),
    }
}

/// The result of one service in one repository: `outcome` is the snapshot that stands
/// (and bytes added) or why there is none; `after` is what went wrong once the backup
/// was taken (an `after` command, starting the units), which fails it even though its
/// snapshot stands: the service was left worse than found.
fn classify(
    service: &str,
    repo: &str,
    outcome: Result<Written, String>,
    secs: f64,
    warnings: Vec<String>,
    after: Option<&str>,
) -> RepoResult {
    match outcome {
        Ok((snapshot, added)) => RepoResult {
            service: service.to_string(),
            repo: repo.to_string(),
            result: Verdict::of(after.is_none()),
            error: after.map(|e| format!("the snapshot was written, but {e}")),
            snapshot: Some(snapshot),
            duration_seconds: secs,
            bytes_added: added,
            warnings,
            retries: 0,
        },
        Err(e) => match after {
            Some(a) => RepoResult::failed(service, repo, format!("{e}; {a}"), secs),
            None => RepoResult::failed(service, repo, e, secs),
        },
    }
}

/// Applies the policy's retention right after its backup (a retention with its own
/// schedule runs as a separate forget job instead); says why it failed, if it did.
fn retain(env: &Env<'_>, policy: &Policy, access: &RepoAccess) -> Option<String> {
    let inline = policy.forget_schedule.is_none();
    let ret = policy
        .retention
        .as_ref()
        .filter(|r| inline && r.keeps_something())?;
    forget(access, &env.state, &policy.service, ret, ret.prune, false)
        .err()
        .map(|e| format!("retention failed: {e}"))
}

fn backup_service(
    env: &Env<'_>,
    policy: &Policy,
    repos: &[String],
) -> (Vec<RepoResult>, Vec<DumpEntry>) {
    let service = policy.service.as_str();
    let (live, mut results) = lock_repositories(env, service, repos);
    if live.is_empty() {
        return (results, vec![]);
    }
    let Quiesced {
        selection,
        units,
        walked,
    } = match quiesce(env, policy) {
        Ok(q) => q,
        Err(e) => {
            let why = e.to_string();
            for l in &live {
                results.push(RepoResult::failed(service, l.name, why.clone(), 0.0));
            }
            return (results, vec![]);
        }
    };
    let walk_warnings = walked.warnings.clone();
    let specials = walked.specials.clone();
    let (bytes, files) = (walked.bytes, walked.files);
    let source = ManifestSource::new(env.root.to_path_buf(), service, &env.run_id, walked);
    let Wiring {
        completions,
        streams,
        dumps,
        marks,
    } = wire(env, policy, live.len(), &source);
    let meters: Vec<Option<Arc<Meter>>> = live
        .iter()
        .map(|l| {
            env.opts.progress.as_ref().map(|sink| {
                let m = Meter::start(Arc::clone(sink), service, &l.access.repo.name);
                m.set_total(bytes, files);
                m
            })
        })
        .collect();
    let tags = vec![
        format!("service={service}"),
        format!("run={}", env.run_id),
        "agex".to_string(),
    ];
    let archive = format!("{service}-{}", env.run_id);
    let shared = Shared {
        selection: &selection,
        specials: &specials,
        source: &source,
        tags: &tags,
        archive: &archive,
        walk_warnings: &walk_warnings,
        restic_read_threads: restic_read_threads(&live),
    };
    let (produced, outcomes) = std::thread::scope(|scope| {
        scope.spawn(|| source.digest());
        let producer = scope.spawn(|| {
            // Also if taking the dumps panics, no manifest waits for them forever.
            struct Unblock<'a>(&'a ManifestSource);
            impl Drop for Unblock<'_> {
                fn drop(&mut self) {
                    self.0.fail_unless_dumped(&DumpFailure::Died.to_string());
                }
            }
            let _unblock = Unblock(&source);
            produce(env, service, dumps, &source)
        });
        let joins: Vec<_> = live
            .iter()
            .zip(streams)
            .zip(completions.iter().zip(&meters).zip(&marks))
            .map(|((l, streams), ((complete, meter), marks))| {
                let side = Side {
                    access: l.access,
                    streams,
                    complete,
                    meter: meter.as_ref(),
                    marks,
                };
                let shared = &shared;
                scope.spawn(move || write_side(env, shared, side))
            })
            .collect();
        let outcomes: Vec<SideOutcome> = joins
            .into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| (Err(SideError::Died), 0.0, Vec::new()))
            })
            .collect();
        let produced = producer.join().unwrap_or_else(|_| Err(DumpFailure::Died));
        (produced, outcomes)
    });
    let after = resume(policy, units);

    let (dump_entries, dump_failure) = match produced {
        Ok(dumps) => (dumps, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    for ((l, (side, secs, mut warnings)), complete) in live.iter().zip(outcomes).zip(&completions) {
        let judged = judge(
            side,
            complete.left_behind(),
            env.opts.stall_timeout,
            dump_failure.as_ref(),
        );
        let outcome = match judged {
            Judged::Written { snapshot, added } => {
                warnings.extend(retain(env, policy, l.access));
                Ok((snapshot, added))
            }
            Judged::Unwanted { snapshot, why } => {
                Err(discard(l.access, &env.state, &snapshot, &why))
            }
            Judged::Failed(why) => Err(why),
        };
        let mut result = classify(service, l.name, outcome, secs, warnings, after.as_deref());
        result.retries = new_retries(env, l.access);
        results.push(result);
    }
    (results, dump_entries)
}

/// The retries of `access`'s repository not reported yet in this run: those of this
/// service's backup and retention, and of opening the repository early for its key.
fn new_retries(env: &Env<'_>, access: &RepoAccess) -> u64 {
    let now = access.retries.load(Ordering::Relaxed);
    let mut seen = env
        .retries_reported
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let before = seen.insert(access.repo.name.clone(), now).unwrap_or(0);
    now.saturating_sub(before)
}

/// Removes a snapshot or archive written although a stream of it failed (the gate on the
/// Restic side and stopping borg keep this from happening); returns the error to report.
fn discard(access: &RepoAccess, state: &Path, snapshot: &str, why: &str) -> String {
    let removed = Engine::open(access, state).and_then(|e| e.delete(snapshot));
    match removed {
        Ok(()) => format!("{why}; the snapshot {snapshot} was written anyway and is removed"),
        Err(e) => format!(
            "{why}; the snapshot {snapshot} was written anyway and could not be removed: {e}"
        ),
    }
}

/// The master key of a Restic repository of this run, derived from its password once,
/// at the start of the run; None when that failed, or when the run left the repository
/// behind (`complete`) while it waited.
fn restic_key(env: &Env<'_>, repo: &str, complete: &Completion) -> Option<MasterKey> {
    let cell = env.restic_keys.get(repo)?;
    loop {
        if let Some(key) = cell.get() {
            return key.clone();
        }
        if complete.left_behind() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After borg gave up on a lock someone else holds: when that lock has been seen held
/// for longer than `[backup] stale_lock_age`, breaks it and says so (the caller then
/// tries once more). A lock seen for the first time is only remembered.
fn break_stale_lock(env: &Env<'_>, access: &RepoAccess) -> Option<String> {
    let age = env.opts.stale_lock_age.filter(|a| !a.is_zero())?;
    let repo = &access.repo.name;
    let held = lock::foreign_lock_seen(&env.state, repo).ok()?;
    if held < age {
        return None;
    }
    let broken = Borg::new(access, &env.state).and_then(|b| b.break_lock());
    lock::foreign_lock_cleared(&env.state, repo);
    match broken {
        Ok(()) => Some(format!(
            "broke a stale lock on `{repo}`: held by another process for at least {} s \
             (`[backup] stale_lock_age` is {} s)",
            held.as_secs(),
            age.as_secs()
        )),
        Err(e) => Some(format!("a stale lock on `{repo}` could not be broken: {e}")),
    }
}

/// Applies a retention policy to one service's snapshots in one repository; returns the
/// snapshots (Restic ids or Borg archive names) removed, or that would be with `dry_run`.
pub fn forget(
    access: &RepoAccess,
    state: &Path,
    service: &str,
    retention: &agex_core::Retention,
    prune: bool,
    dry_run: bool,
) -> Result<Vec<String>, BackupError> {
    Engine::open(access, state)?.forget(service, retention, prune, dry_run)
}

/// The Restic side's snapshot id, bytes added, and the files marked changed after its
/// manifest was made (recorded in the snapshot's description).
type ResticOutcome = (String, Option<u64>, Option<Vec<HostPath>>);

fn restic_side(
    env: &Env<'_>,
    shared: &Shared<'_>,
    side: Side<'_>,
) -> Result<ResticOutcome, BackupError> {
    let Side {
        access,
        streams,
        complete,
        meter,
        marks,
    } = side;
    let source = shared.source;
    let key = restic_key(env, &access.repo.name, complete);
    // Without a key (its derivation failed) the password is tried again, so the error
    // reported is the repository's own.
    let restic =
        Restic::open_watched(access, meter, key, complete.clone(), env.opts.stall_timeout)?
            .read_with(shared.restic_read_threads);
    let mut late = None;
    let mut unknown = None;
    // The manifest was made at its place in path order; files read after it that
    // changed since agex read them are recorded before the snapshot counts as written.
    let describe = || {
        let in_manifest = marks.get().unwrap_or_default();
        let now: Vec<HostPath> = match source.changed_after_manifest() {
            Ok(now) => now
                .into_iter()
                .filter(|p| in_manifest.binary_search(p).is_err())
                .collect(),
            Err(e) => {
                unknown = Some(e);
                return None;
            }
        };
        late = Some(now.clone());
        crate::manifest_stream::late_marks_description(now)
    };
    let snap = restic.backup(
        env.root,
        shared.selection.paths(),
        shared.selection.excludes(),
        streams,
        complete.clone(),
        shared.tags,
        describe,
    )?;
    // Which files changed after the manifest could not be told: the snapshot's manifest
    // may describe some as agex read them, not as stored. The run says so.
    if let Some(e) = unknown {
        return Err(e);
    }
    Ok((snap.id, snap.bytes_added, late))
}

/// Borg's side of a service backup: one `borg create` of the selection and the streams
/// (see [`Borg::create`]).
fn borg_side(
    access: &RepoAccess,
    env: &Env<'_>,
    (selection, specials): (&Selection, &[SpecialEntry]),
    streams: Vec<Stream>,
    complete: &Completion,
    archive: &str,
    meter: Option<&Arc<Meter>>,
) -> Result<(String, Option<u64>), CreateFailure> {
    let borg = match Borg::new(access, &env.state) {
        Ok(b) => b,
        Err(e) => return Err((e, Some(streams))),
    };
    let what = Create {
        root: env.root,
        selection,
        specials,
        archive,
        lock_wait: env.opts.lock_wait,
    };
    borg.create(&what, streams, complete, meter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written() -> Result<Written, SideError> {
        Ok(("abc123".to_string(), Some(42)))
    }

    fn stands() -> Result<Written, String> {
        Ok(("abc123".to_string(), Some(42)))
    }

    fn dump_failed() -> DumpFailure {
        DumpFailure::Dump {
            file: "db.sql".into(),
            source: Arc::new(BackupError::Output {
                tool: "sqlite3".into(),
                detail: "boom".into(),
            }),
        }
    }

    const DUMP_FAILED: &str = "dump of db.sql failed: sqlite3: unexpected output: boom";

    #[test]
    fn a_snapshot_stands_only_when_every_dump_completed() {
        assert_eq!(
            judge(written(), false, None, None),
            Judged::Written {
                snapshot: "abc123".into(),
                added: Some(42)
            }
        );
        assert_eq!(
            judge(written(), false, None, Some(&dump_failed())),
            Judged::Unwanted {
                snapshot: "abc123".into(),
                why: DUMP_FAILED.into()
            }
        );
    }

    #[test]
    fn a_failed_side_says_why_in_the_words_of_what_broke_it() {
        let engine = || {
            Err(SideError::Engine(BackupError::Output {
                tool: "borg create".into(),
                detail: "the engine's own error".into(),
            }))
        };
        assert_eq!(
            judge(engine(), false, None, None),
            Judged::Failed("borg create: unexpected output: the engine's own error".into())
        );
        assert_eq!(
            judge(engine(), false, None, Some(&dump_failed())),
            Judged::Failed(format!("{DUMP_FAILED}; no snapshot was written"))
        );
        assert_eq!(
            judge(Err(SideError::Died), false, None, None),
            Judged::Failed("the backup thread died".into())
        );
        // Left behind wins over a dump failure: the repository stalled first.
        let Judged::Failed(why) = judge(
            engine(),
            true,
            Some(Duration::from_secs(3)),
            Some(&DumpFailure::Died),
        ) else {
            panic!("a side left behind must fail");
        };
        assert!(
            why.starts_with("left behind: it took no data and showed no sign of work for 3 s"),
            "{why}"
        );
        assert!(why.ends_with("no snapshot was written"), "{why}");
        // A side that wrote its snapshot was not left behind, whatever the flag says.
        assert!(matches!(
            judge(written(), true, Some(Duration::from_secs(3)), None),
            Judged::Written { .. }
        ));
    }

    #[test]
    fn classify_fails_a_written_snapshot_when_the_service_was_left_worse() {
        let ok = classify("app", "r", stands(), 1.5, vec!["w".into()], None);
        assert!(ok.ok());
        assert_eq!(ok.result, Verdict::Ok);
        assert_eq!(ok.error, None);
        assert_eq!(ok.snapshot.as_deref(), Some("abc123"));
        assert_eq!(ok.bytes_added, Some(42));
        assert_eq!(ok.warnings, vec!["w".to_string()]);
        assert_eq!(ok.duration_seconds, 1.5);

        let worse = classify(
            "app",
            "r",
            stands(),
            1.5,
            vec![],
            Some("after command failed: x"),
        );
        assert_eq!(worse.result, Verdict::Failed);
        assert_eq!(
            worse.error.as_deref(),
            Some("the snapshot was written, but after command failed: x")
        );
        assert_eq!(worse.snapshot.as_deref(), Some("abc123"));
    }

    #[test]
    fn classify_joins_a_failure_with_what_went_wrong_after_it() {
        let failed = classify(
            "app",
            "r",
            Err("boom".into()),
            2.0,
            vec!["dropped".into()],
            Some("after command failed: x"),
        );
        assert_eq!(failed.result, Verdict::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("boom; after command failed: x")
        );
        assert_eq!(failed.snapshot, None);
        assert!(failed.warnings.is_empty());
        let plain = classify("app", "r", Err("boom".into()), 2.0, vec![], None);
        assert_eq!(plain.error.as_deref(), Some("boom"));
        assert_eq!((plain.service.as_str(), plain.repo.as_str()), ("app", "r"));
    }
}
