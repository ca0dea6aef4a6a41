//! Running systemctl through a configurable command (`--systemctl`, `AGEX_SYSTEMCTL`), so
//! tests record the calls instead of touching the machine's units. Activation (restarts,
//! unit installs) and the scheduler share this one runner.

use std::path::Path;
use std::process::{Command, Stdio};

/// A systemctl call that failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` {status}{}", tail(.stderr))]
pub struct SystemctlError {
    /// The command line.
    pub command: String,
    /// How it ended.
    pub status: String,
    /// Its stderr, trimmed.
    pub stderr: String,
}

/// The last lines of systemctl's stderr, indented under the error.
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    format!(":\n  {}", tail.join("\n  "))
}

/// How to run systemctl: a program and leading arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Systemctl {
    argv: Vec<String>,
}

impl Systemctl {
    /// Parses `systemctl` or `/usr/bin/systemctl --no-ask-password` (split on
    /// whitespace); `None` for an empty string.
    pub fn parse(command: &str) -> Option<Systemctl> {
        let argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        (!argv.is_empty()).then_some(Systemctl { argv })
    }

    /// The command a run uses: the one given (flag or `AGEX_SYSTEMCTL`), else the real
    /// `systemctl` when the root is the host's own `/`, else none (a test root's units
    /// are not the machine's).
    pub fn configured(given: Option<&str>, root: &Path) -> Option<Systemctl> {
        match given {
            Some(cmd) => Systemctl::parse(cmd),
            None if root.as_os_str().is_empty() || root == Path::new("/") => {
                Systemctl::parse("systemctl")
            }
            None => None,
        }
    }

    /// Runs `<command> <args...>`; a non-zero exit is an error quoting stderr. Returns the
    /// command line that ran.
    pub fn run(&self, args: &[&str]) -> Result<String, SystemctlError> {
        let shown = format!("{} {}", self.argv.join(" "), args.join(" "));
        let out = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| SystemctlError {
                command: shown.clone(),
                status: "could not start".into(),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(SystemctlError {
                command: shown,
                status: match out.status.code() {
                    Some(c) => format!("exited with status {c}"),
                    None => "was killed by a signal".into(),
                },
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(shown)
    }
}
