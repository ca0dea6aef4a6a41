//! Restic repositories in an object store through opendal (`s3:` and `opendal:`).
//!
//! rustic_backend's `OpenDALBackend` wraps its operator in opendal's `RetryLayer`, which
//! marks every error it gives up on persistent (a refused login the same as a reset
//! connection) and cannot say how often it retried. Here the operator has no retry
//! layer: an error keeps opendal's own verdict (`is_temporary`), and agex retries at
//! its backend boundary ([`crate::backend`]), where every backend's retries are counted.
//! A timeout layer turns a server that stopped answering into such an error.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use opendal::blocking::Operator;
use opendal::options::{ListOptions, ReadOptions};
use rayon::prelude::{IntoParallelIterator, ParallelIterator};
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend,
    ALL_FILE_TYPES,
};

/// Why an object store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    /// The runtime opendal runs on could not start (shared: it is started once).
    #[error("starting the object store runtime: {0}")]
    Runtime(#[source] Arc<std::io::Error>),
    /// opendal refused the service's options.
    #[error("configuring the {scheme} service: {source}")]
    Configure {
        /// The opendal service.
        scheme: String,
        /// opendal's reason.
        source: opendal::Error,
    },
    /// opendal could not start the service.
    #[error("starting the {scheme} service: {source}")]
    Start {
        /// The opendal service.
        scheme: String,
        /// opendal's reason.
        source: opendal::Error,
    },
}

/// The runtime opendal's blocking operator drives its requests on.
fn runtime() -> Result<&'static tokio::runtime::Runtime, ObjectStoreError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, Arc<std::io::Error>>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(Arc::new)
        })
        .as_ref()
        .map_err(|e| ObjectStoreError::Runtime(Arc::clone(e)))
}

/// A restic repository in an opendal service.
#[derive(Debug)]
pub struct ObjectStore {
    op: Operator,
}

fn err(what: &str, path: &str, e: opendal::Error) -> Box<RusticError> {
    if let Some(answer) = out_of_space(&e) {
        return RusticError::with_source(
            ErrorKind::Backend,
            "{what} `{path}` failed: no space left on the server (it answered {answer}: the \
             bucket or the account is full or over its quota); free space or raise the quota \
             there, and the next run goes on from what is stored",
            e,
        )
        .attach_context("what", what.to_string())
        .attach_context("path", path.to_string())
        .attach_context("answer", answer.to_string());
    }
    RusticError::with_source(ErrorKind::Backend, "{what} `{path}` failed", e)
        .attach_context("what", what.to_string())
        .attach_context("path", path.to_string())
}

/// How S3-compatible services say that a write was refused for want of space, and how
/// agex names each answer: AWS and Wasabi's `QuotaExceeded`, MinIO's full disks and
/// bucket quotas, B2's storage cap, HTTP 507. (SeaweedFS 4.48 answers an over-quota
/// bucket with a generic 500 `InternalError`, which stays a transient error: restic
/// cannot tell it either.)
const OUT_OF_SPACE: &[(&str, &str)] = &[
    ("\"QuotaExceeded\"", "QuotaExceeded"),
    ("XMinioStorageFull", "XMinioStorageFull"),
    (
        "XMinioAdminBucketQuotaExceeded",
        "XMinioAdminBucketQuotaExceeded",
    ),
    ("storage_cap_exceeded", "storage_cap_exceeded"),
    ("InsufficientStorage", "InsufficientStorage"),
    ("status: 507", "507 Insufficient Storage"),
];

/// The server's answer, named, when `e` says the store is out of space.
pub(crate) fn out_of_space(e: &opendal::Error) -> Option<&'static str> {
    let text = e.to_string();
    OUT_OF_SPACE
        .iter()
        .find(|(sign, _)| text.contains(sign))
        .map(|(_, name)| *name)
}

impl ObjectStore {
    /// The repository in opendal service `scheme` configured by `options`.
    pub fn new(
        scheme: &str,
        options: BTreeMap<String, String>,
    ) -> Result<ObjectStore, ObjectStoreError> {
        // A server that stops answering (a hung host, a black-holed link) fails the
        // request instead of holding the backup for ever: 30 s for a metadata request;
        // an upload is one I/O step, and 2 minutes carry a data pack (8 MiB) over a
        // 0.6 Mbit/s uplink.
        let op = opendal::Operator::via_iter(scheme, options)
            .map_err(|source| ObjectStoreError::Configure {
                scheme: scheme.to_string(),
                source,
            })?
            .layer(
                opendal::layers::TimeoutLayer::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_io_timeout(Duration::from_secs(120)),
            );
        let _guard = runtime()?.enter();
        let op = Operator::new(op).map_err(|source| ObjectStoreError::Start {
            scheme: scheme.to_string(),
            source,
        })?;
        Ok(ObjectStore { op })
    }

