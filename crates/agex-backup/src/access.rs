//! A repository's credentials, decrypted in memory from its age secrets.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use agex_core::{Project, Repository};
use agex_secrets::{secret_file, Identities};
use zeroize::Zeroizing;

use crate::error::BackupError;

/// What it takes to open one repository: its config, password and optional ssh key.
#[derive(Clone)]
pub struct RepoAccess {
    /// The repository's entry in agex.toml.
    pub repo: Repository,
    /// The repository password (never written to a persistent disk).
    pub password: Zeroizing<String>,
    /// The private key for ssh access, if the repository names one.
    pub ssh_key: Option<Zeroizing<Vec<u8>>>,
    /// The `KEY=VALUE` lines of the repository's `env_secret`, in order.
    pub env: Vec<(String, Zeroizing<String>)>,
    /// Transient storage errors retried so far through this access (see
    /// [`crate::backend`]); shared by every backend opened with it.
    pub retries: Arc<AtomicU64>,
}

/// Longest repository password agex hands to borg through a pipe (a pipe under memory
/// pressure holds one page; the write must never block).
pub const MAX_PASSWORD_LEN: usize = 4096;

/// Reads an env secret: `KEY=VALUE` lines, `#` comments and blank lines ignored, an
/// optional `export ` and matching quotes around the value removed. Errors name the
/// secret and the line, never a value.
pub fn parse_env(
    secret: &str,
    text: &[u8],
) -> Result<Vec<(String, Zeroizing<String>)>, BackupError> {
    let invalid = |reason: String| {
        BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: secret.to_string(),
            reason,
        })
    };
    let text = std::str::from_utf8(text)
        .map_err(|_| invalid("an env secret must be UTF-8 text of KEY=VALUE lines".into()))?;
    let mut out: Vec<(String, Zeroizing<String>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(invalid(format!("line {} is not KEY=VALUE", n + 1)));
        };
        let key = key.trim();
        let key_ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(invalid(format!(
                "line {}: `{key}` is not a variable name (letters, digits, _)",
                n + 1
            )));
        }
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        out.retain(|(k, _)| k != key);
        out.push((key.to_string(), Zeroizing::new(value.to_string())));
    }
    Ok(out)
}

impl RepoAccess {
    /// The env secret's value of `key`, if it has one.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Debug for RepoAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoAccess")
            .field("repo", &self.repo.name)
            .finish_non_exhaustive()
    }
}

/// The repository named `name`, or a clear error listing the known ones.
pub fn repository<'a>(project: &'a Project, name: &str) -> Result<&'a Repository, BackupError> {
    project
        .config
        .repositories
        .get(name)
        .ok_or_else(|| BackupError::UnknownRepository {
            name: name.to_string(),
            known: project
                .config
                .repositories
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The policy of service `name`, or a clear error listing the services that have one.
pub fn policy<'a>(project: &'a Project, name: &str) -> Result<&'a agex_core::Policy, BackupError> {
    project
        .policies
        .get(name)
        .ok_or_else(|| BackupError::UnknownService {
            name: name.to_string(),
            known: project
                .policies
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Decrypts secret `name` with `ids`.
fn open_secret(
    project: &Project,
    name: &str,
    ids: &Identities,
) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let rule = project.rules.secrets.get(name).ok_or_else(|| {
        BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: name.to_string(),
            reason: "has no rule in secrets.toml".into(),
        })
    })?;
    Ok(secret_file::open(project, rule, ids)?)
}

/// The `KEY=VALUE` lines of `repo`'s env secret, decrypted with `ids` (none without one).
pub fn env_lines(
    project: &Project,
    repo: &Repository,
    ids: &Identities,
) -> Result<Vec<(String, Zeroizing<String>)>, BackupError> {
    match &repo.env_secret {
        Some(e) => parse_env(e.get_ref(), &open_secret(project, e.get_ref(), ids)?),
        None => Ok(Vec::new()),
    }
}

/// Decrypts the password (and ssh key) of a repository with `ids`.
pub fn unlock(project: &Project, name: &str, ids: &Identities) -> Result<RepoAccess, BackupError> {
    let repo = repository(project, name)?.clone();
    let secret = |secret_name: &str| open_secret(project, secret_name, ids);
    let raw = secret(repo.password_secret.get_ref())?;
    // Borrowed, not copied: a `FromUtf8Error` would carry the bytes away unwiped.
    let text = std::str::from_utf8(&raw).map_err(|_| {
        BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: repo.password_secret.get_ref().clone(),
            reason: "a repository password must be UTF-8 text".into(),
        })
    })?;
    let password = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if password.len() > MAX_PASSWORD_LEN {
        return Err(BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: repo.password_secret.get_ref().clone(),
            reason: format!("a repository password is limited to {MAX_PASSWORD_LEN} bytes"),
        }));
    }
    let ssh_key = match &repo.ssh_key_secret {
        Some(k) => Some(secret(k.get_ref())?),
        None => None,
    };
    let env = env_lines(project, &repo, ids)?;
    // An interrupted password rotation may have left the repository on the new
    // password, which only the pending file holds.
    crate::pending::during_rotation(
        project,
        ids,
        RepoAccess {
            repo,
            password,
            ssh_key,
            env,
            retries: Arc::default(),
        },
    )
}

/// Each named repository's credentials, or why they did not open.
pub type Unlocked = BTreeMap<String, Result<RepoAccess, BackupError>>;

/// Decrypts the credentials of each named repository; a repository whose secrets fail
/// to open is reported, not fatal, so the other can still run.
pub fn unlock_all(project: &Project, ids: &Identities, names: &[String]) -> Unlocked {
    names
        .iter()
        .map(|n| (n.clone(), unlock(project, n, ids)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_secret_lines() {
        let env = parse_env(
            "creds",
            b"# B2\nexport AWS_ACCESS_KEY_ID=AKID\nAWS_SECRET_ACCESS_KEY=\"s=cret\"\n\nAWS_ACCESS_KEY_ID=AKID2\n",
        )
        .unwrap();
        let shown: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            shown,
            vec![
                ("AWS_SECRET_ACCESS_KEY", "s=cret"),
                ("AWS_ACCESS_KEY_ID", "AKID2")
            ]
        );
        let e = parse_env("creds", b"A=1\nnot a line with secret\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && !e.contains("secret\n"), "{e}");
        assert!(parse_env("creds", b"1X=2\n").is_err());
    }
}
