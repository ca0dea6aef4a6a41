//! A bunk-like backup setup shared by the backup and recovery tests: the example
//! configuration with its repositories pointed at test URLs, a `testapp` policy with
//! files and a live SQLite database, and the peer tools (restic, borg) with the
//! repositories' passwords.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::services::{Postgres, Sshd};
use super::{assert_ok, stdout, Fixture};

/// A bunk fixture whose repositories point at test URLs, with a `testapp` policy.
pub struct Setup {
    pub fx: Fixture,
    pub root: PathBuf,
}

impl Setup {
    /// The bunk example with both repositories in directories of `dir` (`restic`,
    /// `borg`); returns the setup and the two URLs.
    pub fn local(dir: &Path) -> (Setup, String, String) {
        let restic_url = dir.join("restic").display().to_string();
        let borg_url = dir.join("borg").display().to_string();
        let s = Setup::new(&restic_url, &borg_url, false);
        (s, restic_url, borg_url)
    }

    pub fn new(restic_url: &str, borg_url: &str, borg_over_ssh: bool) -> Setup {
        let fx = Fixture::bunk();
        let cfg = fx.dir().join("agex.toml");
        fx.retarget_repositories(restic_url, borg_url, borg_over_ssh);
        let mut text = fs::read_to_string(&cfg).unwrap();
        text.push_str("\n[backup]\nlock_wait = 5\nmetrics_dir = \"/var/lib/node-exporter\"\n");
        fs::write(&cfg, text).unwrap();
        let root = fx.root();
        Setup { fx, root }
    }

    pub fn policy(&self, name: &str, text: &str) {
        fs::write(
            self.fx.dir().join("policies").join(format!("{name}.toml")),
            text,
        )
        .unwrap();
    }

    pub fn agex(&self, args: &[&str]) -> Output {
        let root = self.root.to_str().unwrap().to_string();
        let mut all = vec!["--root", &root];
        all.extend_from_slice(args);
        self.fx.run_admin(&all)
    }

