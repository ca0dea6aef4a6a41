//! The recovery kit: a plain-text document for a person who has lost the host and has
//! no agex — each repository's URL, which age secret holds its password and which
//! recovery key decrypts it, and the exact `age`, `restic` and `borg` commands that list
//! and restore every service. It holds no secret itself.
//!
//! Every command sits in a fenced block whose first line is `# kit: <repo> <action>
//! [<service>]`; only the documented placeholders are to be replaced, so the blocks can
//! be run as written (and the tests do).

use std::fmt::Write as _;

use agex_core::{Database, Project, RepositoryKind};

use agex_backup::manifest;

/// The name the kit's commands give the private RAM directory that holds a decrypted
/// ssh key while they run (`/dev/shm/<prefix>.XXXXXX`).
const KIT_KEY_PREFIX: &str = "agex-kit";

/// The placeholders a reader replaces, and what they stand for.
pub const PLACEHOLDERS: &[(&str, &str)] = &[
    (
        "RECOVERY_KEY",
        "the path of your recovery identity file (the offline age key listed for the repository)",
    ),
    (
        "CONFIG",
        "the path of a checkout of this configuration repository (it holds secrets/*.age)",
    ),
    (
        "TARGET",
        "an empty directory to restore into (the service's files appear below it at their host paths)",
    ),
];

