//! Hand-written time arithmetic: FHIR instants, UTC formatting and Europe/London (GMT/BST) offsets.
//!
//! Calendar arithmetic is Howard Hinnant's `days_from_civil` / `civil_from_days` (proleptic Gregorian), so
//! every function is total: malformed input gives `None`, never a panic.

pub(crate) const MS_PER_MINUTE: i64 = 60_000;
pub(crate) const MINUTES_PER_DAY: i64 = 1_440;
const MS_PER_HOUR: i64 = 60 * MS_PER_MINUTE;
pub(crate) const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

pub(crate) fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub(crate) fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1..=12, day 1..=31 unchecked).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (year, month, day).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // m is in 1..=12 and d in 1..=31 by construction.
    (y, m as u32, d as u32)
}

/// Day of week of a day number: 0 = Monday .. 6 = Sunday (1970-01-01 was a Thursday).
pub(crate) fn weekday_index(days: i64) -> u32 {
    (days + 3).rem_euclid(7) as u32
}

/// `n` ASCII digits at `at`, as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(n)?)?;
    s.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn byte_is(b: &[u8], at: usize, want: u8) -> bool {
    b.get(at) == Some(&want)
}

/// Parse a FHIR `instant` — `YYYY-MM-DDThh:mm:ss[.f+](Z|±hh:mm)` — into ms since the epoch (UTC).
///
/// Seconds and the offset are required, as FHIR requires them for `instant`. Fraction digits below the
/// millisecond are truncated; a leap second `:60` is read as the first instant of the next minute. Years
/// 0001-9999 and offsets up to ±14:00 are accepted. Anything else gives `None`.
pub fn parse_instant_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    let separators_ok = byte_is(b, 4, b'-')
        && byte_is(b, 7, b'-')
        && byte_is(b, 10, b'T')
        && byte_is(b, 13, b':')
        && byte_is(b, 16, b':');
    let year = i64::from(year);
    if !separators_ok
        || year == 0
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut at = 19;
    let mut millis = 0i64;
    if byte_is(b, at, b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b.get(at).map_or(0, |c| c - b'0'));
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_minutes: i64 = match b.get(at) {
        Some(b'Z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let oh = digits(b, at + 1, 2)?;
            let om = digits(b, at + 4, 2)?;
            if !byte_is(b, at + 3, b':') || om > 59 || oh * 60 + om > 14 * 60 {
                return None;
            }
            at += 6;
            let v = i64::from(oh * 60 + om);
            if *sign == b'-' { -v } else { v }
        }
        _ => return None,
    };
    if at != b.len() {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let local_ms = days * MS_PER_DAY
        + i64::from(hour) * MS_PER_HOUR
        + i64::from(minute) * MS_PER_MINUTE
        + i64::from(second) * 1_000
        + millis;
    Some(local_ms - offset_minutes * MS_PER_MINUTE)
}

/// Format ms since the epoch as `YYYY-MM-DDThh:mm:ssZ` (UTC, sub-second part dropped, rounding down).
/// Meaningful for years 0001-9999.
pub fn format_instant_utc(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY) / 1_000;
    let (y, m, d) = civil_from_days(days);
    // Digit by digit: `format!` cost about 2,600 instructions per call, on the store's writer thread (every
    // slot and appointment written formats its instants).
    let mut out = String::with_capacity(20);
    if (0..=9999).contains(&y) {
        push_digits(&mut out, y, 4);
    } else {
        out.push_str(&format!("{y:04}"));
    }
    for (n, width, before) in [
        (i64::from(m), 2, '-'),
        (i64::from(d), 2, '-'),
        (rem / 3_600, 2, 'T'),
        (rem / 60 % 60, 2, ':'),
        (rem % 60, 2, ':'),
    ] {
        out.push(before);
        push_digits(&mut out, n, width);
    }
    out.push('Z');
    out
}

