//! age's two X25519 stanzas (`X25519` and `ssh-ed25519`,
//! https://c2sp.org/age#x25519-recipient-stanza and age's ssh-ed25519 extension) with
//! the Diffie-Hellman computed by AWS-LC.
//!
//! Why not age's own types: re-encrypting one secret to an age key and a host's ssh key
//! takes four X25519 scalar multiplications besides the two ephemeral keys' (open the old
//! file, wrap for each recipient, open the new file again to verify it); with age's own
//! types it took five, and they were most of `agex rekey`'s CPU. AWS-LC's X25519
//! (s2n-bignum, formally verified, constant time) takes about half the time of
//! x25519-dalek's (33 against 66 µs on this project's CI machine), and AWS-LC is linked
//! anyway (rustls). `age::x25519::Identity` also recomputes its public key for every
//! stanza it tries; [`CachedX25519`] derives it once; [`SshEd25519Recipient`] applies
//! its tweak to the key once instead of to every file's shared secret; each recipient
//! keeps a table of multiples of its point, so wrapping a file key for it is a
//! fixed-base multiplication (curve25519-dalek's tables, 9% fewer instructions for a
//! rekey); and the recipients are parsed once per run (see `crypt::Sealer`), not once
//! per file.
//!
//! The stanzas are byte-for-byte age's, built on age-core's own primitives (HKDF,
//! ChaCha20-Poly1305); tests check them against the age crate both ways.

use std::collections::HashSet;

use age::{DecryptError, EncryptError};
use age_core::format::{FileKey, Stanza, FILE_KEY_BYTES};
use age_core::primitives::{aead_decrypt, aead_encrypt, hkdf};
use age_core::secrecy::ExposeSecret;
use agex_core::RecipientKey;
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use base64::prelude::{Engine, BASE64_STANDARD_NO_PAD};
use curve25519_dalek::edwards::EdwardsBasepointTable;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::traits::BasepointTable;
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const X25519_TAG: &str = "X25519";
const X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const SSH_ED25519_TAG: &str = "ssh-ed25519";
const SSH_ED25519_LABEL: &[u8] = b"age-encryption.org/v1/ssh-ed25519";
const SECRET_HRP: &str = "age-secret-key-";
const PUBLIC_HRP: &str = "age";

/// A shared secret, wiped when dropped.
type Shared = Zeroizing<[u8; 32]>;

/// X25519(`secret`, `public`), or `None` when the result is all zero (`public` is a
/// low-order point), which age refuses.
fn dh(secret: &PrivateKey, public: &[u8; 32]) -> Option<Shared> {
    agreement::agree(
        secret,
        UnparsedPublicKey::new(&X25519, public),
        (),
        |bytes| {
            let mut out = Zeroizing::new([0u8; 32]);
            if bytes.len() != 32 {
                return Err(());
            }
            out.copy_from_slice(bytes);
            Ok(out)
        },
    )
    .ok()
    .filter(|s| s.iter().any(|b| *b != 0))
}

/// A scalar as an AWS-LC private key (clamped when used, as X25519 requires).
fn scalar(bytes: &[u8; 32]) -> Option<PrivateKey> {
    PrivateKey::from_private_key(&X25519, bytes).ok()
}

/// The public key (base point times `secret`).
fn public_of(secret: &PrivateKey) -> Option<[u8; 32]> {
    secret.compute_public_key().ok()?.as_ref().try_into().ok()
}

/// A fresh ephemeral key pair, its scalar from the OS RNG as age takes it (AWS-LC's own
/// RNG would seed itself per thread from CPU jitter: 7% of a rekey): the scalar's bytes
/// and its public share.
fn ephemeral() -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), EncryptError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    OsRng.try_fill_bytes(bytes.as_mut()).map_err(|e| {
        EncryptError::Io(std::io::Error::other(format!(
            "the OS random number generator failed: {e}"
        )))
    })?;
    let keyless = || EncryptError::Io(std::io::Error::other("cannot make an X25519 key"));
    let epk = scalar(&bytes)
        .and_then(|esk| public_of(&esk))
        .ok_or_else(keyless)?;
    Ok((bytes, epk))
}

