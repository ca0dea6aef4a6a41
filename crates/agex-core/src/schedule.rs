//! Job schedules: systemd `OnCalendar` expressions or 5/6-field cron expressions, parsed
//! into one type that computes next runs (for `agex daemon` and `agex schedule`) and
//! renders an `OnCalendar=` line (for systemd timers).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone};

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    on_calendar: String,
    cron: cron::Schedule,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.on_calendar == other.on_calendar
    }
}

impl Eq for Schedule {}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a schedule expression was refused, worded for the line of the config that holds it.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Nothing but whitespace.
    #[error("empty schedule")]
    Empty,
    /// A zero or unreadable step in a cron field.
    #[error("cron {what} `{field}`: bad step `{step}`")]
    CronStep {
        /// The field's name.
        what: &'static str,
        /// The field.
        field: String,
        /// The step.
        step: String,
    },
    /// A cron range from a larger to a smaller value.
    #[error("cron {what} `{field}`: range `{range}` goes backwards")]
    CronBackwards {
        /// The field's name.
        what: &'static str,
        /// The field.
        field: String,
        /// The range.
        range: String,
    },
    /// A cron value outside its field's range.
    #[error("cron {what} `{field}` is out of range ({lo}-{hi})")]
    CronOutOfRange {
        /// The field's name.
        what: &'static str,
        /// The field.
        field: String,
        /// The smallest value.
        lo: u32,
        /// The largest value.
        hi: u32,
    },
    /// A day-of-week value that names no day.
    #[error("cron day of week `{field}`: `{day}` is no day (0-7 or Sun..Sat)")]
    CronNoDay {
        /// The field.
        field: String,
        /// The value.
        day: String,
    },
    /// Both day fields restricted: cron ORs them, a systemd timer cannot.
    #[error(
        "cron `{0}` restricts both day of month and day of week, which cron joins with OR \
         and a systemd timer cannot; split it into two schedules or use OnCalendar"
    )]
    CronBothDays(String),
    /// A stepped day of week, which OnCalendar cannot say.
    #[error("cron day of week `{0}` with a step has no systemd OnCalendar form; list the days")]
    CronWeekdayStep(String),
    /// Month names, which the timer would not say the same way.
    #[error("cron month `{0}`: use month numbers (1-12) so the timer says the same")]
    CronMonthName(String),
    /// An OnCalendar expression agex cannot read.
    #[error("`{text}` is not a valid OnCalendar expression: {why}")]
    Calendar {
        /// The expression.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// The translated expression was refused by the cron crate.
    #[error("`{text}` is not a valid schedule ({source})")]
    Invalid {
        /// The expression.
        text: String,
        /// The cron crate's reason.
        source: cron::error::Error,
    },
    /// A valid expression with no time to come (a date in the past, the 31st of February).
    #[error("`{0}` never fires")]
    NeverFires(String),
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    /// Accepts cron (`0 3 * * *`, or with a leading seconds field `*/1 * * * * *`) or
    /// OnCalendar (`*-*-* 03:00:00`, `daily`, `Mon..Fri 02:30`, `*:*:0/1`).
    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        let text = s.trim();
        if text.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let fields: Vec<&str> = text.split_whitespace().collect();
        let looks_cron =
            matches!(fields.len(), 5 | 6) && !text.contains(':') && !text.contains("..");
        let (cron_expr, on_calendar) = if looks_cron {
            from_cron(&fields)?
        } else {
            from_calendar(text)?
        };
        let cron =
            cron::Schedule::from_str(&cron_expr).map_err(|source| ScheduleError::Invalid {
                text: text.to_string(),
                source,
            })?;
        if cron.upcoming(chrono::Utc).next().is_none() {
            return Err(ScheduleError::NeverFires(text.to_string()));
        }
        Ok(Schedule {
            text: text.to_string(),
            on_calendar,
            cron,
        })
    }
}

impl Schedule {
    /// The expression as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The systemd `OnCalendar=` value.
    pub fn on_calendar(&self) -> &str {
        &self.on_calendar
    }

