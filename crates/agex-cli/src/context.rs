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
                if !d.join(agex_core::project::CONFIG_FILE).is_file() {
                    return Err(Failure::new(
                        CONFIG,
                        format!("{}: no agex.toml in this directory", d.display()),
                    ));
                }
                d.clone()
            }
            None => Project::discover(Path::new("."))?,
        };
        Ok(Project::load(&dir)?)
    }

    /// The host path `p` under `--root`.
    pub fn host_path(&self, p: &Path) -> PathBuf {
        self.global.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// Identities for a person's command: `-i`, else the user's defaults, plus the
    /// host's identity when `--host` names a configured host whose key is readable.
    pub fn identities(&self, project: &Project) -> Result<Identities, Failure> {
        let mut candidates = Identities::candidates(&self.global.identity);
        if self.global.identity.is_empty() {
            if let Some(host) = self
                .global
                .host
                .as_ref()
                .and_then(|h| project.config.hosts.get(h))
            {
                candidates.push((self.host_path(&host.identity), Origin::Default));
            }
        }
        Ok(Identities::load(&candidates)?.require_any(&candidates)?)
    }
}
