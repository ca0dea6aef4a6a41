//! Keeping `keep` generations: older numbered links, their decrypted directories on the
//! tmpfs and store entries nothing points at any more are removed after a successful
//! switch. Generations that never activated go first, so a run of failed attempts does
//! not push out the ones a rollback could go to.

use std::collections::BTreeSet;
use std::fs;

use agex_secrets::ramdir::wipe_tree;

use crate::error::ActivateError;
use crate::history::{History, State};
use crate::layout::Layout;
use crate::store::{self, remove_entry, StateLock};

/// Removes generations until `keep` are left, the `active` one always among them: first
/// the ones that never activated (oldest first), then the oldest. Returns the numbers
/// removed.
pub fn prune(lock: &StateLock, keep: usize, active: u64) -> Result<Vec<u64>, ActivateError> {
    let layout = lock.layout();
    let links = store::list(layout)?;
    let mut history = History::load(layout);
    let states: Vec<(u64, State)> = links
        .iter()
        .map(|l| (l.number, history.state(l.number)))
        .collect();
    let doomed = doomed(&states, keep, active);
    let mut removed = Vec::new();
    let gens = layout.generations_dir();
    for n in &doomed {
        let link = gens.join(n.to_string());
        fs::remove_file(&link).map_err(ActivateError::io(&link))?;
        removed.push(*n);
    }
    if !removed.is_empty() {
        store::sync_dir(&gens)?;
    }
    let kept: BTreeSet<u64> = links
        .iter()
        .map(|l| l.number)
        .filter(|n| !doomed.contains(n))
        .collect();
    history.retain(|n| kept.contains(&n));
    history.save(lock)?;

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

/// Which generations (number, state; oldest first) to remove so that `keep` remain.
/// Never the active one. A generation built but not yet tried that is newer than the
/// active one is pending (the user may activate it next), not failed.
fn doomed(states: &[(u64, State)], keep: usize, active: u64) -> BTreeSet<u64> {
    let keep = keep.max(1);
    let excess = states.len().saturating_sub(keep);
    let never = |n: u64, s: &State| match s {
        State::Failed { .. } => true,
        State::Built => n < active,
        State::Unknown | State::Activated { .. } => false,
    };
    let candidates = states.iter().filter(|(n, _)| *n != active);
    let first = candidates.clone().filter(|(n, s)| never(*n, s));
    let then = candidates.filter(|(n, s)| !never(*n, s));
    first.chain(then).map(|(n, _)| *n).take(excess).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> State {
        State::Activated { at: 1 }
    }

    fn failed() -> State {
        State::Failed { reason: "x".into() }
    }

    #[test]
    fn oldest_go_when_all_activated() {
        let s: Vec<_> = (1..=5).map(|n| (n, ok())).collect();
        assert_eq!(doomed(&s, 2, 5), BTreeSet::from([1, 2, 3]));
        assert_eq!(doomed(&s, 10, 5), BTreeSet::new());
    }

    #[test]
    fn never_activated_go_first_and_the_active_one_stays() {
        let s = vec![
            (1, ok()),
            (2, failed()),
            (3, ok()),
            (4, State::Built),
            (5, ok()),
        ];
        // 4 was built and never tried, before 5 became active: it never activated.
        assert_eq!(doomed(&s, 3, 5), BTreeSet::from([2, 4]));
        assert_eq!(doomed(&s, 2, 5), BTreeSet::from([1, 2, 4]));
        // After a rollback to 1, the oldest-first order still keeps 1.
        assert_eq!(doomed(&s, 1, 1), BTreeSet::from([2, 3, 4, 5]));
        assert_eq!(doomed(&s, 4, 1), BTreeSet::from([2]));
        // A build newer than the active generation is pending, not failed.
        let s = vec![(1, ok()), (2, ok()), (3, State::Built)];
        assert_eq!(doomed(&s, 2, 2), BTreeSet::from([1]));
    }
}
