//! One module per area of commands; each function runs one subcommand.

pub mod activate;
pub mod backup;
pub mod recovery;
pub mod schedule;
pub mod secrets;
