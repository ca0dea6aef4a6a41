//! Creating secrets from their rule's generator, with the OS random number generator.

use std::path::PathBuf;

use agex_core::rules::Charset;
use agex_core::{Generator, LockEntry, Project, SecretRule};
use rand::rngs::OsRng;
use rand::Rng;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::crypt::Sealer;
use crate::error::SecretsError;
use crate::secret_file;

/// A freshly generated secret value and, for key pairs, its public half.
pub struct Generated {
    /// The secret bytes.
    pub secret: Zeroizing<Vec<u8>>,
    /// The public key (`ssh-ed25519 …` or `age1…`), for key generators.
    pub public: Option<String>,
}

/// Produces a new value for `generator`. `label` becomes the ssh key comment.
pub fn generate_value(generator: &Generator, label: &str) -> Result<Generated, SecretsError> {
    let invalid = |reason: String| SecretsError::Invalid {
        name: label.to_string(),
        reason,
    };
    Ok(match generator {
        Generator::Password { length, charset } => {
            let alphabet: &[u8] = match charset {
                Charset::Alphanumeric => {
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                }
                Charset::Symbols => {
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.,:+=@%^~"
                }
                Charset::Hex => b"0123456789abcdef",
            };
            let mut rng = OsRng;
            let secret: Vec<u8> = (0..*length)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            Generated {
                secret: Zeroizing::new(secret),
                public: None,
            }
        }
        Generator::Hex { bytes } => {
            let mut raw = Zeroizing::new(vec![0u8; *bytes]);
            OsRng.fill(raw.as_mut_slice());
            Generated {
                secret: Zeroizing::new(crate::header::hex(&raw).into_bytes()),
                public: None,
            }
        }
        Generator::SshEd25519 => {
            let mut key = ssh_key::PrivateKey::random(
                &mut ssh_key::rand_core::OsRng,
                ssh_key::Algorithm::Ed25519,
            )
            .map_err(|e| invalid(format!("ssh key generation failed: {e}")))?;
            key.set_comment(label);
            let private = key
                .to_openssh(ssh_key::LineEnding::LF)
                .map_err(|e| invalid(format!("ssh key encoding failed: {e}")))?;
            let public = key
                .public_key()
                .to_openssh()
                .map_err(|e| invalid(format!("ssh key encoding failed: {e}")))?;
            Generated {
                secret: Zeroizing::new(private.as_bytes().to_vec()),
                public: Some(public),
            }
        }
        Generator::AgeX25519 => {
            use age::secrecy::ExposeSecret;
            let id = age::x25519::Identity::generate();
            let public = id.to_public().to_string();
            let text = format!(
                "# public key: {public}\n{}\n",
                id.to_string().expose_secret()
            );
            Generated {
                secret: Zeroizing::new(text.into_bytes()),
                public: Some(public),
            }
        }
    })
}

/// What `generate` created.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratedSecret {
    /// The secret.
    pub name: String,
    /// Its encrypted file.
    pub file: PathBuf,
    /// Where the public key was written, for key generators.
    pub public_file: Option<PathBuf>,
}

/// What `generate_missing` created, and the lock entries to record.
#[derive(Debug, Default)]
pub struct GenerateOutcome {
    /// The secrets created.
    pub created: Vec<GeneratedSecret>,
    /// Their new lock entries, by secret name.
    pub entries: Vec<(String, LockEntry)>,
}

/// Creates every selected secret whose rule has a generator and whose file does not
/// exist. Never overwrites a file.
pub fn generate_missing(
    project: &Project,
    only: &[&SecretRule],
) -> Result<GenerateOutcome, SecretsError> {
    let mut created = Vec::new();
    let mut entries = Vec::new();
    let candidates: Vec<&SecretRule> = if only.is_empty() {
        project.rules.secrets.values().collect()
    } else {
        only.to_vec()
    };
    let sealer = Sealer::new(candidates.iter().flat_map(|r| r.recipients.values()));
    for rule in candidates {
        let Some(generator) = &rule.generator else {
            if !only.is_empty() {
                return Err(SecretsError::Invalid {
                    name: rule.name.clone(),
                    reason:
                        "its rule has no generator; create it with `agex edit` or `agex encrypt`"
                            .into(),
                });
            }
            continue;
        };
        let path = project.path(&rule.file);
        if path.exists() {
            continue;
        }
        let value = generate_value(generator, &rule.name)?;
        let ciphertext = secret_file::seal_with(&sealer, project, rule, &value.secret)?;
        let entry = secret_file::lock_entry(project, rule, &ciphertext)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(SecretsError::io(dir))?;
        }
        agex_core::atomic::write_new_atomic(&path, &ciphertext, 0o644)
            .map_err(SecretsError::io(project.display(&rule.file)))?;
        let public_file = match &value.public {
            Some(public) => {
                let rel = rule.file.with_extension("pub");
                agex_core::atomic::write_atomic(
                    &project.path(&rel),
                    format!("{public}\n").as_bytes(),
                    0o644,
                )
                .map_err(SecretsError::io(project.display(&rel)))?;
                Some(rel)
            }
            None => None,
        };
        entries.push((rule.name.clone(), entry));
        created.push(GeneratedSecret {
            name: rule.name.clone(),
            file: rule.file.clone(),
            public_file,
        });
    }
    Ok(GenerateOutcome { created, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_has_length_and_charset() {
        let g = generate_value(
            &Generator::Password {
                length: 40,
                charset: Charset::Hex,
            },
            "x",
        )
        .unwrap();
        assert_eq!(g.secret.len(), 40);
        assert!(g.secret.iter().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn keys_have_public_halves() {
        let ssh = generate_value(&Generator::SshEd25519, "borg").unwrap();
        assert!(ssh.public.unwrap().starts_with("ssh-ed25519 "));
        assert!(String::from_utf8_lossy(&ssh.secret).contains("BEGIN OPENSSH PRIVATE KEY"));
        let age = generate_value(&Generator::AgeX25519, "k").unwrap();
        assert!(age.public.unwrap().starts_with("age1"));
    }
}
