//! Restic key files as agex writes them: the repository's master key wrapped with the
//! password through scrypt at restic's memory cost.
//!
//! rustic_core writes key files with scrypt's "recommended" N=2^17, r=8 (128 MiB), the
//! largest single allocation of a backup run: with it `agex backup` peaked above the
//! restic binary's memory. restic itself calibrates to at most 60 MiB (its keys here
//! have N=2^15, r=8: 32 MiB). agex uses N=2^15, r=8 and p=4: restic's memory with the
//! same work per guess as rustic_core's default (4 x 2^15 = 2^17 blocks), so a guess
//! at the password costs an attacker what it did before, in a quarter of the memory.
//! (agex's repository passwords are usually generated, 40 random characters, where
//! no KDF setting matters.) The file format is restic's (design.md, "Keys"); rustic
//! and restic open these keys like their own, and every key written is read back
//! through rustic_core's own `KeyFile` decoding before it is relied on.

use std::sync::Arc;

use aes256ctr_poly1305aes::aead::Aead;
use aes256ctr_poly1305aes::{Aes256CtrPoly1305Aes, Key, Nonce};
use rand::RngCore;
use rustic_core::repofile::{FileType, KeyFile, KeyId, MasterKey};
use rustic_core::{Id, WriteBackend};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// scrypt's log2(N) for keys agex writes.
const LOG_N: u8 = 15;
/// scrypt's r.
const R: u32 = 8;
/// scrypt's p.
const P: u32 = 4;

/// Why a key file could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The scrypt parameters or output length were refused (a bug, not input).
    #[error("scrypt: {0}")]
    Kdf(String),
    /// Encrypting or encoding the key file failed.
    #[error("{0}")]
    Encode(String),
    /// The written key does not open with the password again.
    #[error("the new key file does not open with the password again: {0}")]
    Verify(String),
    /// The backend refused the write.
    #[error("{0}")]
    Backend(String),
}

/// Writes a new key file for `master` protected by `password`, checks that rustic_core
/// opens it with that password to the same master key, and returns its id.
pub fn add(
    be: &Arc<dyn WriteBackend>,
    master: &MasterKey,
    password: &str,
) -> Result<KeyId, KeyFileError> {
    let file = seal(master, password)?;
    let bytes =
        serde_json::to_vec(&file).map_err(|e| KeyFileError::Encode(format!("key file: {e}")))?;
    verify(&bytes, master, password)?;
    let id = KeyId::from(Id::new(Sha256::digest(&bytes).into()));
    be.write_bytes(FileType::Key, &id, false, bytes.into())
        .map_err(|e| KeyFileError::Backend(e.to_string()))?;
    Ok(id)
}

/// The key file: scrypt(password, salt) is the 64-byte key that encrypts and
/// authenticates the master key's JSON (AES-256-CTR + Poly1305-AES, nonce first).
fn seal(master: &MasterKey, password: &str) -> Result<KeyFile, KeyFileError> {
    let params = scrypt::Params::new(LOG_N, R, P).map_err(|e| KeyFileError::Kdf(e.to_string()))?;
    let mut salt = vec![0u8; 64];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mut derived = Zeroizing::new([0u8; 64]);
    scrypt::scrypt(password.as_bytes(), &salt, &params, derived.as_mut())
        .map_err(|e| KeyFileError::Kdf(e.to_string()))?;
    let plain = Zeroizing::new(
        serde_json::to_vec(master).map_err(|e| KeyFileError::Encode(e.to_string()))?,
    );
    let mut nonce = Nonce::default();
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sealed = Aes256CtrPoly1305Aes::new(Key::from_slice(derived.as_ref()))
        .encrypt(&nonce, plain.as_slice())
        .map_err(|e| KeyFileError::Encode(format!("encrypting the master key: {e}")))?;
    let mut data = nonce.to_vec();
    data.extend_from_slice(&sealed);
    Ok(KeyFile {
        hostname: None,
        username: None,
        created: Some(rustic_core::jiff::Zoned::now()),
        kdf: "scrypt".into(),
        n: 1 << LOG_N,
        r: R,
        p: P,
        data,
        salt,
    })
}

/// Decodes `bytes` as rustic_core does when opening a repository and checks the master
/// key that comes out.
fn verify(bytes: &[u8], master: &MasterKey, password: &str) -> Result<(), KeyFileError> {
    let file: KeyFile =
        serde_json::from_slice(bytes).map_err(|e| KeyFileError::Verify(e.to_string()))?;
    let (encrypt, k, r) = file
        .key_from_password(&password)
        .map_err(|e| KeyFileError::Verify(e.to_string()))?
        .to_keys();
    let (encrypt, k, r) = (
        Zeroizing::new(encrypt),
        Zeroizing::new(k),
        Zeroizing::new(r),
    );
    if *encrypt != master.encrypt || *k != master.mac.k || *r != master.mac.r {
        return Err(KeyFileError::Verify(
            "it holds a different master key".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master_with(encrypt: &str) -> MasterKey {
        serde_json::from_str(&format!(
            r#"{{"mac":{{"k":"AQEBAQEBAQEBAQEBAQEBAQ==","r":"AgICAgICAgICAgICAgICAg=="}},"encrypt":"{encrypt}"}}"#
        ))
        .unwrap()
    }

    fn master() -> MasterKey {
        master_with("AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=")
    }

    #[test]
    fn a_sealed_key_opens_with_its_password_only() {
        let file = seal(&master(), "correct horse").unwrap();
        assert_eq!((file.n, file.r, file.p), (1 << 15, 8, 4));
        let bytes = serde_json::to_vec(&file).unwrap();
        verify(&bytes, &master(), "correct horse").unwrap();
        assert!(matches!(
            verify(&bytes, &master(), "wrong"),
            Err(KeyFileError::Verify(_))
        ));
        let other = master_with("BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=");
        assert!(verify(&bytes, &other, "correct horse").is_err());
    }
}
