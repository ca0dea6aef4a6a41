//! The RAM-backed filesystem under `/run/agex.d`: its own mount (ramfs, which never
//! swaps, else tmpfs) with `mode=0751,nosuid,nodev,noexec`. Being on a RAM filesystem is
//! not enough — on every systemd host `/run` is a tmpfs, which swaps and carries none of
//! these options — so, like agenix and sops-nix, agex mounts one unless the directory
//! already is a ramfs/tmpfs mount point (its own from an earlier activation).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use agex_secrets::ramdir::is_ram_backed;

use crate::error::ActivateError;

/// What was found at the secrets directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsFs {
    /// It already was a ramfs or tmpfs mount point.
    Present,
    /// agex mounted it now, with this filesystem type.
    Mounted(&'static str),
    /// Not RAM-backed, accepted because of `--allow-unmounted`.
    Unmounted,
}

/// Makes sure `dir` is RAM-backed: mounts ramfs (else tmpfs) if it is not, and refuses
/// unless `allow_unmounted` when neither can be mounted.
pub fn ensure(dir: &Path, allow_unmounted: bool) -> Result<SecretsFs, ActivateError> {
    if !dir.is_dir() {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(ActivateError::io(parent))?;
        }
        match fs::DirBuilder::new().mode(0o751).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ActivateError::io(dir)(e)),
        }
    }
    let ram = is_ram_backed(dir).map_err(ActivateError::io(dir))?;
    if ram && is_mount_point(dir).map_err(ActivateError::io(dir))? {
        return Ok(SecretsFs::Present);
    }
    let mut reasons = Vec::new();
    for fstype in ["ramfs", "tmpfs"] {
        match mount(dir, fstype) {
            Ok(()) => {
                // Set the mode again in case the filesystem ignored the option.
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o751));
                return Ok(SecretsFs::Mounted(fstype));
            }
            Err(e) => reasons.push(format!("{fstype}: {e}")),
        }
    }
    if allow_unmounted {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o751));
        return Ok(SecretsFs::Unmounted);
    }
    Err(ActivateError::NotRamBacked {
        path: dir.to_path_buf(),
        reason: reasons.join("; "),
    })
}

/// Whether `dir` is the root of a mount: the kernel says so (statx), or its device
/// differs from its parent's.
fn is_mount_point(dir: &Path) -> std::io::Result<bool> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    if let Ok(st) = statx(CWD, dir, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::BASIC_STATS) {
        if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
            return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        }
    }
    let parent = dir.join("..");
    let (here, up) = (fs::metadata(dir)?, fs::metadata(parent)?);
    use std::os::unix::fs::MetadataExt;
    Ok(here.dev() != up.dev() || here.ino() == up.ino())
}

fn mount(dir: &Path, fstype: &str) -> std::io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let source = CString::new("agex").map_err(std::io::Error::other)?;
    let kind = CString::new(fstype).map_err(std::io::Error::other)?;
    let data = CString::new("mode=0751").map_err(std::io::Error::other)?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
