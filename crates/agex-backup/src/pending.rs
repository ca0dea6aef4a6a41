//! A password rotation's pending file (`<secret>.age.pending`), read by every command
//! that opens a repository: while a rotation is unfinished the repository may already
//! take only the new password ([`during_rotation`]). The rotation itself is
//! `agex_recovery::rotate`.

use std::path::{Path, PathBuf};

use agex_core::{Project, SecretRule};
use agex_secrets::Identities;
use zeroize::Zeroizing;

use crate::access::RepoAccess;
use crate::engine::Engine;
use crate::error::BackupError;

/// The file holding a rotation's new password until the secret holds it.
pub fn pending_path(project: &Project, rule: &SecretRule) -> PathBuf {
    let mut p = project.path(&rule.file).into_os_string();
    p.push(".pending");
    PathBuf::from(p)
}

pub fn password_rule<'a>(
    project: &'a Project,
    access: &RepoAccess,
) -> Result<&'a SecretRule, BackupError> {
    let name = access.repo.password_secret.get_ref();
    project.rules.secrets.get(name).ok_or_else(|| {
        BackupError::Usage(format!(
            "password_secret `{name}` has no rule in secrets.toml"
        ))
    })
}

pub fn with_password(access: &RepoAccess, password: &str) -> RepoAccess {
    RepoAccess {
        repo: access.repo.clone(),
        password: Zeroizing::new(password.to_string()),
        ssh_key: access.ssh_key.clone(),
        env: access.env.clone(),
        retries: std::sync::Arc::clone(&access.retries),
    }
}

/// Whether the repository opens with `access`'s password.
pub fn opens(access: &RepoAccess, state: &Path) -> Result<(), BackupError> {
    Engine::open_verified(access, state).map(|_| ())
}

/// The plaintext of a rotation's pending file.
pub fn pending_password(
    project: &Project,
    ids: &Identities,
    rule: &SecretRule,
    pending: &Path,
) -> Result<Zeroizing<String>, BackupError> {
    let bytes = std::fs::read(pending).map_err(BackupError::io(pending))?;
    let shown = project.display(&rule.file);
    let plain = agex_secrets::crypt::decrypt(&shown, &bytes, ids, &rule.recipients)?;
    Ok(Zeroizing::new(
        utf8(&plain, &rule.name)?.trim_end().to_string(),
    ))
}

/// While a rotation is unfinished (its pending file exists), the repository may already
/// take only the new password: use whichever of the two opens it. Nothing is written;
/// without a pending file this costs nothing.
pub fn during_rotation(
    project: &Project,
    ids: &Identities,
    access: RepoAccess,
) -> Result<RepoAccess, BackupError> {
    let Some(rule) = project
        .rules
        .secrets
        .get(access.repo.password_secret.get_ref())
    else {
        return Ok(access);
    };
    let pending = pending_path(project, rule);
    if !pending.exists() {
        return Ok(access);
    }
    // Probes get their own borg state: the caller's root is not known here.
    let probe = tempfile::tempdir().map_err(BackupError::io(std::env::temp_dir()))?;
    if opens(&access, probe.path()).is_ok() {
        return Ok(access);
    }
    let Ok(text) = pending_password(project, ids, rule, &pending) else {
        return Ok(access);
    };
    let candidate = with_password(&access, &text);
    if opens(&candidate, probe.path()).is_ok() {
        Ok(candidate)
    } else {
        Ok(access)
    }
}

/// A password as text, borrowed: a lossy conversion would make an unwiped copy of
/// invalid input, and an error would carry it.
pub fn utf8<'a>(bytes: &'a [u8], name: &str) -> Result<&'a str, BackupError> {
    std::str::from_utf8(bytes).map_err(|_| {
        BackupError::Secrets(agex_secrets::SecretsError::Invalid {
            name: name.to_string(),
            reason: "a repository password must be UTF-8 text".into(),
        })
    })
}
