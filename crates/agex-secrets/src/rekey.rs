//! Re-encrypting secrets to the recipients their rules name now: plan, then execute in
//! parallel, verifying each new file before it atomically replaces the old one.

use std::collections::BTreeSet;

use agex_core::atomic::Staged;
use agex_core::{Lock, Project, SecretRule};
use rayon::prelude::*;
use serde::Serialize;

use crate::check::{judge, Status};
use crate::crypt::{self, Sealer};
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
    // Judging reads and hashes every file's header: in parallel, like the rekey itself.
    // With `force` every file that exists is rewritten whatever its state, so only that
    // is asked (a broken one then fails the rekey with the decryption's own words).
    let rules: Vec<&SecretRule> = selected(project, opts).collect();
    let judged: Vec<(&SecretRule, (Status, Option<String>))> = rules
        .into_par_iter()
        .map(|rule| {
            let status = if !opts.force {
                judge(project, rule)
            } else {
                match project.path(&rule.file).try_exists() {
                    Ok(true) => (Status::Ok, None),
                    Ok(false) => (Status::Missing, None),
                    Err(e) => (Status::Broken, Some(format!("cannot read: {e}"))),
                }
            };
            (rule, status)
        })
        .collect();
    for (rule, (status, detail)) in judged {
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

/// Executes a plan in two phases: every secret is decrypted, re-encrypted, verified
/// and written to a temp file beside its old one first (in parallel, so the file
/// writes overlap the cryptography); only when all of them succeeded are the new files
/// flushed and renamed into place. One secret that cannot be rekeyed (corrupt, or no
/// identity opens it) removes every temp file and leaves every file as it was.
pub fn execute(
    project: &Project,
    plan: &RekeyPlan,
    ids: &Identities,
) -> Result<RekeyOutcome, SecretsError> {
    let sealer = Sealer::new(
        plan.items
            .iter()
            .flat_map(|item| project.rules.secrets[&item.name].recipients.values()),
    );
    // One secret per task: rayon otherwise hands each thread a quarter of the list as
    // one unsplittable run, and the thread that draws the slower quarter finishes alone
    // (a tenth of a rekey's time on two cores).
    let staged: Vec<(String, Result<StagedSecret, SecretsError>)> = plan
        .items
        .par_iter()
        .with_max_len(1)
        .map(|item| {
            let rule = &project.rules.secrets[&item.name];
            let result =
                prepare_one(project, rule, ids, &sealer).and_then(|(ciphertext, verified)| {
                    let (entry, file) = secret_file::stage(project, rule, &ciphertext)?;
                    Ok((entry, file, verified))
                });
            (item.name.clone(), result)
        })
        .collect();
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut failures = Vec::new();
    for (name, result) in staged {
        match result {
            Ok((entry, file, verified)) => {
                entries.push((name, entry, verified));
                files.push(file);
            }
            Err(e) => failures.push((name, e)),
        }
    }
    if !failures.is_empty() {
        // Dropping the staged files removes them.
        return Err(SecretsError::RekeyAborted {
            total: plan.items.len(),
            failures,
        });
    }
    // The lock as it will be once every file is in place, staged with them so the one
    // flush covers it too; it is renamed last. Should a rename fail, it is written
    // again below from what did land.
    let lock_path = project.path(agex_core::project::LOCK_FILE);
    let lock_shown = project.display(agex_core::project::LOCK_FILE);
    let mut lock: Lock = project.lock.clone();
    lock.secrets
        .retain(|name, _| project.rules.secrets.contains_key(name));
    for (name, entry, _) in &entries {
        lock.secrets.insert(name.clone(), entry.clone());
    }
    let lock_changed = lock != project.lock;
    if lock_changed {
        let text = lock
            .to_toml()
            .map_err(SecretsError::io(lock_shown.clone()))?;
        files.push(
            agex_core::atomic::stage(&lock_path, text.as_bytes(), 0o644)
                .map_err(SecretsError::io(lock_shown.clone()))?,
        );
    }
    let secrets_dir = project.path(agex_core::project::SECRETS_DIR);
    let mut renamed =
        agex_core::atomic::commit(files).map_err(SecretsError::io(secrets_dir.clone()))?;
    let lock_renamed = if lock_changed { renamed.pop() } else { None };

    let mut outcome = RekeyOutcome::default();
    for ((name, _, verified), (path, result)) in entries.into_iter().zip(renamed) {
        match result {
            Ok(()) => {
                if !verified {
                    outcome.unverified.push(name.clone());
                }
                outcome.rekeyed.push(name);
            }
            Err(e) => {
                // Its old file is still there: the lock keeps describing that one.
                match project.lock.secrets.get(&name) {
                    Some(old) => lock.secrets.insert(name.clone(), old.clone()),
                    None => lock.secrets.remove(&name),
                };
                failures.push((name, SecretsError::io(path)(e)));
            }
        }
    }
    match lock_renamed {
        Some((_, Ok(()))) if failures.is_empty() => {}
        Some(_) => lock
            .save(&lock_path)
            .map_err(SecretsError::io(lock_shown))?,
        None => {}
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

/// A new file written beside the old one, with the lock entry it will have and whether
/// it was verified by decrypting it.
type StagedSecret = (agex_core::LockEntry, Staged, bool);

/// A re-encrypted file not yet in place, and whether it was verified by decrypting it.
type Prepared = (Vec<u8>, bool);

/// Decrypts, re-encrypts and verifies one file without touching it. Returns the new
/// ciphertext and whether it was verified by decrypting it.
fn prepare_one(
    project: &Project,
    rule: &SecretRule,
    ids: &Identities,
    sealer: &Sealer,
) -> Result<Prepared, SecretsError> {
    let plaintext = secret_file::open(project, rule, ids)?;
    let ciphertext = secret_file::seal_with(sealer, project, rule, &plaintext)?;
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
