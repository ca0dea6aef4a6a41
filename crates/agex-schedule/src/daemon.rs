//! `agex daemon`: the host's schedule run in-process where systemd is absent.
//!
//! One tokio task per job sleeps until the job's next fire time and runs it as a child
//! process (`agex <global flags> backup --service S`, …). The time of each job's last
//! run is persisted (`/var/lib/agex/daemon.json`), so a job whose slots passed while the
//! daemon was down runs once on start, not once per missed slot. A job never overlaps
//! itself; jobs touching the same repository run one at a time; at most
//! `[schedule] max_concurrent` run at once. SIGTERM stops starting jobs, gives running
//! ones `[schedule] grace` seconds, then sends their process groups SIGTERM (the kernel
//! drops their repository locks with them). SIGHUP reloads the configuration; a bad one
//! keeps the old schedule.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agex_core::Project;
use chrono::{DateTime, Local, Utc};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use crate::error::ScheduleError;
use crate::job::{jobs, Job};
use crate::notify::{Event, Notifier, Outcome};

/// The daemon's record of each job, under `--root`.
pub const STATE_FILE: &str = "var/lib/agex/daemon.json";
/// How long cancelled jobs get to exit after SIGTERM before SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(10);

/// The last run of one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobState {
    /// When its last run started (or when the daemon first saw the job).
    pub last_run: DateTime<Utc>,
    /// `ok`, `partial`, `failed`, or none when it never ran.
    pub result: Option<String>,
    /// The exit code of its last run.
    pub exit_code: Option<i32>,
    /// Wall time of its last run, seconds.
    pub duration_seconds: Option<f64>,
    /// The systemd invocation (`$INVOCATION_ID`) whose failure the job already notified
    /// itself, so the `OnFailure=` unit that follows does not send it a second time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_invocation: Option<String>,
}

/// What the daemon persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// By job name.
    pub jobs: BTreeMap<String, JobState>,
}

impl State {
    /// Reads the state under `root` (empty when there is none).
    pub fn load(root: &Path) -> Result<State, ScheduleError> {
        State::load_from(&root.join(STATE_FILE))
    }

    /// Reads a state file (empty when there is none).
    pub fn load_from(path: &Path) -> Result<State, ScheduleError> {
        crate::record::load(path, "agex's daemon state")
    }

    fn save(&self, root: &Path) -> Result<(), ScheduleError> {
        self.save_to(&root.join(STATE_FILE))
    }

    /// Writes a state file atomically.
    pub fn save_to(&self, path: &Path) -> Result<(), ScheduleError> {
        crate::record::save(path, self)
    }
}

/// Makes the notifier of a job (the CLI decrypts `secret:` URLs).
pub type MakeNotifier = dyn Fn(&Project, &str) -> Notifier + Send + Sync;
/// Loads and validates the configuration (on start and on SIGHUP).
pub type Load = dyn Fn() -> Result<Project, agex_core::ConfigError> + Send + Sync;

/// How the daemon runs jobs.
pub struct DaemonOptions {
    /// Root of host paths (its state lives below it).
    pub root: PathBuf,
    /// The agex binary to run jobs with.
    pub agex: PathBuf,
    /// Global flags given to every job (`-C DIR --root R --host H -i ...`).
    pub global_args: Vec<String>,
}

struct Shared {
    opts: DaemonOptions,
    state: Mutex<State>,
    slots: Slots,
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    job_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    children: Mutex<HashMap<String, u32>>,
    stopping: AtomicBool,
    notifier: Arc<MakeNotifier>,
}

/// At most `limit` jobs at once; the limit can change on reload and then holds for
/// every job, those already running included.
struct Slots {
    state: Mutex<(usize, usize)>,
    freed: Notify,
}

/// A running job's slot, given back when dropped.
struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.1 = s.1.saturating_sub(1);
        }
        self.0.freed.notify_waiters();
    }
}

impl Slots {
    fn new(limit: usize) -> Slots {
        Slots {
            state: Mutex::new((limit, 0)),
            freed: Notify::new(),
        }
    }

    fn set_limit(&self, limit: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = limit;
        }
        self.freed.notify_waiters();
    }

    async fn acquire(&self) -> Slot<'_> {
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.1 < s.0 {
                    s.1 += 1;
                    return Slot(self);
                }
            }
            freed.await;
        }
    }
}

