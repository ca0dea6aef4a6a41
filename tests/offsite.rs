//! Offsite backends against real servers on loopback: S3 (SeaweedFS), sftp and borg over
//! the test's sshd with pinned host keys, rclone with its remote configured from an env
//! secret; and the rule that no secret reaches a child through argv or a named file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::services::{ssh_keygen, SeaweedFs, Sshd, S3_ACCESS_KEY, S3_SECRET_KEY};
use common::setup::{app_data, pseudo_random, run, Setup, SQLITE_POLICY};
use common::{assert_fails, assert_ok, have_tool, stderr, stdout};

/// Replaces secret `name`'s plaintext (through `agex encrypt`, to its rule's recipients).
fn set_secret(s: &Setup, name: &str, plaintext: &[u8]) {
    use std::io::Write;
    let mut child =
        s.fx.agex()
            .args(["encrypt", &format!("secrets/{name}.age")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    child.stdin.take().unwrap().write_all(plaintext).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
}

/// Adds `line` to repository `repo`'s table in agex.toml.
fn repo_line(s: &Setup, repo: &str, line: &str) {
    let header = format!("[repositories.{repo}]\n");
    s.fx.edit_config(&header, &format!("{header}{line}\n"));
}

/// A random printable secret no other test uses (so a scan that finds it found ours).
fn unique_secret(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
        ^ (u64::from(std::process::id()) << 32)
        ^ N.fetch_add(1, Ordering::Relaxed);
    let hex: String = pseudo_random(24, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{tag}-{hex}")
}

/// `restic` (the real CLI) for the S3 repository at `url`, with its password from the
/// fixture (in the test's own temp dir) and the server's credentials.
fn restic_s3(s: &Setup, weed: &SeaweedFs, url: &str) -> Command {
    let mut c = s.restic(url);
    weed.restic_env(&mut c);
    c
}

#[test]
fn restic_over_s3_with_env_secret_round_trip_and_wrong_key_fails_that_repository() {
    let test = "restic_over_s3_with_env_secret_round_trip_and_wrong_key_fails_that_repository";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(weed) = SeaweedFs::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let url = weed.url("agex-s3", "bunk");
    let borg_url = tmp.path().join("borg").display().to_string();
    let s = Setup::new(&url, &borg_url, false);
    repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
    set_secret(&s, "b2-credentials", weed.env_secret().as_bytes());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    assert_ok(&s.agex(&["check"]));
    s.init_repos();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);

    // The restic CLI reads what agex wrote to the bucket, every byte.
    run(
        restic_s3(&s, &weed, &url).args(["check", "--read-data"]),
        "restic check --read-data over S3",
    );
    let snaps = stdout(&run(
        restic_s3(&s, &weed, &url).args(["snapshots", "--json"]),
        "restic snapshots",
    ));
    assert!(snaps.contains("service=testapp"), "{snaps}");
    let restored =
        s.restic_restore_latest_with(&mut restic_s3(&s, &weed, &url), tmp.path().join("r"));
    assert_eq!(
        fs::read(restored.join("srv/app/files/big.bin")).unwrap(),
        fs::read(s.host("/srv/app/files/big.bin")).unwrap()
    );
    let snapshots = s.agex(&["snapshots", "--repo", "offsite-restic"]);
    assert_ok(&snapshots);
    assert_ok(&s.agex(&["drill", "--service", "testapp", "--repo", "offsite-restic"]));
    assert_ok(&s.agex(&[
        "forget",
        "--service",
        "testapp",
        "--repo",
        "offsite-restic",
        "--prune",
    ]));
    assert_ok(&s.agex(&["repo", "check", "offsite-restic"]));

    // A wrong secret key: that repository fails, named, with the cause; borg completes.
    set_secret(
        &s,
        "b2-credentials",
        format!("AWS_ACCESS_KEY_ID={S3_ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY=not-{S3_SECRET_KEY}\n")
            .as_bytes(),
    );
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(err.contains("offsite-restic"), "{err}");
    assert!(
        !err.contains(S3_SECRET_KEY),
        "the error shows the secret key: {err}"
    );

    // Credentials missing from the env secret: named before anything is sent.
    set_secret(&s, "b2-credentials", b"AWS_ACCESS_KEY_ID=x\n");
    let out = s.agex(&["snapshots", "--repo", "offsite-restic"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("lacks AWS_SECRET_ACCESS_KEY"), "{err}");
}

#[test]
fn rclone_remote_configured_by_env_secret_reaches_s3() {
    let test = "rclone_remote_configured_by_env_secret_reaches_s3";
    if !have_tool("restic", test) || !have_tool("rclone", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(weed) = SeaweedFs::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = Setup::new(
        "rclone:weed:agex-rclone/bunk",
        &tmp.path().join("borg").display().to_string(),
        false,
    );
    repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
    set_secret(
        &s,
        "b2-credentials",
        format!(
            "RCLONE_CONFIG_WEED_TYPE=s3\nRCLONE_CONFIG_WEED_PROVIDER=Other\n\
             RCLONE_CONFIG_WEED_ENDPOINT=http://127.0.0.1:{}\n\
             RCLONE_CONFIG_WEED_ACCESS_KEY_ID={S3_ACCESS_KEY}\n\
             RCLONE_CONFIG_WEED_SECRET_ACCESS_KEY={S3_SECRET_KEY}\n",
            weed.port()
        )
        .as_bytes(),
    );
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    // rclone would read a CA bundle named in the machine's environment; the test
    // server is plain http.
    let agex = |args: &[&str]| {
        let mut c = s.agex_command(args);
        c.env_remove("AWS_CA_BUNDLE");
        c.output().unwrap()
    };
    assert_ok(&agex(&["repo", "init", "offsite-restic"]));
    assert_ok(&agex(&[
        "backup",
        "--service",
        "testapp",
        "--repo",
        "offsite-restic",
    ]));
    // Through rclone into the bucket: the restic CLI reads it over S3 directly.
    let url = weed.url("agex-rclone", "bunk");
    run(
        restic_s3(&s, &weed, &url).args(["check", "--read-data"]),
        "restic check of what rclone stored",
    );
    assert_ok(&agex(&[
        "drill",
        "--service",
        "testapp",
        "--repo",
        "offsite-restic",
    ]));
}

/// sshd with the borg key authorized and its host key pinned for both repositories,
/// restic over sftp and borg over ssh, and a policy with `big` bytes of data.
fn ssh_setup(test: &str, tmp: &Path, big: usize) -> Option<(Setup, Sshd)> {
    if !have_tool("restic", test) || !have_tool("sqlite3", test) {
        return None;
    }
    let sshd = Sshd::start(test)?;
    let s = Setup::new(&sshd.sftp_url("restic"), &sshd.url("borg"), true);
    // A key and passphrases of this test only: a scan that finds them found ours.
    let key = tmp.join("client");
    ssh_keygen(&key);
    set_secret(&s, "borg-ssh-key", &fs::read(&key).unwrap());
    sshd.authorize(&fs::read_to_string(tmp.join("client.pub")).unwrap());
    fs::remove_file(&key).unwrap();
    set_secret(&s, "borg-passphrase", unique_secret("borgpass").as_bytes());
    set_secret(
        &s,
        "restic-password",
        unique_secret("resticpass").as_bytes(),
    );
    repo_line(&s, "offsite-restic", "ssh_key_secret = \"borg-ssh-key\"");
    s.pin_host_key("offsite-restic", &sshd);
    s.pin_host_key("offsite-borg", &sshd);
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, big);
    Some((s, sshd))
}

#[test]
fn restic_over_sftp_and_borg_over_ssh_with_pinned_host_keys() {
    let test = "restic_over_sftp_and_borg_over_ssh_with_pinned_host_keys";
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup(test, tmp.path(), 1 << 20) else {
        return;
    };
    assert_ok(&s.agex(&["check"]));
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    // restic's own sftp client reads what agex wrote, over the same server.
    let key = s.secret_file("borg-ssh-key");
    let known = tmp.path().join("known_hosts");
    fs::write(&known, format!("{}\n", sshd.known_hosts_line())).unwrap();
    let ssh_cmd = format!(
        "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -p {} {}@127.0.0.1 -s sftp",
        key.display(),
        known.display(),
        sshd.port(),
        sshd.user()
    );
    let restic_url = sshd.sftp_url("restic");
    run(
        s.restic(&restic_url)
            .arg("-o")
            .arg(format!("sftp.command={ssh_cmd}"))
            .args(["check", "--read-data"]),
        "restic check --read-data over sftp",
    );
    assert_ok(&s.agex(&["drill", "--service", "testapp"]));

    // The server's key changes (or another server answers): both refuse, named, and
    // say how to trust it; nothing is written.
    let other = tmp.path().join("otherhost");
    let other_pub = ssh_keygen(&other);
    let pinned = sshd.known_hosts_line();
    let mut words = other_pub.split_whitespace();
    let fake = format!(
        "[127.0.0.1]:{} {} {}",
        sshd.port(),
        words.next().unwrap(),
        words.next().unwrap()
    );
    let cfg = s.fx.dir().join("agex.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, text.replace(&pinned, &fake)).unwrap();
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 1);
    for repo in ["offsite-restic", "offsite-borg"] {
        assert!(err.contains(&format!("repository `{repo}`")), "{err}");
    }
    assert!(err.contains("agex repo trust"), "{err}");

    // `agex repo trust` pins the server's real key again (with --yes, no terminal).
    let out = s.agex(&["repo", "trust", "offsite-borg"]);
    assert_fails(&out, 2);
    let out = s.agex(&["repo", "trust", "offsite-borg", "--yes"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("SHA256:"), "{}", stdout(&out));
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&pinned), "{text}");
    assert_ok(&s.agex(&["snapshots", "--repo", "offsite-borg"]));
}

/// Every process's argv, with its pid.
fn all_cmdlines() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(raw) = fs::read(e.path().join("cmdline")) {
            out.push((pid, String::from_utf8_lossy(&raw).replace('\0', " ")));
        }
    }
    out
}

