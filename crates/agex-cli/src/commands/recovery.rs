//! Recovery commands: restore, drill, drill rebuild, host rekey, recovery kit,
//! repo rotate-password.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use agex_backup::access;
use agex_core::systemctl::Systemctl;
use agex_core::{Policy, Project};
use agex_recovery::drill::{self, DrillEnv, DrillOptions};
use agex_recovery::rebuild::StepError;
use agex_recovery::restore::{self, InPlaceOptions, Target};

use crate::cli::{DrillArgs, RestoreArgs};
use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK, PARTIAL};
use crate::output;

pub fn cmd_restore(ctx: &Context, args: &RestoreArgs) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let policy = access::policy(&project, &args.service)?;
    check_restore_flags(args)?;
    let repos: Vec<String> = match &args.repo {
        Some(r) => {
            access::repository(&project, r)?;
            vec![r.clone()]
        }
        None => policy.repositories.clone(),
    };
    let ids = ctx.identities(&project)?;
    let state = ctx.state_dir();
    let accesses = agex_backup::access::unlock_all(&project, &ids, &repos);
    let snap = newest_or_named(args, &state, &accesses)?;
    let Some(Ok(a)) = accesses.get(&snap.repo) else {
        return Err(Failure::new(
            FAILURE,
            format!("repository {} is not open", snap.repo),
        ));
    };
    let target = match &args.to {
        Some(dir) => Target::Dir(dir),
        None => {
            if !args.yes && !confirm(ctx, &args.service, &snap, args.delete)? {
                tracing::info!("nothing restored");
                return Ok(FAILURE);
            }
            // From here on SIGTERM/SIGINT start the policy's stopped units again.
            crate::interrupt::undo_on_termination("restore", "starting stopped units again");
            Target::InPlace(InPlaceOptions {
                as_database: args.as_database.clone(),
                systemctl: Systemctl::configured(args.systemctl.as_deref(), &ctx.global.root),
                delete: args.delete,
            })
        }
    };
    let passwords = restore::database_passwords(&project, policy, &ids)?;
    tracing::info!(
        "restoring {} from {} snapshot {} ({})",
        args.service,
        snap.repo,
        snap.id,
        output::when(&snap.time)
    );
    let job = restore::RestoreJob {
        access: a,
        state: &state,
        root: &ctx.global.root,
        policy,
        passwords: &passwords,
        lock_wait: Duration::from_secs(project.config.backup.lock_wait),
        progress: crate::progress::bars(ctx.global.json),
    };
    let report = restore::restore(&job, snap, target)?;
    if ctx.global.json {
        output::json(&report)?;
    }
    print_restored(ctx, args, policy, &report);
    Ok(OK)
}

/// The rules of `agex restore` that depend on more than its flags (exit 2); the flag
/// rules themselves (--to or --in-place; --delete and --as need --in-place) are clap's.
fn check_restore_flags(args: &RestoreArgs) -> Result<(), Failure> {
    if let Some(dir) = &args.to {
        if !restore::is_empty_dir(dir)? {
            return Err(Failure::new(
                CONFIG,
                format!(
                    "--to {}: the directory is not empty; restore into a new or empty directory",
                    dir.display()
                ),
            ));
        }
    }
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if args.in_place && !args.yes && !interactive {
        return Err(Failure::new(
            CONFIG,
            "an in-place restore overwrites live data: pass --yes, or run it on a terminal to confirm",
        ));
    }
    Ok(())
}

