//! SIGTERM, SIGINT and SIGHUP during a command that holds something the system needs back
//! (borg children, stopped units, named pipes) or plaintext with a name (RAM directories,
//! activation staging): undo and wipe it, then exit like a terminated process (128 +
//! signal). `systemctl stop`, `timeout`, a closed ssh session and Ctrl-C all end a run
//! this way. One thread handles them for the whole process, so two handlers never race
//! to exit while the other is still undoing.

use std::sync::{Mutex, Once};

/// What the first line says: `restore interrupted by signal 15: starting stopped units
/// again`; the last command to call [`undo_on_termination`] names it.
static SAYS: Mutex<(&str, &str)> = Mutex::new(("agex", "removing its plaintext files"));
static STARTED: Once = Once::new();

/// Makes sure the thread that waits for SIGTERM/SIGINT/SIGHUP runs; when one comes it runs
/// [`agex_backup::cancel::undo`] and [`agex_secrets::ramdir::wipe_all`] and exits.
/// `command` and `doing` make its first line.
pub fn undo_on_termination(command: &'static str, doing: &'static str) {
    *SAYS.lock().unwrap_or_else(|e| e.into_inner()) = (command, doing);
    STARTED.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ]) else {
            tracing::warn!(
                "cannot handle SIGTERM; an interrupted {command} may leave units stopped or plaintext behind"
            );
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let (command, doing) = *SAYS.lock().unwrap_or_else(|e| e.into_inner());
                let mut undone: String = agex_backup::cancel::undo()
                    .iter()
                    .map(|line| format!("\n  {line}"))
                    .collect();
                if agex_secrets::ramdir::wipe_all() > 0 {
                    undone.push_str("\n  removed its plaintext files");
                }
                tracing::warn!("{command} interrupted by signal {sig}: {doing}{undone}");
                std::process::exit(128 + sig);
            }
        });
    });
}
