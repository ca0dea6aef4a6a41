//! `agex.toml`: keys, groups, hosts, repositories, activation and notification settings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostic::{did_you_mean, from_toml_error, Diagnostics, SourceFile};
use crate::recipient::RecipientKey;
use crate::repo_url::{self, RepoUrl};

/// The host identity used when a host entry names none.
pub const DEFAULT_HOST_IDENTITY: &str = "/etc/ssh/ssh_host_ed25519_key";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    keys: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    #[serde(default)]
    hosts: BTreeMap<Spanned<String>, RawHost>,
    #[serde(default)]
    repositories: BTreeMap<Spanned<String>, RawRepository>,
    #[serde(default)]
    activation: RawActivation,
    #[serde(default)]
    notify: Notify,
    #[serde(default)]
    backup: BackupSettings,
    #[serde(default)]
    schedule: RawScheduleSettings,
    #[serde(default)]
    report: RawReport,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    html: Option<Spanned<String>>,
}

/// `[report]`: the HTML status report kept up to date after every backup, drill and check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportSettings {
    /// Host path of the report file; none writes no report.
    pub html: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    key: Spanned<String>,
    identity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivation {
    keep: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    kind: Spanned<RepositoryKind>,
    url: Spanned<String>,
    password_secret: Spanned<String>,
    ssh_key_secret: Option<Spanned<String>>,
    env_secret: Option<Spanned<String>>,
    #[serde(default)]
    known_hosts: Vec<Spanned<String>>,
    limit_upload: Option<Spanned<String>>,
    limit_download: Option<Spanned<String>>,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

/// Which engine a repository is written by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepositoryKind {
    /// Restic format, written in-process by rustic_core.
    Restic,
    /// Borg format, written by the `borg` binary.
    Borg,
}

impl RepositoryKind {
    /// The kind as agex.toml spells it: `restic` or `borg`.
    pub fn as_str(self) -> &'static str {
        match self {
            RepositoryKind::Restic => "restic",
            RepositoryKind::Borg => "borg",
        }
    }
}

/// One offsite backup repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// Its name in `agex.toml`.
    pub name: String,
    /// Restic or Borg.
    pub kind: RepositoryKind,
    /// Where it lives (local path, `sftp:`, `rest:`, `ssh://`, …).
    pub url: String,
    /// The secret holding its password.
    pub password_secret: Spanned<String>,
    /// The secret holding the ssh key used to reach it, if any.
    pub ssh_key_secret: Option<Spanned<String>>,
    /// The URL, parsed: which backend reaches the repository.
    pub location: RepoUrl,
    /// Where the URL is written in agex.toml (for errors found after parsing).
    pub url_span: std::ops::Range<usize>,
    /// The secret holding `KEY=VALUE` lines for the backend (S3 keys, rclone config, …).
    pub env_secret: Option<Spanned<String>>,
    /// Pinned ssh host keys, known_hosts lines; empty: the user's `~/.ssh/known_hosts`.
    pub known_hosts: Vec<String>,
    /// Upload limit in bytes per second.
    pub limit_upload: Option<u64>,
    /// Download limit in bytes per second.
    pub limit_download: Option<u64>,
    /// Extra backend options (`opendal:` services only).
    pub options: BTreeMap<String, String>,
}

/// `[activation]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    /// How many generations to keep (the active one included).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    5
}

impl Default for Activation {
    fn default() -> Self {
        Activation {
            keep: default_keep(),
        }
    }
}

/// `[backup]` settings shared by every backup run.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSettings {
    /// Host directory for the Prometheus textfile (node_exporter's textfile collector);
    /// none writes no metrics.
    pub metrics_dir: Option<PathBuf>,
    /// Seconds a run waits for another run holding a repository before failing.
    #[serde(default = "default_lock_wait")]
    pub lock_wait: u64,
    /// Seconds after which a Borg lock that two runs found held is taken for stale (its
    /// holder died on another machine, or under another host id) and broken, with a
    /// warning; 0 never breaks a lock by age. Dead holders on this host are cleared by
    /// borg itself at once.
    #[serde(default = "default_stale_lock_age")]
    pub stale_lock_age: u64,
    /// Seconds one repository may take no data from a dump while the other waits for it
    /// (the dump is streamed to both with bounded memory, so the slower paces it) and
    /// show no other sign of work (a file read, a request answered, progress from borg);
    /// after that it is left out of this run of the service, failed, and the other goes
    /// on. 0 waits for ever.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: u64,
}

