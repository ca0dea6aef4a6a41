//! Restore drills: for each service and repository, restore the newest snapshot into
//! scratch space, verify it against the manifest stored in it (file digests, SQLite
//! integrity and row counts, PostgreSQL restored into a scratch database and counted),
//! clean up, and record the result with the RPO (age of the snapshot) and the RTO (time
//! to restore and verify).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use agex_core::{Policy, Project};
use serde::{Deserialize, Serialize};

use crate::access::RepoAccess;
use crate::error::BackupError;
use crate::manifest::under;
use crate::peak::PeakWatch;
use crate::restore::{self, PgScratch};
use crate::run::STATE_DIR;
use crate::status::{exposition, unix_seconds, write_prom, Gauge};
use crate::stream_verify;

/// Where drill records are written, under `--root`.
pub const DRILLS_DIR: &str = "/var/lib/agex/drills";

/// Which services and repositories a drill covers.
#[derive(Debug, Clone, Default)]
pub struct DrillOptions {
    /// Only this service (default: every policy).
    pub service: Option<String>,
    /// Only this repository (default: each policy's repositories).
    pub repo: Option<String>,
    /// How long to wait for a backup holding a repository.
    pub lock_wait: Duration,
}

/// The pairs a drill covers: (service, repository). Pure.
pub fn plan(project: &Project, opts: &DrillOptions) -> Result<Vec<(String, String)>, BackupError> {
    let runs = crate::run::plan(
        project,
        &crate::run::RunOptions {
            service: opts.service.clone(),
            repo: opts.repo.clone(),
            ..Default::default()
        },
    )?;
    Ok(runs
        .into_iter()
        .flat_map(|p| {
            p.repositories
                .into_iter()
                .map(move |r| (p.service.clone(), r))
        })
        .collect())
}

/// The outcome of one drill of one service in one repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillResult {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// `ok` or `failed`.
    pub result: String,
    /// Why it failed (the first problem, or the error).
    pub error: Option<String>,
    /// Every difference from the manifest.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The snapshot restored.
    pub snapshot: Option<String>,
    /// When it was taken (RFC 3339).
    pub snapshot_time: Option<String>,
    /// Age of the snapshot at the drill, seconds (the recovery point).
    pub rpo_seconds: Option<f64>,
    /// Time to restore and verify, seconds (the recovery time).
    pub rto_seconds: f64,
    /// Bytes restored.
    pub bytes: u64,
    /// Files restored.
    pub files: u64,
    /// Databases verified.
    pub databases: u64,
    /// Peak memory of the drill of this pair, bytes: agex's own peak resident set
    /// (`VmHWM`) plus the largest sum of its child processes' peaks at one time
    /// (pg_restore, borg, ssh; see [`crate::peak`]). None where `/proc` is missing.
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    /// Most scratch disk the drill of this pair used at once, bytes (the largest SQLite
    /// dump; PostgreSQL dumps and files are verified as they stream).
    #[serde(default)]
    pub scratch_bytes: Option<u64>,
}

impl DrillResult {
    /// Whether it passed.
    pub fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// The record of one drill run, written as JSON under `/var/lib/agex/drills/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillRecord {
    /// `YYYYMMDDTHHMMSS.mmmZ` of the start.
    pub run_id: String,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    pub finished: String,
    /// One entry per service and repository.
    pub results: Vec<DrillResult>,
}

/// What a drill needs besides the pairs.
pub struct DrillEnv<'a> {
    /// The configuration.
    pub project: &'a Project,
    /// `--root`: scratch space and state (locks, borg cache) go under it.
    pub root: &'a Path,
    /// The root under which database sockets are found (the same as `root` except in
    /// the rebuild drill, whose scratch root has no database server).
    pub db_root: &'a Path,
    /// Decrypted repository credentials (or why they are not).
    pub access: &'a BTreeMap<String, Result<RepoAccess, String>>,
    /// Identities for the PostgreSQL role passwords.
    pub ids: &'a agex_secrets::Identities,
}

