//! Encrypting to a rule's recipients and decrypting with the loaded identities.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use age::armor::{ArmoredWriter, Format};
use agex_core::{RecipientKey, RecipientKind};
use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::header::{self, Header};
use crate::identity::Identities;
use crate::x25519::{SshEd25519Recipient, X25519Recipient};

/// Plaintext held in memory that is wiped when dropped.
pub type Plaintext = Zeroizing<Vec<u8>>;

/// Encrypts `plaintext` to every key in `recipients`; `path` is only for messages.
pub fn encrypt(
    path: &Path,
    plaintext: &[u8],
    recipients: &BTreeMap<String, RecipientKey>,
    armor: bool,
) -> Result<Vec<u8>, SecretsError> {
    Sealer::new(recipients.values()).seal(path, plaintext, recipients, armor)
}

/// Recipient keys parsed once, to encrypt many files to them: a rekey converts each
/// host's ssh key to X25519 once, not once per file. A key that does not parse is
/// reported by the first [`Sealer::seal`] that needs it, naming that file.
pub struct Sealer {
    parsed: HashMap<String, Result<Parsed, RecipientError>>,
}

/// Why a recipient key cannot be encrypted to.
#[derive(Debug, thiserror::Error)]
pub enum RecipientError {
    /// Not an `age1…` key.
    #[error("not a valid age X25519 recipient")]
    X25519,
    /// An ssh-ed25519 key agex cannot use.
    #[error(transparent)]
    SshEd25519(#[from] crate::x25519::SshKeyError),
    /// An ssh-rsa key age cannot parse (age's error has no Display, so its name is shown).
    #[error("{0:?}")]
    SshRsa(age::ssh::ParseRecipientKeyError),
    /// A plugin recipient age cannot parse.
    #[error("{0}")]
    Plugin(&'static str),
}

/// One recipient key, ready to wrap file keys.
enum Parsed {
    Native(Box<dyn age::Recipient + Send + Sync>),
    /// Plugins run per encryption (the plugin protocol starts a process), so they are
    /// only checked here and parsed again when sealing.
    Plugin,
}

impl Sealer {
    /// Parses `keys` (duplicates once).
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a RecipientKey>) -> Sealer {
        let mut parsed = HashMap::new();
        for key in keys {
            parsed
                .entry(key.as_str().to_string())
                .or_insert_with(|| parse(key));
        }
        Sealer { parsed }
    }

    /// Encrypts `plaintext` to every key in `recipients`; `path` is only for messages.
    pub fn seal(
        &self,
        path: &Path,
        plaintext: &[u8],
        recipients: &BTreeMap<String, RecipientKey>,
        armor: bool,
    ) -> Result<Vec<u8>, SecretsError> {
        let fail = |reason: String| SecretsError::Encrypt {
            path: path.to_path_buf(),
            reason,
        };
        if recipients
            .values()
            .any(|k| !self.parsed.contains_key(k.as_str()))
        {
            return Sealer::new(recipients.values()).seal(path, plaintext, recipients, armor);
        }
        let mut native: Vec<&dyn age::Recipient> = Vec::new();
        let mut plugins: BTreeMap<String, Vec<age::plugin::Recipient>> = BTreeMap::new();
        for (name, key) in recipients {
            match &self.parsed[key.as_str()] {
                Err(e) => return Err(fail(format!("recipient `{name}`: {e}"))),
                Ok(Parsed::Native(r)) => native.push(r.as_ref()),
                Ok(Parsed::Plugin) => {
                    let r = key
                        .as_str()
                        .parse::<age::plugin::Recipient>()
                        .map_err(|e| fail(format!("recipient `{name}`: {e}")))?;
                    plugins.entry(r.plugin().to_string()).or_default().push(r);
                }
            }
        }
        let mut plugin_recipients = Vec::new();
        for (plugin, list) in plugins {
            let p = age::plugin::RecipientPluginV1::new(
                &plugin,
                &list,
                &[],
                age::cli_common::UiCallbacks,
            )
            .map_err(|e| fail(format!("plugin age-plugin-{plugin}: {e}")))?;
            plugin_recipients.push(p);
        }
        let all = native
            .into_iter()
            .chain(plugin_recipients.iter().map(|p| p as &dyn age::Recipient));
        let encryptor = age::Encryptor::with_recipients(all).map_err(|e| fail(e.to_string()))?;
        let mut out = Vec::with_capacity(plaintext.len() + 512);
        let format = if armor {
            Format::AsciiArmor
        } else {
            Format::Binary
        };
        let armored =
            ArmoredWriter::wrap_output(&mut out, format).map_err(|e| fail(e.to_string()))?;
        let mut writer = encryptor
            .wrap_output(armored)
            .map_err(|e| fail(e.to_string()))?;
        writer
            .write_all(plaintext)
            .map_err(|e| fail(e.to_string()))?;
        writer
            .finish()
            .and_then(|a| a.finish())
            .map_err(|e| fail(e.to_string()))?;
        Ok(out)
    }
}

/// Parses one recipient key; the error says what is wrong with it.
fn parse(key: &RecipientKey) -> Result<Parsed, RecipientError> {
    let native: Box<dyn age::Recipient + Send + Sync> = match key.kind() {
        RecipientKind::X25519 => {
            Box::new(X25519Recipient::parse(key.as_str()).ok_or(RecipientError::X25519)?)
        }
        RecipientKind::SshEd25519 => Box::new(SshEd25519Recipient::new(key)?),
        RecipientKind::SshRsa => Box::new(
            key.as_str()
                .parse::<age::ssh::Recipient>()
                .map_err(RecipientError::SshRsa)?,
        ),
        RecipientKind::Plugin => {
            key.as_str()
                .parse::<age::plugin::Recipient>()
                .map_err(RecipientError::Plugin)?;
            return Ok(Parsed::Plugin);
        }
    };
    Ok(Parsed::Native(native))
}

/// Decrypts an age file's bytes with `identities`. `known` maps ssh key tags and
/// fingerprints to names, so a failure can say who the file is encrypted to.
pub fn decrypt(
    path: &Path,
    ciphertext: &[u8],
    identities: &Identities,
    known: &BTreeMap<String, RecipientKey>,
) -> Result<Plaintext, SecretsError> {
    let not_age = |e: crate::header::HeaderError| SecretsError::NotAge {
        path: path.to_path_buf(),
        reason: e.0,
    };
    // The full header parse (stanzas, digest) runs only to explain a failure; a strict
    // check of the header's grammar runs first, since the `age` crate still accepts
    // the legacy stanza encoding the spec calls broken (header.rs).
    let header = || Header::parse(ciphertext).map_err(not_age);
    let fail = |reason: String| SecretsError::Decrypt {
        path: path.to_path_buf(),
        reason,
    };
    let binary = header::dearmor(ciphertext).map_err(not_age)?;
    if header::shape(&binary).map_err(not_age)?.scrypt {
        return Err(fail(
            "the file is passphrase-encrypted (scrypt); agex secrets are encrypted to keys".into(),
        ));
    }
    let decryptor =
        age::Decryptor::new_buffered(&binary[..]).map_err(|e| SecretsError::NotAge {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut reader = match decryptor.decrypt(identities.as_age()) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => {
            return Err(SecretsError::NoIdentityMatches {
                path: path.to_path_buf(),
                tried: identities.describe(),
                recipients: describe_header(&header()?, known),
            })
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    let mut plain = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    reader
        .read_to_end(&mut plain)
        .map_err(|e| fail(format!("payload is corrupt or truncated ({e})")))?;
    Ok(plain)
}

/// What an age header says about its recipients, with names where they can be known.
pub fn describe_header(header: &Header, known: &BTreeMap<String, RecipientKey>) -> Vec<String> {
    let mut anonymous = 0;
    let mut out = Vec::new();
    for s in &header.stanzas {
        match s.kind.as_str() {
            "ssh-ed25519" | "ssh-rsa" => {
                let tag = s.args.first().map(String::as_str).unwrap_or_default();
                let who = known
                    .iter()
                    .find(|(_, k)| k.ssh_stanza_tag().as_deref() == Some(tag))
                    .map_or("an ssh key not named in agex.toml".to_string(), |(n, k)| {
                        format!("`{n}` {}", k.fingerprint())
                    });
                out.push(format!("{} key tag {tag}: {who}", s.kind));
            }
            "X25519" => anonymous += 1,
            other => out.push(format!("{other} stanza (plugin)")),
        }
    }
    if anonymous > 0 {
        out.push(format!(
            "{anonymous} X25519 recipient(s) (age does not record which X25519 keys; see secrets.lock)"
        ));
    }
    out
}
