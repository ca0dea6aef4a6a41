//! Restores: find a service's snapshot in either repository, extract it into a directory
//! (Restic in-process with rustic_core, Borg with `borg extract`), verify it against the
//! manifest stored inside it, and — in place — put its files and databases back under
//! `--root` with the policy's units stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agex_core::systemctl::Systemctl;
use agex_core::{Database, Policy, Project};
use chrono::{DateTime, NaiveDateTime, Utc};
use rayon::prelude::*;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::pg::PgConn;
use agex_backup::access::RepoAccess;
use agex_backup::engine::{self, Engine};
use agex_backup::error::BackupError;
use agex_backup::manifest::{self, DumpKind, HostPath, Manifest, ManifestUnreadable};
use agex_backup::paths::{host_path, under};
use agex_backup::progress::Progress;
use agex_backup::units::StoppedUnits;

/// One snapshot (Restic) or archive (Borg) of a service.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The repository.
    pub repo: String,
    /// The service it backs up.
    pub service: String,
    /// Restic snapshot id or Borg archive name.
    pub id: String,
    /// The agex run that wrote it.
    pub run_id: Option<String>,
    /// When it was taken.
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    /// Restic: the repository's master key from listing it, so extracting opens it
    /// without running the password's KDF again.
    #[serde(skip)]
    pub key: Option<OpenedKey>,
    /// Files the backup found changed after this snapshot's manifest was made (Restic
    /// records them in the snapshot's description); sorted.
    #[serde(skip)]
    pub late_changed: Vec<HostPath>,
}

/// A Restic master key held for one run; never shown.
#[derive(Clone)]
pub struct OpenedKey(rustic_core::repofile::MasterKey);

impl OpenedKey {
    /// The key, to open the repository again.
    pub(crate) fn master(&self) -> &rustic_core::repofile::MasterKey {
        &self.0
    }
}

impl std::fmt::Debug for OpenedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenedKey(..)")
    }
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The snapshots of `service` in one repository, oldest first. Borg checkpoint archives
/// (left by an interrupted `borg create`) are not complete backups and are skipped.
pub fn snapshots(
    access: &RepoAccess,
    state: &Path,
    service: &str,
) -> Result<Vec<Snapshot>, BackupError> {
    let mut all = all_snapshots(access, state)?;
    all.retain(|s| s.service == service);
    Ok(all)
}

