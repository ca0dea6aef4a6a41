//! Settings shared by every command: the global flags, the project, identities.

use std::path::{Path, PathBuf};

use agex_core::Project;
use agex_secrets::identity::{Identities, Origin};

use crate::cli::Global;
use crate::error::{Failure, CONFIG};

/// Settings shared by every command.
pub struct Context {
    pub global: Global,
}

impl Context {
    pub fn project(&self) -> Result<Project, Failure> {
        let dir = match &self.global.config {
            Some(d) => {
                if !d.is_dir() {
                    return Err(Failure::new(
                        CONFIG,
                        format!("-C {}: no such directory", d.display()),
                    ));
                }
                if !d.join(agex_core::project::CONFIG_FILE).is_file() {
                    return Err(Failure::new(
                        CONFIG,
                        format!(
                            "-C {}: no agex.toml in this directory; give the directory that holds it",
                            d.display()
                        ),
                    ));
                }
                d.clone()
            }
            None => Project::discover(Path::new("."))?,
        };
        tracing::debug!("configuration {}", dir.display());
        Ok(Project::load(&dir)?)
    }

    /// The host path `p` under `--root`.
    pub fn host_path(&self, p: &Path) -> PathBuf {
        self.global.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// agex's state directory (`/var/lib/agex`: locks, borg's cache and security
    /// state) under `--root`.
    pub fn state_dir(&self) -> PathBuf {
        self.host_path(Path::new(agex_backup::paths::STATE_DIR))
    }

    /// Identities: `-i`, else the user's defaults plus the identity of the host this
    /// runs as (`--host`, else the hostname) when it is configured and readable.
    pub fn identities(&self, project: &Project) -> Result<Identities, Failure> {
        let mut candidates = Identities::candidates(&self.global.identity);
        if self.global.identity.is_empty() {
            if let Some(host) = project.config.hosts.get(&self.host_name()) {
                candidates.push((self.host_path(&host.identity), Origin::Default));
            }
        }
        Ok(Identities::load(&candidates)?.require_any(&candidates)?)
    }

    /// `--host`, else this machine's hostname.
    pub fn host_name(&self) -> String {
        if let Some(h) = &self.global.host {
            return h.clone();
        }
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    }
}
