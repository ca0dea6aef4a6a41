//! Real oracles for cron schedules: for thousands of random cron expressions, the
//! next 20 fire times agex computes equal those of the timer's `OnCalendar=` as
//! `systemd-analyze calendar` computes them and those of the `cron` crate given the
//! expression directly; every expression agex refuses is one systemd cannot express
//! (or no valid cron at all), and the refusal says why.

use std::collections::HashMap;
use std::process::Command;
use std::str::FromStr;

use agex_core::Schedule;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BASE: &str = "2026-02-27 13:37:11";
const ITERATIONS: usize = 20;

/// One random cron field over `lo..=hi`, sometimes out of range or backwards.
fn field(rng: &mut StdRng, lo: u32, hi: u32) -> String {
    let n = |rng: &mut StdRng| {
        if rng.gen_ratio(1, 40) {
            hi + 1 + rng.gen_range(0..3)
        } else {
            rng.gen_range(lo..=hi)
        }
    };
    let one = |rng: &mut StdRng| match rng.gen_range(0..6) {
        0 => "*".to_string(),
        1 => format!("*/{}", rng.gen_range(1..=(hi - lo + 1).min(20))),
        2 => {
            let (a, b) = (n(rng), n(rng));
            let (a, b) = if rng.gen_ratio(1, 10) {
                (a.max(b), a.min(b))
            } else {
                (a.min(b), a.max(b))
            };
            format!("{a}-{b}")
        }
        3 => {
            let (a, b) = (n(rng), n(rng));
            format!("{}-{}/{}", a.min(b), a.max(b), rng.gen_range(1..=5))
        }
        4 => format!("{}/{}", n(rng), rng.gen_range(1..=15)),
        _ => n(rng).to_string(),
    };
    let parts = if rng.gen_ratio(1, 4) {
        rng.gen_range(2..=3)
    } else {
        1
    };
    let mut v: Vec<String> = (0..parts).map(|_| one(rng)).collect();
    if v.len() > 1 {
        v.retain(|p| p != "*");
        if v.is_empty() {
            v.push(n(rng).to_string());
        }
    }
    v.join(",")
}

/// A cron day of week: numbers 0-7, names, ranges, lists, rarely a step.
fn weekday(rng: &mut StdRng) -> String {
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    match rng.gen_range(0..10) {
        0..=3 => "*".into(),
        4 => format!("*/{}", rng.gen_range(1..4)),
        5 => NAMES[rng.gen_range(0..7)].to_string(),
        6 => {
            let (a, b) = (rng.gen_range(0..7), rng.gen_range(0..7));
            format!("{}-{}", NAMES[a.min(b)], NAMES[a.max(b)])
        }
        _ => field(rng, 0, 7),
    }
}

fn expression(rng: &mut StdRng) -> String {
    let seconds = rng.gen_ratio(1, 5).then(|| field(rng, 0, 59));
    let dom = if rng.gen_ratio(2, 3) {
        "*".to_string()
    } else {
        field(rng, 1, 31)
    };
    let month = match rng.gen_range(0..12) {
        0 => "jan".to_string(),
        1..=6 => "*".to_string(),
        _ => field(rng, 1, 12),
    };
    let dow = if dom != "*" && rng.gen_ratio(5, 6) {
        "*".to_string()
    } else {
        weekday(rng)
    };
    // Dense fields are rarer, so the 20 fire times span days and months too.
    let minute = if rng.gen_ratio(1, 3) {
        rng.gen_range(0..60).to_string()
    } else {
        field(rng, 0, 59)
    };
    let hour = if rng.gen_ratio(1, 3) {
        rng.gen_range(0..24).to_string()
    } else {
        field(rng, 0, 23)
    };
    let five = format!("{minute} {hour} {dom} {month} {dow}");
    match seconds {
        Some(s) => format!("{s} {five}"),
        None => five,
    }
}

/// Why systemd cannot say what a cron expression says (or why it is no cron at all),
/// judged by the expression alone; empty when it must be accepted.
fn inexpressible(expr: &str) -> Vec<&'static str> {
    let mut why = Vec::new();
    let f: Vec<&str> = expr.split(' ').collect();
    let f = if f.len() == 6 { &f[1..] } else { &f[..] };
    let bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    let sec: Vec<&str> = expr.split(' ').collect();
    let mut fields: Vec<(&str, (u32, u32))> = f.iter().copied().zip(bounds).collect();
    if sec.len() == 6 {
        fields.push((sec[0], (0, 59)));
    }
    for (field, (lo, hi)) in &fields {
        for part in field.split(',') {
            let range = part.split('/').next().unwrap_or_default();
            let ends: Vec<&str> = range.split('-').collect();
            for e in &ends {
                if let Ok(v) = e.parse::<u32>() {
                    if v < *lo || v > *hi {
                        why.push("out of range");
                    }
                }
            }
        }
    }
    if f[3].chars().any(|c| c.is_ascii_alphabetic()) {
        why.push("month numbers");
    }
    if f[2] != "*" && f[4] != "*" {
        why.push("restricts both day of month and day of week");
    }
    if f[4].contains('/') {
        why.push("with a step");
    }
    for (field, _) in &fields {
        for part in field.split(',') {
            let range = part.split('/').next().unwrap_or_default();
            if let Some((a, b)) = range.split_once('-') {
                let num = |d: &str| {
                    d.parse::<u32>().ok().or_else(|| {
                        ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
                            .iter()
                            .position(|n| *n == d)
                            .map(|p| p as u32)
                    })
                };
                if num(a) > num(b) {
                    why.push("backwards");
                }
            }
        }
    }
    why
}

