//! One kill harness for every command that writes (issue 15 §4). Each command is run
//! once to measure how long it takes; then, `AGEX_KILL_TRIALS` times (default 2), it is
//! started again and sent SIGKILL at a moment drawn uniformly over that duration, and
//! the invariant written next to it is checked: what it leaves behind is consistent,
//! no child it started (borg, sqlite, a systemctl) outlives it, and the next run
//! completes. `AGEX_KILL_SEED` replays the moments of a failed run (each test prints it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::setup::{app_data, recording_systemctl, Setup, SQLITE_POLICY};
use common::{assert_ok, have_tool, stderr, stdout, Fixture};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The trials of one command: how many, and the moments they are killed at.
struct Trials {
    name: &'static str,
    count: usize,
    rng: StdRng,
    runs: usize,
    killed: usize,
}

impl Trials {
    fn new(name: &'static str) -> Trials {
        let count = std::env::var("AGEX_KILL_TRIALS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let seed = std::env::var("AGEX_KILL_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| rand::thread_rng().gen());
        eprintln!("{name}: {count} trials, AGEX_KILL_SEED={seed}");
        Trials {
            name,
            count,
            rng: StdRng::seed_from_u64(seed),
            runs: 0,
            killed: 0,
        }
    }

    /// Starts `cmd`, sends it SIGKILL at a moment uniform over `span`, and waits for
    /// every process it had started then to end too.
    fn kill(&mut self, cmd: &mut Command, span: Duration, trial: usize) {
        let delay = Duration::from_micros(self.rng.gen_range(0..=span.as_micros() as u64));
        // stdin is the caller's (the fixture's commands read none).
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agex");
        let started = Instant::now();
        // Descendants are collected while agex runs: the ones alive at the kill are
        // those it must not leave behind.
        let mut family = BTreeSet::new();
        while started.elapsed() < delay {
            family.extend(descendants(child.id()));
            std::thread::sleep(
                Duration::from_micros(500).min(delay - started.elapsed().min(delay)),
            );
        }
        family.extend(descendants(child.id()));
        let running = child.try_wait().expect("wait").is_none();
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let status = child.wait().expect("wait");
        self.runs += 1;
        if running {
            self.killed += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let left =
            || -> Vec<(u32, String)> { family.iter().filter_map(|p| alive(p.clone())).collect() };
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = left();
        assert!(
            left.is_empty(),
            "{} trial {trial}: killed after {delay:?} ({status}); its children outlived it by 10 s: {left:?}",
            self.name
        );
        eprintln!(
            "{} trial {trial}: {} after {delay:?} of {span:?}",
            self.name,
            if running { "killed" } else { "had finished" }
        );
    }

    fn report(&self) {
        eprintln!(
            "{}: {} of {} runs killed while they ran, 0 violations",
            self.name, self.killed, self.runs
        );
    }
}

/// Every descendant of `pid` (through /proc's children lists).
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if let Some(entry) = alive(c) {
                    out.push(entry);
                }
                todo.push(c);
            }
        }
    }
    out
}

