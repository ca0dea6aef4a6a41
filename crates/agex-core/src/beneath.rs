//! Writing below a root without following a symlink in any parent directory: each
//! component is opened with `O_NOFOLLOW` relative to the one before, and the file, link
//! or pipe is made relative to the last, held open. A service user who owns a parent
//! directory (`/var/lib/app`) could otherwise swap a component for a symlink and make
//! root write wherever it points. Only the root itself is opened by its path.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Why a path below the root could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// A component is a symlink (or not a directory): following it could leave the root.
    #[error("{}: is a symlink (or not a directory); refusing to follow it, since whoever owns the directory holding it could aim it anywhere: replace it with a real directory, or give the path it points to", .path.display())]
    Symlink {
        /// The component, under the root.
        path: PathBuf,
    },
    /// The path has a component that is not a plain name (`..`).
    #[error("{}: not a path below the root (a `..` component)", .path.display())]
    NotBelow {
        /// The path, as given.
        path: PathBuf,
    },
    /// Something that is not a symlink is where a link is to go.
    #[error("{}: exists and is not a symlink; refusing to replace it (move it away first)", .path.display())]
    Occupied {
        /// The path, under the root.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path, under the root.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl BeneathError {
    fn io(path: &Path) -> impl FnOnce(Errno) -> BeneathError + '_ {
        move |e| BeneathError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// A directory below a root, held open; everything done in it is relative to the
/// handle, so no later swap of a parent can move it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    shown: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

impl Dir {
    /// Opens the host path `host` (absolute; `/var/lib/app`) below `root`, creating
    /// missing directories with `create` as their mode; `None` creates nothing.
    pub fn open(root: &Path, host: &Path, create: Option<u32>) -> Result<Dir, BeneathError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut dir = Dir {
            fd: rustix::fs::open(root, flags, Mode::empty()).map_err(BeneathError::io(root))?,
            shown: root.to_path_buf(),
        };
        for c in host.components() {
            match c {
                Component::Normal(name) => dir = dir.child(name, create)?,
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(BeneathError::NotBelow {
                        path: host.to_path_buf(),
                    })
                }
            }
        }
        Ok(dir)
    }

    /// The directory `name` in this one, created with mode `create` when missing.
    pub fn child(&self, name: &OsStr, create: Option<u32>) -> Result<Dir, BeneathError> {
        let shown = self.shown.join(name);
        let next = match (
            rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()),
            create,
        ) {
            (Err(Errno::NOENT), Some(mode)) => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(BeneathError::io(&shown)(e)),
                }
                rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
            }
            (other, _) => other,
        };
        match next {
            Ok(fd) => Ok(Dir { fd, shown }),
            Err(Errno::LOOP | Errno::NOTDIR) => Err(BeneathError::Symlink { path: shown }),
            Err(e) => Err(BeneathError::io(&shown)(e)),
        }
    }

    /// The directory as the user knows it (root joined with the host path).
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// A path that reaches this very directory through the held handle
    /// (`/proc/self/fd/<n>`), for code that only takes paths (an engine's restore,
    /// mount(2), a child's working directory: the child still has the descriptor when
    /// it changes directory, before its exec closes it). Lookups below it never pass the
    /// parents. Valid in this process only, while `self` lives.
    pub fn handle_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Replaces the file `name` with `data` (mode `mode`) atomically: a new file beside
    /// it, synced, renamed over it, the directory synced.
    pub fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> Result<(), BeneathError> {
        let shown = self.shown.join(name);
        let tmp = format!(".{name}.{:016x}.tmp", random());
        let fd = rustix::fs::openat(
            &self.fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(BeneathError::io(&shown))?;
        let mut file = std::fs::File::from(fd);
        let written = file
            .write_all(data)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
            })
            .and_then(|()| file.sync_all())
            .map_err(|source| BeneathError::Io {
                path: shown.clone(),
                source,
            })
            .and_then(|()| {
                rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name)
                    .map_err(BeneathError::io(&shown))
            });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        self.sync()
    }

    /// Points the symlink `name` at `target` atomically (a new link renamed over the old
    /// one); refuses to replace anything that is not a symlink.
    pub fn switch_link(&self, name: &OsStr, target: &Path) -> Result<(), BeneathError> {
        let shown = self.shown.join(name);
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Symlink => {
                return Err(BeneathError::Occupied { path: shown })
            }
            Ok(_) => {
                if self.read_link(name).as_deref() == Some(target) {
                    return Ok(());
                }
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(BeneathError::io(&shown)(e)),
        }
        let tmp = format!(".{}-{:016x}", name.to_string_lossy(), random());
        rustix::fs::symlinkat(target, &self.fd, tmp.as_str()).map_err(BeneathError::io(&shown))?;
        if let Err(e) = rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name) {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(BeneathError::io(&shown)(e));
        }
        self.sync()
    }

    /// Where the symlink `name` points, if it is one.
    pub fn read_link(&self, name: &OsStr) -> Option<PathBuf> {
        rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .ok()
            .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())))
    }

    /// Removes `name` if it is a symlink whose target `ours` accepts.
    pub fn remove_link_if(&self, name: &OsStr, ours: impl Fn(&Path) -> bool) {
        if self.read_link(name).is_some_and(|t| ours(&t)) {
            let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
        }
    }

    /// Makes a named pipe `name` (mode `mode`), replacing a file or pipe of that name.
    pub fn make_fifo(&self, name: &OsStr, mode: u32) -> Result<(), BeneathError> {
        let shown = self.shown.join(name);
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(BeneathError::io(&shown)(e)),
        }
        rustix::fs::mknodat(&self.fd, name, FileType::Fifo, Mode::from_raw_mode(mode), 0)
            .map_err(BeneathError::io(&shown))
    }

    /// Removes the file, pipe or link `name`; a missing one is not an error.
    pub fn remove_file(&self, name: &OsStr) -> Result<(), BeneathError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(BeneathError::io(&self.shown.join(name))(e)),
        }
    }

    /// Flushes the directory's entries.
    pub fn sync(&self) -> Result<(), BeneathError> {
        rustix::fs::fsync(&self.fd).map_err(BeneathError::io(&self.shown))
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The directory holding the host path `host` below `root` (created with mode `create`
/// where missing), and the last component's name.
pub fn parent_of<'a>(
    root: &Path,
    host: &'a Path,
    create: Option<u32>,
) -> Result<(Dir, &'a OsStr), BeneathError> {
    let not_below = || BeneathError::NotBelow {
        path: host.to_path_buf(),
    };
    let name = match host.components().next_back() {
        Some(Component::Normal(n)) => n,
        _ => return Err(not_below()),
    };
    let parent = host.parent().ok_or_else(not_below)?;
    Ok((Dir::open(root, parent, create)?, name))
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_below_the_root_and_refuses_symlinked_parents() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let d = Dir::open(root.path(), Path::new("/var/lib/app"), Some(0o755)).unwrap();
        d.write_atomic("m.prom", b"x 1\n", 0o644).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("var/lib/app/m.prom")).unwrap(),
            b"x 1\n"
        );
        d.switch_link(OsStr::new("l"), Path::new("../x")).unwrap();
        d.switch_link(OsStr::new("l"), Path::new("../y")).unwrap();
        assert_eq!(
            std::fs::read_link(root.path().join("var/lib/app/l")).unwrap(),
            PathBuf::from("../y")
        );
        let e = d
            .switch_link(OsStr::new("m.prom"), Path::new("x"))
            .unwrap_err();
        assert!(matches!(e, BeneathError::Occupied { .. }), "{e}");
        std::os::unix::fs::symlink(outside.path(), root.path().join("var/lib/evil")).unwrap();
        let e = Dir::open(root.path(), Path::new("/var/lib/evil/sub"), Some(0o755)).unwrap_err();
        assert!(matches!(e, BeneathError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("var/lib/evil"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let e = Dir::open(root.path(), Path::new("/var/../etc"), Some(0o755)).unwrap_err();
        assert!(matches!(e, BeneathError::NotBelow { .. }), "{e}");
        // The handle path reaches the held directory even after it is moved away.
        let h = d.handle_path();
        std::fs::rename(
            root.path().join("var/lib/app"),
            root.path().join("var/lib/moved"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("var/lib/app")).unwrap();
        std::fs::write(h.join("through-handle"), b"y").unwrap();
        assert!(root.path().join("var/lib/moved/through-handle").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        d.make_fifo(OsStr::new("p"), 0o600).unwrap();
        d.remove_file(OsStr::new("p")).unwrap();
        d.remove_file(OsStr::new("p")).unwrap();
    }
}
