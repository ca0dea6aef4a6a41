//! The ssh plumbing shared by borg (`BORG_RSH`), the sftp backend and `agex repo trust`:
//! the private key and the pinned host keys live in anonymous in-memory files
//! (`memfd_create`) that have no name in any filesystem, so nothing is left behind when
//! agex is killed; ssh always checks host keys strictly.
//!
//! The descriptors are close-on-exec in agex and made inheritable only in the child that
//! needs them ([`SshAccess::inherit`]). ssh itself closes every inherited descriptor
//! above 2 when it starts, so it always reads them through its parent's `/proc` entry:
//! borg's (`/proc/$PPID/fd/N`, borg holds them while its ssh runs) or, for sftp, a
//! shell's that agex starts ssh from (`/proc/$$/fd/N`).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use agex_core::{Repository, SshEndpoint};
use rustix::fs::{MemfdFlags, Mode};

use crate::error::BackupError;

/// How a repository's ssh server is reached: where, with which key, trusting which keys.
pub struct SshAccess {
    repo: String,
    endpoint: SshEndpoint,
    key: Option<OwnedFd>,
    known_hosts: Option<OwnedFd>,
}

impl std::fmt::Debug for SshAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshAccess")
            .field("repo", &self.repo)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// An anonymous in-memory file holding `bytes`, mode 0600 (ssh refuses keys others
/// may read), close-on-exec.
fn memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

impl SshAccess {
    /// The ssh access of `repo`, or None when its URL is not reached over ssh.
    pub fn new(repo: &Repository, key: Option<&[u8]>) -> Result<Option<SshAccess>, BackupError> {
        let Some(endpoint) = repo.location.ssh() else {
            return Ok(None);
        };
        let io = |e: std::io::Error| BackupError::Io {
            path: format!("memfd for the ssh access of `{}`", repo.name).into(),
            source: e,
        };
        let key = key
            .map(|k| memfd("agex-ssh-key", k))
            .transpose()
            .map_err(io)?;
        let known_hosts = if repo.known_hosts.is_empty() {
            None
        } else {
            let mut text = repo.known_hosts.join("\n");
            text.push('\n');
            Some(memfd("agex-known-hosts", text.as_bytes()).map_err(io)?)
        };
        Ok(Some(SshAccess {
            repo: repo.name.clone(),
            endpoint: endpoint.clone(),
            key,
            known_hosts,
        }))
    }

    /// The server.
    pub fn endpoint(&self) -> &SshEndpoint {
        &self.endpoint
    }

