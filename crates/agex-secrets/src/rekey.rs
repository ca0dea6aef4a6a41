//! Re-encrypting secrets to the recipients their rules name now: plan, then execute in
//! parallel, verifying each new file before it atomically replaces the old one.

use std::collections::BTreeSet;

use agex_core::atomic::Staged;
use agex_core::{Lock, Project, SecretRule};
use rayon::prelude::*;
use serde::Serialize;

use crate::check::{judge, Status};
use crate::crypt;
use crate::error::SecretsError;
use crate::header::Header;
use crate::identity::Identities;
use crate::secret_file;

/// What `rekey` should consider.
#[derive(Debug, Clone, Default)]
pub struct RekeyOptions {
    /// Re-encrypt even files that are up to date.
    pub force: bool,
    /// Only secrets delivered to this host.
    pub host: Option<String>,
    /// Only these secrets (by name); empty means all.
    pub only: BTreeSet<String>,
}

/// One secret to re-encrypt, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RekeyItem {
    /// The secret.
    pub name: String,
    /// Why it is in the plan.
    pub reason: String,
}

/// The secrets a rekey would rewrite. Pure: computing it touches nothing.
#[derive(Debug, Clone, Serialize)]
pub struct RekeyPlan {
    /// Secrets to rewrite.
    pub items: Vec<RekeyItem>,
    /// Secrets left alone because they are up to date.
    pub up_to_date: usize,
    /// Secrets that cannot be rekeyed because their file is missing.
    pub missing: Vec<String>,
}

/// Decides which secrets to rewrite.
pub fn plan(project: &Project, opts: &RekeyOptions) -> Result<RekeyPlan, SecretsError> {
    if let Some(host) = &opts.host {
        if !project.config.hosts.contains_key(host) {
            return Err(SecretsError::Invalid {
                name: host.clone(),
                reason: "is not a host in agex.toml".into(),
            });
        }
    }
    for name in &opts.only {
        if !project.rules.secrets.contains_key(name) {
            return Err(SecretsError::Invalid {
                name: name.clone(),
                reason: "has no rule in secrets.toml".into(),
            });
        }
    }
    let mut plan = RekeyPlan {
        items: vec![],
        up_to_date: 0,
        missing: vec![],
    };
    for rule in selected(project, opts) {
        let (status, detail) = judge(project, rule);
        match status {
            Status::Missing => plan.missing.push(rule.name.clone()),
            Status::Ok if !opts.force => plan.up_to_date += 1,
            Status::Ok => plan.items.push(RekeyItem {
                name: rule.name.clone(),
                reason: "forced".into(),
            }),
            _ => plan.items.push(RekeyItem {
                name: rule.name.clone(),
                reason: detail.unwrap_or_else(|| status.as_str().to_string()),
            }),
        }
    }
    Ok(plan)
}

fn selected<'a>(
    project: &'a Project,
    opts: &'a RekeyOptions,
) -> impl Iterator<Item = &'a SecretRule> {
    project.rules.secrets.values().filter(move |r| {
        opts.host.as_ref().is_none_or(|h| r.hosts.contains(h))
            && (opts.only.is_empty() || opts.only.contains(&r.name))
    })
}

/// What a rekey did.
#[derive(Debug, Default)]
pub struct RekeyOutcome {
    /// Secrets rewritten.
    pub rekeyed: Vec<String>,
    /// Secrets whose new file could only be checked structurally, because no loaded
    /// identity is among its new recipients.
    pub unverified: Vec<String>,
}

