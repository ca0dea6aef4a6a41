//! Restore drills: for each service and repository, restore the newest snapshot into
//! scratch space, verify it against the manifest stored in it (file digests, SQLite
//! integrity and row counts, PostgreSQL restored into a scratch database and counted),
//! clean up, and record the result with the RPO (age of the snapshot) and the RTO (time
//! to restore and verify).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::peak::PeakWatch;
use crate::restore::{self, PgScratch};
use crate::stream_verify;
use agex_backup::access::{RepoAccess, Unlocked};
use agex_backup::drill_records::save;
pub use agex_backup::drill_records::{
    prometheus, records, summarize, write_textfile, DrillRecord, DrillResult, DrillStatus,
};
use agex_backup::error::BackupError;
use agex_backup::paths;
pub use agex_backup::paths::DRILLS_DIR;
use agex_backup::verdict::Verdict;
use agex_core::{Policy, Project};

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
    let runs = agex_backup::run::plan(
        project,
        &agex_backup::run::RunOptions {
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
    pub access: &'a Unlocked,
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
    let state = paths::state_dir(env.root);
    std::fs::create_dir_all(&state).map_err(BackupError::io(&state))?;
    let mut results = Vec::new();
    for (service, repo) in pairs {
        let t = Instant::now();
        let watch = PeakWatch::start();
        let mut r = match (env.project.policies.get(service), env.access.get(repo)) {
            (None, _) => failed(service, repo, "service has no policy".into()),
            (_, None) => failed(service, repo, "repository is not open".into()),
            (_, Some(Err(e))) => failed(service, repo, e.to_string()),
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
        result: Verdict::Failed,
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
    let _lock = agex_backup::lock::acquire(state, repo, lock_wait)?;
    let snaps = restore::snapshots(access, state, service)?;
    let snap = restore::choose(service, &[(repo.to_string(), snaps)], None)?;
    let scratch = crate::rebuild::pid_scratch(
        &state.join("drill"),
        &format!("{service}-{repo}"),
        "a drill",
    )?;
    let passwords = restore::database_passwords(env.project, policy, env.ids)?;
    let name = |dump: &str| scratch_database(service, run_id, dump);
    let pg = PgScratch {
        policy,
        root: env.db_root,
        passwords: &passwords,
        name: &name,
    };
    let streamed = stream_verify::verify(access, state, &snap, service, scratch.path(), &pg)?;
    drop(scratch);
    let verified = streamed.verified;
    let now = chrono::Utc::now();
    let ok = verified.problems.is_empty();
    Ok(DrillResult {
        service: service.to_string(),
        repo: repo.to_string(),
        result: Verdict::of(ok),
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
