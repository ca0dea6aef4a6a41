//! Backup commands: backup, snapshots, forget, status, repo init/check/unlock.

use std::collections::BTreeMap;
use std::time::Duration;

use agex_backup::access::{self, RepoAccess};
use agex_backup::drill_records::{self, DrillStatus};
use agex_backup::engine::borg::Borg;
use agex_backup::engine::Engine;
use agex_backup::run::{self, RunOptions};
use agex_backup::units::UnitsError;
use agex_backup::{status, BackupError};
use agex_core::systemctl::Systemctl;
use agex_core::{Project, RepositoryKind};
use agex_recovery::restore;
use agex_secrets::Identities;
use tracing::Level;
use zeroize::Zeroizing;

use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK, PARTIAL};
use crate::output;

impl From<BackupError> for Failure {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Secrets(s) => s.into(),
            e @ (BackupError::UnknownRepository { .. }
            | BackupError::UnknownService { .. }
            | BackupError::Usage(_)
            | BackupError::PolicyMismatch { .. }
            | BackupError::Units(UnitsError::NoSystemctl { .. })) => {
                Failure::new(CONFIG, e.to_string())
            }
            other => Failure::new(FAILURE, other.to_string()),
        }
    }
}

fn unlock_one(ctx: &Context, project: &Project, name: &str) -> Result<RepoAccess, Failure> {
    access::repository(project, name)?;
    let ids = ctx.identities(project)?;
    Ok(access::unlock(project, name, &ids)?)
}

pub struct BackupArgs<'a> {
    pub service: Option<&'a str>,
    pub repo: Option<&'a str>,
    pub dry_run: bool,
    pub systemctl: Option<&'a str>,
}

pub fn cmd_backup(ctx: &Context, args: BackupArgs<'_>) -> Result<i32, Failure> {
    // Writes into a pipe borg has closed must fail with EPIPE, not kill agex. (libc: no
    // safe call sets a signal disposition; see main.)
    // SAFETY: changing a signal disposition before any thread of this command starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let project = ctx.project()?;
    let opts = run_options(ctx, &project, &args);
    let planned = run::plan(&project, &opts)?;
    if planned.is_empty() {
        return Err(Failure::new(
            CONFIG,
            "nothing to back up: no policy selects that service and repository",
        ));
    }
    if args.dry_run {
        print_plan(ctx, &planned)?;
        return Ok(OK);
    }
    let ids = ctx.identities(&project)?;
    let mut repo_names: Vec<String> = planned
        .iter()
        .flat_map(|p| p.repositories.iter().cloned())
        .collect();
    repo_names.sort();
    repo_names.dedup();
    let access = access::unlock_all(&project, &ids, &repo_names);
    let db_passwords = database_passwords(&project, &ids, &planned)?;
    crate::interrupt::undo_on_termination("backup", "stopping without committing");
    let job = args
        .service
        .map_or("backup".to_string(), |s| format!("backup-{s}"));
    let run = crate::commands::schedule::job_run(ctx, &project, &job);
    let record = run::execute(
        &project,
        &ctx.global.root,
        &planned,
        &access,
        &db_passwords,
        &opts,
    );
    if agex_backup::cancel::interrupted() {
        // The signal thread is undoing the run and exits with 128 + signal; the run's own
        // summary (a borg killed on purpose reads as a failure) must not win that race.
        loop {
            std::thread::park();
        }
    }
    let record = record?;
    if let Some(dir) = &project.config.backup.metrics_dir {
        let statuses = status::summarize(&run::records(&ctx.global.root)?);
        if let Err(e) = status::write_textfile(&ctx.global.root, dir, &statuses) {
            tracing::warn!("metrics not written: {e}");
        }
    }
    let lines = result_lines(&record);
    if ctx.global.json {
        output::json(&record)?;
    } else {
        for (level, line) in &lines {
            match *level {
                Level::ERROR => tracing::error!("{line}"),
                Level::WARN => tracing::warn!("{}", line.replacen(": warning: ", ": ", 1)),
                _ => tracing::info!("{line}"),
            }
        }
    }
    let mut log: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
    let code = run_code(&record, &mut log);
    if code != OK {
        if let Some(last) = log.last() {
            tracing::error!("{last}");
        }
    }
    crate::commands::schedule::job_done(run, code, &log);
    Ok(code)
}

