//! The one place a Restic repository's URL and credentials become a storage backend:
//! local paths and `rest:` through rustic_backend, `s3:` and `opendal:` through
//! opendal (credentials as in-process options), `sftp:` through agex's ssh plumbing
//! ([`crate::sftp`]), `rclone:` through `rclone serve restic` ([`crate::rclone`]). Every
//! backend is wrapped at its boundary, where transient errors are retried with backoff
//! (a bounded number of times, counted for the run's record) and the repository's
//! bandwidth limits apply.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agex_core::RepoUrl;
use bytes::Bytes;
use rustic_backend::{LocalBackend, RestBackend};
use rustic_core::{BytesList, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend};

use crate::access::RepoAccess;
use crate::error::BackupError;

/// A backend and what must live as long as it (a server process it talks to).
pub struct BackendPieces {
    /// The storage.
    pub backend: Arc<dyn WriteBackend>,
    /// Dropped with the backend.
    pub guard: Option<Box<dyn Any + Send + Sync>>,
}

/// The env secret keys a URL's backend reads; `required` must be present.
pub struct EnvKeys {
    /// Keys without which the backend cannot log in.
    pub required: &'static [&'static str],
    /// Keys it also reads.
    pub optional: &'static [&'static str],
    /// Prefixes of keys it reads (`RCLONE_` for rclone).
    pub prefixes: &'static [&'static str],
}

/// Which env secret keys the backend of `url` reads (used by the backend and `agex check`).
pub fn env_keys(url: &RepoUrl) -> EnvKeys {
    match url {
        RepoUrl::S3 { .. } => EnvKeys {
            required: &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            optional: &["AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN"],
            prefixes: &[],
        },
        RepoUrl::Rest(_) => EnvKeys {
            required: &[],
            optional: &["RESTIC_REST_USERNAME", "RESTIC_REST_PASSWORD"],
            prefixes: &[],
        },
        RepoUrl::Rclone(_) => EnvKeys {
            required: &[],
            optional: &[],
            prefixes: &["RCLONE_"],
        },
        // Options of the opendal service, or variables for borg's environment.
        RepoUrl::OpenDal(_) | RepoUrl::BorgSsh(_) => EnvKeys {
            required: &[],
            optional: &[],
            prefixes: &[""],
        },
        RepoUrl::Local(_) | RepoUrl::Sftp { .. } => EnvKeys {
            required: &[],
            optional: &[],
            prefixes: &[],
        },
    }
}

/// The env secret's keys the backend of `url` does not read (a typo, most likely).
pub fn unknown_env_keys<'a>(url: &RepoUrl, keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let k = env_keys(url);
    keys.filter(|key| {
        !k.required.contains(key)
            && !k.optional.contains(key)
            && !k.prefixes.iter().any(|p| key.starts_with(p))
    })
    .map(str::to_string)
    .collect()
}

/// One thing `agex check` found in a repository's env secret.
pub struct EnvFinding {
    /// Whether the backend cannot work this way (else a warning).
    pub error: bool,
    /// What, pointing at the repository's `env_secret` line.
    pub diagnostic: agex_core::Diagnostic,
}

