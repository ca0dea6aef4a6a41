//! What a command that holds plaintext does first: it cannot be dumped (no core file, no
//! `gcore` or ptrace by a same-user process), and a SIGTERM, SIGINT or SIGHUP wipes its
//! named plaintext (RAM directories, activation staging) before it exits (through the
//! one handler in [`crate::interrupt`]).

/// Makes this process non-dumpable with a core limit of 0; unless the command handles
/// termination signals itself, wipes named plaintext on SIGTERM/SIGINT/SIGHUP and exits
/// with 128 + the signal.
pub fn protect(own_signal_handling: bool) {
    if let Err(e) = non_dumpable() {
        tracing::warn!("cannot make agex non-dumpable: {e}");
    }
    if !own_signal_handling {
        wipe_on_termination();
    }
}

fn non_dumpable() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit};
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

fn wipe_on_termination() {
    crate::interrupt::undo_on_termination("agex", "removing its plaintext files");
}
