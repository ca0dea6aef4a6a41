//! The activation plan: which file lands in which directory, with which owner, group
//! and mode, and which host paths link to them. Pure apart from user lookups and an
//! `lstat` of each link path, and made before anything changes, so an unknown owner or
//! an occupied path stops activation with nothing touched.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use agex_core::rules::{Placement, RestartAction};

use crate::error::ActivateError;
use crate::layout::{relative_link, Layout};
use crate::manifest::{directories, Manifest};
use crate::users::UserDb;

/// Where a planned file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A secret's plaintext.
    Secret(String),
    /// A rendered template.
    Template(String),
}

impl Source {
    /// The secret's or template's name.
    pub fn name(&self) -> &str {
        match self {
            Source::Secret(n) | Source::Template(n) => n,
        }
    }
}

/// One file of the generation directory.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// Its directory in the generation (`<service>`, `_shared` or `_early`).
    pub dir: String,
    /// Its file name.
    pub name: String,
    /// What goes into it.
    pub source: Source,
    /// Owner by name.
    pub owner: String,
    /// Group by name.
    pub group: String,
    /// Resolved uid.
    pub uid: u32,
    /// Resolved gid.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// What its unit does when it changes.
    pub restart: RestartAction,
}

impl PlannedFile {
    /// `dir/name` inside the generation.
    pub fn rel(&self) -> String {
        format!("{}/{}", self.dir, self.name)
    }
}

/// A host path linked to a file of the active generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLink {
    /// The host path as the rule gives it.
    pub host_path: PathBuf,
    /// The link's text: relative, through `/run/agex`, so it follows every switch.
    pub target: PathBuf,
    /// The secret or template.
    pub name: String,
}

/// What activating a generation will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every file, in a stable order.
    pub files: Vec<PlannedFile>,
    /// Every host-path link.
    pub links: Vec<PlannedLink>,
    /// The user database that resolved the names.
    pub users: String,
}

impl Plan {
    /// Plans `manifest` for the host below `layout`, resolving names in `users`.
    pub fn new(
        manifest: &Manifest,
        layout: &Layout,
        users: &UserDb,
    ) -> Result<Plan, ActivateError> {
        let mut resolver = Resolver::new(users);
        let mut files = Vec::new();
        let mut links = Vec::new();
        let mut add = |source: Source, p: &Placement, early: bool, resolver: &mut Resolver| {
            let name = source.name().to_string();
            let uid = resolver.uid(&p.owner, &name);
            let gid = resolver.gid(&p.group, &name);
            let dirs = directories(p, early);
            if let (Some(path), Some(first)) = (&p.path, dirs.first()) {
                let link_dir = path.parent().unwrap_or(std::path::Path::new("/"));
                let target = relative_link(
                    link_dir,
                    &std::path::Path::new("/run/agex").join(first).join(&name),
                );
                links.push(PlannedLink {
                    host_path: path.clone(),
                    target,
                    name: name.clone(),
                });
            }
            for dir in dirs {
                files.push(PlannedFile {
                    dir,
                    name: name.clone(),
                    source: source.clone(),
                    owner: p.owner.clone(),
                    group: p.group.clone(),
                    uid: uid.unwrap_or(0),
                    gid: gid.unwrap_or(0),
                    mode: p.mode,
                    restart: p.restart,
                });
            }
        };
        for s in &manifest.secrets {
            add(
                Source::Secret(s.name.clone()),
                &s.placement,
                s.early,
                &mut resolver,
            );
        }
        for t in &manifest.templates {
            add(
                Source::Template(t.name.clone()),
                &t.placement,
                false,
                &mut resolver,
            );
        }
        resolver.finish()?;

        let mut seen = BTreeMap::new();
        for f in &files {
            if let Some(other) = seen.insert(f.rel(), f.source.clone()) {
                return Err(ActivateError::Invalid {
                    path: PathBuf::from(f.rel()),
                    reason: format!(
                        "both `{}` and `{}` would land here; rename one of them",
                        other.name(),
                        f.source.name()
                    ),
                });
            }
        }
        for l in &links {
            let at = layout.host_path(&l.host_path);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if !m.file_type().is_symlink() => {
                    return Err(ActivateError::PathOccupied {
                        path: at,
                        name: l.name.clone(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ActivateError::io(at)(e)),
            }
        }
        Ok(Plan {
            files,
            links,
            users: users.describe(),
        })
    }

    /// The service directories (units) of the plan.
    pub fn directories(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.files.iter().map(|f| f.dir.as_str()).collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for file in &self.files {
            let what = match &file.source {
                Source::Secret(_) => "secret",
                Source::Template(_) => "template",
            };
            writeln!(
                f,
                "{:<60} {}:{} {:04o}  ({what})",
                file.rel(),
                file.owner,
                file.group,
                file.mode
            )?;
        }
        for l in &self.links {
            writeln!(f, "{} -> {}", l.host_path.display(), l.target.display())?;
        }
        Ok(())
    }
}

/// Looks names up once each and collects every unknown one, so the error lists them all.
struct Resolver<'a> {
    users: &'a UserDb,
    uids: BTreeMap<String, Option<u32>>,
    gids: BTreeMap<String, Option<u32>>,
    /// (0 user / 1 group, name) → the rules using it; users are listed first.
    unknown: BTreeMap<(u8, String), Vec<String>>,
    failure: Option<ActivateError>,
}

impl<'a> Resolver<'a> {
    fn new(users: &'a UserDb) -> Self {
        Resolver {
            users,
            uids: BTreeMap::new(),
            gids: BTreeMap::new(),
            unknown: BTreeMap::new(),
            failure: None,
        }
    }

