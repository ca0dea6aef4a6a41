//! Errors that point into a configuration file: `file:line:col`, the line, a caret, a hint.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The text of one configuration file, kept so errors can quote the offending line.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user should read it (relative to the config dir when possible).
    pub path: PathBuf,
    /// The full text of the file.
    pub text: String,
}

impl SourceFile {
    /// Wraps a file's text with the path shown in diagnostics.
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }

    /// A file's bytes as text; bytes that are not UTF-8 are an error at the first one.
    pub fn decode(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, Diagnostics> {
        let path = path.into();
        match String::from_utf8(bytes) {
            Ok(text) => Ok(SourceFile::new(path, text)),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let bad = e.as_bytes().get(at).copied().unwrap_or_default();
                let source =
                    SourceFile::new(path, String::from_utf8_lossy(e.as_bytes()).into_owned());
                // The lossy text has the same bytes up to `at`, so the span still points right.
                let diag = source.error(
                    Some(at..at + 1),
                    format!("byte 0x{bad:02x} is not UTF-8: configuration files are UTF-8 text"),
                );
                Err(Diagnostics(vec![diag]))
            }
        }
    }

    /// A diagnostic at a byte span of this file.
    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        let message = message.into();
        match span {
            Some(span) => {
                let (line, col, line_text) = locate(&self.text, span.start);
                let width = span
                    .end
                    .saturating_sub(span.start)
                    .clamp(1, line_text.len().saturating_sub(col - 1).max(1));
                Diagnostic {
                    path: self.path.clone(),
                    location: Some(Location {
                        line,
                        col,
                        line_text,
                        width,
                    }),
                    message,
                    help: None,
                }
            }
            None => Diagnostic {
                path: self.path.clone(),
                location: None,
                message,
                help: None,
            },
        }
    }
}

/// 1-based line and column of a byte offset, and the text of that line.
fn locate(text: &str, offset: usize) -> (usize, usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line_text = text[line_start..line_end]
        .trim_end_matches('\r')
        .to_string();
    (line, col, line_text)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Where in a file a diagnostic points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// The text of that line, for display.
    pub line_text: String,
    /// How many characters to underline.
    pub width: usize,
}

/// One problem in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file at fault.
    pub path: PathBuf,
    /// Line and column, when the problem has a place in the file.
    pub location: Option<Location>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic about a whole file (no line to point at).
    pub fn file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Diagnostic {
            path: path.as_ref().to_path_buf(),
            location: None,
            message: message.into(),
            help: None,
        }
    }

    /// Adds a hint on how to fix the problem.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => {
                writeln!(
                    f,
                    "{}:{}:{}: {}",
                    self.path.display(),
                    loc.line,
                    loc.col,
                    self.message
                )?;
                let gutter = loc.line.to_string().len();
                writeln!(f, "{:gutter$} |", "")?;
                writeln!(f, "{} | {}", loc.line, loc.line_text)?;
                write!(
                    f,
                    "{:gutter$} | {}{}",
                    "",
                    " ".repeat(loc.col - 1),
                    "^".repeat(loc.width)
                )?;
            }
            None => write!(f, "{}: {}", self.path.display(), self.message)?,
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// Several diagnostics, reported together so the user fixes them in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Records one more problem.
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    /// `Ok(())` when nothing was recorded.
    pub fn into_result(self) -> Result<(), Diagnostics> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Turns a `toml` deserialization error into a diagnostic, adding "did you mean" to
/// unknown-field errors.
pub fn from_toml_error(source: &SourceFile, err: &toml::de::Error) -> Diagnostic {
    let message = plain_integer_types(err.message().trim());
    let mut diag = source.error(err.span(), message.clone());
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            if let Some(best) = did_you_mean(field, candidates.iter().copied()) {
                diag = diag.with_help(format!("did you mean `{best}`?"));
            }
        }
    }
    diag
}

/// serde names Rust integer types (`expected u32`); say what a user may write instead.
fn plain_integer_types(message: &str) -> String {
    for (ty, max) in [
        ("u8", u64::from(u8::MAX)),
        ("u16", u64::from(u16::MAX)),
        ("u32", u64::from(u32::MAX)),
        ("u64", u64::MAX),
        ("usize", usize::MAX as u64),
    ] {
        if let Some(head) = message.strip_suffix(&format!("expected {ty}")) {
            return format!("{head}expected a whole number from 0 to {max}");
        }
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_types_are_named_in_words() {
        assert_eq!(
            plain_integer_types("invalid value: integer `-4`, expected u32"),
            "invalid value: integer `-4`, expected a whole number from 0 to 4294967295"
        );
        assert_eq!(plain_integer_types("invalid type"), "invalid type");
    }

    #[test]
    fn locates_line_and_column() {
        let src = SourceFile::new("a.toml", "x = 1\nyy = \"oops\"\n");
        let d = src.error(Some(6..8), "bad");
        let loc = d.location.clone().unwrap();
        assert_eq!((loc.line, loc.col), (2, 1));
        assert_eq!(loc.line_text, "yy = \"oops\"");
        let shown = d.to_string();
        assert!(shown.starts_with("a.toml:2:1: bad"), "{shown}");
        assert!(shown.contains("2 | yy = \"oops\""), "{shown}");
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(
            did_you_mean("ownr", ["owner", "group", "mode"]),
            Some("owner")
        );
        assert_eq!(did_you_mean("zzz", ["owner", "group"]), None);
    }

    #[test]
    fn unknown_field_gets_a_suggestion() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct R {
            owner: String,
        }
        let text = "ownr = \"x\"\n";
        let err = toml::from_str::<R>(text).unwrap_err();
        let d = from_toml_error(&SourceFile::new("r.toml", text), &err);
        assert_eq!(d.help.as_deref(), Some("did you mean `owner`?"));
        assert_eq!(d.location.unwrap().line, 1);
    }
}