fn lock_of(
    map: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &str,
) -> Arc<tokio::sync::Mutex<()>> {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    Arc::clone(m.entry(key.to_string()).or_default())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(
    opts: DaemonOptions,
    load: Arc<Load>,
    notifier: Arc<MakeNotifier>,
) -> Result<(), ScheduleError> {
    let project = load().map_err(ScheduleError::Config)?;
    let state = State::load(&opts.root)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ScheduleError::Runtime)?;
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(ScheduleError::Runtime)?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            if sig_tx.send(s).is_err() {
                break;
            }
        }
    });
    let shared = Arc::new(Shared {
        slots: Slots::new(project.config.schedule.max_concurrent),
        opts,
        state: Mutex::new(state),
        repo_locks: Mutex::default(),
        job_locks: Mutex::default(),
        children: Mutex::default(),
        stopping: AtomicBool::new(false),
        notifier,
    });
    rt.block_on(async move {
        let mut grace = Duration::from_secs(project.config.schedule.grace);
        let (mut cancel, mut handles) = start(&shared, &project);
        tracing::info!(jobs = handles.len(), "agex daemon started");
        while let Some(sig) = sig_rx.recv().await {
            if sig != signal_hook::consts::SIGHUP {
                tracing::info!(
                    "stopping: no new jobs; running ones get {} s",
                    grace.as_secs()
                );
                break;
            }
            match load() {
                Ok(p) => {
                    let _ = cancel.send(true);
                    shared.slots.set_limit(p.config.schedule.max_concurrent);
                    grace = Duration::from_secs(p.config.schedule.grace);
                    let (c, h) = start(&shared, &p);
                    tracing::info!(jobs = h.len(), "configuration reloaded");
                    cancel = c;
                    handles.extend(h);
                }
                Err(e) => {
                    tracing::error!("reload failed, keeping the old schedule: {e}");
                }
            }
        }
        shared.stopping.store(true, Ordering::SeqCst);
        let _ = cancel.send(true);
        stop_children(&shared, grace).await;
        for h in handles {
            let _ = h.await;
        }
        tracing::info!("agex daemon stopped");
    });
    Ok(())
}

fn start(
    shared: &Arc<Shared>,
    project: &Project,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = watch::channel(false);
    let project = Arc::new(project.clone());
    let handles = jobs(&project)
        .into_iter()
        .map(|job| {
            tokio::spawn(job_task(
                job,
                Arc::clone(shared),
                Arc::clone(&project),
                rx.clone(),
            ))
        })
        .collect();
    (tx, handles)
}

