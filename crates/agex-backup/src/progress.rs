//! How far each repository has got in a run: bytes and files read, against the totals
//! known once the walk (which runs while the repositories read) has listed the files. The library only counts; the CLI decides how to show it (bars
//! on a TTY, nothing otherwise).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Receives progress of one run. Calls come from several threads at once.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// A repository starts on a service.
    fn start(&self, service: &str, repo: &str);
    /// The service's files hold `bytes` in `files` files (dumps come on top).
    fn total(&self, service: &str, repo: &str, bytes: u64, files: u64);
    /// Bytes and files read so far (totals, not increments).
    fn update(&self, service: &str, repo: &str, bytes: u64, files: u64);
    /// The repository is done with the service.
    fn finish(&self, service: &str, repo: &str, ok: bool);
}

/// The counters of one repository working on one service.
#[derive(Debug)]
pub struct Meter {
    sink: Arc<dyn Progress>,
    service: String,
    repo: String,
    bytes: AtomicU64,
    files: AtomicU64,
}

impl Meter {
    /// Starts a meter and tells the sink.
    pub fn start(sink: Arc<dyn Progress>, service: &str, repo: &str) -> Arc<Meter> {
        sink.start(service, repo);
        Arc::new(Meter {
            sink,
            service: service.to_string(),
            repo: repo.to_string(),
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
        })
    }

    /// The totals are known.
    pub fn set_total(&self, bytes: u64, files: u64) {
        self.sink.total(&self.service, &self.repo, bytes, files);
    }

    /// `n` more bytes read.
    pub fn add_bytes(&self, n: u64) {
        let bytes = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.sink.update(
            &self.service,
            &self.repo,
            bytes,
            self.files.load(Ordering::Relaxed),
        );
    }

    /// One more file started.
    pub fn add_file(&self) {
        let files = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink.update(
            &self.service,
            &self.repo,
            self.bytes.load(Ordering::Relaxed),
            files,
        );
    }

    /// Sets both counters (for engines that report totals, like borg).
    pub fn set(&self, bytes: u64, files: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.files.store(files, Ordering::Relaxed);
        self.sink.update(&self.service, &self.repo, bytes, files);
    }

    /// The repository is done.
    pub fn finish(&self, ok: bool) {
        self.sink.finish(&self.service, &self.repo, ok);
    }
}

/// rustic_core's progress hooks, counting the bytes its archiver reads into a [`Meter`].
#[derive(Debug, Clone)]
pub(crate) struct ResticBars(pub Arc<Meter>);

#[derive(Debug)]
struct ResticBytes(Arc<Meter>);

impl rustic_core::ProgressBars for ResticBars {
    fn progress(&self, kind: rustic_core::ProgressType, _prefix: &str) -> rustic_core::Progress {
        match kind {
            rustic_core::ProgressType::Bytes => {
                rustic_core::Progress::new(ResticBytes(Arc::clone(&self.0)))
            }
            _ => rustic_core::Progress::hidden(),
        }
    }
}

impl rustic_core::RusticProgress for ResticBytes {
    fn is_hidden(&self) -> bool {
        false
    }
    fn set_length(&self, _len: u64) {}
    fn set_title(&self, _title: &str) {}
    fn inc(&self, inc: u64) {
        self.0.add_bytes(inc);
    }
    fn finish(&self) {}
}
