//! How agex shows times, ages, sizes and ids to people: one format everywhere a person
//! reads (tables, log lines, the HTML report); `--json` keeps the records' own values.

/// A time as people read it everywhere agex prints one: RFC 3339 in UTC, to the second
/// (`2026-12-02T04:12:51Z`). `--json` keeps the records' full precision.
pub fn when<Tz: chrono::TimeZone>(t: &chrono::DateTime<Tz>) -> String {
    t.with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A recorded RFC 3339 time with how long ago it was: `2026-12-02T04:12:51Z (3h ago)`.
/// A string that is not RFC 3339 is shown as it is.
pub fn when_ago(recorded: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(recorded) {
        Ok(t) => format!("{} ({})", when(&t), ago(&t, &chrono::Utc::now())),
        Err(_) => recorded.to_owned(),
    }
}

/// How long before `now` a time was, in its largest whole unit: `just now`, `42s ago`,
/// `17m ago`, `3h ago`, `12d ago`; a time after `now` reads `in 3h`.
pub fn ago<A: chrono::TimeZone, B: chrono::TimeZone>(
    t: &chrono::DateTime<A>,
    now: &chrono::DateTime<B>,
) -> String {
    let secs = now.timestamp() - t.timestamp();
    let n = secs.unsigned_abs();
    let span = match n {
        0..=4 => return "just now".into(),
        5..=119 => format!("{n}s"),
        120..=7_199 => format!("{}m", n / 60),
        7_200..=172_799 => format!("{}h", n / 3600),
        _ => format!("{}d", n / 86_400),
    };
    if secs >= 0 {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

/// A size in binary units, one decimal: `512 B`, `1.5 KiB`, `286.1 MiB`, `1.4 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A count with its noun in the right number: `1 secret`, `2 secrets`, `1 repository`,
/// `3 repositories`, `1 backup policy`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        return format!("1 {noun}");
    }
    match noun.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{n} {stem}ies"),
        _ => format!("{n} {noun}s"),
    }
}

/// A snapshot id as tables show it: the first 8 characters of a Restic id, as restic does;
/// a Borg archive name whole (it is a name, not a hash).
pub fn short_id(id: &str) -> String {
    let is_hash = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hash {
        id[..8].to_owned()
    } else {
        id.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    #[test]
    fn times_read_one_way_with_their_age() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 12, 2, 9, 0, 0).unwrap();
        assert_eq!(when(&t), "2026-12-02T09:00:00Z");
        assert_eq!(ago(&t, &now), "3h ago");
        assert_eq!(ago(&now, &now), "just now");
        assert_eq!(ago(&(now - chrono::Duration::seconds(42)), &now), "42s ago");
        assert_eq!(ago(&(now - chrono::Duration::minutes(17)), &now), "17m ago");
        assert_eq!(ago(&(now - chrono::Duration::days(12)), &now), "12d ago");
        assert_eq!(ago(&(now + chrono::Duration::hours(3)), &now), "in 3h");
        let nanos = "2026-12-02T04:12:51.500491098+00:00";
        assert!(
            when_ago(nanos).starts_with("2026-12-02T04:12:51Z ("),
            "{}",
            when_ago(nanos)
        );
        assert_eq!(when_ago("garbage"), "garbage");
    }

    #[test]
    fn sizes_and_ids_read_short() {
        assert_eq!(count(1, "secret"), "1 secret");
        assert_eq!(count(0, "secret"), "0 secrets");
        assert_eq!(count(2, "repository"), "2 repositories");
        assert_eq!(count(2, "backup policy"), "2 backup policies");
        assert_eq!(count(2, "key"), "2 keys");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(300_006_451), "286.1 MiB");
        let id = "4f2a9c1e".repeat(8);
        assert_eq!(short_id(&id), "4f2a9c1e");
        assert_eq!(
            short_id("vikunja-2026-12-02T04:12:51"),
            "vikunja-2026-12-02T04:12:51"
        );
    }
}
