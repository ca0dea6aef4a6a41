//! A repository's credentials, decrypted in memory from its age secrets.

use agex_core::{Project, Repository};
use agex_secrets::{secret_file, Identities};
use zeroize::Zeroizing;

use crate::error::BackupError;

/// What it takes to open one repository: its config, password and optional ssh key.
pub struct RepoAccess {
    /// The repository's entry in agex.toml.
    pub repo: Repository,
    /// The repository password (never written to a persistent disk).
    pub password: Zeroizing<String>,
    /// The private key for ssh access, if the repository names one.
    pub ssh_key: Option<Zeroizing<Vec<u8>>>,
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

/// Decrypts the password (and ssh key) of a repository with `ids`.
pub fn unlock(project: &Project, name: &str, ids: &Identities) -> Result<RepoAccess, BackupError> {
    let repo = repository(project, name)?.clone();
    let secret = |secret_name: &str| -> Result<Zeroizing<Vec<u8>>, BackupError> {
        let rule = project.rules.secrets.get(secret_name).ok_or_else(|| {
            BackupError::Secrets(agex_secrets::SecretsError::Invalid {
                name: secret_name.to_string(),
                reason: "has no rule in secrets.toml".into(),
            })
        })?;
        Ok(secret_file::open(project, rule, ids)?)
    };
    let raw = secret(repo.password_secret.get_ref())?;
    let text = String::from_utf8(raw.to_vec()).map_err(|_| {
        BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: repo.password_secret.get_ref().clone(),
            reason: "a repository password must be UTF-8 text".into(),
        })
    })?;
    let password = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    drop(Zeroizing::new(text));
    let ssh_key = match &repo.ssh_key_secret {
        Some(k) => Some(secret(k.get_ref())?),
        None => None,
    };
    // An interrupted password rotation may have left the repository on the new
    // password, which only the pending file holds.
    crate::rotate::during_rotation(
        project,
        ids,
        RepoAccess {
            repo,
            password,
            ssh_key,
        },
    )
}
