//! systemd units and timers for a host's jobs, rendered from the templates in the
//! product's `systemd/` directory: one service template per job kind, a drop-in per job
//! with the paths it must write and how much of /home it may see, one timer per job,
//! the failure-notification unit and the boot-time activation unit.

use std::path::{Path, PathBuf};

use agex_core::{Database, Project};
use serde::Serialize;

use crate::error::ScheduleError;
use crate::job::{Job, JobKind};

const BACKUP_SERVICE: &str = include_str!("../../../systemd/agex-backup@.service");
const FORGET_SERVICE: &str = include_str!("../../../systemd/agex-forget@.service");
const CHECK_SERVICE: &str = include_str!("../../../systemd/agex-check@.service");
const DRILL_SERVICE: &str = include_str!("../../../systemd/agex-drill.service");
const OVERDUE_SERVICE: &str = include_str!("../../../systemd/agex-overdue.service");
const NOTIFY_SERVICE: &str = include_str!("../../../systemd/agex-notify@.service");
const ACTIVATE_SERVICE: &str = include_str!("../../../systemd/agex-activate.service");
const TIMER: &str = include_str!("../../../systemd/agex.timer.in");

/// The first line of every file agex writes under /etc/systemd/system: `install` only
/// replaces or removes files that carry it.
pub const MARKER: &str = "# Managed by agex (agex systemd install); local edits are overwritten.";

/// One file under /etc/systemd/system: a unit, or a drop-in (`<unit>.d/agex.conf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitFile {
    /// Its path relative to the unit directory.
    pub name: String,
    /// Its content.
    pub content: String,
}

impl UnitFile {
    /// Whether it is a timer (enabled after installation).
    pub fn is_timer(&self) -> bool {
        self.name.ends_with(".timer")
    }
}

/// How the units call agex.
#[derive(Debug, Clone)]
pub struct UnitOptions {
    /// The agex binary the units run.
    pub agex: PathBuf,
    /// The configuration directory (absolute).
    pub config_dir: PathBuf,
    /// The host the units act for.
    pub host: String,
}

