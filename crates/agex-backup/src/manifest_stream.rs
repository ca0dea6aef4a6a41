//! The manifest each repository of a run gets, made when that repository's engine reaches
//! it, so that it is true to what that engine stored.
//!
//! agex reads every file before the engines start (the walk), so an engine reads each
//! file after agex did. A file that looks the same (size, mtime, ctime, inode) when an
//! engine reaches its manifest as when agex read it was not written in between: the
//! engine stored the bytes agex digested. One that looks different (or is gone) may be
//! stored in another version: the manifest marks it `changed`, and a drill verifies it
//! by the repository's own record instead of agex's digest. Borg reads the manifest
//! after every file (it is its last argument); the Restic side reaches it at its place
//! in path order, so what it reads after that is checked once its snapshot is written,
//! and recorded in the snapshot's description ([`late_marks_description`]).

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::manifest::{self, DumpEntry, FileEntry, HostPath, SpecialEntry, Walked};
use crate::tee::Completion;

/// What every repository's manifest of one service backup is made from.
pub struct ManifestSource {
    root: PathBuf,
    service: String,
    run_id: String,
    walked: Walked,
    dumps: Mutex<Option<Result<Vec<DumpEntry>, String>>>,
    dumped: Condvar,
}

impl ManifestSource {
    /// A source for the files of `walked` (read under `root`); its dumps come later.
    pub fn new(root: PathBuf, service: &str, run_id: &str, walked: Walked) -> Arc<Self> {
        Arc::new(ManifestSource {
            root,
            service: service.to_string(),
            run_id: run_id.to_string(),
            walked,
            dumps: Mutex::new(None),
            dumped: Condvar::new(),
        })
    }

    /// The walk the manifests describe.
    pub fn walked(&self) -> &Walked {
        &self.walked
    }

    /// Every dump was taken (their entries) or one failed (why): manifests waiting for
    /// them go on.
    pub fn set_dumps(&self, dumps: Result<Vec<DumpEntry>, String>) {
        *self.dumps.lock().unwrap_or_else(|p| p.into_inner()) = Some(dumps);
        self.dumped.notify_all();
    }

    /// Ends the wait for dumps with `why` unless they were handed over: a producer that
    /// stops early never leaves a manifest waiting.
    pub fn fail_unless_dumped(&self, why: &str) {
        let mut slot = self.dumps.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Err(why.to_string()));
            self.dumped.notify_all();
        }
    }

    fn wait_dumps(&self) -> Result<Vec<DumpEntry>, String> {
        let mut slot = self.dumps.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = &*slot {
                return d.clone();
            }
            slot = self.dumped.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The files that changed since agex read them (sorted), as seen now.
    pub fn changed_now(&self) -> Vec<HostPath> {
        self.walked.changed_since(&self.root)
    }

    /// The manifest as a repository reaching it now holds it, serialized, and the files
    /// it marks changed. Serialized from the walk as it is (a [`crate::manifest::Manifest`] in JSON), not
    /// from a copy of it.
    fn build(&self) -> Result<(Vec<u8>, Vec<HostPath>), String> {
        let dumps = self.wait_dumps()?;
        let changed = self.changed_now();
        let view = ManifestView {
            format: manifest::FORMAT,
            service: &self.service,
            run_id: &self.run_id,
            files: FilesView {
                files: &self.walked.files,
                changed: &changed,
            },
            dumps: &dumps,
            specials: &self.walked.specials,
        };
        let bytes = serde_json::to_vec(&view).map_err(|e| format!("manifest: {e}"))?;
        Ok((bytes, changed))
    }

    /// A reader of the manifest for one repository: made on its first read, it counts
    /// its complete end into `completion` and leaves the files it marked in `marks`.
    pub fn reader(self: &Arc<Self>, completion: Completion) -> (ManifestReader, Marks) {
        let marks = Marks::default();
        let reader = ManifestReader {
            source: Arc::clone(self),
            completion: Some(completion),
            bytes: None,
            pos: 0,
            marks: marks.clone(),
        };
        (reader, marks)
    }
}

/// A [`crate::manifest::Manifest`] as it serializes, borrowing the walk.
#[derive(Serialize)]
struct ManifestView<'a> {
    format: u32,
    service: &'a str,
    run_id: &'a str,
    files: FilesView<'a>,
    dumps: &'a [DumpEntry],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    specials: &'a [SpecialEntry],
}

struct FilesView<'a> {
    files: &'a [FileEntry],
    /// Sorted.
    changed: &'a [HostPath],
}

impl Serialize for FilesView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.files.len()))?;
        for f in self.files {
            if !f.changed && self.changed.binary_search(&f.path).is_ok() {
                let mut marked = f.clone();
                marked.changed = true;
                seq.serialize_element(&marked)?;
            } else {
                seq.serialize_element(f)?;
            }
        }
        seq.end()
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

/// One repository's manifest stream.
pub struct ManifestReader {
    source: Arc<ManifestSource>,
    completion: Option<Completion>,
    bytes: Option<Vec<u8>>,
    pos: usize,
    marks: Marks,
}

impl Read for ManifestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes.is_none() {
            let (bytes, changed) = self.source.build().map_err(io::Error::other)?;
            *self.marks.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(changed);
            self.bytes = Some(bytes);
        }
        let bytes = self.bytes.as_deref().unwrap_or_default();
        let n = buf.len().min(bytes.len() - self.pos);
        buf[..n].copy_from_slice(&bytes[self.pos..self.pos + n]);
        self.pos += n;
        if n == 0 {
            if let Some(c) = self.completion.take() {
                c.complete_one();
            }
        }
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

    #[test]
    fn the_view_serializes_as_the_manifest_with_its_marks() {
        let file = |p: &str| FileEntry {
            path: p.into(),
            size: 3,
            digest: "sha256:ab".into(),
            changed: false,
        };
        let files = vec![file("/a"), file("/b"), file("/c")];
        let changed: Vec<HostPath> = vec!["/b".into(), "/gone".into()];
        let view = ManifestView {
            format: manifest::FORMAT,
            service: "s",
            run_id: "r",
            files: FilesView {
                files: &files,
                changed: &changed,
            },
            dumps: &[],
            specials: &[],
        };
        let mut m = crate::manifest::Manifest {
            format: manifest::FORMAT,
            service: "s".into(),
            run_id: "r".into(),
            files: files.clone(),
            dumps: vec![],
            specials: vec![],
        };
        m.mark_changed(&changed);
        let parsed: crate::manifest::Manifest =
            serde_json::from_slice(&serde_json::to_vec(&view).unwrap()).unwrap();
        assert_eq!(parsed, m);
        assert!(parsed.files[1].changed && !parsed.files[0].changed);
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
