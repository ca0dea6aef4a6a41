//! The two repository engines behind one type: a Restic repository (in-process,
//! rustic_core) and a Borg repository (the `borg` binary). Callers hold an [`Engine`]
//! and never ask which kind it is; the engines' own modules hold what only one of them
//! does (Restic's streamed sources, Borg's named pipes).

pub mod borg;
pub mod restic;

use std::path::Path;
use std::sync::Arc;

use agex_core::{RepositoryKind, Retention};
use rustic_core::repofile::{KeyId, MasterKey};

use crate::access::RepoAccess;
use crate::error::BackupError;
use crate::progress::{Meter, Progress};

use self::borg::Borg;
use self::restic::{restic_err, Restic};

/// One repository, ready for commands (each engine boxed: they differ much in size).
pub enum Engine {
    /// A Restic-format repository, opened (its key derived from the password).
    Restic(Box<Restic>),
    /// A Borg repository; borg itself opens it for each command.
    Borg(Box<Borg>),
}

/// One agex snapshot as its engine lists it, before anyone reads its time.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Restic snapshot id or Borg archive name.
    pub id: String,
    /// The service it backs up.
    pub service: String,
    /// The run that wrote it (`YYYYMMDDTHHMMSS.mmmZ`), when the snapshot names it.
    pub run_id: Option<String>,
    /// The engine's own time of the snapshot (Restic's RFC 3339), for one that names no run.
    pub time: Option<String>,
    /// The snapshot's description (Restic's; late change marks live there).
    pub description: Option<String>,
}

/// A new password's first stage in a repository (see [`Engine::rotate_key`]).
#[derive(Debug, Clone, Copy)]
pub enum NewKey {
    /// Restic: the new key sits beside the old one, which is removed once the new
    /// password is stored.
    Added {
        /// The key the repository was opened with.
        old: Option<KeyId>,
    },
    /// Borg: the repository's one passphrase is the new one.
    Changed,
}

impl Engine {
    /// Opens the repository `access` names; `state` (under `--root`) holds borg's cache.
    pub fn open(access: &RepoAccess, state: &Path) -> Result<Engine, BackupError> {
        Engine::open_keyed(access, state, None)
    }

    /// Like [`Engine::open`]; with the master `key` of an earlier open of this Restic
    /// repository the password's key derivation is skipped.
    pub fn open_keyed(
        access: &RepoAccess,
        state: &Path,
        key: Option<MasterKey>,
    ) -> Result<Engine, BackupError> {
        Ok(match access.repo.kind {
            RepositoryKind::Restic => {
                Engine::Restic(Box::new(Restic::open_metered(access, None, key)?))
            }
            RepositoryKind::Borg => Engine::Borg(Box::new(Borg::new(access, state)?)),
        })
    }

    /// Opens the repository and proves that `access`'s password opens it: Restic's
    /// open derives the key, Borg's archives are listed.
    pub fn open_verified(access: &RepoAccess, state: &Path) -> Result<Engine, BackupError> {
        let engine = Engine::open(access, state)?;
        if let Engine::Borg(b) = &engine {
            b.list(None)?;
        }
        Ok(engine)
    }

    /// Creates a new repository at the URL with the password.
    pub fn init(access: &RepoAccess, state: &Path) -> Result<(), BackupError> {
        match access.repo.kind {
            RepositoryKind::Restic => Restic::init(access).map(|_| ()),
            RepositoryKind::Borg => Borg::new(access, state)?.init(),
        }
    }

    /// The repository's name in agex.toml.
    pub fn name(&self) -> &str {
        match self {
            Engine::Restic(r) => r.name(),
            Engine::Borg(b) => b.name(),
        }
    }

    /// The Restic repository's master key, for opening it again without the KDF.
    pub fn master_key(&self) -> Option<MasterKey> {
        match self {
            Engine::Restic(r) => Some(r.master_key()),
            Engine::Borg(_) => None,
        }
    }

    /// Every agex snapshot in the repository, of every service: Restic's by their
    /// `service=` and `run=` tags, Borg's by their `<service>-<run id>` names (checkpoint
    /// archives, left by an interrupted `borg create`, are not complete and are skipped).
    pub fn snapshots(&self) -> Result<Vec<Listed>, BackupError> {
        Ok(match self {
            Engine::Restic(r) => r
                .snapshots()?
                .into_iter()
                .filter_map(|s| {
                    let tag = |prefix: &str| {
                        s.tags
                            .iter()
                            .find_map(|t| t.strip_prefix(prefix))
                            .map(str::to_string)
                    };
                    Some(Listed {
                        service: tag("service=")?,
                        run_id: tag("run="),
                        time: Some(s.time.clone()),
                        description: s.description.clone(),
                        id: s.id,
                    })
                })
                .collect(),
            Engine::Borg(b) => b
                .list(None)?
                .into_iter()
                .filter(|a| !a.name.ends_with(".checkpoint") && !a.name.contains(".checkpoint."))
                .filter_map(|a| {
                    // `<service>-<run id>`; the run id has no `-`, a service name may.
                    let (service, run) = a.name.rsplit_once('-')?;
                    Some(Listed {
                        service: service.to_string(),
                        run_id: Some(run.to_string()),
                        time: None,
                        description: None,
                        id: a.name.clone(),
                    })
                })
                .collect(),
        })
    }

