//! Reading and writing one secret's `.age` file, and the lock entry that records it.

use std::fs;
use std::path::{Path, PathBuf};

use agex_core::{LockEntry, Project, SecretRule};

use crate::crypt::{self, Plaintext, Sealer};
use crate::error::SecretsError;
use crate::header::Header;
use crate::identity::Identities;

/// Decrypts a secret's file.
pub fn open(
    project: &Project,
    rule: &SecretRule,
    ids: &Identities,
) -> Result<Plaintext, SecretsError> {
    let path = project.path(&rule.file);
    let bytes = read(&path, &project.display(&rule.file))?;
    crypt::decrypt(&project.display(&rule.file), &bytes, ids, &rule.recipients)
}

/// Reads a secret file, turning "not found" into a clear "missing" error.
pub fn read(path: &Path, shown: &Path) -> Result<Vec<u8>, SecretsError> {
    fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SecretsError::Missing {
                path: shown.to_path_buf(),
            }
        } else {
            SecretsError::io(shown)(e)
        }
    })
}

/// Encrypts `plaintext` to the rule's recipients (not yet written anywhere).
pub fn seal(
    project: &Project,
    rule: &SecretRule,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecretsError> {
    seal_with(
        &Sealer::new(rule.recipients.values()),
        project,
        rule,
        plaintext,
    )
}

/// Like [`seal`], with recipient keys parsed once for many secrets.
pub fn seal_with(
    sealer: &Sealer,
    project: &Project,
    rule: &SecretRule,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecretsError> {
    sealer.seal(
        &project.display(&rule.file),
        plaintext,
        &rule.recipients,
        rule.armor,
    )
}

/// Encrypts and atomically writes a secret; returns its new lock entry.
pub fn write(
    project: &Project,
    rule: &SecretRule,
    plaintext: &[u8],
) -> Result<LockEntry, SecretsError> {
    let ciphertext = seal(project, rule, plaintext)?;
    replace(project, rule, &ciphertext)
}

/// Atomically puts already-encrypted bytes in place; returns the new lock entry.
pub fn replace(
    project: &Project,
    rule: &SecretRule,
    ciphertext: &[u8],
) -> Result<LockEntry, SecretsError> {
    let entry = replace_unsynced(project, rule, ciphertext)?;
    if let Some(dir) = project.path(&rule.file).parent() {
        agex_core::atomic::sync_dir(dir).map_err(SecretsError::io(dir))?;
    }
    Ok(entry)
}

/// [`replace`] without the directory sync, for batches that sync once at the end.
pub fn replace_unsynced(
    project: &Project,
    rule: &SecretRule,
    ciphertext: &[u8],
) -> Result<LockEntry, SecretsError> {
    let entry = lock_entry(project, rule, ciphertext)?;
    let path = project.path(&rule.file);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(SecretsError::io(dir))?;
    }
    agex_core::atomic::replace_file(&path, ciphertext, 0o644)
        .map_err(SecretsError::io(project.display(&rule.file)))?;
    Ok(entry)
}

/// Writes the new file of `rule` beside its old one (so its directory exists), not yet
/// in place and not yet flushed (see [`agex_core::atomic::commit`]); returns the lock
/// entry it will have.
pub fn stage(
    project: &Project,
    rule: &SecretRule,
    ciphertext: &[u8],
) -> Result<(LockEntry, agex_core::atomic::Staged), SecretsError> {
    let entry = lock_entry(project, rule, ciphertext)?;
    let path = project.path(&rule.file);
    let staged = agex_core::atomic::stage(&path, ciphertext, 0o644)
        .map_err(SecretsError::io(project.display(&rule.file)))?;
    Ok((entry, staged))
}

/// The lock entry describing `ciphertext` as the file of `rule`.
pub fn lock_entry(
    project: &Project,
    rule: &SecretRule,
    ciphertext: &[u8],
) -> Result<LockEntry, SecretsError> {
    let header = Header::parse(ciphertext).map_err(|e| SecretsError::NotAge {
        path: project.display(&rule.file),
        reason: e.0,
    })?;
    Ok(LockEntry {
        file: rule.file.to_string_lossy().into_owned(),
        header: header.digest,
        recipients: rule
            .recipients
            .iter()
            .map(|(n, k)| (n.clone(), k.fingerprint()))
            .collect(),
    })
}

/// The rule for a file named on the command line (a path to an `.age` file, absolute
/// or relative to the working directory, or a secret's name).
pub fn rule_for<'a>(project: &'a Project, arg: &Path) -> Result<&'a SecretRule, SecretsError> {
    if let Some(name) = arg.to_str() {
        if let Some(rule) = project.rules.secrets.get(name) {
            return Ok(rule);
        }
        // A bare word that is no file here was meant as a secret's name.
        let bare = arg.components().count() == 1
            && arg.extension().is_none_or(|e| e != "age")
            && !arg.exists();
        if bare {
            let names = project.rules.secrets.keys().map(String::as_str);
            return Err(SecretsError::UnknownSecret {
                name: name.to_string(),
                rules: project.display(agex_core::project::RULES_FILE),
                hint: agex_core::diagnostic::did_you_mean(name, names)
                    .map(|n| format!("; did you mean `{n}`?"))
                    .unwrap_or_default(),
            });
        }
    }
    let rel = relative_to_project(project, arg)?;
    project.rules.by_file(&rel).ok_or_else(|| {
        let name = rel
            .file_stem()
            .map_or("name".to_string(), |s| s.to_string_lossy().into_owned());
        let recipients: Vec<String> = project
            .config
            .groups
            .keys()
            .filter(|g| *g == "admins")
            .chain(project.config.hosts.keys())
            .map(|n| format!("\"{n}\""))
            .collect();
        let file_line = if rel == Path::new("secrets").join(format!("{name}.age")) {
            String::new()
        } else {
            format!("file       = \"{}\"\n", rel.display())
        };
        SecretsError::NoRule {
            path: project.display(&rel),
            rules: project.display(agex_core::project::RULES_FILE),
            suggestion: format!(
                "[secrets.{name}]\n{file_line}recipients = [{}]\nowner      = \"root\"\nservices   = []",
                recipients.join(", ")
            ),
        }
    })
}

/// `arg` as a path relative to the config dir; it must be inside `secrets/`.
pub fn relative_to_project(project: &Project, arg: &Path) -> Result<PathBuf, SecretsError> {
    let cwd = std::env::current_dir().map_err(SecretsError::io("."))?;
    let abs = normalize(&cwd.join(arg));
    let secrets_dir = normalize(&project.dir.join(agex_core::project::SECRETS_DIR));
    match abs.strip_prefix(&secrets_dir) {
        Ok(inner) if !inner.as_os_str().is_empty() => {
            Ok(PathBuf::from(agex_core::project::SECRETS_DIR).join(inner))
        }
        _ => Err(SecretsError::OutsideSecrets {
            path: arg.to_path_buf(),
            dir: project.display(agex_core::project::SECRETS_DIR),
        }),
    }
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
