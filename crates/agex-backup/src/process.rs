//! The one way agex runs external tools (`borg`, `pg_dump`, `systemctl`): the command is
//! logged without secrets, stderr is captured, and a failure becomes a typed error that
//! quotes the tool's last stderr lines.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;

use crate::error::BackupError;

/// How many stderr lines a failure quotes.
const TAIL_LINES: usize = 12;

/// The program and arguments of a command, for logs and errors. Environment values are
/// never shown (they carry `BORG_PASSCOMMAND` and friends).
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// A command as an error names it: the program's file name and its subcommand
/// (`borg create`, `pg_dump`). The whole command line is a `-v` (debug) log line.
pub fn short(shown: &str) -> String {
    let mut words = shown.split(' ');
    let program = words
        .next()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .unwrap_or_default();
    let is_tool = matches!(program, "borg" | "restic" | "systemctl");
    let sub = words
        .find(|w| !w.starts_with('-') && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
    match sub {
        Some(sub) if is_tool => format!("{program} {sub}"),
        _ => program.to_owned(),
    }
}

/// Starts a command with the given stdin, stdout and stderr, logging it (never its
/// environment); a command that cannot start is a [`BackupError::Spawn`] naming the tool.
pub fn start(
    cmd: &mut Command,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child, BackupError> {
    let shown = describe(cmd);
    tracing::debug!("running {shown}");
    cmd.stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|source| BackupError::Spawn {
            tool: shown,
            source,
        })
}

/// Runs a command to completion with `stdin`, capturing stdout and stderr, and returns
/// what it did whatever its exit status: for a caller that reads the status itself
/// (borg's exit 1 is a warning).
pub fn output(cmd: &mut Command, stdin: Stdio) -> Result<Output, BackupError> {
    start(cmd, stdin, Stdio::piped(), Stdio::piped())?
        .wait_with_output()
        .map_err(|source| BackupError::Spawn {
            tool: describe(cmd),
            source,
        })
}

/// [`run`] with `stdin` (a file, say) fed to the command.
pub fn run_fed(cmd: &mut Command, stdin: Stdio) -> Result<Output, BackupError> {
    let out = output(cmd, stdin)?;
    check(&describe(cmd), out)
}

/// Runs a command to completion, capturing stdout and stderr; non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<Output, BackupError> {
    run_to(cmd, Stdio::piped())
}

/// [`run`] with stdout going to `stdout` (a file, say) instead of being captured.
pub fn run_to(cmd: &mut Command, stdout: Stdio) -> Result<Output, BackupError> {
    let shown = describe(cmd);
    tracing::debug!("running {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| BackupError::Spawn {
            tool: shown.clone(),
            source,
        })?;
    check(&shown, out)
}

/// Runs a command whose stdout `consume` reads as it comes (a dump streamed on), capturing
/// stderr. The result is `consume`'s only if it succeeded and the command then exited 0;
/// if `consume` fails, the command is killed. The command dies with agex.
pub fn run_reading<T>(
    cmd: &mut Command,
    consume: impl FnOnce(&mut dyn Read) -> std::io::Result<T>,
) -> Result<T, BackupError> {
    let shown = describe(cmd);
    die_with_agex(cmd);
    let (mut child, stderr) = spawn_piped(cmd, Stdio::null())?;
    let consumed = match child.stdout.take() {
        Some(mut out) => consume(&mut out),
        None => Err(std::io::Error::other("no stdout")),
    };
    if consumed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|source| BackupError::Spawn {
        tool: shown.clone(),
        source,
    })?;
    let stderr = stderr.join().unwrap_or_default();
    match consumed {
        Err(e) => Err(BackupError::Output {
            tool: shown,
            detail: format!("reading its output failed: {e}"),
        }),
        Ok(_) if !status.success() => Err(BackupError::Tool {
            tool: short(&shown),
            status: status_text(&status),
            stderr: tail(&stderr),
        }),
        Ok(v) => Ok(v),
    }
}

/// Spawns a command with stdout piped and stderr read to its end on a thread (so a
/// talkative tool never blocks on a full pipe); the thread yields what it read.
pub fn spawn_piped(
    cmd: &mut Command,
    stdin: Stdio,
) -> Result<(Child, JoinHandle<String>), BackupError> {
    spawn(cmd, stdin, Stdio::piped())
}

/// [`spawn_piped`] with stdout going to `stdout`.
pub fn spawn(
    cmd: &mut Command,
    stdin: Stdio,
    stdout: Stdio,
) -> Result<(Child, JoinHandle<String>), BackupError> {
    let mut child = start(cmd, stdin, stdout, Stdio::piped())?;
    let mut err = child.stderr.take();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    Ok((child, stderr))
}

/// Makes the command's process get SIGTERM when the agex thread that starts it ends
/// (agex killed, say): a tool left reading or writing a pipe whose other end died would
/// hold a repository lock or a database snapshot forever.
pub fn die_with_agex(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let agex = rustix::process::getpid();
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and
    // exec.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)?;
            // An agex killed between the fork and the prctl sends no signal: the tool
            // must not start then.
            if rustix::process::getppid() != Some(agex) {
                return Err(std::io::Error::other("agex ended before the tool started"));
            }
            Ok(())
        });
    }
}

/// Turns a finished command's output into `Ok(output)` or a [`BackupError::Tool`].
pub fn check(shown: &str, out: Output) -> Result<Output, BackupError> {
    if out.status.success() {
        return Ok(out);
    }
    Err(BackupError::Tool {
        tool: short(shown),
        status: status_text(&out.status),
        stderr: tail(&String::from_utf8_lossy(&out.stderr)),
    })
}

/// `exit status 2` or `killed by signal 9`.
pub fn status_text(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "failed".into(),
    }
}

/// The last lines of a tool's stderr; borg's `--log-json` lines are reduced to their
/// message.
pub fn tail(stderr: &str) -> String {
    let lines: Vec<String> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| l.to_string())
        })
        .collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let text = lines[start..].join("\n  ");
    if text.is_empty() {
        "(no error output)".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_cannot_start_is_named_without_its_command_line() {
        let mut cmd = Command::new("/nonexistent/borg");
        cmd.args(["create", "--log-json", "/srv/repo::svc-1", "/var/lib/svc"]);
        let err = run(&mut cmd)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("cannot run borg create: "), "{err}");
        assert!(!err.contains("/srv/repo"), "{err}");
    }

    #[test]
    fn output_hands_back_a_failed_command_and_run_fed_feeds_its_stdin() {
        if !std::path::Path::new("/bin/sh").exists() {
            eprintln!(
                "SKIP output_hands_back_a_failed_command_and_run_fed_feeds_its_stdin: no /bin/sh"
            );
            return;
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 1"]);
        let out = output(&mut cmd, Stdio::null()).expect("sh starts");
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let err = run_fed(&mut cmd, Stdio::null())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "sh failed (exit status 1): err");

        let (reader, mut writer) = std::io::pipe().expect("a pipe");
        std::io::Write::write_all(&mut writer, b"fed\n").expect("pipe write");
        drop(writer);
        let mut cat = Command::new("/bin/sh");
        cat.args(["-c", "cat"]);
        let out = run_fed(&mut cat, Stdio::from(reader)).expect("cat succeeds");
        assert_eq!(out.stdout, b"fed\n");
    }
}
