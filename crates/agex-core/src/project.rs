//! A loaded, cross-validated configuration directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::diagnostic::{Diagnostics, SourceFile};
use crate::error::ConfigError;
use crate::lock::Lock;
use crate::policy::Policy;
use crate::rules::Rules;

/// The file name that marks a configuration directory.
pub const CONFIG_FILE: &str = "agex.toml";
/// The rules file, relative to the config dir.
pub const RULES_FILE: &str = "secrets/secrets.toml";
/// The lock file, relative to the config dir.
pub const LOCK_FILE: &str = "secrets/secrets.lock";
/// The secrets directory, relative to the config dir.
pub const SECRETS_DIR: &str = "secrets";
/// The backup policies directory, relative to the config dir.
pub const POLICIES_DIR: &str = "policies";

/// A configuration directory whose files all parsed and agree with each other.
#[derive(Debug, Clone)]
pub struct Project {
    /// The directory holding `agex.toml`.
    pub dir: PathBuf,
    /// `agex.toml`.
    pub config: Config,
    /// `secrets/secrets.toml`.
    pub rules: Rules,
    /// `secrets/secrets.lock` (empty if absent).
    pub lock: Lock,
    /// `policies/<service>.toml` by service name.
    pub policies: BTreeMap<String, Policy>,
    /// The working directory when loaded: paths below it are shown relative to it.
    pub cwd: Option<PathBuf>,
}

impl Project {
    /// The nearest directory at or above `start` that holds `agex.toml`.
    pub fn discover(start: &Path) -> Result<PathBuf, ConfigError> {
        let abs = if start.is_absolute() {
            start.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|source| ConfigError::Io {
                    path: start.to_path_buf(),
                    source,
                })?
                .join(start)
                // Drops the `.` of `cwd/.`, so messages show a plain path.
                .components()
                .collect()
        };
        abs.ancestors()
            .find(|d| d.join(CONFIG_FILE).is_file())
            .map(Path::to_path_buf)
            .ok_or(ConfigError::NotFound { start: abs })
    }

    /// Loads and validates the configuration in `dir`.
    pub fn load(dir: &Path) -> Result<Project, ConfigError> {
        // The lock does not depend on the rest: it parses on its own thread (with a
        // thousand secrets, each file takes a few milliseconds).
        let (parsed, lock) = std::thread::scope(|scope| {
            let lock = scope.spawn(|| load_lock(dir));
            let parsed = load_config_and_rules(dir);
            let lock = lock.join().unwrap_or_else(|_| {
                Err(ConfigError::Io {
                    path: dir.join(LOCK_FILE),
                    source: std::io::Error::other("the lock file parser panicked"),
                })
            });
            (parsed, lock)
        });
        let (config, rules) = parsed?;
        let lock = lock?;
        let policies = read_policies(dir)?;
        Project::validate(dir, config, rules, lock, policies)
    }

    /// Parses and cross-validates configuration texts already read: what [`Project::load`]
    /// does once the files are in memory (the fuzz target `config` drives this).
    #[doc(hidden)]
    pub fn from_sources(
        dir: &Path,
        config: SourceFile,
        rules: SourceFile,
        lock: Option<SourceFile>,
        policies: Vec<(String, SourceFile)>,
    ) -> Result<Project, ConfigError> {
        let config = Config::parse(config).map_err(ConfigError::Invalid)?;
        let rules = Rules::parse(rules, &config).map_err(ConfigError::Invalid)?;
        let lock = match lock {
            Some(source) => Lock::parse(&source).map_err(ConfigError::Invalid)?,
            None => Lock::new(),
        };
        Project::validate(dir, config, rules, lock, policies)
    }

    fn validate(
        dir: &Path,
        config: Config,
        rules: Rules,
        lock: Lock,
        policies: Vec<(String, SourceFile)>,
    ) -> Result<Project, ConfigError> {
        check_repositories(&config, &rules).map_err(ConfigError::Invalid)?;
        let policies = parse_policies(policies, &config, &rules)?;
        check_notify(&config, &rules, &policies).map_err(ConfigError::Invalid)?;
        Ok(Project {
            dir: dir.to_path_buf(),
            config,
            rules,
            lock,
            policies,
            cwd: std::env::current_dir().ok(),
        })
    }

    /// Every job name `[notify.jobs.NAME]` may use: `backup-<service>`,
    /// `forget-<service>` (when its retention has a schedule), `check-<repo>`, `drill`,
    /// and the runs over everything (`backup`, `check`, `overdue`).
    pub fn job_names(&self) -> Vec<String> {
        job_names(&self.config, &self.policies)
    }

    /// A path relative to the config dir, made absolute.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }

    /// A path as it should be shown to the user (relative to the working directory when
    /// the config dir is below it).
    pub fn display(&self, rel: impl AsRef<Path>) -> PathBuf {
        PathBuf::from(shown(&self.dir, rel.as_ref(), self.cwd.as_deref()))
    }
}

