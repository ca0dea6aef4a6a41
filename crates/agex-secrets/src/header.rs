//! The age header: which stanzas a file carries and a digest of it, read without any
//! identity. The lock file stores the digest; `check` compares stanzas with the rules.

use std::borrow::Cow;
use std::io::Read;

use sha2::{Digest, Sha256};

const MAGIC: &str = "age-encryption.org/v1";
const ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";

/// One recipient stanza of an age header: `-> TYPE ARG...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    /// The stanza type (`X25519`, `ssh-ed25519`, `ssh-rsa`, a plugin's type, …).
    pub kind: String,
    /// Its arguments (for ssh stanzas, the first is the key tag).
    pub args: Vec<String>,
}

/// The parsed header of an age file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The recipient stanzas, in file order.
    pub stanzas: Vec<Stanza>,
    /// `sha256:<hex>` of the header bytes (through the MAC line).
    pub digest: String,
    /// Whether the file is ASCII-armored.
    pub armored: bool,
}

/// Why bytes are not an age file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(pub String);

impl Header {
    /// Reads the header of an age file (binary or armored).
    pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        let binary = dearmor(bytes)?;
        let mut stanzas = Vec::new();
        let len = scan(&binary, |kind, args| {
            // age adds random "grease" stanzas so parsers stay tolerant; they wrap nothing.
            if !kind.ends_with("-grease") {
                stanzas.push(Stanza {
                    kind: kind.to_string(),
                    args: args.split(' ').map(str::to_string).collect(),
                });
            }
        })?;
        if stanzas.is_empty() {
            return Err(HeaderError("header has no recipient stanzas".into()));
        }
        Ok(Header {
            stanzas,
            digest: format!("sha256:{}", hex(&Sha256::digest(&binary[..len]))),
            armored: matches!(binary, Cow::Owned(_)),
        })
    }

    /// The key tags of the ssh stanzas (`ssh-ed25519`/`ssh-rsa`), in file order.
    pub fn ssh_tags(&self) -> Vec<&str> {
        self.stanzas
            .iter()
            .filter(|s| s.kind == "ssh-ed25519" || s.kind == "ssh-rsa")
            .filter_map(|s| s.args.first().map(String::as_str))
            .collect()
    }

    /// How many stanzas of each type, e.g. `2 X25519, 1 ssh-ed25519`.
    pub fn summary(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for s in &self.stanzas {
            match counts.iter_mut().find(|(k, _)| *k == s.kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((&s.kind, 1)),
            }
        }
        counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a strict read of a binary header found, without keeping its stanzas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Whether a stanza is a passphrase (`scrypt`) stanza.
    pub scrypt: bool,
}

/// Checks a binary age header against the spec's grammar. The `age` crate still
/// accepts the pre-1.0 encoding of stanza bodies (a stanza without a body, or whose
/// body ends on a full line), which the spec and its test vectors (C2SP CCTV
/// `stanza_missing_body`, `stanza_missing_final_line`) call a broken header, so agex
/// runs this before handing a file to it.
pub fn shape(binary: &[u8]) -> Result<Shape, HeaderError> {
    let mut scrypt = false;
    scan(binary, |kind, _| scrypt |= kind == "scrypt")?;
    Ok(Shape { scrypt })
}

/// The binary form of an age file: the bytes themselves, or their ASCII armor decoded.
/// Whitespace around the armor is allowed (age's spec; `armor_whitespace_outside`),
/// which the `age` crate's reader does not skip.
pub fn dearmor(bytes: &[u8]) -> Result<Cow<'_, [u8]>, HeaderError> {
    let trimmed = bytes.trim_ascii();
    if !trimmed.starts_with(ARMOR_BEGIN) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut binary = Vec::with_capacity(trimmed.len() * 3 / 4);
    age::armor::ArmoredReader::new(trimmed)
        .read_to_end(&mut binary)
        .map_err(|e| HeaderError(format!("broken ASCII armor: {e}")))?;
    Ok(Cow::Owned(binary))
}

