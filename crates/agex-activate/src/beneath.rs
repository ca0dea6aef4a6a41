//! Creating and removing the links a rule's `path` asks for, below the root, without
//! following a symlink in any parent directory: each component is opened with
//! `O_NOFOLLOW` relative to the one before, and the link is made relative to the last.
//! A service user who owns a parent directory (`/var/lib/app`) could otherwise swap a
//! component for a symlink and make root write wherever it points.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::ActivateError;

/// The directory `rel` (relative to `root`) opened without following symlinks, created
/// (0755) where missing. A symlink on the way is refused.
fn open_dir(root: &Path, rel: &Path) -> Result<OwnedFd, ActivateError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(root, flags, Mode::empty())
        .map_err(|e| ActivateError::io(root)(e.into()))?;
    let mut shown = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        shown.push(name);
        let next = match rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW, Mode::empty()) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(ActivateError::io(&shown)(e.into())),
                }
                rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW, Mode::empty())
            }
            other => other,
        };
        dir = next.map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => symlink_refused(&shown),
            e => ActivateError::io(&shown)(e.into()),
        })?;
    }
    Ok(dir)
}

fn symlink_refused(at: &Path) -> ActivateError {
    ActivateError::Invalid {
        path: at.to_path_buf(),
        reason: "is a symlink (or not a directory); refusing to follow it to place a secret's link: replace it with a real directory".into(),
    }
}

fn split(host_path: &Path) -> Option<(PathBuf, &OsStr)> {
    let rel = host_path.strip_prefix("/").unwrap_or(host_path);
    Some((rel.parent()?.to_path_buf(), rel.file_name()?))
}

/// Points the link at `host_path` (below `root`) to `target`, atomically (a new link
/// renamed over the old one).
pub fn switch_link(root: &Path, host_path: &Path, target: &Path) -> Result<(), ActivateError> {
    let shown = root.join(host_path.strip_prefix("/").unwrap_or(host_path));
    let Some((parent, name)) = split(host_path) else {
        return Err(ActivateError::Invalid {
            path: shown,
            reason: "is not a path a link can be placed at".into(),
        });
    };
    let dir = open_dir(root, &parent)?;
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Symlink => {
            return Err(ActivateError::PathOccupied {
                path: shown,
                name: name.to_string_lossy().into_owned(),
            })
        }
        Ok(_) => {
            if rustix::fs::readlinkat(&dir, name, Vec::new())
                .is_ok_and(|t| Path::new(OsStr::from_bytes(t.as_bytes())) == target)
            {
                return Ok(());
            }
        }
        Err(Errno::NOENT) => {}
        Err(e) => return Err(ActivateError::io(&shown)(e.into())),
    }
    let tmp = format!(".{}-{:016x}", name.to_string_lossy(), rand::random::<u64>());
    rustix::fs::symlinkat(target, &dir, tmp.as_str())
        .map_err(|e| ActivateError::io(&shown)(e.into()))?;
    if let Err(e) = rustix::fs::renameat(&dir, tmp.as_str(), &dir, name) {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        return Err(ActivateError::io(&shown)(e.into()));
    }
    rustix::fs::fsync(dir.as_fd()).map_err(|e| ActivateError::io(&shown)(e.into()))
}

/// Removes the link at `host_path` if it is a symlink whose target `ours` accepts;
/// never follows a symlink in a parent directory.
pub fn remove_link_if(root: &Path, host_path: &Path, ours: impl Fn(&Path) -> bool) {
    let Some((parent, name)) = split(host_path) else {
        return;
    };
    let Ok(dir) = open_dir_existing(root, &parent) else {
        return;
    };
    if let Ok(t) = rustix::fs::readlinkat(&dir, name, Vec::new()) {
        if ours(Path::new(OsStr::from_bytes(t.as_bytes()))) {
            let _ = rustix::fs::unlinkat(&dir, name, AtFlags::empty());
        }
    }
}

fn open_dir_existing(root: &Path, rel: &Path) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(root, flags, Mode::empty())?;
    for c in rel.components() {
        if let Component::Normal(name) = c {
            dir = rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW, Mode::empty())?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_below_the_root_and_refuses_symlinked_parents() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        switch_link(root.path(), Path::new("/var/lib/app/s"), Path::new("../x")).unwrap();
        assert_eq!(
            std::fs::read_link(root.path().join("var/lib/app/s")).unwrap(),
            PathBuf::from("../x")
        );
        // Same target again: nothing to do.
        switch_link(root.path(), Path::new("/var/lib/app/s"), Path::new("../x")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("var/lib/evil")).unwrap();
        let e =
            switch_link(root.path(), Path::new("/var/lib/evil/s"), Path::new("../x")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        remove_link_if(root.path(), Path::new("/var/lib/app/s"), |t| {
            t == Path::new("../x")
        });
        assert!(!root.path().join("var/lib/app/s").exists());
    }

    #[test]
    fn refuses_to_replace_a_file() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/f"), b"keep").unwrap();
        let e = switch_link(root.path(), Path::new("/etc/f"), Path::new("x")).unwrap_err();
        assert!(matches!(e, ActivateError::PathOccupied { .. }), "{e}");
        assert_eq!(std::fs::read(root.path().join("etc/f")).unwrap(), b"keep");
    }
}
