//! What differs between two generations, from their manifests: which secrets, templates
//! and services changed. Encrypted files are compared by digest; plaintext is never read.

use std::collections::{BTreeMap, BTreeSet};

use agex_core::rules::Placement;
use serde::Serialize;

use crate::manifest::{directories, Manifest, Piece};

/// Whether an item was added, removed or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Only in the second generation.
    Added,
    /// Only in the first generation.
    Removed,
    /// In both, different.
    Changed,
}

/// One differing secret or template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `secret` or `template`.
    pub item: &'static str,
    /// Its name.
    pub name: String,
    /// Added, removed or changed.
    pub kind: ChangeKind,
    /// What changed (`encrypted content`, `owner a -> b`, …).
    pub details: Vec<String>,
    /// The services whose files it touches (of both generations).
    pub services: Vec<String>,
    /// The changed lines of a template's text or a carried file (`-old`, `+new`), when
    /// both sides could be read; never a secret's plaintext.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
}

/// Most lines a changed-lines diff compares per side; longer texts only say "content".
const MAX_DIFF_LINES: usize = 2000;

/// The lines that differ from `old` to `new`: `-line` removed, `+line` added, in order
/// (a longest-common-subsequence diff without context lines).
pub fn changed_lines(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len() > MAX_DIFF_LINES || b.len() > MAX_DIFF_LINES {
        return Vec::new();
    }
    // lcs[i][j]: length of the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removed lines before added ones, as `diff -u` shows a replaced line.
            out.push(format!("-{}", a[i]));
            i += 1;
        } else {
            out.push(format!("+{}", b[j]));
            j += 1;
        }
    }
    out
}

/// A template's text with each secret shown as its placeholder.
fn template_text(t: &crate::manifest::TemplateEntry) -> String {
    t.pieces
        .iter()
        .map(|p| match p {
            Piece::Text(s) => s.clone(),
            Piece::Secret(n) => format!("{{{{ secret \"{n}\" }}}}"),
        })
        .collect()
}

