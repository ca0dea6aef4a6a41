//! `borg export-tar` output as drills stream it (the tar reader of stream_verify).
#![no_main]

use agex_recovery::tar_stream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tar_stream::for_each(data, |entry, content| {
        let _ = format!("{entry:?}");
        let mut sink = Vec::new();
        content.read_to_end(&mut sink).map(|_| ())
    });
});
