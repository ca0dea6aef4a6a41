//! Errors from loading a configuration.

use std::path::PathBuf;

use crate::diagnostic::Diagnostics;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No `agex.toml` above the starting directory.
    #[error("no agex.toml in {} or any parent directory; run `agex init` there or pass -C DIR", .start.display())]
    NotFound {
        /// Where the search started.
        start: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid; each diagnostic names file:line:col.
    #[error("{0}")]
    Invalid(Diagnostics),
}