fn default_stall_timeout() -> u64 {
    600
}

fn default_lock_wait() -> u64 {
    300
}

fn default_stale_lock_age() -> u64 {
    24 * 3600
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            metrics_dir: None,
            lock_wait: default_lock_wait(),
            stale_lock_age: default_stale_lock_age(),
            stall_timeout: default_stall_timeout(),
        }
    }
}

/// `[notify]` settings: where job results are reported. Values may be `secret:NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Generic JSON webhook.
    pub webhook: Option<Spanned<String>>,
    /// healthchecks.io-style ping URL.
    pub healthchecks: Option<Spanned<String>>,
    /// ntfy topic URL.
    pub ntfy: Option<Spanned<String>>,
    /// Uptime Kuma push URL (`https://kuma.example/api/push/TOKEN`).
    pub uptime_kuma: Option<Spanned<String>>,
    /// `[notify.jobs.<job>]`: targets for one job (`backup-<service>`, `check-<repo>`,
    /// `forget-<service>`, `drill`, `overdue`), used in addition to the global ones.
    #[serde(default)]
    pub jobs: BTreeMap<Spanned<String>, NotifyTargets>,
}

/// Where one job's results go. Values may be `secret:NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyTargets {
    /// Generic JSON webhook.
    pub webhook: Option<Spanned<String>>,
    /// healthchecks.io-style ping URL.
    pub healthchecks: Option<Spanned<String>>,
    /// ntfy topic URL.
    pub ntfy: Option<Spanned<String>>,
    /// Uptime Kuma push URL (`https://kuma.example/api/push/TOKEN`).
    pub uptime_kuma: Option<Spanned<String>>,
}

impl Notify {
    /// Every configured URL value with what it is, global ones first.
    pub fn all_urls(&self) -> Vec<(&'static str, &Spanned<String>)> {
        let mut out: Vec<(&'static str, &Spanned<String>)> = Vec::new();
        for (what, v) in [
            ("webhook", &self.webhook),
            ("healthchecks", &self.healthchecks),
            ("ntfy", &self.ntfy),
            ("uptime_kuma", &self.uptime_kuma),
        ] {
            out.extend(v.iter().map(|v| (what, v)));
        }
        for t in self.jobs.values() {
            out.extend(t.urls());
        }
        out
    }
}

impl NotifyTargets {
    /// The configured URL values with what each is.
    pub fn urls(&self) -> Vec<(&'static str, &Spanned<String>)> {
        [
            ("webhook", &self.webhook),
            ("healthchecks", &self.healthchecks),
            ("ntfy", &self.ntfy),
            ("uptime_kuma", &self.uptime_kuma),
        ]
        .into_iter()
        .filter_map(|(what, v)| v.as_ref().map(|v| (what, v)))
        .collect()
    }
}

/// Why a notification target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyUrlError {
    /// `secret:` alone.
    #[error("`secret:` names no secret")]
    NoSecret,
    /// Neither http(s):// nor `secret:`.
    #[error("`{0}` is not an http:// or https:// URL (or `secret:NAME`)")]
    NotHttp(String),
    /// A port that is no number.
    #[error("`{url}`: port `{port}` is not a number")]
    Port {
        /// The URL.
        url: String,
        /// The port given.
        port: String,
    },
    /// No host, or whitespace.
    #[error("`{0}` has no host or contains spaces")]
    NoHost(String),
}

