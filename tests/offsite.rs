//! Offsite backends against real servers on loopback: S3 (SeaweedFS), sftp and borg over
//! the test's sshd with pinned host keys, rclone with its remote configured from an env
//! secret; and the rule that no secret reaches a child through argv or a named file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::services::{ssh_keygen, SeaweedFs, Sshd, S3_ACCESS_KEY, S3_SECRET_KEY};
use common::setup::{app_data, blob_rows, pseudo_random, run, Setup, SQLITE_POLICY};
use common::{assert_fails, assert_ok, have_tool, stderr, stdout, Fixture};

/// Replaces secret `name`'s plaintext (through `agex encrypt`, to its rule's recipients).
fn set_secret(s: &Setup, name: &str, plaintext: &[u8]) {
    set_fixture_secret(&s.fx, name, plaintext);
}

/// [`set_secret`] in a bare fixture.
fn set_fixture_secret(fx: &Fixture, name: &str, plaintext: &[u8]) {
    use std::io::Write;
    let mut child = fx
        .agex()
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
    // No child (borg) holds a password or the S3 credentials in its argv.
    let needles = [
        S3_SECRET_KEY.to_string(),
        String::from_utf8(s.fx.decrypt("restic-password"))
            .unwrap()
            .trim()
            .to_string(),
        String::from_utf8(s.fx.decrypt("borg-passphrase"))
            .unwrap()
            .trim()
            .to_string(),
    ];
    let (out, children) = output_watching_argv(
        &mut s.agex_command(&["backup", "--service", "testapp"]),
        &needles,
    );
    assert_ok(&out);
    assert!(children >= 1, "borg was never seen running");

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
    // rclone gets the remote's credentials through its environment, never its argv.
    let mut backup =
        s.agex_command(&["backup", "--service", "testapp", "--repo", "offsite-restic"]);
    backup.env_remove("AWS_CA_BUNDLE");
    let restic_pass = String::from_utf8(s.fx.decrypt("restic-password")).unwrap();
    let (out, children) = output_watching_argv(
        &mut backup,
        &[S3_SECRET_KEY.to_string(), restic_pass.trim().to_string()],
    );
    assert_ok(&out);
    assert!(children >= 1, "rclone was never seen running");
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

/// Which repositories of an [`ssh_setup_over`] reach the test's sshd (the others are
/// local paths in the test's temp dir).
#[derive(Clone, Copy, PartialEq)]
enum Over {
    Both,
    SftpOnly,
    BorgOnly,
}

/// sshd with the borg key authorized and its host key pinned for both repositories,
/// restic over sftp and borg over ssh, and a policy with `big` bytes of data.
fn ssh_setup(test: &str, tmp: &Path, big: usize) -> Option<(Setup, Sshd)> {
    ssh_setup_over(test, tmp, big, Over::Both)
}

/// [`ssh_setup`] with only the repositories `over` names on the server.
fn ssh_setup_over(test: &str, tmp: &Path, big: usize, over: Over) -> Option<(Setup, Sshd)> {
    if !have_tool("restic", test) || !have_tool("sqlite3", test) {
        return None;
    }
    let sshd = Sshd::start(test)?;
    let restic_url = match over {
        Over::BorgOnly => tmp.join("restic").display().to_string(),
        _ => sshd.sftp_url("restic"),
    };
    let borg_url = match over {
        Over::SftpOnly => tmp.join("borg").display().to_string(),
        _ => sshd.url("borg"),
    };
    let s = Setup::new(&restic_url, &borg_url, over != Over::SftpOnly);
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
    if over != Over::BorgOnly {
        repo_line(&s, "offsite-restic", "ssh_key_secret = \"borg-ssh-key\"");
        s.pin_host_key("offsite-restic", &sshd);
    }
    if over != Over::SftpOnly {
        s.pin_host_key("offsite-borg", &sshd);
    }
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

#[test]
fn check_requires_the_keys_the_scheme_needs_and_warns_about_unknown_ones() {
    // The example: offsite-restic on B2's S3 endpoint, env_secret `b2-credentials`.
    let fx = Fixture::bunk();
    let check = |admin: bool| {
        if admin {
            fx.run_admin(&["check"])
        } else {
            fx.run(&["check"])
        }
    };
    let out = check(true);
    assert_ok(&out);
    assert!(!stdout(&out).contains("env_secret"), "{}", stdout(&out));

    // A typo in a required key: the check fails at the env_secret line, naming the
    // repository, the secret and the missing key; the typo is warned about.
    set_fixture_secret(
        &fx,
        "b2-credentials",
        b"AWS_ACCESS_KEY_ID=0031234567890ab0000000001\nAWS_SECRET_KEY=K003-typo-value\n",
    );
    let out = check(true);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("error: agex.toml:20:")
            && text.contains("env_secret `b2-credentials` lacks AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
    assert!(
        text.contains("warning: agex.toml:20:")
            && text.contains("has key AWS_SECRET_KEY, which a s3 repository does not read"),
        "{text}"
    );
    assert!(
        !text.contains("K003-typo-value"),
        "a value is shown: {text}"
    );
    assert!(text.contains("check failed"), "{text}");

    // Everything needed, plus a key nothing reads: a warning, the check passes.
    set_fixture_secret(
        &fx,
        "b2-credentials",
        b"AWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=b\nAWS_PROFILE=backup\n",
    );
    let out = check(true);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("has key AWS_PROFILE"), "{text}");
    assert!(text.contains("check passed"), "{text}");

    // Without an identity that opens it, the secret is reported unchecked, not failed.
    let out = check(false);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("env_secret `b2-credentials` not checked"),
        "{}",
        stdout(&out)
    );
}

/// A TCP proxy on 127.0.0.1 in front of a real server that resets the next connections
/// it is told to (once the client has sent its request), as a flaky network or an
/// overloaded load balancer does, or cuts one connection in the middle of a transfer
/// (a link that drops); all others it forwards.
struct FlakyProxy {
    port: u16,
    fail: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    resets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyProxy {
    fn start(target: u16) -> FlakyProxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fail = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (f, r, st) = (fail.clone(), resets.clone(), stop.clone());
        let (cut_w, cuts_w) = (cut.clone(), cuts.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let failing = f
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    let r = r.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        // One byte of the request read, the rest left unread: closing
                        // now makes the kernel answer with a reset.
                        let mut c = client;
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut one = [0u8; 1];
                        let _ = c.read(&mut one);
                        r.fetch_add(1, Ordering::SeqCst);
                        drop(c);
                    });
                    continue;
                }
                // The first connection the client sends this many bytes through is cut
                // (0: none).
                let cut_after = cut_w.load(Ordering::SeqCst);
                let (cut, cuts) = (cut_w.clone(), cuts_w.clone());
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        return;
                    };
                    let (mut c_in, mut s_out) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let pump = std::thread::spawn(move || {
                        if cut_after == 0 {
                            let _ = std::io::copy(&mut c_in, &mut s_out);
                            let _ = s_out.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        use std::io::{Read, Write};
                        let mut passed = 0;
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = c_in.read(&mut buf) {
                            if s_out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            passed += n;
                            if passed >= cut_after
                                && cut
                                    .compare_exchange(
                                        cut_after,
                                        0,
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    )
                                    .is_ok()
                            {
                                // The link drops: both ends lose the connection at once.
                                cuts.fetch_add(1, Ordering::SeqCst);
                                let _ = s_out.shutdown(std::net::Shutdown::Both);
                                let _ = c_in.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                        let _ = s_out.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut s_in, mut c_out) = (server, client);
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = pump.join();
                });
            }
        });
        FlakyProxy {
            port,
            fail,
            resets,
            cut,
            cuts,
            stop,
        }
    }

    /// Cuts the first connection through which the client sends `bytes` from now on.
    fn cut_next_after(&self, bytes: usize) {
        self.cut.store(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections it has cut.
    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resets the next `n` connections.
    fn fail_next(&self, n: usize) {
        self.fail.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections it has reset.
    fn resets(&self) -> usize {
        self.resets.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees the stop.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The record `agex --json backup` printed, and its result for `repo`.
fn result_of(out: &std::process::Output, repo: &str) -> serde_json::Value {
    let record: serde_json::Value = serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("backup --json: {e}: {}\n{}", stdout(out), stderr(out)));
    record["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == repo)
        .cloned()
        .unwrap_or_else(|| panic!("no result for {repo}: {record}"))
}

#[test]
fn transient_s3_errors_are_retried_a_bounded_number_of_times_and_counted() {
    let test = "transient_s3_errors_are_retried_a_bounded_number_of_times_and_counted";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let Some(weed) = SeaweedFs::start(test) else {
        return;
    };
    let proxy = FlakyProxy::start(weed.port());
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3:http://127.0.0.1:{}/agex-flaky/bunk", proxy.port);
    let s = Setup::new(&url, &tmp.path().join("borg").display().to_string(), false);
    repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
    set_secret(&s, "b2-credentials", weed.env_secret().as_bytes());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    s.init_repos();

    // Two connections reset: two retries, the run completes and its record says so.
    proxy.fail_next(2);
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_ok(&out);
    assert_eq!(proxy.resets(), 2);
    let restic = result_of(&out, "offsite-restic");
    assert_eq!(restic["result"], "ok", "{restic}");
    assert_eq!(restic["retries"], 2, "{restic}");
    assert_eq!(result_of(&out, "offsite-borg")["retries"], 0);

    // The run's output says it too.
    proxy.fail_next(1);
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("testapp → offsite-restic: ok") && l.contains("1 retry)")),
        "{err}"
    );
    run(
        restic_s3(&s, &weed, &weed.url("agex-flaky", "bunk")).args(["check", "--read-data"]),
        "restic check --read-data after retried writes",
    );

    // A server that keeps resetting: each operation gives up after 5 retries, the
    // repository fails (named, saying how many retries it took), borg completes.
    proxy.fail_next(usize::MAX);
    let t = Instant::now();
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let restic = result_of(&out, "offsite-restic");
    assert_eq!(restic["result"], "failed", "{restic}");
    let retries = restic["retries"].as_u64().unwrap();
    assert!(retries >= 5 && retries.is_multiple_of(5), "{restic}");
    assert_eq!(result_of(&out, "offsite-borg")["result"], "ok");
    assert!(t.elapsed() < Duration::from_secs(180), "{:?}", t.elapsed());
    proxy.fail_next(0);
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
}

/// `restic` (the real CLI) for the sftp repository of [`ssh_setup`], through an ssh
/// that checks the pinned host key and logs in with the repository's key.
fn restic_sftp(s: &Setup, sshd: &Sshd, tmp: &Path) -> Command {
    let key = s.secret_file("borg-ssh-key");
    let known = tmp.join("known_hosts");
    fs::write(&known, format!("{}\n", sshd.known_hosts_line())).unwrap();
    let ssh_cmd = format!(
        "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -p {} {}@127.0.0.1 -s sftp",
        key.display(),
        known.display(),
        sshd.port(),
        sshd.user()
    );
    let mut c = s.restic(&sshd.sftp_url("restic"));
    c.arg("-o").arg(format!("sftp.command={ssh_cmd}"));
    c
}

/// Points every URL and pinned host key of agex.toml at `port` instead of the sshd's.
fn through_port(s: &Setup, sshd: &Sshd, port: u16) {
    let cfg = s.fx.dir().join("agex.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace(
            &format!("127.0.0.1:{}/", sshd.port()),
            &format!("127.0.0.1:{port}/"),
        )
        .replace(
            &format!("[127.0.0.1]:{} ", sshd.port()),
            &format!("[127.0.0.1]:{port} "),
        );
    fs::write(&cfg, text).unwrap();
}

/// A line of the run's output for `repo` that ended `ok` after `retries` retries.
fn ok_after_retries(out: &std::process::Output, repo: &str) -> String {
    let err = stderr(out);
    err.lines()
        .find(|l| l.contains(&format!("testapp → {repo}: ok")) && l.contains("retr"))
        .unwrap_or_else(|| panic!("no `{repo}: ok (… retries)` line: {err}"))
        .to_string()
}

#[test]
fn transient_sftp_errors_reconnect_and_are_retried_and_counted() {
    let test = "transient_sftp_errors_reconnect_and_are_retried_and_counted";
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup_over(test, tmp.path(), 4 << 20, Over::SftpOnly) else {
        return;
    };
    let proxy = FlakyProxy::start(sshd.port());
    through_port(&s, &sshd, proxy.port);
    s.init_repos();

    // Two connections reset before ssh logs in: two retries, counted and shown.
    proxy.fail_next(2);
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_ok(&out);
    assert_eq!(proxy.resets(), 2);
    let restic = result_of(&out, "offsite-restic");
    assert_eq!(restic["result"], "ok", "{restic}");
    assert_eq!(restic["retries"], 2, "{restic}");

    // The connection drops in the middle of an upload: agex connects again, the
    // writes that broke are retried, the run completes and says so.
    fs::write(s.host("/srv/app/files/new.bin"), pseudo_random(4 << 20, 13)).unwrap();
    proxy.cut_next_after(1 << 20);
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    assert_eq!(proxy.cuts(), 1);
    ok_after_retries(&out, "offsite-restic");
    run(
        restic_sftp(&s, &sshd, tmp.path()).args(["check", "--read-data"]),
        "restic check --read-data over sftp after a reconnect",
    );
    assert_ok(&s.agex(&["drill", "--service", "testapp"]));

    // A host key that does not match is not a network failure: no retry.
    let other_pub = ssh_keygen(&tmp.path().join("otherhost"));
    let mut words = other_pub.split_whitespace();
    let (kind, key) = (words.next().unwrap(), words.next().unwrap());
    let pinned = sshd.known_hosts_line();
    let real = pinned.split_whitespace().nth(2).unwrap();
    s.fx.edit_config(real, key);
    let t = Instant::now();
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let restic = result_of(&out, "offsite-restic");
    assert_eq!(restic["retries"], 0, "{restic} ({kind})");
    assert!(
        restic["error"]
            .as_str()
            .unwrap()
            .contains("agex repo trust"),
        "{restic}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn borg_network_failures_are_retried_and_counted_other_failures_are_not() {
    let test = "borg_network_failures_are_retried_and_counted_other_failures_are_not";
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup_over(test, tmp.path(), 1 << 20, Over::BorgOnly) else {
        return;
    };
    let proxy = FlakyProxy::start(sshd.port());
    through_port(&s, &sshd, proxy.port);
    s.init_repos();

    // Two connections reset before ssh logs in: borg runs again twice, the archive is
    // written, the record counts both retries and the output says so.
    proxy.fail_next(2);
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_ok(&out);
    assert_eq!(proxy.resets(), 2);
    let borg = result_of(&out, "offsite-borg");
    assert_eq!(borg["result"], "ok", "{borg}");
    assert_eq!(borg["retries"], 2, "{borg}");
    assert_eq!(result_of(&out, "offsite-restic")["retries"], 0);
    proxy.fail_next(1);
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    assert!(ok_after_retries(&out, "offsite-borg").contains("1 retry"));
    run(
        borg_ssh(&s, &sshd).arg("check").arg(sshd.url("borg")),
        "borg check after retried runs",
    );
    let list = borg_ssh(&s, &sshd)
        .args(["list", "--short"])
        .arg(sshd.url("borg"))
        .output()
        .unwrap();
    assert_ok(&list);
    assert_eq!(stdout(&list).lines().count(), 2, "{}", stdout(&list));

    // A server that keeps resetting: borg gives up after 5 retries, named, and the
    // other repository completes.
    proxy.fail_next(usize::MAX);
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let borg = result_of(&out, "offsite-borg");
    assert_eq!(borg["result"], "failed", "{borg}");
    assert_eq!(borg["retries"], 5, "{borg}");
    assert_eq!(result_of(&out, "offsite-restic")["result"], "ok");
    proxy.fail_next(0);

    // A wrong passphrase is not a network failure: it fails at once, no retry.
    set_secret(&s, "borg-passphrase", b"not-the-passphrase");
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let borg = result_of(&out, "offsite-borg");
    assert_eq!(borg["result"], "failed", "{borg}");
    assert_eq!(borg["retries"], 0, "{borg}");

    // Nor is a repository that is not there.
    s.fx.edit_config("/borg\"", "/missing\"");
    let out = s.agex(&["--json", "backup", "--service", "testapp"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let borg = result_of(&out, "offsite-borg");
    assert_eq!(borg["retries"], 0, "{borg}");
}

/// A small tmpfs mounted over a repository directory on the server, owned by the
/// server's user; unmounted (with what it holds) when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, user: &str, size: &str) -> SmallDisk {
        fs::create_dir_all(dir).unwrap();
        run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("tmpfs")
                .arg(dir),
            "mount tmpfs",
        );
        run(
            Command::new("chown").arg(format!("{user}:")).arg(dir),
            "chown",
        );
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }

    /// Fills it up but for `leave` bytes (with a file the server's user cannot remove).
    fn fill(&self, leave: u64) {
        let stat = rustix::fs::statvfs(&self.dir).unwrap();
        let free = stat.f_bavail * stat.f_frsize;
        let filler = fs::File::create(self.dir.join("filler")).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(filler);
        let block = vec![0x5au8; 4096];
        let mut left = free.saturating_sub(leave);
        while left > 0 {
            let n = left.min(4096) as usize;
            if w.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
    }

    fn free(&self) {
        fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_full_disk_on_the_server_fails_that_repository_clearly_and_the_next_run_completes() {
    let test = "a_full_disk_on_the_server_fails_that_repository_clearly_and_the_next_run_completes";
    if !common::is_root(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup(test, tmp.path(), 0) else {
        return;
    };
    let restic_disk = SmallDisk::mount(&sshd.repo_path("restic"), sshd.user(), "24m");
    let borg_disk = SmallDisk::mount(&sshd.repo_path("borg"), sshd.user(), "64m");
    s.init_repos();
    // borg keeps a segment's worth of space free to commit (500 MB by default): this
    // repository's segments are 2 MiB, so that it fits on the small disk.
    let config = sshd.repo_path("borg").join("config");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("max_segment_size = 524288000"), "{text}");
    fs::write(
        &config,
        text.replace("max_segment_size = 524288000", "max_segment_size = 2097152"),
    )
    .unwrap();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    fs::write(s.host("/srv/app/files/new.bin"), pseudo_random(4 << 20, 17)).unwrap();

    // The borg server's disk is full: borg fails, saying so and naming the
    // repository; the Restic side completes (exit 3).
    borg_disk.fill(256 << 10);
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    let line = err
        .lines()
        .find(|l| l.contains("testapp → offsite-borg: FAILED"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("no space left on its server"), "{err}");
    assert!(err.contains("testapp → offsite-restic: ok"), "{err}");
    // Space freed: the repository is whole and the next run completes.
    borg_disk.free();
    run(
        borg_ssh(&s, &sshd).arg("check").arg(sshd.url("borg")),
        "borg check after a full disk",
    );
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));

    // The same for the sftp server of the Restic side.
    fs::write(
        s.host("/srv/app/files/newer.bin"),
        pseudo_random(4 << 20, 19),
    )
    .unwrap();
    restic_disk.fill(256 << 10);
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    let line = err
        .lines()
        .find(|l| l.contains("testapp → offsite-restic: FAILED"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("no space left on the server"), "{err}");
    assert!(err.contains("testapp → offsite-borg: ok"), "{err}");
    restic_disk.free();
    run(
        restic_sftp(&s, &sshd, tmp.path()).args(["check", "--read-data"]),
        "restic check --read-data after a full disk",
    );
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    run(
        restic_sftp(&s, &sshd, tmp.path()).args(["check", "--read-data"]),
        "restic check --read-data after the next run",
    );
    assert_ok(&s.agex(&["drill", "--service", "testapp"]));
}

/// `borg` (the real CLI) for the repository at `url` on [`ssh_setup`]'s sshd.
fn borg_ssh(s: &Setup, sshd: &Sshd) -> Command {
    let key = s.secret_file("borg-ssh-key");
    s.borg(Some(sshd.borg_rsh(&key)))
}

/// Starts `agex backup --service testapp` in the background.
fn backup_in_background(s: &Setup) -> std::process::Child {
    s.agex_command(&["backup", "--service", "testapp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the sshd serves a session (ssh connected, logged in).
fn wait_for_session(sshd: &Sshd) {
    let t = Instant::now();
    while sshd.signal_sessions(0) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no ssh session came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sftp_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes() {
    let test = "sftp_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes";
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, mut sshd)) = ssh_setup_over(test, tmp.path(), 8 << 20, Over::SftpOnly) else {
        return;
    };
    s.init_repos();
    // Another host key answers: that repository fails, named, saying how to trust the
    // server; the other completes (exit 3).
    let pinned = sshd.known_hosts_line();
    let other_pub = ssh_keygen(&tmp.path().join("otherhost"));
    let mut words = other_pub.split_whitespace();
    let fake = format!(
        "[127.0.0.1]:{} {} {}",
        sshd.port(),
        words.next().unwrap(),
        words.next().unwrap()
    );
    s.fx.edit_config(&pinned, &fake);
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 3);
    assert!(err.contains("repository `offsite-restic`"), "{err}");
    assert!(err.contains("agex repo trust"), "{err}");
    assert!(err.contains("testapp → offsite-borg: ok"), "{err}");
    s.fx.edit_config(&fake, &pinned);

    // Slow uploads, so the server can die while the backup writes to it.
    repo_line(&s, "offsite-restic", "limit_upload = \"1 MiB/s\"");
    let child = backup_in_background(&s);
    wait_for_session(&sshd);
    std::thread::sleep(Duration::from_secs(2));
    sshd.kill();
    let out = child.wait_with_output().unwrap();
    let err = assert_fails(&out, 3);
    assert!(err.contains("testapp → offsite-restic: FAILED"), "{err}");
    assert!(err.contains("testapp → offsite-borg: ok"), "{err}");

    // The server is back: the next run completes and the restic CLI finds the
    // repository whole, over sftp.
    sshd.restart();
    s.fx.edit_config("limit_upload = \"1 MiB/s\"\n", "");
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    run(
        restic_sftp(&s, &sshd, tmp.path()).args(["check", "--read-data"]),
        "restic check --read-data over sftp after the server came back",
    );
}

#[test]
fn borg_ssh_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes() {
    let test = "borg_ssh_server_dying_mid_backup_fails_that_repository_and_the_next_run_completes";
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, mut sshd)) = ssh_setup_over(test, tmp.path(), 8 << 20, Over::BorgOnly) else {
        return;
    };
    s.init_repos();
    repo_line(&s, "offsite-borg", "limit_upload = \"1 MiB/s\"");
    let child = backup_in_background(&s);
    wait_for_session(&sshd);
    std::thread::sleep(Duration::from_secs(2));
    sshd.kill();
    let out = child.wait_with_output().unwrap();
    let err = assert_fails(&out, 3);
    assert!(err.contains("testapp → offsite-borg: FAILED"), "{err}");
    assert!(err.contains("testapp → offsite-restic: ok"), "{err}");

    sshd.restart();
    s.fx.edit_config("limit_upload = \"1 MiB/s\"\n", "");
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    run(
        borg_ssh(&s, &sshd).arg("check").arg(sshd.url("borg")),
        "borg check after the server came back",
    );
}

/// A database whose dump (48 MiB) is much larger than what the tee, the pipes and TCP
/// hold in between: a repository that stops taking it holds the other one up.
fn big_dump(s: &Setup) {
    blob_rows(s, 12000);
}

/// A run with one server hung, begun at `started`: it failed (exit 3), borg's side
/// completed, the hung repository failed for the hang (see [`hung_failure`]), and the
/// run ended within `limit`.
fn left_behind(out: &std::process::Output, started: Instant, what: &str, limit: Duration) {
    let err = assert_fails(out, 3);
    assert!(err.contains("testapp → offsite-borg: ok"), "{err}");
    hung_failure(&err);
    eprintln!(
        "{what}: the run ended after {:?}:\n{err}",
        started.elapsed()
    );
    assert!(started.elapsed() < limit, "{:?}", started.elapsed());
}

/// The hung repository failed for the hang: left behind by `stall_timeout` while the
/// other waited for it, or (when rustic_core had taken the whole dump into its packs
/// before the server stopped, so nobody waited) its own request deadline.
fn hung_failure(err: &str) {
    let line = err
        .lines()
        .find(|l| l.contains("testapp → offsite-restic: FAILED"))
        .unwrap_or_else(|| panic!("offsite-restic did not fail: {err}"));
    assert!(
        [
            "left behind",
            "timeout",
            "no answer from the server",
            "error sending request"
        ]
        .iter()
        .any(|why| line.contains(why)),
        "{line}"
    );
}

#[test]
fn a_hung_s3_or_sftp_server_is_left_behind_and_the_other_completes() {
    let test = "a_hung_s3_or_sftp_server_is_left_behind_and_the_other_completes";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    // S3: the whole server stops (SIGSTOP) while the backup writes to it.
    if let Some(weed) = SeaweedFs::start(test) {
        let tmp = tempfile::tempdir().unwrap();
        let url = weed.url("agex-hang", "bunk");
        let s = Setup::new(&url, &tmp.path().join("borg").display().to_string(), false);
        repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
        set_secret(&s, "b2-credentials", weed.env_secret().as_bytes());
        s.fx.edit_config("lock_wait = 5", "lock_wait = 5\nstall_timeout = 3");
        s.policy("testapp", SQLITE_POLICY);
        app_data(&s, 0);
        big_dump(&s);
        s.init_repos();
        let t = Instant::now();
        let child = backup_in_background(&s);
        std::thread::sleep(Duration::from_secs(1));
        weed.signal(libc::SIGSTOP);
        let out = child.wait_with_output().unwrap();
        weed.signal(libc::SIGCONT);
        left_behind(&out, t, "S3 hang", Duration::from_secs(60));
        // Hung before the run opens the repository: the open is left behind as well
        // (it was not watched, and waited out two 30 s request timeouts).
        weed.signal(libc::SIGSTOP);
        let t = Instant::now();
        let out = backup_in_background(&s).wait_with_output().unwrap();
        weed.signal(libc::SIGCONT);
        left_behind(&out, t, "S3 hung at the start", Duration::from_secs(25));
    }
    // sftp: the session's server processes stop.
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup_over(test, tmp.path(), 0, Over::SftpOnly) else {
        return;
    };
    big_dump(&s);
    s.fx.edit_config("lock_wait = 5", "lock_wait = 5\nstall_timeout = 3");
    s.init_repos();
    let t = Instant::now();
    let child = backup_in_background(&s);
    wait_for_session(&sshd);
    sshd.signal_sessions(libc::SIGSTOP);
    let out = child.wait_with_output().unwrap();
    sshd.signal_sessions(libc::SIGCONT);
    left_behind(&out, t, "sftp hang", Duration::from_secs(60));
}

/// `stall_timeout` is for a repository that does nothing: one that is slower than the
/// other but at work (borg reading and uploading files at its `limit_upload`) is waited
/// for at a dump however much longer than the timeout it takes to reach it.
#[test]
fn a_slow_repository_at_work_is_waited_for_longer_than_the_stall_timeout() {
    let test = "a_slow_repository_at_work_is_waited_for_longer_than_the_stall_timeout";
    if !have_tool("borg", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // borg over ssh at 4 MiB/s reads 32 MiB of files for ~8 s before it reaches the dump
    // (it reports progress every chunk, ~0.5 s); the Restic side (a local directory)
    // reaches the dump at once and waits.
    let Some((s, _sshd)) = ssh_setup_over(test, tmp.path(), 32 << 20, Over::BorgOnly) else {
        return;
    };
    repo_line(&s, "offsite-borg", "limit_upload = \"4 MiB/s\"");
    s.fx.edit_config("lock_wait = 5", "lock_wait = 5\nstall_timeout = 3");
    // A dump larger than the tee and the pipes hold: its producer waits for borg.
    blob_rows(&s, 1800);
    s.init_repos();
    let t = Instant::now();
    let out = backup_in_background(&s).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("testapp → offsite-borg: ok"), "{err}");
    assert!(err.contains("testapp → offsite-restic: ok"), "{err}");
    // Else borg was not slow enough for the Restic side to wait past the timeout.
    assert!(t.elapsed() > Duration::from_secs(6), "{:?}", t.elapsed());
}

/// The fenced block of the recovery kit whose first line is `# kit: <title>`.
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
/// clean environment (no agex, no credentials, a private HOME).
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

/// Every command a user runs on a Restic repository, on `offsite-restic` (remote),
/// each checked by its effect; then the recovery kit's blocks for it, followed
/// literally with age and restic alone. `restic` is the restic CLI for the repository.
fn walk_the_commands(s: &Setup, tmp: &Path, restic: &dyn Fn() -> Command) {
    let repo = "offsite-restic";
    s.policy(
        "testapp",
        &format!("{SQLITE_POLICY}\n[retention]\nkeep_last = 1\n"),
    );
    for _ in 0..2 {
        assert_ok(&s.agex(&["backup", "--service", "testapp", "--repo", repo]));
    }
    let snaps = s.agex(&["--json", "snapshots", "--repo", repo]);
    assert_ok(&snaps);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&snaps)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_ok(&s.agex(&["forget", "--service", "testapp", "--repo", repo, "--prune"]));
    // restic's own view after the prune: one snapshot, every pack whole.
    let peer = stdout(&run(
        restic().args(["snapshots", "--json"]),
        "restic snapshots",
    ));
    let peer: serde_json::Value = serde_json::from_str(&peer).unwrap();
    assert_eq!(peer.as_array().unwrap().len(), 1, "{peer}");
    run(
        restic().args(["check", "--read-data"]),
        "restic check after prune",
    );

    assert_ok(&s.agex(&["repo", "unlock", repo]));
    let old = s.fx.decrypt("restic-password");
    assert_ok(&s.agex(&["repo", "rotate-password", repo]));
    assert_ne!(s.fx.decrypt("restic-password"), old);
    // The restic CLI opens it with the new password (read from the secret again).
    run(
        restic().arg("snapshots"),
        "restic snapshots with the new password",
    );
    assert_ok(&s.agex(&["repo", "check", repo]));
    assert_ok(&s.agex(&["drill", "--service", "testapp", "--repo", repo]));
    let status = s.agex(&["--json", "status"]);
    assert_ok(&status);
    assert!(stdout(&status).contains(repo), "{}", stdout(&status));

    let kit_path = tmp.join("kit.txt");
    assert_ok(&s.agex(&["recovery", "kit", "--out", kit_path.to_str().unwrap()]));
    let kit = fs::read_to_string(&kit_path).unwrap();
    for secret in ["restic-password", "b2-credentials", "borg-ssh-key"] {
        let plain = s.fx.decrypt(secret);
        for line in String::from_utf8_lossy(&plain)
            .lines()
            .filter(|l| l.len() > 12 && !l.starts_with('#') && !l.starts_with("-----"))
        {
            assert!(!kit.contains(line), "the kit leaks {secret}");
        }
    }
    let home = tmp.join("kit-home");
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
    let listed = follow(
        &kit_block(&kit, &format!("{repo} list")),
        &[("RECOVERY_KEY", &key), ("CONFIG", &config)],
        &home,
    );
    assert_ok(&listed);
    assert!(stdout(&listed).contains("testapp"), "{}", stdout(&listed));
    let target = tmp.join("kit-restored");
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
    assert_eq!(
        fs::read(target.join("srv/app/files/big.bin")).unwrap(),
        fs::read(s.host("/srv/app/files/big.bin")).unwrap()
    );
    // The decrypted key and host keys lived in a private directory each block removed.
    // Another test's kit may be at work at the same time: its directory goes when its
    // block ends.
    let t = Instant::now();
    let mut left: Vec<String> = kit_dirs().difference(&before).cloned().collect();
    while !left.is_empty() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
        left = kit_dirs().difference(&before).cloned().collect();
    }
    assert!(left.is_empty(), "the kit left {left:?} in /dev/shm");
}

#[test]
fn every_command_and_the_recovery_kit_work_over_s3() {
    let test = "every_command_and_the_recovery_kit_work_over_s3";
    if !have_tool("restic", test)
        || !have_tool("borg", test)
        || !have_tool("sqlite3", test)
        || !have_tool("age", test)
    {
        return;
    }
    let Some(weed) = SeaweedFs::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let url = weed.url("agex-walk", "bunk");
    let s = Setup::new(&url, &tmp.path().join("borg").display().to_string(), false);
    repo_line(&s, "offsite-restic", "env_secret = \"b2-credentials\"");
    set_secret(&s, "b2-credentials", weed.env_secret().as_bytes());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    assert_ok(&s.agex(&["repo", "init", "offsite-restic"]));
    walk_the_commands(&s, tmp.path(), &|| restic_s3(&s, &weed, &url));
}

#[test]
fn every_command_and_the_recovery_kit_work_over_sftp() {
    let test = "every_command_and_the_recovery_kit_work_over_sftp";
    if !have_tool("age", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((s, sshd)) = ssh_setup_over(test, tmp.path(), 1 << 20, Over::SftpOnly) else {
        return;
    };
    assert_ok(&s.agex(&["repo", "init", "offsite-restic"]));
    walk_the_commands(&s, tmp.path(), &|| restic_sftp(&s, &sshd, tmp.path()));
}

/// Runs `cmd` to its end while checking, every 20 ms, that no process's argv holds one
/// of `needles` (passwords, keys, credentials); returns its output and how many
/// processes it saw that `cmd` started (so the caller knows children were watched).
fn output_watching_argv(cmd: &mut Command, needles: &[String]) -> (std::process::Output, usize) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let needles = needles.to_vec();
    let watcher = std::thread::spawn(move || {
        let parent_of = |p: i32| -> Option<i32> {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let mut children = std::collections::BTreeSet::new();
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            for (p, line) in all_cmdlines() {
                for n in &needles {
                    assert!(
                        !line.contains(n.as_str()),
                        "process {p}'s argv holds a secret: {line}"
                    );
                }
                if parent_of(p) == Some(pid) {
                    children.insert(p);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        children.len()
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().expect("a secret was seen in an argv");
    (out, seen)
}