    fn uid(&mut self, name: &str, item: &str) -> Option<u32> {
        if !self.uids.contains_key(name) {
            let v = match self.users.uid(name) {
                Ok(v) => v,
                Err(e) => {
                    self.failure.get_or_insert(e);
                    None
                }
            };
            self.uids.insert(name.to_string(), v);
        }
        let v = self.uids.get(name).copied().flatten();
        if v.is_none() {
            self.unknown
                .entry((0, name.to_string()))
                .or_default()
                .push(item.to_string());
        }
        v
    }

    fn gid(&mut self, name: &str, item: &str) -> Option<u32> {
        if !self.gids.contains_key(name) {
            let v = match self.users.gid(name) {
                Ok(v) => v,
                Err(e) => {
                    self.failure.get_or_insert(e);
                    None
                }
            };
            self.gids.insert(name.to_string(), v);
        }
        let v = self.gids.get(name).copied().flatten();
        if v.is_none() {
            self.unknown
                .entry((1, name.to_string()))
                .or_default()
                .push(item.to_string());
        }
        v
    }

    fn finish(self) -> Result<(), ActivateError> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        if self.unknown.is_empty() {
            return Ok(());
        }
        Err(ActivateError::UnknownOwners {
            database: self.users.describe(),
            problems: self
                .unknown
                .into_iter()
                .map(|((kind, name), mut items)| {
                    items.dedup();
                    let kind = if kind == 0 { "user" } else { "group" };
                    format!("{kind} `{name}` (used by {})", items.join(", "))
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Piece, SecretEntry, TemplateEntry, FORMAT};

    fn placement(owner: &str, services: &[&str]) -> Placement {
        Placement {
            owner: owner.into(),
            group: owner.into(),
            mode: 0o440,
            services: services.iter().map(|s| s.to_string()).collect(),
            path: None,
            restart: RestartAction::Restart,
        }
    }

    fn db(dir: &std::path::Path) -> UserDb {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1001:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\napp:x:1001:\n").unwrap();
        UserDb::for_layout(&Layout::new(dir)).unwrap()
    }

    fn manifest(owner: &str) -> Manifest {
        let mut linked = placement(owner, &["a.service", "b.service"]);
        linked.path = Some("/var/lib/app/key".into());
        Manifest {
            format: FORMAT,
            host: "h".into(),
            host_key: "k".into(),
            identity: "/k".into(),
            keep: 5,
            secrets: vec![
                SecretEntry {
                    name: "s".into(),
                    sha256: String::new(),
                    early: false,
                    placement: linked,
                    recipients: Default::default(),
                },
                SecretEntry {
                    name: "pw".into(),
                    sha256: String::new(),
                    early: true,
                    placement: placement("root", &[]),
                    recipients: Default::default(),
                },
            ],
            templates: vec![TemplateEntry {
                name: "app.env".into(),
                pieces: vec![Piece::Secret("s".into())],
                placement: placement(owner, &[]),
            }],
            files: vec![],
        }
    }

    #[test]
    fn files_per_service_shared_and_early() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let plan = Plan::new(&manifest("app"), &layout, &db(dir.path())).unwrap();
        let rels: Vec<String> = plan.files.iter().map(PlannedFile::rel).collect();
        assert_eq!(
            rels,
            vec!["a.service/s", "b.service/s", "_early/pw", "_shared/app.env"]
        );
        assert_eq!(plan.files[0].uid, 1001);
        assert_eq!(
            plan.links[0].target,
            PathBuf::from("../../../run/agex/a.service/s")
        );
    }

    #[test]
    fn unknown_owner_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let e = Plan::new(&manifest("ghost"), &layout, &db(dir.path())).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("user `ghost` (used by s, app.env)"), "{msg}");
        assert!(msg.contains("group `ghost`"), "{msg}");
    }

    #[test]
    fn occupied_link_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(dir.path().join("var/lib/app")).unwrap();
        std::fs::write(dir.path().join("var/lib/app/key"), "x").unwrap();
        let e = Plan::new(&manifest("app"), &layout, &db(dir.path())).unwrap_err();
        assert!(matches!(e, ActivateError::PathOccupied { .. }), "{e}");
    }
}
