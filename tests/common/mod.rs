//! Shared harness for the end-to-end tests: each test gets its own copy of the `bunk`
//! example in a temp dir and runs the real `agex` binary against it.
#![allow(dead_code)]
pub mod services;
pub mod setup;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The product repository's top directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The `agex` binary built for these tests.
pub fn agex_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agex"))
}

/// Whether an external tool is on PATH; prints why the caller skips when it is not.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIP {test}: `{tool}` is not installed (run scripts/install-deps.sh)");
    }
    found
}

/// Whether we run as root; prints why the caller skips when not.
pub fn is_root(test: &str) -> bool {
    let root = rustix_uid() == 0;
    if !root {
        eprintln!("SKIP {test}: needs root (tmpfs mounts, chown)");
    }
    root
}

fn rustix_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(u32::MAX)
}

/// A private copy of the example configuration and its demo keys, and a private RAM
/// directory every agex it starts uses as `XDG_RUNTIME_DIR`: when the fixture is dropped
/// that directory must be empty — no plaintext outlives the agex that made it, however
/// the test ended it (SIGTERM, SIGKILL followed by another agex run).
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    runtime: tempfile::TempDir,
}

/// A 0700 directory on /dev/shm (RAM, owned by us, as agex requires of a runtime dir).
fn runtime_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("agex-test-runtime-")
        .tempdir_in("/dev/shm")
        .expect("runtime dir on /dev/shm");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let left = self.runtime_leftovers();
        assert!(
            left.is_empty(),
            "agex left files in its runtime directory {}: {left:?}",
            self.runtime.path().display()
        );
    }
}

impl Fixture {
    /// A copy of the `bunk` example (agex.toml, secrets/, policies/, examples/keys/).
    pub fn bunk() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = repo_root();
        for item in ["agex.toml", "secrets", "policies", "examples/keys"] {
            let src = root.join(item);
            if src.exists() {
                copy_tree(&src, &tmp.path().join("config").join(item));
            }
        }
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Fixture {
            tmp,
            runtime: runtime_dir(),
        }
    }

    /// An empty configuration directory (for `agex init`).
    pub fn empty() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(tmp.path().join("config")).unwrap();
        fs::create_dir_all(tmp.path().join("home")).unwrap();
        Fixture {
            tmp,
            runtime: runtime_dir(),
        }
    }

    /// The `XDG_RUNTIME_DIR` of every agex this fixture starts.
    pub fn runtime(&self) -> &Path {
        self.runtime.path()
    }

    /// What is in the runtime directory now (names, recursively), to assert on.
    pub fn runtime_leftovers(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = tree_state(self.runtime.path()).into_keys().collect();
        out.sort();
        out
    }

    /// The configuration directory.
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("config")
    }

    /// Replaces the first `from` in agex.toml with `to`; `from` must be there.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.dir().join("agex.toml");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "agex.toml lacks {from}");
        fs::write(path, text.replacen(from, to, 1)).unwrap();
    }

    /// Points the example's two repositories at test URLs: each `url` replaced, and
    /// what belongs to the example's cloud servers (credentials, pinned host keys,
    /// bandwidth limits) removed; the borg ssh key too unless `borg_over_ssh`.
    pub fn retarget_repositories(&self, restic_url: &str, borg_url: &str, borg_over_ssh: bool) {
        let path = self.dir().join("agex.toml");
        let text = fs::read_to_string(&path).unwrap();
        let mut out = String::new();
        let mut section = String::new();
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with('[') {
                section = t
                    .split(']')
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .to_string();
            }
            let key = t.split(['=', ' ']).next().unwrap_or_default();
            let in_restic = section == "repositories.offsite-restic";
            let in_borg = section == "repositories.offsite-borg";
            if in_restic || in_borg {
                match key {
                    "url" => {
                        let url = if in_restic { restic_url } else { borg_url };
                        out.push_str(&format!("url             = \"{url}\"\n"));
                        continue;
                    }
                    "env_secret" | "known_hosts" | "limit_upload" | "limit_download" => continue,
                    "ssh_key_secret" if !borg_over_ssh => continue,
                    _ => {}
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        fs::write(path, out).unwrap();
    }

    /// A scratch root for host paths (`--root`).
    pub fn root(&self) -> PathBuf {
        let r = self.tmp.path().join("root");
        fs::create_dir_all(&r).unwrap();
        r
    }

    /// A demo key file of the example.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir().join("examples/keys").join(name)
    }

    /// `agex` with cwd = the config dir and a private, empty HOME.
    pub fn agex(&self) -> Command {
        let mut c = Command::new(agex_bin());
        c.current_dir(self.dir())
            .env("HOME", self.tmp.path().join("home"))
            .env_remove("AGEX_IDENTITY")
            .env_remove("XDG_CONFIG_HOME")
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env_remove("VISUAL")
            .env_remove("EDITOR")
            .env_remove("AGEX_LOG")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs `agex ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.agex().args(args).output().expect("run agex")
    }

    /// Runs `agex -i admin.txt ARGS`.
    pub fn run_admin(&self, args: &[&str]) -> Output {
        let key = self.key("admin.txt");
        let mut all = vec!["-i", key.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Decrypts a secret with the admin key through agex.
    pub fn decrypt(&self, name: &str) -> Vec<u8> {
        let out = self.run_admin(&["decrypt", name]);
        assert_ok(&out);
        out.stdout
    }

    /// Every file under the config dir with its bytes, to prove a command changed nothing.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.dir())
    }
}

/// Every regular file below `dir` with its content.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// One entry of a directory tree, as [`tree_state`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEntry {
    /// A directory.
    Dir,
    /// A regular file: permission bits and content.
    File(u32, Vec<u8>),
    /// A symbolic link and its target.
    Link(PathBuf),
}

/// Every directory, file and symlink below `dir` (not following links), to prove a
/// command created, removed or changed nothing, temp files and modes included.
pub fn tree_state(dir: &Path) -> BTreeMap<PathBuf, TreeEntry> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&p).unwrap();
            let entry = if meta.file_type().is_symlink() {
                TreeEntry::Link(fs::read_link(&p).unwrap())
            } else if meta.is_dir() {
                stack.push(p);
                TreeEntry::Dir
            } else {
                TreeEntry::File(meta.permissions().mode() & 0o7777, fs::read(&p).unwrap())
            };
            out.insert(rel, entry);
        }
    }
    out
}

/// What differs between two [`tree_state`]s, one line per path.
pub fn tree_changes(
    before: &BTreeMap<PathBuf, TreeEntry>,
    after: &BTreeMap<PathBuf, TreeEntry>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => out.push(format!("{} was removed", p.display())),
            Some(a) if a != b => out.push(format!("{} was modified", p.display())),
            Some(_) => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("{} was created", p.display()));
    }
    out
}

/// Copies a file or directory tree.
pub fn copy_tree(src: &Path, dst: &Path) {
    if src.is_dir() {
        fs::create_dir_all(dst).unwrap();
        for e in fs::read_dir(src).unwrap().flatten() {
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(src, dst).unwrap();
    }
}

/// Asserts a command exited 0, showing its output otherwise.
/// `cmd` run through `program prefix...` (setpriv, runuser, timeout): the same program,
/// arguments, working directory and environment, behind the prefix.
pub fn wrapped(program: &str, prefix: &[&str], cmd: &Command) -> Command {
    let mut out = Command::new(program);
    out.args(prefix).arg(cmd.get_program()).args(cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        out.current_dir(d);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    out
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a command failed with `code` and no panic, and returns its stderr.
pub fn assert_fails(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "agex panicked:\n{stderr}");
    stderr
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a run printed on stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