/// Checks every repository's env secret against what its backend reads: a key the
/// scheme needs and the secret lacks is an error, a key nothing reads (a typo, most
/// likely) a warning. A secret `ids` cannot open (or no `ids`) is a warning that it was
/// not checked. Values never appear in a finding.
pub fn check_env_secrets(
    project: &agex_core::Project,
    ids: Option<&agex_secrets::Identities>,
) -> Vec<EnvFinding> {
    let mut out = Vec::new();
    for repo in project.config.repositories.values() {
        let Some(secret) = &repo.env_secret else {
            continue;
        };
        let at = |error: bool, message: String| EnvFinding {
            error,
            diagnostic: project.config.source.error(Some(secret.span()), message),
        };
        let lines = match ids.map(|ids| crate::access::env_lines(project, repo, ids)) {
            Some(Ok(lines)) => lines,
            Some(Err(e)) => {
                out.push(at(
                    false,
                    format!(
                        "repository `{}`: env_secret `{}` not checked: {e}",
                        repo.name,
                        secret.get_ref()
                    ),
                ));
                continue;
            }
            None => {
                out.push(at(
                    false,
                    format!(
                        "repository `{}`: env_secret `{}` not checked: no identity to decrypt it (give -i)",
                        repo.name,
                        secret.get_ref()
                    ),
                ));
                continue;
            }
        };
        // Borg hands the whole secret to borg's environment: any variable may be meant.
        if repo.kind == agex_core::RepositoryKind::Borg {
            continue;
        }
        let keys = env_keys(&repo.location);
        let missing: Vec<&str> = keys
            .required
            .iter()
            .copied()
            .filter(|k| !lines.iter().any(|(have, _)| have == k))
            .collect();
        if !missing.is_empty() {
            out.push(at(
                true,
                format!(
                    "repository `{}`: env_secret `{}` lacks {} (a {} repository needs it)",
                    repo.name,
                    secret.get_ref(),
                    missing.join(", "),
                    repo.location.scheme()
                ),
            ));
        }
        let unknown = unknown_env_keys(&repo.location, lines.iter().map(|(k, _)| k.as_str()));
        if !unknown.is_empty() {
            let mut known: Vec<String> = keys
                .required
                .iter()
                .chain(keys.optional)
                .map(|k| k.to_string())
                .collect();
            known.extend(keys.prefixes.iter().map(|p| format!("{p}*")));
            let accepted = if known.is_empty() {
                "no variables".to_string()
            } else {
                known.join(", ")
            };
            out.push(at(
                false,
                format!(
                    "repository `{}`: env_secret `{}` has {} {}, which a {} repository does not read (it reads {accepted})",
                    repo.name,
                    secret.get_ref(),
                    if unknown.len() == 1 { "key" } else { "keys" },
                    unknown.join(", "),
                    repo.location.scheme()
                ),
            ));
        }
    }
    out
}

/// Opens the storage of a Restic repository.
pub fn open(access: &RepoAccess) -> Result<Arc<dyn WriteBackend>, BackupError> {
    let repo = &access.repo;
    let fail = |message: String| BackupError::Backend {
        repo: repo.name.clone(),
        message,
        source: None,
    };
    let rustic = |e: Box<rustic_core::RusticError>| BackupError::Backend {
        repo: repo.name.clone(),
        message: e
            .display_log()
            .lines()
            .next()
            .unwrap_or("error")
            .to_string(),
        source: Some(e),
    };
    if let Some(env) = repo.env_secret.as_ref() {
        let missing: Vec<&str> = env_keys(&repo.location)
            .required
            .iter()
            .copied()
            .filter(|k| access.env_var(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(fail(format!(
                "env_secret `{}` lacks {} (a {} repository needs it)",
                env.get_ref(),
                missing.join(", "),
                repo.location.scheme()
            )));
        }
    }
    let store = |source| BackupError::ObjectStore {
        repo: repo.name.clone(),
        source: Box::new(source),
    };
    let pieces = match &repo.location {
        RepoUrl::Local(path) => BackendPieces {
            backend: Arc::new(
                LocalBackend::new(path, BTreeMap::<String, String>::new()).map_err(rustic)?,
            ),
            guard: None,
        },
        RepoUrl::Rest(url) => {
            let url = match (
                access.env_var("RESTIC_REST_USERNAME"),
                access.env_var("RESTIC_REST_PASSWORD"),
            ) {
                (Some(u), Some(p)) => with_userinfo(url, u, p),
                _ => zeroize::Zeroizing::new(url.clone()),
            };
            BackendPieces {
                backend: Arc::new(RestBackend::new(url.as_str(), rest_options()).map_err(rustic)?),
                guard: None,
            }
        }
        RepoUrl::S3 {
            endpoint,
            bucket,
            prefix,
        } => {
            let mut o: BTreeMap<String, String> = BTreeMap::new();
            let env = |k: &str| access.env_var(k).unwrap_or_default().to_string();
            o.insert("bucket".into(), bucket.clone());
            o.insert("root".into(), format!("/{prefix}"));
            o.insert("endpoint".into(), endpoint.clone());
            let region = access
                .env_var("AWS_DEFAULT_REGION")
                .or(access.env_var("AWS_REGION"))
                .unwrap_or("us-east-1");
            o.insert("region".into(), region.to_string());
            o.insert("access_key_id".into(), env("AWS_ACCESS_KEY_ID"));
            o.insert("secret_access_key".into(), env("AWS_SECRET_ACCESS_KEY"));
            if let Some(t) = access.env_var("AWS_SESSION_TOKEN") {
                o.insert("session_token".into(), t.to_string());
            }
            // Only what agex.toml and the env secret say: no ~/.aws, no instance metadata.
            o.insert("disable_config_load".into(), "true".into());
            o.insert("disable_ec2_metadata".into(), "true".into());
            BackendPieces {
                backend: Arc::new(crate::object_store::ObjectStore::new("s3", o).map_err(store)?),
                guard: None,
            }
        }
        RepoUrl::OpenDal(service) => {
            let mut o = repo.options.clone();
            for (k, v) in &access.env {
                o.insert(k.to_ascii_lowercase(), v.to_string());
            }
            BackendPieces {
                backend: Arc::new(
                    crate::object_store::ObjectStore::new(service, o).map_err(store)?,
                ),
                guard: None,
            }
        }
        RepoUrl::Sftp { path, .. } => {
            let ssh = crate::ssh::SshAccess::new(repo, access.ssh_key.as_deref().map(|k| &k[..]))?
                .ok_or_else(|| fail("sftp without an ssh server".into()))?;
            BackendPieces {
                backend: Arc::new(crate::sftp::SftpBackend::connect(
                    &repo.name,
                    ssh,
                    path,
                    &access.retries,
                )?),
                guard: None,
            }
        }
        RepoUrl::Rclone(target) => crate::rclone::start(&repo.name, target, &access.env)?,
        RepoUrl::BorgSsh(_) => {
            return Err(fail(
                "an ssh:// URL is a Borg repository's, not a Restic one's".into(),
            ))
        }
    };
    Ok(Arc::new(Boundary {
        repo: repo.name.clone(),
        inner: pieces.backend,
        up: repo.limit_upload.map(Limit::new),
        down: repo.limit_download.map(Limit::new),
        retries: Arc::clone(&access.retries),
        _guard: pieces.guard,
    }))
}

/// Options of a REST backend (also rclone's): no retries of its own, so that every
/// retry happens, and is counted, at the boundary.
pub(crate) fn rest_options() -> Vec<(String, String)> {
    vec![("retry".into(), "false".into())]
}

/// How often an operation that failed with a transient error is tried again.
pub const RETRIES: u32 = 5;
/// The pause before the first retry; each next one doubles, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(8);
/// No retry of a storage request starts once it has taken this long (its tries timed
/// out, say): a server that hangs fails the repository in minutes, not in hours.
const RETRY_WINDOW: Duration = Duration::from_secs(60);

/// How an operation is retried after a transient failure: up to [`RETRIES`] times,
/// pausing 0.5 s, 1 s, 2 s, ... (at most [`MAX_PAUSE`], with jitter) in between.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// No retry starts once this much time has passed since the first try (None: any
    /// time; for a whole `borg create`, which may rightly take hours).
    pub window: Option<Duration>,
}

