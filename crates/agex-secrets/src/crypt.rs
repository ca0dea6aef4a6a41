//! Encrypting to a rule's recipients and decrypting with the loaded identities.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use age::armor::{ArmoredReader, ArmoredWriter, Format};
use agex_core::{RecipientKey, RecipientKind};
use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::header::Header;
use crate::identity::Identities;

/// Plaintext held in memory that is wiped when dropped.
pub type Plaintext = Zeroizing<Vec<u8>>;

/// Encrypts `plaintext` to every key in `recipients`; `path` is only for messages.
pub fn encrypt(
    path: &Path,
    plaintext: &[u8],
    recipients: &BTreeMap<String, RecipientKey>,
    armor: bool,
) -> Result<Vec<u8>, SecretsError> {
    let fail = |reason: String| SecretsError::Encrypt {
        path: path.to_path_buf(),
        reason,
    };
    let mut boxed: Vec<Box<dyn age::Recipient + Send>> = Vec::new();
    let mut plugins: BTreeMap<String, Vec<age::plugin::Recipient>> = BTreeMap::new();
    for (name, key) in recipients {
        let parse_err = |e: String| fail(format!("recipient `{name}`: {e}"));
        match key.kind() {
            RecipientKind::X25519 => boxed.push(Box::new(
                key.as_str()
                    .parse::<age::x25519::Recipient>()
                    .map_err(|e| parse_err(e.to_string()))?,
            )),
            RecipientKind::SshEd25519 | RecipientKind::SshRsa => boxed.push(Box::new(
                key.as_str()
                    .parse::<age::ssh::Recipient>()
                    .map_err(|e| parse_err(format!("{e:?}")))?,
            )),
            RecipientKind::Plugin => {
                let r = key
                    .as_str()
                    .parse::<age::plugin::Recipient>()
                    .map_err(|e| parse_err(e.to_string()))?;
                plugins.entry(r.plugin().to_string()).or_default().push(r);
            }
        }
    }
    for (plugin, list) in plugins {
        let p =
            age::plugin::RecipientPluginV1::new(&plugin, &list, &[], age::cli_common::UiCallbacks)
                .map_err(|e| fail(format!("plugin age-plugin-{plugin}: {e}")))?;
        boxed.push(Box::new(p));
    }
    let encryptor =
        age::Encryptor::with_recipients(boxed.iter().map(|r| r.as_ref() as &dyn age::Recipient))
            .map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::with_capacity(plaintext.len() + 512);
    let format = if armor {
        Format::AsciiArmor
    } else {
        Format::Binary
    };
    let armored = ArmoredWriter::wrap_output(&mut out, format).map_err(|e| fail(e.to_string()))?;
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

/// Decrypts an age file's bytes with `identities`. `known` maps ssh key tags and
/// fingerprints to names, so a failure can say who the file is encrypted to.
pub fn decrypt(
    path: &Path,
    ciphertext: &[u8],
    identities: &Identities,
    known: &BTreeMap<String, RecipientKey>,
) -> Result<Plaintext, SecretsError> {
    let header = Header::parse(ciphertext).map_err(|e| SecretsError::NotAge {
        path: path.to_path_buf(),
        reason: e.0,
    })?;
    let fail = |reason: String| SecretsError::Decrypt {
        path: path.to_path_buf(),
        reason,
    };
    let decryptor = age::Decryptor::new_buffered(ArmoredReader::new(ciphertext)).map_err(|e| {
        SecretsError::NotAge {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    if decryptor.is_scrypt() {
        return Err(fail(
            "the file is passphrase-encrypted (scrypt); agex secrets are encrypted to keys".into(),
        ));
    }
    let mut reader = match decryptor.decrypt(identities.as_age()) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => {
            return Err(SecretsError::NoIdentityMatches {
                path: path.to_path_buf(),
                tried: identities.describe(),
                recipients: describe_header(&header, known),
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