async fn stop_children(shared: &Shared, grace: Duration) {
    let running = |s: &Shared| s.children.lock().map(|c| c.len()).unwrap_or(0);
    let deadline = Instant::now() + grace;
    while running(shared) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (sig, name, wait) in [
        (Signal::TERM, "SIGTERM", KILL_AFTER),
        (Signal::KILL, "SIGKILL", Duration::from_secs(5)),
    ] {
        let pids: Vec<(String, u32)> = shared
            .children
            .lock()
            .map(|c| c.iter().map(|(j, p)| (j.clone(), *p)).collect())
            .unwrap_or_default();
        if pids.is_empty() {
            return;
        }
        for (job, pid) in pids {
            tracing::warn!(job, "grace period over: sending {name} to the job");
            // The daemon started each child as the leader of its own process group.
            if let Some(group) = Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(group, sig);
            }
        }
        let deadline = Instant::now() + wait;
        while running(shared) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many fire times of `job` fall after `last` and not after `now`. Schedules are
/// in local time, like systemd's OnCalendar.
fn missed(job: &Job, last: DateTime<Utc>, now: DateTime<Utc>) -> usize {
    let now = now.with_timezone(&Local);
    let mut n = 0;
    let mut t = last.with_timezone(&Local);
    while n < 1000 {
        match job.schedule.next_after(&t, 1).first() {
            Some(next) if *next <= now => {
                n += 1;
                t = *next;
            }
            _ => break,
        }
    }
    n
}

async fn job_task(
    job: Job,
    shared: Arc<Shared>,
    project: Arc<Project>,
    mut cancel: watch::Receiver<bool>,
) {
    let last = shared
        .state
        .lock()
        .ok()
        .and_then(|s| s.jobs.get(&job.name).map(|j| j.last_run));
    let now = Utc::now();
    let mut catch_up = match last {
        Some(last) => missed(&job, last, now),
        None => {
            // First sight: remember it, so slots missed from now on are caught up.
            record(&shared, &job.name, |s| {
                s.jobs.entry(job.name.clone()).or_insert(JobState {
                    last_run: now,
                    result: None,
                    exit_code: None,
                    duration_seconds: None,
                    notified_invocation: None,
                });
            });
            0
        }
    };
    loop {
        if catch_up > 0 {
            tracing::info!(
                job = job.name,
                "missed {catch_up} run(s) while the daemon was down: running once now"
            );
            catch_up = 0;
        } else {
            let Some(next) = job.schedule.next_after(&Local::now(), 1).first().copied() else {
                return;
            };
            let wait = (next - Local::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.changed() => return,
            }
        }
        if *cancel.borrow() || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        run_job(&job, &shared, &project).await;
        if *cancel.borrow() || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

fn record(shared: &Shared, job: &str, f: impl FnOnce(&mut State)) {
    let Ok(mut s) = shared.state.lock() else {
        return;
    };
    f(&mut s);
    if let Err(e) = s.save(&shared.opts.root) {
        tracing::error!(job, "cannot save the daemon state: {e}");
    }
}

async fn run_job(job: &Job, shared: &Shared, project: &Project) {
    // Never overlap itself (also across a reload), then the global limit, then each
    // repository in name order (no two jobs wait on each other in a cycle).
    let job_lock = lock_of(&shared.job_locks, &job.name);
    let _job_guard = job_lock.lock().await;
    let _slot = shared.slots.acquire().await;
    let mut repos = job.repositories.clone();
    repos.sort();
    let locks: Vec<_> = repos
        .iter()
        .map(|r| lock_of(&shared.repo_locks, r))
        .collect();
    let mut guards = Vec::new();
    for l in &locks {
        guards.push(l.lock().await);
    }
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let started = Utc::now();
    let t = Instant::now();
    let notifier = (!job.notifies_itself()).then(|| (shared.notifier)(project, &job.name));
    if let Some(n) = &notifier {
        for w in n.warnings.iter().cloned().chain(n.send(&Event::Start)) {
            tracing::warn!(job = job.name, "{w}");
        }
    }
    tracing::info!(job = job.name, "job started: agex {}", job.args().join(" "));
    let mut cmd = tokio::process::Command::new(&shared.opts.agex);
    cmd.args(&shared.opts.global_args)
        .args(job.args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let (code, log) = match cmd.spawn() {
        Ok(child) => {
            if let Some(pid) = child.id() {
                if let Ok(mut c) = shared.children.lock() {
                    c.insert(job.name.clone(), pid);
                }
            }
            let out = child.wait_with_output().await;
            if let Ok(mut c) = shared.children.lock() {
                c.remove(&job.name);
            }
            match out {
                Ok(o) => {
                    let mut log = String::from_utf8_lossy(&o.stdout).into_owned();
                    log.push_str(&String::from_utf8_lossy(&o.stderr));
                    (o.status.code(), log)
                }
                Err(e) => (None, format!("waiting for the job failed: {e}")),
            }
        }
        Err(e) => (
            None,
            format!("cannot start {}: {e}", shared.opts.agex.display()),
        ),
    };
    let outcome = Outcome::from_exit(code);
    let secs = t.elapsed().as_secs_f64();
    let result = outcome.word();
    let exit = code.map_or("killed".to_string(), |c| format!("exit {c}"));
    if outcome == Outcome::Success {
        tracing::info!(
            job = job.name,
            "job finished: {result} ({exit}) in {secs:.1} s"
        );
    } else {
        let last_line = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        tracing::warn!(
            job = job.name,
            "job finished: {result} ({exit}) in {secs:.1} s: {last_line}"
        );
    }
    if let Some(n) = &notifier {
        let event = Event::Finish {
            result: outcome,
            exit_code: code,
            duration_seconds: secs,
            log_tail: crate::notify::tail(&log),
        };
        for w in n.send(&event) {
            tracing::warn!(job = job.name, "{w}");
        }
    }
    record(shared, &job.name, |s| {
        s.jobs.insert(
            job.name.clone(),
            JobState {
                last_run: started,
                result: Some(result.into()),
                exit_code: code,
                duration_seconds: Some(secs),
                notified_invocation: None,
            },
        );
    });
    drop(guards);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_hold_the_limit_and_follow_a_new_one() {
        let slots = Slots::new(1);
        let a = slots.acquire().await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
        assert!(waiting.is_err(), "a second job got a slot over the limit");
        drop(a);
        let b = tokio::time::timeout(Duration::from_millis(50), slots.acquire())
            .await
            .expect("a freed slot is taken");
        slots.set_limit(2);
        let c = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
        assert!(c.is_ok(), "a raised limit is used at once");
        slots.set_limit(1);
        drop(c);
        // b still runs: with the limit lowered to 1, nothing else starts.
        let d = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
        assert!(d.is_err());
        drop(b);
    }

    #[test]
    fn missed_slots_are_counted_not_replayed() {
        let job = Job {
            name: "backup-x".into(),
            kind: crate::job::JobKind::Backup {
                service: "x".into(),
            },
            schedule: "*-*-* *:*:0/10".parse().unwrap(),
            repositories: vec![],
        };
        let last = Utc::now() - chrono::Duration::seconds(35);
        let n = missed(&job, last, Utc::now());
        assert!((3..=4).contains(&n), "{n}");
        assert_eq!(missed(&job, Utc::now(), Utc::now()), 0);
    }
}
