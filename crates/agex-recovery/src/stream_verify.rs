//! Drills verify a snapshot as it streams out of the repository, without extracting it:
//! every file's bytes are hashed as they pass (Restic: rustic_core's `dump` of each
//! file node, in process; Borg: one `borg export-tar … -` read as a tar stream), each
//! PostgreSQL dump is fed to `pg_restore` on its stdin (into the drill's scratch
//! database) while it is hashed, and only an SQLite dump, whose integrity check needs a
//! file, is written to scratch space: one at a time, removed once checked. A drill's
//! scratch disk is therefore at most the largest SQLite dump.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustic_core::{IndexedFullStatus, LsOptions, Repository};
use sha2::{Digest, Sha256};

use crate::restore::{self, PgScratch, Snapshot, Verified};

/// Why a file's bytes could not be read from the snapshot while it was checked.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// rustic_core's dump of the file failed.
    #[error(transparent)]
    Restic(Box<rustic_core::RusticError>),
    /// Borg's tar stream broke off inside the file.
    #[error(transparent)]
    Io(io::Error),
}
use crate::tar_stream;
use agex_backup::access::RepoAccess;
use agex_backup::engine::borg::Borg;
use agex_backup::engine::restic::restic_err;
use agex_backup::engine::Engine;
use agex_backup::error::BackupError;
use agex_backup::manifest::{self, DumpKind, Manifest};
use agex_backup::process;

/// What a streamed verification found and read.
#[derive(Debug, Default)]
pub struct Streamed {
    /// The comparison with the manifest.
    pub verified: Verified,
    /// Regular files read out of the snapshot.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The most bytes held in scratch space at once (an SQLite dump being checked).
    pub scratch_peak: u64,
}

/// Verifies `snap` of `service` against the manifest inside it, reading it once as a
/// stream; SQLite dumps pass through `scratch` one at a time.
pub fn verify(
    access: &RepoAccess,
    state: &Path,
    snap: &Snapshot,
    service: &str,
    scratch: &Path,
    pg: &PgScratch<'_>,
) -> Result<Streamed, BackupError> {
    let source = Source::open(access, state, snap)?;
    let manifest_path = manifest::manifest_path(service);
    let manifest = match source.read(&manifest_path)? {
        None => {
            return Ok(Streamed {
                verified: Verified {
                    problems: vec![format!(
                        "the snapshot holds no manifest at {}",
                        manifest_path.display()
                    )],
                    ..Default::default()
                },
                ..Default::default()
            })
        }
        Some(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(mut m) => {
                m.mark_changed(&snap.late_changed);
                m
            }
            Err(e) => {
                return Ok(Streamed {
                    verified: Verified {
                        problems: vec![format!("the manifest does not parse: {e}")],
                        ..Default::default()
                    },
                    ..Default::default()
                })
            }
        },
    };
    let mut checker = Checker::new(&manifest, scratch, pg);
    source.stream(&mut checker)?;
    Ok(checker.finish())
}

/// Where the stream comes from.
enum Source {
    Restic {
        repo: Box<Repository<IndexedFullStatus>>,
        snap: Box<rustic_core::repofile::SnapshotFile>,
        name: String,
    },
    Borg {
        borg: Box<Borg>,
        archive: String,
    },
}

impl Source {
    fn open(access: &RepoAccess, state: &Path, snap: &Snapshot) -> Result<Source, BackupError> {
        let key = snap.key.as_ref().map(|k| k.master().clone());
        match Engine::open_keyed(access, state, key)? {
            Engine::Restic(restic) => {
                let err = restic_err(&access.repo.name);
                let repo = (*restic).into_inner().to_indexed().map_err(&err)?;
                let found = repo
                    .get_snapshot_from_str(&snap.id, |_| true)
                    .map_err(&err)?;
                Ok(Source::Restic {
                    repo: Box::new(repo),
                    snap: Box::new(found),
                    name: access.repo.name.clone(),
                })
            }
            Engine::Borg(borg) => Ok(Source::Borg {
                borg,
                archive: snap.id.clone(),
            }),
        }
    }