    /// The next `n` fire times strictly after `after`.
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>, n: usize) -> Vec<DateTime<Tz>> {
        self.cron.after(after).take(n).collect()
    }

    /// Whether the schedule can fire more often than once a minute (then a systemd
    /// timer's accuracy must be raised to match).
    pub fn sub_minute(&self) -> bool {
        self.period()
            .is_some_and(|p| p < chrono::Duration::minutes(1))
    }

    /// The typical time between runs (from the next two fire times), for overdue checks.
    pub fn period(&self) -> Option<chrono::Duration> {
        let now = chrono::Utc::now();
        let next = self.next_after(&now, 3);
        (next.len() >= 3).then(|| next[2] - next[1])
    }
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Cron `[S] M H DOM MON DOW` → (cron crate expression with seconds, OnCalendar).
/// Errors when systemd cannot say the same thing.
fn from_cron(all: &[&str]) -> Result<(String, String), ScheduleError> {
    let (sec, f) = match all {
        [s, rest @ ..] if all.len() == 6 => (*s, rest),
        _ => ("0", all),
    };
    let check = |field: &str, what: &'static str, lo: u32, hi: u32| -> Result<(), ScheduleError> {
        for part in field.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, ""));
            if !step.is_empty() && step.parse::<u32>().map_or(true, |s| s == 0) {
                return Err(ScheduleError::CronStep {
                    what,
                    field: field.to_string(),
                    step: step.to_string(),
                });
            }
            if range == "*" {
                continue;
            }
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if a > b {
                        return Err(ScheduleError::CronBackwards {
                            what,
                            field: field.to_string(),
                            range: range.to_string(),
                        });
                    }
                }
            }
            for n in range.split('-') {
                let ok = match n.parse::<u32>() {
                    Ok(v) => (lo..=hi).contains(&v),
                    Err(_) => {
                        what == "day of week" && DAYS.iter().any(|d| d.eq_ignore_ascii_case(n))
                            || what == "month"
                                && n.len() == 3
                                && n.chars().all(|c| c.is_ascii_alphabetic())
                    }
                };
                if !ok {
                    return Err(ScheduleError::CronOutOfRange {
                        what,
                        field: field.to_string(),
                        lo,
                        hi,
                    });
                }
            }
        }
        Ok(())
    };
    check(sec, "second", 0, 59)?;
    check(f[0], "minute", 0, 59)?;
    check(f[1], "hour", 0, 23)?;
    check(f[2], "day of month", 1, 31)?;
    check(f[3], "month", 1, 12)?;
    check(f[4], "day of week", 0, 7)?;
    if f[2] != "*" && f[4] != "*" {
        return Err(ScheduleError::CronBothDays(all.join(" ")));
    }
    if f[4].contains('/') {
        return Err(ScheduleError::CronWeekdayStep(f[4].to_string()));
    }
    if f[3].chars().any(|c| c.is_ascii_alphabetic()) {
        return Err(ScheduleError::CronMonthName(f[3].to_string()));
    }
    let (dow, cal_dow) = if f[4] == "*" {
        ("*".to_string(), String::new())
    } else {
        let days = weekdays(f[4])?;
        (days.cron, format!("{} ", days.on_calendar))
    };
    let cron_expr = format!(
        "{} {} {} {} {} {dow}",
        crate_steps(sec, 0, 59),
        crate_steps(f[0], 0, 59),
        crate_steps(f[1], 0, 23),
        crate_steps(f[2], 1, 31),
        crate_steps(f[3], 1, 12),
    );
    let on_calendar = format!(
        "{cal_dow}*-{}-{} {}:{}:{}",
        listed(f[3], 1, 12, "-"),
        listed(f[2], 1, 31, "-"),
        listed(f[1], 0, 23, "-"),
        listed(f[0], 0, 59, "-"),
        if sec == "0" {
            "00".to_string()
        } else {
            listed(sec, 0, 59, "-")
        }
    );
    Ok((cron_expr, on_calendar))
}

