//! `agex repo trust R`: asks a repository's ssh server for its host keys and pins them
//! in agex.toml (`known_hosts`), with its comments and layout kept, so ssh can check
//! the server strictly on every run without the user's `~/.ssh/known_hosts`.

use std::os::unix::fs::PermissionsExt;

use agex_core::Project;

use crate::error::BackupError;
use crate::ssh::{self, ScannedKey};

/// What trusting a repository's server would change.
#[derive(Debug, Clone)]
pub struct TrustPlan {
    /// The repository.
    pub repo: String,
    /// The server as known_hosts names it.
    pub server: String,
    /// The keys the server sent, with fingerprints.
    pub keys: Vec<ScannedKey>,
    /// The pinned lines agex.toml holds now.
    pub pinned_before: Vec<String>,
    /// agex.toml's text afterwards.
    pub config_text: String,
}

impl TrustPlan {
    /// Whether agex.toml already pins exactly these keys.
    pub fn unchanged(&self) -> bool {
        let mut now: Vec<&str> = self.pinned_before.iter().map(String::as_str).collect();
        let mut new: Vec<&str> = self.keys.iter().map(|k| k.line.as_str()).collect();
        now.sort_unstable();
        new.sort_unstable();
        now == new
    }
}

/// Scans the server of repository `name` and plans the new agex.toml.
pub fn plan(project: &Project, name: &str) -> Result<TrustPlan, BackupError> {
    let repo = crate::access::repository(project, name)?;
    let Some(endpoint) = repo.location.ssh() else {
        return Err(BackupError::Usage(format!(
            "repository `{name}` is not reached over ssh ({} URL): there is no host key to trust",
            repo.location.scheme()
        )));
    };
    let keys = ssh::scan(endpoint)?;
    let lines: Vec<String> = keys.iter().map(|k| k.line.clone()).collect();
    let config_text = set_known_hosts(&project.config.source.text, name, &lines)?;
    Ok(TrustPlan {
        repo: name.to_string(),
        server: endpoint.known_hosts_name(),
        keys,
        pinned_before: repo.known_hosts.clone(),
        config_text,
    })
}

/// Writes the planned agex.toml atomically.
pub fn execute(project: &Project, plan: &TrustPlan) -> Result<(), BackupError> {
    let path = project.path(agex_core::project::CONFIG_FILE);
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    agex_core::atomic::write_atomic(&path, plan.config_text.as_bytes(), mode)
        .map_err(BackupError::io(&path))
}

/// `text` with `[repositories.NAME] known_hosts` set to `lines`; everything else,
/// comments included, stays as it was.
pub fn set_known_hosts(text: &str, name: &str, lines: &[String]) -> Result<String, BackupError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| BackupError::Usage(format!("agex.toml does not parse: {e}")))?;
    let entry = doc
        .get_mut("repositories")
        .and_then(|r| r.as_table_like_mut())
        .and_then(|r| r.get_mut(name))
        .and_then(|r| r.as_table_like_mut())
        .ok_or_else(|| {
            BackupError::Usage(format!("agex.toml has no [repositories.{name}] table"))
        })?;
    let mut array = toml_edit::Array::new();
    for l in lines {
        let mut v = toml_edit::Value::from(l.as_str());
        // One key per line, like a known_hosts file.
        v.decor_mut().set_prefix("\n    ");
        array.push_formatted(v);
    }
    array.set_trailing("\n");
    array.set_trailing_comma(true);
    match entry.get_mut("known_hosts") {
        Some(item) => {
            let decor = item.as_value().map(|v| v.decor().clone());
            let mut value = toml_edit::Value::Array(array);
            if let Some(d) = decor {
                *value.decor_mut() = d;
            }
            *item = toml_edit::Item::Value(value);
        }
        None => {
            entry.insert(
                "known_hosts",
                toml_edit::Item::Value(toml_edit::Value::Array(array)),
            );
        }
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_comments_and_replaces_the_list() {
        let text = "# top\n[repositories.b]   # the box\nkind = \"borg\"  # engine\nurl = \"ssh://u@h:23/./r\"\nknown_hosts = [\"old\"]  # pinned\n[notify]\n";
        let out = set_known_hosts(text, "b", &["[h]:23 ssh-ed25519 AAAA".into()]).unwrap();
        assert!(
            out.contains("# top")
                && out.contains("# the box")
                && out.contains("# engine")
                && out.contains("# pinned"),
            "{out}"
        );
        assert!(
            out.contains("\"[h]:23 ssh-ed25519 AAAA\"") && !out.contains("\"old\""),
            "{out}"
        );
        let parsed: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(
            parsed["repositories"]["b"]["known_hosts"][0].as_str(),
            Some("[h]:23 ssh-ed25519 AAAA")
        );
        let added = set_known_hosts(
            "[repositories.b]\nkind = \"borg\"\n",
            "b",
            &["x ssh-ed25519 AAAA".into()],
        )
        .unwrap();
        let parsed: toml::Value = toml::from_str(&added).unwrap();
        assert_eq!(
            parsed["repositories"]["b"]["known_hosts"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert!(set_known_hosts("[repositories.a]\n", "b", &[]).is_err());
    }
}
