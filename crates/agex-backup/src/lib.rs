//! agex backups: per-service policies written to a Restic repository (in-process,
//! rustic_core) and a Borg repository (the `borg` binary), each database dumped once.

pub mod access;
pub mod backend;
pub mod cancel;
pub mod drill_records;
pub mod dump;
pub mod engine;
pub mod error;
pub mod lock;
pub mod manifest;
pub mod manifest_stream;
pub mod object_store;
pub mod paths;
pub mod pending;
pub mod postgres;
pub mod process;
pub mod progress;
pub mod rclone;
pub mod records;
pub mod restic_key;
pub mod run;
pub mod sftp;
pub mod ssh;
pub mod status;
pub mod tee;
pub mod trust;
pub mod units;
pub mod verdict;
mod walk_file;

pub use error::BackupError;