    /// The command [`Setup::agex`] runs (admin identity, this root), not yet started: for
    /// tests that start it in the background, signal it or feed it.
    pub fn agex_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.fx.agex();
        cmd.arg("-i")
            .arg(self.fx.key("admin.txt"))
            .arg("--root")
            .arg(&self.root)
            .args(args);
        cmd
    }

    /// [`Setup::agex`] with stdout and stderr on a pseudo-terminal (`script`), as a user
    /// at a shell sees it; the output is what the terminal showed.
    pub fn agex_on_tty(&self, args: &[&str]) -> Output {
        let key = self.fx.key("admin.txt");
        let base = self.fx.agex();
        let quote =
            |a: &std::ffi::OsStr| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''"));
        let mut line = quote(base.get_program());
        for a in [
            "-i".as_ref(),
            key.as_os_str(),
            "--root".as_ref(),
            self.root.as_os_str(),
        ]
        .into_iter()
        .chain(args.iter().map(|a| a.as_ref()))
        {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &line, "/dev/null"]);
        if let Some(d) = base.get_current_dir() {
            cmd.current_dir(d);
        }
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null()).output().expect("script")
    }

    /// `agex repo init` of both repositories.
    pub fn init_repos(&self) {
        assert_ok(&self.agex(&["repo", "init", "offsite-restic"]));
        assert_ok(&self.agex(&["repo", "init", "offsite-borg"]));
    }

    pub fn host(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// A secret's plaintext in a 0600 file of the test's temp dir (for the peer tools).
    pub fn secret_file(&self, name: &str) -> PathBuf {
        let path = self.fx.tmp.path().join(format!("{name}.plain"));
        fs::write(&path, self.fx.decrypt(name)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    pub fn restic(&self, url: &str) -> Command {
        let mut c = Command::new("restic");
        c.arg("-r")
            .arg(url)
            .arg("--no-cache")
            .env("RESTIC_PASSWORD_FILE", self.secret_file("restic-password"))
            .env_remove("RESTIC_PASSWORD")
            .stdin(Stdio::null());
        c
    }

    /// `restic restore latest` of the repository at `url` into `target`, with the real
    /// restic binary; returns `target`.
    pub fn restic_restore_latest(&self, url: &str, target: PathBuf) -> PathBuf {
        run(
            self.restic(url)
                .args(["restore", "latest", "--target"])
                .arg(&target),
            "restic restore",
        );
        target
    }

    pub fn borg(&self, rsh: Option<String>) -> Command {
        let mut c = Command::new("borg");
        let pass = self.secret_file("borg-passphrase");
        c.env("BORG_PASSCOMMAND", format!("cat {}", pass.display()))
            .env_remove("BORG_PASSPHRASE")
            .env("BORG_BASE_DIR", self.fx.tmp.path().join("peer-borg"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .stdin(Stdio::null());
        if let Some(rsh) = rsh {
            c.env("BORG_RSH", rsh);
        }
        c
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.agex(&["--json", "status"]);
        assert_ok(&out);
        serde_json::from_str(&stdout(&out)).unwrap()
    }
}

pub fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// The application data of `testapp`: files, a cache to exclude, a live SQLite file.
pub fn app_data(s: &Setup, big: usize) {
    let files = s.host("/srv/app/files");
    fs::create_dir_all(files.join("sub/deeper")).unwrap();
    fs::create_dir_all(files.join("cache")).unwrap();
    fs::write(files.join("a.txt"), "hello agex\n").unwrap();
    fs::write(files.join("sub/deeper/b.bin"), pseudo_random(256 * 1024, 7)).unwrap();
    fs::write(files.join("cache/skip.tmp"), "excluded\n").unwrap();
    if big > 0 {
        fs::write(files.join("big.bin"), pseudo_random(big, 11)).unwrap();
    }
    let db = s.host("/srv/app/app.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(
            "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, v TEXT);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 300)
             INSERT INTO items(v) SELECT hex(randomblob(16)) FROM c;",
        )
        .output()
        .unwrap();
    assert_ok(&out);
}

/// Adds a table of `rows` random 4 KiB blobs to the app's SQLite database: its dump is
/// about `rows` × 4 KiB that no compression shrinks.
pub fn blob_rows(s: &Setup, rows: usize) {
    run(
        Command::new("sqlite3")
            .arg(s.host("/srv/app/app.db"))
            .arg(format!(
                "CREATE TABLE blobs(b BLOB); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL \
             SELECT x+1 FROM c WHERE x < {rows}) INSERT INTO blobs SELECT randomblob(4096) FROM c;"
            )),
        "sqlite3",
    );
}

/// The manifest a restored snapshot of `service` holds.
pub fn restored_manifest(restored: &Path, service: &str) -> serde_json::Value {
    let path = restored.join(format!("var/lib/agex/dumps/{service}/manifest.json"));
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))).unwrap()
}

/// The manifest's entry for the dump of `kind` (`sqlite`, `postgres`).
pub fn dump_entry(manifest: &serde_json::Value, kind: &str) -> serde_json::Value {
    manifest["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} dump in {manifest}"))
        .clone()
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub const SQLITE_POLICY: &str = r#"
paths   = ["/srv/app/files"]
exclude = ["/srv/app/files/cache"]
schedule = "*-*-* 03:00:00"

[[databases]]
kind = "sqlite"
path = "/srv/app/app.db"
"#;

/// `PRAGMA integrity_check` and the row count of `items` of an SQLite file.
pub fn sqlite_count(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check; SELECT count(*) FROM items;")
        .output()
        .unwrap();
    assert_ok(&out);
    stdout(&out)
}

impl Setup {
    /// Lets the borg user of `sshd` log in with the key from the `borg-ssh-key` secret;
    /// returns that key's plaintext file (for the peer borg's BORG_RSH).
    pub fn authorize_borg_key(&self, sshd: &Sshd) -> PathBuf {
        let key = self.secret_file("borg-ssh-key");
        let pubkey = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert_ok(&pubkey);
        sshd.authorize(&stdout(&pubkey));
        self.pin_host_key("offsite-borg", sshd);
        key
    }

    /// Pins `sshd`'s host key in repository `repo`'s `known_hosts` (agex checks host
    /// keys strictly).
    pub fn pin_host_key(&self, repo: &str, sshd: &Sshd) {
        let cfg = self.fx.dir().join("agex.toml");
        let text = fs::read_to_string(&cfg).unwrap();
        let header = format!("[repositories.{repo}]\n");
        let at = text
            .find(&header)
            .unwrap_or_else(|| panic!("no {header} in agex.toml"));
        let line = format!("known_hosts = [\"{}\"]\n", sshd.known_hosts_line());
        let section = &text[at + header.len()..];
        let section = &section[..section.find("\n[").unwrap_or(section.len())];
        if section.contains(&line) {
            return;
        }
        let mut out = text.clone();
        out.insert_str(at + header.len(), &line);
        fs::write(&cfg, out).unwrap();
    }

    /// Points the policy socket `/run/postgresql` under the root at the test cluster.
    pub fn link_postgres(&self, pg: &Postgres) {
        fs::create_dir_all(self.host("/run")).unwrap();
        let link = self.host("/run/postgresql");
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(pg.socket_dir(), link).unwrap();
        }
    }
}

