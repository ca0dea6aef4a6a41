//! The Borg side: drives the `borg` binary with `--json`/`--log-json`. The passphrase
//! reaches borg through `BORG_PASSCOMMAND` reading a 0600 file on tmpfs, the ssh key
//! through `BORG_RSH`; both files live in a [`RamDir`] wiped when the driver is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use agex_core::Retention;
use agex_secrets::ramdir::RamDir;
use serde::Deserialize;

use crate::access::RepoAccess;
use crate::error::BackupError;
use crate::process;
use crate::progress::Meter;

/// A Borg repository, ready for commands.
pub struct Borg {
    name: String,
    url: String,
    base_dir: PathBuf,
    known_hosts: PathBuf,
    secrets: RamDir,
    has_key: bool,
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
    /// Prepares the driver; `state_dir` (under `--root`) holds borg's cache and the
    /// known_hosts file for ssh repositories.
    pub fn new(access: &RepoAccess, state_dir: &Path) -> Result<Borg, BackupError> {
        let secrets = RamDir::create(false)?;
        secrets.write("passphrase", access.password.as_bytes())?;
        let has_key = match &access.ssh_key {
            Some(key) => {
                secrets.write("ssh_key", key)?;
                true
            }
            None => false,
        };
        let base_dir = state_dir.join("borg");
        std::fs::create_dir_all(&base_dir).map_err(BackupError::io(&base_dir))?;
        Ok(Borg {
            name: access.repo.name.clone(),
            url: access.repo.url.clone(),
            base_dir,
            known_hosts: state_dir.join("ssh_known_hosts"),
            secrets,
            has_key,
        })
    }

    /// The repository's name in agex.toml.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `borg` command with the passphrase, ssh and state settings in its environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("borg");
        let pass = self.secrets.path().join("passphrase");
        cmd.env("BORG_PASSCOMMAND", format!("cat {}", shell_quote(&pass)))
            .env_remove("BORG_PASSPHRASE")
            .env_remove("BORG_PASSPHRASE_FD")
            .env("BORG_BASE_DIR", &self.base_dir)
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_DISPLAY_PASSPHRASE", "no")
            // A lock left by a dead borg process on this host is removed by borg itself
            // (with a warning in its log) instead of blocking every later run.
            .env("BORG_HOSTNAME_IS_UNIQUE", "yes")
            .env("BORG_EXIT_CODES", "legacy");
        let mut rsh = format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={} -o LogLevel=ERROR",
            shell_quote(&self.known_hosts)
        );
        if self.has_key {
            rsh.push_str(&format!(
                " -o IdentitiesOnly=yes -i {}",
                shell_quote(&self.secrets.path().join("ssh_key"))
            ));
        }
        cmd.env("BORG_RSH", rsh);
        // borg must not outlive agex: a borg left reading a named pipe whose writer died
        // would hold the repository lock forever. SIGTERM makes it exit cleanly.
        process::die_with_agex(&mut cmd);
        cmd
    }

    /// `borg init --encryption=repokey-blake2`.
    pub fn init(&self) -> Result<(), BackupError> {
        process::run(
            self.command()
                .args([
                    "init",
                    "--log-json",
                    "--encryption=repokey-blake2",
                    "--make-parent-dirs",
                ])
                .arg(&self.url),
        )?;
        Ok(())
    }

    /// Archives in the repository, oldest first; `prefix` filters by name.
    pub fn list(&self, prefix: Option<&str>) -> Result<Vec<ArchiveInfo>, BackupError> {
        let mut cmd = self.command();
        cmd.args(["list", "--json", "--log-json"]);
        if let Some(p) = prefix {
            cmd.arg("--glob-archives").arg(format!("{p}*"));
        }
        let out = process::run(cmd.arg(&self.url))?;
        let parsed: ListOutput =
            serde_json::from_slice(&out.stdout).map_err(|e| BackupError::Output {
                tool: "borg list".into(),
                detail: e.to_string(),
            })?;
        Ok(parsed.archives)
    }

    /// Deletes one archive (used to discard an archive whose dump failed).
    pub fn delete(&self, archive: &str) -> Result<(), BackupError> {
        process::run(
            self.command()
                .args(["delete", "--log-json"])
                .arg(format!("{}::{archive}", self.url)),
        )?;
        Ok(())
    }

    /// `borg check` of the repository and the archives' metadata; with `verify_data`,
    /// every chunk is read and authenticated too.
    pub fn check(&self, verify_data: bool) -> Result<(), BackupError> {
        let mut cmd = self.command();
        cmd.args(["check", "--log-json"]);
        if verify_data {
            cmd.arg("--verify-data");
        }
        process::run(cmd.arg(&self.url))?;
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
        let out = process::run(cmd.arg(&self.url))?;
        // `--list --log-json` reports each decision as a log line: "Pruning archive: …"
        // or "Would prune: …".
        let pruned = String::from_utf8_lossy(&out.stderr)
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
            .collect();
        if compact && !dry_run {
            process::run(
                self.command()
                    .args(["compact", "--log-json"])
                    .arg(&self.url),
            )?;
        }
        Ok(pruned)
    }

    /// Removes a stale lock left by a dead borg process.
    pub fn break_lock(&self) -> Result<(), BackupError> {
        process::run(
            self.command()
                .args(["break-lock", "--log-json"])
                .arg(&self.url),
        )?;
        Ok(())
    }

    /// The URL of an archive.
    pub fn archive_url(&self, archive: &str) -> String {
        format!("{}::{archive}", self.url)
    }
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

/// Quotes a path for the shell commands borg runs (`BORG_PASSCOMMAND`, `BORG_RSH`).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
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
