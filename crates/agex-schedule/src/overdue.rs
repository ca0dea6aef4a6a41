//! Overdue backups: each service's last success per repository against a maximum age
//! (given, or 1.5 × the period of its schedule).
//!
//! A service that never succeeded in a repository is measured from when the check first
//! saw it so (remembered in [`FIRST_SEEN_FILE`]): a fresh install is not alarmed about
//! every service until the first night's backups, yet a backup that never happens is
//! overdue one allowed age later.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use agex_backup::status::Status;
use agex_core::Project;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ScheduleError;

/// Where the check remembers, under `--root`, since when each service and repository
/// without a success has been known.
pub const FIRST_SEEN_FILE: &str = "var/lib/agex/overdue.json";

/// Since when each (service, repository) that never succeeded has been known.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FirstSeen {
    /// Service → repository → first seen.
    pub services: BTreeMap<String, BTreeMap<String, DateTime<Utc>>>,
}

impl FirstSeen {
    /// Reads the record under `root` (empty when there is none).
    pub fn load(root: &Path) -> Result<FirstSeen, ScheduleError> {
        crate::record::load(&root.join(FIRST_SEEN_FILE), "agex's overdue record")
    }

    /// Writes the record under `root` atomically.
    pub fn save(&self, root: &Path) -> Result<(), ScheduleError> {
        crate::record::save(&root.join(FIRST_SEEN_FILE), self)
    }
}

/// One service in one repository whose last success is too old (or missing).
#[derive(Debug, Clone, Serialize)]
pub struct Overdue {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// Its last success (RFC 3339), if any.
    pub last_success: Option<String>,
    /// The age allowed, seconds.
    pub max_age_seconds: u64,
    /// How old the last success is, seconds (none: never succeeded).
    pub age_seconds: Option<u64>,
    /// For one that never succeeded: since when it has been known (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_since: Option<String>,
    /// For one that was tried but never succeeded: why its last backup failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Overdue {
    /// One line for a message.
    pub fn line(&self) -> String {
        let allowed = crate::duration::show(Duration::from_secs(self.max_age_seconds));
        match (self.age_seconds, &self.last_success) {
            (Some(age), Some(t)) => format!(
                "{} → {}: last success {t} ({} ago, allowed {allowed})",
                self.service,
                self.repo,
                crate::duration::show(Duration::from_secs(age))
            ),
            _ if self.last_error.is_some() => format!(
                "{} → {}: every backup so far FAILED, the last with: {}",
                self.service,
                self.repo,
                self.last_error.as_deref().unwrap_or_default()
            ),
            _ => format!(
                "{} → {}: never backed up successfully (known since {}, allowed {allowed})",
                self.service,
                self.repo,
                self.known_since.as_deref().unwrap_or("now")
            ),
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Too old, or never succeeded for longer than allowed.
    pub overdue: Vec<Overdue>,
    /// Never succeeded, but known for less than the allowed age: not yet an alarm.
    pub waiting: Vec<Overdue>,
}

/// The allowed age of a service's backups: `max_age`, else 1.5 × its schedule's period.
pub fn allowed(project: &Project, service: &str, max_age: Option<Duration>) -> Duration {
    if let Some(m) = max_age {
        return m;
    }
    project
        .policies
        .get(service)
        .and_then(|p| p.schedule.period())
        .and_then(|p| p.to_std().ok())
        .map(|p| p.mul_f64(1.5))
        .unwrap_or(Duration::from_secs(36 * 3600))
}

/// Every (service, repository) of the policies whose last success is older than allowed,
/// or that never succeeded and has been known for longer than allowed. `first_seen` is
/// brought up to date: pairs without a success are added as seen `now`, pairs that
/// succeeded or are gone from the policies are dropped. Without a record (`None`: it
/// could not be read) a pair that never succeeded is overdue at once.
pub fn find(
    project: &Project,
    statuses: &[Status],
    max_age: Option<Duration>,
    now: DateTime<Utc>,
    first_seen: Option<&mut FirstSeen>,
) -> Findings {
    let mut out = Findings::default();
    let mut seen = FirstSeen::default();
    for (service, policy) in &project.policies {
        let limit = allowed(project, service, max_age);
        for repo in &policy.repositories {
            let tried = statuses
                .iter()
                .find(|s| &s.service == service && &s.repo == repo);
            let last = tried.and_then(|s| s.last_success.clone());
            let age_of = |t: DateTime<Utc>| (now - t).num_seconds().max(0) as u64;
            let age = last
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| age_of(t.with_timezone(&Utc)));
            let mut item = Overdue {
                service: service.clone(),
                repo: repo.clone(),
                last_success: last,
                max_age_seconds: limit.as_secs(),
                age_seconds: age,
                known_since: None,
                last_error: None,
            };
            match age {
                Some(a) if a > limit.as_secs() => out.overdue.push(item),
                Some(_) => {}
                // Tried and never succeeded: failing now, not waiting for a first run.
                None if tried.is_some() => {
                    item.last_error = Some(
                        tried
                            .and_then(|s| s.error.clone())
                            .unwrap_or_else(|| "unknown error".into()),
                    );
                    out.overdue.push(item);
                }
                None if first_seen.is_none() => out.overdue.push(item),
                None => {
                    let since = first_seen
                        .as_deref()
                        .and_then(|f| f.services.get(service))
                        .and_then(|r| r.get(repo))
                        .copied()
                        .unwrap_or(now)
                        .min(now);
                    seen.services
                        .entry(service.clone())
                        .or_default()
                        .insert(repo.clone(), since);
                    item.known_since =
                        Some(since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    if age_of(since) > limit.as_secs() {
                        out.overdue.push(item);
                    } else {
                        out.waiting.push(item);
                    }
                }
            }
        }
    }
    if let Some(f) = first_seen {
        *f = seen;
    }
    out
}
