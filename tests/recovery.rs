//! Recovery end to end: `agex restore` (into a directory and in place, SQLite and
//! PostgreSQL) and `agex drill` (passing, and failing on a corrupted repository or a
//! tampered snapshot), against real restic/borg repositories written by `agex backup`.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::services::{ssh_keygen, Postgres, Sshd};
use common::setup::{
    app_data, bunk_user_db, recording_systemctl, run, signalling_systemctl,
    sqlite_and_postgres_policy, sqlite_count, Setup, Unmount, SQLITE_POLICY,
};
use common::{
    assert_fails, assert_ok, have_tool, is_root, stderr, stdout, tree_changes, tree_state, wrapped,
    Fixture,
};

fn tools(test: &str) -> bool {
    have_tool("restic", test) && have_tool("borg", test) && have_tool("sqlite3", test)
}

/// A setup with local restic and borg repositories, `testapp` backed up once.
fn local(tmp: &Path, policy: &str) -> (Setup, String, String) {
    let restic_url = tmp.join("restic").display().to_string();
    let borg_url = tmp.join("borg").display().to_string();
    let s = Setup::new(&restic_url, &borg_url, false);
    s.policy("testapp", policy);
    app_data(&s, 1 << 20);
    // A symlink and an empty directory: the manifest lists neither, restores keep both.
    std::os::unix::fs::symlink("a.txt", s.host("/srv/app/files/link")).unwrap();
    fs::create_dir_all(s.host("/srv/app/files/empty")).unwrap();
    fs::set_permissions(
        s.host("/srv/app/files/empty"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    s.init_repos();
    // The units the policy stops are not real here: `true` stands in for systemctl.
    assert_ok(&s.agex(&["backup", "--service", "testapp", "--systemctl", "true"]));
    (s, restic_url, borg_url)
}

fn files_of(s: &Setup) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    common::snapshot(&s.host("/srv/app/files"))
        .into_iter()
        .filter(|(p, _)| !p.starts_with("cache"))
        .collect()
}

/// Damages the live data: a changed file, a removed file, extra rows.
fn damage(s: &Setup) {
    fs::write(s.host("/srv/app/files/a.txt"), "overwritten by mistake\n").unwrap();
    let _ = fs::remove_file(s.host("/srv/app/files/sub/deeper/b.bin"));
    let _ = fs::remove_file(s.host("/srv/app/files/link"));
    let _ = fs::remove_dir(s.host("/srv/app/files/empty"));
    assert_ok(
        &Command::new("sqlite3")
            .arg(s.host("/srv/app/app.db"))
            .arg("DELETE FROM items WHERE id > 10;")
            .output()
            .unwrap(),
    );
}

#[test]
fn restore_to_a_directory_and_in_place_from_either_repository() {
    let test = "restore_to_a_directory_and_in_place_from_either_repository";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let policy = format!("stop_units = [\"testapp.service\"]\n{SQLITE_POLICY}");
    let (s, _, _) = local(tmp.path(), &policy);
    let original = files_of(&s);
    let original_rows = sqlite_count(&s.host("/srv/app/app.db"));
    assert!(original_rows.ends_with("300\n"), "{original_rows}");

    // --to: files below DIR, dumps at their snapshot paths, verified.
    let to = tmp.path().join("out");
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("verified"), "{err}");
    let got: std::collections::BTreeMap<_, _> = common::snapshot(&to.join("srv/app/files"));
    assert_eq!(got, original);
    assert_eq!(
        sqlite_count(&to.join("var/lib/agex/dumps/testapp/db/app.sqlite3")),
        original_rows
    );
    // On a terminal, each restore draws a progress bar that ends full.
    for repo in ["offsite-restic", "offsite-borg"] {
        let dir = tmp.path().join(format!("tty-{repo}"));
        let out = s.agex_on_tty(&[
            "restore",
            "--service",
            "testapp",
            "--repo",
            repo,
            "--to",
            dir.to_str().unwrap(),
        ]);
        assert_ok(&out);
        let shown = stdout(&out);
        assert!(
            shown.contains(&format!("testapp → {repo}")) && shown.contains(&"=".repeat(30)),
            "no finished bar for {repo}: {shown}"
        );
        assert!(shown.contains("done"), "{shown}");
        assert_eq!(common::snapshot(&dir.join("srv/app/files")), original);
    }
    // A non-empty --to is refused.
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(assert_fails(&out, 2).contains("not empty"));

    damage(&s);
    // In place without --yes and without a terminal: exit 2, nothing changed.
    let before = tree_state(&s.root);
    let out = s.agex(&["restore", "--service", "testapp", "--in-place"]);
    let err = assert_fails(&out, 2);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(
        tree_changes(&before, &tree_state(&s.root)),
        Vec::<String>::new()
    );
    // Neither --to nor --in-place.
    assert_fails(&s.agex(&["restore", "--service", "testapp"]), 2);

    let (sysctl, calls) = recording_systemctl(tmp.path());
    for repo in ["offsite-borg", "offsite-restic"] {
        damage(&s);
        let out = s.agex(&[
            "restore",
            "--service",
            "testapp",
            "--repo",
            repo,
            "--in-place",
            "--yes",
            "--systemctl",
            sysctl.to_str().unwrap(),
        ]);
        assert_ok(&out);
        assert_eq!(files_of(&s), original, "{repo}");
        assert_eq!(sqlite_count(&s.host("/srv/app/app.db")), original_rows);
        assert_eq!(
            fs::read_link(s.host("/srv/app/files/link")).unwrap(),
            Path::new("a.txt"),
            "{repo}"
        );
        let empty = fs::metadata(s.host("/srv/app/files/empty")).unwrap();
        assert!(empty.is_dir(), "{repo}");
        assert_eq!(empty.permissions().mode() & 0o777, 0o750, "{repo}");
        // The excluded cache was left alone, and no staging directory is left.
        assert!(s.host("/srv/app/files/cache/skip.tmp").exists());
        let staging = s.host("/var/lib/agex/restore");
        assert_eq!(fs::read_dir(&staging).unwrap().count(), 0, "{repo}");
    }
    let recorded = fs::read_to_string(&calls).unwrap();
    assert_eq!(
        recorded,
        "stop testapp.service\nstart testapp.service\nstop testapp.service\nstart testapp.service\n"
    );

    // A snapshot asked for by id, from the repository that has it.
    let out = s.agex(&["--json", "snapshots", "--service", "testapp"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let borg = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == "offsite-borg")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let to2 = tmp.path().join("out2");
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--snapshot",
        &borg,
        "--to",
        to2.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("offsite-borg"));
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--snapshot",
        "deadbeef",
        "--to",
        tmp.path().join("out3").to_str().unwrap(),
    ]);
    assert!(assert_fails(&out, 1).contains("no snapshot"));
}