/// Append the last `width` decimal digits of `n` (0 <= n), zero-padded.
fn push_digits(out: &mut String, n: i64, width: u32) {
    for k in (0..width).rev() {
        let digit = (n / 10_i64.pow(k)).rem_euclid(10);
        out.push(char::from(b'0' + u8::try_from(digit).unwrap_or(0)));
    }
}

/// `YYYYMMDDTHHMMZ` (UTC, minute precision), used in slot keys.
pub(crate) fn format_compact_utc(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY) / MS_PER_MINUTE;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}Z", rem / 60, rem % 60)
}

/// ms since the epoch of 01:00 UTC on the last Sunday of `month` in `year`: the UK clock change instant.
fn last_sunday_0100_utc(year: i64, month: u32) -> i64 {
    let last = days_from_civil(year, month, days_in_month(year, month));
    let back = (i64::from(weekday_index(last)) + 1) % 7;
    (last - back) * MS_PER_DAY + MS_PER_HOUR
}

/// The Europe/London offset from UTC in minutes at an instant: 60 during British Summer Time (from 01:00 UTC
/// on the last Sunday in March to 01:00 UTC on the last Sunday in October), otherwise 0.
///
/// The current (EU-harmonised, since 1996) rule is applied to every year, proleptically; historic UK rules
/// (double summer time, 1968-71 British Standard Time) are not modelled, which is fine for scheduling.
pub fn local_offset_minutes(ms: i64) -> i32 {
    let (year, _, _) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    if (last_sunday_0100_utc(year, 3)..last_sunday_0100_utc(year, 10)).contains(&ms) {
        60
    } else {
        0
    }
}

/// The UTC instant (ms) of a Europe/London wall-clock time given as minutes since 1970-01-01T00:00 *local*.
///
/// A wall time that does not exist (the spring-forward hour, 01:00-01:59 local on the last Sunday in March)
/// gives `None`. An ambiguous one (01:00-01:59 local on the last Sunday in October, which happens twice) gives
/// the first occurrence, the BST one.
pub(crate) fn london_wall_to_utc(local_minutes: i64) -> Option<i64> {
    let local_ms = local_minutes.checked_mul(MS_PER_MINUTE)?;
    // Try the earlier reading (BST) first, so an ambiguous time resolves to its first occurrence.
    [60i64, 0]
        .into_iter()
        .map(|offset| (offset, local_ms - offset * MS_PER_MINUTE))
        .find_map(|(offset, utc)| (i64::from(local_offset_minutes(utc)) == offset).then_some(utc))
}

/// Minutes since 1970-01-01T00:00 local (Europe/London) of a UTC instant, if it falls on a whole minute.
pub(crate) fn utc_to_london_wall_minutes(ms: i64) -> i64 {
    (ms + i64::from(local_offset_minutes(ms)) * MS_PER_MINUTE).div_euclid(MS_PER_MINUTE)
}

