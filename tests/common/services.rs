//! Real services on loopback for the end-to-end backup tests: an `sshd` that serves
//! `borg serve` to a dedicated system user, a private PostgreSQL cluster on a unix
//! socket, and `rclone serve restic` as a restic REST server.
//!
//! Every guard owns its own temp dir and port, so tests can run in parallel; it kills
//! what it started in `Drop`, also when the test panics. Each `start` returns `None`
//! after printing `SKIP <test>: <reason>` when a tool or root privilege is missing.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{have_tool, is_root};

/// How long a service may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a start is retried when its port was taken in between.
const PORT_RETRIES: usize = 5;

/// The system user that owns the borg repositories served by [`Sshd`].
pub const BORG_USER: &str = "agexborg";

/// A free TCP port on 127.0.0.1 (free when this returns; callers retry on collision).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A name no other test (process or thread) uses at the same time.
pub fn unique_repo_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "agex-test-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Generates an unencrypted ed25519 key pair at `path` (and `path.pub`) and returns the
/// public key line.
pub fn ssh_keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "agex-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    check(&out, "ssh-keygen");
    fs::read_to_string(format!("{}.pub", path.display()))
        .expect("read public key")
        .trim()
        .to_string()
}

/// Panics with the output of a failed helper command.
fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    check(&out, what);
    out
}

/// A temp dir under /tmp that other users may traverse (service users read from it).
fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir in /tmp");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    dir
}

fn chown(path: &Path, user: &str) {
    run(
        Command::new("chown").arg(format!("{user}:")).arg(path),
        "chown",
    );
}

/// Whether process `pid` exists and is not a zombie.
fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Sends SIGTERM to `pid`, waits up to 5 s, then SIGKILL.
fn terminate(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Holds an exclusive flock on a file in /tmp (serialises useradd across test processes).
struct FileLock(fs::File);

impl FileLock {
    fn take(path: &str) -> FileLock {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("open lock file");
        // SAFETY: flock on an fd we own; released when the file is closed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}");
        FileLock(f)
    }
}

/// The passwd entry's home directory of `user`, if the user exists.
fn user_home(user: &str) -> Option<PathBuf> {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.trim().split(':').nth(5).map(PathBuf::from)
}

/// Creates `user` (with a home, bash, and an unlocked-but-passwordless account) if needed.
fn ensure_user(user: &str) -> PathBuf {
    let _lock = FileLock::take("/tmp/agex-test-useradd.lock");
    if user_home(user).is_none() {
        run(
            Command::new("useradd").args(["-m", "-s", "/bin/bash", user]),
            "useradd",
        );
    }
    // With UsePAM no, sshd refuses key logins to a locked ('!') account: set '*'.
    let shadow = Command::new("getent")
        .args(["shadow", user])
        .output()
        .expect("getent shadow");
    let pw = String::from_utf8_lossy(&shadow.stdout)
        .split(':')
        .nth(1)
        .unwrap_or("")
        .to_string();
    if pw != "*" {
        run(Command::new("usermod").args(["-p", "*", user]), "usermod");
    }
    let home = user_home(user).expect("home of the test user");
    if !home.is_dir() {
        fs::create_dir_all(&home).expect("create home");
        chown(&home, user);
    }
    home
}

// ---------------------------------------------------------------------------------------
// sshd
// ---------------------------------------------------------------------------------------

/// `/usr/sbin/sshd` on 127.0.0.1 with its own host key and authorized keys, logging in as
/// [`BORG_USER`]. Repositories live in a per-guard directory under that user's home.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    home: PathBuf,
    /// This guard's directory below `home`, relative to it.
    repo_base: String,
    child: Option<Child>,
}

