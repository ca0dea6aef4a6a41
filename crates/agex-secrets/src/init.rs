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

/// Writes `agex.toml`, `secrets/secrets.toml`, `secrets/secrets.lock` and `policies/`
/// into `dir`. Refuses if `agex.toml` already exists. `admin` is the first admin key.
pub fn init(
    dir: &Path,
    admin: Option<(String, RecipientKey)>,
) -> Result<InitOutcome, SecretsError> {
    let config = dir.join(CONFIG_FILE);
    if config.exists() {
        return Err(SecretsError::Invalid {
            name: config.display().to_string(),
            reason: "already exists; agex init never overwrites a configuration".into(),
        });
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
