//! The jobs of a host, derived from its configuration: one backup per policy, one check
//! per repository, a forget/prune per policy whose retention has its own schedule, and
//! the restore drill. Pure: building the list touches nothing.

use agex_core::{Project, Schedule};
use serde::Serialize;

use crate::error::ScheduleError;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobKind {
    /// `agex backup --service S`.
    Backup {
        /// The service.
        service: String,
    },
    /// `agex forget --service S` (retention with its own schedule).
    Forget {
        /// The service.
        service: String,
    },
    /// `agex repo check R`.
    Check {
        /// The repository.
        repo: String,
    },
    /// `agex drill --all`.
    Drill,
    /// `agex status --max-age`: alert about overdue backups.
    Overdue,
}

/// One scheduled job.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Its name: `backup-<service>`, `forget-<service>`, `check-<repo>`, `drill`.
    pub name: String,
    /// What it does.
    #[serde(flatten)]
    pub kind: JobKind,
    /// When it runs.
    #[serde(serialize_with = "schedule_text")]
    pub schedule: Schedule,
    /// The repositories it touches (jobs sharing one never run at once).
    pub repositories: Vec<String>,
}

fn schedule_text<S: serde::Serializer>(s: &Schedule, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

impl Job {
    /// The agex arguments that run it (after the global flags).
    pub fn args(&self) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match &self.kind {
            JobKind::Backup { service } => v(&["backup", "--service", service]),
            JobKind::Forget { service } => v(&["forget", "--service", service]),
            JobKind::Check { repo } => v(&["repo", "check", repo]),
            JobKind::Drill => v(&["drill", "--all"]),
            JobKind::Overdue => v(&["status", "--max-age"]),
        }
    }

    /// Whether the command sends its own notifications (backup, check and the overdue
    /// check do; forget and the drill are notified about by whoever runs them).
    pub fn notifies_itself(&self) -> bool {
        matches!(
            self.kind,
            JobKind::Backup { .. } | JobKind::Check { .. } | JobKind::Overdue
        )
    }

    /// The systemd service that runs it.
    pub fn service_unit(&self) -> String {
        match &self.kind {
            JobKind::Backup { service } => format!("agex-backup@{service}.service"),
            JobKind::Forget { service } => format!("agex-forget@{service}.service"),
            JobKind::Check { repo } => format!("agex-check@{repo}.service"),
            JobKind::Drill => "agex-drill.service".into(),
            JobKind::Overdue => "agex-overdue.service".into(),
        }
    }

    /// The systemd timer that starts it.
    pub fn timer_unit(&self) -> String {
        format!("agex-{}.timer", self.name)
    }
}

/// The job a systemd unit runs, from its name (for `OnFailure=` notifications).
pub fn job_of_unit(unit: &str) -> Option<String> {
    let base = unit.strip_suffix(".service").unwrap_or(unit);
    let base = base.strip_prefix("agex-")?;
    match base.split_once('@') {
        Some((kind, inst)) if !inst.is_empty() => Some(format!("{kind}-{inst}")),
        Some(_) => None,
        None => Some(base.to_string()),
    }
}

/// Every job of the project: backups, forgets, checks, the drill, the overdue check.
pub fn jobs(project: &Project) -> Vec<Job> {
    let mut out = Vec::new();
    for (service, p) in &project.policies {
        out.push(Job {
            name: format!("backup-{service}"),
            kind: JobKind::Backup {
                service: service.clone(),
            },
            schedule: p.schedule.clone(),
            repositories: p.repositories.clone(),
        });
    }
    for (service, p) in &project.policies {
        if let Some(s) = &p.forget_schedule {
            out.push(Job {
                name: format!("forget-{service}"),
                kind: JobKind::Forget {
                    service: service.clone(),
                },
                schedule: s.clone(),
                repositories: p.repositories.clone(),
            });
        }
    }
    let settings = &project.config.schedule;
    for repo in project.config.repositories.keys() {
        out.push(Job {
            name: format!("check-{repo}"),
            kind: JobKind::Check { repo: repo.clone() },
            schedule: settings.check.clone(),
            repositories: vec![repo.clone()],
        });
    }
    if !project.policies.is_empty() {
        out.push(Job {
            name: "drill".into(),
            kind: JobKind::Drill,
            schedule: settings.drill.clone(),
            repositories: project.config.repositories.keys().cloned().collect(),
        });
        out.push(Job {
            name: "overdue".into(),
            kind: JobKind::Overdue,
            schedule: settings.overdue.clone(),
            repositories: vec![],
        });
    }
    out
}

/// The job called `name`, or an error listing the jobs.
pub fn find<'a>(jobs: &'a [Job], name: &str) -> Result<&'a Job, ScheduleError> {
    jobs.iter()
        .find(|j| j.name == name)
        .ok_or_else(|| ScheduleError::UnknownJob {
            name: name.to_string(),
            known: jobs
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_map_back_to_jobs() {
        assert_eq!(
            job_of_unit("agex-backup@immich.service").as_deref(),
            Some("backup-immich")
        );
        assert_eq!(job_of_unit("agex-drill.service").as_deref(), Some("drill"));
        assert_eq!(job_of_unit("sshd.service"), None);
    }
}
