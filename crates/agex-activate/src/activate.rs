//! Activation: a stored generation decrypted into a new directory on the RAM-backed
//! filesystem, then switched in with one `rename(2)` of the `/run/agex` symlink.
//!
//! Order: verify the store entry, plan (owners resolved, link paths checked), make sure
//! the filesystem is RAM-backed, decrypt every secret in parallel, write each file with
//! its owner and mode into a private staging directory, render templates, record keyed
//! digests, move the staging directory to `/run/agex.d/<N>`, switch. Anything failing
//! before the switch removes the staging directory and leaves the running generation as
//! it was; a kill at any point leaves `/run/agex` pointing at a complete generation.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use agex_core::RecipientKey;
use agex_secrets::identity::{Identities, Origin};
use agex_secrets::ramdir::wipe_tree;
use agex_secrets::{crypt, Plaintext, SecretsError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{changed_units, DigestKey, Digests, FileDigest, DIGESTS_FILE};
use crate::error::ActivateError;
use crate::history::History;
use crate::layout::{relative_link, Layout, ACTIVE_LINK, CURRENT_LINK, EARLY_DIR, EARLY_LINK};
use crate::manifest::Inputs;
use crate::manifest::{Manifest, Piece, SecretEntry};
use crate::plan::{Plan, PlannedFile, Source};
use crate::prune::{discard_dir, prune};
use crate::ramfs::{self, SecretsFs};
use crate::restart::{self, Owed, Restarts, Systemctl};
use crate::store::{self, StateLock, StoredGeneration};
use crate::users::UserDb;

/// File name of the marker written last into a complete generation directory.
pub const MARKER_FILE: &str = ".generation";

/// How to activate.
#[derive(Debug, Clone, Default)]
pub struct ActivateOptions {
    /// Accept a secrets directory that is not RAM-backed when none can be mounted.
    pub allow_unmounted: bool,
    /// Identities to decrypt with instead of the host's own key.
    pub identities: Vec<PathBuf>,
    /// The host the generation must be for, when given.
    pub host: Option<String>,
    /// How to run systemctl; `None` leaves units alone.
    pub systemctl: Option<Systemctl>,
    /// Do not restart or reload units.
    pub no_restart: bool,
}

/// What an activation did.
#[derive(Debug)]
pub struct Activation {
    /// The generation now active.
    pub number: u64,
    /// Its hash.
    pub hash: String,
    /// The generation active before, if any.
    pub previous: Option<u64>,
    /// Its directory on the tmpfs.
    pub dir: PathBuf,
    /// How many files it holds.
    pub files: usize,
    /// What the secrets filesystem was.
    pub fs: SecretsFs,
    /// A rollback found the generation still decrypted and switched to it as it was.
    pub reused: bool,
    /// Generations removed to keep the configured number.
    pub pruned: Vec<u64>,
    /// What happened to the units.
    pub restarts: Restarts,
}

/// What `activate` or `rollback` did.
#[derive(Debug)]
pub enum Switch {
    /// The generation asked for is the active one and its directory is complete: nothing
    /// was decrypted or switched, and only what a killed run owed was restarted.
    AlreadyActive {
        /// The active generation.
        number: u64,
        /// Its hash.
        hash: String,
        /// The restarts an activation killed after its switch still owed, done now.
        owed: Option<Restarts>,
    },
    /// The generation was switched in.
    Activated(Box<Activation>),
}

impl Switch {
    /// The generation active now.
    pub fn number(&self) -> u64 {
        match self {
            Switch::AlreadyActive { number, .. } => *number,
            Switch::Activated(a) => a.number,
        }
    }
}

/// The marker of a complete generation directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The generation's number.
    pub number: u64,
    /// Its hash.
    pub hash: String,
    /// Host paths linked into it.
    pub links: Vec<PathBuf>,
}

impl Marker {
    /// Reads the marker of a generation directory.
    pub fn read(dir: &Path) -> Option<Marker> {
        serde_json::from_slice(&fs::read(dir.join(MARKER_FILE)).ok()?).ok()
    }
}

