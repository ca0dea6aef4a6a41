//! Database dumps, taken once per run and streamed, while they are taken, to every
//! repository through a [`Tee`]: PostgreSQL as `pg_dump -Fc` straight from its stdout
//! (nothing of it is stored anywhere first, however large the database), SQLite
//! through the online backup API, whose consistent copy is a database file: it is made
//! in RAM (tmpfs), never on a persistent disk, and streamed from there.
//!
//! `pg_dump` leaves compression to the repositories (`--compress=0`): both compress
//! with zstd, and an uncompressed dump deduplicates against last night's, where a
//! zlib-compressed one is new bytes from its first changed row on.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use agex_core::Database;
use agex_secrets::ramdir::RamDir;
use zeroize::Zeroizing;

use crate::error::BackupError;
use crate::paths::under;
use crate::postgres::Connection;
use crate::process;
use crate::tee::{Copied, Tee};

/// What a complete dump measured, for the manifest.
#[derive(Debug, Clone)]
pub struct Dumped {
    /// Size and digest of the bytes the repositories got.
    pub copied: Copied,
    /// Row count per table (SQLite: `table`; PostgreSQL: `schema.table`).
    pub row_counts: BTreeMap<String, u64>,
}

/// Dumps `db` once into `tee`, ending the stream as complete or failed. `root` is the
/// `--root` for host paths; `password` is the PostgreSQL role's password when the policy
/// names a secret for it.
pub fn stream(
    db: &Database,
    root: &Path,
    password: Option<Zeroizing<Vec<u8>>>,
    mut tee: Tee,
) -> Result<Dumped, BackupError> {
    let dumped = match db {
        Database::Sqlite { path, .. } => sqlite(&under(root, path), &mut tee),
        Database::Postgres { .. } => {
            Connection::new(db, root, password).and_then(|conn| postgres(&conn, &mut tee))
        }
    };
    match &dumped {
        Ok(_) => tee.finish(),
        Err(e) => tee.fail(&format!("the dump of {} failed: {e}", db.dump_file())),
    }
    dumped
}

fn sqlite(path: &Path, tee: &mut Tee) -> Result<Dumped, BackupError> {
    if !path.is_file() {
        return Err(BackupError::io(path)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "SQLite database not found",
        )));
    }
    let fail = |e: rusqlite::Error| BackupError::Tool {
        tool: format!("sqlite backup of {}", path.display()),
        status: "failed".into(),
        stderr: e.to_string(),
    };
    let dir = RamDir::create(false)?;
    // SQLite takes a path: one through agex's handle on the directory, which nobody can
    // redirect by renaming things in the directory above it.
    let copy = dir.resolved("copy.sqlite3");
    let src =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(fail)?;
    src.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(fail)?;
    src.backup(rusqlite::DatabaseName::Main, &copy, None)
        .map_err(fail)?;
    drop(src);
    let row_counts = sqlite_row_counts(&copy).map_err(fail)?;
    let mut file = dir.open("copy.sqlite3")?;
    let copied = tee.copy_from(&mut file).map_err(BackupError::io(&copy))?;
    Ok(Dumped { copied, row_counts })
}

/// Row counts of every table of an SQLite file (used for the manifest and drills).
pub fn sqlite_row_counts(path: &Path) -> Result<BTreeMap<String, u64>, rusqlite::Error> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for t in tables {
        let n: i64 = conn.query_row(
            &format!("SELECT count(*) FROM \"{}\"", t.replace('"', "\"\"")),
            [],
            |r| r.get(0),
        )?;
        out.insert(t, n.max(0) as u64);
    }
    Ok(out)
}

/// `pg_dump -Fc` of the snapshot a `psql` session exports, with row counts read in that
/// same snapshot: the manifest's counts are exactly the dump's, however busy the database.
/// A dump is complete only when pg_dump exited 0 after its last byte was handed on.
fn postgres(conn: &Connection, tee: &mut Tee) -> Result<Dumped, BackupError> {
    let mut session = conn.session(conn.database())?;
    let snapshot = session.export_snapshot()?;
    let row_counts = session.row_counts()?;
    let mut cmd = conn.command("pg_dump", conn.database());
    cmd.args(["--format=custom", "--compress=0", "--snapshot", &snapshot]);
    let copied = process::run_reading(&mut cmd, |out: &mut dyn Read| tee.copy_from(out))?;
    session.finish()?;
    Ok(Dumped { copied, row_counts })
}