/// The run's options from the command line and `[backup]` in agex.toml.
fn run_options(ctx: &Context, project: &Project, args: &BackupArgs<'_>) -> RunOptions {
    RunOptions {
        service: args.service.map(str::to_string),
        repo: args.repo.map(str::to_string),
        systemctl: Systemctl::configured(args.systemctl, &ctx.global.root),
        lock_wait: Duration::from_secs(project.config.backup.lock_wait),
        stale_lock_age: Some(Duration::from_secs(project.config.backup.stale_lock_age)),
        stall_timeout: Some(Duration::from_secs(project.config.backup.stall_timeout))
            .filter(|t| !t.is_zero()),
        progress: crate::progress::bars(ctx.global.json),
    }
}

/// `backup --dry-run`: what would be backed up where.
fn print_plan(ctx: &Context, planned: &[run::PlannedService]) -> Result<(), Failure> {
    if ctx.global.json {
        output::json(&planned)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = planned
        .iter()
        .map(|p| {
            vec![
                p.service.clone(),
                p.repositories.join(","),
                p.paths
                    .iter()
                    .map(|x| x.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                p.dumps.join(","),
            ]
        })
        .collect();
    output::table(&["SERVICE", "REPOSITORIES", "PATHS", "DUMPS"], &rows);
    Ok(())
}

/// One line per service and repository, then its warnings, each at its level (so the
/// journal can filter failures); together they are the tail a notification carries.
fn result_lines(record: &run::RunRecord) -> Vec<(Level, String)> {
    let mut lines: Vec<(Level, String)> = Vec::new();
    for r in &record.results {
        match (&r.snapshot, &r.error) {
            (Some(s), _) if r.ok() => lines.push((
                Level::INFO,
                format!(
                    "{} → {}: ok, snapshot {} ({:.1} s{}{})",
                    r.service,
                    r.repo,
                    output::short_id(s),
                    r.duration_seconds,
                    r.bytes_added
                        .map(|b| format!(", {} added", output::size(b)))
                        .unwrap_or_default(),
                    retries_note(r.retries, ", ")
                ),
            )),
            (_, e) => lines.push((
                Level::ERROR,
                format!(
                    "{} → {}: FAILED: {}{}",
                    r.service,
                    r.repo,
                    e.as_deref().unwrap_or("unknown error"),
                    retries_note(r.retries, "; after ")
                ),
            )),
        }
        for w in &r.warnings {
            lines.push((
                Level::WARN,
                format!("{} → {}: warning: {w}", r.service, r.repo),
            ));
        }
    }
    lines
}

/// The run's exit code: OK, PARTIAL when some service/repository pairs failed, FAILURE
/// when all did; a failed run's summary line is added to `log`.
fn run_code(record: &run::RunRecord, log: &mut Vec<String>) -> i32 {
    let (failed, total) = record.failures();
    match failed {
        0 => OK,
        n if n == total => {
            log.push(format!(
                "backup failed: {n} of {total} service/repository pairs failed"
            ));
            FAILURE
        }
        n => {
            log.push(format!(
                "backup partly failed: {n} of {total} service/repository pairs failed"
            ));
            PARTIAL
        }
    }
}

/// "N retries" after `lead` when a repository needed any, else nothing.
fn retries_note(retries: u64, lead: &str) -> String {
    match retries {
        0 => String::new(),
        1 => format!("{lead}1 retry"),
        n => format!("{lead}{n} retries"),
    }
}

/// Passwords of the PostgreSQL roles the planned services dump with, by secret name.
fn database_passwords(
    project: &Project,
    ids: &Identities,
    planned: &[run::PlannedService],
) -> Result<BTreeMap<String, Zeroizing<Vec<u8>>>, Failure> {
    let mut out = BTreeMap::new();
    for policy in planned
        .iter()
        .filter_map(|p| project.policies.get(&p.service))
    {
        out.append(&mut restore::database_passwords(project, policy, ids)?);
    }
    Ok(out)
}

fn selected_repos(project: &Project, repo: Option<&str>) -> Result<Vec<String>, Failure> {
    match repo {
        Some(r) => {
            access::repository(project, r)?;
            Ok(vec![r.to_string()])
        }
        None => Ok(project.config.repositories.keys().cloned().collect()),
    }
}

pub fn cmd_snapshots(
    ctx: &Context,
    service: Option<&str>,
    repo: Option<&str>,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    if let Some(s) = service {
        access::policy(&project, s)?;
    }
    let ids = ctx.identities(&project)?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for name in selected_repos(&project, repo)? {
        let listed = access::unlock(&project, &name, &ids)
            .and_then(|a| restore::all_snapshots(&a, &ctx.state_dir()));
        match listed {
            Ok(list) => rows.extend(
                list.into_iter()
                    .filter(|s| service.is_none_or(|want| want == s.service)),
            ),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if ctx.global.json {
        output::json(&rows)?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|s| {
                vec![
                    s.repo.clone(),
                    s.service.clone(),
                    output::when(&s.time),
                    output::short_id(&s.id),
                ]
            })
            .collect();
        output::table(&["REPOSITORY", "SERVICE", "TIME", "ID"], &table);
    }
    report_errors(&errors, !rows.is_empty())
}

/// Exit 0 when nothing failed, 3 when something else succeeded, 1 otherwise.
fn report_errors(errors: &[String], some_ok: bool) -> Result<i32, Failure> {
    if errors.is_empty() {
        return Ok(OK);
    }
    for e in errors {
        tracing::error!("{e}");
    }
    Ok(if some_ok { PARTIAL } else { FAILURE })
}

pub fn cmd_forget(
    ctx: &Context,
    service: Option<&str>,
    repo: Option<&str>,
    prune: bool,
    dry_run: bool,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let opts = RunOptions {
        service: service.map(str::to_string),
        repo: repo.map(str::to_string),
        ..RunOptions::default()
    };
    let planned = run::plan(&project, &opts)?;
    let ids = ctx.identities(&project)?;
    let mut errors = Vec::new();
    let mut done = 0;
    let mut cache: BTreeMap<String, Result<RepoAccess, BackupError>> = BTreeMap::new();
    for p in &planned {
        let Some(retention) = project
            .policies
            .get(&p.service)
            .and_then(|x| x.retention.as_ref())
            .filter(|r| r.keeps_something())
        else {
            tracing::info!(
                "{}: no retention in its policy, nothing forgotten",
                p.service
            );
            continue;
        };
        for r in &p.repositories {
            let a = cache
                .entry(r.clone())
                .or_insert_with(|| access::unlock(&project, r, &ids));
            let a = match a {
                Ok(a) => a,
                Err(e) => {
                    errors.push(format!("{r}: {e}"));
                    continue;
                }
            };
            let prune = prune || retention.prune;
            match run::forget(a, &ctx.state_dir(), &p.service, retention, prune, dry_run) {
                Ok(gone) => {
                    done += 1;
                    let verb = if dry_run { "would forget" } else { "forgot" };
                    println!("{} {r}: {verb} {} snapshot(s)", p.service, gone.len());
                    for g in gone {
                        println!("  {g}");
                    }
                }
                Err(e) => errors.push(format!("{} {r}: {e}", p.service)),
            }
        }
    }
    report_errors(&errors, done > 0)
}

pub fn cmd_status(ctx: &Context) -> Result<i32, Failure> {
    let records = run::records(&ctx.global.root)?;
    let statuses = status::summarize(&records);
    let drills = drill_statuses(ctx)?;
    if ctx.global.json {
        output::json(&with_drills(&statuses, &drills)?)?;
        return Ok(OK);
    }
    if statuses.is_empty() && !drills.is_empty() {
        print_drill_statuses(&drills);
        return Ok(OK);
    }
    if statuses.is_empty() {
        println!(
            "no backup has run yet (no records in {})",
            ctx.host_path(std::path::Path::new(agex_backup::paths::RUNS_DIR))
                .display()
        );
        return Ok(OK);
    }
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.service.clone(),
                s.repo.clone(),
                s.result.to_string(),
                output::when_ago(&s.last_run),
                s.last_success
                    .as_deref()
                    .map_or_else(|| "never".into(), output::when_ago),
                format!("{:.1}s", s.duration_seconds),
                s.bytes_added.map(output::size).unwrap_or_default(),
                s.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "SERVICE",
            "REPOSITORY",
            "RESULT",
            "LAST RUN",
            "LAST SUCCESS",
            "TIME",
            "ADDED",
            "ERROR",
        ],
        &rows,
    );
    print_drill_statuses(&drills);
    Ok(OK)
}

pub fn cmd_repo_init(ctx: &Context, name: &str) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let a = unlock_one(ctx, &project, name)?;
    Engine::init(&a, &ctx.state_dir())?;
    println!(
        "initialized {} repository `{name}` at {}",
        a.repo.kind.as_str(),
        a.repo.url
    );
    Ok(OK)
}

