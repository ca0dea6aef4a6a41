//! The Borg side: drives the `borg` binary with `--json`/`--log-json`. No secret reaches
//! borg through a named file: the passphrase goes through a pipe (`BORG_PASSPHRASE_FD`)
//! written before borg starts, the ssh key and pinned host keys through anonymous
//! in-memory files ([`crate::ssh`]), the env secret's variables through borg's
//! environment. What has no name cannot be left behind when agex is killed.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use agex_core::Retention;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::access::RepoAccess;
use crate::error::BackupError;
use crate::process;
use crate::progress::Meter;
use crate::ssh::SshAccess;

/// A Borg repository, ready for commands.
pub struct Borg {
    name: String,
    url: String,
    base_dir: PathBuf,
    password: Zeroizing<String>,
    env: Vec<(String, Zeroizing<String>)>,
    ssh: Option<SshAccess>,
    known_hosts: Vec<String>,
    upload_limit: Option<u64>,
    retries: Arc<AtomicU64>,
}

/// One archive as `borg list --json` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct ArchiveInfo {
    /// Archive name (`<service>-<run id>`).
    pub name: String,
    /// Archive id.
    pub id: String,
    /// When it was started (local time, ISO 8601 without zone).
    pub start: String,
}

#[derive(Deserialize)]
struct ListOutput {
    archives: Vec<ArchiveInfo>,
}

/// What `borg create --json` says about a new archive.
#[derive(Debug, Clone, Default)]
pub struct CreateStats {
    /// Files in the archive.
    pub files: u64,
    /// Original size of the archive.
    pub original_size: u64,
    /// Bytes this archive added to the repository after dedup and compression.
    pub deduplicated_size: u64,
}

impl Borg {
    /// Prepares the driver; `state_dir` (under `--root`) holds borg's cache.
    pub fn new(access: &RepoAccess, state_dir: &Path) -> Result<Borg, BackupError> {
        let ssh = SshAccess::new(&access.repo, access.ssh_key.as_deref().map(|k| &k[..]))?;
        let base_dir = state_dir.join("borg");
        std::fs::create_dir_all(&base_dir).map_err(BackupError::io(&base_dir))?;
        Ok(Borg {
            name: access.repo.name.clone(),
            url: access.repo.url.clone(),
            base_dir,
            password: access.password.clone(),
            env: access.env.clone(),
            ssh,
            known_hosts: access.repo.known_hosts.clone(),
            upload_limit: access.repo.limit_upload,
            retries: Arc::clone(&access.retries),
        })
    }

