//! `secrets/secrets.lock` through the parser `agex check` uses; what parses must write
//! back to a lock that parses to the same value.
#![no_main]

use agex_core::{Lock, SourceFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = SourceFile::decode("secrets/secrets.lock", data.to_vec()) else {
        return;
    };
    match Lock::parse(&source) {
        Ok(lock) => {
            let text = lock.to_toml().expect("a parsed lock serializes");
            let again = Lock::parse(&SourceFile::new("secrets/secrets.lock", text.clone()))
                .unwrap_or_else(|e| panic!("the lock agex writes does not parse: {e}\n{text}"));
            assert_eq!(lock, again, "the lock changed on a write and read");
        }
        Err(diags) => {
            let _ = diags.to_string();
        }
    }
});
