//! Notifications of job results: healthchecks.io-style pings (`/start`, success,
//! `/fail` with the tail of the log), ntfy topics, Uptime Kuma push monitors and a generic
//! JSON webhook, global or per job. URLs may come from secrets (`secret:NAME`). Sending never fails the job: every
//! problem is returned as a warning for the caller to log.

use std::time::Duration;

use agex_core::config::NotifyTargets;
use agex_core::Project;
use serde::Serialize;
use toml::Spanned;
use zeroize::Zeroizing;

/// How many bytes of log a ping carries at most.
pub const TAIL_BYTES: usize = 10_000;
/// Attempts per request (the first and up to two retries).
const ATTEMPTS: u32 = 3;

/// How a job ended, as notifications tell it. A partial failure is a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Everything succeeded.
    Success,
    /// Something (one repository, say) failed and something else succeeded.
    Partial,
    /// Nothing succeeded.
    Failure,
}

impl Outcome {
    /// From an agex exit code (0 ok, 3 partial, anything else failed).
    pub fn from_exit(code: Option<i32>) -> Outcome {
        match code {
            Some(0) => Outcome::Success,
            Some(3) => Outcome::Partial,
            _ => Outcome::Failure,
        }
    }

    fn ok(self) -> bool {
        self == Outcome::Success
    }

    /// `ok`, `partial` or `failed`, as run records and `agex schedule` say it.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Success => "ok",
            Outcome::Partial => "partial",
            Outcome::Failure => "failed",
        }
    }
}

/// What is reported.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A job started.
    Start,
    /// A job ended.
    Finish {
        /// How.
        result: Outcome,
        /// The exit code, when there was one.
        exit_code: Option<i32>,
        /// Wall time.
        duration_seconds: f64,
        /// The last lines of its log.
        log_tail: String,
    },
    /// Backups are older than allowed.
    Overdue {
        /// One line per service and repository.
        items: Vec<String>,
    },
}

/// The body of a webhook request.
#[derive(Debug, Serialize)]
struct WebhookBody<'a> {
    job: &'a str,
    host: &'a str,
    time: String,
    #[serde(flatten)]
    event: &'a Event,
}

/// The kinds of target, each with its own protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Webhook,
    Healthchecks,
    Ntfy,
    UptimeKuma,
}

impl Kind {
    /// From the `[notify]` key that configured it.
    fn from_key(key: &str) -> Kind {
        match key {
            "healthchecks" => Kind::Healthchecks,
            "ntfy" => Kind::Ntfy,
            "uptime_kuma" => Kind::UptimeKuma,
            _ => Kind::Webhook,
        }
    }

    /// The `[notify]` key, as warnings name the target.
    fn key(self) -> &'static str {
        match self {
            Kind::Webhook => "webhook",
            Kind::Healthchecks => "healthchecks",
            Kind::Ntfy => "ntfy",
            Kind::UptimeKuma => "uptime_kuma",
        }
    }
}

/// A resolved target URL (its plaintext may be a secret).
struct Target {
    kind: Kind,
    url: Zeroizing<String>,
}

/// Targets of one job, ready to send to.
pub struct Notifier {
    job: String,
    host: String,
    targets: Vec<Target>,
    agent: ureq::Agent,
    /// Problems met resolving the targets (an undecryptable secret, say).
    pub warnings: Vec<String>,
}

/// Decrypts `secret:NAME` values.
pub type Decrypt<'a> = dyn Fn(&str) -> Result<Zeroizing<Vec<u8>>, String> + 'a;

impl Notifier {
    /// The global targets plus those of `[notify.jobs.<job>]`.
    pub fn new(project: &Project, job: &str, host: &str, decrypt: &Decrypt<'_>) -> Notifier {
        let n = &project.config.notify;
        let global = NotifyTargets {
            webhook: n.webhook.clone(),
            healthchecks: n.healthchecks.clone(),
            ntfy: n.ntfy.clone(),
            uptime_kuma: n.uptime_kuma.clone(),
        };
        let mut targets = Vec::new();
        let mut warnings = Vec::new();
        let per_job = n
            .jobs
            .iter()
            .find(|(k, _)| k.get_ref() == job)
            .map(|(_, v)| v.clone());
        for t in std::iter::once(global).chain(per_job) {
            for (kind, v) in t.urls() {
                match resolve(v, decrypt) {
                    Ok(url) => targets.push(Target {
                        kind: Kind::from_key(kind),
                        url,
                    }),
                    Err(e) => warnings.push(format!("{kind} notification skipped: {e}")),
                }
            }
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("agex/", env!("CARGO_PKG_VERSION")))
            .build();
        Notifier {
            job: job.to_string(),
            host: host.to_string(),
            targets,
            agent,
            warnings,
        }
    }

