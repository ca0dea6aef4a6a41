//! The content-addressed store (`/var/lib/agex/store/<hash>-generation`) and the numbered
//! links into it (`/var/lib/agex/generations/<N>`), like NixOS system profiles.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::ActivateError;
use crate::history::History;
use crate::layout::{relative_link, Layout};
use crate::manifest::{hash_bytes, sha256_hex, Inputs, Manifest};

/// File name of the manifest inside a store entry.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Directory of encrypted files inside a store entry.
pub const SECRETS_DIR: &str = "secrets";
/// Directory of carried files (policies, systemd units) inside a store entry.
pub const FILES_DIR: &str = "files";
const ENTRY_SUFFIX: &str = "-generation";

/// Proof that this process holds the state lock: build, activate and rollback need it,
/// so two of them never interleave. Released when dropped (or when the process dies).
pub struct StateLock {
    layout: Layout,
    _file: File,
}

impl StateLock {
    /// Creates the state directory if needed and waits for the lock.
    pub fn acquire(layout: &Layout) -> Result<StateLock, ActivateError> {
        // The state directory and its parents are reached without following a symlink:
        // what agex stores there (and the rebuild drill's scratch root) stays below the
        // root.
        agex_core::beneath::Dir::open(layout.root(), Path::new("/var/lib"), Some(0o755))?
            .child(std::ffi::OsStr::new("agex"), Some(0o700))?;
        let path = layout.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(ActivateError::io(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| ActivateError::io(&path)(e.into()))?;
        Ok(StateLock {
            layout: layout.clone(),
            _file: file,
        })
    }

    /// The layout the lock guards.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// The outcome of `build`.
#[derive(Debug, Clone)]
pub struct BuiltGeneration {
    /// Its number under `generations/`.
    pub number: u64,
    /// Its content hash.
    pub hash: String,
    /// The store entry.
    pub path: PathBuf,
    /// Whether this build added a new number (false: the newest already had this hash).
    pub new_number: bool,
    /// Whether the store entry was written now (false: it already existed).
    pub new_entry: bool,
}

/// A store entry whose manifest matched its hash, with its number.
#[derive(Debug, Clone)]
pub struct StoredGeneration {
    /// Its number.
    pub number: u64,
    /// Its content hash.
    pub hash: String,
    /// The store entry directory.
    pub path: PathBuf,
    /// The verified manifest.
    pub manifest: Manifest,
}

/// One numbered generation, as listed.
#[derive(Debug, Clone)]
pub struct GenerationLink {
    /// Its number.
    pub number: u64,
    /// The hash its link names (from the entry's directory name).
    pub hash: String,
    /// The store entry.
    pub path: PathBuf,
    /// When the link was made.
    pub created: Option<SystemTime>,
}

/// Writes `inputs` to the store (unless the entry exists) and gives it a number (unless
/// the newest generation already is this entry). Building twice is a no-op.
pub fn build(lock: &StateLock, inputs: &Inputs) -> Result<BuiltGeneration, ActivateError> {
    let layout = lock.layout();
    let store = layout.store_dir();
    let gens = layout.generations_dir();
    create_private_dir(&store)?;
    create_private_dir(&gens)?;
    remove_stale_staging(&store);

    let bytes = inputs.manifest.to_bytes();
    let hash = hash_bytes(&bytes);
    debug_assert_eq!(hash, hash_of(inputs));
    let entry = store.join(format!("{hash}{ENTRY_SUFFIX}"));
    let new_entry = !entry.exists();
    if new_entry {
        write_entry(&store, &entry, &bytes, inputs)?;
    } else {
        let manifest = verify_entry(&entry, &hash)?;
        for s in &manifest.secrets {
            let rel = format!("{SECRETS_DIR}/{}.age", s.name);
            let actual = fs::read(entry.join(&rel)).map(|b| sha256_hex(&b));
            if actual.as_ref().ok() != Some(&s.sha256) {
                return Err(ActivateError::CorruptStore {
                    path: entry,
                    reason: format!("{rel} does not match the manifest"),
                });
            }
        }
        for f in &manifest.files {
            let rel = format!("{FILES_DIR}/{}", f.path);
            let actual = fs::read(entry.join(&rel)).map(|b| sha256_hex(&b));
            if actual.as_ref().ok() != Some(&f.sha256) {
                return Err(ActivateError::CorruptStore {
                    path: entry,
                    reason: format!("{rel} does not match the manifest"),
                });
            }
        }
    }

    let links = list(layout)?;
    if let Some(last) = links.last() {
        if last.hash == hash {
            return Ok(BuiltGeneration {
                number: last.number,
                hash,
                path: entry,
                new_number: false,
                new_entry,
            });
        }
    }
    let number = links.last().map_or(1, |l| l.number + 1);
    let link = gens.join(number.to_string());
    let target = relative_link(&gens, &entry);
    std::os::unix::fs::symlink(&target, &link).map_err(ActivateError::io(&link))?;
    sync_dir(&gens)?;
    History::update(lock, |h| h.built(number))?;
    Ok(BuiltGeneration {
        number,
        hash,
        path: entry,
        new_number: true,
        new_entry,
    })
}

/// The hash the store entry of `inputs` has (or will have).
pub fn hash_of(inputs: &Inputs) -> String {
    hash_bytes(&inputs.manifest.to_bytes())
}

fn write_entry(
    store: &Path,
    entry: &Path,
    manifest_bytes: &[u8],
    inputs: &Inputs,
) -> Result<(), ActivateError> {
    let staging = store.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(ActivateError::io(&staging))?;
    let result = (|| {
        let secrets = staging.join(SECRETS_DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&secrets)
            .map_err(ActivateError::io(&secrets))?;
        for s in &inputs.manifest.secrets {
            let data = inputs.ciphertexts.get(&s.name).ok_or_else(|| {
                ActivateError::io(&secrets)(std::io::Error::other(format!(
                    "no encrypted file for secret `{}`",
                    s.name
                )))
            })?;
            write_file(&secrets.join(format!("{}.age", s.name)), data)?;
        }
        for f in &inputs.manifest.files {
            let data = inputs.files.get(&f.path).ok_or_else(|| {
                ActivateError::io(&staging)(std::io::Error::other(format!(
                    "no content for carried file `{}`",
                    f.path
                )))
            })?;
            let path = staging.join(FILES_DIR).join(&f.path);
            if let Some(dir) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(ActivateError::io(dir))?;
            }
            write_file(&path, data)?;
        }
        write_file(&staging.join(MANIFEST_FILE), manifest_bytes)?;
        set_mode(&secrets, 0o500)?;
        set_mode(&staging, 0o500)?;
        // One filesystem-wide sync instead of one fsync per file: the entry is complete
        // on disk before it gets its name.
        let dir = File::open(&staging).map_err(ActivateError::io(&staging))?;
        rustix::fs::syncfs(&dir).map_err(|e| ActivateError::io(&staging)(e.into()))?;
        fs::rename(&staging, entry).map_err(ActivateError::io(entry))?;
        sync_dir(store)
    })();
    if result.is_err() {
        remove_entry(&staging);
    }
    result
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ActivateError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .map_err(ActivateError::io(path))?;
    f.write_all(data).map_err(ActivateError::io(path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ActivateError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(ActivateError::io(path))
}

/// Removes a store entry (made read-only when it was written).
pub fn remove_entry(path: &Path) {
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
    let _ = fs::set_permissions(path.join(SECRETS_DIR), fs::Permissions::from_mode(0o700));
    let _ = fs::remove_dir_all(path);
}

fn remove_stale_staging(store: &Path) {
    if let Ok(entries) = fs::read_dir(store) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                remove_entry(&e.path());
            }
        }
    }
}

