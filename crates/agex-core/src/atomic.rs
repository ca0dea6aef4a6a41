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

/// The suffix of a temp file named with [`temp_prefix`].
pub const TEMP_SUFFIX: &str = ".tmp";

/// `.agex-<pid>-`: the temp file of a writer killed before its rename names its process,
/// so the next writer knows it for a dead one's ([`remove_dead_temps`]).
pub fn temp_prefix() -> String {
    format!(".agex-{}-", std::process::id())
}

/// The pid in a temp file name `.agex-<pid>-<random>.tmp`.
fn temp_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(".agex-")?.strip_suffix(TEMP_SUFFIX)?;
    let (pid, random) = rest.split_once('-')?;
    if random.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Removes from `dir` the temp files of atomic writes whose process no longer runs
/// (SIGKILLed between writing and renaming); returns their paths. A directory that
/// cannot be read holds nothing to remove.
pub fn remove_dead_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let dead = e.file_name().to_str().is_some_and(is_dead_temp);
        if dead && e.file_type().is_ok_and(|t| t.is_file()) && fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Whether `name` is a temp file (`.agex-<pid>-<random>.tmp`) of a process that no
/// longer runs: one killed before it renamed the file into place.
pub fn is_dead_temp(name: &str) -> bool {
    temp_pid(name)
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| {
            matches!(
                rustix::process::test_kill_process(p),
                Err(rustix::io::Errno::SRCH)
            )
        })
}

/// Writes `data` to a temp file beside `path`, without flushing it: the first half of
/// replacing many files with one flush for all.
pub fn stage(path: &Path, data: &[u8], mode: u32) -> io::Result<Staged> {
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix())
        .suffix(TEMP_SUFFIX)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temps_of_dead_writers_are_removed_and_others_kept() {
        assert_eq!(temp_pid(".agex-123-abc.tmp"), Some(123));
        assert_eq!(temp_pid(".agex-restore-abc"), None);
        assert_eq!(temp_pid(".agex-abc.tmp"), None);
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum never runs.
        let dead = dir.path().join(".agex-2147483000-x1.tmp");
        let live = dir
            .path()
            .join(format!(".agex-{}-x2.tmp", std::process::id()));
        let other = dir.path().join("a.timer");
        for p in [&dead, &live, &other] {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_dead_temps(dir.path()), vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && other.exists());
        let staged = stage(&dir.path().join("t"), b"y", 0o600).unwrap();
        assert_eq!(
            temp_pid(&staged.tmp.path().file_name().unwrap().to_string_lossy()),
            Some(std::process::id() as i32)
        );
    }
}
