//! The digests of a service's last walk, kept on disk in a compact binary file sorted by
//! path bytes, so that a walk (sorted the same way) reads it alongside in one pass and
//! never holds the whole tree's cache in memory (as borg's files cache decides, a file
//! whose size, mtime, ctime and inode are unchanged keeps its digest).
//!
//! Format: `AGEXDC1\n`, then per file: path length (u32 LE), path bytes, size (u64),
//! mtime and ctime (i128 nanoseconds), inode (u64), SHA-256 (32 bytes), all little-endian.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"AGEXDC1\n";

/// What says a file is unchanged since its digest was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl Stamp {
    /// Changed less than two seconds before `now_ns` (or after it).
    pub fn recent(&self, now_ns: i128) -> bool {
        let limit = now_ns - 2_000_000_000;
        self.mtime_ns >= limit || self.ctime_ns >= limit
    }

    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

struct Record {
    path: Vec<u8>,
    stamp: Stamp,
    digest: [u8; 32],
}

/// A cache file read front to back while a sorted walk asks for its paths in order.
pub(crate) struct CacheReader {
    input: Option<BufReader<File>>,
    next: Option<Record>,
}

impl CacheReader {
    /// The cache at `path`; a missing, foreign or damaged file reads as empty from there
    /// on (those files are read again).
    pub fn open(path: &Path) -> CacheReader {
        let input = File::open(path).ok().and_then(|f| {
            let mut r = BufReader::with_capacity(1 << 16, f);
            let mut magic = [0u8; 8];
            (r.read_exact(&mut magic).is_ok() && &magic == MAGIC).then_some(r)
        });
        let mut reader = CacheReader { input, next: None };
        reader.advance();
        reader
    }

    fn advance(&mut self) {
        self.next = self.input.as_mut().and_then(|r| read_record(r).ok());
        if self.next.is_none() {
            self.input = None;
        }
    }

    /// The digest (`sha256:<hex>`) cached for `path` if its stamp is `stamp`. Paths must
    /// be asked for in ascending byte order.
    pub fn lookup(&mut self, path: &[u8], stamp: &Stamp) -> Option<String> {
        while self.next.as_ref().is_some_and(|r| r.path.as_slice() < path) {
            self.advance();
        }
        let r = self.next.as_ref().filter(|r| r.path == path)?;
        (r.stamp == *stamp).then(|| format!("sha256:{}", agex_secrets::header::hex(&r.digest)))
    }
}

fn read_record(r: &mut impl Read) -> io::Result<Record> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let len = u32::from_le_bytes(n) as usize;
    if len > 65536 {
        return Err(io::Error::other("path too long"));
    }
    let mut path = vec![0u8; len];
    r.read_exact(&mut path)?;
    let mut fixed = [0u8; 8 + 16 + 16 + 8 + 32];
    r.read_exact(&mut fixed)?;
    let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().unwrap_or([0; 8]));
    let i128_at = |i: usize| i128::from_le_bytes(fixed[i..i + 16].try_into().unwrap_or([0; 16]));
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&fixed[48..80]);
    Ok(Record {
        path,
        stamp: Stamp {
            size: u64_at(0),
            mtime_ns: i128_at(8),
            ctime_ns: i128_at(24),
            ino: u64_at(40),
        },
        digest,
    })
}

/// A new cache file, written beside its place and renamed over it when complete.
pub(crate) struct CacheWriter {
    file: tempfile::NamedTempFile,
    out: Option<BufWriter<File>>,
}

impl CacheWriter {
    /// Starts the cache that will replace `path`.
    pub fn create(path: &Path) -> io::Result<CacheWriter> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let file = tempfile::Builder::new()
            .prefix(".digests-")
            .tempfile_in(dir)?;
        let mut out = BufWriter::with_capacity(1 << 16, file.reopen()?);
        out.write_all(MAGIC)?;
        Ok(CacheWriter {
            file,
            out: Some(out),
        })
    }

    /// Adds a file (in ascending path order); a digest that is not `sha256:<hex>` is
    /// left out.
    pub fn add(&mut self, path: &[u8], stamp: &Stamp, digest: &str) -> io::Result<()> {
        let Some(raw) = digest
            .strip_prefix("sha256:")
            .and_then(crate::manifest::unhex)
            .filter(|d| d.len() == 32)
        else {
            return Ok(());
        };
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let len = u32::try_from(path.len()).map_err(io::Error::other)?;
        out.write_all(&len.to_le_bytes())?;
        out.write_all(path)?;
        out.write_all(&stamp.size.to_le_bytes())?;
        out.write_all(&stamp.mtime_ns.to_le_bytes())?;
        out.write_all(&stamp.ctime_ns.to_le_bytes())?;
        out.write_all(&stamp.ino.to_le_bytes())?;
        out.write_all(&raw)
    }

    /// Puts the complete cache in place (mode 0600).
    pub fn finish(mut self, path: &Path) -> io::Result<()> {
        if let Some(out) = self.out.take() {
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        self.file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: u64) -> Stamp {
        Stamp {
            size: n,
            mtime_ns: i128::from(n) * 1_000_000_007,
            ctime_ns: -1,
            ino: n + 1,
        }
    }

    #[test]
    fn a_sorted_walk_finds_what_the_last_one_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bin");
        let d = |b: u8| format!("sha256:{}", agex_secrets::header::hex(&[b; 32]));
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(b"/a", &stamp(1), &d(1)).unwrap();
        w.add(b"/b\xff", &stamp(2), &d(2)).unwrap();
        w.add(b"/c", &stamp(3), &d(3)).unwrap();
        w.finish(&path).unwrap();
        let mut r = CacheReader::open(&path);
        assert_eq!(r.lookup(b"/a", &stamp(1)), Some(d(1)));
        assert_eq!(r.lookup(b"/aa", &stamp(1)), None);
        assert_eq!(r.lookup(b"/b\xff", &stamp(9)), None, "another stamp");
        assert_eq!(r.lookup(b"/c", &stamp(3)), Some(d(3)));
        assert_eq!(r.lookup(b"/d", &stamp(3)), None);
        // A foreign file is an empty cache.
        std::fs::write(&path, b"{\"old\": \"json\"}").unwrap();
        assert_eq!(CacheReader::open(&path).lookup(b"/a", &stamp(1)), None);
    }
}
