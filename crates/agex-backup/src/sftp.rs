//! Restic repositories over sftp (`sftp:user@host:/path`), the way restic reaches them:
//! `ssh … -s sftp` started by agex, the sftp protocol spoken by `openssh-sftp-client`
//! over its stdin and stdout.
//!
//! opendal's sftp service is not used: it takes the key only as a path, cannot point ssh
//! at pinned host keys, and leaves a ControlMaster ssh running in the background after
//! agex dies. Here ssh is agex's child (it dies with agex) and gets the key and the host
//! keys from anonymous in-memory files ([`crate::ssh`]).

use std::io::SeekFrom;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::BackupError;
use crate::ssh::SshAccess;

/// How many of ssh's last stderr lines are kept for error messages.
const STDERR_LINES: usize = 8;

/// How long a request without data may wait for the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// [`REQUEST_TIMEOUT`] plus the time `bytes` take at 64 KiB/s (a slow uplink).
fn budget(bytes: usize) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs_f64(bytes as f64 / 65536.0)
}

/// A restic repository on an sftp server.
pub struct SftpBackend {
    location: String,
    root: String,
    // Dropped in this order: the session and ssh before the runtime they run on.
    sftp: Sftp,
    child: Mutex<tokio::process::Child>,
    _ssh: SshAccess,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for SftpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpBackend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Drop for SftpBackend {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.start_kill();
        }
    }
}

fn backend_err(what: &str, e: impl std::fmt::Display) -> Box<RusticError> {
    RusticError::new(ErrorKind::Backend, "sftp: {what}: {error}")
        .attach_context("what", what.to_string())
        .attach_context("error", e.to_string())
}

fn not_found(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
}

impl SftpBackend {
    /// Starts ssh and the sftp session to the repository at `path` on the server.
    pub fn connect(repo: &str, ssh: SshAccess, path: &str) -> Result<SftpBackend, BackupError> {
        let fail = |message: String| BackupError::Backend {
            repo: repo.to_string(),
            message,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting the sftp runtime: {e}")))?;
        let mut std_cmd = ssh.sftp_command();
        crate::process::die_with_agex(&mut std_cmd);
        std_cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.kill_on_drop(true);
        let guard = rt.enter();
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run ssh: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(fail("ssh started without its pipes".into()));
        };
        let said: Arc<Mutex<Vec<String>>> = Arc::default();
        let said_w = Arc::clone(&said);
        let stderr_task = rt.spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = said_w.lock().unwrap_or_else(|p| p.into_inner());
                s.push(line);
                if s.len() > STDERR_LINES {
                    s.remove(0);
                }
            }
        });
        let opened = rt.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                Sftp::new(stdin, stdout, SftpOptions::default()),
            )
            .await
        });
        let opened = match opened {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => {
                let _ = child.start_kill();
                Err(format!(
                    "no answer from the server for {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            }
        };
        let sftp = match opened {
            Ok(s) => s,
            Err(e) => {
                // ssh ended: what it said is the reason (host key, login, network).
                let _ = rt.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await
                });
                let _ = rt.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(2), stderr_task).await
                });
                let text = said.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                if let Some(m) = ssh.explain(&text) {
                    return Err(BackupError::HostKey(m));
                }
                let why = if text.trim().is_empty() { e } else { text };
                return Err(fail(format!(
                    "sftp to {} failed: {why}",
                    ssh.endpoint().destination()
                )));
            }
        };
        drop(guard);
        let root = path.trim_end_matches('/').to_string();
        let location = format!("sftp:{}:{}", ssh.endpoint().destination(), root);
        Ok(SftpBackend {
            location,
            root: if root.is_empty() { ".".into() } else { root },
            rt,
            sftp,
            child: Mutex::new(child),
            _ssh: ssh,
        })
    }

    /// Runs one request on the session, given `budget` to finish: a server that stopped
    /// answering (a hung host, a link gone silent) fails the request instead of
    /// holding the backup for ever.
    fn run<T>(
        &self,
        what: &str,
        budget: Duration,
        fut: impl std::future::Future<Output = RusticResult<T>>,
    ) -> RusticResult<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(budget, fut).await {
                Ok(r) => r,
                Err(_) => Err(backend_err(
                    what,
                    format!("no answer from the server for {} s", budget.as_secs()),
                )),
            }
        })
    }

    fn dir(&self, tpe: FileType) -> String {
        format!("{}/{}", self.root, tpe.dirname())
    }

    fn path(&self, tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => format!("{}/config", self.root),
            FileType::Pack => format!("{}/data/{}/{}", self.root, &hex[..2], &*hex),
            _ => format!("{}/{}", self.dir(tpe), &*hex),
        }
    }

    async fn list_dir(&self, dir: &str) -> RusticResult<Vec<(Id, u32)>> {
        let mut fs = self.sftp.fs();
        let d = match fs.open_dir(dir).await {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(backend_err(&format!("listing {dir}"), e)),
        };
        let mut entries = Box::pin(d.read_dir());
        let mut out = Vec::new();
        while let Some(entry) = entries.next().await {
            let entry = entry.map_err(|e| backend_err(&format!("listing {dir}"), e))?;
            let name = entry.filename().to_string_lossy().into_owned();
            // Names that are not ids (".", "..", a temp file of an interrupted write)
            // are not repository files.
            let Ok(id) = name.parse::<Id>() else {
                continue;
            };
            let size = entry.metadata().len().unwrap_or(0);
            out.push((id, u32::try_from(size).unwrap_or(u32::MAX)));
        }
        Ok(out)
    }

    async fn mkdir(&self, dir: &str) -> RusticResult<()> {
        let mut fs = self.sftp.fs();
        match fs.create_dir(dir).await {
            Ok(()) => Ok(()),
            // Already there (a server answers "failure" for an existing directory).
            Err(e) => match fs.metadata(dir).await {
                Ok(_) => Ok(()),
                Err(_) => Err(backend_err(&format!("creating {dir}"), e)),
            },
        }
    }
}

