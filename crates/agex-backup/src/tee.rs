//! One stream read once and handed to every repository of a run while it is produced (a
//! database dump, the manifest): each repository reads the same chunks through its own
//! bounded channel, so memory stays at [`DEPTH`] chunks of [`CHUNK`] bytes per
//! repository and the slowest repository paces the producer (backpressure). A
//! repository that stops reading (it failed) is let go; one that takes nothing and shows
//! no other sign of work ([`Completion::active`]) for longer than the stall timeout (a
//! backend that hangs) is left behind, so it cannot hold the others back for longer; the
//! others go on. One still at its files when another reached the stream is waited for,
//! however long that takes.
//!
//! A reader ends with `Ok(0)` only after the producer said the stream is complete; a
//! failed or abandoned stream ends in an error, so no engine takes a torn dump for a
//! whole one. [`Completion`] counts the streams a repository read to their end: a
//! snapshot is written only when that count is every stream it was given.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agex_secrets::header::hex;
use sha2::{Digest, Sha256};

/// Bytes per chunk handed to the repositories.
pub const CHUNK: usize = 256 * 1024;
/// Chunks a repository may lag behind the producer before the producer waits.
pub const DEPTH: usize = 16;

enum Msg {
    Data(Arc<[u8]>),
    End(Result<(), StreamFailed>),
}

/// Why a producer ended a stream as failed (a dump that broke off): what a reader's
/// `io::Error` carries, so a consumer can tell a torn source from its own failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StreamFailed(Arc<str>);

/// The producing end: every chunk written goes to every consumer still reading.
pub struct Tee {
    consumers: Vec<(SyncSender<Msg>, Completion)>,
    stall: Option<Duration>,
}

/// What a finished copy measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Bytes copied.
    pub size: u64,
    /// `sha256:<hex>` of them.
    pub digest: String,
}

/// How many of a repository's streams ended complete, whether a tee left it behind, and
/// when its engine last showed it was at work.
#[derive(Debug, Clone)]
pub struct Completion(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    complete: AtomicUsize,
    left_behind: AtomicBool,
    /// Milliseconds from [`epoch`] to the last sign of work.
    active: AtomicU64,
}

/// What [`Completion`]'s times count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Default for Completion {
    /// None complete, not left behind, at work now.
    fn default() -> Self {
        Completion(Arc::new(Counts {
            complete: AtomicUsize::new(0),
            left_behind: AtomicBool::new(false),
            active: AtomicU64::new(since_epoch()),
        }))
    }
}

impl Completion {
    /// Streams read to their complete end so far.
    pub fn count(&self) -> usize {
        self.0.complete.load(Ordering::SeqCst)
    }