/// Writes the kit for every repository and service of `project`.
pub fn render(project: &Project, generated: &str) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "AGEX RECOVERY KIT");
    let _ = writeln!(w, "=================\n");
    let _ = writeln!(w, "Generated {generated} from {}.\n", project.dir.display());
    let _ = writeln!(
        w,
        "This document holds no secret. With it, a checkout of the configuration\n\
         repository (for the encrypted secrets/*.age files) and a recovery key, you can\n\
         restore every service with the stock tools `age`, `restic` and `borg` alone.\n\
         Repository passwords and credentials are decrypted on demand by `age -d`;\n\
         nothing is written to disk except a repository's ssh key and pinned host keys,\n\
         which go to a private directory in /dev/shm (RAM) that each block removes when\n\
         it ends.\n"
    );
    let _ = writeln!(w, "Placeholders (replace these, nothing else):");
    for (name, what) in PLACEHOLDERS {
        let _ = writeln!(w, "  {name:<13} {what}");
    }
    let _ = writeln!(
        w,
        "\nSnapshots and archives: one per service per run; Restic snapshots carry the tag\n\
         `service=<name>`, Borg archives are named `<service>-<run id>` (the run id is the\n\
         UTC start time, e.g. 20250101T030000.000Z). Database dumps and a manifest of\n\
         every file's SHA-256 are stored at {}/<service>/ in each.\n",
        manifest::DUMPS_DIR
    );
    for repo in project.config.repositories.values() {
        let secret = repo.password_secret.get_ref();
        let rule = project.rules.secrets.get(secret);
        let file = rule
            .map(|r| r.file.display().to_string())
            .unwrap_or_else(|| format!("secrets/{secret}.age"));
        let recovery = recovery_keys(project, secret);
        let kind = repo.kind.as_str();
        let _ = writeln!(w, "\nRepository {} ({kind})", repo.name);
        let _ = writeln!(w, "{}", "-".repeat(repo.name.len() + kind.len() + 14));
        let _ = writeln!(w, "URL:          {}", repo.url);
        let _ = writeln!(w, "Password:     secret `{secret}`, file CONFIG/{file}");
        let _ = writeln!(w, "Decrypted by: {}", recovery);
        let secret_file = |name: &str| {
            project
                .rules
                .secrets
                .get(name)
                .map(|r| r.file.display().to_string())
                .unwrap_or_else(|| format!("secrets/{name}.age"))
        };
        let ssh_key_file = repo.ssh_key_secret.as_ref().map(|k| {
            let name = k.get_ref();
            let f = secret_file(name);
            let _ = writeln!(
                w,
                "SSH key:      secret `{name}`, file CONFIG/{f} (decrypted by {})",
                recovery_keys(project, name)
            );
            f
        });
        let env_file = repo.env_secret.as_ref().map(|e| {
            let name = e.get_ref();
            let f = secret_file(name);
            let _ = writeln!(
                w,
                "Credentials:  secret `{name}`, file CONFIG/{f}: KEY=VALUE lines the blocks
                               put into the shell's environment (decrypted by {})",
                recovery_keys(project, name)
            );
            f
        });
        for line in &repo.known_hosts {
            let _ = writeln!(w, "Host key:     {line}");
        }
        let _ = writeln!(
            w,
            "If CONFIG/{file}.pending exists, a password rotation was interrupted: when the\n\
             commands below say the password is wrong, use that file instead of {file}."
        );
        let services: Vec<_> = project
            .policies
            .values()
            .filter(|p| p.repositories.contains(&repo.name))
            .collect();
        // What every block of this repository starts with: a private RAM directory for
        // the ssh key and the pinned host keys (a fresh mktemp -d, 0700, not a fixed
        // name in the world-writable /dev/shm that another user could have taken
        // first; removed at the block's end or the shell's exit) and the credentials.
        let pinned = !repo.known_hosts.is_empty();
        let needs_dir = ssh_key_file.is_some() || pinned;
        let mut prelude: Vec<String> = Vec::new();
        if needs_dir {
            prelude.push("umask 077".into());
            prelude.push(format!(
                "KEYDIR=$(mktemp -d /dev/shm/{KIT_KEY_PREFIX}.XXXXXX)"
            ));
            prelude.push("trap 'rm -rf \"$KEYDIR\"' EXIT".into());
        }
        if let Some(f) = &ssh_key_file {
            prelude.push(format!(
                "age -d -i RECOVERY_KEY -o \"$KEYDIR/ssh-key\" CONFIG/{f}"
            ));
        }
        if pinned {
            let lines: Vec<String> = repo.known_hosts.iter().map(|l| quote(l)).collect();
            prelude.push(format!(
                "printf '%s\\n' {} > \"$KEYDIR/known_hosts\"",
                lines.join(" ")
            ));
        }
        if let Some(f) = &env_file {
            prelude.push(format!(
                "set -a; eval \"$(age -d -i RECOVERY_KEY CONFIG/{f})\"; set +a"
            ));
        }
        // ssh as agex runs it: the key from the secret, the server's pinned keys only.
        let mut ssh = String::from("ssh");
        if ssh_key_file.is_some() {
            ssh.push_str(" -i $KEYDIR/ssh-key -o IdentitiesOnly=yes");
        }
        if pinned {
            ssh.push_str(" -o StrictHostKeyChecking=yes -o UserKnownHostsFile=$KEYDIR/known_hosts");
        }
        let cleanup = needs_dir.then(|| "rm -rf \"$KEYDIR\"".to_string());
        let with = |cmds: Vec<String>| -> Vec<String> {
            let mut all = prelude.clone();
            all.extend(cmds);
            all.extend(cleanup.clone());
            all
        };
        match repo.kind {
            RepositoryKind::Restic => {
                let mut base = format!(
                    "restic -r {} --password-command {}",
                    quote(&repo.url),
                    quote(&format!("age -d -i RECOVERY_KEY CONFIG/{file}"))
                );
                if let (agex_core::RepoUrl::Sftp { ssh: e, .. }, true) = (&repo.location, needs_dir)
                {
                    let mut cmd = ssh.clone();
                    if let Some(p) = e.port {
                        cmd.push_str(&format!(" -p {p}"));
                    }
                    cmd.push_str(&format!(" {} -s sftp", e.destination()));
                    base.push_str(&format!(" -o sftp.command=\"{cmd}\""));
                }
                block(
                    w,
                    &format!("{} list", repo.name),
                    &with(vec![format!("{base} snapshots")]),
                );
                for p in &services {
                    service_notes(w, p);
                    block(
                        w,
                        &format!("{} restore {}", repo.name, p.service),
                        &with(vec![format!(
                            "{base} restore latest --tag {} --target TARGET",
                            quote(&format!("service={}", p.service))
                        )]),
                    );
                }
            }
            RepositoryKind::Borg => {
                let mut env = vec![format!(
                    "export BORG_PASSCOMMAND={}",
                    quote(&format!("age -d -i RECOVERY_KEY CONFIG/{file}"))
                )];
                if needs_dir {
                    env.push(format!("export BORG_RSH=\"{ssh}\""));
                }
                let mut list = env.clone();
                list.push(format!("borg list {}", quote(&repo.url)));
                block(w, &format!("{} list", repo.name), &with(list));
                for p in &services {
                    service_notes(w, p);
                    let mut cmds = env.clone();
                    cmds.push(format!(
                        "ARCHIVE=$(borg list --short --last 1 --glob-archives {} {})",
                        quote(&format!("{}-*Z", p.service)),
                        quote(&repo.url)
                    ));
                    cmds.push(format!(
                        "cd TARGET && borg extract {}\"$ARCHIVE\"",
                        quote(&format!("{}::", repo.url))
                    ));
                    block(
                        w,
                        &format!("{} restore {}", repo.name, p.service),
                        &with(cmds),
                    );
                }
            }
        }
    }
    // The example path is one of this configuration's own.
    let example = project
        .policies
        .values()
        .flat_map(|p| p.paths.iter())
        .next()
        .map_or_else(
            || "/var/lib/SERVICE".to_string(),
            |p| p.display().to_string(),
        );
    let _ = writeln!(
        w,
        "\nAfter a restore\n---------------\n\
         Files are below TARGET at their host paths (TARGET{example}/... for\n\
         {example}/...). Copy them back with their owners (cp -a, rsync -a).\n\
         SQLite: check TARGET{dumps}/<service>/db/<name>.sqlite3 with\n\
         `sqlite3 FILE 'PRAGMA integrity_check'`, stop the service, remove the live file's\n\
         -wal and -shm files and copy the dump over the live database.\n\
         PostgreSQL: `pg_restore --clean --if-exists --single-transaction -d DATABASE\n\
         TARGET{dumps}/<service>/db/<name>.pgdump` as the database's owner.\n\
         To verify: TARGET{dumps}/<service>/manifest.json lists every file with its\n\
         sha256 digest, and each dump with its digest and table row counts.",
        dumps = manifest::DUMPS_DIR
    );
    out
}

