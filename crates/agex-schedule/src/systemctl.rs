//! Running systemctl through a configurable command (`--systemctl`, `AGEX_SYSTEMCTL`), so
//! tests record the calls instead of touching the machine's units.

use std::process::{Command, Stdio};

use crate::error::ScheduleError;

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

    /// Runs `<command> <args...>`; a non-zero exit is an error quoting stderr. Returns the
    /// command line that ran.
    pub fn run(&self, args: &[&str]) -> Result<String, ScheduleError> {
        let shown = format!("{} {}", self.argv.join(" "), args.join(" "));
        let out = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| ScheduleError::Systemctl {
                command: shown.clone(),
                status: "could not start".into(),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(ScheduleError::Systemctl {
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
