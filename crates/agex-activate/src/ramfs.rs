//! The RAM-backed filesystem under `/run/agex.d`: its own mount (ramfs, which never
//! swaps, else tmpfs) with `mode=0751,nosuid,nodev,noexec`. Being on a RAM filesystem is
//! not enough — on every systemd host `/run` is a tmpfs, which swaps and carries none of
//! these options — so, like agenix and sops-nix, agex mounts one unless the directory
//! already is a ramfs/tmpfs mount point (its own from an earlier activation).

use std::path::Path;

use agex_core::beneath::{parent_of, Dir};
use agex_secrets::ramdir::is_ram_backed;

use crate::error::ActivateError;
use crate::layout::SECRETS_FS;

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

/// Makes sure `/run/agex.d` below `root` is RAM-backed: mounts ramfs (else tmpfs) if it
/// is not, and refuses unless `allow_unmounted` when neither can be mounted. The
/// directory is reached without following a symlink (one at `run/agex.d` or above is
/// refused), and the mount goes onto the directory held open, not onto a path.
pub fn ensure(root: &Path, allow_unmounted: bool) -> Result<SecretsFs, ActivateError> {
    let host = Path::new(SECRETS_FS);
    let (parent, name) = parent_of(root, host, Some(0o755))?;
    let held = parent.child(name, Some(0o751))?;
    let dir = held.path().to_path_buf();
    let ram = is_ram_backed(&held.handle_path()).map_err(ActivateError::io(&dir))?;
    if ram && is_mount_point(&held, &parent).map_err(ActivateError::io(&dir))? {
        return Ok(SecretsFs::Present);
    }
    // Once mounted, the held handle is the directory under the mount; the mount's own
    // root is reached by opening the name again.
    let chmod_mounted = || -> Result<(), ActivateError> {
        let top = parent.child(name, None)?;
        rustix::fs::fchmod(&top, rustix::fs::Mode::from_raw_mode(0o751))
            .map_err(|e| ActivateError::io(&dir)(e.into()))
    };
    let mut reasons = Vec::new();
    for fstype in ["ramfs", "tmpfs"] {
        match mount(&held.handle_path(), fstype) {
            Ok(()) => {
                // Set the mode again in case the filesystem ignored the option.
                let _ = chmod_mounted();
                return Ok(SecretsFs::Mounted(fstype));
            }
            Err(e) => reasons.push(format!("{fstype}: {e}")),
        }
    }
    if allow_unmounted {
        let _ = chmod_mounted();
        return Ok(SecretsFs::Unmounted);
    }
    Err(ActivateError::NotRamBacked {
        path: dir,
        reason: reasons.join("; "),
    })
}

/// Whether `dir` is the root of a mount: the kernel says so (statx), or its device
/// differs from its parent's.
fn is_mount_point(dir: &Dir, parent: &Dir) -> std::io::Result<bool> {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags};
    if let Ok(st) = statx(dir, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS) {
        if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
            return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        }
    }
    let (here, up) = (rustix::fs::fstat(dir)?, rustix::fs::fstat(parent)?);
    Ok(here.st_dev != up.st_dev || here.st_ino == up.st_ino)
}

fn mount(dir: &Path, fstype: &str) -> std::io::Result<()> {
    use rustix::mount::MountFlags;
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    rustix::mount::mount("agex", dir, fstype, flags, c"mode=0751")?;
    Ok(())
}