    fn fds(&self) -> Vec<RawFd> {
        [&self.key, &self.known_hosts]
            .into_iter()
            .flatten()
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// Lets the child `cmd` starts (and only it) inherit the key and known_hosts files.
    pub fn inherit(&self, cmd: &mut Command) {
        let fds = self.fds();
        // SAFETY: the closure only calls fcntl(2), which is async-signal-safe, on
        // descriptors this SshAccess keeps open until the Command is spawned.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                Ok(())
            });
        }
    }

    /// ssh's options (before the destination), with the descriptors read below `fd_dir`.
    fn options(&self, fd_dir: &str) -> Vec<String> {
        let mut o: Vec<String> = [
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            "UpdateHostKeys=no",
            "CheckHostIP=no",
            "ControlMaster=no",
            "ControlPath=none",
            "ServerAliveInterval=15",
            "ServerAliveCountMax=4",
            "ConnectTimeout=30",
            "LogLevel=ERROR",
        ]
        .iter()
        .flat_map(|opt| ["-o".to_string(), opt.to_string()])
        .collect();
        if let Some(k) = &self.known_hosts {
            o.extend([
                "-o".into(),
                format!("UserKnownHostsFile={fd_dir}/{}", k.as_fd().as_raw_fd()),
                "-o".into(),
                "GlobalKnownHostsFile=/dev/null".into(),
            ]);
        }
        if let Some(k) = &self.key {
            o.extend([
                "-o".into(),
                "IdentitiesOnly=yes".into(),
                "-i".into(),
                format!("{fd_dir}/{}", k.as_fd().as_raw_fd()),
            ]);
        }
        o
    }

    /// `BORG_RSH` for a borg started with [`SshAccess::inherit`]. borg closes inherited
    /// descriptors before it runs ssh, so ssh reads them through borg's `/proc` entry;
    /// no secret and no configuration value appears in the shell text, only fd numbers.
    pub fn borg_rsh(&self) -> String {
        let opts = self.options("/proc/$PPID/fd").join(" ");
        format!("sh -c 'exec ssh {opts} \"$@\"' ssh")
    }

    /// `ssh … -s sftp` to the server. ssh closes every inherited descriptor above 2 when
    /// it starts, so a shell inherits the key and known_hosts files, stays ssh's parent
    /// while it runs, and ssh reads them through the shell's `/proc/$$/fd/N`.
    pub fn sftp_command(&self) -> Command {
        let opts = self.options("/proc/$$/fd").join(" ");
        let mut cmd = Command::new("sh");
        // `; exit $?` keeps the shell from replacing itself with ssh (and so closing them).
        cmd.arg("-c")
            .arg(format!("ssh {opts} \"$@\"; exit $?"))
            .arg("ssh");
        if let Some(p) = self.endpoint.port {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.endpoint.user {
            cmd.arg("-l").arg(u);
        }
        cmd.arg("-s").arg("--").arg(&self.endpoint.host).arg("sftp");
        self.inherit(&mut cmd);
        cmd
    }

    /// Words what ssh said about the server's host key for the user, naming the
    /// repository and the way to fix it; None when ssh failed for another reason.
    pub fn explain(&self, stderr: &str) -> Option<String> {
        explain_host_key(
            &self.repo,
            &self.endpoint,
            self.known_hosts.is_some(),
            stderr,
        )
    }

    /// For a tool (borg) that relays ssh's complaints only in part: when `stderr` looks
    /// like ssh gave up on the connection, asks the server for its keys and compares
    /// them with the trusted ones; Some(message) when none of them is trusted.
    pub fn diagnose(&self, pinned: &[String], stderr: &str) -> Option<String> {
        if let Some(m) = self.explain(stderr) {
            return Some(m);
        }
        let ssh_gave_up = [
            "@@@",
            "Host key",
            "host key",
            "Connection closed",
            "connection closed",
        ]
        .iter()
        .any(|p| stderr.contains(p));
        if !ssh_gave_up {
            return None;
        }
        let offered = scan(&self.endpoint).ok()?;
        let blob = |line: &str| line.split_whitespace().nth(2).map(str::to_string);
        let trusted = if pinned.is_empty() {
            user_knows(&self.endpoint)
        } else {
            let pinned: Vec<String> = pinned.iter().filter_map(|l| blob(l)).collect();
            offered
                .iter()
                .filter_map(|k| blob(&k.line))
                .any(|b| pinned.contains(&b))
        };
        if trusted {
            return None;
        }
        let said = if pinned.is_empty() {
            "Host key verification failed"
        } else {
            "REMOTE HOST IDENTIFICATION HAS CHANGED"
        };
        self.explain(said)
    }
}

/// Whether what ssh (or a tool relaying it) said is a failure of the network that may
/// go away by itself: a connection reset, refused or timed out, a server that stopped
/// answering. A refused host key or login, or a missing program on the server, is not.
pub fn network_failure(said: &str) -> bool {
    const NETWORK: &[&str] = &[
        "Connection reset",
        "Connection refused",
        "Connection timed out",
        "Operation timed out",
        "Broken pipe",
        "Network is unreachable",
        "No route to host",
        "kex_exchange_identification",
        "Temporary failure in name resolution",
        "not responding",
        "no answer from the server",
    ];
    NETWORK.iter().any(|p| said.contains(p)) && !refusal(said)
}

/// Whether what ssh (or a tool relaying it) said is a refusal: a host key not
/// trusted, a login refused, a program or path missing on the server.
pub fn refusal(said: &str) -> bool {
    const REFUSAL: &[&str] = &[
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key is known for",
        "Permission denied",
        "command not found",
        "No such file or directory",
    ];
    REFUSAL.iter().any(|p| said.contains(p))
}

