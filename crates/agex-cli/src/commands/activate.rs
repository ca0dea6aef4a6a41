//! Generation commands: build, activate, rollback, generations, diff.

use agex_activate::diff::{diff_with_lines, Change, ChangeKind};
use agex_activate::history::{History, State};
use agex_activate::ramfs::SecretsFs;
use agex_activate::restart::{Restarts, Systemctl};
use agex_activate::store::{self, StoredGeneration};
use agex_activate::users::UserDb;
use agex_activate::{
    ActivateError, ActivateOptions, Activation, Layout, Manifest, Plan, StateLock, Switch,
};
use agex_core::Project;
use serde::Serialize;

use crate::cli::SwitchArgs;
use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK};
use crate::output;

impl From<ActivateError> for Failure {
    fn from(e: ActivateError) -> Self {
        let code = if e.is_config() { CONFIG } else { FAILURE };
        match e {
            ActivateError::Config(c) => c.into(),
            ActivateError::Secrets(s) => s.into(),
            other => Failure::new(code, other.to_string()),
        }
    }
}

fn layout(ctx: &Context) -> Layout {
    Layout::new(&ctx.global.root)
}

fn options(ctx: &Context, switch: &SwitchArgs, host: Option<String>) -> ActivateOptions {
    let layout = layout(ctx);
    let systemctl = Systemctl::configured(switch.systemctl.as_deref(), layout.root());
    ActivateOptions {
        allow_unmounted: switch.allow_unmounted,
        identities: ctx.global.identity.clone(),
        host,
        systemctl,
        no_restart: switch.no_restart,
    }
}

fn build_inputs(
    ctx: &Context,
    project: &Project,
) -> Result<agex_activate::manifest::Inputs, Failure> {
    let mut inputs = Manifest::from_project(project, &ctx.host_name())?;
    crate::commands::schedule::carry(project, &mut inputs)?;
    Ok(inputs)
}

pub fn cmd_build(ctx: &Context) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let inputs = build_inputs(ctx, &project)?;
    let lock = StateLock::acquire(&layout(ctx))?;
    let built = store::build(&lock, &inputs)?;
    let note = match (built.new_number, built.new_entry) {
        (false, _) => " (unchanged)",
        (true, false) => " (existing store entry)",
        (true, true) => "",
    };
    println!(
        "generation {}{note}: {} {}",
        built.number,
        built.hash,
        built.path.display()
    );
    Ok(OK)
}

pub fn cmd_activate(
    ctx: &Context,
    generation: Option<&str>,
    switch: &SwitchArgs,
    dry_run: bool,
) -> Result<i32, Failure> {
    let layout = layout(ctx);
    if dry_run {
        let manifest = match generation {
            Some(spec) => {
                let n = store::resolve(&layout, spec)?;
                StoredGeneration::open(&layout, n)?.manifest
            }
            None => build_inputs(ctx, &ctx.project()?)?.manifest,
        };
        let plan = Plan::new(&manifest, &layout, &UserDb::for_layout(&layout)?)?;
        print!("{plan}");
        println!(
            "{} for host `{}`; owners from {}; nothing changed (--dry-run)",
            output::count(plan.files.len(), "file"),
            manifest.host,
            plan.users
        );
        return Ok(OK);
    }
    let done = match generation {
        Some(spec) => {
            let lock = StateLock::acquire(&layout)?;
            let n = store::resolve(&layout, spec)?;
            let opts = options(ctx, switch, ctx.global.host.clone());
            agex_activate::activate(&lock, n, &opts)?
        }
        None => {
            let project = ctx.project()?;
            let inputs = build_inputs(ctx, &project)?;
            let opts = options(ctx, switch, Some(inputs.manifest.host.clone()));
            let lock = StateLock::acquire(&layout)?;
            // Activating what is active is a no-op: no build, so no new number.
            let number = match agex_activate::activate::active_unchanged(&layout, &inputs)? {
                Some(n) => n,
                None => {
                    let built = store::build(&lock, &inputs)?;
                    if built.new_number {
                        println!(
                            "built generation {}: {} {}",
                            built.number,
                            built.hash,
                            built.path.display()
                        );
                    }
                    built.number
                }
            };
            agex_activate::activate(&lock, number, &opts)?
        }
    };
    finish(ctx, switch, done)
}

