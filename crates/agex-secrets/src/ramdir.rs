//! A private directory on a RAM-backed filesystem, for plaintext that must have a name
//! (an editor's file, an SQLite copy). agex holds the directory open
//! (`O_DIRECTORY | O_NOFOLLOW`) and does every write, read-back and wipe relative to
//! that handle, never by path: whoever can rename things in the base directory cannot
//! redirect what agex reads or deletes. Its files are overwritten with zeros and removed
//! when it is dropped, when a signal ends agex ([`wipe_all`]), and — after a SIGKILL —
//! by the next agex that uses the same base directory ([`RamDir::create_in`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::plainbuf;

const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Every name agex gives its RAM directories starts with this, then `<pid>-<16 hex>`.
const PREFIX: &str = "agex-";

/// Whether `path` lives on tmpfs or ramfs.
pub fn is_ram_backed(path: &Path) -> Result<bool, std::io::Error> {
    let st = rustix::fs::statfs(path)?;
    Ok(is_ram_magic(st.f_type as u64))
}

#[allow(clippy::unnecessary_cast)]
fn is_ram_magic(magic: u64) -> bool {
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// Where the CLI shows a one-line notice (leftovers of a dead agex removed); a library
/// prints nothing itself.
static NOTICE: OnceLock<fn(&str)> = OnceLock::new();

/// Sets where notices go (the CLI: stderr). Only the first call counts.
pub fn set_notice(show: fn(&str)) {
    let _ = NOTICE.set(show);
}

/// Shows a one-line notice through the function given to [`set_notice`].
pub fn notice(line: &str) {
    if let Some(show) = NOTICE.get() {
        show(line);
    }
}

/// The base for RAM directories: `$XDG_RUNTIME_DIR` when it is a directory owned by the
/// effective user with mode 0700 (a runtime directory of someone else, as after `sudo -E`
/// or `su` without `-`, could be redirected by its owner), else `/dev/shm`. Whether the
/// base is RAM-backed is checked when the directory is made.
pub fn runtime_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && private_to_me(p))
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

fn private_to_me(dir: &Path) -> bool {
    let Ok(fd) = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return false;
    };
    st.st_uid == rustix::process::geteuid().as_raw() && st.st_mode & 0o777 == 0o700
}

/// A 0700 directory on tmpfs/ramfs, held open, wiped on drop.
#[derive(Debug)]
pub struct RamDir {
    path: PathBuf,
    dir: OwnedFd,
    base: OwnedFd,
    name: String,
    registered: u64,
}

impl RamDir {
    /// Creates a private directory under [`runtime_base`]. Refuses a persistent
    /// filesystem unless `allow_persistent`.
    pub fn create(allow_persistent: bool) -> Result<RamDir, SecretsError> {
        Self::create_in(&runtime_base(), allow_persistent)
    }

    /// Creates a private directory under `base`, first removing what agex processes
    /// that are no longer running left there.
    pub fn create_in(base: &Path, allow_persistent: bool) -> Result<RamDir, SecretsError> {
        let io = |source: std::io::Error| SecretsError::Io {
            path: base.to_path_buf(),
            source,
        };
        let base_fd = rustix::fs::open(
            base,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(e.into()))?;
        let fs = rustix::fs::fstatfs(&base_fd).map_err(|e| io(e.into()))?;
        if !is_ram_magic(fs.f_type as u64) && !allow_persistent {
            return Err(SecretsError::UnsafeTmpDir {
                path: base.to_path_buf(),
                fs: "not tmpfs or ramfs".into(),
            });
        }
        sweep_dead(base, base_fd.as_fd());
        for _ in 0..16 {
            let name = format!(
                "{PREFIX}{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            );
            match rustix::fs::mkdirat(&base_fd, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io(e.into())),
            }
            let dir = rustix::fs::openat(
                &base_fd,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io(e.into()))?;
            let registered = register(Place::Dir {
                base: base_fd.try_clone().map_err(&io)?,
                dir: dir.try_clone().map_err(&io)?,
                name: name.clone(),
            });
            return Ok(RamDir {
                path: base.join(&name),
                dir,
                base: base_fd,
                name,
                registered,
            });
        }
        Err(io(std::io::Error::other(
            "could not create a unique directory",
        )))
    }

    /// The directory's path, to show and to hand to a child that opens by name (an
    /// editor). agex itself never uses it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path to `name` inside the directory through agex's own handle
    /// (`/proc/self/fd/N/name`), for in-process code that only takes paths (SQLite): it
    /// reaches this directory even if its name now points elsewhere.
    pub fn resolved(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).join(name)
    }

    /// Writes a new 0600 file in the directory; returns its path (for a child).
    pub fn write(&self, name: &str, data: &[u8]) -> Result<PathBuf, SecretsError> {
        let path = self.path.join(name);
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| SecretsError::io(&path)(e.into()))?;
        File::from(fd)
            .write_all(data)
            .map_err(SecretsError::io(&path))?;
        Ok(path)
    }

    /// Reads a regular file of the directory back (not following a symlink put there).
    pub fn read(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, std::io::Error> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(std::io::Error::other("not a regular file"));
        }
        plainbuf::read_all(&mut File::from(fd), st.st_size.max(0) as usize)
    }

    /// Opens a file of the directory for reading (not following a symlink).
    pub fn open(&self, name: &str) -> Result<File, SecretsError> {
        rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| SecretsError::io(self.path.join(name))(e.into()))
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        wipe_dir(self.base.as_fd(), self.dir.as_fd(), &self.name);
        unregister(self.registered);
    }
}

