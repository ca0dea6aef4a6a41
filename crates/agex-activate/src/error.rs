//! Errors of building and activating generations, worded for the person at the terminal.

use std::path::PathBuf;

use agex_core::ConfigError;
use agex_secrets::SecretsError;

/// Everything that can go wrong building, activating or rolling back a generation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The configuration did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Decryption or identity loading failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The secrets filesystem has no room for the new generation's files.
    #[error("the secrets filesystem {} is full (writing {}: {source}); {kept}; free space there and activate again", .fs.display(), .path.display())]
    SecretsFsFull {
        /// The secrets filesystem (`/run/agex.d` under the root).
        fs: PathBuf,
        /// The file that did not fit.
        path: PathBuf,
        /// The cause (ENOSPC).
        source: std::io::Error,
        /// What stays active.
        kept: String,
    },
    /// The host is not configured.
    #[error("host `{host}` is not in agex.toml (hosts: {known}); pass --host NAME")]
    UnknownHost {
        /// The host asked for.
        host: String,
        /// The configured hosts.
        known: String,
    },
    /// A generation was built for another host.
    #[error("generation {number} was built for host `{built}`, not `{wanted}`")]
    WrongHost {
        /// The generation.
        number: u64,
        /// The host it was built for.
        built: String,
        /// The host asked for.
        wanted: String,
    },
    /// A secret delivered to the host has no encrypted file.
    #[error("secret `{name}`: {} is missing; create it with `agex generate`, `agex edit` or `agex encrypt`", .path.display())]
    MissingSecretFile {
        /// The secret.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// A template uses a secret the host does not receive.
    #[error("{location}: template `{template}` uses secret `{secret}`, which is not delivered to host `{host}`; add `{host}` to that secret's recipients")]
    TemplateSecretNotOnHost {
        /// `file:line` of the placeholder.
        location: String,
        /// The template.
        template: String,
        /// The secret.
        secret: String,
        /// The host.
        host: String,
    },
    /// A service name cannot be used as a directory name.
    #[error("`{item}`: service `{service}` cannot name a directory on the host (use a unit name like `app.service`)")]
    BadServiceName {
        /// The secret or template.
        item: String,
        /// The service as written.
        service: String,
    },
    /// The host identity is not there.
    #[error("host identity {} of `{host}` does not exist; is this host `{host}`? pass its key with -i PATH", .path.display())]
    MissingIdentity {
        /// The identity path (under the root).
        path: PathBuf,
        /// The host.
        host: String,
    },
    /// The host's own key does not open a secret: the host was rebuilt, or its key
    /// changed, since the secret was encrypted.
    #[error("{}: the host key of `{host}` does not open it (tried {tried}); the file is encrypted to {recipients}.\n  if the host was rebuilt or its key changed, run `agex host rekey {host} --keyscan ADDRESS` (or --key-file PATH) where the configuration is, then activate again", .path.display())]
    HostKeyMismatch {
        /// The encrypted file.
        path: PathBuf,
        /// The host.
        host: String,
        /// The identity tried.
        tried: String,
        /// Who the file is encrypted to, by name (from secrets.lock).
        recipients: String,
    },
    /// A store entry does not match its hash.
    #[error("corrupt store entry {}: {reason}; refusing to use it. Remove the directory and run `agex build` again", .path.display())]
    CorruptStore {
        /// The store entry.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A generation named on the command line does not exist.
    #[error("no generation `{spec}`: {why}")]
    NoSuchGeneration {
        /// What the user asked for.
        spec: String,
        /// Why it could not be found.
        why: String,
    },
    /// Owners or groups the host's user database does not know.
    #[error("unknown users or groups in {database}; create them first (nothing was changed):\n{}", bullet(.problems))]
    UnknownOwners {
        /// Which user database was asked.
        database: String,
        /// One line per unknown name, with the rules that use it.
        problems: Vec<String>,
    },
    /// The user database could not be read.
    #[error("user database {database}: {reason}")]
    UserDatabase {
        /// Which database.
        database: String,
        /// What failed.
        reason: String,
    },
    /// A rule's `path` is occupied by something agex did not put there.
    #[error("{}: exists and is not a symlink; refusing to replace it with a link to `{name}` (move it away first)", .path.display())]
    PathOccupied {
        /// The host path (under the root).
        path: PathBuf,
        /// The secret or template.
        name: String,
    },
    /// The secrets directory is not RAM-backed and could not be made so.
    #[error("{}: not a ramfs/tmpfs and mounting one failed ({reason}); run as root so agex can mount it, or pass --allow-unmounted to put plaintext on this filesystem anyway", .path.display())]
    NotRamBacked {
        /// The directory.
        path: PathBuf,
        /// Why the mount failed.
        reason: String,
    },
    /// Nothing to roll back to.
    #[error("nothing to roll back to: {why}")]
    NoRollbackTarget {
        /// Why.
        why: String,
    },
    /// The unit restart command failed after the switch.
    #[error(transparent)]
    Restart(#[from] agex_core::systemctl::SystemctlError),
    /// A path below the root could not be used without following a symlink.
    #[error(transparent)]
    Beneath(#[from] agex_core::beneath::BeneathError),
    /// A file in the store or on the tmpfs is not what agex wrote.
    #[error("{}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn bullet(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ActivateError {
    /// Wraps an io error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ActivateError {
        let path = path.into();
        move |source| ActivateError::Io { path, source }
    }

    /// Whether this is a configuration or usage error (exit code 2).
    pub fn is_config(&self) -> bool {
        match self {
            ActivateError::Config(_)
            | ActivateError::UnknownHost { .. }
            | ActivateError::WrongHost { .. }
            | ActivateError::TemplateSecretNotOnHost { .. }
            | ActivateError::BadServiceName { .. }
            | ActivateError::NoSuchGeneration { .. }
            | ActivateError::UnknownOwners { .. }
            | ActivateError::MissingSecretFile { .. } => true,
            ActivateError::Secrets(s) => s.is_config(),
            _ => false,
        }
    }
}
