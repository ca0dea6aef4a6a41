//! agex secrets: age-encrypted files in git, the identities that open them, and the
//! operations on them (edit, encrypt, decrypt, rekey, check, generate).

pub mod check;
pub mod crypt;
pub mod edit;
pub mod error;
pub mod generate;
pub mod handoff;
pub mod header;
pub mod host_rekey;
pub mod identity;
pub mod init;
pub mod plainbuf;
pub mod ramdir;
pub mod rekey;
pub mod secret_file;
pub mod x25519;

pub use crypt::Plaintext;
pub use error::SecretsError;
pub use identity::Identities;