/// See [`SshAccess::explain`].
pub fn explain_host_key(
    repo: &str,
    endpoint: &SshEndpoint,
    pinned: bool,
    stderr: &str,
) -> Option<String> {
    let name = endpoint.known_hosts_name();
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key for") && stderr.contains("has changed")
    {
        return Some(format!(
            "repository `{repo}`: the host key of {name} does not match the one {} (possible man-in-the-middle, or the server was rebuilt); if the change is expected, check the new fingerprint with the provider and run `agex repo trust {repo}`",
            if pinned { "pinned in agex.toml known_hosts" } else { "in ~/.ssh/known_hosts" }
        ));
    }
    if stderr.contains("Host key verification failed")
        || stderr.contains("No ") && stderr.contains("host key is known for")
    {
        return Some(format!(
            "repository `{repo}`: the server {name} is not trusted ({}); run `agex repo trust {repo}` to see its key fingerprints and pin them in agex.toml",
            if pinned { "no matching key in agex.toml known_hosts" } else { "agex.toml pins no known_hosts and ~/.ssh/known_hosts has no key for it" }
        ));
    }
    None
}

/// A server's host key as `ssh-keyscan` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedKey {
    /// The known_hosts line (`[host]:port type base64`).
    pub line: String,
    /// `SHA256:…` fingerprint, as ssh prints it.
    pub fingerprint: String,
    /// Key type (`ssh-ed25519`, …).
    pub kind: String,
}

/// Asks the server for its host keys (`ssh-keyscan`), for `agex repo trust`.
pub fn scan(endpoint: &SshEndpoint) -> Result<Vec<ScannedKey>, BackupError> {
    let mut cmd = Command::new("ssh-keyscan");
    cmd.args(["-T", "10"]);
    if let Some(p) = endpoint.port {
        cmd.arg("-p").arg(p.to_string());
    }
    cmd.arg("--").arg(&endpoint.host);
    let out = crate::process::run(&mut cmd)?;
    let name = endpoint.known_hosts_name();
    let mut keys = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(kind), Some(b64)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let Some(fp) = fingerprint(b64) else {
            continue;
        };
        keys.push(ScannedKey {
            line: format!("{name} {kind} {b64}"),
            fingerprint: fp,
            kind: kind.to_string(),
        });
    }
    keys.sort_by(|a, b| a.line.cmp(&b.line));
    keys.dedup();
    if keys.is_empty() {
        return Err(BackupError::Output {
            tool: "ssh-keyscan".into(),
            detail: format!(
                "{name} sent no host key: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(keys)
}

/// `SHA256:…` of a base64 public key blob, as `ssh-keygen -l` prints it.
pub fn fingerprint(b64: &str) -> Option<String> {
    use base64::Engine;
    use sha2::Digest;
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let digest = sha2::Sha256::digest(&blob);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

/// Whether the user's `~/.ssh/known_hosts` (the one ssh reads: the home directory
/// of the passwd entry, not `$HOME`) has a key for the server; for `agex check` on
/// repositories that pin none.
pub fn user_knows(endpoint: &SshEndpoint) -> bool {
    let mut cmd = Command::new("ssh-keygen");
    cmd.arg("-F").arg(endpoint.known_hosts_name());
    crate::process::output(&mut cmd, std::process::Stdio::null())
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_are_told_from_refusals() {
        for said in [
            "kex_exchange_identification: read: Connection reset by peer",
            "ssh: connect to host 127.0.0.1 port 2222: Connection refused",
            "Timeout, server 127.0.0.1 not responding.",
            "Remote: client_loop: send disconnect: Broken pipe",
        ] {
            assert!(network_failure(said), "{said}");
        }
        for said in [
            "Host key verification failed.\nConnection reset by peer",
            "u@127.0.0.1: Permission denied (publickey).",
            "Remote: sh: 1: borg: command not found",
            "passphrase supplied in BORG_PASSPHRASE_FD is incorrect",
        ] {
            assert!(!network_failure(said), "{said}");
        }
    }
}
