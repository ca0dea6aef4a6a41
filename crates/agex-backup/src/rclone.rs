//! `rclone:remote:path` repositories: `rclone serve restic` on 127.0.0.1, started by
//! agex with the env secret's `RCLONE_CONFIG_*` variables in its environment (never in
//! argv, never in a config file) and a random user and password for the REST server,
//! then spoken to with rustic_backend's REST backend.
//!
//! rustic_backend's own rclone backend is not used because it gives rclone agex's
//! environment only, and would put credentials into a `rclone-command` argv.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::distributions::{Alphanumeric, DistString};
use rustic_backend::RestBackend;

use crate::backend::BackendPieces;
use crate::error::BackupError;

/// How long rclone may take to say where it serves.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `rclone serve restic`, stopped when dropped.
pub struct RcloneServer {
    child: Mutex<Child>,
}

impl Drop for RcloneServer {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts rclone for `target` (`remote:path`) with `env`; returns its REST backend and
/// the server, which must live as long as the backend.
pub fn start(
    repo: &str,
    target: &str,
    env: &[(String, zeroize::Zeroizing<String>)],
) -> Result<BackendPieces, BackupError> {
    let fail = |message: String| BackupError::Backend {
        repo: repo.to_string(),
        message,
        source: None,
    };
    let user = Alphanumeric.sample_string(&mut rand::thread_rng(), 16);
    let pass = zeroize::Zeroizing::new(Alphanumeric.sample_string(&mut rand::thread_rng(), 32));
    let mut cmd = Command::new("rclone");
    cmd.args(["serve", "restic", "--addr", "127.0.0.1:0", "--"])
        .arg(target)
        .env("RCLONE_USER", &user)
        .env("RCLONE_PASS", pass.as_str());
    for (k, v) in env {
        cmd.env(k, v.as_str());
    }
    crate::process::die_with_agex(&mut cmd);
    // The runner logs the command line (never the environment, which holds the
    // credentials); its Spawn error already reads "cannot run rclone: …".
    let mut child = crate::process::start(&mut cmd, Stdio::null(), Stdio::null(), Stdio::piped())
        .map_err(|e| BackupError::Backend {
        repo: repo.to_string(),
        message: e.to_string(),
        source: Some(Box::new(e)),
    })?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        return Err(fail("rclone started without stderr".into()));
    };
    // rclone prints where it listens on stderr; a thread reads it (and, afterwards,
    // keeps draining it so rclone never blocks on a full pipe).
    let said: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let said_w = Arc::clone(&said);
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            const SERVING: &str = "Serving restic REST API on ";
            if let Some(i) = line.find(SERVING) {
                let url = line[i + SERVING.len()..]
                    .trim()
                    .trim_matches(['[', ']'])
                    .to_string();
                if let Some(t) = tx.take() {
                    let _ = t.send(url);
                }
                continue;
            }
            let mut s = said_w.lock().unwrap_or_else(|p| p.into_inner());
            s.push(line);
            if s.len() > 8 {
                s.remove(0);
            }
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let url = loop {
        if let Ok(url) = rx.recv_timeout(Duration::from_millis(100)) {
            break url;
        }
        let ended = child.try_wait().ok().flatten();
        if ended.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(50));
            let text = said.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
            return Err(fail(format!(
                "rclone serve restic {target} did not start: {}",
                if text.is_empty() {
                    "no output".into()
                } else {
                    text
                }
            )));
        }
    };
    let Some(hostpath) = url.strip_prefix("http://") else {
        let _ = child.kill();
        return Err(fail(format!("rclone serves on `{url}`, not http://")));
    };
    let server = RcloneServer {
        child: Mutex::new(child),
    };
    let rest_url = zeroize::Zeroizing::new(format!("http://{user}:{}@{hostpath}", pass.as_str()));
    let rest =
        RestBackend::new(rest_url.as_str(), crate::backend::rest_options()).map_err(|e| {
            BackupError::Backend {
                repo: repo.to_string(),
                message: format!("rclone's REST server: {}", e.display_log()),
                source: Some(e),
            }
        })?;
    Ok(BackendPieces {
        backend: Arc::new(rest),
        guard: Some(Box::new(server)),
    })
}
