//! The Borg side: drives the `borg` binary with `--json`/`--log-json`. No secret reaches
//! borg through a named file: the passphrase goes through a pipe (`BORG_PASSPHRASE_FD`)
//! written before borg starts, the ssh key and pinned host keys through anonymous
//! in-memory files ([`crate::ssh`]), the env secret's variables through borg's
//! environment. What has no name cannot be left behind when agex is killed.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agex_core::Retention;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::access::RepoAccess;
use crate::engine::restic::Stream;
use crate::error::BackupError;
use crate::manifest::{Selection, SpecialEntry};
use crate::process;
use crate::progress::{Meter, Progress};
use crate::ssh::SshAccess;
use crate::tee::Completion;

/// How long a borg command other than `create` waits for the repository's or its cache's
/// lock. borg's own default (1 s) fails a command that meets a borg just ending: one that
/// got SIGTERM when the agex that started it was killed still holds its locks while it
/// cleans up. Agex's own runs never meet each other here (they hold agex's lock first).
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

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
        // Given before the subcommand: `create` gives its own after it, which borg
        // lets win, so the policy's `[backup] lock_wait` still rules the backup itself.
        cmd.arg(format!("--lock-wait={}", LOCK_WAIT.as_secs()));
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

    /// `borg key change-passphrase` to `new`.
    pub fn change_passphrase(&self, new: &str) -> Result<(), BackupError> {
        let mut cmd = self.command();
        // borg 1.2 reads a new passphrase only from BORG_NEW_PASSPHRASE, BORG_PASSPHRASE
        // or a terminal; an environment variable (readable only by this user) is
        // the one way that keeps it out of argv.
        cmd.env("BORG_NEW_PASSPHRASE", new)
            .args(["key", "change-passphrase", "--log-json"])
            .arg(&self.url);
        process::run(&mut cmd)?;
        Ok(())
    }

    /// `borg extract` of `archive` in `dest`; with progress, its `--progress` JSON feeds
    /// a meter, made in `meter` when borg first says its total.
    pub fn extract(
        &self,
        archive: &str,
        dest: &Path,
        progress: Option<(&Arc<dyn Progress>, &str)>,
        meter: &mut Option<Arc<Meter>>,
    ) -> Result<(), BackupError> {
        let mut cmd = self.command();
        cmd.current_dir(dest).args(["extract", "--log-json"]);
        if progress.is_some() {
            cmd.arg("--progress");
        }
        cmd.arg(self.archive_url(archive));
        let shown = process::describe(&cmd);
        let mut child = process::start(
            &mut cmd,
            std::process::Stdio::null(),
            std::process::Stdio::null(),
            std::process::Stdio::piped(),
        )?;
        let mut stderr = String::new();
        if let Some(pipe) = child.stderr.take() {
            stderr = read_log(pipe, |p| match (p, progress) {
                (LogProgress::Percent { current, total }, Some((sink, service))) => {
                    let m = meter.get_or_insert_with(|| {
                        let m = Meter::start(Arc::clone(sink), service, &self.name);
                        m.set_total(total, 0);
                        m
                    });
                    m.set(current, 0);
                    true
                }
                _ => false,
            });
        }
        let status = child.wait().map_err(|source| BackupError::Spawn {
            tool: shown.clone(),
            source,
        })?;
        process::check(
            &shown,
            std::process::Output {
                status,
                stdout: vec![],
                stderr: stderr.into_bytes(),
            },
        )
        .map(|_| ())
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

/// A progress line of borg's `--log-json` stderr (from `--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogProgress {
    /// `archive_progress` (`borg create`): what the archive holds so far.
    Archive {
        /// Original bytes read.
        bytes: Option<u64>,
        /// Files read.
        files: Option<u64>,
    },
    /// `progress_percent` (`borg extract`): how far through its total borg is.
    Percent {
        /// Done so far.
        current: u64,
        /// The total.
        total: u64,
    },
}

/// Reads borg's `--log-json` stderr to its end: each progress line goes to `progress`,
/// which says whether it used it; every other line is returned, for error messages.
pub fn read_log(
    stderr: impl std::io::Read,
    mut progress: impl FnMut(LogProgress) -> bool,
) -> String {
    use std::io::BufRead;
    let mut kept = String::new();
    for line in std::io::BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        if let Some(p) = progress_line(&line) {
            if progress(p) {
                continue;
            }
        }
        kept.push_str(&line);
        kept.push('\n');
    }
    kept
}

