//! SIGTERM and SIGINT during a command that holds something the system needs back
//! (borg children, stopped units, named pipes): undo it, then exit like a terminated
//! process (128 + signal). `systemctl stop`, `timeout`, a closed ssh session and Ctrl-C
//! all end a run this way.

/// Starts the thread that waits for SIGTERM/SIGINT and runs [`agex_backup::cancel::undo`].
/// `command` and `doing` make its first line: `restore interrupted by signal 15: starting
/// stopped units again`.
pub fn undo_on_termination(command: &'static str, doing: &'static str) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) else {
        eprintln!(
            "warning: cannot handle SIGTERM; an interrupted {command} may leave units stopped"
        );
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("{command} interrupted by signal {sig}: {doing}");
            for line in agex_backup::cancel::undo() {
                eprintln!("  {line}");
            }
            std::process::exit(128 + sig);
        }
    });
}
