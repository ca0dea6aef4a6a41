//! `secrets/secrets.toml`: one rule per secret, and templates rendered at activation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::Config;
use crate::diagnostic::{did_you_mean, from_toml_error, Diagnostics, SourceFile};
use crate::recipient::RecipientKey;
use crate::template::Template;

/// The group every backup password must be encrypted to.
pub const RECOVERY_GROUP: &str = "recovery";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    secrets: BTreeMap<Spanned<String>, RawRule>,
    #[serde(default)]
    templates: BTreeMap<Spanned<String>, RawTemplate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    file: Option<Spanned<String>>,
    recipients: Spanned<Vec<Spanned<String>>>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
    path: Option<Spanned<String>>,
    generator: Option<Spanned<Generator>>,
    #[serde(default)]
    backup_password: bool,
    #[serde(default)]
    armor: bool,
    #[serde(default)]
    restart: RestartAction,
    #[serde(default)]
    early: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    content: Spanned<String>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
    path: Option<Spanned<String>>,
    #[serde(default)]
    restart: RestartAction,
}

/// How to create a secret that has no file yet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Generator {
    /// A random password of `length` characters from `charset`.
    Password {
        /// Number of characters (default 32).
        #[serde(default = "default_password_length")]
        length: usize,
        /// Which characters to draw from.
        #[serde(default)]
        charset: Charset,
    },
    /// `bytes` random bytes, hex-encoded.
    Hex {
        /// Number of random bytes (default 32).
        #[serde(default = "default_hex_bytes")]
        bytes: usize,
    },
    /// An OpenSSH ed25519 private key (its public half goes to `<name>.pub`).
    SshEd25519,
    /// An age X25519 identity (its recipient goes to `<name>.pub`).
    AgeX25519,
}

fn default_password_length() -> usize {
    32
}

fn default_hex_bytes() -> usize {
    32
}

/// Character sets for generated passwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Charset {
    /// `A-Z a-z 0-9`: safe in URLs, env files and shells.
    #[default]
    Alphanumeric,
    /// Alphanumeric plus punctuation that needs no quoting in env files.
    Symbols,
    /// `0-9 a-f`.
    Hex,
}

/// What a unit does when a secret it uses changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartAction {
    /// `systemctl try-restart`.
    #[default]
    Restart,
    /// `systemctl reload`.
    Reload,
    /// Leave the unit alone.
    None,
}

/// Where, with which ownership, a file lands on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Owning user, by name.
    pub owner: String,
    /// Owning group, by name.
    pub group: String,
    /// Permission bits.
    pub mode: u32,
    /// Units that read it.
    pub services: Vec<String>,
    /// Extra host path to link to it.
    pub path: Option<PathBuf>,
    /// What to do with `services` when it changes.
    pub restart: RestartAction,
}

/// A validated rule for one secret.
#[derive(Debug, Clone)]
pub struct SecretRule {
    /// The secret's name (the table key).
    pub name: String,
    /// The encrypted file, relative to the config dir (`secrets/<name>.age`).
    pub file: PathBuf,
    /// Names as written in `recipients`.
    pub recipient_names: Vec<String>,
    /// Every key the file must be encrypted to, by member name.
    pub recipients: BTreeMap<String, RecipientKey>,
    /// Hosts that receive this secret at activation.
    pub hosts: BTreeSet<String>,
    /// Ownership and use on the host.
    pub placement: Placement,
    /// How to create it when missing.
    pub generator: Option<Generator>,
    /// This secret is a backup repository password.
    pub backup_password: bool,
    /// Write ASCII-armored age files.
    pub armor: bool,
    /// Needed before users exist: decrypted to the early directory, owned by root.
    pub early: bool,
}

/// A validated template.
#[derive(Debug, Clone)]
pub struct TemplateRule {
    /// Its name (the table key), also its file name on the host.
    pub name: String,
    /// The parsed content.
    pub template: Template,
    /// Ownership and use on the host.
    pub placement: Placement,
}

/// A validated `secrets.toml`.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The file's text, for diagnostics.
    pub source: SourceFile,
    /// Secrets by name.
    pub secrets: BTreeMap<String, SecretRule>,
    /// Templates by name.
    pub templates: BTreeMap<String, TemplateRule>,
}

