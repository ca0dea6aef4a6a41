//! `agex edit`: the plaintext lives in a 0600 file on tmpfs/ramfs only while the editor
//! runs, and is wiped and removed on every exit path.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agex_core::{LockEntry, Project, SecretRule};
use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::identity::Identities;
use crate::ramdir::RamDir;
use crate::secret_file;

/// How to run the editor.
#[derive(Debug, Clone, Default)]
pub struct EditOptions {
    /// The editor command; default `$VISUAL`, then `$EDITOR`, then `vi`.
    pub editor: Option<String>,
    /// Allow a temp dir on a persistent filesystem.
    pub unsafe_tmpdir: bool,
}

/// What an edit did to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditOutcome {
    /// The content did not change; the file was not rewritten.
    Unchanged,
    /// The file was re-encrypted with the new content.
    Updated(LockEntry),
    /// A new file was created.
    Created(LockEntry),
}

/// The editor command from the environment.
pub fn default_editor() -> String {
    ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "vi".to_string())
}

/// Opens a secret in the editor. `ids` are needed only when the file exists.
pub fn edit(
    project: &Project,
    rule: &SecretRule,
    ids: Option<&Identities>,
    opts: &EditOptions,
) -> Result<EditOutcome, SecretsError> {
    let shown = project.display(&rule.file);
    let exists = project.path(&rule.file).exists();
    let original: Zeroizing<Vec<u8>> = match (exists, ids) {
        (true, Some(ids)) => secret_file::open(project, rule, ids)?,
        (true, None) => {
            return Err(SecretsError::NoIdentities {
                looked: vec!["(none given)".into()],
            })
        }
        (false, _) => Zeroizing::new(Vec::new()),
    };

    // The guard goes first so it is dropped last: a SIGTERM is handled until the
    // plaintext file is wiped, not just while the editor runs.
    let signals = SignalGuard::install()?;
    let dir = RamDir::create(opts.unsafe_tmpdir)?;
    let file = dir.write(&rule.name, &original)?;
    let editor = opts.editor.clone().unwrap_or_else(default_editor);

    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {editor} \"$@\""))
        .arg("agex-edit")
        .args(private_options(&editor))
        .arg(&file)
        .spawn()
        .map_err(|e| SecretsError::Editor {
            editor: editor.clone(),
            status: format!("could not start ({e})"),
            path: shown.clone(),
        })?;
    let status = loop {
        if let Some(sig) = signals.fatal() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::from_named_raw(sig)
                    .unwrap_or(rustix::process::Signal::TERM),
            );
            let _ = child.wait();
            return Err(SecretsError::Interrupted { path: shown });
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(SecretsError::io(&shown)(e)),
        }
    };
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let how = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "failed".into(),
        };
        return Err(SecretsError::Editor {
            editor,
            status: how,
            path: shown,
        });
    }
    // Read back through agex's own handle on the directory: if its name was swapped for
    // a symlink meanwhile, this still reads agex's file, never the one it points to.
    let edited = dir.read(&rule.name).map_err(|e| SecretsError::Editor {
        editor: editor.clone(),
        status: format!("left no file to read back ({e})"),
        path: shown.clone(),
    })?;
    drop(dir);
    drop(signals);

    if edited.as_slice() == original.as_slice() {
        return Ok(EditOutcome::Unchanged);
    }
    let entry = secret_file::write(project, rule, &edited)?;
    Ok(if exists {
        EditOutcome::Updated(entry)
    } else {
        EditOutcome::Created(entry)
    })
}

/// Options that keep a vi-family editor from writing the plaintext anywhere else: no swap
/// file (`-n`), no viminfo/shada (`-i NONE`), no undo file and no backup copies — what
/// `pass` and `gopass` give vim. Other editors are started as they are.
fn private_options(editor: &str) -> Vec<&'static str> {
    let program = editor.split_whitespace().next().unwrap_or_default();
    if !is_vi_family(&resolve(program)) {
        return Vec::new();
    }
    vec![
        "-n",
        "-i",
        "NONE",
        "--cmd",
        "set noundofile nobackup nowritebackup noswapfile",
    ]
}

/// Whether the program (after following symlinks such as Debian's alternatives) is vim,
/// neovim or one of their names; `nvi` and others do not take these options.
fn is_vi_family(program: &std::path::Path) -> bool {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    matches!(name.as_str(), "vi" | "view" | "ex" | "rvim" | "rview")
        || name.starts_with("vim")
        || name.starts_with("nvim")
        || name.starts_with("gvim")
}

/// `program` as found on `PATH`, with symlinks followed; as given when not found.
fn resolve(program: &str) -> std::path::PathBuf {
    let given = std::path::PathBuf::from(program);
    let found = if program.contains('/') {
        Some(given.clone())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    found
        .and_then(|p| std::fs::canonicalize(&p).ok().or(Some(p)))
        .unwrap_or(given)
}

/// While the editor runs: SIGINT and SIGQUIT (Ctrl-C/Ctrl-\ at the terminal, which the
/// editor receives too) are ignored here, as git does; SIGTERM and SIGHUP are recorded so
/// the loop can stop the editor and clean up instead of dying with plaintext on disk.
struct SignalGuard {
    last: Arc<AtomicUsize>,
    ids: Vec<signal_hook::SigId>,
}

impl SignalGuard {
    fn install() -> Result<SignalGuard, SecretsError> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        let last = Arc::new(AtomicUsize::new(0));
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGHUP] {
            let slot = Arc::clone(&last);
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            let id = unsafe {
                signal_hook::low_level::register(sig, move || {
                    slot.store(sig as usize, Ordering::SeqCst)
                })
            }
            .map_err(SecretsError::io("signal handler"))?;
            ids.push(id);
        }
        for sig in [SIGINT, SIGQUIT] {
            // SAFETY: an empty handler is async-signal-safe.
            let id = unsafe { signal_hook::low_level::register(sig, || {}) }
                .map_err(SecretsError::io("signal handler"))?;
            ids.push(id);
        }
        Ok(SignalGuard { last, ids })
    }

    fn fatal(&self) -> Option<i32> {
        match self.last.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn vi_family_names() {
        for n in [
            "/usr/bin/vim.basic",
            "/usr/bin/nvim",
            "/bin/vi",
            "/usr/bin/vim.tiny",
        ] {
            assert!(is_vi_family(Path::new(n)), "{n}");
        }
        for n in ["/usr/bin/nano", "/usr/bin/nvi", "/usr/bin/emacs", "/bin/ed"] {
            assert!(!is_vi_family(Path::new(n)), "{n}");
        }
    }

    #[test]
    fn other_editors_get_no_options() {
        assert!(private_options("/bin/cat").is_empty());
    }
}
