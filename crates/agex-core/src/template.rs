//! Template text with secret placeholders: `{{ secret "name" }}`.
//!
//! Parsing is pure and happens at config load, so an unknown placeholder is a config
//! error with a line number, long before activation.

use std::fmt;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text copied as is.
    Literal(String),
    /// The plaintext of the named secret, with any trailing newline removed.
    Secret(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    /// The pieces in order.
    pub segments: Vec<Segment>,
}

/// A template syntax problem, at a byte offset of the template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Byte offset in the template text.
    pub offset: usize,
    /// Length of the offending text.
    pub len: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Template {
    /// Parses template text. `{{` starts a placeholder; `{{{{` is a literal `{{`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            if let Some(tail) = after.strip_prefix("{{") {
                literal.push_str("{{");
                offset += start + 4;
                rest = tail;
                continue;
            }
            let Some(end) = after.find("}}") else {
                return Err(TemplateError {
                    offset: offset + start,
                    len: 2,
                    message: "`{{` is never closed with `}}`".into(),
                });
            };
            let raw_inner = &after[..end];
            let inner = raw_inner.trim();
            let parsed = parse_placeholder(inner);
            // The `}}` found belongs to a later placeholder or line: this one is open.
            if raw_inner.contains("{{") || (parsed.is_none() && raw_inner.contains('\n')) {
                return Err(TemplateError {
                    offset: offset + start,
                    len: raw_inner.find(['\n', '{']).map_or(2, |i| i + 2),
                    message:
                        "`{{` is not closed with `}}` before the end of its line or the next `{{`"
                            .into(),
                });
            }
            let name = parsed.ok_or_else(|| TemplateError {
                offset: offset + start,
                len: end + 4,
                message: format!(
                    "unknown placeholder `{{{{ {inner} }}}}`: the only placeholder is `{{{{ secret \"NAME\" }}}}`"
                ),
            })?;
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            segments.push(Segment::Secret(name.to_string()));
            let consumed = start + 2 + end + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template { segments })
    }

    /// The secrets this template reads, in order of first use.
    pub fn secrets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in &self.segments {
            if let Segment::Secret(n) = s {
                if !out.contains(&n.as_str()) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// Byte offsets (in the template text) of each placeholder naming `secret`.
    pub fn find_placeholder(text: &str, secret: &str) -> Option<usize> {
        let mut from = 0;
        while let Some(i) = text[from..].find("{{") {
            let at = from + i;
            if let Some(end) = text[at..].find("}}") {
                if parse_placeholder(text[at + 2..at + end].trim()) == Some(secret) {
                    return Some(at);
                }
            }
            from = at + 2;
        }
        None
    }
}

fn parse_placeholder(inner: &str) -> Option<&str> {
    let arg = inner.strip_prefix("secret")?.trim_start();
    let name = arg.strip_prefix('"')?.strip_suffix('"')?;
    (!name.is_empty() && !name.contains('"')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_placeholders_and_escapes() {
        let t = Template::parse("A={{ secret \"a\" }}\nB={{secret \"b\"}} {{{{x}}").unwrap();
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("A=".into()),
                Segment::Secret("a".into()),
                Segment::Literal("\nB=".into()),
                Segment::Secret("b".into()),
                Segment::Literal(" {{x}}".into()),
            ]
        );
        assert_eq!(t.secrets(), vec!["a", "b"]);
    }

    #[test]
    fn rejects_unknown_and_unclosed() {
        let e = Template::parse("x\n{{ env \"HOME\" }}").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("unknown placeholder"));
        assert!(Template::parse("{{ secret \"a\" ").is_err());
    }

    #[test]
    fn an_open_placeholder_is_not_read_up_to_a_later_one() {
        let e = Template::parse("A={{ secret \"a\"\nB={{ secret \"b\" }}").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("not closed"), "{}", e.message);
        let e = Template::parse("A={{ secret \"a\"\nB=1 }}").unwrap_err();
        assert!(e.message.contains("not closed"), "{}", e.message);
        // A placeholder may still be spread over lines when it is whole.
        assert!(Template::parse("{{\n secret \"a\"\n}}").is_ok());
    }
}
