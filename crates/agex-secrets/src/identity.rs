//! Identities (private keys) that decrypt secrets, found in the documented order and
//! parsed with the `age` crate's own readers.
//!
//! Each identity is kept `Send + Sync` so decryption can run on all cores; an encrypted
//! ssh key is unlocked once, up front, instead of once per file.

use std::fs;
use std::io::{BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use agex_core::RecipientKey;

use crate::error::SecretsError;

/// Where a candidate identity path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `-i/--identity`: must exist and parse.
    Explicit,
    /// A default location: skipped quietly when absent.
    Default,
}

/// One private key, ready to decrypt.
pub struct LoadedIdentity {
    /// The file it came from.
    pub path: PathBuf,
    /// `TYPE fingerprint`, shown in "no identity matches" errors.
    pub description: String,
    /// Its public key, when it can be derived.
    pub recipient: Option<RecipientKey>,
    /// The age identity.
    pub identity: Box<dyn age::Identity + Send + Sync>,
}

/// The identities available to this command.
#[derive(Default)]
pub struct Identities {
    /// Successfully loaded identities.
    pub loaded: Vec<LoadedIdentity>,
    /// Default locations that were looked at and had nothing usable, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Identities {
    /// The candidate paths, in order: `-i` flags, else `$AGEX_IDENTITY` (`:`-separated),
    /// `~/.config/agex/identities`, `~/.ssh/id_ed25519`, `~/.ssh/id_rsa`.
    pub fn candidates(explicit: &[PathBuf]) -> Vec<(PathBuf, Origin)> {
        if !explicit.is_empty() {
            return explicit
                .iter()
                .map(|p| (p.clone(), Origin::Explicit))
                .collect();
        }
        let mut out = Vec::new();
        if let Some(env) = std::env::var_os("AGEX_IDENTITY") {
            for p in std::env::split_paths(&env) {
                if !p.as_os_str().is_empty() {
                    out.push((p, Origin::Explicit));
                }
            }
        }
        if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
            let config = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".config"));
            out.push((config.join("agex/identities"), Origin::Default));
            out.push((home.join(".ssh/id_ed25519"), Origin::Default));
            out.push((home.join(".ssh/id_rsa"), Origin::Default));
        }
        out
    }

    /// Loads every candidate. Explicit paths that fail are errors; absent defaults are
    /// skipped.
    pub fn load(candidates: &[(PathBuf, Origin)]) -> Result<Identities, SecretsError> {
        let mut ids = Identities::default();
        for (path, origin) in candidates {
            if *origin == Origin::Default && !path.exists() {
                continue;
            }
            match load_file(path) {
                Ok(mut list) => ids.loaded.append(&mut list),
                Err(e) if *origin == Origin::Default => {
                    ids.skipped.push((path.clone(), e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(ids)
    }

    /// Errors when nothing was loaded, listing where agex looked.
    pub fn require_any(self, candidates: &[(PathBuf, Origin)]) -> Result<Identities, SecretsError> {
        if self.loaded.is_empty() {
            let looked = candidates
                .iter()
                .map(|(p, _)| {
                    let why = self
                        .skipped
                        .iter()
                        .find(|(s, _)| s == p)
                        .map_or("not found".to_string(), |(_, w)| w.clone());
                    format!("{} ({why})", p.display())
                })
                .collect();
            return Err(SecretsError::NoIdentities { looked });
        }
        Ok(self)
    }

    /// `description (path)` of every loaded identity.
    pub fn describe(&self) -> Vec<String> {
        self.loaded
            .iter()
            .map(|i| format!("{} ({})", i.description, i.path.display()))
            .collect()
    }

    /// The identities as age wants them.
    pub fn as_age(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.loaded
            .iter()
            .map(|i| i.identity.as_ref() as &dyn age::Identity)
    }

    /// Whether some loaded identity's public key is among `keys`.
    pub fn matches_any<'a>(&self, mut keys: impl Iterator<Item = &'a RecipientKey>) -> bool {
        keys.any(|k| self.loaded.iter().any(|i| i.recipient.as_ref() == Some(k)))
    }
}

fn load_file(path: &Path) -> Result<Vec<LoadedIdentity>, SecretsError> {
    let bad = |reason: String| SecretsError::Identity {
        path: path.to_path_buf(),
        reason,
    };
    // The key's bytes go into one zeroizing buffer sized to the file, and are only
    // borrowed from there (a `String::from_utf8` error would carry them along).
    let bytes = fs::File::open(path)
        .and_then(|mut f| {
            let len = f.metadata()?.len() as usize;
            crate::plainbuf::read_all(&mut f, len)
        })
        .map_err(|e| bad(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not a text file".into()))?;
    let name = path.display().to_string();
    let trimmed = text.trim_start();

    if trimmed.starts_with("age-encryption.org/")
        || trimmed.starts_with("-----BEGIN AGE ENCRYPTED FILE")
    {
        return Err(bad(
            "is a passphrase-encrypted age identity file; agex needs identities it can use for many files at once: decrypt it to a file on tmpfs (`age -d -o /dev/shm/key.txt`) and pass that with -i".into(),
        ));
    }

    if trimmed.starts_with("-----BEGIN") {
        let parsed =
            age::ssh::Identity::from_buffer(BufReader::new(text.as_bytes()), Some(name.clone()))
                .map_err(|e| bad(format!("not a usable ssh private key: {e}")))?;
        let identity = match parsed {
            age::ssh::Identity::Unsupported(k) => {
                return Err(bad(format!(
                    "unsupported ssh key: {k:?}; use an ed25519 or rsa key"
                )))
            }
            age::ssh::Identity::Encrypted(enc) => unlock_ssh_key(path, &enc)?,
            unencrypted => unencrypted,
        };
        let recipient = age::ssh::Recipient::try_from(identity.clone())
            .ok()
            .and_then(|r| RecipientKey::from_str(&r.to_string()).ok());
        let description = match &recipient {
            Some(r) => format!("{} {}", r.kind().as_str(), r.fingerprint()),
            None => "ssh key".to_string(),
        };
        return Ok(vec![LoadedIdentity {
            path: path.to_path_buf(),
            description,
            recipient,
            identity: Box::new(identity),
        }]);
    }

    // An age identity file: X25519 keys and plugin identities, one per line. X25519 keys
    // are loaded with their public key derived once (see `x25519`); the rest go through
    // age's own identity file reader.
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut loaded = Vec::new();
    let mut others = zeroize::Zeroizing::new(String::with_capacity(text.len() + lines.len()));
    for line in &lines {
        let fast = age::x25519::Identity::from_str(line)
            .ok()
            .and_then(|id| crate::x25519::CachedX25519::new(&id));
        match fast {
            Some(id) => {
                let (description, recipient) = describe_age_line(line);
                loaded.push(LoadedIdentity {
                    path: path.to_path_buf(),
                    description,
                    recipient,
                    identity: Box::new(id),
                });
            }
            None => {
                others.push_str(line);
                others.push('\n');
            }
        }
    }
    if !others.is_empty() || lines.is_empty() {
        let file = age::IdentityFile::from_buffer(BufReader::new(others.as_bytes()))
            .map_err(|e| bad(format!("not an age identity file or ssh private key: {e}")))?
            .with_callbacks(age::cli_common::UiCallbacks);
        let identities = file
            .into_identities()
            .map_err(|e| bad(format!("cannot use identity: {e}")))?;
        let descriptions: Vec<(String, Option<RecipientKey>)> =
            others.lines().map(describe_age_line).collect();
        loaded.extend(identities.into_iter().enumerate().map(|(i, identity)| {
            let (description, recipient) = descriptions
                .get(i)
                .cloned()
                .unwrap_or_else(|| ("age identity".into(), None));
            LoadedIdentity {
                path: path.to_path_buf(),
                description,
                recipient,
                identity,
            }
        }));
    }
    if loaded.is_empty() {
        return Err(bad("holds no identities".into()));
    }
    Ok(loaded)
}

fn describe_age_line(line: &str) -> (String, Option<RecipientKey>) {
    if let Ok(id) = age::x25519::Identity::from_str(line) {
        let public = id.to_public().to_string();
        let key = RecipientKey::from_str(&public).ok();
        return (format!("X25519 {public}"), key);
    }
    if let Ok(id) = age::plugin::Identity::from_str(line) {
        return (format!("plugin age-plugin-{}", id.plugin()), None);
    }
    ("age identity".into(), None)
}

fn unlock_ssh_key(
    path: &Path,
    key: &age::ssh::EncryptedKey,
) -> Result<age::ssh::Identity, SecretsError> {
    let bad = |reason: String| SecretsError::Identity {
        path: path.to_path_buf(),
        reason,
    };
    if !std::io::stdin().is_terminal() && std::env::var_os("PINENTRY_PROGRAM").is_none() {
        return Err(bad(
            "is a passphrase-protected ssh key and there is no terminal to ask for the passphrase; run interactively, or pass an unencrypted identity with -i".into(),
        ));
    }
    let passphrase = age::cli_common::read_secret(
        &format!("Passphrase for ssh key {}", path.display()),
        "Passphrase",
        None,
    )
    .map_err(|e| bad(format!("could not read the passphrase: {e}")))?;
    if passphrase.expose_secret().is_empty() {
        return Err(bad("empty passphrase".into()));
    }
    key.decrypt(passphrase)
        .map(age::ssh::Identity::from)
        .map_err(|_| bad("wrong passphrase for this ssh key".into()))
}
