//! A restic snapshot file's JSON (decrypted) as rustic_core reads it and agex shows it.
#![no_main]

use agex_backup::engine::restic::info;
use libfuzzer_sys::fuzz_target;
use rustic_core::repofile::SnapshotFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(snap) = serde_json::from_slice::<SnapshotFile>(data) {
        let _ = info(&snap);
    }
});
