//! A full disk (issue 15 §5): a small tmpfs mounted where agex writes, filled up. Each
//! command fails with an error naming the path, claims nothing done that is not, and
//! runs fine once there is space again. Needs root (mounts); skips with a reason without.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::setup::{app_data, Setup, SQLITE_POLICY};
use common::{assert_ok, have_tool, is_root, stderr, stdout, Fixture};

/// A tmpfs of `size` mounted on `dir` (created), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert_ok(&out);
        Tmpfs(dir.to_path_buf())
    }

    /// Fills it up but for nothing: a file written until ENOSPC.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        // Tail bytes too, so not even a small file fits.
        while f.write_all(&[0]).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

fn failed_saying(out: &Output, what: &str, path: &Path) -> String {
    let t = text(out);
    assert!(
        !out.status.success(),
        "{what} succeeded on a full disk:\n{t}"
    );
    assert!(
        t.contains(&path.display().to_string()) || t.contains("No space left"),
        "{what}: the error names neither the path {} nor the full disk:\n{t}",
        path.display()
    );
    eprintln!("{what} on a full disk said:\n{t}");
    t
}

const EXTRA_KEY: &str = "age12saw5wv8qr598u7xu2zc0lfx2ujdtajl70pqd35xvy4y3t7cfvcspjxpdm";

/// `rekey` with the secrets directory full: it fails naming the directory, every secret
/// still decrypts to its value, and once there is space the next `rekey` completes.
#[test]
fn rekey_with_the_secrets_directory_full_fails_and_keeps_every_secret() {
    let test = "rekey_with_the_secrets_directory_full_fails_and_keeps_every_secret";
    if !is_root(test) {
        return;
    }
    let fx = Fixture::bunk();
    let secrets = fx.dir().join("secrets");
    let saved = fx.tmp.path().join("secrets-saved");
    fs::rename(&secrets, &saved).unwrap();
    let fs = Tmpfs::mount(&secrets, "1m");
    common::copy_tree(&saved, &secrets);
    let names: Vec<String> = fs::read_dir(&secrets)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".age"))
                .map(str::to_string)
        })
        .collect();
    let before: Vec<(String, Vec<u8>)> = names.iter().map(|n| (n.clone(), fx.decrypt(n))).collect();
    fx.edit_config("[groups]", &format!("extra = \"{EXTRA_KEY}\"\n[groups]"));
    fx.edit_config(
        "admins   = [\"admin\"]",
        "admins   = [\"admin\", \"extra\"]",
    );
    let filler = fs.fill();
    let out = fx.run_admin(&["rekey"]);
    let said = failed_saying(&out, "rekey", &secrets);
    for (name, value) in &before {
        assert_eq!(
            &fx.decrypt(name),
            value,
            "{name} after the failed rekey: {said}"
        );
    }
    fs::remove_file(filler).unwrap();
    assert_ok(&fx.run_admin(&["rekey"]));
    assert_ok(&fx.run(&["check"]));
    for (name, value) in &before {
        assert_eq!(&fx.decrypt(name), value, "{name} after the rekey");
    }
}

fn backup_tools(test: &str) -> bool {
    is_root(test)
        && have_tool("restic", test)
        && have_tool("borg", test)
        && have_tool("sqlite3", test)
}

/// Local restic and borg repositories, `testapp` with 1 MiB of data, not backed up yet.
fn setup(tmp: &Path) -> Setup {
    let s = Setup::new(
        &tmp.join("restic").display().to_string(),
        &tmp.join("borg").display().to_string(),
        false,
    );
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 1 << 20);
    s.init_repos();
    s
}

/// `restore --to` a full filesystem: it fails naming the path and the full disk, does not
/// say it restored, and removes every file it had written there (the directory too when
/// the restore created it), so no half-restored file is left to be taken for a restored
/// one; once there is space the restore into the same directory completes.
#[test]
fn restore_to_a_full_filesystem_fails_naming_the_path_and_leaves_nothing_partial() {
    let test = "restore_to_a_full_filesystem_fails_naming_the_path_and_leaves_nothing_partial";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path());
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let target = tmp.path().join("target");
    let fs = Tmpfs::mount(&target, "256k");
    let fresh = target.join("new");
    for repo in ["offsite-restic", "offsite-borg"] {
        // Into the (empty) mount point, and into a directory the restore creates.
        for dir in [&target, &fresh] {
            let out = s.agex(&[
                "restore",
                "--service",
                "testapp",
                "--repo",
                repo,
                "--to",
                dir.to_str().unwrap(),
            ]);
            let said = failed_saying(&out, repo, dir);
            assert!(
                said.contains(&format!("restore into {} failed", dir.display())),
                "{repo}: the error does not name {}:\n{said}",
                dir.display()
            );
            assert!(said.contains("No space left"), "{repo}: {said}");
            assert!(said.contains("partial file"), "{repo}: {said}");
            assert!(!said.contains("restored testapp"), "{repo}: {said}");
            let left: Vec<_> = fs::read_dir(&target)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(
                left.is_empty(),
                "{repo} into {}: the failed restore left {left:?}:\n{said}",
                dir.display()
            );
        }
    }
    assert_ok(
        &Command::new("mount")
            .args(["-o", "remount,size=64m"])
            .arg(&fs.0)
            .output()
            .unwrap(),
    );
    assert_ok(&s.agex(&[
        "restore",
        "--service",
        "testapp",
        "--to",
        target.to_str().unwrap(),
    ]));
    let restored = common::snapshot(&target.join("srv/app/files"));
    let live: std::collections::BTreeMap<_, _> = common::snapshot(&s.host("/srv/app/files"))
        .into_iter()
        .filter(|(p, _)| !p.starts_with("cache"))
        .collect();
    assert_eq!(restored, live);
}

/// `backup` with the state directory (`/var/lib/agex`) full: it fails naming the path,
/// `status` does not record a success, and once there is space the next backup completes
/// and both repositories check clean.
#[test]
fn backup_with_the_state_directory_full_fails_and_the_next_run_succeeds() {
    let test = "backup_with_the_state_directory_full_fails_and_the_next_run_succeeds";
    if !backup_tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path());
    let state = s.host("/var/lib/agex");
    let saved = tmp.path().join("state-saved");
    let had_state = state.exists();
    if had_state {
        fs::rename(&state, &saved).unwrap();
    }
    let fs = Tmpfs::mount(&state, "512k");
    if had_state {
        common::copy_tree(&saved, &state);
    }
    let filler = fs.fill();
    let out = s.agex(&["backup", "--service", "testapp"]);
    let said = failed_saying(&out, "backup", &state);
    fs::remove_file(filler).unwrap();
    let status = s.status();
    let rows = status.to_string();
    assert!(
        !rows.contains("\"ok\""),
        "status records a success of the backup that failed ({said}):\n{rows}"
    );
    assert_ok(&s.agex(&["backup", "--service", "testapp"]));
    let out = s
        .restic(&tmp.path().join("restic").display().to_string())
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert_ok(&out);
    let out = s
        .borg(None)
        .args(["check", "--verify-data"])
        .arg(tmp.path().join("borg"))
        .output()
        .unwrap();
    assert_ok(&out);
}
