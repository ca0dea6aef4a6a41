//! The age header: which stanzas a file carries and a digest of it, read without any
//! identity. The lock file stores the digest; `check` compares stanzas with the rules.

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
        let trimmed = trim_ascii_start(bytes);
        if trimmed.starts_with(ARMOR_BEGIN) {
            let mut binary = Vec::new();
            age::armor::ArmoredReader::new(trimmed)
                .read_to_end(&mut binary)
                .map_err(|e| HeaderError(format!("broken ASCII armor: {e}")))?;
            let mut h = Header::parse_binary(&binary)?;
            h.armored = true;
            return Ok(h);
        }
        Header::parse_binary(bytes)
    }

    fn parse_binary(bytes: &[u8]) -> Result<Header, HeaderError> {
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
        let magic = next_line("the version line")?;
        if magic != MAGIC.as_bytes() {
            return Err(HeaderError(
                "does not start with `age-encryption.org/v1` (not an age file, or an unsupported version)".into(),
            ));
        }
        let mut stanzas = Vec::new();
        loop {
            let line = next_line("a stanza")?;
            let line =
                std::str::from_utf8(line).map_err(|_| HeaderError("header is not text".into()))?;
            if let Some(mac) = line.strip_prefix("--- ") {
                if mac.is_empty() {
                    return Err(HeaderError("header MAC is empty".into()));
                }
                break;
            }
            let Some(rest) = line.strip_prefix("-> ") else {
                return Err(HeaderError(format!(
                    "malformed header line `{}`",
                    truncate(line)
                )));
            };
            let mut words = rest.split(' ');
            let kind = words.next().unwrap_or_default().to_string();
            if kind.is_empty() {
                return Err(HeaderError("stanza without a type".into()));
            }
            let args = words.map(str::to_string).collect();
            loop {
                let body = next_line("a stanza body")?;
                if body.len() > 64 {
                    return Err(HeaderError(
                        "stanza body line longer than 64 columns".into(),
                    ));
                }
                if body.len() < 64 {
                    break;
                }
            }
            // age adds random "grease" stanzas so parsers stay tolerant; they wrap nothing.
            if !kind.ends_with("-grease") {
                stanzas.push(Stanza { kind, args });
            }
        }
        if stanzas.is_empty() {
            return Err(HeaderError("header has no recipient stanzas".into()));
        }
        if bytes.len() <= pos {
            return Err(HeaderError("truncated: no payload after the header".into()));
        }
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes[..pos])));
        Ok(Header {
            stanzas,
            digest,
            armored: false,
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

fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    &b[i..]
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
