//! Peak memory of agex and the tools it runs, as a drill reports it.
//!
//! What is measured: agex's own `VmHWM` (`/proc/self/status`, reset at the start with
//! `/proc/self/clear_refs`), plus the largest sum, over samples taken every 25 ms, of
//! the `VmHWM` of every descendant process alive at that sample (pg_restore and the
//! `runuser` around it, borg, ssh). A child's `VmHWM` is its own peak so far, so a
//! sample catches a peak that came between samples; a child that lives less than one
//! sampling interval may be missed (the short `psql` calls, a few MiB each). Summing
//! the peaks of children alive together is an upper bound of their real joint peak.
//! `getrusage(RUSAGE_CHILDREN)` is not used: it only covers children already waited
//! for and gives the largest one, not what ran at once. The PostgreSQL server's own
//! memory is not agex's and is not counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_millis(25);

/// A running measurement; [`PeakWatch::finish`] gives the result.
pub struct PeakWatch {
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<u64>>,
}

/// What a [`PeakWatch`] measured, bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peak {
    /// agex's own peak resident set.
    pub own: u64,
    /// The largest sum of its descendants' peaks at one sample.
    pub children: u64,
}

impl Peak {
    /// Both together: the figure a drill reports.
    pub fn total(&self) -> u64 {
        self.own + self.children
    }
}

impl PeakWatch {
    /// Resets agex's own peak to its current resident set and starts sampling children.
    pub fn start() -> PeakWatch {
        // "5" resets VmHWM (Linux 4.0+); where it cannot, the peak is the process's.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let me = std::process::id();
        let sampler = std::thread::Builder::new()
            .name("agex-peak".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut best = 0u64;
                let mut seen: HashMap<u32, u64> = HashMap::new();
                loop {
                    let stopping = flag.load(Ordering::Relaxed);
                    seen.clear();
                    for pid in descendants(me) {
                        if let Some(hwm) = status_kib(pid, "VmHWM:") {
                            seen.insert(pid, hwm * 1024);
                        }
                    }
                    best = best.max(seen.values().sum());
                    if stopping {
                        return best;
                    }
                    std::thread::sleep(INTERVAL);
                }
            })
            .ok();
        PeakWatch { stop, sampler }
    }

    /// Stops sampling and reads agex's own peak. `None` where `/proc` tells nothing.
    pub fn finish(mut self) -> Option<Peak> {
        self.stop.store(true, Ordering::Relaxed);
        let children = self.sampler.take().and_then(|h| h.join().ok()).unwrap_or(0);
        let own = status_kib(std::process::id(), "VmHWM:")? * 1024;
        Some(Peak { own, children })
    }
}

impl Drop for PeakWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every process below `pid` (children of all its threads, recursively).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_grows_is_counted_and_own_growth_too() {
        let watch = PeakWatch::start();
        // A child holding ~64 MiB for half a second.
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.5; echo ${#x}",
            ])
            .output();
        let own = vec![1u8; 32 << 20];
        std::hint::black_box(&own);
        let peak = watch.finish().expect("/proc is mounted");
        let Ok(out) = out else {
            eprintln!("SKIP: no sh");
            return;
        };
        assert!(out.status.success());
        assert!(peak.children >= 64 << 20, "{peak:?}");
        assert!(peak.own >= 32 << 20, "{peak:?}");
    }
}
