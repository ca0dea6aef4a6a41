//! End-to-end tests of the secrets commands against the real binary and the real `age`.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{assert_fails, assert_ok, stdout, Fixture};

const ADMIN_PUB: &str = "age12898rtdkmfqlptaqn64f77vx6pmcvvdwllysv5eyaye5eeafuvwqvkj9m5";

fn new_age_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.txt"));
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .expect("age-keygen");
    assert_ok(&out);
    let public = String::from_utf8_lossy(&out.stderr)
        .trim()
        .trim_start_matches("Public key: ")
        .to_string();
    (path, public)
}

fn encrypt_stdin(fx: &Fixture, file: &str, data: &[u8]) {
    let mut child = fx
        .agex()
        .args(["encrypt", file])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    assert_ok(&child.wait_with_output().unwrap());
}

fn add_rule(fx: &Fixture, text: &str) {
    let path = fx.dir().join("secrets/secrets.toml");
    let mut rules = fs::read_to_string(&path).unwrap();
    rules.push_str(text);
    fs::write(path, rules).unwrap();
}

#[test]
fn init_then_encrypt_then_decrypt_round_trips() {
    if !common::have_tool("age", "init_then_encrypt_then_decrypt_round_trips") {
        return;
    }
    let fx = Fixture::empty();
    assert_ok(&fx.run(&["init", "--key", &format!("alice={ADMIN_PUB}")]));
    for f in ["agex.toml", "secrets/secrets.toml", "secrets/secrets.lock"] {
        assert!(fx.dir().join(f).is_file(), "{f} missing after init");
    }
    assert!(fx.dir().join("policies").is_dir());
    // A configuration is already there: a usage error (2), nothing overwritten.
    let again = fx.run(&["init"]);
    assert_fails(&again, 2);

    add_rule(&fx, "\n[secrets.db]\nrecipients = [\"admins\"]\n");
    encrypt_stdin(&fx, "secrets/db.age", b"hunter2\n");
    let key = common::repo_root().join("examples/keys/admin.txt");
    let out = fx.run(&["-i", key.to_str().unwrap(), "decrypt", "secrets/db.age"]);
    assert_ok(&out);
    assert_eq!(out.stdout, b"hunter2\n");

    let by_age = Command::new("age")
        .args(["-d", "-i"])
        .arg(&key)
        .arg(fx.dir().join("secrets/db.age"))
        .output()
        .unwrap();
    assert_ok(&by_age);
    assert_eq!(by_age.stdout, b"hunter2\n");
    assert_ok(&fx.run(&["check"]));
}

#[test]
fn age_cli_and_agex_interoperate_both_ways_for_x25519_and_ssh() {
    if !common::have_tool("age", "age_cli_and_agex_interoperate") {
        return;
    }
    let fx = Fixture::bunk();
    let admin = fx.key("admin.txt");
    let host = fx.key("bunk_ssh_host_ed25519_key");
    let file = fx.dir().join("secrets/vikunja-jwt-secret.age");
    let expected = fx.decrypt("vikunja-jwt-secret");
    for identity in [&admin, &host] {
        let out = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(identity)
            .arg(&file)
            .output()
            .unwrap();
        assert_ok(&out);
        assert_eq!(out.stdout, expected, "age -d with {}", identity.display());
    }

    // age -r (x25519) and age -R (ssh .pub) write files agex reads with either identity.
    let plain = b"written by the age CLI";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s' '{}' | age -r {ADMIN_PUB} -R {} -o {}",
            String::from_utf8_lossy(plain),
            fx.key("bunk_ssh_host_ed25519_key.pub").display(),
            file.display()
        ))
        .output()
        .unwrap();
    assert_ok(&out);
    for identity in [&admin, &host] {
        let out = fx.run(&[
            "-i",
            identity.to_str().unwrap(),
            "decrypt",
            "vikunja-jwt-secret",
        ]);
        assert_ok(&out);
        assert_eq!(out.stdout, plain);
    }
    // Written behind agex's back: check calls it stale, rekey records it, check is clean.
    let check = fx.run(&["check"]);
    assert!(
        stdout(&check).contains("changed outside agex"),
        "{}",
        stdout(&check)
    );
    assert_fails(&check, 1);
    assert_ok(&fx.run_admin(&["rekey"]));
    assert_ok(&fx.run(&["check"]));
}