/// Installs the generation's units and reports, unless nothing was switched.
fn finish(ctx: &Context, switch: &SwitchArgs, done: Switch) -> Result<i32, Failure> {
    match done {
        Switch::AlreadyActive { number, hash, owed } => {
            // A run killed after its switch may not have installed the units yet.
            crate::commands::schedule::install_generation_units(
                ctx,
                number,
                switch.systemctl.as_deref(),
                switch.no_restart,
                true,
            )?;
            match owed {
                None => {
                    println!(
                        "generation {number} ({hash}) is already active and unchanged: nothing to do (nothing restarted)"
                    );
                    Ok(OK)
                }
                Some(restarts) => {
                    println!(
                        "generation {number} ({hash}) is already active; the activation that switched to it was killed before it restarted the units"
                    );
                    report_restarts(number, restarts)
                }
            }
        }
        Switch::Activated(activation) => {
            crate::commands::schedule::install_generation_units(
                ctx,
                activation.number,
                switch.systemctl.as_deref(),
                switch.no_restart,
                false,
            )?;
            report(*activation)
        }
    }
}

pub fn cmd_rollback(ctx: &Context, to: Option<u64>, switch: &SwitchArgs) -> Result<i32, Failure> {
    let layout = layout(ctx);
    let lock = StateLock::acquire(&layout)?;
    let done = agex_activate::rollback(&lock, to, &options(ctx, switch, ctx.global.host.clone()))?;
    finish(ctx, switch, done)
}

