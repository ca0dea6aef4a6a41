//! Database dumps, taken once per run into RAM (tmpfs) and read by every repository:
//! SQLite through the online backup API (a consistent copy), PostgreSQL through
//! `pg_dump -Fc`.
//!
//! Why not a pipe straight into both engines: rustic_core 0.13's archiver never records
//! the size of an entry whose size it did not know up front (`node.meta.size` stays 0),
//! and `restic restore` then writes such a file empty. A dump therefore completes first,
//! in RAM — never on a persistent disk — and both engines read the finished bytes with
//! exact metadata; a failed dump is known before any snapshot starts.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use agex_core::Database;
use agex_secrets::ramdir::RamDir;
use zeroize::Zeroizing;

use crate::error::BackupError;
use crate::manifest::under;
use crate::postgres::Connection;
use crate::process;

/// A finished dump on a RAM-backed filesystem: its size and digest are known before
/// any repository reads it, so both engines store exact metadata.
pub struct Dump {
    /// The dump's file name inside the snapshot.
    pub file: String,
    /// Where the bytes are (inside `_dir`, removed with it).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// Row count per table (SQLite: `table`; PostgreSQL: `schema.table`), for the manifest.
    pub row_counts: BTreeMap<String, u64>,
    _dir: RamDir,
}

impl Dump {
    /// A fresh reader of the dump's bytes.
    pub fn open(&self) -> Result<File, BackupError> {
        File::open(&self.path).map_err(BackupError::io(&self.path))
    }
}

/// Dumps `db` once into RAM. `root` is the `--root` for host paths; `password` is the
/// PostgreSQL role's password when the policy names a secret for it.
pub fn take(
    db: &Database,
    root: &Path,
    password: Option<Zeroizing<Vec<u8>>>,
) -> Result<Dump, BackupError> {
    match db {
        Database::Sqlite { path, .. } => sqlite(db.dump_file(), &under(root, path)),
        Database::Postgres { .. } => {
            postgres(db.dump_file(), &Connection::new(db, root, password)?)
        }
    }
}

fn sqlite(file: String, path: &Path) -> Result<Dump, BackupError> {
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
    let copy = dir.path().join("copy.sqlite3");
    let src =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(fail)?;
    src.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(fail)?;
    src.backup(rusqlite::DatabaseName::Main, &copy, None)
        .map_err(fail)?;
    drop(src);
    let row_counts = sqlite_row_counts(&copy).map_err(fail)?;
    let (size, digest) = crate::manifest::digest_file(&copy)?;
    Ok(Dump {
        file,
        path: copy,
        size,
        digest,
        row_counts,
        _dir: dir,
    })
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
fn postgres(file: String, conn: &Connection) -> Result<Dump, BackupError> {
    let mut session = conn.session(conn.database())?;
    let snapshot = session.export_snapshot()?;
    let row_counts = session.row_counts()?;
    let dir = RamDir::create(false)?;
    let path = dir.path().join("dump.pgdump");
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(BackupError::io(&path))?;
    let mut cmd = conn.command("pg_dump", conn.database());
    cmd.args(["--format=custom", "--snapshot", &snapshot]);
    process::run_to(&mut cmd, out.into())?;
    session.finish()?;
    let (size, digest) = crate::manifest::digest_file(&path)?;
    Ok(Dump {
        file,
        path,
        size,
        digest,
        row_counts,
        _dir: dir,
    })
}
