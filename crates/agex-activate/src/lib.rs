//! agex generations: a host's secrets built into an immutable, content-addressed store
//! entry, then activated — decrypted into a RAM-backed filesystem, one directory per
//! service, switched in with one `rename(2)`, with only the changed units restarted.
//!
//! Every path is below a [`Layout`]'s root, so tests run the real code in a temp dir.

pub mod activate;
pub mod beneath;
pub mod diff;
pub mod digest;
pub mod error;
pub mod history;
pub mod layout;
pub mod manifest;
pub mod plan;
pub mod prune;
pub mod ramfs;
pub mod restart;
pub mod store;
pub mod users;

pub use activate::{activate, rollback, ActivateOptions, Activation, Switch};
pub use error::ActivateError;
pub use layout::Layout;
pub use manifest::Manifest;
pub use plan::Plan;
pub use store::{BuiltGeneration, StateLock, StoredGeneration};
