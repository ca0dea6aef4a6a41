//! End-to-end tests of what an operator meets every day: log levels and the journal's
//! priorities, shell completions, man pages, help texts, time formats.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Output, Stdio};

use common::setup::{app_data, Setup, SQLITE_POLICY};
use common::{assert_fails, assert_ok, have_tool, stderr, stdout, Fixture};

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

#[test]
fn bash_completion_completes_subcommands_in_a_real_bash() {
    let out = std::process::Command::new(common::agex_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_ok(&out);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agex.bash");
    fs::write(&script, &out.stdout).unwrap();
    // What bash does on `agex re<TAB>`: call the completion function with the words so far.
    let complete = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split(' ').collect();
        let probe = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
             _agex agex '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &probe])
            .output()
            .unwrap();
        assert_ok(&out);
        let mut got: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|w| !w.is_empty())
            .collect();
        got.sort();
        got
    };
    assert_eq!(
        complete("agex re"),
        ["recovery", "rekey", "repo", "report", "restore"]
    );
    assert_eq!(complete("agex repo rot"), ["rotate-password"]);
    let flags = complete("agex backup --s");
    assert!(flags.contains(&"--service".to_owned()), "{flags:?}");

    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = std::process::Command::new(common::agex_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("rotate-password"),
            "{shell} completion lacks a subcommand"
        );
    }
    let out = std::process::Command::new(common::agex_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_fails(&out, 2);
}

#[test]
fn every_man_page_renders_without_warnings() {
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: `man` is not installed (scripts/install-deps.sh installs man-db)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::agex_bin())
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let mut pages: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "agex.1",
        "agex-backup.1",
        "agex-repo-rotate-password.1",
        "agex-drill-rebuild.1",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} in {names:?}"
        );
    }
    for page in &pages {
        let out = std::process::Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert_ok(&out);
        assert_eq!(stderr(&out), "", "{} renders with warnings", page.display());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("--root"),
            "{}: no global flags",
            page.display()
        );
    }
    let backup = fs::read_to_string(dir.path().join("agex-backup.1")).unwrap();
    assert!(backup.contains("agex\\-backup") || backup.contains("agex-backup"));
}

/// What headless Chromium makes of a page: its DOM after parsing, serialised.
fn chromium_dom(page: &std::path::Path) -> String {
    let out = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn the_html_report_shows_every_pair_and_its_failures_in_a_real_browser() {
    let test = "the_html_report_shows_every_pair_and_its_failures_in_a_real_browser";
    if !have_tool("restic", test) || !have_tool("borg", test) || !have_tool("chromium", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let restic_url = tmp.path().join("restic").display().to_string();
    let borg_dir = tmp.path().join("borg");
    let s = Setup::new(&restic_url, &borg_dir.display().to_string(), false);
    let cfg = s.fx.dir().join("agex.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[report]\nhtml = \"/var/lib/agex/report.html\"\n");
    fs::write(&cfg, text).unwrap();
    // Three of the example's services (never backed up here) and testapp.
    for e in fs::read_dir(s.fx.dir().join("policies")).unwrap() {
        let p = e.unwrap().path();
        let keep = ["immich.toml", "paperless.toml", "vikunja.toml"];
        if !keep.iter().any(|k| p.ends_with(k)) {
            fs::remove_file(p).unwrap();
        }
    }
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    s.init_repos();
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    // The backup brought the configured report up to date.
    let configured = s.host("/var/lib/agex/report.html");
    assert!(configured.is_file(), "no report after a backup");

    // The Borg repository disappears: its next backup and its drill fail, Restic's pass.
    fs::rename(&borg_dir, tmp.path().join("borg-gone")).unwrap();
    assert_fails(&s.agex(&["backup", "--service", "testapp"]), 3);
    let drill = s.agex(&["drill", "--service", "testapp"]);
    assert_fails(&drill, 3);
    // The drill table says why in the failed row, not only somewhere above it.
    let table = stdout(&drill);
    let row = table
        .lines()
        .find(|l| l.contains("offsite-borg"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("FAILED") && row.contains("not initialised"),
        "{table}"
    );

    let page = tmp.path().join("report.html");
    let out = s.agex(&["--host", "bunk", "report", "--html", page.to_str().unwrap()]);
    assert_ok(&out);
    let html = fs::read_to_string(&page).unwrap();
    assert!(!html.contains("<script"), "the report needs no JavaScript");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external asset"
    );

    let dom = chromium_dom(&page);
    let policies: Vec<String> = fs::read_dir(s.fx.dir().join("policies"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(policies.len(), 4, "{policies:?}");
    assert!(dom.contains("Backups of bunk"), "the host's name");
    let pair = |service: &str, repo: &str| -> String {
        let key = format!("data-service=\"{service}\" data-repo=\"{repo}\"");
        let at = dom
            .find(&key)
            .unwrap_or_else(|| panic!("no row for {service} → {repo}"));
        let end = dom[at..].find("</tr>").unwrap() + at;
        let start = dom[..at].rfind("<tr").unwrap();
        dom[start..end].to_owned()
    };
    for service in &policies {
        let text = fs::read_to_string(s.fx.dir().join(format!("policies/{service}.toml"))).unwrap();
        for repo in ["offsite-restic", "offsite-borg"] {
            if text.contains(repo) {
                let row = pair(service, repo);
                if service != "testapp" {
                    // Never backed up: overdue, and listed before the pairs that are well.
                    assert!(row.contains("data-standing=\"overdue\""), "{row}");
                }
            }
        }
    }
    let borg = pair("testapp", "offsite-borg");
    assert!(borg.contains("data-standing=\"failed\""), "{borg}");
    assert!(
        borg.contains("class=\"day partial\""),
        "one ok and one failed run today: {borg}"
    );
    assert!(borg.contains("FAILED"), "{borg}");
    let restic = pair("testapp", "offsite-restic");
    assert!(restic.contains("data-standing=\"ok\""), "{restic}");
    assert!(restic.contains("class=\"day ok\""), "{restic}");
    assert!(restic.contains("passed"), "the drill passed: {restic}");
    assert!(restic.contains("<svg"), "no chart: {restic}");
    let days = dom.matches("data-day=").count();
    assert!(
        days > 0 && days.is_multiple_of(30),
        "30 days per pair: {days}"
    );
    // Worst first: the failing pair comes before the one that is well.
    assert!(dom.find("data-standing=\"failed\"") < dom.find("data-standing=\"ok\""));
    assert!(
        dom.contains("data-repo=\"offsite-restic\"><td>offsite-restic</td>"),
        "growth"
    );

    // What the README shows: a screenshot of this page, written next to the test binaries.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("agex-report.png");
    let _ = fs::remove_file(&shot);
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg("--window-size=1400,640")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    let png = fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}