impl Rules {
    /// Parses and validates `secrets.toml` against `config`.
    pub fn parse(source: SourceFile, config: &Config) -> Result<Rules, Diagnostics> {
        let raw: RawRules = toml::from_str(&source.text)
            .map_err(|e| Diagnostics(vec![from_toml_error(&source, &e)]))?;
        let mut diags = Diagnostics::default();
        let mut secrets = BTreeMap::new();
        let mut files: BTreeMap<PathBuf, String> = BTreeMap::new();

        for (name, raw_rule) in &raw.secrets {
            let name_s = name.get_ref().clone();
            if !valid_name(&name_s) {
                diags.push(source.error(
                    Some(name.span()),
                    format!(
                        "invalid secret name `{name_s}`: use letters, digits, `-`, `_` and `.`"
                    ),
                ));
                continue;
            }
            let file = match &raw_rule.file {
                Some(f) => match secret_file_path(f.get_ref()) {
                    Ok(p) => p,
                    Err(why) => {
                        diags.push(
                            source.error(Some(f.span()), format!("secret `{name_s}`: {why}")),
                        );
                        continue;
                    }
                },
                None => PathBuf::from("secrets").join(format!("{name_s}.age")),
            };
            if let Some(other) = files.insert(file.clone(), name_s.clone()) {
                diags.push(
                    source.error(
                        raw_rule
                            .file
                            .as_ref()
                            .map(|f| f.span())
                            .or(Some(name.span())),
                        format!(
                            "secrets `{other}` and `{name_s}` both use the file {}",
                            file.display()
                        ),
                    ),
                );
            }

            let mut recipients = BTreeMap::new();
            let mut hosts = BTreeSet::new();
            let mut names = Vec::new();
            if raw_rule.recipients.get_ref().is_empty() {
                diags.push(source.error(
                    Some(raw_rule.recipients.span()),
                    format!("secret `{name_s}` has no recipients: nobody could decrypt it"),
                ));
            }
            for r in raw_rule.recipients.get_ref() {
                let rn = r.get_ref();
                if config.kind_of(rn).is_none() {
                    let mut d = source.error(
                        Some(r.span()),
                        format!("secret `{name_s}`: recipient `{rn}` is not a key, group or host in agex.toml"),
                    );
                    if let Some(best) = did_you_mean(rn, config.all_names()) {
                        d = d.with_help(format!("did you mean `{best}`?"));
                    }
                    diags.push(d);
                    continue;
                }
                if names.contains(rn) {
                    diags.push(source.error(
                        Some(r.span()),
                        format!("secret `{name_s}` lists recipient `{rn}` twice"),
                    ));
                    continue;
                }
                names.push(rn.clone());
                recipients.extend(config.expand(rn));
                hosts.extend(config.hosts_in(rn));
            }

            if raw_rule.backup_password
                && !raw_rule
                    .recipients
                    .get_ref()
                    .iter()
                    .any(|r| r.get_ref() == RECOVERY_GROUP)
            {
                let d = source.error(
                    Some(raw_rule.recipients.span()),
                    format!(
                        "secret `{name_s}` is a backup password but is not encrypted to the `{RECOVERY_GROUP}` group: a lost host would take its backups with it"
                    ),
                );
                diags.push(if config.groups.contains_key(RECOVERY_GROUP) {
                    d.with_help(format!("add \"{RECOVERY_GROUP}\" to its recipients"))
                } else {
                    d.with_help(format!(
                        "define `{RECOVERY_GROUP} = [\"<offline key>\"]` under [groups] in agex.toml and add it to the recipients"
                    ))
                });
            }

            let placement = match placement(
                &source,
                &name_s,
                raw_rule.owner.as_ref(),
                raw_rule.group.as_ref(),
                raw_rule.mode.as_ref(),
                raw_rule.path.as_ref(),
                &raw_rule.services,
                raw_rule.restart,
                &mut diags,
            ) {
                Some(p) => p,
                None => continue,
            };
            if let Some(g) = &raw_rule.generator {
                if let Err(why) = check_generator(g.get_ref()) {
                    diags.push(source.error(Some(g.span()), format!("secret `{name_s}`: {why}")));
                }
            }
            secrets.insert(
                name_s.clone(),
                SecretRule {
                    name: name_s,
                    file,
                    recipient_names: names,
                    recipients,
                    hosts,
                    placement,
                    generator: raw_rule.generator.as_ref().map(|g| g.get_ref().clone()),
                    backup_password: raw_rule.backup_password,
                    armor: raw_rule.armor,
                    early: raw_rule.early,
                },
            );
        }

        let mut templates = BTreeMap::new();
        for (name, raw_t) in &raw.templates {
            let name_s = name.get_ref().clone();
            if !valid_name(&name_s) {
                diags.push(source.error(
                    Some(name.span()),
                    format!(
                        "invalid template name `{name_s}`: use letters, digits, `-`, `_` and `.`"
                    ),
                ));
                continue;
            }
            if raw.secrets.keys().any(|s| s.get_ref() == &name_s) {
                diags.push(source.error(
                    Some(name.span()),
                    format!("template `{name_s}` has the same name as a secret; file names on the host would clash"),
                ));
            }
            let template = match Template::parse(raw_t.content.get_ref()) {
                Ok(t) => t,
                Err(e) => {
                    let span = locate_in_value(
                        &source.text,
                        raw_t.content.span(),
                        raw_t.content.get_ref(),
                        e.offset,
                        e.len,
                    );
                    diags.push(source.error(Some(span), format!("template `{name_s}`: {e}")));
                    continue;
                }
            };
            for secret in template.secrets() {
                if !raw.secrets.keys().any(|s| s.get_ref() == secret) {
                    let at =
                        Template::find_placeholder(raw_t.content.get_ref(), secret).unwrap_or(0);
                    let span = locate_in_value(
                        &source.text,
                        raw_t.content.span(),
                        raw_t.content.get_ref(),
                        at,
                        secret.len() + 12,
                    );
                    let mut d = source.error(
                        Some(span),
                        format!("template `{name_s}` uses secret `{secret}`, which has no rule in secrets.toml"),
                    );
                    let known = raw.secrets.keys().map(|k| k.get_ref().as_str());
                    if let Some(best) = did_you_mean(secret, known) {
                        d = d.with_help(format!("did you mean `{best}`?"));
                    }
                    diags.push(d);
                }
            }
            let Some(placement) = placement(
                &source,
                &name_s,
                raw_t.owner.as_ref(),
                raw_t.group.as_ref(),
                raw_t.mode.as_ref(),
                raw_t.path.as_ref(),
                &raw_t.services,
                raw_t.restart,
                &mut diags,
            ) else {
                continue;
            };
            templates.insert(
                name_s.clone(),
                TemplateRule {
                    name: name_s,
                    template,
                    placement,
                },
            );
        }
        diags.into_result()?;
        Ok(Rules {
            source,
            secrets,
            templates,
        })
    }

