//! Bad-input corpus: every case under tests/bad/ must fail clearly and change nothing.

mod common;
