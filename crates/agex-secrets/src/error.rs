//! Errors of the secrets layer, worded for the person at the terminal.

use std::path::PathBuf;

use agex_core::ConfigError;

/// Everything that can go wrong handling secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The configuration did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bytes are not an age file.
    #[error("{}: not a valid age file: {reason}", .path.display())]
    NotAge {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// None of the identities opens the file.
    #[error("{}: no identity matches.\n  tried:\n{}\n  the file is encrypted to:\n{}", .path.display(), bullet(.tried), bullet(.recipients))]
    NoIdentityMatches {
        /// The file.
        path: PathBuf,
        /// `TYPE fingerprint (path)` of each identity tried.
        tried: Vec<String>,
        /// What the file's header (and the lock) says it is encrypted to.
        recipients: Vec<String>,
    },
    /// An identity matched but the file does not decrypt (tampered or truncated).
    #[error("{}: decryption failed: {reason}", .path.display())]
    Decrypt {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// Encryption failed (e.g. a plugin is missing).
    #[error("{}: encryption failed: {reason}", .path.display())]
    Encrypt {
        /// The target file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// No identity could be found anywhere.
    #[error("no identity to decrypt with; looked at:\n{}\n  pass one with -i PATH or set AGEX_IDENTITY", bullet(.looked))]
    NoIdentities {
        /// Each place looked at, with why it gave nothing.
        looked: Vec<String>,
    },
    /// An identity file is unusable.
    #[error("identity {}: {reason}", .path.display())]
    Identity {
        /// The identity file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A secret file has no rule.
    #[error("{}: no rule in {} for this file. Add one, for example:\n\n{suggestion}", .path.display(), .rules.display())]
    NoRule {
        /// The secret file.
        path: PathBuf,
        /// The rules file.
        rules: PathBuf,
        /// A rule to paste.
        suggestion: String,
    },
    /// A name given on the command line is no secret's name.
    #[error("no secret named `{name}` in {}{hint}", .rules.display())]
    UnknownSecret {
        /// The name given.
        name: String,
        /// The rules file.
        rules: PathBuf,
        /// "; did you mean …?" when a name is close, else empty.
        hint: String,
    },
    /// The named file is not a secret file of this configuration.
    #[error("{}: not inside the secrets directory {}/; give a secret's name or its .age file", .path.display(), .dir.display())]
    OutsideSecrets {
        /// The path given.
        path: PathBuf,
        /// The secrets directory.
        dir: PathBuf,
    },
    /// A secret's file does not exist.
    #[error("{}: missing; create it with `agex generate` (if its rule has a generator), `agex edit` or `agex encrypt`", .path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The temp directory for `edit` is on a persistent filesystem.
    #[error("{}: refusing to put plaintext on a persistent filesystem ({fs}); set XDG_RUNTIME_DIR to a tmpfs, or pass --unsafe-tmpdir", .path.display())]
    UnsafeTmpDir {
        /// The directory.
        path: PathBuf,
        /// What kind of filesystem it is.
        fs: String,
    },
    /// The editor did not exit successfully.
    #[error("editor `{editor}` {status}; {} left unchanged", .path.display())]
    Editor {
        /// The command.
        editor: String,
        /// How it ended.
        status: String,
        /// The secret file.
        path: PathBuf,
    },
    /// A signal asked us to stop.
    #[error("interrupted by signal; {} left unchanged and the plaintext removed", .path.display())]
    Interrupted {
        /// The secret file.
        path: PathBuf,
    },
    /// Refusing to print plaintext to a terminal.
    #[error("refusing to print a secret to a terminal; redirect stdout or pass --force")]
    Terminal,
    /// `agex init` found a configuration where it would write one.
    #[error("{}: a configuration already exists here; agex init never overwrites one (edit it, or init another directory)", path.display())]
    AlreadyInitialised {
        /// The existing agex.toml.
        path: PathBuf,
    },
    /// A secret's plaintext is not valid for its use.
    #[error("secret `{name}`: {reason}")]
    Invalid {
        /// The secret.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A rekey stopped before replacing anything because some secrets could not be
    /// re-encrypted.
    #[error("{} of {total} secrets cannot be rekeyed; no file was changed:\n{}\n  fix these (or rekey the others by name) and run it again", .failures.len(), .failures.iter().map(|(n, e)| format!("  - {n}: {e}")).collect::<Vec<_>>().join("\n"))]
    RekeyAborted {
        /// How many were to be rekeyed.
        total: usize,
        /// Each secret that could not be re-encrypted, and why.
        failures: Vec<(String, SecretsError)>,
    },
    /// Some items of a batch failed; the rest completed.
    #[error("{} of {total} secrets failed:\n{}", .failures.len(), .failures.iter().map(|(n, e)| format!("  - {n}: {e}")).collect::<Vec<_>>().join("\n"))]
    Partial {
        /// How many were attempted.
        total: usize,
        /// Each failure.
        failures: Vec<(String, SecretsError)>,
    },
    /// A host or its new key cannot be used for `host rekey` (exit 2).
    #[error("host `{host}`: {reason}")]
    HostKey {
        /// The host.
        host: String,
        /// What is wrong.
        reason: String,
    },
    /// `agex.toml` cannot take the host's new key (exit 2).
    #[error("host `{host}`: {source}")]
    HostConfig {
        /// The host.
        host: String,
        /// What is wrong with agex.toml.
        source: crate::host_rekey::ConfigEditError,
    },
    /// `ssh-keyscan` found no usable key.
    #[error("ssh-keyscan {target}: {reason}")]
    Keyscan {
        /// HOST[:PORT].
        target: String,
        /// What went wrong.
        reason: String,
    },
}

fn bullet(items: &[String]) -> String {
    if items.is_empty() {
        return "    (none)".into();
    }
    items
        .iter()
        .map(|i| format!("    - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl SecretsError {
    /// Wraps an io error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SecretsError {
        let path = path.into();
        move |source| SecretsError::Io { path, source }
    }

    /// Whether this is a configuration error (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            SecretsError::Config(_)
                | SecretsError::NoRule { .. }
                | SecretsError::UnknownSecret { .. }
                | SecretsError::OutsideSecrets { .. }
                | SecretsError::HostKey { .. }
                | SecretsError::HostConfig { .. }
                | SecretsError::AlreadyInitialised { .. }
        )
    }
}