/// Every agex snapshot in one repository, of every service, oldest first (checkpoint
/// archives skipped, as in [`snapshots`]). The time is the run's (UTC) wherever the
/// snapshot names its run, so both engines' snapshots of one run show the same time.
pub fn all_snapshots(access: &RepoAccess, state: &Path) -> Result<Vec<Snapshot>, BackupError> {
    let repo = access.repo.name.clone();
    let engine = Engine::open(access, state)?;
    let key = engine.master_key().map(OpenedKey);
    let mut out: Vec<Snapshot> = engine
        .snapshots()?
        .into_iter()
        .filter_map(|s| {
            let time = s
                .run_id
                .as_deref()
                .and_then(parse_run_id)
                .or_else(|| s.time.as_deref().and_then(parse_restic_time))?;
            Some(Snapshot {
                repo: repo.clone(),
                service: s.service,
                late_changed: agex_backup::manifest_stream::late_marks(s.description.as_deref()),
                id: s.id,
                run_id: s.run_id,
                time,
                key: key.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// `YYYYMMDDTHHMMSS.mmmZ`, as agex names its runs.
pub fn parse_run_id(run: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(run, "%Y%m%dT%H%M%S%.3fZ")
        .ok()
        .map(|t| t.and_utc())
}

fn parse_restic_time(t: &str) -> Option<DateTime<Utc>> {
    let plain = t.split('[').next().unwrap_or(t);
    DateTime::parse_from_rfc3339(plain)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Picks the snapshot to restore among the repositories' lists: `wanted` is `latest`
/// (or none) for the newest of all, else a Restic id (or unique prefix) or a Borg
/// archive name.
pub fn choose(
    service: &str,
    lists: &[(String, Vec<Snapshot>)],
    wanted: Option<&str>,
) -> Result<Snapshot, BackupError> {
    let all = lists.iter().flat_map(|(_, l)| l.iter());
    let searched = lists
        .iter()
        .map(|(r, _)| r.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match wanted.filter(|w| *w != "latest") {
        None => all
            .max_by(|a, b| a.time.cmp(&b.time))
            .cloned()
            .ok_or(BackupError::NoSnapshot {
                service: service.to_string(),
                searched,
            }),
        Some(id) => {
            let hits: Vec<&Snapshot> = all
                .filter(|s| s.id == id || (id.len() >= 4 && s.id.starts_with(id)))
                .collect();
            match hits.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(BackupError::NoSnapshot {
                    service: service.to_string(),
                    searched: format!("{searched} (no snapshot `{id}`)"),
                }),
                many => Err(BackupError::Usage(format!(
                    "snapshot `{id}` is ambiguous: {}",
                    many.iter()
                        .map(|s| format!("{} in {}", s.id, s.repo))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    }
}

/// How much an extraction wrote.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Extracted {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Extracts a whole snapshot into `dest` (created if needed): host paths appear below
/// it without their leading `/`, as `restic restore --target` and `borg extract` lay
/// them out. With `progress`, the bytes restored are reported as `service → repo`.
pub fn extract(
    access: &RepoAccess,
    state: &Path,
    snap: &Snapshot,
    dest: &Path,
    progress: Option<(&Arc<dyn Progress>, &str)>,
) -> Result<Extracted, BackupError> {
    std::fs::create_dir_all(dest).map_err(BackupError::io(dest))?;
    let key = snap.key.as_ref().map(|k| k.0.clone());
    engine::extract(access, state, &snap.id, key, dest, progress)?;
    count(dest)
}

fn count(dir: &Path) -> Result<Extracted, BackupError> {
    let mut out = Extracted::default();
    for e in walkdir::WalkDir::new(dir).follow_links(false) {
        let e = e.map_err(|e| BackupError::io(dir)(std::io::Error::other(e.to_string())))?;
        if e.file_type().is_file() {
            out.files += 1;
            out.bytes += e
                .metadata()
                .map_err(|x| BackupError::io(e.path())(std::io::Error::other(x.to_string())))?
                .len();
        }
    }
    Ok(out)
}

/// The manifest of `service` inside an extracted snapshot.
pub fn read_manifest(dir: &Path, service: &str) -> Result<Manifest, ManifestUnreadable> {
    let path = under(dir, &manifest::manifest_path(service));
    let bytes = std::fs::read(&path).map_err(|source| ManifestUnreadable::Missing {
        path: manifest::manifest_path(service),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(ManifestUnreadable::Parse)
}

/// What verifying an extracted snapshot found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verified {
    /// Files whose presence and digest were checked.
    pub files: u64,
    /// Of those, files that changed while they were backed up (checked by the
    /// repository's own record, not agex's digest).
    pub changed: u64,
    /// Databases checked (SQLite integrity and rows; PostgreSQL restored and counted).
    pub databases: u64,
    /// Every difference from the manifest; empty when the snapshot is good.
    pub problems: Vec<String>,
}

/// How PostgreSQL dumps are checked: restored into a scratch database named `name`
/// (dropped afterwards) on the server of the policy's database with the same name.
pub struct PgScratch<'a> {
    /// The policy whose databases say where the servers are.
    pub policy: &'a Policy,
    /// `--root`.
    pub root: &'a Path,
    /// Passwords of the roles, by secret name.
    pub passwords: &'a BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// The scratch database's name for dump `dump` (unique per run).
    pub name: &'a dyn Fn(&str) -> String,
}

/// Checks an extracted snapshot against its manifest: every file present with its
/// digest; every dump present with its digest; SQLite dumps pass `integrity_check` and
/// hold the recorded row counts; PostgreSQL dumps (when `pg` is given) restore into a
/// scratch database with the recorded row counts.
pub fn verify(dir: &Path, manifest: &Manifest, pg: Option<&PgScratch<'_>>) -> Verified {
    let mut v = Verified::default();
    // Fifos, sockets and devices the engine did not store (borg, next to agex's dump
    // pipes) are put into the extraction from the manifest first, as a restore gives
    // them back.
    for sp in &manifest.specials {
        let at = under(dir, sp.path.as_path());
        if std::fs::symlink_metadata(&at).is_err() {
            if let Err(e) = sp.create(&at) {
                v.problems
                    .push(format!("{} could not be recreated: {e}", sp.path));
            }
        }
    }
    // Files are read back in parallel (a library of small files is bound by opens and
    // reads, not by hashing); problems keep the manifest's order.
    v.files += manifest.files.len() as u64;
    v.changed += manifest.files.iter().filter(|f| f.changed).count() as u64;
    let problems: Vec<Option<String>> = manifest
        .files
        .par_iter()
        .with_min_len(64)
        .map(|f| {
            // A file that changed while it was backed up is held as its engine read it,
            // which agex's digest does not describe: the extraction, which authenticates
            // every chunk against the repository's own record, is its check. One that
            // vanished during the backup may be absent.
            if f.changed {
                return None;
            }
            let path = under(dir, f.path.as_path());
            match manifest::digest_file(&path) {
                Err(_) if std::fs::symlink_metadata(&path).is_err() => {
                    Some(format!("{} is missing", f.path))
                }
                Err(e) => Some(format!("{}: {e}", f.path)),
                Ok((size, digest)) if digest != f.digest => Some(format!(
                    "{} differs ({} bytes, {}; the manifest says {} bytes, {})",
                    f.path,
                    size,
                    short(&digest),
                    f.size,
                    short(&f.digest)
                )),
                Ok(_) => None,
            }
        })
        .collect();
    v.problems.extend(problems.into_iter().flatten());
    for d in &manifest.dumps {
        v.databases += 1;
        let path = under(dir, Path::new(&d.path));
        match manifest::digest_file(&path) {
            Err(_) if !path.exists() => {
                v.problems.push(format!("dump {} is missing", d.path));
                continue;
            }
            Err(e) => {
                v.problems.push(format!("dump {}: {e}", d.path));
                continue;
            }
            Ok((_, digest)) if digest != d.digest => v.problems.push(format!(
                "dump {} differs ({}; the manifest says {})",
                d.path,
                short(&digest),
                short(&d.digest)
            )),
            Ok(_) => {}
        }
        match d.kind {
            DumpKind::Sqlite => match sqlite_check(&path) {
                Ok(counts) => compare_rows(&mut v.problems, &d.name, &d.row_counts, &counts),
                Err(e) => v.problems.push(format!("SQLite dump {}: {e}", d.name)),
            },
            DumpKind::Postgres => {
                if let Some(pg) = pg {
                    if let Err(e) = pg_check(pg, &path, d, &mut v.problems) {
                        v.problems
                            .push(format!("PostgreSQL dump {} does not restore: {e}", d.name));
                    }
                }
            }
        }
    }
    v
}

pub(crate) fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}

pub(crate) fn compare_rows(
    problems: &mut Vec<String>,
    name: &str,
    expected: &BTreeMap<String, u64>,
    got: &BTreeMap<String, u64>,
) {
    // An empty map in the manifest means the counts were not recorded.
    for (table, want) in expected {
        match got.get(table) {
            None => problems.push(format!("database {name}: table {table} is missing")),
            Some(n) if n != want => problems.push(format!(
                "database {name}: table {table} has {n} rows; the manifest says {want}"
            )),
            Some(_) => {}
        }
    }
}

/// Why a restored SQLite file failed its check.
#[derive(Debug, thiserror::Error)]
pub enum SqliteCheckError {
    /// SQLite could not open or count it.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// `PRAGMA integrity_check` could not run.
    #[error("integrity_check: {0}")]
    Check(#[source] rusqlite::Error),
    /// `PRAGMA integrity_check` found damage; what it said.
    #[error("integrity_check says: {0}")]
    Damaged(String),
}

/// `PRAGMA integrity_check` of an SQLite file, then its row counts.
pub fn sqlite_check(path: &Path) -> Result<BTreeMap<String, u64>, SqliteCheckError> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(SqliteCheckError::Check)?;
    if result != "ok" {
        return Err(SqliteCheckError::Damaged(result));
    }
    drop(conn);
    Ok(agex_backup::dump::sqlite_row_counts(path)?)
}

/// A dump being restored into a drill's scratch database from a stream.
pub(crate) struct ScratchRestore {
    conn: PgConn,
    scratch: String,
    restoring: Option<crate::pg::PgRestoreStream>,
}

impl ScratchRestore {
    /// Where the dump's bytes go.
    pub(crate) fn input(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.restoring.as_mut().and_then(|r| r.input())
    }

    /// Waits for `pg_restore`, counts the rows, drops the scratch database.
    pub(crate) fn finish(mut self) -> Result<BTreeMap<String, u64>, BackupError> {
        let result = match self.restoring.take() {
            Some(r) => r.finish(),
            None => Ok(()),
        }
        .and_then(|()| self.conn.row_counts(&self.scratch));
        let dropped = self.conn.drop_database(&self.scratch);
        self.scratch.clear();
        let counts = result?;
        dropped?;
        Ok(counts)
    }
}

impl Drop for ScratchRestore {
    fn drop(&mut self) {
        // Not finished: stop pg_restore, then the scratch database goes too.
        drop(self.restoring.take());
        if !self.scratch.is_empty() {
            let _ = self.conn.drop_database(&self.scratch);
        }
    }
}

/// Creates the scratch database for `entry` and starts `pg_restore` into it, reading
/// the dump from [`ScratchRestore::input`].
/// A connection to the server of the policy's database `entry` was dumped from, and an
/// empty scratch database on it (an old one of the same name, left by a killed drill, is
/// dropped first).
fn fresh_scratch(
    pg: &PgScratch<'_>,
    entry: &manifest::DumpEntry,
) -> Result<(PgConn, String), BackupError> {
    let db = policy_database(pg.policy, entry).ok_or_else(|| {
        BackupError::Usage(format!(
            "policies/{}.toml names no PostgreSQL database `{}` whose server could take a scratch restore",
            pg.policy.service, entry.name
        ))
    })?;
    let conn = connect(db, pg.root, pg.passwords)?.ok_or_else(|| {
        BackupError::Usage(format!("database `{}` is not PostgreSQL", entry.name))
    })?;
    let scratch = (pg.name)(&entry.name);
    conn.drop_database(&scratch)?;
    conn.create_database(&scratch)?;
    Ok((conn, scratch))
}

pub(crate) fn pg_restore_start(
    pg: &PgScratch<'_>,
    entry: &manifest::DumpEntry,
) -> Result<ScratchRestore, BackupError> {
    let (conn, scratch) = fresh_scratch(pg, entry)?;
    let mut started = ScratchRestore {
        conn,
        scratch,
        restoring: None,
    };
    started.restoring = Some(started.conn.restore_stream(
        &started.scratch,
        &["--no-owner", "--no-privileges", "--exit-on-error"],
    )?);
    Ok(started)
}

fn pg_check(
    pg: &PgScratch<'_>,
    dump: &Path,
    entry: &manifest::DumpEntry,
    problems: &mut Vec<String>,
) -> Result<(), BackupError> {
    let (conn, scratch) = fresh_scratch(pg, entry)?;
    let result = conn
        .restore(
            dump,
            &scratch,
            &["--no-owner", "--no-privileges", "--exit-on-error"],
        )
        .and_then(|()| conn.row_counts(&scratch));
    let dropped = conn.drop_database(&scratch);
    let counts = result?;
    dropped?;
    compare_rows(problems, &entry.name, &entry.row_counts, &counts);
    Ok(())
}

/// The policy's database a dump was taken of (same name and kind: an SQLite file and a
/// PostgreSQL database may share a name).
fn policy_database<'a>(policy: &'a Policy, entry: &manifest::DumpEntry) -> Option<&'a Database> {
    policy.databases.iter().find(|d| {
        d.name() == entry.name
            && matches!(
                (d, entry.kind),
                (Database::Sqlite { .. }, DumpKind::Sqlite)
                    | (Database::Postgres { .. }, DumpKind::Postgres)
            )
    })
}

/// The connection to a policy database, with its role's password when it names one.
pub fn connect(
    db: &Database,
    root: &Path,
    passwords: &BTreeMap<String, Zeroizing<Vec<u8>>>,
) -> Result<Option<PgConn>, BackupError> {
    let password = match db {
        Database::Postgres {
            password_secret: Some(s),
            ..
        } => passwords.get(s).cloned(),
        _ => None,
    };
    PgConn::new(db, root, password)
}

/// Decrypts the passwords of a policy's PostgreSQL roles, by secret name.
pub fn database_passwords(
    project: &Project,
    policy: &Policy,
    ids: &agex_secrets::Identities,
) -> Result<BTreeMap<String, Zeroizing<Vec<u8>>>, BackupError> {
    let mut out = BTreeMap::new();
    for db in &policy.databases {
        if let Database::Postgres {
            password_secret: Some(name),
            ..
        } = db
        {
            let rule = project.rules.secrets.get(name).ok_or_else(|| {
                BackupError::Usage(format!(
                    "policies/{}.toml: password_secret `{name}` has no rule in secrets.toml",
                    policy.service
                ))
            })?;
            let plain = agex_secrets::secret_file::open(project, rule, ids)?;
            out.insert(name.clone(), Zeroizing::new(plain.to_vec()));
        }
    }
    Ok(out)
}

/// What an in-place restore does besides files: where PostgreSQL dumps go.
#[derive(Debug, Clone, Default)]
pub struct InPlaceOptions {
    /// Restore the (single) PostgreSQL database into this new database instead of the
    /// configured one.
    pub as_database: Option<String>,
    /// The `systemctl` command for the policy's `stop_units`.
    pub systemctl: Option<Systemctl>,
    /// Also remove what the snapshot lacks below the policy's paths.
    pub delete: bool,
}

/// What a restore put back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    /// Files written under the root.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Symbolic links put back.
    pub links: u64,
    /// Databases restored (`name → target`).
    pub databases: Vec<String>,
    /// Files, links and directories removed because the snapshot lacks them (`delete`).
    pub deleted: u64,
}

/// Puts a verified, extracted snapshot back under `root`: stops the policy's units,
/// replaces each file atomically (files the snapshot lacks are left alone, or with
/// `delete` removed once every file is in place: [`delete_extras`]), replaces
/// each SQLite database atomically after an integrity check, restores each PostgreSQL
/// dump with `pg_restore --clean --if-exists` in one transaction, and starts the units
/// again on every exit path.
pub fn apply_in_place(
    staged: &Path,
    manifest: &Manifest,
    policy: &Policy,
    root: &Path,
    passwords: &BTreeMap<String, Zeroizing<Vec<u8>>>,
    opts: &InPlaceOptions,
) -> Result<Applied, BackupError> {
    let pg_count = policy
        .databases
        .iter()
        .filter(|d| matches!(d, Database::Postgres { .. }))
        .count();
    if opts.as_database.is_some() && pg_count != 1 {
        return Err(BackupError::Usage(format!(
            "--as needs exactly one PostgreSQL database in policies/{}.toml (it has {pg_count})",
            policy.service
        )));
    }
    let units = StoppedUnits::stop(opts.systemctl.as_ref(), &policy.stop_units)?;
    let mut applied = Applied::default();
    remove_dead_restore_temps(policy, root)?;
    put_back_files(staged, manifest, root, &mut applied)?;
    for host in &policy.paths {
        applied.links += restore_tree_shape(staged, root, host)?;
    }
    // A special file that is gone is put back; whatever took its place is left alone.
    for sp in &manifest.specials {
        let to = Placed::new(root, sp.path.as_path())?;
        if std::fs::symlink_metadata(&to.path).is_err() {
            sp.create(&to.path).map_err(BackupError::io(&to.shown))?;
        }
    }
    if opts.delete {
        applied.deleted = delete_extras(staged, manifest, policy, root)?;
    }
    for d in &manifest.dumps {
        let Some(db) = policy_database(policy, d) else {
            return Err(BackupError::PolicyMismatch {
                service: policy.service.clone(),
                database: d.name.clone(),
            });
        };
        let dump = under(staged, Path::new(&d.path));
        let placed = match db {
            Database::Sqlite { path, .. } => put_back_sqlite(d, &dump, root, path)?,
            Database::Postgres { .. } => {
                let conn = connect(db, root, passwords)?.ok_or_else(|| {
                    BackupError::Usage(format!("database `{}` is not PostgreSQL", d.name))
                })?;
                put_back_postgres(&conn, &dump, opts.as_database.as_deref())?
            }
        };
        applied.databases.push(format!("{} → {placed}", d.name));
    }
    // Every file and database is back: a unit that does not start now is the
    // restore's failure to report, not something to drop silently.
    units.start()?;
    Ok(applied)
}

/// Puts every file of the snapshot's manifest back under `root`, hardlinked files as
/// links again, counting them into `applied`.
fn put_back_files(
    staged: &Path,
    manifest: &Manifest,
    root: &Path,
    applied: &mut Applied,
) -> Result<(), BackupError> {
    // The first place each hardlinked inode of the snapshot was put back: its other
    // names become links to it again.
    let mut linked: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    for f in &manifest.files {
        let from = under(staged, f.path.as_path());
        let to = Placed::new(root, f.path.as_path())?;
        let meta = match std::fs::symlink_metadata(&from) {
            Ok(m) => m,
            // It vanished while it was backed up: the snapshot does not hold it.
            Err(_) if f.changed => continue,
            Err(e) => return Err(BackupError::io(&from)(e)),
        };
        applied.files += 1;
        if meta.nlink() > 1 {
            match linked.entry((meta.dev(), meta.ino())) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    let first = Placed::new(root, first.get())?;
                    to.told(link_over(&first.path, &to.path))?;
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(f.path.as_path().to_path_buf());
                }
            }
        }
        applied.bytes += to.told(replace_with(&from, &to.path))?;
    }
    Ok(())
}

/// Checks an SQLite dump and puts it in place of the live file at `path` (its WAL,
/// shared memory and journal removed first); says where it went.
fn put_back_sqlite(
    d: &manifest::DumpEntry,
    dump: &Path,
    root: &Path,
    path: &Path,
) -> Result<String, BackupError> {
    sqlite_check(dump).map_err(|e| BackupError::Tool {
        tool: format!("sqlite integrity check of {}", d.path),
        status: "failed".into(),
        stderr: e.to_string(),
    })?;
    let live = Placed::new(root, path)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = PathBuf::from(format!("{}{suffix}", live.path.display()));
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let shown = format!("{}{suffix}", live.shown.display());
                return Err(BackupError::io(shown)(e));
            }
        }
    }
    live.told(replace_with(dump, &live.path))?;
    Ok(path.display().to_string())
}

/// Restores a PostgreSQL dump into its database, or into the new database `as_database`
/// (dropped again if the restore fails); says where it went.
fn put_back_postgres(
    conn: &PgConn,
    dump: &Path,
    as_database: Option<&str>,
) -> Result<String, BackupError> {
    let target = match as_database {
        Some(new) => {
            conn.create_database(new)?;
            let restored = conn.restore(dump, new, &["--exit-on-error", "--single-transaction"]);
            if let Err(e) = restored {
                // The database was created for this restore: leave nothing.
                let _ = conn.drop_database(new);
                return Err(e);
            }
            new.to_string()
        }
        None => {
            conn.restore(
                dump,
                conn.database(),
                &[
                    "--clean",
                    "--if-exists",
                    "--exit-on-error",
                    "--single-transaction",
                ],
            )?;
            conn.database().to_string()
        }
    };
    Ok(format!("postgres database {target}"))
}

/// Removes, below the policy's paths under `root`, the regular files and symbolic links
/// that are neither in the manifest nor in the extracted snapshot, then the directories
/// the snapshot lacks once they are empty. The walk is the backup's own selection: what
/// the policy excludes (and the live SQLite files, whose dumps are restored instead) is
/// never entered, as the backup never read it; sockets, fifos and devices are left alone.
/// Returns how many entries were removed.
fn delete_extras(
    staged: &Path,
    manifest: &Manifest,
    policy: &Policy,
    root: &Path,
) -> Result<u64, BackupError> {
    let selection = agex_backup::manifest::Selection::new(policy)?;
    let listed: std::collections::HashSet<&Path> =
        manifest.files.iter().map(|f| f.path.as_path()).collect();
    let mut removed = 0;
    let mut dirs = Vec::new();
    for host in selection.paths() {
        let top = under(root, host);
        if std::fs::symlink_metadata(&top).is_err() {
            continue;
        }
        let walker = walkdir::WalkDir::new(&top)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| !selection.excluded(&host_path(root, e.path())));
        for e in walker {
            let e = e.map_err(|e| BackupError::io(&top)(std::io::Error::other(e.to_string())))?;
            let host = host_path(root, e.path());
            let kept = listed.contains(host.as_path())
                || std::fs::symlink_metadata(under(staged, &host)).is_ok();
            if kept {
                continue;
            }
            let ft = e.file_type();
            if ft.is_dir() {
                dirs.push(e.into_path());
            } else if ft.is_file() || ft.is_symlink() {
                // Removed through its parent reached without following a symlink: a
                // directory swapped for one during the walk cannot aim this elsewhere.
                let at = Placed::existing(root, &host)?;
                std::fs::remove_file(&at.path).map_err(BackupError::io(e.path()))?;
                removed += 1;
            }
        }
    }
    // Deepest first; one that still holds an excluded or special entry stays.
    for dir in dirs.into_iter().rev() {
        let at = Placed::existing(root, &host_path(root, &dir))?;
        match std::fs::remove_dir(&at.path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
            Err(e) => return Err(BackupError::io(&dir)(e)),
        }
    }
    Ok(removed)
}

/// Removes the temp files an in-place restore killed before it renamed them left in the
/// service's directories (partial copies, visible to the service), saying so: below the
/// policy's paths (as the backup selects them) and beside its SQLite databases.
fn remove_dead_restore_temps(policy: &Policy, root: &Path) -> Result<(), BackupError> {
    let selection = agex_backup::manifest::Selection::new(policy)?;
    let mut found = Vec::new();
    for host in selection.paths() {
        let top = under(root, host);
        let walker = walkdir::WalkDir::new(&top)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| !selection.excluded(&host_path(root, e.path())));
        // What cannot be read now is met again, with its error, by the restore itself.
        found.extend(
            walker
                .flatten()
                .filter(|e| !e.file_type().is_dir())
                .filter_map(|e| {
                    let name = e.file_name().to_str()?;
                    agex_core::atomic::is_dead_temp(name).then(|| host_path(root, e.path()))
                }),
        );
    }
    for db in &policy.databases {
        if let Database::Sqlite { path, .. } = db {
            let Some(dir) = path.parent() else { continue };
            let Ok(entries) = std::fs::read_dir(under(root, dir)) else {
                continue;
            };
            found.extend(entries.flatten().filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                agex_core::atomic::is_dead_temp(name).then(|| dir.join(name))
            }));
        }
    }
    found.sort();
    found.dedup();
    for host in found {
        // Through its parent reached without following a symlink, as every removal here.
        let at = Placed::existing(root, &host)?;
        match std::fs::remove_file(&at.path) {
            Ok(()) => agex_secrets::ramdir::notice(&format!(
                "removed {}, left behind by a restore that did not finish",
                at.shown.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::io(&at.shown)(e)),
        }
    }
    Ok(())
}

