//! Atomic file replacement: temp file in the same directory, fsync, rename, fsync dir.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data` so that a reader (or a crash) sees either the old or the
/// new content, never a mix or a truncated file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace_file(path, data, mode)?;
    sync_dir(parent(path))
}

/// Like [`write_atomic`] but leaves the directory sync to the caller, who replaces many
/// files in one directory and calls [`sync_dir`] once at the end. The content is on disk
/// before the rename, so a crash leaves either the old or the new file, never a mix.
pub fn replace_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let staged = stage(path, data, mode)?;
    staged.tmp.as_file().sync_all()?;
    staged.tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (after a rename or unlink in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Like [`write_atomic`], but fails with `AlreadyExists` instead of replacing a file:
/// for content that must never be overwritten (generated secrets).
pub fn write_new_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let staged = stage(path, data, mode)?;
    staged.tmp.as_file().sync_all()?;
    staged.tmp.persist_noclobber(path).map_err(|e| e.error)?;
    sync_dir(parent(path))
}

/// A file written beside its target and not yet in place (see [`commit`]). Dropping it
/// removes the temp file and leaves the target as it was.
#[derive(Debug)]
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

/// Writes `data` to a temp file beside `path`, without flushing it: the first half of
/// replacing many files with one flush for all.
pub fn stage(path: &Path, data: &[u8], mode: u32) -> io::Result<Staged> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".agex-")
        .suffix(".tmp")
        .tempfile_in(parent(path))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    // Start writing the data out now, while the caller goes on (POSIX_FADV_DONTNEED starts
    // writeback of dirty pages without waiting for it): the one flush in `commit` then
    // mostly waits for the journal. A hint; nothing depends on it.
    let _ = rustix::fs::fadvise(tmp.as_file(), 0, None, rustix::fs::Advice::DontNeed);
    Ok(Staged {
        tmp,
        target: path.to_path_buf(),
    })
}

/// Puts staged files in place: one `syncfs` flushes every temp file's content (instead
/// of one `fsync` per file, which dominates when replacing a thousand small files), then
/// each is renamed over its target and each directory is synced once. A crash at any
/// point leaves every target either old or new. Returns each target with the result of
/// its rename; the outer error is a failed flush (nothing renamed) or directory sync.
pub fn commit(staged: Vec<Staged>) -> io::Result<Vec<(PathBuf, io::Result<()>)>> {
    if staged.is_empty() {
        return Ok(Vec::new());
    }
    let mut devices = BTreeSet::new();
    for s in &staged {
        use std::os::unix::fs::MetadataExt;
        // One flush per file system the temp files live on.
        if devices.insert(s.tmp.as_file().metadata()?.dev()) {
            rustix::fs::syncfs(s.tmp.as_file())?;
        }
    }
    let mut dirs = BTreeSet::new();
    let mut out = Vec::with_capacity(staged.len());
    for s in staged {
        dirs.insert(parent(&s.target).to_path_buf());
        let result = s.tmp.persist(&s.target).map(|_| ()).map_err(|e| e.error);
        out.push((s.target, result));
    }
    for dir in dirs {
        sync_dir(&dir)?;
    }
    Ok(out)
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn staged_files_appear_only_on_commit_and_vanish_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, "old a").unwrap();
        fs::write(&b, "old b").unwrap();
        let sa = stage(&a, b"new a", 0o640).unwrap();
        let sb = stage(&b, b"new b", 0o640).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"old a", "staging changes nothing");
        drop(sb);
        let done = commit(vec![sa]).unwrap();
        assert_eq!(done.len(), 1);
        assert!(done[0].1.is_ok());
        assert_eq!(fs::read(&a).unwrap(), b"new a");
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::read(&b).unwrap(),
            b"old b",
            "a dropped stage is discarded"
        );
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "no temp files left behind");
    }
}
