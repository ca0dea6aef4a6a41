//! Talking to PostgreSQL the way a policy says: the connection arguments shared by
//! `pg_dump`, `psql` and `pg_restore`, the role's password as a `PGPASSFILE` that is an
//! anonymous in-memory file inherited by exactly those children (nothing with a name,
//! so nothing a SIGKILL can leave behind), TLS for TCP hosts, and a `psql` session that
//! holds one snapshot so the dump and its row counts agree.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use agex_core::{Database, SslMode};
use agex_secrets::handoff::SecretFd;
use agex_secrets::plainbuf;
use zeroize::Zeroizing;

use crate::error::BackupError;
use crate::paths::under;
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
/// (if any) in a sealed memfd for as long as this lives.
pub struct Connection {
    database: String,
    socket: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    user: String,
    pgpass: Option<SecretFd>,
    sslmode: Option<SslMode>,
    require_auth: Option<String>,
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
            sslmode,
            require_auth,
            ..
        } = db
        else {
            return Err(BackupError::NotPostgres(db.name().to_string()));
        };
        let pgpass = match password {
            Some(pw) => {
                let line = pgpass_line(&pw);
                let fd = SecretFd::new("agex-pgpass", &line)
                    .map_err(BackupError::io("PostgreSQL password (memfd)"))?;
                // A child that runs as the role's OS user (peer authentication as root)
                // must be able to open it.
                if socket.is_some() && agex_core::users::is_root() {
                    if let Some(uid) = user_id(user) {
                        fd.chown(uid)
                            .map_err(BackupError::io("PostgreSQL password (memfd)"))?;
                    }
                }
                Some(fd)
            }
            None => None,
        };
        let tcp = host.is_some() && socket.is_none();
        let sslmode = match (tcp, sslmode) {
            (true, Some(m)) => Some(*m),
            (true, None) if !host.as_deref().is_some_and(is_loopback) => Some(SslMode::VerifyFull),
            _ => None,
        };
        let require_auth = match (tcp, require_auth) {
            (true, Some(a)) => Some(a.clone()).filter(|a| !a.is_empty()),
            (true, None) if pgpass.is_some() => Some("scram-sha-256".to_string()),
            _ => None,
        };
        Ok(Connection {
            database: database.clone(),
            socket: socket.as_ref().map(|s| under(root, s)),
            host: host.clone(),
            port: *port,
            user: user.clone(),
            pgpass,
            sslmode,
            require_auth,
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
        let mut cmd = if self.socket.is_some()
            && agex_core::users::is_root()
            && user_id(&self.user).is_some()
        {
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
        if let Some(fd) = &self.pgpass {
            cmd.env("PGPASSFILE", fd.child_path());
            fd.pass_to(&mut cmd);
        }
        if let Some(mode) = self.sslmode {
            cmd.env("PGSSLMODE", mode.as_str());
        }
        // libpq before 16 does not know PGREQUIREAUTH and ignores it.
        if let Some(auth) = &self.require_auth {
            cmd.env("PGREQUIREAUTH", auth);
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

/// A `.pgpass` line for any host, port, database and role: the password up to its first
/// newline, with `:` and `\\` escaped, in a buffer sized for the worst case up front.
fn pgpass_line(pw: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut line = plainbuf::with_capacity(8 + 2 * pw.len());
    line.extend_from_slice(b"*:*:*:*:");
    for &b in pw.iter().take_while(|&&b| b != b'\n') {
        if b == b':' || b == b'\\' {
            line.push(b'\\');
        }
        line.push(b);
    }
    line
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The uid of a local user; a failed lookup counts as no such user (the dump then runs
/// as agex's own user and PostgreSQL says why it refuses).
fn user_id(name: &str) -> Option<u32> {
    agex_core::users::user_id(name).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, sslmode: Option<SslMode>, require_auth: Option<&str>) -> Database {
        Database::Postgres {
            name: "app".into(),
            database: "app".into(),
            socket: None,
            host: Some(host.into()),
            port: None,
            user: "app".into(),
            password_secret: Some("pw".into()),
            sslmode,
            require_auth: require_auth.map(str::to_string),
        }
    }

    fn env(conn: &Connection) -> BTreeMap<String, String> {
        conn.command("psql", "app")
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.into(), v?.to_str()?.into())))
            .collect()
    }

    fn pw() -> Option<Zeroizing<Vec<u8>>> {
        Some(Zeroizing::new(b"p:w".to_vec()))
    }

    #[test]
    fn remote_tcp_verifies_the_server_and_asks_for_scram() {
        let c = Connection::new(&tcp("db.example.org", None, None), Path::new("/"), pw()).unwrap();
        let e = env(&c);
        assert_eq!(e["PGSSLMODE"], "verify-full");
        assert_eq!(e["PGREQUIREAUTH"], "scram-sha-256");
        assert!(e["PGPASSFILE"].starts_with("/proc/self/fd/"));
    }

    #[test]
    fn loopback_keeps_libpq_default_and_settings_win() {
        let c = Connection::new(&tcp("127.0.0.1", None, Some("")), Path::new("/"), pw()).unwrap();
        let e = env(&c);
        assert!(!e.contains_key("PGSSLMODE"));
        assert!(!e.contains_key("PGREQUIREAUTH"));
        let c = Connection::new(
            &tcp("db.example.org", Some(SslMode::Require), Some("md5")),
            Path::new("/"),
            None,
        )
        .unwrap();
        let e = env(&c);
        assert_eq!(e["PGSSLMODE"], "require");
        assert_eq!(e["PGREQUIREAUTH"], "md5");
        assert!(!e.contains_key("PGPASSFILE"));
    }

    #[test]
    fn the_password_file_reaches_the_child_only() {
        let c = Connection::new(&tcp("127.0.0.1", None, None), Path::new("/"), pw()).unwrap();
        let path = env(&c)["PGPASSFILE"].clone();
        let cmd = c.command("psql", "app");
        // Same descriptor set-up as psql gets, but a program that prints the file.
        let mut cat = Command::new("sh");
        cat.args(["-c", "cat \"$PGPASSFILE\""]);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                cat.env(k, v);
            }
        }
        c.pgpass.as_ref().unwrap().pass_to(&mut cat);
        let out = cat.output().unwrap();
        assert_eq!(out.stdout, b"*:*:*:*:p\\:w");
        let other = Command::new("cat").arg(&path).output().unwrap();
        assert!(
            other.stdout.is_empty(),
            "a child it was not passed to cannot read it"
        );
    }
}
