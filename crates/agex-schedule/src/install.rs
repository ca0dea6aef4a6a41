//! Installing generated units under `<root>/etc/systemd/system`: plan (pure: what to
//! add, change, remove), then apply (atomic writes, removals, `daemon-reload`, timers
//! enabled). agex records what it installed in `/var/lib/agex/systemd-units.json`, so
//! the units of a service whose policy is gone are removed, and files it did not write
//! are never touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ScheduleError;
use crate::systemctl::Systemctl;
use crate::units::{UnitFile, MARKER};

/// The unit directory, under `--root`.
pub const UNIT_DIR: &str = "etc/systemd/system";
/// What agex installed, under `--root`.
pub const INSTALLED_FILE: &str = "var/lib/agex/systemd-units.json";

/// What an installation changes. Pure: building it reads, never writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstallPlan {
    /// Files that do not exist yet.
    pub add: Vec<UnitFile>,
    /// Files whose content differs.
    pub change: Vec<UnitFile>,
    /// Files agex installed before that are no longer generated.
    pub remove: Vec<String>,
    /// Files already as generated.
    pub unchanged: Vec<String>,
    /// Every file generated now (the new record).
    pub all: Vec<String>,
}

impl InstallPlan {
    /// Whether applying it would change nothing.
    pub fn is_noop(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Installed {
    files: Vec<String>,
}

fn installed(root: &Path) -> Result<Installed, ScheduleError> {
    let path = root.join(INSTALLED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ScheduleError::State {
            path,
            why: format!("not agex's record of installed units: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Installed::default()),
        Err(e) => Err(ScheduleError::io(path)(e)),
    }
}

fn ours(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|t| t.starts_with(MARKER))
        .unwrap_or(false)
}

/// Compares `units` with what is under `<root>/etc/systemd/system`.
pub fn plan(root: &Path, units: &[UnitFile]) -> Result<InstallPlan, ScheduleError> {
    let dir = root.join(UNIT_DIR);
    let before = installed(root)?;
    let mut p = InstallPlan::default();
    for u in units {
        let path = dir.join(&u.name);
        match std::fs::read(&path) {
            Ok(bytes) if bytes == u.content.as_bytes() => p.unchanged.push(u.name.clone()),
            Ok(_) if !ours(&path) => return Err(ScheduleError::Foreign { path }),
            Ok(_) => p.change.push(u.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => p.add.push(u.clone()),
            Err(e) => return Err(ScheduleError::io(path)(e)),
        }
        p.all.push(u.name.clone());
    }
    let now: BTreeSet<&String> = p.all.iter().collect();
    for old in &before.files {
        if !now.contains(old) && ours(&dir.join(old)) {
            p.remove.push(old.clone());
        }
    }
    Ok(p)
}

/// What applying a plan did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstallReport {
    /// systemctl command lines that ran.
    pub commands: Vec<String>,
    /// Why systemctl was not run, if it was not.
    pub skipped: Option<String>,
}

/// Writes, removes, records, reloads and enables. Timers of removed jobs are disabled
/// and stopped before their files go; new timers are enabled and started; changed
/// timers restarted so a new schedule takes effect.
pub fn apply(
    root: &Path,
    plan: &InstallPlan,
    systemctl: Option<&Systemctl>,
) -> Result<InstallReport, ScheduleError> {
    let mut report = InstallReport::default();
    if plan.is_noop() {
        return Ok(report);
    }
    let dir = root.join(UNIT_DIR);
    let gone_timers: Vec<&str> = plan
        .remove
        .iter()
        .filter(|n| n.ends_with(".timer"))
        .map(String::as_str)
        .collect();
    if let (Some(sc), false) = (systemctl, gone_timers.is_empty()) {
        let mut args = vec!["disable", "--now"];
        args.extend(gone_timers.iter().copied());
        report.commands.push(sc.run(&args)?);
    }
    for u in plan.add.iter().chain(plan.change.iter()) {
        let path = dir.join(&u.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(ScheduleError::io(parent))?;
        }
        agex_core::atomic::write_atomic(&path, u.content.as_bytes(), 0o644)
            .map_err(ScheduleError::io(&path))?;
    }
    for name in &plan.remove {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ScheduleError::io(path)(e)),
        }
        // A drop-in directory that is now empty goes too.
        if let Some(parent) = path.parent().filter(|p| *p != dir) {
            let _ = std::fs::remove_dir(parent);
        }
    }
    let record = Installed {
        files: plan.all.clone(),
    };
    let path: PathBuf = root.join(INSTALLED_FILE);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(ScheduleError::io(parent))?;
    }
    let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
    agex_core::atomic::write_atomic(&path, &bytes, 0o644).map_err(ScheduleError::io(&path))?;

    let Some(sc) = systemctl else {
        report.skipped = Some("no systemctl command for this root (pass --systemctl CMD)".into());
        return Ok(report);
    };
    report.commands.push(sc.run(&["daemon-reload"])?);
    let new_timers: Vec<&str> = plan
        .add
        .iter()
        .filter(|u| u.is_timer())
        .map(|u| u.name.as_str())
        .collect();
    if !new_timers.is_empty() {
        let mut args = vec!["enable", "--now"];
        args.extend(new_timers);
        report.commands.push(sc.run(&args)?);
    }
    if plan.add.iter().any(|u| u.name == "agex-activate.service") {
        report
            .commands
            .push(sc.run(&["enable", "agex-activate.service"])?);
    }
    let changed_timers: Vec<&str> = plan
        .change
        .iter()
        .filter(|u| u.is_timer())
        .map(|u| u.name.as_str())
        .collect();
    if !changed_timers.is_empty() {
        let mut args = vec!["try-restart"];
        args.extend(changed_timers);
        report.commands.push(sc.run(&args)?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, body: &str) -> UnitFile {
        UnitFile {
            name: name.into(),
            content: format!("{MARKER}\n{body}\n"),
        }
    }

    #[test]
    fn plans_adds_changes_and_removes_only_its_own_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let first = vec![unit("a.timer", "1"), unit("b.service.d/agex.conf", "x")];
        let p = plan(root, &first).unwrap();
        assert_eq!(p.add.len(), 2);
        apply(root, &p, None).unwrap();
        assert!(plan(root, &first).unwrap().is_noop());
        std::fs::write(root.join(UNIT_DIR).join("mine.service"), "[Unit]\n").unwrap();
        let second = vec![unit("a.timer", "2")];
        let p = plan(root, &second).unwrap();
        assert_eq!(p.change.len(), 1);
        assert_eq!(p.remove, vec!["b.service.d/agex.conf".to_string()]);
        apply(root, &p, None).unwrap();
        assert!(!root.join(UNIT_DIR).join("b.service.d").exists());
        assert!(root.join(UNIT_DIR).join("mine.service").exists());
        let foreign = vec![unit("mine.service", "3")];
        assert!(matches!(
            plan(root, &foreign),
            Err(ScheduleError::Foreign { .. })
        ));
    }
}