#[test]
fn in_place_restore_starts_units_again_when_it_fails() {
    let test = "in_place_restore_starts_units_again_when_it_fails";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let policy = format!("stop_units = [\"testapp.service\"]\n{SQLITE_POLICY}");
    let (s, _, _) = local(tmp.path(), &policy);
    // The database's directory is a file now: replacing the database must fail.
    fs::write(s.host("/srv/blocked"), "not a directory").unwrap();
    s.policy(
        "testapp",
        &policy.replace(
            "path = \"/srv/app/app.db\"",
            "path = \"/srv/blocked/app.db\"",
        ),
    );
    let (sysctl, calls) = recording_systemctl(tmp.path());
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--in-place",
        "--yes",
        "--systemctl",
        sysctl.to_str().unwrap(),
    ]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("/srv/blocked"), "{err}");
    assert_eq!(
        fs::read_to_string(&calls).unwrap(),
        "stop testapp.service\nstart testapp.service\n"
    );
}

/// What an in-place restore SIGKILLed before its renames left beside the files it was
/// replacing (temp files named `.agex-<pid>-….tmp`, partial copies the service would see)
/// is removed by the next in-place restore, which says so; a temp file of a process
/// that still runs is left alone (kill harness, issue 15 §4).
#[test]
fn in_place_restore_removes_the_temp_files_a_killed_restore_left() {
    let test = "in_place_restore_removes_the_temp_files_a_killed_restore_left";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = local(tmp.path(), SQLITE_POLICY);
    let before = files_of(&s);
    // No process has pid 2147483000 (far above any pid_max).
    let dead = [
        "/srv/app/files/sub/deeper/.agex-2147483000-Ab12cD.tmp",
        "/srv/app/files/.agex-2147483000-link-1f-9.tmp",
        "/srv/app/.agex-2147483000-xYz9Q1.tmp",
    ];
    for d in dead {
        fs::write(s.host(d), "a partial cop").unwrap();
    }
    let live = format!("/srv/app/files/.agex-{}-Keep01.tmp", std::process::id());
    fs::write(s.host(&live), "someone's write in progress").unwrap();
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--in-place",
        "--yes",
        "--systemctl",
        "true",
    ]);
    assert_ok(&out);
    for d in dead {
        assert!(!s.host(d).exists(), "{d} left");
    }
    assert!(
        s.host(&live).exists(),
        "a live process's temp file was removed"
    );
    assert!(
        stderr(&out).contains("left behind by a restore that did not finish"),
        "{}",
        stderr(&out)
    );
    fs::remove_file(s.host(&live)).unwrap();
    assert_eq!(files_of(&s), before);
}

/// Runs `agex <args> --systemctl S` where S sends SIGTERM, then SIGINT, to agex while
/// it stops the policy's units: each run exits 128 + signal, saying `<command> interrupted`,
/// and the units were started again.
fn signal_while_units_are_stopped(test: &str, args: &[&str]) {
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let policy = format!("stop_units = [\"testapp.service\"]\n{SQLITE_POLICY}");
    let (s, _, _) = local(tmp.path(), &policy);
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let dir = tmp.path().join(signal);
        fs::create_dir_all(&dir).unwrap();
        let (sysctl, calls) = signalling_systemctl(&dir, signal);
        let mut full = args.to_vec();
        full.extend(["--systemctl", sysctl.to_str().unwrap()]);
        let err = assert_fails(&s.agex(&full), code);
        assert!(
            err.contains(&format!("{} interrupted by signal", args[0])),
            "SIG{signal}: {err}"
        );
        assert_eq!(
            fs::read_to_string(&calls).unwrap(),
            "stop testapp.service\nstart testapp.service\n",
            "SIG{signal}: {err}"
        );
    }
}

#[test]
fn a_signal_while_an_in_place_restore_has_the_units_stopped_starts_them_again() {
    signal_while_units_are_stopped(
        "a_signal_while_an_in_place_restore_has_the_units_stopped_starts_them_again",
        &["restore", "--service", "testapp", "--in-place", "--yes"],
    );
}

#[test]
fn a_signal_while_a_backup_has_the_units_stopped_starts_them_again() {
    signal_while_units_are_stopped(
        "a_signal_while_a_backup_has_the_units_stopped_starts_them_again",
        &["backup", "--service", "testapp"],
    );
}

/// sshd with a borg repository, a PostgreSQL cluster with `app`, local restic.
struct PgSetup {
    s: Setup,
    pg: Postgres,
    _sshd: Sshd,
    restic_url: String,
    borg_url: String,
    rsh: String,
}

fn pg_setup(test: &str, tmp: &Path) -> Option<PgSetup> {
    if !tools(test) {
        return None;
    }
    let sshd = Sshd::start(test)?;
    let pg = Postgres::start(test)?;
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); \
         INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 1234) g; \
         CREATE TABLE tags (id serial PRIMARY KEY, name text); \
         INSERT INTO tags(name) VALUES ('a'), ('b');",
    );
    let restic_url = tmp.join("restic").display().to_string();
    let borg_url = sshd.url("borg");
    let s = Setup::new(&restic_url, &borg_url, true);
    let key = s.authorize_borg_key(&sshd);
    let rsh = sshd.borg_rsh(&key);
    s.link_postgres(&pg);
    s.policy("testapp", &sqlite_and_postgres_policy(&pg));
    app_data(&s, 0);
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    Some(PgSetup {
        s,
        pg,
        _sshd: sshd,
        restic_url,
        borg_url,
        rsh,
    })
}

fn count(pg: &Postgres, db: &str, table: &str) -> String {
    pg.psql(db, &format!("SELECT count(*) FROM {table}"))
        .trim()
        .to_string()
}

#[test]
fn in_place_restore_of_postgres_into_the_database_and_as_a_new_one() {
    let test = "in_place_restore_of_postgres_into_the_database_and_as_a_new_one";
    let tmp = tempfile::tempdir().unwrap();
    let Some(p) = pg_setup(test, tmp.path()) else {
        return;
    };
    p.pg.psql(
        "app",
        "DELETE FROM notes WHERE id > 100; DROP TABLE tags; CREATE TABLE junk (x int);",
    );
    for repo in ["offsite-borg", "offsite-restic"] {
        let out = p.s.agex(&[
            "restore",
            "--service",
            "testapp",
            "--repo",
            repo,
            "--in-place",
            "--yes",
        ]);
        assert_ok(&out);
        assert_eq!(count(&p.pg, "app", "notes"), "1234", "{repo}");
        assert_eq!(count(&p.pg, "app", "tags"), "2", "{repo}");
        p.pg.psql("app", "DELETE FROM notes WHERE id > 5");
    }
    let out = p.s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--in-place",
        "--yes",
        "--as",
        "app_copy",
    ]);
    assert_ok(&out);
    assert_eq!(count(&p.pg, "app_copy", "notes"), "1234");
    assert_eq!(
        count(&p.pg, "app", "notes"),
        "5",
        "--as left the database alone"
    );
    // --as a database that exists: pg refuses, exit 1, the database is untouched.
    let out = p.s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--in-place",
        "--yes",
        "--as",
        "app",
    ]);
    assert_fails(&out, 1);
    assert_eq!(count(&p.pg, "app", "notes"), "5");
}

