//! `policies/<service>.toml`: what to back up for one service, where, when, for how long.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::Config;
use crate::diagnostic::{did_you_mean, from_toml_error, Diagnostics, SourceFile};
use crate::names::{host_path, valid_name};
use crate::rules::Rules;
use crate::schedule::Schedule;

/// When a policy names no schedule.
pub const DEFAULT_SCHEDULE: &str = "*-*-* 03:00:00";
/// Where every snapshot holds a service's dumps and manifest (and where borg reads them
/// from named pipes during a run, so no policy path may contain it).
pub const DUMPS_DIR: &str = "/var/lib/agex/dumps";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    repositories: Option<Spanned<Vec<Spanned<String>>>>,
    schedule: Option<Spanned<String>>,
    #[serde(default)]
    stop_units: Vec<String>,
    #[serde(default)]
    before: Vec<String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    databases: Vec<Spanned<RawDatabase>>,
    retention: Option<Retention>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum RawDatabase {
    Sqlite {
        path: String,
        name: Option<String>,
    },
    Postgres {
        database: String,
        socket: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        user: Option<String>,
        password_secret: Option<String>,
        name: Option<String>,
        sslmode: Option<SslMode>,
        require_auth: Option<String>,
    },
}

/// libpq's `sslmode` for a PostgreSQL server reached over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server insists.
    Allow,
    /// TLS if the server offers it (libpq's default; a password can go out in clear).
    Prefer,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS with a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS with a trusted certificate for this host name (the default for non-loopback
    /// hosts).
    VerifyFull,
}

impl SslMode {
    /// The value libpq reads from `PGSSLMODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How many snapshots to keep, per interval (restic's `--keep-*`, borg's `--keep-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// The newest N.
    #[serde(default)]
    pub keep_last: u32,
    /// The last of each of the newest N hours.
    #[serde(default)]
    pub keep_hourly: u32,
    /// The last of each of the newest N days.
    #[serde(default)]
    pub keep_daily: u32,
    /// The last of each of the newest N weeks.
    #[serde(default)]
    pub keep_weekly: u32,
    /// The last of each of the newest N months.
    #[serde(default)]
    pub keep_monthly: u32,
    /// The last of each of the newest N years.
    #[serde(default)]
    pub keep_yearly: u32,
    /// Free the space of forgotten snapshots right away (restic prune, borg compact).
    #[serde(default = "yes")]
    pub prune: bool,
    /// Run `forget` as its own job on this schedule instead of after every backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

impl Retention {
    /// Whether any keep rule is set (an all-zero retention would delete everything).
    pub fn keeps_something(&self) -> bool {
        self.keep_last
            + self.keep_hourly
            + self.keep_daily
            + self.keep_weekly
            + self.keep_monthly
            + self.keep_yearly
            > 0
    }
}

/// A database whose "click-ops" state is dumped once per run and streamed to every
/// repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Database {
    /// An SQLite file, copied with the online backup API for a consistent snapshot.
    Sqlite {
        /// Name of the dump inside the snapshot (default: the file stem).
        name: String,
        /// Host path of the database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, dumped with `pg_dump -Fc`.
    Postgres {
        /// Name of the dump inside the snapshot (default: the database name).
        name: String,
        /// The database.
        database: String,
        /// Unix socket directory (host path), or…
        socket: Option<PathBuf>,
        /// …a TCP host.
        host: Option<String>,
        /// Port (default 5432).
        port: Option<u16>,
        /// Role to connect as (default `postgres`).
        user: String,
        /// Secret holding the role's password, if it needs one.
        password_secret: Option<String>,
        /// TLS for a TCP `host` (default: `verify-full` unless the host is loopback).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sslmode: Option<SslMode>,
        /// libpq 16+'s `require_auth` for a TCP `host` (default `scram-sha-256` when a
        /// password is sent; `""` sets nothing).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        require_auth: Option<String>,
    },
}

impl Database {
    /// The dump's name inside the snapshot.
    pub fn name(&self) -> &str {
        match self {
            Database::Sqlite { name, .. } | Database::Postgres { name, .. } => name,
        }
    }