    /// The repository's name in agex.toml.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `borg` command with the passphrase, ssh and state settings. The passphrase is
    /// in a pipe only this command's borg inherits; spawn each command once.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("borg");
        cmd.env_remove("BORG_PASSPHRASE")
            .env_remove("BORG_PASSCOMMAND")
            .env_remove("BORG_NEW_PASSPHRASE")
            .env("BORG_BASE_DIR", &self.base_dir)
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_DISPLAY_PASSPHRASE", "no")
            // A lock left by a dead borg process on this host is removed by borg itself
            // (with a warning in its log) instead of blocking every later run.
            .env("BORG_HOSTNAME_IS_UNIQUE", "yes")
            .env("BORG_EXIT_CODES", "legacy");
        for (k, v) in &self.env {
            cmd.env(k, v.as_str());
        }
        match passphrase_pipe(&self.password) {
            Ok(reader) => {
                cmd.env("BORG_PASSPHRASE_FD", reader.as_raw_fd().to_string());
                // SAFETY: fcntl(2) is async-signal-safe. The closure owns the read end,
                // so agex's copy closes when the command is dropped.
                unsafe {
                    cmd.pre_exec(move || {
                        rustix::io::fcntl_setfd(&reader, rustix::io::FdFlags::empty())?;
                        Ok(())
                    });
                }
            }
            // Without the pipe borg finds no passphrase and says so; nothing leaks.
            Err(_) => {
                cmd.env_remove("BORG_PASSPHRASE_FD");
            }
        }
        match &self.ssh {
            Some(ssh) => {
                cmd.env("BORG_RSH", ssh.borg_rsh());
                ssh.inherit(&mut cmd);
            }
            None => {
                cmd.env_remove("BORG_RSH");
            }
        }
        if let Some(limit) = self.upload_limit {
            // borg's unit is KiB/s.
            cmd.arg(format!("--upload-ratelimit={}", (limit / 1024).max(1)));
        }
        // borg must not outlive agex: a borg left reading a named pipe whose writer died
        // would hold the repository lock forever. SIGTERM makes it exit cleanly.
        process::die_with_agex(&mut cmd);
        cmd
    }

    /// Turns a failed borg's complaint into the error it means: no repository, no space,
    /// or (from ssh) a host key not trusted, with a message that says which repository
    /// and how to trust the server. A failure that may be the network's is left as it
    /// is, to be retried; [`Borg::settle`] looks closer once no retry is left.
    pub fn explain(&self, e: BackupError) -> BackupError {
        if let BackupError::Tool { stderr, .. } = &e {
            if no_repository(stderr) {
                return BackupError::NotInitialised {
                    repo: self.name.clone(),
                };
            }
            if let Some(detail) = no_space(stderr) {
                // The traceback of `borg serve` comes with its "Borg server:" lines.
                let remote = stderr.contains("Borg server:") || stderr.contains("in serve");
                return BackupError::NoSpace {
                    repo: self.name.clone(),
                    place: if remote {
                        "on its server"
                    } else {
                        "on this host"
                    }
                    .into(),
                    detail,
                };
            }
            if let Some(message) = self.ssh.as_ref().and_then(|ssh| ssh.explain(stderr)) {
                return BackupError::HostKey(message);
            }
            // Asking the server for its keys now would only meet the same network.
            if transient(&e).is_some() {
                return e;
            }
        }
        self.settle(e)
    }

    /// The error a borg command ended with, once it is not tried again: when ssh's
    /// connection ended without a reason borg relayed, the server is asked for its keys,
    /// so that a host key nobody trusts is named as such.
    pub fn settle(&self, e: BackupError) -> BackupError {
        let hint = match (&e, &self.ssh) {
            (BackupError::Tool { stderr, .. }, Some(ssh)) => {
                ssh.diagnose(&self.known_hosts, stderr)
            }
            _ => None,
        };
        match hint {
            Some(message) => BackupError::HostKey(message),
            None => e,
        }
    }

    /// Runs the borg command `build` makes; when the network to the server fails (ssh's
    /// connection reset, refused, timed out), a new one is run after a pause, a bounded
    /// number of times, each counted into the run's retries.
    fn run(
        &self,
        what: &str,
        build: impl Fn() -> Command,
    ) -> Result<std::process::Output, BackupError> {
        crate::backend::Retry::COMMAND
            .run(
                &self.name,
                what,
                &self.retries,
                || process::run(&mut build()).map_err(|e| self.explain(e)),
                transient,
            )
            .map_err(|e| self.settle(e))
    }

    /// `borg init --encryption=repokey-blake2`.
    pub fn init(&self) -> Result<(), BackupError> {
        self.run("borg init", || {
            let mut cmd = self.command();
            cmd.args([
                "init",
                "--log-json",
                "--encryption=repokey-blake2",
                "--make-parent-dirs",
            ])
            .arg(&self.url);
            cmd
        })?;
        Ok(())
    }

    /// Archives in the repository, oldest first; `prefix` filters by name.
    pub fn list(&self, prefix: Option<&str>) -> Result<Vec<ArchiveInfo>, BackupError> {
        let out = self.run("borg list", || {
            let mut cmd = self.command();
            cmd.args(["list", "--json", "--log-json"]);
            if let Some(p) = prefix {
                cmd.arg("--glob-archives").arg(format!("{p}*"));
            }
            cmd.arg(&self.url);
            cmd
        })?;
        parse_list(&out.stdout)
    }

    /// Deletes one archive (used to discard an archive whose dump failed).
    pub fn delete(&self, archive: &str) -> Result<(), BackupError> {
        self.run("borg delete", || {
            let mut cmd = self.command();
            cmd.args(["delete", "--log-json"])
                .arg(format!("{}::{archive}", self.url));
            cmd
        })?;
        Ok(())
    }

    /// `borg check` of the repository and the archives' metadata; with `verify_data`,
    /// every chunk is read and authenticated too.
    pub fn check(&self, verify_data: bool) -> Result<(), BackupError> {
        self.run("borg check", || {
            let mut cmd = self.command();
            cmd.args(["check", "--log-json"]);
            if verify_data {
                cmd.arg("--verify-data");
            }
            cmd.arg(&self.url);
            cmd
        })?;
        Ok(())
    }

    /// Applies `retention` to the archives of `service` (`<service>-*`); returns the
    /// names pruned. With `compact`, the space they held is freed at once.
    pub fn prune(
        &self,
        service: &str,
        retention: &Retention,
        compact: bool,
        dry_run: bool,
    ) -> Result<Vec<String>, BackupError> {
        let out = self.run("borg prune", || {
            let mut cmd = self.command();
            cmd.args(["prune", "--list", "--log-json", "--glob-archives"])
                .arg(format!("{service}-*"));
            for (flag, n) in [
                ("--keep-last", retention.keep_last),
                ("--keep-hourly", retention.keep_hourly),
                ("--keep-daily", retention.keep_daily),
                ("--keep-weekly", retention.keep_weekly),
                ("--keep-monthly", retention.keep_monthly),
                ("--keep-yearly", retention.keep_yearly),
            ] {
                if n > 0 {
                    cmd.arg(format!("{flag}={n}"));
                }
            }
            if dry_run {
                cmd.arg("--dry-run");
            }
            cmd.arg(&self.url);
            cmd
        })?;
        let pruned = pruned_archives(&out.stderr);
        if compact && !dry_run {
            self.run("borg compact", || {
                let mut cmd = self.command();
                cmd.args(["compact", "--log-json"]).arg(&self.url);
                cmd
            })?;
        }
        Ok(pruned)
    }

    /// Removes a stale lock left by a dead borg process.
    pub fn break_lock(&self) -> Result<(), BackupError> {
        self.run("borg break-lock", || {
            let mut cmd = self.command();
            cmd.args(["break-lock", "--log-json"]).arg(&self.url);
            cmd
        })?;
        Ok(())
    }

    /// The URL of an archive.
    pub fn archive_url(&self, archive: &str) -> String {
        format!("{}::{archive}", self.url)
    }
}

