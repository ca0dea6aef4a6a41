//! `agex report --html`: one self-contained HTML page built from the run and drill records,
//! for an operator to open or a web server to serve. No external assets and no JavaScript:
//! the page is readable as it arrives, styled by one inline stylesheet, charted with inline
//! SVG.
//!
//! Per service × repository it shows a grid of the last [`DAYS`] days (ok, partial, failed,
//! missing), the duration and the bytes added by each run as small charts, and the last
//! drill with its RPO and RTO; overdue and failing pairs come first. Below, each
//! repository's growth over the same days.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use agex_backup::drill_records::{DrillRecord, DrillStatus};
use agex_backup::run::RunRecord;
use agex_backup::status;
use agex_core::human::{ago, size, when};
use agex_core::Project;
use chrono::{DateTime, NaiveDate, Utc};

use crate::overdue;

/// How many days the grid and the charts cover.
pub const DAYS: i64 = 30;

/// One day of one pair in the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Day {
    /// Every run of the day succeeded.
    Ok,
    /// Some runs of the day failed, some succeeded.
    Partial,
    /// Every run of the day failed.
    Failed,
    /// No run that day.
    Missing,
}

impl Day {
    fn class(self) -> &'static str {
        match self {
            Day::Ok => "ok",
            Day::Partial => "partial",
            Day::Failed => "failed",
            Day::Missing => "missing",
        }
    }
}

/// Where a pair stands, worst first (the report's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Its last success is older than its schedule allows (or it never succeeded).
    Overdue,
    /// Its last backup failed.
    Failed,
    /// Its last drill failed.
    DrillFailed,
    /// All well.
    Ok,
}

impl Standing {
    fn class(self) -> &'static str {
        match self {
            Standing::Overdue => "overdue",
            Standing::Failed => "failed",
            Standing::DrillFailed => "drill-failed",
            Standing::Ok => "ok",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Standing::Overdue => "OVERDUE",
            Standing::Failed => "FAILED",
            Standing::DrillFailed => "DRILL FAILED",
            Standing::Ok => "ok",
        }
    }
}

/// One run of one pair, as the charts plot it.
#[derive(Debug, Clone)]
struct Point {
    at: DateTime<Utc>,
    seconds: f64,
    bytes_added: Option<u64>,
}

/// One service in one repository.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The service.
    pub service: String,
    /// The repository.
    pub repo: String,
    /// Where it stands.
    pub standing: Standing,
    /// The grid, oldest day first.
    pub days: Vec<(NaiveDate, Day)>,
    /// The last success, if any.
    pub last_success: Option<DateTime<Utc>>,
    /// The last error, when the last backup failed.
    pub last_error: Option<String>,
    /// The last drill, if any ran.
    pub drill: Option<DrillStatus>,
    points: Vec<Point>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// The host it describes.
    pub host: String,
    /// When it was made.
    pub generated: DateTime<Utc>,
    /// Every pair of the policies, worst first.
    pub pairs: Vec<Pair>,
    /// Per repository: (time, bytes added up to then) over the window, oldest first.
    pub growth: BTreeMap<String, Vec<(DateTime<Utc>, u64)>>,
}