pub fn cmd_repo_check(
    ctx: &Context,
    name: Option<&str>,
    read_data: Option<&str>,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let ids = ctx.identities(&project)?;
    let repos = selected_repos(&project, name)?;
    let job = name.map_or("check".to_string(), |r| format!("check-{r}"));
    let run = crate::commands::schedule::job_run(ctx, &project, &job);
    let mut errors = Vec::new();
    let mut log = Vec::new();
    let mut ok = 0;
    for r in repos {
        let checked = access::unlock(&project, &r, &ids)
            .and_then(|a| Engine::open(&a, &ctx.state_dir())?.check(read_data));
        match checked {
            Ok(()) => {
                ok += 1;
                println!("{r}: ok");
                log.push(format!("{r}: ok"));
            }
            Err(e) => errors.push(format!("{r}: {e}")),
        }
    }
    log.extend(errors.iter().map(|e| format!("error: {e}")));
    let code = report_errors(&errors, ok > 0)?;
    crate::commands::schedule::job_done(run, code, &log);
    Ok(code)
}

pub fn cmd_repo_unlock(ctx: &Context, name: &str) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let a = unlock_one(ctx, &project, name)?;
    match a.repo.kind {
        RepositoryKind::Restic => {
            // rustic_core writes no lock files, and agex's own repository lock is a
            // flock the kernel releases when its holder dies: nothing can be stale.
            println!(
                "{name}: restic repositories written by agex hold no locks; nothing to remove"
            );
        }
        RepositoryKind::Borg => {
            // break-lock removes every lock, live ones too: refuse while an agex run on
            // this host holds the repository.
            let _held = agex_backup::lock::acquire(&ctx.state_dir(), name, Duration::ZERO)?;
            Borg::new(&a, &ctx.state_dir())?.break_lock()?;
            println!("{name}: borg locks removed");
        }
    }
    Ok(OK)
}

