//! The backup engine end to end: the real `agex` binary writes to a Restic repository
//! (local, or `rclone serve restic` on 127.0.0.1) and a Borg repository (local, or over
//! ssh to a test sshd), and the real `restic` and `borg` binaries check and restore what
//! it wrote.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::services::{Postgres, RcloneRestic, Sshd};
use common::setup::{
    app_data, blob_rows, dump_entry, fake_systemctl, pseudo_random, restored_manifest, run,
    sqlite_and_postgres_policy, sqlite_count, Setup, SQLITE_POLICY,
};
use common::{assert_fails, assert_ok, have_tool, stderr, stdout, wrapped};

/// `YYYY-MM-DDTHH:MM:SS…`: digits where RFC 3339 has them.
fn chrono_like(t: &str) -> bool {
    t.bytes().enumerate().take(19).all(|(i, b)| match i {
        4 | 7 => b == b'-',
        10 => b == b'T',
        13 | 16 => b == b':',
        _ => b.is_ascii_digit(),
    })
}

/// Every regular file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    common::snapshot(dir)
}

/// `sha256:<hex>` of some bytes, by `sha256sum`.
fn sha256_of(bytes: &[u8]) -> String {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), bytes).unwrap();
    let out = Command::new("sha256sum").arg(tmp.path()).output().unwrap();
    assert_ok(&out);
    format!("sha256:{}", stdout(&out).split_whitespace().next().unwrap())
}

/// Terminal output without its escape sequences (`ESC [ … letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Checks a restored tree against the live data and the manifest stored with it.
fn verify_restored(s: &Setup, restored: &Path) {
    let live = tree(&s.host("/srv/app/files"));
    let got = tree(&restored.join("srv/app/files"));
    let expected: std::collections::BTreeMap<_, _> = live
        .into_iter()
        .filter(|(p, _)| !p.starts_with("cache"))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    assert!(got == expected, "restored files differ from the originals");
    assert!(
        !restored.join("srv/app/app.db").exists(),
        "the live SQLite file must be left to its dump"
    );
    let dump = restored.join("var/lib/agex/dumps/testapp/db/app.sqlite3");
    let counted = sqlite_count(&dump);
    assert_eq!(counted, sqlite_count(&s.host("/srv/app/app.db")));
    assert!(counted.starts_with("ok\n"), "{counted}");
    let manifest = restored_manifest(restored, "testapp");
    assert_eq!(manifest["service"], "testapp");
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), expected.len(), "{manifest}");
    for f in files {
        let path = f["path"].as_str().unwrap();
        let bytes = fs::read(restored.join(path.trim_start_matches('/'))).unwrap();
        assert_eq!(f["size"], bytes.len(), "{path}");
        assert_eq!(f["digest"], sha256_of(&bytes), "manifest digest of {path}");
    }
    let sqlite = dump_entry(&manifest, "sqlite");
    assert_eq!(sqlite["size"], fs::metadata(&dump).unwrap().len());
    assert_eq!(sqlite["row_counts"]["items"], 300);
}

/// The test app (`testapp`: files and an SQLite database, `big` bytes in its large file)
/// with both repositories local and initialized; None when a tool the test needs is
/// missing (`have_tool` says which).
fn sqlite_app(test: &str, big: usize) -> Option<(tempfile::TempDir, Setup, String, String)> {
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = Setup::local(tmp.path());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, big);
    s.init_repos();
    Some((tmp, s, restic_url, borg_url))
}