fn parse_time(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Builds the report of `project`'s pairs from the records (oldest first, as
/// `run::records` and `drill::records` return them).
pub fn build(
    project: &Project,
    host: &str,
    runs: &[RunRecord],
    drills: &[DrillRecord],
    now: DateTime<Utc>,
) -> Report {
    let statuses = status::summarize(runs);
    let overdue: Vec<(String, String)> = overdue::find(project, &statuses, None, now, None)
        .overdue
        .into_iter()
        .map(|o| (o.service, o.repo))
        .collect();
    let drill_statuses = agex_backup::drill_records::summarize(drills);
    let today = now.date_naive();
    let first_day = today - chrono::Duration::days(DAYS - 1);
    let window_start = first_day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());

    let mut pairs = Vec::new();
    for (service, policy) in &project.policies {
        for repo in &policy.repositories {
            let mine = || {
                runs.iter().flat_map(|rec| {
                    rec.results
                        .iter()
                        .filter(|r| &r.service == service && &r.repo == repo)
                        .filter_map(move |r| parse_time(&rec.started).map(|t| (t, r)))
                })
            };
            let mut by_day: BTreeMap<NaiveDate, (usize, usize)> = BTreeMap::new();
            let mut points = Vec::new();
            for (t, r) in mine() {
                if window_start.is_some_and(|w| t < w) {
                    continue;
                }
                let e = by_day.entry(t.date_naive()).or_default();
                if r.ok() {
                    e.0 += 1;
                    points.push(Point {
                        at: t,
                        seconds: r.duration_seconds,
                        bytes_added: r.bytes_added,
                    });
                } else {
                    e.1 += 1;
                }
            }
            let days = (0..DAYS)
                .map(|i| {
                    let d = first_day + chrono::Duration::days(i);
                    let day = match by_day.get(&d) {
                        None => Day::Missing,
                        Some((_, 0)) => Day::Ok,
                        Some((0, _)) => Day::Failed,
                        Some(_) => Day::Partial,
                    };
                    (d, day)
                })
                .collect();
            let status = statuses
                .iter()
                .find(|s| &s.service == service && &s.repo == repo);
            let drill = drill_statuses
                .iter()
                .find(|d| &d.service == service && &d.repo == repo)
                .cloned();
            let last_failed = status.is_some_and(|s| !s.result.is_ok());
            let standing = if overdue.iter().any(|(s, r)| s == service && r == repo) {
                Standing::Overdue
            } else if last_failed {
                Standing::Failed
            } else if drill.as_ref().is_some_and(|d| !d.result.is_ok()) {
                Standing::DrillFailed
            } else {
                Standing::Ok
            };
            pairs.push(Pair {
                service: service.clone(),
                repo: repo.clone(),
                standing,
                days,
                last_success: status
                    .and_then(|s| s.last_success.as_deref())
                    .and_then(parse_time),
                last_error: status.filter(|_| last_failed).and_then(|s| s.error.clone()),
                drill,
                points,
            });
        }
    }
    pairs.sort_by(|a, b| (a.standing, &a.service, &a.repo).cmp(&(b.standing, &b.service, &b.repo)));

    let mut growth: BTreeMap<String, Vec<(DateTime<Utc>, u64)>> = BTreeMap::new();
    for repo in project.config.repositories.keys() {
        let mut total = 0u64;
        let mut line = Vec::new();
        for rec in runs {
            let Some(t) = parse_time(&rec.started) else {
                continue;
            };
            let added: u64 = rec
                .results
                .iter()
                .filter(|r| &r.repo == repo && r.ok())
                .filter_map(|r| r.bytes_added)
                .sum();
            total = total.saturating_add(added);
            if window_start.is_none_or(|w| t >= w) && added > 0 {
                line.push((t, total));
            }
        }
        growth.insert(repo.clone(), line);
    }

    Report {
        host: host.to_owned(),
        generated: now,
        pairs,
        growth,
    }
}

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d232a;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#5b6770;margin:0 0 1em}
table{border-collapse:collapse;background:#fff}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e7ea;text-align:left;vertical-align:middle;white-space:nowrap}
th{font-weight:600;color:#3a444c;background:#f1f3f5}
.standing{font-weight:700;white-space:nowrap}
tr.overdue .standing,tr.failed .standing,tr.drill-failed .standing{color:#b42318}
tr.ok .standing{color:#1a7f37}
.grid{display:flex;gap:2px}
.grid span{display:block;width:9px;height:18px;border-radius:2px}
.day.ok{background:#2da44e}.day.partial{background:#d4a72c}
.day.failed{background:#cf222e}.day.missing{background:#d0d7de}
.err{color:#b42318;font-size:.85em;min-width:16em;max-width:24em;white-space:normal;font-weight:400}
.num{white-space:nowrap;font-variant-numeric:tabular-nums}
svg{display:inline-block;vertical-align:middle;margin-right:.4em}
.legend span{display:inline-block;width:9px;height:12px;margin:0 .3em 0 .8em;border-radius:2px}
";

/// A small line chart of `values` at their times across the window; empty without data.
fn sparkline(
    points: &[(DateTime<Utc>, f64)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    w: f64,
    h: f64,
    title: &str,
) -> String {
    if points.is_empty() {
        return "<span class=\"num\">–</span>".into();
    }
    let span = (to - from).num_seconds().max(1) as f64;
    let max = points
        .iter()
        .map(|p| p.1)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let xy: Vec<(f64, f64)> = points
        .iter()
        .map(|(t, v)| {
            let x = ((*t - from).num_seconds() as f64 / span).clamp(0.0, 1.0) * (w - 4.0) + 2.0;
            let y = h - 2.0 - (v / max) * (h - 4.0);
            (x, y)
        })
        .collect();
    let mut svg = format!(
        "<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><title>{}</title>",
        esc(title)
    );
    let line: Vec<String> = xy.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#0969da\" stroke-width=\"1.5\" points=\"{}\"/>",
        line.join(" ")
    );
    for (x, y) in &xy {
        let _ = write!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"1.8\" fill=\"#0969da\"/>"
        );
    }
    svg.push_str("</svg>");
    svg
}

fn seconds(s: f64) -> String {
    crate::duration::show(Duration::from_secs_f64(s.max(0.0).round()))
}

/// Renders the report as one HTML document.
pub fn render(report: &Report) -> String {
    let now = report.generated;
    let from = now - chrono::Duration::days(DAYS);
    let mut h = String::new();
    let bad = report
        .pairs
        .iter()
        .filter(|p| p.standing != Standing::Ok)
        .count();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>agex report: {host}</title><style>{STYLE}</style></head><body>\
         <h1>Backups of {host}</h1>\
         <p class=\"meta\" id=\"summary\">{pairs} service × repository pairs, \
         <strong>{bad} need attention</strong>; generated {gen} by agex {ver}</p>",
        host = esc(&report.host),
        pairs = report.pairs.len(),
        gen = when(&now),
        ver = env!("CARGO_PKG_VERSION"),
    );
    let _ = write!(
        h,
        "<p class=\"legend\">Last {DAYS} days (UTC), oldest left:\
         <span class=\"day ok\"></span>ok<span class=\"day partial\"></span>partial\
         <span class=\"day failed\"></span>failed<span class=\"day missing\"></span>no run</p>"
    );
    h.push_str(
        "<table id=\"pairs\"><thead><tr><th>Service</th><th>Repository</th><th>State</th>\
         <th>Last success</th><th>Last 30 days</th><th>Duration</th><th>Added</th>\
         <th>Last drill</th><th>RPO</th><th>RTO</th></tr></thead><tbody>",
    );
    for p in &report.pairs {
        let _ = write!(
            h,
            "<tr class=\"pair {cls}\" data-service=\"{s}\" data-repo=\"{r}\" data-standing=\"{cls}\">\
             <td>{s}</td><td>{r}</td><td class=\"standing\">{label}",
            cls = p.standing.class(),
            s = esc(&p.service),
            r = esc(&p.repo),
            label = p.standing.label(),
        );
        if let Some(e) = &p.last_error {
            let _ = write!(h, "<div class=\"err\">{}</div>", esc(e));
        }
        h.push_str("</td><td class=\"num\">");
        match &p.last_success {
            Some(t) => {
                let _ = write!(h, "{}<br>{}", when(t), ago(t, &now));
            }
            None => h.push_str("never"),
        }
        h.push_str("</td><td><div class=\"grid\">");
        for (d, day) in &p.days {
            let _ = write!(
                h,
                "<span class=\"day {c}\" data-day=\"{d}\" title=\"{d}: {c}\"></span>",
                c = day.class()
            );
        }
        h.push_str("</div></td><td>");
        let durations: Vec<_> = p.points.iter().map(|x| (x.at, x.seconds)).collect();
        let last = p.points.last();
        h.push_str(&sparkline(
            &durations,
            from,
            now,
            110.0,
            26.0,
            "duration per run",
        ));
        if let Some(x) = last {
            let _ = write!(h, "<span class=\"num\">{}</span>", seconds(x.seconds));
        }
        h.push_str("</td><td>");
        let added: Vec<_> = p
            .points
            .iter()
            .filter_map(|x| x.bytes_added.map(|b| (x.at, b as f64)))
            .collect();
        h.push_str(&sparkline(
            &added,
            from,
            now,
            110.0,
            26.0,
            "bytes added per run",
        ));
        if let Some(b) = last.and_then(|x| x.bytes_added) {
            let _ = write!(h, "<span class=\"num\">{}</span>", size(b));
        }
        h.push_str("</td>");
        match &p.drill {
            Some(d) => {
                let when_drilled = parse_time(&d.last_drill)
                    .map(|t| format!("{}<br>{}", when(&t), ago(&t, &now)))
                    .unwrap_or_else(|| esc(&d.last_drill));
                let verdict = if d.result.is_ok() { "passed" } else { "FAILED" };
                let _ = write!(
                    h,
                    "<td class=\"num drill {}\">{verdict} {when_drilled}",
                    esc(d.result.as_str())
                );
                if let Some(e) = d.error.as_deref().filter(|_| !d.result.is_ok()) {
                    let _ = write!(h, "<div class=\"err\">{}</div>", esc(e));
                }
                let _ = write!(
                    h,
                    "</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
                    d.rpo_seconds.map(seconds).unwrap_or_else(|| "–".into()),
                    d.rto_seconds.map(seconds).unwrap_or_else(|| "–".into()),
                );
            }
            None => h.push_str("<td>never</td><td>–</td><td>–</td>"),
        }
        h.push_str("</tr>");
    }
    h.push_str(
        "</tbody></table><h2>Repository growth</h2><table id=\"growth\"><thead><tr>\
                <th>Repository</th><th>Added in the last 30 days</th><th></th></tr></thead><tbody>",
    );
    for (repo, line) in &report.growth {
        let first = line.first().map(|p| p.1).unwrap_or(0);
        let last = line.last().map(|p| p.1).unwrap_or(0);
        let pts: Vec<_> = line.iter().map(|(t, b)| (*t, *b as f64)).collect();
        let _ = write!(
            h,
            "<tr class=\"repo\" data-repo=\"{r}\"><td>{r}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            size(last.saturating_sub(first)),
            sparkline(&pts, from, now, 240.0, 40.0, "bytes added, cumulative"),
            r = esc(repo),
        );
    }
    h.push_str("</tbody></table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            esc("<b>\"a\" & 'b'</b>"),
            "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn a_sparkline_stays_inside_its_box() {
        let now = Utc::now();
        let from = now - chrono::Duration::days(DAYS);
        let pts = vec![(from - chrono::Duration::days(3), 5.0), (now, 10.0)];
        let svg = sparkline(&pts, from, now, 100.0, 20.0, "t");
        assert!(svg.contains("points=\"2.0,10.0 98.0,2.0\""), "{svg}");
        assert!(svg.contains("98.0,2.0"), "{svg}");
        assert_eq!(
            sparkline(&[], from, now, 100.0, 20.0, "t"),
            "<span class=\"num\">–</span>"
        );
    }
}
