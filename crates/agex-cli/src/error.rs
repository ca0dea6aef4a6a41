//! What the user reads when a command fails, and the exit codes.
//!
//! 0 success, 1 failure, 2 usage or configuration error, 3 partial success.

use agex_core::ConfigError;
use agex_secrets::SecretsError;

/// Exit code for success.
pub const OK: i32 = 0;
/// Exit code for a failure.
pub const FAILURE: i32 = 1;
/// Exit code for a usage or configuration error.
pub const CONFIG: i32 = 2;
/// Exit code for partial success (some repository or service failed).
pub const PARTIAL: i32 = 3;

/// A failed command: the message and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<SecretsError> for Failure {
    fn from(e: SecretsError) -> Self {
        let code = if e.is_config() { CONFIG } else { FAILURE };
        match e {
            SecretsError::Config(c) => c.into(),
            other => Failure::new(code, other.to_string()),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Invalid(diags) => Failure::new(
                CONFIG,
                diags
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\nerror: "),
            ),
            ConfigError::Io { .. } => Failure::new(FAILURE, e.to_string()),
            other => Failure::new(CONFIG, other.to_string()),
        }
    }
}