    fn path(tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => "config".into(),
            FileType::Pack => format!("data/{}/{}", &hex[..2], &*hex),
            _ => format!("{}/{}", tpe.dirname(), &*hex),
        }
    }
}

impl ReadBackend for ObjectStore {
    fn location(&self) -> String {
        let info = self.op.info();
        format!("opendal:{}:{}", info.scheme(), info.name())
    }

    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        Ok(self
            .list_with_size(tpe)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        let size = |m: &opendal::Metadata| u32::try_from(m.content_length()).unwrap_or(u32::MAX);
        if tpe == FileType::Config {
            return match self.op.stat("config") {
                Ok(meta) => Ok(vec![(Id::default(), size(&meta))]),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(err("reading", "config", e)),
            };
        }
        let dir = format!("{}/", tpe.dirname());
        let opts = ListOptions {
            recursive: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        // A listing that breaks off is an error (and retried), not a shorter list.
        for entry in self
            .op
            .lister_options(&dir, opts)
            .map_err(|e| err("listing", &dir, e))?
        {
            let entry = entry.map_err(|e| err("listing", &dir, e))?;
            if !entry.metadata().is_file() {
                continue;
            }
            if let Some(id) = Id::parse_some(entry.name(), tpe) {
                out.push((id, size(entry.metadata())));
            }
        }
        Ok(out)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        Ok(self
            .op
            .read(&path)
            .map_err(|e| err("reading", &path, e))?
            .to_bytes())
    }

    fn read_partial(
        &self,
        tpe: FileType,
        id: &Id,
        _cacheable: bool,
        offset: u32,
        length: u32,
    ) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        let opts = ReadOptions {
            range: (u64::from(offset)..u64::from(offset) + u64::from(length)).into(),
            ..Default::default()
        };
        Ok(self
            .op
            .read_options(&path, opts)
            .map_err(|e| err("reading", &path, e))?
            .to_bytes())
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        // The object's full key: what a warm-up command (cold storage) is given.
        let root = self.op.info().root();
        let root = root.trim_matches('/');
        let path = Self::path(tpe, id);
        if root.is_empty() {
            path
        } else {
            format!("{root}/{path}")
        }
    }
}

impl WriteBackend for ObjectStore {
    fn create(&self) -> RusticResult<()> {
        for tpe in ALL_FILE_TYPES {
            let dir = format!("{}/", tpe.dirname());
            self.op
                .create_dir(&dir)
                .map_err(|e| err("creating", &dir, e))?;
        }
        (0u8..=255).into_par_iter().try_for_each(|i| {
            let dir = format!("data/{i:02x}/");
            self.op
                .create_dir(&dir)
                .map_err(|e| err("creating", &dir, e))
        })
    }

    fn write_bytes(
        &self,
        tpe: FileType,
        id: &Id,
        _cacheable: bool,
        content: BytesList,
    ) -> RusticResult<()> {
        let path = Self::path(tpe, id);
        self.op
            .write(&path, content.into_vec())
            .map_err(|e| err("writing", &path, e))?;
        Ok(())
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let path = Self::path(tpe, id);
        self.op.delete(&path).map_err(|e| err("removing", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_answer(kind: opendal::ErrorKind, code: &str) -> opendal::Error {
        opendal::Error::new(
            kind,
            format!("S3Error {{ code: \"{code}\", message: \"...\", resource: \"\", request_id: \"1\" }}"),
        )
    }

    #[test]
    fn a_full_bucket_is_named_and_not_retried() {
        let e = s3_answer(opendal::ErrorKind::PermissionDenied, "QuotaExceeded");
        assert_eq!(out_of_space(&e), Some("QuotaExceeded"));
        let said = err("writing", "data/ab/abcd", e).display_log();
        let first = said.lines().next().unwrap_or_default();
        assert!(
            first.contains("writing `data/ab/abcd` failed: no space left on the server")
                && first.contains("QuotaExceeded")
                && first.contains("raise the quota"),
            "{said}"
        );
        let minio = s3_answer(opendal::ErrorKind::Unexpected, "XMinioStorageFull").set_temporary();
        assert_eq!(out_of_space(&minio), Some("XMinioStorageFull"));
        assert!(!crate::backend::transient(&err("writing", "x", minio)));
    }

    #[test]
    fn other_answers_keep_their_meaning() {
        let e = s3_answer(opendal::ErrorKind::PermissionDenied, "AccessDenied");
        assert_eq!(out_of_space(&e), None);
        let busy = s3_answer(opendal::ErrorKind::Unexpected, "InternalError").set_temporary();
        assert_eq!(out_of_space(&busy), None);
        assert!(crate::backend::transient(&err("writing", "x", busy)));
    }
}
