//! The manifest each repository of a run gets, made when that repository's engine reaches
//! it, so that it is true to what that engine stored.
//!
//! agex stats every file before the engines start (the walk) and reads the files whose
//! digest the last walk cannot vouch for while the engines run
//! ([`ManifestSource::digest`]). A file that looks the same (size, mtime, ctime, inode)
//! after agex read it and when its entry in an engine's manifest is made (the engine
//! reached the manifest, so it read the file) as when the walk saw it was not written in
//! between: the engine stored the bytes agex digested. One that looks different (or is
//! gone) may be stored in another version: the manifest marks it `changed`, and a drill
//! verifies it by the repository's own record instead of agex's digest. Borg reads the
//! manifest after every file (it is its last argument); the Restic side reaches it at its
//! place in path order, once it has read every file before it (it reads on several
//! threads; the manifest waits for them: `engine::restic::InFlight`), so what it reads
//! after that is checked once its snapshot is written, and recorded in the snapshot's
//! description ([`late_marks_description`]).

use std::collections::HashMap;
use std::io::{self, Read};
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::manifest::{self, DumpEntry, HostPath, Walked};
use crate::tee::Completion;
use crate::walk_file::{Record, Records};

/// What every repository's manifest of one service backup is made from.
pub struct ManifestSource {
    root: PathBuf,
    service: String,
    run_id: String,
    walked: Walked,
    /// Warnings of the files agex could not read, once read; or why reading failed.
    digested: Mutex<Option<Result<Vec<String>, String>>>,
    dumps: Mutex<Option<Result<Vec<DumpEntry>, String>>>,
    /// Notified when either of the two above is settled.
    settled: Condvar,
    /// Pieces one repository's manifest made for another's to take.
    shared: Mutex<Shared>,
}

impl ManifestSource {
    /// A source for the files of `walked` (read under `root`); its dumps come later.
    pub fn new(root: PathBuf, service: &str, run_id: &str, walked: Walked) -> Arc<Self> {
        Arc::new(ManifestSource {
            root,
            service: service.to_string(),
            run_id: run_id.to_string(),
            walked,
            digested: Mutex::new(None),
            dumps: Mutex::new(None),
            settled: Condvar::new(),
            shared: Mutex::new(Shared::default()),
        })
    }

    /// Reads the files the walk left without a digest ([`Walked::digest_pending`]);
    /// manifests wait for it. Runs beside the engines.
    pub fn digest(&self) {
        // Also if reading panics, no manifest waits for it forever.
        struct Unblock<'a>(&'a ManifestSource);
        impl Drop for Unblock<'_> {
            fn drop(&mut self) {
                let s = self.0;
                s.settle(&s.digested, Err("reading the files stopped".to_string()));
            }
        }
        let _unblock = Unblock(self);
        let read = self
            .walked
            .digest_pending(&self.root)
            .map_err(|e| e.to_string());
        self.settle(&self.digested, read);
    }

    /// The warnings of the files agex could not read (waits for the reading).
    pub fn read_warnings(&self) -> Vec<String> {
        self.wait(&self.digested).unwrap_or_default()
    }

    /// Fills `slot` unless it is filled, and wakes who waits.
    fn settle<T>(&self, slot: &Mutex<Option<T>>, value: T) {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(value);
            self.settled.notify_all();
        }
    }

    /// What `slot` is filled with, once it is.
    fn wait<T: Clone>(&self, slot: &Mutex<Option<T>>) -> T {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = &*slot {
                return d.clone();
            }
            slot = self.settled.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The walk the manifests describe.
    pub fn walked(&self) -> &Walked {
        &self.walked
    }

    /// Every dump was taken (their entries) or one failed (why): manifests waiting for
    /// them go on.
    pub fn set_dumps(&self, dumps: Result<Vec<DumpEntry>, String>) {
        *self.dumps.lock().unwrap_or_else(|p| p.into_inner()) = Some(dumps);
        self.settled.notify_all();
    }

    /// Ends the wait for dumps with `why` unless they were handed over: a producer that
    /// stops early never leaves a manifest waiting.
    pub fn fail_unless_dumped(&self, why: &str) {
        self.settle(&self.dumps, Err(why.to_string()));
    }

    /// The files after the manifest in path order (those an engine that reads in path
    /// order reads after it) that changed since agex read them (sorted), as seen now.
    pub fn changed_after_manifest(&self) -> Result<Vec<HostPath>, crate::BackupError> {
        let manifest = manifest::manifest_path(&self.service);
        self.walked.changed_since(&self.root, Some(&manifest))
    }

    /// A reader of the manifest for one repository: made on its first read, it counts
    /// its complete end into `completion` and leaves the files it marked in `marks`.
    pub fn reader(self: &Arc<Self>, completion: Completion) -> (ManifestReader, Marks) {
        let marks = Marks::default();
        let number = {
            let mut shared = self.shared();
            shared.makers.push(None);
            shared.makers.len() - 1
        };
        let reader = ManifestReader {
            maker: Some(Maker {
                source: Arc::clone(self),
                stage: Stage::Start,
                marks: marks.clone(),
                number,
                // Set again when the first read starts the maker.
                reached: Instant::now(),
                batch: 0,
            }),
            completion: Some(completion),
            pieces: None,
            ended: None,
            buf: Vec::new(),
            pos: 0,
        };
        (reader, marks)
    }
}

