//! agex recovery, on top of agex-backup: restores (`--to` and in place), restore drills
//! that prove each repository gives the data back, the rebuild drill, repository
//! password rotation and the printed recovery kit.

pub mod drill;
pub mod kit;
pub mod peak;
pub mod pg;
pub mod rebuild;
pub mod restore;
pub mod rotate;
pub mod stream_verify;
pub mod tar_stream;