/// A host path below the root whose parent was reached without following a symlink:
/// `path` goes through the held parent directory (`/proc/self/fd/<n>/<name>`), so a
/// service user who owns a parent cannot redirect what root writes, links or removes
/// there. Use `path` only while this lives.
struct Placed {
    _parent: agex_core::beneath::Dir,
    path: PathBuf,
    shown: PathBuf,
}

impl Placed {
    /// Missing parents are created (0755).
    fn new(root: &Path, host: &Path) -> Result<Placed, BackupError> {
        Self::open(root, host, Some(0o755))
    }

    /// The parents must exist.
    fn existing(root: &Path, host: &Path) -> Result<Placed, BackupError> {
        Self::open(root, host, None)
    }

    fn open(root: &Path, host: &Path, create: Option<u32>) -> Result<Placed, BackupError> {
        let (dir, name) = agex_core::beneath::parent_of(root, host, create)?;
        Ok(Placed {
            path: dir.handle_path().join(name),
            shown: under(root, host),
            _parent: dir,
        })
    }

    /// `r` with an error about `path` told by the path the user knows.
    fn told<T>(&self, r: Result<T, BackupError>) -> Result<T, BackupError> {
        r.map_err(|e| match e {
            BackupError::Io { path, source } if path.starts_with("/proc/") => BackupError::Io {
                path: self.shown.clone(),
                source,
            },
            e => e,
        })
    }
}

