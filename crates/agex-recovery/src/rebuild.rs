//! The rebuild drill: proves, inside a scratch root, that a host rebuilt from nothing
//! gets its secrets and its data back. A new host key is generated, the host is rekeyed
//! to it in a scratch copy of the configuration (the real one is never touched), a
//! generation is built and activated under the scratch root with the new key (the
//! caller supplies the activation: agex-backup does not depend on agex-activate), and
//! every service is restored from each repository — with the repository passwords the
//! new host key decrypts — and verified as in a drill.
//!
//! Nothing of it reaches a persistent disk: the throwaway key lives in a [`RamDir`], the
//! scratch root's `run/agex.d` is the drill's own ramfs mount (only root can mount it;
//! without root the drill refuses unless told that secrets may go to disk), and what a
//! killed drill left behind is unmounted and wiped by the next one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use agex_core::{Generator, Project};
use agex_secrets::identity::Origin;
use agex_secrets::ramdir::{self, RamDir};
use agex_secrets::{host_rekey, Identities};
use serde::Serialize;

use crate::drill::{self, DrillEnv, DrillOptions, DrillResult};
use agex_backup::access;
use agex_backup::error::BackupError;
use agex_backup::paths;

/// One step of the rebuild drill.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// What it was.
    pub step: String,
    /// Whether it worked.
    pub ok: bool,
    /// What it did, or why it failed.
    pub detail: String,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// What the rebuild drill found.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// The host.
    pub host: String,
    /// Fingerprint of the throwaway host key it generated.
    pub new_key: String,
    /// Key, rekey and activation steps.
    pub steps: Vec<StepResult>,
    /// One restore per service and repository.
    pub restores: Vec<DrillResult>,
    /// Whether everything passed.
    pub passed: bool,
    /// The oldest snapshot restored (RFC 3339): the oldest data a rebuild gets back.
    pub oldest_data: Option<String>,
    /// Wall time of the whole drill, seconds.
    pub total_seconds: f64,
}

/// Why a step of the rebuild drill failed: the error of whichever crate the step called
/// (its message is the step's detail in the report).
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// Activates the host's configuration under a scratch root (second argument) for the host
/// (third) with the scratch host key at the path given last; returns a one-line summary
/// or why it failed.
pub type Activate<'a> = dyn FnMut(&Project, &Path, &str, &Path) -> Result<String, StepError> + 'a;

/// How the rebuild drill may run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebuildOptions {
    /// Without root no RAM filesystem can be mounted for the scratch root: accept that
    /// the host's secrets are decrypted onto the state directory's disk.
    pub secrets_on_disk: bool,
}

/// Whether the scratch root's secrets go to disk; refuses that unless allowed.
pub fn secrets_on_disk(root: bool, opts: &RebuildOptions) -> Result<bool, BackupError> {
    match (root, opts.secrets_on_disk) {
        (true, _) => Ok(false),
        (false, true) => Ok(true),
        (false, false) => Err(BackupError::Usage(
            "the rebuild drill needs root to mount a RAM filesystem for the host's decrypted \
             secrets; run it as root, or pass --allow-secrets-on-disk to decrypt them under \
             /var/lib/agex/rebuild (removed afterwards, but on a persistent disk meanwhile)"
                .into(),
        )),
    }
}

