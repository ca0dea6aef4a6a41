//! `agex report --html FILE`, and the refresh of `[report] html` after every backup, drill
//! and repository check.

use std::path::{Path, PathBuf};

use agex_backup::{drill_records as drill, run};
use agex_schedule::report;

use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK};

/// Writes the HTML report to `out`, else to the configuration's `[report] html`.
pub fn cmd_report(ctx: &Context, out: Option<&Path>) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let path = match (out, &project.config.report.html) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => ctx.host_path(p),
        (None, None) => {
            return Err(Failure::new(
                CONFIG,
                "say where to write the report: --html FILE, or `[report] html = \"/var/lib/agex/report.html\"` in agex.toml",
            ))
        }
    };
    let pairs = write(ctx, &project, &path)?;
    println!(
        "wrote {} ({pairs} service × repository pairs)",
        path.display()
    );
    Ok(OK)
}

/// Brings `[report] html` up to date, if configured; a failure is a warning, never the
/// job's failure.
pub fn refresh(ctx: &Context) {
    let Ok(project) = ctx.project() else {
        return;
    };
    let Some(p) = &project.config.report.html else {
        return;
    };
    let path: PathBuf = ctx.host_path(p);
    match write(ctx, &project, &path) {
        Ok(_) => tracing::debug!("report {} updated", path.display()),
        Err(f) => tracing::warn!("report not updated: {}", f.message),
    }
}

fn write(ctx: &Context, project: &agex_core::Project, path: &Path) -> Result<usize, Failure> {
    let root = &ctx.global.root;
    let runs = run::records(root)?;
    let drills = drill::records(root)?;
    let r = report::build(
        project,
        &ctx.host_name(),
        &runs,
        &drills,
        chrono::Utc::now(),
    );
    let html = report::render(&r);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", dir.display())))?;
    }
    agex_core::atomic::write_atomic(path, html.as_bytes(), 0o644)
        .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", path.display())))?;
    Ok(r.pairs.len())
}