/// Overwrites every regular file below `dir` with zeros, then removes the tree. A
/// symlink anywhere (`dir` itself included) is removed, never followed.
pub fn wipe_tree(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(base) = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    wipe_entry(base.as_fd(), name);
}

/// Wipes and removes `name` in `base`, whatever it is, without following symlinks.
fn wipe_entry(base: BorrowedFd<'_>, name: &OsStr) {
    let Ok(st) = rustix::fs::statat(base, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return;
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            if let Ok(dir) = rustix::fs::openat(
                base,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                wipe_contents(dir.as_fd());
            }
            let _ = rustix::fs::unlinkat(base, name, AtFlags::REMOVEDIR);
        }
        FileType::RegularFile => {
            zero_fill(base, name);
            let _ = rustix::fs::unlinkat(base, name, AtFlags::empty());
        }
        _ => {
            let _ = rustix::fs::unlinkat(base, name, AtFlags::empty());
        }
    }
}

/// Wipes what `dir` holds, then removes it from `base` as `name` — only if that name
/// still is this very directory (same device and inode), so a swapped-in symlink or
/// directory is left alone.
fn wipe_dir(base: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &str) {
    wipe_contents(dir);
    let (Ok(held), Ok(named)) = (
        rustix::fs::fstat(dir),
        rustix::fs::statat(base, name, AtFlags::SYMLINK_NOFOLLOW),
    ) else {
        return;
    };
    if held.st_dev == named.st_dev && held.st_ino == named.st_ino {
        let _ = rustix::fs::unlinkat(base, name, AtFlags::REMOVEDIR);
    }
}

fn wipe_contents(dir: BorrowedFd<'_>) {
    let Ok(mut entries) = rustix::fs::Dir::read_from(dir) else {
        return;
    };
    let mut names = Vec::new();
    while let Some(Ok(e)) = entries.read() {
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    for n in names {
        wipe_entry(dir, &n);
    }
}

fn zero_fill(base: BorrowedFd<'_>, name: &OsStr) {
    let Ok(fd) = rustix::fs::openat(
        base,
        name,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return;
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return;
    }
    let mut f = File::from(fd);
    let mut left = st.st_size.max(0) as usize;
    let zeros = vec![0u8; left.clamp(1, 1 << 20)];
    while left > 0 {
        let n = left.min(zeros.len());
        if f.write_all(&zeros[..n]).is_err() {
            break;
        }
        left -= n;
    }
    let _ = f.sync_data();
}

/// Removes what agex processes that are no longer running left under `base` (their
/// plaintext directories, after a SIGKILL), saying so in one notice each; returns the
/// paths removed. A `base` that cannot be opened holds nothing of ours to remove.
pub fn sweep_leftovers(base: &Path) -> Vec<PathBuf> {
    match rustix::fs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => sweep_dead(base, fd.as_fd()),
        Err(_) => Vec::new(),
    }
}

/// Removes `agex-<pid>-<hex>` directories in `base` whose process is gone (killed before
/// it could wipe them) and that belong to this user; says so in one line each.
fn sweep_dead(shown: &Path, base: BorrowedFd<'_>) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(mut entries) = rustix::fs::Dir::read_from(base) else {
        return removed;
    };
    let me = rustix::process::geteuid().as_raw();
    let mut dead = Vec::new();
    while let Some(Ok(e)) = entries.read() {
        let Ok(name) = e.file_name().to_str() else {
            continue;
        };
        if let Some(pid) = leftover_pid(name) {
            if !alive(pid) {
                dead.push((name.to_string(), pid));
            }
        }
    }
    for (name, pid) in dead {
        let owned = rustix::fs::statat(base, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| st.st_uid == me && FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .unwrap_or(false);
        if owned {
            wipe_entry(base, OsStr::new(&name));
            let path = shown.join(&name);
            notice(&format!(
                "removed {}, left behind by agex process {pid}, which is no longer running",
                path.display()
            ));
            removed.push(path);
        }
    }
    removed
}

/// The pid in a name `agex-<pid>-<16 hex digits>`.
fn leftover_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, hex) = rest.split_once('-')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Whether a process with this pid exists (a pid of another user counts as alive).
pub fn alive(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

/// A named plaintext place to wipe if a signal ends agex.
enum Place {
    Dir {
        base: OwnedFd,
        dir: OwnedFd,
        name: String,
    },
    Tree(PathBuf),
}

struct Live {
    places: Vec<(u64, Place)>,
    next: u64,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    places: Vec::new(),
    next: 1,
});