pub fn cmd_repo_trust(ctx: &Context, name: &str, yes: bool) -> Result<i32, Failure> {
    use std::io::IsTerminal;
    let project = ctx.project()?;
    let plan = agex_backup::trust::plan(&project, name)?;
    println!("{} ({name}) offers these host keys:", plan.server);
    for k in &plan.keys {
        println!("  {:<22} {}", k.kind, k.fingerprint);
    }
    if plan.unchanged() {
        println!("agex.toml already pins exactly these keys for `{name}`; nothing to change");
        return Ok(OK);
    }
    if !plan.pinned_before.is_empty() {
        println!(
            "agex.toml pins {} other key(s) for `{name}` now: they are replaced",
            plan.pinned_before.len()
        );
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::new(
                CONFIG,
                "compare the fingerprints with the ones your provider publishes, then pass --yes (or run it on a terminal to confirm)",
            ));
        }
        if !output::ask_yes(
            "Compare them with the fingerprints your provider publishes. Pin them in agex.toml? Type `yes`: ",
        )? {
            println!("nothing changed");
            return Ok(FAILURE);
        }
    }
    agex_backup::trust::execute(&project, &plan)?;
    println!(
        "pinned {} key(s) of {} in agex.toml [repositories.{name}] known_hosts; commit it",
        plan.keys.len(),
        plan.server
    );
    Ok(OK)
}

/// The drill rows `agex status` shows after the backup rows.
pub fn drill_statuses(ctx: &Context) -> Result<Vec<DrillStatus>, Failure> {
    Ok(drill_records::summarize(&drill_records::records(
        &ctx.global.root,
    )?))
}