    /// Applies `retention` to the snapshots of `service`; returns the snapshots (Restic
    /// ids or Borg archive names) removed, or that would be with `dry_run`. With `prune`,
    /// the space they held is freed at once.
    pub fn forget(
        &self,
        service: &str,
        retention: &Retention,
        prune: bool,
        dry_run: bool,
    ) -> Result<Vec<String>, BackupError> {
        match self {
            Engine::Restic(r) => r.forget(service, retention, prune, dry_run),
            Engine::Borg(b) => b.prune(service, retention, prune, dry_run),
        }
    }

    /// Deletes one snapshot or archive.
    pub fn delete(&self, snapshot: &str) -> Result<(), BackupError> {
        match self {
            Engine::Restic(r) => r.delete(&[snapshot.into()]),
            Engine::Borg(b) => b.delete(snapshot),
        }
    }

    /// Checks the repository's structure; with `read_data` (Restic: `all`, `5%`, `1/7`,
    /// a size; Borg reads everything) the data too.
    pub fn check(&self, read_data: Option<&str>) -> Result<(), BackupError> {
        match self {
            Engine::Restic(r) => r.check(read_data),
            Engine::Borg(b) => b.check(read_data.is_some()),
        }
    }

    /// Gives the repository the password `new` beside (Restic) or instead of (Borg) the
    /// one it was opened with.
    pub fn rotate_key(&self, new: &str) -> Result<NewKey, BackupError> {
        match self {
            Engine::Restic(r) => {
                let old = *r.inner().key_id();
                r.add_key(new)?;
                Ok(NewKey::Added { old })
            }
            Engine::Borg(b) => {
                b.change_passphrase(new)?;
                Ok(NewKey::Changed)
            }
        }
    }

    /// After [`Engine::rotate_key`] and the new password stored: removes the old key from
    /// the repository (opened with the new one). Borg has none left to remove.
    pub fn remove_old_key(&self, rotated: NewKey) -> Result<(), BackupError> {
        match (self, rotated) {
            (Engine::Restic(r), NewKey::Added { old: Some(id) }) => {
                r.inner().delete_key(&id).map_err(restic_err(r.name()))
            }
            _ => Ok(()),
        }
    }
}

/// Extracts snapshot `id` into `dest`: host paths appear below it without their leading
/// `/`. With `progress`, the bytes restored are reported as `service → repo`; with the
/// master `key` of an earlier open, Restic skips the password's key derivation.
pub fn extract(
    access: &RepoAccess,
    state: &Path,
    id: &str,
    key: Option<MasterKey>,
    dest: &Path,
    progress: Option<(&Arc<dyn Progress>, &str)>,
) -> Result<(), BackupError> {
    let mut meter: Option<Arc<Meter>> = None;
    let result = match access.repo.kind {
        RepositoryKind::Restic => {
            let mut key = key;
            if let Some((sink, service)) = progress {
                // The totals come from the snapshot's summary, read before the metered
                // open (a meter announces its totals when it starts); every open after
                // the first reuses its master key instead of the password's KDF.
                let repo = access.repo.name.as_str();
                let first = Restic::open_metered(access, None, key.clone())?;
                key = Some(first.master_key());
                let snapshot = first
                    .into_inner()
                    .get_snapshot_from_str(id, |_| true)
                    .map_err(restic_err(repo))?;
                let (bytes, files) = snapshot
                    .summary
                    .map(|s| (s.total_bytes_processed, s.total_files_processed))
                    .unwrap_or_default();
                let m = Meter::start(Arc::clone(sink), service, repo);
                m.set_total(bytes, files);
                meter = Some(m);
            }
            restic::extract(access, id, dest, meter.as_ref(), key)
        }
        RepositoryKind::Borg => {
            Borg::new(access, state).and_then(|b| b.extract(id, dest, progress, &mut meter))
        }
    };
    if let Some(m) = &meter {
        m.finish(result.is_ok());
    }
    result
}
