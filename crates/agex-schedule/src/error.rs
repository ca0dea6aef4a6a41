//! Errors of scheduling, unit installation and the daemon, worded for the operator.

use std::path::PathBuf;

/// Everything that can go wrong generating, installing or running the schedule.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A job name that no policy or repository defines.
    #[error("`{name}` is not a job of this configuration (jobs: {known})")]
    UnknownJob {
        /// The name given.
        name: String,
        /// The jobs defined.
        known: String,
    },
    /// A value cannot be written into a unit file.
    #[error("cannot put {what} `{value}` into a systemd unit: {why}")]
    Unrepresentable {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
        /// Why not.
        why: String,
    },
    /// systemctl failed.
    #[error(transparent)]
    Systemctl(#[from] agex_core::systemctl::SystemctlError),
    /// A file under /etc/systemd/system that agex would overwrite was not written by agex.
    #[error("{} exists and was not written by agex; move it away or remove it first", .path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// A duration like `26h` could not be read.
    #[error("`{0}` is not a duration: use a number with s, m, h, d or w (`26h`, `90m`, `1d12h`)")]
    Duration(String),
    /// State written by the daemon could not be read.
    #[error("{}: {why}", .path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// The configuration did not load when the daemon started.
    #[error("cannot start the daemon: configuration: {0}")]
    Config(#[source] agex_core::ConfigError),
    /// The async runtime or a signal handler could not be set up.
    #[error("cannot start the daemon: {0}")]
    Runtime(std::io::Error),
}

impl ScheduleError {
    /// Wraps an io error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ScheduleError {
        let path = path.into();
        move |source| ScheduleError::Io { path, source }
    }
}