/// A recipient's X25519 point with a table of its multiples, so that X25519(e, point)
/// for each file's fresh scalar e is a fixed-base multiplication (about two thirds of
/// the time of the ladder).
///
/// X25519 multiplies by the clamped scalar as an integer; the table does the same
/// (`mul_base_clamped` takes the unreduced clamped integer), so a point with a small-
/// order component gives the ladder's result too. The sign lost in the u-coordinate
/// does not matter: −P's multiples have the same u. Points the map to Edwards form
/// refuses (on the twist, or u = −1) keep the ladder.
struct FixedPoint {
    u: [u8; 32],
    table: Option<Box<EdwardsBasepointTable>>,
}

impl FixedPoint {
    fn new(u: [u8; 32]) -> FixedPoint {
        let table = MontgomeryPoint(u)
            .to_edwards(0)
            .map(|p| Box::new(EdwardsBasepointTable::create(&p)));
        FixedPoint { u, table }
    }

    /// X25519(`e`, the point), or `None` when it is all zero.
    fn times(&self, e: &[u8; 32]) -> Option<Shared> {
        let Some(table) = &self.table else {
            return dh(&scalar(e)?, &self.u);
        };
        let mut product = table.mul_base_clamped(*e);
        let shared = Zeroizing::new(product.to_montgomery().to_bytes());
        product.zeroize();
        Some(shared).filter(|s| s.iter().any(|b| *b != 0))
    }
}

/// Wraps `file_key` for the holder of `public`: the stanza body and its ephemeral share.
/// The shared secret is the ephemeral scalar times `point`: `public` itself, or for
/// ssh-ed25519 the key already multiplied by its tweak (see [`SshEd25519Recipient`]).
fn wrap(
    file_key: &FileKey,
    point: &FixedPoint,
    public: &[u8; 32],
    label: &[u8],
) -> Result<(Vec<u8>, String), EncryptError> {
    let (esk, epk) = ephemeral()?;
    let shared = point.times(&esk).ok_or_else(|| {
        EncryptError::Io(std::io::Error::other(
            "the X25519 shared secret is zero; the RNG or the recipient key is broken",
        ))
    })?;
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&epk);
    salt[32..].copy_from_slice(public);
    let mut key = hkdf(&salt, label, shared.as_ref());
    let body = aead_encrypt(&key, file_key.expose_secret());
    key.zeroize();
    Ok((body, BASE64_STANDARD_NO_PAD.encode(epk)))
}

/// Decodes a stanza argument that must be canonical base64 of exactly `N` bytes.
fn base64_arg<const N: usize>(arg: &str) -> Option<[u8; N]> {
    let bytes = BASE64_STANDARD_NO_PAD.decode(arg).ok()?;
    let array: [u8; N] = bytes.try_into().ok()?;
    (BASE64_STANDARD_NO_PAD.encode(array) == arg).then_some(array)
}

/// Opens an X25519-shaped stanza body with `secret`: `Some(Err)` for a malformed stanza,
/// `None` when it was sealed to someone else.
fn unwrap_body(
    secret: &PrivateKey,
    public: &[u8; 32],
    epk_arg: &str,
    body: &[u8],
    label: &[u8],
) -> Option<Result<FileKey, DecryptError>> {
    let Some(epk) = base64_arg::<32>(epk_arg) else {
        return Some(Err(DecryptError::InvalidHeader));
    };
    if body.len() != FILE_KEY_BYTES + 16 {
        return Some(Err(DecryptError::InvalidHeader));
    }
    let Some(shared) = dh(secret, &epk) else {
        return Some(Err(DecryptError::InvalidHeader));
    };
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&epk);
    salt[32..].copy_from_slice(public);
    let mut key = hkdf(&salt, label, shared.as_ref());
    let opened = aead_decrypt(&key, FILE_KEY_BYTES, body).ok();
    key.zeroize();
    opened.map(|mut pt| {
        Ok(FileKey::init_with_mut(|file_key| {
            file_key.copy_from_slice(&pt);
            pt.zeroize();
        }))
    })
}

/// An X25519 identity with its public key at hand.
pub struct CachedX25519 {
    secret: PrivateKey,
    public: [u8; 32],
}

impl CachedX25519 {
    /// The same identity as `id`, or `None` if its encoding is not what age writes.
    pub fn new(id: &age::x25519::Identity) -> Option<CachedX25519> {
        let encoded = id.to_string();
        let (hrp, data) = bech32::decode(encoded.expose_secret()).ok()?;
        let data = Zeroizing::new(data);
        if !hrp.as_str().eq_ignore_ascii_case(SECRET_HRP) {
            return None;
        }
        let bytes: Zeroizing<[u8; 32]> = Zeroizing::new(data.as_slice().try_into().ok()?);
        let secret = scalar(&bytes)?;
        let public = public_of(&secret)?;
        // The public key must be the one age derives, or this is not the same identity.
        if id.to_public().to_string() != age_recipient(&public)? {
            return None;
        }
        Some(CachedX25519 { secret, public })
    }
}

