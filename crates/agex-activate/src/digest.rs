//! Keyed digests of decrypted files, to tell which units' secrets changed.
//!
//! The key is 32 random bytes kept on the RAM-backed filesystem (`/run/agex.d/.key`), so it
//! is new after every boot and never on disk; a digest (HMAC-SHA-256 of the file's path,
//! ownership, mode and content) says nothing about the plaintext without it. Each
//! generation directory records its digests in `.digests`, on the same filesystem.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use agex_core::rules::RestartAction;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::ActivateError;
use crate::manifest::hex;
use crate::plan::PlannedFile;

/// File name of the key on the secrets filesystem.
pub const KEY_FILE: &str = ".key";
/// File name of a generation directory's digests.
pub const DIGESTS_FILE: &str = ".digests";
const KEY_LEN: usize = 32;

/// The per-boot digest key.
pub struct DigestKey(Zeroizing<[u8; KEY_LEN]>);

impl DigestKey {
    /// Reads `<fs>/.key`, if it is there and well formed.
    pub fn load(secrets_fs: &Path) -> Option<DigestKey> {
        let mut f = fs::File::open(secrets_fs.join(KEY_FILE)).ok()?;
        let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN));
        if f.read_to_end(&mut buf).is_ok() && buf.len() == KEY_LEN {
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            key.copy_from_slice(&buf);
            return Some(DigestKey(key));
        }
        None
    }

    /// Reads `<fs>/.key`, or creates it (mode 0600) when missing or malformed.
    pub fn load_or_create(secrets_fs: &Path) -> Result<DigestKey, ActivateError> {
        let path = secrets_fs.join(KEY_FILE);
        if let Some(key) = DigestKey::load(secrets_fs) {
            return Ok(key);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let tmp = secrets_fs.join(format!(".key-{:016x}", rand::random::<u64>()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(key.as_ref()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(ActivateError::io(path)(e));
        }
        Ok(DigestKey(key))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; 32 bytes never fails.
        <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// A short public name of the key, so digests made with another key are recognized.
    pub fn id(&self) -> String {
        let mut m = self.mac();
        m.update(b"agex digest key id");
        let mut h = hex(&m.finalize().into_bytes());
        h.truncate(16);
        h
    }

    /// The digest of one planned file with its content.
    pub fn digest(&self, file: &PlannedFile, content: &[u8]) -> String {
        let mut m = self.mac();
        m.update(b"agex-file-v1\0");
        m.update(file.rel().as_bytes());
        m.update(b"\0");
        m.update(&file.uid.to_le_bytes());
        m.update(&file.gid.to_le_bytes());
        m.update(&file.mode.to_le_bytes());
        m.update(content);
        hex(&m.finalize().into_bytes())
    }
}

/// The digest of one file, and what its unit does when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// HMAC-SHA-256, hex.
    pub digest: String,
    /// The rule's restart action.
    pub restart: RestartAction,
}

/// The digests of a generation directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    /// [`DigestKey::id`] of the key that made them.
    pub key_id: String,
    /// By `dir/name`.
    pub files: BTreeMap<String, FileDigest>,
}

impl Digests {
    /// Reads a generation directory's digests; `None` if absent or unreadable.
    pub fn read(gen_dir: &Path) -> Option<Digests> {
        let bytes = fs::read(gen_dir.join(DIGESTS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The bytes written to `.digests`.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// Units whose files differ between `old` and `new`, split into those to restart and
/// those to reload. A unit with both kinds of change is restarted. With no usable old
/// digests (first activation, or a new boot's key), every unit counts as changed.
pub fn changed_units(old: Option<&Digests>, new: &Digests) -> (Vec<String>, Vec<String>) {
    let usable = old.filter(|o| o.key_id == new.key_id);
    let empty = Digests::default();
    let old = usable.unwrap_or(&empty);
    let mut action: BTreeMap<String, RestartAction> = BTreeMap::new();
    let mut note = |rel: &str, restart: RestartAction| {
        let Some((unit, _)) = rel.split_once('/') else {
            return;
        };
        if unit.starts_with('_') || restart == RestartAction::None {
            return;
        }
        let slot = action.entry(unit.to_string()).or_insert(restart);
        if restart == RestartAction::Restart {
            *slot = RestartAction::Restart;
        }
    };
    for (rel, d) in &new.files {
        match old.files.get(rel) {
            Some(o) if o.digest == d.digest => {}
            _ => note(rel, d.restart),
        }
    }
    for (rel, o) in &old.files {
        if !new.files.contains_key(rel) {
            note(rel, o.restart);
        }
    }
    let mut restart = Vec::new();
    let mut reload = Vec::new();
    for (unit, a) in action {
        match a {
            RestartAction::Restart => restart.push(unit),
            RestartAction::Reload => reload.push(unit),
            RestartAction::None => {}
        }
    }
    (restart, reload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(files: &[(&str, &str, RestartAction)]) -> Digests {
        Digests {
            key_id: "k".into(),
            files: files
                .iter()
                .map(|(r, dg, a)| {
                    (
                        r.to_string(),
                        FileDigest {
                            digest: dg.to_string(),
                            restart: *a,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn only_changed_units() {
        use RestartAction::*;
        let old = d(&[
            ("a.service/x", "1", Restart),
            ("b.service/x", "1", Restart),
            ("c.service/y", "1", Reload),
            ("gone.service/z", "1", Restart),
            ("_shared/s", "1", Restart),
        ]);
        let new = d(&[
            ("a.service/x", "2", Restart),
            ("b.service/x", "1", Restart),
            ("c.service/y", "2", Reload),
            ("new.service/n", "1", None),
            ("_shared/s", "2", Restart),
        ]);
        let (restart, reload) = changed_units(Some(&old), &new);
        assert_eq!(restart, vec!["a.service", "gone.service"]);
        assert_eq!(reload, vec!["c.service"]);
    }

    #[test]
    fn another_key_means_everything_changed() {
        let old = d(&[("a.service/x", "1", RestartAction::Restart)]);
        let mut new = old.clone();
        new.key_id = "other".into();
        assert_eq!(changed_units(Some(&old), &new).0, vec!["a.service"]);
        assert_eq!(changed_units(Some(&old), &old).0, Vec::<String>::new());
    }

    #[test]
    fn key_is_kept_and_digests_depend_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = DigestKey::load_or_create(dir.path()).unwrap();
        let k2 = DigestKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.id(), k2.id());
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let k3 = DigestKey::load_or_create(dir.path()).unwrap();
        assert_ne!(k1.id(), k3.id());
    }
}