/// Reads the header of a binary age file strictly, calling `stanza` with each stanza's
/// type and its arguments (space-separated); returns the header's length through the
/// MAC line.
fn scan(bytes: &[u8], mut stanza: impl FnMut(&str, &str)) -> Result<usize, HeaderError> {
    let mut pos = 0;
    let mut next_line = |what: &str| -> Result<&[u8], HeaderError> {
        let rest = &bytes[pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            HeaderError(format!(
                "truncated header (no end of line while reading {what})"
            ))
        })?;
        pos += end + 1;
        Ok(&rest[..end])
    };
    if next_line("the version line")? != MAGIC.as_bytes() {
        return Err(HeaderError(
            "does not start with `age-encryption.org/v1` (not an age file, or an unsupported version)".into(),
        ));
    }
    loop {
        let line = next_line("a stanza")?;
        if let Some(mac) = line.strip_prefix(b"--- ") {
            // The MAC is HMAC-SHA-256: 32 bytes, 43 characters of canonical base64.
            if mac.len() != 43 || !canonical_base64(mac) {
                return Err(HeaderError(
                    "header MAC is not 43 characters of canonical base64".into(),
                ));
            }
            break;
        }
        let Some(rest) = line.strip_prefix(b"-> ") else {
            return Err(HeaderError(format!(
                "malformed header line `{}`",
                truncate(&String::from_utf8_lossy(line))
            )));
        };
        // Type and arguments are non-empty strings of visible ASCII, one space apart.
        if rest.split(|&b| b == b' ').any(|w| w.is_empty())
            || rest.iter().any(|&b| b != b' ' && !(33..=126).contains(&b))
        {
            return Err(HeaderError(format!(
                "malformed stanza line `{}` (empty or non-printable argument)",
                truncate(&String::from_utf8_lossy(line))
            )));
        }
        let rest =
            std::str::from_utf8(rest).map_err(|_| HeaderError("header is not text".into()))?;
        let (kind, args) = rest.split_once(' ').unwrap_or((rest, ""));
        // The body: full 64-column lines, then always one shorter (maybe empty) line.
        loop {
            let body = next_line("a stanza body")?;
            if body.len() > 64 {
                return Err(HeaderError(format!(
                    "`{kind}` stanza: body line longer than 64 columns"
                )));
            }
            if !canonical_base64(body) {
                return Err(HeaderError(format!(
                    "`{kind}` stanza: body is not canonical base64 ending in a line shorter than 64 columns"
                )));
            }
            if body.len() < 64 {
                break;
            }
        }
        stanza(kind, args);
    }
    if bytes.len() <= pos {
        return Err(HeaderError("truncated: no payload after the header".into()));
    }
    Ok(pos)
}

/// Whether `line` is unpadded base64 (RFC 4648) of whole bytes without stray bits.
fn canonical_base64(line: &[u8]) -> bool {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    if line.iter().any(|&c| value(c).is_none()) {
        return false;
    }
    let last = line.last().and_then(|&c| value(c)).unwrap_or(0);
    match line.len() % 4 {
        0 => true,
        1 => false,
        2 => last & 0x0f == 0,
        _ => last & 0x03 == 0,
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANZA: &str = "-> X25519 TEiF0ypqr+bpvcqXNyCVJpL7OuwPdVwPL7KQEbFDOCc\nhjabGXwSLQ9c3S6Lw2i+S2Tu2fiwQHHslbBN6B41FLE\n";
    const MAC: &str = "--- Vn+54jqiiUCE+WZcEVY3f1sqHjlu/z1LCQ/T7Xm7qI0\n";

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x09, 0x9f, 0xa0, 0xff]), "00099fa0ff");
        assert_eq!(hex(&[]), "");
    }

    fn file(middle: &str) -> Vec<u8> {
        format!("age-encryption.org/v1\n{STANZA}{middle}{MAC}")
            .into_bytes()
            .into_iter()
            .chain([0u8; 32])
            .collect()
    }

    #[test]
    fn accepts_empty_and_full_bodies_that_end_on_a_short_line() {
        let full = "A".repeat(64);
        for middle in [
            "",
            "-> empty\n\n",
            &format!("-> full\n{full}\n\n"),
            &format!("-> more\n{full}\nAAAA\n"),
        ] {
            let h = Header::parse(&file(middle)).unwrap_or_else(|e| panic!("{middle:?}: {e}"));
            assert_eq!(h.stanzas[0].kind, "X25519");
        }
    }

    #[test]
    fn refuses_the_legacy_bodies_the_age_crate_still_accepts() {
        let full = "A".repeat(64);
        for (middle, why) in [
            ("-> empty\n", "stanza_missing_body"),
            (
                &format!("-> stanza\n{full}\n") as &str,
                "stanza_missing_final_line",
            ),
            ("-> x\nAA==\n", "padding"),
            ("-> x\nAB\n", "trailing bits"),
            ("-> x\nA\n", "one character"),
            ("-> x \n\n", "empty argument"),
            ("-> x\r\n\n", "spurious CR"),
        ] {
            assert!(Header::parse(&file(middle)).is_err(), "{why} was accepted");
            assert!(shape(&file(middle)).is_err(), "{why} was accepted by shape");
        }
    }

    #[test]
    fn whitespace_around_the_armor_is_allowed_and_scrypt_is_seen() {
        let mut armored = Vec::new();
        {
            use std::io::Write;
            let mut w = age::armor::ArmoredWriter::wrap_output(
                &mut armored,
                age::armor::Format::AsciiArmor,
            )
            .unwrap();
            w.write_all(&file("")).unwrap();
            w.finish().unwrap();
        }
        let spaced = [b"\n\r  \t\n".as_slice(), &armored, b"\n \t\r\n"].concat();
        let h = Header::parse(&spaced).unwrap();
        assert!(h.armored);
        assert_eq!(h.digest, Header::parse(&file("")).unwrap().digest);
        assert!(!shape(&dearmor(&spaced).unwrap()).unwrap().scrypt);
        assert!(shape(&file("-> scrypt c2FsdA 18\nAAAA\n")).unwrap().scrypt);
    }
}