/// The generation `/run/agex` points at, if any.
pub fn active(layout: &Layout) -> Option<u64> {
    let target = fs::read_link(layout.active_link()).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// Decrypts and switches to generation `number`; a no-op when it is already active.
pub fn activate(
    lock: &StateLock,
    number: u64,
    opts: &ActivateOptions,
) -> Result<Switch, ActivateError> {
    switch_to(lock, number, opts, false)
}

/// The active generation, when it is the configuration `inputs` (activating that again
/// is a no-op, and must not add a number).
pub fn active_unchanged(layout: &Layout, inputs: &Inputs) -> Result<Option<u64>, ActivateError> {
    let Some(n) = active(layout) else {
        return Ok(None);
    };
    let hash = store::hash_of(inputs);
    Ok(store::list(layout)?
        .iter()
        .any(|l| l.number == n && l.hash == hash)
        .then_some(n))
}

/// Switches back to the newest generation before the active one that was ever active (or
/// to `to`), reusing its directory when it is still on the tmpfs, decrypting it again
/// when not. Generations that never activated are skipped: rolling back to one would
/// fail the way it failed before.
pub fn rollback(
    lock: &StateLock,
    to: Option<u64>,
    opts: &ActivateOptions,
) -> Result<Switch, ActivateError> {
    let layout = lock.layout();
    let links = store::list(layout)?;
    let current = active(layout).or_else(|| store::current(layout));
    let target = match to {
        Some(n) => {
            if !links.iter().any(|l| l.number == n) {
                return Err(ActivateError::NoSuchGeneration {
                    spec: n.to_string(),
                    why: format!(
                        "kept generations are {}",
                        links
                            .iter()
                            .map(|l| l.number.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            n
        }
        None => {
            let Some(cur) = current else {
                return Err(ActivateError::NoRollbackTarget {
                    why: "no generation is active".into(),
                });
            };
            let history = History::load(layout);
            let earlier: Vec<u64> = links
                .iter()
                .rev()
                .map(|l| l.number)
                .filter(|n| *n < cur)
                .collect();
            if earlier.is_empty() {
                return Err(ActivateError::NoRollbackTarget {
                    why: format!("generation {cur} is the oldest one kept"),
                });
            }
            earlier
                .iter()
                .copied()
                .find(|n| history.state(*n).was_active())
                .ok_or_else(|| ActivateError::NoRollbackTarget {
                    why: format!(
                        "no generation before {cur} was ever active ({} never activated; `agex generations` says why)",
                        earlier
                            .iter()
                            .rev()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?
        }
    };
    switch_to(lock, target, opts, true)
}

/// Switches to `number` and records the outcome in the history: a generation counts as
/// activated only once this succeeded.
fn switch_to(
    lock: &StateLock,
    number: u64,
    opts: &ActivateOptions,
    reuse: bool,
) -> Result<Switch, ActivateError> {
    let layout = lock.layout();
    let generation = StoredGeneration::open(layout, number)?;
    if let Some(host) = &opts.host {
        if *host != generation.manifest.host {
            return Err(ActivateError::WrongHost {
                number,
                built: generation.manifest.host.clone(),
                wanted: host.clone(),
            });
        }
    }
    if active(layout) == Some(number) && is_complete(layout, &generation) {
        switch_symlink(
            layout,
            Path::new(CURRENT_LINK),
            Path::new(&format!("generations/{number}")),
        )?;
        // A run killed while it staged another generation left its plaintext behind.
        let fs_dir = layout.secrets_fs();
        clean_leftovers(&fs_dir);
        // The run that switched here was killed before it restarted the units.
        let owed = Owed::load(&fs_dir)
            .filter(|o| o.number == number)
            .map(|o| pay(&fs_dir, o, opts));
        return Ok(Switch::AlreadyActive {
            number,
            hash: generation.hash,
            owed,
        });
    }
    match switch_generation(lock, &generation, opts, reuse) {
        Ok(a) => Ok(Switch::Activated(Box::new(a))),
        Err(e) => {
            // The error the user reads is the one that matters; a record that cannot be
            // written only loses the note.
            let _ = History::update(lock, |h| h.failed(number, e.to_string()));
            Err(e)
        }
    }
}

/// Whether the active directory is this generation, complete, with digests made with
/// the current key (so nothing in it needs decrypting again).
fn is_complete(layout: &Layout, generation: &StoredGeneration) -> bool {
    let fs_dir = layout.secrets_fs();
    DigestKey::load(&fs_dir)
        .and_then(|key| reusable(&layout.generation_dir(generation.number), generation, &key))
        .is_some()
}

fn switch_generation(
    lock: &StateLock,
    generation: &StoredGeneration,
    opts: &ActivateOptions,
    reuse: bool,
) -> Result<Activation, ActivateError> {
    let layout = lock.layout();
    let number = generation.number;
    let manifest = &generation.manifest;
    let users = UserDb::for_layout(layout)?;
    let plan = Plan::new(manifest, layout, &users)?;
    let fs_dir = layout.secrets_fs();
    let fs_kind = ramfs::ensure(layout.root(), opts.allow_unmounted)?;
    clean_leftovers(&fs_dir);

    let previous = active(layout);
    let old_digests = previous.and_then(|p| Digests::read(&layout.generation_dir(p)));
    let old_marker = previous.and_then(|p| Marker::read(&layout.generation_dir(p)));
    let key = DigestKey::load_or_create(&fs_dir)?;
    let final_dir = layout.generation_dir(number);

    let kept = reuse
        .then(|| reusable(&final_dir, generation, &key))
        .flatten();
    let reused = kept.is_some();
    let new_digests = match kept {
        Some(d) => d,
        None => {
            let identities = load_identities(layout, manifest, opts)?;
            let full = |e| no_room(e, &fs_dir, previous);
            let staging = Staging::create(&fs_dir, number).map_err(full)?;
            let host_identity = opts.identities.is_empty();
            let digests = populate(
                &staging.path,
                generation,
                &plan,
                &identities,
                host_identity,
                &key,
            )
            .map_err(full)?;
            install(layout, &staging.path, &final_dir, previous == Some(number)).map_err(full)?;
            drop(staging);
            digests
        }
    };

    let (mut restart, mut reload) = changed_units(old_digests.as_ref(), &new_digests);
    // A run killed after its switch and before systemctl left units running on the
    // secrets of the generation it switched to, the one active now: they are owed too.
    if let Some(owed) = Owed::load(&fs_dir).filter(|o| Some(o.number) == previous) {
        (restart, reload) = owed.added_to(restart, reload);
    }
    let owed = Owed {
        number,
        restart,
        reload,
    };
    if opts.no_restart || opts.systemctl.is_none() || owed.is_empty() {
        Owed::clear(&fs_dir);
    } else {
        owed.save(&fs_dir)
            .map_err(|e| no_room(e, &fs_dir, previous))?;
    }

    link_paths(layout, &plan, old_marker.as_ref())?;
    switch_symlink(
        layout,
        Path::new(ACTIVE_LINK),
        Path::new(&format!("agex.d/{number}")),
    )?;
    ensure_early_link(layout)?;
    switch_symlink(
        layout,
        Path::new(CURRENT_LINK),
        Path::new(&format!("generations/{number}")),
    )?;
    History::update(lock, |h| h.activated(number))?;

    let pruned = prune(lock, manifest.keep, number)?;

    let restarts = pay(&fs_dir, owed, opts);
    Ok(Activation {
        number,
        hash: generation.hash.clone(),
        previous,
        dir: final_dir,
        files: plan.files.len(),
        fs: fs_kind,
        reused,
        pruned,
        restarts,
    })
}

/// Restarts and reloads what `owed` names (unless `--no-restart` or no systemctl) and
/// forgets the debt once systemctl ran; a failed systemctl keeps it for the next run.
fn pay(fs_dir: &Path, owed: Owed, opts: &ActivateOptions) -> Restarts {
    let Owed {
        restart, reload, ..
    } = owed;
    let restarts = if restart.is_empty() && reload.is_empty() {
        Restarts::Done {
            commands: Vec::new(),
            restart,
            reload,
        }
    } else if opts.no_restart {
        Restarts::Skipped {
            reason: "--no-restart".into(),
            restart,
            reload,
        }
    } else {
        match &opts.systemctl {
            Some(s) => restart::apply(s, restart, reload),
            None => Restarts::Skipped {
                reason: "no systemctl command for this root (pass --systemctl CMD)".into(),
                restart,
                reload,
            },
        }
    };
    if !matches!(restarts, Restarts::Failed(_)) {
        Owed::clear(fs_dir);
    }
    restarts
}

/// An error writing to the secrets filesystem because it is full, said as such, with the
/// generation that stays active (nothing was switched yet).
fn no_room(e: ActivateError, fs_dir: &Path, previous: Option<u64>) -> ActivateError {
    match e {
        ActivateError::Io { path, source }
            if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
                && path.starts_with(fs_dir) =>
        {
            ActivateError::SecretsFsFull {
                fs: fs_dir.to_path_buf(),
                path,
                source,
                kept: match previous {
                    Some(n) => format!("generation {n} stays active, unchanged"),
                    None => "no generation was active and none is now".into(),
                },
            }
        }
        other => other,
    }
}

/// The digests of a kept directory when it is this generation, complete, and its
/// digests were made with the current key.
fn reusable(dir: &Path, generation: &StoredGeneration, key: &DigestKey) -> Option<Digests> {
    let marker = Marker::read(dir)?;
    if marker.hash != generation.hash || marker.number != generation.number {
        return None;
    }
    Digests::read(dir).filter(|d| d.key_id == key.id())
}

fn load_identities(
    layout: &Layout,
    manifest: &Manifest,
    opts: &ActivateOptions,
) -> Result<Identities, ActivateError> {
    let candidates: Vec<(PathBuf, Origin)> = if opts.identities.is_empty() {
        let path = layout.host_path(&manifest.identity);
        if !path.exists() {
            return Err(ActivateError::MissingIdentity {
                path,
                host: manifest.host.clone(),
            });
        }
        vec![(path, Origin::Explicit)]
    } else {
        opts.identities
            .iter()
            .map(|p| (p.clone(), Origin::Explicit))
            .collect()
    };
    Ok(Identities::load(&candidates)?.require_any(&candidates)?)
}

/// A private directory on the secrets filesystem that is wiped unless it was moved, also
/// when a signal ends agex while it exists.
struct Staging {
    path: PathBuf,
    _wiped_on_signal: agex_secrets::ramdir::Registration,
}

impl Staging {
    fn create(fs_dir: &Path, number: u64) -> Result<Staging, ActivateError> {
        let path = fs_dir.join(format!(".staging-{number}-{:016x}", rand::random::<u64>()));
        // Registered before it exists, so no signal finds it made but unknown.
        let wiped_on_signal = agex_secrets::ramdir::Registration::tree(&path);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(ActivateError::io(&path))?;
        Ok(Staging {
            path,
            _wiped_on_signal: wiped_on_signal,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        wipe_tree(&self.path);
    }
}

/// Removes what a killed run left behind (the caller holds the activation lock, so no
/// running agex owns them): staging and trash directories, key temp files; one line each.
fn clean_leftovers(fs_dir: &Path) {
    let Ok(entries) = fs::read_dir(fs_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".staging-") || name.starts_with(".trash-") {
            wipe_tree(&e.path());
        } else if name.starts_with(".key-") {
            let _ = fs::remove_file(e.path());
        } else {
            continue;
        }
        agex_secrets::ramdir::notice(&format!(
            "removed {}, left behind by an activation that did not finish",
            e.path().display()
        ));
    }
}

/// A secret the host's own key (`host`, when that is what decrypted) cannot open: said
/// with the names it is encrypted to and the command that fixes it.
fn host_key_mismatch(
    e: SecretsError,
    secret: &SecretEntry,
    host: Option<&String>,
) -> ActivateError {
    match (e, host) {
        (SecretsError::NoIdentityMatches { path, tried, .. }, Some(host)) => {
            let recipients = if secret.recipients.is_empty() {
                "recipients secrets.lock does not name".to_string()
            } else {
                secret
                    .recipients
                    .iter()
                    .map(|(name, fp)| format!("`{name}` ({fp})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            ActivateError::HostKeyMismatch {
                path,
                host: host.clone(),
                tried: tried.join(", "),
                recipients,
            }
        }
        (e, _) => e.into(),
    }
}

/// Decrypts, renders and writes every planned file into `dir`; returns the digests.
/// `host_identity`: the identities are the host's own key (no `-i`).
fn populate(
    dir: &Path,
    generation: &StoredGeneration,
    plan: &Plan,
    identities: &Identities,
    host_identity: bool,
    key: &DigestKey,
) -> Result<Digests, ActivateError> {
    let manifest = &generation.manifest;
    let mut known = BTreeMap::new();
    if let Ok(k) = RecipientKey::from_str(&manifest.host_key) {
        known.insert(manifest.host.clone(), k);
    }
    let decrypted: Vec<Result<(String, Plaintext), ActivateError>> = manifest
        .secrets
        .par_iter()
        .map(|s| {
            let ciphertext = generation.ciphertext(&s.name)?;
            let shown = generation.ciphertext_path(&s.name);
            let plain = crypt::decrypt(&shown, &ciphertext, identities, &known)
                .map_err(|e| host_key_mismatch(e, s, host_identity.then_some(&manifest.host)))?;
            Ok((s.name.clone(), plain))
        })
        .collect();
    let mut plaintexts: BTreeMap<String, Plaintext> = BTreeMap::new();
    for r in decrypted {
        let (name, plain) = r?;
        plaintexts.insert(name, plain);
    }
    let mut rendered: BTreeMap<String, Plaintext> = BTreeMap::new();
    for t in &manifest.templates {
        let out = render(&t.pieces, &plaintexts).map_err(|MissingSecret(name)| {
            ActivateError::Invalid {
                path: generation.path.clone(),
                reason: format!(
                    "template `{}` uses secret `{name}`, which is not in the generation",
                    t.name
                ),
            }
        })?;
        rendered.insert(t.name.clone(), out);
    }

    for d in plan.directories() {
        let p = dir.join(d);
        fs::DirBuilder::new()
            .mode(0o751)
            .create(&p)
            .map_err(ActivateError::io(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o751))
            .map_err(ActivateError::io(&p))?;
    }
    let written: Vec<Result<(String, FileDigest), ActivateError>> = plan
        .files
        .par_iter()
        .map(|f| {
            let content: &[u8] = match &f.source {
                Source::Secret(n) => plaintexts.get(n).map(|p| p.as_slice()),
                Source::Template(n) => rendered.get(n).map(|p| p.as_slice()),
            }
            .ok_or_else(|| ActivateError::Invalid {
                path: PathBuf::from(f.rel()),
                reason: "no content for this file".into(),
            })?;
            write_file(dir, f, content)?;
            Ok((
                f.rel(),
                FileDigest {
                    digest: key.digest(f, content),
                    restart: f.restart,
                },
            ))
        })
        .collect();
    let mut digests = Digests {
        key_id: key.id(),
        files: BTreeMap::new(),
    };
    for r in written {
        let (rel, d) = r?;
        digests.files.insert(rel, d);
    }
    write_private(&dir.join(DIGESTS_FILE), &digests.to_bytes(), 0o600)?;
    let marker = Marker {
        number: generation.number,
        hash: generation.hash.clone(),
        links: plan.links.iter().map(|l| l.host_path.clone()).collect(),
    };
    let marker_bytes = serde_json::to_vec_pretty(&marker).unwrap_or_default();
    write_private(&dir.join(MARKER_FILE), &marker_bytes, 0o644)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o751)).map_err(ActivateError::io(dir))?;
    Ok(digests)
}

/// A secret a template uses that the plaintexts given to [`render`] lack (its name).
#[derive(Debug, thiserror::Error)]
#[error("secret `{0}` is not among the decrypted secrets")]
pub struct MissingSecret(pub String);

/// A template's content with each secret's plaintext (trailing newlines removed) in
/// place; `Err` names a secret `plaintexts` lacks.
pub fn render(
    pieces: &[Piece],
    plaintexts: &BTreeMap<String, Plaintext>,
) -> Result<Plaintext, MissingSecret> {
    // Sized before the first byte goes in: a buffer that grows leaves unwiped copies.
    let size = pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.len(),
            Piece::Secret(name) => plaintexts.get(name).map_or(0, |p| trim_newlines(p).len()),
        })
        .sum();
    let mut out = agex_secrets::plainbuf::with_capacity(size);
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.extend_from_slice(text.as_bytes()),
            Piece::Secret(name) => {
                let plain = plaintexts
                    .get(name)
                    .ok_or_else(|| MissingSecret(name.clone()))?;
                out.extend_from_slice(trim_newlines(plain));
            }
        }
    }
    Ok(out)
}

fn trim_newlines(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

fn write_file(dir: &Path, f: &PlannedFile, content: &[u8]) -> Result<(), ActivateError> {
    let path = dir.join(&f.dir).join(&f.name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(ActivateError::io(&path))?;
    file.write_all(content).map_err(ActivateError::io(&path))?;
    std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid)).map_err(|e| {
        ActivateError::io(&path)(std::io::Error::new(
            e.kind(),
            format!("chown {}:{}: {e}", f.owner, f.group),
        ))
    })?;
    file.set_permissions(fs::Permissions::from_mode(f.mode))
        .map_err(ActivateError::io(&path))
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), ActivateError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(ActivateError::io(path))?;
    f.write_all(data).map_err(ActivateError::io(path))
}

/// Moves the complete staging directory to `/run/agex.d/<N>`. When `<N>` is the active
/// directory (activating the active generation again) the two are exchanged atomically,
/// so `/run/agex` never points at nothing.
fn install(
    layout: &Layout,
    staging: &Path,
    final_dir: &Path,
    is_active: bool,
) -> Result<(), ActivateError> {
    if final_dir.exists() {
        if is_active {
            let exchanged = rustix::fs::renameat_with(
                rustix::fs::CWD,
                staging,
                rustix::fs::CWD,
                final_dir,
                rustix::fs::RenameFlags::EXCHANGE,
            );
            if exchanged.is_ok() {
                return Ok(());
            }
        }
        discard_dir(layout, final_dir);
    }
    fs::rename(staging, final_dir).map_err(ActivateError::io(final_dir))
}

/// Points the host path `link` (below the root) at `target` with one rename of a fresh
/// symlink over it, without following a symlink in a parent directory.
fn switch_symlink(layout: &Layout, link: &Path, target: &Path) -> Result<(), ActivateError> {
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::beneath::switch_link(layout.root(), link, target).map_err(|e| match e {
        ActivateError::PathOccupied { path, .. } => ActivateError::Invalid {
            path,
            reason: format!("exists and is not a symlink; agex keeps its `{name}` link there (move it away first)"),
        },
        e => e,
    })
}

/// `/run/agex-early` → `agex/_early`: always the active generation's early secrets.
fn ensure_early_link(layout: &Layout) -> Result<(), ActivateError> {
    let target = relative_link(Path::new("/run"), &Path::new(ACTIVE_LINK).join(EARLY_DIR));
    switch_symlink(layout, Path::new(EARLY_LINK), &target)
}

/// Creates each rule's `path` link and removes links the previous generation had that
/// this one does not (only when they still point where agex put them).
fn link_paths(layout: &Layout, plan: &Plan, old: Option<&Marker>) -> Result<(), ActivateError> {
    // Parents of these paths may belong to service users: never follow a symlink there.
    for l in &plan.links {
        crate::beneath::switch_link(layout.root(), &l.host_path, &l.target)?;
    }
    if let Some(old) = old {
        for p in &old.links {
            if plan.links.iter().any(|l| &l.host_path == p) {
                continue;
            }
            crate::beneath::remove_link_if(layout.root(), p, |t| {
                t.to_string_lossy().contains("run/agex/")
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_trailing_newlines_only() {
        assert_eq!(trim_newlines(b"a\nb\r\n\n"), b"a\nb");
        assert_eq!(trim_newlines(b""), b"");
    }
}