    /// The dump's file name inside the snapshot.
    pub fn dump_file(&self) -> String {
        match self {
            Database::Sqlite { name, .. } => format!("{name}.sqlite3"),
            Database::Postgres { name, .. } => format!("{name}.pgdump"),
        }
    }
}

/// A validated backup policy for one service.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The service (the file stem).
    pub service: String,
    /// The file's text, for diagnostics.
    pub source: SourceFile,
    /// Host paths to back up.
    pub paths: Vec<PathBuf>,
    /// Host paths or globs to leave out.
    pub exclude: Vec<String>,
    /// Repositories to write to, by name.
    pub repositories: Vec<String>,
    /// When the nightly backup runs.
    pub schedule: Schedule,
    /// Units stopped during the snapshot and started again on every exit path.
    pub stop_units: Vec<String>,
    /// Shell commands run before the backup (a failure aborts the run).
    pub before: Vec<String>,
    /// Shell commands run after the backup, whatever its result.
    pub after: Vec<String>,
    /// Databases to dump.
    pub databases: Vec<Database>,
    /// How long to keep snapshots; `None` keeps everything.
    pub retention: Option<Retention>,
    /// When `[retention] schedule` separates forget/prune from the backup, its schedule.
    pub forget_schedule: Option<Schedule>,
}