#[test]
fn drill_passes_with_rpo_and_rto_in_status_and_metrics_and_fails_on_a_corrupt_pack() {
    let test = "drill_passes_with_rpo_and_rto_in_status_and_metrics_and_fails_on_a_corrupt_pack";
    let tmp = tempfile::tempdir().unwrap();
    let Some(p) = pg_setup(test, tmp.path()) else {
        return;
    };
    let s = &p.s;
    let out = s.agex(&["--json", "drill", "--service", "testapp"]);
    assert_ok(&out);
    let rec: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = rec["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{rec}");
    for r in results {
        assert_eq!(r["result"], "ok", "{rec}");
        assert!(r["rpo_seconds"].as_f64().unwrap() >= 0.0);
        assert!(r["rto_seconds"].as_f64().unwrap() > 0.0);
        assert!(r["bytes"].as_u64().unwrap() > 256 * 1024);
        assert_eq!(r["databases"], 2, "{rec}");
    }
    // The scratch database is gone, and so is the scratch directory.
    let dbs = p.pg.psql("postgres", "SELECT datname FROM pg_database");
    assert!(!dbs.contains("agex_drill"), "{dbs}");
    assert_eq!(
        fs::read_dir(s.host("/var/lib/agex/drill")).unwrap().count(),
        0
    );
    let status = s.status();
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{status}");
    assert!(
        rows.iter().all(|r| r["drill"]["result"] == "ok"),
        "{status}"
    );
    let prom = fs::read_to_string(s.host("/var/lib/node-exporter/agex_drill.prom")).unwrap();
    for metric in [
        "agex_drill_last_success_timestamp_seconds{service=\"testapp\",repo=\"offsite-restic\"}",
        "agex_drill_rto_seconds{service=\"testapp\",repo=\"offsite-borg\"}",
        "agex_drill_rpo_seconds{service=\"testapp\",repo=\"offsite-borg\"}",
    ] {
        assert!(prom.contains(metric), "{metric} missing:\n{prom}");
    }

    // Corrupt every data pack of the restic repository: the restic drill fails, the
    // borg one still passes, exit 3.
    let data = Path::new(&p.restic_url).join("data");
    let mut corrupted = 0;
    for e in walkdir(&data) {
        let mut bytes = fs::read(&e).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::set_permissions(&e, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&e, bytes).unwrap();
        corrupted += 1;
    }
    assert!(corrupted > 0);
    let out = s.agex(&["drill", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(!err.contains("panicked"), "{err}");
    let table = stdout(&out);
    assert!(
        table
            .lines()
            .any(|l| l.contains("offsite-restic") && l.contains("FAILED")),
        "{table}\n{err}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("offsite-borg") && l.contains(" ok ")),
        "{table}\n{err}"
    );
    let status = s.status();
    let restic_row = status
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == "offsite-restic")
        .unwrap()
        .clone();
    assert_eq!(restic_row["drill"]["result"], "failed", "{status}");
    assert!(restic_row["drill"]["last_success"].is_string(), "{status}");
    let prom = fs::read_to_string(s.host("/var/lib/node-exporter/agex_drill.prom")).unwrap();
    assert!(prom.contains("agex_drill_result{service=\"testapp\",repo=\"offsite-restic\"} 0"));
    // A restore from the damaged repository fails as an error of that repository, not as
    // a panic of agex.
    let to = tmp.path().join("from-damaged");
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--repo",
        "offsite-restic",
        "--to",
        to.to_str().unwrap(),
    ]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("offsite-restic"), "{err}");
    assert!(err.contains("the repository is damaged"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = (&p.borg_url, &p.rsh);
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Writes a newer borg archive of `testapp` made from an extracted copy of the latest
/// one after `tamper` changed it: what a silently damaged backup looks like.
fn tampered_archive(p: &PgSetup, work: &Path, n: u32, tamper: impl FnOnce(&Path)) {
    let s = &p.s;
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(Some(p.rsh.clone()))
            .args(["list", "--json"])
            .arg(&p.borg_url),
        "borg list",
    )))
    .unwrap();
    let archives = list["archives"].as_array().unwrap();
    let first = archives[0]["name"].as_str().unwrap().to_string();
    let dir = work.join(format!("tamper{n}"));
    fs::create_dir_all(&dir).unwrap();
    run(
        s.borg(Some(p.rsh.clone()))
            .current_dir(&dir)
            .arg("extract")
            .arg(format!("{}::{first}", p.borg_url)),
        "borg extract",
    );
    tamper(&dir);
    // A later run id than any real one.
    let name = format!("testapp-2099010{n}T000000.000Z");
    run(
        s.borg(Some(p.rsh.clone()))
            .current_dir(&dir)
            .arg("create")
            .arg(format!("{}::{name}", p.borg_url))
            .args(["srv", "var"]),
        "borg create",
    );
}