/// Puts back what the manifest does not list below one policy path: directories (also
/// empty ones, with their mode and owner) and symbolic links (replaced atomically).
/// Regular files are only ever taken from the manifest, whose digests were verified.
/// Returns the number of links restored.
fn restore_tree_shape(staged: &Path, root: &Path, host: &Path) -> Result<u64, BackupError> {
    let top = under(staged, host);
    if std::fs::symlink_metadata(&top).is_err() {
        return Ok(0);
    }
    let mut links = 0;
    let mut dirs = Vec::new();
    for e in walkdir::WalkDir::new(&top).follow_links(false) {
        let e = e.map_err(|e| BackupError::io(&top)(std::io::Error::other(e.to_string())))?;
        let rel = e.path().strip_prefix(staged).unwrap_or(e.path());
        let to = root.join(rel);
        let ft = e.file_type();
        let host = Path::new("/").join(rel);
        if ft.is_dir() {
            agex_core::beneath::Dir::open(root, &host, Some(0o755))?;
            dirs.push((e.path().to_path_buf(), host));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(e.path()).map_err(BackupError::io(e.path()))?;
            let at = Placed::new(root, &host)?;
            let tmp = at
                .path
                .with_file_name(link_temp_name(e.path().as_os_str().len()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(BackupError::io(&to))?;
            std::fs::rename(&tmp, &at.path).map_err(BackupError::io(&to))?;
            links += 1;
        }
    }
    // Modes and owners last, deepest first: a read-only directory is filled before it
    // becomes read-only. Each is opened without following a symlink (also not as its
    // last component), so a directory swapped for a symlink since is refused, never
    // given to its owner.
    for (from, host) in dirs.into_iter().rev() {
        let meta = std::fs::metadata(&from).map_err(BackupError::io(&from))?;
        let dir = agex_core::beneath::Dir::open(root, &host, None)?;
        let to = dir.path().to_path_buf();
        rustix::fs::fchmod(&dir, rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777))
            .map_err(|e| BackupError::io(&to)(e.into()))?;
        if agex_core::users::is_root() {
            let _ = rustix::fs::fchown(
                &dir,
                Some(rustix::process::Uid::from_raw(meta.uid())),
                Some(rustix::process::Gid::from_raw(meta.gid())),
            );
        }
    }
    Ok(links)
}

/// The name of a link made beside its target and renamed over it: an atomic write's
/// temp name (`.agex-<pid>-…tmp`), so the next restore removes one a killed run left.
fn link_temp_name(salt: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}link-{nanos:x}-{salt}{}",
        agex_core::atomic::temp_prefix(),
        agex_core::atomic::TEMP_SUFFIX
    )
}

