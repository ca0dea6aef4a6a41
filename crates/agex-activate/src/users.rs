//! Owner and group names to ids.
//!
//! On the real host (root `/`) names go through NSS (`getpwnam_r`/`getgrnam_r`), so LDAP,
//! systemd-userdb and friends work. Below another root the host's own database is
//! `<root>/etc/passwd` and `<root>/etc/group` when that root has them (an image or a
//! chroot being prepared); a root without `etc/passwd` (a test's scratch root) falls back
//! to this machine's NSS.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::ActivateError;
use crate::layout::Layout;

/// Where names are looked up.
#[derive(Debug, Clone)]
pub enum UserDb {
    /// This machine's NSS.
    Nss,
    /// `passwd` and `group` files of another root.
    Files {
        /// The passwd file, for messages.
        passwd: PathBuf,
        /// The group file, for messages.
        group: PathBuf,
        /// User name → uid.
        users: BTreeMap<String, u32>,
        /// Group name → gid.
        groups: BTreeMap<String, u32>,
    },
}

impl UserDb {
    /// The user database for `layout`'s root (see the module docs).
    pub fn for_layout(layout: &Layout) -> Result<UserDb, ActivateError> {
        if layout.is_host_root() {
            return Ok(UserDb::Nss);
        }
        let passwd = layout.host_path(Path::new("/etc/passwd"));
        if !passwd.exists() {
            return Ok(UserDb::Nss);
        }
        let group = layout.host_path(Path::new("/etc/group"));
        let users = parse_db(&passwd, true)?;
        let groups = if group.exists() {
            parse_db(&group, false)?
        } else {
            BTreeMap::new()
        };
        Ok(UserDb::Files {
            passwd,
            group,
            users,
            groups,
        })
    }

    /// What is asked, for messages.
    pub fn describe(&self) -> String {
        match self {
            UserDb::Nss => "this machine's user database (NSS)".into(),
            UserDb::Files { passwd, group, .. } => {
                format!("{} and {}", passwd.display(), group.display())
            }
        }
    }

    /// The uid of a user name, if it exists.
    pub fn uid(&self, name: &str) -> Result<Option<u32>, ActivateError> {
        match self {
            UserDb::Nss => agex_core::users::user_id(name).map_err(|e| self.failed(e)),
            UserDb::Files { users, .. } => Ok(users.get(name).copied()),
        }
    }

    /// The gid of a group name, if it exists.
    pub fn gid(&self, name: &str) -> Result<Option<u32>, ActivateError> {
        match self {
            UserDb::Nss => agex_core::users::group_id(name).map_err(|e| self.failed(e)),
            UserDb::Files { groups, .. } => Ok(groups.get(name).copied()),
        }
    }

    fn failed(&self, e: std::io::Error) -> ActivateError {
        ActivateError::UserDatabase {
            database: self.describe(),
            reason: e.to_string(),
        }
    }
}

fn parse_db(path: &Path, passwd: bool) -> Result<BTreeMap<String, u32>, ActivateError> {
    let text = fs::read_to_string(path).map_err(ActivateError::io(path))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let min = if passwd { 7 } else { 4 };
        let id = fields.get(2).and_then(|f| f.parse::<u32>().ok());
        match (fields.len() >= min, id) {
            (true, Some(id)) => {
                out.entry(fields[0].to_string()).or_insert(id);
            }
            _ => {
                return Err(ActivateError::UserDatabase {
                    database: path.display().to_string(),
                    reason: format!("line {}: not a {} line", i + 1, path.display()),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nimmich:x:1001:1001::/var/lib/immich:/usr/sbin/nologin\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nsmtp-users:x:2000:immich\n",
        )
        .unwrap();
        let db = UserDb::for_layout(&Layout::new(dir.path())).unwrap();
        assert_eq!(db.uid("immich").unwrap(), Some(1001));
        assert_eq!(db.uid("nobody-here").unwrap(), None);
        assert_eq!(db.gid("smtp-users").unwrap(), Some(2000));
    }

    #[test]
    fn nss_knows_root() {
        assert_eq!(agex_core::users::user_id("root").unwrap(), Some(0));
        assert_eq!(
            agex_core::users::user_id("agex-no-such-user-x").unwrap(),
            None
        );
    }
}