/// The files one repository's manifest marked changed, once it was made.
#[derive(Clone, Default)]
pub struct Marks(Arc<Mutex<Option<Vec<HostPath>>>>);

impl Marks {
    /// The marked files, if the manifest was made.
    pub fn get(&self) -> Option<Vec<HostPath>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Where a manifest being made is.
enum Stage {
    /// Not begun: the dumps and the changed files are not known yet.
    Start,
    /// The file entries, from the walk file, with the files marked changed so far.
    Files {
        records: Records,
        changed: Vec<HostPath>,
        dumps: Vec<DumpEntry>,
        first: bool,
    },
    /// Dumps and special files, then the end.
    Tail(Vec<DumpEntry>),
    Done,
}

/// Makes one repository's manifest, a piece at a time.
struct Maker {
    source: Arc<ManifestSource>,
    stage: Stage,
    marks: Marks,
    /// Its number among the source's makers.
    number: usize,
    /// When its engine reached the manifest (had read every file before it): only a
    /// check begun after that says what this engine stored.
    reached: Instant,
    /// The batch of file entries it makes next.
    batch: usize,
}

/// The file entries of one batch, checked and serialized.
struct Made {
    /// The entries, separated by commas (none for a batch of unread files only).
    json: Vec<u8>,
    /// The files marked changed.
    changed: Vec<HostPath>,
}

/// The manifests of one run describe the same files in the same batches, and when two
/// engines reach theirs at about the same time (the usual case: both wait for the same
/// dumps) their checks and JSON would be the same work done twice. A maker that is ahead
/// leaves each batch it made for the makers behind it, which take it if it was checked
/// after their engine reached the manifest (else they make their own).
#[derive(Default)]
struct Shared {
    /// Per maker: when its engine reached the manifest and the batch it is at, from its
    /// start to its end.
    makers: Vec<Option<(Instant, usize)>>,
    /// Batch number -> when its check began, what was made, and how many makers may
    /// still take it.
    pieces: HashMap<usize, (Instant, Arc<Made>, usize)>,
}

/// Batches kept for makers behind (about 64 KiB each): a maker far behind makes its own.
const SHARED_MAX: usize = 64;

impl Shared {
    /// Maker `number` started: its engine reached the manifest at `reached`.
    fn start(&mut self, number: usize, reached: Instant) {
        if let Some(at) = self.makers.get_mut(number) {
            *at = Some((reached, 0));
        }
    }

    /// Maker `number` (its engine reached the manifest at `reached`) is at `batch`: what
    /// another maker made of it after `reached`, if there is such a piece.
    fn take(&mut self, number: usize, reached: Instant, batch: usize) -> Option<Arc<Made>> {
        if let Some(Some((_, at))) = self.makers.get_mut(number) {
            *at = batch;
        }
        let (checked, made, takers) = self.pieces.get_mut(&batch)?;
        if *checked < reached {
            return None;
        }
        let made = Arc::clone(made);
        *takers -= 1;
        if *takers == 0 {
            self.pieces.remove(&batch);
        }
        Some(made)
    }

