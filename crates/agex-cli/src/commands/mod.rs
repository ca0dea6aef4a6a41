//! One module per area of commands; each function runs one subcommand.

pub mod activate;
pub mod backup;
pub mod docs;
pub mod recovery;
pub mod report;
pub mod schedule;
pub mod secrets;
