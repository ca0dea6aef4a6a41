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

impl FromStr for Schedule {
    type Err = String;

    /// Accepts cron (`0 3 * * *`, or with a leading seconds field `*/1 * * * * *`) or
    /// OnCalendar (`*-*-* 03:00:00`, `daily`, `Mon..Fri 02:30`, `*:*:0/1`).
    fn from_str(s: &str) -> Result<Schedule, String> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty schedule".into());
        }
        let fields: Vec<&str> = text.split_whitespace().collect();
        let looks_cron =
            matches!(fields.len(), 5 | 6) && !text.contains(':') && !text.contains("..");
        let (cron_expr, on_calendar) = if looks_cron {
            from_cron(&fields)?
        } else {
            from_calendar(text)?
        };
        let cron = cron::Schedule::from_str(&cron_expr)
            .map_err(|e| format!("`{text}` is not a valid schedule ({e})"))?;
        if cron.upcoming(chrono::Utc).next().is_none() {
            return Err(format!("`{text}` never fires"));
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
fn from_cron(all: &[&str]) -> Result<(String, String), String> {
    let (sec, f) = match all {
        [s, rest @ ..] if all.len() == 6 => (*s, rest),
        _ => ("0", all),
    };
    let check = |field: &str, what: &str, lo: u32, hi: u32| -> Result<(), String> {
        for part in field.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, ""));
            if !step.is_empty() && step.parse::<u32>().map_or(true, |s| s == 0) {
                return Err(format!("cron {what} `{field}`: bad step `{step}`"));
            }
            if range == "*" {
                continue;
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
                    return Err(format!("cron {what} `{field}` is out of range ({lo}-{hi})"));
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
    // cron numbers weekdays 0-7 from Sunday; the cron crate wants names for clarity.
    let dow = if f[4] == "*" {
        "*".to_string()
    } else {
        f[4].split(',')
            .map(|p| {
                p.split('-')
                    .map(|d| match d.parse::<usize>() {
                        Ok(n) => DAYS[(n + 6) % 7].to_string(),
                        Err(_) => d.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("-")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    if f[2] != "*" && f[4] != "*" {
        return Err(format!(
            "cron `{}` restricts both day of month and day of week, which cron joins with OR \
             and a systemd timer cannot; split it into two schedules or use OnCalendar",
            all.join(" ")
        ));
    }
    if f[4].contains('/') {
        return Err(format!(
            "cron day of week `{}` with a step has no systemd OnCalendar form; list the days",
            f[4]
        ));
    }
    if f[3].chars().any(|c| c.is_ascii_alphabetic()) {
        return Err(format!(
            "cron month `{}`: use month numbers (1-12) so the timer says the same",
            f[3]
        ));
    }
    let cron_expr = format!("{sec} {} {} {} {} {}", f[0], f[1], f[2], f[3], dow);
    let cal_dow = if dow == "*" {
        String::new()
    } else {
        format!("{} ", dow.replace('-', ".."))
    };
    // systemd has no `*/N`: a repetition starts at the field's first value.
    let cal = |s: &str, first: &str| {
        s.split(',')
            .map(|p| match p.strip_prefix("*/") {
                Some(step) => format!("{first}/{step}"),
                None => p.replace('-', ".."),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let on_calendar = format!(
        "{cal_dow}*-{}-{} {}:{}:{}",
        cal(f[3], "1"),
        cal(f[2], "1"),
        cal(f[1], "0"),
        cal(f[0], "0"),
        if sec == "0" {
            "00".to_string()
        } else {
            cal(sec, "0")
        }
    );
    Ok((cron_expr, on_calendar))
}

/// OnCalendar → (cron crate expression with seconds, normalised OnCalendar).
fn from_calendar(text: &str) -> Result<(String, String), String> {
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
    let bad = |why: &str| format!("`{text}` is not a valid OnCalendar expression: {why}");
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
                                .find(|n| d.len() >= 3 && n.eq_ignore_ascii_case(&d[..3]))
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
    let field = |v: &str, what: &str, lo: u32, hi: u32| -> Result<String, String> {
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
        assert_eq!(q.on_calendar(), "*-*-* *:0/15:00");
        let s: Schedule = "*/2 * * * * *".parse().unwrap();
        assert_eq!(s.on_calendar(), "*-*-* *:*:0/2");
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
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad} accepted");
        }
    }
}
