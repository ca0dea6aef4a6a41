//! The rebuild drill: proves, inside a scratch root, that a host rebuilt from nothing
//! gets its secrets and its data back. A new host key is generated, the host is rekeyed
//! to it in a scratch copy of the configuration (the real one is never touched), a
//! generation is built and activated under the scratch root with the new key (the
//! caller supplies the activation: agex-backup does not depend on agex-activate), and
//! every service is restored from each repository — with the repository passwords the
//! new host key decrypts — and verified as in a drill.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agex_core::{Generator, Project};
use agex_secrets::identity::Origin;
use agex_secrets::{host_rekey, Identities};
use serde::Serialize;

use crate::access;
use crate::drill::{self, DrillEnv, DrillOptions, DrillResult};
use crate::error::BackupError;
use crate::manifest::under;
use crate::run::STATE_DIR;

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

/// Activates the host's configuration under a scratch root with the scratch host key;
/// returns a one-line summary or why it failed.
pub type Activate<'a> = dyn FnMut(&Project, &Path, &str) -> Result<String, String> + 'a;

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
    let state = under(root, Path::new(STATE_DIR));
    let base = state.join("rebuild");
    std::fs::create_dir_all(&base).map_err(BackupError::io(&base))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{host}-"))
        .tempdir_in(&base)
        .map_err(BackupError::io(&base))?;
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
        &host_cfg.identity,
        admin,
        activate,
        &s_root,
        &s_config,
        &mut report,
    );
    unmount(&s_root);
    drop(scratch);
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
    identity: &Path,
    admin: &Identities,
    activate: &mut Activate<'_>,
    s_root: &Path,
    s_config: &Path,
    report: &mut RebuildReport,
) -> Result<(), BackupError> {
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<String, String>| -> bool {
        let t = Instant::now();
        let r = f();
        let ok = r.is_ok();
        report.steps.push(StepResult {
            step: name.to_string(),
            ok,
            detail: r.unwrap_or_else(|e| e),
            seconds: t.elapsed().as_secs_f64(),
        });
        ok
    };

    // 1. A new host key, where the host's identity lives, under the scratch root.
    let key_path = under(s_root, identity);
    let mut public = String::new();
    let ok = step("generate a new host key", &mut || {
        let fresh = agex_secrets::generate::generate_value(
            &Generator::SshEd25519,
            &format!("root@{host}-rebuild-drill"),
        )
        .map_err(|e| e.to_string())?;
        public = fresh.public.clone().ok_or("no public key generated")?;
        if let Some(dir) = key_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        agex_core::atomic::write_new_atomic(&key_path, &fresh.secret, 0o600)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        Ok(format!(
            "{} at {}",
            host_rekey::fingerprint(&public).unwrap_or_default(),
            identity.display()
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
            let copy = Project::load(s_config).map_err(|e| e.to_string())?;
            let plan = host_rekey::plan(&copy, host, &public).map_err(|e| e.to_string())?;
            let done = host_rekey::execute(&plan, admin).map_err(|e| e.to_string())?;
            scratch_project = Some(Project::load(s_config).map_err(|e| e.to_string())?);
            Ok(format!("{} secret(s) re-encrypted", done.rekeyed.len()))
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
            activate(&scratch_project, s_root, host)
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
    let accesses: BTreeMap<String, Result<access::RepoAccess, String>> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                access::unlock(&scratch_project, n, &new_ids).map_err(|e| e.to_string()),
            )
        })
        .collect();
    // The scratch root has its own state directory; the host's backups take the real
    // repository locks, so the restores hold those too.
    let real_state = under(root, Path::new(STATE_DIR));
    let lock_wait = std::time::Duration::from_secs(project.config.backup.lock_wait);
    let _locks = names
        .iter()
        .map(|n| crate::lock::acquire(&real_state, n, lock_wait))
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

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
        let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
        for e in entries.flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", from.display()))
    }
}

/// Unmounts the secrets filesystem activation mounted under the scratch root, if any.
fn unmount(s_root: &Path) {
    let dir: PathBuf = s_root.join("run/agex.d");
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(4) == Some(&*dir.to_string_lossy()))
        })
        .unwrap_or(false);
    if mounted {
        let _ = crate::process::run(std::process::Command::new("umount").arg("-l").arg(&dir));
    }
}

/// Whether agex runs as root (only root can mount the scratch root's secrets filesystem).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