/// A cron or OnCalendar field (ranges written with `sep`) for an `OnCalendar=` line,
/// with every repetition spelled out as its values: `0/11` in hours is 0, 11 and 22 each
/// day for cron and in systemd's documentation, but systemd 252 carries a repetition
/// that does not divide its field into the next day (after 22:00 comes 11:00, not
/// 00:00), and refuses one whose second value would not fit (`23/1`). A list means the
/// same to every version.
fn listed(field: &str, lo: u32, hi: u32, sep: &str) -> String {
    let parts: Vec<String> = field
        .split(',')
        .map(|part| {
            let Some((range, step)) = part.split_once('/') else {
                // systemd refuses a range of one value (`5..5`).
                return match part.split_once(sep) {
                    Some((a, b)) if a == b => a.to_string(),
                    _ => part.replace(sep, ".."),
                };
            };
            let Ok(step) = step.parse::<u32>() else {
                return part.replace(sep, "..");
            };
            let (from, to) = match range.split_once(sep) {
                _ if range == "*" => (Ok(lo), Ok(hi)),
                Some((a, b)) => (a.parse::<u32>(), b.parse::<u32>()),
                None => (range.parse::<u32>(), Ok(hi)),
            };
            match (from, to) {
                (Ok(from), Ok(to)) if step == 1 && from == lo && to == hi => "*".to_string(),
                (Ok(from), Ok(to)) if step > 0 => (from..=to)
                    .step_by(step as usize)
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                _ => part.replace(sep, ".."),
            }
        })
        .collect();
    // systemd refuses `*` within a list; a list holding every value is `*`.
    if parts.iter().any(|p| p == "*") {
        "*".to_string()
    } else {
        parts.join(",")
    }
}

