//! A schedule expression (OnCalendar or cron) as policies and `agex schedule` read it;
//! what parses renders an `OnCalendar=` line and strictly increasing next runs.
#![no_main]

use std::str::FromStr;

use agex_core::Schedule;
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(schedule) = Schedule::from_str(text) else {
        return;
    };
    let _ = schedule.on_calendar();
    let _ = schedule.sub_minute();
    let _ = schedule.period();
    let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let next = schedule.next_after(&base, 20);
    assert!(next.windows(2).all(|w| w[0] < w[1]), "next runs out of order: {next:?}");
    assert!(next.iter().all(|t| *t > base), "a next run at or before the base time");
});
