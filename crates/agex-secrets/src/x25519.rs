//! An age X25519 identity that derives its public key once, not once per stanza.
//!
//! `age::x25519::Identity` recomputes its public key (a full base-point multiplication)
//! for every stanza it tries, because the key is part of the HKDF salt. Rekeying a
//! thousand secrets decrypts each twice (open, then verify the new file), so that was 15%
//! of `agex rekey`'s instructions. This is the same unwrap as age's
//! (https://c2sp.org/age#x25519-recipient-stanza), built on age-core's own primitives,
//! with the public key computed when the identity is loaded. Tests check it against age
//! both ways.

use age::DecryptError;
use age_core::format::{FileKey, Stanza, FILE_KEY_BYTES};
use age_core::primitives::{aead_decrypt, hkdf};
use age_core::secrecy::ExposeSecret;
use base64::prelude::{Engine, BASE64_STANDARD_NO_PAD};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

const TAG: &str = "X25519";
const LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const SECRET_HRP: &str = "age-secret-key-";

/// An X25519 identity with its public key at hand.
pub struct CachedX25519 {
    secret: StaticSecret,
    public: PublicKey,
}

impl CachedX25519 {
    /// The same identity as `id`, or `None` if its encoding is not what age writes.
    pub fn new(id: &age::x25519::Identity) -> Option<CachedX25519> {
        let encoded = id.to_string();
        let (hrp, mut data) = bech32::decode(encoded.expose_secret()).ok()?;
        if !hrp.as_str().eq_ignore_ascii_case(SECRET_HRP) || data.len() != 32 {
            data.zeroize();
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&data);
        data.zeroize();
        let secret = StaticSecret::from(bytes);
        bytes.zeroize();
        let public = PublicKey::from(&secret);
        // The public key must be the one age derives, or this is not the same identity.
        if id.to_public().to_string() != age_recipient(&public)? {
            return None;
        }
        Some(CachedX25519 { secret, public })
    }
}

/// The `age1…` string of a public key.
fn age_recipient(public: &PublicKey) -> Option<String> {
    let hrp = bech32::Hrp::parse("age").ok()?;
    bech32::encode::<bech32::Bech32>(hrp, public.as_bytes()).ok()
}

impl age::Identity for CachedX25519 {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, DecryptError>> {
        if stanza.tag != TAG {
            return None;
        }
        let [arg] = &stanza.args[..] else {
            return Some(Err(DecryptError::InvalidHeader));
        };
        // Canonical base64 of exactly 32 bytes, as age requires.
        let epk: [u8; 32] = match BASE64_STANDARD_NO_PAD.decode(arg) {
            Ok(b) if arg.len() == 43 => match b.try_into() {
                Ok(a) => a,
                Err(_) => return Some(Err(DecryptError::InvalidHeader)),
            },
            _ => return Some(Err(DecryptError::InvalidHeader)),
        };
        if BASE64_STANDARD_NO_PAD.encode(epk) != *arg || stanza.body.len() != FILE_KEY_BYTES + 16 {
            return Some(Err(DecryptError::InvalidHeader));
        }
        let epk = PublicKey::from(epk);
        let shared = self.secret.diffie_hellman(&epk);
        if !shared.was_contributory() {
            return Some(Err(DecryptError::InvalidHeader));
        }
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(epk.as_bytes());
        salt[32..].copy_from_slice(self.public.as_bytes());
        let mut key = hkdf(&salt, LABEL, shared.as_bytes());
        // Not ours (another X25519 recipient's stanza): let the next identity try.
        let opened = aead_decrypt(&key, FILE_KEY_BYTES, &stanza.body).ok();
        key.zeroize();
        opened.map(|mut pt| {
            Ok(FileKey::init_with_mut(|file_key| {
                file_key.copy_from_slice(&pt);
                pt.zeroize();
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn encrypt(to: &age::x25519::Recipient, msg: &[u8]) -> Vec<u8> {
        let enc =
            age::Encryptor::with_recipients(std::iter::once(to as &dyn age::Recipient)).unwrap();
        let mut out = vec![];
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(msg).unwrap();
        w.finish().unwrap();
        out
    }

    fn decrypt(id: &dyn age::Identity, file: &[u8]) -> Result<Vec<u8>, DecryptError> {
        let d = age::Decryptor::new(file)?;
        let mut r = d.decrypt(std::iter::once(id))?;
        let mut out = vec![];
        r.read_to_end(&mut out).map_err(DecryptError::Io)?;
        Ok(out)
    }

    #[test]
    fn opens_what_age_sealed_and_nothing_else() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let cached = CachedX25519::new(&id).unwrap();
        let file = encrypt(&id.to_public(), b"the secret");
        assert_eq!(decrypt(&cached, &file).unwrap(), b"the secret");
        assert_eq!(decrypt(&id, &file).unwrap(), b"the secret");
        let theirs = encrypt(&other.to_public(), b"not ours");
        assert!(matches!(
            decrypt(&cached, &theirs),
            Err(DecryptError::NoMatchingKeys)
        ));
    }

    #[test]
    fn a_malformed_stanza_is_an_invalid_header() {
        let id = age::x25519::Identity::generate();
        let cached = CachedX25519::new(&id).unwrap();
        let stanza = Stanza {
            tag: TAG.into(),
            args: vec!["AAAA".into()],
            body: vec![0; 32],
        };
        assert!(matches!(
            age::Identity::unwrap_stanza(&cached, &stanza),
            Some(Err(DecryptError::InvalidHeader))
        ));
        // The all-zero share (a low-order point) is refused, as age refuses it.
        let zero = Stanza {
            tag: TAG.into(),
            args: vec![BASE64_STANDARD_NO_PAD.encode([0u8; 32])],
            body: vec![0; 32],
        };
        assert!(matches!(
            age::Identity::unwrap_stanza(&cached, &zero),
            Some(Err(DecryptError::InvalidHeader))
        ));
    }
}