/// `(pid, "name start-time")` of a process that exists and is not a zombie.
fn alive(pid: impl Into<PidKey>) -> Option<(u32, String)> {
    let key = pid.into();
    let stat = fs::read_to_string(format!("/proc/{}/stat", key.pid)).ok()?;
    let close = stat.rfind(')')?;
    let name = stat.get(stat.find('(')? + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    // Field 22 (starttime) tells a reused pid from the process we saw.
    let id = format!("{name} {}", fields.get(19)?);
    match &key.id {
        Some(seen) if *seen != id => None,
        _ => Some((key.pid, id)),
    }
}

struct PidKey {
    pid: u32,
    id: Option<String>,
}

impl From<u32> for PidKey {
    fn from(pid: u32) -> Self {
        PidKey { pid, id: None }
    }
}

impl From<(u32, String)> for PidKey {
    fn from((pid, id): (u32, String)) -> Self {
        PidKey { pid, id: Some(id) }
    }
}

/// How long `cmd` takes to complete (it must succeed).
fn measure(mut cmd: Command) -> Duration {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("run agex");
    assert_ok(&out);
    t.elapsed().max(Duration::from_millis(1))
}

/// Every secret of the bunk example with its plaintext (admin key).
fn plaintexts(fx: &Fixture) -> BTreeMap<String, Vec<u8>> {
    let out = fx.run(&["--json", "secrets", "list"]);
    assert_ok(&out);
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<String> = list
        .as_array()
        .expect("secrets list --json is an array")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    assert!(!names.is_empty());
    names
        .into_iter()
        .map(|n| {
            let p = fx.decrypt(&n);
            (n, p)
        })
        .collect()
}

/// What `agex decrypt NAME` gives now: `Some(plaintext)`, or `None` when it fails.
fn try_decrypt(fx: &Fixture, name: &str) -> Option<Vec<u8>> {
    let out = fx.run_admin(&["decrypt", name]);
    out.status.success().then_some(out.stdout)
}

const EXTRA_KEY: &str = "age12saw5wv8qr598u7xu2zc0lfx2ujdtajl70pqd35xvy4y3t7cfvcspjxpdm";

/// `rekey` killed: every secret still decrypts to its (unchanged) value, `check` names
/// the stale ones, and the next `rekey` completes with `check` clean after it.
#[test]
fn rekey_killed_leaves_every_secret_readable_and_check_names_the_stale_ones() {
    let fx = Fixture::bunk();
    let before = plaintexts(&fx);
    let admin = fx.key("admin.txt");
    let rekey = || {
        let mut c = fx.agex();
        c.arg("-i").arg(&admin).arg("rekey");
        c
    };
    // The recipients change on every trial: a key joins the admins, then leaves.
    let mut with_extra = false;
    let mut toggle = |fx: &Fixture| {
        if with_extra {
            fx.edit_config(&format!("extra = \"{EXTRA_KEY}\"\n"), "");
            fx.edit_config(
                "admins   = [\"admin\", \"extra\"]",
                "admins   = [\"admin\"]",
            );
        } else {
            fx.edit_config("[groups]", &format!("extra = \"{EXTRA_KEY}\"\n[groups]"));
            fx.edit_config(
                "admins   = [\"admin\"]",
                "admins   = [\"admin\", \"extra\"]",
            );
        }
        with_extra = !with_extra;
    };
    toggle(&fx);
    let span = measure(rekey());
    let mut trials = Trials::new("rekey");
    for trial in 0..trials.count {
        toggle(&fx);
        trials.kill(&mut rekey(), span, trial);
        for (name, value) in &before {
            assert_eq!(
                try_decrypt(&fx, name).as_ref(),
                Some(value),
                "rekey trial {trial}: `{name}` no longer decrypts to its value"
            );
        }
        let check = fx.run(&["check"]);
        if !check.status.success() {
            let text = format!("{}{}", stdout(&check), stderr(&check));
            assert!(
                text.contains("stale") || text.contains("rekey"),
                "rekey trial {trial}: check fails without naming stale secrets:\n{text}"
            );
        }
        assert_ok(&rekey().output().unwrap());
        assert_ok(&fx.run(&["check"]));
    }
    trials.report();
}

/// `agex encrypt NAME` of `value`, started (stdin written and closed).
fn encrypt_cmd(fx: &Fixture, name: &str, value: &[u8]) -> std::process::Child {
    let mut child = fx
        .agex()
        .args(["encrypt", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(value).unwrap();
    child
}

/// `encrypt` killed: the secret decrypts to its old or its new value, never neither;
/// `check` is clean or names it stale until a rekey; the next `encrypt` completes.
#[test]
fn encrypt_killed_leaves_the_old_or_the_new_value() {
    let fx = Fixture::bunk();
    let name = "grafana-admin-password";
    let t = Instant::now();
    assert_ok(
        &encrypt_cmd(&fx, name, b"measure\n")
            .wait_with_output()
            .unwrap(),
    );
    let span = t.elapsed();
    let mut trials = Trials::new("encrypt");
    let mut old = b"measure\n".to_vec();
    for trial in 0..trials.count {
        let new = format!("value-{trial}\n").into_bytes();
        // The value goes in through a file on stdin: the kill must not race a pipe write.
        let input = fx.tmp.path().join("input");
        fs::write(&input, &new).unwrap();
        let mut cmd = fx.agex();
        cmd.args(["encrypt", name]);
        trials.kill(cmd.stdin(fs::File::open(&input).unwrap()), span, trial);
        let now = try_decrypt(&fx, name);
        assert!(
            now.as_ref() == Some(&old) || now.as_ref() == Some(&new),
            "encrypt trial {trial}: `{name}` decrypts to {now:?}, neither old nor new"
        );
        // Killed between the file and secrets.lock, the file is stale: check names it
        // (and only it) and says to rekey, which makes it clean (the issue's invariant).
        let check = fx.run(&["check"]);
        if !check.status.success() {
            let text = stdout(&check);
            assert!(
                text.lines()
                    .filter(|l| l.starts_with("stale"))
                    .all(|l| l.contains(&format!("{name}.age"))),
                "encrypt trial {trial}: check fails on more than `{name}`:\n{text}"
            );
            assert!(
                text.contains("agex rekey"),
                "encrypt trial {trial}:\n{text}"
            );
            assert_ok(&fx.run_admin(&["rekey"]));
            assert_ok(&fx.run(&["check"]));
        }
        let next = format!("next-{trial}\n").into_bytes();
        assert_ok(&encrypt_cmd(&fx, name, &next).wait_with_output().unwrap());
        assert_eq!(try_decrypt(&fx, name), Some(next.clone()));
        old = next;
    }
    trials.report();
}

/// `generate` killed: each missing secret is still missing or complete (it decrypts to
/// a value of its generator), never a broken file; the next `generate` completes and
/// `check` is clean.
#[test]
fn generate_killed_leaves_each_secret_missing_or_complete() {
    let fx = Fixture::bunk();
    let missing = ["immich-db-password", "vikunja-jwt-secret", "borg-ssh-key"];
    let remove = || {
        for name in missing {
            fs::remove_file(fx.dir().join(format!("secrets/{name}.age"))).unwrap();
        }
    };
    remove();
    let span = measure({
        let mut c = fx.agex();
        c.arg("generate");
        c
    });
    let mut trials = Trials::new("generate");
    for trial in 0..trials.count {
        remove();
        let mut cmd = fx.agex();
        cmd.arg("generate");
        trials.kill(&mut cmd, span, trial);
        for name in missing {
            let file = fx.dir().join(format!("secrets/{name}.age"));
            if file.exists() {
                let value = try_decrypt(&fx, name).unwrap_or_else(|| {
                    panic!("generate trial {trial}: {name}.age exists but does not decrypt")
                });
                assert!(!value.is_empty(), "generate trial {trial}: {name} is empty");
            }
        }
        assert_ok(&fx.run(&["generate"]));
        for name in missing {
            assert!(
                try_decrypt(&fx, name).is_some(),
                "{name} after the next generate"
            );
        }
        // Killed between a file and secrets.lock, the file is stale: check names it and
        // says to rekey, which makes it clean.
        let check = fx.run(&["check"]);
        if !check.status.success() {
            let text = stdout(&check);
            assert!(
                text.lines()
                    .filter(|l| l.starts_with("stale"))
                    .all(|l| missing.iter().any(|m| l.contains(&format!("{m}.age")))),
                "generate trial {trial}: check fails on more than the generated secrets:\n{text}"
            );
            assert!(
                text.contains("agex rekey"),
                "generate trial {trial}:\n{text}"
            );
            assert_ok(&fx.run_admin(&["rekey"]));
            assert_ok(&fx.run(&["check"]));
        }
    }
    trials.report();
}

/// A new age identity file in `dir`; returns its path and public key.
fn age_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.txt"));
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .expect("age-keygen");
    assert_ok(&out);
    let public = stderr(&out)
        .trim()
        .trim_start_matches("Public key: ")
        .to_string();
    (path, public)
}

/// `host rekey` killed: every secret still decrypts to its value (its recipients are
/// the old host key or the new one, never neither), `check` is clean or names the stale
/// ones, and the next `host rekey` to the same key completes: `check` clean, and the
/// host's secrets open with its new key.
#[test]
fn host_rekey_killed_leaves_every_secret_readable_and_the_next_run_completes() {
    let test = "host_rekey_killed_leaves_every_secret_readable_and_the_next_run_completes";
    if !have_tool("age-keygen", test) || !have_tool("age", test) {
        return;
    }
    let fx = Fixture::bunk();
    let before = plaintexts(&fx);
    let keys = [
        age_key(fx.tmp.path(), "host-a"),
        age_key(fx.tmp.path(), "host-b"),
    ];
    let rekey = |public: &str| {
        let mut c = fx.agex();
        c.arg("-i")
            .arg(fx.key("admin.txt"))
            .args(["host", "rekey", "bunk", "--key", public]);
        c
    };
    let span = measure(rekey(&keys[0].1));
    let mut trials = Trials::new("host rekey");
    for trial in 0..trials.count {
        let (identity, public) = &keys[(trial + 1) % 2];
        trials.kill(&mut rekey(public), span, trial);
        for (name, value) in &before {
            assert_eq!(
                try_decrypt(&fx, name).as_ref(),
                Some(value),
                "host rekey trial {trial}: `{name}` no longer decrypts to its value"
            );
        }
        let check = fx.run(&["check"]);
        if !check.status.success() {
            let text = format!("{}{}", stdout(&check), stderr(&check));
            assert!(
                text.contains("stale") && text.contains("rekey"),
                "host rekey trial {trial}: check fails without naming stale secrets:\n{text}"
            );
        }
        assert_ok(&rekey(public).output().unwrap());
        assert_ok(&fx.run(&["check"]));
        let out = Command::new("age")
            .args(["-d", "-i"])
            .arg(identity)
            .arg(fx.dir().join("secrets/grafana-admin-password.age"))
            .output()
            .unwrap();
        assert_ok(&out);
        assert_eq!(
            &out.stdout, &before["grafana-admin-password"],
            "host rekey trial {trial}: the host's new key"
        );
    }
    trials.report();
}

/// `edit` killed while it saves (its `$EDITOR` writes a new value and exits at once):
/// the secret decrypts to its old or its new value, never neither; the plaintext the
/// dead agex left on the RAM filesystem is removed by the next `check`, which is clean or
/// names the secret stale; the next `edit` completes.
#[test]
fn edit_killed_while_saving_leaves_the_old_or_the_new_value() {
    let fx = Fixture::bunk();
    let name = "grafana-admin-password";
    let file = format!("secrets/{name}.age");
    let editor = |value: &str| {
        let path = fx.tmp.path().join("editor.sh");
        fs::write(
            &path,
            format!("#!/bin/sh\nset -e\nprintf '%s' '{value}' > \"$1\"\n"),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let edit = |value: &str| {
        let mut c = fx.agex();
        c.env("EDITOR", editor(value))
            .arg("-i")
            .arg(fx.key("admin.txt"))
            .args(["edit", &file]);
        c
    };
    let span = measure(edit("measured"));
    let mut old = b"measured".to_vec();
    let mut trials = Trials::new("edit");
    for trial in 0..trials.count {
        let new = format!("edited-{trial}");
        trials.kill(&mut edit(&new), span, trial);
        let now = try_decrypt(&fx, name);
        assert!(
            now.as_ref() == Some(&old) || now.as_deref() == Some(new.as_bytes()),
            "edit trial {trial}: `{name}` decrypts to {now:?}, neither old nor new"
        );
        let check = fx.run(&["check"]);
        assert!(
            fx.runtime_leftovers().is_empty(),
            "edit trial {trial}: check left the dead edit's plaintext: {:?}",
            fx.runtime_leftovers()
        );
        if !check.status.success() {
            let text = stdout(&check);
            assert!(
                text.lines()
                    .filter(|l| l.starts_with("stale"))
                    .all(|l| l.contains(&file)),
                "edit trial {trial}: check fails on more than `{name}`:\n{text}"
            );
            assert!(text.contains("agex rekey"), "edit trial {trial}:\n{text}");
            assert_ok(&fx.run_admin(&["rekey"]));
            assert_ok(&fx.run(&["check"]));
        }
        let next = format!("next-{trial}");
        assert_ok(&edit(&next).output().unwrap());
        assert_eq!(try_decrypt(&fx, name), Some(next.clone().into_bytes()));
        old = next.into_bytes();
    }
    trials.report();
}

fn backup_tools(test: &str) -> bool {
    have_tool("restic", test) && have_tool("borg", test) && have_tool("sqlite3", test)
}

/// The bunk example with local restic and borg repositories and a `testapp` policy
/// that stops a unit (through a recording systemctl), backed up once.
struct Backups {
    s: Setup,
    restic_url: String,
    borg_url: String,
    sysctl: PathBuf,
    calls: PathBuf,
}

impl Backups {
    fn new(tmp: &Path) -> Backups {
        let restic_url = tmp.join("restic").display().to_string();
        let borg_url = tmp.join("borg").display().to_string();
        let s = Setup::new(&restic_url, &borg_url, false);
        s.policy(
            "testapp",
            &format!("stop_units = [\"testapp.service\"]\n{SQLITE_POLICY}"),
        );
        app_data(&s, 1 << 20);
        s.init_repos();
        let (sysctl, calls) = recording_systemctl(tmp);
        let b = Backups {
            s,
            restic_url,
            borg_url,
            sysctl,
            calls,
        };
        assert_ok(&b.cmd(&["backup", "--service", "testapp"]).output().unwrap());
        b
    }

    /// `agex ARGS --systemctl <recording>` as the admin, under the root.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.s.agex_command(args);
        c.arg("--systemctl").arg(&self.sysctl);
        c
    }

    /// `restic check --read-data` and `borg check --verify-data` with the real tools.
    fn check_repositories(&self, what: &str) {
        let out = self
            .s
            .restic(&self.restic_url)
            .args(["check", "--read-data"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: restic check --read-data: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let out = self
            .s
            .borg(None)
            .args(["check", "--verify-data"])
            .arg(&self.borg_url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: borg check --verify-data: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }

    /// The last systemctl call for testapp.service is a start (the unit runs again).
    fn unit_started(&self, what: &str) {
        let calls = fs::read_to_string(&self.calls).unwrap_or_default();
        let last = calls
            .lines()
            .rfind(|l| l.contains("testapp.service"))
            .unwrap_or_default()
            .to_string();
        assert!(
            last.starts_with("start "),
            "{what}: testapp.service was left stopped (last call `{last}`)"
        );
    }
}

/// `backup` killed: `restic check --read-data` and `borg check --verify-data` are
/// clean, no borg/sqlite child outlives agex, and the next backup succeeds (starting
/// the policy's unit again).
#[test]
fn backup_killed_leaves_both_repositories_clean_and_the_next_run_succeeds() {
    let test = "backup_killed_leaves_both_repositories_clean_and_the_next_run_succeeds";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Backups::new(tmp.path());
    let span = measure(b.cmd(&["backup", "--service", "testapp"]));
    let mut trials = Trials::new("backup");
    for trial in 0..trials.count {
        // New data each time, so the run has something to write.
        fs::write(
            b.s.host(&format!("/srv/app/files/new-{trial}.bin")),
            common::setup::pseudo_random(1 << 20, trial as u64),
        )
        .unwrap();
        trials.kill(&mut b.cmd(&["backup", "--service", "testapp"]), span, trial);
        b.check_repositories(&format!("backup trial {trial}"));
        assert_ok(&b.cmd(&["backup", "--service", "testapp"]).output().unwrap());
        b.unit_started(&format!("backup trial {trial}"));
    }
    b.check_repositories("after the backups");
    trials.report();
}

/// `forget --prune` killed: both repositories stay clean and the next run succeeds.
#[test]
fn forget_prune_killed_leaves_both_repositories_clean() {
    let test = "forget_prune_killed_leaves_both_repositories_clean";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Backups::new(tmp.path());
    b.s.policy(
        "testapp",
        &format!(
            "stop_units = [\"testapp.service\"]\n{SQLITE_POLICY}\n[retention]\nkeep_last = 1\n"
        ),
    );
    let more = |n: usize| {
        for i in 0..n {
            fs::write(
                b.s.host("/srv/app/files/changing.bin"),
                common::setup::pseudo_random(1 << 19, i as u64 + 100),
            )
            .unwrap();
            assert_ok(&b.cmd(&["backup", "--service", "testapp"]).output().unwrap());
        }
    };
    let forget = || {
        b.s.agex_command(&["forget", "--service", "testapp", "--prune"])
    };
    more(2);
    let span = measure(forget());
    let mut trials = Trials::new("forget --prune");
    for trial in 0..trials.count {
        more(2);
        trials.kill(&mut forget(), span, trial);
        b.check_repositories(&format!("forget trial {trial}"));
        assert_ok(&forget().output().unwrap());
        b.check_repositories(&format!("forget trial {trial}, next run"));
    }
    trials.report();
}

/// Every file below `dir` with its content.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::snapshot(dir)
}

/// `restore --in-place` killed: each file holds its old or its new content, never a
/// part (a copy not yet renamed into place is a dead process's temp file, which the next
/// restore removes); the next restore completes and starts the stopped unit again.
#[test]
fn in_place_restore_killed_leaves_each_file_old_or_new() {
    let test = "in_place_restore_killed_leaves_each_file_old_or_new";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Backups::new(tmp.path());
    let dir = b.s.host("/srv/app/files");
    let restored: BTreeMap<PathBuf, Vec<u8>> = files(&dir)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("cache"))
        .collect();
    // The live data differs from the snapshot in every file (same names).
    let damage = || {
        for (i, p) in restored.keys().enumerate() {
            fs::write(
                dir.join(p),
                common::setup::pseudo_random(4096 + i, 7 + i as u64),
            )
            .unwrap();
        }
    };
    let damaged: BTreeMap<PathBuf, Vec<u8>> = {
        damage();
        files(&dir)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("cache"))
            .collect()
    };
    let restore = || b.cmd(&["restore", "--service", "testapp", "--in-place", "--yes"]);
    let span = measure(restore());
    let mut trials = Trials::new("restore --in-place");
    for trial in 0..trials.count {
        damage();
        trials.kill(&mut restore(), span, trial);
        for (p, content) in files(&dir) {
            if p.starts_with("cache") {
                continue;
            }
            // A killed writer's temp file (`.agex-<pid>-*.tmp`) is no file of the data:
            // the next restore removes it, as the comparison after it proves.
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(".agex-") && name.ends_with(".tmp") {
                continue;
            }
            assert!(
                restored.get(&p) == Some(&content) || damaged.get(&p) == Some(&content),
                "restore trial {trial}: {} is neither its old nor its restored content ({} bytes)",
                p.display(),
                content.len()
            );
        }
        assert_ok(&restore().output().unwrap());
        let now: BTreeMap<PathBuf, Vec<u8>> = files(&dir)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("cache"))
            .collect();
        assert_eq!(now, restored, "restore trial {trial}: the next restore");
        b.unit_started(&format!("restore trial {trial}"));
    }
    trials.report();
}

/// Whether the real restic/borg binary opens the repository with `password`.
fn opens_with(b: &Backups, kind: &str, password: &[u8], dir: &Path) -> bool {
    let file = dir.join(format!("try-{kind}"));
    fs::write(&file, password).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = if kind == "restic" {
        Command::new("restic")
            .args(["-r", &b.restic_url, "--no-cache", "--password-file"])
            .arg(&file)
            .args(["cat", "config"])
            .output()
            .unwrap()
    } else {
        Command::new("borg")
            .env("BORG_PASSCOMMAND", format!("cat {}", file.display()))
            .env_remove("BORG_PASSPHRASE")
            .env("BORG_BASE_DIR", b.s.fx.tmp.path().join("peer-borg"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .args(["list", &b.borg_url])
            .output()
            .unwrap()
    };
    out.status.success()
}

/// `repo rotate-password` killed: the secret or its pending successor always opens the
/// repository, and the next rotation completes.
#[test]
fn rotate_password_killed_leaves_a_password_that_opens() {
    let test = "rotate_password_killed_leaves_a_password_that_opens";
    if !backup_tools(test) || !have_tool("age", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Backups::new(tmp.path());
    let admin = b.s.fx.key("admin.txt");
    for (repo, kind, secret) in [
        ("offsite-restic", "restic", "restic-password"),
        ("offsite-borg", "borg", "borg-passphrase"),
    ] {
        let rotate = || b.s.agex_command(&["repo", "rotate-password", repo]);
        let span = measure(rotate());
        let mut trials = Trials::new(if kind == "restic" {
            "rotate-password (restic)"
        } else {
            "rotate-password (borg)"
        });
        for trial in 0..trials.count {
            trials.kill(&mut rotate(), span, trial);
            let stored = b.s.fx.decrypt(secret);
            let pending_file = b.s.fx.dir().join(format!("secrets/{secret}.age.pending"));
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
            assert!(
                opens_with(&b, kind, &stored, tmp.path())
                    || pending
                        .as_ref()
                        .is_some_and(|p| opens_with(&b, kind, p, tmp.path())),
                "{repo} trial {trial}: neither the secret nor its pending successor opens it"
            );
            assert_ok(&rotate().output().unwrap());
            assert!(!pending_file.exists(), "{repo} trial {trial}: pending left");
            assert!(opens_with(&b, kind, &b.s.fx.decrypt(secret), tmp.path()));
        }
        trials.report();
    }
}

/// `drill` killed: the configuration is untouched, and after the next drill no scratch
/// data is left in the state directory.
#[test]
fn drill_killed_leaves_no_scratch_after_the_next_run() {
    let test = "drill_killed_leaves_no_scratch_after_the_next_run";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Backups::new(tmp.path());
    let config = b.s.fx.snapshot();
    let drill = || b.s.agex_command(&["drill", "--service", "testapp"]);
    let span = measure(drill());
    let scratch = b.s.host("/var/lib/agex/drill");
    let mut trials = Trials::new("drill");
    for trial in 0..trials.count {
        trials.kill(&mut drill(), span, trial);
        assert!(
            b.s.fx.snapshot() == config,
            "drill trial {trial}: the configuration changed"
        );
        assert_ok(&drill().output().unwrap());
        let left: Vec<_> = fs::read_dir(&scratch)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "drill trial {trial}: scratch left in {}: {left:?}",
            scratch.display()
        );
    }
    trials.report();
}

/// The files (relative, with content) of the generation `run/agex` points to, and its
/// number from the marker written last into a complete generation.
fn active_generation(root: &Path) -> (u64, BTreeMap<PathBuf, Vec<u8>>) {
    let link = fs::read_link(root.join("run/agex")).expect("run/agex exists");
    let dir = root.join("run").join(&link);
    let marker: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join(".generation"))
            .unwrap_or_else(|e| panic!("{}: no .generation marker ({e})", dir.display())),
    )
    .unwrap();
    let number = marker["number"].as_u64().expect("marker number");
    let name: u64 = link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("run/agex points to a numbered generation");
    assert_eq!(
        number,
        name,
        "run/agex -> {} holds generation {number}",
        link.display()
    );
    let files = common::snapshot(&dir)
        .into_iter()
        .filter(|(p, _)| !p.to_string_lossy().starts_with('.'))
        .collect();
    (number, files)
}

/// The units restarted and reloaded in the recorded systemctl calls (the generation's
/// timer installs left out), then forgets the calls.
fn take_unit_calls(calls: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = fs::read_to_string(calls).unwrap_or_default();
    let _ = fs::remove_file(calls);
    let (mut restarted, mut reloaded) = (BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let into = match words.next() {
            Some("try-restart") => &mut restarted,
            Some("try-reload-or-restart") => &mut reloaded,
            _ => continue,
        };
        into.extend(
            words
                .filter(|u| !(u.starts_with("agex-") && u.ends_with(".timer")))
                .map(str::to_string),
        );
    }
    (restarted, reloaded)
}

/// `activate` and `rollback` killed: `run/agex` always points to a complete generation
/// (its marker, and exactly the files of that generation with their content); the units
/// whose secrets differ were restarted (and reloaded) all or none — none while the old
/// generation is still the active one — and after the next run all of them.
#[test]
fn activate_and_rollback_killed_leave_run_agex_on_a_complete_generation() {
    let fx = Fixture::bunk();
    let root = fx.root();
    let ssh = root.join("etc/ssh");
    fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("ssh_host_ed25519_key");
    fs::copy(fx.key("bunk_ssh_host_ed25519_key"), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    common::setup::bunk_user_db(&root);
    let _unmount = common::setup::Unmount(root.clone());
    let (sysctl, calls) = recording_systemctl(fx.tmp.path());
    let privileged = common::is_root("activate_and_rollback_killed (runs unmounted instead)");
    let cmd = |args: &[&str]| {
        let mut c = fx.agex();
        c.arg("--root")
            .arg(&root)
            .args(["--host", "bunk"])
            .args(args);
        c.arg("--systemctl").arg(&sysctl);
        if !privileged {
            c.arg("--allow-unmounted");
        }
        c
    };
    let mut expected = BTreeMap::new();
    assert_ok(&cmd(&["activate"]).output().unwrap());
    expected.insert(1, active_generation(&root).1);
    // Units restarted (grafana, smtp's) and reloaded (caddy's token) between 1 and 2.
    for (name, value) in [
        ("grafana-admin-password", "kill-test-grafana\n"),
        ("smtp-password", "kill-test-smtp\n"),
        ("cloudflare-api-token", "kill-test-cloudflare\n"),
    ] {
        assert_ok(
            &encrypt_cmd(&fx, name, value.as_bytes())
                .wait_with_output()
                .unwrap(),
        );
    }
    take_unit_calls(&calls);
    let span_activate = measure(cmd(&["activate"]));
    let (two, files) = active_generation(&root);
    assert_eq!(two, 2);
    assert_ne!(files, expected[&1], "generation 2 differs from 1");
    expected.insert(2, files);
    let units = take_unit_calls(&calls);
    assert!(
        units.0.len() > 1 && !units.1.is_empty(),
        "1 -> 2 restarts several units and reloads one: {units:?}"
    );
    let span_rollback = measure(cmd(&["rollback"]));
    assert_eq!(take_unit_calls(&calls), units, "rollback 2 -> 1");
    let none = (BTreeSet::new(), BTreeSet::new());
    // After a killed switch from `from`: all or none of each kind, none unless switched;
    // after the next run to the same generation, all.
    let check_units = |what: &str, from: u64| {
        let (n, files) = active_generation(&root);
        assert_eq!(files, expected[&n], "{what}: generation {n} incomplete");
        let after_kill = take_unit_calls(&calls);
        for (done, all, verb) in [
            (&after_kill.0, &units.0, "restarted"),
            (&after_kill.1, &units.1, "reloaded"),
        ] {
            assert!(
                done.is_empty() || done == all,
                "{what}: {verb} {done:?}, neither none nor all of {all:?}"
            );
        }
        if n == from {
            assert_eq!(
                after_kill, none,
                "{what}: units restarted, nothing switched"
            );
        }
        after_kill
    };
    let mut trials = Trials::new("activate/rollback");
    for trial in 0..trials.count {
        // Generation 1 is active here: activate 2 (killed), then roll back (killed).
        trials.kill(&mut cmd(&["activate", "2"]), span_activate, trial);
        let killed = check_units(&format!("activate trial {trial}"), 1);
        assert_ok(&cmd(&["activate", "2"]).output().unwrap());
        let next = take_unit_calls(&calls);
        let all = (&killed.0 | &next.0, &killed.1 | &next.1);
        assert_eq!(all, units, "activate trial {trial}: after the next run");
        assert_eq!(active_generation(&root).0, 2);

        trials.kill(&mut cmd(&["rollback"]), span_rollback, trial);
        let killed = check_units(&format!("rollback trial {trial}"), 2);
        assert_ok(&cmd(&["activate", "1"]).output().unwrap());
        let next = take_unit_calls(&calls);
        let all = (&killed.0 | &next.0, &killed.1 | &next.1);
        assert_eq!(all, units, "rollback trial {trial}: after the next run");
        assert_eq!(active_generation(&root).0, 1);
    }
    trials.report();
}

/// `systemd install` killed while it moves from one configuration's units to another's
/// (a policy removed, one's schedule changed, one added): each unit file is the old or
/// the new one, never a mix of the two in one file and never a stranger's; the next run
/// leaves exactly the new units, and between the two runs every new timer was enabled,
/// every changed one restarted, the removed one disabled and systemd reloaded after the
/// last file was written — units all new, none left half-installed.
#[test]
fn systemd_install_killed_leaves_each_unit_old_or_new_and_the_next_run_finishes() {
    let fx = Fixture::bunk();
    let root = fx.root();
    let (sysctl, calls) = recording_systemctl(fx.tmp.path());
    let install = || {
        let mut c = fx.agex();
        c.arg("--root")
            .arg(&root)
            .args(["--host", "bunk", "systemd", "install", "--systemctl"])
            .arg(&sysctl);
        c
    };
    let unit_dir = root.join("etc/systemd/system");
    let policies = fx.dir().join("policies");
    let vikunja = fs::read(policies.join("vikunja.toml")).unwrap();
    let immich = fs::read_to_string(policies.join("immich.toml")).unwrap();
    let to_a = || {
        fs::write(policies.join("vikunja.toml"), &vikunja).unwrap();
        fs::write(policies.join("immich.toml"), &immich).unwrap();
        let _ = fs::remove_file(policies.join("killtest.toml"));
    };
    let to_b = || {
        fs::remove_file(policies.join("vikunja.toml")).unwrap();
        fs::write(
            policies.join("immich.toml"),
            immich.replace("02:30:00", "02:45:00"),
        )
        .unwrap();
        fs::write(
            policies.join("killtest.toml"),
            "paths = [\"/var/lib/killtest\"]\nschedule = \"*-*-* 04:10:00\"\n",
        )
        .unwrap();
    };
    let log = || fs::read_to_string(&calls).unwrap_or_default();
    to_a();
    assert_ok(&install().output().unwrap());
    let a = common::snapshot(&unit_dir);
    to_b();
    let span = measure(install());
    let b = common::snapshot(&unit_dir);
    let timers = |m: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeSet<String> {
        m.keys()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".timer") && !n.contains('/'))
            .collect()
    };
    let new_timers: BTreeSet<String> = &timers(&b) - &timers(&a);
    let gone_timers: BTreeSet<String> = &timers(&a) - &timers(&b);
    let changed_timers: BTreeSet<String> = timers(&a)
        .intersection(&timers(&b))
        .filter(|n| a[Path::new(n.as_str())] != b[Path::new(n.as_str())])
        .cloned()
        .collect();
    assert_eq!(new_timers.len(), 1, "{new_timers:?}");
    assert_eq!(gone_timers.len(), 1, "{gone_timers:?}");
    assert_eq!(changed_timers.len(), 1, "{changed_timers:?}");
    let mut trials = Trials::new("systemd install");
    for trial in 0..trials.count {
        to_a();
        assert_ok(&install().output().unwrap());
        assert!(common::snapshot(&unit_dir) == a, "trial {trial}: back to A");
        let _ = fs::remove_file(&calls);
        to_b();
        trials.kill(&mut install(), span, trial);
        // A dead writer's temp file (`.agex-<pid>-*.tmp`) is no unit (systemd loads only
        // names with a unit type's suffix); the next run removes it, as the comparison
        // with B after it proves.
        let now: BTreeMap<PathBuf, Vec<u8>> = common::snapshot(&unit_dir)
            .into_iter()
            .filter(|(p, _)| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                !(name.starts_with(".agex-") && name.ends_with(".tmp"))
            })
            .collect();
        let names: BTreeSet<&PathBuf> = a.keys().chain(b.keys()).chain(now.keys()).collect();
        for name in names {
            assert!(
                now.get(name) == a.get(name) || now.get(name) == b.get(name),
                "systemd install trial {trial}: {} is neither the old nor the new unit",
                name.display()
            );
        }
        let killed = log();
        assert_ok(&install().output().unwrap());
        assert!(
            common::snapshot(&unit_dir) == b,
            "systemd install trial {trial}: the next run did not leave exactly the new units"
        );
        let all = log();
        let lines: Vec<&str> = all.lines().collect();
        let with = |verb: &str, unit: &str| {
            lines
                .iter()
                .any(|l| l.starts_with(verb) && l.split_whitespace().any(|w| w == unit))
        };
        for t in &new_timers {
            assert!(
                with("enable --now", t),
                "systemd install trial {trial}: {t} never enabled (killed run: {killed:?}; both: {all:?})"
            );
        }
        for t in &changed_timers {
            assert!(
                with("try-restart", t) || with("enable --now", t),
                "systemd install trial {trial}: {t} never restarted ({all:?})"
            );
        }
        for t in &gone_timers {
            assert!(
                with("disable --now", t),
                "systemd install trial {trial}: {t} never disabled ({all:?})"
            );
        }
        assert!(
            lines.contains(&"daemon-reload"),
            "systemd install trial {trial}: systemd never reloaded ({all:?})"
        );
    }
    trials.report();
}