fn with_live<T>(f: impl FnOnce(&mut Live) -> T) -> T {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut live)
}

fn register(place: Place) -> u64 {
    with_live(|l| {
        let id = l.next;
        l.next += 1;
        l.places.push((id, place));
        id
    })
}

fn unregister(id: u64) {
    with_live(|l| l.places.retain(|(i, _)| *i != id));
}

/// A directory tree (activation staging on the secrets filesystem) that [`wipe_all`]
/// removes while this lives.
#[derive(Debug)]
pub struct Registration(u64);

impl Registration {
    /// Registers `dir` to be wiped if a signal ends agex before this is dropped.
    pub fn tree(dir: &Path) -> Registration {
        Registration(register(Place::Tree(dir.to_path_buf())))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

/// Wipes every live [`RamDir`] and registered tree, for the thread that handles SIGTERM,
/// SIGINT and SIGHUP just before agex exits. Returns how many there were.
pub fn wipe_all() -> usize {
    wipe_where(|_| true)
}

fn wipe_where(pick: impl Fn(u64) -> bool) -> usize {
    let places = with_live(|l| {
        let (taken, kept) = std::mem::take(&mut l.places)
            .into_iter()
            .partition(|(id, _)| pick(*id));
        l.places = kept;
        taken
    });
    let places: Vec<(u64, Place)> = places;
    let n = places.len();
    let mut trees = Vec::new();
    for (_, place) in places {
        match place {
            Place::Dir { base, dir, name } => wipe_dir(base.as_fd(), dir.as_fd(), &name),
            Place::Tree(path) => {
                wipe_tree(&path);
                trees.push(path);
            }
        }
    }
    // Other threads (activation's writers) run on until agex exits: a tree they created
    // or wrote into while it was being wiped is wiped again. What still escapes is a dead
    // process's leftover, which the next agex removes with a note.
    for _ in 0..3 {
        if !trees.iter().any(|t| t.exists()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        trees.iter().for_each(|t| wipe_tree(t));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn shm() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm").unwrap()
    }

    #[test]
    fn leftover_names() {
        assert_eq!(leftover_pid("agex-123-0123456789abcdef"), Some(123));
        assert_eq!(leftover_pid("agex-123-0123"), None);
        assert_eq!(leftover_pid("agex-x-0123456789abcdef"), None);
        assert_eq!(leftover_pid("other-123-0123456789abcdef"), None);
    }

    #[test]
    fn wiped_on_drop_and_reads_back() {
        let base = shm();
        let d = RamDir::create_in(base.path(), false).unwrap();
        d.write("s", b"secret").unwrap();
        assert_eq!(d.read("s").unwrap().as_slice(), b"secret");
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(d);
        assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
    }

    #[test]
    fn swapped_for_a_symlink_changes_nothing_outside() {
        let base = shm();
        let outside = shm();
        std::fs::write(outside.path().join("s"), b"victim").unwrap();
        let d = RamDir::create_in(base.path(), false).unwrap();
        d.write("s", b"secret").unwrap();
        // Someone renames agex's directory away and puts a symlink in its place.
        let moved = base.path().join("moved");
        std::fs::rename(d.path(), &moved).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path()).unwrap();
        assert_eq!(d.read("s").unwrap().as_slice(), b"secret");
        drop(d);
        assert_eq!(
            std::fs::read(outside.path().join("s")).unwrap(),
            b"victim",
            "the wipe must not follow the symlink"
        );
        // The held directory itself was wiped, wherever it was moved.
        assert_eq!(std::fs::read_dir(&moved).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed() {
        let base = shm();
        // A pid that cannot be running: above the kernel's maximum.
        let dead = base.path().join("agex-2147483000-0123456789abcdef");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("passphrase"), b"pw").unwrap();
        let live = base
            .path()
            .join(format!("agex-{}-0123456789abcdef", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let d = RamDir::create_in(base.path(), false).unwrap();
        assert!(!dead.exists());
        assert!(live.exists(), "a running process's directory stays");
        drop(d);
    }

    #[test]
    fn registered_dirs_and_trees_are_wiped() {
        let base = shm();
        let d = RamDir::create_in(base.path(), false).unwrap();
        d.write("s", b"secret").unwrap();
        let tree = base.path().join(".staging");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("x"), b"y").unwrap();
        let reg = Registration::tree(&tree);
        // Only this test's places: other tests of this process run at the same time.
        let ours = [d.registered, reg.0];
        assert_eq!(wipe_where(|id| ours.contains(&id)), 2);
        assert!(!d.path().exists());
        assert!(!tree.exists());
        drop(reg);
        drop(d);
    }

    #[test]
    fn foreign_runtime_dir_is_not_used() {
        let base = shm();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!private_to_me(base.path()));
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_to_me(base.path()));
        let link = shm();
        let l = link.path().join("l");
        std::os::unix::fs::symlink(base.path(), &l).unwrap();
        assert!(!private_to_me(&l), "a symlink is not the directory");
    }
}
