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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// One ssh connection and the sftp session over it.
struct Session {
    /// Which connection of the backend this is (a failure ends only its own).
    id: u64,
    sftp: Sftp,
    child: Mutex<tokio::process::Child>,
}

impl Session {
    /// Whether ssh has exited (the connection is gone).
    fn ended(&self) -> bool {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        !matches!(c.try_wait(), Ok(None))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.start_kill();
    }
}

/// Why ssh and sftp could not be started.
struct Refused {
    message: String,
    /// ssh refused the server's host key: a [`BackupError::HostKey`].
    host_key: bool,
    /// The network failed (reset, refused, timed out): it may work on another try.
    transient: bool,
}

/// A restic repository on an sftp server. A connection that breaks (a reset, a server
/// restarted, a link that dropped) is replaced by a new one on the next request; the
/// request that failed with it fails transiently, and the backend boundary
/// ([`crate::backend`]) retries it, counted.
pub struct SftpBackend {
    location: String,
    root: String,
    // Dropped in this order: the session and ssh before the runtime they run on.
    session: Mutex<Option<Arc<Session>>>,
    sessions: AtomicU64,
    ssh: SshAccess,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for SftpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpBackend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

fn backend_err(what: &str, e: impl std::fmt::Display) -> Box<RusticError> {
    RusticError::new(ErrorKind::Backend, "sftp: {what}: {error}")
        .attach_context("what", what.to_string())
        .attach_context("error", e.to_string())
}

/// An error of a session that broke: transient (its source is an I/O error of `kind`,
/// which the backend boundary retries).
fn lost_err(what: &str, kind: std::io::ErrorKind, e: impl std::fmt::Display) -> Box<RusticError> {
    let text = e.to_string();
    RusticError::with_source(
        ErrorKind::Backend,
        "sftp: {what}: {error}",
        std::io::Error::new(kind, text.clone()),
    )
    .attach_context("what", what.to_string())
    .attach_context("error", text)
}

fn not_found(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
}

/// Whether `e` is the server's answer to a request (the session still works), not a
/// failure of the session itself.
fn answered(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(..))
}

/// A failed request: the server's answer, or the session breaking under it.
enum Failure {
    Sftp(SftpError),
    Io(std::io::Error),
    /// The server refused a write and its filesystem is (nearly) full.
    Full {
        free: u64,
        needed: u64,
    },
}

impl From<SftpError> for Failure {
    fn from(e: SftpError) -> Failure {
        Failure::Sftp(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl Failure {
    /// Whether the server answered (the session is fine, the request failed).
    fn answered(&self) -> bool {
        match self {
            Failure::Full { .. } => true,
            Failure::Sftp(e) => answered(e),
            // The file adapter wraps the session's errors into I/O errors.
            Failure::Io(e) => e
                .get_ref()
                .and_then(|i| i.downcast_ref::<SftpError>())
                .is_some_and(answered),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Sftp(e) => e.fmt(f),
            Failure::Io(e) => e.fmt(f),
            Failure::Full { free, needed } => write!(
                f,
                "no space left on the server: its filesystem has {free} bytes free for a \
                 {needed}-byte file (free space or raise the quota there; the next run \
                 goes on from what is stored)"
            ),
        }
    }
}

impl SftpBackend {
    /// Starts ssh and the sftp session to the repository at `path` on the server; a
    /// network failure is retried like a request's, counted into `retries`.
    pub fn connect(
        repo: &str,
        ssh: SshAccess,
        path: &str,
        retries: &AtomicU64,
    ) -> Result<SftpBackend, BackupError> {
        let fail = |message: String| BackupError::Backend {
            repo: repo.to_string(),
            message,
            source: None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| BackupError::Backend {
                repo: repo.to_string(),
                message: format!("starting the sftp runtime: {e}"),
                source: Some(Box::new(e)),
            })?;
        let root = path.trim_end_matches('/').to_string();
        let location = format!("sftp:{}:{}", ssh.endpoint().destination(), root);
        let backend = SftpBackend {
            location,
            root: if root.is_empty() { ".".into() } else { root },
            session: Mutex::new(None),
            sessions: AtomicU64::new(0),
            ssh,
            rt,
        };
        let first = crate::backend::Retry::REQUEST.run(
            repo,
            "connecting",
            retries,
            || backend.open_session(),
            |r: &Refused| r.transient.then(|| r.message.clone()),
        );
        match first {
            Ok(s) => {
                *backend.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(s));
                Ok(backend)
            }
            Err(r) if r.host_key => Err(BackupError::HostKey(r.message)),
            Err(r) => Err(fail(r.message)),
        }
    }

    /// Starts ssh and an sftp session over it.
    fn open_session(&self) -> Result<Session, Refused> {
        let refused = |message: String, transient: bool| Refused {
            message,
            host_key: false,
            transient,
        };
        let mut std_cmd = self.ssh.sftp_command();
        crate::process::die_with_agex(&mut std_cmd);
        std_cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.kill_on_drop(true);
        let rt = &self.rt;
        let guard = rt.enter();
        // Started from one of the runtime's threads, which live as long as this backend:
        // ssh gets its death signal when the thread that started it ends (not only agex),
        // and requests may come from threads that end sooner.
        let mut child = rt
            .block_on(rt.spawn(async move { cmd.spawn() }))
            .map_err(|e| refused(format!("cannot run ssh: {e}"), false))?
            .map_err(|e| refused(format!("cannot run ssh: {e}"), false))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(refused("ssh started without its pipes".into(), false));
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
                if let Some(m) = self.ssh.explain(&text) {
                    return Err(Refused {
                        message: m,
                        host_key: true,
                        transient: false,
                    });
                }
                let why = if text.trim().is_empty() { e } else { text };
                let transient = crate::ssh::network_failure(&why);
                return Err(refused(
                    format!(
                        "sftp to {} failed: {why}",
                        self.ssh.endpoint().destination()
                    ),
                    transient,
                ));
            }
        };
        drop(guard);
        Ok(Session {
            id: self.sessions.fetch_add(1, Ordering::Relaxed),
            sftp,
            child: Mutex::new(child),
        })
    }