/// Whether borg failed because the network to its server may have (see
/// [`crate::ssh::network_failure`]): Some(what it said last) when it may work on
/// another try. borg's "Connection closed by remote host" counts when nothing says
/// why (ssh's own reason reaches borg's log only now and then). A wrong passphrase, a
/// missing repository, a refused host key or login is not.
pub fn transient(e: &BackupError) -> Option<String> {
    match e {
        BackupError::Tool { stderr, .. }
            if crate::ssh::network_failure(stderr)
                || stderr.contains("Connection closed by remote host")
                    && !crate::ssh::refusal(stderr) =>
        {
            Some(
                stderr
                    .lines()
                    .rev()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        _ => None,
    }
}

/// The archives `borg prune --list --log-json` pruned (or would prune), from its stderr:
/// each decision is a log line, "Pruning archive: …" or "Would prune: …".
pub fn pruned_archives(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .filter_map(|m| {
            ["Pruning archive", "Would prune"]
                .iter()
                .find(|p| m.starts_with(*p))
                .and_then(|_| m.split(':').nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        })
        .collect()
}

/// The archives of `borg list --json` output.
pub fn parse_list(stdout: &[u8]) -> Result<Vec<ArchiveInfo>, BackupError> {
    let parsed: ListOutput = serde_json::from_slice(stdout).map_err(|e| BackupError::Output {
        tool: "borg list".into(),
        detail: e.to_string(),
    })?;
    Ok(parsed.archives)
}

/// Reads the stats of `borg create --json`.
pub fn parse_create_stats(stdout: &[u8]) -> Result<CreateStats, BackupError> {
    let v: serde_json::Value = serde_json::from_slice(stdout).map_err(|e| BackupError::Output {
        tool: "borg create".into(),
        detail: e.to_string(),
    })?;
    let stats = &v["archive"]["stats"];
    Ok(CreateStats {
        files: stats["nfiles"].as_u64().unwrap_or(0),
        original_size: stats["original_size"].as_u64().unwrap_or(0),
        deduplicated_size: stats["deduplicated_size"].as_u64().unwrap_or(0),
    })
}

/// A pipe holding the passphrase, its write end closed: borg reads it to the end.
/// Passphrases are far below a pipe's capacity (checked when unlocked), so the write
/// never blocks.
fn passphrase_pipe(password: &str) -> std::io::Result<std::io::PipeReader> {
    let (reader, mut writer) = std::io::pipe()?;
    writer.write_all(password.as_bytes())?;
    drop(writer);
    Ok(reader)
}

/// Reads borg's `--log-json` stderr to its end: `archive_progress` lines (from
/// `--progress`) move `meter`; every other line is returned, for error messages.
pub fn read_log(stderr: impl std::io::Read, meter: Option<&Meter>) -> String {
    use std::io::BufRead;
    let mut kept = String::new();
    for line in std::io::BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v.get("type").and_then(|t| t.as_str()) == Some("archive_progress") {
                if let (Some(m), Some(bytes), Some(files)) = (
                    meter,
                    v.get("original_size").and_then(|x| x.as_u64()),
                    v.get("nfiles").and_then(|x| x.as_u64()),
                ) {
                    m.set(bytes, files);
                }
                continue;
            }
        }
        kept.push_str(&line);
        kept.push('\n');
    }
    kept
}

/// Whether borg's `--log-json` stderr says it gave up waiting for a lock.
pub fn lock_timed_out(log: &str) -> bool {
    log.lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v.get("msgid").and_then(|m| m.as_str()).map(str::to_string))
            .is_some_and(|m| m == "LockTimeout" || m == "LockFailed")
    })
}

/// What borg said about its storage being full (a full disk, a quota, borg's own
/// free-space check), if it did.
fn no_space(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| {
            [
                "No space left on device",
                "Disk quota exceeded",
                "Insufficient free space",
            ]
            .iter()
            .any(|p| l.contains(p))
        })
        .map(str::to_string)
}

/// Whether borg's stderr says there is no repository at the URL (never `borg init`ed).
fn no_repository(stderr: &str) -> bool {
    stderr.lines().any(|l| {
        let l = l.trim();
        l.starts_with("Repository ")
            && (l.ends_with("does not exist.")
                || l.ends_with("is not a valid repository. Check repo config."))
    })
}