/// [`SQLITE_POLICY`] plus the test cluster's database `app`, reached over the socket
/// [`Setup::link_postgres`] links.
pub fn sqlite_and_postgres_policy(pg: &Postgres) -> String {
    format!(
        "{SQLITE_POLICY}\n[[databases]]\nkind = \"postgres\"\ndatabase = \"app\"\n\
         socket = \"/run/postgresql\"\nport = {}\nuser = \"postgres\"\n",
        pg.port()
    )
}

/// Owners and groups the bunk example's rules name.
pub const BUNK_USERS: &[&str] = &[
    "actual",
    "authelia-main",
    "caddy",
    "forgejo",
    "grafana",
    "hass",
    "immich",
    "jellyfin",
    "mealie",
    "miniflux",
    "n8n",
    "paperless",
    "vaultwarden",
    "vikunja",
    "systemd-network",
];

/// `<root>/etc/passwd` and `group` naming the bunk example's users (for activation).
pub fn bunk_user_db(root: &Path) {
    let etc = root.join("etc");
    fs::create_dir_all(&etc).unwrap();
    let mut passwd = "root:x:0:0:root:/root:/bin/sh\n".to_string();
    let mut group = "root:x:0:\n".to_string();
    for (i, u) in BUNK_USERS.iter().enumerate() {
        let id = 1001 + i as u32;
        passwd.push_str(&format!(
            "{u}:x:{id}:{id}::/nonexistent:/usr/sbin/nologin\n"
        ));
        group.push_str(&format!("{u}:x:{id}:\n"));
    }
    group.push_str("smtp-users:x:2000:\n");
    fs::write(etc.join("passwd"), passwd).unwrap();
    fs::write(etc.join("group"), group).unwrap();
}

/// Unmounts `<root>/run/agex.d` when dropped (activation as root mounts a ramfs there).
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.0.join("run/agex.d"))
            .stderr(Stdio::null())
            .status();
    }
}

/// A `systemctl` stand-in that records its arguments in `dir/systemctl-calls`.
pub fn recording_systemctl(dir: &Path) -> (PathBuf, PathBuf) {
    let calls = dir.join("systemctl-calls");
    let script = dir.join("systemctl");
    fs::write(
        &script,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, calls)
}

/// A `systemctl` stand-in that records its arguments in `dir/systemctl-calls` and, when
/// asked to `stop`, sends `signal` (e.g. `TERM`) to the agex that called it: agex is
/// interrupted exactly while the units are stopped.
pub fn signalling_systemctl(dir: &Path, signal: &str) -> (PathBuf, PathBuf) {
    let calls = dir.join("systemctl-calls");
    let script = dir.join("systemctl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh
echo \"$*\" >> '{}'
\
             if [ \"$1\" = stop ]; then kill -{signal} $PPID; sleep 0.5; fi
",
            calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, calls)
}

/// A `systemctl` stand-in in `dir` that appends each call's arguments to the returned
/// log, one line per call, and fails `start` while `<dir>/fail_start` exists.
pub fn fake_systemctl(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("systemctl.log");
    let script = dir.join("systemctl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{log}'\n\
             if [ \"$1\" = start ] && [ -e '{dir}/fail_start' ]; then echo 'unit failed' >&2; exit 1; fi\n",
            log = log.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}