    /// Whether any target is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Sends `event` to every target; returns one warning per request that failed after
    /// its retries.
    pub fn send(&self, event: &Event) -> Vec<String> {
        let mut warnings = Vec::new();
        for t in &self.targets {
            let requests = match t.kind {
                Kind::Healthchecks => self.healthchecks(&t.url, event),
                Kind::Ntfy => self.ntfy(&t.url, event),
                Kind::UptimeKuma => self.uptime_kuma(&t.url, event),
                Kind::Webhook => self.webhook(&t.url, event),
            };
            for r in requests {
                if let Err(e) = self.request(&r) {
                    warnings.push(format!(
                        "{} notification for job {} failed: {e}",
                        t.kind.key(),
                        self.job
                    ));
                }
            }
        }
        warnings
    }

    fn healthchecks(&self, url: &str, event: &Event) -> Vec<Request> {
        let base = url.trim_end_matches('/');
        let (suffix, body) = match event {
            Event::Start => ("/start", String::new()),
            Event::Finish {
                result, log_tail, ..
            } if result.ok() => ("", log_tail.clone()),
            Event::Finish {
                result, log_tail, ..
            } => (
                "/fail",
                format!("agex {} {}: {result:?}\n{log_tail}", self.job, self.host),
            ),
            Event::Overdue { items } => {
                ("/fail", format!("overdue backups:\n{}\n", items.join("\n")))
            }
        };
        vec![Request {
            url: Zeroizing::new(format!("{base}{suffix}")),
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: tail(&body),
            query: vec![],
        }]
    }

    fn ntfy(&self, url: &str, event: &Event) -> Vec<Request> {
        let (title, priority, tags, body) = match event {
            Event::Start => return vec![],
            Event::Finish {
                result,
                duration_seconds,
                log_tail,
                ..
            } => {
                let word = match result {
                    Outcome::Success => "succeeded",
                    Outcome::Partial => "partly failed",
                    Outcome::Failure => "failed",
                };
                (
                    format!("agex {} on {} {word}", self.job, self.host),
                    if result.ok() { "default" } else { "high" },
                    if result.ok() {
                        "white_check_mark"
                    } else {
                        "warning"
                    },
                    format!("{word} in {duration_seconds:.1} s\n{log_tail}"),
                )
            }
            Event::Overdue { items } => (
                format!("agex backups overdue on {}", self.host),
                "high",
                "warning",
                items.join("\n"),
            ),
        };
        vec![Request {
            url: Zeroizing::new(url.to_string()),
            headers: vec![
                ("Title", title),
                ("Priority", priority.into()),
                ("Tags", tags.into()),
            ],
            body: tail(&body),
            query: vec![],
        }]
    }

    fn webhook(&self, url: &str, event: &Event) -> Vec<Request> {
        if matches!(event, Event::Start) {
            return vec![];
        }
        let body = WebhookBody {
            job: &self.job,
            host: &self.host,
            time: chrono::Utc::now().to_rfc3339(),
            event,
        };
        vec![Request {
            url: Zeroizing::new(url.to_string()),
            headers: vec![("Content-Type", "application/json".into())],
            body: serde_json::to_string(&body).unwrap_or_default(),
            query: vec![],
        }]
    }

    /// Uptime Kuma's push monitor: `GET URL?status=up|down&msg=…&ping=<ms>` once a job
    /// ends (Kuma has no "started"); a partial failure is `down`. A URL copied from Kuma
    /// with its example query (`?status=up&msg=OK&ping=`) is used without it.
    fn uptime_kuma(&self, url: &str, event: &Event) -> Vec<Request> {
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        let (status, msg, ping) = match event {
            Event::Start => return vec![],
            Event::Finish {
                result,
                duration_seconds,
                log_tail,
                ..
            } => {
                let msg = if result.ok() {
                    format!("{} ok in {duration_seconds:.1} s", self.job)
                } else {
                    let last = log_tail
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    format!("{} {}: {last}", self.job, result.word())
                };
                let ms = (duration_seconds * 1000.0).round().max(0.0) as u64;
                (if result.ok() { "up" } else { "down" }, msg, Some(ms))
            }
            Event::Overdue { items } => (
                "down",
                format!("backups overdue on {}: {}", self.host, items.join("; ")),
                None,
            ),
        };
        let mut query = vec![("status", status.to_string()), ("msg", short(&msg, 200))];
        if let Some(ms) = ping {
            query.push(("ping", ms.to_string()));
        }
        vec![Request {
            url: Zeroizing::new(base.to_string()),
            headers: vec![],
            body: String::new(),
            query,
        }]
    }