fn verify_entry(entry: &Path, hash: &str) -> Result<Manifest, ActivateError> {
    let mpath = entry.join(MANIFEST_FILE);
    let bytes = fs::read(&mpath).map_err(|e| ActivateError::CorruptStore {
        path: entry.to_path_buf(),
        reason: format!("{MANIFEST_FILE}: {e}"),
    })?;
    let actual = hash_bytes(&bytes);
    if actual != hash {
        return Err(ActivateError::CorruptStore {
            path: entry.to_path_buf(),
            reason: format!("{MANIFEST_FILE} hashes to {actual}, not {hash}"),
        });
    }
    let manifest = Manifest::from_bytes(&mpath, &bytes)?;
    manifest.validate(&mpath)?;
    Ok(manifest)
}

impl StoredGeneration {
    /// Opens generation `number` and checks its manifest against the entry's hash.
    pub fn open(layout: &Layout, number: u64) -> Result<StoredGeneration, ActivateError> {
        let link = layout.generations_dir().join(number.to_string());
        let entry = resolve_link(layout, &link).ok_or_else(|| ActivateError::NoSuchGeneration {
            spec: number.to_string(),
            why: format!("{} does not exist", link.display()),
        })?;
        let hash = entry_hash(&entry).ok_or_else(|| ActivateError::CorruptStore {
            path: entry.clone(),
            reason: "the link does not point at a `<hash>-generation` store entry".into(),
        })?;
        let manifest = verify_entry(&entry, &hash)?;
        Ok(StoredGeneration {
            number,
            hash,
            path: entry,
            manifest,
        })
    }