/// The UTC instant (ms) of a Europe/London local date and wall-clock time (`minutes` after local midnight,
/// up to 1440). `None` for an invalid date or a wall time inside the spring-forward gap; an ambiguous
/// autumn time resolves to its first occurrence (BST).
pub fn london_local_to_utc_ms(year: i32, month: u32, day: u32, minutes: u32) -> Option<i64> {
    let y = i64::from(year);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(y, month) || minutes > 1_440 {
        return None;
    }
    london_wall_to_utc(days_from_civil(y, month, day) * MINUTES_PER_DAY + i64::from(minutes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in (-800_000..3_000_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(weekday_index(0), 3); // Thursday
        assert_eq!(weekday_index(days_from_civil(2025, 3, 30)), 6); // Sunday
    }

    #[test]
    fn instants() {
        assert_eq!(parse_instant_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_instant_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_instant_ms("1969-12-31T23:00:00-01:00"), Some(0));
        assert_eq!(parse_instant_ms("1970-01-01T00:00:00.5Z"), Some(500));
        assert_eq!(parse_instant_ms("1970-01-01T00:00:00.123456Z"), Some(123));
        assert_eq!(
            parse_instant_ms("2025-03-24T09:00:00Z"),
            Some(1_742_806_800_000)
        );
        assert_eq!(
            parse_instant_ms("2016-12-31T23:59:60Z"),
            parse_instant_ms("2017-01-01T00:00:00Z")
        );
        for bad in [
            "",
            "2025-03-24",
            "2025-03-24T09:00Z",
            "2025-03-24T09:00:00",
            "2025-03-24 09:00:00Z",
            "2025-03-24T09:00:00z",
            "2025-02-29T09:00:00Z",
            "2025-13-01T09:00:00Z",
            "0000-01-01T00:00:00Z",
            "2025-03-24T24:00:00Z",
            "2025-03-24T09:00:00.Z",
            "2025-03-24T09:00:00+15:00",
            "2025-03-24T09:00:00+0100",
            "2025-03-24T09:00:00Zjunk",
            "２025-03-24T09:00:00Z",
        ] {
            assert_eq!(parse_instant_ms(bad), None, "{bad}");
        }
        assert!(parse_instant_ms("2024-02-29T09:00:00+14:00").is_some());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_instant_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_instant_utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(
            format_instant_utc(1_742_806_800_999),
            "2025-03-24T09:00:00Z"
        );
        assert_eq!(format_compact_utc(1_742_806_800_000), "20250324T0900Z");
        let ms = parse_instant_ms("2031-07-04T13:45:12.250+01:00").unwrap();
        assert_eq!(format_instant_utc(ms), "2031-07-04T12:45:12Z");
    }

    #[test]
    fn london_offsets() {
        let at = |s: &str| local_offset_minutes(parse_instant_ms(s).unwrap());
        assert_eq!(at("2025-01-15T12:00:00Z"), 0);
        assert_eq!(at("2025-07-15T12:00:00Z"), 60);
        // 2025: BST 30 March 01:00Z .. 26 October 01:00Z.
        assert_eq!(at("2025-03-30T00:59:59Z"), 0);
        assert_eq!(at("2025-03-30T01:00:00Z"), 60);
        assert_eq!(at("2025-10-26T00:59:59Z"), 60);
        assert_eq!(at("2025-10-26T01:00:00Z"), 0);
        // 2024: 31 March and 27 October.
        assert_eq!(at("2024-03-31T01:00:00Z"), 60);
        assert_eq!(at("2024-03-30T12:00:00Z"), 0);
        assert_eq!(at("2024-10-27T00:30:00Z"), 60);
        assert_eq!(at("2024-10-27T01:30:00Z"), 0);
    }

    #[test]
    fn wall_to_utc_edges() {
        let utc = |y, mo, d, h: u32, mi: u32| {
            london_local_to_utc_ms(y, mo, d, h * 60 + mi).map(format_instant_utc)
        };
        assert_eq!(
            utc(2025, 3, 30, 0, 59).as_deref(),
            Some("2025-03-30T00:59:00Z")
        );
        assert_eq!(utc(2025, 3, 30, 1, 0), None);
        assert_eq!(utc(2025, 3, 30, 1, 59), None);
        assert_eq!(
            utc(2025, 3, 30, 2, 0).as_deref(),
            Some("2025-03-30T01:00:00Z")
        );
        // Autumn: 01:30 happens at 00:30Z (BST) and again at 01:30Z (GMT); the first is taken.
        assert_eq!(
            utc(2025, 10, 26, 0, 59).as_deref(),
            Some("2025-10-25T23:59:00Z")
        );
        assert_eq!(
            utc(2025, 10, 26, 1, 0).as_deref(),
            Some("2025-10-26T00:00:00Z")
        );
        assert_eq!(
            utc(2025, 10, 26, 1, 30).as_deref(),
            Some("2025-10-26T00:30:00Z")
        );
        assert_eq!(
            utc(2025, 10, 26, 2, 0).as_deref(),
            Some("2025-10-26T02:00:00Z")
        );
        assert_eq!(utc(2025, 2, 29, 9, 0), None);
        assert_eq!(
            utc(2025, 12, 31, 24, 0).as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
    }
}