/// The snapshot to restore: `--snapshot` (or the newest) among the snapshots of the
/// service in the repositories that could be read; the others are warned about.
fn newest_or_named(
    args: &RestoreArgs,
    state: &std::path::Path,
    accesses: &access::Unlocked,
) -> Result<restore::Snapshot, Failure> {
    let mut lists = Vec::new();
    let mut errors = Vec::new();
    for (name, a) in accesses {
        match a {
            Ok(a) => match restore::snapshots(a, state, &args.service) {
                Ok(l) => lists.push((name.clone(), l)),
                Err(e) => errors.push(format!("{name}: {e}")),
            },
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if lists.is_empty() {
        return Err(Failure::new(
            FAILURE,
            format!(
                "no repository of {} could be read:\n  {}",
                args.service,
                errors.join("\n  ")
            ),
        ));
    }
    for e in &errors {
        tracing::warn!("{e}");
    }
    Ok(restore::choose(
        &args.service,
        &lists,
        args.snapshot.as_deref(),
    )?)
}

/// What `agex restore` says it did: counts, verification, and where the dumps are.
fn print_restored(
    ctx: &Context,
    args: &RestoreArgs,
    policy: &Policy,
    report: &restore::RestoreReport,
) {
    let (files, bytes) = match &report.applied {
        Some(a) => (a.files, a.bytes),
        None => (report.extracted.files, report.extracted.bytes),
    };
    let where_to = match &args.to {
        Some(d) => d.display().to_string(),
        None => format!("{} (in place)", ctx.global.root.display()),
    };
    tracing::info!(
        "restored {}: {files} files, {} into {where_to}; verified {} files and {} database dump(s) against the manifest; {:.1} s",
        report.service,
        output::size(bytes),
        report.verified.files,
        report.verified.databases,
        report.seconds
    );
    if let (Some(dir), None) = (&args.to, &report.applied) {
        for db in &policy.databases {
            let rel = agex_backup::manifest::dump_path(&report.service, &db.dump_file());
            let at = dir.join(rel.strip_prefix("/").unwrap_or(&rel));
            if at.is_file() {
                let how = match db {
                    agex_core::policy::Database::Sqlite { path, .. } => {
                        format!("a copy of {}", path.display())
                    }
                    agex_core::policy::Database::Postgres { .. } => {
                        "pg_restore it, or restore --in-place [--as NAME]".into()
                    }
                };
                tracing::info!("  database {}: {} ({how})", db.name(), at.display());
            }
        }
    }
    if let Some(a) = &report.applied {
        if args.delete {
            tracing::info!("  deleted {} entries the snapshot lacks", a.deleted);
        }
        for d in &a.databases {
            tracing::info!("  database {d}");
        }
    }
}

fn confirm(
    ctx: &Context,
    service: &str,
    snap: &restore::Snapshot,
    delete: bool,
) -> Result<bool, Failure> {
    output::ask_yes(&format!(
        "Restore {service} in place under {} from {} snapshot {} ({})?\n\
         This overwrites its files and databases{}. Type `yes` to go on: ",
        ctx.global.root.display(),
        snap.repo,
        snap.id,
        output::when(&snap.time),
        if delete {
            ", and removes what the snapshot lacks below its paths"
        } else {
            ""
        }
    ))
}

pub fn cmd_drill(ctx: &Context, args: &DrillArgs) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let opts = DrillOptions {
        service: args.service.clone(),
        repo: args.repo.clone(),
        lock_wait: Duration::from_secs(project.config.backup.lock_wait),
    };
    let pairs = drill::plan(&project, &opts)?;
    if pairs.is_empty() {
        return Err(Failure::new(
            CONFIG,
            "nothing to drill: no policy selects that service and repository",
        ));
    }
    let ids = ctx.identities(&project)?;
    let mut names: Vec<String> = pairs.iter().map(|(_, r)| r.clone()).collect();
    names.sort();
    names.dedup();
    let accesses = agex_backup::access::unlock_all(&project, &ids, &names);
    let env = DrillEnv {
        project: &project,
        root: &ctx.global.root,
        db_root: &ctx.global.root,
        access: &accesses,
        ids: &ids,
    };
    let rec = drill::execute(&env, &pairs, &opts, true)?;
    if let Some(dir) = &project.config.backup.metrics_dir {
        let statuses = drill::summarize(&drill::records(&ctx.global.root)?);
        if let Err(e) = drill::write_textfile(&ctx.global.root, dir, &statuses) {
            tracing::warn!("drill metrics not written: {e}");
        }
    }
    if ctx.global.json {
        output::json(&rec)?;
    } else {
        print_drill(&rec.results);
    }
    let failed = rec.results.iter().filter(|r| !r.ok()).count();
    Ok(exit_for(failed, rec.results.len(), "drill"))
}

fn print_drill(results: &[drill::DrillResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.repo.clone(),
                if r.ok() { "ok" } else { "FAILED" }.to_string(),
                r.rpo_seconds
                    .map(|s| format!("{s:.0}s"))
                    .unwrap_or_else(|| "-".into()),
                format!("{:.1}s", r.rto_seconds),
                output::size(r.bytes),
                r.peak_memory_bytes
                    .map(output::size)
                    .unwrap_or_else(|| "-".into()),
                r.scratch_bytes
                    .map(output::size)
                    .unwrap_or_else(|| "-".into()),
                r.snapshot
                    .as_deref()
                    .map(output::short_id)
                    .unwrap_or_default(),
                // Why it failed, in the row: the first problem (all are logged below).
                r.problems
                    .first()
                    .or(r.error.as_ref())
                    .filter(|_| !r.ok())
                    .map(|why| why.lines().next().unwrap_or_default().to_owned())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "SERVICE",
            "REPOSITORY",
            "RESULT",
            "RPO",
            "RTO",
            "BYTES",
            "PEAK MEM",
            "SCRATCH",
            "SNAPSHOT",
            "REASON",
        ],
        &rows,
    );
    for r in results.iter().filter(|r| !r.ok()) {
        if r.problems.is_empty() {
            tracing::error!(
                "{} → {}: {}",
                r.service,
                r.repo,
                r.error.as_deref().unwrap_or("failed")
            );
        }
        for p in &r.problems {
            tracing::error!("{} → {}: {p}", r.service, r.repo);
        }
    }
}