fn progress_line(line: &str) -> Option<LogProgress> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let number = |key: &str| v.get(key).and_then(|x| x.as_u64());
    match v.get("type")?.as_str()? {
        "archive_progress" => Some(LogProgress::Archive {
            bytes: number("original_size"),
            files: number("nfiles"),
        }),
        "progress_percent" => Some(LogProgress::Percent {
            current: number("current").unwrap_or(0),
            total: number("total").unwrap_or(0),
        }),
        _ => None,
    }
}

/// `borg create`'s log: its progress moves `meter`, and every line of it says borg is at
/// work (to the tees that wait for it, [`Completion::active`]).
fn read_create_log(
    stderr: impl std::io::Read,
    meter: Option<&Meter>,
    complete: &Completion,
) -> String {
    read_log(stderr, |p| {
        complete.active();
        match p {
            LogProgress::Archive { bytes, files } => {
                if let (Some(m), Some(bytes), Some(files)) = (meter, bytes, files) {
                    m.set(bytes, files);
                }
                true
            }
            LogProgress::Percent { .. } => false,
        }
    })
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

/// A `borg create` that failed, with its streams when borg never opened any of them (it
/// gave up on the repository lock, or lost its connection, first), so they can go to
/// another attempt.
pub type CreateFailure = (BackupError, Option<Vec<Stream>>);

/// What one `borg create` archives besides its streams.
pub struct Create<'a> {
    /// `--root`: the paths are read below it, the pipes made below it.
    pub root: &'a Path,
    /// The policy's paths and excludes.
    pub selection: &'a Selection,
    /// Fifos and devices among the paths, kept away from borg.
    pub specials: &'a [SpecialEntry],
    /// The archive's name.
    pub archive: &'a str,
    /// How long borg waits for the repository lock.
    pub lock_wait: Duration,
}

