//! Schedule commands: schedule, systemd generate/install, daemon, notify, and the
//! overdue check of `status --max-age`; plus the notification helpers the job commands
//! (backup, repo check) use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agex_backup::{run, status};
use agex_core::systemctl::Systemctl;
use agex_core::Project;
use agex_schedule::daemon::{self, DaemonOptions, State};
use agex_schedule::install::{self, InstallPlan};
use agex_schedule::job::{self, Job, JobKind};
use agex_schedule::job_run::{self, JobRun};
use agex_schedule::notify::{Event, Notifier, Outcome};
use agex_schedule::units::{self, UnitOptions};
use agex_schedule::{duration, overdue, ScheduleError};
use serde::Serialize;

use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK};
use crate::output;

impl From<ScheduleError> for Failure {
    fn from(e: ScheduleError) -> Self {
        let code = match e {
            ScheduleError::UnknownJob { .. }
            | ScheduleError::Unrepresentable { .. }
            | ScheduleError::Duration(_) => CONFIG,
            _ => FAILURE,
        };
        Failure::new(code, e.to_string())
    }
}

/// The notifier of `job`: `secret:` URLs are decrypted with this host's identities,
/// loaded only when one is used. Problems become warnings, never failures.
pub fn notifier(ctx: &Context, project: &Project, job: &str) -> Notifier {
    let ids = std::cell::OnceCell::new();
    let decrypt = |name: &str| {
        let ids = ids
            .get_or_init(|| ctx.identities(project).map_err(|f| f.message))
            .as_ref()
            .map_err(Clone::clone)?;
        let rule = project
            .rules
            .secrets
            .get(name)
            .ok_or_else(|| "no rule in secrets.toml".to_string())?;
        agex_secrets::secret_file::open(project, rule, ids).map_err(|e| e.to_string())
    };
    Notifier::new(project, job, &ctx.host_name(), &decrypt)
}

/// Sends `event`, printing every problem as a warning.
pub fn send(n: &Notifier, event: &Event) {
    for w in n.warnings.iter().cloned().chain(n.send(event)) {
        tracing::warn!("{w}");
    }
}

/// Starts a job command's run (`/start` ping), printing every problem as a warning.
pub fn job_run(ctx: &Context, project: &Project, job: &str) -> JobRun {
    let (run, warnings) = JobRun::start(notifier(ctx, project, job), job, ctx.global.root.clone());
    for w in warnings {
        tracing::warn!("{w}");
    }
    run
}

/// Ends a job command's run: its result recorded and notified.
pub fn job_done(run: JobRun, code: i32, log: &[String]) {
    for w in run.finish(code, log) {
        tracing::warn!("{w}");
    }
}

#[derive(Serialize)]
struct JobRow {
    #[serde(flatten)]
    job: Job,
    on_calendar: String,
    next: Vec<String>,
    last_run: Option<String>,
    last_result: Option<String>,
}

