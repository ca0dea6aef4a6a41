//! Public keys a secret can be encrypted to, and their fingerprints.
//!
//! Parsing uses the `age` crate's own parsers, so a key accepted here is one age can
//! encrypt to.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha256};

/// What kind of key a recipient string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecipientKind {
    /// `age1…` native X25519.
    X25519,
    /// `ssh-ed25519 AAAA…`.
    SshEd25519,
    /// `ssh-rsa AAAA…`.
    SshRsa,
    /// `age1<plugin>1…`, handled by an `age-plugin-<name>` binary.
    Plugin,
}

impl RecipientKind {
    /// The name shown to users and used in the age header's stanza type.
    pub fn as_str(self) -> &'static str {
        match self {
            RecipientKind::X25519 => "X25519",
            RecipientKind::SshEd25519 => "ssh-ed25519",
            RecipientKind::SshRsa => "ssh-rsa",
            RecipientKind::Plugin => "plugin",
        }
    }
}

/// A parsed, valid recipient public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecipientKey {
    kind: RecipientKind,
    /// Canonical text: `age1…`, or `ssh-<type> <base64>` without the comment.
    canonical: String,
}

/// Why a key string is not a recipient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RecipientParseError {
    /// Human explanation, naming the kind that was expected.
    pub reason: String,
}

impl FromStr for RecipientKey {
    type Err = RecipientParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let fail = |reason: String| RecipientParseError { reason };
        if let Some(rest) = s.strip_prefix("ssh-") {
            let mut parts = s.split_whitespace();
            let key_type = parts.next().unwrap_or_default();
            let body = parts.next().unwrap_or_default();
            let kind = match key_type {
                "ssh-ed25519" => RecipientKind::SshEd25519,
                "ssh-rsa" => RecipientKind::SshRsa,
                _ => {
                    return Err(fail(format!(
                        "unsupported ssh key type `ssh-{}`: expected an `ssh-ed25519` or `ssh-rsa` public key",
                        rest.split_whitespace().next().unwrap_or_default()
                    )))
                }
            };
            let canonical = format!("{key_type} {body}");
            age::ssh::Recipient::from_str(&canonical).map_err(|e| {
                fail(format!(
                    "not a valid {key_type} public key ({}): expected `{key_type} AAAA… [comment]` as in a .pub file",
                    ssh_key_problem(&e)
                ))
            })?;
            return Ok(RecipientKey { kind, canonical });
        }
        if s.starts_with("age1") {
            if let Ok(r) = age::x25519::Recipient::from_str(s) {
                return Ok(RecipientKey {
                    kind: RecipientKind::X25519,
                    canonical: r.to_string(),
                });
            }
            let looks_plugin = s
                .strip_prefix("age1")
                .and_then(|r| r.rfind('1'))
                .is_some_and(|i| i > 0);
            if looks_plugin {
                if let Ok(r) = age::plugin::Recipient::from_str(s) {
                    return Ok(RecipientKey {
                        kind: RecipientKind::Plugin,
                        canonical: r.to_string(),
                    });
                }
            }
            return Err(fail(
                "not a valid age recipient: expected an X25519 key `age1…` (62 characters, from `age-keygen -y`) or a plugin recipient `age1<plugin>1…`"
                    .to_string(),
            ));
        }
        Err(fail(
            "not a recognised public key: expected `age1…` (age X25519), `age1<plugin>1…`, `ssh-ed25519 AAAA…` or `ssh-rsa AAAA…`"
                .to_string(),
        ))
    }
}

/// Why age refused an ssh public key, in words (its error type has no `Display`).
fn ssh_key_problem(e: &age::ssh::ParseRecipientKeyError) -> String {
    use age::ssh::ParseRecipientKeyError as E;
    match e {
        E::RsaModulusTooLarge => "the RSA key is larger than age supports".into(),
        E::RsaModulusTooSmall => "the RSA key is shorter than 2048 bits".into(),
        E::Unsupported(kind) => format!("age does not support `{kind}` keys"),
        _ => "the key data is cut short or damaged".into(),
    }
}

impl RecipientKey {
    /// The key's kind.
    pub fn kind(&self) -> RecipientKind {
        self.kind
    }

    /// The canonical key text (no ssh comment).
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// A stable fingerprint: `SHA256:…` for ssh keys (as `ssh-keygen -l` prints),
    /// the key itself for age keys (they are short and already public).
    pub fn fingerprint(&self) -> String {
        match self.ssh_wire() {
            Some(wire) => format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&wire))),
            None => self.canonical.clone(),
        }
    }

    /// For ssh keys, the 4-byte tag age writes in each ssh stanza (base64), which lets a
    /// file's header be matched to its ssh recipients without any private key.
    pub fn ssh_stanza_tag(&self) -> Option<String> {
        self.ssh_wire()
            .map(|wire| STANDARD_NO_PAD.encode(&Sha256::digest(&wire)[..4]))
    }

    /// The stanza type an age header carries for this recipient (`None` for plugins,
    /// whose stanza type is chosen by the plugin).
    pub fn stanza_type(&self) -> Option<&'static str> {
        match self.kind {
            RecipientKind::X25519 => Some("X25519"),
            RecipientKind::SshEd25519 => Some("ssh-ed25519"),
            RecipientKind::SshRsa => Some("ssh-rsa"),
            RecipientKind::Plugin => None,
        }
    }

    /// The ssh public key blob (wire format) of an ssh recipient.
    pub fn ssh_wire(&self) -> Option<Vec<u8>> {
        match self.kind {
            RecipientKind::SshEd25519 | RecipientKind::SshRsa => self
                .canonical
                .split_whitespace()
                .nth(1)
                .and_then(|b| STANDARD.decode(b).ok()),
            _ => None,
        }
    }
}

impl fmt::Display for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN alice@rust";

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            RecipientKey::from_str(X).unwrap().kind(),
            RecipientKind::X25519
        );
        let ed = RecipientKey::from_str(ED).unwrap();
        assert_eq!(ed.kind(), RecipientKind::SshEd25519);
        assert!(!ed.as_str().contains("alice@rust"), "comment is dropped");
        assert!(ed.fingerprint().starts_with("SHA256:"));
        assert_eq!(ed.ssh_stanza_tag().unwrap().len(), 6);
    }

    #[test]
    fn rejects_with_the_expected_kind() {
        let e = RecipientKey::from_str("age1nope").unwrap_err();
        assert!(e.reason.contains("age1"), "{e}");
        let e = RecipientKey::from_str("ssh-dss AAAA").unwrap_err();
        assert!(e.reason.contains("ssh-ed25519"), "{e}");
        let e = RecipientKey::from_str("ssh-ed25519 AAAAnotbase64!").unwrap_err();
        assert!(e.reason.contains("ssh-ed25519"), "{e}");
        let e = RecipientKey::from_str("hello").unwrap_err();
        assert!(e.reason.contains("expected"), "{e}");
    }
}