fn drill_borg(p: &PgSetup) -> (serde_json::Value, i32) {
    let out = p.s.agex(&[
        "--json",
        "drill",
        "--service",
        "testapp",
        "--repo",
        "offsite-borg",
    ]);
    let rec: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|_| {
        panic!(
            "no json: {}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (rec, out.status.code().unwrap_or(-1))
}

fn problems(rec: &serde_json::Value) -> String {
    rec["results"][0]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn drill_fails_when_a_file_differs_a_file_is_missing_or_a_row_count_differs() {
    let test = "drill_fails_when_a_file_differs_a_file_is_missing_or_a_row_count_differs";
    let tmp = tempfile::tempdir().unwrap();
    let Some(p) = pg_setup(test, tmp.path()) else {
        return;
    };
    let (rec, code) = drill_borg(&p);
    assert_eq!(code, 0, "{rec}");

    // A file's bytes changed (same size).
    tampered_archive(&p, tmp.path(), 1, |d| {
        let f = d.join("srv/app/files/sub/deeper/b.bin");
        let mut b = fs::read(&f).unwrap();
        b[1000] ^= 0x01;
        fs::write(&f, b).unwrap();
    });
    let (rec, code) = drill_borg(&p);
    assert_eq!(code, 1, "{rec}");
    let found = problems(&rec);
    assert!(
        found.contains("/srv/app/files/sub/deeper/b.bin differs"),
        "{found}"
    );

    // A file is missing.
    tampered_archive(&p, tmp.path(), 2, |d| {
        fs::remove_file(d.join("srv/app/files/a.txt")).unwrap();
    });
    let (rec, code) = drill_borg(&p);
    assert_eq!(code, 1, "{rec}");
    let found = problems(&rec);
    assert!(found.contains("/srv/app/files/a.txt is missing"), "{found}");

    // The manifest records other row counts than the dumps hold (SQLite and PostgreSQL).
    tampered_archive(&p, tmp.path(), 3, |d| {
        let m = d.join("var/lib/agex/dumps/testapp/manifest.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&m).unwrap()).unwrap();
        for dump in v["dumps"].as_array_mut().unwrap() {
            if dump["kind"] == "sqlite" {
                dump["row_counts"]["items"] = serde_json::json!(301);
            } else {
                dump["row_counts"] = serde_json::json!({"public.notes": 1235});
            }
        }
        fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    });
    let (rec, code) = drill_borg(&p);
    assert_eq!(code, 1, "{rec}");
    let found = problems(&rec);
    assert!(
        found.contains("table items has 300 rows; the manifest says 301"),
        "{found}"
    );
    assert!(
        found.contains("table public.notes has 1234 rows; the manifest says 1235"),
        "{found}"
    );
    let dbs = p.pg.psql("postgres", "SELECT datname FROM pg_database");
    assert!(!dbs.contains("agex_drill"), "{dbs}");
}

/// `agex --root R --host bunk activate` with a recording systemctl.
fn activate(fx: &Fixture, root: &Path) -> std::process::Output {
    let (sysctl, _) = recording_systemctl(fx.tmp.path());
    fx.agex()
        .arg("--root")
        .arg(root)
        .args(["--host", "bunk", "activate", "--systemctl"])
        .arg(&sysctl)
        .output()
        .unwrap()
}

fn install_host_key(root: &Path, private: &Path) {
    let key = root.join("etc/ssh/ssh_host_ed25519_key");
    fs::create_dir_all(key.parent().unwrap()).unwrap();
    fs::copy(private, &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn host_rekey_then_only_the_new_key_activates_and_check_is_clean() {
    let test = "host_rekey_then_only_the_new_key_activates_and_check_is_clean";
    if !is_root(test) || !have_tool("ssh-keygen", test) {
        return;
    }
    let fx = Fixture::bunk();
    let root = fx.root();
    let _unmount = Unmount(root.clone());
    bunk_user_db(&root);
    let new_private = fx.tmp.path().join("new_host_key");
    let new_public = ssh_keygen(&new_private);
    let before = fx.snapshot();

    // Bad input: an unusable key, or no key at all: exit 2, nothing changed.
    let out = fx.run_admin(&["host", "rekey", "bunk", "--key", "ssh-ed25519 AAAAnotakey"]);
    assert!(assert_fails(&out, 2).contains("host `bunk`"));
    assert_fails(&fx.run_admin(&["host", "rekey", "bunk"]), 2);
    let out = fx.run_admin(&["host", "rekey", "nosuchhost", "--key", &new_public]);
    assert!(assert_fails(&out, 2).contains("nosuchhost"));
    assert!(fx.snapshot() == before, "a refused rekey changed files");

    let pub_file = PathBuf::from(format!("{}.pub", new_private.display()));
    let out = fx.run_admin(&[
        "host",
        "rekey",
        "bunk",
        "--key-file",
        pub_file.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let after = fx.snapshot();
    // agex.toml: only the key line changed, comments and layout kept.
    let cfg = Path::new("agex.toml");
    let (old_cfg, new_cfg) = (
        String::from_utf8_lossy(&before[cfg]).into_owned(),
        String::from_utf8_lossy(&after[cfg]).into_owned(),
    );
    let changed: Vec<(&str, &str)> = old_cfg
        .lines()
        .zip(new_cfg.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(old_cfg.lines().count(), new_cfg.lines().count());
    assert_eq!(changed.len(), 1, "{changed:?}");
    let key_body = new_public.split_whitespace().nth(1).unwrap();
    assert!(
        changed[0].1.starts_with("key      = \"ssh-ed25519 "),
        "{changed:?}"
    );
    assert!(changed[0].1.contains(key_body));
    // Exactly the secrets that reach bunk were rewritten.
    let untouched = Path::new("secrets/storagebox-account.age");
    assert_eq!(before[untouched], after[untouched]);
    let rewritten = Path::new("secrets/restic-password.age");
    assert_ne!(before[rewritten], after[rewritten]);
    assert_ne!(
        before[Path::new("secrets/secrets.lock")],
        after[Path::new("secrets/secrets.lock")]
    );
    assert_ok(&fx.run(&["check"]));
    // The old host key opens nothing any more; the new one activates.
    install_host_key(&root, &fx.key("bunk_ssh_host_ed25519_key"));
    let out = activate(&fx, &root);
    assert!(!out.status.success(), "the old key still activates");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    install_host_key(&root, &new_private);
    assert_ok(&activate(&fx, &root));
    let active = fs::read_link(root.join("run/agex")).unwrap();
    let active = root.join("run").join(active);
    let delivered = fs::read(active.join("immich-server.service/immich-db-password")).unwrap();
    assert_eq!(delivered, fx.decrypt("immich-db-password"));
}

#[test]
fn host_rekey_keyscan_prints_the_fingerprint_of_the_key_it_installs() {
    let test = "host_rekey_keyscan_prints_the_fingerprint_of_the_key_it_installs";
    if !have_tool("ssh-keyscan", test) {
        return;
    }
    let Some(sshd) = Sshd::start(test) else {
        return;
    };
    let fx = Fixture::bunk();
    let target = format!("127.0.0.1:{}", sshd.port());
    let out = fx.run_admin(&["host", "rekey", "bunk", "--keyscan", &target]);
    assert_ok(&out);
    let hostkey_pub = sshd.dir().join("hostkey.pub");
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&hostkey_pub)
        .output()
        .unwrap();
    let fp = stdout(&fp).split_whitespace().nth(1).unwrap().to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&fp), "{fp} not in:\n{err}");
    let body = fs::read_to_string(&hostkey_pub).unwrap();
    let body = body.split_whitespace().nth(1).unwrap();
    let cfg = fs::read_to_string(fx.dir().join("agex.toml")).unwrap();
    assert!(cfg.contains(body));
    assert_ok(&fx.run(&["check"]));
    // Nothing listens on a closed port: a clear error, nothing changed.
    let before = fx.snapshot();
    let closed = format!("127.0.0.1:{}", common::services::free_port());
    let out = fx.run_admin(&["host", "rekey", "bunk", "--keyscan", &closed]);
    assert!(assert_fails(&out, 1).contains("ssh-keyscan"));
    assert!(fx.snapshot() == before);
}

/// The fenced block of the kit whose first line is `# kit: <title>`.
fn kit_block(kit: &str, title: &str) -> String {
    let marker = format!("# kit: {title}\n");
    let start = kit
        .find(&marker)
        .unwrap_or_else(|| panic!("no block `{title}` in the kit:\n{kit}"));
    let body = &kit[start..];
    let end = body.find("```").expect("block end");
    body[..end].to_string()
}

/// Runs a kit block with bash, only the documented placeholders substituted, in a
/// clean environment (no agex, a private HOME).
fn follow(block: &str, subst: &[(&str, &Path)], home: &Path) -> std::process::Output {
    let mut script = block.to_string();
    for (name, value) in subst {
        script = script.replace(name, value.to_str().unwrap());
    }
    assert!(
        !script.contains("agex "),
        "the kit must not need agex:\n{script}"
    );
    Command::new("bash")
        .args(["-e", "-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", home)
        .current_dir(home)
        .output()
        .unwrap()
}

#[test]
fn the_recovery_kit_followed_literally_gets_the_data_back() {
    let test = "the_recovery_kit_followed_literally_gets_the_data_back";
    if !tools(test) || !have_tool("age", test) || !have_tool("bash", test) {
        return;
    }
    let Some(sshd) = Sshd::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = tmp.path().join("restic").display().to_string();
    let s = Setup::new(&restic_url, &sshd.url("borg"), true);
    s.authorize_borg_key(&sshd);
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let kit_path = tmp.path().join("kit.txt");
    assert_ok(&s.agex(&["recovery", "kit", "--out", kit_path.to_str().unwrap()]));
    let kit = fs::read_to_string(&kit_path).unwrap();
    assert_eq!(
        fs::metadata(&kit_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // It names the secrets and the recovery key, and holds no password.
    assert!(kit.contains("secret `restic-password`"));
    assert!(kit.contains("paper (age1"));
    for secret in ["restic-password", "borg-passphrase"] {
        let plain = String::from_utf8(s.fx.decrypt(secret)).unwrap();
        assert!(!kit.contains(plain.trim()), "the kit leaks {secret}");
    }
    let live = files_of(&s);
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let kit_dirs = || -> std::collections::BTreeSet<String> {
        fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("agex-kit"))
            .collect()
    };
    let before = kit_dirs();
    let key = s.fx.key("recovery.txt");
    let config = s.fx.dir();
    for repo in ["offsite-restic", "offsite-borg"] {
        let listed = follow(
            &kit_block(&kit, &format!("{repo} list")),
            &[("RECOVERY_KEY", &key), ("CONFIG", &config)],
            &home,
        );
        assert_ok(&listed);
        let shown = stdout(&listed);
        assert!(shown.contains("testapp"), "{repo}: {shown}");
        let target = tmp.path().join(format!("kit-{repo}"));
        fs::create_dir_all(&target).unwrap();
        let out = follow(
            &kit_block(&kit, &format!("{repo} restore testapp")),
            &[
                ("RECOVERY_KEY", &key),
                ("CONFIG", &config),
                ("TARGET", &target),
            ],
            &home,
        );
        assert_ok(&out);
        let got = common::snapshot(&target.join("srv/app/files"));
        assert!(got == live, "{repo}: restored files differ");
        assert_eq!(
            sqlite_count(&target.join("var/lib/agex/dumps/testapp/db/app.sqlite3")),
            sqlite_count(&s.host("/srv/app/app.db"))
        );
    }
    // The decrypted ssh key lived in a private directory that each block removed.
    // Another test's kit (tests/offsite.rs) may be at work at the same time: its
    // directory goes when its block ends.
    let t = std::time::Instant::now();
    let mut left: Vec<String> = kit_dirs().difference(&before).cloned().collect();
    while !left.is_empty() && t.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        left = kit_dirs().difference(&before).cloned().collect();
    }
    assert!(left.is_empty(), "the kit left {left:?} in /dev/shm");
}

#[test]
fn in_place_restore_with_delete_removes_only_what_the_snapshot_lacks() {
    let test = "in_place_restore_with_delete_removes_only_what_the_snapshot_lacks";
    if !tools(test) || !have_tool("mkfifo", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The live SQLite database sits inside the backed-up path: the backup leaves it out
    // (its dump is restored instead), so --delete must leave it too.
    let policy = SQLITE_POLICY.replace(
        r#"paths   = ["/srv/app/files"]"#,
        r#"paths   = ["/srv/app"]"#,
    );
    assert!(policy.contains(r#"["/srv/app"]"#));
    let (s, _, _) = local(tmp.path(), &policy);
    let original = files_of(&s);
    let rows = sqlite_count(&s.host("/srv/app/app.db"));
    let files = s.host("/srv/app/files");
    let strays = |s: &Setup| {
        fs::write(files.join("stray.txt"), "created after the backup\n").unwrap();
        fs::create_dir_all(files.join("newdir/x")).unwrap();
        fs::write(files.join("newdir/x/y.txt"), "also new\n").unwrap();
        std::os::unix::fs::symlink("a.txt", files.join("newlink")).unwrap();
        fs::write(files.join("cache/new.tmp"), "excluded, never backed up\n").unwrap();
        damage(s);
    };
    let restore = |repo: &str, delete: bool| {
        let mut args = vec!["restore", "--service", "testapp", "--repo", repo];
        args.extend(["--in-place", "--yes", "--systemctl", "true"]);
        if delete {
            args.push("--delete");
        }
        s.agex(&args)
    };
    assert_ok(
        &Command::new("mkfifo")
            .arg(files.join("fifo"))
            .output()
            .unwrap(),
    );
    // Without --delete, what the snapshot lacks stays.
    strays(&s);
    assert_ok(&restore("offsite-restic", false));
    assert!(files.join("stray.txt").exists() && files.join("newdir/x/y.txt").exists());
    for repo in ["offsite-borg", "offsite-restic"] {
        let _ = fs::remove_dir_all(files.join("newdir"));
        let _ = fs::remove_file(files.join("newlink"));
        strays(&s);
        let out = restore(repo, true);
        assert_ok(&out);
        // stray.txt, newlink, newdir/x/y.txt, newdir/x, newdir.
        let err = stderr(&out);
        assert!(
            err.contains("deleted 5 entries the snapshot lacks"),
            "{repo}: {err}"
        );
        for gone in ["stray.txt", "newlink", "newdir"] {
            assert!(
                fs::symlink_metadata(files.join(gone)).is_err(),
                "{repo}: {gone} kept"
            );
        }
        // What the snapshot holds is back, byte for byte, with its link and empty dir.
        assert_eq!(files_of(&s), original, "{repo}");
        assert_eq!(
            fs::read_link(files.join("link")).unwrap(),
            Path::new("a.txt")
        );
        assert!(files.join("empty").is_dir(), "{repo}");
        // Excluded paths, the live database and special files are never touched.
        assert!(files.join("cache/skip.tmp").exists() && files.join("cache/new.tmp").exists());
        assert!(fs::symlink_metadata(files.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(sqlite_count(&s.host("/srv/app/app.db")), rows, "{repo}");
    }
    // --delete means nothing without --in-place.
    let out = s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--to",
        "/nonexistent",
        "--delete",
    ]);
    assert_fails(&out, 2);
}

/// Whether the real restic/borg binary opens the repository with `password`.
fn opens_with(s: &Setup, kind: &str, url: &str, password: &[u8], dir: &Path) -> bool {
    let file = dir.join(format!("try-{kind}"));
    fs::write(&file, password).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = if kind == "restic" {
        Command::new("restic")
            .args(["-r", url, "--no-cache", "--password-file"])
            .arg(&file)
            .args(["cat", "config"])
            .output()
            .unwrap()
    } else {
        Command::new("borg")
            .env("BORG_PASSCOMMAND", format!("cat {}", file.display()))
            .env_remove("BORG_PASSPHRASE")
            .env("BORG_BASE_DIR", s.fx.tmp.path().join("peer-borg"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .args(["list", url])
            .output()
            .unwrap()
    };
    out.status.success()
}

/// `agex repo rotate-password REPO` paused at `step` and killed with SIGKILL there.
fn rotate_killed_at(s: &Setup, repo: &str, step: &str) {
    use std::io::BufRead;
    let mut child = s
        .agex_command(&["repo", "rotate-password", repo])
        .env("AGEX_TEST_PAUSE_AT", step)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let paused = line.contains(&format!("paused at {step}"));
        seen.push(line);
        if paused {
            break;
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    assert!(
        seen.iter().any(|l| l.contains("paused at")),
        "{repo} never reached {step} ({status}):\n{}",
        seen.join("\n")
    );
}

#[test]
fn rotate_password_killed_at_every_step_leaves_a_stored_secret_that_opens() {
    let test = "rotate_password_killed_at_every_step_leaves_a_stored_secret_that_opens";
    if !tools(test) || !have_tool("age", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = local(tmp.path(), SQLITE_POLICY);
    let admin = s.fx.key("admin.txt");
    let cases = [
        (
            "offsite-restic",
            "restic",
            restic_url.clone(),
            "restic-password",
            &["pending", "added", "verified", "stored", "removed"][..],
        ),
        (
            "offsite-borg",
            "borg",
            borg_url.clone(),
            "borg-passphrase",
            &["pending", "changed", "verified", "stored"][..],
        ),
    ];
    for (repo, kind, url, secret, steps) in cases {
        let mut passwords = vec![s.fx.decrypt(secret)];
        for step in steps {
            rotate_killed_at(&s, repo, step);
            let stored = s.fx.decrypt(secret);
            let pending_file = s.fx.dir().join(format!("secrets/{secret}.age.pending"));
            let pending = pending_file.exists().then(|| {
                let out = Command::new("age")
                    .args(["-d", "-i"])
                    .arg(&admin)
                    .arg(&pending_file)
                    .output()
                    .unwrap();
                assert_ok(&out);
                out.stdout
            });
            let secret_opens = opens_with(&s, kind, &url, &stored, tmp.path());
            let pending_opens = pending
                .as_ref()
                .is_some_and(|p| opens_with(&s, kind, &url, p, tmp.path()));
            assert!(
                secret_opens || pending_opens,
                "{repo} killed at {step}: neither the secret nor its pending successor opens it"
            );
            if kind == "restic" || ["pending", "stored"].contains(step) {
                // Restic keeps both keys until the secret holds the new one; borg's
                // only window is between change-passphrase and storing the secret.
                assert!(
                    secret_opens,
                    "{repo} killed at {step}: the secret does not open it"
                );
            }
            // agex itself opens it at every step (the pending password while borg's
            // window is open).
            let out = s.agex(&["repo", "check", repo]);
            assert_ok(&out);
            // The next rotation finishes or discards the interrupted one and rotates.
            let out = s.agex(&["repo", "rotate-password", repo]);
            assert_ok(&out);
            assert!(
                !pending_file.exists(),
                "{repo}: pending file left after {step}"
            );
            let now = s.fx.decrypt(secret);
            assert!(
                !passwords.contains(&now),
                "{repo}: the password did not change"
            );
            assert!(opens_with(&s, kind, &url, &now, tmp.path()));
            passwords.push(now);
        }
        // The first password no longer opens the repository; agex still backs up.
        assert!(
            !opens_with(&s, kind, &url, &passwords[0], tmp.path()),
            "{repo}"
        );
        assert_ok(&s.agex(&["backup", "--service", "testapp", "--repo", repo]));
        assert_ok(&s.fx.run(&["check"]));
    }
}

/// Data for every policy of the bunk example under the root: a file in each path, an
/// SQLite database for each `sqlite` entry, a PostgreSQL database (on the test
/// cluster, whose port is written into the policy) for each `postgres` entry.
fn bunk_data(s: &Setup, pg: &Postgres) {
    let dry = s.agex(&["--json", "backup", "--dry-run"]);
    assert_ok(&dry);
    let planned: serde_json::Value = serde_json::from_str(&stdout(&dry)).unwrap();
    for p in planned.as_array().unwrap() {
        let service = p["service"].as_str().unwrap();
        for path in p["paths"].as_array().unwrap() {
            let dir = s.host(path.as_str().unwrap());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("data.txt"), format!("{service} at {path}\n")).unwrap();
        }
        let policy_file = s.fx.dir().join(format!("policies/{service}.toml"));
        let text = fs::read_to_string(&policy_file).unwrap();
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(line);
            out.push('\n');
            let value = || line.split('"').nth(1).unwrap().to_string();
            if line.starts_with("path ") || line.starts_with("path=") {
                let db = s.host(&value());
                fs::create_dir_all(db.parent().unwrap()).unwrap();
                assert_ok(
                    &Command::new("sqlite3")
                        .arg(&db)
                        .arg(format!(
                            "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, v TEXT);
                             INSERT INTO items(v) VALUES ('{service}'), ('more');"
                        ))
                        .output()
                        .unwrap(),
                );
            } else if line.starts_with("database ") {
                let name = value();
                pg.create_db(&name);
                pg.psql(
                    &name,
                    "CREATE TABLE assets (id int PRIMARY KEY); \
                     INSERT INTO assets SELECT generate_series(1, 77);",
                );
                out.push_str(&format!("port = {}\n", pg.port()));
            }
        }
        fs::write(&policy_file, out).unwrap();
    }
}

#[test]
fn rebuild_drill_on_the_bunk_example_restores_every_service_with_a_new_host_key() {
    let test = "rebuild_drill_on_the_bunk_example_restores_every_service_with_a_new_host_key";
    if !tools(test) {
        return;
    }
    let Some(sshd) = Sshd::start(test) else {
        return;
    };
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = tmp.path().join("restic").display().to_string();
    let s = Setup::new(&restic_url, &sshd.url("borg"), true);
    s.authorize_borg_key(&sshd);
    s.link_postgres(&pg);
    bunk_user_db(&s.root);
    bunk_data(&s, &pg);
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--systemctl", "true"]));
    let config_before = s.fx.snapshot();
    let root_before: Vec<String> = fs::read_dir(s.host("/var/lib/agex"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();

    let out = s.agex(&["--json", "drill", "rebuild", "--host", "bunk"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|_| panic!("{}\n{}", stdout(&out), String::from_utf8_lossy(&out.stderr)));
    assert_ok(&out);
    assert_eq!(report["passed"], true, "{report:#}");
    eprintln!(
        "rebuild drill: {} s total, steps {:?}, oldest data {}",
        report["total_seconds"],
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}: {:.2} s", s["step"], s["seconds"].as_f64().unwrap()))
            .collect::<Vec<_>>(),
        report["oldest_data"]
    );
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{report:#}");
    assert!(steps.iter().all(|s| s["ok"] == true), "{report:#}");
    let restores = report["restores"].as_array().unwrap();
    assert_eq!(restores.len(), 12 * 2, "{report:#}");
    assert!(restores.iter().all(|r| r["result"] == "ok"), "{report:#}");
    let immich = restores
        .iter()
        .find(|r| r["service"] == "immich" && r["repo"] == "offsite-borg")
        .unwrap();
    assert_eq!(immich["databases"], 1);
    assert!(report["oldest_data"].is_string());
    assert!(report["total_seconds"].as_f64().unwrap() > 0.0);
    let old_fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(s.fx.key("bunk_ssh_host_ed25519_key.pub"))
        .output()
        .unwrap();
    let old_fp = stdout(&old_fp)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(report["new_key"].as_str().unwrap().starts_with("SHA256:"));
    assert_ne!(report["new_key"].as_str().unwrap(), old_fp);
    // The real configuration is untouched; the scratch root and its mount are gone.
    assert!(
        s.fx.snapshot() == config_before,
        "the rebuild drill changed the config"
    );
    assert_eq!(
        fs::read_dir(s.host("/var/lib/agex/rebuild"))
            .unwrap()
            .count(),
        0
    );
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&s.root.display().to_string()), "{mounts}");
    let dbs = pg.psql("postgres", "SELECT datname FROM pg_database");
    assert!(!dbs.contains("agex_drill"), "{dbs}");
    let _ = root_before;
    let secrets = secret_values(&s.fx);
    assert_no_secret_on_disk(&s.root, &secrets, "after the drill");

    // A drill killed mid-run: its secrets were only ever on its ramfs mount and in RAM,
    // so the disk holds none of them; the next drill removes what it left.
    let mut child = s
        .agex_command(&["drill", "rebuild", "--host", "bunk"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rebuild_dir = s.host("/var/lib/agex/rebuild");
    let started = std::time::Instant::now();
    while !fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&*rebuild_dir.to_string_lossy())
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the drill ended before it mounted its secrets filesystem"
        );
        assert!(started.elapsed().as_secs() < 120, "no mount after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert_no_secret_on_disk(&s.root, &secrets, "after a killed drill");
    let left: Vec<_> = fs::read_dir(&rebuild_dir).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "the killed drill's scratch directory");

    // A host whose key cannot open the repository passwords cannot be rebuilt: the
    // drill says so and fails.
    let rules = s.fx.dir().join("secrets/secrets.toml");
    let text = fs::read_to_string(&rules).unwrap();
    let cut = text.replace(
        "[secrets.restic-password]\nrecipients      = [\"admins\", \"recovery\", \"bunk\"]",
        "[secrets.restic-password]\nrecipients      = [\"admins\", \"recovery\"]",
    );
    assert_ne!(cut, text, "the rule of restic-password changed its layout");
    fs::write(&rules, cut).unwrap();
    assert_ok(&s.agex(&["rekey"]));
    let out = s.agex(&["drill", "rebuild", "--host", "bunk"]);
    let err = assert_fails(&out, 1);
    let text = stdout(&out);
    assert!(text.contains("FAILED"), "{text}\n{err}");
    assert!(
        err.contains("note: removed") && err.contains("rebuild drill"),
        "the killed drill's leftovers were not reported:\n{err}"
    );
    assert_eq!(fs::read_dir(&rebuild_dir).unwrap().count(), 0);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*rebuild_dir.to_string_lossy()),
        "{mounts}"
    );
    assert_no_secret_on_disk(&s.root, &secrets, "after the next drill");
    assert!(
        text.lines()
            .any(|l| l.contains("offsite-restic") && l.contains("FAILED")),
        "{text}"
    );
}

#[test]
fn rebuild_drill_without_root_refuses_unless_secrets_on_disk_are_allowed() {
    let test = "rebuild_drill_without_root_refuses_unless_secrets_on_disk_are_allowed";
    // Root is needed to become another user; the drill itself then runs without root.
    if !is_root(test) {
        return;
    }
    let fx = Fixture::bunk();
    // Repositories that do not exist (on loopback terms: local paths), so the restores
    // fail fast once the drill gets that far.
    let gone = fx.tmp.path().join("no-such-repos");
    fx.retarget_repositories(
        &gone.join("restic").display().to_string(),
        &gone.join("borg").display().to_string(),
        false,
    );
    let root = fx.root();
    // nobody owns the whole test tree (and may read the config and keys in it).
    fs::set_permissions(fx.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert_ok(
        &Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(fx.tmp.path())
            .output()
            .unwrap(),
    );
    let as_nobody = |extra: &[&str]| {
        let mut cmd = fx.agex();
        cmd.arg("-i")
            .arg(fx.key("admin.txt"))
            .arg("--root")
            .arg(&root)
            .args(["--json", "drill", "rebuild", "--host", "bunk"])
            .args(extra);
        wrapped(
            "setpriv",
            &["--reuid=65534", "--regid=65534", "--clear-groups"],
            &cmd,
        )
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
    };
    let rebuild = root.join("var/lib/agex/rebuild");

    // Without the flag: refused before anything is decrypted or created.
    let out = as_nobody(&[]);
    let err = assert_fails(&out, 2);
    assert!(
        err.contains("needs root") && err.contains("--allow-secrets-on-disk"),
        "{err}"
    );
    assert!(
        !rebuild.exists(),
        "the refused drill made {}",
        rebuild.display()
    );

    // With it: the drill runs past the check (its first steps pass; the restores
    // fail, the repositories do not exist) and removes its scratch directory.
    let out = as_nobody(&["--allow-secrets-on-disk"]);
    let err = stderr(&out);
    assert!(!err.contains("needs root"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|_| panic!("{}\n{err}", stdout(&out)));
    let steps = report["steps"].as_array().unwrap();
    assert!(
        steps.len() >= 2 && steps[0]["ok"] == true && steps[1]["ok"] == true,
        "{report:#}\n{err}"
    );
    assert_eq!(
        fs::read_dir(&rebuild).unwrap().count(),
        0,
        "the drill left its scratch directory"
    );
    let secrets = secret_values(&fx);
    assert_no_secret_on_disk(&root, &secrets, "after a drill without root");
}

#[test]
fn restore_to_below_a_symlinked_directory_is_refused_and_nothing_lands_outside() {
    let test = "restore_to_below_a_symlinked_directory_is_refused_and_nothing_lands_outside";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = local(tmp.path(), SQLITE_POLICY);
    // A user owning `shared` swapped the directory the admin restores into for a symlink.
    let outside = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(outside.path(), shared.join("restore")).unwrap();
    for repo in ["offsite-restic", "offsite-borg"] {
        let to = shared.join("restore").join(repo);
        let out = s.agex(&[
            "restore",
            "--service",
            "testapp",
            "--repo",
            repo,
            "--to",
            to.to_str().unwrap(),
        ]);
        let err = assert_fails(&out, 1);
        assert!(
            err.contains("symlink") && err.contains("shared/restore"),
            "{err}"
        );
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "{repo}: the restore went through the symlink"
        );
    }
    // A real directory there takes the restore.
    fs::remove_file(shared.join("restore")).unwrap();
    let to = shared.join("restore/new");
    assert_ok(&s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--repo",
        "offsite-borg",
        "--to",
        to.to_str().unwrap(),
    ]));
    assert!(to.join("srv/app/files/a.txt").is_file());

    // In place: the service's user swapped a directory of its data for a symlink to a
    // directory it wants root to write into. The restore refuses and writes nothing
    // there; with a real directory back it restores.
    fs::write(outside.path().join("keep"), b"theirs").unwrap();
    let sub = s.host("/srv/app/files/sub");
    fs::remove_dir_all(&sub).unwrap();
    std::os::unix::fs::symlink(outside.path(), &sub).unwrap();
    let before = tree_state(outside.path());
    for delete in [false, true] {
        let mut args = vec!["restore", "--service", "testapp", "--in-place", "--yes"];
        args.extend(["--systemctl", "true"]);
        if delete {
            args.push("--delete");
        }
        let out = s.agex(&args);
        let err = assert_fails(&out, 1);
        assert!(
            err.contains("symlink") && err.contains("srv/app/files/sub"),
            "{err}"
        );
        assert_eq!(
            tree_changes(&before, &tree_state(outside.path())),
            Vec::<String>::new(),
            "the in-place restore wrote through the symlink"
        );
    }
    fs::remove_file(&sub).unwrap();
    assert_ok(&s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--in-place",
        "--yes",
        "--systemctl",
        "true",
    ]));
    assert!(s.host("/srv/app/files/sub/deeper/b.bin").is_file());
}

/// Every secret's plaintext (8 bytes or longer, without trailing newlines), decrypted
/// with the admin key.
fn secret_values(fx: &Fixture) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(fx.dir().join("secrets")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(name) = name.strip_suffix(".age") else {
            continue;
        };
        let mut value = fx.decrypt(name);
        while value.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            value.pop();
        }
        if value.len() >= 8 {
            out.push((name.to_string(), value));
        }
    }
    assert!(out.len() > 10, "too few secrets to look for: {}", out.len());
    out
}

/// No file below `dir` on the same filesystem (mounts such as a ramfs are RAM, not
/// disk) holds any of `secrets`.
fn assert_no_secret_on_disk(dir: &Path, secrets: &[(String, Vec<u8>)], when: &str) {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(dir).unwrap().dev();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                let Ok(bytes) = fs::read(e.path()) else {
                    continue;
                };
                for (name, value) in secrets {
                    assert!(
                        !bytes.windows(value.len()).any(|w| w == value.as_slice()),
                        "{when}: secret `{name}` in plain text in {}",
                        e.path().display()
                    );
                }
            }
        }
    }
}

/// Peak memory a drill may report (agex's own `VmHWM` plus its children's), whatever the
/// size of what it verifies: here a 256 MiB file and a PostgreSQL dump of ~330 MB, both
/// larger than the bound, so a drill whose memory followed the data would exceed it.
const DRILL_MEMORY_BOUND: u64 = 200 << 20;

#[test]
fn drill_of_a_large_database_and_file_passes_in_bounded_memory_and_scratch() {
    let test = "drill_of_a_large_database_and_file_passes_in_bounded_memory_and_scratch";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    pg.create_db("app");
    // ~330 MB of rows that compress well, as real tables of text do.
    pg.psql(
        "app",
        "CREATE TABLE events (id bigint PRIMARY KEY, kind text, body text); \
         INSERT INTO events SELECT g, 'kind-' || (g % 17), \
           repeat('a compressible row of drill data ' || (g % 1000), 8) \
           FROM generate_series(1, 1000000) g; \
         CREATE TABLE notes (id int); INSERT INTO notes SELECT generate_series(1, 77);",
    );
    let (s, restic_url, _) = Setup::local(tmp.path());
    s.link_postgres(&pg);
    s.policy("testapp", &sqlite_and_postgres_policy(&pg));
    app_data(&s, 0);
    // One large compressible file: a SQL dump's shape, 256 MiB.
    {
        use std::io::Write;
        let mut f =
            std::io::BufWriter::new(fs::File::create(s.host("/srv/app/files/export.sql")).unwrap());
        let mut written = 0usize;
        let mut i = 0u64;
        while written < 256 << 20 {
            let line = format!(
                "INSERT INTO t VALUES ({i}, 'row {}', '2026-11-{:02}');\n",
                i % 977,
                i % 28 + 1
            );
            f.write_all(line.as_bytes()).unwrap();
            written += line.len();
            i += 1;
        }
        f.flush().unwrap();
    }
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));

    // The manifest both drills compare with records the exact row counts.
    let manifest: serde_json::Value = serde_json::from_slice(
        &run(
            s.restic(&restic_url).args([
                "dump",
                "latest",
                "/var/lib/agex/dumps/testapp/manifest.json",
            ]),
            "restic dump",
        )
        .stdout,
    )
    .unwrap();
    let pg_dump = manifest["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "postgres")
        .unwrap();
    assert_eq!(
        pg_dump["row_counts"]["public.events"], 1_000_000,
        "{manifest}"
    );
    assert_eq!(pg_dump["row_counts"]["public.notes"], 77, "{manifest}");
    let dump_size = pg_dump["size"].as_u64().unwrap();
    assert!(dump_size > DRILL_MEMORY_BOUND, "dump of {dump_size} bytes");

    for repo in ["offsite-restic", "offsite-borg"] {
        let out = s.agex(&["--json", "drill", "--service", "testapp", "--repo", repo]);
        assert_ok(&out);
        let rec: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let r = &rec["results"][0];
        assert_eq!(r["result"], "ok", "{rec}");
        assert_eq!(r["databases"], 2, "{rec}");
        assert!(
            r["bytes"].as_u64().unwrap() >= (256 << 20) + dump_size,
            "{rec}"
        );
        let peak = r["peak_memory_bytes"].as_u64().unwrap();
        eprintln!("{repo}: drill peak memory {} MiB, {rec}", peak >> 20);
        assert!(peak > 4 << 20, "{repo}: implausible peak {peak}");
        assert!(
            peak < DRILL_MEMORY_BOUND,
            "{repo}: drill peak memory {} MiB, bound {} MiB",
            peak >> 20,
            DRILL_MEMORY_BOUND >> 20
        );
        // Only the SQLite dump (a few KiB) touched scratch disk: neither the large
        // file nor the PostgreSQL dump was written out.
        let scratch = r["scratch_bytes"].as_u64().unwrap();
        assert!(
            scratch > 0 && scratch < 1 << 20,
            "{repo}: scratch {scratch}"
        );
    }
    let dbs = pg.psql("postgres", "SELECT datname FROM pg_database");
    assert!(!dbs.contains("agex_drill"), "{dbs}");
    assert_eq!(
        fs::read_dir(s.host("/var/lib/agex/drill")).unwrap().count(),
        0
    );
    let prom = fs::read_to_string(s.host("/var/lib/node-exporter/agex_drill.prom")).unwrap();
    for metric in [
        "agex_drill_peak_memory_bytes{service=\"testapp\",repo=\"offsite-borg\"}",
        "agex_drill_scratch_bytes{service=\"testapp\",repo=\"offsite-restic\"}",
    ] {
        assert!(prom.contains(metric), "{metric} missing:\n{prom}");
    }
}