    /// One file's bytes (None when the snapshot does not hold it).
    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, BackupError> {
        match self {
            Source::Restic { repo, snap, name } => {
                let Ok(node) = repo.node_from_snapshot_and_path(snap, &path.to_string_lossy())
                else {
                    return Ok(None);
                };
                if !node.is_file() {
                    return Ok(None);
                }
                let mut out = Vec::new();
                repo.dump(&node, &mut out).map_err(restic_err(name))?;
                Ok(Some(out))
            }
            Source::Borg { borg, archive } => {
                let rel = path.strip_prefix("/").unwrap_or(path);
                let mut cmd = borg.command();
                cmd.args(["extract", "--log-json", "--stdout"])
                    .arg(borg.archive_url(archive))
                    .arg(rel);
                let shown = process::describe(&cmd);
                let out = process::output(&mut cmd, std::process::Stdio::null())?;
                // borg exits 1 (a warning) when the path matched nothing.
                if out.status.code() == Some(1) && out.stdout.is_empty() {
                    return Ok(None);
                }
                process::check(&shown, out)
                    .map(|o| Some(o.stdout))
                    .map_err(|e| borg.explain(e))
            }
        }
    }

    /// Every regular file of the snapshot, in the engine's order, through `checker`.
    fn stream(&self, checker: &mut Checker<'_>) -> Result<(), BackupError> {
        match self {
            Source::Restic { repo, snap, name } => {
                let err = restic_err(name);
                let root = repo.node_from_snapshot_and_path(snap, "").map_err(&err)?;
                for item in repo.ls(&root, &LsOptions::default()).map_err(&err)? {
                    let (path, node) = item.map_err(&err)?;
                    if !node.is_file() {
                        continue;
                    }
                    let mut host = b"/".to_vec();
                    host.extend_from_slice(path.as_os_str().as_bytes());
                    checker.entry(&host, |w| {
                        repo.dump(&node, &mut WriteRef(w))
                            .map_err(FeedError::Restic)
                    });
                }
                Ok(())
            }
            Source::Borg { borg, archive } => {
                let mut cmd = borg.command();
                cmd.args(["export-tar", "--log-json"])
                    .arg(borg.archive_url(archive))
                    .arg("-");
                let shown = process::describe(&cmd);
                let (mut child, stderr) =
                    process::spawn_piped(&mut cmd, std::process::Stdio::null())?;
                let read = match child.stdout.take() {
                    Some(out) => tar_stream::for_each(io::BufReader::new(out), |e, body| {
                        let mut host = b"/".to_vec();
                        host.extend_from_slice(&e.path);
                        match e.kind {
                            tar_stream::EntryKind::File => checker.entry(&host, |w| {
                                io::copy(body, w).map(|_| ()).map_err(FeedError::Io)
                            }),
                            tar_stream::EntryKind::HardLink => {
                                let mut target = b"/".to_vec();
                                target.extend_from_slice(&e.link);
                                checker.hard_link(&host, &target);
                            }
                            tar_stream::EntryKind::Other => {}
                        }
                        Ok(())
                    }),
                    None => Ok(()),
                };
                // Whatever borg still writes is not read: it must not block on the pipe.
                drop(child.stdout.take());
                let status = child.wait().map_err(|source| BackupError::Spawn {
                    tool: shown.clone(),
                    source,
                })?;
                let text = stderr.join().unwrap_or_default();
                process::check(
                    &shown,
                    std::process::Output {
                        status,
                        stdout: vec![],
                        stderr: text.into_bytes(),
                    },
                )
                .map_err(|e| borg.explain(e))?;
                read.map_err(|e| BackupError::Tool {
                    tool: shown,
                    status: "unreadable output".into(),
                    stderr: e.to_string(),
                })
            }
        }
    }
}

/// `&mut dyn Write` as a sized writer (rustic_core's `dump` takes `impl Write`).
struct WriteRef<'a>(&'a mut dyn Write);

impl Write for WriteRef<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// What a path of the snapshot is in the manifest.
#[derive(Clone, Copy)]
enum Listed {
    File(usize),
    Dump(usize),
}