    /// Counts one more stream read to its complete end (for streams that are not tees).
    pub(crate) fn complete_one(&self) {
        self.0.complete.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a stream gave up on this repository for taking nothing for too long.
    pub fn left_behind(&self) -> bool {
        self.0.left_behind.load(Ordering::SeqCst)
    }

    /// The repository's engine is at work (it read a file, a request of it was answered,
    /// borg reported progress): a tee waits for it however long it takes to reach the
    /// stream, and leaves behind only one that shows no sign of work for the stall timeout.
    pub fn active(&self) {
        self.0.active.fetch_max(since_epoch(), Ordering::Relaxed);
    }

    /// How long since the engine last showed it was at work.
    fn idle_for(&self) -> Duration {
        Duration::from_millis(since_epoch().saturating_sub(self.0.active.load(Ordering::Relaxed)))
    }
}

/// A consumer's end of a [`Tee`].
pub struct TeeReader {
    rx: Receiver<Msg>,
    chunk: Option<Arc<[u8]>>,
    pos: usize,
    ended: bool,
    completion: Option<Completion>,
}

/// A tee with one reader per entry of `completions` (each reader counts its complete
/// end into its completion). A consumer whose queue stays full for `stall` while its
/// engine shows no sign of work for as long is left behind (None: waited for however
/// long it takes).
pub fn tee(completions: &[Completion], stall: Option<Duration>) -> (Tee, Vec<TeeReader>) {
    let (consumers, readers) = completions
        .iter()
        .map(|c| {
            let (tx, rx) = sync_channel(DEPTH);
            let reader = TeeReader {
                rx,
                chunk: None,
                pos: 0,
                ended: false,
                completion: Some(c.clone()),
            };
            ((tx, c.clone()), reader)
        })
        .unzip();
    (Tee { consumers, stall }, readers)
}

impl Tee {
    /// Copies `src` to its end into every consumer and measures it. A consumer that has
    /// gone away is dropped; an error reading `src` is returned (the caller then ends the
    /// stream with [`Tee::fail`]).
    pub fn copy_from(&mut self, src: &mut dyn Read) -> io::Result<Copied> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match src.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            hasher.update(&buf);
            size += filled as u64;
            self.send(Msg::Data(buf.into()));
            if filled < CHUNK {
                break;
            }
        }
        Ok(Copied {
            size,
            digest: format!("sha256:{}", hex(&hasher.finalize())),
        })
    }

    /// Ends the stream as complete: readers then see its end.
    pub fn finish(mut self) {
        self.send(Msg::End(Ok(())));
    }

    /// Ends the stream as failed: readers get `why` as an error instead of an end.
    pub fn fail(mut self, why: &str) {
        self.send(Msg::End(Err(StreamFailed(why.into()))));
    }

    fn send(&mut self, msg: Msg) {
        let stall = self.stall;
        self.consumers.retain(|(tx, completion)| {
            let mut msg = match &msg {
                Msg::Data(chunk) => Msg::Data(Arc::clone(chunk)),
                Msg::End(end) => Msg::End(end.clone()),
            };
            let Some(stall) = stall else {
                return tx.send(msg).is_ok();
            };
            let since = Instant::now();
            let mut pause = Duration::from_micros(100);
            loop {
                match tx.try_send(msg) {
                    Ok(()) => return true,
                    Err(TrySendError::Disconnected(_)) => return false,
                    Err(TrySendError::Full(back)) => {
                        if since.elapsed() >= stall && completion.idle_for() >= stall {
                            completion.0.left_behind.store(true, Ordering::SeqCst);
                            return false;
                        }
                        msg = back;
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                }
            }
        });
    }
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(chunk) = &self.chunk {
                if self.pos < chunk.len() {
                    let n = buf.len().min(chunk.len() - self.pos);
                    buf[..n].copy_from_slice(&chunk[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(chunk)) => {
                    self.chunk = Some(chunk);
                    self.pos = 0;
                }
                Ok(Msg::End(Ok(()))) => {
                    self.ended = true;
                    self.chunk = None;
                    if let Some(c) = self.completion.take() {
                        c.complete_one();
                    }
                }
                Ok(Msg::End(Err(why))) => return Err(io::Error::other(why)),
                Err(_) => return Err(io::Error::other("the stream stopped before its end")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut r: TeeReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Feeds `data` through `tee` and ends it complete, on a thread of its own.
    fn produce(mut tee: Tee, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            tee.copy_from(&mut data.as_slice()).unwrap();
            tee.finish();
        })
    }

    #[test]
    fn every_reader_gets_every_byte_and_counts_its_end() {
        let done = [Completion::default(), Completion::default()];
        let (mut tee, readers) = tee(&done, None);
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 251) as u8).collect();
        let src = data.clone();
        let producer = std::thread::spawn(move || {
            let copied = tee.copy_from(&mut src.as_slice()).unwrap();
            tee.finish();
            copied
        });
        let got: Vec<_> = readers
            .into_iter()
            .map(|r| std::thread::spawn(move || read_all(r)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let copied = producer.join().unwrap();
        assert_eq!(copied.size, data.len() as u64);
        assert_eq!(
            copied.digest,
            format!("sha256:{}", hex(&Sha256::digest(&data)))
        );
        assert!(got.iter().all(|g| *g == data));
        assert_eq!((done[0].count(), done[1].count()), (1, 1));
    }

    #[test]
    fn a_failed_stream_is_an_error_not_an_end() {
        let done = [Completion::default()];
        let (mut tee, mut readers) = tee(&done, None);
        let r = readers.remove(0);
        let producer = std::thread::spawn(move || {
            tee.copy_from(&mut &b"partial"[..]).unwrap();
            tee.fail("pg_dump: exit status 1");
        });
        let err = read_all(r).unwrap_err();
        producer.join().unwrap();
        assert!(err.to_string().contains("pg_dump: exit status 1"), "{err}");
        assert_eq!(done[0].count(), 0);
    }

    #[test]
    fn an_abandoned_stream_is_an_error() {
        let done = [Completion::default()];
        let (tee, mut readers) = tee(&done, None);
        drop(tee);
        assert!(read_all(readers.remove(0)).is_err());
        assert_eq!(done[0].count(), 0);
    }

    #[test]
    fn a_reader_that_takes_nothing_is_left_behind_after_the_stall_timeout() {
        let done = [Completion::default(), Completion::default()];
        let (tee, mut readers) = tee(&done, Some(Duration::from_millis(200)));
        let stuck = readers.remove(0);
        let data = vec![9u8; (DEPTH + 4) * CHUNK];
        let producer = produce(tee, data.clone());
        assert_eq!(read_all(readers.remove(0)).unwrap(), data);
        producer.join().unwrap();
        assert!(done[0].left_behind() && !done[1].left_behind());
        assert_eq!((done[0].count(), done[1].count()), (0, 1));
        // What it had queued is still there, but it never sees an end.
        assert!(read_all(stuck).is_err());
    }

    #[test]
    fn a_reader_at_work_elsewhere_is_waited_for_past_the_stall_timeout() {
        let done = [Completion::default(), Completion::default()];
        let stall = Duration::from_millis(200);
        let (tee, mut readers) = tee(&done, Some(stall));
        let late = readers.remove(0);
        let data = vec![5u8; (DEPTH + 4) * CHUNK];
        let producer = produce(tee, data.clone());
        // The first reads nothing for five stall timeouts, at work on its files meanwhile.
        let busy = {
            let c = done[0].clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                while t.elapsed() < 5 * stall {
                    c.active();
                    std::thread::sleep(stall / 10);
                }
                read_all(late)
            })
        };
        assert_eq!(read_all(readers.remove(0)).unwrap(), data);
        assert_eq!(busy.join().unwrap().unwrap(), data);
        producer.join().unwrap();
        assert!(!done[0].left_behind());
        assert_eq!((done[0].count(), done[1].count()), (1, 1));
    }

    #[test]
    fn a_reader_that_goes_away_does_not_stop_the_others() {
        let done = [Completion::default(), Completion::default()];
        let (tee, mut readers) = tee(&done, None);
        drop(readers.remove(0));
        let data = vec![7u8; (DEPTH + 4) * CHUNK];
        let producer = produce(tee, data.clone());
        assert_eq!(read_all(readers.remove(0)).unwrap(), data);
        producer.join().unwrap();
        assert_eq!((done[0].count(), done[1].count()), (0, 1));
    }
}