/// Replaces `to` with the content, mode and owner of `from`: a temp file in `to`'s
/// directory, synced, renamed over it. Returns the bytes written.
fn replace_with(from: &Path, to: &Path) -> Result<u64, BackupError> {
    let meta = std::fs::metadata(from).map_err(BackupError::io(from))?;
    let dir = to.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(BackupError::io(dir))?;
    // Named as an atomic write's temp file, with this process's id: one a killed restore
    // left is known for a dead process's and removed by the next restore.
    let mut tmp = tempfile::Builder::new()
        .prefix(&agex_core::atomic::temp_prefix())
        .suffix(agex_core::atomic::TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(BackupError::io(dir))?;
    let mut src = std::fs::File::open(from).map_err(BackupError::io(from))?;
    let n = std::io::copy(&mut src, tmp.as_file_mut()).map_err(BackupError::io(to))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(BackupError::io(to))?;
    if agex_core::users::is_root() {
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid()));
    }
    copy_xattrs(from, tmp.as_file()).map_err(BackupError::io(to))?;
    let mtime = meta.modified().map_err(BackupError::io(from))?;
    tmp.as_file()
        .set_modified(mtime)
        .map_err(BackupError::io(to))?;
    tmp.as_file().sync_all().map_err(BackupError::io(to))?;
    tmp.persist(to).map_err(|e| BackupError::io(to)(e.error))?;
    Ok(n)
}

