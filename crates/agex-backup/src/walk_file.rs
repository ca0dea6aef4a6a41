//! A walk's files, on disk: one record per regular file, in walk order, with how the
//! walk saw it and its digest. A run writes it as it walks, with the digests the last
//! walk could vouch for; the files without one are read while the engines run, and
//! their records are completed in place ([`patch`]). Each repository's manifest is
//! serialized from it, and once complete it replaces the last walk's file, which the
//! next run's walk reads alongside as its digest cache (as borg's files cache decides, a
//! file whose size, mtime, ctime and inode are unchanged keeps its digest). It is never
//! held whole in memory: a service of half a million files costs the same memory as one
//! of a hundred.
//!
//! Walk order is path order compared component by component ([`path_order`]), the order
//! a directory walk sorted by file name yields: the writer never sorts.
//!
//! Format: `AGEXWF1\n`, the walk's start (i128 nanoseconds since the epoch), then per
//! file: path length (u32), path bytes, size (u64: the bytes agex read, which is the
//! stamp's size unless the file changed), mtime and ctime (i128 nanoseconds), inode
//! (u64), state (u8, [`Taken`]), SHA-256 (32 bytes); all little-endian.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"AGEXWF1\n";
/// Where the records start.
const HEAD: u64 = 8 + 16;
/// A record's bytes after its path: size, mtime, ctime, inode, state, digest.
const FIXED: usize = 8 + 16 + 16 + 8 + 1 + 32;
/// Longer than any path the kernel accepts: a record claiming more is damage.
const MAX_PATH: usize = 65_536;

/// What says a file is unchanged since its digest was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl Stamp {
    /// Changed less than two seconds before `now_ns` (or after it): the file system's
    /// timestamp granularity could hide a later write, so its digest is not kept.
    pub fn recent(&self, now_ns: i128) -> bool {
        let limit = now_ns - 2_000_000_000;
        self.mtime_ns >= limit || self.ctime_ns >= limit
    }

    /// The stamp of a `stat` (whose field types differ between targets).
    #[allow(clippy::unnecessary_cast)]
    pub fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
            ino: st.st_ino as u64,
        }
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

/// What agex knows of a file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The digest is of the file as the walk saw it (read then, or vouched for by the
    /// last walk's record of the same stamp).
    Stable = 0,
    /// It changed between the walk and the end of agex's read: the digest may be of
    /// neither version an engine stored.
    Changed = 1,
    /// Not read yet.
    Pending = 2,
    /// It could not be read (vanished, unreadable): the run warned, and it is in no
    /// manifest.
    Unread = 3,
}

impl Taken {
    fn of(byte: u8) -> Option<Taken> {
        [Taken::Stable, Taken::Changed, Taken::Pending, Taken::Unread]
            .into_iter()
            .find(|t| *t as u8 == byte)
    }
}

/// One regular file of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Host path.
    pub path: Vec<u8>,
    /// How the walk saw it.
    pub stamp: Stamp,
    /// Bytes agex read (the size it digested); the stamp's size until it is read.
    pub size: u64,
    /// SHA-256 of those bytes.
    pub digest: [u8; 32],
    /// What the digest is worth.
    pub taken: Taken,
}

impl Record {
    /// The digest as manifests spell it.
    pub fn digest_text(&self) -> String {
        format!("sha256:{}", agex_secrets::header::hex(&self.digest))
    }

    /// The host path.
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }

    /// Its bytes after the path.
    fn fixed(&self) -> [u8; FIXED] {
        let mut out = [0u8; FIXED];
        out[0..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..24].copy_from_slice(&self.stamp.mtime_ns.to_le_bytes());
        out[24..40].copy_from_slice(&self.stamp.ctime_ns.to_le_bytes());
        out[40..48].copy_from_slice(&self.stamp.ino.to_le_bytes());
        out[48] = self.taken as u8;
        out[49..81].copy_from_slice(&self.digest);
        out
    }
}

/// Where a record is in its walk file, for [`patch`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place(u64);

/// Writes the state, digest and size of a record read at `at` back into its walk file
/// (another record in its place is refused: the path length differs, or the caller
/// mixed files).
pub(crate) fn patch(file: &File, at: Place, r: &Record) -> io::Result<()> {
    file.write_all_at(&r.fixed(), at.0 + 4 + r.path.len() as u64)
}

