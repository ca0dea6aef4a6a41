//! The checks every path and name from the configuration passes once, at parse time, so
//! nothing built from them later can leave `--root` or the directory it belongs in.

use std::path::PathBuf;

/// Why a host path from the configuration was refused; the message follows the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostPathError {
    /// A relative path.
    #[error("must be an absolute host path")]
    Relative,
    /// `/` itself.
    #[error("must name something below `/`, not `/` itself")]
    Root,
    /// A NUL byte, which no system call takes.
    #[error("must not contain a NUL byte")]
    Nul,
    /// `//` or a trailing `/`.
    #[error("must not contain an empty component (`//` or a trailing `/`)")]
    Empty,
    /// A `.` component.
    #[error("must not contain `.` components")]
    Dot,
    /// A `..` component, which could leave `--root`.
    #[error("must not contain `..`")]
    DotDot,
}

/// A host path: absolute, and every component a normal name (no `..`, no `.`, no empty
/// component from `//` or a trailing `/`). With `--root R` it is then always below `R`.
pub fn host_path(p: &str) -> Result<PathBuf, HostPathError> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(HostPathError::Relative);
    };
    if rest.is_empty() {
        return Err(HostPathError::Root);
    }
    if p.contains('\0') {
        return Err(HostPathError::Nul);
    }
    for part in rest.split('/') {
        match part {
            "" => return Err(HostPathError::Empty),
            "." => return Err(HostPathError::Dot),
            ".." => return Err(HostPathError::DotDot),
            _ => {}
        }
    }
    Ok(PathBuf::from(p))
}

/// A name that becomes one file name (a secret, a template, a database dump): letters,
/// digits, `-`, `_`, `.`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A systemd unit name, which becomes a directory name: also `@`, `:` and `\` (escapes),
/// never `/`, never starting with `.`.
pub fn valid_unit_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':' | '\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths() {
        assert!(host_path("/var/lib/immich").is_ok());
        assert!(host_path("/var/lib/../../tmp/x").is_err());
        assert!(host_path("/var/./lib").is_err());
        assert!(host_path("/var//lib").is_err());
        assert!(host_path("/var/lib/").is_err());
        assert!(host_path("var/lib").is_err());
        assert!(host_path("/").is_err());
        assert!(host_path("/a/..").is_err());
        assert!(host_path("/a/..b").is_ok(), "`..b` is a normal name");
    }

    #[test]
    fn names() {
        assert!(valid_name("immich.env"));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
        assert!(valid_unit_name("getty@tty1.service"));
        assert!(!valid_unit_name("../etc"));
        assert!(!valid_unit_name("a/b.service"));
    }
}
