//! `agex init`: the skeleton of a new configuration directory.

use std::fs;
use std::path::{Path, PathBuf};

use agex_core::project::{CONFIG_FILE, LOCK_FILE, RULES_FILE};
use agex_core::{Lock, RecipientKey};

use crate::error::SecretsError;

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct InitOutcome {
    /// Files and directories created, relative to the target dir.
    pub created: Vec<PathBuf>,
    /// The admin key put into `agex.toml`, if one was found or given.
    pub admin_key: Option<(String, RecipientKey)>,
}

/// A policy to copy: one service's paths and databases, where they go, how long kept.
/// Named `.disabled` so it is not read until the user renames it to `<service>.toml`.
const POLICY_EXAMPLE: &str = "\
# A backup policy: rename to policies/<service>.toml (e.g. vikunja.toml) to enable it.
repositories = [\"offsite-restic\", \"offsite-borg\"]   # names from [repositories.*] in agex.toml
paths        = [\"/var/lib/vikunja/files\"]
exclude      = [\"/var/lib/vikunja/files/cache\"]
schedule     = \"*-*-* 03:10:00\"                     # systemd OnCalendar; `daily` works too
stop_units   = []                                    # units stopped while it is backed up (none: live)

[[databases]]
kind = \"sqlite\"
path = \"/var/lib/vikunja/vikunja.db\"

# [[databases]]
# kind     = \"postgres\"
# database = \"vikunja\"
# socket   = \"/run/postgresql\"
# user     = \"postgres\"

[retention]
keep_daily   = 7
keep_weekly  = 4
keep_monthly = 6
";

/// Writes `agex.toml`, `secrets/secrets.toml`, `secrets/secrets.lock` and `policies/`
/// into `dir`. Refuses if `agex.toml` already exists. `admin` is the first admin key.
pub fn init(
    dir: &Path,
    admin: Option<(String, RecipientKey)>,
) -> Result<InitOutcome, SecretsError> {
    let config = dir.join(CONFIG_FILE);
    if config.exists() {
        return Err(SecretsError::AlreadyInitialised { path: config });
    }
    let keys = match &admin {
        Some((name, key)) => format!("{name} = \"{key}\"\n"),
        None => "# alice = \"age1...\"                       # age-keygen -y ~/.config/agex/identities\n".into(),
    };
    let admins = match &admin {
        Some((name, _)) => format!("admins   = [\"{name}\"]\n"),
        None => "# admins   = [\"alice\"]\n".into(),
    };
    let agex_toml = format!(
        "# agex configuration: who can decrypt what, which hosts receive secrets, where backups go.\n\
         \n[keys]                     # anything age encrypts to: age1..., ssh-ed25519 ..., ssh-rsa ..., plugins\n{keys}\
         # paper = \"age1...\"        # an offline recovery key, kept on paper\n\
         \n[groups]\n{admins}# recovery = [\"paper\"]\n\
         \n# [hosts.myhost]\n# key      = \"ssh-ed25519 AAAA... root@myhost\"   # ssh-keyscan -t ed25519 myhost\n\
         # identity = \"/etc/ssh/ssh_host_ed25519_key\"\n\
         \n# Backups go to two independent repositories; each has its password in a secret.\n\
         # [repositories.offsite-restic]\n\
         # kind            = \"restic\"\n\
         # url             = \"s3:https://s3.eu-central-003.backblazeb2.com/my-bucket/restic\"   # or sftp:user@host:/path, rest:…, /local/path\n\
         # password_secret = \"restic-password\"\n\
         # env_secret      = \"b2-credentials\"   # AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines\n\
         #\n\
         # [repositories.offsite-borg]\n\
         # kind            = \"borg\"\n\
         # url             = \"ssh://u123@u123.your-storagebox.de:23/./borg\"\n\
         # password_secret = \"borg-passphrase\"\n\
         # ssh_key_secret  = \"borg-ssh-key\"     # then pin the server: agex repo trust offsite-borg\n\
         \n[activation]\nkeep = 5\n"
    );
    let rules = "# One table per secret. The file defaults to secrets/<name>.age.\n\
                 #\n# [secrets.db-password]\n# recipients = [\"admins\", \"myhost\"]\n# owner      = \"postgres\"\n\
                 # mode       = \"0400\"\n# services   = [\"postgresql.service\"]\n\
                 # generator  = { kind = \"password\", length = 32 }\n";
    let mut created = Vec::new();
    fs::create_dir_all(dir.join("secrets")).map_err(SecretsError::io(dir.join("secrets")))?;
    fs::create_dir_all(dir.join("policies")).map_err(SecretsError::io(dir.join("policies")))?;
    created.push(PathBuf::from("policies/"));
    let mut write = |rel: &str, text: &str| -> Result<(), SecretsError> {
        let path = dir.join(rel);
        if !path.exists() {
            agex_core::atomic::write_new_atomic(&path, text.as_bytes(), 0o644)
                .map_err(SecretsError::io(&path))?;
            created.push(PathBuf::from(rel));
        }
        Ok(())
    };
    write(RULES_FILE, rules)?;
    write("policies/example.toml.disabled", POLICY_EXAMPLE)?;
    let lock = Lock::new()
        .to_toml()
        .map_err(SecretsError::io(PathBuf::from(LOCK_FILE)))?;
    write(LOCK_FILE, &lock)?;
    write(CONFIG_FILE, &agex_toml)?;
    Ok(InitOutcome {
        created,
        admin_key: admin,
    })
}
