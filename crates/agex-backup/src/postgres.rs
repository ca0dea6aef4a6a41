//! Talking to PostgreSQL the way a policy says: the connection arguments shared by
//! `pg_dump`, `psql` and `pg_restore`, the role's password in a tmpfs `PGPASSFILE`, and
//! a `psql` session that holds one snapshot so the dump and its row counts agree.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use agex_core::Database;
use agex_secrets::ramdir::RamDir;
use zeroize::Zeroizing;

use crate::error::BackupError;
use crate::manifest::under;
use crate::process;

/// Counts the rows of every user table, one `schema.table|rows` line per table. One
/// statement, so it runs inside whatever snapshot the session holds.
const ROW_COUNTS_SQL: &str = "SELECT schemaname || '.' || tablename, \
     (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', \
     schemaname, tablename), false, true, '')))[1]::text \
     FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') \
     ORDER BY 1;";

/// Marks the end of one query's output in a [`Session`].
const END: &str = "--agex-end-of-output--";

/// Where and as whom a policy's PostgreSQL database is reached, with the role's password
/// (if any) in a 0600 file on tmpfs for as long as this lives.
pub struct Connection {
    database: String,
    socket: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    user: String,
    pgpass: Option<(RamDir, PathBuf)>,
}

impl Connection {
    /// The connection of a `postgres` database entry; `root` is the `--root` its socket
    /// path lives under.
    pub fn new(
        db: &Database,
        root: &Path,
        password: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Connection, BackupError> {
        let Database::Postgres {
            database,
            socket,
            host,
            port,
            user,
            ..
        } = db
        else {
            return Err(BackupError::Output {
                tool: "psql".into(),
                detail: format!("database `{}` is not a PostgreSQL database", db.name()),
            });
        };
        let pgpass = match password {
            Some(pw) => {
                let dir = RamDir::create(false)?;
                let mut line = Zeroizing::new(b"*:*:*:*:".to_vec());
                for &b in pw.iter().take_while(|&&b| b != b'\n') {
                    if b == b':' || b == b'\\' {
                        line.push(b'\\');
                    }
                    line.push(b);
                }
                let file = dir.write("pgpass", &line)?;
                Some((dir, file))
            }
            None => None,
        };
        Ok(Connection {
            database: database.clone(),
            socket: socket.as_ref().map(|s| under(root, s)),
            host: host.clone(),
            port: *port,
            user: user.clone(),
            pgpass,
        })
    }

    /// The database named in the policy.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// `program` (`pg_dump`, `psql`, `pg_restore`, `createdb`, `dropdb`) with this
    /// connection's host, port, role and password file, connected to `database`. As root
    /// over a unix socket it runs as the role's OS user, for peer authentication.
    pub fn command(&self, program: &str, database: &str) -> Command {
        let mut cmd = if self.socket.is_some() && is_root() && user_exists(&self.user) {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.args(["--no-password", "--username", &self.user]);
        // createdb/dropdb take the database as an operand, the others as --dbname.
        if !matches!(program, "createdb" | "dropdb") {
            cmd.args(["--dbname", database]);
        }
        if let Some(s) = &self.socket {
            cmd.arg("--host").arg(s);
        } else if let Some(h) = &self.host {
            cmd.arg("--host").arg(h);
        }
        if let Some(p) = self.port {
            cmd.arg("--port").arg(p.to_string());
        }
        if let Some((_, file)) = &self.pgpass {
            cmd.env("PGPASSFILE", file);
        }
        if matches!(program, "createdb" | "dropdb") {
            cmd.arg(database);
        }
        cmd
    }

    /// A `psql` session on `database`.
    pub fn session(&self, database: &str) -> Result<Session, BackupError> {
        let mut cmd = self.command("psql", database);
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        Session::start(cmd)
    }
}

/// One running `psql`, fed statements on stdin; each answer is read up to an end marker,
/// so the session (and the snapshot it may hold) stays open between questions.
pub struct Session {
    shown: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Session {
    fn start(mut cmd: Command) -> Result<Session, BackupError> {
        let shown = process::describe(&cmd);
        let (mut child, stderr) = process::spawn_piped(&mut cmd, Stdio::piped())?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BackupError::Output {
                tool: shown,
                detail: "no pipes to psql".into(),
            });
        };
        Ok(Session {
            shown,
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr: Some(stderr),
        })
    }

    /// Runs `sql` (one or more statements) and returns the lines it printed.
    pub fn query(&mut self, sql: &str) -> Result<Vec<String>, BackupError> {
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{sql}\nSELECT '{END}';").and_then(|_| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if sent.is_err() {
            return Err(self.failure());
        }
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(self.failure()),
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n');
            if line == END {
                return Ok(lines);
            }
            if !line.is_empty() {
                lines.push(line.to_string());
            }
        }
    }

    /// Starts a read-only repeatable-read transaction and exports its snapshot, for
    /// `pg_dump --snapshot`: everything this session reads until [`Session::finish`] sees
    /// the same data as the dump.
    pub fn export_snapshot(&mut self) -> Result<String, BackupError> {
        let lines = self.query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\nSELECT pg_export_snapshot();",
        )?;
        match lines.as_slice() {
            [id] => Ok(id.clone()),
            other => Err(BackupError::Output {
                tool: self.shown.clone(),
                detail: format!("expected one snapshot id, got {other:?}"),
            }),
        }
    }

    /// Rows per user table (`schema.table`), as this session sees them.
    pub fn row_counts(&mut self) -> Result<BTreeMap<String, u64>, BackupError> {
        let mut out = BTreeMap::new();
        for line in self.query(ROW_COUNTS_SQL)? {
            let parsed = line
                .rsplit_once('|')
                .and_then(|(t, n)| Some((t.to_string(), n.parse::<u64>().ok()?)));
            match parsed {
                Some((table, rows)) => {
                    out.insert(table, rows);
                }
                None => {
                    return Err(BackupError::Output {
                        tool: self.shown.clone(),
                        detail: format!("not a `table|rows` line: {line}"),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Ends the session (committing nothing: every transaction here is read-only or is
    /// the caller's to commit) and checks psql exited cleanly.
    pub fn finish(mut self) -> Result<(), BackupError> {
        drop(self.stdin.take());
        let status = self.child.wait().map_err(|source| BackupError::Spawn {
            tool: self.shown.clone(),
            source,
        })?;
        let stderr = self.stderr.take().and_then(|h| h.join().ok());
        if status.success() {
            return Ok(());
        }
        Err(BackupError::Tool {
            tool: self.shown.clone(),
            status: process::status_text(&status),
            stderr: process::tail(&stderr.unwrap_or_default()),
        })
    }

    /// The error for a session that stopped answering: psql's own words.
    fn failure(&mut self) -> BackupError {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        BackupError::Tool {
            tool: self.shown.clone(),
            status: status
                .map(|s| process::status_text(&s))
                .unwrap_or_else(|_| "failed".into()),
            stderr: process::tail(&stderr),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .map(|t| t.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}