/// The `age1…` string of a public key.
fn age_recipient(public: &[u8; 32]) -> Option<String> {
    let hrp = bech32::Hrp::parse(PUBLIC_HRP).ok()?;
    bech32::encode::<bech32::Bech32>(hrp, public).ok()
}

impl age::Identity for CachedX25519 {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, DecryptError>> {
        if stanza.tag != X25519_TAG {
            return None;
        }
        let [arg] = &stanza.args[..] else {
            return Some(Err(DecryptError::InvalidHeader));
        };
        // Not ours (another X25519 recipient's stanza) is `None`: the next identity tries.
        unwrap_body(&self.secret, &self.public, arg, &stanza.body, X25519_LABEL)
    }
}

/// An age X25519 recipient (`age1…`).
pub struct X25519Recipient {
    public: [u8; 32],
    point: FixedPoint,
}

impl X25519Recipient {
    /// Parses an `age1…` string; `None` if it is not one.
    pub fn parse(s: &str) -> Option<X25519Recipient> {
        let (hrp, data) = bech32::decode(s).ok()?;
        if hrp.as_str() != PUBLIC_HRP {
            return None;
        }
        let public: [u8; 32] = data.as_slice().try_into().ok()?;
        Some(X25519Recipient {
            public,
            point: FixedPoint::new(public),
        })
    }
}

impl age::Recipient for X25519Recipient {
    fn wrap_file_key(
        &self,
        file_key: &FileKey,
    ) -> Result<(Vec<Stanza>, HashSet<String>), EncryptError> {
        let (body, epk) = wrap(file_key, &self.point, &self.public, X25519_LABEL)?;
        let stanza = Stanza {
            tag: X25519_TAG.into(),
            args: vec![epk],
            body,
        };
        Ok((vec![stanza], HashSet::new()))
    }
}

/// An ssh-ed25519 recipient: its key converted to X25519, and that key multiplied by the
/// recipient's tweak, both computed once.
///
/// age's stanza takes the shared secret X25519(tweak, X25519(e, P)) for the ephemeral
/// scalar e and the key P. Clamped scalars are integers and scalar multiplication
/// commutes, so that is X25519(e, X25519(tweak, P)): with X25519(tweak, P) computed here,
/// each file needs one multiplication for this recipient instead of two, and the stanza
/// is bit for bit the one age writes (tested against age).
pub struct SshEd25519Recipient {
    tag: String,
    public: [u8; 32],
    tweaked: FixedPoint,
}

/// Why an ssh-ed25519 recipient key cannot be encrypted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    /// The key's text is not base64.
    #[error("the ssh key is not valid base64")]
    NotBase64,
    /// The blob is not `string "ssh-ed25519", string key`.
    #[error("not an ssh-ed25519 public key blob")]
    NotEd25519,
    /// The 32 bytes are not a point of the curve.
    #[error("the ed25519 public key is not a point on the curve")]
    NotOnCurve,
    /// The tweak derived from the key is not a scalar.
    #[error("cannot derive the ssh-ed25519 tweak")]
    Tweak,
    /// The key is a low-order point, which would give a known shared secret.
    #[error("the ed25519 public key is a low-order point")]
    LowOrder,
}

impl SshEd25519Recipient {
    /// From an ssh-ed25519 recipient key; the error says what is wrong with it.
    pub fn new(key: &RecipientKey) -> Result<SshEd25519Recipient, SshKeyError> {
        let wire = key.ssh_wire().ok_or(SshKeyError::NotBase64)?;
        let tag = key.ssh_stanza_tag().ok_or(SshKeyError::NotBase64)?;
        let point = ed25519_key(&wire)
            .ok_or(SshKeyError::NotEd25519)
            .and_then(|k| {
                curve25519_dalek::edwards::CompressedEdwardsY(k)
                    .decompress()
                    .ok_or(SshKeyError::NotOnCurve)
            })?;
        let tweak_bytes: Zeroizing<[u8; 32]> = Zeroizing::new(hkdf(&wire, SSH_ED25519_LABEL, &[]));
        let tweak = scalar(&tweak_bytes).ok_or(SshKeyError::Tweak)?;
        let public = point.to_montgomery().to_bytes();
        let tweaked = dh(&tweak, &public).ok_or(SshKeyError::LowOrder)?;
        Ok(SshEd25519Recipient {
            tag,
            public,
            tweaked: FixedPoint::new(*tweaked),
        })
    }
}

