//! PostgreSQL for restores and drills, on top of [`agex_backup::postgres::Connection`] (the
//! one way agex reaches a policy's server): scratch databases created and dropped,
//! dumps fed to `pg_restore` on stdin, row counts read back.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Child, ChildStdin, Output, Stdio};
use std::thread::JoinHandle;

use agex_core::Database;
use zeroize::Zeroizing;

use agex_backup::error::BackupError;
use agex_backup::postgres::Connection;
use agex_backup::process;

/// A policy database's server, for restores.
pub struct PgConn {
    conn: Connection,
}

impl PgConn {
    /// The connection of a policy's PostgreSQL database (None for SQLite).
    pub fn new(
        db: &Database,
        root: &Path,
        password: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Option<PgConn>, BackupError> {
        if !matches!(db, Database::Postgres { .. }) {
            return Ok(None);
        }
        Ok(Some(PgConn {
            conn: Connection::new(db, root, password)?,
        }))
    }

    /// The database the policy names.
    pub fn database(&self) -> &str {
        self.conn.database()
    }

    /// Runs one SQL statement in `dbname` with `psql`.
    pub fn sql(&self, dbname: &str, statement: &str) -> Result<String, BackupError> {
        let mut cmd = self.conn.command("psql", dbname);
        // The role's OS user may not be able to enter the caller's working directory.
        cmd.current_dir("/")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(statement);
        let out = process::run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `CREATE DATABASE`, connected to the maintenance database `postgres`.
    pub fn create_database(&self, name: &str) -> Result<(), BackupError> {
        self.sql("postgres", &format!("CREATE DATABASE {}", ident(name)))
            .map(|_| ())
    }

    /// `DROP DATABASE IF EXISTS … WITH (FORCE)`.
    pub fn drop_database(&self, name: &str) -> Result<(), BackupError> {
        self.sql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)),
        )
        .map(|_| ())
    }

    /// `pg_restore` of the dump file `dump` (fed on stdin: the role's OS user need not be
    /// able to read it) into `dbname`, with extra options.
    pub fn restore(&self, dump: &Path, dbname: &str, options: &[&str]) -> Result<(), BackupError> {
        let input = File::open(dump).map_err(BackupError::io(dump))?;
        let mut cmd = self.conn.command("pg_restore", dbname);
        cmd.current_dir("/").args(options);
        process::run_fed(&mut cmd, Stdio::from(input)).map(|_| ())
    }

    /// `pg_restore` into `dbname`, reading the dump from the returned stream's input as
    /// the caller writes it (a custom-format archive restores from a pipe in its own
    /// order, which is how a drill restores without a copy on disk).
    pub fn restore_stream(
        &self,
        dbname: &str,
        options: &[&str],
    ) -> Result<PgRestoreStream, BackupError> {
        let mut cmd = self.conn.command("pg_restore", dbname);
        cmd.current_dir("/").args(options);
        let shown = process::describe(&cmd);
        let (mut child, stderr) = process::spawn(&mut cmd, Stdio::piped(), Stdio::null())?;
        let input = child.stdin.take();
        Ok(PgRestoreStream {
            child: Some(child),
            input,
            stderr: Some(stderr),
            shown,
        })
    }

    /// Rows per table (`schema.table`) of every user table in `dbname`, counted the
    /// same way a backup counts them for the manifest.
    pub fn row_counts(&self, dbname: &str) -> Result<BTreeMap<String, u64>, BackupError> {
        let mut session = self.conn.session(dbname)?;
        let counts = session.row_counts()?;
        session.finish()?;
        Ok(counts)
    }
}

/// A running `pg_restore` that reads its dump from [`PgRestoreStream::input`].
pub struct PgRestoreStream {
    child: Option<Child>,
    input: Option<ChildStdin>,
    stderr: Option<JoinHandle<String>>,
    shown: String,
}

impl PgRestoreStream {
    /// Where the dump's bytes go.
    pub fn input(&mut self) -> Option<&mut ChildStdin> {
        self.input.as_mut()
    }

    /// Ends the input and waits: Ok if `pg_restore` exited 0.
    pub fn finish(mut self) -> Result<(), BackupError> {
        drop(self.input.take());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|source| BackupError::Spawn {
            tool: self.shown.clone(),
            source,
        })?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        process::check(
            &self.shown,
            Output {
                status,
                stdout: vec![],
                stderr: stderr.into_bytes(),
            },
        )
        .map(|_| ())
    }
}

impl Drop for PgRestoreStream {
    fn drop(&mut self) {
        // Not finished (an error on the way): stop it rather than leave it waiting.
        drop(self.input.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
