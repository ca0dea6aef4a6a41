//! Scheduling end to end: the real `agex` binary generates systemd units that the real
//! `systemd-analyze verify` accepts, installs them through a recording fake systemctl,
//! runs its daemon against real Restic and Borg repositories, and sends notifications
//! to a small HTTP server on 127.0.0.1 that records every request.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::setup::fake_systemctl;
use common::{assert_fails, assert_ok, have_tool, stderr, stdout, Fixture};

/// A bunk fixture with local repositories and one policy, `testapp`.
struct Setup {
    fx: Fixture,
    root: PathBuf,
    hooks: PathBuf,
}

impl Setup {
    /// `notify` replaces the example's `[notify]` section (give "" for none).
    fn new(notify: &str) -> Setup {
        let fx = Fixture::bunk();
        let cfg = fx.dir().join("agex.toml");
        let restic = fx.tmp.path().join("repo-restic");
        let borg = fx.tmp.path().join("repo-borg");
        fx.retarget_repositories(
            &restic.display().to_string(),
            &borg.display().to_string(),
            false,
        );
        let mut text = fs::read_to_string(&cfg).unwrap();
        let at = text.find("[notify]").expect("example has [notify]");
        text.truncate(at);
        text.push_str(notify);
        // Checks, drill and overdue check far away: daemon tests see only their own jobs.
        text.push_str(
            "\n[backup]\nlock_wait = 5\n\n[schedule]\ngrace = 0\nmax_concurrent = 2\n\
             check = \"2099-01-01 00:00:00\"\ndrill = \"2099-01-01 00:00:00\"\n\
             overdue = \"2099-01-01 00:00:00\"\n",
        );
        fs::write(&cfg, text).unwrap();
        for e in fs::read_dir(fx.dir().join("policies")).unwrap().flatten() {
            fs::remove_file(e.path()).unwrap();
        }
        let root = fx.root();
        let data = root.join("srv/app");
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("a.txt"), "hello agex\n").unwrap();
        let hooks = fx.tmp.path().join("hooks.log");
        let s = Setup { fx, root, hooks };
        s.policy("*-*-* 03:00:00", "", &["offsite-restic", "offsite-borg"]);
        s
    }

    /// Writes policies/testapp.toml; its hooks log `start`/`end` with the time.
    fn policy(&self, schedule: &str, before_extra: &str, repos: &[&str]) {
        let log = self.hooks.display();
        let repos: Vec<String> = repos.iter().map(|r| format!("\"{r}\"")).collect();
        let text = format!(
            "paths = [\"/srv/app\"]\nrepositories = [{}]\nschedule = \"{schedule}\"\n\
             before = [\"echo start $(date +%s.%N) >> {log}{before_extra}\"]\n\
             after = [\"echo end $(date +%s.%N) >> {log}\"]\n",
            repos.join(", ")
        );
        fs::write(self.fx.dir().join("policies/testapp.toml"), text).unwrap();
    }

    fn agex(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run agex")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let root = self.root.to_str().unwrap().to_string();
        let key = self.fx.key("admin.txt");
        let mut c = self.fx.agex();
        c.args([
            "-i",
            key.to_str().unwrap(),
            "--root",
            &root,
            "--host",
            "bunk",
        ])
        .args(args);
        c
    }

    fn init_repos(&self) {
        assert_ok(&self.agex(&["repo", "init", "offsite-restic"]));
        assert_ok(&self.agex(&["repo", "init", "offsite-borg"]));
    }

    /// `(kind, unix time)` of every hook line, in order.
    fn hook_events(&self) -> Vec<(String, f64)> {
        fs::read_to_string(&self.hooks)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, t) = l.split_once(' ')?;
                Some((k.to_string(), t.trim().parse().ok()?))
            })
            .collect()
    }

    fn starts(&self) -> Vec<f64> {
        self.hook_events()
            .into_iter()
            .filter(|(k, _)| k == "start")
            .map(|(_, t)| t)
            .collect()
    }

    fn daemon(&self) -> Daemon {
        let log = self.fx.tmp.path().join(format!(
            "daemon-{}.log",
            SystemClock::now_f64().to_string().replace('.', "")
        ));
        let child = self
            .cmd(&["daemon"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn agex daemon");
        Daemon { child, log }
    }

    /// A secret's plaintext in a 0600 file (for the peer tools).
    fn secret_file(&self, name: &str) -> PathBuf {
        let path = self.fx.tmp.path().join(format!("{name}.plain"));
        fs::write(&path, self.fx.decrypt(name)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

struct SystemClock;

impl SystemClock {
    fn now_f64() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }
}

/// A running `agex daemon`, stopped with SIGTERM.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Sends SIGTERM and waits (bounded) for a clean exit; returns its log.
    fn stop(mut self) -> String {
        signal(self.child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                assert!(status.success(), "daemon exited {status:?}:\n{log}");
                return log;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!(
                    "daemon did not stop within 30 s of SIGTERM:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits until `cond` holds, up to `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request the test server received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// An HTTP server on 127.0.0.1 that records requests and answers each with the next
/// status of its script (then 200).
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn start(script: Vec<u16>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let script = Arc::new(Mutex::new(script.into_iter()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                seen.lock().unwrap().push(Request {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let status = script.lock().unwrap().next().unwrap_or(200);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        Server { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn to(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Every target in one `[notify]` section.
    fn notify_section(&self) -> String {
        format!(
            "[notify]\nhealthchecks = \"{}\"\nwebhook = \"{}\"\nntfy = \"{}\"\n",
            self.url("/hc"),
            self.url("/hook"),
            self.url("/topic")
        )
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn systemd_units_for_bunk_pass_systemd_analyze_verify() {
    if !have_tool(
        "systemd-analyze",
        "systemd_units_for_bunk_pass_systemd_analyze_verify",
    ) {
        return;
    }
    let fx = Fixture::bunk();
    let out_dir = fx.tmp.path().join("units");
    let out = fx.run(&[
        "--host",
        "bunk",
        "systemd",
        "generate",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let mut units: Vec<String> = Vec::new();
    for e in fs::read_dir(&out_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(instance) = name.strip_suffix(".d") {
            // An instance of a template: verify it with its drop-in applied.
            let template = format!("{}@.service", instance.split('@').next().unwrap());
            let template = if instance.contains('@') {
                template
            } else {
                instance.to_string()
            };
            let mut text = fs::read_to_string(out_dir.join(&template)).unwrap();
            text.push_str(&fs::read_to_string(e.path().join("agex.conf")).unwrap());
            let merged = fx.tmp.path().join("merged");
            fs::create_dir_all(&merged).unwrap();
            fs::write(merged.join(instance), text).unwrap();
            units.push(merged.join(instance).display().to_string());
        } else {
            units.push(e.path().display().to_string());
        }
    }
    units.sort();
    let timers = units.iter().filter(|u| u.ends_with(".timer")).count();
    // 12 backups, 2 repository checks, the drill, the overdue check.
    assert_eq!(timers, 16, "{units:#?}");
    for service in ["immich", "vikunja", "paperless"] {
        assert!(units
            .iter()
            .any(|u| u.ends_with(&format!("agex-backup@{service}.service"))));
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .current_dir(fx.tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        verify.status
    );
    let timer = fs::read_to_string(out_dir.join("agex-backup-immich.timer")).unwrap();
    for line in [
        "OnCalendar=*-*-* 02:30:00",
        "Persistent=true",
        "RandomizedDelaySec=900",
        "Unit=agex-backup@immich.service",
    ] {
        assert!(timer.contains(line), "{line} missing:\n{timer}");
    }
    let service = fs::read_to_string(out_dir.join("agex-backup@.service")).unwrap();
    for line in [
        "Type=oneshot",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "IOSchedulingClass=idle",
        "OnFailure=agex-notify@%n.service",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH",
    ] {
        assert!(service.contains(line), "{line} missing:\n{service}");
    }
    // Immich dumps PostgreSQL through its socket; bunk's repositories are an S3 bucket
    // and an ssh server whose host keys agex.toml pins: home is not needed, so hidden.
    let drop_in =
        fs::read_to_string(out_dir.join("agex-backup@immich.service.d/agex.conf")).unwrap();
    assert!(
        drop_in.contains("ReadWritePaths=-/run/postgresql"),
        "{drop_in}"
    );
    assert!(drop_in.contains("ProtectHome=yes"), "{drop_in}");
    // pg_dump runs as the role's OS user (runuser): this job may change user; jobs
    // without such a database may not (the template does not grant it).
    assert!(
        drop_in.contains("CapabilityBoundingSet=CAP_SETUID CAP_SETGID"),
        "{drop_in}"
    );
    assert!(!service.contains("CAP_SETUID"), "{service}");
    let vikunja =
        fs::read_to_string(out_dir.join("agex-backup@vikunja.service.d/agex.conf")).unwrap();
    assert!(!vikunja.contains("CAP_SETUID"), "{vikunja}");
    // Sockets: the template allows unix ones only, the drop-in of a job that reaches
    // the network adds IP.
    assert!(
        service.contains("RestrictAddressFamilies=AF_UNIX\n"),
        "{service}"
    );
    assert!(
        drop_in.contains("RestrictAddressFamilies=AF_INET AF_INET6"),
        "{drop_in}"
    );
    // Its repositories are remote: the job waits for the network (the template alone,
    // for local repositories, does not).
    for line in ["Wants=network-online.target", "After=network-online.target"] {
        assert!(drop_in.contains(line), "{line} missing:\n{drop_in}");
        assert!(
            !service.contains(line),
            "{line} in the template:\n{service}"
        );
    }
    for check in ["offsite-restic", "offsite-borg"] {
        let drop_in =
            fs::read_to_string(out_dir.join(format!("agex-check@{check}.service.d/agex.conf")))
                .unwrap();
        assert!(drop_in.contains("After=network-online.target"), "{drop_in}");
    }
    // With local repositories and nothing under /home, home is hidden and the
    // repository is writable.
    let local = Setup::new("");
    let local_out = local.fx.tmp.path().join("units");
    assert_ok(&local.agex(&["systemd", "generate", "--out", local_out.to_str().unwrap()]));
    let drop_in =
        fs::read_to_string(local_out.join("agex-backup@testapp.service.d/agex.conf")).unwrap();
    assert!(drop_in.contains("ProtectHome=yes"), "{drop_in}");
    // Nothing to wait for: no network ordering, and no IP sockets.
    assert!(!drop_in.contains("network-online"), "{drop_in}");
    assert!(!drop_in.contains("AF_INET"), "{drop_in}");
    let repo = local.fx.tmp.path().join("repo-restic");
    assert!(
        drop_in.contains(&format!("ReadWritePaths=-{}", repo.display())),
        "{drop_in}"
    );
    // Every unit runs this agex with the configuration and host it was generated for.
    let activate = fs::read_to_string(out_dir.join("agex-activate.service")).unwrap();
    let exec = format!(
        "ExecStart={} -C {} --host bunk activate last --no-restart",
        common::agex_bin().display(),
        fx.dir().canonicalize().unwrap().display()
    );
    assert!(activate.contains(&exec), "{exec}\n{activate}");
    let backup = fs::read_to_string(out_dir.join("agex-backup@.service")).unwrap();
    assert!(backup.contains(&format!("ExecStart={} -C", common::agex_bin().display())));
    // A cron schedule is converted: actual.toml says "0 3 * * *".
    let actual = fs::read_to_string(out_dir.join("agex-backup-actual.timer")).unwrap();
    assert!(actual.contains("OnCalendar=*-*-* 3:0:00"), "{actual}");

    // systemd's own sandbox review of every job unit (with its drop-in) rates it at most
    // "OK" (4.x): everything read-only, few capabilities, no new privileges.
    for unit in units.iter().filter(|u| u.ends_with(".service")) {
        if unit.ends_with("agex-activate.service") {
            // Activation writes /run, /etc and restarts services: it is not sandboxed.
            continue;
        }
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit)
            .current_dir(fx.tmp.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&security.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"));
        assert!(level < 5.0, "{unit}: exposure {level}\n{text}");
    }

    // A unit systemd rejects is caught the same way (the check can fail).
    let bad = fx.tmp.path().join("merged/agex-bad.timer");
    fs::write(&bad, timer.replace("02:30:00", "25:61:00")).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&verify.stderr).trim().is_empty(),
        "systemd-analyze accepted a bad OnCalendar"
    );
}

#[test]
fn install_is_idempotent_and_removes_units_of_removed_services() {
    let fx = Fixture::bunk();
    let root = fx.root();
    let (script, calls) = fake_systemctl(fx.tmp.path());
    let install = |fx: &Fixture| {
        fx.run(&[
            "--root",
            root.to_str().unwrap(),
            "--host",
            "bunk",
            "systemd",
            "install",
            "--systemctl",
            script.to_str().unwrap(),
        ])
    };
    let unit_dir = root.join("etc/systemd/system");
    fs::create_dir_all(&unit_dir).unwrap();
    fs::write(
        unit_dir.join("nginx.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();

    assert_ok(&install(&fx));
    let first = fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "daemon-reload", "{first}");
    assert!(lines[1].starts_with("enable --now ") && lines[1].contains("agex-backup-immich.timer"));
    assert_eq!(lines[1].split_whitespace().count(), 2 + 16, "{first}");
    assert!(lines.contains(&"enable agex-activate.service"), "{first}");
    assert!(unit_dir.join("agex-backup-vikunja.timer").is_file());
    assert!(unit_dir
        .join("agex-backup@vikunja.service.d/agex.conf")
        .is_file());
    let tree = common::tree_state(&root);

    // Again: nothing written, systemctl not called.
    let again = install(&fx);
    assert_ok(&again);
    assert!(stdout(&again).contains("up to date"), "{}", stdout(&again));
    assert_eq!(fs::read_to_string(&calls).unwrap(), first);
    assert!(common::tree_changes(&tree, &common::tree_state(&root)).is_empty());

    // vikunja's policy is gone: its timer and drop-in go, nothing else does.
    fs::remove_file(fx.dir().join("policies/vikunja.toml")).unwrap();
    fs::write(&calls, "").unwrap();
    let out = install(&fx);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("remove  agex-backup-vikunja.timer"), "{text}");
    let after: Vec<String> = fs::read_to_string(&calls)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        after,
        vec!["disable --now agex-backup-vikunja.timer", "daemon-reload"]
    );
    assert!(!unit_dir.join("agex-backup-vikunja.timer").exists());
    assert!(!unit_dir.join("agex-backup@vikunja.service.d").exists());
    assert!(unit_dir.join("agex-backup-immich.timer").is_file());
    assert!(
        unit_dir.join("nginx.service").is_file(),
        "a unit agex did not write was removed"
    );

    // A file agex did not write is never overwritten.
    fs::write(
        unit_dir.join("agex-drill.timer"),
        "[Timer]\nOnCalendar=daily\n",
    )
    .unwrap();
    let out = install(&fx);
    let err = assert_fails(&out, 1);
    assert!(
        err.contains("agex-drill.timer exists and was not written by agex"),
        "{err}"
    );
}

#[test]
fn daemon_runs_an_every_second_job_on_time() {
    if !have_tool("restic", "daemon_runs_an_every_second_job_on_time") {
        return;
    }
    let s = Setup::new("");
    s.policy("*-*-* *:*:0/1", "", &["offsite-restic"]);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(20), "three runs", || {
        s.starts().len() >= 3
    });
    let log = d.stop();
    let starts = s.starts();
    let late: Vec<String> = starts
        .iter()
        .map(|t| format!("{:.0} ms", (t - t.floor()) * 1000.0))
        .collect();
    eprintln!("runs started after their slot by: {}", late.join(", "));
    // Each run starts right after a whole second (the spawn and the hook take a little).
    for t in &starts {
        let late = t - t.floor();
        assert!(
            late < 0.8,
            "a run started {late:.2} s after its slot: {starts:?}"
        );
    }
    assert!(
        log.contains("job started: agex backup --service testapp"),
        "{log}"
    );
    assert!(log.contains("job finished: ok (exit 0)"), "{log}");
    let status = s.agex(&["--json", "status"]);
    assert_ok(&status);
    let v = json(&stdout(&status));
    assert_eq!(v[0]["result"], "ok", "{v}");
}

#[test]
fn daemon_runs_a_job_missed_while_it_was_down_exactly_once() {
    if !have_tool(
        "restic",
        "daemon_runs_a_job_missed_while_it_was_down_exactly_once",
    ) {
        return;
    }
    let s = Setup::new("");
    s.policy("*-*-* *:*:0/5", "", &["offsite-restic"]);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(20), "a first run", || {
        s.hook_events().iter().any(|(k, _)| k == "end")
    });
    d.stop();
    let before = s.starts().len();
    // Down for more than two slots; restart 0.5 s after a slot, so the next regular
    // one is 4.5 s away and any second run before it would be a replayed slot.
    std::thread::sleep(Duration::from_secs(11));
    loop {
        let phase = SystemClock::now_f64() % 5.0;
        if (0.5..1.0).contains(&phase) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarted = SystemClock::now_f64();
    let d = s.daemon();
    std::thread::sleep(Duration::from_millis(3500));
    let log = d.stop();
    let after: Vec<f64> = s.starts()[before..].to_vec();
    let early: Vec<&f64> = after.iter().filter(|t| **t < restarted + 3.4).collect();
    assert_eq!(
        early.len(),
        1,
        "runs right after the restart: {after:?}\n{log}"
    );
    assert_eq!(log.matches("while the daemon was down").count(), 1, "{log}");
    assert!(
        log.contains("missed 2 run(s)") || log.contains("missed 3 run(s)"),
        "{log}"
    );
    // And a start with nothing missed runs nothing at once.
    let d = s.daemon();
    std::thread::sleep(Duration::from_millis(1000));
    let log = d.stop();
    assert!(!log.contains("while the daemon was down"), "{log}");
}

#[test]
fn daemon_never_overlaps_a_job_that_outlasts_its_period() {
    if !have_tool(
        "restic",
        "daemon_never_overlaps_a_job_that_outlasts_its_period",
    ) {
        return;
    }
    let s = Setup::new("");
    s.policy("*-*-* *:*:0/1", "; sleep 2", &["offsite-restic"]);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(30), "two complete runs", || {
        s.hook_events().iter().filter(|(k, _)| k == "end").count() >= 2
    });
    d.stop();
    let events = s.hook_events();
    let mut running = false;
    for (kind, t) in &events {
        match kind.as_str() {
            "start" => {
                assert!(
                    !running,
                    "a run started at {t} while one was running: {events:?}"
                );
                running = true;
            }
            _ => running = false,
        }
    }
    // Each run takes over 2 s; an every-second job ran back to back, not once per slot.
    let starts = s.starts();
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= 2.0, "{starts:?}");
    }
}

#[test]
fn sigterm_during_a_job_leaves_repositories_checkable_and_locks_released() {
    if !have_tool("restic", "sigterm_during_a_job") || !have_tool("borg", "sigterm_during_a_job") {
        return;
    }
    let s = Setup::new("");
    s.policy("*-*-* *:*:0/1", "", &["offsite-restic", "offsite-borg"]);
    // Enough data that the repositories are mid-write when the signal comes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: Vec<u8> = (0..64 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    fs::write(s.root.join("srv/app/big.bin"), &big).unwrap();
    drop(big);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(20), "a job to start", || {
        !s.starts().is_empty()
    });
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    let log = d.stop();
    let stopped_in = t.elapsed();
    eprintln!("daemon log:\n{log}");
    assert!(stopped_in < Duration::from_secs(15), "took {stopped_in:?}");
    assert!(log.contains("grace period over: sending SIGTERM"), "{log}");
    // The job ended through its own SIGTERM handling (128 + 15).
    assert!(log.contains("job finished: failed (exit 143)"), "{log}");
    // It was cancelled mid-run: its `after` hook never ran.
    let events = s.hook_events();
    assert_eq!(
        events.last().map(|e| e.0.as_str()),
        Some("start"),
        "{events:?}"
    );

    // The restic repository passes the peer's check.
    let pw = s.secret_file("restic-password");
    let check = Command::new("restic")
        .args([
            "-r",
            s.fx.tmp.path().join("repo-restic").to_str().unwrap(),
            "--no-cache",
            "check",
        ])
        .env("RESTIC_PASSWORD_FILE", &pw)
        .output()
        .unwrap();
    assert_ok(&check);
    // The borg repository too, and it holds no checkpoint of the interrupted run.
    let pass = s.secret_file("borg-passphrase");
    let borg = |args: &[&str]| {
        Command::new("borg")
            .args(args)
            .arg(s.fx.tmp.path().join("repo-borg"))
            .env("BORG_PASSCOMMAND", format!("cat {}", pass.display()))
            .env("BORG_BASE_DIR", s.fx.tmp.path().join("peer-borg"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_ok(&borg(&["check"]));
    let list = borg(&["list", "--short"]);
    assert_ok(&list);
    assert!(!stdout(&list).contains(".checkpoint"), "{}", stdout(&list));
    // Locks are free: the next backup gets both repositories at once.
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
}

#[test]
fn notifications_of_a_successful_backup() {
    let server = Server::start(vec![]);
    let notify = format!(
        "{}\n[notify.jobs.backup-testapp]\nwebhook = \"{}\"\n[notify.jobs.check]\nwebhook = \"{}\"\n",
        server.notify_section(),
        server.url("/job-hook"),
        server.url("/check-hook")
    );
    let s = Setup::new(&notify);
    s.init_repos();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let reqs = server.requests();
    let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths.iter().filter(|p| **p == "/hc/start").count(),
        1,
        "{paths:?}"
    );
    assert_eq!(
        paths.iter().position(|p| *p == "/hc/start"),
        Some(0),
        "{paths:?}"
    );
    let hc = server.to("/hc");
    assert_eq!(hc.len(), 1, "{paths:?}");
    assert_eq!(hc[0].method, "POST");
    assert!(
        hc[0].body.contains("testapp → offsite-restic: ok"),
        "{}",
        hc[0].body
    );
    assert!(
        hc[0].body.contains("testapp → offsite-borg: ok"),
        "{}",
        hc[0].body
    );
    assert!(server.to("/hc/fail").is_empty());
    let hook = server.to("/hook");
    assert_eq!(
        hook.len(),
        1,
        "the webhook gets results, not starts: {paths:?}"
    );
    let v = json(&hook[0].body);
    assert_eq!(v["event"], "finish");
    assert_eq!(v["job"], "backup-testapp");
    assert_eq!(v["host"], "bunk");
    assert_eq!(v["result"], "success");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(hook[0].headers["content-type"], "application/json");
    let ntfy = server.to("/topic");
    assert_eq!(ntfy.len(), 1);
    assert_eq!(
        ntfy[0].headers["title"],
        "agex backup-testapp on bunk succeeded"
    );
    assert_eq!(ntfy[0].headers["priority"], "default");
    // The job's own target gets it too; another job's does not.
    let own = server.to("/job-hook");
    assert_eq!(own.len(), 1, "{paths:?}");
    assert_eq!(json(&own[0].body)["job"], "backup-testapp");
    assert!(server.to("/check-hook").is_empty());
}

#[test]
fn notifications_of_a_failed_and_a_partly_failed_backup() {
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    // No repository initialised: everything fails.
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_fails(&out, 1);
    let fail = server.to("/hc/fail");
    assert_eq!(fail.len(), 1, "{:?}", server.requests());
    assert!(
        fail[0].body.contains("testapp → offsite-restic: FAILED"),
        "{}",
        fail[0].body
    );
    assert!(server.to("/hc").is_empty());
    let v = json(&server.to("/hook")[0].body);
    assert_eq!(v["result"], "failure");
    assert_eq!(v["exit_code"], 1);

    // Only the Restic repository works: exit 3, and a partial failure is a failure.
    assert_ok(&s.agex(&["repo", "init", "offsite-restic"]));
    server.requests.lock().unwrap().clear();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_fails(&out, 3);
    let fail = server.to("/hc/fail");
    assert_eq!(fail.len(), 1, "{:?}", server.requests());
    assert!(
        fail[0].body.contains("testapp → offsite-restic: ok"),
        "{}",
        fail[0].body
    );
    assert!(
        fail[0].body.contains("testapp → offsite-borg: FAILED"),
        "{}",
        fail[0].body
    );
    assert!(fail[0].body.contains("partly failed"), "{}", fail[0].body);
    assert!(
        server.to("/hc").is_empty(),
        "a partial failure pinged success"
    );
    let v = json(&server.to("/hook")[0].body);
    assert_eq!(v["result"], "partial");
    assert_eq!(v["exit_code"], 3);
    let ntfy = server.to("/topic");
    assert_eq!(
        ntfy[0].headers["title"],
        "agex backup-testapp on bunk partly failed"
    );
    assert_eq!(ntfy[0].headers["priority"], "high");
}

#[test]
fn overdue_backups_exit_1_and_notify() {
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    server.requests.lock().unwrap().clear();

    let out = s.agex(&["status", "--max-age", "1d"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("no backup is overdue"));
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    std::thread::sleep(Duration::from_millis(2100));
    let out = s.agex(&["status", "--max-age", "1s"]);
    assert_fails(&out, 1);
    assert!(
        stdout(&out).contains("OVERDUE testapp → offsite-borg"),
        "{}",
        stdout(&out)
    );
    let fail = server.to("/hc/fail");
    assert_eq!(fail.len(), 1, "{:?}", server.requests());
    assert!(fail[0].body.contains("overdue backups"), "{}", fail[0].body);
    let v = json(&server.to("/hook")[0].body);
    assert_eq!(v["event"], "overdue");
    assert_eq!(v["job"], "overdue");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert!(items[0].as_str().unwrap().contains("allowed 1s"), "{v}");

    // Without a value: 1.5 × the policy's daily period, which a fresh backup meets.
    assert_ok(&s.agex(&["status", "--max-age"]));
    // A bad duration is a usage error.
    let err = assert_fails(&s.agex(&["status", "--max-age", "soon"]), 2);
    assert!(err.contains("`soon` is not a duration"), "{err}");
}

#[test]
fn a_service_never_backed_up_is_overdue_only_once_it_was_known_for_the_allowed_age() {
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    let record = s.root.join("var/lib/agex/overdue.json");
    // A fresh install: nothing has run yet, which is not an alarm.
    let out = s.agex(&["status", "--max-age", "1s"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains(
            "waiting testapp → offsite-restic: never backed up successfully (known since 20"
        ),
        "{text}"
    );
    assert!(text.contains("no backup is overdue"), "{text}");
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    let first = fs::read_to_string(&record).unwrap();
    assert!(first.contains("offsite-borg"), "{first}");
    // Still never backed up once the allowed age has passed since: overdue.
    std::thread::sleep(Duration::from_millis(2100));
    let out = s.agex(&["status", "--max-age", "1s"]);
    assert_fails(&out, 1);
    assert!(
        stdout(&out).contains("OVERDUE testapp → offsite-borg: never backed up successfully"),
        "{}",
        stdout(&out)
    );
    assert_eq!(server.to("/hc/fail").len(), 1, "{:?}", server.requests());
    // The first sighting stays what it was.
    assert_eq!(fs::read_to_string(&record).unwrap(), first);
    // A success drops the pair from the record.
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    assert_ok(&s.agex(&["status", "--max-age", "1d"]));
    let now = fs::read_to_string(&record).unwrap();
    assert!(!now.contains("offsite-borg"), "{now}");
    // A record that cannot be read does not silence alarms.
    fs::write(&record, "garbage").unwrap();
    let policy = s.fx.dir().join("policies/other.toml");
    fs::write(
        &policy,
        "paths = [\"/srv/app\"]\nrepositories = [\"offsite-restic\"]\nschedule = \"daily\"\n",
    )
    .unwrap();
    let out = s.agex(&["status", "--max-age", "1d"]);
    assert_fails(&out, 1);
    assert!(
        stdout(&out).contains("OVERDUE other → offsite-restic: never backed up"),
        "{}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("overdue.json: not agex's overdue record"),
        "{err}"
    );
}

#[test]
fn notification_failures_never_fail_the_backup_and_are_retried() {
    // First two answers are 500: the third attempt of the first request succeeds.
    let server = Server::start(vec![500, 500]);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://127.0.0.1:{}/x", closed.local_addr().unwrap().port());
    drop(closed);
    let notify = format!(
        "[notify]\nhealthchecks = \"{}\"\nwebhook = \"{dead}\"\n",
        server.url("/hc")
    );
    let s = Setup::new(&notify);
    s.init_repos();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: webhook notification for job backup-testapp failed"),
        "{err}"
    );
    assert!(err.contains("after 3 attempts"), "{err}");
    assert!(
        !err.contains(&dead),
        "the URL (it may hold a token) was shown: {err}"
    );
    assert_eq!(server.to("/hc/start").len(), 3, "{:?}", server.requests());
    assert_eq!(server.to("/hc").len(), 1);
}

#[test]
fn notification_urls_can_come_from_secrets() {
    let server = Server::start(vec![]);
    // The example's own setting: healthchecks = "secret:healthchecks-url".
    let s = Setup::new("[notify]\nhealthchecks = \"secret:healthchecks-url\"\n");
    let mut enc = s.fx.agex();
    enc.args(["encrypt", "secrets/healthchecks-url.age"])
        .stdin(Stdio::piped());
    let mut child = enc.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", server.url("/secret-hc")).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    assert_eq!(
        server.to("/secret-hc/start").len(),
        1,
        "{:?}",
        server.requests()
    );
    assert_eq!(server.to("/secret-hc").len(), 1, "{:?}", server.requests());
}

/// The query parameters of a recorded request, decoded (`+` and `%XX`).
fn query(r: &Request) -> BTreeMap<String, Vec<String>> {
    fn decode(s: &str) -> String {
        let b = s.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let q = r.path.split_once('?').map_or("", |(_, q)| q);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.entry(decode(k)).or_default().push(decode(v));
    }
    map
}

#[test]
fn uptime_kuma_push_monitors_get_up_and_down_with_the_duration() {
    let server = Server::start(vec![]);
    // The global URL as Kuma shows it (with its example query); the job's from a secret.
    let notify = format!(
        "[notify]\nuptime_kuma = \"{}\"\n[notify.jobs.backup-testapp]\nuptime_kuma = \"secret:healthchecks-url\"\n",
        server.url("/api/push/GLOBAL?status=up&msg=OK&ping=")
    );
    let s = Setup::new(&notify);
    let mut enc = s.fx.agex();
    enc.args(["encrypt", "secrets/healthchecks-url.age"])
        .stdin(Stdio::piped());
    let mut child = enc.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", server.url("/api/push/JOB")).as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let pushes = |token: &str| -> Vec<Request> {
        server
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with(&format!("/api/push/{token}?")))
            .collect()
    };
    for token in ["GLOBAL", "JOB"] {
        let p = pushes(token);
        assert_eq!(
            p.len(),
            1,
            "one push per run, none at start: {:?}",
            server.requests()
        );
        assert_eq!(p[0].method, "GET");
        let q = query(&p[0]);
        assert_eq!(q["status"], ["up"], "{q:?}");
        assert!(q["msg"][0].starts_with("backup-testapp ok in "), "{q:?}");
        let ms: u64 = q["ping"][0].parse().expect("ping is whole milliseconds");
        assert!(ms > 0 && ms < 600_000, "{q:?}");
    }

    // The Borg repository gone: a partial failure is down, and says what failed.
    fs::remove_dir_all(s.fx.tmp.path().join("repo-borg")).unwrap();
    server.requests.lock().unwrap().clear();
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_fails(&out, 3);
    for token in ["GLOBAL", "JOB"] {
        let p = pushes(token);
        assert_eq!(p.len(), 1, "{:?}", server.requests());
        let q = query(&p[0]);
        assert_eq!(q["status"], ["down"], "{q:?}");
        assert!(q["msg"][0].starts_with("backup-testapp partial: "), "{q:?}");
        assert!(q["msg"][0].contains("partly failed"), "{q:?}");
    }
}

#[test]
fn schedule_lists_jobs_next_runs_and_last_results() {
    let s = Setup::new("");
    s.policy("0 3 * * *", "", &["offsite-restic"]);
    assert_ok(&s.agex(&["repo", "init", "offsite-restic"]));
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let out = s.agex(&["--json", "schedule"]);
    assert_ok(&out);
    let v = json(&stdout(&out));
    let jobs = v.as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        vec![
            "backup-testapp",
            "check-offsite-borg",
            "check-offsite-restic",
            "drill",
            "overdue"
        ]
    );
    assert_eq!(jobs[4]["kind"], "overdue");
    let b = &jobs[0];
    assert_eq!(b["schedule"], "0 3 * * *");
    assert_eq!(b["on_calendar"], "*-*-* 3:0:00");
    assert_eq!(b["next"].as_array().unwrap().len(), 3);
    assert!(b["next"][0].as_str().unwrap().contains("T03:00:00"), "{b}");
    assert_eq!(b["last_result"], "ok");
    assert_eq!(jobs[3]["schedule"], "2099-01-01 00:00:00");
    assert_eq!(jobs[1]["last_result"], serde_json::Value::Null);

    // A check records its own result (no run record exists for it); a failing one too.
    assert_ok(&s.agex(&["repo", "check", "offsite-restic"]));
    assert_fails(&s.agex(&["repo", "check", "offsite-borg"]), 1);
    let v = json(&stdout(&s.agex(&["--json", "schedule"])));
    assert_eq!(v[2]["name"], "check-offsite-restic");
    assert_eq!(v[2]["last_result"], "ok", "{v}");
    assert_eq!(v[1]["last_result"], "failed", "{v}");
    let table = stdout(&s.agex(&["schedule"]));
    assert!(table.starts_with("JOB"), "{table}");
    assert!(table.contains("check-offsite-restic"), "{table}");
}

#[test]
fn sigterm_to_a_backup_starts_its_units_again_and_commits_nothing_half_read() {
    if !have_tool("restic", "sigterm_to_a_backup") || !have_tool("borg", "sigterm_to_a_backup") {
        return;
    }
    let s = Setup::new("");
    let (script, calls) = fake_systemctl(s.fx.tmp.path());
    let log = s.hooks.display();
    fs::write(
        s.fx.dir().join("policies/testapp.toml"),
        format!(
            "paths = [\"/srv/app\"]\nstop_units = [\"testapp.service\"]\n\
             before = [\"echo start $(date +%s.%N) >> {log}\"]\n\n\
             [[databases]]\nkind = \"sqlite\"\npath = \"/srv/app/app.db\"\n"
        ),
    )
    .unwrap();
    let db = s.root.join("srv/app/app.db");
    let made = Command::new("sqlite3")
        .arg(&db)
        .arg("CREATE TABLE t(x BLOB); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 4000) INSERT INTO t SELECT randomblob(16384) FROM c;")
        .output()
        .unwrap();
    assert_ok(&made);
    s.init_repos();
    let mut child = s
        .cmd(&[
            "backup",
            "--service",
            "testapp",
            "--systemctl",
            script.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "the backup to start", || {
        !s.starts().is_empty()
    });
    std::thread::sleep(Duration::from_millis(600));
    signal(child.id(), "TERM");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("backup interrupted by signal 15"), "{err}");
    let recorded = fs::read_to_string(&calls).unwrap();
    assert_eq!(
        recorded.lines().collect::<Vec<_>>(),
        vec!["stop testapp.service", "start testapp.service"],
        "{err}"
    );
    // No named pipe is left behind.
    let dumps = s.root.join("var/lib/agex/dumps");
    let left: Vec<_> = walk(&dumps);
    assert!(left.is_empty(), "left behind: {left:?}");
    let pass = s.secret_file("borg-passphrase");
    let list = Command::new("borg")
        .args(["list", "--short"])
        .arg(s.fx.tmp.path().join("repo-borg"))
        .env("BORG_PASSCOMMAND", format!("cat {}", pass.display()))
        .env("BORG_BASE_DIR", s.fx.tmp.path().join("peer-borg"))
        .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&list);
    assert_eq!(
        stdout(&list).trim(),
        "",
        "borg committed an interrupted archive"
    );
    let out = s.agex(&[
        "backup",
        "--service",
        "testapp",
        "--systemctl",
        script.to_str().unwrap(),
    ]);
    assert_ok(&out);
}

/// Every file (of any type) below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Unmounts the secrets filesystem an activation under a temp root mounted.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn activate_installs_the_generations_units_and_rollback_moves_them_back() {
    if !common::is_root("activate_installs_the_generations_units") {
        return;
    }
    let fx = Fixture::bunk();
    let root = fx.root();
    let _unmount = Unmount(root.join("run/agex.d"));
    let ssh = root.join("etc/ssh");
    fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("ssh_host_ed25519_key");
    fs::copy(fx.key("bunk_ssh_host_ed25519_key"), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    common::setup::bunk_user_db(&root);
    let (script, calls) = fake_systemctl(fx.tmp.path());
    let run = |args: &[&str]| {
        let mut all = vec!["--root", root.to_str().unwrap(), "--host", "bunk"];
        all.extend_from_slice(args);
        fx.run(&all)
    };
    let take_calls = || {
        let text = fs::read_to_string(&calls).unwrap_or_default();
        let _ = fs::remove_file(&calls);
        text.lines().map(str::to_string).collect::<Vec<_>>()
    };
    let units = root.join("etc/systemd/system");
    let sc = script.to_str().unwrap();

    let out = run(&["activate", "--systemctl", sc]);
    assert_ok(&out);
    assert!(stdout(&out).contains("systemd units: "), "{}", stdout(&out));
    let timer = || fs::read_to_string(units.join("agex-backup-vikunja.timer")).unwrap();
    assert!(timer().contains("OnCalendar=*-*-* 03:10:00"), "{}", timer());
    assert!(units.join("agex-backup-jellyfin.timer").is_file());
    let first = take_calls();
    assert!(first.contains(&"daemon-reload".to_string()), "{first:?}");
    assert!(
        first
            .iter()
            .any(|c| c.starts_with("enable --now ") && c.contains("agex-backup-vikunja.timer")),
        "{first:?}"
    );
    // The generation itself carries the policy and the units.
    let current = fs::canonicalize(root.join("var/lib/agex/current")).unwrap();
    assert!(current.join("files/policies/vikunja.toml").is_file());
    assert!(current
        .join("files/systemd/agex-backup-vikunja.timer")
        .is_file());

    // New schedule for vikunja, jellyfin no longer backed up.
    let vik = fx.dir().join("policies/vikunja.toml");
    let text = fs::read_to_string(&vik).unwrap();
    fs::write(&vik, text.replace("*-*-* 03:10:00", "*-*-* 05:00:00")).unwrap();
    fs::remove_file(fx.dir().join("policies/jellyfin.toml")).unwrap();
    let diff = run(&["diff"]);
    assert_ok(&diff);
    let shown = stdout(&diff);
    assert!(
        shown.contains("~ unit agex-backup-vikunja.timer: OnCalendar=*-*-* 03:10:00 -> OnCalendar=*-*-* 05:00:00"),
        "{shown}"
    );
    assert!(
        shown.contains("- unit agex-backup-jellyfin.timer"),
        "{shown}"
    );
    assert!(
        shown.contains("~ policy vikunja.toml: schedule *-*-* 03:10:00 -> schedule *-*-* 05:00:00"),
        "{shown}"
    );
    assert!(shown.contains("- policy jellyfin.toml"), "{shown}");

    assert_ok(&run(&["activate", "--systemctl", sc]));
    assert!(timer().contains("OnCalendar=*-*-* 05:00:00"), "{}", timer());
    assert!(!units.join("agex-backup-jellyfin.timer").exists());
    assert!(!units.join("agex-backup@jellyfin.service.d").exists());
    let second = take_calls();
    assert!(
        second.contains(&"disable --now agex-backup-jellyfin.timer".to_string()),
        "{second:?}"
    );
    assert!(
        second.contains(&"try-restart agex-backup-vikunja.timer".to_string()),
        "{second:?}"
    );

    // One rollback moves secrets, policies and schedules back together.
    let out = run(&["rollback", "--systemctl", sc]);
    assert_ok(&out);
    assert!(timer().contains("OnCalendar=*-*-* 03:10:00"), "{}", timer());
    assert!(units.join("agex-backup-jellyfin.timer").is_file());
    let third = take_calls();
    assert!(
        third.contains(&"enable --now agex-backup-jellyfin.timer".to_string()),
        "{third:?}"
    );
    let diff = run(&["diff", "1", "2"]);
    assert!(
        stdout(&diff).contains("- unit agex-backup-jellyfin.timer"),
        "{}",
        stdout(&diff)
    );
}

#[test]
fn nixos_module_parses_and_declares_its_options() {
    if !have_tool(
        "nix-instantiate",
        "nixos_module_parses_and_declares_its_options",
    ) {
        return;
    }
    let module = common::repo_root().join("nix/module.nix");
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&module)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = fs::read_to_string(&module).unwrap();
    for option in ["enable", "configDir", "host", "package", "identityPaths"] {
        assert!(
            text.contains(&format!("    {option} = lib.mk")),
            "option {option} missing"
        );
    }
    assert!(text.contains("activate --no-restart"));
    // The parser does reject a broken module (the check can fail).
    let broken = std::env::temp_dir().join(format!("agex-broken-{}.nix", std::process::id()));
    fs::write(&broken, text.replacen("in\n{", "in\n{ {", 1)).unwrap();
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&broken)
        .output()
        .unwrap();
    let _ = fs::remove_file(&broken);
    assert!(
        !out.status.success(),
        "nix-instantiate accepted a broken module"
    );
}

#[test]
fn daemon_reload_keeps_the_old_schedule_when_the_new_configuration_is_bad() {
    if !have_tool("restic", "daemon_reload_keeps_the_old_schedule") {
        return;
    }
    let s = Setup::new("");
    s.policy("*-*-* *:*:0/1", "", &["offsite-restic"]);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(20), "a first run", || {
        !s.starts().is_empty()
    });
    // A broken policy: the reload is refused and the every-second job goes on.
    let policy = s.fx.dir().join("policies/testapp.toml");
    let good = fs::read_to_string(&policy).unwrap();
    fs::write(&policy, good.replace("*-*-* *:*:0/1", "*-*-* 99:00:00")).unwrap();
    signal(d.child.id(), "HUP");
    // The jobs keep firing on the old schedule (each run reads the configuration itself,
    // so these runs fail on the broken policy, which is what their result says).
    let daemon_log = || fs::read_to_string(&d.log).unwrap_or_default();
    wait_for(Duration::from_secs(20), "the refused reload", || {
        daemon_log().contains("reload failed")
    });
    let n = daemon_log().matches("job started").count();
    wait_for(
        Duration::from_secs(20),
        "runs after a refused reload",
        || daemon_log().matches("job started").count() >= n + 2,
    );
    // A good policy that fires on the first of January only: after the reload and the
    // end of any run under way, nothing starts any more.
    fs::write(&policy, good.replace("*-*-* *:*:0/1", "*-01-01 00:00:00")).unwrap();
    signal(d.child.id(), "HUP");
    std::thread::sleep(Duration::from_millis(2500));
    let settled = s.starts().len();
    std::thread::sleep(Duration::from_millis(2500));
    let log = d.stop();
    assert_eq!(
        s.starts().len(),
        settled,
        "the old schedule still ran:\n{log}"
    );
    assert!(
        log.contains("reload failed, keeping the old schedule"),
        "{log}"
    );
    assert!(log.contains("policies/testapp.toml:3:12"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
}

/// Writes a policy `name` whose hooks log `start NAME t` and `end NAME t`, taking `secs`.
fn timed_policy(s: &Setup, name: &str, repo: &str, secs: f64) {
    let log = s.hooks.display();
    fs::write(
        s.fx.dir().join(format!("policies/{name}.toml")),
        format!(
            "paths = [\"/srv/app\"]\nrepositories = [\"{repo}\"]\nschedule = \"*-*-* *:*:0/1\"\n\
             before = [\"echo start {name} $(date +%s.%N) >> {log}; sleep {secs}\"]\n\
             after = [\"echo end {name} $(date +%s.%N) >> {log}\"]\n"
        ),
    )
    .unwrap();
}

/// `(name, start, end)` of every complete run in the hook log.
fn intervals(s: &Setup) -> Vec<(String, f64, f64)> {
    let text = fs::read_to_string(&s.hooks).unwrap_or_default();
    let mut open: BTreeMap<String, f64> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [kind, name, t] = parts[..] else { continue };
        let t: f64 = t.parse().unwrap();
        match kind {
            "start" => {
                open.insert(name.to_string(), t);
            }
            _ => {
                if let Some(st) = open.remove(name) {
                    out.push((name.to_string(), st, t));
                }
            }
        }
    }
    out
}

#[test]
fn daemon_serialises_jobs_sharing_a_repository_and_runs_others_at_once() {
    if !have_tool("restic", "daemon_serialises_jobs")
        || !have_tool("borg", "daemon_serialises_jobs")
    {
        return;
    }
    let s = Setup::new("");
    fs::remove_file(s.fx.dir().join("policies/testapp.toml")).unwrap();
    timed_policy(&s, "alpha", "offsite-restic", 1.0);
    timed_policy(&s, "beta", "offsite-restic", 1.0);
    timed_policy(&s, "gamma", "offsite-borg", 1.0);
    s.init_repos();
    let d = s.daemon();
    wait_for(Duration::from_secs(40), "three runs of each", || {
        let iv = intervals(&s);
        ["alpha", "beta", "gamma"]
            .iter()
            .all(|n| iv.iter().filter(|(x, _, _)| x == n).count() >= 3)
    });
    let log = d.stop();
    let iv = intervals(&s);
    let overlap = |a: &(String, f64, f64), b: &(String, f64, f64)| a.1 < b.2 && b.1 < a.2;
    let restic: Vec<_> = iv.iter().filter(|(n, _, _)| n != "gamma").collect();
    for (i, a) in restic.iter().enumerate() {
        for b in &restic[i + 1..] {
            assert!(
                !overlap(a, b),
                "{a:?} and {b:?} share a repository but overlapped\n{log}"
            );
        }
    }
    let together = iv
        .iter()
        .filter(|(n, _, _)| n == "gamma")
        .any(|g| restic.iter().any(|r| overlap(g, r)));
    assert!(
        together,
        "jobs on different repositories never ran at once: {iv:?}"
    );
}

#[test]
fn failed_unit_notification_names_the_unit() {
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    let out = s.agex(&["notify", "--failed-unit", "agex-backup@testapp.service"]);
    assert_ok(&out);
    let fail = server.to("/hc/fail");
    assert_eq!(fail.len(), 1, "{:?}", server.requests());
    assert!(
        fail[0]
            .body
            .contains("systemd unit agex-backup@testapp.service failed"),
        "{}",
        fail[0].body
    );
    let v = json(&server.to("/hook")[0].body);
    assert_eq!(v["job"], "backup-testapp");
    assert_eq!(v["result"], "failure");
}

#[test]
fn a_failure_the_backup_notified_itself_is_not_notified_again_by_its_on_failure_unit() {
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    // No repository initialised: the backup fails and says so itself, as the unit
    // `agex-backup@testapp.service` with its systemd invocation id.
    let out = s
        .cmd(&["backup", "--service", "testapp"])
        .env("INVOCATION_ID", "0f1e2d3c4b5a69788796a5b4c3d2e1f0")
        .output()
        .unwrap();
    assert_fails(&out, 1);
    assert_eq!(server.to("/hc/fail").len(), 1, "{:?}", server.requests());
    // systemd then starts agex-notify@agex-backup@testapp.service for that invocation.
    let on_failure = |invocation: &str| {
        s.cmd(&["notify", "--failed-unit", "agex-backup@testapp.service"])
            .env("MONITOR_INVOCATION_ID", invocation)
            .output()
            .unwrap()
    };
    let out = on_failure("0f1e2d3c4b5a69788796a5b4c3d2e1f0");
    assert_ok(&out);
    assert!(
        stderr(&out).contains("already notified its own failure"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        server.to("/hc/fail").len(),
        1,
        "notified twice: {:?}",
        server.requests()
    );
    // A later invocation that died before it could say anything is reported by the unit.
    let out = on_failure("aaaabbbbccccddddeeeeffff00001111");
    assert_ok(&out);
    let fail = server.to("/hc/fail");
    assert_eq!(fail.len(), 2, "{:?}", server.requests());
    assert!(
        fail[1]
            .body
            .contains("systemd unit agex-backup@testapp.service failed"),
        "{}",
        fail[1].body
    );
}

#[test]
fn a_separate_forget_job_applies_retention_and_the_daemon_notifies_it() {
    if !have_tool("restic", "a_separate_forget_job") {
        return;
    }
    let server = Server::start(vec![]);
    let s = Setup::new(&server.notify_section());
    let policy = s.fx.dir().join("policies/testapp.toml");
    s.policy("*-01-01 00:00:00", "", &["offsite-restic"]);
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str("\n[retention]\nkeep_last = 1\nschedule = \"*-*-* *:*:0/1\"\n");
    fs::write(&policy, text).unwrap();
    s.init_repos();
    // With its own schedule, retention no longer runs after each backup.
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let count = || {
        let out = s.agex(&["--json", "snapshots", "--repo", "offsite-restic"]);
        assert_ok(&out);
        json(&stdout(&out)).as_array().unwrap().len()
    };
    assert_eq!(count(), 2);
    let names = json(&stdout(&s.agex(&["--json", "schedule"])));
    assert_eq!(names[1]["name"], "forget-testapp", "{names}");
    server.requests.lock().unwrap().clear();
    let d = s.daemon();
    wait_for(Duration::from_secs(20), "the forget job to finish", || {
        !server.to("/hook").is_empty()
    });
    let log = d.stop();
    assert!(
        log.contains("job started: agex forget --service testapp"),
        "{log}"
    );
    assert_eq!(count(), 1, "{log}");
    assert!(
        !server.to("/hc/start").is_empty(),
        "{:?}",
        server.requests()
    );
    let v = json(&server.to("/hook")[0].body);
    assert_eq!(v["job"], "forget-testapp");
    assert_eq!(v["result"], "success");
    assert!(
        v["log_tail"]
            .as_str()
            .unwrap()
            .contains("forgot 1 snapshot"),
        "{v}"
    );
}
