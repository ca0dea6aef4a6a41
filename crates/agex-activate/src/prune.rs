//! Keeping the last `keep` generations: older numbered links, their decrypted
//! directories on the tmpfs and store entries nothing points at any more are removed
//! after a successful switch.

use std::collections::BTreeSet;
use std::fs;

use agex_secrets::ramdir::wipe_tree;

use crate::error::ActivateError;
use crate::layout::Layout;
use crate::store::{self, remove_entry};

/// Removes every generation except the newest `keep` and `active`; returns the numbers
/// removed.
pub fn prune(layout: &Layout, keep: usize, active: u64) -> Result<Vec<u64>, ActivateError> {
    let links = store::list(layout)?;
    let mut kept: BTreeSet<u64> = links
        .iter()
        .rev()
        .take(keep.max(1))
        .map(|l| l.number)
        .collect();
    kept.insert(active);
    let mut removed = Vec::new();
    let gens = layout.generations_dir();
    for l in &links {
        if !kept.contains(&l.number) {
            let link = gens.join(l.number.to_string());
            fs::remove_file(&link).map_err(ActivateError::io(&link))?;
            removed.push(l.number);
        }
    }
    if !removed.is_empty() {
        store::sync_dir(&gens)?;
    }

    let fs_dir = layout.secrets_fs();
    if let Ok(entries) = fs::read_dir(&fs_dir) {
        for e in entries.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if !kept.contains(&n) {
                discard_dir(layout, &e.path());
            }
        }
    }

    let referenced: BTreeSet<String> = links
        .iter()
        .filter(|l| kept.contains(&l.number))
        .map(|l| format!("{}-generation", l.hash))
        .collect();
    if let Ok(entries) = fs::read_dir(layout.store_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with("-generation") && !referenced.contains(&name) {
                remove_entry(&e.path());
            }
        }
    }
    Ok(removed)
}

/// Moves a decrypted generation directory out of the way in one rename (so it never
/// looks complete while half removed), then overwrites and removes it.
pub fn discard_dir(layout: &Layout, dir: &std::path::Path) {
    let trash = layout
        .secrets_fs()
        .join(format!(".trash-{:016x}", rand::random::<u64>()));
    // A signal while it is being wiped finishes the wipe before agex exits.
    let _wiped_on_signal = agex_secrets::ramdir::Registration::tree(&trash);
    if fs::rename(dir, &trash).is_ok() {
        wipe_tree(&trash);
    } else {
        wipe_tree(dir);
    }
}