    /// The session requests go over: the current one, or a new one when it broke.
    fn session(&self) -> RusticResult<Arc<Session>> {
        // Held while connecting: threads that find the session broken wait for the one
        // new connection instead of each making their own.
        let mut current = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = current.as_ref().filter(|s| !s.ended()) {
            return Ok(Arc::clone(s));
        }
        *current = None;
        match self.open_session() {
            Ok(s) => {
                let s = Arc::new(s);
                *current = Some(Arc::clone(&s));
                Ok(s)
            }
            Err(r) if r.transient => Err(lost_err(
                "connecting",
                std::io::ErrorKind::ConnectionRefused,
                r.message,
            )),
            Err(r) => Err(backend_err("connecting", r.message)),
        }
    }

    /// Ends session `id` (when it is still the current one): the next request connects
    /// anew.
    fn drop_session(&self, id: u64) {
        let mut current = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|s| s.id == id) {
            *current = None;
        }
    }

    /// Runs one request on a working session, given `budget` to finish: a server that
    /// stopped answering (a hung host, a link gone silent) fails the request instead of
    /// holding the backup for ever. A failure that is not the server's answer (the
    /// connection broke, or the time ran out) ends the session and is transient.
    fn run<T, F>(
        &self,
        what: &str,
        budget: Duration,
        op: impl FnOnce(Arc<Session>) -> F,
    ) -> RusticResult<T>
    where
        F: std::future::Future<Output = Result<T, Failure>>,
    {
        let session = self.session()?;
        let id = session.id;
        let fut = op(Arc::clone(&session));
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(budget, fut).await });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.answered() && !session.ended() => Err(backend_err(what, e)),
            Ok(Err(e)) => {
                self.drop_session(id);
                Err(lost_err(what, std::io::ErrorKind::ConnectionAborted, e))
            }
            Err(_) => {
                self.drop_session(id);
                Err(lost_err(
                    what,
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from the server for {} s", budget.as_secs()),
                ))
            }
        }
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
}