fn report(a: Activation) -> Result<i32, Failure> {
    match &a.fs {
        SecretsFs::Mounted(kind) => tracing::info!(
            "mounted {kind} on {} (mode 0751, nosuid, nodev, noexec)",
            a.dir
                .parent()
                .map_or(String::new(), |p| p.display().to_string())
        ),
        SecretsFs::Unmounted => {
            tracing::warn!(
            "{} is not a ramfs/tmpfs (--allow-unmounted): plaintext is on a persistent filesystem",
            a.dir.parent().map_or(String::new(), |p| p.display().to_string())
        )
        }
        SecretsFs::Present => {}
    }
    let how = if a.reused {
        "switched to the kept directory of"
    } else {
        "activated"
    };
    let previous = a
        .previous
        .filter(|p| *p != a.number)
        .map_or(String::new(), |p| format!(" (was {p})"));
    println!(
        "{how} generation {} ({}): {} in {}{previous}",
        a.number,
        a.hash,
        output::count(a.files, "file"),
        a.dir.display()
    );
    if !a.pruned.is_empty() {
        println!(
            "removed old generations: {}",
            a.pruned
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    report_restarts(a.number, a.restarts)
}

fn report_restarts(number: u64, restarts: Restarts) -> Result<i32, Failure> {
    match restarts {
        Restarts::Done {
            commands,
            restart,
            reload,
        } => {
            for c in &commands {
                tracing::info!("ran: {c}");
            }
            if restart.is_empty() && reload.is_empty() {
                println!("no unit's secrets changed");
            }
            if !restart.is_empty() {
                println!("restarted: {}", restart.join(" "));
            }
            if !reload.is_empty() {
                println!("reloaded: {}", reload.join(" "));
            }
            Ok(OK)
        }
        Restarts::Skipped {
            reason,
            restart,
            reload,
        } => {
            let units: Vec<String> = restart.into_iter().chain(reload).collect();
            println!(
                "not restarting ({reason}); changed units: {}",
                units.join(" ")
            );
            Ok(OK)
        }
        Restarts::Failed(e) => Err(Failure::new(
            FAILURE,
            format!("switched to generation {number}, but restarting its units failed: {e}"),
        )),
    }
}

#[derive(Serialize)]
struct GenerationRow {
    number: u64,
    date: Option<String>,
    hash: String,
    active: bool,
    kept: bool,
    path: String,
    /// Whether it ever activated: `activated`, `failed` (with `reason`), `built`, `unknown`.
    #[serde(flatten)]
    state: State,
}

/// The STATE cell: whether the generation ever worked, and why not. A failure's reason
/// is folded onto the one line.
fn state_cell(active: bool, state: &State) -> String {
    match state {
        _ if active => "active".into(),
        State::Activated { .. } => "was active".into(),
        State::Unknown => "-".into(),
        State::Built => "never activated (built only)".into(),
        State::Failed { reason } => format!(
            "never activated: {}",
            reason
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

pub fn cmd_generations(ctx: &Context) -> Result<i32, Failure> {
    let layout = layout(ctx);
    let active = agex_activate::activate::active(&layout);
    let history = History::load(&layout);
    let rows: Vec<GenerationRow> = store::list(&layout)?
        .into_iter()
        .map(|l| GenerationRow {
            number: l.number,
            date: l
                .created
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
            hash: l.hash,
            active: active == Some(l.number),
            kept: agex_activate::activate::Marker::read(&layout.generation_dir(l.number)).is_some(),
            path: l.path.display().to_string(),
            state: history.state(l.number),
        })
        .collect();
    if ctx.global.json {
        output::json(&rows)?;
        return Ok(OK);
    }
    if rows.is_empty() {
        println!("no generations yet; run `agex build` or `agex activate`");
        return Ok(OK);
    }
    let yes = |b: bool| if b { "yes" } else { "" }.to_string();
    output::table(
        &["#", "DATE", "HASH", "ON TMPFS", "STATE"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.number.to_string(),
                    r.date.as_deref().map(output::when_ago).unwrap_or_default(),
                    r.hash.clone(),
                    yes(r.kept),
                    state_cell(r.active, &r.state),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(OK)
}

pub fn cmd_diff(ctx: &Context, a: Option<&str>, b: Option<&str>) -> Result<i32, Failure> {
    let layout = layout(ctx);
    let open = |spec: &str| -> Result<(String, StoredGeneration), Failure> {
        let n = store::resolve(&layout, spec)?;
        Ok((
            format!("generation {n}"),
            StoredGeneration::open(&layout, n)?,
        ))
    };
    let (a_name, a_gen) = match a {
        Some(spec) => open(spec)?,
        None => match agex_activate::activate::active(&layout) {
            Some(n) => open(&n.to_string())?,
            None => open("last")?,
        },
    };
    let read_a = |path: &str| a_gen.carried(path).ok();
    let changes = match b {
        Some(spec) => {
            let (b_name, b_gen) = open(spec)?;
            let read_b = |path: &str| b_gen.carried(path).ok();
            let changes = diff_with_lines(&a_gen.manifest, &b_gen.manifest, &read_a, &read_b);
            (b_name, changes)
        }
        None => {
            let project = ctx.project()?;
            let host = ctx
                .global
                .host
                .clone()
                .unwrap_or_else(|| a_gen.manifest.host.clone());
            let mut inputs = Manifest::from_project(&project, &host)?;
            crate::commands::schedule::carry(&project, &mut inputs)?;
            let read_b = |path: &str| inputs.files.get(path).cloned();
            let changes = diff_with_lines(&a_gen.manifest, &inputs.manifest, &read_a, &read_b);
            (format!("the configuration (host {host})"), changes)
        }
    };
    let (b_name, changes) = changes;
    if ctx.global.json {
        output::json(&changes)?;
        return Ok(OK);
    }
    println!("from {a_name} to {b_name}:");
    if changes.is_empty() {
        println!("  no differences");
    }
    for c in &changes {
        println!("  {}", show_change(c));
        for l in &c.lines {
            println!("      {l}");
        }
    }
    Ok(OK)
}

fn show_change(c: &Change) -> String {
    let sign = match c.kind {
        ChangeKind::Added => "+",
        ChangeKind::Removed => "-",
        ChangeKind::Changed => "~",
    };
    // "content" says nothing the lines below do not.
    let details: Vec<&str> = c
        .details
        .iter()
        .map(String::as_str)
        .filter(|d| c.lines.is_empty() || *d != "content")
        .collect();
    let details = if details.is_empty() {
        String::new()
    } else {
        format!(": {}", details.join(", "))
    };
    let services = if c.services.is_empty() {
        String::new()
    } else {
        format!("  [{}]", c.services.join(" "))
    };
    format!("{sign} {} {}{details}{services}", c.item, c.name)
}
