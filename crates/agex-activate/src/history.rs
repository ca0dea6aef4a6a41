//! What became of each generation: built, activated, or failed and why
//! (`/var/lib/agex/history.json`).
//!
//! A number under `generations/` only says a configuration was built. Rollback must go to
//! a generation that actually worked, `generations` must say which ones never did, and
//! pruning drops those first, so the outcome of every activation is recorded here, under
//! the state lock, next to the store.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::ActivateError;
use crate::layout::Layout;
use crate::store::StateLock;

/// File name of the record in the state directory.
pub const HISTORY_FILE: &str = "history.json";

/// The recorded facts about one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When it was built (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<u64>,
    /// When it was last activated successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<u64>,
    /// The last failed attempt, when it came after the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedAttempt>,
}

/// One failed activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedAttempt {
    /// When (seconds since the epoch).
    pub at: u64,
    /// The error, as the user read it.
    pub reason: String,
}

/// Whether a generation ever worked on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Built before agex recorded outcomes: it may have been active.
    Unknown,
    /// Built, never tried.
    Built,
    /// Activated successfully at least once.
    Activated {
        /// When, last (seconds since the epoch).
        at: u64,
    },
    /// Tried and never activated.
    Failed {
        /// The last attempt's error.
        reason: String,
    },
}

impl State {
    /// Whether the generation was active at some point (or may have been: unknown).
    pub fn was_active(&self) -> bool {
        matches!(self, State::Activated { .. } | State::Unknown)
    }
}

/// The record of every generation, by number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    generations: BTreeMap<u64, Record>,
}

fn path(layout: &Layout) -> PathBuf {
    layout.state_dir().join(HISTORY_FILE)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl History {
    /// Reads the record. A missing file is an empty record (every generation unknown); so
    /// is an unreadable one, which only costs the distinctions it held: activation must
    /// not stop on bookkeeping, and the next write replaces it.
    pub fn load(layout: &Layout) -> History {
        fs::read(path(layout))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// What is known about generation `number`.
    pub fn state(&self, number: u64) -> State {
        match self.generations.get(&number) {
            None => State::Unknown,
            Some(Record {
                activated: Some(at),
                ..
            }) => State::Activated { at: *at },
            Some(Record {
                failed: Some(f), ..
            }) => State::Failed {
                reason: f.reason.clone(),
            },
            Some(_) => State::Built,
        }
    }

    /// The record of generation `number`, if any.
    pub fn record(&self, number: u64) -> Option<&Record> {
        self.generations.get(&number)
    }

    /// Notes that `number` was built now.
    pub fn built(&mut self, number: u64) {
        self.generations.entry(number).or_default().built = Some(now());
    }

    /// Notes that `number` was activated now.
    pub fn activated(&mut self, number: u64) {
        let r = self.generations.entry(number).or_default();
        r.activated = Some(now());
        r.failed = None;
    }

    /// Notes that activating `number` failed now, and why.
    pub fn failed(&mut self, number: u64, reason: String) {
        self.generations.entry(number).or_default().failed =
            Some(FailedAttempt { at: now(), reason });
    }

    /// Forgets generations that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.generations.retain(|n, _| keep(*n));
    }

    /// Writes the record atomically; the lock proves no other agex writes it meanwhile.
    pub fn save(&self, lock: &StateLock) -> Result<(), ActivateError> {
        let path = path(lock.layout());
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ActivateError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        agex_core::atomic::write_atomic(&path, &bytes, 0o600).map_err(ActivateError::io(&path))
    }

    /// Loads, changes and saves the record in one step.
    pub fn update(
        lock: &StateLock,
        change: impl FnOnce(&mut History),
    ) -> Result<(), ActivateError> {
        let mut h = History::load(lock.layout());
        change(&mut h);
        h.save(lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_last_outcome() {
        let mut h = History::default();
        assert_eq!(h.state(1), State::Unknown);
        h.built(1);
        assert_eq!(h.state(1), State::Built);
        assert!(!h.state(1).was_active());
        h.failed(1, "unknown users".into());
        assert_eq!(
            h.state(1),
            State::Failed {
                reason: "unknown users".into()
            }
        );
        h.activated(1);
        assert!(matches!(h.state(1), State::Activated { .. }));
        // A later failure (say, a lost host key) does not unmake a past success.
        h.failed(1, "no identity matches".into());
        assert!(h.state(1).was_active());
        let text = serde_json::to_string(&h).unwrap();
        let back: History = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h);
        h.retain(|n| n != 1);
        assert_eq!(h.state(1), State::Unknown);
    }
}