/// The last run of a job, the newest of: the run records (backups), the results jobs
/// record themselves, and the daemon's state.
fn last_result(
    job: &Job,
    statuses: &[status::Status],
    drills: &[agex_backup::drill_records::DrillRecord],
    pairs: usize,
    states: &[&State],
) -> (Option<String>, Option<String>) {
    // A manual `agex repo check` of every repository ran each repository's check job.
    let names: Vec<&str> = match &job.kind {
        JobKind::Check { .. } => vec![job.name.as_str(), "check"],
        _ => vec![job.name.as_str()],
    };
    let from_daemon = states
        .iter()
        .flat_map(|st| names.iter().filter_map(|n| st.jobs.get(*n)))
        .filter_map(|s| {
            s.result
                .as_ref()
                .map(|r| (s.last_run.to_rfc3339(), r.clone()))
        })
        .max();
    let from_records = match &job.kind {
        JobKind::Backup { service } => {
            let mine: Vec<_> = statuses.iter().filter(|s| &s.service == service).collect();
            mine.iter().map(|s| s.last_run.clone()).max().map(|t| {
                let failed = mine.iter().filter(|s| !s.result.is_ok()).count();
                (t, verdict(failed, mine.len()).to_string())
            })
        }
        // The newest drill of every pair (`agex drill`, `--all`), whoever ran it.
        JobKind::Drill => drills
            .iter()
            .rev()
            .find(|d| pairs > 0 && d.results.len() >= pairs)
            .map(|d| {
                let failed = d.results.iter().filter(|r| !r.ok()).count();
                (
                    d.started.clone(),
                    verdict(failed, d.results.len()).to_string(),
                )
            }),
        _ => None,
    };
    let newest = match (from_daemon, from_records) {
        (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    match newest {
        Some((t, r)) => (Some(t), Some(r)),
        None => (None, None),
    }
}

/// A run's result from how many of its pairs failed: `ok`, `failed` (all) or `partial`.
fn verdict(failed: usize, total: usize) -> &'static str {
    match failed {
        0 => "ok",
        n if n == total => "failed",
        _ => "partial",
    }
}

pub fn cmd_schedule(ctx: &Context) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let statuses = status::summarize(&run::records(&ctx.global.root)?);
    let state = State::load(&ctx.global.root)?;
    let recorded = agex_schedule::results::load(&ctx.global.root)?;
    let drills = agex_backup::drill_records::records(&ctx.global.root)?;
    let pairs: usize = project
        .policies
        .values()
        .map(|p| p.repositories.len())
        .sum();
    let now = chrono::Local::now();
    let rows: Vec<JobRow> = job::jobs(&project)
        .into_iter()
        .map(|j| {
            let (last_run, last_result) =
                last_result(&j, &statuses, &drills, pairs, &[&state, &recorded]);
            JobRow {
                on_calendar: j.schedule.on_calendar().to_string(),
                next: j
                    .schedule
                    .next_after(&now, 3)
                    .iter()
                    .map(|t| t.to_rfc3339())
                    .collect(),
                last_run,
                last_result,
                job: j,
            }
        })
        .collect();
    if ctx.global.json {
        output::json(&rows)?;
        return Ok(OK);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.job.name.clone(),
                r.job.schedule.to_string(),
                r.next
                    .iter()
                    .map(|t| {
                        chrono::DateTime::parse_from_rfc3339(t)
                            .map(|d| output::when(&d))
                            .unwrap_or_else(|_| t.clone())
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                match (&r.last_result, &r.last_run) {
                    (Some(res), Some(t)) => format!("{res} {}", output::when_ago(t)),
                    _ => "never".into(),
                },
            ]
        })
        .collect();
    output::table(&["JOB", "SCHEDULE", "NEXT RUNS", "LAST"], &table);
    Ok(OK)
}

