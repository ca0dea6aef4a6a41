//! Scheduling end to end (filled in below).

mod common;