/// Checks a notification target: an `http(s)://host...` URL or `secret:NAME`.
pub fn check_notify_url(value: &str) -> Result<(), NotifyUrlError> {
    if let Some(name) = value.strip_prefix("secret:") {
        return if name.is_empty() {
            Err(NotifyUrlError::NoSecret)
        } else {
            Ok(())
        };
    }
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| NotifyUrlError::NotHttp(value.to_string()))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_only = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let name = match host_only.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || host_only.starts_with('[') => {
            if port.parse::<u16>().is_err() {
                return Err(NotifyUrlError::Port {
                    url: value.to_string(),
                    port: port.to_string(),
                });
            }
            h
        }
        _ => host_only,
    };
    if name.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(NotifyUrlError::NoHost(value.to_string()));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduleSettings {
    max_concurrent: Option<Spanned<usize>>,
    check: Option<Spanned<String>>,
    drill: Option<Spanned<String>>,
    overdue: Option<Spanned<String>>,
    grace: Option<Spanned<u64>>,
    randomized_delay: Option<Spanned<u64>>,
}

/// The default schedule of `agex repo check` (weekly).
pub const DEFAULT_CHECK_SCHEDULE: &str = "Sun *-*-* 04:00:00";
/// The default schedule of the restore drill (monthly).
pub const DEFAULT_DRILL_SCHEDULE: &str = "*-*-01 05:00:00";
/// The default schedule of the overdue-backup check (hourly).
pub const DEFAULT_OVERDUE_SCHEDULE: &str = "*-*-* *:15:00";

/// `[schedule]` settings: the jobs besides backups, and how the daemon runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSettings {
    /// How many jobs `agex daemon` runs at once (jobs sharing a repository never overlap).
    pub max_concurrent: usize,
    /// When each repository is checked.
    pub check: crate::schedule::Schedule,
    /// When the restore drill runs.
    pub drill: crate::schedule::Schedule,
    /// When `agex status --max-age` looks for overdue backups.
    pub overdue: crate::schedule::Schedule,
    /// Seconds running jobs get to finish after SIGTERM before they are cancelled.
    pub grace: u64,
    /// Seconds of random delay a systemd timer adds (spreads load; 0 for none).
    pub randomized_delay: u64,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            max_concurrent: 2,
            check: crate::schedule::Schedule::from_str(DEFAULT_CHECK_SCHEDULE)
                .unwrap_or_else(|_| unreachable!("the default check schedule is valid")),
            drill: crate::schedule::Schedule::from_str(DEFAULT_DRILL_SCHEDULE)
                .unwrap_or_else(|_| unreachable!("the default drill schedule is valid")),
            overdue: crate::schedule::Schedule::from_str(DEFAULT_OVERDUE_SCHEDULE)
                .unwrap_or_else(|_| unreachable!("the default overdue schedule is valid")),
            grace: 60,
            randomized_delay: 900,
        }
    }
}

fn schedule_settings(
    raw: &RawScheduleSettings,
    source: &SourceFile,
    diags: &mut Diagnostics,
) -> ScheduleSettings {
    let mut out = ScheduleSettings::default();
    if let Some(m) = &raw.max_concurrent {
        if *m.get_ref() == 0 {
            diags.push(source.error(
                Some(m.span()),
                "[schedule] max_concurrent must be at least 1",
            ));
        } else {
            out.max_concurrent = *m.get_ref();
        }
    }
    for (what, value, slot) in [
        ("check", &raw.check, &mut out.check),
        ("drill", &raw.drill, &mut out.drill),
        ("overdue", &raw.overdue, &mut out.overdue),
    ] {
        if let Some(v) = value {
            match crate::schedule::Schedule::from_str(v.get_ref()) {
                Ok(s) => *slot = s,
                Err(why) => diags.push(
                    source
                        .error(Some(v.span()), format!("[schedule] {what}: {why}"))
                        .with_help("use systemd OnCalendar (\"weekly\", \"Sun 04:00\") or cron (\"0 4 * * 0\")"),
                ),
            }
        }
    }
    if let Some(g) = &raw.grace {
        out.grace = *g.get_ref();
    }
    if let Some(d) = &raw.randomized_delay {
        out.randomized_delay = *d.get_ref();
    }
    out
}

