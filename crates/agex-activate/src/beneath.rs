//! Creating and removing the links a rule's `path` asks for, below the root, without
//! following a symlink in any parent directory: each component is opened with
//! `O_NOFOLLOW` relative to the one before, and the link is made relative to the last.
//! A service user who owns a parent directory (`/var/lib/app`) could otherwise swap a
//! component for a symlink and make root write wherever it points.

use std::path::Path;

use agex_core::beneath::{parent_of, BeneathError};

use crate::error::ActivateError;

fn refused(e: BeneathError, name: &str) -> ActivateError {
    match e {
        BeneathError::Symlink { path } => ActivateError::Invalid {
            path,
            reason: "is a symlink (or not a directory); refusing to follow it to place a link below the root: replace it with a real directory".into(),
        },
        BeneathError::Occupied { path } => ActivateError::PathOccupied {
            path,
            name: name.to_string(),
        },
        BeneathError::NotBelow { path } => ActivateError::Invalid {
            path,
            reason: "is not a path a link can be placed at".into(),
        },
        BeneathError::Io { path, source } => ActivateError::Io { path, source },
    }
}

/// Points the link at `host_path` (below `root`) to `target`, atomically (a new link
/// renamed over the old one); missing parents are created (0755).
pub fn switch_link(root: &Path, host_path: &Path, target: &Path) -> Result<(), ActivateError> {
    let shown_name = host_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (dir, name) =
        parent_of(root, host_path, Some(0o755)).map_err(|e| refused(e, &shown_name))?;
    dir.switch_link(name, target)
        .map_err(|e| refused(e, &shown_name))
}

/// Removes the link at `host_path` if it is a symlink whose target `ours` accepts;
/// never follows a symlink in a parent directory.
pub fn remove_link_if(root: &Path, host_path: &Path, ours: impl Fn(&Path) -> bool) {
    if let Ok((dir, name)) = parent_of(root, host_path, None) {
        dir.remove_link_if(name, ours);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
