//! A rebuilt host has a new key: replace it in `agex.toml` (comments and layout kept)
//! and re-encrypt exactly the secrets whose rules reach that host — every one decrypted,
//! re-encrypted and verified before any file is replaced, as in `agex rekey`. The
//! configuration is written last, so an interrupted run leaves the old key in
//! `agex.toml` and running the same command again finishes it.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agex_core::project::{CONFIG_FILE, RULES_FILE};
use agex_core::{Config, Project, RecipientKey, Rules, SourceFile};

use crate::error::SecretsError;
use crate::identity::Identities;
use crate::rekey::{self, RekeyOptions, RekeyOutcome, RekeyPlan};

/// A host rekey, planned: the new configuration text and the secrets to re-encrypt.
/// Building it changes nothing.
pub struct HostRekeyPlan {
    /// The host.
    pub host: String,
    /// Its key now.
    pub old_key: RecipientKey,
    /// Its new key.
    pub new_key: RecipientKey,
    /// `agex.toml` with the new key, as it will be written.
    pub config_text: String,
    /// The configuration as it will be after the rekey.
    pub project: Project,
    /// The secrets to re-encrypt (every secret whose rule reaches the host).
    pub rekey: RekeyPlan,
}

/// Plans replacing `host`'s key with `new_key` (a public key line, comment allowed).
pub fn plan(project: &Project, host: &str, new_key: &str) -> Result<HostRekeyPlan, SecretsError> {
    let err = |reason: String| SecretsError::HostKey {
        host: host.to_string(),
        reason,
    };
    let old = project.config.hosts.get(host).ok_or_else(|| {
        err(format!(
            "is not a host in agex.toml (hosts: {})",
            project
                .config
                .hosts
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let key: RecipientKey = new_key
        .parse()
        .map_err(|e| err(format!("the new key is unusable: {e}")))?;
    let config_path = project.path(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(SecretsError::io(project.display(CONFIG_FILE)))?;
    let config_text =
        replace_key(&text, host, key.as_str()).map_err(|source| SecretsError::HostConfig {
            host: host.to_string(),
            source,
        })?;
    let config = Config::parse(SourceFile::new(project.display(CONFIG_FILE), &*config_text))
        .map_err(|d| SecretsError::Config(agex_core::ConfigError::Invalid(d)))?;
    let rules_text = std::fs::read_to_string(project.path(RULES_FILE))
        .map_err(SecretsError::io(project.display(RULES_FILE)))?;
    let rules = Rules::parse(
        SourceFile::new(project.display(RULES_FILE), rules_text),
        &config,
    )
    .map_err(|d| SecretsError::Config(agex_core::ConfigError::Invalid(d)))?;
    let next = Project {
        dir: project.dir.clone(),
        config,
        rules,
        lock: project.lock.clone(),
        policies: project.policies.clone(),
        cwd: project.cwd.clone(),
    };
    let rekey = rekey::plan(
        &next,
        &RekeyOptions {
            force: true,
            host: Some(host.to_string()),
            only: BTreeSet::new(),
        },
    )?;
    Ok(HostRekeyPlan {
        host: host.to_string(),
        old_key: old.key.clone(),
        new_key: key,
        config_text,
        project: next,
        rekey,
    })
}

/// Why `agex.toml` cannot take a host's new key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigEditError {
    /// The file is not TOML (boxed: toml_edit's error is large).
    #[error("agex.toml does not parse: {0}")]
    Parse(#[source] Box<toml_edit::TomlError>),
    /// No `[hosts]`.
    #[error("agex.toml has no [hosts] table")]
    NoHosts,
    /// No `[hosts.NAME]`.
    #[error("agex.toml has no [hosts.{0}] table")]
    NoHost(String),
    /// The host has no `key`.
    #[error("[hosts.{0}] has no `key`")]
    NoKey(String),
    /// The host's `key` is a table or an array.
    #[error("[hosts.{0}] key is not a string")]
    KeyNotValue(String),
}

/// `agex.toml`'s text with `hosts.<host>.key` set to `key`; every comment, blank line
/// and the value's own trailing comment stay where they were.
pub fn replace_key(text: &str, host: &str, key: &str) -> Result<String, ConfigEditError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| ConfigEditError::Parse(Box::new(e)))?;
    let hosts = doc
        .get_mut("hosts")
        .and_then(|h| h.as_table_like_mut())
        .ok_or(ConfigEditError::NoHosts)?;
    let entry = hosts
        .get_mut(host)
        .and_then(|h| h.as_table_like_mut())
        .ok_or_else(|| ConfigEditError::NoHost(host.to_string()))?;
    let slot = entry
        .get_mut("key")
        .ok_or_else(|| ConfigEditError::NoKey(host.to_string()))?;
    let value = slot
        .as_value_mut()
        .ok_or_else(|| ConfigEditError::KeyNotValue(host.to_string()))?;
    let decor = value.decor().clone();
    *value = toml_edit::Value::from(key);
    *value.decor_mut() = decor;
    Ok(doc.to_string())
}

/// Re-encrypts the planned secrets (all verified before any is replaced; the lock is
/// updated), then writes `agex.toml` atomically. A failure before the files are
/// replaced changes nothing.
pub fn execute(plan: &HostRekeyPlan, ids: &Identities) -> Result<RekeyOutcome, SecretsError> {
    let outcome = rekey::execute(&plan.project, &plan.rekey, ids)?;
    let path = plan.project.path(CONFIG_FILE);
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    agex_core::atomic::write_atomic(&path, plan.config_text.as_bytes(), mode)
        .map_err(SecretsError::io(plan.project.display(CONFIG_FILE)))?;
    Ok(outcome)
}

/// The `SHA256:…` fingerprint of an ssh public key line, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &str) -> Option<String> {
    key.parse::<RecipientKey>().ok().map(|k| k.fingerprint())
}

/// The ed25519 host key of `target` (`HOST` or `HOST:PORT`), fetched with `ssh-keyscan`.
pub fn keyscan(target: &str) -> Result<String, SecretsError> {
    let fail = |reason: String| SecretsError::Keyscan {
        target: target.to_string(),
        reason,
    };
    let (host, port) = match target.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| fail(format!("`{p}` is not a port number")))?,
            ),
        ),
        _ => (target, None),
    };
    let mut cmd = Command::new("ssh-keyscan");
    cmd.args(["-t", "ed25519", "-T", "10"]);
    if let Some(p) = port {
        cmd.arg("-p").arg(p.to_string());
    }
    cmd.arg(host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .map_err(|e| fail(format!("cannot run ssh-keyscan: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let _host = parts.next()?;
            let kind = parts.next()?;
            let body = parts.next()?;
            (kind == "ssh-ed25519").then(|| format!("{kind} {body}"))
        })
        .next()
        .ok_or_else(|| {
            // ssh-keyscan says nothing when it cannot connect: find out why ourselves.
            if let Err(why) = reachable(host, port.unwrap_or(22)) {
                return fail(why.to_string());
            }
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            fail(if err.is_empty() {
                "the server offered no ssh-ed25519 host key".into()
            } else {
                format!("the server offered no ssh-ed25519 host key ({err})")
            })
        })
}

/// Why a TCP connection to an ssh server did not open.
#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {host} port {port}: connection refused (is sshd running there?)")]
    Refused { host: String, port: u16 },
    #[error("cannot connect to {host} port {port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

/// Whether a TCP connection to `host:port` opens, else why not (`connection refused`).
fn reachable(host: &str, port: u16) -> Result<(), Unreachable> {
    use std::net::{TcpStream, ToSocketAddrs};
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|source| Unreachable::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, std::time::Duration::from_secs(10)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let host = host.to_string();
    Err(match last {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Unreachable::Refused { host, port }
        }
        Some(source) => Unreachable::Connect { host, port, source },
        None => Unreachable::NoAddress(host),
    })
}

/// Reads a public key file (`.pub`): its first non-comment line.
pub fn read_key_file(path: &Path) -> Result<String, SecretsError> {
    let text = std::fs::read_to_string(path).map_err(SecretsError::io(PathBuf::from(path)))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| {
            SecretsError::io(PathBuf::from(path))(std::io::Error::other(
                "the file holds no public key",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_key_keeps_comments_and_layout() {
        let text = "# top\n[keys]\nadmin = \"age1x\"   # note\n\n[hosts.bunk]\nkey      = \"ssh-ed25519 OLD root@bunk\"  # the host\nidentity = \"/etc/ssh/k\"\n";
        let out = replace_key(text, "bunk", "ssh-ed25519 NEW").unwrap();
        assert_eq!(
            out,
            "# top\n[keys]\nadmin = \"age1x\"   # note\n\n[hosts.bunk]\nkey      = \"ssh-ed25519 NEW\"  # the host\nidentity = \"/etc/ssh/k\"\n"
        );
        assert!(replace_key(text, "other", "x").is_err());
    }
}
