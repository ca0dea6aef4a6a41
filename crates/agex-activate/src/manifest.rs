//! What a generation is made of: the host's encrypted secrets (by digest), the resolved
//! rules and the templates. Its canonical JSON is hashed to name the store entry, so the
//! same inputs always give the same hash.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

use agex_core::rules::{Placement, RestartAction};
use agex_core::template::{Segment, Template};
use agex_core::Project;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ActivateError;
use crate::layout::{EARLY_DIR, SHARED_DIR};

/// Version of the manifest format; part of the hash.
pub const FORMAT: u32 = 1;

/// A generation's description: everything activation needs besides the host identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The host it is for.
    pub host: String,
    /// The host's public key (what its secrets are encrypted to).
    pub host_key: String,
    /// Where the host's private key lives (a host path).
    pub identity: PathBuf,
    /// How many generations to keep.
    pub keep: usize,
    /// Secrets delivered to the host, by name.
    pub secrets: Vec<SecretEntry>,
    /// Templates rendered on the host, by name.
    pub templates: Vec<TemplateEntry>,
    /// Files carried for the rest of agex (the host's backup policies and the systemd
    /// units generated from them), so one switch moves them with the secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<CarriedFile>,
}

/// One carried file of a generation (`files/<path>` in the store entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarriedFile {
    /// Relative path: `policies/<service>.toml`, `systemd/<unit>`.
    pub path: String,
    /// SHA-256 of its content (hex).
    pub sha256: String,
    /// What matters about it in one line (a timer's `OnCalendar=`), shown by `agex diff`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// One secret of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEntry {
    /// The secret's name; its file on the host and in the store (`secrets/<name>.age`).
    pub name: String,
    /// SHA-256 of the encrypted file (hex).
    pub sha256: String,
    /// Decrypted to the early directory, owned by root.
    pub early: bool,
    /// Owner, group, mode, services, path, restart action.
    pub placement: Placement,
    /// Who the file is encrypted to, from secrets.lock (name to key fingerprint): named in
    /// the error when the host key no longer opens it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recipients: BTreeMap<String, String>,
}

/// One piece of a template, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Piece {
    /// Text copied as is.
    Text(String),
    /// The named secret's plaintext, trailing newlines removed.
    Secret(String),
}

/// One template of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateEntry {
    /// Its name, also its file name on the host.
    pub name: String,
    /// The parsed content.
    pub pieces: Vec<Piece>,
    /// Owner, group, mode, services, path, restart action.
    pub placement: Placement,
}

impl TemplateEntry {
    /// The secrets this template reads.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Secret(s) => Some(s.as_str()),
            Piece::Text(_) => None,
        })
    }
}

/// A manifest with the encrypted files it names, before it is written to the store.
pub struct Inputs {
    /// The manifest.
    pub manifest: Manifest,
    /// The encrypted file of each secret, by name.
    pub ciphertexts: BTreeMap<String, Vec<u8>>,
    /// The content of each carried file, by path.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Inputs {
    /// Adds a file for the generation to carry (see [`Manifest::files`]).
    pub fn carry(
        &mut self,
        path: &str,
        content: Vec<u8>,
        note: String,
    ) -> Result<(), ActivateError> {
        check_carried_path(path).map_err(|e| ActivateError::Invalid {
            path: PathBuf::from(path),
            reason: e.to_string(),
        })?;
        self.manifest.files.retain(|f| f.path != path);
        self.manifest.files.push(CarriedFile {
            path: path.to_string(),
            sha256: sha256_hex(&content),
            note,
        });
        self.manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.files.insert(path.to_string(), content);
        Ok(())
    }
}

/// A carried file's path that is not relative, plain and visible.
#[derive(Debug, thiserror::Error)]
#[error("carried file `{0}` is not a plain relative path")]
struct NotPlainPath(String);

/// A name that is not one visible file name.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a plain file name")]
struct NotFileName(String);

/// A carried file's path: relative, plain components, none hidden.
fn check_carried_path(path: &str) -> Result<(), NotPlainPath> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components().all(|c| match c {
            Component::Normal(n) => !n.to_string_lossy().starts_with('.'),
            _ => false,
        });
    if ok {
        Ok(())
    } else {
        Err(NotPlainPath(path.to_string()))
    }
}

