//! Time stamps: the Jalali (Solar Hijri) local time the original module wrote into
//! its state file and log lines, the ISO-8601 time ELK wants, and the compact
//! Gregorian form used in backup file names.

use chrono::{DateTime, Datelike, Local, NaiveDateTime, Timelike};
use icu_calendar::cal::Persian;
use icu_calendar::types::Weekday;
use icu_calendar::Date;

/// One instant, rendered every way the project needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamp {
    /// `1403/05/01 12:10 doshanbe` (local time).
    pub jalali: String,
    /// RFC 3339 with the local offset and milliseconds, for `@timestamp`.
    pub iso: String,
    /// `YYYYMMDD_HHMMSS` (local, Gregorian): the backup-name form.
    pub compact: String,
    /// Seconds since the Unix epoch, for machines (metrics, monitoring).
    pub unix: f64,
}

/// The current local time.
pub fn now() -> Stamp {
    stamp(Local::now())
}

pub fn stamp(t: DateTime<Local>) -> Stamp {
    Stamp {
        jalali: jalali(&t.naive_local()),
        iso: t.to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
        compact: t.format("%Y%m%d_%H%M%S").to_string(),
        unix: t.timestamp_micros() as f64 / 1e6,
    }
}

/// Formats a local date-time the way the original module did:
/// `YYYY/MM/DD HH:MM weekday`, the weekday transliterated from Persian.
pub fn jalali(t: &NaiveDateTime) -> String {
    let (year, month, day, weekday) = persian_date(t.year(), t.month() as u8, t.day() as u8);
    format!(
        "{year:04}/{month:02}/{day:02} {:02}:{:02} {}",
        t.hour(),
        t.minute(),
        weekday_name(weekday)
    )
}

/// Converts a Gregorian (ISO) date to the Persian calendar: (year, month, day, weekday).
fn persian_date(year: i32, month: u8, day: u8) -> (i32, u8, u8, Weekday) {
    // chrono only produces valid dates, so the ISO constructor cannot fail here;
    // fall back to the epoch rather than panic inside a logging path.
    let iso = Date::try_new_iso(year, month, day)
        .unwrap_or_else(|_| Date::try_new_iso(1970, 1, 1).expect("epoch is a valid date"));
    let persian = iso.to_calendar(Persian::new());
    (
        persian.year().extended_year(),
        persian.month().ordinal,
        persian.day_of_month().0,
        persian.weekday(),
    )
}

/// The weekday names the original module printed (Persian week starts on Saturday).
pub fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Saturday => "shanbe",
        Weekday::Sunday => "yekshanbe",
        Weekday::Monday => "doshanbe",
        Weekday::Tuesday => "seshanbe",
        Weekday::Wednesday => "chaharshanbe",
        Weekday::Thursday => "panjshanbe",
        Weekday::Friday => "jome",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(y: i32, m: u32, d: u32, hh: u32, mm: u32) -> String {
        jalali(
            &NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(hh, mm, 0)
                .unwrap(),
        )
    }

    #[test]
    fn known_dates_match_the_persian_calendar() {
        assert_eq!(at(2024, 7, 22, 12, 10), "1403/05/01 12:10 doshanbe");
        assert_eq!(at(2024, 3, 20, 0, 0), "1403/01/01 00:00 chaharshanbe");
        assert_eq!(at(2025, 3, 21, 23, 59), "1404/01/01 23:59 jome");
        assert_eq!(at(2024, 7, 20, 8, 5), "1403/04/30 08:05 shanbe");
    }

    #[test]
    fn last_day_of_a_persian_year() {
        // 2024-03-19 is the last day (Esfand 29) of 1402.
        assert_eq!(at(2024, 3, 19, 9, 0), "1402/12/29 09:00 seshanbe");
    }

    #[test]
    fn stamp_forms_agree() {
        let s = now();
        assert_eq!(s.compact.len(), "20240722_121000".len());
        assert!(s.iso.contains('T'));
        assert!(s.jalali.starts_with("14"), "{}", s.jalali);
    }
}