/// [`diff`], with the changed lines of each carried file whose two versions `read_a` and
/// `read_b` give (by path, `policies/x.toml`).
pub fn diff_with_lines(
    a: &Manifest,
    b: &Manifest,
    read_a: &dyn Fn(&str) -> Option<Vec<u8>>,
    read_b: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Vec<Change> {
    let mut changes = diff(a, b);
    for c in changes.iter_mut().filter(|c| c.kind == ChangeKind::Changed) {
        let Some(dir) = (match c.item {
            "policy" => Some("policies"),
            "unit" => Some("systemd"),
            _ => None,
        }) else {
            continue;
        };
        let path = format!("{dir}/{}", c.name);
        if let (Some(x), Some(y)) = (read_a(&path), read_b(&path)) {
            c.lines = changed_lines(&String::from_utf8_lossy(&x), &String::from_utf8_lossy(&y));
        }
    }
    changes
}

/// The differences from `a` to `b`, secrets first, by name.
pub fn diff(a: &Manifest, b: &Manifest) -> Vec<Change> {
    let mut out = Vec::new();
    let sa: BTreeMap<&str, _> = a.secrets.iter().map(|s| (s.name.as_str(), s)).collect();
    let sb: BTreeMap<&str, _> = b.secrets.iter().map(|s| (s.name.as_str(), s)).collect();
    let names: BTreeSet<&str> = sa.keys().chain(sb.keys()).copied().collect();
    for name in names {
        let (x, y) = (sa.get(name), sb.get(name));
        let mut details = Vec::new();
        if let (Some(x), Some(y)) = (x, y) {
            if x.sha256 != y.sha256 {
                details.push("encrypted content".to_string());
            }
            if x.early != y.early {
                details.push(format!("early {} -> {}", x.early, y.early));
            }
            placement_details(&x.placement, &y.placement, &mut details);
        }
        push(
            &mut out,
            "secret",
            name,
            x.map(|s| (&s.placement, s.early)),
            y.map(|s| (&s.placement, s.early)),
            details,
        );
    }
    let ta: BTreeMap<&str, _> = a.templates.iter().map(|t| (t.name.as_str(), t)).collect();
    let tb: BTreeMap<&str, _> = b.templates.iter().map(|t| (t.name.as_str(), t)).collect();
    let names: BTreeSet<&str> = ta.keys().chain(tb.keys()).copied().collect();
    for name in names {
        let (x, y) = (ta.get(name), tb.get(name));
        let mut details = Vec::new();
        let mut lines = Vec::new();
        if let (Some(x), Some(y)) = (x, y) {
            if x.pieces != y.pieces {
                details.push("template text".to_string());
                lines = changed_lines(&template_text(x), &template_text(y));
            }
            let used_x: BTreeSet<&str> = x.secrets().collect();
            for s in y.secrets().collect::<BTreeSet<_>>() {
                let changed = match (sa.get(s), sb.get(s)) {
                    (Some(p), Some(q)) => p.sha256 != q.sha256,
                    _ => true,
                };
                if changed || !used_x.contains(s) {
                    details.push(format!("uses changed secret `{s}`"));
                }
            }
            placement_details(&x.placement, &y.placement, &mut details);
        }
        push(
            &mut out,
            "template",
            name,
            x.map(|t| (&t.placement, false)),
            y.map(|t| (&t.placement, false)),
            details,
        );
        if let Some(last) = out
            .last_mut()
            .filter(|c| c.name == name && c.item == "template")
        {
            last.lines = lines;
        }
    }
    carried(a, b, &mut out);
    out
}

/// Changes of carried files: backup policies and systemd units (schedules).
fn carried(a: &Manifest, b: &Manifest, out: &mut Vec<Change>) {
    let fa: BTreeMap<&str, _> = a.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let fb: BTreeMap<&str, _> = b.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let paths: BTreeSet<&str> = fa.keys().chain(fb.keys()).copied().collect();
    for path in paths {
        let (x, y) = (fa.get(path), fb.get(path));
        let kind = match (x, y) {
            (None, Some(_)) => ChangeKind::Added,
            (Some(_), None) => ChangeKind::Removed,
            (Some(x), Some(y)) if x.sha256 != y.sha256 => ChangeKind::Changed,
            _ => continue,
        };
        let details = match (x, y) {
            (Some(x), Some(y)) if x.note != y.note => vec![format!("{} -> {}", x.note, y.note)],
            (Some(_), Some(_)) => vec!["content".to_string()],
            (Some(f), None) | (None, Some(f)) if !f.note.is_empty() => vec![f.note.clone()],
            _ => vec![],
        };
        let (item, name) = match path.split_once('/') {
            Some(("policies", rest)) => ("policy", rest),
            Some(("systemd", rest)) => ("unit", rest),
            _ => ("file", path),
        };
        out.push(Change {
            item,
            name: name.to_string(),
            kind,
            details,
            services: vec![],
            lines: vec![],
        });
    }
}

fn push(
    out: &mut Vec<Change>,
    item: &'static str,
    name: &str,
    x: Option<(&Placement, bool)>,
    y: Option<(&Placement, bool)>,
    details: Vec<String>,
) {
    let kind = match (x, y) {
        (None, Some(_)) => ChangeKind::Added,
        (Some(_), None) => ChangeKind::Removed,
        _ if details.is_empty() => return,
        _ => ChangeKind::Changed,
    };
    let mut services: BTreeSet<String> = BTreeSet::new();
    for (p, early) in [x, y].into_iter().flatten() {
        services.extend(directories(p, early));
    }
    out.push(Change {
        item,
        name: name.to_string(),
        kind,
        details,
        services: services.into_iter().collect(),
        lines: vec![],
    });
}

fn placement_details(x: &Placement, y: &Placement, details: &mut Vec<String>) {
    if x.owner != y.owner {
        details.push(format!("owner {} -> {}", x.owner, y.owner));
    }
    if x.group != y.group {
        details.push(format!("group {} -> {}", x.group, y.group));
    }
    if x.mode != y.mode {
        details.push(format!("mode {:04o} -> {:04o}", x.mode, y.mode));
    }
    if x.services != y.services {
        details.push(format!(
            "services [{}] -> [{}]",
            x.services.join(", "),
            y.services.join(", ")
        ));
    }
    if x.path != y.path {
        let show = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        };
        details.push(format!("path {} -> {}", show(&x.path), show(&y.path)));
    }
    if x.restart != y.restart {
        details.push(format!("restart {:?} -> {:?}", x.restart, y.restart).to_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Piece, SecretEntry, TemplateEntry, FORMAT};
    use agex_core::rules::RestartAction;

    fn p(owner: &str) -> Placement {
        Placement {
            owner: owner.into(),
            group: owner.into(),
            mode: 0o400,
            services: vec!["a.service".into()],
            path: None,
            restart: RestartAction::Restart,
        }
    }

    fn m(secrets: &[(&str, &str, &str)]) -> Manifest {
        Manifest {
            format: FORMAT,
            host: "h".into(),
            host_key: "k".into(),
            identity: "/k".into(),
            keep: 5,
            secrets: secrets
                .iter()
                .map(|(n, d, o)| SecretEntry {
                    name: n.to_string(),
                    sha256: d.to_string(),
                    early: false,
                    placement: p(o),
                    recipients: Default::default(),
                })
                .collect(),
            templates: vec![TemplateEntry {
                name: "t.env".into(),
                pieces: vec![Piece::Secret("x".into())],
                placement: p("root"),
            }],
            files: vec![],
        }
    }

    #[test]
    fn added_removed_changed() {
        let a = m(&[
            ("x", "1", "root"),
            ("gone", "1", "root"),
            ("same", "1", "root"),
        ]);
        let b = m(&[
            ("x", "2", "app"),
            ("new", "1", "root"),
            ("same", "1", "root"),
        ]);
        let d = diff(&a, &b);
        let shown: Vec<(String, ChangeKind)> = d.iter().map(|c| (c.name.clone(), c.kind)).collect();
        assert_eq!(
            shown,
            vec![
                ("gone".into(), ChangeKind::Removed),
                ("new".into(), ChangeKind::Added),
                ("x".into(), ChangeKind::Changed),
                ("t.env".into(), ChangeKind::Changed),
            ]
        );
        assert_eq!(
            d[2].details,
            vec![
                "encrypted content",
                "owner root -> app",
                "group root -> app"
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn changed_lines_are_the_removed_and_added_ones_in_order() {
        let old = "paths = [\"/a\"]\nschedule = \"daily\"\nkeep = 1\n";
        let new = "paths = [\"/a\", \"/b\"]\nschedule = \"daily\"\nkeep = 1\nx = 2\n";
        assert_eq!(
            changed_lines(old, new),
            vec!["-paths = [\"/a\"]", "+paths = [\"/a\", \"/b\"]", "+x = 2"]
        );
        assert!(changed_lines(old, old).is_empty());
    }
}