/// Files below `dir` (not following links) whose bytes hold one of `needles`.
fn files_holding(dir: &Path, needles: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let small = e.metadata().map(|m| m.len() < (64 << 20)).unwrap_or(false);
                if !small {
                    continue;
                }
                if let Ok(bytes) = fs::read(&p) {
                    // std's substring search (optimised even in a debug build).
                    let text = String::from_utf8_lossy(&bytes);
                    if needles
                        .iter()
                        .any(|n| text.contains(std::str::from_utf8(n).unwrap_or("\u{0}")))
                    {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

#[test]
fn secrets_reach_children_by_descriptor_none_in_argv_none_left_after_sigkill() {
    let test = "secrets_reach_children_by_descriptor_none_in_argv_none_left_after_sigkill";
    let tmp = tempfile::tempdir().unwrap();
    // Enough data that the rate-limited borg is still at work when agex is killed.
    let Some((s, _sshd)) = ssh_setup(test, tmp.path(), 24 << 20) else {
        return;
    };
    s.init_repos();
    let cfg = s.fx.dir().join("agex.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text.replace(
            "[repositories.offsite-borg]\n",
            "[repositories.offsite-borg]\nlimit_upload = \"2 MiB/s\"\n",
        ),
    )
    .unwrap();
    let runtime = tmp.path().join("runtime");
    fs::create_dir_all(&runtime).unwrap();
    fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();

    let borg_pass = s.fx.decrypt("borg-passphrase");
    let restic_pass = s.fx.decrypt("restic-password");
    let key = s.fx.decrypt("borg-ssh-key");
    // The key's base64 body lines, each long and unique.
    // The key's base64 body lines after the first (which every unencrypted ed25519 key
    // file shares): they hold the private key.
    let mut needles: Vec<Vec<u8>> = String::from_utf8_lossy(&key)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .skip(1)
        .filter(|l| l.len() > 40)
        .map(|l| l.as_bytes().to_vec())
        .collect();
    assert!(!needles.is_empty());
    needles.push(borg_pass.trim_ascii_end().to_vec());
    needles.push(restic_pass.trim_ascii_end().to_vec());

    let mut child = s
        .agex_command(&["backup", "--service", "testapp"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agex_pid = child.id() as i32;
    // Wait until borg talks to the server through ssh (a child of borg).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_ssh = false;
    while Instant::now() < deadline && !seen_ssh {
        for (pid, line) in all_cmdlines() {
            for n in &needles {
                assert!(
                    !line.contains(std::str::from_utf8(n).unwrap()),
                    "process {pid}'s argv holds a secret: {line}"
                );
            }
            seen_ssh |= line.starts_with("ssh ") && line.contains("borg serve");
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("agex ended ({st}) before borg was seen at work; make the data bigger");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_ssh, "borg's ssh never showed up");
    // SAFETY: kill(2) on the agex we started.
    unsafe { libc::kill(agex_pid, libc::SIGKILL) };
    let _ = child.wait();
    // borg and ssh get SIGTERM when agex dies; give them a moment to go.
    std::thread::sleep(Duration::from_millis(1500));
    let mut left = Vec::new();
    for dir in [Path::new("/dev/shm"), runtime.as_path(), Path::new("/tmp")] {
        left.extend(files_holding(dir, &needles));
    }
    assert!(
        left.is_empty(),
        "plaintext left behind after SIGKILL: {left:?}"
    );
}

impl SetupExt for Setup {}

/// Helpers on [`Setup`] this file needs.
trait SetupExt {
    fn restic_restore_latest_with(&self, cmd: &mut Command, target: PathBuf) -> PathBuf {
        run(
            cmd.args(["restore", "latest", "--target"]).arg(&target),
            "restic restore",
        );
        target
    }
}

#[test]
fn s3_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes() {
    let test = "s3_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(mut weed) = SeaweedFs::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let url = weed.url("agex-fault", "bunk");
    let s = Setup::new(&url, &tmp.path().join("borg").display().to_string(), false);
    repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
    set_secret(&s, "b2-credentials", weed.env_secret().as_bytes());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 8 << 20);
    s.init_repos();
    // Slow uploads, so the server can die while the backup writes to it.
    repo_line(&s, "offsite-restic", "limit_upload = \"1 MiB/s\"");
    let child = s
        .agex_command(&["backup", "--service", "testapp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    weed.stop();
    let out = child.wait_with_output().unwrap();
    let err = assert_fails(&out, 3);
    assert!(err.contains("offsite-restic"), "{err}");
    // The other repository completed.
    let borg = s.agex(&["snapshots", "--repo", "offsite-borg"]);
    assert_ok(&borg);
    assert!(stdout(&borg).contains("testapp"), "{}", stdout(&borg));

    // The server is back (new ports): the next run completes and the restic CLI finds
    // the repository whole.
    weed.restart();
    let url = weed.url("agex-fault", "bunk");
    let cfg = s.fx.dir().join("agex.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    let old = text
        .lines()
        .find(|l| l.starts_with("url") && l.contains("s3:"))
        .unwrap()
        .to_string();
    let text = text.replace(&old, &format!("url = \"{url}\""));
    fs::write(&cfg, text.replace("limit_upload = \"1 MiB/s\"\n", "")).unwrap();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    run(
        restic_s3(&s, &weed, &url).args(["check", "--read-data"]),
        "restic check --read-data after the server came back",
    );
}