/// Runs the drill of every pair and records it (unless `record` is false, as in the
/// rebuild drill, whose scratch root is thrown away).
pub fn execute(
    env: &DrillEnv<'_>,
    pairs: &[(String, String)],
    opts: &DrillOptions,
    record: bool,
) -> Result<DrillRecord, BackupError> {
    let started = chrono::Utc::now();
    let run_id = started.format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let state = under(env.root, Path::new(STATE_DIR));
    std::fs::create_dir_all(&state).map_err(BackupError::io(&state))?;
    let mut results = Vec::new();
    for (service, repo) in pairs {
        let t = Instant::now();
        let watch = PeakWatch::start();
        let mut r = match (env.project.policies.get(service), env.access.get(repo)) {
            (None, _) => failed(service, repo, "service has no policy".into()),
            (_, None) => failed(service, repo, "repository is not open".into()),
            (_, Some(Err(e))) => failed(service, repo, e.clone()),
            (Some(policy), Some(Ok(access))) => {
                drill_one(env, &state, policy, access, &run_id, opts.lock_wait)
                    .unwrap_or_else(|e| failed(service, repo, e.to_string()))
            }
        };
        r.rto_seconds = t.elapsed().as_secs_f64();
        r.peak_memory_bytes = watch.finish().map(|p| p.total());
        results.push(r);
    }
    let rec = DrillRecord {
        run_id,
        started: started.to_rfc3339(),
        finished: chrono::Utc::now().to_rfc3339(),
        results,
    };
    if record {
        save(env.root, &rec)?;
    }
    Ok(rec)
}

fn failed(service: &str, repo: &str, why: String) -> DrillResult {
    DrillResult {
        service: service.to_string(),
        repo: repo.to_string(),
        result: "failed".into(),
        error: Some(why),
        problems: vec![],
        snapshot: None,
        snapshot_time: None,
        rpo_seconds: None,
        rto_seconds: 0.0,
        bytes: 0,
        files: 0,
        databases: 0,
        peak_memory_bytes: None,
        scratch_bytes: None,
    }
}

/// The scratch database of a drill: `agex_drill_<service>_<run>`, a valid identifier
/// of at most 63 bytes.
pub fn scratch_database(service: &str, run_id: &str, dump: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let run: String = run_id.chars().filter(char::is_ascii_digit).collect();
    let mut name = format!("agex_drill_{}_{}_{}", clean(service), run, clean(dump));
    name.truncate(63);
    name
}

fn drill_one(
    env: &DrillEnv<'_>,
    state: &Path,
    policy: &Policy,
    access: &RepoAccess,
    run_id: &str,
    lock_wait: Duration,
) -> Result<DrillResult, BackupError> {
    let service = policy.service.as_str();
    let repo = access.repo.name.as_str();
    let _lock = crate::lock::acquire(state, repo, lock_wait)?;
    let snaps = restore::snapshots(access, state, service)?;
    let snap = restore::choose(service, &[(repo.to_string(), snaps)], None)?;
    let scratch_base = state.join("drill");
    std::fs::create_dir_all(&scratch_base).map_err(BackupError::io(&scratch_base))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{service}-{repo}-"))
        .tempdir_in(&scratch_base)
        .map_err(BackupError::io(&scratch_base))?;
    let passwords = restore::database_passwords(env.project, policy, env.ids)?;
    let name = |dump: &str| scratch_database(service, run_id, dump);
    let pg = PgScratch {
        policy,
        root: env.db_root,
        passwords: &passwords,
        name: &name,
    };
    let streamed = without_panics(repo, || {
        stream_verify::verify(access, state, &snap, service, scratch.path(), &pg)
    })?;
    drop(scratch);
    let verified = streamed.verified;
    let now = chrono::Utc::now();
    let ok = verified.problems.is_empty();
    Ok(DrillResult {
        service: service.to_string(),
        repo: repo.to_string(),
        result: if ok { "ok" } else { "failed" }.into(),
        error: verified
            .problems
            .first()
            .map(|p| format!("{} problem(s), first: {p}", verified.problems.len())),
        problems: verified.problems,
        snapshot: Some(snap.id.clone()),
        snapshot_time: Some(snap.time.to_rfc3339()),
        rpo_seconds: Some((now - snap.time).num_milliseconds() as f64 / 1000.0),
        rto_seconds: 0.0,
        bytes: streamed.bytes,
        files: streamed.files,
        databases: verified.databases,
        peak_memory_bytes: None,
        scratch_bytes: Some(streamed.scratch_peak),
    })
}

/// Runs `f`, turning a panic inside the engine (rustic_core's worker threads on a
/// damaged pack) into this pair's failure instead of agex's abort. The default hook
/// would print the panic as if agex had crashed; drills run one pair at a time, so
/// swapping the process-wide hook for the call is safe.
fn without_panics<T>(
    repo: &str,
    f: impl FnOnce() -> Result<T, BackupError>,
) -> Result<T, BackupError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        Err(BackupError::Restic {
            repo: repo.to_string(),
            message: format!("reading the snapshot failed: {what}"),
        })
    })
}