/// The cron crate's reading of a standard cron expression: a seconds field in front
/// when there is none, and Vixie cron's weekday numbers (0 and 7 Sunday) as names.
/// `None` where the crate refuses a step longer than its field (`3/13` in months),
/// which systemd alone then judges.
fn cron_crate_times(expr: &str, base: DateTime<Utc>) -> Option<Vec<DateTime<Utc>>> {
    const NAMES: [&str; 8] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let mut f: Vec<String> = expr.split(' ').map(str::to_string).collect();
    if f.len() == 5 {
        f.insert(0, "0".into());
    }
    if f[5] != "*" {
        let mut days: Vec<&str> = Vec::new();
        for part in f[5].split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let num = |d: &str| {
                d.parse::<usize>().unwrap_or_else(|_| {
                    NAMES
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(d))
                        .unwrap()
                })
            };
            days.extend(&NAMES[num(a)..=num(b)]);
        }
        f[5] = days.join(",");
    }
    let schedule = cron::Schedule::from_str(&f.join(" ")).ok()?;
    Some(schedule.after(&base).take(ITERATIONS).collect())
}

/// `systemd-analyze calendar` over many OnCalendar expressions at once: each
/// expression's next fire times after BASE (UTC), keyed by the expression.
fn systemd_times(specs: &[String]) -> HashMap<String, Vec<DateTime<Utc>>> {
    let out = Command::new("systemd-analyze")
        .env("TZ", "UTC")
        .arg("calendar")
        .arg(format!("--iterations={ITERATIONS}"))
        .arg(format!("--base-time={BASE} UTC"))
        .args(specs)
        .output()
        .expect("systemd-analyze");
    // One block per expression it could parse, in order (its "Original form" line only
    // when normalising changed it); stderr names those it could not.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let refused: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("Failed to parse calendar specification '"))
        .filter_map(|l| l.split("':").next())
        .collect();
    let mut parsed = specs.iter().filter(|s| !refused.contains(&s.as_str()));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let spec = parsed.next().expect("a block per parsed expression");
        // The same expression twice in a batch gives two equal blocks: keep one.
        let times = map.entry(spec.clone()).or_default();
        times.clear();
        for line in block.lines() {
            let Some((key, value)) = line.trim().split_once(": ") else {
                continue;
            };
            if key == "Next elapse" || key.starts_with("Iter. #") {
                // "Thu 2026-01-01 00:10:00 UTC"
                let t = value.get(4..23).expect("systemd time");
                let t = chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S")
                    .expect("systemd time format")
                    .and_utc();
                times.push(t);
            }
        }
    }
    map
}

#[test]
fn cron_schedules_fire_when_systemd_and_the_cron_crate_say() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !have {
        eprintln!(
            "SKIP cron_schedules_fire_when_systemd_and_the_cron_crate_say: no systemd-analyze"
        );
        return;
    }
    let count: usize = std::env::var("AGEX_SCHEDULE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("AGEX_SCHEDULE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (AGEX_SCHEDULE_SEED), {count} expressions");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = chrono::NaiveDateTime::parse_from_str(BASE, "%Y-%m-%d %H:%M:%S")
        .unwrap()
        .and_utc();
    let mut accepted: Vec<(String, Schedule)> = Vec::new();
    let mut problems = Vec::new();
    let mut refused = 0;
    let mut only_systemd = 0;
    for _ in 0..count {
        let expr = expression(&mut rng);
        let why = inexpressible(&expr);
        match Schedule::from_str(&expr) {
            Ok(s) if why.is_empty() => accepted.push((expr, s)),
            Ok(s) => problems.push(format!(
                "`{expr}` accepted as `{}`, but it is {why:?}",
                s.on_calendar()
            )),
            Err(e) if !why.is_empty() => {
                refused += 1;
                if !why.iter().any(|w| e.to_string().contains(w)) {
                    problems.push(format!(
                        "`{expr}` refused without saying one of {why:?}: {e}"
                    ));
                }
            }
            Err(e) => {
                if e.to_string().contains("never fires") {
                    refused += 1;
                } else {
                    problems.push(format!("`{expr}` refused: {e}"));
                }
            }
        }
    }
    for chunk in accepted.chunks(200) {
        let specs: Vec<String> = chunk
            .iter()
            .map(|(_, s)| s.on_calendar().to_string())
            .collect();
        let systemd = systemd_times(&specs);
        for (expr, schedule) in chunk {
            let agex = schedule.next_after(&base, ITERATIONS);
            let crate_times = cron_crate_times(expr, base);
            let timer = systemd.get(schedule.on_calendar());
            if timer.is_none() {
                problems.push(format!(
                    "`{expr}`: systemd refuses OnCalendar={}",
                    schedule.on_calendar()
                ));
            } else if timer != Some(&agex) {
                problems.push(format!(
                    "`{expr}` (OnCalendar={}): agex {:?} != systemd {:?}",
                    schedule.on_calendar(),
                    agex.first(),
                    timer.and_then(|t| t.iter().zip(&agex).find(|(a, b)| a != b))
                ));
            }
            match crate_times {
                Some(times) if times != agex => {
                    problems.push(format!("`{expr}`: agex != the cron crate"))
                }
                Some(_) => {}
                None => only_systemd += 1,
            }
        }
    }
    eprintln!(
        "{} accepted and checked ({only_systemd} against systemd only), {refused} refused",
        accepted.len()
    );
    assert!(
        accepted.len() > count / 3,
        "too few accepted: {}",
        accepted.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems (seed {seed}):\n{}",
        problems.len(),
        problems[..problems.len().min(40)].join("\n")
    );
}
