//! Where agex keeps its state on a host, and how a host path is found under `--root`.

use std::path::{Path, PathBuf};

/// agex's state directory, under `--root`.
pub const STATE_DIR: &str = "/var/lib/agex";
/// Where run records are written, under `--root`.
pub const RUNS_DIR: &str = "/var/lib/agex/runs";
/// Where drill records are written, under `--root`.
pub const DRILLS_DIR: &str = "/var/lib/agex/drills";

/// `p` (a host path) under `root`.
pub fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// A path read under `root`, as the host sees it.
pub fn host_path(root: &Path, p: &Path) -> PathBuf {
    match p.strip_prefix(root) {
        Ok(rel) => Path::new("/").join(rel),
        Err(_) => p.to_path_buf(),
    }
}

/// agex's state directory under `root`.
pub fn state_dir(root: &Path) -> PathBuf {
    under(root, Path::new(STATE_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_and_host_path_are_inverse() {
        let root = Path::new("/tmp/r");
        let host = Path::new("/var/lib/app/db.sqlite");
        let local = under(root, host);
        assert_eq!(local, Path::new("/tmp/r/var/lib/app/db.sqlite"));
        assert_eq!(host_path(root, &local), host);
        assert_eq!(under(root, Path::new("rel/x")), Path::new("/tmp/r/rel/x"));
        assert_eq!(
            host_path(root, Path::new("/elsewhere")),
            Path::new("/elsewhere")
        );
        assert_eq!(state_dir(root), Path::new("/tmp/r/var/lib/agex"));
    }
}
