//! Backups of data as live services leave it: files written while they are backed up,
//! every kind of file (fifos, sockets, devices, links, sparse files, foreign owners,
//! xattrs), any file name, files that cannot be read. The real `agex` binary writes to a
//! local Restic and a local Borg repository; drills and restores of each must give the
//! data back.

mod common;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::setup::{app_data, pseudo_random, run, Setup, SQLITE_POLICY};
use common::{assert_ok, have_tool, is_root, stderr, stdout, wrapped};

const BIG: usize = 4 << 20;

fn tools(test: &str) -> bool {
    have_tool("restic", test) && have_tool("borg", test) && have_tool("sqlite3", test)
}

/// Both repositories' drill of `service`: every result passed.
fn drill_passes(s: &Setup, service: &str) -> serde_json::Value {
    let out = s.agex(&["--json", "drill", "--service", service]);
    let rec: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|_| panic!("no json: {}\n{}", stdout(&out), stderr(&out)));
    assert_ok(&out);
    let results = rec["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{rec}");
    for r in results {
        assert_eq!(r["result"], "ok", "{rec}");
    }
    rec
}

#[test]
fn a_backup_during_writes_warns_with_the_changed_files_and_both_drills_pass() {
    let test = "a_backup_during_writes_warns_with_the_changed_files_and_both_drills_pass";
    if !tools(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = Setup::local(tmp.path());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    let files = s.host("/srv/app/files");
    for i in 0..4u64 {
        fs::write(
            files.join(format!("big{i}.bin")),
            pseudo_random(BIG, i + 20),
        )
        .unwrap();
    }
    fs::write(files.join("app.log"), "").unwrap();
    s.init_repos();

    // The service goes on writing: appends to its log, rewrites parts of large files,
    // creates and deletes files.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, files) = (Arc::clone(&stop), files.clone());
        std::thread::spawn(move || {
            use std::io::{Seek, SeekFrom, Write};
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let mut log = fs::OpenOptions::new()
                    .append(true)
                    .open(files.join("app.log"))
                    .unwrap();
                writeln!(log, "request {n} served").unwrap();
                let mut big = fs::OpenOptions::new()
                    .write(true)
                    .open(files.join(format!("big{}.bin", n % 4)))
                    .unwrap();
                big.seek(SeekFrom::Start(((n * 7919 * 4096) % (BIG - 65536)) as u64))
                    .unwrap();
                big.write_all(&pseudo_random(65536, n as u64)).unwrap();
                fs::write(files.join(format!("tmp{n}.part")), format!("{n}")).unwrap();
                if n >= 3 {
                    let _ = fs::remove_file(files.join(format!("tmp{}.part", n - 3)));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let out = s.agex(&["backup", "--service", "testapp"]);
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert_ok(&out);
    assert!(writes > 10, "the writer wrote only {writes} times");
    let err = stderr(&out);
    for repo in ["offsite-restic", "offsite-borg"] {
        let line = err
            .lines()
            .find(|l| {
                l.starts_with(&format!("warning: testapp → {repo}: ")) && l.contains("changed")
            })
            .unwrap_or_else(|| panic!("no warning about changed files for {repo}: {err}"));
        assert!(line.contains("changed while they were backed up"), "{line}");
        assert!(line.contains("/srv/app/files/app.log"), "{line}");
    }
    drill_passes(&s, "testapp");

    // Once the service stopped writing, a backup has nothing to warn about.
    let out = s.agex(&["backup", "--service", "testapp"]);
    assert_ok(&out);
    assert!(!stderr(&out).contains("changed while"), "{}", stderr(&out));
    drill_passes(&s, "testapp");
}

/// What a tree holds, by path below it (bytes): what each entry is, and everything the
/// backups promise to give back about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Seconds; not for directories and links (restoring their content moves them).
    mtime: Option<i64>,
    content: Option<Vec<u8>>,
    target: Option<Vec<u8>>,
    rdev: u64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The smallest path of its hardlink group, when it has several links.
    hardlink: Option<Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffers are valid for the lengths given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut value = vec![0u8; 4096];
        // SAFETY: as above.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if m >= 0 {
            value.truncate(m as usize);
            out.insert(name.to_vec(), value);
        }
    }
    out
}

fn describe(dir: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().as_os_str().as_bytes().to_vec();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() {
                "chardev"
            } else {
                "blockdev"
            };
            if kind == "file" && m.nlink() > 1 {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: (kind != "dir" && kind != "symlink").then_some(m.mtime()),
                    content: (kind == "file").then(|| fs::read(&p).unwrap()),
                    target: (kind == "symlink")
                        .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                    rdev: if kind == "chardev" { m.rdev() } else { 0 },
                    xattrs: if kind == "file" || kind == "dir" {
                        xattrs(&p)
                    } else {
                        BTreeMap::new()
                    },
                    hardlink: None,
                },
            );
        }
    }
    for group in inodes.values().filter(|g| g.len() > 1) {
        let first = group.iter().min().unwrap().clone();
        for p in group {
            out.get_mut(p).unwrap().hardlink = Some(first.clone());
        }
    }
    out
}