/// Hashes what passes and forwards it to `out` while `out` takes it; a consumer that
/// stops early (a failed `pg_restore`) does not stop the hashing.
struct Tee<'w> {
    hasher: Sha256,
    size: u64,
    out: Option<&'w mut dyn Write>,
    out_error: Option<io::Error>,
}

impl<'w> Tee<'w> {
    fn new(out: Option<&'w mut dyn Write>) -> Tee<'w> {
        Tee {
            hasher: Sha256::new(),
            size: 0,
            out,
            out_error: None,
        }
    }

    fn digest(self) -> (u64, String, Option<io::Error>) {
        (
            self.size,
            format!(
                "sha256:{}",
                agex_secrets::header::hex(&self.hasher.finalize())
            ),
            self.out_error,
        )
    }
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.write_all(buf) {
                self.out_error = Some(e);
                self.out = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                self.out_error = Some(e);
                self.out = None;
            }
        }
        Ok(())
    }
}

/// Compares the stream with the manifest, entry by entry.
struct Checker<'a> {
    manifest: &'a Manifest,
    listed: HashMap<&'a [u8], Listed>,
    /// Size and digest of each manifest file as read (None: not seen).
    files_read: Vec<Option<(u64, String)>>,
    dumps_seen: Vec<bool>,
    scratch: &'a Path,
    pg: &'a PgScratch<'a>,
    out: Streamed,
}