impl Sshd {
    /// Starts sshd, or prints `SKIP` and returns None without root, sshd, ssh or borg.
    pub fn start(test: &str) -> Option<Sshd> {
        if !is_root(test) {
            return None;
        }
        if !Path::new("/usr/sbin/sshd").exists() {
            eprintln!(
                "SKIP {test}: `/usr/sbin/sshd` is not installed (run scripts/install-deps.sh)"
            );
            return None;
        }
        for tool in ["ssh", "ssh-keygen", "borg", "useradd"] {
            if !have_tool(tool, test) {
                return None;
            }
        }
        let home = ensure_user(BORG_USER);
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");

        let dir = shared_tempdir("agex-sshd-");
        let hostkey = dir.path().join("hostkey");
        ssh_keygen(&hostkey);
        let auth = dir.path().join("authorized_keys");
        fs::write(&auth, "").expect("write authorized_keys");
        fs::set_permissions(&auth, fs::Permissions::from_mode(0o644)).expect("chmod");

        // Per-guard repository directory, owned by the user so borg can create repos in it.
        let repo_base = unique_repo_name();
        let base = home.join(&repo_base);
        fs::create_dir_all(&base).expect("create repo base dir");
        chown(&base, BORG_USER);

        let mut sshd = Sshd {
            dir,
            port: 0,
            user: BORG_USER.to_string(),
            home,
            repo_base,
            child: None,
        };
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match sshd.try_spawn(free_port()) {
                Ok(()) => return Some(sshd),
                Err(e) => last_err = e,
            }
        }
        panic!("sshd did not start after {PORT_RETRIES} attempts: {last_err}");
    }

    fn write_config(&self, port: u16) -> PathBuf {
        let d = self.dir.path();
        let mut cfg = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {hostkey}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {auth}\n\
             AllowUsers {user}\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PermitRootLogin no\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n\
             MaxStartups 100:30:200\n\
             Subsystem sftp internal-sftp\n",
            hostkey = d.join("hostkey").display(),
            pid = d.join("sshd.pid").display(),
            auth = d.join("authorized_keys").display(),
            user = self.user,
        );
        // borg must be on the session's PATH; sshd's default is the standard bin dirs.
        if let Some(bin_dir) = which("borg").and_then(|p| p.parent().map(Path::to_path_buf)) {
            let std_dirs = ["/usr/local/bin", "/usr/bin", "/bin"];
            if !std_dirs.iter().any(|s| Path::new(s) == bin_dir) {
                cfg.push_str(&format!(
                    "SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin\n",
                    bin_dir.display()
                ));
            }
        }
        let path = d.join("sshd_config");
        fs::write(&path, cfg).expect("write sshd_config");
        path
    }

    /// One start attempt on `port`; Err when sshd exits (e.g. the port was taken).
    fn try_spawn(&mut self, port: u16) -> Result<(), String> {
        let config = self.write_config(port);
        let pidfile = self.pidfile();
        let _ = fs::remove_file(&pidfile);
        let log = self.log_path();
        let _ = fs::remove_file(&log);
        // -D keeps sshd our child, so we can reap it; it still writes the PidFile.
        let mut child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn sshd: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("sshd exited with {status}: {}", self.log()));
            }
            // The PidFile is written after sshd bound its socket: then the port is ours.
            let pid_ok = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                == Some(child.id() as i32);
            if pid_ok && port_open(port) {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("sshd did not come up in time: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Appends a public key line to the authorized keys file this sshd uses.
    pub fn authorize(&self, pubkey_line: &str) {
        let path = self.dir.path().join("authorized_keys");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open authorized_keys");
        writeln!(f, "{}", pubkey_line.trim()).expect("append authorized key");
        // sshd reads it as the login user: world-readable, in a world-traversable dir.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    /// The TCP port sshd listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The login user's home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `ssh://USER@127.0.0.1:PORT/./BASE/REPO`: a borg repository URL relative to the
    /// user's home, inside this guard's own directory `BASE` (removed in Drop).
    pub fn url(&self, repo_rel: &str) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}/./{}/{}",
            self.user,
            self.port,
            self.repo_base,
            repo_rel.trim_start_matches('/')
        )
    }

    /// Where the repository `repo_rel` of [`Sshd::url`] lives on disk.
    pub fn repo_path(&self, repo_rel: &str) -> PathBuf {
        self.home
            .join(&self.repo_base)
            .join(repo_rel.trim_start_matches('/'))
    }

    /// `BORG_RSH` for connecting to this sshd with the private key at `key_path`.
    pub fn borg_rsh(&self, key_path: &Path) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o LogLevel=ERROR -o BatchMode=yes",
            self.port,
            key_path.display()
        )
    }

    /// This server's host key as a known_hosts line (`[127.0.0.1]:PORT ssh-ed25519 …`),
    /// what `known_hosts` in agex.toml pins.
    pub fn known_hosts_line(&self) -> String {
        let public = fs::read_to_string(self.dir.path().join("hostkey.pub")).expect("hostkey.pub");
        let mut f = public.split_whitespace();
        let (kind, key) = (f.next().expect("key type"), f.next().expect("key"));
        format!("[127.0.0.1]:{} {kind} {key}", self.port)
    }

    /// `sftp://USER@127.0.0.1:PORT/BASE/REPO`: a restic sftp URL in this guard's directory.
    pub fn sftp_url(&self, repo_rel: &str) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}/{}/{}",
            self.user,
            self.port,
            self.repo_base,
            repo_rel.trim_start_matches('/')
        )
    }

    /// The guard's private temp dir (config, host key, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.path().join("sshd.pid")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// sshd's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the sshd we started still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` (`libc::SIGSTOP`, say) to every process this sshd started for its
    /// sessions (the per-connection sshd and what it runs, `borg serve`), not to the
    /// listener, nor to other tests' sshds; returns how many there were.
    pub fn signal_sessions(&self, signal: i32) -> usize {
        let Some(listener) = fs::read_to_string(self.pidfile())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return 0;
        };
        let parent_of = |pid: i32| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<i32>().ok()
        };
        let pids: Vec<i32> = fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut ours = vec![listener];
        let mut grew = true;
        while grew {
            grew = false;
            for &pid in &pids {
                if !ours.contains(&pid) && parent_of(pid).is_some_and(|pp| ours.contains(&pp)) {
                    ours.push(pid);
                    grew = true;
                }
            }
        }
        for &pid in &ours[1..] {
            // SAFETY: kill(2) on processes this test's sshd started.
            unsafe { libc::kill(pid, signal) };
        }
        ours.len() - 1
    }

    /// The server dies: every session it serves killed (SIGKILL), then the listener.
    pub fn kill(&mut self) {
        self.signal_sessions(libc::SIGKILL);
        self.stop();
    }

    /// Starts sshd again on the same port, host key and authorized keys.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match self.try_spawn(port) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("sshd did not start again on port {port}: {last_err}");
    }

    /// Stops sshd (by the pid in its PidFile) and waits for it; idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = fs::read_to_string(self.pidfile())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(child.id() as i32);
        terminate(pid);
        if pid != child.id() as i32 {
            terminate(child.id() as i32);
        }
        let _ = child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if !self.repo_base.is_empty() && !self.repo_base.contains('/') {
            let _ = fs::remove_dir_all(self.home.join(&self.repo_base));
        }
    }
}