    /// The encrypted file of a secret, checked against the manifest's digest.
    pub fn ciphertext(&self, name: &str) -> Result<Vec<u8>, ActivateError> {
        let path = self.ciphertext_path(name);
        let corrupt = |reason: String| ActivateError::CorruptStore {
            path: self.path.clone(),
            reason,
        };
        let entry = self
            .manifest
            .secret(name)
            .ok_or_else(|| corrupt(format!("secret `{name}` is not in the manifest")))?;
        let bytes =
            fs::read(&path).map_err(|e| corrupt(format!("{SECRETS_DIR}/{name}.age: {e}")))?;
        let actual = sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(corrupt(format!(
                "{SECRETS_DIR}/{name}.age hashes to {actual}, the manifest says {}",
                entry.sha256
            )));
        }
        Ok(bytes)
    }

    /// A carried file (`policies/x.toml`, `systemd/x.timer`), checked against the
    /// manifest's digest.
    pub fn carried(&self, path: &str) -> Result<Vec<u8>, ActivateError> {
        let corrupt = |reason: String| ActivateError::CorruptStore {
            path: self.path.clone(),
            reason,
        };
        let entry = self
            .manifest
            .files
            .iter()
            .find(|f| f.path == path)
            .ok_or_else(|| corrupt(format!("`{path}` is not in the manifest")))?;
        let bytes = fs::read(self.path.join(FILES_DIR).join(path))
            .map_err(|e| corrupt(format!("{FILES_DIR}/{path}: {e}")))?;
        let actual = sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(corrupt(format!(
                "{FILES_DIR}/{path} hashes to {actual}, the manifest says {}",
                entry.sha256
            )));
        }
        Ok(bytes)
    }

    /// Where a secret's encrypted file is in the entry.
    pub fn ciphertext_path(&self, name: &str) -> PathBuf {
        self.path.join(SECRETS_DIR).join(format!("{name}.age"))
    }
}

/// The store entry a generation link points at, made absolute: `<store>/<entry>`, not
/// `generations/../store/<entry>`, since errors show it.
fn resolve_link(layout: &Layout, link: &Path) -> Option<PathBuf> {
    let target = fs::read_link(link).ok()?;
    let abs = match (target.is_relative(), target.file_name()) {
        (true, Some(name)) => layout.store_dir().join(name),
        _ => target,
    };
    abs.is_dir().then_some(abs)
}