/// Prints the drill table of `agex status`.
pub fn print_drill_statuses(statuses: &[DrillStatus]) {
    if statuses.is_empty() {
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.service.clone(),
                s.repo.clone(),
                s.result.to_string(),
                output::when_ago(&s.last_drill),
                s.last_success
                    .as_deref()
                    .map_or_else(|| "never".into(), output::when_ago),
                s.rpo_seconds
                    .map(|v| format!("{v:.0}s"))
                    .unwrap_or_default(),
                s.rto_seconds
                    .map(|v| format!("{v:.1}s"))
                    .unwrap_or_default(),
                s.peak_memory_bytes.map(output::size).unwrap_or_default(),
                s.scratch_bytes.map(output::size).unwrap_or_default(),
                s.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "DRILL",
            "REPOSITORY",
            "RESULT",
            "LAST DRILL",
            "LAST PASSED",
            "RPO",
            "RTO",
            "PEAK MEM",
            "SCRATCH",
            "ERROR",
        ],
        &rows,
    );
}

/// The backup statuses of `agex --json status`, each with its latest drill (`drill`:
/// null when none ran); drills of pairs with no backup record come last.
pub fn with_drills(
    statuses: &[agex_backup::status::Status],
    drills: &[DrillStatus],
) -> Result<Vec<serde_json::Value>, Failure> {
    fn value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, Failure> {
        serde_json::to_value(v).map_err(|e| Failure::new(FAILURE, format!("json: {e}")))
    }
    let mut out = Vec::new();
    let mut used = vec![false; drills.len()];
    for s in statuses {
        let mut v = value(s)?;
        let d = match drills
            .iter()
            .position(|d| d.service == s.service && d.repo == s.repo)
        {
            Some(i) => {
                used[i] = true;
                value(&drills[i])?
            }
            None => serde_json::Value::Null,
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert("drill".into(), d);
        }
        out.push(v);
    }
    for (d, _) in drills.iter().zip(&used).filter(|(_, u)| !**u) {
        out.push(serde_json::json!({
            "service": d.service,
            "repo": d.repo,
            "result": null,
            "drill": value(d)?,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agex_backup::verdict::Verdict;

    fn result(repo: &str, error: Option<&str>, warnings: &[&str]) -> run::RepoResult {
        run::RepoResult {
            service: "app".into(),
            repo: repo.into(),
            result: if error.is_none() {
                Verdict::Ok
            } else {
                Verdict::Failed
            },
            error: error.map(str::to_string),
            snapshot: error.is_none().then(|| "0123456789abcdef".to_string()),
            duration_seconds: 1.25,
            bytes_added: error.is_none().then_some(2048),
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
            retries: if error.is_none() { 0 } else { 2 },
        }
    }

    fn record(results: Vec<run::RepoResult>) -> run::RunRecord {
        run::RunRecord {
            run_id: "r".into(),
            started: "s".into(),
            finished: "f".into(),
            results,
            dumps: vec![],
        }
    }

    #[test]
    fn each_result_is_a_line_at_its_level_with_its_warnings_after_it() {
        let lines = result_lines(&record(vec![
            result("a", None, &["3 file(s) changed"]),
            result("b", Some("boom"), &[]),
        ]));
        let levels: Vec<Level> = lines.iter().map(|(l, _)| *l).collect();
        assert_eq!(levels, vec![Level::INFO, Level::WARN, Level::ERROR]);
        assert!(
            lines[0].1.starts_with("app → a: ok, snapshot "),
            "{}",
            lines[0].1
        );
        assert!(
            lines[0].1.ends_with("(1.2 s, 2.0 KiB added)"),
            "{}",
            lines[0].1
        );
        assert_eq!(lines[1].1, "app → a: warning: 3 file(s) changed");
        assert_eq!(lines[2].1, "app → b: FAILED: boom; after 2 retries");
    }

    #[test]
    fn the_code_is_ok_partial_or_failure_by_how_many_pairs_failed() {
        let mut log = Vec::new();
        assert_eq!(
            run_code(&record(vec![result("a", None, &[])]), &mut log),
            OK
        );
        assert!(log.is_empty());
        let some = record(vec![result("a", None, &[]), result("b", Some("x"), &[])]);
        assert_eq!(run_code(&some, &mut log), PARTIAL);
        assert_eq!(
            log.last().map(String::as_str),
            Some("backup partly failed: 1 of 2 service/repository pairs failed")
        );
        let all = record(vec![result("b", Some("x"), &[])]);
        assert_eq!(run_code(&all, &mut log), FAILURE);
        assert_eq!(
            log.last().map(String::as_str),
            Some("backup failed: 1 of 1 service/repository pairs failed")
        );
    }
}