/// Every unit file for `jobs`, sorted by name.
pub fn generate(
    project: &Project,
    jobs: &[Job],
    opts: &UnitOptions,
) -> Result<Vec<UnitFile>, ScheduleError> {
    let agex = unit_word("agex binary", &opts.agex.to_string_lossy())?;
    let args = format!(
        "-C {} --host {}",
        unit_word(
            "configuration directory",
            &opts.config_dir.to_string_lossy()
        )?,
        unit_word("host name", &opts.host)?
    );
    let render = |template: &str| {
        format!(
            "{MARKER}\n{}",
            template.replace("@AGEX@", &agex).replace("@ARGS@", &args)
        )
    };
    let mut out = vec![
        UnitFile {
            name: "agex-notify@.service".into(),
            content: render(NOTIFY_SERVICE),
        },
        UnitFile {
            name: "agex-activate.service".into(),
            content: format!(
                "{MARKER}\n{}",
                ACTIVATE_SERVICE.replace(
                    "ExecStart=/usr/local/bin/agex activate",
                    &format!("ExecStart={agex} {args} activate")
                )
            ),
        },
    ];
    let delay = project.config.schedule.randomized_delay;
    let mut templates = std::collections::BTreeSet::new();
    for job in jobs {
        let (template_name, template) = match &job.kind {
            JobKind::Backup { .. } => ("agex-backup@.service", BACKUP_SERVICE),
            JobKind::Forget { .. } => ("agex-forget@.service", FORGET_SERVICE),
            JobKind::Check { .. } => ("agex-check@.service", CHECK_SERVICE),
            JobKind::Drill => ("agex-drill.service", DRILL_SERVICE),
            JobKind::Overdue => ("agex-overdue.service", OVERDUE_SERVICE),
        };
        if templates.insert(template_name) {
            out.push(UnitFile {
                name: template_name.into(),
                content: render(template),
            });
        }
        let service = job.service_unit();
        out.push(UnitFile {
            name: format!("{service}.d/agex.conf"),
            content: drop_in(project, job, &opts.config_dir)?,
        });
        // A timer firing more than once a minute needs a matching accuracy and no delay.
        let (delay, accuracy) = if job.schedule.sub_minute() {
            ("0".to_string(), "1s")
        } else {
            (delay.to_string(), "1min")
        };
        out.push(UnitFile {
            name: job.timer_unit(),
            content: format!(
                "{MARKER}\n{}",
                TIMER
                    .replace("@DESCRIPTION@", &format!("agex {} timer", job.name))
                    .replace("@ONCALENDAR@", job.schedule.on_calendar())
                    .replace("@DELAY@", &delay)
                    .replace("@ACCURACY@", accuracy)
                    .replace("@UNIT@", &service)
            ),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The drop-in of one job: what it may write, and whether /home is visible.
fn drop_in(project: &Project, job: &Job, config_dir: &Path) -> Result<String, ScheduleError> {
    let mut write: Vec<PathBuf> = Vec::new();
    let mut read: Vec<PathBuf> = vec![config_dir.to_path_buf()];
    // ssh (sftp:, ssh://) without pinned known_hosts reads the user's known_hosts from
    // home, and rclone its rclone.conf; with pinned keys home stays hidden.
    let mut reads_home = false;
    // pg_dump, psql and pg_restore reach a database over its unix socket as the role's
    // OS user (peer authentication, [`agex_backup`]'s `runuser`), which needs the
    // capabilities to change user and groups; only the jobs that do so get them.
    // A database reached over TCP needs the internet address families.
    let postgres = |over_socket: bool| {
        let has = |service: &String| {
            project.policies.get(service).is_some_and(|p| {
                p.databases.iter().any(|d| match d {
                    Database::Postgres { socket, .. } => socket.is_some() == over_socket,
                    Database::Sqlite { .. } => false,
                })
            })
        };
        match &job.kind {
            JobKind::Backup { service } => has(service),
            JobKind::Drill => project.policies.keys().any(has),
            _ => false,
        }
    };
    let becomes_postgres_user = postgres(true);
    let uses_inet = needs_network(project, job) || postgres(false);
    for r in &job.repositories {
        if let Some(repo) = project.config.repositories.get(r) {
            if let Some(p) = local_path(&repo.url) {
                write.push(p);
            }
            reads_home |= (repo.location.ssh().is_some() && repo.known_hosts.is_empty())
                || matches!(repo.location, agex_core::RepoUrl::Rclone(_));
        }
    }
    if let JobKind::Backup { service } = &job.kind {
        if let Some(policy) = project.policies.get(service) {
            read.extend(policy.paths.iter().cloned());
            for db in &policy.databases {
                match db {
                    // SQLite readers of a WAL database write its -shm file.
                    Database::Sqlite { path, .. } => {
                        if let Some(dir) = path.parent() {
                            write.push(dir.to_path_buf());
                        }
                    }
                    Database::Postgres {
                        socket: Some(s), ..
                    } => write.push(s.clone()),
                    Database::Postgres { .. } => {}
                }
            }
        }
        if let Some(m) = &project.config.backup.metrics_dir {
            write.push(m.clone());
        }
    }
    let in_home = |p: &PathBuf| {
        ["/home", "/root", "/run/user"]
            .iter()
            .any(|h| p.starts_with(h))
    };
    let protect_home = if reads_home || read.iter().chain(write.iter()).any(in_home) {
        "read-only"
    } else {
        "yes"
    };
    write.sort();
    write.dedup();
    let mut text = format!("{MARKER}\n");
    if needs_network(project, job) {
        // Not before the network is up (at boot, a timer that was missed fires at once).
        text.push_str(&format!(
            "# Job `{}` reaches a repository or a notification target over the network.\n\
             [Unit]\nWants=network-online.target\nAfter=network-online.target\n",
            job.name
        ));
    }
    text.push_str(&format!(
        "# What job `{}` may write besides /var/lib/agex.\n[Service]\nProtectHome={protect_home}\n",
        job.name
    ));
    if uses_inet {
        // The template allows unix sockets only; address-family lines add up.
        text.push_str("RestrictAddressFamilies=AF_INET AF_INET6\n");
    }
    if becomes_postgres_user {
        // Bounding-set lines add up: these join the template's.
        text.push_str(
            "# runuser: pg_dump/pg_restore/psql connect as the database role's OS user.\n\
             CapabilityBoundingSet=CAP_SETUID CAP_SETGID\n",
        );
    }
    for w in write {
        // `-`: a path that does not exist yet does not stop the job from starting.
        text.push_str(&format!(
            "ReadWritePaths=-{}\n",
            unit_word("path", &w.to_string_lossy())?
        ));
    }
    Ok(text)
}

/// Whether `job` talks to the network: a repository of it is remote
/// ([`agex_core::RepoUrl::is_remote`]), or results are sent somewhere.
fn needs_network(project: &Project, job: &Job) -> bool {
    let n = &project.config.notify;
    let notifies = n.webhook.is_some()
        || n.healthchecks.is_some()
        || n.ntfy.is_some()
        || n.uptime_kuma.is_some()
        || !n.jobs.is_empty();
    notifies
        || job.repositories.iter().any(|r| {
            project
                .config
                .repositories
                .get(r)
                .is_some_and(|repo| repo.location.is_remote())
        })
}

/// The local directory of a repository URL, if it is one.
fn local_path(url: &str) -> Option<PathBuf> {
    let p = url.strip_prefix("local:").unwrap_or(url);
    p.starts_with('/').then(|| PathBuf::from(p))
}

/// A value as one word of a unit file line: `%` escaped; whitespace, quotes and
/// control characters refused rather than quoted wrongly.
fn unit_word(what: &'static str, value: &str) -> Result<String, ScheduleError> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(ScheduleError::Unrepresentable {
            what,
            value: value.to_string(),
            why: "it is empty or holds whitespace, quotes or backslashes".into(),
        });
    }
    Ok(value.replace('%', "%%"))
}

/// Writes `units` into `dir` (created if needed); returns the paths written.
pub fn write_to(dir: &Path, units: &[UnitFile]) -> Result<Vec<PathBuf>, ScheduleError> {
    let mut out = Vec::new();
    for u in units {
        let path = dir.join(&u.name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(ScheduleError::io(parent))?;
        }
        agex_core::atomic::write_atomic(&path, u.content.as_bytes(), 0o644)
            .map_err(ScheduleError::io(&path))?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_paths() {
        assert_eq!(unit_word("x", "/a/%b").unwrap(), "/a/%%b");
        assert!(unit_word("x", "/a b").is_err());
        assert_eq!(local_path("/srv/r"), Some(PathBuf::from("/srv/r")));
        assert_eq!(local_path("local:/srv/r"), Some(PathBuf::from("/srv/r")));
        assert_eq!(local_path("sftp:u@h:/r"), None);
    }
}
