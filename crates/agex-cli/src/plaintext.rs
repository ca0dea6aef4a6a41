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
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process with valid arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn wipe_on_termination() {
    crate::interrupt::undo_on_termination("agex", "removing its plaintext files");
}