#[test]
fn decrypt_with_a_key_that_is_not_a_recipient_lists_what_was_tried() {
    let fx = Fixture::bunk();
    let out = fx.run(&[
        "-i",
        fx.key("recovery.txt").to_str().unwrap(),
        "decrypt",
        "vikunja-jwt-secret",
    ]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("no identity matches"), "{err}");
    assert!(
        err.contains("X25519 age1dzvw5"),
        "lists the identity tried: {err}"
    );
    assert!(
        err.contains("`bunk` SHA256:"),
        "names the ssh recipient: {err}"
    );
    assert!(out.stdout.is_empty());
}

fn ram_dir(test: &str) -> Option<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let out = Command::new("stat")
        .args(["-f", "-c", "%T", "/dev/shm"])
        .output()
        .ok()?;
    let fs_type = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !shm.is_dir() || !(fs_type == "tmpfs" || fs_type == "ramfs") {
        eprintln!("SKIP {test}: /dev/shm is not a tmpfs here ({fs_type})");
        return None;
    }
    Some(tempfile::tempdir_in(shm).unwrap())
}

fn editor_script(fx: &Fixture, body: &str) -> PathBuf {
    let path = fx
        .tmp
        .path()
        .join(format!("editor-{}.sh", rand::random::<u32>()));
    fs::write(&path, format!("#!/bin/sh\nset -e\nf=\"$1\"\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn run_edit(fx: &Fixture, runtime: &Path, editor: &Path, file: &str) -> std::process::Output {
    fx.agex()
        .env("XDG_RUNTIME_DIR", runtime)
        .env("EDITOR", editor)
        .args(["-i", fx.key("admin.txt").to_str().unwrap(), "edit", file])
        .output()
        .unwrap()
}

fn assert_no_leftovers(runtime: &Path) {
    let left: Vec<_> = fs::read_dir(runtime)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "plaintext left behind: {left:?}");
}

#[test]
fn edit_re_encrypts_only_when_the_content_changed() {
    let Some(runtime) = ram_dir("edit_re_encrypts_only_when_the_content_changed") else {
        return;
    };
    let fx = Fixture::bunk();
    let file = "secrets/vikunja-jwt-secret.age";
    let before = fs::read(fx.dir().join(file)).unwrap();

    let unchanged = editor_script(
        &fx,
        "test -f \"$f\"; case \"$f\" in /dev/shm/*) ;; *) exit 9;; esac",
    );
    let out = run_edit(&fx, runtime.path(), &unchanged, file);
    assert_ok(&out);
    assert_eq!(
        fs::read(fx.dir().join(file)).unwrap(),
        before,
        "unchanged edit rewrote the file"
    );
    assert_no_leftovers(runtime.path());

    let changed = editor_script(&fx, "printf 'new-value' > \"$f\"");
    assert_ok(&run_edit(&fx, runtime.path(), &changed, file));
    assert_ne!(fs::read(fx.dir().join(file)).unwrap(), before);
    assert_eq!(fx.decrypt("vikunja-jwt-secret"), b"new-value");
    assert_no_leftovers(runtime.path());
    assert_ok(&fx.run(&["check"]));
}

#[test]
fn edit_leaves_the_file_alone_and_wipes_plaintext_when_the_editor_fails_or_dies() {
    let Some(runtime) = ram_dir("edit_leaves_the_file_alone_when_the_editor_fails") else {
        return;
    };
    let fx = Fixture::bunk();
    let file = "secrets/n8n-encryption-key.age";
    let before = fs::read(fx.dir().join(file)).unwrap();

    let fails = editor_script(&fx, "printf 'half-written' > \"$f\"; exit 3");
    let err = assert_fails(&run_edit(&fx, runtime.path(), &fails, file), 1);
    assert!(err.contains("exited with status 3"), "{err}");
    assert_eq!(fs::read(fx.dir().join(file)).unwrap(), before);
    assert_no_leftovers(runtime.path());

    let killed = editor_script(&fx, "printf 'half-written' > \"$f\"; kill -9 $$");
    let err = assert_fails(&run_edit(&fx, runtime.path(), &killed, file), 1);
    assert!(err.contains("killed by signal 9"), "{err}");
    assert_eq!(fs::read(fx.dir().join(file)).unwrap(), before);
    assert_no_leftovers(runtime.path());
}

#[test]
fn edit_cleans_up_when_agex_itself_is_terminated() {
    let Some(runtime) = ram_dir("edit_cleans_up_when_agex_itself_is_terminated") else {
        return;
    };
    let fx = Fixture::bunk();
    let file = "secrets/mealie-secret.age";
    let before = fs::read(fx.dir().join(file)).unwrap();
    let marker = fx.tmp.path().join("editor-started");
    let slow = editor_script(
        &fx,
        &format!(
            "printf 'x' > \"$f\"; touch {}; exec sleep 30",
            marker.display()
        ),
    );
    let child = fx
        .agex()
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("EDITOR", &slow)
        .args(["-i", fx.key("admin.txt").to_str().unwrap(), "edit", file])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if marker.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(marker.exists(), "editor never started");
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = assert_fails(&out, 1);
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(fs::read(fx.dir().join(file)).unwrap(), before);
    assert_no_leftovers(runtime.path());
}

#[test]
fn edit_refuses_a_persistent_tmpdir_and_creates_new_files_for_rules() {
    let fx = Fixture::bunk();
    let disk = fx.tmp.path().join("disk-runtime");
    fs::create_dir_all(&disk).unwrap();
    // Private to us, so agex takes it as the runtime directory (and then refuses it).
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o700)).unwrap();
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&disk)
        .output()
        .unwrap();
    let on_disk = !matches!(
        String::from_utf8_lossy(&fs_type.stdout).trim(),
        "tmpfs" | "ramfs"
    );
    let editor = editor_script(&fx, "printf 'brand-new' > \"$f\"");
    if on_disk {
        let err = assert_fails(
            &run_edit(&fx, &disk, &editor, "secrets/vikunja-jwt-secret.age"),
            1,
        );
        assert!(err.contains("persistent filesystem"), "{err}");
        assert!(
            fs::read_dir(&disk).unwrap().next().is_none(),
            "wrote into the refused dir"
        );
    } else {
        eprintln!(
            "SKIP refusal half of edit_refuses_a_persistent_tmpdir: the temp dir is itself a tmpfs"
        );
    }

    let err = assert_fails(&run_edit(&fx, &disk, &editor, "secrets/not-a-rule.age"), 2);
    assert!(
        err.contains("no rule in") && err.contains("[secrets.not-a-rule]"),
        "{err}"
    );

    let Some(runtime) = ram_dir("edit creates new file") else {
        return;
    };
    add_rule(
        &fx,
        "\n[secrets.fresh]\nrecipients = [\"admins\", \"bunk\"]\n",
    );
    assert_ok(&run_edit(&fx, runtime.path(), &editor, "secrets/fresh.age"));
    assert_eq!(fx.decrypt("fresh"), b"brand-new");
    assert_ok(&fx.run(&["check"]));
}

