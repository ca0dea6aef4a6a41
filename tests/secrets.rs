//! End-to-end tests of the secrets commands against the real binary and the real `age`.

mod common;
