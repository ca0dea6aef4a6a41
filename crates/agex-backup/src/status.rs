//! What the run records say: the last result per service and repository, and the
//! Prometheus textfile written from it after every run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::BackupError;
use crate::run::RunRecord;
use crate::verdict::Verdict;

/// The latest state of one service in one repository.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// When the last run of it ended (RFC 3339).
    pub last_run: String,
    /// `ok` or `failed`.
    pub result: Verdict,
    /// Why the last run failed.
    pub error: Option<String>,
    /// When it last succeeded (RFC 3339), if ever.
    pub last_success: Option<String>,
    /// Wall time of the last run, seconds.
    pub duration_seconds: f64,
    /// Bytes the last successful run added, when known.
    pub bytes_added: Option<u64>,
    /// Snapshot id or archive of the last success.
    pub snapshot: Option<String>,
}

/// Folds run records (oldest first) into the latest status per service and repository.
pub fn summarize(records: &[RunRecord]) -> Vec<Status> {
    let mut map: BTreeMap<(String, String), Status> = BTreeMap::new();
    for rec in records {
        for r in &rec.results {
            let key = (r.service.clone(), r.repo.clone());
            let prev = map.remove(&key);
            let ok = r.ok();
            let last_success = if ok {
                Some(rec.finished.clone())
            } else {
                prev.as_ref().and_then(|p| p.last_success.clone())
            };
            let (bytes_added, snapshot) = if ok {
                (r.bytes_added, r.snapshot.clone())
            } else {
                prev.map(|p| (p.bytes_added, p.snapshot))
                    .unwrap_or_default()
            };
            map.insert(
                key,
                Status {
                    service: r.service.clone(),
                    repo: r.repo.clone(),
                    last_run: rec.finished.clone(),
                    result: r.result,
                    error: r.error.clone(),
                    last_success,
                    duration_seconds: r.duration_seconds,
                    bytes_added,
                    snapshot,
                },
            );
        }
    }
    map.into_values().collect()
}

/// A gauge: name, help text, and its value for one row (none: not emitted).
pub(crate) type Gauge<T> = (&'static str, &'static str, fn(&T) -> Option<f64>);

/// The Prometheus text exposition of `gauges` over `rows`, each row labelled with the
/// service and repository `labels` gives.
pub(crate) fn exposition<T>(
    gauges: &[Gauge<T>],
    rows: &[T],
    labels: fn(&T) -> (&str, &str),
) -> String {
    let mut out = String::new();
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
        for row in rows {
            if let Some(v) = value(row) {
                let (service, repo) = labels(row);
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",repo=\"{}\"}} {v}",
                    label(service),
                    label(repo)
                );
            }
        }
    }
    out
}

/// Writes a textfile for node_exporter into the host directory `dir` below `root`
/// atomically (it never reads half a file), without following a symlink on the way: a
/// user owning a parent cannot make root write elsewhere.
pub(crate) fn write_prom(
    root: &Path,
    dir: &Path,
    file: &str,
    text: &str,
) -> Result<(), BackupError> {
    agex_core::beneath::Dir::open(root, dir, Some(0o755))?.write_atomic(
        file,
        text.as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// The Prometheus text exposition of `statuses`.
pub fn prometheus(statuses: &[Status]) -> String {
    let metrics: [Gauge<Status>; 4] = [
        (
            "agex_backup_last_success_timestamp_seconds",
            "Unix time of the last successful backup",
            |s| s.last_success.as_deref().and_then(unix_seconds),
        ),
        (
            "agex_backup_duration_seconds",
            "Wall time of the last backup",
            |s| Some(s.duration_seconds),
        ),
        (
            "agex_backup_bytes_added",
            "Bytes the last successful backup added to the repository",
            |s| s.bytes_added.map(|b| b as f64),
        ),
        (
            "agex_backup_result",
            "1 if the last backup succeeded, 0 if it failed",
            |s| Some(if s.result.is_ok() { 1.0 } else { 0.0 }),
        ),
    ];
    exposition(&metrics, statuses, |s| (&s.service, &s.repo))
}

/// Writes `agex_backup.prom` into the host directory `dir` below `root` atomically
/// (node_exporter never reads half a file).
pub fn write_textfile(root: &Path, dir: &Path, statuses: &[Status]) -> Result<(), BackupError> {
    write_prom(root, dir, "agex_backup.prom", &prometheus(statuses))
}

pub(crate) fn unix_seconds(rfc3339: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