impl Manifest {
    /// The manifest for `host` from a loaded configuration, with the encrypted files.
    pub fn from_project(project: &Project, host: &str) -> Result<Inputs, ActivateError> {
        let host_cfg =
            project
                .config
                .hosts
                .get(host)
                .ok_or_else(|| ActivateError::UnknownHost {
                    host: host.to_string(),
                    known: project
                        .config
                        .hosts
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        let mut secrets = Vec::new();
        let mut ciphertexts = BTreeMap::new();
        for rule in project
            .rules
            .secrets
            .values()
            .filter(|r| r.hosts.contains(host))
        {
            let path = project.path(&rule.file);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ActivateError::MissingSecretFile {
                        name: rule.name.clone(),
                        path: project.display(&rule.file),
                    })
                }
                Err(e) => return Err(ActivateError::io(path)(e)),
            };
            for s in &rule.placement.services {
                check_service(&rule.name, s)?;
            }
            let mut placement = rule.placement.clone();
            if rule.early {
                placement.owner = "root".into();
                placement.group = "root".into();
            }
            secrets.push(SecretEntry {
                name: rule.name.clone(),
                sha256: sha256_hex(&bytes),
                early: rule.early,
                placement,
                recipients: project
                    .lock
                    .secrets
                    .get(&rule.name)
                    .map(|e| e.recipients.clone())
                    .unwrap_or_default(),
            });
            ciphertexts.insert(rule.name.clone(), bytes);
        }
        let delivered: BTreeSet<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
        let mut templates = Vec::new();
        for t in project.rules.templates.values() {
            let used = t.template.secrets();
            let present = used.iter().filter(|s| delivered.contains(**s)).count();
            if !used.is_empty() && present == 0 {
                continue; // a template for other hosts
            }
            if let Some(missing) = used.iter().find(|s| !delivered.contains(**s)) {
                return Err(ActivateError::TemplateSecretNotOnHost {
                    location: template_location(project, &t.name, missing),
                    template: t.name.clone(),
                    secret: missing.to_string(),
                    host: host.to_string(),
                });
            }
            check_file_name(&t.name)
                .map_err(|_| ActivateError::BadServiceName {
                    item: t.name.clone(),
                    service: t.name.clone(),
                })
                .and_then(|()| {
                    t.placement
                        .services
                        .iter()
                        .try_for_each(|s| check_service(&t.name, s))
                })?;
            templates.push(TemplateEntry {
                name: t.name.clone(),
                pieces: pieces(&t.template),
                placement: t.placement.clone(),
            });
        }
        Ok(Inputs {
            manifest: Manifest {
                format: FORMAT,
                host: host.to_string(),
                host_key: host_cfg.key.to_string(),
                identity: host_cfg.identity.clone(),
                keep: project.config.activation.keep.max(1),
                secrets,
                templates,
                files: Vec::new(),
            },
            ciphertexts,
            files: BTreeMap::new(),
        })
    }

    /// The canonical bytes that are stored and hashed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses stored bytes.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Manifest, ActivateError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ActivateError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not an agex manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(ActivateError::Invalid {
                path: path.to_path_buf(),
                reason: format!(
                    "manifest format {} is not supported (this agex reads {FORMAT})",
                    m.format
                ),
            });
        }
        Ok(m)
    }

    /// The content hash naming the store entry: SHA-256 of the canonical bytes, 32 hex
    /// characters.
    pub fn hash(&self) -> String {
        hash_bytes(&self.to_bytes())
    }

    /// A secret by name.
    pub fn secret(&self, name: &str) -> Option<&SecretEntry> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// Checks what the store cannot: every name is a safe file name, every template's
    /// secrets are in the generation.
    pub fn validate(&self, path: &Path) -> Result<(), ActivateError> {
        let bad = |reason: String| ActivateError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        for s in &self.secrets {
            check_file_name(&s.name).map_err(|why| bad(format!("secret `{}`: {why}", s.name)))?;
            for svc in &s.placement.services {
                check_service(&s.name, svc)?;
            }
        }
        for t in &self.templates {
            check_file_name(&t.name).map_err(|why| bad(format!("template `{}`: {why}", t.name)))?;
            for svc in &t.placement.services {
                check_service(&t.name, svc)?;
            }
            if let Some(missing) = t.secrets().find(|n| self.secret(n).is_none()) {
                return Err(bad(format!(
                    "template `{}` uses secret `{missing}`, which is not in the generation",
                    t.name
                )));
            }
        }
        for f in &self.files {
            check_carried_path(&f.path).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }
}