#[test]
fn local_restic_and_borg_round_trip_with_the_peer_binaries() {
    let Some((tmp, s, restic_url, borg_url)) =
        sqlite_app("local_restic_and_borg_round_trip_with_the_peer_binaries", 0)
    else {
        return;
    };
    // On a terminal, each repository draws a progress bar that ends done.
    let out = s.agex_on_tty(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let shown = strip_ansi(&stdout(&out));
    for repo in ["offsite-restic", "offsite-borg"] {
        let full = format!("testapp → {repo} [{}]", "=".repeat(30));
        assert!(shown.contains(&full), "no finished bar for {repo}: {shown}");
    }
    assert!(shown.matches("files, done").count() >= 2, "{shown}");

    run(
        s.restic(&restic_url).args(["check", "--read-data"]),
        "restic check",
    );
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored-restic"));
    verify_restored(&s, &r);
    let snaps: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.restic(&restic_url).args(["snapshots", "--json"]),
        "restic snapshots",
    )))
    .unwrap();
    let tags = snaps[0]["tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t == "service=testapp"), "{snaps}");
    assert!(tags.iter().any(|t| t.as_str().unwrap().starts_with("run=")));

    run(s.borg(None).arg("check").arg(&borg_url), "borg check");
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(None).args(["list", "--json"]).arg(&borg_url),
        "borg list",
    )))
    .unwrap();
    let name = list["archives"][0]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("testapp-"), "{list}");
    let b = tmp.path().join("restored-borg");
    fs::create_dir_all(&b).unwrap();
    run(
        s.borg(None)
            .current_dir(&b)
            .arg("extract")
            .arg(format!("{borg_url}::{name}")),
        "borg extract",
    );
    verify_restored(&s, &b);

    // The same dump went to both: identical bytes.
    assert_eq!(
        fs::read(r.join("var/lib/agex/dumps/testapp/db/app.sqlite3")).unwrap(),
        fs::read(b.join("var/lib/agex/dumps/testapp/db/app.sqlite3")).unwrap()
    );
    // No named pipe or dump copy left under the root.
    assert!(fs::read_dir(s.host("/var/lib/agex/dumps/testapp/db"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));

    let status = s.status();
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{status}");
    assert!(rows.iter().all(|r| r["result"] == "ok"), "{status}");
    let prom = fs::read_to_string(s.host("/var/lib/node-exporter/agex_backup.prom")).unwrap();
    assert!(prom.contains(
        "agex_backup_last_success_timestamp_seconds{service=\"testapp\",repo=\"offsite-borg\"}"
    ));
    assert!(prom.contains("agex_backup_result{service=\"testapp\",repo=\"offsite-restic\"} 1"));

    // A file rewritten with the same size gets its new digest (the digest cache keys on
    // mtime, ctime and inode too); an untouched one keeps its.
    let a = s.host("/srv/app/files/a.txt");
    fs::write(&a, "HELLO AGEX\n").unwrap();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let r2 = s.restic_restore_latest(&restic_url, tmp.path().join("restored-restic-2"));
    verify_restored(&s, &r2);

    let out = s.agex(&["--json", "snapshots", "--service", "testapp"]);
    assert_ok(&out);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    // Both engines' snapshots of a run show that run's time, in one format (UTC).
    let rows = listed.as_array().unwrap();
    for r in rows {
        let t = r["time"].as_str().unwrap();
        assert!(
            t.len() == 20 && t.ends_with('Z') && chrono_like(t),
            "time {t:?} is not RFC 3339 UTC"
        );
        assert_eq!(r["service"], "testapp");
    }
    let times = |repo: &str| {
        rows.iter()
            .filter(|r| r["repo"] == repo)
            .map(|r| r["time"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(times("offsite-restic"), times("offsite-borg"), "{listed}");

    // Two services in one run share each repository (the second opens it with the
    // master key the first derived).
    for e in fs::read_dir(s.fx.dir().join("policies")).unwrap().flatten() {
        if e.file_name() != "testapp.toml" {
            fs::remove_file(e.path()).unwrap();
        }
    }
    s.policy("second", "paths = [\"/srv/app/files/sub\"]\n");
    assert_ok(&s.agex(&["backup"]));
    let snaps: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.restic(&restic_url)
            .args(["snapshots", "--json", "--tag", "service=second"]),
        "restic snapshots",
    )))
    .unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_ok(&s.agex(&["repo", "check"]));
}

