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

    fn owed(&self, root: &Path) -> PathBuf {
        self.record(root).with_file_name(if self.is_runtime() {
            "agex-systemd-units-owed.json"
        } else {
            "systemd-units-owed.json"
        })
    }
}

/// The systemctl work an installation owes once its files changed: recorded before the
/// first file changes and removed once systemctl did it, so a run killed in between
/// leaves it to the next run, whose plan may find no file left to write (timers written
/// but never enabled, or units never reloaded, would otherwise stay so).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Owed {
    /// New timers to enable and start.
    enable: Vec<String>,
    /// Changed timers to restart.
    restart: Vec<String>,
    /// Whether `agex-activate.service` is to be enabled.
    activate: bool,
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
    let owed_path = to.owed(root);
    // What a run killed mid-write left: temp files never renamed into units or records.
    let dir = to.under(root);
    let mut dirs: BTreeSet<PathBuf> = plan
        .all
        .iter()
        .chain(&plan.remove)
        .filter_map(|n| dir.join(n).parent().map(Path::to_path_buf))
        .collect();
    dirs.extend(owed_path.parent().map(Path::to_path_buf));
    for d in &dirs {
        agex_core::atomic::remove_dead_temps(d);
    }
    let carried = owed_path.exists();
    if plan.is_noop() && !carried {
        return Ok(report);
    }
    let before: Owed = crate::record::load(&owed_path, "agex's record of owed systemctl work")?;
    let generated = |n: &String| plan.all.contains(n);
    let mut enable: BTreeSet<String> = before.enable.into_iter().filter(generated).collect();
    enable.extend(
        plan.add
            .iter()
            .filter(|u| u.is_timer())
            .map(|u| u.name.clone()),
    );
    let restart: BTreeSet<String> = before
        .restart
        .into_iter()
        .filter(generated)
        .chain(
            plan.change
                .iter()
                .filter(|u| u.is_timer())
                .map(|u| u.name.clone()),
        )
        .filter(|n| !enable.contains(n))
        .collect();
    let owed = Owed {
        enable: enable.into_iter().collect(),
        restart: restart.into_iter().collect(),
        activate: (before.activate && plan.all.iter().any(|n| n == ACTIVATE_UNIT))
            || plan.add.iter().any(|u| u.name == ACTIVATE_UNIT),
    };
    if systemctl.is_some() {
        crate::record::save(&owed_path, &owed)?;
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
        let _ = std::fs::remove_file(&owed_path);
        return Ok(report);
    };
    report.commands.push(sc.run(&["daemon-reload"])?);
    if !owed.enable.is_empty() {
        let mut args = if to.is_runtime() {
            vec!["start"]
        } else {
            vec!["enable", "--now"]
        };
        args.extend(owed.enable.iter().map(String::as_str));
        report.commands.push(sc.run(&args)?);
    }
    if !to.is_runtime() && owed.activate {
        report.commands.push(sc.run(&["enable", ACTIVATE_UNIT])?);
    }
    if !owed.restart.is_empty() {
        let mut args = vec!["try-restart"];
        args.extend(owed.restart.iter().map(String::as_str));
        report.commands.push(sc.run(&args)?);
    }
    std::fs::remove_file(&owed_path).map_err(ScheduleError::io(&owed_path))?;
    Ok(report)
}

const ACTIVATE_UNIT: &str = "agex-activate.service";

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
    fn systemctl_work_a_failed_run_owed_is_done_by_the_next_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let to = UnitDir::default();
        let units = vec![unit("a.timer", "1"), unit("agex-activate.service", "x")];
        let failing = Systemctl::parse("false").unwrap();
        assert!(apply(root, &to, &plan(root, &to, &units).unwrap(), Some(&failing)).is_err());
        // The files are in place, so the plan finds nothing to write ...
        let p = plan(root, &to, &units).unwrap();
        assert!(p.is_noop());
        // ... and the next run still reloads, enables the timer and the service.
        let ok = Systemctl::parse("true").unwrap();
        let report = apply(root, &to, &p, Some(&ok)).unwrap();
        assert_eq!(
            report.commands,
            [
                "true daemon-reload",
                "true enable --now a.timer",
                "true enable agex-activate.service"
            ]
        );
        // Done once: nothing is owed any more.
        let report = apply(root, &to, &plan(root, &to, &units).unwrap(), Some(&ok)).unwrap();
        assert!(report.commands.is_empty(), "{:?}", report.commands);
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