    /// The rule whose file is `file` (relative to the config dir).
    pub fn by_file(&self, file: &Path) -> Option<&SecretRule> {
        self.secrets.values().find(|r| r.file == file)
    }
}

use crate::names::{host_path, valid_name, valid_unit_name};

/// Why a value of a secret's rule was refused; the message follows the secret's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A `file` outside `secrets/`.
    #[error("file `{file}` is outside secrets/: give a path inside the secrets directory, like `{suggest}`")]
    FileOutside {
        /// The file given.
        file: String,
        /// Its file name, as a path that would do.
        suggest: String,
    },
    /// A `file` without `.age`.
    #[error("file `{0}` must end in `.age`")]
    FileExtension(String),
    /// A mode that is not octal.
    #[error("mode `{0}` is not an octal mode like \"0400\"")]
    ModeNotOctal(String),
    /// A mode with setuid, setgid or sticky bits.
    #[error("mode `{0}` sets setuid/setgid/sticky bits, which a secret never needs")]
    ModeSpecial(String),
    /// A group- or world-writable mode.
    #[error(
        "mode `{0}` is group- or world-writable; secrets are read-only for others (e.g. \"0440\")"
    )]
    ModeWritable(String),
    /// A mode the owner cannot read.
    #[error("mode `{0}` does not let the owner read the file")]
    ModeUnreadable(String),
    /// A generated password's length out of range.
    #[error("generator password length {0} is out of range (8 to 4096)")]
    PasswordLength(usize),
    /// A generated hex secret's size out of range.
    #[error("generator hex bytes {0} is out of range (8 to 4096)")]
    HexBytes(usize),
}