/// The full path of `tool` on PATH.
fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && p.starts_with('/')).then(|| PathBuf::from(p))
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// A private PostgreSQL cluster for one test, listening only on a unix socket in its own
/// directory, run by the `postgres` user.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    /// initdb + pg_ctl start, or prints `SKIP` and returns None without root/PostgreSQL.
    pub fn start(test: &str) -> Option<Postgres> {
        if !is_root(test) {
            return None;
        }
        for tool in ["runuser", "psql"] {
            if !have_tool(tool, test) {
                return None;
            }
        }
        let Some(bin) = pg_bin_dir() else {
            eprintln!(
                "SKIP {test}: no /usr/lib/postgresql/<ver>/bin/initdb (run scripts/install-deps.sh)"
            );
            return None;
        };
        if user_home("postgres").is_none() {
            eprintln!("SKIP {test}: no `postgres` system user (run scripts/install-deps.sh)");
            return None;
        }
        let dir = shared_tempdir("agex-pg-");
        for sub in ["data", "sock", "log"] {
            let p = dir.path().join(sub);
            fs::create_dir(&p).expect("mkdir");
            chown(&p, "postgres");
        }
        fs::set_permissions(dir.path().join("data"), fs::Permissions::from_mode(0o700))
            .expect("chmod data");
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            running: false,
        };
        let data = pg.data_dir();
        run(
            pg.as_postgres(pg.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
            "initdb",
        );
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match pg.try_start(free_port()) {
                Ok(()) => return Some(pg),
                Err(e) => last_err = e,
            }
        }
        panic!("postgres did not start after {PORT_RETRIES} attempts: {last_err}");
    }

    fn try_start(&mut self, port: u16) -> Result<(), String> {
        // Everything local: no TCP, socket in our own dir; fast and throwaway.
        let conf = format!(
            "\n# agex test cluster\n\
             listen_addresses = ''\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 20\n\
             shared_buffers = 16MB\n",
            sock = self.socket_dir().display()
        );
        let auto = self.data_dir().join("postgresql.auto.conf");
        fs::write(&auto, conf).map_err(|e| format!("write {}: {e}", auto.display()))?;
        chown(&auto, "postgres");
        let out = self
            .as_postgres(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "30", "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start: {}\n{}\nlog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(self.log_path()).unwrap_or_default()
            ));
        }
        self.port = port;
        self.running = true;
        Ok(())
    }

    /// `program` run as the postgres user, cwd = our temp dir (which postgres can enter).
    fn as_postgres(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir(self.dir.path());
        c
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log/postgres.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The directory holding the socket `.s.PGSQL.<port>` (use as PGHOST / `-h`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The port number (names the socket file; there is no TCP listener).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PostgreSQL bin dir (`/usr/lib/postgresql/<ver>/bin`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A scratch dir that the postgres user can read and write (e.g. for dump files).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// A client command (`psql`, `pg_dump`, ...) run as the postgres user, with PGHOST and
    /// PGPORT pointing at this cluster. Add args, stdin/stdout as needed.
    pub fn command(&self, program: &str) -> Command {
        let mut c = self.as_postgres(program);
        c.env("PGHOST", self.socket_dir())
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env_remove("PGDATABASE")
            .env_remove("PGPASSWORD");
        c
    }

    /// Runs `sql` in database `db` (`psql -v ON_ERROR_STOP=1 -At`), returns stdout;
    /// panics with psql's stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run(
            self.command("psql")
                .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", db, "-c", sql]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `CREATE DATABASE name`.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// Whether the server we started still runs.
    pub fn is_running(&self) -> bool {
        self.running
            && self
                .command("pg_isready")
                .arg("-q")
                .stdin(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    }

    /// `pg_ctl -m fast stop`; idempotent.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let out = self
            .as_postgres(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "20", "stop"])
            .stdin(Stdio::null())
            .output();
        let stopped = matches!(&out, Ok(o) if o.status.success());
        if !stopped {
            // Fall back to the postmaster pid (first line of postmaster.pid).
            if let Some(pid) = fs::read_to_string(self.data_dir().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            {
                terminate(pid);
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `/usr/lib/postgresql/<newest ver>/bin` if it holds initdb.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut vers: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    vers.sort();
    vers.pop().map(|(_, b)| b)
}

// ---------------------------------------------------------------------------------------
// rclone serve restic
// ---------------------------------------------------------------------------------------

/// `rclone serve restic` on 127.0.0.1 serving a temp dir: a restic REST server.
pub struct RcloneRestic {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl RcloneRestic {
    /// Starts the server, or prints `SKIP` and returns None without rclone.
    pub fn start(test: &str) -> Option<RcloneRestic> {
        if !have_tool("rclone", test) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("agex-rclone-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(dir.path().join("data")).expect("mkdir data");
        fs::write(dir.path().join("rclone.conf"), "").expect("write empty rclone.conf");
        let mut srv = RcloneRestic {
            dir,
            port: 0,
            child: None,
        };
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match srv.try_spawn(free_port()) {
                Ok(()) => return Some(srv),
                Err(e) => last_err = e,
            }
        }
        panic!("rclone serve restic did not start after {PORT_RETRIES} attempts: {last_err}");
    }

    fn try_spawn(&mut self, port: u16) -> Result<(), String> {
        let log = self.log_path();
        let log_file = fs::File::create(&log).map_err(|e| format!("create log: {e}"))?;
        let conf = self.dir.path().join("rclone.conf");
        let mut child = Command::new("rclone")
            .args(["serve", "restic", "--addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(&conf)
            .arg(self.data_dir())
            .env("RCLONE_CONFIG", &conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn rclone: {e}"))?;
        let ready = format!("127.0.0.1:{port}/");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("rclone exited with {status}: {}", self.log()));
            }
            // rclone logs "Serving restic REST API on http://127.0.0.1:PORT/" once bound.
            let log = self.log();
            if log.contains("Serving restic REST API") && log.contains(&ready) && port_open(port) {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("rclone did not come up in time: {log}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("rclone.log")
    }

    /// rclone's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The directory served (each repository is a subdirectory).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rest:http://127.0.0.1:PORT/REPO`.
    pub fn url(&self, repo: &str) -> String {
        format!(
            "rest:http://127.0.0.1:{}/{}",
            self.port,
            repo.trim_start_matches('/')
        )
    }

    /// Whether the server we started still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server we spawned and reaps it; idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id() as i32);
            let _ = child.wait();
        }
    }
}

impl Drop for RcloneRestic {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// SeaweedFS (S3)
// ---------------------------------------------------------------------------------------

/// The S3 access key of [`SeaweedFs`]'s one identity.
pub const S3_ACCESS_KEY: &str = "AKIDAGEXTEST";
/// Its secret key.
pub const S3_SECRET_KEY: &str = "secretagextest123";

/// Where `weed` is: `$AGEX_WEED`, the venv `scripts/install-deps.sh` makes, or PATH.
fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AGEX_WEED") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from("/opt/agex-test/seaweedfs/bin/weed");
    if venv.exists() {
        return Some(venv);
    }
    which("weed")
}

/// `weed server` (master, volume, filer and S3 gateway) on 127.0.0.1 with one identity
/// ([`S3_ACCESS_KEY`]); buckets are created by the first write into them.
pub struct SeaweedFs {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl SeaweedFs {
    /// Starts the server, or prints `SKIP` and returns None without `weed`.
    pub fn start(test: &str) -> Option<SeaweedFs> {
        let Some(weed) = weed_binary() else {
            eprintln!(
                "SKIP {test}: `weed` (SeaweedFS) is not installed (run scripts/install-deps.sh)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("agex-weed-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(dir.path().join("data")).expect("mkdir data");
        fs::write(
            dir.path().join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"agex","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("write s3.json");
        let mut srv = SeaweedFs {
            dir,
            port: 0,
            child: None,
        };
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match srv.try_spawn(&weed) {
                Ok(()) => return Some(srv),
                Err(e) => last_err = e,
            }
        }
        panic!("weed server did not start after {PORT_RETRIES} attempts: {last_err}");
    }

    fn try_spawn(&mut self, weed: &Path) -> Result<(), String> {
        // Every service's port and its gRPC port (port + 10000 by default) must be free.
        let mut ports = Vec::new();
        while ports.len() < 5 {
            let p = free_port();
            if p < 55000 && !ports.contains(&p) && !port_open(p + 10000) {
                ports.push(p);
            }
        }
        let [s3, master, volume, filer, iam] = [ports[0], ports[1], ports[2], ports[3], ports[4]];
        let d = self.dir.path();
        let log = fs::File::create(d.join("weed.log")).map_err(|e| format!("log: {e}"))?;
        let mut child = Command::new(weed)
            .arg("server")
            .arg(format!("-dir={}", d.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.config={}", d.join("s3.json").display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-iam.port={iam}"))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn weed: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("weed exited with {status}: {}", self.log()));
            }
            // Ready once the S3 gateway answers an unsigned request (403).
            if port_open(s3) {
                let code = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .arg(format!("http://127.0.0.1:{s3}/"))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                if code == "403" {
                    self.port = s3;
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("weed did not come up in time: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// Starts the stopped server again on its data (new ports: see [`SeaweedFs::port`]).
    pub fn restart(&mut self) {
        self.stop();
        let weed = weed_binary().expect("weed");
        let mut last_err = String::new();
        for _ in 0..PORT_RETRIES {
            match self.try_spawn(&weed) {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
        }
        panic!("weed server did not start again: {last_err}");
    }

    /// The S3 gateway's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `s3:http://127.0.0.1:PORT/BUCKET/PREFIX`, a restic repository URL.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{bucket}/{prefix}", self.port)
    }

    /// The env secret text that logs in (what a user keeps for restic).
    pub fn env_secret(&self) -> String {
        format!("AWS_ACCESS_KEY_ID={S3_ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={S3_SECRET_KEY}\n")
    }

    /// `restic` (the real CLI) with this server's credentials in its environment.
    pub fn restic_env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env_remove("AWS_CA_BUNDLE");
    }

    /// Whether the server we started still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`) to the server we started.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the pid we started (and have not reaped).
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Kills the server (SIGTERM, then SIGKILL: weed lingers after SIGTERM); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // SAFETY: kill(2) on the pid we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.stop();
    }
}