impl Policy {
    /// Parses and validates one policy file against the configuration.
    pub fn parse(
        service: &str,
        source: SourceFile,
        config: &Config,
        rules: &Rules,
    ) -> Result<Policy, Diagnostics> {
        let raw: RawPolicy = toml::from_str(&source.text)
            .map_err(|e| Diagnostics(vec![from_toml_error(&source, &e)]))?;
        let mut diags = Diagnostics::default();
        // The name becomes directory names (the dumps directory, the state directory).
        if !valid_name(service) {
            diags.push(source.error(
                None,
                format!("service name `{service}` (the file name) may only hold letters, digits, `-`, `_`, `.`, and must not start with `.`"),
            ));
        }
        let mut paths = Vec::new();
        for p in &raw.paths {
            match host_path(p.get_ref()) {
                Ok(path) if Path::new(DUMPS_DIR).starts_with(&path) => diags.push(
                    source
                        .error(
                            Some(p.span()),
                            format!("path `{}` holds agex's dump directory {DUMPS_DIR}", p.get_ref()),
                        )
                        .with_help("name the directories below it instead: every snapshot already holds the dumps"),
                ),
                Ok(path) => paths.push(path),
                Err(why) => diags
                    .push(source.error(Some(p.span()), format!("path `{}`: {why}", p.get_ref()))),
            }
        }
        for e in &raw.exclude {
            if e.get_ref().trim().is_empty() {
                diags.push(source.error(Some(e.span()), "empty exclude pattern"));
            } else if let (true, Err(why)) = (e.get_ref().starts_with('/'), host_path(e.get_ref()))
            {
                diags.push(
                    source.error(Some(e.span()), format!("exclude `{}`: {why}", e.get_ref())),
                );
            } else if !e.get_ref().starts_with('/') {
                diags.push(
                    source
                        .error(
                            Some(e.span()),
                            format!("exclude `{}` is not an absolute host path", e.get_ref()),
                        )
                        .with_help("patterns match host paths: `/var/lib/app/cache`, or `/**/*.tmp` anywhere"),
                );
            }
        }
        let repositories = match &raw.repositories {
            None => config.repositories.keys().cloned().collect(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    diags.push(
                        source
                            .error(
                                Some(list.span()),
                                "`repositories = []`: a policy must write to at least one repository",
                            )
                            .with_help("list some, or remove the line to write to every repository"),
                    );
                }
                let mut out = Vec::new();
                for r in list.get_ref() {
                    if !config.repositories.contains_key(r.get_ref()) {
                        let mut d = source.error(
                            Some(r.span()),
                            format!("repository `{}` is not defined in agex.toml", r.get_ref()),
                        );
                        if let Some(best) = did_you_mean(
                            r.get_ref(),
                            config.repositories.keys().map(String::as_str),
                        ) {
                            d = d.with_help(format!("did you mean `{best}`?"));
                        }
                        diags.push(d);
                    } else if out.contains(r.get_ref()) {
                        diags.push(source.error(
                            Some(r.span()),
                            format!("repository `{}` is listed twice", r.get_ref()),
                        ));
                    } else {
                        out.push(r.get_ref().clone());
                    }
                }
                out
            }
        };
        if raw.repositories.is_none() && config.repositories.is_empty() {
            diags.push(source.error(
                None,
                "no repositories: define [repositories.NAME] in agex.toml",
            ));
        }
        let schedule = match &raw.schedule {
            None => DEFAULT_SCHEDULE
                .parse()
                .map_err(|e: crate::schedule::ScheduleError| {
                    Diagnostics(vec![source.error(None, e.to_string())])
                })?,
            Some(s) => match s.get_ref().parse::<Schedule>() {
                Ok(sch) => sch,
                Err(why) => {
                    diags.push(
                        source
                            .error(Some(s.span()), format!("schedule: {why}"))
                            .with_help("use systemd OnCalendar (\"*-*-* 03:00:00\", \"daily\") or cron (\"0 3 * * *\")"),
                    );
                    DEFAULT_SCHEDULE
                        .parse()
                        .map_err(|e: crate::schedule::ScheduleError| {
                            Diagnostics(vec![source.error(None, e.to_string())])
                        })?
                }
            },
        };
        let mut databases = Vec::new();
        let mut db_spans = Vec::new();
        for db in &raw.databases {
            let span = Some(db.span());
            db_spans.push(db.span());
            match db.get_ref() {
                RawDatabase::Sqlite { path, name } => match host_path(path) {
                    Ok(p) => {
                        let raw_name = name;
                        let name = name.clone().unwrap_or_else(|| {
                            p.file_stem()
                                .map_or("db".into(), |s| s.to_string_lossy().into_owned())
                        });
                        match check_dump_name(&name, raw_name.is_some()) {
                            Ok(()) => databases.push(Database::Sqlite { name, path: p }),
                            Err(why) => {
                                db_spans.pop();
                                diags.push(source.error(span, format!("sqlite: {why}")))
                            }
                        }
                    }
                    Err(why) => {
                        db_spans.pop();
                        diags.push(source.error(span, format!("sqlite path `{path}`: {why}")))
                    }
                },
                RawDatabase::Postgres {
                    database,
                    socket,
                    host,
                    port,
                    user,
                    password_secret,
                    name,
                    sslmode,
                    require_auth,
                } => {
                    if host.is_none() && (sslmode.is_some() || require_auth.is_some()) {
                        diags.push(source.error(
                            span.clone(),
                            "postgres: `sslmode` and `require_auth` apply to a TCP `host` only",
                        ));
                    }
                    if database.trim().is_empty() {
                        diags.push(source.error(span.clone(), "postgres: `database` is empty"));
                    }
                    if user.as_deref().is_some_and(|u| u.trim().is_empty()) {
                        diags.push(source.error(
                            span.clone(),
                            "postgres: `user` is empty (leave it out to connect as `postgres`)",
                        ));
                    }
                    if socket.is_some() && host.is_some() {
                        diags.push(
                            source
                                .error(span.clone(), "postgres: give `socket` or `host`, not both"),
                        );
                    }
                    let socket = match socket.as_deref().map(host_path).transpose() {
                        Ok(s) => s,
                        Err(why) => {
                            diags.push(
                                source.error(span.clone(), format!("postgres socket: {why}")),
                            );
                            None
                        }
                    };
                    if let Err(why) =
                        check_dump_name(name.as_deref().unwrap_or(database), name.is_some())
                    {
                        diags.push(source.error(span.clone(), format!("postgres: {why}")));
                    }
                    if let Some(secret) = password_secret {
                        if !rules.secrets.contains_key(secret) {
                            diags.push(source.error(
                                span.clone(),
                                format!("postgres: password_secret `{secret}` has no rule in secrets.toml"),
                            ));
                        }
                    }
                    databases.push(Database::Postgres {
                        name: name.clone().unwrap_or_else(|| database.clone()),
                        database: database.clone(),
                        socket: if host.is_none() && socket.is_none() {
                            Some(PathBuf::from("/run/postgresql"))
                        } else {
                            socket
                        },
                        host: host.clone(),
                        port: *port,
                        user: user.clone().unwrap_or_else(|| "postgres".into()),
                        password_secret: password_secret.clone(),
                        sslmode: *sslmode,
                        require_auth: require_auth.clone(),
                    });
                }
            }
        }
        let mut dump_names = BTreeMap::new();
        for (db, span) in databases.iter().zip(db_spans) {
            if dump_names.insert(db.dump_file(), ()).is_some() {
                diags.push(source.error(
                    Some(span),
                    format!(
                        "two databases dump to `{}`: give one a distinct `name`",
                        db.dump_file()
                    ),
                ));
            }
        }
        if paths.is_empty() && databases.is_empty() {
            diags.push(source.error(None, "nothing to back up: give `paths` or `[[databases]]`"));
        }
        if let Some(r) = &raw.retention {
            if !r.keeps_something() {
                diags.push(
                    source
                        .error(None, "[retention] keeps nothing: every snapshot would be forgotten")
                        .with_help("set at least one keep_* above 0, or remove [retention] to keep everything"),
                );
            }
        }
        let mut forget_schedule = None;
        if let Some(s) = raw.retention.as_ref().and_then(|r| r.schedule.as_ref()) {
            match s.get_ref().parse::<Schedule>() {
                Ok(sch) => forget_schedule = Some(sch),
                Err(why) => {
                    diags.push(source.error(Some(s.span()), format!("[retention] schedule: {why}")))
                }
            }
        }
        diags.into_result()?;
        Ok(Policy {
            service: service.to_string(),
            source,
            paths,
            exclude: raw.exclude.iter().map(|e| e.get_ref().clone()).collect(),
            repositories,
            schedule,
            stop_units: raw.stop_units,
            before: raw.before,
            after: raw.after,
            databases,
            retention: raw.retention,
            forget_schedule,
        })
    }
}

