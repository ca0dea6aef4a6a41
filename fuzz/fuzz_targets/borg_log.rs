//! What borg prints that agex reads: `--log-json` stderr (progress, lock timeouts, error
//! tails, prune decisions) and `--json` stdout (`create` stats, `list`).
#![no_main]

use agex_backup::{engine::borg, process};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let kept = borg::read_log(data, |_| true);
    let _ = borg::lock_timed_out(&kept);
    let _ = process::tail(&kept);
    let _ = borg::pruned_archives(data);
    let _ = borg::parse_create_stats(data);
    let _ = borg::parse_list(data);
});
