//! A private directory on a RAM-backed filesystem, for plaintext that must never reach
//! a persistent disk. Its files are overwritten with zeros and removed when it is
//! dropped.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::SecretsError;

const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Whether `path` lives on tmpfs or ramfs; `Err` carries the filesystem's magic number.
pub fn is_ram_backed(path: &Path) -> Result<bool, std::io::Error> {
    let st = rustix::fs::statfs(path)?;
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// A 0700 directory on tmpfs/ramfs, wiped on drop.
#[derive(Debug)]
pub struct RamDir {
    path: PathBuf,
}

impl RamDir {
    /// Creates a private directory under `$XDG_RUNTIME_DIR` or `/dev/shm`. Refuses a
    /// persistent filesystem unless `allow_persistent`.
    pub fn create(allow_persistent: bool) -> Result<RamDir, SecretsError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| PathBuf::from("/dev/shm"));
        Self::create_in(&base, allow_persistent)
    }

    /// Creates a private directory under `base`.
    pub fn create_in(base: &Path, allow_persistent: bool) -> Result<RamDir, SecretsError> {
        let ram = is_ram_backed(base).map_err(SecretsError::io(base))?;
        if !ram && !allow_persistent {
            return Err(SecretsError::UnsafeTmpDir {
                path: base.to_path_buf(),
                fs: "not tmpfs or ramfs".into(),
            });
        }
        for _ in 0..16 {
            let name = format!("agex-{}-{:016x}", std::process::id(), rand::random::<u64>());
            let path = base.join(name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(RamDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SecretsError::io(base)(e)),
            }
        }
        Err(SecretsError::io(base)(std::io::Error::other(
            "could not create a unique directory",
        )))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new 0600 file in the directory.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<PathBuf, SecretsError> {
        let path = self.path.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(SecretsError::io(&path))?;
        f.write_all(data).map_err(SecretsError::io(&path))?;
        Ok(path)
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        wipe_tree(&self.path);
    }
}

/// Overwrites every regular file below `dir` with zeros, then removes the tree.
pub fn wipe_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            match entry.file_type() {
                Ok(ft) if ft.is_dir() => wipe_tree(&p),
                Ok(ft) if ft.is_file() => {
                    if let Ok(meta) = entry.metadata() {
                        if let Ok(mut f) = OpenOptions::new().write(true).open(&p) {
                            let zeros = vec![0u8; (meta.len() as usize).min(1 << 20)];
                            let mut left = meta.len() as usize;
                            while left > 0 {
                                let n = left.min(zeros.len());
                                if f.write_all(&zeros[..n]).is_err() {
                                    break;
                                }
                                left -= n;
                            }
                            let _ = f.sync_data();
                        }
                    }
                    let _ = fs::remove_file(&p);
                }
                _ => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}
