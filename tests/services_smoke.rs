mod common;

// Proves the loopback test services work end-to-end with the real binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::services::{self, Postgres, RcloneRestic, Sshd};
use common::{assert_ok, stdout};

/// A small tree to back up.
fn sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.txt"), "hello agex\n").unwrap();
    fs::write(dir.join("sub/b.bin"), vec![7u8; 64 * 1024]).unwrap();
}

/// A 0600 passphrase file.
fn secret_file(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn sshd_serves_borg() {
    let test = "sshd_serves_borg";
    let Some(mut sshd) = Sshd::start(test) else {
        return;
    };
    assert!(sshd.is_running());
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("client");
    let pubkey = services::ssh_keygen(&key);
    sshd.authorize(&pubkey);
    let pass = tmp.path().join("pass");
    secret_file(&pass, "correct horse battery staple\n");
    let src = tmp.path().join("src");
    sample_tree(&src);

    let url = sshd.url("repo");
    let rsh = sshd.borg_rsh(&key);
    let borg = |args: &[&str]| {
        Command::new("borg")
            .args(args)
            .env("BORG_PASSCOMMAND", format!("cat {}", pass.display()))
            .env("BORG_RSH", &rsh)
            .env("BORG_BASE_DIR", tmp.path().join("borgbase"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no")
            .env_remove("BORG_PASSPHRASE")
            .env_remove("BORG_REPO")
            .stdin(Stdio::null())
            .output()
            .expect("run borg")
    };
    let ctx = |out: &std::process::Output| {
        format!(
            "stderr: {}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            sshd.log()
        )
    };

    let out = borg(&["init", "--encryption=repokey-blake2", &url]);
    assert!(out.status.success(), "borg init: {}", ctx(&out));
    assert!(sshd.repo_path("repo").join("config").is_file());

    let archive = format!("{url}::a1");
    let out = borg(&["create", &archive, src.to_str().unwrap()]);
    assert!(out.status.success(), "borg create: {}", ctx(&out));

    let out = borg(&["list", "--json", &url]);
    assert!(out.status.success(), "borg list: {}", ctx(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let archives = v["archives"].as_array().expect("archives");
    assert_eq!(archives.len(), 1, "{v}");
    assert_eq!(archives[0]["name"], "a1");

    let out = borg(&["check", &url]);
    assert!(out.status.success(), "borg check: {}", ctx(&out));

    sshd.stop();
    assert!(!sshd.is_running());
    assert!(!services::port_open(sshd.port()));
    let out = borg(&["list", "--json", &url]);
    assert!(!out.status.success(), "borg list succeeded without sshd");
}

#[test]
fn postgres_dump_restore() {
    let test = "postgres_dump_restore";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    assert!(pg.is_running());
    pg.create_db("src");
    pg.psql(
        "src",
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g;",
    );
    assert_eq!(pg.psql("src", "SELECT count(*) FROM t").trim(), "1000");

    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("src.dump");
    let out = pg
        .command("pg_dump")
        .args(["-Fc", "-d", "src"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&dump).unwrap())
        .output()
        .expect("pg_dump");
    assert_ok(&out);
    assert!(fs::metadata(&dump).unwrap().len() > 0);

    pg.create_db("restored");
    let out = pg
        .command("pg_restore")
        .args(["-d", "restored", "--no-owner"])
        .stdin(fs::File::open(&dump).unwrap())
        .output()
        .expect("pg_restore");
    assert_ok(&out);
    assert_eq!(
        pg.psql("restored", "SELECT count(*) FROM t").trim(),
        "1000",
        "{}",
        pg.log()
    );
    assert_eq!(
        pg.psql("src", "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t"),
        pg.psql(
            "restored",
            "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t"
        )
    );
}

#[test]
fn rclone_serves_restic() {
    let test = "rclone_serves_restic";
    if !common::have_tool("restic", test) {
        return;
    }
    let Some(mut srv) = RcloneRestic::start(test) else {
        return;
    };
    assert!(srv.is_running());
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("pass");
    secret_file(&pass, "restic test password\n");
    let src = tmp.path().join("src");
    sample_tree(&src);
    let url = srv.url("repo");
    let restic = |args: &[&str]| {
        let out = Command::new("restic")
            .arg("-r")
            .arg(&url)
            .arg("--no-cache")
            .args(args)
            .env("RESTIC_PASSWORD_FILE", &pass)
            .env_remove("RESTIC_PASSWORD")
            .env_remove("RESTIC_REPOSITORY")
            .stdin(Stdio::null())
            .output()
            .expect("run restic");
        assert!(
            out.status.success(),
            "restic {args:?}: {}\nrclone log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            srv.log()
        );
        out
    };
    restic(&["init"]);
    assert!(srv.data_dir().join("repo/config").is_file());
    restic(&["backup", src.to_str().unwrap()]);
    let snaps: serde_json::Value =
        serde_json::from_str(&stdout(&restic(&["snapshots", "--json"]))).unwrap();
    assert_eq!(snaps.as_array().expect("snapshot list").len(), 1, "{snaps}");
    restic(&["check"]);
    srv.stop();
    assert!(!srv.is_running());
}