impl Borg {
    /// Writes one archive of `what`'s paths plus `streams`; returns its name and the bytes
    /// it added. Borg reads each stream (dumps, manifest) from a named pipe at its place
    /// under the dumps directory, so the archive holds them at the same paths as the
    /// Restic snapshot does. Borg is given its paths and pipes in path order, the order
    /// the Restic side reads them too, so the two meet each dump at about the same time.
    /// A borg that `complete` says the run left behind is stopped.
    pub fn create(
        &self,
        what: &Create<'_>,
        streams: Vec<Stream>,
        complete: &Completion,
        meter: Option<&Arc<Meter>>,
    ) -> Result<(String, Option<u64>), CreateFailure> {
        let (selection, archive) = (what.selection, what.archive);
        let mut args: Vec<PathBuf> = selection.paths().iter().map(|p| rel(p)).collect();
        let mut fifos = Vec::new();
        let fail = |fifos: &[PathBuf], e: BackupError, streams: Vec<Stream>| {
            cleanup_fifos(fifos);
            Err((e, Some(streams)))
        };
        // The pipes' directories are held open and the pipes made, fed and removed through
        // them: a symlink swapped into the dumps directory's parents cannot send a dump, or
        // a removal, anywhere else.
        let mut held = Vec::new();
        for stream in &streams {
            let path = &stream.path;
            let (dir, name) = match agex_core::beneath::parent_of(what.root, path, Some(0o755)) {
                Ok(d) => d,
                Err(e) => return fail(&fifos, e.into(), streams),
            };
            if let Err(e) = dir.make_fifo(name, 0o600) {
                return fail(&fifos, e.into(), streams);
            }
            let fifo = dir.handle_path().join(name);
            held.push(dir);
            args.push(rel(path));
            crate::cancel::fifo_made(fifo.clone());
            fifos.push(fifo);
        }
        // Borg reads the manifest last, after every file (crate::manifest_stream); the rest
        // in path order, the order the Restic side reads them too, so the two meet each dump
        // at about the same time.
        let manifest_arg = args.pop();
        args.sort();
        args.extend(manifest_arg);
        let mut cmd = self.create_command(what, &args);
        let shown = process::describe(&cmd);
        let child = process::start(
            &mut cmd,
            std::process::Stdio::null(),
            std::process::Stdio::piped(),
            std::process::Stdio::piped(),
        );
        let mut child = match child {
            Ok(c) => {
                crate::cancel::child_started(c.id());
                c
            }
            Err(e) => return fail(&fifos, e, streams),
        };
        let pid = child.id();
        let borg_done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = streams
            .into_iter()
            .zip(fifos.iter().cloned())
            .map(|(stream, fifo)| {
                let done = Arc::clone(&borg_done);
                std::thread::spawn(move || feed_fifo(&fifo, stream, pid, &done))
            })
            .collect();
        // stderr is read as it comes: borg's progress lines move the meter, the rest is kept
        // for the error message.
        let log = child.stderr.take().map(|e| {
            let (meter, complete) = (meter.cloned(), complete.clone());
            std::thread::spawn(move || read_create_log(e, meter.as_deref(), &complete))
        });
        // A borg the dumps left behind (it took nothing for the stall timeout: its server
        // hangs, say) is stopped: it would hold this run, and its lock, however long.
        let watch = {
            let (done, complete) = (Arc::clone(&borg_done), complete.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if complete.left_behind() {
                        stop_borg(pid, &done);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let out = child.wait_with_output();
        crate::cancel::child_done(pid);
        let log = log.and_then(|t| t.join().ok()).unwrap_or_default();
        borg_done.store(true, Ordering::SeqCst);
        let _ = watch.join();
        let unread: Option<Vec<Stream>> = writers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect();
        cleanup_fifos(&fifos);
        let mut out = out.map_err(|source| {
            (
                BackupError::Spawn {
                    tool: shown.clone(),
                    source,
                },
                None,
            )
        })?;
        out.stderr = log.into_bytes();
        // borg exits 1 for warnings (e.g. a file changed while read): the archive exists.
        if !(out.status.success() || out.status.code() == Some(1)) {
            if lock_timed_out(&String::from_utf8_lossy(&out.stderr)) {
                let locked = BackupError::Locked {
                    repo: self.name.clone(),
                    message: process::tail(&String::from_utf8_lossy(&out.stderr)),
                };
                return Err((locked, unread));
            }
            return Err(match process::check(&shown, out) {
                Err(e) => (self.explain(e), unread),
                Ok(_) => (
                    BackupError::Output {
                        tool: shown,
                        detail: "failed without an error".into(),
                    },
                    None,
                ),
            });
        }
        let stats = parse_create_stats(&out.stdout).map_err(|e| (e, None))?;
        Ok((archive.to_string(), Some(stats.deduplicated_size)))
    }

    /// The `borg create` of `what` with its paths and pipes (`args`, relative to the
    /// root). With `--progress`, borg reports at work every 0.2 s (a meter shows it, a
    /// tee waiting for borg knows it is not stuck).
    fn create_command(&self, what: &Create<'_>, args: &[PathBuf]) -> std::process::Command {
        let mut cmd = self.command();
        cmd.current_dir(what.root).args([
            "create",
            "--json",
            "--log-json",
            "--compression",
            "zstd,3",
            "--read-special",
            "--progress",
            "--lock-wait",
        ]);
        cmd.arg(what.lock_wait.as_secs().to_string());
        for e in what.selection.excludes() {
            cmd.arg("--exclude")
                .arg(format!("sh:{}", rel(Path::new(e)).display()));
        }
        // `--read-special` (for agex's own pipes) would open a fifo or device of the paths
        // and read it as content, or wait on it forever: borg is kept away from them (the
        // Restic side stores them as what they are). Sockets borg skips by itself.
        for special in what.specials {
            let mut pattern = std::ffi::OsString::from("pf:");
            pattern.push(rel(special.path.as_path()));
            cmd.arg("--exclude").arg(pattern);
        }
        cmd.arg(self.archive_url(what.archive));
        cmd.args(args);
        cmd
    }
}

fn cleanup_fifos(fifos: &[PathBuf]) {
    for f in fifos {
        let _ = std::fs::remove_file(f);
        crate::cancel::fifo_removed(f);
    }
}

/// Copies a stream into its named pipe once borg opens it; returns the stream untouched
/// if borg exited without opening the pipe. If the stream fails (its dump broke off),
/// borg is stopped while the pipe is still open, so it never sees an end and never
/// commits an archive with a torn dump. A write to a pipe borg closed fails with EPIPE
/// (SIGPIPE is ignored by the backup commands), never kills the process.
fn feed_fifo(fifo: &Path, stream: Stream, borg: u32, borg_done: &AtomicBool) -> Option<Stream> {
    let file = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(fifo)
        {
            Ok(f) => break f,
            Err(_) if !borg_done.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return Some(stream),
        }
    };
    if rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty()).is_err() {
        return None;
    }
    let mut file = file;
    let mut reader = stream.reader;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                if file.write_all(&buf[..n]).is_err() {
                    return None;
                }
            }
            Err(_) => {
                stop_borg(borg, borg_done);
                return None;
            }
        }
    }
}

/// Stops borg with SIGTERM (it exits without committing) and waits until it is gone;
/// SIGKILL after 10 s (a borg whose server hangs may hang in its own cleanup).
fn stop_borg(pid: u32, borg_done: &AtomicBool) {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !borg_done.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rel(p: &Path) -> PathBuf {
    p.strip_prefix("/").unwrap_or(p).to_path_buf()
}