#[test]
fn a_symlinked_metrics_or_dumps_directory_redirects_nothing() {
    let Some((_tmp, s, _, _)) = sqlite_app(
        "a_symlinked_metrics_or_dumps_directory_redirects_nothing",
        0,
    ) else {
        return;
    };
    let outside = tempfile::tempdir().unwrap();
    let empty = |what: &str| {
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "{what}: root wrote through the symlink"
        );
    };

    // The metrics directory (metrics_dir = /var/lib/node-exporter) is a symlink its
    // owner put there: the backup is made, the metrics are not, and say why.
    fs::create_dir_all(s.host("/var/lib")).unwrap();
    std::os::unix::fs::symlink(outside.path(), s.host("/var/lib/node-exporter")).unwrap();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics not written") && err.contains("symlink"),
        "{err}"
    );
    empty("metrics_dir");
    fs::remove_file(s.host("/var/lib/node-exporter")).unwrap();

    // The service's dumps directory is a symlink: borg's named pipes are not made
    // through it (borg fails, exit 3), the in-process Restic side is unaffected.
    let dumps = s.host("/var/lib/agex/dumps/testapp");
    let _ = fs::remove_dir_all(&dumps);
    std::os::unix::fs::symlink(outside.path(), &dumps).unwrap();
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(
        err.contains("symlink") && err.contains("dumps/testapp"),
        "{err}"
    );
    empty("dumps directory");
    let status = s.status();
    let restic = status
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == "offsite-restic")
        .unwrap();
    assert_eq!(restic["result"], "ok", "{status}");
}

#[test]
fn rest_server_restic_while_the_database_is_being_written() {
    let test = "rest_server_restic_while_the_database_is_being_written";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(srv) = RcloneRestic::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = srv.url("agex");
    let borg_url = tmp.path().join("borg").display().to_string();
    let s = Setup::new(&restic_url, &borg_url, false);
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 4 << 20);
    s.init_repos();

    // A writer commits rows the whole time the backup runs.
    let db = s.host("/srv/app/app.db");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = Command::new("sqlite3")
                    .arg(&db)
                    .arg("PRAGMA busy_timeout=5000; INSERT INTO items(v) VALUES (hex(randomblob(64)));")
                    .output();
                n += 1;
            }
            n
        })
    };
    let out = s.agex(&["backup", "--service", "testapp"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert_ok(&out);
    assert!(writes > 0);

    run(
        s.restic(&restic_url).args(["check", "--read-data"]),
        "restic check",
    );
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored"));
    let dump = r.join("var/lib/agex/dumps/testapp/db/app.sqlite3");
    let check = sqlite_count(&dump);
    assert!(check.starts_with("ok\n"), "dump is not consistent: {check}");
    let rows: u64 = check.lines().nth(1).unwrap().parse().unwrap();
    assert!(rows >= 300, "{rows}");
    assert_eq!(
        tree(&r.join("srv/app/files"))
            .get(Path::new("big.bin"))
            .map(Vec::len),
        Some(4 << 20)
    );
}

#[test]
fn borg_over_ssh_and_postgres_round_trip_and_sshd_down_is_partial() {
    let test = "borg_over_ssh_and_postgres_round_trip_and_sshd_down_is_partial";
    if !have_tool("restic", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(mut sshd) = Sshd::start(test) else {
        return;
    };
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); \
         INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 1234) g; \
         CREATE TABLE tags (id serial PRIMARY KEY, name text); \
         INSERT INTO tags(name) VALUES ('a'), ('b');",
    );
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = tmp.path().join("restic").display().to_string();
    let borg_url = sshd.url("borg");
    let s = Setup::new(&restic_url, &borg_url, true);
    // The borg user accepts the key that lives in the age secret.
    let key = s.authorize_borg_key(&sshd);
    // The policy's socket path, under the root, leads to the test cluster.
    s.link_postgres(&pg);
    s.policy("testapp", &sqlite_and_postgres_policy(&pg));
    app_data(&s, 0);
    s.init_repos();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);

    let rsh = sshd.borg_rsh(&key);
    run(
        s.borg(Some(rsh.clone())).arg("check").arg(&borg_url),
        "borg check",
    );
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(Some(rsh.clone()))
            .args(["list", "--json"])
            .arg(&borg_url),
        "borg list",
    )))
    .unwrap();
    let name = list["archives"][0]["name"].as_str().unwrap().to_string();
    let b = tmp.path().join("restored-borg");
    fs::create_dir_all(&b).unwrap();
    run(
        s.borg(Some(rsh.clone()))
            .current_dir(&b)
            .arg("extract")
            .arg(format!("{borg_url}::{name}")),
        "borg extract",
    );
    verify_restored(&s, &b);
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored-restic"));
    verify_restored(&s, &r);
    let pg_dump_path = "var/lib/agex/dumps/testapp/db/app.pgdump";
    assert_eq!(
        fs::read(r.join(pg_dump_path)).unwrap(),
        fs::read(b.join(pg_dump_path)).unwrap(),
        "both repositories hold the same dump"
    );
    // The dump restores into a new database with the same rows.
    pg.create_db("restored");
    let dump = pg.scratch_dir().join("app.pgdump");
    fs::copy(r.join(pg_dump_path), &dump).unwrap();
    fs::set_permissions(&dump, fs::Permissions::from_mode(0o644)).unwrap();
    run(
        pg.command("pg_restore")
            .args(["--no-owner", "-d", "restored"])
            .arg(&dump),
        "pg_restore",
    );
    let pg_entry = dump_entry(&restored_manifest(&r, "testapp"), "postgres");
    for (table, rows) in [("notes", 1234), ("tags", 2)] {
        assert_eq!(
            pg.psql("restored", &format!("SELECT count(*) FROM {table}"))
                .trim(),
            rows.to_string()
        );
        assert_eq!(pg_entry["row_counts"][format!("public.{table}")], rows);
    }

    // sshd goes away: the Restic side still completes; exit 3 names the failure.
    sshd.stop();
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(err.contains("offsite-borg: FAILED"), "{err}");
    assert!(err.contains("offsite-restic: ok"), "{err}");
    let status = s.status();
    let borg_row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == "offsite-borg")
        .unwrap()
        .clone();
    assert_eq!(borg_row["result"], "failed", "{status}");
    assert!(borg_row["last_success"].is_string(), "{status}");
    let snaps: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.restic(&restic_url).args(["snapshots", "--json"]),
        "restic snapshots",
    )))
    .unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 2);
}