fn service_notes(w: &mut String, p: &agex_core::Policy) {
    let _ = writeln!(w, "\nService {}:", p.service);
    for path in &p.paths {
        let _ = writeln!(w, "  files     {}", path.display());
    }
    for db in &p.databases {
        let dump = manifest::dump_path(&p.service, &db.dump_file());
        match db {
            Database::Sqlite { path, .. } => {
                let _ = writeln!(
                    w,
                    "  sqlite    {} (dump: TARGET{})",
                    path.display(),
                    dump.display()
                );
            }
            Database::Postgres { database, .. } => {
                let _ = writeln!(
                    w,
                    "  postgres  database {database} (dump: TARGET{})",
                    dump.display()
                );
            }
        }
    }
}

fn block(w: &mut String, title: &str, lines: &[String]) {
    let _ = writeln!(w, "\n```sh\n# kit: {title}");
    for l in lines {
        let _ = writeln!(w, "{l}");
    }
    let _ = writeln!(w, "```");
}

/// The recovery keys (members of the `recovery` group) a secret is encrypted to, or
/// every non-host recipient when there is no such group.
fn recovery_keys(project: &Project, secret: &str) -> String {
    let Some(rule) = project.rules.secrets.get(secret) else {
        return "(the secret has no rule in secrets.toml!)".into();
    };
    let group: Vec<String> = project
        .config
        .expand("recovery")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let keys: Vec<String> = rule
        .recipients
        .iter()
        .filter(|(n, _)| {
            if project.config.groups.contains_key("recovery") {
                group.contains(n)
            } else {
                !rule.hosts.contains(*n)
            }
        })
        .map(|(n, k)| format!("{n} ({})", k.as_str()))
        .collect();
    if keys.is_empty() {
        "NO RECOVERY KEY — only the host and admins can decrypt it; fix secrets.toml".into()
    } else {
        keys.join(", ")
    }
}

/// A single-quoted shell word.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@=+,%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_leaves_plain_words_and_protects_the_rest() {
        assert_eq!(quote("/srv/restic"), "/srv/restic");
        assert_eq!(quote("age -d"), "'age -d'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