impl ReadBackend for SftpBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        // The data directories are 256: each may take a request's time.
        let limit = if tpe == FileType::Pack {
            REQUEST_TIMEOUT * 256
        } else {
            REQUEST_TIMEOUT
        };
        self.run(&format!("listing {}", tpe.dirname()), limit, async {
            if tpe == FileType::Config {
                let mut fs = self.sftp.fs();
                let path = format!("{}/config", self.root);
                return match fs.metadata(&path).await {
                    Ok(m) => Ok(vec![(
                        Id::default(),
                        u32::try_from(m.len().unwrap_or(0)).unwrap_or(u32::MAX),
                    )]),
                    Err(e) if not_found(&e) => Ok(Vec::new()),
                    Err(e) => Err(backend_err("reading config", e)),
                };
            }
            if tpe == FileType::Pack {
                let mut all = Vec::new();
                for i in 0..=255u8 {
                    all.extend(
                        self.list_dir(&format!("{}/data/{i:02x}", self.root))
                            .await?,
                    );
                }
                return Ok(all);
            }
            self.list_dir(&self.dir(tpe)).await
        })
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.path(tpe, id)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = self.path(tpe, id);
        // Full reads are of small files (config, keys, index, snapshots).
        self.run(&format!("reading {path}"), budget(1 << 20), async {
            let mut fs = self.sftp.fs();
            fs.read(&path)
                .await
                .map(BytesMut::freeze)
                .map_err(|e| backend_err(&format!("reading {path}"), e))
        })
    }

    fn read_partial(
        &self,
        tpe: FileType,
        id: &Id,
        _cacheable: bool,
        offset: u32,
        length: u32,
    ) -> RusticResult<Bytes> {
        let path = self.path(tpe, id);
        let what = format!("reading {path}");
        self.run(&what, budget(length as usize), async {
            let err = |e: &dyn std::fmt::Display| backend_err(&format!("reading {path}"), e);
            let file = self.sftp.open(&path).await.map_err(|e| err(&e))?;
            let mut file = Box::pin(openssh_sftp_client::file::TokioCompatFile::new(file));
            file.seek(SeekFrom::Start(u64::from(offset)))
                .await
                .map_err(|e| err(&e))?;
            let mut buf = vec![0u8; length as usize];
            file.read_exact(&mut buf).await.map_err(|e| err(&e))?;
            Ok(Bytes::from(buf))
        })
    }
}

impl WriteBackend for SftpBackend {
    fn create(&self) -> RusticResult<()> {
        self.run("creating the repository", REQUEST_TIMEOUT * 8, async {
            // The repository directory's parents too, like `restic init`.
            let mut prefix = String::new();
            for part in self.root.split('/') {
                if part.is_empty() {
                    prefix.push('/');
                    continue;
                }
                prefix.push_str(part);
                if part != "." && part != ".." {
                    self.mkdir(&prefix).await?;
                }
                prefix.push('/');
            }
            for tpe in [
                FileType::Key,
                FileType::Snapshot,
                FileType::Index,
                FileType::Pack,
            ] {
                self.mkdir(&self.dir(tpe)).await?;
            }
            // rustic_core writes no locks, restic does: its directory is part of a repository.
            self.mkdir(&format!("{}/locks", self.root)).await?;
            for i in 0..=255u8 {
                self.mkdir(&format!("{}/data/{i:02x}", self.root)).await?;
            }
            Ok(())
        })
    }

    fn write_bytes(
        &self,
        tpe: FileType,
        id: &Id,
        _cacheable: bool,
        content: BytesList,
    ) -> RusticResult<()> {
        let path = self.path(tpe, id);
        // Written under a temporary name and renamed: a reader never sees half a file,
        // and a write cut off leaves only a temp file, which listing skips.
        let tmp = format!("{path}.tmp-{:016x}", rand::random::<u64>());
        let what = format!("writing {path}");
        self.run(&what, budget(content.size()), async {
            let err = |e: &dyn std::fmt::Display| backend_err(&format!("writing {path}"), e);
            let mut file = self
                .sftp
                .options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .await
                .map_err(|e| err(&e))?;
            let mut parts: Vec<Bytes> = content.into_vec();
            file.write_all_zero_copy(&mut parts)
                .await
                .map_err(|e| err(&e))?;
            file.close().await.map_err(|e| err(&e))?;
            let mut fs = self.sftp.fs();
            fs.rename(&tmp, &path).await.map_err(|e| err(&e))
        })
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let path = self.path(tpe, id);
        self.run(&format!("removing {path}"), REQUEST_TIMEOUT, async {
            let mut fs = self.sftp.fs();
            match fs.remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(backend_err(&format!("removing {path}"), e)),
            }
        })
    }
}