fn entry_hash(entry: &Path) -> Option<String> {
    let name = entry.file_name()?.to_str()?;
    let hash = name.strip_suffix(ENTRY_SUFFIX)?;
    (hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hash.to_string())
}

/// Every numbered generation, oldest first.
pub fn list(layout: &Layout) -> Result<Vec<GenerationLink>, ActivateError> {
    let dir = layout.generations_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ActivateError::io(&dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(number) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let link = e.path();
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        // Shown and used as `<store>/<entry>`, not `generations/../store/<entry>`.
        let path = match (target.is_relative(), target.file_name()) {
            (true, Some(name)) => layout.store_dir().join(name),
            _ => target,
        };
        let Some(hash) = entry_hash(&path) else {
            continue;
        };
        let created = fs::symlink_metadata(&link).and_then(|m| m.modified()).ok();
        out.push(GenerationLink {
            number,
            hash,
            path,
            created,
        });
    }
    out.sort_by_key(|l| l.number);
    Ok(out)
}

/// The generation activated last (`/var/lib/agex/current`), if any.
pub fn current(layout: &Layout) -> Option<u64> {
    let target = fs::read_link(layout.current_link()).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// Resolves what the user typed: a number, `last` (the generation activated last, else
/// the newest), `newest`, or a hash prefix of at least 4 characters.
pub fn resolve(layout: &Layout, spec: &str) -> Result<u64, ActivateError> {
    let links = list(layout)?;
    let none = |why: String| ActivateError::NoSuchGeneration {
        spec: spec.to_string(),
        why,
    };
    let numbers = || {
        if links.is_empty() {
            "there are no generations yet; run `agex build`".to_string()
        } else {
            format!(
                "generations are {}",
                links
                    .iter()
                    .map(|l| l.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    match spec {
        "last" => {
            if let Some(n) = current(layout).filter(|n| links.iter().any(|l| l.number == *n)) {
                return Ok(n);
            }
            links
                .last()
                .map(|l| l.number)
                .ok_or_else(|| none(numbers()))
        }
        "newest" => links
            .last()
            .map(|l| l.number)
            .ok_or_else(|| none(numbers())),
        _ => {
            if let Ok(n) = spec.parse::<u64>() {
                if links.iter().any(|l| l.number == n) {
                    return Ok(n);
                }
                if spec.len() < 4 {
                    return Err(none(numbers()));
                }
            }
            let spec_l = spec
                .trim_end_matches(ENTRY_SUFFIX)
                .rsplit('/')
                .next()
                .unwrap_or(spec)
                .to_ascii_lowercase();
            if spec_l.len() < 4 {
                return Err(none(numbers()));
            }
            let mut hits: Vec<u64> = links
                .iter()
                .filter(|l| l.hash.starts_with(&spec_l))
                .map(|l| l.number)
                .collect();
            match hits.len() {
                0 => Err(none(numbers())),
                1 => Ok(hits[0]),
                _ => {
                    // The same entry under several numbers: take the newest number.
                    let hashes: std::collections::BTreeSet<&str> = links
                        .iter()
                        .filter(|l| l.hash.starts_with(&spec_l))
                        .map(|l| l.hash.as_str())
                        .collect();
                    if hashes.len() == 1 {
                        hits.sort_unstable();
                        Ok(hits[hits.len() - 1])
                    } else {
                        Err(none(format!(
                            "the prefix matches {} different generations; give more characters",
                            hashes.len()
                        )))
                    }
                }
            }
        }
    }
}

/// Creates a directory (and parents) with mode 0700 for the last component.
pub fn create_private_dir(dir: &Path) -> Result<(), ActivateError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(ActivateError::io(parent))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ActivateError::io(dir)(e)),
    }
}

/// Flushes a directory's entries after a rename or link in it.
pub fn sync_dir(dir: &Path) -> Result<(), ActivateError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ActivateError::io(dir))
}