/// Why a database's dump name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpNameError {
    /// The `name` given is no file name.
    #[error("name `{0}` may only hold letters, digits, `-`, `_`, `.` and must not start with `.`")]
    Given(String),
    /// The name taken from the database or file is no file name.
    #[error("the dump would be named `{0}`, which is not a file name: give a `name` of letters, digits, `-`, `_`, `.`")]
    Derived(String),
}

/// A dump's name becomes a file name below the dumps directory: it passes the name check.
fn check_dump_name(name: &str, given: bool) -> Result<(), DumpNameError> {
    if valid_name(name) {
        return Ok(());
    }
    Err(if given {
        DumpNameError::Given(name.to_string())
    } else {
        DumpNameError::Derived(name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn setup() -> (Config, Rules) {
        let config = Config::parse(SourceFile::new(
            "agex.toml",
            format!(
                "[keys]\npaper = \"{X}\"\n[groups]\nrecovery = [\"paper\"]\n[repositories.r]\nkind = \"restic\"\nurl = \"/r\"\npassword_secret = \"pw\"\n[repositories.b]\nkind = \"borg\"\nurl = \"/b\"\npassword_secret = \"pw\"\n"
            ),
        ))
        .unwrap();
        let rules = Rules::parse(
            SourceFile::new(
                "secrets.toml",
                "[secrets.pw]\nrecipients = [\"recovery\"]\nbackup_password = true\n",
            ),
            &config,
        )
        .unwrap();
        (config, rules)
    }

    fn parse(text: &str) -> Result<Policy, Diagnostics> {
        let (c, r) = setup();
        Policy::parse(
            "immich",
            SourceFile::new("policies/immich.toml", text),
            &c,
            &r,
        )
    }

    #[test]
    fn defaults() {
        let p = parse("paths = [\"/var/lib/immich\"]\n[[databases]]\nkind = \"postgres\"\ndatabase = \"immich\"\n").unwrap();
        assert_eq!(p.repositories, vec!["b", "r"]);
        assert_eq!(p.schedule.on_calendar(), "*-*-* 03:00:00");
        assert_eq!(p.databases[0].dump_file(), "immich.pgdump");
    }

    #[test]
    fn errors_point_at_the_line() {
        let e = parse("paths = [\"/x\"]\nrepositories = [\"rr\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policies/immich.toml:2:") && e.contains("did you mean"),
            "{e}"
        );
        let e = parse("paths = [\"relative\"]\n").unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = parse("paths = [\"/x\"]\nschedule = \"*-*-* 27:00\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:12:") && e.contains("out of range"), "{e}");
        let e = parse("paths = [\"/x\"]\n[retention]\nkeep_daily = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keeps nothing"), "{e}");
        let e = parse("[[databases]]\nkind = \"mysql\"\ndatabase = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }
}
