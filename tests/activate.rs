//! End-to-end tests of generations: build, activate, rollback, restarts, bad input,
//! kill -9 and plaintext hygiene, against the real binary in a temp root.
//!
//! As root (CI), activation mounts a real ramfs/tmpfs under the temp root (unmounted in
//! cleanup) and the ownership test creates real users with `useradd`. Without root the
//! tests that need it print why they skip; the rest run with `--allow-unmounted` and a
//! user database under the root mapping every name to the current user.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_fails, assert_ok, stdout, Fixture};
use rand::Rng;

const HOST: &str = "bunk";
/// Owners and groups the bunk example's rules name.
const USERS: &[&str] = common::setup::BUNK_USERS;
const EARLY: &[&str] = &["root-password-hash"];

fn uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    stdout(&out).trim().parse().unwrap_or(u32::MAX)
}

fn gid() -> u32 {
    let out = Command::new("id").arg("-g").output().expect("id -g");
    stdout(&out).trim().parse().unwrap_or(u32::MAX)
}

/// A temp host: the bunk config, a root with the host key and a user database, and a
/// recording `systemctl`. Unmounts the secrets filesystem when dropped.
struct TestHost {
    fx: Fixture,
    root: PathBuf,
    sysctl: PathBuf,
    calls: PathBuf,
    privileged: bool,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.secrets_fs())
            .stderr(Stdio::null())
            .status();
    }
}

impl TestHost {
    fn new() -> TestHost {
        Self::with_fixture(Fixture::bunk(), true)
    }