fn unit_options(
    host: String,
    project: &Project,
    agex: Option<PathBuf>,
) -> Result<UnitOptions, Failure> {
    if !project.config.hosts.contains_key(&host) {
        return Err(Failure::new(
            CONFIG,
            format!(
                "host `{host}` is not in agex.toml (hosts: {}); pass --host NAME",
                project
                    .config
                    .hosts
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let agex = match agex {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| Failure::new(FAILURE, format!("cannot find the agex binary: {e}")))?,
    };
    Ok(UnitOptions {
        agex,
        config_dir: project.dir.clone(),
        host,
    })
}

fn generate(
    host: String,
    project: &Project,
    agex: Option<PathBuf>,
) -> Result<Vec<units::UnitFile>, Failure> {
    let opts = unit_options(host, project, agex)?;
    Ok(units::generate(project, &job::jobs(project), &opts)?)
}

pub fn cmd_systemd_generate(
    ctx: &Context,
    out: &Path,
    agex: Option<PathBuf>,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let files = generate(ctx.host_name(), &project, agex)?;
    let written = units::write_to(out, &files)?;
    if ctx.global.json {
        output::json(&written)?;
    } else {
        for p in written {
            println!("{}", p.display());
        }
    }
    Ok(OK)
}

pub fn cmd_systemd_install(
    ctx: &Context,
    agex: Option<PathBuf>,
    dry_run: bool,
    systemctl: Option<&str>,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let files = generate(ctx.host_name(), &project, agex)?;
    let root = &ctx.global.root;
    let to = unit_dir()?;
    let plan = install::plan(root, &to, &files)?;
    if dry_run || ctx.global.json {
        show_plan(ctx, &plan)?;
        if dry_run {
            return Ok(OK);
        }
    }
    let sc = Systemctl::configured(systemctl, root);
    let report = install::apply(root, &to, &plan, sc.as_ref())?;
    if !ctx.global.json {
        show_plan(ctx, &plan)?;
        for c in &report.commands {
            println!("ran: {c}");
        }
        if let Some(why) = &report.skipped {
            println!("systemctl not run: {why}");
        }
    }
    Ok(OK)
}

fn show_plan(ctx: &Context, plan: &InstallPlan) -> Result<(), Failure> {
    if ctx.global.json {
        return output::json(plan);
    }
    if plan.is_noop() {
        println!(
            "units up to date ({} files in {})",
            plan.unchanged.len(),
            ctx.host_path(&unit_dir()?.path).display()
        );
        return Ok(());
    }
    for u in &plan.add {
        println!("add     {}", u.name);
    }
    for u in &plan.change {
        println!("change  {}", u.name);
    }
    for n in &plan.remove {
        println!("remove  {n}");
    }
    Ok(())
}

pub fn cmd_daemon(ctx: &Context) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let dir = project.dir.clone();
    let mut global_args = vec![
        "-C".to_string(),
        dir.to_string_lossy().into_owned(),
        "--root".into(),
        ctx.global.root.to_string_lossy().into_owned(),
        "--host".into(),
        ctx.host_name(),
    ];
    for i in &ctx.global.identity {
        global_args.push("-i".into());
        global_args.push(i.to_string_lossy().into_owned());
    }
    // The jobs log as verbosely as the daemon was asked to (AGEX_LOG is inherited).
    global_args.extend(std::iter::repeat_n(
        "-v".to_string(),
        ctx.global.verbose.into(),
    ));
    global_args.extend(std::iter::repeat_n(
        "-q".to_string(),
        ctx.global.quiet.into(),
    ));
    let agex = std::env::current_exe()
        .map_err(|e| Failure::new(FAILURE, format!("cannot find the agex binary: {e}")))?;
    let load = Arc::new(move || Project::load(&dir));
    let identity = ctx.global.identity.clone();
    let host = ctx.host_name();
    let root = ctx.global.root.clone();
    let make = Arc::new(move |project: &Project, job: &str| {
        let sub = Context {
            global: crate::cli::Global {
                config: Some(project.dir.clone()),
                root: root.clone(),
                host: Some(host.clone()),
                identity: identity.clone(),
                json: false,
                verbose: 0,
                quiet: 0,
            },
        };
        notifier(&sub, project, job)
    });
    daemon::run(
        DaemonOptions {
            root: ctx.global.root.clone(),
            agex,
            global_args,
        },
        load,
        make,
    )?;
    Ok(OK)
}

pub fn cmd_notify_failed_unit(ctx: &Context, unit: &str) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let job = job::job_of_unit(unit).ok_or_else(|| {
        Failure::new(
            CONFIG,
            format!(
                "`{unit}` is not an agex unit (agex-<kind>@<name>.service or agex-drill.service)"
            ),
        )
    })?;
    let jobs = job::jobs(&project);
    job::find(&jobs, &job)?;
    // Backups and checks notify their own failures; this unit then only has to report
    // what they could not (a crash, a kill, a timeout).
    if let Ok(invocation) = std::env::var(job_run::MONITOR_INVOCATION_ID) {
        if job_run::notified_itself(&ctx.global.root, &job, &invocation) {
            tracing::info!("{unit} (invocation {invocation}) already notified its own failure");
            return Ok(OK);
        }
    }
    // The journal's last lines are the log tail, when there is a journal to ask.
    let journal = std::process::Command::new("journalctl")
        .args(["-u", unit, "-n", "40", "--no-pager", "-o", "cat"])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let n = notifier(ctx, &project, &job);
    if n.is_empty() && n.warnings.is_empty() {
        tracing::info!("no notification target configured ([notify] in agex.toml)");
        return Ok(OK);
    }
    send(
        &n,
        &Event::Finish {
            result: Outcome::Failure,
            exit_code: None,
            duration_seconds: 0.0,
            log_tail: agex_schedule::notify::tail(&format!(
                "systemd unit {unit} failed\n{journal}"
            )),
        },
    );
    Ok(OK)
}

pub fn cmd_overdue(ctx: &Context, max_age: &str) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let max = match max_age {
        "auto" => None,
        m => Some(duration::parse(m)?),
    };
    let root = &ctx.global.root;
    let statuses = status::summarize(&run::records(root)?);
    let mut record = match overdue::FirstSeen::load(root) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("{e}; services never backed up count as overdue");
            None
        }
    };
    let before = record.clone();
    let found = overdue::find(
        &project,
        &statuses,
        max,
        chrono::Utc::now(),
        record.as_mut(),
    );
    if let Some(r) = record.filter(|r| Some(r) != before.as_ref()) {
        if let Err(e) = r.save(root) {
            tracing::warn!("{e}");
        }
    }
    let late = found.overdue;
    if ctx.global.json {
        output::json(&late)?;
    } else {
        for o in &found.waiting {
            println!("waiting {}", o.line());
        }
        if late.is_empty() {
            println!("no backup is overdue");
        }
        for o in &late {
            println!("OVERDUE {}", o.line());
        }
    }
    if late.is_empty() {
        return Ok(OK);
    }
    let n = notifier(ctx, &project, "overdue");
    send(
        &n,
        &Event::Overdue {
            items: late.iter().map(|o| o.line()).collect(),
        },
    );
    Ok(FAILURE)
}