    /// Maker `number` made `batch` with a check begun at `checked`: kept for the makers
    /// behind it whose engines had reached the manifest by then.
    fn leave(&mut self, number: usize, batch: usize, checked: Instant, made: &Arc<Made>) {
        let takers = self
            .makers
            .iter()
            .enumerate()
            .filter(|(n, at)| {
                *n != number && at.is_some_and(|(reached, at)| reached <= checked && at < batch)
            })
            .count();
        if takers > 0 && self.pieces.len() < SHARED_MAX {
            self.pieces
                .insert(batch, (checked, Arc::clone(made), takers));
        }
    }

    /// Maker `number` ended (complete or not).
    fn end(&mut self, number: usize) {
        if let Some(at) = self.makers.get_mut(number) {
            *at = None;
        }
    }
}

/// What the maker hands the reader.
enum Piece {
    Json(Vec<u8>),
    /// The manifest is complete.
    End,
    /// Making it failed: the reader says why on every later read, never a clean end.
    Failed(io::ErrorKind, String),
}

/// One repository's manifest stream: a [`crate::manifest::Manifest`] in JSON, serialized
/// from the walk file by a thread of its own, a few hundred entries at a time, up to
/// [`AHEAD`] pieces ahead of the engine: the engine takes one piece while agex checks the
/// files of the next ones.
pub struct ManifestReader {
    /// Until the first read starts it.
    maker: Option<Maker>,
    completion: Option<Completion>,
    pieces: Option<Receiver<Piece>>,
    /// How the stream ended, once it did.
    ended: Option<Result<(), (io::ErrorKind, String)>>,
    buf: Vec<u8>,
    pos: usize,
}

/// Files checked and serialized at a time (about 64 KiB of JSON).
const BATCH: usize = 512;
/// Pieces made ahead of the reader.
const AHEAD: usize = 16;

impl Maker {
    /// Hands every piece of the manifest to `to` until it is complete, making fails, or the
    /// reader is gone.
    fn run(mut self, to: SyncSender<Piece>) {
        self.reached = Instant::now();
        struct End<'a>(&'a ManifestSource, usize);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.shared().end(self.1);
            }
        }
        let source = Arc::clone(&self.source);
        let _end = End(&source, self.number);
        source.shared().start(self.number, self.reached);
        loop {
            let mut buf = Vec::new();
            let piece = match self.fill(&mut buf) {
                Ok(()) if buf.is_empty() && matches!(self.stage, Stage::Done) => Piece::End,
                Ok(()) => Piece::Json(buf),
                Err(e) => Piece::Failed(e.kind(), e.to_string()),
            };
            let last = !matches!(piece, Piece::Json(_));
            if to.send(piece).is_err() || last {
                return;
            }
        }
    }

    /// The entries of the next batch of files: taken from a maker ahead if it checked
    /// them late enough for this one, else checked (each file as its entry is made, on
    /// every core, so the engine takes the first entries while agex checks the rest) and
    /// serialized here.
    fn made(&mut self, batch: &[Record]) -> io::Result<Arc<Made>> {
        let (number, batch_number) = (self.number, self.batch);
        self.batch += 1;
        let source = &self.source;
        if let Some(made) = source.shared().take(number, self.reached, batch_number) {
            return Ok(made);
        }
        let checked = Instant::now();
        let now = source.walked.changed_now(&source.root, batch);
        let mut made = Made {
            json: Vec::new(),
            changed: Vec::new(),
        };
        for (r, now) in batch.iter().zip(now) {
            let Some(mut entry) = Walked::entry(r) else {
                continue;
            };
            if now {
                entry.changed = true;
                made.changed.push(entry.path.clone());
            }
            if !made.json.is_empty() {
                made.json.push(b',');
            }
            serde_json::to_writer(&mut made.json, &entry)
                .map_err(|e| io::Error::other(format!("manifest: {e}")))?;
        }
        let made = Arc::new(made);
        source.shared().leave(number, batch_number, checked, &made);
        Ok(made)
    }

    /// Makes the next piece of JSON into `buf` (nothing once the manifest is complete).
    fn fill(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let json = |e: serde_json::Error| io::Error::other(format!("manifest: {e}"));
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Start => {
                let source = &self.source;
                source
                    .wait(&source.digested)
                    .map_err(|why| io::Error::other(format!("reading the files: {why}")))?;
                let dumps = source.wait(&source.dumps).map_err(io::Error::other)?;
                #[derive(Serialize)]
                struct Head<'a> {
                    format: u32,
                    service: &'a str,
                    run_id: &'a str,
                }
                let head = Head {
                    format: manifest::FORMAT,
                    service: &source.service,
                    run_id: &source.run_id,
                };
                serde_json::to_writer(&mut *buf, &head).map_err(json)?;
                // `{...}` becomes `{..., "files": [`.
                buf.pop();
                buf.extend_from_slice(b",\"files\":[");
                self.stage = Stage::Files {
                    records: source.walked.records()?,
                    changed: Vec::new(),
                    dumps,
                    first: true,
                };
            }
            Stage::Files {
                mut records,
                mut changed,
                dumps,
                mut first,
            } => {
                // Each file is checked as its entry is made (a batch at a time, on every
                // core), so the engine takes the first entries while agex checks the rest.
                let batch = records
                    .by_ref()
                    .take(BATCH)
                    .collect::<io::Result<Vec<_>>>()?;
                if batch.is_empty() {
                    buf.push(b']');
                    changed.sort();
                    *self.marks.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(changed);
                    self.stage = Stage::Tail(dumps);
                    return Ok(());
                }
                let made = self.made(&batch)?;
                if !made.json.is_empty() {
                    if !first {
                        buf.push(b',');
                    }
                    first = false;
                    buf.extend_from_slice(&made.json);
                }
                changed.extend(made.changed.iter().cloned());
                self.stage = Stage::Files {
                    records,
                    changed,
                    dumps,
                    first,
                };
            }
            Stage::Tail(dumps) => {
                buf.extend_from_slice(b",\"dumps\":");
                serde_json::to_writer(&mut *buf, &dumps).map_err(json)?;
                let specials = &self.source.walked.specials;
                if !specials.is_empty() {
                    buf.extend_from_slice(b",\"specials\":");
                    serde_json::to_writer(&mut *buf, specials).map_err(json)?;
                }
                buf.push(b'}');
            }
            Stage::Done => {}
        }
        Ok(())
    }
}

