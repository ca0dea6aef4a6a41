//! Installing generated units under `<root>/etc/systemd/system` (or a runtime unit
//! directory such as `/run/systemd/system`, where NixOS keeps what is not in its store):
//! plan (pure: what to add, change, remove), then apply (atomic writes, removals,
//! `daemon-reload`, timers enabled). agex records what it installed in
//! `/var/lib/agex/systemd-units.json`, so the units of a service whose policy is gone are
//! removed, and files it did not write are never touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ScheduleError;
use crate::units::{UnitFile, MARKER};
use agex_core::systemctl::Systemctl;

/// The unit directory, under `--root`.
pub const UNIT_DIR: &str = "etc/systemd/system";

/// Where units are installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitDir {
    /// The host path (`/etc/systemd/system`, `/run/systemd/system`).
    pub path: PathBuf,
}

impl Default for UnitDir {
    fn default() -> Self {
        UnitDir {
            path: PathBuf::from("/").join(UNIT_DIR),
        }
    }
}

impl UnitDir {
    /// A runtime directory (under /run) is gone after a reboot: timers are linked into
    /// `timers.target.wants/` there directly, since `systemctl enable` writes to /etc.
    pub fn is_runtime(&self) -> bool {
        self.path.starts_with("/run")
    }

    fn under(&self, root: &Path) -> PathBuf {
        root.join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }

    fn record(&self, root: &Path) -> PathBuf {
        if self.is_runtime() {
            root.join("run/agex-systemd-units.json")
        } else {
            root.join(INSTALLED_FILE)
        }
    }
}
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

fn installed(path: PathBuf) -> Result<Installed, ScheduleError> {
    crate::record::load(&path, "agex's record of installed units")
}

fn ours(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|t| t.starts_with(MARKER))
        .unwrap_or(false)
}

/// Compares `units` with what is in the unit directory under `root`.
pub fn plan(root: &Path, to: &UnitDir, units: &[UnitFile]) -> Result<InstallPlan, ScheduleError> {
    let dir = to.under(root);
    let before = installed(to.record(root))?;
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
    to: &UnitDir,
    plan: &InstallPlan,
    systemctl: Option<&Systemctl>,
) -> Result<InstallReport, ScheduleError> {
    let mut report = InstallReport::default();
    if plan.is_noop() {
        return Ok(report);
    }
    let dir = to.under(root);
    let wants = dir.join("timers.target.wants");
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
        if to.is_runtime() && u.is_timer() {
            std::fs::create_dir_all(&wants).map_err(ScheduleError::io(&wants))?;
            let link = wants.join(&u.name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("../{}", u.name), &link)
                .map_err(ScheduleError::io(&link))?;
        }
    }
    for name in &plan.remove {
        if to.is_runtime() {
            let _ = std::fs::remove_file(wants.join(name));
        }
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
    crate::record::save(&to.record(root), &record)?;

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
        let mut args = if to.is_runtime() {
            vec!["start"]
        } else {
            vec!["enable", "--now"]
        };
        args.extend(new_timers);
        report.commands.push(sc.run(&args)?);
    }
    if !to.is_runtime() && plan.add.iter().any(|u| u.name == "agex-activate.service") {
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
        let to = UnitDir::default();
        let first = vec![unit("a.timer", "1"), unit("b.service.d/agex.conf", "x")];
        let p = plan(root, &to, &first).unwrap();
        assert_eq!(p.add.len(), 2);
        apply(root, &to, &p, None).unwrap();
        assert!(plan(root, &to, &first).unwrap().is_noop());
        std::fs::write(root.join(UNIT_DIR).join("mine.service"), "[Unit]\n").unwrap();
        let second = vec![unit("a.timer", "2")];
        let p = plan(root, &to, &second).unwrap();
        assert_eq!(p.change.len(), 1);
        assert_eq!(p.remove, vec!["b.service.d/agex.conf".to_string()]);
        apply(root, &to, &p, None).unwrap();
        assert!(!root.join(UNIT_DIR).join("b.service.d").exists());
        assert!(root.join(UNIT_DIR).join("mine.service").exists());
        let foreign = vec![unit("mine.service", "3")];
        assert!(matches!(
            plan(root, &to, &foreign),
            Err(ScheduleError::Foreign { .. })
        ));
    }

    #[test]
    fn runtime_directories_link_timers_into_timers_target() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let to = UnitDir {
            path: PathBuf::from("/run/systemd/system"),
        };
        let units = vec![unit("agex-x.timer", "1")];
        apply(root, &to, &plan(root, &to, &units).unwrap(), None).unwrap();
        let link = root.join("run/systemd/system/timers.target.wants/agex-x.timer");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("../agex-x.timer")
        );
        assert!(root.join("run/agex-systemd-units.json").is_file());
        apply(root, &to, &plan(root, &to, &[]).unwrap(), None).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
    }
}