/// A host that receives secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Its name in `agex.toml` (and usually its hostname).
    pub name: String,
    /// Its public key (usually the ssh host key).
    pub key: RecipientKey,
    /// Where its private key lives on the host (a host path, resolved under `--root`).
    pub identity: PathBuf,
}

/// What a name in a `recipients` list refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// An entry of `[keys]`.
    Key,
    /// An entry of `[groups]`.
    Group,
    /// An entry of `[hosts]`.
    Host,
}

/// A validated `agex.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file's text, for diagnostics that point into it.
    pub source: SourceFile,
    /// Named public keys.
    pub keys: BTreeMap<String, RecipientKey>,
    /// Named lists of keys and hosts.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Hosts by name.
    pub hosts: BTreeMap<String, Host>,
    /// Backup repositories by name.
    pub repositories: BTreeMap<String, Repository>,
    /// Activation settings.
    pub activation: Activation,
    /// Notification settings.
    pub notify: Notify,
    /// Backup settings.
    pub backup: BackupSettings,
    /// Schedule settings.
    pub schedule: ScheduleSettings,
    /// HTML report settings.
    pub report: ReportSettings,
}

impl Config {
    /// Parses and validates the text of `agex.toml`.
    pub fn parse(source: SourceFile) -> Result<Config, Diagnostics> {
        let raw: RawConfig = toml::from_str(&source.text)
            .map_err(|e| Diagnostics(vec![from_toml_error(&source, &e)]))?;
        let mut diags = Diagnostics::default();

        let mut seen: BTreeMap<String, &'static str> = BTreeMap::new();
        let mut claim = |name: &Spanned<String>, what: &'static str, diags: &mut Diagnostics| {
            if let Some(prev) = seen.insert(name.get_ref().clone(), what) {
                diags.push(
                    source
                        .error(
                            Some(name.span()),
                            format!(
                                "duplicate name `{}`: it is already a {prev}",
                                name.get_ref()
                            ),
                        )
                        .with_help(
                            "keys, groups and hosts share one namespace; rename one of them",
                        ),
                );
            }
            if name.get_ref().is_empty()
                || !name
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                diags.push(source.error(
                    Some(name.span()),
                    format!(
                        "invalid name `{}`: use letters, digits, `-`, `_` and `.`",
                        name.get_ref()
                    ),
                ));
            }
        };

        let mut keys = BTreeMap::new();
        for (name, value) in &raw.keys {
            claim(name, "key", &mut diags);
            match RecipientKey::from_str(value.get_ref()) {
                Ok(k) => {
                    keys.insert(name.get_ref().clone(), k);
                }
                Err(e) => diags.push(source.error(
                    Some(value.span()),
                    format!("key `{}`: {}", name.get_ref(), e.reason),
                )),
            }
        }
        let mut hosts = BTreeMap::new();
        for (name, h) in &raw.hosts {
            claim(name, "host", &mut diags);
            if let Some(Err(why)) = h.identity.as_deref().map(crate::names::host_path) {
                diags.push(source.error(
                    Some(name.span()),
                    format!(
                        "host `{}`: identity `{}`: {why}",
                        name.get_ref(),
                        h.identity.as_deref().unwrap_or_default()
                    ),
                ));
            }
            match RecipientKey::from_str(h.key.get_ref()) {
                Ok(key) => {
                    hosts.insert(
                        name.get_ref().clone(),
                        Host {
                            name: name.get_ref().clone(),
                            key,
                            identity: PathBuf::from(
                                h.identity.as_deref().unwrap_or(DEFAULT_HOST_IDENTITY),
                            ),
                        },
                    );
                }
                Err(e) => diags.push(source.error(
                    Some(h.key.span()),
                    format!("host `{}`: {}", name.get_ref(), e.reason),
                )),
            }
        }
        for name in raw.groups.keys() {
            claim(name, "group", &mut diags);
        }
        let mut groups = BTreeMap::new();
        for (name, members) in &raw.groups {
            let mut list = Vec::new();
            let mut unique = BTreeSet::new();
            for m in members {
                let member = m.get_ref();
                if !raw.keys.keys().any(|k| k.get_ref() == member)
                    && !raw.hosts.keys().any(|k| k.get_ref() == member)
                {
                    let is_group = raw.groups.keys().any(|g| g.get_ref() == member);
                    let mut d = source.error(
                        Some(m.span()),
                        if is_group {
                            format!("group `{}` lists group `{member}`: groups hold keys and hosts, not other groups", name.get_ref())
                        } else {
                            format!("group `{}` lists `{member}`, which is not a key or host", name.get_ref())
                        },
                    );
                    let names = raw
                        .keys
                        .keys()
                        .chain(raw.hosts.keys())
                        .map(|k| k.get_ref().as_str());
                    if let Some(best) = did_you_mean(member, names) {
                        d = d.with_help(format!("did you mean `{best}`?"));
                    }
                    diags.push(d);
                } else if !unique.insert(member.clone()) {
                    diags.push(source.error(
                        Some(m.span()),
                        format!("group `{}` lists `{member}` twice", name.get_ref()),
                    ));
                } else {
                    list.push(member.clone());
                }
            }
            groups.insert(name.get_ref().clone(), list);
        }
        let mut repositories = BTreeMap::new();
        for (name, r) in &raw.repositories {
            if r.url.get_ref().trim().is_empty() {
                diags.push(source.error(
                    Some(r.url.span()),
                    format!("repository `{}` has an empty url", name.get_ref()),
                ));
            }
            let location = repository_location(name.get_ref(), r, &source, &mut diags);
            let rate = |v: &Option<Spanned<String>>, what: &str, diags: &mut Diagnostics| {
                v.as_ref()
                    .and_then(|v| match repo_url::parse_rate(v.get_ref()) {
                        Ok(n) => Some(n),
                        Err(why) => {
                            diags.push(source.error(
                                Some(v.span()),
                                format!("repository `{}`: {what}: {why}", name.get_ref()),
                            ));
                            None
                        }
                    })
            };
            let limit_upload = rate(&r.limit_upload, "limit_upload", &mut diags);
            let limit_download = rate(&r.limit_download, "limit_download", &mut diags);
            repositories.insert(
                name.get_ref().clone(),
                Repository {
                    name: name.get_ref().clone(),
                    kind: *r.kind.get_ref(),
                    url: r.url.get_ref().clone(),
                    password_secret: r.password_secret.clone(),
                    ssh_key_secret: r.ssh_key_secret.clone(),
                    location,
                    url_span: r.url.span(),
                    env_secret: r.env_secret.clone(),
                    known_hosts: r
                        .known_hosts
                        .iter()
                        .map(|k| k.get_ref().trim().to_string())
                        .collect(),
                    limit_upload,
                    limit_download,
                    options: r.options.clone(),
                },
            );
        }
        let keep = match &raw.activation.keep {
            Some(k) if *k.get_ref() == 0 => {
                diags.push(source.error(
                    Some(k.span()),
                    "[activation] keep must be at least 1: the active generation is always kept",
                ));
                default_keep()
            }
            Some(k) => *k.get_ref(),
            None => default_keep(),
        };
        let schedule = schedule_settings(&raw.schedule, &source, &mut diags);
        if let Some(dir) = &raw.backup.metrics_dir {
            if let Err(why) = crate::names::host_path(&dir.to_string_lossy()) {
                // The setting is read without a span: point at its line.
                let at = source
                    .text
                    .match_indices("metrics_dir")
                    .map(|(i, k)| i..i + k.len())
                    .find(|r| source.text[..r.start].ends_with('\n'));
                diags.push(source.error(
                    at,
                    format!("[backup] metrics_dir `{}`: {why}", dir.display()),
                ));
            }
        }
        let report = ReportSettings {
            html: raw.report.html.as_ref().and_then(|p| {
                crate::names::host_path(p.get_ref())
                    .map_err(|why| {
                        diags.push(source.error(
                            Some(p.span()),
                            format!("[report] html `{}`: {why}", p.get_ref()),
                        ))
                    })
                    .ok()
            }),
        };
        for (what, v) in raw.notify.all_urls() {
            if let Err(why) = check_notify_url(v.get_ref()) {
                diags.push(source.error(Some(v.span()), format!("[notify] {what}: {why}")));
            }
        }
        diags.into_result()?;
        Ok(Config {
            source,
            keys,
            groups,
            hosts,
            repositories,
            activation: Activation { keep },
            notify: raw.notify,
            backup: raw.backup,
            schedule,
            report,
        })
    }

    /// What a name refers to, if anything.
    pub fn kind_of(&self, name: &str) -> Option<NameKind> {
        if self.keys.contains_key(name) {
            Some(NameKind::Key)
        } else if self.groups.contains_key(name) {
            Some(NameKind::Group)
        } else if self.hosts.contains_key(name) {
            Some(NameKind::Host)
        } else {
            None
        }
    }

    /// Every key, group and host name, for "did you mean" hints.
    pub fn all_names(&self) -> impl Iterator<Item = &str> {
        self.keys
            .keys()
            .chain(self.groups.keys())
            .chain(self.hosts.keys())
            .map(String::as_str)
    }

    /// Expands a key, group or host name into `(member name, key)` pairs.
    pub fn expand(&self, name: &str) -> Vec<(String, RecipientKey)> {
        let single = |n: &str| -> Option<(String, RecipientKey)> {
            self.keys
                .get(n)
                .cloned()
                .or_else(|| self.hosts.get(n).map(|h| h.key.clone()))
                .map(|k| (n.to_string(), k))
        };
        match self.groups.get(name) {
            Some(members) => members.iter().filter_map(|m| single(m)).collect(),
            None => single(name).into_iter().collect(),
        }
    }

    /// The hosts a name stands for (itself, or the hosts in a group).
    pub fn hosts_in(&self, name: &str) -> Vec<String> {
        match self.groups.get(name) {
            Some(members) => members
                .iter()
                .filter(|m| self.hosts.contains_key(*m))
                .cloned()
                .collect(),
            None if self.hosts.contains_key(name) => vec![name.to_string()],
            None => vec![],
        }
    }
}

