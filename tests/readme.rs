//! The README's "Your own host, from zero" followed literally: its shell blocks run in a
//! real bash, its TOML blocks are the files written, with only the user's key, the host's
//! key and the USB disk's mount point replaced by the test's. `agex` on that bash's PATH
//! is a wrapper adding `--root` (a scratch root) and `--host myhost`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::services::Postgres;
use common::{agex_bin, have_tool, repo_root};

/// The README's blocks between the from-zero markers: (info string, text).
fn from_zero_blocks() -> Vec<(String, String)> {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- from-zero:start -->")
        .expect("start marker");
    let end = readme.find("<!-- from-zero:end -->").expect("end marker");
    let mut blocks = Vec::new();
    let mut lines = readme[start..end].lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((info.to_owned(), body.join("\n") + "\n"));
        }
    }
    blocks
}

fn ssh_keygen(path: &Path, comment: &str) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = fs::read_to_string(path.with_extension("pub")).unwrap();
    public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a README shell block in bash; returns its combined output.
fn bash(block: &str, home: &Path, bin: &Path, cwd: &Path) -> String {
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-e", "-o", "pipefail", "-c", block])
        .current_dir(cwd)
        .env("HOME", home)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env_remove("AGEX_IDENTITY")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("AGEX_LOG")
        .env_remove("AGEX_SYSTEMCTL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "README block failed:\n{block}\n---\n{text}"
    );
    text
}

#[test]
fn the_readme_path_from_zero_reaches_a_verified_first_backup() {
    let test = "the_readme_path_from_zero_reaches_a_verified_first_backup";
    for tool in [
        "bash",
        "ssh-keygen",
        "age-keygen",
        "restic",
        "borg",
        "sqlite3",
    ] {
        if !have_tool(tool, test) {
            return;
        }
    }
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let blocks = from_zero_blocks();
    let kinds: Vec<&str> = blocks.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(
        kinds,
        ["sh", "toml", "toml", "toml", "sh"],
        "the section's shape changed"
    );

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let root = tmp.path().join("root");
    let usb = tmp.path().join("usb");
    let bin = tmp.path().join("bin");
    for d in [&home.join(".ssh"), &root.join("etc/ssh"), &usb, &bin] {
        fs::create_dir_all(d).unwrap();
    }
    let my_key = ssh_keygen(&home.join(".ssh/id_ed25519"), "you@laptop");
    let host_key = ssh_keygen(&root.join("etc/ssh/ssh_host_ed25519_key"), "root@myhost");
    let paper = Command::new("age-keygen").output().unwrap();
    let paper_key = String::from_utf8_lossy(&paper.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_owned))
        .expect("age-keygen prints the public key");
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let wrapper = bin.join("agex");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --root '{}' --host myhost \"$@\"\n",
            agex_bin().display(),
            root.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();

    // The service's data: files, a SQLite database, a PostgreSQL database `app` on the
    // socket the policy names (the test cluster's socket, linked under the root).
    fs::create_dir_all(root.join("var/lib/app/files")).unwrap();
    fs::write(root.join("var/lib/app/files/photo.jpg"), vec![7u8; 100_000]).unwrap();
    let db = root.join("var/lib/app/app.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);")
        .output()
        .unwrap();
    assert!(out.status.success());
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE notes(id int); INSERT INTO notes SELECT generate_series(1, 500);",
    );
    fs::create_dir_all(root.join("run/postgresql")).unwrap();
    std::os::unix::fs::symlink(
        pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port())),
        root.join("run/postgresql/.s.PGSQL.5432"),
    )
    .unwrap();

    // 1. agex init, literally.
    bash(&blocks[0].1, &home, &bin, &home);
    let conf = home.join("agex");
    assert!(conf.join("agex.toml").is_file());

    // 2. The three files, with the placeholders replaced by the test's keys and disk.
    let replace = |text: &str, from: &str, to: &str| -> String {
        assert!(
            text.contains(from),
            "the README block lacks `{from}`:\n{text}"
        );
        text.replace(from, to)
    };
    for (_, text) in &blocks[1..4] {
        let name = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .expect("a TOML block starts with `# FILE`");
        let mut text = text.clone();
        if name == "agex.toml" {
            text = replace(
                &text,
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...your-key",
                &my_key,
            );
            text = replace(
                &text,
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...host-key",
                &host_key,
            );
            text = replace(&text, "age1...your-paper-key", &paper_key);
            text = replace(&text, "/mnt/usb", usb.to_str().unwrap());
        }
        fs::write(conf.join(name), text).unwrap();
    }

    // 3. The commands, literally, one at a time so a failure names its line.
    for line in blocks[4].1.lines().filter(|l| !l.trim().is_empty()) {
        bash(line, &home, &bin, &conf);
    }

    // What they promised: the secret in RAM with its owner and mode, both repositories
    // holding a snapshot that the drill restored, and the timers.
    let secret = root.join("run/agex/app.service/app-session-key");
    let meta = fs::metadata(&secret).unwrap_or_else(|e| panic!("{}: {e}", secret.display()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let status = bash("agex --json status", &home, &bin, &conf);
    let start = status.find('[').unwrap();
    let status: serde_json::Value = serde_json::Deserializer::from_str(&status[start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{status}");
    for row in rows {
        assert_eq!(row["result"], "ok", "{row}");
        assert_eq!(row["drill"]["result"], "ok", "{row}");
    }
    assert!(
        root.join("etc/systemd/system/agex-backup@app.timer")
            .exists()
            || fs::read_dir(root.join("etc/systemd/system"))
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().contains("backup"))
    );
}