    /// Sends with a bounded retry: transport errors, 429 and 5xx are retried after 0.5 s
    /// and 1 s; other answers are final. A request with query parameters is a GET (the
    /// push protocols that take their data in the URL), any other a POST.
    fn request(&self, r: &Request) -> Result<(), SendError> {
        let mut last = SendError::Transport(String::new());
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << (attempt - 1)));
            }
            let mut req = if r.query.is_empty() {
                self.agent.post(&r.url)
            } else {
                self.agent.get(&r.url)
            };
            for (k, v) in &r.query {
                req = req.query(k, v);
            }
            for (k, v) in &r.headers {
                // Header values must be one line.
                req = req.set(k, &v.replace(['\r', '\n'], " "));
            }
            let sent = if r.query.is_empty() {
                req.send_string(&r.body)
            } else {
                req.call()
            };
            match sent {
                Ok(_) => return Ok(()),
                Err(ureq::Error::Status(code, _)) if code == 429 || code >= 500 => {
                    last = SendError::Status(code);
                }
                Err(ureq::Error::Status(code, _)) => return Err(SendError::Status(code)),
                Err(e) => last = SendError::Transport(redact(&e.to_string(), r.url.as_str())),
            }
        }
        Err(SendError::GaveUp(Box::new(last)))
    }
}

/// Why a notification request failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The server answered with an error status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The request did not get an answer; the text has the URL (which can hold a token)
    /// taken out, so ureq's error itself is not kept.
    #[error("{0}")]
    Transport(String),
    /// Every attempt failed; the last one's reason.
    #[error("{0} (after {ATTEMPTS} attempts)")]
    GaveUp(Box<SendError>),
}

struct Request {
    /// May hold a token (a healthchecks UUID, an ntfy topic): wiped when dropped.
    url: Zeroizing<String>,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Parameters added to the URL, percent-encoded.
    query: Vec<(&'static str, String)>,
}

/// `text` on one line and at most `max` characters, for a message carried in a URL.
fn short(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Why a `secret:NAME` target gives no URL. Never the secret's text: it is a URL that
/// can hold a token, so the URL check's error is not kept either.
#[derive(Debug, thiserror::Error)]
enum SecretUrlError {
    /// The secret did not decrypt; the caller's reason.
    #[error("secret `{name}`: {why}")]
    Decrypt { name: String, why: String },
    /// The plaintext is not text.
    #[error("secret `{0}` is not UTF-8 text")]
    NotUtf8(String),
    /// The plaintext is not an http(s) URL.
    #[error("secret `{0}` does not hold an http(s) URL")]
    NotUrl(String),
}

fn resolve(
    v: &Spanned<String>,
    decrypt: &Decrypt<'_>,
) -> Result<Zeroizing<String>, SecretUrlError> {
    let Some(name) = v.get_ref().strip_prefix("secret:") else {
        return Ok(Zeroizing::new(v.get_ref().clone()));
    };
    let plain = decrypt(name).map_err(|why| SecretUrlError::Decrypt {
        name: name.to_string(),
        why,
    })?;
    let text = std::str::from_utf8(&plain)
        .map_err(|_| SecretUrlError::NotUtf8(name.to_string()))?
        .trim()
        .to_string();
    agex_core::config::check_notify_url(&text)
        .map_err(|_| SecretUrlError::NotUrl(name.to_string()))?;
    Ok(Zeroizing::new(text))
}

/// Error texts may quote the URL, which can hold a token: never show it.
fn redact(text: &str, url: &str) -> String {
    text.replace(url, "<url>")
}

/// The last [`TAIL_BYTES`] of `log`, cut at a line start.
pub fn tail(log: &str) -> String {
    if log.len() <= TAIL_BYTES {
        return log.to_string();
    }
    let mut start = log.len() - TAIL_BYTES;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    let cut = &log[start..];
    match cut.find('\n') {
        Some(i) => cut[i + 1..].to_string(),
        None => cut.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_and_outcomes() {
        let long = "line\n".repeat(5000);
        let t = tail(&long);
        assert!(t.len() <= TAIL_BYTES && t.starts_with("line\n"));
        assert_eq!(Outcome::from_exit(Some(3)), Outcome::Partial);
        assert_eq!(Outcome::from_exit(None), Outcome::Failure);
        assert_eq!(redact("x http://a/tok y", "http://a/tok"), "x <url> y");
        assert_eq!(short("a\n  b", 10), "a b");
        assert_eq!(short("abcdef", 4), "abc…");
    }
}