impl ManifestReader {
    /// The next piece from the maker, started on the first call.
    fn next_piece(&mut self) -> Piece {
        if let Some(maker) = self.maker.take() {
            let (to, from) = sync_channel(AHEAD);
            let started = std::thread::Builder::new()
                .name("agex-manifest".into())
                .spawn(move || maker.run(to));
            if let Err(e) = started {
                return Piece::Failed(e.kind(), format!("manifest: {e}"));
            }
            self.pieces = Some(from);
        }
        match self.pieces.as_ref().map(Receiver::recv) {
            Some(Ok(piece)) => piece,
            _ => Piece::Failed(io::ErrorKind::Other, "making the manifest stopped".into()),
        }
    }
}

impl Read for ManifestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match &self.ended {
                Some(Ok(())) => {
                    if let Some(c) = self.completion.take() {
                        c.complete_one();
                    }
                    return Ok(0);
                }
                Some(Err((kind, why))) => return Err(io::Error::new(*kind, why.clone())),
                None => {}
            }
            match self.next_piece() {
                Piece::Json(json) => (self.buf, self.pos) = (json, 0),
                Piece::End => self.ended = Some(Ok(())),
                Piece::Failed(kind, why) => self.ended = Some(Err((kind, why))),
            }
        }
        let n = buf.len().min(self.buf.len() - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What agex writes into a Restic snapshot's description: the files that changed after
/// the snapshot's manifest was made and before the snapshot was written.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LateMarks {
    /// Marked files, sorted.
    pub agex_changed: Vec<HostPath>,
}

/// The description recording `late` marks (None: there are none).
pub fn late_marks_description(late: Vec<HostPath>) -> Option<String> {
    if late.is_empty() {
        return None;
    }
    serde_json::to_string(&LateMarks { agex_changed: late }).ok()
}

