//! Overdue backups: each service's last success per repository against a maximum age
//! (given, or 1.5 × the period of its schedule).

use std::time::Duration;

use agex_backup::status::Status;
use agex_core::Project;
use chrono::{DateTime, Utc};
use serde::Serialize;

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
            _ => format!(
                "{} → {}: never backed up successfully",
                self.service, self.repo
            ),
        }
    }
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

/// Every (service, repository) of the policies whose last success is older than allowed.
pub fn find(
    project: &Project,
    statuses: &[Status],
    max_age: Option<Duration>,
    now: DateTime<Utc>,
) -> Vec<Overdue> {
    let mut out = Vec::new();
    for (service, policy) in &project.policies {
        let limit = allowed(project, service, max_age);
        for repo in &policy.repositories {
            let last = statuses
                .iter()
                .find(|s| &s.service == service && &s.repo == repo)
                .and_then(|s| s.last_success.clone());
            let age = last
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| (now - t.with_timezone(&Utc)).num_seconds().max(0) as u64);
            if age.is_none_or(|a| a > limit.as_secs()) {
                out.push(Overdue {
                    service: service.clone(),
                    repo: repo.clone(),
                    last_success: last,
                    max_age_seconds: limit.as_secs(),
                    age_seconds: age,
                });
            }
        }
    }
    out
}