    fn with_fixture(fx: Fixture, user_db: bool) -> TestHost {
        let root = fx.root();
        let ssh = root.join("etc/ssh");
        fs::create_dir_all(&ssh).unwrap();
        let key = ssh.join("ssh_host_ed25519_key");
        fs::copy(fx.key("bunk_ssh_host_ed25519_key"), &key).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let privileged = uid() == 0;
        if user_db {
            write_user_db(&root, USERS, privileged);
        }
        let calls = fx.tmp.path().join("systemctl-calls");
        let sysctl = fx.tmp.path().join("systemctl");
        fs::write(
            &sysctl,
            format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
        )
        .unwrap();
        fs::set_permissions(&sysctl, fs::Permissions::from_mode(0o755)).unwrap();
        TestHost {
            fx,
            root,
            sysctl,
            calls,
            privileged,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.fx.agex();
        c.arg("--root").arg(&self.root).args(["--host", HOST]);
        c.args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run agex")
    }

    /// `activate [extra...]` with the recording systemctl (and `--allow-unmounted`
    /// without root).
    fn activate_cmd(&self, extra: &[&str]) -> Command {
        let mut args = vec!["activate", "--systemctl", self.sysctl.to_str().unwrap()];
        if !self.privileged {
            args.push("--allow-unmounted");
        }
        args.extend_from_slice(extra);
        self.cmd(&args)
    }

    fn activate(&self, extra: &[&str]) -> Output {
        self.activate_cmd(extra).output().expect("run agex")
    }

    fn rollback(&self, extra: &[&str]) -> Output {
        let mut args = vec!["rollback", "--systemctl", self.sysctl.to_str().unwrap()];
        if !self.privileged {
            args.push("--allow-unmounted");
        }
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// The recorded systemctl calls since the last time, then forgets them. The calls
    /// that install the generation's timers (daemon-reload, enable, disable, restarting
    /// agex timers) are left out: tests/schedule.rs checks those.
    fn take_calls(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.calls).unwrap_or_default();
        let _ = fs::remove_file(&self.calls);
        let installs_units = |l: &str| {
            l == "daemon-reload"
                || l.starts_with("enable ")
                || l.starts_with("disable ")
                || (l.starts_with("try-restart agex-") && l.ends_with(".timer"))
        };
        text.lines()
            .filter(|l| !installs_units(l))
            .map(str::to_string)
            .collect()
    }

    fn active_target(&self) -> Option<PathBuf> {
        fs::read_link(self.root.join("run/agex")).ok()
    }

    fn active_dir(&self) -> PathBuf {
        let t = self.active_target().expect("run/agex exists");
        self.root.join("run").join(t)
    }

    fn read_active(&self, rel: &str) -> Vec<u8> {
        fs::read(self.active_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn secrets_fs(&self) -> PathBuf {
        self.root.join("run/agex.d")
    }

    /// Leftover staging or trash directories on the secrets filesystem.
    fn leftovers(&self) -> Vec<String> {
        fs::read_dir(self.secrets_fs())
            .map(|it| {
                it.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".staging-") || n.starts_with(".trash-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces a secret's content through `agex encrypt`.
    fn set_secret(&self, name: &str, value: &[u8]) {
        use std::io::Write;
        let mut child = self
            .fx
            .agex()
            .args(["encrypt", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(value).unwrap();
        assert_ok(&child.wait_with_output().unwrap());
    }
}

/// `<root>/etc/passwd` and `group` naming `users` (+ `smtp-users`): real ids as root,
/// every name mapped to the current user otherwise (so chown is allowed).
fn write_user_db(root: &Path, users: &[&str], privileged: bool) {
    let etc = root.join("etc");
    fs::create_dir_all(&etc).unwrap();
    let (mut passwd, mut group) = (
        "root:x:0:0:root:/root:/bin/sh\n".to_string(),
        "root:x:0:\n".to_string(),
    );
    for (i, u) in users.iter().enumerate() {
        let (id_u, id_g) = if privileged {
            (1001 + i as u32, 1001 + i as u32)
        } else {
            (uid(), gid())
        };
        passwd.push_str(&format!(
            "{u}:x:{id_u}:{id_g}::/nonexistent:/usr/sbin/nologin\n"
        ));
        group.push_str(&format!("{u}:x:{id_g}:\n"));
    }
    let smtp = if privileged { 2000 } else { gid() };
    group.push_str(&format!("smtp-users:x:{smtp}:\n"));
    if !privileged {
        passwd = passwd.replace("root:x:0:0:", &format!("root:x:{}:{}:", uid(), gid()));
        group = group.replace("root:x:0:", &format!("root:x:{}:", gid()));
    }
    fs::write(etc.join("passwd"), passwd).unwrap();
    fs::write(etc.join("group"), group).unwrap();
}

/// Every secret delivered to bunk with its services, from `agex secrets list --json`.
fn bunk_secrets(fx: &Fixture) -> BTreeMap<String, Vec<String>> {
    let out = fx.run(&["secrets", "list", "--json"]);
    assert_ok(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().any(|x| x == HOST))
        })
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["services"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The directories a secret lands in.
fn dirs_of(name: &str, services: &[String]) -> Vec<String> {
    if EARLY.contains(&name) {
        vec!["_early".into()]
    } else if services.is_empty() {
        vec!["_shared".into()]
    } else {
        services.to_vec()
    }
}

/// The plaintext of every secret of bunk, decrypted with the admin key.
fn plaintexts(fx: &Fixture, secrets: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<u8>> {
    secrets.keys().map(|n| (n.clone(), fx.decrypt(n))).collect()
}

fn trim(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && matches!(b[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &b[..end]
}

/// Asserts the generation directory holds exactly what the rules say, with this content.
fn assert_generation(
    dir: &Path,
    secrets: &BTreeMap<String, Vec<String>>,
    plain: &BTreeMap<String, Vec<u8>>,
) {
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for (name, services) in secrets {
        for d in dirs_of(name, services) {
            let rel = format!("{d}/{name}");
            let got = fs::read(dir.join(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert_eq!(
                got, plain[name],
                "{rel} does not hold the secret's plaintext"
            );
            expected.insert(rel);
        }
    }
    let immich_env = format!(
        "DB_PASSWORD={}\nREDIS_PASSWORD={}\nDB_DATABASE_NAME=immich\n",
        String::from_utf8_lossy(trim(&plain["immich-db-password"])),
        String::from_utf8_lossy(trim(&plain["immich-redis-password"]))
    );
    for d in ["immich-server.service", "immich-machine-learning.service"] {
        let rel = format!("{d}/immich.env");
        assert_eq!(
            String::from_utf8(fs::read(dir.join(&rel)).unwrap()).unwrap(),
            immich_env
        );
        expected.insert(rel);
    }
    for d in [
        "paperless-web.service",
        "paperless-consumer.service",
        "paperless-scheduler.service",
    ] {
        let rel = format!("{d}/paperless.env");
        let text = String::from_utf8(fs::read(dir.join(&rel)).unwrap()).unwrap();
        assert!(text.contains(&format!(
            "PAPERLESS_EMAIL_HOST_PASSWORD={}\n",
            String::from_utf8_lossy(trim(&plain["smtp-password"]))
        )));
        assert!(!text.contains("{{"), "{rel}: unrendered placeholder");
        expected.insert(rel);
    }
    let rel = "vikunja.service/vikunja-config.yaml".to_string();
    let text = String::from_utf8(fs::read(dir.join(&rel)).unwrap()).unwrap();
    assert!(text.contains(&format!(
        "JWTSecret: \"{}\"",
        String::from_utf8_lossy(trim(&plain["vikunja-jwt-secret"]))
    )));
    expected.insert(rel);

    let mut actual: BTreeSet<String> = BTreeSet::new();
    for d in fs::read_dir(dir).unwrap().flatten() {
        let dn = d.file_name().to_string_lossy().into_owned();
        if dn.starts_with('.') {
            continue;
        }
        for f in fs::read_dir(d.path()).unwrap().flatten() {
            actual.insert(format!("{dn}/{}", f.file_name().to_string_lossy()));
        }
    }
    assert_eq!(actual, expected, "files of the generation directory");
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn fs_type(p: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .unwrap();
    stdout(&out).trim().to_string()
}

/// Every regular file below `dir` (not following links, not entering `skip`) that
/// contains one of `needles`.
fn files_containing(dir: &Path, skip: &Path, needles: &[Vec<u8>]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d == skip {
            continue;
        }
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let data = fs::read(e.path()).unwrap_or_default();
                for n in needles {
                    if data.windows(n.len()).any(|w| w == n.as_slice()) {
                        hits.push(e.path().display().to_string());
                        break;
                    }
                }
            }
        }
    }
    hits
}

#[test]
fn activates_bunk_one_directory_per_service_with_owners_and_modes() {
    let host = TestHost::new();
    let out = host.activate(&[]);
    assert_ok(&out);
    let shown = stdout(&out);
    assert!(shown.contains("activated generation 1"), "{shown}");

    let secrets = bunk_secrets(&host.fx);
    assert!(
        !secrets.contains_key("storagebox-account"),
        "admins-only secret on the host"
    );
    let plain = plaintexts(&host.fx, &secrets);
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/1")));
    let dir = host.active_dir();
    assert_generation(&dir, &secrets, &plain);
    assert!(!dir.join("_shared/storagebox-account").exists());

    // Owners and modes per rule (ids come from <root>/etc/passwd and group).
    let meta = |rel: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(dir.join(rel)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    if host.privileged {
        let immich = 1001 + USERS.iter().position(|u| *u == "immich").unwrap() as u32;
        let hass = 1001 + USERS.iter().position(|u| *u == "hass").unwrap() as u32;
        assert_eq!(
            meta("immich-server.service/immich-db-password"),
            (immich, immich, 0o400)
        );
        assert_eq!(
            meta("immich-server.service/immich.env"),
            (immich, immich, 0o400)
        );
        assert_eq!(meta("vikunja.service/smtp-password"), (0, 2000, 0o440));
        assert_eq!(
            meta("home-assistant.service/home-assistant-secrets"),
            (hass, hass, 0o440)
        );
        assert_eq!(meta("_early/root-password-hash"), (0, 0, 0o400));
        assert_eq!(meta("_shared/restic-password"), (0, 0, 0o400));
        assert!(
            matches!(fs_type(&host.secrets_fs()).as_str(), "ramfs" | "tmpfs"),
            "run/agex.d is {}",
            fs_type(&host.secrets_fs())
        );
    } else {
        assert_eq!(meta("vikunja.service/smtp-password").2, 0o440);
    }
    assert_eq!(mode_of(&host.secrets_fs()), 0o751);
    assert_eq!(mode_of(&dir.join("immich-server.service")), 0o751);

    // The rule's `path` is a link through /run/agex; early secrets under /run/agex-early.
    let link = host.root.join("var/lib/hass/secrets.yaml");
    assert_eq!(
        fs::read_link(&link).unwrap(),
        PathBuf::from("../../../run/agex/home-assistant.service/home-assistant-secrets")
    );
    assert_eq!(fs::read(&link).unwrap(), plain["home-assistant-secrets"]);
    assert_eq!(
        fs::read(host.root.join("run/agex-early/root-password-hash")).unwrap(),
        plain["root-password-hash"]
    );

    // First activation: every unit that uses a secret, in one call per verb.
    let calls = host.take_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].starts_with("try-restart actual.service authelia-main.service"));
    assert!(calls[0].contains("immich-server.service"));
    assert!(!calls[0].contains("caddy.service"));
    assert_eq!(calls[1], "try-reload-or-restart caddy.service");

    // Same inputs, same hash: building again is a no-op.
    let built = host.run(&["build"]);
    assert_ok(&built);
    assert!(
        stdout(&built).contains("generation 1 (unchanged)"),
        "{}",
        stdout(&built)
    );
    let again = host.activate(&[]);
    assert_ok(&again);
    assert!(
        stdout(&again).contains("already active"),
        "{}",
        stdout(&again)
    );
    assert!(host.take_calls().is_empty());
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn second_activation_restarts_only_changed_units_and_rollback_restores() {
    let host = TestHost::new();
    assert_ok(&host.activate(&[]));
    host.take_calls();
    let old = host.read_active("grafana.service/grafana-admin-password");
    let old_redis = host.read_active("immich-server.service/immich-redis-password");

    host.set_secret(
        "grafana-admin-password",
        b"grafana-new-password-0123456789\n",
    );
    let diff = host.run(&["diff"]);
    assert_ok(&diff);
    assert!(
        stdout(&diff)
            .contains("~ secret grafana-admin-password: encrypted content  [grafana.service]"),
        "{}",
        stdout(&diff)
    );
    assert!(!stdout(&diff).contains("grafana-new-password"));

    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("activated generation 2"),
        "{}",
        stdout(&out)
    );
    assert_eq!(host.take_calls(), vec!["try-restart grafana.service"]);
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        b"grafana-new-password-0123456789\n"
    );

    // A `restart = "reload"` secret is reloaded, and nothing else is touched.
    host.set_secret("cloudflare-api-token", b"cf-token-new-abcdefghijklmnop\n");
    assert_ok(&host.activate(&[]));
    assert_eq!(
        host.take_calls(),
        vec!["try-reload-or-restart caddy.service"]
    );

    // A secret used by a template restarts the units of the secret and of the template.
    host.set_secret("immich-redis-password", b"redis-new-abcdefghijklmnop\n");
    assert_ok(&host.activate(&[]));
    assert_eq!(
        host.take_calls(),
        vec!["try-restart immich-machine-learning.service immich-server.service"]
    );
    assert!(
        String::from_utf8(host.read_active("immich-server.service/immich.env"))
            .unwrap()
            .contains("REDIS_PASSWORD=redis-new-abcdefghijklmnop\n")
    );

    let gens = host.run(&["generations", "--json"]);
    assert_ok(&gens);
    let list: serde_json::Value = serde_json::from_slice(&gens.stdout).unwrap();
    let numbers: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
    assert_eq!(list[3]["active"], true);

    // Rollback to generation 1: the old grafana password and token are back.
    let out = host.rollback(&["--to", "1"]);
    assert_ok(&out);
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/1")));
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        old
    );
    let calls = host.take_calls();
    assert_eq!(
        calls,
        vec![
            "try-restart grafana.service immich-machine-learning.service immich-server.service",
            "try-reload-or-restart caddy.service"
        ]
    );

    // Plain rollback goes one back from the active generation... there is none before 1.
    let none = host.rollback(&[]);
    assert_fails(&none, 1);
    // ...and from 4, one back is 3 (the old redis password), decrypted again when its
    // directory is gone.
    assert_ok(&host.activate(&["4", "--no-restart"]));
    assert!(host.take_calls().is_empty());
    agex_wipe(&host.secrets_fs().join("3"));
    let out = host.rollback(&[]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("activated generation 3"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        host.read_active("immich-server.service/immich-redis-password"),
        old_redis
    );
    assert_eq!(
        host.take_calls(),
        vec!["try-restart immich-machine-learning.service immich-server.service"]
    );
}

fn agex_wipe(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn keeps_only_the_configured_number_of_generations() {
    let host = TestHost::new();
    host.fx.edit_config("keep = 5", "keep = 2");
    for i in 0..4 {
        host.set_secret(
            "grafana-admin-password",
            format!("pw-{i}-abcdefghijklmnop").as_bytes(),
        );
        assert_ok(&host.activate(&["--no-restart"]));
    }
    let gens: Vec<String> = fs::read_dir(host.root.join("var/lib/agex/generations"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(gens, vec!["3", "4"]);
    let on_fs: BTreeSet<String> = fs::read_dir(host.secrets_fs())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(on_fs, BTreeSet::from(["3".to_string(), "4".to_string()]));
    let store = fs::read_dir(host.root.join("var/lib/agex/store"))
        .unwrap()
        .count();
    assert_eq!(store, 2);
}

/// Asserts a failed activation changed nothing: same link, same content, no leftovers.
fn assert_untouched(host: &TestHost, target: &Path, grafana: &[u8]) {
    assert_eq!(host.active_target().as_deref(), Some(target));
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        grafana
    );
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_switched() {
    let host = TestHost::new();
    assert_ok(&host.activate(&[]));
    let target = host.active_target().unwrap();
    let grafana = host.read_active("grafana.service/grafana-admin-password");
    host.set_secret(
        "grafana-admin-password",
        b"would-be-new-password-0123456789\n",
    );

    // Identity that matches nothing (the recovery key opens only backup passwords).
    let recovery = host.fx.key("recovery.txt");
    let err = assert_fails(&host.activate(&["-i", recovery.to_str().unwrap()]), 1);
    assert!(err.contains("no identity matches"), "{err}");
    assert_untouched(&host, &target, &grafana);

    // Missing host identity.
    let key = host.root.join("etc/ssh/ssh_host_ed25519_key");
    let saved = fs::read(&key).unwrap();
    fs::remove_file(&key).unwrap();
    let err = assert_fails(&host.activate(&[]), 1);
    assert!(
        err.contains("host identity") && err.contains("does not exist"),
        "{err}"
    );
    assert_untouched(&host, &target, &grafana);
    fs::write(&key, saved).unwrap();

    // Unknown owner: nothing changes, every unknown name is listed.
    let passwd = host.root.join("etc/passwd");
    let saved = fs::read_to_string(&passwd).unwrap();
    let without: String = saved
        .lines()
        .filter(|l| !l.starts_with("immich:"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&passwd, without).unwrap();
    let err = assert_fails(&host.activate(&[]), 2);
    assert!(
        err.contains("user `immich` (used by immich-db-password"),
        "{err}"
    );
    assert_untouched(&host, &target, &grafana);
    fs::write(&passwd, saved).unwrap();

    // Template with a secret the host does not receive: file:line of the placeholder.
    let rules = host.fx.dir().join("secrets/secrets.toml");
    let saved = fs::read_to_string(&rules).unwrap();
    fs::write(
        &rules,
        format!("{saved}\n[templates.\"broken.env\"]\ncontent = \"\"\"\nA={{{{ secret \"immich-db-password\" }}}}\nB={{{{ secret \"storagebox-account\" }}}}\n\"\"\"\n"),
    )
    .unwrap();
    let line = saved.lines().count() + 5;
    let err = assert_fails(&host.activate(&[]), 2);
    assert!(
        err.contains(&format!("secrets.toml:{line}")) && err.contains("storagebox-account"),
        "{err}"
    );
    assert!(err.contains("not delivered to host `bunk`"), "{err}");
    assert_untouched(&host, &target, &grafana);
    // ...and one naming no secret at all is a config error with file:line:col.
    fs::write(
        &rules,
        format!("{saved}\n[templates.\"broken.env\"]\ncontent = \"\"\"\nA={{{{ secret \"nope\" }}}}\n\"\"\"\n"),
    )
    .unwrap();
    let err = assert_fails(&host.activate(&[]), 2);
    assert!(
        err.contains("`nope`") && err.contains("secrets.toml:"),
        "{err}"
    );
    assert_untouched(&host, &target, &grafana);
    fs::write(&rules, saved).unwrap();

    // Corrupted store entries: a changed ciphertext, then a changed manifest.
    let built = host.run(&["build"]);
    assert_ok(&built);
    let entry = PathBuf::from(stdout(&built).trim().rsplit(' ').next().unwrap());
    let file = entry.join("secrets/grafana-admin-password.age");
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(entry.join("secrets"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(&file, &bytes).unwrap();
    let err = assert_fails(&host.activate(&["2"]), 1);
    assert!(
        err.contains("corrupt store entry") && err.contains("grafana-admin-password.age hashes to"),
        "{err}"
    );
    assert_untouched(&host, &target, &grafana);
    let err = assert_fails(&host.activate(&[]), 1);
    assert!(err.contains("corrupt store entry"), "{err}");
    bytes[last] ^= 1;
    fs::write(&file, &bytes).unwrap();

    let manifest = entry.join("manifest.json");
    fs::set_permissions(&entry, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&manifest, fs::Permissions::from_mode(0o600)).unwrap();
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(
        &manifest,
        text.replacen("\"mode\": 288", "\"mode\": 292", 1),
    )
    .unwrap();
    let err = assert_fails(&host.activate(&["2"]), 1);
    assert!(
        err.contains("corrupt store entry") && err.contains("manifest.json hashes to"),
        "{err}"
    );
    assert_untouched(&host, &target, &grafana);
    fs::write(&manifest, text).unwrap();

    // With everything repaired the same activation succeeds.
    assert_ok(&host.activate(&["2"]));
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        b"would-be-new-password-0123456789\n"
    );
}

#[test]
fn no_plaintext_outside_the_secrets_filesystem() {
    if !common::is_root("no_plaintext_outside_the_secrets_filesystem") {
        return;
    }
    let host = TestHost::new();
    let secrets = bunk_secrets(&host.fx);
    let plain = plaintexts(&host.fx, &secrets);
    let mut needles: Vec<Vec<u8>> = plain.values().map(|p| trim(p).to_vec()).collect();
    assert_ok(&host.activate(&[]));
    let fs_dir = host.secrets_fs();
    assert!(matches!(fs_type(&fs_dir).as_str(), "ramfs" | "tmpfs"));
    let hits = files_containing(host.fx.tmp.path(), &fs_dir, &needles);
    assert!(hits.is_empty(), "plaintext outside the tmpfs: {hits:?}");

    // A failed activation (one corrupted ciphertext, while the others are decrypted in
    // parallel) leaves none either.
    host.set_secret(
        "grafana-admin-password",
        b"fresh-grafana-secret-0123456789\n",
    );
    needles.push(b"fresh-grafana-secret-0123456789".to_vec());
    let built = host.run(&["build"]);
    assert_ok(&built);
    let entry = PathBuf::from(stdout(&built).trim().rsplit(' ').next().unwrap());
    let file = entry.join("secrets/wireguard-private-key.age");
    fs::set_permissions(entry.join("secrets"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&file, b"age-encryption.org/v1\n-> X25519 AAAA\nbroken\n").unwrap();
    assert_fails(&host.activate(&["2"]), 1);
    let hits = files_containing(host.fx.tmp.path(), &fs_dir, &needles);
    assert!(hits.is_empty(), "plaintext outside the tmpfs: {hits:?}");
    assert!(host.leftovers().is_empty());
}

#[test]
fn kill_9_during_activate_always_leaves_a_complete_generation() {
    let host = TestHost::new();
    let secrets = bunk_secrets(&host.fx);
    let mut expected: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let plain1 = plaintexts(&host.fx, &secrets);
    assert_ok(&host.activate(&["--no-restart"]));
    expected.insert(1, plain1.clone());
    host.set_secret("grafana-admin-password", b"kill-test-grafana-0123456789\n");
    host.set_secret("smtp-password", b"kill-test-smtp-0123456789\n");
    let mut plain2 = plain1.clone();
    plain2.insert(
        "grafana-admin-password".into(),
        b"kill-test-grafana-0123456789\n".to_vec(),
    );
    plain2.insert(
        "smtp-password".into(),
        b"kill-test-smtp-0123456789\n".to_vec(),
    );
    assert_ok(&host.run(&["build"]));
    expected.insert(2, plain2);

    // How long one activation takes, to spread the kills over all of it.
    let t = Instant::now();
    assert_ok(&host.activate(&["2", "--no-restart"]));
    let span = t.elapsed().max(Duration::from_millis(5));

    let mut rng = rand::thread_rng();
    let mut killed = 0;
    let runs = 60;
    for i in 0..runs {
        let gen = if i % 2 == 0 { "1" } else { "2" };
        let mut child = host
            .activate_cmd(&[gen, "--no-restart"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = rng.gen_range(0..=(span.as_micros() as u64 * 3 / 2));
        std::thread::sleep(Duration::from_micros(delay));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        let target = host.active_target().expect("run/agex exists after a kill");
        let number: u64 = target
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let dir = host.active_dir();
        let marker: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(".generation")).unwrap()).unwrap();
        assert_eq!(marker["number"].as_u64(), Some(number), "run {i}");
        assert_generation(&dir, &secrets, &expected[&number]);
    }
    eprintln!("{killed} of {runs} activations were killed before they finished");
    assert!(
        killed >= runs / 4,
        "too few activations were interrupted ({killed})"
    );

    let out = host.activate(&["--no-restart"]);
    assert_ok(&out);
    assert_generation(&host.active_dir(), &secrets, &expected[&2]);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// The secrets filesystem full during an activation (issue 15 §5): the activation fails
/// naming the path, `/run/agex` stays on the previous complete generation, no unit is
/// restarted, no staging is left behind, and once there is room the next activate
/// completes and restarts what changed.
#[test]
fn a_full_secrets_filesystem_fails_the_activation_and_keeps_the_previous_generation() {
    let test = "a_full_secrets_filesystem_fails_the_activation_and_keeps_the_previous_generation";
    if !common::is_root(test) {
        return;
    }
    let host = TestHost::new();
    let fs_dir = host.secrets_fs();
    fs::create_dir_all(&fs_dir).unwrap();
    // A tiny tmpfs where agex mounts its own: agex takes a RAM mount point it finds there.
    assert_ok(
        &Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0751", "tmpfs"])
            .arg(&fs_dir)
            .output()
            .unwrap(),
    );
    let secrets = bunk_secrets(&host.fx);
    let plain1 = plaintexts(&host.fx, &secrets);
    assert_ok(&host.activate(&[]));
    host.take_calls();
    let target = host.active_target().unwrap();
    host.set_secret("grafana-admin-password", b"disk-full-grafana-0123456789\n");
    let mut plain2 = plain1.clone();
    plain2.insert(
        "grafana-admin-password".into(),
        b"disk-full-grafana-0123456789\n".to_vec(),
    );

    let filler = fs_dir.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
    }
    for attempt in 0..2 {
        let out = host.activate(&[]);
        let err = assert_fails(&out, 1);
        assert!(
            err.contains(&format!(
                "the secrets filesystem {} is full",
                fs_dir.display()
            )) && err.contains("No space left")
                && err.contains("generation 1 stays active"),
            "attempt {attempt}: the error does not say {} is full and generation 1 stays:\n{err}",
            fs_dir.display()
        );
        eprintln!("attempt {attempt} on a full secrets filesystem said:\n{err}");
        assert!(!stdout(&out).contains("activated"), "{}", stdout(&out));
        assert_eq!(
            host.active_target(),
            Some(target.clone()),
            "attempt {attempt}"
        );
        assert_generation(&host.active_dir(), &secrets, &plain1);
        assert_eq!(host.take_calls(), Vec::<String>::new(), "attempt {attempt}");
        assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
    }

    fs::remove_file(&filler).unwrap();
    let out = host.activate(&[]);
    assert_ok(&out);
    assert_ne!(host.active_target(), Some(target));
    assert_generation(&host.active_dir(), &secrets, &plain2);
    assert_eq!(host.take_calls(), vec!["try-restart grafana.service"]);
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// An activation SIGKILLed after its switch, as its systemctl restart starts: the next
/// activate of the same (now active) generation restarts and reloads the units the dead
/// one owed, once; a reboot's fresh filesystem would owe nothing.
#[test]
fn units_a_killed_activation_did_not_restart_are_restarted_by_the_next_run() {
    let host = TestHost::new();
    assert_ok(&host.activate(&[]));
    host.take_calls();
    let armed = host.fx.tmp.path().join("kill-agex-on-restart");
    // The recording systemctl, which SIGKILLs its agex at the first restart while armed.
    fs::write(
        &host.sysctl,
        format!(
            "#!/bin/sh\ncase \"$1\" in try-*) if [ -e '{armed}' ]; then rm '{armed}'; kill -KILL $PPID; exit 1; fi;; esac\necho \"$*\" >> '{calls}'\n",
            armed = armed.display(),
            calls = host.calls.display()
        ),
    )
    .unwrap();
    host.set_secret("grafana-admin-password", b"owed-grafana-0123456789\n");
    host.set_secret("cloudflare-api-token", b"owed-cf-token-abcdefghijklmnop\n");
    fs::write(&armed, b"").unwrap();
    let out = host.activate(&[]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "{}", stdout(&out));
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/2")));
    assert_eq!(host.take_calls(), Vec::<String>::new());

    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("killed before it restarted"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        host.take_calls(),
        vec![
            "try-restart grafana.service",
            "try-reload-or-restart caddy.service"
        ]
    );
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        b"owed-grafana-0123456789\n"
    );
    // Paid once: the next run owes nothing.
    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("nothing restarted"),
        "{}",
        stdout(&out)
    );
    assert_eq!(host.take_calls(), Vec::<String>::new());

    // Killed the same way, then the next run switches on to a generation that differs
    // only in another unit's secret: it restarts what the dead run owed as well.
    host.set_secret("smtp-password", b"owed-smtp-0123456789\n");
    fs::write(&armed, b"").unwrap();
    let out = host.activate(&[]);
    assert_eq!(out.status.signal(), Some(9), "{}", stdout(&out));
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/3")));
    host.take_calls();
    host.set_secret("grafana-admin-password", b"owed-grafana-again-0123456789\n");
    assert_ok(&host.activate(&[]));
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/4")));
    let calls = host.take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let restarted: BTreeSet<&str> = calls[0]
        .strip_prefix("try-restart ")
        .unwrap_or_else(|| panic!("{calls:?}"))
        .split(' ')
        .collect();
    assert!(restarted.contains("grafana.service"), "{restarted:?}");
    assert!(
        restarted.contains("paperless-web.service"),
        "smtp's units, owed by the killed run: {restarted:?}"
    );
    assert!(host.leftovers().is_empty(), "{:?}", host.leftovers());
}

/// Real users and a group created for the test with `useradd`/`groupadd`; removed on drop.
struct RealUsers {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Drop for RealUsers {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel")
                .arg(u)
                .stderr(Stdio::null())
                .status();
        }
        for g in &self.groups {
            let _ = Command::new("groupdel")
                .arg(g)
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn with_root_real_users_and_tmpfs_get_the_rule_owner_and_mode() {
    let test = "with_root_real_users_and_tmpfs_get_the_rule_owner_and_mode";
    if !common::is_root(test) || !common::have_tool("useradd", test) {
        return;
    }
    let tag: u32 = rand::thread_rng().gen_range(0..0x00ff_ffff);
    let (app, reader, group) = (
        format!("agxa{tag:06x}"),
        format!("agxb{tag:06x}"),
        format!("agxg{tag:06x}"),
    );
    let mut real = RealUsers {
        users: Vec::new(),
        groups: Vec::new(),
    };
    assert_ok(
        &Command::new("groupadd")
            .args(["--system", &group])
            .output()
            .unwrap(),
    );
    real.groups.push(group.clone());
    for u in [&app, &reader] {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                u,
            ])
            .output()
            .unwrap();
        assert_ok(&out);
        real.users.push(u.clone());
        real.groups.push(u.clone());
    }

    // A minimal configuration whose owners are the real users; no user database under
    // the root, so names go through this machine's NSS.
    let fx = Fixture::bunk();
    let dir = fx.dir();
    let cfg = fs::read_to_string(dir.join("agex.toml")).unwrap();
    let cfg = cfg.split("[repositories.").next().unwrap().to_string() + "[activation]\nkeep = 5\n";
    fs::write(dir.join("agex.toml"), cfg).unwrap();
    let _ = fs::remove_dir_all(dir.join("policies"));
    fs::write(
        dir.join("secrets/secrets.toml"),
        format!(
            r#"[secrets.immich-db-password]
recipients = ["admins", "bunk"]
owner      = "{app}"
services   = ["app.service"]

[secrets.smtp-password]
recipients = ["admins", "bunk"]
owner      = "{reader}"
group      = "{group}"
mode       = "0440"
services   = ["app.service", "other.service"]

[secrets.root-password-hash]
recipients = ["admins", "bunk"]
owner      = "{app}"
early      = true

[templates."app.env"]
owner    = "{app}"
mode     = "0600"
services = ["app.service"]
content  = """
DB={{{{ secret "immich-db-password" }}}}
"""
"#
        ),
    )
    .unwrap();
    let _ = fs::remove_file(dir.join("secrets/secrets.lock"));
    let host = TestHost::with_fixture(fx, false);
    // The real users must be able to walk down to their files.
    fs::set_permissions(host.fx.tmp.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(
        matches!(fs_type(&host.secrets_fs()).as_str(), "ramfs" | "tmpfs"),
        "not mounted: {}",
        fs_type(&host.secrets_fs())
    );
    let mount = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mount
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(host.secrets_fs().to_str().unwrap()))
        .expect("mount listed in /proc/self/mounts");
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(line.contains(opt), "{line}");
    }

    let stat = |rel: &str| {
        let out = Command::new("stat")
            .args(["-c", "%U:%G %a"])
            .arg(host.active_dir().join(rel))
            .output()
            .unwrap();
        assert_ok(&out);
        stdout(&out).trim().to_string()
    };
    assert_eq!(
        stat("app.service/immich-db-password"),
        format!("{app}:{app} 400")
    );
    assert_eq!(
        stat("app.service/smtp-password"),
        format!("{reader}:{group} 440")
    );
    assert_eq!(
        stat("other.service/smtp-password"),
        format!("{reader}:{group} 440")
    );
    assert_eq!(stat("app.service/app.env"), format!("{app}:{app} 600"));
    assert_eq!(stat("_early/root-password-hash"), "root:root 400");
    assert_eq!(stat("."), "root:root 751");

    // The app user reads its file; the other user cannot.
    let read_as = |user: &str, rel: &str| {
        Command::new("runuser")
            .args(["-u", user, "--", "cat"])
            .arg(host.active_dir().join(rel))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if common::have_tool("runuser", test) {
        assert!(read_as(&app, "app.service/app.env"));
        assert!(!read_as(&reader, "app.service/app.env"));
        assert!(read_as(&reader, "other.service/smtp-password"));
    }
    drop(host);
    drop(real);
}

#[test]
fn activation_mounts_its_own_ramfs_even_when_run_already_is_a_tmpfs() {
    let test = "activation_mounts_its_own_ramfs_even_when_run_already_is_a_tmpfs";
    if !common::is_root(test) {
        return;
    }
    let host = TestHost::new();
    // Like /run on every systemd host: a tmpfs, which swaps and lacks nosuid,nodev,noexec.
    let run = host.root.join("run");
    fs::create_dir_all(&run).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "mode=0755", "agex-test-run"])
        .arg(&run)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs on {}", run.display());
    struct UnmountRun(PathBuf);
    impl Drop for UnmountRun {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _run = UnmountRun(run.clone());
    let out = host.activate(&["--no-restart"]);
    let _fs = common::setup::Unmount(host.root.clone());
    assert_ok(&out);
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(host.secrets_fs().to_str().unwrap()))
        .unwrap_or_else(|| panic!("run/agex.d is not its own mount:\n{mounts}"));
    assert_eq!(line.split(' ').nth(2), Some("ramfs"), "{line}");
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(line.contains(opt), "{line}");
    }
    // A second activation finds its own mount and does not stack another one.
    assert_ok(&host.activate(&["--no-restart"]));
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let count = mounts
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some(host.secrets_fs().to_str().unwrap()))
        .count();
    assert_eq!(count, 1, "{mounts}");
}

#[test]
fn a_rule_path_below_a_symlinked_directory_is_refused_and_nothing_lands_outside() {
    let host = TestHost::new();
    // home-assistant-secrets has `path = "/var/lib/hass/secrets.yaml"`; the service user
    // owning /var/lib/hass replaced it with a symlink to a directory outside the root.
    let outside = tempfile::tempdir().unwrap();
    let lib = host.root.join("var/lib");
    fs::create_dir_all(&lib).unwrap();
    std::os::unix::fs::symlink(outside.path(), lib.join("hass")).unwrap();
    let out = host.activate(&["--no-restart"]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("symlink"), "{err}");
    assert!(err.contains("var/lib/hass"), "{err}");
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "a link was created through the symlink"
    );
    // With a real directory there, the link is placed.
    fs::remove_file(lib.join("hass")).unwrap();
    fs::create_dir_all(lib.join("hass")).unwrap();
    assert_ok(&host.activate(&["--no-restart"]));
    let link = fs::read_link(lib.join("hass/secrets.yaml")).unwrap();
    assert!(link.to_string_lossy().contains("run/agex/"), "{link:?}");
}

#[test]
fn run_agex_d_and_the_state_directory_reached_through_a_symlink_are_refused() {
    // Each directory agex writes below the root, swapped for a symlink to a directory
    // outside it: activation refuses, and nothing (no store, no mount, no link) lands
    // outside.
    for at in ["run", "run/agex.d", "var/lib", "var/lib/agex"] {
        let host = TestHost::new();
        let outside = tempfile::tempdir().unwrap();
        let link = host.root.join(at);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let out = host.activate(&["--no-restart"]);
        assert!(
            !out.status.success(),
            "{at}: activation through a symlink succeeded"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symlink") && err.contains(at), "{at}: {err}");
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(&*outside.path().to_string_lossy()),
            "{at}: mounted outside the root: {mounts}"
        );
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "{at}: something was written through the symlink"
        );
    }
}

#[test]
fn sigterm_during_activation_leaves_no_staging_behind() {
    let host = TestHost::new();
    assert_ok(&host.activate(&["--no-restart"]));
    let t = Instant::now();
    host.set_secret("grafana-admin-password", b"first-value-abcdefgh");
    assert_ok(&host.activate(&["--no-restart"]));
    let span = t.elapsed().max(Duration::from_millis(5));
    let mut rng = rand::thread_rng();
    for i in 0..20 {
        host.set_secret(
            "grafana-admin-password",
            format!("value-{i}-abcdefghijklmnop").as_bytes(),
        );
        let child = host
            .activate_cmd(&["--no-restart"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(
            rng.gen_range(0..=(span.as_micros() as u64)),
        ));
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        // No next run has cleaned up: the terminated agex did, before it exited.
        assert!(
            host.leftovers().is_empty(),
            "run {i} ({:?}): {:?}",
            out.status,
            host.leftovers()
        );
    }
}

#[test]
fn staging_left_by_a_killed_activation_is_removed_with_a_note() {
    let host = TestHost::new();
    assert_ok(&host.activate(&["--no-restart"]));
    let staging = host.secrets_fs().join(".staging-9-00112233445566aa");
    fs::create_dir_all(staging.join("app.service")).unwrap();
    fs::write(staging.join("app.service/pw"), b"plaintext").unwrap();
    host.set_secret("grafana-admin-password", b"another-value-abcdefgh");
    let out = host.activate(&["--no-restart"]);
    assert_ok(&out);
    assert!(!staging.exists());
    let err = common::stderr(&out);
    assert!(
        err.contains("note: removed") && err.contains(".staging-9-00112233445566aa"),
        "{err}"
    );
}

/// Replaces the first `from` in secrets/secrets.toml with `to`.
fn edit_rules(host: &TestHost, from: &str, to: &str) {
    let path = host.fx.dir().join("secrets/secrets.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "secrets.toml lacks {from:?}");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

/// `generations --json`, as (number, state, reason) per generation.
fn generation_states(host: &TestHost) -> Vec<(u64, String, String)> {
    let out = host.run(&["generations", "--json"]);
    assert_ok(&out);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["number"].as_u64().unwrap(),
                g["state"].as_str().unwrap().to_string(),
                g["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

const TYPO_OWNER: (&str, &str) = ("owner      = \"immich\"", "owner      = \"immich-typo\"");

#[test]
fn failed_activation_is_recorded_and_rollback_skips_it() {
    let host = TestHost::new();
    assert_ok(&host.activate(&["--no-restart"]));
    let first = host.read_active("grafana.service/grafana-admin-password");

    // Generation 2 is built, then fails on an owner the host does not have.
    edit_rules(&host, TYPO_OWNER.0, TYPO_OWNER.1);
    let out = host.activate(&["--no-restart"]);
    let err = assert_fails(&out, 2);
    assert!(
        stdout(&out).contains("built generation 2"),
        "{}",
        stdout(&out)
    );
    assert!(err.contains("immich-typo"), "{err}");
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/1")));
    let states = generation_states(&host);
    assert_eq!(states[0].1, "activated");
    assert_eq!((states[1].0, states[1].1.as_str()), (2, "failed"));
    assert!(
        states[1].2.contains("unknown users") && states[1].2.contains("immich-typo"),
        "{states:?}"
    );
    let table = stdout(&host.run(&["generations"]));
    let row2 = table.lines().find(|l| l.starts_with("2 ")).unwrap();
    assert!(row2.contains("never activated: unknown users"), "{table}");
    assert!(table
        .lines()
        .any(|l| l.starts_with("1 ") && l.ends_with("active")));

    // Fixed, with a new password: generation 3 works.
    edit_rules(&host, TYPO_OWNER.1, TYPO_OWNER.0);
    host.set_secret("grafana-admin-password", b"third-password-0123456789\n");
    let out = host.activate(&["--no-restart"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("activated generation 3"),
        "{}",
        stdout(&out)
    );

    // Rollback goes to 1, the last one that worked, not 2.
    let out = host.rollback(&["--no-restart"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("generation 1"), "{}", stdout(&out));
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/1")));
    assert_eq!(
        host.read_active("grafana.service/grafana-admin-password"),
        first
    );

    // With no earlier generation that ever worked, rollback says so and changes nothing.
    let fresh = TestHost::new();
    edit_rules(&fresh, TYPO_OWNER.0, TYPO_OWNER.1);
    assert_fails(&fresh.activate(&["--no-restart"]), 2);
    edit_rules(&fresh, TYPO_OWNER.1, TYPO_OWNER.0);
    assert_ok(&fresh.activate(&["--no-restart"]));
    let err = assert_fails(&fresh.rollback(&["--no-restart"]), 1);
    assert!(
        err.contains("no generation before 2 was ever active (1 never activated"),
        "{err}"
    );
    assert_eq!(fresh.active_target(), Some(PathBuf::from("agex.d/2")));
}

#[test]
fn activating_the_active_configuration_again_changes_nothing() {
    let host = TestHost::new();
    assert_ok(&host.activate(&[]));
    let _ = fs::remove_file(&host.calls);
    let dir = host.active_dir();
    let before = fs::metadata(dir.join(".generation"))
        .unwrap()
        .modified()
        .unwrap();

    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("generation 1 (") && stdout(&out).contains("already active"),
        "{}",
        stdout(&out)
    );
    // Nothing restarted, no units installed, no new number, the directory untouched.
    assert!(
        !host.calls.exists(),
        "{:?}",
        fs::read_to_string(&host.calls)
    );
    assert_eq!(generation_states(&host).len(), 1);
    let after = fs::metadata(dir.join(".generation"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert_ok(&host.activate(&["1"]));
    assert!(!host.calls.exists());

    // The reported case: a failed generation is the newest, the configuration is back
    // to the active one. `diff` says no differences, and activate agrees.
    edit_rules(&host, TYPO_OWNER.0, TYPO_OWNER.1);
    assert_fails(&host.activate(&[]), 2);
    edit_rules(&host, TYPO_OWNER.1, TYPO_OWNER.0);
    assert!(stdout(&host.run(&["diff"])).contains("no differences"));
    let out = host.activate(&[]);
    assert_ok(&out);
    assert!(stdout(&out).contains("already active"), "{}", stdout(&out));
    assert!(
        !stdout(&out).contains("built generation"),
        "{}",
        stdout(&out)
    );
    let numbers: Vec<u64> = generation_states(&host).iter().map(|s| s.0).collect();
    assert_eq!(numbers, vec![1, 2]);
    assert!(!host.calls.exists());

    // A damaged active directory is not "already active": it is decrypted again.
    fs::remove_file(host.active_dir().join(".generation")).unwrap();
    let out = host.activate(&["--no-restart"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("activated generation 1"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn generations_that_never_activated_are_pruned_first() {
    let host = TestHost::new();
    host.fx.edit_config("keep = 5", "keep = 2");
    assert_ok(&host.activate(&["--no-restart"]));
    edit_rules(&host, TYPO_OWNER.0, TYPO_OWNER.1);
    assert_fails(&host.activate(&["--no-restart"]), 2);
    edit_rules(&host, TYPO_OWNER.1, TYPO_OWNER.0);
    host.set_secret("grafana-admin-password", b"third-password-0123456789\n");
    let out = host.activate(&["--no-restart"]);
    assert_ok(&out);
    // Of three, two are kept: the failed 2 goes, 1 (which worked) stays for rollback.
    assert!(
        stdout(&out).contains("removed old generations: 2\n"),
        "{}",
        stdout(&out)
    );
    let states = generation_states(&host);
    let numbers: Vec<u64> = states.iter().map(|s| s.0).collect();
    assert_eq!(numbers, vec![1, 3]);
    assert!(states.iter().all(|s| s.1 == "activated"), "{states:?}");
    assert_ok(&host.rollback(&["--no-restart"]));
    assert_eq!(host.active_target(), Some(PathBuf::from("agex.d/1")));
}
