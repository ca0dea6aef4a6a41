//! Where generations live on the host, every path below one root (`--root`).

use std::path::{Path, PathBuf};

/// The host paths agex activation reads and writes, below `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

/// Directory name on the tmpfs for secrets that name no service.
pub const SHARED_DIR: &str = "_shared";
/// Directory name on the tmpfs for early secrets (root-owned, needed before users exist).
pub const EARLY_DIR: &str = "_early";
/// The host path of the link to the active generation's directory.
pub const ACTIVE_LINK: &str = "/run/agex";
/// The host path of the link to the active generation's early secrets.
pub const EARLY_LINK: &str = "/run/agex-early";
/// The host path of the link to the generation activated last.
pub const CURRENT_LINK: &str = "/var/lib/agex/current";
/// The host path of the RAM-backed filesystem holding decrypted generations.
pub const SECRETS_FS: &str = "/run/agex.d";

impl Layout {
    /// A layout below `root` (`/` on a real host).
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The root every host path is below.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the real host (root `/`), where NSS and systemctl apply.
    pub fn is_host_root(&self) -> bool {
        self.root.as_os_str().is_empty() || self.root == Path::new("/")
    }

    /// A host path (`/etc/ssh/...`) under the root.
    pub fn host_path(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// `/var/lib/agex`: the store, numbered generation links, the lock.
    pub fn state_dir(&self) -> PathBuf {
        self.host_path(Path::new("/var/lib/agex"))
    }

    /// `/var/lib/agex/store`: immutable `<hash>-generation` directories.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir().join("store")
    }

    /// `/var/lib/agex/generations`: `<N>` symlinks into the store.
    pub fn generations_dir(&self) -> PathBuf {
        self.state_dir().join("generations")
    }

    /// `/var/lib/agex/current`: the generation activated last (what boot activates).
    pub fn current_link(&self) -> PathBuf {
        self.host_path(Path::new(CURRENT_LINK))
    }

    /// `/var/lib/agex/.lock`: serializes build, activate and rollback.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir().join(".lock")
    }

    /// `/run/agex.d`: the RAM-backed filesystem holding decrypted generations.
    pub fn secrets_fs(&self) -> PathBuf {
        self.host_path(Path::new(SECRETS_FS))
    }

    /// `/run/agex`: symlink to the active generation's directory.
    pub fn active_link(&self) -> PathBuf {
        self.host_path(Path::new(ACTIVE_LINK))
    }

    /// `/run/agex-early`: early secrets of the active generation.
    pub fn early_link(&self) -> PathBuf {
        self.host_path(Path::new(EARLY_LINK))
    }

    /// `/run/agex.d/<N>`: a decrypted generation.
    pub fn generation_dir(&self, number: u64) -> PathBuf {
        self.secrets_fs().join(number.to_string())
    }
}

/// A path from `from_dir` to `to`, both absolute host paths, as `../..`-relative text, so
/// links stay right inside a chroot or a test root.
pub fn relative_link(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from_dir.components().collect();
    let to_c: Vec<_> = to.components().collect();
    let common = from
        .iter()
        .zip(to_c.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to_c[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_root() {
        let l = Layout::new("/tmp/r");
        assert_eq!(l.active_link(), PathBuf::from("/tmp/r/run/agex"));
        assert_eq!(l.generation_dir(3), PathBuf::from("/tmp/r/run/agex.d/3"));
        assert_eq!(
            l.host_path(Path::new("/etc/ssh/k")),
            PathBuf::from("/tmp/r/etc/ssh/k")
        );
        assert!(Layout::new("/").is_host_root());
        assert!(!l.is_host_root());
    }

    #[test]
    fn relative_links() {
        assert_eq!(
            relative_link(Path::new("/var/lib/hass"), Path::new("/run/agex/x/y")),
            PathBuf::from("../../../run/agex/x/y")
        );
        assert_eq!(
            relative_link(Path::new("/run"), Path::new("/run/agex/_early")),
            PathBuf::from("agex/_early")
        );
    }
}