/// The marks a snapshot description records (none if it is not agex's).
pub fn late_marks(description: Option<&str>) -> Vec<HostPath> {
    description
        .and_then(|d| serde_json::from_str::<LateMarks>(d).ok())
        .map(|m| m.agex_changed)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// Everything `reader` gives, read `size` bytes at a time at most.
    fn read_in_pieces(reader: &mut impl Read, size: usize) -> Vec<u8> {
        let (mut bytes, mut piece) = (Vec::new(), vec![0u8; size]);
        loop {
            let n = reader.read(&mut piece).unwrap();
            if n == 0 {
                return bytes;
            }
            bytes.extend_from_slice(&piece[..n]);
        }
    }

    /// A tree walked into a walk file, its manifest streamed in small reads.
    #[test]
    fn the_stream_is_the_manifest_of_the_walk_with_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let srv = root.join("srv");
        std::fs::create_dir_all(srv.join("a")).unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
        let names: Vec<PathBuf> = (0..9000)
            .map(|i| PathBuf::from(format!("a/f{i}")))
            .chain([PathBuf::from("a-b"), PathBuf::from(odd), PathBuf::from("z")])
            .collect();
        for n in &names {
            std::fs::write(srv.join(n), n.as_os_str().as_bytes()).unwrap();
        }
        // Files written within RACY_NS of the walk are marked changed (their stamps cannot
        // prove otherwise); these are older than that, whatever the machine's load.
        std::thread::sleep(std::time::Duration::from_nanos(
            2 * crate::manifest::RACY_NS as u64,
        ));
        let selection = crate::manifest::Selection::of_paths(vec!["/srv".into()]);
        let cache = dir.path().join("state/s.walk");
        let walked = selection.walk(&root, &cache).unwrap();
        assert_eq!(walked.files, names.len() as u64);
        // Written after the walk: marked changed in the manifest.
        std::fs::write(srv.join("z"), b"later, longer").unwrap();
        // Gone before agex read it: a warning, and in no manifest.
        std::fs::remove_file(srv.join("a/f5")).unwrap();
        let source = ManifestSource::new(root.clone(), "s", "r", walked);
        source.digest();
        let warnings = source.read_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("/srv/a/f5 vanished"), "{warnings:?}");
        assert!(cache.exists(), "the walk file is in place once read");
        let dump = DumpEntry {
            name: "x".into(),
            kind: manifest::DumpKind::Sqlite,
            path: "/var/lib/agex/dumps/s/db/x".into(),
            size: 1,
            digest: "sha256:00".into(),
            row_counts: Default::default(),
        };
        source.set_dumps(Ok(vec![dump.clone()]));
        let done = Completion::default();
        let (mut reader, marks) = source.reader(done.clone());
        let bytes = read_in_pieces(&mut reader, 1000);
        assert_eq!(done.count(), 1);
        let m: crate::manifest::Manifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((m.service.as_str(), m.run_id.as_str()), ("s", "r"));
        assert_eq!(m.dumps, vec![dump]);
        assert_eq!(m.files.len(), names.len() - 1);
        assert!(m
            .files
            .iter()
            .all(|f| f.path != HostPath::from("/srv/a/f5")));
        let z = HostPath::from("/srv/z");
        assert_eq!(marks.get(), Some(vec![z.clone()]));
        // What an engine reading in path order reads after a path: only that is looked at.
        let after = |p: &str| {
            source
                .walked()
                .changed_since(&root, Some(Path::new(p)))
                .unwrap()
        };
        assert_eq!(after("/srv/a-b"), vec![z.clone()]);
        assert_eq!(after("/srv/z"), Vec::<HostPath>::new());
        for f in &m.files {
            assert_eq!(f.changed, f.path == z, "{}", f.path);
            let name = f.path.as_path().strip_prefix("/srv").unwrap();
            let (size, digest) = crate::manifest::digest_file(&srv.join(name)).unwrap_or_default();
            if f.path != z {
                assert_eq!((f.size, &f.digest), (size, &digest), "{}", f.path);
            }
        }
        // In walk order: component by component.
        let paths: Vec<&Path> = m.files.iter().map(|f| f.path.as_path()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        assert!(paths.contains(&Path::new(std::ffi::OsStr::from_bytes(b"/srv/caf\xe9"))));
    }

    /// A batch made by one maker is taken by another only if it was checked after that
    /// one's engine reached the manifest, by as many makers as were behind, and kept
    /// only for makers behind.
    #[test]
    fn a_maker_takes_only_what_was_checked_after_its_engine_reached_the_manifest() {
        let made = |n: &str| {
            Arc::new(Made {
                json: n.as_bytes().to_vec(),
                changed: vec![],
            })
        };
        let t0 = Instant::now();
        let t = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let mut shared = Shared {
            makers: vec![None, None, None],
            ..Default::default()
        };
        // Maker 0 reached at 10 ms and is at batch 0; maker 1 reached at 20 ms, at batch 2.
        shared.start(0, t(10));
        shared.start(1, t(20));
        assert!(shared.take(0, t(10), 0).is_none());
        assert!(shared.take(1, t(20), 2).is_none());
        // Maker 1 made batch 2 (checked at 25 ms): maker 0, behind, may take it.
        shared.leave(1, 2, t(25), &made("b2"));
        // Batch 1 made by maker 1 before maker 0 was behind it? Maker 0 is at 0 < 1: kept.
        shared.leave(1, 1, t(15), &made("b1"));
        // Maker 0 is not behind batch 0: nobody to keep it for.
        shared.leave(1, 0, t(30), &made("b0"));
        assert!(!shared.pieces.contains_key(&0));
        // Checked at 15 ms, after maker 0 reached (10 ms): taken.
        assert_eq!(shared.take(0, t(10), 1).unwrap().json, b"b1");
        assert!(shared.take(0, t(10), 2).is_some());
        assert!(shared.pieces.is_empty(), "each piece had one taker");
        // Maker 2 reached at 40 ms: a batch checked at 35 ms is not for it.
        shared.start(2, t(40));
        assert!(shared.take(2, t(40), 3).is_none());
        shared.makers[0] = Some((t(10), 3));
        shared.leave(1, 4, t(35), &made("b4"));
        assert_eq!(shared.pieces[&4].2, 1, "only maker 0 had reached by 35 ms");
        assert!(shared.take(2, t(40), 4).is_none());
        assert_eq!(shared.take(0, t(10), 4).unwrap().json, b"b4");
        // A maker that ended is no taker.
        shared.end(0);
        shared.leave(1, 5, t(50), &made("b5"));
        assert!(shared.take(2, t(40), 5).is_some());
        assert!(shared.pieces.is_empty());
    }

    /// Two repositories' manifests read side by side are the same manifest.
    #[test]
    fn manifests_made_side_by_side_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let srv = root.join("srv");
        std::fs::create_dir_all(srv.join("a")).unwrap();
        for i in 0..20_000 {
            std::fs::write(srv.join(format!("a/f{i}")), format!("{i}")).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_nanos(
            2 * crate::manifest::RACY_NS as u64,
        ));
        let selection = crate::manifest::Selection::of_paths(vec!["/srv".into()]);
        let walked = selection.walk(&root, &dir.path().join("s.walk")).unwrap();
        let source = ManifestSource::new(root.clone(), "s", "r", walked);
        source.digest();
        source.set_dumps(Ok(vec![]));
        let read = |(mut reader, marks): (ManifestReader, Marks)| {
            std::thread::spawn(move || (read_in_pieces(&mut reader, 700), marks.get()))
        };
        let a = read(source.reader(Completion::default()));
        let b = read(source.reader(Completion::default()));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(a, b);
        let m: crate::manifest::Manifest = serde_json::from_slice(&a.0).unwrap();
        assert_eq!(m.files.len(), 20_000);
        assert_eq!(a.1, Some(vec![]));
    }

    #[test]
    fn late_marks_round_trip_any_name() {
        use std::os::unix::ffi::OsStringExt;
        let odd = HostPath::from(PathBuf::from(std::ffi::OsString::from_vec(
            b"/srv/caf\xe9".to_vec(),
        )));
        let d = late_marks_description(vec![odd.clone(), "/srv/a\nb".into()]).unwrap();
        assert_eq!(late_marks(Some(&d)), vec![odd, "/srv/a\nb".into()]);
        assert!(late_marks(Some("a user's words")).is_empty());
        assert!(late_marks_description(vec![]).is_none());
    }
}