/// Walk order: paths compared component by component (`/a/b` before `/a-b`, as a walk
/// sorted by file name yields them), not byte by byte.
pub(crate) fn path_order(a: &[u8], b: &[u8]) -> Ordering {
    Path::new(OsStr::from_bytes(a)).cmp(Path::new(OsStr::from_bytes(b)))
}

/// Reads from a shared file at its own position, so several readers (one per
/// repository) go through one open file.
struct At {
    file: Arc<File>,
    pos: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The records of a walk file, front to back.
pub(crate) struct Records {
    input: BufReader<At>,
    /// Where the next record starts.
    next_at: u64,
    /// When the walk that wrote them started.
    pub started_ns: i128,
}

impl Records {
    /// Reads `file` from its start; a file that is not a walk file is an error.
    pub fn of(file: Arc<File>) -> io::Result<Records> {
        let mut input = BufReader::with_capacity(1 << 16, At { file, pos: 0 });
        let mut head = [0u8; HEAD as usize];
        input.read_exact(&mut head)?;
        if &head[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a walk file of this agex version",
            ));
        }
        let started_ns = i128::from_le_bytes(le(&head[8..]));
        Ok(Records {
            input,
            next_at: HEAD,
            started_ns,
        })
    }

    /// The next record and where it is, None at the clean end of the file.
    pub fn next_placed(&mut self) -> io::Result<Option<(Place, Record)>> {
        let at = Place(self.next_at);
        let r = self.next_record()?;
        if let Some(r) = &r {
            self.next_at += 4 + r.path.len() as u64 + FIXED as u64;
        }
        Ok(r.map(|r| (at, r)))
    }

    /// The next record, None at the clean end of the file.
    fn next_record(&mut self) -> io::Result<Option<Record>> {
        let mut n = [0u8; 4];
        match self.input.read(&mut n[..1])? {
            0 => return Ok(None),
            _ => self.input.read_exact(&mut n[1..])?,
        }
        let len = u32::from_le_bytes(n) as usize;
        if len > MAX_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "damaged walk file (a path longer than any file system allows)",
            ));
        }
        let mut path = vec![0u8; len];
        self.input.read_exact(&mut path)?;
        let mut fixed = [0u8; FIXED];
        self.input.read_exact(&mut fixed)?;
        let size = u64::from_le_bytes(le(&fixed[0..8]));
        let taken = Taken::of(fixed[48]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "damaged walk file (a record in no known state)",
            )
        })?;
        Ok(Some(Record {
            path,
            stamp: Stamp {
                size,
                mtime_ns: i128::from_le_bytes(le(&fixed[8..24])),
                ctime_ns: i128::from_le_bytes(le(&fixed[24..40])),
                ino: u64::from_le_bytes(le(&fixed[40..48])),
            },
            size,
            taken,
            digest: le(&fixed[49..81]),
        }))
    }
}

impl Iterator for Records {
    type Item = io::Result<Record>;

    fn next(&mut self) -> Option<io::Result<Record>> {
        self.next_record().transpose()
    }
}

/// A fixed-size array from a slice of exactly its length.
fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// The last walk's file read front to back while a walk asks for its paths in walk order.
pub(crate) struct CacheReader {
    records: Option<Records>,
    next: Option<Record>,
}

impl CacheReader {
    /// The walk file at `path`; a missing, foreign or damaged file reads as empty from
    /// there on (those files are read again).
    pub fn open(path: &Path) -> CacheReader {
        let records = File::open(path)
            .ok()
            .and_then(|f| Records::of(Arc::new(f)).ok());
        let mut reader = CacheReader {
            records,
            next: None,
        };
        reader.advance();
        reader
    }

    fn advance(&mut self) {
        self.next = self
            .records
            .as_mut()
            .and_then(|r| r.next_record().ok().flatten());
        if self.next.is_none() {
            self.records = None;
        }
    }