/// The entries of `dir` that are repository files, with their sizes; none when it does
/// not exist.
async fn list_dir(sftp: &Sftp, dir: &str) -> Result<Vec<(Id, u32)>, Failure> {
    let mut fs = sftp.fs();
    let d = match fs.open_dir(dir).await {
        Ok(d) => d,
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut entries = Box::pin(d.read_dir());
    let mut out = Vec::new();
    while let Some(entry) = entries.next().await {
        let entry = entry?;
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

/// Creates `dir`; one that exists already is fine.
async fn mkdir(sftp: &Sftp, dir: &str) -> Result<(), Failure> {
    let mut fs = sftp.fs();
    match fs.create_dir(dir).await {
        Ok(()) => Ok(()),
        // Already there (a server answers "failure" for an existing directory).
        Err(e) => match fs.metadata(dir).await {
            Ok(_) => Ok(()),
            Err(_) => Err(e.into()),
        },
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
        let root = self.root.clone();
        let dir = self.dir(tpe);
        self.run(
            &format!("listing {}", tpe.dirname()),
            limit,
            |s| async move {
                if tpe == FileType::Config {
                    let mut fs = s.sftp.fs();
                    return match fs.metadata(format!("{root}/config")).await {
                        Ok(m) => Ok(vec![(
                            Id::default(),
                            u32::try_from(m.len().unwrap_or(0)).unwrap_or(u32::MAX),
                        )]),
                        Err(e) if not_found(&e) => Ok(Vec::new()),
                        Err(e) => Err(e.into()),
                    };
                }
                if tpe == FileType::Pack {
                    let mut all = Vec::new();
                    for i in 0..=255u8 {
                        all.extend(list_dir(&s.sftp, &format!("{root}/data/{i:02x}")).await?);
                    }
                    return Ok(all);
                }
                list_dir(&s.sftp, &dir).await
            },
        )
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.path(tpe, id)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = self.path(tpe, id);
        // Full reads are of small files (config, keys, index, snapshots).
        self.run(
            &format!("reading {path}"),
            budget(1 << 20),
            |s| async move {
                let mut fs = s.sftp.fs();
                Ok(fs.read(&path).await.map(BytesMut::freeze)?)
            },
        )
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
        self.run(&what, budget(length as usize), |s| async move {
            let file = s.sftp.open(&path).await?;
            let mut file = Box::pin(openssh_sftp_client::file::TokioCompatFile::new(file));
            file.seek(SeekFrom::Start(u64::from(offset))).await?;
            let mut buf = vec![0u8; length as usize];
            file.read_exact(&mut buf).await?;
            Ok(Bytes::from(buf))
        })
    }
}

impl WriteBackend for SftpBackend {
    fn create(&self) -> RusticResult<()> {
        let root = self.root.clone();
        let dirs: Vec<String> = [
            FileType::Key,
            FileType::Snapshot,
            FileType::Index,
            FileType::Pack,
        ]
        .into_iter()
        .map(|tpe| self.dir(tpe))
        .collect();
        self.run(
            "creating the repository",
            REQUEST_TIMEOUT * 8,
            |s| async move {
                // The repository directory's parents too, like `restic init`.
                let mut prefix = String::new();
                for part in root.split('/') {
                    if part.is_empty() {
                        prefix.push('/');
                        continue;
                    }
                    prefix.push_str(part);
                    if part != "." && part != ".." {
                        mkdir(&s.sftp, &prefix).await?;
                    }
                    prefix.push('/');
                }
                for dir in &dirs {
                    mkdir(&s.sftp, dir).await?;
                }
                // rustic_core writes no locks, restic does: its directory is part of a
                // repository.
                mkdir(&s.sftp, &format!("{root}/locks")).await?;
                for i in 0..=255u8 {
                    mkdir(&s.sftp, &format!("{root}/data/{i:02x}")).await?;
                }
                Ok(())
            },
        )
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
        let size = content.size();
        let root = self.root.clone();
        self.run(&what, budget(size), |s| async move {
            let written = async {
                let mut file = s
                    .sftp
                    .options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .await?;
                let mut parts: Vec<Bytes> = content.into_vec();
                file.write_all_zero_copy(&mut parts).await?;
                file.close().await?;
                Ok::<(), Failure>(())
            }
            .await;
            if let Err(e) = written {
                if e.answered() {
                    // The server refused the write (sftp says only "failure" for a
                    // full disk or quota): its free space tells, before the part
                    // written is removed.
                    let mut fs = s.sftp.fs();
                    let full = match fs.statvfs(&root).await {
                        Ok(v) => {
                            let free = v.bavail.saturating_mul(v.frsize);
                            (free < size as u64).then_some(Failure::Full {
                                free,
                                needed: size as u64,
                            })
                        }
                        Err(_) => None,
                    };
                    let _ = fs.remove_file(&tmp).await;
                    return Err(full.unwrap_or(e));
                }
                return Err(e);
            }
            let mut fs = s.sftp.fs();
            Ok(fs.rename(&tmp, &path).await?)
        })
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let path = self.path(tpe, id);
        self.run(
            &format!("removing {path}"),
            REQUEST_TIMEOUT,
            |s| async move {
                let mut fs = s.sftp.fs();
                match fs.remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if not_found(&e) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            },
        )
    }
}
