//! agex scheduling: the jobs a host runs (backups, repository checks, separate
//! forget/prune, restore drills), systemd units and timers generated from them, the
//! in-process daemon that runs the same schedule without systemd, and notifications
//! (healthchecks pings, ntfy, Uptime Kuma pushes, JSON webhooks) of their results.

pub mod daemon;
pub mod duration;
pub mod error;
pub mod install;
pub mod job;
pub mod job_run;
pub mod notify;
pub mod overdue;
pub mod record;
pub mod report;
pub mod results;
pub mod units;

pub use error::ScheduleError;
pub use job::{Job, JobKind};
