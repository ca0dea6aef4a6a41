//! Handing a secret to one child process through a descriptor instead of a named file:
//! an anonymous in-memory file (`memfd_create`), sealed against change, mode 0600,
//! inherited by exactly the children it is attached to and opened by them as
//! `/proc/self/fd/N`. It has no name in any filesystem, so it vanishes with the last
//! process holding it — a SIGKILL of agex and its children leaves nothing behind.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use rustix::fs::{MemfdFlags, Mode, SealFlags};

/// A secret in an anonymous, sealed, 0600 in-memory file.
#[derive(Debug)]
pub struct SecretFd {
    fd: OwnedFd,
}

impl SecretFd {
    /// Puts `data` in a new sealed memfd; `label` only shows in `/proc/PID/fd` listings.
    pub fn new(label: &str, data: &[u8]) -> Result<SecretFd, std::io::Error> {
        let fd = rustix::fs::memfd_create(label, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
        let mut file = File::from(fd);
        file.write_all(data)?;
        let fd = OwnedFd::from(file);
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )?;
        Ok(SecretFd { fd })
    }

    /// Gives the file to `uid` (a child that drops privileges before opening it).
    pub fn chown(&self, uid: u32) -> Result<(), std::io::Error> {
        let uid = rustix::process::Uid::from_raw(uid);
        rustix::fs::fchown(&self.fd, Some(uid), None)?;
        Ok(())
    }

    /// The path a child that inherited the descriptor opens it by.
    pub fn child_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Lets `cmd`'s process (and only it, of the processes agex starts) inherit the
    /// descriptor, under the same number. The `SecretFd` must live until `cmd` is spawned.
    pub fn pass_to(&self, cmd: &mut Command) {
        let raw = self.fd.as_raw_fd();
        // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe, on a
        // descriptor number that is open in the parent and so in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(raw);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                Ok(())
            });
        }
    }

    /// The descriptor, for code that reads it in-process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_reads_it_and_it_has_no_name() {
        let s = SecretFd::new("test", b"hunter2").unwrap();
        let mut cmd = Command::new("cat");
        cmd.arg(s.child_path());
        s.pass_to(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(out.stdout, b"hunter2");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", s.fd.as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
    }

    #[test]
    fn other_children_do_not_inherit_it() {
        let s = SecretFd::new("test", b"hunter2").unwrap();
        let out = Command::new("cat").arg(s.child_path()).output().unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn sealed_against_change() {
        let s = SecretFd::new("test", b"x").unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.child_path())
            .unwrap();
        assert!(f.write_all(b"y").is_err());
    }
}