fn load_config_and_rules(dir: &Path) -> Result<(Config, Rules), ConfigError> {
    let config = Config::parse(read_source(dir, CONFIG_FILE)?).map_err(ConfigError::Invalid)?;
    let rules_source = if dir.join(RULES_FILE).exists() {
        read_source(dir, RULES_FILE)?
    } else {
        SourceFile::new(display_path(dir, RULES_FILE), "")
    };
    let rules = Rules::parse(rules_source, &config).map_err(ConfigError::Invalid)?;
    Ok((config, rules))
}

fn load_lock(dir: &Path) -> Result<Lock, ConfigError> {
    if dir.join(LOCK_FILE).exists() {
        Lock::parse(&read_source(dir, LOCK_FILE)?).map_err(ConfigError::Invalid)
    } else {
        Ok(Lock::new())
    }
}

fn display_path(dir: &Path, rel: impl AsRef<Path>) -> String {
    shown(dir, rel.as_ref(), std::env::current_dir().ok().as_deref())
}

fn shown(dir: &Path, rel: &Path, cwd: Option<&Path>) -> String {
    let full = dir.join(rel);
    let shown = cwd
        .and_then(|cwd| full.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or(full);
    shown.display().to_string()
}

/// Every `policies/*.toml`, read (sorted by service name).
fn read_policies(dir: &Path) -> Result<Vec<(String, SourceFile)>, ConfigError> {
    let pdir = dir.join(POLICIES_DIR);
    let mut names: Vec<String> = match fs::read_dir(&pdir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".toml").map(str::to_string)
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(ConfigError::Io { path: pdir, source }),
    };
    names.sort();
    names
        .into_iter()
        .map(|service| {
            let source = read_source(dir, &format!("{POLICIES_DIR}/{service}.toml"))?;
            Ok((service, source))
        })
        .collect()
}

/// Every policy, validated; all problems are reported together.
fn parse_policies(
    sources: Vec<(String, SourceFile)>,
    config: &Config,
    rules: &Rules,
) -> Result<BTreeMap<String, Policy>, ConfigError> {
    let mut policies = BTreeMap::new();
    let mut diags = Diagnostics::default();
    for (service, source) in sources {
        match Policy::parse(&service, source, config, rules) {
            Ok(p) => {
                policies.insert(service, p);
            }
            Err(d) => diags.0.extend(d.0),
        }
    }
    diags.into_result().map_err(ConfigError::Invalid)?;
    Ok(policies)
}

fn read_source(dir: &Path, rel: &str) -> Result<SourceFile, ConfigError> {
    let bytes = fs::read(dir.join(rel)).map_err(|source| ConfigError::Io {
        path: PathBuf::from(display_path(dir, rel)),
        source,
    })?;
    SourceFile::decode(display_path(dir, rel), bytes).map_err(ConfigError::Invalid)
}