#[test]
fn a_failed_dump_keeps_no_snapshot_and_a_wrong_password_fails_only_its_repository() {
    let test = "a_failed_dump_keeps_no_snapshot_and_a_wrong_password_fails_only_its_repository";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("pg_dump", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = Setup::local(tmp.path());
    // pg_dump cannot connect: there is no server behind this socket directory.
    fs::create_dir_all(s.host("/run/nothing")).unwrap();
    s.policy(
        "testapp",
        &format!(
            "{SQLITE_POLICY}\n[[databases]]\nkind = \"postgres\"\ndatabase = \"nope\"\n\
             socket = \"/run/nothing\"\nuser = \"postgres\"\n"
        ),
    );
    app_data(&s, 2 << 20);
    s.init_repos();
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 1);
    assert!(
        err.contains("dump of nope.pgdump failed") && err.contains("nothing/.s.PGSQL"),
        "{err}"
    );
    let snaps = stdout(&run(
        s.restic(&restic_url).args(["snapshots", "--json"]),
        "restic snapshots",
    ));
    assert_eq!(snaps.trim(), "[]", "a snapshot without its dump was kept");
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(None).args(["list", "--json"]).arg(&borg_url),
        "borg list",
    )))
    .unwrap();
    assert_eq!(list["archives"].as_array().unwrap().len(), 0, "{list}");

    // Now a good policy, but the restic password secret no longer opens its repository.
    s.policy("testapp", SQLITE_POLICY);
    let mut enc = s.fx.agex();
    enc.args([
        "-i",
        s.fx.key("admin.txt").to_str().unwrap(),
        "encrypt",
        "secrets/restic-password.age",
    ])
    .stdin(Stdio::piped());
    let mut child = enc.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"not the password\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(err.contains("offsite-restic: FAILED"), "{err}");
    assert!(err.contains("offsite-borg: ok"), "{err}");
}