/// Differences between two descriptions, one line each.
fn differences(
    want: &BTreeMap<Vec<u8>, Entry>,
    got: &BTreeMap<Vec<u8>, Entry>,
    skip: impl Fn(&Entry) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (p, w) in want.iter().filter(|(_, e)| !skip(e)) {
        let shown = String::from_utf8_lossy(p);
        match got.get(p) {
            None => out.push(format!("{shown}: missing ({})", w.kind)),
            Some(g) if g != w => {
                let mut w = w.clone();
                let mut g = g.clone();
                w.content = w.content.map(|c| format!("{} bytes", c.len()).into_bytes());
                g.content = g.content.map(|c| format!("{} bytes", c.len()).into_bytes());
                out.push(format!("{shown}: want {w:?}, got {g:?}"));
            }
            Some(_) => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        out.push(format!("{}: extra", String::from_utf8_lossy(p)));
    }
    out
}

fn os(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev as libc::dev_t) };
    assert_eq!(r, 0, "mknod {p:?}: {}", std::io::Error::last_os_error());
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {p:?}: {}", std::io::Error::last_os_error());
}

/// Fills `dir` with every kind of file under odd names; returns the names of the
/// special files (fifo, socket, device).
fn odd_tree(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let names: Vec<&[u8]> = vec![
        b"caf\xe9",
        b"new\nline",
        b"-rf",
        b"star*",
        b"[br]acket",
        b"back\\slash",
        b"quote\"d",
        b"tab\tbed",
    ];
    for (i, n) in names.iter().enumerate() {
        fs::write(dir.join(os(n)), pseudo_random(500 + i * 300, i as u64)).unwrap();
    }
    fs::write(dir.join("x".repeat(255)), "the longest name\n").unwrap();
    // A path as deep as Linux allows (PATH_MAX, 4,096 bytes with its NUL) wherever the
    // tests put it back: the longest place is a drill's scratch directory, about 100
    // bytes longer than the source.
    let mut deep = dir.join("deep");
    let limit = 4095 - 100 - "/leaf".len();
    for i in 0.. {
        let left = limit.saturating_sub(deep.as_os_str().len() + 1);
        if left < 3 {
            break;
        }
        deep = deep.join(format!("{i:02}{}", "d".repeat(left.min(250) - 2)));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf"), "deep down\n").unwrap();
    assert!(
        deep.join("leaf").as_os_str().len() > 3950,
        "{}",
        deep.display()
    );
    fs::create_dir_all(dir.join("empty")).unwrap();
    std::os::unix::fs::symlink(os(b"caf\xe9"), dir.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", dir.join("dangling")).unwrap();
    fs::write(dir.join("hard1"), "one inode, two names\n").unwrap();
    fs::hard_link(dir.join("hard1"), dir.join("hard2")).unwrap();
    let sparse = fs::File::create(dir.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    drop(sparse);
    fs::write(dir.join("private"), "for its owner only\n").unwrap();
    fs::set_permissions(dir.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(dir.join("private"), Some(4321), Some(8765)).unwrap();
    set_xattr(&dir.join("-rf"), "user.agex", b"kept");
    mknod(&dir.join("pipe"), libc::S_IFIFO | 0o640, 0);
    mknod(
        &dir.join("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    let sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    drop(sock);
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    fs::File::options()
        .write(true)
        .open(dir.join("star*"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

const ODD_POLICY: &str = r#"
paths = ["/srv/odd"]
schedule = "*-*-* 03:00:00"
"#;

/// `agex backup` that must end within `limit`.
fn backup_within(s: &Setup, service: &str, limit: Duration) -> std::process::Output {
    let mut child = s
        .agex_command(&["backup", "--service", service])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the backup did not end within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_kind_of_file_under_any_name_round_trips_through_both_repositories() {
    let test = "every_kind_of_file_under_any_name_round_trips_through_both_repositories";
    if !tools(test) || !is_root(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, restic_url, borg_url) = Setup::local(tmp.path());
    s.policy("odd", ODD_POLICY);
    let src = s.host("/srv/odd");
    odd_tree(&src);
    let want = describe(&src);
    s.init_repos();
    // A fifo, a socket and a device under the path: the backup ends, nothing is read
    // from them.
    let out = backup_within(&s, "odd", Duration::from_secs(120));
    assert_ok(&out);
    drill_passes(&s, "odd");

    // Borg cannot hold special files next to agex's dump pipes (`--read-special`) and
    // skips sockets: agex's restore from it recreates none of them.
    let special = |e: &Entry| matches!(e.kind, "fifo" | "socket" | "chardev" | "blockdev");
    for (repo, skip_special) in [("offsite-restic", false), ("offsite-borg", true)] {
        let to = tmp.path().join(format!("to-{repo}"));
        let out = s.agex(&[
            "restore",
            "--service",
            "odd",
            "--repo",
            repo,
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_ok(&out);
        let got = describe(&to.join("srv/odd"));
        let diff = differences(&want, &got, |e| skip_special && special(e));
        let diff: Vec<_> = diff
            .into_iter()
            .filter(|d| !(skip_special && d.ends_with("extra")))
            .collect();
        assert!(
            diff.is_empty(),
            "restore --to from {repo}:\n{}",
            diff.join("\n")
        );
    }

    // In place: the tree is damaged, then put back from each repository.
    for (repo, skip_special) in [("offsite-restic", false), ("offsite-borg", true)] {
        fs::write(src.join(os(b"caf\xe9")), "overwritten").unwrap();
        fs::remove_file(src.join(os(b"new\nline"))).unwrap();
        fs::remove_file(src.join("dangling")).unwrap();
        fs::write(src.join(os(b"stray\xff")), "not in the snapshot").unwrap();
        let out = s.agex(&[
            "restore",
            "--service",
            "odd",
            "--repo",
            repo,
            "--in-place",
            "--delete",
            "--yes",
        ]);
        assert_ok(&out);
        let got = describe(&src);
        let diff = differences(&want, &got, |e| skip_special && special(e));
        assert!(
            diff.is_empty(),
            "restore --in-place from {repo}:\n{}",
            diff.join("\n")
        );
    }

    // The peers' own tools read the same snapshots (names they can represent).
    let peer = tmp.path().join("peer-restic");
    s.restic_restore_latest(&restic_url, peer.clone());
    let borg_dir = tmp.path().join("peer-borg-extract");
    fs::create_dir_all(&borg_dir).unwrap();
    let list: serde_json::Value = serde_json::from_str(&stdout(&run(
        s.borg(None).args(["list", "--json"]).arg(&borg_url),
        "borg list",
    )))
    .unwrap();
    let archive = list["archives"][0]["name"].as_str().unwrap().to_string();
    run(
        s.borg(None)
            .current_dir(&borg_dir)
            .arg("extract")
            .arg(format!("{borg_url}::{archive}")),
        "borg extract",
    );
    let plain = |e: &Entry| special(e);
    let from_restic = describe(&peer.join("srv/odd"));
    let from_borg = describe(&borg_dir.join("srv/odd"));
    // restic 0.14 shows rustic_core's escaped form of names with `\`, `"`, control
    // characters or bytes that are not UTF-8; every other name is the same.
    let escaped = |p: &[u8]| {
        p.iter()
            .any(|b| matches!(b, b'\\' | b'"' | b'\n' | b'\t' | 0x80..))
    };
    let comparable = |m: &BTreeMap<Vec<u8>, Entry>| -> BTreeMap<Vec<u8>, Entry> {
        m.iter()
            .filter(|(p, e)| !escaped(p) && !plain(e))
            .map(|(p, e)| {
                let mut e = e.clone();
                // Links to escaped names and the group a hardlink is named by.
                if e.target.as_deref().is_some_and(escaped) {
                    e.target = None;
                }
                (p.clone(), e)
            })
            .collect()
    };
    let diff = differences(&comparable(&from_borg), &comparable(&from_restic), |_| {
        false
    });
    assert!(
        diff.is_empty(),
        "restic restore vs borg extract:\n{}",
        diff.join("\n")
    );
    assert!(from_borg.contains_key(b"caf\xe9".as_slice()));
    let _ = OsStr::new("");
}

#[test]
fn an_unreadable_file_is_a_warning_and_the_drills_pass() {
    let test = "an_unreadable_file_is_a_warning_and_the_drills_pass";
    if !tools(test) || !is_root(test) || !have_tool("setpriv", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, _, _) = Setup::local(tmp.path());
    s.policy("testapp", SQLITE_POLICY);
    app_data(&s, 0);
    let secret = s.host("/srv/app/files/sub/locked.key");
    fs::write(&secret, "no one may read this\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    s.init_repos();
    // root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH meets permissions as a service
    // account's backup would (the engines too: they inherit the bounding set).
    let cmd = s.agex_command(&["backup", "--service", "testapp"]);
    let mut dropped = wrapped(
        "setpriv",
        &["--bounding-set", "-dac_override,-dac_read_search", "--"],
        &cmd,
    );
    let out = dropped.output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for repo in ["offsite-restic", "offsite-borg"] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("warning: testapp → {repo}: "))
                    && l.contains("/srv/app/files/sub/locked.key could not be read")),
            "{err}"
        );
    }
    drill_passes(&s, "testapp");
}