/// A cron field as the cron crate takes it. A step longer than the field (`6/13` in
/// months) fires once, at its start, for cron and for systemd; the cron crate refuses
/// steps above the field's largest value, so such a part is written as its start.
fn crate_steps(field: &str, lo: u32, hi: u32) -> String {
    field
        .split(',')
        .map(|part| match part.split_once('/') {
            Some((range, step)) if step.parse::<u32>().is_ok_and(|s| s > hi) => {
                let start = range.split('-').next().unwrap_or(range);
                if start == "*" {
                    lo.to_string()
                } else {
                    start.to_string()
                }
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A cron day-of-week field as the cron crate's and systemd's lists of day names.
struct Weekdays {
    cron: String,
    on_calendar: String,
}

/// Expands cron's day of week (0-7 from Sunday, or names; lists and ranges) into the
/// set of days. Both outputs list the days from Monday: a cron range across the end of
/// systemd's week (`0-3`, Sunday to Wednesday) is no valid `Sun..Wed` for systemd.
fn weekdays(field: &str) -> Result<Weekdays, ScheduleError> {
    // Index 0 is Monday, as in systemd's week and in DAYS.
    let day = |d: &str| -> Result<usize, ScheduleError> {
        match d.parse::<usize>() {
            Ok(n) if n <= 7 => Ok((n + 6) % 7),
            _ => DAYS
                .iter()
                .position(|n| n.eq_ignore_ascii_case(d))
                .ok_or_else(|| ScheduleError::CronNoDay {
                    field: field.to_string(),
                    day: d.to_string(),
                }),
        }
    };
    // cron's own order (Sunday first, 7 also Sunday), to tell a backwards range.
    let cron_order = |d: &str, i: usize| if d == "7" { 7 } else { (i + 1) % 7 };
    let mut set = [false; 7];
    for part in field.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (from, to) = (day(a)?, day(b)?);
        let (lo, hi) = (cron_order(a, from), cron_order(b, to));
        if lo > hi {
            return Err(ScheduleError::CronBackwards {
                what: "day of week",
                field: field.to_string(),
                range: part.to_string(),
            });
        }
        for d in lo..=hi {
            set[(d + 6) % 7] = true;
        }
    }
    let mut names = Vec::new();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < 7 {
        if !set[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < 7 && set[i + 1] {
            i += 1;
        }
        names.extend(DAYS[start..=i].iter().copied());
        runs.push(if start == i {
            DAYS[i].to_string()
        } else {
            format!("{}..{}", DAYS[start], DAYS[i])
        });
        i += 1;
    }
    Ok(Weekdays {
        cron: names.join(","),
        on_calendar: runs.join(","),
    })
}

/// OnCalendar → (cron crate expression with seconds, normalised OnCalendar).
fn from_calendar(text: &str) -> Result<(String, String), ScheduleError> {
    let expanded = match text.to_ascii_lowercase().as_str() {
        "minutely" => "*-*-* *:*:00".to_string(),
        "hourly" => "*-*-* *:00:00".to_string(),
        "daily" => "*-*-* 00:00:00".to_string(),
        "weekly" => "Mon *-*-* 00:00:00".to_string(),
        "monthly" => "*-*-01 00:00:00".to_string(),
        "yearly" | "annually" => "*-01-01 00:00:00".to_string(),
        "quarterly" => "*-01,04,07,10-01 00:00:00".to_string(),
        "semiannually" => "*-01,07-01 00:00:00".to_string(),
        _ => text.to_string(),
    };
    let bad = |why: &str| ScheduleError::Calendar {
        text: text.to_string(),
        why: why.to_string(),
    };
    let mut parts: Vec<&str> = expanded.split_whitespace().collect();
    let mut dow = "*".to_string();
    if let Some(first) = parts.first() {
        if first
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        {
            dow = first
                .split(',')
                .map(|p| {
                    p.split("..")
                        .map(|d| {
                            DAYS.iter()
                                .find(|n| d.get(..3).is_some_and(|p| n.eq_ignore_ascii_case(p)))
                                .map(|n| n.to_string())
                                .ok_or_else(|| bad(&format!("unknown weekday `{d}`")))
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(|v| v.join("-"))
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(",");
            parts.remove(0);
        }
    }
    let (date, time) = match parts.as_slice() {
        [] => ("*-*-*", "00:00:00"),
        [one] if one.contains(':') => ("*-*-*", *one),
        [one] => (*one, "00:00:00"),
        [d, t] => (*d, *t),
        _ => return Err(bad("expected `[WEEKDAY] [YYYY-MM-DD] [HH:MM[:SS]]`")),
    };
    let date_parts: Vec<&str> = date.split('-').collect();
    let (year, month, day) = match date_parts.as_slice() {
        [y, m, d] => (*y, *m, *d),
        [m, d] => ("*", *m, *d),
        _ => return Err(bad("the date must be `YYYY-MM-DD` or `MM-DD`")),
    };
    let time_parts: Vec<&str> = time.split(':').collect();
    let (hour, minute, second) = match time_parts.as_slice() {
        [h, m] => (*h, *m, "00"),
        [h, m, s] => (*h, *m, *s),
        _ => return Err(bad("the time must be `HH:MM` or `HH:MM:SS`")),
    };
    let field = |v: &str, what: &str, lo: u32, hi: u32| -> Result<String, ScheduleError> {
        let mut out = Vec::new();
        for part in v.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    if s.parse::<u32>().map_or(true, |s| s == 0) {
                        return Err(bad(&format!("bad repetition `/{s}` in the {what}")));
                    }
                    if r == "*" {
                        return Err(bad(&format!(
                            "systemd has no `*/{s}` in the {what}: write `{lo}/{s}`"
                        )));
                    }
                    (r, Some(s))
                }
                None => (part, None),
            };
            if range != "*" {
                for n in range.split("..") {
                    let v: u32 = n
                        .parse()
                        .map_err(|_| bad(&format!("`{n}` is not a number in the {what}")))?;
                    if !(lo..=hi).contains(&v) {
                        return Err(bad(&format!("{what} {v} is out of range ({lo}-{hi})")));
                    }
                }
            }
            let r = range.replace("..", "-");
            out.push(match step {
                Some(s) => format!("{r}/{s}"),
                None => r,
            });
        }
        Ok(out.join(","))
    };
    let cron_expr = format!(
        "{} {} {} {} {} {} {}",
        field(second, "seconds", 0, 59)?,
        field(minute, "minute", 0, 59)?,
        field(hour, "hour", 0, 23)?,
        field(day, "day", 1, 31)?,
        field(month, "month", 1, 12)?,
        dow,
        field(year, "year", 1970, 2099)?,
    );
    let (month, day) = (listed(month, 1, 12, ".."), listed(day, 1, 31, ".."));
    let (hour, minute) = (listed(hour, 0, 23, ".."), listed(minute, 0, 59, ".."));
    let second = listed(second, 0, 59, "..");
    let on_calendar = if dow == "*" {
        format!("{year}-{month}-{day} {hour}:{minute}:{second}")
    } else {
        format!(
            "{} {year}-{month}-{day} {hour}:{minute}:{second}",
            dow.replace('-', "..")
        )
    };
    Ok((cron_expr, on_calendar))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike, Utc};

    #[test]
    fn oncalendar_and_cron_agree() {
        let a: Schedule = "*-*-* 03:00:00".parse().unwrap();
        let b: Schedule = "0 3 * * *".parse().unwrap();
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        assert_eq!(a.next_after(&start, 3), b.next_after(&start, 3));
        assert_eq!(a.next_after(&start, 1)[0].hour(), 3);
        assert_eq!(b.on_calendar(), "*-*-* 3:0:00");
    }

    #[test]
    fn shorthands_and_weekdays() {
        let w: Schedule = "weekly".parse().unwrap();
        assert_eq!(w.on_calendar(), "Mon *-*-* 00:00:00");
        let d: Schedule = "Mon..Fri 02:30".parse().unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap(); // a Saturday
        let next = d.next_after(&start, 1)[0];
        assert_eq!(next.format("%a %H:%M").to_string(), "Mon 02:30");
        let every: Schedule = "*-*-* *:*:0/1".parse().unwrap();
        assert_eq!(every.period(), Some(chrono::Duration::seconds(1)));
        assert!(every.sub_minute());
    }

    #[test]
    fn cron_steps_and_seconds_become_systemd_repetitions() {
        let q: Schedule = "*/15 * * * *".parse().unwrap();
        assert_eq!(q.on_calendar(), "*-*-* *:0,15,30,45:00");
        let s: Schedule = "*/20 * * * * *".parse().unwrap();
        assert_eq!(s.on_calendar(), "*-*-* *:*:0,20,40");
        let h: Schedule = "13 */11 * * *".parse().unwrap();
        assert_eq!(h.on_calendar(), "*-*-* 0,11,22:13:00");
        let c: Schedule = "*-*-* 20/3:00".parse().unwrap();
        assert_eq!(c.on_calendar(), "*-*-* 20,23:00:00");
        let s: Schedule = "*/2 * * * * *".parse().unwrap();
        assert_eq!(s.period(), Some(chrono::Duration::seconds(2)));
        let w: Schedule = "30 4 * * 1-5".parse().unwrap();
        assert_eq!(w.on_calendar(), "Mon..Fri *-*-* 4:30:00");
    }

    #[test]
    fn rejects_bad_expressions() {
        for bad in [
            "",
            "61 * * * *",
            "0 24 * * *",
            "*-*-* 25:00",
            "Funday 03:00",
            "* * *",
            "*-13-01 00:00",
            "*/0 * * * *",
            "0 3 1 * 1",
            "*-*-* *:*/15:00",
            "0 3 * * */2",
            "2199-01-01 00:00:00",
            // A multi-byte character inside a weekday's first three bytes (found by
            // fuzz/ schedule: it panicked slicing the name).
            "p0\u{5db}aily94 1 1",
            "Mo\u{e9} 03:00",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad} accepted");
        }
    }
}
