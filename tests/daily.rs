//! End-to-end tests of what an operator meets every day: log levels and the journal's
//! priorities, shell completions, man pages, help texts, time formats.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Output, Stdio};

use common::{assert_fails, assert_ok, stderr, Fixture};

/// A fixture where `agex rekey --dry-run` warns: one secret's file is gone.
fn fixture_with_a_missing_secret() -> Fixture {
    let fx = Fixture::bunk();
    fs::remove_file(fx.dir().join("secrets/vikunja-jwt-secret.age")).unwrap();
    fx
}

fn rekey_dry_run(fx: &Fixture, flags: &[&str], env: Option<&str>) -> Output {
    let mut c = fx.agex();
    c.args(flags).args(["rekey", "--dry-run"]);
    if let Some(v) = env {
        c.env("AGEX_LOG", v);
    }
    c.output().unwrap()
}

#[test]
fn verbosity_flags_and_agex_log_choose_what_reaches_stderr() {
    let fx = fixture_with_a_missing_secret();
    let warning = "warning: vikunja-jwt-secret: file missing";
    let debug = "debug: configuration ";

    let out = rekey_dry_run(&fx, &[], None);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains(warning), "{err}");
    assert!(!err.contains(debug), "{err}");
    assert!(!err.contains('\x1b'), "colour on a pipe: {err:?}");

    let err = stderr(&rekey_dry_run(&fx, &["-v"], None));
    assert!(err.contains(warning) && err.contains(debug), "{err}");

    let err = stderr(&rekey_dry_run(&fx, &["-q"], None));
    assert!(err.contains(warning) && !err.contains(debug), "{err}");

    let out = rekey_dry_run(&fx, &["-qq"], None);
    assert_ok(&out);
    assert_eq!(stderr(&out), "", "-qq keeps only errors");

    let err = stderr(&rekey_dry_run(&fx, &[], Some("debug")));
    assert!(err.contains(debug), "AGEX_LOG=debug: {err}");
    let err = stderr(&rekey_dry_run(&fx, &[], Some("agex=error")));
    assert!(!err.contains(warning), "AGEX_LOG=agex=error: {err}");
    // The flags win over the variable.
    let err = stderr(&rekey_dry_run(&fx, &["-v"], Some("error")));
    assert!(err.contains(debug), "-v over AGEX_LOG=error: {err}");

    let out = rekey_dry_run(&fx, &[], Some("agex=loud"));
    let err = assert_fails(&out, 2);
    assert!(err.contains("AGEX_LOG=agex=loud"), "{err}");

    // A failure's message is the command's result: shown even with -qq.
    let out = fx.run(&["-qq", "decrypt", "no-such-secret", "--force"]);
    let err = assert_fails(&out, 2);
    assert!(err.starts_with("error: "), "{err}");
}

/// Runs agex with stderr going to a file that `JOURNAL_STREAM` names (device:inode), as
/// systemd does when a unit's stderr is the journal; returns the file's content.
fn run_into_journal(fx: &Fixture, args: &[&str], stdin: &[u8], journal: bool) -> String {
    let path = fx.tmp.path().join("journal.log");
    let file = fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut c = fx.agex();
    c.args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::from(file.try_clone().unwrap()));
    let stream = if journal {
        format!("{}:{}", meta.dev(), meta.ino())
    } else {
        // Another file's identity: stderr is not the journal.
        format!("{}:{}", meta.dev(), meta.ino() + 1)
    };
    c.env("JOURNAL_STREAM", stream);
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        i.write_all(stdin).unwrap();
    }
    child.wait().unwrap();
    fs::read_to_string(&path).unwrap()
}

#[test]
fn journal_stderr_gets_syslog_priorities_and_no_colour() {
    let fx = fixture_with_a_missing_secret();
    let text = run_into_journal(&fx, &["rekey", "--dry-run"], b"", true);
    assert!(
        text.contains("<4>warning: vikunja-jwt-secret: file missing"),
        "{text}"
    );
    let text = run_into_journal(&fx, &["encrypt", "mealie-secret"], b"new value", true);
    assert!(
        text.starts_with("<6>secrets/mealie-secret.age: encrypted to"),
        "{text}"
    );
    let text = run_into_journal(&fx, &["decrypt", "no-such-secret", "--force"], b"", true);
    assert!(text.starts_with("<3>error: "), "{text}");
    for line in text.lines() {
        assert!(
            line.starts_with("<3>"),
            "every line of an error has its priority: {text}"
        );
    }
    assert!(!text.contains('\x1b'), "{text:?}");

    // JOURNAL_STREAM inherited by a process whose stderr went elsewhere: no prefixes.
    let text = run_into_journal(&fx, &["rekey", "--dry-run"], b"", false);
    assert!(text.starts_with("warning: vikunja-jwt-secret"), "{text}");
}

#[test]
fn the_flake_parses_and_offers_the_package_module_and_app() {
    if !common::have_tool("nix-instantiate", "the_flake_parses") {
        return;
    }
    let flake = common::repo_root().join("flake.nix");
    let out = std::process::Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&flake)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = fs::read_to_string(&flake).unwrap();
    for needle in [
        "packages = forAll",
        "default = pkgs.rustPlatform.buildRustPackage",
        "cargoLock.lockFile = ./Cargo.lock",
        "nixosModules.default",
        "imports = [ ./nix/module.nix ]",
        "apps = forAll",
        "type = \"app\"",
    ] {
        assert!(text.contains(needle), "flake.nix lacks {needle}");
    }
    // Everything it names is in the tree.
    for path in [
        "Cargo.lock",
        "Cargo.toml",
        "nix/module.nix",
        "vendor/rustic_core",
    ] {
        assert!(common::repo_root().join(path).exists(), "{path}");
    }
}