/// The `file` of a rule must stay inside `secrets/`.
fn secret_file_path(file: &str) -> Result<PathBuf, RuleError> {
    let p = Path::new(file);
    let rel = p.strip_prefix("secrets").unwrap_or(p);
    let clean =
        rel.components().all(|c| matches!(c, Component::Normal(_))) && rel.components().count() > 0;
    if p.is_absolute() || !clean {
        return Err(RuleError::FileOutside {
            file: file.to_string(),
            suggest: p
                .file_name()
                .map_or("name.age".into(), |n| n.to_string_lossy().into_owned()),
        });
    }
    if rel.extension().and_then(|e| e.to_str()) != Some("age") {
        return Err(RuleError::FileExtension(file.to_string()));
    }
    Ok(PathBuf::from("secrets").join(rel))
}

#[allow(clippy::too_many_arguments)]
fn placement(
    source: &SourceFile,
    name: &str,
    owner: Option<&Spanned<String>>,
    group: Option<&Spanned<String>>,
    mode: Option<&Spanned<String>>,
    path: Option<&Spanned<String>>,
    services: &[Spanned<String>],
    restart: RestartAction,
    diags: &mut Diagnostics,
) -> Option<Placement> {
    let before = diags.0.len();
    for (what, v) in [("owner", owner), ("group", group)] {
        if let Some(v) = v {
            let s = v.get_ref();
            if s.trim().is_empty() || s.chars().any(|c| c.is_whitespace() || c == ':' || c == '/') {
                let why = if s.trim().is_empty() {
                    format!("`{name}`: {what} is empty")
                } else {
                    format!("`{name}`: {what} `{s}` is not a user/group name")
                };
                diags.push(
                    source
                        .error(Some(v.span()), why)
                        .with_help(format!("give the {what} by name, e.g. {what} = \"root\"")),
                );
            }
        }
    }
    let mode_bits = match mode {
        None => 0o400,
        Some(m) => match parse_mode(m.get_ref()) {
            Ok(bits) => bits,
            Err(why) => {
                diags.push(source.error(Some(m.span()), format!("`{name}`: {why}")));
                0
            }
        },
    };
    if let Some(p) = path {
        if let Err(why) = host_path(p.get_ref()) {
            diags.push(source.error(
                Some(p.span()),
                format!("`{name}`: path `{}`: {why}", p.get_ref()),
            ));
        }
    }
    for s in services {
        if !valid_unit_name(s.get_ref()) {
            diags.push(
                source
                    .error(
                        Some(s.span()),
                        format!("`{name}`: service `{}` is not a unit name", s.get_ref()),
                    )
                    .with_help(
                        "give systemd unit names, e.g. services = [\"immich-server.service\"]",
                    ),
            );
        }
    }
    if diags.0.len() > before {
        return None;
    }
    let owner = owner.map_or("root".to_string(), |o| o.get_ref().clone());
    let group = group.map_or_else(|| owner.clone(), |g| g.get_ref().clone());
    Some(Placement {
        owner,
        group,
        mode: mode_bits,
        services: services.iter().map(|s| s.get_ref().clone()).collect(),
        path: path.map(|p| PathBuf::from(p.get_ref())),
        restart,
    })
}

/// Parses an octal mode string; refuses group- or world-writable modes.
pub fn parse_mode(s: &str) -> Result<u32, RuleError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let not_octal = || RuleError::ModeNotOctal(s.to_string());
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(not_octal());
    }
    let bits = u32::from_str_radix(digits, 8).map_err(|_| not_octal())?;
    if bits & 0o7000 != 0 {
        return Err(RuleError::ModeSpecial(s.to_string()));
    }
    if bits & 0o022 != 0 {
        return Err(RuleError::ModeWritable(s.to_string()));
    }
    if bits & 0o400 == 0 {
        return Err(RuleError::ModeUnreadable(s.to_string()));
    }
    Ok(bits)
}

