//! What a backup or restore interrupted by SIGTERM or SIGINT must undo before it exits: stop the
//! borg processes it started (so no archive of a half-read dump is committed), start
//! the units it stopped again, and remove its named pipes. The run registers each of
//! these while it holds them; [`undo`] is called from the signal-handling thread. Locks
//! need nothing: the kernel drops a dead process's flocks, and rustic_core writes a
//! snapshot only after all its data, so an unfinished Restic snapshot never appears.

use std::path::PathBuf;

use agex_core::systemctl::Systemctl;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Pending {
    children: Vec<u32>,
    units: Vec<(Systemctl, Vec<String>)>,
    /// Units [`undo`] already started: the run must not start them a second time.
    undone_units: Vec<Vec<String>>,
    fifos: Vec<PathBuf>,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending {
    children: Vec::new(),
    units: Vec::new(),
    undone_units: Vec::new(),
    fifos: Vec::new(),
});

fn with<T>(f: impl FnOnce(&mut Pending) -> T) -> T {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut p)
}

pub(crate) fn child_started(pid: u32) {
    with(|p| p.children.push(pid));
}

pub(crate) fn child_done(pid: u32) {
    with(|p| p.children.retain(|c| *c != pid));
}

pub(crate) fn units_stopped(systemctl: &Systemctl, units: &[String]) {
    with(|p| p.units.push((systemctl.clone(), units.to_vec())));
}

/// Starts `units` again with `start`, unless [`undo`] already did (a signal arrived): they
/// are started exactly once. `start` runs under the same lock [`undo`] takes, so a signal
/// during it cannot make agex exit before the units are up.
pub(crate) fn start_units_once<T>(units: &[String], start: impl FnOnce() -> T) -> Option<T> {
    with(|p| {
        p.units.retain(|(_, u)| u != units);
        if p.undone_units.iter().any(|u| u == units) {
            None
        } else {
            Some(start())
        }
    })
}

pub(crate) fn fifo_made(path: PathBuf) {
    with(|p| p.fifos.push(path));
}

pub(crate) fn fifo_removed(path: &std::path::Path) {
    with(|p| p.fifos.retain(|f| f != path));
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`undo`] has started: the run was interrupted, and the thread handling the
/// signal, not the run, decides how agex exits.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Undoes what the interrupted run holds; returns one line per thing done.
pub fn undo() -> Vec<String> {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    let (children, units, fifos) = with(|p| {
        (
            std::mem::take(&mut p.children),
            {
                let units = std::mem::take(&mut p.units);
                p.undone_units.extend(units.iter().map(|(_, u)| u.clone()));
                units
            },
            std::mem::take(&mut p.fifos),
        )
    });
    let mut done = Vec::new();
    for raw in &children {
        if let Some(pid) = rustix::process::Pid::from_raw(*raw as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            done.push(format!("stopped borg (pid {raw})"));
        }
    }
    // borg exits on SIGTERM without committing; wait for it so the repository lock is
    // released before agex exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in &children {
        while Instant::now() < deadline
            && rustix::process::Pid::from_raw(*pid as i32)
                .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for (systemctl, list) in units {
        let args: Vec<&str> = std::iter::once("start")
            .chain(list.iter().map(String::as_str))
            .collect();
        let ok = systemctl.run(&args).is_ok();
        done.push(format!(
            "{} units {}",
            if ok { "started" } else { "FAILED to start" },
            list.join(" ")
        ));
    }
    for f in fifos {
        let _ = std::fs::remove_file(&f);
    }
    done
}
