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

use crate::access::RepoAccess;
use crate::dump;
use crate::engine::borg::{Borg, Create, CreateFailure};
use crate::engine::restic::{Restic, Stream};
use crate::engine::Engine;
use crate::error::BackupError;
use crate::lock;
use crate::manifest::{self, under, DumpEntry, DumpKind, HostPath, Selection, SpecialEntry};
use crate::manifest_stream::{ManifestSource, Marks};
use crate::process;
use crate::progress::{Meter, Progress};
use crate::tee::{self, Completion, Tee};
use crate::units::StoppedUnits;
use crate::verdict::Verdict;

/// Where run records are written, under `--root`.
pub const RUNS_DIR: &str = "/var/lib/agex/runs";
/// agex's state directory, under `--root`.
pub const STATE_DIR: &str = "/var/lib/agex";

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

/// How one repository's side of a service backup ended: its index among the live
/// repositories, the snapshot id (or archive) and bytes added or the error, wall seconds,
/// warnings.
type SideOutcome = (
    usize,
    Result<(String, Option<u64>), String>,
    f64,
    Vec<String>,
);

/// What a service backup needs besides its policy.
struct Env<'a> {
    root: &'a Path,
    state: PathBuf,
    access: &'a BTreeMap<String, Result<RepoAccess, String>>,
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
    access: &BTreeMap<String, Result<RepoAccess, String>>,
    db_passwords: &BTreeMap<String, Zeroizing<Vec<u8>>>,
    opts: &RunOptions,
) -> Result<RunRecord, BackupError> {
    let started = chrono::Utc::now();
    let env = Env {
        root,
        state: under(root, Path::new(STATE_DIR)),
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

fn stop_units(env: &Env<'_>, policy: &Policy) -> Result<StoppedUnits, String> {
    StoppedUnits::stop(env.opts.systemctl.as_ref(), &policy.stop_units).map_err(|e| e.to_string())
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
) -> Result<Vec<DumpEntry>, String> {
    let mut entries = Vec::new();
    let mut failed: Option<String> = None;
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
            Err(e) => failed = Some(format!("dump of {} failed: {e}", db.dump_file())),
        }
    }
    let result = match failed {
        Some(why) => Err(why),
        None => Ok(entries),
    };
    source.set_dumps(result.clone());
    result
}