    /// The digest cached for `path` if its stamp is `stamp` and the last walk could
    /// trust it. Paths must be asked for in walk order.
    pub fn lookup(&mut self, path: &[u8], stamp: &Stamp) -> Option<[u8; 32]> {
        while self
            .next
            .as_ref()
            .is_some_and(|r| path_order(&r.path, path) == Ordering::Less)
        {
            self.advance();
        }
        let started = self.records.as_ref()?.started_ns;
        let r = self.next.as_ref().filter(|r| r.path == path)?;
        (r.stamp == *stamp && r.taken == Taken::Stable && !r.stamp.recent(started))
            .then_some(r.digest)
    }
}

/// A new walk file, written beside its place and renamed over it when complete.
pub(crate) struct WalkWriter {
    file: tempfile::NamedTempFile,
    out: BufWriter<File>,
    last: Vec<u8>,
}

impl WalkWriter {
    /// Starts the walk file that will replace `path`, of a walk started at `started_ns`.
    pub fn create(path: &Path, started_ns: i128) -> io::Result<WalkWriter> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        // Named as agex's atomic writes are: a killed run's file is removed by the next
        // (agex_core::atomic::remove_dead_temps).
        let file = tempfile::Builder::new()
            .prefix(&agex_core::atomic::temp_prefix())
            .suffix(agex_core::atomic::TEMP_SUFFIX)
            .tempfile_in(dir)?;
        let mut out = BufWriter::with_capacity(1 << 16, file.reopen()?);
        out.write_all(MAGIC)?;
        out.write_all(&started_ns.to_le_bytes())?;
        Ok(WalkWriter {
            file,
            out,
            last: Vec::new(),
        })
    }

    /// Adds a file; files come in walk order (a record out of order is refused: the
    /// next walk's lookups rely on it).
    pub fn add(&mut self, r: &Record) -> io::Result<()> {
        if !self.last.is_empty() && path_order(&self.last, &r.path) != Ordering::Less {
            return Err(io::Error::other(format!(
                "walk order broken at {}",
                r.path().display()
            )));
        }
        let len = u32::try_from(r.path.len()).map_err(io::Error::other)?;
        let o = &mut self.out;
        o.write_all(&len.to_le_bytes())?;
        o.write_all(&r.path)?;
        o.write_all(&r.fixed())?;
        self.last.clear();
        self.last.extend_from_slice(&r.path);
        Ok(())
    }

    /// Ends the writing: the file, open to read and [`patch`], is put in place by
    /// [`Unsealed::seal`] (and removed if it never is).
    pub fn finish(self) -> io::Result<(Arc<File>, Unsealed)> {
        let WalkWriter { file, out, .. } = self;
        out.into_inner().map_err(|e| e.into_error())?;
        let (file, temp) = file.into_parts();
        Ok((Arc::new(file), Unsealed(temp)))
    }
}

/// A walk file not in its place yet: dropped, it is removed, and the last walk's file
/// stays the cache.
#[derive(Debug)]
pub(crate) struct Unsealed(tempfile::TempPath);

impl Unsealed {
    /// Flushes `file` (this walk file) and renames it over `path`.
    pub fn seal(self, file: &File, path: &Path) -> io::Result<()> {
        file.sync_all()?;
        self.0.persist(path).map_err(|e| e.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &[u8], n: u8) -> Record {
        Record {
            path: path.to_vec(),
            stamp: Stamp {
                size: u64::from(n),
                mtime_ns: i128::from(n) * 1_000_000_007,
                ctime_ns: -1,
                ino: u64::from(n) + 1,
            },
            size: u64::from(n),
            digest: [n; 32],
            taken: Taken::Stable,
        }
    }

    /// Writes `records` as a complete walk file at `path`.
    fn written(path: &Path, started_ns: i128, records: &[Record]) -> Arc<File> {
        let mut w = WalkWriter::create(path, started_ns).unwrap();
        for r in records {
            w.add(r).unwrap();
        }
        let (file, unsealed) = w.finish().unwrap();
        unsealed.seal(&file, path).unwrap();
        file
    }

    #[test]
    fn a_walk_finds_what_the_last_one_recorded_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let mut changed = record(b"/a/z", 4);
        changed.taken = Taken::Changed;
        let all = [
            record(b"/a/b", 1),
            record(b"/a/b\xff", 2),
            changed.clone(),
            record(b"/a-b", 3),
        ];
        let file = written(&path, 10_000_000_000, &all);
        // Two readers of the one open file, each at its own place.
        let mut one = Records::of(Arc::clone(&file)).unwrap();
        assert_eq!(one.next().unwrap().unwrap(), all[0]);
        let both: Vec<Record> = Records::of(file).unwrap().map(Result::unwrap).collect();
        assert_eq!(both, all);
        assert_eq!(one.next().unwrap().unwrap(), all[1]);

        let mut c = CacheReader::open(&path);
        assert_eq!(c.lookup(b"/a/b", &all[0].stamp), Some([1; 32]));
        assert_eq!(c.lookup(b"/a/ba", &all[0].stamp), None);
        assert_eq!(c.lookup(b"/a/b\xff", &all[0].stamp), None, "another stamp");
        assert_eq!(
            c.lookup(b"/a/z", &changed.stamp),
            None,
            "changed while read"
        );
        assert_eq!(c.lookup(b"/a-b", &all[3].stamp), Some([3; 32]));
        assert_eq!(c.lookup(b"/b", &all[3].stamp), None);
        // A foreign file is an empty cache.
        std::fs::write(&path, b"AGEXDC1\n").unwrap();
        assert_eq!(
            CacheReader::open(&path).lookup(b"/a/b", &all[0].stamp),
            None
        );
    }

