//! `secrets/secrets.lock`: per secret, the recipients its file is encrypted to and a
//! digest of the file's age header. No plaintext facts: it lets `agex check` find stale
//! or tampered files without any identity.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::diagnostic::{from_toml_error, Diagnostics, SourceFile};

/// The lock file format version this build writes.
pub const LOCK_VERSION: u32 = 1;

/// The parsed lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// Format version.
    pub version: u32,
    /// Entries by secret name.
    #[serde(default)]
    pub secrets: BTreeMap<String, LockEntry>,
}

/// Just the version of a lock file, read before the rest.
#[derive(Deserialize)]
struct VersionOnly {
    version: Option<toml::Spanned<i64>>,
}

/// What agex last wrote for one secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// The file, relative to the config dir.
    pub file: String,
    /// `sha256:<hex>` of the age header: changes whenever the file is re-encrypted.
    pub header: String,
    /// Member name to recipient fingerprint, for every recipient of the file.
    pub recipients: BTreeMap<String, String>,
}

impl Lock {
    /// An empty lock.
    pub fn new() -> Self {
        Lock {
            version: LOCK_VERSION,
            secrets: BTreeMap::new(),
        }
    }

    /// Parses lock file text.
    pub fn parse(source: &SourceFile) -> Result<Lock, Diagnostics> {
        if source.text.trim().is_empty() {
            return Ok(Lock::new());
        }
        // A newer format may have fields this build lacks: whatever the full parse says,
        // a version this build does not write is the error to show. The version is read
        // on its own only then (parsing a thousand-secret lock twice cost 5 ms a rekey).
        let full = toml::from_str::<Lock>(&source.text);
        if !matches!(&full, Ok(lock) if lock.version == LOCK_VERSION) {
            if let Ok(VersionOnly {
                version: Some(version),
            }) = toml::from_str::<VersionOnly>(&source.text)
            {
                if *version.get_ref() != i64::from(LOCK_VERSION) {
                    return Err(Diagnostics(vec![source
                        .error(
                            Some(version.span()),
                            format!(
                                "lock file version {} is not supported (this agex writes version {LOCK_VERSION})",
                                version.get_ref()
                            ),
                        )
                        .with_help("another agex release wrote this file; run that release, or upgrade this one")]));
                }
            }
        }
        full.map_err(|e| Diagnostics(vec![from_toml_error(source, &e)]))
    }

    /// The lock file's text: sorted, one table per secret, diff-friendly.
    pub fn to_toml(&self) -> std::io::Result<String> {
        let body = match self.plain_toml() {
            Some(body) => body,
            None => toml::to_string(self).map_err(std::io::Error::other)?,
        };
        Ok(format!(
            "# Written by agex: the recipients each secret is encrypted to and a digest of its\n# age header. Holds no plaintext facts. Commit it with the .age files.\n{body}"
        ))
    }

    /// What `toml::to_string` writes for this lock, written directly (the serializer took
    /// 15 ms of a thousand-secret rekey's serial end), or `None` if some name or value
    /// needs TOML quoting beyond plain `"…"`: then the serializer writes it.
    fn plain_toml(&self) -> Option<String> {
        fn key(k: &str) -> Option<&str> {
            let bare = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            bare.then_some(k)
        }
        fn value(v: &str) -> Option<&str> {
            v.bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
                .then_some(v)
        }
        use std::fmt::Write;
        let mut out = String::with_capacity(64 + self.secrets.len() * 256);
        let _ = writeln!(out, "version = {}", self.version);
        for (name, e) in &self.secrets {
            let name = key(name)?;
            let _ = write!(
                out,
                "\n[secrets.{name}]\nfile = \"{}\"\nheader = \"{}\"\n",
                value(&e.file)?,
                value(&e.header)?
            );
            let _ = writeln!(out, "\n[secrets.{name}.recipients]");
            for (member, fingerprint) in &e.recipients {
                let _ = writeln!(out, "{} = \"{}\"", key(member)?, value(fingerprint)?);
            }
        }
        Some(out)
    }

    /// Writes the lock atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic::write_atomic(path, self.to_toml()?.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut lock = Lock::new();
        lock.secrets.insert(
            "db".into(),
            LockEntry {
                file: "secrets/db.age".into(),
                header: "sha256:00".into(),
                recipients: [("alice".to_string(), "age1x".to_string())].into(),
            },
        );
        let text = lock.to_toml().unwrap();
        let back = Lock::parse(&SourceFile::new("secrets.lock", text)).unwrap();
        assert_eq!(back, lock);
    }

    fn entry(file: &str, recipients: &[(&str, &str)]) -> LockEntry {
        LockEntry {
            file: file.into(),
            header: "sha256:0f1e".into(),
            recipients: recipients
                .iter()
                .map(|(m, f)| (m.to_string(), f.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_direct_writer_writes_what_the_serializer_writes() {
        let mut lock = Lock::new();
        lock.secrets.insert(
            "immich-db".into(),
            entry(
                "secrets/immich-db.age",
                &[
                    (
                        "admin",
                        "age12898rtdkmfqlptaqn64f77vx6pmcvvdwllysv5eyaye5eeafuvwqvkj9m5",
                    ),
                    ("bunk", "SHA256:0Udyi92rJnWjiCcC9h1Unlqp8S+WUCltSfiQZjVWQPs"),
                ],
            ),
        );
        lock.secrets
            .insert("no_recipients".into(), entry("secrets/x.age", &[]));
        assert_eq!(lock.plain_toml().unwrap(), toml::to_string(&lock).unwrap());
        // Names and values that need quoting go through the serializer.
        for (name, file, member) in [
            ("a.b", "secrets/x.age", "m"),
            ("x", "secrets/\"q\".age", "m"),
            ("x", "secrets/é.age", "m"),
            ("x", "secrets/x.age", "m n"),
        ] {
            let mut odd = Lock::new();
            odd.secrets
                .insert(name.into(), entry(file, &[(member, "age1x")]));
            assert!(odd.plain_toml().is_none(), "{name} {file} {member}");
            let text = odd.to_toml().unwrap();
            assert_eq!(
                Lock::parse(&SourceFile::new("secrets.lock", text)).unwrap(),
                odd
            );
        }
    }

    #[test]
    fn a_newer_version_is_refused_at_its_line_before_its_fields() {
        let text = "# header\nversion = 2\nfuture_field = true\n";
        let e = Lock::parse(&SourceFile::new("secrets.lock", text)).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("secrets.lock:2:11: lock file version 2"),
            "{shown}"
        );
    }
}