/// The 32-byte key in an ssh-ed25519 blob: string "ssh-ed25519", string key.
fn ed25519_key(wire: &[u8]) -> Option<[u8; 32]> {
    let (kind, rest) = ssh_string(wire)?;
    let (key, rest) = ssh_string(rest)?;
    (kind == SSH_ED25519_TAG.as_bytes() && rest.is_empty())
        .then(|| key.try_into().ok())
        .flatten()
}

/// One length-prefixed string of the ssh wire format, and what follows it.
fn ssh_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let s = b.get(4..4usize.checked_add(len)?)?;
    Some((s, &b[4 + len..]))
}

impl age::Recipient for SshEd25519Recipient {
    fn wrap_file_key(
        &self,
        file_key: &FileKey,
    ) -> Result<(Vec<Stanza>, HashSet<String>), EncryptError> {
        let (body, epk) = wrap(file_key, &self.tweaked, &self.public, SSH_ED25519_LABEL)?;
        let stanza = Stanza {
            tag: SSH_ED25519_TAG.into(),
            args: vec![self.tag.clone(), epk],
            body,
        };
        Ok((vec![stanza], HashSet::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn encrypt(to: &dyn age::Recipient, msg: &[u8]) -> Vec<u8> {
        let enc = age::Encryptor::with_recipients(std::iter::once(to)).unwrap();
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
    fn the_identity_opens_what_age_sealed_and_nothing_else() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let cached = CachedX25519::new(&id).unwrap();
        let file = encrypt(&id.to_public(), b"the secret");
        assert_eq!(decrypt(&cached, &file).unwrap(), b"the secret");
        let theirs = encrypt(&other.to_public(), b"not ours");
        assert!(matches!(
            decrypt(&cached, &theirs),
            Err(DecryptError::NoMatchingKeys)
        ));
    }

    #[test]
    fn age_opens_what_the_x25519_recipient_sealed() {
        let id = age::x25519::Identity::generate();
        let ours = X25519Recipient::parse(&id.to_public().to_string()).unwrap();
        let file = encrypt(&ours, b"to age");
        assert_eq!(decrypt(&id, &file).unwrap(), b"to age");
        assert_eq!(
            decrypt(&CachedX25519::new(&id).unwrap(), &file).unwrap(),
            b"to age"
        );
        let other = age::x25519::Identity::generate();
        assert!(decrypt(&other, &file).is_err());
        assert!(X25519Recipient::parse("age1notakey").is_none());
    }

    // A throwaway ed25519 key pair made by ssh-keygen, only for this test.
    const SSH_PRIVATE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACCyNJEeZ98ZpJ4hxc3YNs/upWL1ym4/7dby6cngg8xu8gAAAIjJjka9yY5G
vQAAAAtzc2gtZWQyNTUxOQAAACCyNJEeZ98ZpJ4hxc3YNs/upWL1ym4/7dby6cngg8xu8g
AAAEB3y3pUra1Ftnp/iAkSqnClgrnMQGo/IGV/aZONJ9pCRrI0kR5n3xmkniHFzdg2z+6l
YvXKbj/t1vLpyeCDzG7yAAAAAAECAwQF
-----END OPENSSH PRIVATE KEY-----
";
    const SSH_PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILI0kR5n3xmkniHFzdg2z+6lYvXKbj/t1vLpyeCDzG7y";

    #[test]
    fn age_opens_what_the_ssh_recipient_sealed_with_the_same_stanza_tag() {
        let ours = SshEd25519Recipient::new(&SSH_PUBLIC.parse().unwrap()).unwrap();
        let file = encrypt(&ours, b"to the host");
        let id = age::ssh::Identity::from_buffer(SSH_PRIVATE.as_bytes(), None).unwrap();
        assert_eq!(decrypt(&id, &file).unwrap(), b"to the host");
        // The stanza line is the one age writes: same type and key tag.
        let theirs = encrypt(
            &SSH_PUBLIC.parse::<age::ssh::Recipient>().unwrap(),
            b"to the host",
        );
        let stanza_head = |f: &[u8]| {
            let text = String::from_utf8_lossy(f).into_owned();
            let line = text
                .lines()
                .find(|l| l.starts_with("-> "))
                .unwrap()
                .to_string();
            line.split(' ').take(3).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(stanza_head(&file), stanza_head(&theirs));
    }

    #[test]
    fn a_bad_ssh_blob_is_refused_with_a_reason() {
        assert!(ed25519_key(b"short").is_none());
        let mut wire = BASE64_STANDARD_NO_PAD
            .decode(SSH_PUBLIC.split_whitespace().nth(1).unwrap())
            .unwrap();
        assert!(ed25519_key(&wire).is_some());
        wire.push(0);
        assert!(ed25519_key(&wire).is_none());
        let not_ssh: RecipientKey =
            "age1y2jwy3pm97kq5epced2l03ed6mc084tq0q2v645yx9p8qmrx75esje5me0"
                .parse()
                .unwrap();
        assert!(SshEd25519Recipient::new(&not_ssh).is_err());
    }

    #[test]
    fn a_malformed_or_low_order_stanza_is_an_invalid_header() {
        let id = age::x25519::Identity::generate();
        let cached = CachedX25519::new(&id).unwrap();
        let stanza = Stanza {
            tag: X25519_TAG.into(),
            args: vec!["AAAA".into()],
            body: vec![0; 32],
        };
        assert!(matches!(
            age::Identity::unwrap_stanza(&cached, &stanza),
            Some(Err(DecryptError::InvalidHeader))
        ));
        // The all-zero share (a low-order point) is refused, as age refuses it.
        let zero = Stanza {
            tag: X25519_TAG.into(),
            args: vec![BASE64_STANDARD_NO_PAD.encode([0u8; 32])],
            body: vec![0; 32],
        };
        assert!(matches!(
            age::Identity::unwrap_stanza(&cached, &zero),
            Some(Err(DecryptError::InvalidHeader))
        ));
    }

    #[test]
    fn the_tweak_may_come_first() {
        for seed in 1u8..16 {
            let [e, t, p] = [3u8, 5, 11].map(|m| {
                let mut b = [seed.wrapping_mul(m); 32];
                b[0] = m;
                scalar(&b).unwrap()
            });
            let point = public_of(&p).unwrap();
            let late = dh(&t, &dh(&e, &point).unwrap()).unwrap();
            let early = dh(&e, &dh(&t, &point).unwrap()).unwrap();
            assert_eq!(*late, *early);
        }
    }

    #[test]
    fn the_fixed_point_table_gives_the_ladders_result() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let mut points = vec![];
        for seed in 1u8..6 {
            let p = public_of(&scalar(&[seed.wrapping_mul(29); 32]).unwrap()).unwrap();
            points.push(p);
            // The same point plus a small-order component: clamping clears it for the
            // ladder, and must for the table too.
            let ed = MontgomeryPoint(p).to_edwards(0).unwrap();
            for t in &EIGHT_TORSION[1..] {
                points.push((ed + t).to_montgomery().to_bytes());
            }
        }
        // u = 2 is on the twist: no Edwards form, so the ladder is used.
        let twist = {
            let mut u = [0u8; 32];
            u[0] = 2;
            u
        };
        assert!(MontgomeryPoint(twist).to_edwards(0).is_none());
        points.push(twist);
        for (i, u) in points.iter().enumerate() {
            let fixed = FixedPoint::new(*u);
            assert_eq!(fixed.table.is_none(), *u == twist);
            for k in 0u8..8 {
                let mut e = [k.wrapping_mul(53).wrapping_add(i as u8); 32];
                e[31] = 0xff; // clamping must clear the top bit, not the caller
                let ladder = dh(&scalar(&e).unwrap(), u).map(|s| *s);
                assert_eq!(fixed.times(&e).map(|s| *s), ladder, "point {i}, scalar {k}");
            }
        }
        // A low-order point gives the all-zero secret, which is refused.
        let low = FixedPoint::new(EIGHT_TORSION[1].to_montgomery().to_bytes());
        assert!(low.times(&[7u8; 32]).is_none());
    }

    #[test]
    fn aws_lc_and_dalek_agree_on_x25519() {
        for seed in 0u8..16 {
            let a = [seed.wrapping_mul(31).wrapping_add(7); 32];
            let b = [seed.wrapping_mul(17).wrapping_add(3); 32];
            let theirs = x25519_dalek::StaticSecret::from(a).diffie_hellman(
                &x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(b)),
            );
            let ours = dh(
                &scalar(&a).unwrap(),
                &public_of(&scalar(&b).unwrap()).unwrap(),
            )
            .unwrap();
            assert_eq!(&*ours, theirs.as_bytes());
        }
    }
}