fn exit_for(failed: usize, total: usize, what: &str) -> i32 {
    match failed {
        0 => OK,
        n if n == total => {
            tracing::error!("{what} failed: {n} of {total} service/repository pairs failed");
            FAILURE
        }
        n => {
            tracing::error!("{what} partly failed: {n} of {total} service/repository pairs failed");
            PARTIAL
        }
    }
}

pub fn cmd_rotate_password(ctx: &Context, name: &str) -> Result<i32, Failure> {
    use agex_recovery::rotate;
    let project = ctx.project()?;
    access::repository(&project, name)?;
    let ids = ctx.identities(&project)?;
    // For the tests that kill a rotation at each step: stop there until killed.
    let pause_at = std::env::var("AGEX_TEST_PAUSE_AT").ok();
    let mut on_step = |step: rotate::Step| {
        tracing::info!("{name}: {}", step.describe());
        if pause_at.as_deref() == Some(step.as_str()) {
            tracing::info!("{name}: paused at {} (AGEX_TEST_PAUSE_AT)", step.as_str());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    let out = rotate::rotate(&project, &ids, name, &ctx.state_dir(), &mut on_step)?;
    if out.finished_interrupted {
        tracing::info!("{name}: an interrupted rotation was finished first");
    }
    if let Some(e) = &out.old_key_left {
        tracing::warn!("{name}: the old key could not be removed: {e}");
    }
    println!(
        "{name}: new password in place and stored in secret `{}`; commit the secrets directory",
        project.config.repositories[name].password_secret.get_ref()
    );
    Ok(OK)
}

pub fn cmd_drill_rebuild(ctx: &Context, allow_secrets_on_disk: bool) -> Result<i32, Failure> {
    use agex_activate::{store, ActivateOptions, Layout, Manifest, StateLock};
    let on_disk = agex_recovery::rebuild::secrets_on_disk(
        agex_core::users::is_root(),
        &agex_recovery::rebuild::RebuildOptions {
            secrets_on_disk: allow_secrets_on_disk,
        },
    )?;
    let project = ctx.project()?;
    let host = ctx.host_name();
    let host = host.as_str();
    let admin = ctx.identities(&project)?;
    // Activation lives in agex-activate, which agex-backup does not depend on: the
    // drill gets it as a step to call.
    let mut activate =
        |p: &Project, scratch_root: &Path, host: &str, key: &Path| -> Result<String, StepError> {
            let inputs = Manifest::from_project(p, host)?;
            let layout = Layout::new(scratch_root);
            let lock = StateLock::acquire(&layout)?;
            let built = store::build(&lock, &inputs)?;
            let opts = ActivateOptions {
                // As root the scratch root's secrets filesystem is its own ramfs mount;
                // without root only when the user accepted secrets on disk.
                allow_unmounted: on_disk,
                identities: vec![key.to_path_buf()],
                host: Some(host.to_string()),
                systemctl: None,
                no_restart: true,
            };
            match agex_activate::activate(&lock, built.number, &opts)? {
                agex_activate::Switch::Activated(a) => Ok(format!(
                    "generation {} ({}) activated: {} file(s) decrypted with the new key",
                    a.number,
                    &a.hash[..a.hash.len().min(12)],
                    a.files
                )),
                // A fresh scratch root has nothing active; reaching this means it was reused.
                agex_activate::Switch::AlreadyActive { number, .. } => Err(format!(
                "generation {number} was already active in the scratch root; nothing was decrypted"
            )
                .into()),
            }
        };
    let report =
        agex_recovery::rebuild::run(&project, &ctx.global.root, host, &admin, &mut activate)?;
    if ctx.global.json {
        output::json(&report)?;
    } else {
        println!("rebuild drill of {host} (new host key {})", report.new_key);
        for s in &report.steps {
            println!(
                "  {} {}: {} ({:.1} s)",
                if s.ok { "ok    " } else { "FAILED" },
                s.step,
                s.detail,
                s.seconds
            );
        }
        if !report.restores.is_empty() {
            print_drill(&report.restores);
        }
        println!(
            "{}: {} of {} restores passed; oldest data recovered: {}; total {:.1} s",
            if report.passed { "PASSED" } else { "FAILED" },
            report.restores.iter().filter(|r| r.ok()).count(),
            report.restores.len(),
            report.oldest_data.as_deref().unwrap_or("none"),
            report.total_seconds
        );
    }
    Ok(if report.passed { OK } else { FAILURE })
}

pub fn cmd_host_rekey(
    ctx: &Context,
    host: &str,
    key: Option<&str>,
    key_file: Option<&Path>,
    keyscan: Option<&str>,
) -> Result<i32, Failure> {
    use agex_secrets::host_rekey;
    let project = ctx.project()?;
    let new_key = match (key, key_file, keyscan) {
        (Some(k), None, None) => k.to_string(),
        (None, Some(f), None) => host_rekey::read_key_file(f)?,
        (None, None, Some(target)) => {
            let k = host_rekey::keyscan(target)?;
            tracing::info!(
                "{target} offers {} ({})",
                host_rekey::fingerprint(&k).unwrap_or_else(|| "unknown fingerprint".into()),
                k
            );
            // On a terminal the fingerprint is confirmed against the host's console
            // (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`); scripts pass.
            let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
            if interactive
                && !output::ask_yes(&format!(
                    "Is this {host}'s new host key? Type `yes` to rekey: "
                ))?
            {
                tracing::info!("nothing changed");
                return Ok(FAILURE);
            }
            k
        }
        // clap's required group `source` lets exactly one through.
        _ => {
            return Err(Failure::new(
                CONFIG,
                "give the new key with exactly one of --key, --key-file or --keyscan",
            ))
        }
    };
    // The same key again re-encrypts everything once more: that is how a run that was
    // interrupted after replacing the secrets (agex.toml still old) is finished.
    let plan = host_rekey::plan(&project, host, &new_key)?;
    if !plan.rekey.missing.is_empty() {
        tracing::warn!(
            "these secrets of {host} have no file yet and are skipped: {}",
            plan.rekey.missing.join(", ")
        );
    }
    let ids = ctx.identities(&project)?;
    let outcome = host_rekey::execute(&plan, &ids)?;
    println!(
        "{host}: key {} → {}; re-encrypted {}{}",
        plan.old_key.fingerprint(),
        plan.new_key.fingerprint(),
        output::count(outcome.rekeyed.len(), "secret"),
        if outcome.unverified.is_empty() {
            String::new()
        } else {
            format!(
                " ({} checked structurally only: {})",
                outcome.unverified.len(),
                outcome.unverified.join(", ")
            )
        }
    );
    Ok(OK)
}

pub fn cmd_recovery_kit(ctx: &Context, out: Option<&Path>) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let generated = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text = agex_recovery::kit::render(&project, &generated);
    match out {
        Some(path) => {
            agex_core::atomic::write_atomic(path, text.as_bytes(), 0o600)
                .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", path.display())))?;
            tracing::info!(
                "recovery kit written to {} ({} repositories); print it and keep it with the recovery key",
                path.display(),
                project.config.repositories.len()
            );
        }
        None => print!("{text}"),
    }
    Ok(OK)
}
