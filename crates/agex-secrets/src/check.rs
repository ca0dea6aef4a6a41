//! The state of every secret file, judged without any identity: from the rules, the
//! lock file and each file's age header.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use agex_core::{Project, RecipientKind, SecretRule};
use serde::Serialize;

use crate::header::Header;

/// The state of one secret file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Encrypted to exactly what its rule names, as recorded in the lock.
    Ok,
    /// Needs `agex rekey`: recipients changed, not in the lock, or changed outside agex.
    Stale,
    /// The rule has no file.
    Missing,
    /// The file has no rule.
    Orphan,
    /// The file is not a readable age file.
    Broken,
}

impl Status {
    /// Lower-case name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Stale => "stale",
            Status::Missing => "missing",
            Status::Orphan => "orphan",
            Status::Broken => "broken",
        }
    }
}

/// One row of `agex check` / `agex secrets list`.
#[derive(Debug, Clone, Serialize)]
pub struct SecretReport {
    /// The secret's name (`None` for an orphan file).
    pub name: Option<String>,
    /// The file, relative to the config dir.
    pub file: PathBuf,
    /// Recipient names from the rule.
    pub recipients: Vec<String>,
    /// Hosts that receive it.
    pub hosts: Vec<String>,
    /// Units that use it.
    pub services: Vec<String>,
    /// Its state.
    pub status: Status,
    /// Why, when not ok.
    pub detail: Option<String>,
}

/// Everything `agex check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// One row per rule and per orphan file.
    pub secrets: Vec<SecretReport>,
    /// Lock entries whose rule is gone.
    pub stale_lock_entries: Vec<String>,
}

impl CheckReport {
    /// Whether anything needs attention.
    pub fn has_findings(&self) -> bool {
        !self.stale_lock_entries.is_empty() || self.secrets.iter().any(|s| s.status != Status::Ok)
    }
}

/// Judges every secret of the project.
pub fn check(project: &Project) -> CheckReport {
    let mut secrets: Vec<SecretReport> = project
        .rules
        .secrets
        .values()
        .map(|rule| {
            let (status, detail) = judge(project, rule);
            SecretReport {
                name: Some(rule.name.clone()),
                file: rule.file.clone(),
                recipients: rule.recipient_names.clone(),
                hosts: rule.hosts.iter().cloned().collect(),
                services: rule.placement.services.clone(),
                status,
                detail,
            }
        })
        .collect();
    let known: BTreeSet<&Path> = project
        .rules
        .secrets
        .values()
        .map(|r| r.file.as_path())
        .collect();
    for file in age_files(&project.path(agex_core::project::SECRETS_DIR)) {
        let rel = PathBuf::from(agex_core::project::SECRETS_DIR).join(&file);
        if !known.contains(rel.as_path()) {
            secrets.push(SecretReport {
                name: None,
                file: rel,
                recipients: vec![],
                hosts: vec![],
                services: vec![],
                status: Status::Orphan,
                detail: Some(
                    "no rule in secrets.toml names this file; add a rule or delete it".into(),
                ),
            });
        }
    }
    let stale_lock_entries = project
        .lock
        .secrets
        .keys()
        .filter(|n| !project.rules.secrets.contains_key(*n))
        .cloned()
        .collect();
    CheckReport {
        secrets,
        stale_lock_entries,
    }
}

/// Whether a rule's file needs re-encryption, and why.
pub fn judge(project: &Project, rule: &SecretRule) -> (Status, Option<String>) {
    let bytes = match fs::read(project.path(&rule.file)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = if rule.generator.is_some() {
                "run `agex generate`"
            } else {
                "create it with `agex edit` or `agex encrypt`"
            };
            return (Status::Missing, Some(format!("no file; {hint}")));
        }
        Err(e) => return (Status::Broken, Some(format!("cannot read: {e}"))),
    };
    let header = match Header::parse(&bytes) {
        Ok(h) => h,
        Err(e) => return (Status::Broken, Some(format!("not a valid age file: {e}"))),
    };
    let wanted: BTreeMap<&str, String> = rule
        .recipients
        .iter()
        .map(|(n, k)| (n.as_str(), k.fingerprint()))
        .collect();
    let Some(entry) = project.lock.secrets.get(&rule.name) else {
        return (
            Status::Stale,
            Some("not recorded in secrets.lock; run `agex rekey`".into()),
        );
    };
    if entry.header != header.digest {
        let mut why = "changed outside agex (its age header differs from secrets.lock)".to_string();
        if let Some(mismatch) = header_mismatch(rule, &header) {
            why.push_str(&format!("; {mismatch}"));
        }
        return (Status::Stale, Some(format!("{why}; run `agex rekey`")));
    }
    let locked: BTreeMap<&str, String> = entry
        .recipients
        .iter()
        .map(|(n, f)| (n.as_str(), f.clone()))
        .collect();
    if locked != wanted {
        let added: Vec<&str> = wanted
            .iter()
            .filter(|(n, f)| locked.get(*n) != Some(f))
            .map(|(n, _)| *n)
            .collect();
        let removed: Vec<&str> = locked
            .iter()
            .filter(|(n, f)| wanted.get(*n) != Some(f))
            .map(|(n, _)| *n)
            .collect();
        let mut parts = Vec::new();
        if !added.is_empty() {
            parts.push(format!("new or changed: {}", added.join(", ")));
        }
        if !removed.is_empty() {
            parts.push(format!("no longer a recipient: {}", removed.join(", ")));
        }
        return (
            Status::Stale,
            Some(format!(
                "recipients changed ({}); run `agex rekey`",
                parts.join("; ")
            )),
        );
    }
    if let Some(mismatch) = header_mismatch(rule, &header) {
        return (Status::Stale, Some(format!("{mismatch}; run `agex rekey`")));
    }
    (Status::Ok, None)
}

/// Compares a header with what the rule says it should hold: the number of stanzas and
/// the key tags of ssh recipients (X25519 stanzas do not name their recipient).
fn header_mismatch(rule: &SecretRule, header: &Header) -> Option<String> {
    if rule
        .recipients
        .values()
        .any(|k| k.kind() == RecipientKind::Plugin)
    {
        return None;
    }
    if header.stanzas.len() != rule.recipients.len() {
        return Some(format!(
            "its header has {} ({} stanzas) but the rule names {} recipients",
            header.summary(),
            header.stanzas.len(),
            rule.recipients.len()
        ));
    }
    let mut tags: Vec<&str> = header.ssh_tags();
    tags.sort_unstable();
    let mut expected: Vec<String> = rule
        .recipients
        .values()
        .filter_map(|k| k.ssh_stanza_tag())
        .collect();
    expected.sort_unstable();
    if tags != expected.iter().map(String::as_str).collect::<Vec<_>>() {
        let missing: Vec<&str> = rule
            .recipients
            .iter()
            .filter(|(_, k)| {
                k.ssh_stanza_tag()
                    .is_some_and(|t| !tags.contains(&t.as_str()))
            })
            .map(|(n, _)| n.as_str())
            .collect();
        return Some(format!(
            "its ssh stanzas do not match the rule's ssh keys{}",
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (not encrypted to {})", missing.join(", "))
            }
        ));
    }
    None
}

/// Every `.age` file below `dir`, relative to it, sorted.
pub fn age_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = PathBuf::from(entry.file_name());
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(rel.join(name));
            } else if name.extension().and_then(|e| e.to_str()) == Some("age") {
                out.push(rel.join(name));
            }
        }
    }
    out.sort();
    out
}
