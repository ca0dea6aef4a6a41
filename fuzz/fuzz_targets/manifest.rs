//! The snapshot manifest (`.agex/<service>/manifest.json` inside a snapshot) as restore
//! and drills read it back from a repository; what parses writes back to the same value.
#![no_main]

use agex_backup::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut manifest) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let again: Manifest = serde_json::from_slice(&json).expect("the manifest agex writes parses");
    assert_eq!(manifest, again, "the manifest changed on a write and read");
    for f in &manifest.files {
        let _ = f.path.shown();
        let _ = f.path.as_bytes();
    }
    let mut changed: Vec<_> = manifest.files.iter().map(|f| f.path.clone()).collect();
    changed.sort();
    manifest.mark_changed(&changed);
    assert!(manifest.files.iter().all(|f| f.changed));
});