impl Retry {
    /// The policy of storage requests (seconds each).
    pub const REQUEST: Retry = Retry {
        window: Some(RETRY_WINDOW),
    };
    /// The policy of whole commands (a `borg create`).
    pub const COMMAND: Retry = Retry { window: None };

    /// Runs `op` until it succeeds, fails for good, or failed transiently [`RETRIES`]
    /// times more. `transient` judges an error: Some(what happened, one line) when it
    /// may go away by itself. Each retry is added to `counter` (the run's "N retries")
    /// and logged.
    pub fn run<T, E>(
        self,
        repo: &str,
        what: &str,
        counter: &AtomicU64,
        mut op: impl FnMut() -> Result<T, E>,
        transient: impl Fn(&E) -> Option<String>,
    ) -> Result<T, E> {
        let mut pause = FIRST_PAUSE;
        let mut retry = 0;
        let start = Instant::now();
        loop {
            let r = op();
            let why = match &r {
                Err(e)
                    if retry < RETRIES
                        && self.window.is_none_or(|w| start.elapsed() < w)
                        && !crate::cancel::interrupted() =>
                {
                    transient(e)
                }
                _ => None,
            };
            match why {
                Some(why) => {
                    retry += 1;
                    counter.fetch_add(1, Ordering::Relaxed);
                    let jitter = rand::random::<f64>() * 0.25;
                    let wait = pause.mul_f64(1.0 + jitter);
                    tracing::info!(
                        "repository `{repo}`: {what} failed ({why}); retry {retry} of {RETRIES} in {:.1} s",
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                None => return r,
            }
        }
    }
}

/// Whether an error of the storage may go away by itself (a reset or refused
/// connection, a timeout, a 5xx or 429 answer), judged by the error that caused it.
/// Everything else (a refused login, a missing file, a full disk) fails at once.
pub(crate) fn transient(e: &RusticError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(o) = c.downcast_ref::<opendal::Error>() {
            // A full bucket stays full: retrying only delays the message.
            return crate::object_store::out_of_space(o).is_none()
                && (o.is_temporary() || o.kind() == opendal::ErrorKind::RateLimited);
        }
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            return match r.status() {
                Some(s) => s.is_server_error() || s.as_u16() == 429 || s.as_u16() == 408,
                None => !r.is_builder() && !r.is_redirect(),
            };
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                io.kind(),
                K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
                    | K::TimedOut
                    | K::BrokenPipe
                    | K::UnexpectedEof
            );
        }
        cause = c.source();
    }
    false
}

