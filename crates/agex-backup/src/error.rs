//! Errors of backup runs, worded for the operator.

use std::path::PathBuf;

use agex_secrets::SecretsError;

/// Everything that can go wrong talking to a repository or running a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Decrypting a repository's password or ssh key failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A repository name is not in agex.toml.
    #[error("repository `{name}` is not defined in agex.toml (known: {known})")]
    UnknownRepository {
        /// The name given.
        name: String,
        /// The names defined.
        known: String,
    },
    /// A service has no policy.
    #[error("service `{name}` has no policy in policies/ (known: {known})")]
    UnknownService {
        /// The name given.
        name: String,
        /// The services with policies.
        known: String,
    },
    /// An external tool exited non-zero.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command, without secrets.
        tool: String,
        /// How it ended.
        status: String,
        /// Its last stderr lines.
        stderr: String,
    },
    /// An external tool could not be started (named short: `borg create`, `pg_dump`;
    /// the whole command line is a `-v` line).
    #[error("cannot run {}: {source}", crate::process::short(.tool))]
    Spawn {
        /// The command line.
        tool: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Restic engine (rustic_core) reported an error.
    #[error("restic repository `{repo}`: {message}")]
    Restic {
        /// The repository.
        repo: String,
        /// What rustic_core said (its first line), or what agex found.
        message: String,
        /// rustic_core's error, whole, when it raised one.
        #[source]
        source: Option<Box<rustic_core::RusticError>>,
    },
    /// A database the command needs to be PostgreSQL is not (a policy that changed
    /// under a command).
    #[error("database `{0}` is not a PostgreSQL database")]
    NotPostgres(String),
    /// A tool's machine output could not be read.
    #[error("{tool}: unexpected output: {detail}")]
    Output {
        /// The tool.
        tool: String,
        /// What was wrong.
        detail: String,
    },
    /// Another agex run holds the repository.
    #[error("repository `{repo}` is busy: another agex run holds {} (waited {waited} s; `[backup] lock_wait` in agex.toml)", .lock.display())]
    Busy {
        /// The repository.
        repo: String,
        /// Its lock file.
        lock: PathBuf,
        /// Seconds waited.
        waited: u64,
    },
    /// Borg found the repository locked by someone else and gave up waiting.
    #[error("repository `{repo}` is locked by another process: {message}")]
    Locked {
        /// The repository.
        repo: String,
        /// What borg said.
        message: String,
    },
    /// A path below the root could not be used without following a symlink.
    #[error(transparent)]
    Beneath(#[from] agex_core::beneath::BeneathError),
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A restored snapshot does not match the manifest stored in it.
    #[error("{repo} snapshot {snapshot} does not match its manifest: {}", .problems.join("; "))]
    Verification {
        /// The repository.
        repo: String,
        /// The snapshot id or archive.
        snapshot: String,
        /// Every difference found.
        problems: Vec<String>,
    },
    /// No snapshot of a service was found.
    #[error("no snapshot of `{service}` found in {searched}")]
    NoSnapshot {
        /// The service.
        service: String,
        /// The repositories searched, or the id asked for.
        searched: String,
    },
    /// A policy's `stop_units` could not be stopped or started again.
    #[error(transparent)]
    Units(#[from] crate::units::UnitsError),
    /// ssh refused the server's host key (unknown or changed); the message says how to
    /// trust it.
    #[error("{0}")]
    HostKey(String),
    /// A repository's backend could not be set up from its URL and credentials.
    #[error("repository `{repo}`: {message}")]
    Backend {
        /// The repository.
        repo: String,
        /// What is wrong (for an error from a library, its first line).
        message: String,
        /// The library's error, whole, when one raised it.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A Restic repository's object store (`s3:`, `opendal:`) could not be set up.
    #[error("repository `{repo}`: {source}")]
    ObjectStore {
        /// The repository.
        repo: String,
        /// Why (boxed: opendal's error is large).
        source: Box<crate::object_store::ObjectStoreError>,
    },
    /// The repository's storage is full (a full disk or a quota), or the disk of
    /// this host that the tool writes its cache to.
    #[error("repository `{repo}`: no space left {place} ({detail}); free space or raise the quota there, and the next run goes on from what is stored")]
    NoSpace {
        /// The repository.
        repo: String,
        /// Where: "on its server" or "on this host".
        place: String,
        /// What the server or tool said.
        detail: String,
    },
    /// A repository that has not been created yet (nothing at its URL).
    #[error("repository `{repo}` is not initialised (no repository at its URL): run `agex repo init {repo}`")]
    NotInitialised {
        /// The repository.
        repo: String,
    },
    /// A snapshot holds a database the service's policy no longer names (exit 2: the
    /// policy is to be fixed, or the snapshot restored with `--to`).
    #[error(
        "the snapshot holds database `{database}` but policies/{service}.toml no longer names it"
    )]
    PolicyMismatch {
        /// The service.
        service: String,
        /// The database's name in the snapshot's manifest.
        database: String,
    },
    /// The command was asked for something it cannot do as given (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A restore into a directory that failed part-way (a full disk): what it had
    /// written there is gone, or named when it could not be removed.
    #[error("restore into {} failed: {source}; {cleanup}", .dir.display())]
    RestoreIncomplete {
        /// The `--to` directory.
        dir: PathBuf,
        /// What became of the partial files.
        cleanup: String,
        /// Why the restore failed.
        source: Box<BackupError>,
    },
}

impl BackupError {
    /// Wraps an io error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BackupError {
        let path = path.into();
        move |source| BackupError::Io { path, source }
    }
}