/// Copies the extended attributes of `from` onto `to` (the ones this process may set:
/// `user.*`, and as root the others restic and borg restore).
fn copy_xattrs(from: &Path, to: &std::fs::File) -> std::io::Result<()> {
    let mut names = vec![0u8; 64 * 1024];
    let n = match rustix::fs::llistxattr(from, &mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(from, cname.as_c_str(), &mut value)?;
        match rustix::fs::fsetxattr(
            to,
            cname.as_c_str(),
            &value[..len],
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) => {}
            // Attributes of a namespace this process may not write (trusted.* as a
            // user) are left out, as the engines' own restores do.
            Err(rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Makes `to` another name of `first` (atomically replacing what `to` was).
fn link_over(first: &Path, to: &Path) -> Result<(), BackupError> {
    let dir = to.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(BackupError::io(dir))?;
    let tmp = dir.join(link_temp_name(to.as_os_str().len()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(first, &tmp).map_err(BackupError::io(&tmp))?;
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BackupError::io(to)(e)
    })
}

/// The summary of one restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The service.
    pub service: String,
    /// Where it came from.
    pub snapshot: Snapshot,
    /// Files and bytes extracted from the repository.
    pub extracted: Extracted,
    /// What was checked against the manifest.
    pub verified: Verified,
    /// What an in-place restore put back (none for `--to`).
    pub applied: Option<Applied>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Where a restore goes.
pub enum Target<'a> {
    /// Into this directory (files below it, dumps at their snapshot paths).
    Dir(&'a Path),
    /// Back under the root.
    InPlace(InPlaceOptions),
}

/// What a restore works with besides the snapshot and the target.
pub struct RestoreJob<'a> {
    /// The repository's credentials.
    pub access: &'a RepoAccess,
    /// agex's state directory under the root (borg cache, locks, staging).
    pub state: &'a Path,
    /// `--root`.
    pub root: &'a Path,
    /// The service's policy.
    pub policy: &'a Policy,
    /// Passwords of its PostgreSQL roles, by secret name.
    pub passwords: &'a BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// How long to wait for a backup holding the repository.
    pub lock_wait: std::time::Duration,
    /// Where progress goes (bars on a terminal), if anywhere.
    pub progress: Option<Arc<dyn Progress>>,
}

/// Restores `snap`: extracts it (into `dir`, or a staging directory under the state dir
/// that is removed afterwards), verifies it, and for an in-place restore puts it back.
/// Nothing under the root changes unless the snapshot verified.
pub fn restore(
    job: &RestoreJob<'_>,
    snap: Snapshot,
    target: Target<'_>,
) -> Result<RestoreReport, BackupError> {
    let RestoreJob {
        access,
        state,
        root,
        policy,
        passwords,
        lock_wait,
        ref progress,
    } = *job;
    let started = Instant::now();
    let _lock = agex_backup::lock::acquire(state, &snap.repo, lock_wait)?;
    let staging;
    let held;
    let mut partial = None;
    let dir = match &target {
        // Created and held without following a symlink on its way, and extracted into
        // through the handle: a user owning one of its parents cannot redirect it.
        Target::Dir(d) => {
            let absolute = std::path::absolute(d).map_err(BackupError::io(d))?;
            let existed = absolute.symlink_metadata().is_ok();
            held = agex_core::beneath::Dir::open(Path::new("/"), &absolute, Some(0o700))?;
            partial = Some(Partial {
                before: entries(&held.handle_path()).map_err(BackupError::io(&absolute))?,
                existed,
                shown: absolute,
            });
            held.handle_path()
        }
        Target::InPlace(_) => {
            let base = state.join("restore");
            std::fs::create_dir_all(&base).map_err(BackupError::io(&base))?;
            staging = tempfile::Builder::new()
                .prefix(&format!("{}-", policy.service))
                .tempdir_in(&base)
                .map_err(BackupError::io(&base))?;
            staging.path().to_path_buf()
        }
    };
    let extracted = extract(
        access,
        state,
        &snap,
        &dir,
        progress.as_ref().map(|p| (p, policy.service.as_str())),
    )
    .map_err(|e| match &partial {
        Some(p) => p.undo(&dir, e),
        None => e,
    })?;
    let mut manifest =
        read_manifest(&dir, &policy.service).map_err(|p| BackupError::Verification {
            repo: snap.repo.clone(),
            snapshot: snap.id.clone(),
            problems: vec![p.to_string()],
        })?;
    manifest.mark_changed(&snap.late_changed);
    let verified = verify(&dir, &manifest, None);
    if !verified.problems.is_empty() {
        return Err(BackupError::Verification {
            repo: snap.repo.clone(),
            snapshot: snap.id.clone(),
            problems: verified.problems,
        });
    }
    let applied = match &target {
        Target::Dir(_) => None,
        Target::InPlace(opts) => Some(apply_in_place(
            &dir, &manifest, policy, root, passwords, opts,
        )?),
    };
    Ok(RestoreReport {
        service: policy.service.clone(),
        snapshot: snap,
        extracted,
        verified,
        applied,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a `--to` directory held before the restore wrote into it, to take back exactly
/// what this restore added when it fails part-way.
struct Partial {
    /// Its entries (names directly in it) before the restore.
    before: BTreeSet<OsString>,
    /// Whether the directory itself was there.
    existed: bool,
    /// As the user named it (made absolute).
    shown: PathBuf,
}

impl Partial {
    /// Removes what the failed restore added below `held` (the handle path of the
    /// directory) and, if the restore created it, the directory itself; returns the
    /// failure, saying what was removed and naming anything that could not be.
    fn undo(&self, held: &Path, failure: BackupError) -> BackupError {
        let mut files = 0u64;
        let mut kept = Vec::new();
        let added = entries(held)
            .map(|now| now.difference(&self.before).cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for name in added {
            let at = held.join(&name);
            files += walkdir::WalkDir::new(&at)
                .follow_links(false)
                .into_iter()
                .flatten()
                .filter(|e| !e.file_type().is_dir())
                .count() as u64;
            let gone = match at.symlink_metadata() {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&at),
                Ok(_) => std::fs::remove_file(&at),
                Err(e) => Err(e),
            };
            if gone.is_err() && at.symlink_metadata().is_ok() {
                kept.push(self.shown.join(&name));
            }
        }
        if kept.is_empty() && !self.existed {
            if let (Some(parent), Some(name)) = (self.shown.parent(), self.shown.file_name()) {
                if let Ok(p) = agex_core::beneath::Dir::open(Path::new("/"), parent, None) {
                    let _ = std::fs::remove_dir(p.handle_path().join(name));
                }
            }
        }
        let cleanup = if kept.is_empty() && self.before.is_empty() {
            format!(
                "removed the {} it had written there, so nothing in {} is a half-restored file",
                count_of(files, "partial file"),
                self.shown.display()
            )
        } else if kept.is_empty() {
            let there: Vec<String> = self
                .before
                .iter()
                .map(|n| self.shown.join(n).display().to_string())
                .collect();
            format!(
                "removed the {} it had written there; what was there before ({}) was left alone, and a file this restore wrote inside it may be partial",
                count_of(files, "partial file"),
                there.join(", ")
            )
        } else {
            let names: Vec<String> = kept.iter().map(|k| k.display().to_string()).collect();
            format!(
                "could not remove what it had written there: {} hold partial files, do not use them",
                names.join(", ")
            )
        };
        BackupError::RestoreIncomplete {
            dir: self.shown.clone(),
            cleanup,
            source: Box::new(failure),
        }
    }
}

fn count_of(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The names directly in `dir`.
fn entries(dir: &Path) -> std::io::Result<BTreeSet<OsString>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// Whether a directory is absent or empty (a `--to` target must not mix with old files).
pub fn is_empty_dir(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::io(dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_restore_takes_back_only_what_it_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("to");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("there-before"), b"keep").unwrap();
        let partial = Partial {
            before: entries(&dir).unwrap(),
            existed: true,
            shown: dir.clone(),
        };
        std::fs::create_dir_all(dir.join("srv/app")).unwrap();
        std::fs::write(dir.join("srv/app/half"), b"half").unwrap();
        std::fs::write(dir.join("srv/app/whole"), b"whole").unwrap();
        std::os::unix::fs::symlink(tmp.path(), dir.join("srv/link")).unwrap();
        let err = partial.undo(&dir, BackupError::Usage("disk full".into()));
        let shown = err.to_string();
        assert!(shown.contains("disk full"), "{shown}");
        assert!(shown.contains("removed the 3 partial files"), "{shown}");
        assert!(
            shown.contains("there-before) was left alone"),
            "what was there is named, not claimed clean: {shown}"
        );
        assert_eq!(
            entries(&dir).unwrap().into_iter().collect::<Vec<_>>(),
            vec![OsString::from("there-before")]
        );
        assert_eq!(std::fs::read(dir.join("there-before")).unwrap(), b"keep");
        assert!(tmp.path().join("to").exists(), "the link was not followed");
    }

    #[test]
    fn a_failed_restore_removes_the_directory_it_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new");
        let partial = Partial {
            before: BTreeSet::new(),
            existed: false,
            shown: dir.clone(),
        };
        std::fs::create_dir_all(dir.join("srv")).unwrap();
        std::fs::write(dir.join("srv/half"), b"half").unwrap();
        let shown = partial
            .undo(&dir, BackupError::Usage("disk full".into()))
            .to_string();
        assert!(shown.contains("removed the 1 partial file "), "{shown}");
        assert!(!dir.exists());
    }
}
