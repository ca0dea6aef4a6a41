//! Bad-input corpus: every case under tests/bad/ must fail clearly and change nothing.
//!
//! One directory per case:
//! - `cmd`: the agex arguments, one line, split on whitespace. The demo admin identity
//!   (`-i examples/keys/admin.txt`) is passed first unless the line gives its own `-i`.
//! - `files/`: files laid over the copy of the example before the run.
//! - `remove`: optional, project-relative paths deleted before the run, one per line.
//! - `stdin`: optional, what agex reads on stdin (none: stdin is /dev/null).
//! - `expect`: lines that must each appear in stderr (blank lines and `#` lines ignored).
//! - `reject`: optional, lines that must not appear in stderr (a message once got wrong).
//! - `code`: optional, the expected exit code (default 2, a usage or config error).
//!
//! `BAD_INPUT_CASE=NAME` runs one case; `BAD_INPUT_SHOW=1` prints every case's stderr.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{repo_root, tree_state, Fixture};

/// The corpus may grow, never silently shrink.
const MIN_CASES: usize = 150;

/// One case directory, read.
struct Case {
    name: String,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    expect: Vec<String>,
    reject: Vec<String>,
    code: i32,
    remove: Vec<String>,
    files: Option<PathBuf>,
}

impl Case {
    fn load(dir: &Path) -> Result<Case, String> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
        let cmd = read("cmd").ok_or("missing `cmd`")?;
        let args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        if args.is_empty() {
            return Err("`cmd` is empty".into());
        }
        let lines = |text: Option<String>| -> Vec<String> {
            text.unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        let expect = lines(read("expect"));
        if expect.is_empty() {
            return Err("`expect` is missing or empty: say what the error must name".into());
        }
        let code = match read("code") {
            None => 2,
            Some(c) => c
                .trim()
                .parse()
                .map_err(|_| format!("`code` is not a number: {c:?}"))?,
        };
        let files = Some(dir.join("files")).filter(|f| f.is_dir());
        Ok(Case {
            name,
            args,
            stdin: fs::read(dir.join("stdin")).ok(),
            expect,
            reject: lines(read("reject")),
            code,
            remove: lines(read("remove")),
            files,
        })
    }

    /// Runs the case; every broken promise is returned, not just the first.
    fn run(&self) -> Vec<String> {
        let fx = Fixture::bunk();
        if let Some(files) = &self.files {
            for e in fs::read_dir(files).expect("read files/").flatten() {
                common::copy_tree(&e.path(), &fx.dir().join(e.file_name()));
            }
        }
        for rel in &self.remove {
            let p = fx.dir().join(rel);
            if p.is_dir() {
                fs::remove_dir_all(&p).expect("remove dir");
            } else {
                fs::remove_file(&p).unwrap_or_else(|e| panic!("remove {rel}: {e}"));
            }
        }
        let before = tree_state(fx.tmp.path());

        let mut cmd = fx.agex();
        if !self.args.iter().any(|a| a == "-i" || a == "--identity") {
            cmd.arg("-i").arg(fx.key("admin.txt"));
        }
        cmd.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn agex");
        if let Some(input) = &self.stdin {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            // agex may exit before reading stdin; a broken pipe is not the case's failure.
            let _ = pipe.write_all(input);
        }
        let out = child.wait_with_output().expect("wait for agex");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if std::env::var_os("BAD_INPUT_SHOW").is_some() {
            eprintln!(
                "--- {} (exit {:?}) agex {}\n{stderr}",
                self.name,
                out.status.code(),
                self.args.join(" ")
            );
        }

        let mut problems = Vec::new();
        if out.status.code() != Some(self.code) {
            problems.push(format!(
                "exit code {:?}, expected {}",
                out.status.code(),
                self.code
            ));
        }
        for want in &self.expect {
            if !stderr.contains(want.as_str()) {
                problems.push(format!("stderr lacks {want:?}"));
            }
        }
        for unwanted in &self.reject {
            if stderr.contains(unwanted.as_str()) {
                problems.push(format!("stderr contains {unwanted:?}"));
            }
        }
        for bad in ["panicked", "RUST_BACKTRACE"] {
            if stderr.contains(bad) {
                problems.push(format!("stderr contains {bad:?}: agex panicked"));
            }
        }
        if !stdout.is_empty() {
            problems.push(format!(
                "stdout is not empty (a failing command prints nothing there): {stdout:?}"
            ));
        }
        let after = tree_state(fx.tmp.path());
        for change in common::tree_changes(&before, &after) {
            problems.push(format!("the run changed the tree: {change}"));
        }
        if !problems.is_empty() {
            problems.push(format!("stderr was:\n{stderr}"));
        }
        problems
    }
}

fn case_dirs() -> Vec<PathBuf> {
    let root = repo_root().join("tests/bad");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_bad_input_fails_clearly_and_changes_nothing() {
    let dirs = case_dirs();
    assert!(
        dirs.len() >= MIN_CASES,
        "the corpus has {} cases; it must keep at least {MIN_CASES}",
        dirs.len()
    );
    let only = std::env::var("BAD_INPUT_CASE").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for dir in &dirs {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        ran += 1;
        let problems = match Case::load(dir) {
            Ok(case) => case.run(),
            Err(why) => vec![format!("malformed case: {why}")],
        };
        if !problems.is_empty() {
            failures.push(format!("case {name}:\n  {}", problems.join("\n  ")));
        }
    }
    assert!(ran > 0, "no case matched BAD_INPUT_CASE={only:?}");
    assert!(
        failures.is_empty(),
        "{} of {ran} bad-input cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