#[test]
fn a_dump_that_breaks_off_mid_stream_keeps_no_snapshot_in_either_repository() {
    let test = "a_dump_that_breaks_off_mid_stream_keeps_no_snapshot_in_either_repository";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    pg.create_db("app");
    // ~85 MB of rows: the repositories are slower than pg_dump, so its COPY is still
    // running (held back by them) when the test cuts its connection.
    pg.psql(
        "app",
        "CREATE TABLE blobs (id int PRIMARY KEY, body text); \
         INSERT INTO blobs SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 300000) g;",
    );
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = Setup::local(tmp.path());
    s.link_postgres(&pg);
    s.policy("testapp", &sqlite_and_postgres_policy(&pg));
    app_data(&s, 1 << 20);
    s.init_repos();

    let child = s
        .agex_command(&["backup", "--service", "testapp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // pg_dump is mid-COPY: its server process is terminated, as a crash or an
    // administrator's pg_terminate_backend would.
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        let pids = pg.psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_dump' \
             AND query LIKE 'COPY %'",
        );
        if let Some(pid) = pids.split_whitespace().next() {
            pg.psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(killed, "pg_dump's COPY was never seen running");
    let err = assert_fails(&out, 1);
    assert!(err.contains("dump of app.pgdump failed"), "{err}");
    assert!(err.contains("no snapshot was written"), "{err}");
    let snaps = stdout(&run(
        s.restic(&restic_url).args(["snapshots", "--json"]),
        "restic snapshots",
    ));
    assert_eq!(snaps.trim(), "[]", "a snapshot with a torn dump was kept");
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(None).args(["list", "--json"]).arg(&borg_url),
        "borg list",
    )))
    .unwrap();
    assert_eq!(list["archives"].as_array().unwrap().len(), 0, "{list}");
    run(s.restic(&restic_url).arg("check"), "restic check");
    run(s.borg(None).arg("check").arg(&borg_url), "borg check");

    // Left alone, the same dump streams whole into both, at its full size.
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored"));
    let entry = dump_entry(&restored_manifest(&r, "testapp"), "postgres");
    let dump = fs::read(r.join("var/lib/agex/dumps/testapp/db/app.pgdump")).unwrap();
    assert!(dump.len() > 60 << 20, "dump of {} bytes", dump.len());
    assert_eq!(entry["size"], dump.len(), "{entry}");
    assert_eq!(entry["digest"], sha256_of(&dump));
    assert_eq!(entry["row_counts"]["public.blobs"], 300000);
}