/// `url` with `user:password@` inserted after its scheme, percent-encoded.
fn with_userinfo(url: &str, user: &str, password: &str) -> zeroize::Zeroizing<String> {
    let enc = |s: &str| {
        let mut out = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    zeroize::Zeroizing::new(format!("{scheme}://{}:{}@{rest}", enc(user), enc(password)))
}

/// A bandwidth limit shared by all of a backend's threads: each transfer reserves its
/// time slot after the previous one, and waits until the slot has passed.
struct Limit {
    bytes_per_sec: f64,
    next: Mutex<Option<Instant>>,
}

impl Limit {
    fn new(bytes_per_sec: u64) -> Limit {
        Limit {
            bytes_per_sec: bytes_per_sec as f64,
            next: Mutex::new(None),
        }
    }

    fn take(&self, bytes: usize) {
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.filter(|n| *n > now).unwrap_or(now);
            let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *next = Some(end);
            end.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// The backend as agex uses it: transient errors retried (and counted), the limits
/// applied, the guard kept alive.
struct Boundary {
    repo: String,
    inner: Arc<dyn WriteBackend>,
    up: Option<Limit>,
    down: Option<Limit>,
    retries: Arc<AtomicU64>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Boundary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boundary")
            .field("location", &self.inner.location())
            .finish_non_exhaustive()
    }
}

impl Boundary {
    /// Runs `op` under [`Retry::REQUEST`], counting its retries into the run's.
    fn retrying<T>(&self, what: &str, op: impl Fn() -> RusticResult<T>) -> RusticResult<T> {
        Retry::REQUEST.run(&self.repo, what, &self.retries, op, |e| {
            transient(e).then(|| {
                e.display_log()
                    .trim_start_matches("Error: ")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        })
    }

    fn downloaded(&self, b: RusticResult<Bytes>) -> RusticResult<Bytes> {
        if let (Ok(bytes), Some(l)) = (&b, &self.down) {
            l.take(bytes.len());
        }
        b
    }
}

impl ReadBackend for Boundary {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.retrying("listing", || self.inner.list_with_size(tpe))
    }
    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        self.retrying("listing", || self.inner.list(tpe))
    }
    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.downloaded(self.retrying("reading", || self.inner.read_full(tpe, id)))
    }
    fn read_partial(
        &self,
        tpe: FileType,
        id: &Id,
        cacheable: bool,
        offset: u32,
        length: u32,
    ) -> RusticResult<Bytes> {
        self.downloaded(self.retrying("reading", || {
            self.inner.read_partial(tpe, id, cacheable, offset, length)
        }))
    }
    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }
    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }
    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for Boundary {
    fn create(&self) -> RusticResult<()> {
        self.retrying("creating the repository", || self.inner.create())
    }
    fn write_bytes(
        &self,
        tpe: FileType,
        id: &Id,
        cacheable: bool,
        content: BytesList,
    ) -> RusticResult<()> {
        if let Some(l) = &self.up {
            l.take(content.size());
        }
        // A retry sends the same bytes again (the list holds them by reference count).
        self.retrying("writing", || {
            self.inner.write_bytes(tpe, id, cacheable, content.clone())
        })
    }
    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.retrying("removing", || self.inner.remove(tpe, id, cacheable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_encoded() {
        assert_eq!(
            with_userinfo("https://h:8000/r/", "u s", "p@ss:/").as_str(),
            "https://u%20s:p%40ss%3A%2F@h:8000/r/"
        );
    }

    #[test]
    fn unknown_keys_per_scheme() {
        let s3 = agex_core::repo_url::parse_restic("s3:h/b").unwrap();
        assert_eq!(
            unknown_env_keys(&s3, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_KEY"].into_iter()),
            vec!["AWS_SECRET_KEY".to_string()]
        );
        let rc = agex_core::repo_url::parse_restic("rclone:r:p").unwrap();
        assert!(unknown_env_keys(&rc, ["RCLONE_CONFIG_R_TYPE"].into_iter()).is_empty());
    }

    #[test]
    fn limit_paces_transfers() {
        let l = Limit::new(1 << 20);
        let t = Instant::now();
        l.take(1 << 18);
        l.take(1 << 18);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }
}