impl<'a> Checker<'a> {
    fn new(manifest: &'a Manifest, scratch: &'a Path, pg: &'a PgScratch<'a>) -> Checker<'a> {
        let mut listed = HashMap::with_capacity(manifest.files.len() + manifest.dumps.len());
        for (i, f) in manifest.files.iter().enumerate() {
            listed.insert(f.path.as_bytes(), Listed::File(i));
        }
        for (i, d) in manifest.dumps.iter().enumerate() {
            listed.insert(d.path.as_bytes(), Listed::Dump(i));
        }
        Checker {
            manifest,
            listed,
            files_read: vec![None; manifest.files.len()],
            dumps_seen: vec![false; manifest.dumps.len()],
            scratch,
            pg,
            out: Streamed::default(),
        }
    }

    /// One regular file at host path `path`; `feed` writes its bytes.
    fn entry(&mut self, path: &[u8], feed: impl FnOnce(&mut dyn Write) -> Result<(), FeedError>) {
        self.out.files += 1;
        match self.listed.get(path).copied() {
            Some(Listed::Dump(i)) => self.dump(i, feed),
            listed => {
                let mut tee = Tee::new(None);
                let fed = feed(&mut tee);
                let (size, digest, _) = tee.digest();
                self.out.bytes += size;
                if let Err(e) = fed {
                    self.out
                        .verified
                        .problems
                        .push(format!("{} could not be read: {e}", shown(path)));
                    return;
                }
                if let Some(Listed::File(i)) = listed {
                    self.files_read[i] = Some((size, digest));
                }
            }
        }
    }

    /// Another name of a file already read.
    fn hard_link(&mut self, path: &[u8], target: &[u8]) {
        let first = match self.listed.get(target) {
            Some(Listed::File(t)) => self.files_read[*t].clone(),
            _ => None,
        };
        if let (Some(Listed::File(i)), Some(read)) = (self.listed.get(path).copied(), first) {
            self.files_read[i] = Some(read);
        }
    }

    fn dump(&mut self, i: usize, feed: impl FnOnce(&mut dyn Write) -> Result<(), FeedError>) {
        let manifest = self.manifest;
        let d = &manifest.dumps[i];
        self.dumps_seen[i] = true;
        let mut problems = Vec::new();
        let (size, digest) = match d.kind {
            DumpKind::Sqlite => {
                let file = tempfile::Builder::new()
                    .prefix("sqlite-")
                    .tempfile_in(self.scratch);
                let (size, digest, written) = match file {
                    Ok(file) => {
                        let mut w = BufWriter::new(file.as_file());
                        let mut tee = Tee::new(Some(&mut w as &mut dyn Write));
                        let fed = feed(&mut tee);
                        let _ = tee.flush();
                        let (size, digest, out_error) = tee.digest();
                        drop(w);
                        self.out.scratch_peak = self.out.scratch_peak.max(size);
                        let written = match (fed, out_error) {
                            (Err(e), _) => Err(format!("could not be read: {e}")),
                            (_, Some(e)) => Err(format!("could not be written to scratch: {e}")),
                            (Ok(()), None) => Ok(file),
                        };
                        (size, digest, written)
                    }
                    Err(e) => {
                        let mut tee = Tee::new(None);
                        let fed = feed(&mut tee);
                        let (size, digest, _) = tee.digest();
                        let why = match fed {
                            Err(r) => format!("could not be read: {r}"),
                            Ok(()) => format!("no scratch file in {}: {e}", self.scratch.display()),
                        };
                        (size, digest, Err(why))
                    }
                };
                match written {
                    Ok(file) => match restore::sqlite_check(file.path()) {
                        Ok(counts) => {
                            restore::compare_rows(&mut problems, &d.name, &d.row_counts, &counts)
                        }
                        Err(e) => problems.push(format!("SQLite dump {}: {e}", d.name)),
                    },
                    Err(e) => problems.push(format!("SQLite dump {}: {e}", d.name)),
                }
                (size, digest)
            }
            DumpKind::Postgres => match restore::pg_restore_start(self.pg, d) {
                Ok(mut restoring) => {
                    let mut tee = Tee::new(restoring.input().map(|w| w as &mut dyn Write));
                    let fed = feed(&mut tee);
                    let (size, digest, _) = tee.digest();
                    if let Err(e) = &fed {
                        problems.push(format!("dump {} could not be read: {e}", d.path));
                    }
                    match restoring.finish() {
                        Ok(counts) => {
                            restore::compare_rows(&mut problems, &d.name, &d.row_counts, &counts)
                        }
                        // A dump cut short by a read error fails pg_restore too; the
                        // read error is the one to report.
                        Err(_) if fed.is_err() => {}
                        Err(e) => problems
                            .push(format!("PostgreSQL dump {} does not restore: {e}", d.name)),
                    }
                    (size, digest)
                }
                Err(e) => {
                    let mut tee = Tee::new(None);
                    let fed = feed(&mut tee);
                    let (size, digest, _) = tee.digest();
                    if let Err(r) = fed {
                        problems.push(format!("dump {} could not be read: {r}", d.path));
                    }
                    problems.push(format!("PostgreSQL dump {} does not restore: {e}", d.name));
                    (size, digest)
                }
            },
        };
        self.out.bytes += size;
        if digest != d.digest {
            self.out.verified.problems.push(format!(
                "dump {} differs ({}; the manifest says {})",
                d.path,
                restore::short(&digest),
                restore::short(&d.digest)
            ));
        }
        self.out.verified.problems.extend(problems);
    }

    fn finish(mut self) -> Streamed {
        let v = &mut self.out.verified;
        for (f, read) in self.manifest.files.iter().zip(&self.files_read) {
            v.files += 1;
            // A file that changed while it was backed up is held as its engine read it,
            // which agex's digest does not describe: reading it, every chunk
            // authenticated against the repository's own record, is its check. One
            // that vanished during the backup may be absent.
            if f.changed {
                v.changed += 1;
                continue;
            }
            match read {
                None => v.problems.push(format!("{} is missing", f.path)),
                Some((size, digest)) if *digest != f.digest => v.problems.push(format!(
                    "{} differs ({} bytes, {}; the manifest says {} bytes, {})",
                    f.path,
                    size,
                    restore::short(digest),
                    f.size,
                    restore::short(&f.digest)
                )),
                Some(_) => {}
            }
        }
        for (d, seen) in self.manifest.dumps.iter().zip(&self.dumps_seen) {
            v.databases += 1;
            if !seen {
                v.problems.push(format!("dump {} is missing", d.path));
            }
        }
        self.out
    }
}

fn shown(path: &[u8]) -> String {
    manifest::shown(Path::new(std::ffi::OsStr::from_bytes(path)))
}