fn save(root: &Path, rec: &DrillRecord) -> Result<(), BackupError> {
    crate::records::save(root, DRILLS_DIR, &rec.run_id, rec, "drill record")
}

/// Every drill record under the root, oldest first.
pub fn records(root: &Path) -> Result<Vec<DrillRecord>, BackupError> {
    crate::records::load_all(root, DRILLS_DIR, "drill record")
}

/// The latest drill of one service in one repository.
#[derive(Debug, Clone, Serialize)]
pub struct DrillStatus {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// When the last drill ended (RFC 3339).
    pub last_drill: String,
    /// `ok` or `failed`.
    pub result: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When a drill last passed (RFC 3339), if ever.
    pub last_success: Option<String>,
    /// RPO of the last passed drill, seconds.
    pub rpo_seconds: Option<f64>,
    /// RTO of the last passed drill, seconds.
    pub rto_seconds: Option<f64>,
    /// Bytes restored by the last passed drill.
    pub bytes: Option<u64>,
    /// Peak memory of the last drill (passed or not), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Most scratch disk the last drill (passed or not) used at once, bytes.
    pub scratch_bytes: Option<u64>,
}

/// Folds drill records (oldest first) into the latest status per service and repository.
pub fn summarize(records: &[DrillRecord]) -> Vec<DrillStatus> {
    let mut map: BTreeMap<(String, String), DrillStatus> = BTreeMap::new();
    for rec in records {
        for r in &rec.results {
            let key = (r.service.clone(), r.repo.clone());
            let prev = map.remove(&key);
            let (last_success, rpo, rto, bytes) = if r.ok() {
                (
                    Some(rec.finished.clone()),
                    r.rpo_seconds,
                    Some(r.rto_seconds),
                    Some(r.bytes),
                )
            } else {
                prev.map(|p| (p.last_success, p.rpo_seconds, p.rto_seconds, p.bytes))
                    .unwrap_or_default()
            };
            map.insert(
                key,
                DrillStatus {
                    service: r.service.clone(),
                    repo: r.repo.clone(),
                    last_drill: rec.finished.clone(),
                    result: r.result.clone(),
                    error: r.error.clone(),
                    last_success,
                    rpo_seconds: rpo,
                    rto_seconds: rto,
                    bytes,
                    peak_memory_bytes: r.peak_memory_bytes,
                    scratch_bytes: r.scratch_bytes,
                },
            );
        }
    }
    map.into_values().collect()
}

/// The Prometheus text exposition of drill statuses.
pub fn prometheus(statuses: &[DrillStatus]) -> String {
    let metrics: [Gauge<DrillStatus>; 6] = [
        (
            "agex_drill_last_success_timestamp_seconds",
            "Unix time of the last restore drill that passed",
            |s| s.last_success.as_deref().and_then(unix_seconds),
        ),
        (
            "agex_drill_rto_seconds",
            "Time the last passed drill took to restore and verify",
            |s| s.rto_seconds,
        ),
        (
            "agex_drill_rpo_seconds",
            "Age of the snapshot the last passed drill restored",
            |s| s.rpo_seconds,
        ),
        (
            "agex_drill_peak_memory_bytes",
            "Peak memory of the last drill: agex's own VmHWM plus its children's peaks",
            |s| s.peak_memory_bytes.map(|b| b as f64),
        ),
        (
            "agex_drill_scratch_bytes",
            "Most scratch disk the last drill used at once",
            |s| s.scratch_bytes.map(|b| b as f64),
        ),
        (
            "agex_drill_result",
            "1 if the last drill passed, 0 if it failed",
            |s| Some(if s.result == "ok" { 1.0 } else { 0.0 }),
        ),
    ];
    exposition(&metrics, statuses, |s| (&s.service, &s.repo))
}

/// Writes `agex_drill.prom` into `dir` atomically.
pub fn write_textfile(
    root: &Path,
    dir: &Path,
    statuses: &[DrillStatus],
) -> Result<(), BackupError> {
    write_prom(root, dir, "agex_drill.prom", &prometheus(statuses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_database_names_are_identifiers_of_at_most_63_bytes() {
        let n = scratch_database("home-assistant", "20261125T085510.123Z", "recorder");
        assert_eq!(n, "agex_drill_home_assistant_20261125085510123_recorder");
        let long = scratch_database(&"x".repeat(80), "20261125T085510.123Z", "db");
        assert_eq!(long.len(), 63);
    }
}
