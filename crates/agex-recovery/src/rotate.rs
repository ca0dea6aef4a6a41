//! Repository password rotation. The order of the steps never leaves the repository
//! without a stored secret that opens it:
//!
//! - Restic: the new password is written to `<secret>.age.pending` (encrypted to the
//!   secret's recipients), added as a second key, verified by opening with it, stored
//!   in the secret, and only then is the old key removed.
//! - Borg has one passphrase per repository, so between `borg key change-passphrase`
//!   and storing the secret only the pending file opens it; that file exists from
//!   before the change until after the secret is stored, every agex command opening
//!   the repository meanwhile uses whichever of the two works ([`agex_backup::pending::during_rotation`]),
//!   and the next rotation finishes an interrupted one.

use std::path::Path;

use agex_core::{Generator, Project, SecretRule};
use agex_secrets::{secret_file, Identities};
use zeroize::Zeroizing;

use agex_backup::access::{self, RepoAccess};
use agex_backup::engine::{Engine, NewKey};
use agex_backup::error::BackupError;
use agex_backup::pending::{
    opens, password_rule, pending_password, pending_path, utf8, with_password,
};

/// A point of the rotation, reported to the caller as soon as it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The new password is in the pending file.
    Pending,
    /// Restic: the new key is in the repository next to the old one.
    KeyAdded,
    /// Borg: the repository's passphrase is the new one.
    Changed,
    /// The repository opens with the new password.
    Verified,
    /// The secret holds the new password (the pending file is gone).
    Stored,
    /// Restic: the old key is removed.
    OldKeyRemoved,
}

impl Step {
    /// What was done, for a person: `new password saved (pending)`, …
    pub fn describe(self) -> &'static str {
        match self {
            Step::Pending => "new password saved encrypted next to the secret (.pending)",
            Step::KeyAdded => "new key added to the repository beside the old one",
            Step::Changed => "repository passphrase changed",
            Step::Verified => "repository opens with the new password",
            Step::Stored => "new password stored in the secret",
            Step::OldKeyRemoved => "old key removed from the repository",
        }
    }

    /// The step's name (`AGEX_TEST_PAUSE_AT` takes these).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Pending => "pending",
            Step::KeyAdded => "added",
            Step::Changed => "changed",
            Step::Verified => "verified",
            Step::Stored => "stored",
            Step::OldKeyRemoved => "removed",
        }
    }
}

/// What a rotation did.
#[derive(Debug, Default)]
pub struct Rotated {
    /// An interrupted rotation that was finished first, if any.
    pub finished_interrupted: bool,
    /// Restic: the old key could not be removed (the new one works; remove it later).
    pub old_key_left: Option<String>,
}

fn store(project: &Project, rule: &SecretRule, password: &str) -> Result<(), BackupError> {
    let entry = secret_file::write(project, rule, password.as_bytes())?;
    // The lock is re-read: this project's copy may predate a step of this rotation.
    let lock_path = project.path(agex_core::project::LOCK_FILE);
    let mut lock = match std::fs::read_to_string(&lock_path) {
        Ok(text) => agex_core::Lock::parse(&agex_core::SourceFile::new(
            project.display(agex_core::project::LOCK_FILE),
            text,
        ))
        .map_err(|d| BackupError::Secrets(agex_core::ConfigError::Invalid(d).into()))?,
        Err(_) => project.lock.clone(),
    };
    lock.secrets.insert(rule.name.clone(), entry);
    lock.save(&lock_path).map_err(BackupError::io(&lock_path))
}

fn remove_pending(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BackupError::io(path)(e)),
    }
    if let Some(dir) = path.parent() {
        agex_core::atomic::sync_dir(dir).map_err(BackupError::io(dir))?;
    }
    Ok(())
}

/// Finishes an interrupted rotation: when the pending password opens the repository it
/// becomes the secret; when only the stored one does, the pending file is dropped.
/// Returns whether there was one.
pub fn settle(
    project: &Project,
    ids: &Identities,
    access: &RepoAccess,
    state: &Path,
) -> Result<bool, BackupError> {
    let rule = password_rule(project, access)?;
    let pending = pending_path(project, rule);
    if !pending.exists() {
        return Ok(false);
    }
    let shown = project.display(&rule.file);
    let text = pending_password(project, ids, rule, &pending)?;
    let candidate = with_password(access, &text);
    if opens(&candidate, state).is_ok() {
        store(project, rule, &text)?;
        remove_pending(&pending)?;
    } else if opens(access, state).is_ok() {
        remove_pending(&pending)?;
    } else {
        return Err(BackupError::Usage(format!(
            "repository `{}` opens neither with {} nor with {}; restore one from git history",
            access.repo.name,
            shown.display(),
            pending.display()
        )));
    }
    Ok(true)
}

/// Gives repository `name` a new password and stores it in its password secret;
/// `on_step` hears of each step as soon as it is done.
pub fn rotate(
    project: &Project,
    ids: &Identities,
    name: &str,
    state: &Path,
    on_step: &mut dyn FnMut(Step),
) -> Result<Rotated, BackupError> {
    let mut access = access::unlock(project, name, ids)?;
    let _lock = agex_backup::lock::acquire(
        state,
        name,
        std::time::Duration::from_secs(project.config.backup.lock_wait),
    )?;
    let mut out = Rotated::default();
    if settle(project, ids, &access, state)? {
        out.finished_interrupted = true;
        access = access::unlock(project, name, ids)?;
    }
    let rule = password_rule(project, &access)?;
    // The repository must open with the stored password before anything changes.
    opens(&access, state)?;
    let generator = match &rule.generator {
        Some(g @ Generator::Password { .. }) => g.clone(),
        _ => Generator::Password {
            length: 40,
            charset: agex_core::rules::Charset::Alphanumeric,
        },
    };
    let fresh = agex_secrets::generate::generate_value(&generator, name)?;
    let new = Zeroizing::new(utf8(&fresh.secret, name)?.to_string());
    let pending = pending_path(project, rule);
    let sealed = secret_file::seal(project, rule, new.as_bytes())?;
    agex_core::atomic::write_new_atomic(&pending, &sealed, 0o644)
        .map_err(BackupError::io(&pending))?;
    on_step(Step::Pending);
    let next = with_password(&access, &new);
    let added = Engine::open(&access, state)?.rotate_key(&new)?;
    on_step(match added {
        NewKey::Added { .. } => Step::KeyAdded,
        NewKey::Changed => Step::Changed,
    });
    let reopened = Engine::open_verified(&next, state)?;
    on_step(Step::Verified);
    store(project, rule, &new)?;
    remove_pending(&pending)?;
    on_step(Step::Stored);
    if let NewKey::Added { .. } = added {
        if let Err(e) = reopened.remove_old_key(added) {
            out.old_key_left = Some(e.to_string());
        }
        on_step(Step::OldKeyRemoved);
    }
    Ok(out)
}