/// The repository's URL parsed for its engine, with the checks that need the rest of its
/// entry: credentials for S3, host keys for ssh, options only for opendal.
fn repository_location(
    name: &str,
    r: &RawRepository,
    source: &SourceFile,
    diags: &mut Diagnostics,
) -> RepoUrl {
    let parsed = match r.kind.get_ref() {
        RepositoryKind::Restic => {
            repo_url::parse_restic(r.url.get_ref()).map_err(|why| (why, repo_url::RESTIC_FORMS))
        }
        RepositoryKind::Borg => {
            repo_url::parse_borg(r.url.get_ref()).map_err(|why| (why, repo_url::BORG_FORMS))
        }
    };
    let location = match parsed {
        Ok(l) => l,
        Err((why, forms)) => {
            diags.push(
                source
                    .error(Some(r.url.span()), format!("repository `{name}`: {why}"))
                    .with_help(format!("accepted forms: {forms}")),
            );
            return RepoUrl::Local(r.url.get_ref().clone());
        }
    };
    if matches!(location, RepoUrl::S3 { .. }) && r.env_secret.is_none() {
        diags.push(
            source
                .error(
                    Some(r.url.span()),
                    format!("repository `{name}`: an s3: repository needs credentials"),
                )
                .with_help(
                    "add `env_secret = \"NAME\"`, an age secret with AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines",
                ),
        );
    }
    if !r.options.is_empty() && !matches!(location, RepoUrl::OpenDal(_)) {
        diags.push(source.error(
            Some(r.url.span()),
            format!("repository `{name}`: `options` are only read for opendal: URLs"),
        ));
    }
    let ssh = location.ssh().cloned();
    if ssh.is_none() {
        if let Some(first) = r.known_hosts.first() {
            diags.push(source.error(
                Some(first.span()),
                format!("repository `{name}`: known_hosts is only used by sftp: and ssh:// repositories"),
            ));
        }
        if let Some(k) = &r.ssh_key_secret {
            if !matches!(location, RepoUrl::Rclone(_) | RepoUrl::OpenDal(_)) {
                diags.push(source.error(
                    Some(k.span()),
                    format!("repository `{name}`: ssh_key_secret is only used by sftp: and ssh:// repositories"),
                ));
            }
        }
    }
    let mut names_server = r.known_hosts.is_empty();
    for line in &r.known_hosts {
        match repo_url::parse_known_host(line.get_ref()) {
            Ok(hosts) => {
                if let Some(s) = &ssh {
                    let want = s.known_hosts_name();
                    names_server |= hosts.iter().any(|h| *h == want || h.starts_with('|'));
                }
            }
            Err(why) => {
                names_server = true;
                diags.push(source.error(
                    Some(line.span()),
                    format!("repository `{name}`: known_hosts: {why}"),
                ));
            }
        }
    }
    if let (Some(s), false) = (&ssh, names_server) {
        diags.push(
            source
                .error(
                    Some(r.known_hosts[0].span()),
                    format!(
                        "repository `{name}`: known_hosts has no key for `{}`, the server of its url",
                        s.known_hosts_name()
                    ),
                )
                .with_help(format!("`agex repo trust {name}` writes the server's keys here")),
        );
    }
    location
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn parse(text: &str) -> Result<Config, Diagnostics> {
        Config::parse(SourceFile::new("agex.toml", text))
    }

    #[test]
    fn parses_minimal() {
        let c = parse(&format!(
            "[keys]\nalice = \"{X}\"\n[groups]\nadmins = [\"alice\"]\n"
        ))
        .unwrap();
        assert_eq!(c.expand("admins").len(), 1);
        assert_eq!(c.activation.keep, 5);
    }

    #[test]
    fn reports_bad_key_with_line() {
        let e = parse("[keys]\nalice = \"age1bad\"\n").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with("agex.toml:2:9: key `alice`"), "{shown}");
    }

    #[test]
    fn keep_zero_points_at_its_line() {
        let e = parse("[activation]\nkeep = 0\n").unwrap_err().to_string();
        assert!(e.starts_with("agex.toml:2:8: [activation] keep"), "{e}");
        assert_eq!(
            parse("[activation]\nkeep = 3\n").unwrap().activation.keep,
            3
        );
        assert_eq!(parse("").unwrap().activation.keep, 5);
    }

    #[test]
    fn reports_duplicate_names_across_tables() {
        let e = parse(&format!(
            "[keys]\nadmins = \"{X}\"\n[groups]\nadmins = [\"admins\"]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("duplicate name `admins`"), "{e}");
    }

    #[test]
    fn schedule_and_notify_settings_are_checked() {
        let c = parse("[schedule]\nmax_concurrent = 3\ncheck = \"daily\"\n").unwrap();
        assert_eq!(c.schedule.max_concurrent, 3);
        assert_eq!(c.schedule.check.on_calendar(), "*-*-* 00:00:00");
        let e = parse("[schedule]\nmax_concurrent = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agex.toml:2:18:"), "{e}");
        let e = parse("[schedule]\ndrill = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agex.toml:2:9: [schedule] drill"), "{e}");
        let e = parse("[schedule]\nmax_concurent = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agex.toml:2:1"), "{e}");
        let e = parse("[notify]\nntfy = \"ftp://x/y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agex.toml:2:8: [notify] ntfy"), "{e}");
        let e = parse("[notify.jobs.backup-x]\nwebhook = \"http://:80/\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agex.toml:2:11:"), "{e}");
        for ok in [
            "https://hc-ping.com/u",
            "http://127.0.0.1:8080/x",
            "secret:hc",
        ] {
            assert!(check_notify_url(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn reports_unknown_group_member_with_hint() {
        let e = parse(&format!(
            "[keys]\nalice = \"{X}\"\n[groups]\nadmins = [\"alcie\"]\n"
        ))
        .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("not a key or host"), "{shown}");
        assert!(shown.contains("did you mean `alice`"), "{shown}");
    }
}