/// Runs the rebuild drill for `host`. `admin` must decrypt the host's secrets (for the
/// rekey); `root` is the real root, whose user database and database sockets the
/// scratch root borrows.
pub fn run(
    project: &Project,
    root: &Path,
    host: &str,
    admin: &Identities,
    activate: &mut Activate<'_>,
) -> Result<RebuildReport, BackupError> {
    let started = Instant::now();
    let host_cfg = project.config.hosts.get(host).ok_or_else(|| {
        BackupError::Usage(format!(
            "host `{host}` is not in agex.toml (hosts: {})",
            project
                .config
                .hosts
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let state = paths::state_dir(root);
    let scratch = pid_scratch(&state.join("rebuild"), host, "a rebuild drill")?;
    let _wiped_on_signal = ramdir::Registration::tree(scratch.path());
    let key_dir = RamDir::create(false)?;
    let s_root = scratch.path().join("root");
    let s_config = scratch.path().join("config");
    let mut report = RebuildReport {
        host: host.to_string(),
        new_key: String::new(),
        steps: vec![],
        restores: vec![],
        passed: false,
        oldest_data: None,
        total_seconds: 0.0,
    };
    let result = steps(
        project,
        root,
        host,
        &key_dir,
        admin,
        activate,
        &s_root,
        &s_config,
        &mut report,
    );
    unmount_below(scratch.path());
    ramdir::wipe_tree(scratch.path());
    drop(scratch);
    drop(key_dir);
    let _ = &host_cfg.identity;
    result?;
    report.passed = report.steps.iter().all(|s| s.ok)
        && !report.restores.is_empty()
        && report.restores.iter().all(DrillResult::ok);
    report.oldest_data = report
        .restores
        .iter()
        .filter(|r| r.ok())
        .filter_map(|r| r.snapshot_time.clone())
        .min();
    report.total_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn steps(
    project: &Project,
    root: &Path,
    host: &str,
    key_dir: &RamDir,
    admin: &Identities,
    activate: &mut Activate<'_>,
    s_root: &Path,
    s_config: &Path,
    report: &mut RebuildReport,
) -> Result<(), BackupError> {
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<String, StepError>| -> bool {
        let t = Instant::now();
        let r = f();
        let ok = r.is_ok();
        report.steps.push(StepResult {
            step: name.to_string(),
            ok,
            detail: r.unwrap_or_else(|e| e.to_string()),
            seconds: t.elapsed().as_secs_f64(),
        });
        ok
    };

    // 1. A new host key, in RAM: the rekeyed copies next to the scratch root are only
    // as safe as it is.
    const KEY: &str = "ssh_host_ed25519_key";
    let key_path = key_dir.resolved(KEY);
    let mut public = String::new();
    let ok = step("generate a new host key", &mut || {
        let fresh = agex_secrets::generate::generate_value(
            &Generator::SshEd25519,
            &format!("root@{host}-rebuild-drill"),
        )?;
        public = fresh.public.clone().ok_or("no public key generated")?;
        let shown = key_dir.write(KEY, &fresh.secret)?;
        Ok(format!(
            "{} in RAM at {}",
            host_rekey::fingerprint(&public).unwrap_or_default(),
            shown.display()
        ))
    });
    if !ok {
        return Ok(());
    }
    report.new_key = host_rekey::fingerprint(&public).unwrap_or_default();

    // 2. The host rekeyed to it in a scratch copy of the configuration.
    let mut scratch_project: Option<Project> = None;
    let ok = step(
        "rekey the host in a scratch copy of the configuration",
        &mut || {
            for item in [
                agex_core::project::CONFIG_FILE,
                agex_core::project::SECRETS_DIR,
                agex_core::project::POLICIES_DIR,
            ] {
                let from = project.path(item);
                if from.exists() {
                    copy_tree(&from, &s_config.join(item))?;
                }
            }
            let copy = Project::load(s_config)?;
            let plan = host_rekey::plan(&copy, host, &public)?;
            let done = host_rekey::execute(&plan, admin)?;
            scratch_project = Some(Project::load(s_config)?);
            Ok(format!(
                "{} re-encrypted",
                agex_core::human::count(done.rekeyed.len(), "secret")
            ))
        },
    );
    let Some(scratch_project) = scratch_project.filter(|_| ok) else {
        return Ok(());
    };

    // 3. The generation built and activated under the scratch root with the new key.
    let ok = step(
        "build and activate the generation with the new key",
        &mut || {
            for f in ["etc/passwd", "etc/group"] {
                let from = root.join(f);
                if from.exists() {
                    copy_tree(&from, &s_root.join(f))?;
                }
            }
            activate(&scratch_project, s_root, host, &key_path)
        },
    );
    if !ok {
        return Ok(());
    }

    // 4. Every service from each repository, with the passwords the new key decrypts.
    let new_ids = Identities::load(&[(key_path.clone(), Origin::Explicit)])?;
    let pairs = drill::plan(&scratch_project, &DrillOptions::default())?;
    let mut names: Vec<String> = pairs.iter().map(|(_, r)| r.clone()).collect();
    names.sort();
    names.dedup();
    let accesses = access::unlock_all(&scratch_project, &new_ids, &names);
    // The scratch root has its own state directory; the host's backups take the real
    // repository locks, so the restores hold those too.
    let real_state = paths::state_dir(root);
    let lock_wait = std::time::Duration::from_secs(project.config.backup.lock_wait);
    let _locks = names
        .iter()
        .map(|n| agex_backup::lock::acquire(&real_state, n, lock_wait))
        .collect::<Result<Vec<_>, _>>()?;
    let env = DrillEnv {
        project: &scratch_project,
        root: s_root,
        db_root: root,
        access: &accesses,
        ids: &new_ids,
    };
    let opts = DrillOptions {
        lock_wait,
        ..Default::default()
    };
    report.restores = drill::execute(&env, &pairs, &opts, false)?.results;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), BackupError> {
    let meta = std::fs::symlink_metadata(from).map_err(BackupError::io(from))?;
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(BackupError::io(to))?;
        let entries = std::fs::read_dir(from).map_err(BackupError::io(from))?;
        for e in entries.flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(BackupError::io(dir))?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(BackupError::io(from))
    }
}

/// Unmounts every filesystem mounted below `dir` (the scratch root's secrets
/// filesystem), deepest first.
fn unmount_below(dir: &Path) {
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .map(unescape_mountinfo)
                .filter(|p| p.starts_with(dir) && p != dir)
                .collect()
        })
        .unwrap_or_default();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        let _ = agex_backup::process::run(std::process::Command::new("umount").arg("-l").arg(&m));
    }
}

/// A mount point as `/proc/self/mountinfo` writes it (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// A fresh scratch directory `<base>/<pid>-<label>-<random>` for a drill (`what`), after
/// removing those of drills whose process is gone (SIGKILLed before they could clean up:
/// they may hold database dumps or mounts), unmounting what they mounted; one line each.
pub(crate) fn pid_scratch(
    base: &Path,
    label: &str,
    what: &str,
) -> Result<tempfile::TempDir, BackupError> {
    std::fs::create_dir_all(base).map_err(BackupError::io(base))?;
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if ramdir::alive(pid) {
                continue;
            }
            unmount_below(&e.path());
            ramdir::wipe_tree(&e.path());
            ramdir::notice(&format!(
                "removed {}, left behind by {what} (process {pid}) that did not finish",
                e.path().display()
            ));
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{}-{label}-", std::process::id()))
        .tempdir_in(base)
        .map_err(BackupError::io(base))
}