/// Adds the host's policies and the systemd units generated from them to a generation,
/// so that activating it (or rolling back to it) moves schedules with the secrets.
pub fn carry(
    project: &Project,
    inputs: &mut agex_activate::manifest::Inputs,
) -> Result<(), Failure> {
    for (service, policy) in &project.policies {
        inputs.carry(
            &format!("policies/{service}.toml"),
            policy.source.text.clone().into_bytes(),
            format!("schedule {}", policy.schedule.on_calendar()),
        )?;
    }
    let host = inputs.manifest.host.clone();
    for unit in generate(host, project, None)? {
        let note = unit
            .content
            .lines()
            .find(|l| l.starts_with("OnCalendar="))
            .unwrap_or_default()
            .to_string();
        inputs.carry(
            &format!("{UNITS_PREFIX}{}", unit.name),
            unit.content.into_bytes(),
            note,
        )?;
    }
    Ok(())
}

const UNITS_PREFIX: &str = "systemd/";

/// Installs the units generation `number` carries (add, change, remove, daemon-reload,
/// timers enabled). A generation built before it carried units leaves them alone. With
/// `quiet_if_unchanged` (re-activating the active generation) it says nothing unless it
/// had something to do.
pub fn install_generation_units(
    ctx: &Context,
    number: u64,
    systemctl: Option<&str>,
    no_restart: bool,
    quiet_if_unchanged: bool,
) -> Result<(), Failure> {
    let layout = agex_activate::Layout::new(&ctx.global.root);
    let generation = agex_activate::StoredGeneration::open(&layout, number)?;
    let mut files = Vec::new();
    for f in &generation.manifest.files {
        let Some(name) = f.path.strip_prefix(UNITS_PREFIX) else {
            continue;
        };
        let content = String::from_utf8(generation.carried(&f.path)?).map_err(|_| {
            Failure::new(
                FAILURE,
                format!("generation {number}: {} is not text", f.path),
            )
        })?;
        files.push(units::UnitFile {
            name: name.to_string(),
            content,
        });
    }
    if files.is_empty() {
        if !quiet_if_unchanged {
            println!(
                "generation {number} carries no systemd units; installed units left as they are"
            );
        }
        return Ok(());
    }
    let root = &ctx.global.root;
    let to = unit_dir()?;
    let plan = install::plan(root, &to, &files)?;
    let sc = if no_restart {
        None
    } else {
        Systemctl::configured(systemctl, root)
    };
    let report = install::apply(root, &to, &plan, sc.as_ref())?;
    if plan.is_noop() && report.commands.is_empty() {
        if !quiet_if_unchanged {
            println!("systemd units unchanged");
        }
        return Ok(());
    }
    println!(
        "systemd units: {} added, {} changed, {} removed",
        plan.add.len(),
        plan.change.len(),
        plan.remove.len()
    );
    for c in &report.commands {
        tracing::info!("ran: {c}");
    }
    if no_restart {
        println!("systemctl not run (--no-restart): run `systemctl daemon-reload` to load them");
    } else if let Some(why) = &report.skipped {
        println!("systemctl not run: {why}");
    }
    Ok(())
}

/// Where units are installed: `AGEX_UNIT_DIR` (an absolute host path, e.g.
/// `/run/systemd/system` on NixOS, whose /etc is in its store), else /etc/systemd/system.
fn unit_dir() -> Result<install::UnitDir, Failure> {
    match std::env::var_os("AGEX_UNIT_DIR") {
        None => Ok(install::UnitDir::default()),
        Some(p) => {
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(Failure::new(
                    CONFIG,
                    format!("AGEX_UNIT_DIR={}: must be an absolute path", path.display()),
                ));
            }
            Ok(install::UnitDir { path })
        }
    }
}