/// Executes a plan in two phases: every secret is decrypted, re-encrypted and verified
/// first; only when all of them succeeded are the new files put in place. One secret
/// that cannot be rekeyed (corrupt, or no identity opens it) leaves every file as it was.
pub fn execute(
    project: &Project,
    plan: &RekeyPlan,
    ids: &Identities,
) -> Result<RekeyOutcome, SecretsError> {
    let prepared: Vec<(String, Result<Prepared, SecretsError>)> = plan
        .items
        .par_iter()
        .map(|item| {
            let rule = &project.rules.secrets[&item.name];
            (item.name.clone(), prepare_one(project, rule, ids))
        })
        .collect();
    let mut ready = Vec::new();
    let mut failures = Vec::new();
    for (name, result) in prepared {
        match result {
            Ok(p) => ready.push((name, p)),
            Err(e) => failures.push((name, e)),
        }
    }
    if !failures.is_empty() {
        return Err(SecretsError::RekeyAborted {
            total: plan.items.len(),
            failures,
        });
    }

    // Every new file is written beside its old one; one flush puts them all on disk;
    // only then are they renamed into place. A failure while staging leaves every file
    // as it was.
    // One thread: parallel file creation in one directory only contends on ext4's inode
    // allocator and directory lock (it was a third of rekey's time on two cores).
    let staged: Vec<(String, Result<StagedSecret, SecretsError>)> = ready
        .iter()
        .map(|(name, (ciphertext, _))| {
            let rule = &project.rules.secrets[name];
            (name.clone(), secret_file::stage(project, rule, ciphertext))
        })
        .collect();
    let mut entries = Vec::new();
    let mut files = Vec::new();
    for ((name, result), (_, (_, verified))) in staged.into_iter().zip(&ready) {
        match result {
            Ok((entry, file)) => {
                entries.push((name, entry, *verified));
                files.push(file);
            }
            Err(e) => failures.push((name, e)),
        }
    }
    if !failures.is_empty() {
        return Err(SecretsError::RekeyAborted {
            total: plan.items.len(),
            failures,
        });
    }
    let secrets_dir = project.path(agex_core::project::SECRETS_DIR);
    let renamed =
        agex_core::atomic::commit(files).map_err(SecretsError::io(secrets_dir.clone()))?;
    let results: Vec<(String, Result<Rekeyed, SecretsError>)> = entries
        .into_iter()
        .zip(renamed)
        .map(|((name, entry, verified), (path, result))| {
            let result = result
                .map(|()| (entry, verified))
                .map_err(SecretsError::io(path));
            (name, result)
        })
        .collect();

    let mut lock: Lock = project.lock.clone();
    lock.secrets
        .retain(|name, _| project.rules.secrets.contains_key(name));
    let mut outcome = RekeyOutcome::default();
    for (name, result) in results {
        match result {
            Ok((entry, verified)) => {
                lock.secrets.insert(name.clone(), entry);
                if !verified {
                    outcome.unverified.push(name.clone());
                }
                outcome.rekeyed.push(name);
            }
            Err(e) => failures.push((name, e)),
        }
    }
    if lock != project.lock {
        let path = project.path(agex_core::project::LOCK_FILE);
        lock.save(&path).map_err(SecretsError::io(
            project.display(agex_core::project::LOCK_FILE),
        ))?;
    }
    if failures.is_empty() {
        Ok(outcome)
    } else {
        Err(SecretsError::Partial {
            total: plan.items.len(),
            failures,
        })
    }
}

/// A new file written beside the old one, with the lock entry it will have.
type StagedSecret = (agex_core::LockEntry, Staged);

/// A re-encrypted file not yet in place, and whether it was verified by decrypting it.
type Prepared = (Vec<u8>, bool);

/// A rewritten file's lock entry, and whether it was verified by decrypting it.
type Rekeyed = (agex_core::LockEntry, bool);

/// Decrypts, re-encrypts and verifies one file without touching it. Returns the new
/// ciphertext and whether it was verified by decrypting it.
fn prepare_one(
    project: &Project,
    rule: &SecretRule,
    ids: &Identities,
) -> Result<Prepared, SecretsError> {
    let plaintext = secret_file::open(project, rule, ids)?;
    let ciphertext = secret_file::seal(project, rule, &plaintext)?;
    let shown = project.display(&rule.file);
    let verified = if ids.matches_any(rule.recipients.values()) {
        let again = crypt::decrypt(&shown, &ciphertext, ids, &rule.recipients)?;
        if again.as_slice() != plaintext.as_slice() {
            return Err(SecretsError::Encrypt {
                path: shown,
                reason:
                    "the re-encrypted file does not decrypt to the same plaintext; old file kept"
                        .into(),
            });
        }
        true
    } else {
        let header = Header::parse(&ciphertext).map_err(|e| SecretsError::Encrypt {
            path: shown.clone(),
            reason: format!("the re-encrypted file is unreadable ({e}); old file kept"),
        })?;
        if header.stanzas.len() < rule.recipients.len() {
            return Err(SecretsError::Encrypt {
                path: shown,
                reason: "the re-encrypted file lacks recipients; old file kept".into(),
            });
        }
        false
    };
    Ok((ciphertext, verified))
}
