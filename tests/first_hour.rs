//! End-to-end tests of a new user's first hour: `agex init` and what it leaves, errors that
//! say the fix, output a person reads.

mod common;

use std::fs;

use common::setup::{app_data, Setup, SQLITE_POLICY};
use common::{assert_fails, assert_ok, have_tool, stdout, Fixture};

#[test]
fn init_leaves_examples_and_next_steps_and_never_overwrites() {
    let fx = Fixture::bunk();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    let out = fx
        .agex()
        .args(["init"])
        .arg(&conf)
        .args([
            "--key",
            "alice=age12898rtdkmfqlptaqn64f77vx6pmcvvdwllysv5eyaye5eeafuvwqvkj9m5",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let said = stdout(&out);
    assert!(said.contains("next steps:"), "{said}");
    assert!(said.contains("agex repo init NAME"), "{said}");
    let toml = fs::read_to_string(conf.join("agex.toml")).unwrap();
    assert!(toml.contains("# [repositories.offsite-restic]"), "{toml}");
    assert!(toml.contains("# [repositories.offsite-borg]"), "{toml}");
    let example = conf.join("policies/example.toml.disabled");
    assert!(example.is_file());
    // The fresh configuration checks clean, the example policy not yet read.
    let check = fx
        .agex()
        .arg("-C")
        .arg(&conf)
        .arg("check")
        .output()
        .unwrap();
    assert_ok(&check);

    // Enabled with its repositories uncommented, the example policy is a valid policy.
    let uncommented: String = toml
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if l.starts_with("# [repositories") || toml_key(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(conf.join("agex.toml"), uncommented).unwrap();
    fs::write(
        conf.join("secrets/secrets.toml"),
        "[secrets.restic-password]\nrecipients = [\"admins\"]\n\
         [secrets.borg-passphrase]\nrecipients = [\"admins\"]\n\
         [secrets.borg-ssh-key]\nrecipients = [\"admins\"]\n\
         [secrets.b2-credentials]\nrecipients = [\"admins\"]\n",
    )
    .unwrap();
    fs::rename(&example, conf.join("policies/vikunja.toml")).unwrap();
    let check = fx
        .agex()
        .arg("-C")
        .arg(&conf)
        .arg("check")
        .output()
        .unwrap();
    let err = common::stderr(&check);
    assert!(
        !err.contains("policies/vikunja.toml"),
        "the example policy does not parse: {err}"
    );

    // init over an existing configuration: refused, and it does not call it a secret.
    let again = fx.agex().arg("init").arg(&conf).output().unwrap();
    let err = assert_fails(&again, 2);
    assert!(err.contains("a configuration already exists"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// Whether a commented line of the init template is a `key = value` of a repository.
fn toml_key(rest: &str) -> bool {
    [
        "kind ",
        "url ",
        "password_secret",
        "env_secret",
        "ssh_key_secret",
    ]
    .iter()
    .any(|k| rest.starts_with(k))
}

#[test]
fn a_repository_never_initialised_says_agex_repo_init_and_hides_command_lines() {
    let test = "a_repository_never_initialised_says_agex_repo_init_and_hides_command_lines";
    if !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, borg_url) = Setup::local(tmp.path());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    let out = s.agex(&["backup", "--service", "testapp"]);
    let err = assert_fails(&out, 1);
    for repo in ["offsite-restic", "offsite-borg"] {
        assert!(
            err.contains(&format!("run `agex repo init {repo}`")),
            "{repo}: {err}"
        );
    }
    assert!(
        !err.contains("--lock-wait") && !err.contains(&borg_url),
        "a command line: {err}"
    );
    // With -v the command lines are there for whoever needs them.
    let out = s.agex(&["-v", "backup", "--service", "testapp"]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("running ") && err.contains("borg"), "{err}");

    // Tried and failed is failing at once, not `waiting` like a service never tried.
    let out = s.agex(&["status", "--max-age", "1d"]);
    assert_fails(&out, 1);
    let text = stdout(&out);
    assert!(
        text.contains("OVERDUE testapp → offsite-borg: every backup so far FAILED"),
        "{text}"
    );
    assert!(!text.contains("waiting testapp"), "{text}");
}

#[test]
fn keyscan_of_a_closed_port_says_connection_refused() {
    if !have_tool(
        "ssh-keyscan",
        "keyscan_of_a_closed_port_says_connection_refused",
    ) {
        return;
    }
    let fx = Fixture::bunk();
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let before = fs::read_to_string(fx.dir().join("agex.toml")).unwrap();
    let out = fx.run_admin(&[
        "host",
        "rekey",
        "bunk",
        "--keyscan",
        &format!("127.0.0.1:{port}"),
    ]);
    let err = common::stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("connection refused"), "{err}");
    assert!(!err.contains("no ssh-ed25519 host key"), "{err}");
    assert_eq!(
        fs::read_to_string(fx.dir().join("agex.toml")).unwrap(),
        before
    );
}

#[test]
fn schedule_last_counts_a_manual_check_of_all_repositories_and_a_full_drill() {
    let test = "schedule_last_counts_a_manual_check_of_all_repositories_and_a_full_drill";
    if !have_tool("borg", test) || !have_tool("sqlite3", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = Setup::local(tmp.path());
    // Only testapp: the example's other services would make the drill fail (no snapshots).
    for e in fs::read_dir(s.fx.dir().join("policies")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let last = |name: &str| -> serde_json::Value {
        let out = s.agex(&["--json", "schedule"]);
        assert_ok(&out);
        let jobs: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("no job {name}: {jobs}"))["last_result"]
            .clone()
    };
    assert!(last("check-offsite-borg").is_null());
    assert!(last("drill").is_null());
    assert_ok(&s.agex(&["repo", "check"]));
    assert_eq!(last("check-offsite-borg"), "ok");
    assert_eq!(last("check-offsite-restic"), "ok");
    assert_ok(&s.agex(&["drill"]));
    assert_eq!(last("drill"), "ok");
}