#[test]
fn rekey_after_group_change_rewrites_only_affected_files_and_drops_removed_key() {
    if !common::have_tool("age-keygen", "rekey_after_group_change") {
        return;
    }
    let fx = Fixture::bunk();
    let (carol_key, carol_pub) = new_age_key(fx.tmp.path(), "carol");
    let before = fx.snapshot();
    // carol joins the recovery group, the paper key leaves it.
    fx.edit_config("paper = ", &format!("carol = \"{carol_pub}\"\npaper = "));
    fx.edit_config("recovery = [\"paper\"]", "recovery = [\"carol\"]");

    let dry = fx.run(&["rekey", "--dry-run"]);
    assert_ok(&dry);
    let planned = stdout(&dry);
    assert!(planned.contains("would rekey restic-password"), "{planned}");
    assert!(!planned.contains("vikunja"), "{planned}");

    let out = fx.run_admin(&["rekey"]);
    assert_ok(&out);
    let after = fx.snapshot();
    let changed: Vec<String> = after
        .iter()
        .filter(|(p, b)| p.extension().is_some_and(|e| e == "age") && before.get(*p) != Some(b))
        .map(|(p, _)| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut expected = vec![
        // The offsite credentials are for the recovery group too (a kit must reach S3).
        "b2-credentials",
        "borg-passphrase",
        "borg-ssh-key",
        "restic-password",
        "storagebox-account",
    ];
    expected.sort();
    let mut changed_sorted = changed.clone();
    changed_sorted.sort();
    assert_eq!(
        changed_sorted, expected,
        "only secrets of the recovery group change"
    );

    let paper = fx.run(&[
        "-i",
        fx.key("recovery.txt").to_str().unwrap(),
        "decrypt",
        "restic-password",
    ]);
    assert_fails(&paper, 1);
    let carol = fx.run(&[
        "-i",
        carol_key.to_str().unwrap(),
        "decrypt",
        "restic-password",
    ]);
    assert_ok(&carol);
    assert_eq!(carol.stdout, fx.decrypt("restic-password"));
    assert_ok(&fx.run(&["check"]));
    let again = fx.run_admin(&["rekey"]);
    assert!(stdout(&again).contains("up to date"), "{}", stdout(&again));
}

#[test]
fn rekey_keeps_every_file_and_leaves_no_temp_file_when_one_secret_fails() {
    let fx = Fixture::bunk();
    // The last bytes of the payload are the final chunk's tag: the header still parses,
    // the file cannot be decrypted. Every other secret is rekeyed (and its new file
    // staged) in parallel before the failure is known.
    let broken = fx.dir().join("secrets/vikunja-jwt-secret.age");
    let mut bytes = fs::read(&broken).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&broken, &bytes).unwrap();
    let before = fx.snapshot();

    let out = fx.run_admin(&["rekey", "--force"]);
    assert_fails(&out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vikunja-jwt-secret"), "{err}");
    assert_eq!(
        fx.snapshot(),
        before,
        "every file as it was, and no temp file left"
    );
}

#[test]
fn check_reports_stale_missing_and_orphan_files_as_json() {
    let fx = Fixture::bunk();
    assert_ok(&fx.run(&["check"]));
    fs::remove_file(fx.dir().join("secrets/grafana-admin-password.age")).unwrap();
    fs::write(fx.dir().join("secrets/leftover.age"), b"whatever").unwrap();
    fx.edit_config(
        "admins   = [\"admin\"]",
        "admins   = [\"admin\", \"paper\"]",
    );

    let out = fx.run(&["--json", "check"]);
    assert_fails(&out, 1);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let status = |file: &str| -> String {
        report["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["file"] == file)
            .map(|s| s["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{file} not in report"))
    };
    assert_eq!(status("secrets/grafana-admin-password.age"), "missing");
    assert_eq!(status("secrets/leftover.age"), "orphan");
    assert_eq!(status("secrets/vikunja-jwt-secret.age"), "stale");
    // restic-password already reaches paper through `recovery`, so only the group's
    // expansion matters: admins now adds paper to every admins secret.
    let table = stdout(&fx.run(&["secrets", "list"]));
    assert!(
        table.contains("grafana-admin-password") && table.contains("missing"),
        "{table}"
    );
}

#[test]
fn generate_fills_missing_secrets_and_never_overwrites() {
    let fx = Fixture::bunk();
    let keep = fs::read(fx.dir().join("secrets/immich-db-password.age")).unwrap();
    fs::remove_file(fx.dir().join("secrets/borg-ssh-key.age")).unwrap();
    fs::remove_file(fx.dir().join("secrets/vikunja-jwt-secret.age")).unwrap();
    let out = fx.run(&["generate"]);
    assert_ok(&out);
    let said = stdout(&out);
    assert!(
        said.contains("secrets/borg-ssh-key.age") && said.contains("vikunja-jwt-secret"),
        "{said}"
    );
    assert_eq!(
        fs::read(fx.dir().join("secrets/immich-db-password.age")).unwrap(),
        keep
    );

    let key = fx.decrypt("borg-ssh-key");
    assert!(String::from_utf8_lossy(&key).contains("BEGIN OPENSSH PRIVATE KEY"));
    let public = fs::read_to_string(fx.dir().join("secrets/borg-ssh-key.pub")).unwrap();
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    let jwt = fx.decrypt("vikunja-jwt-secret");
    assert_eq!(jwt.len(), 64);
    assert!(jwt.iter().all(u8::is_ascii_hexdigit));
    assert_ok(&fx.run(&["check"]));

    let before = fx.snapshot();
    let again = fx.run(&["generate", "vikunja-jwt-secret"]);
    assert_ok(&again);
    assert_eq!(
        fx.snapshot(),
        before,
        "generate overwrote an existing secret"
    );
}

#[test]
fn decrypt_refuses_names_outside_the_secrets_directory() {
    let fx = Fixture::bunk();
    let err = assert_fails(&fx.run_admin(&["decrypt", "agex.toml"]), 2);
    assert!(err.contains("not inside the secrets directory"), "{err}");
}

/// kill -9 at random moments of `agex rekey`: every file always decrypts to its
/// original plaintext, encrypted to either the old or the new recipient set.
#[test]
fn rekey_killed_at_random_moments_never_loses_or_truncates_a_secret() {
    if !common::have_tool("age-keygen", "rekey_killed_at_random_moments") {
        return;
    }
    let fx = Fixture::bunk();
    let mut rules = String::new();
    for i in 0..400 {
        rules.push_str(&format!(
            "\n[secrets.bulk-{i:03}]\nrecipients = [\"admins\", \"bunk\"]\ngenerator = {{ kind = \"hex\", bytes = 16 }}\n"
        ));
    }
    add_rule(&fx, &rules);
    assert_ok(&fx.run(&["generate"]));
    let (_, carol_pub) = new_age_key(fx.tmp.path(), "carol");
    fx.edit_config("paper = ", &format!("carol = \"{carol_pub}\"\npaper = "));

    let plaintexts = all_plaintexts(&fx);
    let identity = fx.key("admin.txt");
    // Kill moments are spread over the length of one whole rekey on this machine.
    let timer = std::time::Instant::now();
    assert_ok(&fx.run_admin(&["rekey", "--force"]));
    let window_us = (timer.elapsed().as_micros() as u64).max(1_000);
    for run in 0..20 {
        // Alternate the admins group so each run has every file to rewrite.
        let admins = if run % 2 == 0 {
            "[\"admin\", \"carol\"]"
        } else {
            "[\"admin\"]"
        };
        let path = fx.dir().join("agex.toml");
        let text = fs::read_to_string(&path).unwrap();
        let start = text.find("admins   = ").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        fs::write(
            &path,
            format!("{}admins   = {admins}{}", &text[..start], &text[end..]),
        )
        .unwrap();

        let mut child = fx
            .agex()
            .args(["-i", identity.to_str().unwrap(), "rekey"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rand::random::<u64>() % window_us));
        let _ = child.kill();
        let _ = child.wait();

        for (name, expected) in &plaintexts {
            let file = fx.dir().join(format!("secrets/{name}.age"));
            let out = fx
                .agex()
                .args(["-i", identity.to_str().unwrap(), "decrypt", name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "run {run}: {} no longer decrypts: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(&out.stdout, expected, "run {run}: {name} changed content");
        }
    }
    // A rerun completes what was interrupted.
    assert_ok(&fx.run_admin(&["rekey"]));
    assert_ok(&fx.run(&["check"]));
}

fn all_plaintexts(fx: &Fixture) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = fs::read_dir(fx.dir().join("secrets"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "age").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    // Only a sample of files is decrypted per run to keep the test quick; the bulk
    // secrets are all in it because they are the ones being rewritten.
    names
        .into_iter()
        .filter(|n| n.starts_with("bulk-0") || n == "restic-password" || n == "vikunja-jwt-secret")
        .map(|n| {
            let value = fx.decrypt(&n);
            (n, value)
        })
        .collect()
}

#[test]
fn edit_starts_vim_with_options_that_keep_plaintext_off_disk() {
    let fx = Fixture::bunk();
    // A fake `vim` (the name is what agex looks at) that records its arguments.
    let bin = fx.tmp.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let args_log = fx.tmp.path().join("vim-args");
    let vim = bin.join("vim");
    fs::write(
        &vim,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n",
            args_log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&vim, fs::Permissions::from_mode(0o755)).unwrap();
    let out = fx
        .agex()
        .env("EDITOR", &vim)
        .args([
            "-i",
            fx.key("admin.txt").to_str().unwrap(),
            "edit",
            "secrets/vikunja-jwt-secret.age",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let args = fs::read_to_string(&args_log).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[..3], ["-n", "-i", "NONE"], "{args:?}");
    let cmd = args.iter().position(|a| *a == "--cmd").expect("--cmd");
    for opt in ["noundofile", "nobackup", "nowritebackup", "noswapfile"] {
        assert!(args[cmd + 1].contains(opt), "{args:?}");
    }
    assert!(
        args.last().unwrap().ends_with("/vikunja-jwt-secret"),
        "{args:?}"
    );

    // Any other editor is started as it is: the file is its one argument.
    let plain = editor_script(&fx, "[ \"$#\" -eq 1 ] || exit 7");
    let out = fx
        .agex()
        .env("EDITOR", &plain)
        .args([
            "-i",
            fx.key("admin.txt").to_str().unwrap(),
            "edit",
            "secrets/vikunja-jwt-secret.age",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
}

#[test]
fn edit_reads_back_its_own_file_when_its_directory_is_swapped_for_a_symlink() {
    let fx = Fixture::bunk();
    let file = "secrets/vikunja-jwt-secret.age";
    let before = fx.decrypt("vikunja-jwt-secret");
    // Someone who controls the runtime directory renames agex's directory away, puts a
    // symlink to their own directory in its place, and plants a file there.
    let theirs = fx.tmp.path().join("theirs");
    fs::create_dir_all(&theirs).unwrap();
    fs::write(theirs.join("vikunja-jwt-secret"), b"attacker-chosen").unwrap();
    fs::write(theirs.join("other"), b"keep me").unwrap();
    let swap = editor_script(
        &fx,
        &format!(
            "d=$(dirname \"$f\"); mv \"$d\" \"$d.moved\"; ln -s '{}' \"$d\"",
            theirs.display()
        ),
    );
    let out = fx
        .agex()
        .env("EDITOR", &swap)
        .args(["-i", fx.key("admin.txt").to_str().unwrap(), "edit", file])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        fx.decrypt("vikunja-jwt-secret"),
        before,
        "agex read back the attacker's file"
    );
    assert_eq!(
        fs::read(theirs.join("vikunja-jwt-secret")).unwrap(),
        b"attacker-chosen"
    );
    assert_eq!(fs::read(theirs.join("other")).unwrap(), b"keep me");
    // agex wiped its own (moved) directory; the symlink and the emptied directory are
    // the swapper's to clean up.
    let mut left = Vec::new();
    for e in fs::read_dir(fx.runtime()).unwrap().flatten() {
        let meta = fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            assert_eq!(fs::read_dir(e.path()).unwrap().count(), 0, "{:?}", e.path());
            fs::remove_dir(e.path()).unwrap();
        } else {
            fs::remove_file(e.path()).unwrap();
        }
        left.push(e.file_name());
    }
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn leftovers_of_a_killed_agex_are_wiped_by_the_next_one_with_a_note() {
    let fx = Fixture::bunk();
    // What a SIGKILLed agex leaves: its private directory, named after its pid, which no
    // longer runs. A pid above the kernel's limit never runs.
    let dead = fx.runtime().join("agex-2147483000-00112233445566aa");
    fs::create_dir(&dead).unwrap();
    fs::write(dead.join("plaintext"), b"left behind").unwrap();
    // A directory of an agex that still runs (this test's pid) stays.
    let live = fx
        .runtime()
        .join(format!("agex-{}-00112233445566bb", std::process::id()));
    fs::create_dir(&live).unwrap();
    let editor = editor_script(&fx, "true");
    let out = fx
        .agex()
        .env("EDITOR", &editor)
        .args([
            "-i",
            fx.key("admin.txt").to_str().unwrap(),
            "edit",
            "secrets/vikunja-jwt-secret.age",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let err = common::stderr(&out);
    assert!(!dead.exists(), "{err}");
    assert!(
        err.lines()
            .filter(|l| l.starts_with("note: removed") && l.contains("agex-2147483000-"))
            .count()
            == 1,
        "{err}"
    );
    assert!(live.exists());
    fs::remove_dir(&live).unwrap();
}

#[test]
fn check_removes_the_plaintext_of_an_edit_killed_with_sigkill() {
    let fx = Fixture::bunk();
    let file = "secrets/mealie-secret.age";
    let before = fs::read(fx.dir().join(file)).unwrap();
    let editor_pid = fx.tmp.path().join("editor-pid");
    // The editor saves a value, then sleeps as a user would with the file open.
    let slow = editor_script(
        &fx,
        &format!(
            "printf 'typed-but-not-saved' > \"$f\"; echo $$ > {}.tmp; mv {0}.tmp {0}; exec sleep 30",
            editor_pid.display()
        ),
    );
    let mut child = fx
        .agex()
        .env("EDITOR", &slow)
        .args(["-i", fx.key("admin.txt").to_str().unwrap(), "edit", file])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if editor_pid.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(editor_pid.exists(), "editor never started");
    let agex_pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let sleeper = fs::read_to_string(&editor_pid).unwrap();
    Command::new("kill")
        .args(["-KILL", sleeper.trim()])
        .status()
        .unwrap();
    let leftover = fx
        .runtime_leftovers()
        .into_iter()
        .find(|p| p.components().count() == 1)
        .expect("the killed edit left its directory");
    assert!(
        leftover
            .to_string_lossy()
            .starts_with(&format!("agex-{agex_pid}-")),
        "{leftover:?}"
    );
    assert!(
        fx.runtime_leftovers().len() > 1,
        "its plaintext file is inside: {:?}",
        fx.runtime_leftovers()
    );

    let out = fx.run(&["check"]);
    assert_ok(&out);
    let err = common::stderr(&out);
    let shown = fx.runtime().join(&leftover);
    assert!(
        err.lines().any(|l| l.starts_with("note: removed")
            && l.contains(&shown.display().to_string())
            && l.contains(&format!("agex process {agex_pid}"))),
        "check did not name the leftover {}:\n{err}",
        shown.display()
    );
    assert!(
        fx.runtime_leftovers().is_empty(),
        "{:?}",
        fx.runtime_leftovers()
    );
    assert_eq!(fs::read(fx.dir().join(file)).unwrap(), before);
    // Nothing left to remove: a second check says nothing of it.
    let again = fx.run(&["check"]);
    assert_ok(&again);
    assert!(!common::stderr(&again).contains("note: removed"));
}

#[test]
fn commands_holding_plaintext_cannot_dump_core() {
    let fx = Fixture::bunk();
    let marker = fx.tmp.path().join("editor-started");
    let limits = fx.tmp.path().join("agex-limits");
    // The editor's parent is agex: read agex's limits while it holds the plaintext.
    let slow = editor_script(
        &fx,
        &format!(
            "cat /proc/$PPID/limits > '{}'; touch '{}'",
            limits.display(),
            marker.display()
        ),
    );
    let out = fx
        .agex()
        .env("EDITOR", &slow)
        .args([
            "-i",
            fx.key("admin.txt").to_str().unwrap(),
            "edit",
            "secrets/mealie-secret.age",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(marker.exists());
    let text = fs::read_to_string(&limits).unwrap();
    let core = text
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(fields[4..6], ["0", "0"], "{core}");
}