fn backup_service(
    env: &Env<'_>,
    policy: &Policy,
    repos: &[String],
) -> (Vec<RepoResult>, Vec<DumpEntry>) {
    let service = policy.service.as_str();
    let mut results = Vec::new();
    let mut live: Vec<(&String, &RepoAccess, lock::RepoLock)> = Vec::new();
    for r in repos {
        match env.access.get(r) {
            Some(Ok(a)) => match lock::acquire(&env.state, r, env.opts.lock_wait) {
                Ok(l) => live.push((r, a, l)),
                Err(e) => results.push(RepoResult::failed(service, r, e.to_string(), 0.0)),
            },
            Some(Err(e)) => results.push(RepoResult::failed(service, r, e.clone(), 0.0)),
            None => results.push(RepoResult::failed(
                service,
                r,
                "repository is not open".into(),
                0.0,
            )),
        }
    }
    if live.is_empty() {
        return (results, vec![]);
    }
    let fail_live = |results: &mut Vec<RepoResult>, why: String| {
        for (r, _, _) in &live {
            results.push(RepoResult::failed(service, r, why.clone(), 0.0));
        }
    };

    let selection = match Selection::new(policy) {
        Ok(s) => s,
        Err(e) => {
            fail_live(&mut results, e.to_string());
            return (results, vec![]);
        }
    };
    let cache = env.state.join("cache").join(format!("{service}.digests"));
    // The JSON cache of earlier versions, replaced by the compact one.
    let _ = std::fs::remove_file(
        env.state
            .join("cache")
            .join(format!("{service}.digests.json")),
    );
    let units = match stop_units(env, policy) {
        Ok(u) => u,
        Err(e) => {
            fail_live(&mut results, e);
            return (results, vec![]);
        }
    };
    if let Err(e) = run_hooks(&policy.before) {
        drop(units);
        fail_live(&mut results, format!("before command failed: {e}"));
        return (results, vec![]);
    }
    // agex reads every file first, after the units stopped and before any engine reads
    // one: a file an engine later finds as agex left it holds the bytes agex digested,
    // one that changed since is marked so in that repository's manifest
    // (crate::manifest_stream). With the digest cache, a nightly walk is mostly stats.
    let walked = match selection.walk(env.root, Some(&cache)) {
        Ok(w) => w,
        Err(e) => {
            let mut why = format!("reading the paths failed: {e}");
            if let Err(e) = run_hooks(&policy.after) {
                why.push_str(&format!("; after command failed: {e}"));
            }
            if let Err(e) = units.start() {
                why.push_str(&format!("; {e}"));
            }
            fail_live(&mut results, why);
            return (results, vec![]);
        }
    };
    let walk_warnings = walked.warnings.clone();
    let specials = walked.specials.clone();
    let (bytes, files) = (
        walked.files.iter().map(|f| f.size).sum::<u64>(),
        walked.files.len() as u64,
    );
    let source = ManifestSource::new(env.root.to_path_buf(), service, &env.run_id, walked);
    // Each stream (every dump, then the manifest) reaches every live repository through
    // its own tee; the engines read the dumps in path order, so they are taken in it.
    let completions: Vec<Completion> = live.iter().map(|_| Completion::default()).collect();
    let mut streams: Vec<Vec<Stream>> = live.iter().map(|_| Vec::new()).collect();
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
    let dump_tees: Vec<(&Database, Tee)> = databases
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
    let meters: Vec<Option<Arc<Meter>>> = live
        .iter()
        .map(|(_, access, _)| {
            env.opts.progress.as_ref().map(|sink| {
                let m = Meter::start(Arc::clone(sink), service, &access.repo.name);
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
    let (produced, outcomes) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            // Also if taking the dumps panics, no manifest waits for them forever.
            struct Unblock<'a>(&'a ManifestSource);
            impl Drop for Unblock<'_> {
                fn drop(&mut self) {
                    self.0
                        .fail_unless_dumped("the thread taking the dumps died");
                }
            }
            let _unblock = Unblock(&source);
            produce(env, service, dump_tees, &source)
        });
        let joins: Vec<_> = live
            .iter()
            .zip(streams)
            .zip(completions.iter().zip(&meters))
            .enumerate()
            .map(|(i, (((_, access, _), streams), (complete, meter)))| {
                let (tags, archive, selection) = (&tags, &archive, &selection);
                let (source, specials, marks) = (&*source, specials.as_slice(), &marks[i]);
                let walk_warnings = &walk_warnings;
                scope.spawn(move || {
                    let t = Instant::now();
                    let mut warnings = Vec::new();
                    let r = match access.repo.kind {
                        RepositoryKind::Restic => restic_side(
                            access,
                            env.root,
                            selection,
                            streams,
                            complete.clone(),
                            tags,
                            meter.as_ref(),
                            restic_key(env, &access.repo.name, complete),
                            (source, marks),
                            env.opts.stall_timeout,
                        ),
                        RepositoryKind::Borg => {
                            let attempt = |streams| {
                                borg_side(
                                    access,
                                    env,
                                    (selection, specials),
                                    streams,
                                    complete,
                                    archive,
                                    meter.as_ref(),
                                )
                            };
                            // The streams of a borg that never opened any of them, for
                            // another attempt; gone once one was read.
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
                                // The network failed before borg read a stream: borg
                                // runs again (it resumes from what reached the server).
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
                            let r = match (tried, unread.into_inner()) {
                                // borg gave up on the lock before reading any stream: a
                                // stale lock is broken and borg tries once more with them.
                                (Err(e @ BackupError::Locked { .. }), Some(streams)) => {
                                    match break_stale_lock(env, access) {
                                        Some(w) => {
                                            warnings.push(w);
                                            attempt(streams).map_err(|(e, _)| e)
                                        }
                                        None => Err(e),
                                    }
                                }
                                (r, _) => r,
                            };
                            r.map(|(id, added)| (id, added, None))
                        }
                    };
                    if r.is_ok() {
                        lock::foreign_lock_cleared(&env.state, &access.repo.name);
                        warnings.extend(walk_warnings.iter().cloned());
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
                    (i, r.map_err(|e| e.to_string()), secs, warnings)
                })
            })
            .collect();
        let outcomes: Vec<SideOutcome> = joins
            .into_iter()
            .enumerate()
            .map(|(i, j)| {
                j.join()
                    .unwrap_or_else(|_| (i, Err("the backup thread died".into()), 0.0, Vec::new()))
            })
            .collect();
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err("the thread taking the dumps died".into()));
        (produced, outcomes)
    });
    let mut after = Vec::new();
    if let Err(e) = run_hooks(&policy.after) {
        after.push(format!("after command failed: {e}"));
    }
    if let Err(e) = units.start() {
        after.push(e.to_string());
    }
    let after = (!after.is_empty()).then(|| after.join("; "));

    let (dump_entries, dump_failure) = match produced {
        Ok(dumps) => (dumps, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    for (i, outcome, secs, warnings) in outcomes {
        let (name, access, _) = &live[i];
        // A broken dump or manifest shut both engines out (no snapshot was written, no
        // archive committed): say why in the dump's words, not the engine's.
        let outcome = match (outcome, &dump_failure) {
            (Err(_), _) if completions[i].left_behind() => Err(format!(
                "left behind: it took no data for {} s while the other repository waited \
                 (`[backup] stall_timeout`); no snapshot was written",
                env.opts.stall_timeout.unwrap_or_default().as_secs()
            )),
            (Err(_), Some(why)) => Err(format!("{why}; no snapshot was written")),
            (Ok((snapshot, _)), Some(why)) => Err(discard(access, &env.state, &snapshot, why)),
            (outcome, None) => outcome,
        };
        let result = match outcome {
            Ok((snapshot, added)) => {
                let mut ok = RepoResult {
                    service: service.to_string(),
                    repo: (*name).clone(),
                    result: Verdict::Ok,
                    error: None,
                    snapshot: Some(snapshot),
                    duration_seconds: secs,
                    bytes_added: added,
                    warnings,
                    retries: 0,
                };
                // A retention with its own schedule runs as a separate forget job.
                let inline = policy.forget_schedule.is_none();
                if let Some(ret) = policy
                    .retention
                    .as_ref()
                    .filter(|r| inline && r.keeps_something())
                {
                    if let Err(e) = forget(access, &env.state, service, ret, ret.prune, false) {
                        ok.warnings.push(format!("retention failed: {e}"));
                    }
                }
                // The snapshot stands, but the service was left worse than found.
                if let Some(e) = &after {
                    ok.result = Verdict::Failed;
                    ok.error = Some(format!("the snapshot was written, but {e}"));
                }
                ok
            }
            Err(e) => match &after {
                Some(a) => RepoResult::failed(service, name, format!("{e}; {a}"), secs),
                None => RepoResult::failed(service, name, e, secs),
            },
        };
        let mut result = result;
        result.retries = new_retries(env, access);
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

#[allow(clippy::too_many_arguments)]
fn restic_side(
    access: &RepoAccess,
    root: &Path,
    selection: &Selection,
    streams: Vec<Stream>,
    complete: Completion,
    tags: &[String],
    meter: Option<&Arc<Meter>>,
    key: Option<MasterKey>,
    (source, marks): (&ManifestSource, &Marks),
    stall: Option<Duration>,
) -> Result<ResticOutcome, BackupError> {
    // Without a key (its derivation failed) the password is tried again, so the error
    // reported is the repository's own.
    let restic = Restic::open_metered(access, meter, key)?;
    restic.watch(complete.clone(), stall);
    let mut late = None;
    // The manifest was made at its place in path order; files read after it that
    // changed since agex read them are recorded before the snapshot counts as written.
    let describe = || {
        let in_manifest = marks.get().unwrap_or_default();
        let now: Vec<HostPath> = source
            .changed_now()
            .into_iter()
            .filter(|p| in_manifest.binary_search(p).is_err())
            .collect();
        late = Some(now.clone());
        crate::manifest_stream::late_marks_description(now)
    };
    let snap = restic.backup(
        root,
        selection.paths(),
        selection.excludes(),
        streams,
        complete,
        tags,
        describe,
    )?;
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
