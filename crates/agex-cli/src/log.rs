//! Log lines on stderr: the level chosen by `-v`/`-q` or `AGEX_LOG`, and a format that
//! suits where stderr goes. On a terminal a line reads `warning: …`; when systemd's
//! journal is stderr (`JOURNAL_STREAM` names its device and inode, as systemd.exec(5)
//! says to check) each line starts with its syslog priority (`<4>warning: …`), so
//! `journalctl -p warning` finds it, and nothing is coloured.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::{Failure, CONFIG};

/// The variable that overrides the level, in tracing's EnvFilter syntax.
pub const ENV: &str = "AGEX_LOG";

/// agex's own crates: `-v` and `-q` move their level; other crates (rustic_core, opendal,
/// ureq) stay one step quieter so their chatter needs `-vv`.
const OWN_CRATES: &[&str] = &[
    "agex",
    "agex_cli",
    "agex_core",
    "agex_secrets",
    "agex_activate",
    "agex_backup",
    "agex_schedule",
];

/// Where stderr goes, which decides how a line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// systemd's journal: a `<N>` priority prefix on every line, no colour.
    Journal,
    /// A terminal: coloured level words unless `NO_COLOR` is set.
    Terminal,
    /// A file or a pipe: plain level words.
    Plain,
}

impl Sink {
    /// Decides from the environment: `JOURNAL_STREAM` naming stderr's device and inode
    /// first, then whether stderr is a terminal.
    pub fn detect() -> Sink {
        if std::env::var("JOURNAL_STREAM")
            .ok()
            .and_then(|v| parse_journal_stream(&v))
            .is_some_and(|want| stderr_identity() == Some(want))
        {
            return Sink::Journal;
        }
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        if std::io::stderr().is_terminal() && !no_color {
            Sink::Terminal
        } else {
            Sink::Plain
        }
    }
}

/// `DEV:INODE`, both decimal, as systemd writes `JOURNAL_STREAM`.
fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The device and inode of file descriptor 2.
fn stderr_identity() -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(std::io::stderr()).ok()?;
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// The filter from the flags, else `AGEX_LOG`, else the default (agex at `info`, every
/// other crate at `warn`).
fn filter(verbose: u8, quiet: u8) -> Result<EnvFilter, Failure> {
    let levels = match (verbose, quiet) {
        (0, 0) => match std::env::var(ENV) {
            Ok(v) if !v.trim().is_empty() => {
                return EnvFilter::builder()
                    .parse(v.trim())
                    .map_err(|e| Failure::new(CONFIG, format!("{ENV}={v}: {e}")));
            }
            _ => Some(("warn", "info")),
        },
        (1, _) => Some(("info", "debug")),
        (_, 0) => Some(("debug", "trace")),
        (_, 1) => Some(("error", "warn")),
        _ => None,
    };
    let directives = match levels {
        Some((others, own)) => {
            let mut d = others.to_string();
            for c in OWN_CRATES {
                let _ = write!(d, ",{c}={own}");
            }
            d
        }
        None => "error".to_string(),
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| Failure::new(CONFIG, format!("log filter {directives}: {e}")))
}

/// Installs the logger. `-v`/`-vv` and `-q`/`-qq` win over `AGEX_LOG`; an `AGEX_LOG`
/// that does not parse is a usage error. The `log` crate's records (rustic_core's) go
/// through the same filter.
pub fn init(verbose: u8, quiet: u8) -> Result<(), Failure> {
    let filter = filter(verbose, quiet)?;
    let layer = StderrLayer {
        sink: Sink::detect(),
    };
    // A second init (never done) would fail; the first logger stays, which is right.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    Ok(())
}

/// Writes one message at `level` whatever the filter says: the final `error:` of a failed
/// command is its result, not a log line.
pub fn always(level: Level, message: &str) {
    write_lines(Sink::detect(), level, message);
}

/// Prints each event as lines on stderr.
struct StderrLayer {
    sink: Sink,
}

impl<S: Subscriber> Layer<S> for StderrLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut v = Fields::default();
        event.record(&mut v);
        let meta = event.metadata();
        let mut text = v.message;
        // Records bridged from the `log` crate name their origin; other crates' lines say
        // whose they are, agex's need not.
        let target = v.log_target.as_deref().unwrap_or(meta.target());
        if !OWN_CRATES.contains(&target.split("::").next().unwrap_or(target)) {
            text = format!("{}: {text}", target.split("::").next().unwrap_or(target));
        }
        text.push_str(&v.rest);
        write_lines(self.sink, *meta.level(), &text);
    }
}

/// The message and the other fields (` key=value`) of an event.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = Some(value.to_string()),
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.rest, " {n}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.rest, " {n}={value:?}");
            }
        }
    }
}

/// The syslog priority of a level (sd-daemon(3)): err, warning, info, debug.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The word before a line; info lines have none, as a command's normal output.
fn word(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

/// Formats `message` for `sink`: the journal reads each line as its own entry, so every
/// line carries the priority, not only the first.
pub fn format(sink: Sink, level: Level, message: &str) -> String {
    let mut out = String::new();
    let w = word(level);
    for (i, line) in message.lines().enumerate() {
        match sink {
            Sink::Journal => {
                let _ = write!(out, "<{}>", priority(level));
                if i == 0 {
                    out.push_str(w);
                }
            }
            Sink::Terminal if i == 0 && !w.is_empty() => {
                let colour = match level {
                    Level::ERROR => "1;31",
                    Level::WARN => "1;33",
                    _ => "2",
                };
                let _ = write!(out, "\x1b[{colour}m{}\x1b[0m ", w.trim_end());
            }
            _ if i == 0 => out.push_str(w),
            _ => {}
        }
        out.push_str(line);
        out.push('\n');
    }
    if message.is_empty() {
        if sink == Sink::Journal {
            let _ = write!(out, "<{}>", priority(level));
        }
        out.push_str(w.trim_end());
        out.push('\n');
    }
    out
}

fn write_lines(sink: Sink, level: Level, message: &str) {
    let text = format(sink, level, message);
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_each_carry_the_priority() {
        assert_eq!(
            format(Sink::Journal, Level::WARN, "disk low\nsecond line"),
            "<4>warning: disk low\n<4>second line\n"
        );
        assert_eq!(format(Sink::Journal, Level::INFO, "done"), "<6>done\n");
        assert_eq!(
            format(Sink::Journal, Level::ERROR, "bad"),
            "<3>error: bad\n"
        );
        assert_eq!(format(Sink::Journal, Level::DEBUG, "x"), "<7>debug: x\n");
    }

    #[test]
    fn plain_lines_have_a_word_and_no_escape() {
        assert_eq!(format(Sink::Plain, Level::WARN, "a\nb"), "warning: a\nb\n");
        assert_eq!(format(Sink::Plain, Level::INFO, "done"), "done\n");
        assert!(!format(Sink::Plain, Level::ERROR, "x").contains('\x1b'));
        assert!(format(Sink::Terminal, Level::ERROR, "x").contains("\x1b[1;31merror"));
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8-12345"), None);
        assert_eq!(parse_journal_stream(":1"), None);
    }

    #[test]
    fn flags_choose_levels() {
        for (v, q, want) in [
            (1, 0, "debug"),
            (2, 0, "trace"),
            (0, 1, "warn"),
            (0, 2, "error"),
        ] {
            let f = filter(v, q).unwrap().to_string();
            assert!(
                f.contains(&format!("agex_backup={want}")) || f == want,
                "{f}"
            );
        }
    }
}