    #[test]
    fn a_digest_taken_within_two_seconds_of_a_change_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let r = record(b"/f", 9);
        written(
            &path,
            r.stamp.mtime_ns + 1_000_000_000,
            std::slice::from_ref(&r),
        );
        assert_eq!(CacheReader::open(&path).lookup(b"/f", &r.stamp), None);
    }

    #[test]
    fn records_out_of_walk_order_are_refused_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let mut w = WalkWriter::create(&path, 0).unwrap();
        w.add(&record(b"/a-b", 1)).unwrap();
        assert!(w.add(&record(b"/a/b", 1)).is_err());
        let (file, unsealed) = w.finish().unwrap();
        unsealed.seal(&file, &path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        assert!(Records::of(file).unwrap().next().unwrap().is_err());
    }

    #[test]
    fn pending_records_are_completed_in_place_and_only_stable_ones_are_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let mut pending = [record(b"/a", 1), record(b"/bb", 2), record(b"/c", 3)];
        for r in &mut pending {
            r.taken = Taken::Pending;
        }
        let mut w = WalkWriter::create(&path, 10_000_000_000).unwrap();
        for r in &pending {
            w.add(r).unwrap();
        }
        let (file, unsealed) = w.finish().unwrap();
        // Not in place until sealed; a pending record is no cache.
        assert!(!path.exists());
        let mut records = Records::of(Arc::clone(&file)).unwrap();
        let mut done = Vec::new();
        while let Some((at, mut r)) = records.next_placed().unwrap() {
            assert_eq!(r.taken, Taken::Pending);
            r.digest = [r.digest[0] + 10; 32];
            r.size += 100;
            r.taken = match r.path.as_slice() {
                b"/a" => Taken::Stable,
                b"/bb" => Taken::Changed,
                _ => Taken::Unread,
            };
            patch(&file, at, &r).unwrap();
            done.push(r);
        }
        unsealed.seal(&file, &path).unwrap();
        let back: Vec<Record> = Records::of(file).unwrap().map(Result::unwrap).collect();
        assert_eq!(back.len(), 3);
        for (b, d) in back.iter().zip(&done) {
            assert_eq!(
                (&b.path, b.size, b.digest, b.taken),
                (&d.path, d.size, d.digest, d.taken)
            );
        }
        let mut c = CacheReader::open(&path);
        assert_eq!(c.lookup(b"/a", &back[0].stamp), Some([11; 32]));
        assert_eq!(c.lookup(b"/bb", &back[1].stamp), None);
        assert_eq!(c.lookup(b"/c", &back[2].stamp), None);
        // A record in no known state is damage.
        let mut bytes = std::fs::read(&path).unwrap();
        let state_of_a = HEAD as usize + 4 + 2 + 48;
        bytes[state_of_a] = 9;
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        assert!(Records::of(file).unwrap().next().unwrap().is_err());
    }
}