/// Repository password and ssh key secrets must exist; passwords must be marked
/// `backup_password` so `check` proves the recovery key can open them.
fn check_repositories(config: &Config, rules: &Rules) -> Result<(), Diagnostics> {
    let mut diags = Diagnostics::default();
    for repo in config.repositories.values() {
        let pw = &repo.password_secret;
        match rules.secrets.get(pw.get_ref()) {
            None => diags.push(config.source.error(
                Some(pw.span()),
                format!(
                    "repository `{}`: password_secret `{}` has no rule in secrets.toml",
                    repo.name,
                    pw.get_ref()
                ),
            )),
            Some(rule) if !rule.backup_password => diags.push(
                config
                    .source
                    .error(
                        Some(pw.span()),
                        format!(
                            "repository `{}`: secret `{}` holds a repository password but is not marked `backup_password = true`",
                            repo.name,
                            pw.get_ref()
                        ),
                    )
                    .with_help("mark it, so `agex check` proves the recovery key can open the backups"),
            ),
            Some(_) => {}
        }
        if let Some(env) = &repo.env_secret {
            match rules.secrets.get(env.get_ref()) {
                None => diags.push(config.source.error(
                    Some(env.span()),
                    format!(
                        "repository `{}`: env_secret `{}` has no rule in secrets.toml",
                        repo.name,
                        env.get_ref()
                    ),
                )),
                // A recovery without this host needs the backend's credentials as much
                // as the password.
                Some(rule) if !rule.backup_password => diags.push(
                    config
                        .source
                        .error(
                            Some(env.span()),
                            format!(
                                "repository `{}`: secret `{}` holds the repository's credentials but is not marked `backup_password = true`",
                                repo.name,
                                env.get_ref()
                            ),
                        )
                        .with_help("mark it, so `agex check` proves the recovery key can open it"),
                ),
                Some(_) => {}
            }
        }
        if let Some(k) = &repo.ssh_key_secret {
            if !rules.secrets.contains_key(k.get_ref()) {
                diags.push(config.source.error(
                    Some(k.span()),
                    format!(
                        "repository `{}`: ssh_key_secret `{}` has no rule in secrets.toml",
                        repo.name,
                        k.get_ref()
                    ),
                ));
            }
        }
    }
    diags.into_result()
}

fn job_names(config: &Config, policies: &BTreeMap<String, Policy>) -> Vec<String> {
    let mut out = vec!["backup".to_string(), "check".into(), "drill".into()];
    out.push("overdue".into());
    for (s, p) in policies {
        out.push(format!("backup-{s}"));
        if p.forget_schedule.is_some() {
            out.push(format!("forget-{s}"));
        }
    }
    for r in config.repositories.keys() {
        out.push(format!("check-{r}"));
    }
    out
}

/// `[notify.jobs.NAME]` must name a job, and `secret:NAME` targets a secret with a rule.
fn check_notify(
    config: &Config,
    rules: &Rules,
    policies: &BTreeMap<String, Policy>,
) -> Result<(), Diagnostics> {
    let mut diags = Diagnostics::default();
    let names = job_names(config, policies);
    for job in config.notify.jobs.keys() {
        if !names.contains(job.get_ref()) {
            let mut d = config.source.error(
                Some(job.span()),
                format!(
                    "[notify.jobs] `{}` is not a job of this configuration",
                    job.get_ref()
                ),
            );
            d = match crate::diagnostic::did_you_mean(
                job.get_ref(),
                names.iter().map(String::as_str),
            ) {
                Some(best) => d.with_help(format!("did you mean `{best}`?")),
                None => d.with_help(format!("jobs: {}", names.join(", "))),
            };
            diags.push(d);
        }
    }
    for (what, v) in config.notify.all_urls() {
        if let Some(name) = v.get_ref().strip_prefix("secret:") {
            if !rules.secrets.contains_key(name) {
                diags.push(config.source.error(
                    Some(v.span()),
                    format!("[notify] {what}: secret `{name}` has no rule in secrets.toml"),
                ));
            }
        }
    }
    diags.into_result()
}