fn check_generator(g: &Generator) -> Result<(), RuleError> {
    match g {
        Generator::Password { length, .. } if !(8..=4096).contains(length) => {
            Err(RuleError::PasswordLength(*length))
        }
        Generator::Hex { bytes } if !(8..=4096).contains(bytes) => Err(RuleError::HexBytes(*bytes)),
        _ => Ok(()),
    }
}

/// Maps an offset inside a string value to a span of the source file, by finding the
/// same text in the raw source (escapes make exact mapping impossible in general).
fn locate_in_value(
    source: &str,
    value_span: std::ops::Range<usize>,
    value: &str,
    offset: usize,
    len: usize,
) -> std::ops::Range<usize> {
    let end = (offset + len).min(value.len());
    let needle = value.get(offset..end).unwrap_or_default();
    let raw = source.get(value_span.clone()).unwrap_or_default();
    match (!needle.is_empty()).then(|| raw.find(needle)).flatten() {
        Some(i) => value_span.start + i..value_span.start + i + needle.len(),
        None => value_span,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn config() -> Config {
        Config::parse(SourceFile::new(
            "agex.toml",
            format!("[keys]\nalice = \"{X}\"\npaper = \"{X}\"\n[groups]\nadmins = [\"alice\"]\nrecovery = [\"paper\"]\n[hosts.bunk]\nkey = \"{X}\"\n"),
        ))
        .unwrap()
    }

    fn parse(text: &str) -> Result<Rules, Diagnostics> {
        Rules::parse(SourceFile::new("secrets/secrets.toml", text), &config())
    }

    #[test]
    fn defaults_and_hosts() {
        let r = parse(
            "[secrets.db]\nrecipients = [\"admins\", \"bunk\"]\nservices = [\"a.service\"]\n",
        )
        .unwrap();
        let db = &r.secrets["db"];
        assert_eq!(db.file, PathBuf::from("secrets/db.age"));
        assert_eq!(db.placement.mode, 0o400);
        assert_eq!(db.placement.owner, "root");
        assert!(db.hosts.contains("bunk"));
        assert_eq!(db.recipients.len(), 2);
    }

    #[test]
    fn mode_checks() {
        assert_eq!(parse_mode("0440"), Ok(0o440));
        assert!(parse_mode("0777")
            .unwrap_err()
            .to_string()
            .contains("writable"));
        assert!(parse_mode("abc").unwrap_err().to_string().contains("octal"));
        assert!(parse_mode("0200").unwrap_err().to_string().contains("read"));
    }

    #[test]
    fn file_outside_secrets_is_refused() {
        let e =
            parse("[secrets.db]\nfile = \"../db.age\"\nrecipients = [\"admins\"]\n").unwrap_err();
        assert!(e.to_string().contains("outside secrets/"), "{e}");
        assert!(e.to_string().contains(":2:8:"), "{e}");
    }

    #[test]
    fn backup_password_must_reach_recovery() {
        let e =
            parse("[secrets.pw]\nrecipients = [\"admins\"]\nbackup_password = true\n").unwrap_err();
        assert!(e.to_string().contains("recovery"), "{e}");
        parse("[secrets.pw]\nrecipients = [\"admins\", \"recovery\"]\nbackup_password = true\n")
            .unwrap();
    }

    #[test]
    fn template_unknown_secret_points_at_line() {
        let text = "[secrets.a]\nrecipients = [\"admins\"]\n[templates.\"x.env\"]\ncontent = \"\"\"\nA={{ secret \"a\" }}\nB={{ secret \"nope\" }}\n\"\"\"\n";
        let e = parse(text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains(":6:3:"), "{shown}");
        assert!(shown.contains("`nope`"), "{shown}");
    }

    #[test]
    fn unknown_recipient_suggests() {
        let e = parse("[secrets.a]\nrecipients = [\"admin\"]\n").unwrap_err();
        assert!(e.to_string().contains("did you mean `admins`"), "{e}");
    }
}
