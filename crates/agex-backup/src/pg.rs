//! PostgreSQL clients for restores and drills: `psql` and `pg_restore` connected the way
//! the policy says (socket under `--root` or TCP host, port, role), as the role's OS user
//! when agex runs as root over a socket (peer authentication), with the role's password
//! (if any) in a `PGPASSFILE` on tmpfs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use agex_core::Database;
use agex_secrets::ramdir::RamDir;
use zeroize::Zeroizing;

use crate::error::BackupError;
use crate::manifest::under;
use crate::process;

/// Where and as whom to reach one PostgreSQL server.
pub struct PgConn {
    socket: Option<std::path::PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    user: String,
    /// The database the policy names.
    pub database: String,
    as_os_user: bool,
    pass_dir: Option<RamDir>,
}

impl PgConn {
    /// The connection of a policy's PostgreSQL database (None for SQLite).
    pub fn new(
        db: &Database,
        root: &Path,
        password: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Option<PgConn>, BackupError> {
        let Database::Postgres {
            database,
            socket,
            host,
            port,
            user,
            ..
        } = db
        else {
            return Ok(None);
        };
        let pass_dir = match password {
            Some(pw) => {
                let dir = RamDir::create(false)?;
                let mut line = Zeroizing::new(b"*:*:*:*:".to_vec());
                for &b in pw.iter().take_while(|&&b| b != b'\n') {
                    if b == b':' || b == b'\\' {
                        line.push(b'\\');
                    }
                    line.push(b);
                }
                dir.write("pgpass", &line)?;
                Some(dir)
            }
            None => None,
        };
        Ok(Some(PgConn {
            socket: socket.as_ref().map(|s| under(root, s)),
            host: host.clone(),
            port: *port,
            user: user.clone(),
            database: database.clone(),
            as_os_user: socket.is_some() && is_root() && user_exists(user),
            pass_dir,
        }))
    }

    /// `program` (psql, pg_restore) with the connection options, connected to `dbname`.
    pub fn command(&self, program: &str, dbname: &str) -> Command {
        let mut cmd = if self.as_os_user {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.args([
            "--no-password",
            "--dbname",
            dbname,
            "--username",
            &self.user,
        ]);
        if let Some(s) = &self.socket {
            cmd.arg("--host").arg(s);
        } else if let Some(h) = &self.host {
            cmd.arg("--host").arg(h);
        }
        if let Some(p) = self.port {
            cmd.arg("--port").arg(p.to_string());
        }
        if let Some(dir) = &self.pass_dir {
            cmd.env("PGPASSFILE", dir.path().join("pgpass"));
        }
        // The OS user may not be able to enter the caller's working directory.
        cmd.current_dir("/");
        cmd.env_remove("PGPASSWORD").env_remove("PGDATABASE");
        cmd
    }

    /// Runs one SQL statement in `dbname`; returns psql's unaligned output.
    pub fn sql(&self, dbname: &str, statement: &str) -> Result<String, BackupError> {
        let out = process::run(
            self.command("psql", dbname)
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(statement),
        )?;
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
        let mut cmd = self.command("pg_restore", dbname);
        cmd.args(options);
        let shown = process::describe(&cmd);
        let out = cmd
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| BackupError::Spawn {
                tool: shown.clone(),
                source,
            })?;
        process::check(&shown, out).map(|_| ())
    }

    /// Rows per table (`schema.table`) of every user table in `dbname`.
    pub fn row_counts(&self, dbname: &str) -> Result<BTreeMap<String, u64>, BackupError> {
        let tables = self.sql(
            dbname,
            "SELECT schemaname || '.' || tablename || '|' || quote_ident(schemaname) || '.' || quote_ident(tablename) \
             FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        )?;
        let mut out = BTreeMap::new();
        for line in tables.lines().filter(|l| !l.is_empty()) {
            let Some((key, quoted)) = line.split_once('|') else {
                continue;
            };
            let n = self.sql(dbname, &format!("SELECT count(*) FROM {quoted}"))?;
            let n = n.trim().parse::<u64>().map_err(|e| BackupError::Output {
                tool: "psql".into(),
                detail: format!("count of {key}: {e}"),
            })?;
            out.insert(key.to_string(), n);
        }
        Ok(out)
    }
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .map(|t| t.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}