#[test]
fn a_repository_that_hangs_is_left_behind_and_the_other_completes() {
    let test = "a_repository_that_hangs_is_left_behind_and_the_other_completes";
    if !have_tool("restic", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(sshd) = Sshd::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = tmp.path().join("restic").display().to_string();
    let borg_url = sshd.url("borg");
    let s = Setup::new(&restic_url, &borg_url, true);
    s.authorize_borg_key(&sshd);
    s.fx.edit_config("lock_wait = 5", "lock_wait = 5\nstall_timeout = 3");
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    // A dump much larger than what the tee, the pipes and TCP can hold in between.
    blob_rows(&s, 12000);
    s.init_repos();

    let child = s
        .agex_command(&["backup", "--service", "testapp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once borg is connected, its server freezes (a hung link or host): borg stops
    // reading the dump, and the Restic side would wait for it for ever.
    let t = Instant::now();
    while sshd.signal_sessions(0) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "borg never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sshd.signal_sessions(libc::SIGSTOP);
    let out = child.wait_with_output().unwrap();
    sshd.signal_sessions(libc::SIGCONT);
    let err = assert_fails(&out, 3);
    assert!(err.contains("offsite-restic: ok"), "{err}");
    assert!(err.contains("offsite-borg: FAILED"), "{err}");
    assert!(err.contains("left behind"), "{err}");
    run(
        s.restic(&restic_url).args(["check", "--read-data"]),
        "restic check",
    );
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored"));
    assert_eq!(
        sqlite_count(&r.join("var/lib/agex/dumps/testapp/db/app.sqlite3")),
        sqlite_count(&s.host("/srv/app/app.db"))
    );
}

#[test]
fn retention_keeps_what_the_policy_says_in_both_repositories() {
    let test = "retention_keeps_what_the_policy_says_in_both_repositories";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = Setup::local(tmp.path());
    s.policy(
        "testapp",
        &format!("{SQLITE_POLICY}\n[retention]\nkeep_last = 2\n"),
    );
    app_data(&s, 0);
    s.init_repos();
    for i in 0..3 {
        fs::write(s.host(&format!("/srv/app/files/run{i}")), format!("{i}")).unwrap();
        let db = s.host("/srv/app/app.db");
        assert_ok(
            &Command::new("sqlite3")
                .arg(&db)
                .arg("INSERT INTO items(v) VALUES ('more');")
                .output()
                .unwrap(),
        );
        assert_ok(&s.agex(&["backup", "--service", "testapp"]));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = s.agex(&["--json", "snapshots", "--service", "testapp"]);
    assert_ok(&out);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    for repo in ["offsite-restic", "offsite-borg"] {
        let n = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["repo"] == repo)
            .count();
        assert_eq!(n, 2, "{repo}: {listed}");
    }
    run(s.restic(&restic_url).arg("check"), "restic check");
    run(s.borg(None).arg("check").arg(&borg_url), "borg check");
    // The latest snapshot holds the latest dump, never one reused from its parent.
    let r = s.restic_restore_latest(&restic_url, tmp.path().join("restored"));
    assert_eq!(
        sqlite_count(&r.join("var/lib/agex/dumps/testapp/db/app.sqlite3")),
        sqlite_count(&s.host("/srv/app/app.db"))
    );
    let out = s.agex(&["forget", "--dry-run"]);
    assert_ok(&out);
}

#[test]
fn kill_9_mid_backup_leaves_both_repositories_healthy() {
    let Some((_tmp, s, restic_url, borg_url)) = sqlite_app(
        "kill_9_mid_backup_leaves_both_repositories_healthy",
        24 << 20,
    ) else {
        return;
    };

    // Measure one full run, then kill runs at moments spread over that duration.
    let t = Instant::now();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let full = t.elapsed();
    let runs = 10;
    for i in 0..runs {
        // New content each time so every run has work to do.
        fs::write(
            s.host("/srv/app/files/big.bin"),
            pseudo_random(24 << 20, 100 + i),
        )
        .unwrap();
        let mut child = s
            .agex_command(&["backup", "--service", "testapp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = full.mul_f64((i as f64 + 0.5) / runs as f64);
        std::thread::sleep(at);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc_kill(child.id() as i32);
        }
        let _ = child.wait();
        // Children of the killed run (borg) finish or die on their own; wait for them so
        // the checks below see a quiet repository.
        wait_for_no_borg(&borg_url);
    }
    run(
        s.restic(&restic_url).arg("check"),
        "restic check after kills",
    );
    run(
        s.borg(None).arg("check").arg(&borg_url),
        "borg check after kills",
    );
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    run(s.restic(&restic_url).arg("check"), "restic check");
    run(s.borg(None).arg("check").arg(&borg_url), "borg check");
}

unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 9);
}

/// Waits (bounded) until no borg process works on `repo`.
fn wait_for_no_borg(repo: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let busy = fs::read_dir("/proc")
            .map(|d| {
                d.flatten().any(|e| {
                    fs::read(e.path().join("cmdline"))
                        .map(|c| {
                            let c = String::from_utf8_lossy(&c);
                            c.contains("borg") && c.contains(repo)
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stop_units_are_stopped_for_the_snapshot_and_started_on_every_path() {
    let test = "stop_units_are_stopped_for_the_snapshot_and_started_on_every_path";
    if !have_tool("restic", test) || !have_tool("borg", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = Setup::local(tmp.path());
    let (systemctl, log) = fake_systemctl(tmp.path());
    // The before hook proves the units are down while the snapshot is taken.
    let policy = format!(
        "stop_units = [\"app.service\", \"app-worker.service\"]\n\
         before = [\"tail -1 '{}' | grep -qx 'stop app.service app-worker.service'\"]\n\
         {SQLITE_POLICY}",
        log.display()
    );
    s.policy("testapp", &policy);
    app_data(&s, 0);
    s.init_repos();
    let sc = systemctl.to_str().unwrap();

    // Without a systemctl command the policy cannot stop its units: refuse to back up
    // a live service rather than take a torn copy.
    let err = assert_fails(&s.agex(&["backup", "--service", "testapp"]), 1);
    assert!(err.contains("no systemctl command"), "{err}");
    assert!(!log.exists(), "nothing was stopped");

    assert_ok(&s.agex(&["backup", "--service", "testapp", "--systemctl", sc]));
    let calls = fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls,
        "stop app.service app-worker.service\nstart app.service app-worker.service\n"
    );

    // A failed dump still starts the units again.
    fs::remove_file(&log).unwrap();
    fs::remove_file(s.host("/srv/app/app.db")).unwrap();
    let err = assert_fails(
        &s.agex(&["backup", "--service", "testapp", "--systemctl", sc]),
        1,
    );
    assert!(err.contains("app.db"), "{err}");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "stop app.service app-worker.service\nstart app.service app-worker.service\n"
    );

    // A unit that does not come back is a failure the operator sees.
    app_data(&s, 0);
    fs::write(tmp.path().join("fail_start"), "").unwrap();
    let err = assert_fails(
        &s.agex(&["backup", "--service", "testapp", "--systemctl", sc]),
        1,
    );
    assert!(
        err.contains("starting app.service, app-worker.service again failed"),
        "{err}"
    );
}

#[test]
fn a_borg_lock_left_by_another_machine_is_broken_after_stale_lock_age() {
    let test = "a_borg_lock_left_by_another_machine_is_broken_after_stale_lock_age";
    if !have_tool("restic", test) || !have_tool("borg", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, borg_url) = Setup::local(tmp.path());
    s.fx.edit_config("lock_wait = 5", "lock_wait = 1\nstale_lock_age = 2");
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    s.init_repos();

    // A borg on the host before its rebuild (another host id) held the lock and died:
    // borg cannot tell that holder is gone.
    let mut holder = s
        .borg(None)
        .env("BORG_HOST_ID", "old-bunk@123456789")
        .args(["with-lock", &borg_url, "sleep", "600"])
        .process_group(0)
        .spawn()
        .unwrap();
    let lock = borg_lock_taken(&borg_url);
    // The whole group: borg and its `sleep`.
    let group = format!("-{}", holder.id());
    run(Command::new("kill").args(["-KILL", "--", &group]), "kill");
    holder.wait().unwrap();
    assert!(lock.exists(), "the dead holder's lock stays");

    // First sighting: borg waits lock_wait, gives up; Restic is unaffected.
    let err = assert_fails(&s.agex(&["backup", "--service", "testapp"]), 3);
    assert!(err.contains("offsite-borg: FAILED"), "{err}");
    assert!(err.contains("locked by another process"), "{err}");
    assert!(err.contains("offsite-restic: ok"), "{err}");

    // Held past stale_lock_age: broken with a warning, and the archive is written.
    std::thread::sleep(Duration::from_millis(2500));
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broke a stale lock on `offsite-borg`"),
        "{err}"
    );
    run(s.borg(None).arg("check").arg(&borg_url), "borg check");
    let list = stdout(&run(
        s.borg(None).args(["list", "--short"]).arg(&borg_url),
        "borg list",
    ));
    assert_eq!(list.lines().count(), 1, "{list}");
}

/// A borg still holding the repository's lock for a moment (one that got SIGTERM when
/// the agex that started it was killed cleans up before it lets go) is waited for by the
/// next command's borg, not failed after borg's default of one second (kill harness,
/// issue 15 §4: the drill after a killed drill failed its `borg list` so).
#[test]
fn a_borg_lock_held_for_a_moment_is_waited_for_not_failed() {
    let Some((_tmp, s, _, borg_url)) =
        sqlite_app("a_borg_lock_held_for_a_moment_is_waited_for_not_failed", 0)
    else {
        return;
    };
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));

    // A live borg of this host holds the lock for 3 s: not stale, so borg must wait.
    let mut holder = s
        .borg(None)
        .args(["with-lock", &borg_url, "sleep", "3"])
        .spawn()
        .unwrap();
    borg_lock_taken(&borg_url);
    let t = Instant::now();
    let out = s.agex(&["snapshots", "--repo", "offsite-borg"]);
    let waited = t.elapsed();
    assert_ok(&out);
    assert!(stdout(&out).contains("testapp"), "{}", stdout(&out));
    assert!(
        waited > Duration::from_millis(1500),
        "`borg list` returned after {waited:?}, before the lock was let go"
    );
    assert!(holder.wait().unwrap().success());
}

/// The capabilities a generated unit grants: its template's `CapabilityBoundingSet=`
/// lines and its drop-in's, merged as systemd merges them, in setpriv's spelling.
fn unit_capabilities(units: &Path, template: &str, drop_in: &str) -> String {
    let mut caps: Vec<String> = Vec::new();
    for file in [units.join(template), units.join(drop_in)] {
        for line in fs::read_to_string(&file).unwrap().lines() {
            if let Some(list) = line.strip_prefix("CapabilityBoundingSet=") {
                caps.extend(
                    list.split_whitespace()
                        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
                );
            }
        }
    }
    assert!(!caps.is_empty(), "no CapabilityBoundingSet in {template}");
    format!("-all,{}", caps.join(","))
}

#[test]
fn the_units_capabilities_suffice_to_back_up_and_drill_postgres_over_its_socket() {
    let test = "the_units_capabilities_suffice_to_back_up_and_drill_postgres_over_its_socket";
    if !have_tool("restic", test)
        || !have_tool("borg", test)
        || !have_tool("sqlite3", test)
        || !have_tool("setpriv", test)
    {
        return;
    }
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); \
         INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 50) g;",
    );
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = Setup::local(tmp.path());
    s.link_postgres(&pg);
    s.policy("testapp", &sqlite_and_postgres_policy(&pg));
    app_data(&s, 0);
    s.init_repos();
    let units = tmp.path().join("units");
    assert_ok(&s.agex(&[
        "--host",
        "bunk",
        "systemd",
        "generate",
        "--out",
        units.to_str().unwrap(),
    ]));
    // As systemd would start them: root, but only the unit's capabilities (every child
    // inherits the bounding set: runuser, pg_dump, borg) and no new privileges.
    let as_unit = |caps: &str, args: &[&str]| {
        wrapped(
            "setpriv",
            &["--bounding-set", caps, "--no-new-privs", "--"],
            &s.agex_command(args),
        )
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
    };
    let backup = ["backup", "--service", "testapp"];
    // The template alone cannot become the postgres user (so the check below can fail).
    let template_only = unit_capabilities(&units, "agex-backup@.service", "agex-backup@.service");
    let out = as_unit(&template_only, &backup);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("dump of app.pgdump failed") && err.contains("cannot set groups"),
        "the failure names the database and the cause:\n{err}"
    );

    let caps = unit_capabilities(
        &units,
        "agex-backup@.service",
        "agex-backup@testapp.service.d/agex.conf",
    );
    assert_ok(&as_unit(&caps, &backup));
    let caps = unit_capabilities(
        &units,
        "agex-drill.service",
        "agex-drill.service.d/agex.conf",
    );
    let out = as_unit(&caps, &["--json", "drill", "--service", "testapp"]);
    assert_ok(&out);
    let rec: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    for r in rec["results"].as_array().unwrap() {
        assert_eq!(r["result"], "ok", "{rec}");
    }
}

/// Waits until a borg holds the lock of the repository at `borg_url`; the lock's path.
fn borg_lock_taken(borg_url: &str) -> PathBuf {
    let lock = Path::new(borg_url).join("lock.exclusive");
    let t = Instant::now();
    while !lock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "borg took no lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    lock
}
