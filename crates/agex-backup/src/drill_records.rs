//! Drill records: what each restore drill found, written as JSON under
//! `/var/lib/agex/drills/`, folded into the latest status per service and repository,
//! and exposed as Prometheus metrics. The drills themselves run in `agex-recovery`;
//! status, reports and the schedule read these records.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::BackupError;
use crate::paths::DRILLS_DIR;
use crate::status::{exposition, unix_seconds, write_prom, Gauge};
use crate::verdict::Verdict;

/// The outcome of one drill of one service in one repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillResult {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// `ok` or `failed`.
    pub result: Verdict,
    /// Why it failed (the first problem, or the error).
    pub error: Option<String>,
    /// Every difference from the manifest.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The snapshot restored.
    pub snapshot: Option<String>,
    /// When it was taken (RFC 3339).
    pub snapshot_time: Option<String>,
    /// Age of the snapshot at the drill, seconds (the recovery point).
    pub rpo_seconds: Option<f64>,
    /// Time to restore and verify, seconds (the recovery time).
    pub rto_seconds: f64,
    /// Bytes restored.
    pub bytes: u64,
    /// Files restored.
    pub files: u64,
    /// Databases verified.
    pub databases: u64,
    /// Peak memory of the drill of this pair, bytes: agex's own peak resident set
    /// (`VmHWM`) plus the largest sum of its child processes' peaks at one time
    /// (pg_restore, borg, ssh; see `agex_recovery::peak`). None where `/proc` is missing.
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    /// Most scratch disk the drill of this pair used at once, bytes (the largest SQLite
    /// dump; PostgreSQL dumps and files are verified as they stream).
    #[serde(default)]
    pub scratch_bytes: Option<u64>,
}

impl DrillResult {
    /// Whether it passed.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// The record of one drill run, written as JSON under `/var/lib/agex/drills/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillRecord {
    /// `YYYYMMDDTHHMMSS.mmmZ` of the start.
    pub run_id: String,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    pub finished: String,
    /// One entry per service and repository.
    pub results: Vec<DrillResult>,
}

pub fn save(root: &Path, rec: &DrillRecord) -> Result<(), BackupError> {
    crate::records::save(root, DRILLS_DIR, &rec.run_id, rec, "drill record")
}

/// Every drill record under the root, oldest first.
pub fn records(root: &Path) -> Result<Vec<DrillRecord>, BackupError> {
    crate::records::load_all(root, DRILLS_DIR, "drill record")
}

/// The latest drill of one service in one repository.
#[derive(Debug, Clone, Serialize)]
pub struct DrillStatus {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// When the last drill ended (RFC 3339).
    pub last_drill: String,
    /// `ok` or `failed`.
    pub result: Verdict,
    /// Why it failed.
    pub error: Option<String>,
    /// When a drill last passed (RFC 3339), if ever.
    pub last_success: Option<String>,
    /// RPO of the last passed drill, seconds.
    pub rpo_seconds: Option<f64>,
    /// RTO of the last passed drill, seconds.
    pub rto_seconds: Option<f64>,
    /// Bytes restored by the last passed drill.
    pub bytes: Option<u64>,
    /// Peak memory of the last drill (passed or not), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Most scratch disk the last drill (passed or not) used at once, bytes.
    pub scratch_bytes: Option<u64>,
}

/// Folds drill records (oldest first) into the latest status per service and repository.
pub fn summarize(records: &[DrillRecord]) -> Vec<DrillStatus> {
    let mut map: BTreeMap<(String, String), DrillStatus> = BTreeMap::new();
    for rec in records {
        for r in &rec.results {
            let key = (r.service.clone(), r.repo.clone());
            let prev = map.remove(&key);
            let (last_success, rpo, rto, bytes) = if r.ok() {
                (
                    Some(rec.finished.clone()),
                    r.rpo_seconds,
                    Some(r.rto_seconds),
                    Some(r.bytes),
                )
            } else {
                prev.map(|p| (p.last_success, p.rpo_seconds, p.rto_seconds, p.bytes))
                    .unwrap_or_default()
            };
            map.insert(
                key,
                DrillStatus {
                    service: r.service.clone(),
                    repo: r.repo.clone(),
                    last_drill: rec.finished.clone(),
                    result: r.result,
                    error: r.error.clone(),
                    last_success,
                    rpo_seconds: rpo,
                    rto_seconds: rto,
                    bytes,
                    peak_memory_bytes: r.peak_memory_bytes,
                    scratch_bytes: r.scratch_bytes,
                },
            );
        }
    }
    map.into_values().collect()
}

/// The Prometheus text exposition of drill statuses.
pub fn prometheus(statuses: &[DrillStatus]) -> String {
    let metrics: [Gauge<DrillStatus>; 6] = [
        (
            "agex_drill_last_success_timestamp_seconds",
            "Unix time of the last restore drill that passed",
            |s| s.last_success.as_deref().and_then(unix_seconds),
        ),
        (
            "agex_drill_rto_seconds",
            "Time the last passed drill took to restore and verify",
            |s| s.rto_seconds,
        ),
        (
            "agex_drill_rpo_seconds",
            "Age of the snapshot the last passed drill restored",
            |s| s.rpo_seconds,
        ),
        (
            "agex_drill_peak_memory_bytes",
            "Peak memory of the last drill: agex's own VmHWM plus its children's peaks",
            |s| s.peak_memory_bytes.map(|b| b as f64),
        ),
        (
            "agex_drill_scratch_bytes",
            "Most scratch disk the last drill used at once",
            |s| s.scratch_bytes.map(|b| b as f64),
        ),
        (
            "agex_drill_result",
            "1 if the last drill passed, 0 if it failed",
            |s| Some(if s.result.is_ok() { 1.0 } else { 0.0 }),
        ),
    ];
    exposition(&metrics, statuses, |s| (&s.service, &s.repo))
}

/// Writes `agex_drill.prom` into `dir` atomically.
pub fn write_textfile(
    root: &Path,
    dir: &Path,
    statuses: &[DrillStatus],
) -> Result<(), BackupError> {
    write_prom(root, dir, "agex_drill.prom", &prometheus(statuses))
}