/// The directories on the tmpfs a secret or template lands in.
pub fn directories(placement: &Placement, early: bool) -> Vec<String> {
    if early {
        return vec![EARLY_DIR.to_string()];
    }
    if placement.services.is_empty() {
        return vec![SHARED_DIR.to_string()];
    }
    let mut out: Vec<String> = Vec::new();
    for s in &placement.services {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Whether a restart action touches units.
pub fn restarts(action: RestartAction) -> bool {
    action != RestartAction::None
}

/// A parsed template as the manifest stores it.
pub fn pieces(t: &Template) -> Vec<Piece> {
    t.segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => Piece::Text(l.clone()),
            Segment::Secret(n) => Piece::Secret(n.clone()),
        })
        .collect()
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The store hash of manifest bytes.
pub fn hash_bytes(bytes: &[u8]) -> String {
    let mut h = sha256_hex(bytes);
    h.truncate(32);
    h
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn check_file_name(name: &str) -> Result<(), NotFileName> {
    let p = Path::new(name);
    let mut comps = p.components();
    let ok = matches!(comps.next(), Some(Component::Normal(_))) && comps.next().is_none();
    if !ok || name.starts_with('.') || name.contains('/') {
        return Err(NotFileName(name.to_string()));
    }
    Ok(())
}

fn check_service(item: &str, service: &str) -> Result<(), ActivateError> {
    if check_file_name(service).is_err() || service.starts_with('_') {
        return Err(ActivateError::BadServiceName {
            item: item.to_string(),
            service: service.to_string(),
        });
    }
    Ok(())
}

/// `secrets/secrets.toml:LINE` of the placeholder naming `secret` in template `name`.
fn template_location(project: &Project, name: &str, secret: &str) -> String {
    let source = &project.rules.source;
    let text = &source.text;
    let start = [
        format!("[templates.\"{name}\"]"),
        format!("[templates.'{name}']"),
        format!("[templates.{name}]"),
    ]
    .iter()
    .find_map(|h| text.find(h.as_str()))
    .unwrap_or(0);
    let rest = text.get(start..).unwrap_or_default();
    let at = Template::find_placeholder(rest, secret).map_or(start, |i| start + i);
    let line = text
        .get(..at)
        .unwrap_or_default()
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1;
    format!("{}:{line}", source.path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(services: &[&str]) -> Placement {
        Placement {
            owner: "root".into(),
            group: "root".into(),
            mode: 0o400,
            services: services.iter().map(|s| s.to_string()).collect(),
            path: None,
            restart: RestartAction::Restart,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            host: "h".into(),
            host_key: "age1x".into(),
            identity: "/etc/ssh/ssh_host_ed25519_key".into(),
            keep: 5,
            secrets: vec![SecretEntry {
                name: "a".into(),
                sha256: sha256_hex(b"x"),
                early: false,
                placement: placement(&["a.service"]),
                recipients: BTreeMap::new(),
            }],
            templates: vec![TemplateEntry {
                name: "a.env".into(),
                pieces: vec![Piece::Text("A=".into()), Piece::Secret("a".into())],
                placement: placement(&[]),
            }],
            files: vec![],
        }
    }

    #[test]
    fn hash_is_stable_and_content_sensitive() {
        let m = manifest();
        assert_eq!(m.hash(), manifest().hash());
        assert_eq!(m.hash().len(), 32);
        let mut other = manifest();
        other.secrets[0].placement.mode = 0o440;
        assert_ne!(m.hash(), other.hash());
        let back = Manifest::from_bytes(Path::new("m"), &m.to_bytes()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn validate_refuses_traversal_and_missing_template_secrets() {
        let mut m = manifest();
        m.validate(Path::new("m")).unwrap();
        m.secrets[0].placement.services = vec!["../etc".into()];
        assert!(m.validate(Path::new("m")).is_err());
        let mut m = manifest();
        m.templates[0].pieces.push(Piece::Secret("nope".into()));
        assert!(m
            .validate(Path::new("m"))
            .unwrap_err()
            .to_string()
            .contains("nope"));
    }

    #[test]
    fn carried_files_are_plain_paths() {
        assert!(check_carried_path("systemd/agex-backup@x.service.d/agex.conf").is_ok());
        for bad in ["", "/etc/x", "../x", "a/../b", ".hidden", "a/.b"] {
            assert!(check_carried_path(bad).is_err(), "{bad}");
        }
        // No carried files: the manifest bytes (and hash) are what they were before.
        assert!(!String::from_utf8(manifest().to_bytes())
            .unwrap()
            .contains("files"));
    }

    #[test]
    fn directories_per_service() {
        assert_eq!(
            directories(&placement(&["a.service", "b.service"]), false),
            vec!["a.service", "b.service"]
        );
        assert_eq!(directories(&placement(&[]), false), vec![SHARED_DIR]);
        assert_eq!(
            directories(&placement(&["a.service"]), true),
            vec![EARLY_DIR]
        );
    }
}
