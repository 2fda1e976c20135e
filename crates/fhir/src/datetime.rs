//! FHIR date, dateTime and instant handling without a date crate: partial dates map to the range of
//! milliseconds they stand for, in UTC.
//!
//! Calendar arithmetic uses Howard Hinnant's `days_from_civil` / `civil_from_days` algorithms (proleptic
//! Gregorian calendar), so every function here is total: malformed input gives `None`, never a panic.

const MS_PER_SECOND: i64 = 1_000;
const MS_PER_MINUTE: i64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: i64 = 60 * MS_PER_MINUTE;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// Largest UTC offset FHIR (and ISO 8601 in practice) allows: ±14:00.
const MAX_OFFSET_MINUTES: i64 = 14 * 60;

/// How much of a date/time value was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    Year,
    Month,
    Day,
    Minute,
    Second,
    /// Seconds with this many fraction digits (1..=9).
    Fraction(u32),
}

/// A parsed value: the first millisecond it stands for (UTC) and its precision.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    low_ms: i64,
    precision: Precision,
}

/// Parse a FHIR `date`, `dateTime` or `instant` (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DDThh:mm[:ss[.fff]](Z|±hh:mm)`)
/// into the inclusive UTC range `[low, high]` in ms since the epoch. A value without an offset but with a time
/// is refused (FHIR requires the offset). Returns None for anything malformed.
///
/// A partial date covers its whole year, month or day (taken in UTC); a time without seconds covers that
/// minute; a time with seconds covers that second; a fraction covers its own precision (`.5` covers 100 ms,
/// three or more digits cover exactly one millisecond, digits below the millisecond are truncated).
pub fn parse_date_range(s: &str) -> Option<(i64, i64)> {
    let p = parse(s)?;
    let width = match p.precision {
        Precision::Year | Precision::Month | Precision::Day => {
            // The end is the start of the next year/month/day, computed on the calendar.
            let next = next_period_start_ms(s, p.precision)?;
            return Some((p.low_ms, next - 1));
        }
        Precision::Minute => MS_PER_MINUTE,
        Precision::Second => MS_PER_SECOND,
        Precision::Fraction(1) => 100,
        Precision::Fraction(2) => 10,
        Precision::Fraction(_) => 1,
    };
    Some((p.low_ms, p.low_ms + width - 1))
}

/// Parse a full instant (must have seconds and an offset) into ms since the epoch. Fraction digits below the
/// millisecond are truncated.
pub fn parse_instant_ms(s: &str) -> Option<i64> {
    let p = parse(s)?;
    match p.precision {
        Precision::Second | Precision::Fraction(_) => Some(p.low_ms),
        _ => None,
    }
}

/// Format ms since the epoch as `YYYY-MM-DDThh:mm:ss.sssZ`.
///
/// Instants before the epoch are handled with floor division (`-1` is `1969-12-31T23:59:59.999Z`). Years
/// outside 0000..=9999 (only reachable with absurd inputs) are written with a sign and at least four digits.
pub fn format_instant_ms(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let hh = in_day / MS_PER_HOUR;
    let mm = (in_day % MS_PER_HOUR) / MS_PER_MINUTE;
    let ss = (in_day % MS_PER_MINUTE) / MS_PER_SECOND;
    let frac = in_day % MS_PER_SECOND;
    // Written digit by digit: `format!` cost about 1,600 instructions per call, and the store's writer formats
    // several instants per booking.
    let mut out = String::with_capacity(24);
    if (0..=9999).contains(&y) {
        push_digits(&mut out, y, 4);
    } else if y < 0 {
        out.push_str(&format!("-{:04}", y.unsigned_abs()));
    } else {
        out.push_str(&format!("+{y:04}"));
    }
    for (n, width, before) in [
        (i64::from(m), 2, '-'),
        (i64::from(d), 2, '-'),
        (hh, 2, 'T'),
        (mm, 2, ':'),
        (ss, 2, ':'),
        (frac, 3, '.'),
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

/// True for Gregorian leap years.
fn is_leap_year(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
/// `m` must be 1..=12 and `d` 1..=31; any `y` that fits comfortably in i64 works.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let m = i64::from(m);
    let d = i64::from(d);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`] (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = if m <= 2 { y + 1 } else { y };
    // mp, d are bounded by construction, so the conversions cannot fail; fall back defensively anyway.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// Fixed-width run of ASCII digits at `b[start..start + len]`.
fn digits(b: &[u8], start: usize, len: usize) -> Option<u32> {
    let field = b.get(start..start.checked_add(len)?)?;
    let mut n: u32 = 0;
    for &c in field {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(c - b'0');
    }
    Some(n)
}

fn expect(b: &[u8], at: usize, c: u8) -> Option<()> {
    (b.get(at) == Some(&c)).then_some(())
}

/// Start (UTC ms) of the year/month/day after the one a partial date names.
fn next_period_start_ms(s: &str, precision: Precision) -> Option<i64> {
    let b = s.as_bytes();
    let y = i64::from(digits(b, 0, 4)?);
    let days = match precision {
        Precision::Year => days_from_civil(y + 1, 1, 1),
        Precision::Month => {
            let m = digits(b, 5, 2)?;
            if m == 12 {
                days_from_civil(y + 1, 1, 1)
            } else {
                days_from_civil(y, m + 1, 1)
            }
        }
        Precision::Day => {
            let m = digits(b, 5, 2)?;
            let d = digits(b, 8, 2)?;
            days_from_civil(y, m, d) + 1
        }
        _ => return None,
    };
    Some(days * MS_PER_DAY)
}

/// The grammar shared by every public function here.
fn parse(s: &str) -> Option<Parsed> {
    let b = s.as_bytes();

    // Year: exactly four digits, 0001..=9999.
    let y = digits(b, 0, 4)?;
    if y == 0 {
        return None;
    }
    let y = i64::from(y);
    if b.len() == 4 {
        return Some(Parsed {
            low_ms: days_from_civil(y, 1, 1) * MS_PER_DAY,
            precision: Precision::Year,
        });
    }

    // Month.
    expect(b, 4, b'-')?;
    let m = digits(b, 5, 2)?;
    if !(1..=12).contains(&m) {
        return None;
    }
    if b.len() == 7 {
        return Some(Parsed {
            low_ms: days_from_civil(y, m, 1) * MS_PER_DAY,
            precision: Precision::Month,
        });
    }

    // Day.
    expect(b, 7, b'-')?;
    let d = digits(b, 8, 2)?;
    if d == 0 || d > days_in_month(y, m) {
        return None;
    }
    let day_ms = days_from_civil(y, m, d) * MS_PER_DAY;
    if b.len() == 10 {
        return Some(Parsed {
            low_ms: day_ms,
            precision: Precision::Day,
        });
    }

    // Time: hh:mm, then optional :ss and optional fraction (only after seconds).
    expect(b, 10, b'T')?;
    let hh = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let mi = digits(b, 14, 2)?;
    if hh > 23 || mi > 59 {
        return None;
    }
    let mut pos = 16;
    let mut precision = Precision::Minute;
    let mut ss = 0;
    let mut frac_ms: i64 = 0;
    if b.get(pos) == Some(&b':') {
        ss = digits(b, pos + 1, 2)?;
        if ss > 59 {
            return None;
        }
        pos += 3;
        precision = Precision::Second;
        if b.get(pos) == Some(&b'.') {
            pos += 1;
            let start = pos;
            while b.get(pos).is_some_and(u8::is_ascii_digit) {
                pos += 1;
            }
            let n = pos - start;
            if n == 0 || n > 9 {
                return None;
            }
            // Milliseconds from the first three digits (padded with zeros), the rest truncated.
            for i in 0..3 {
                let digit = match b.get(start + i) {
                    Some(c) if i < n => i64::from(c - b'0'),
                    _ => 0,
                };
                frac_ms = frac_ms * 10 + digit;
            }
            precision = Precision::Fraction(u32::try_from(n).ok()?);
        }
    }

    // Offset: required when a time is present.
    let offset_minutes: i64 = match b.get(pos) {
        Some(b'Z') => {
            pos += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let oh = i64::from(digits(b, pos + 1, 2)?);
            expect(b, pos + 3, b':')?;
            let om = i64::from(digits(b, pos + 4, 2)?);
            if om > 59 {
                return None;
            }
            let total = oh * 60 + om;
            if total > MAX_OFFSET_MINUTES {
                return None;
            }
            pos += 6;
            if sign == b'-' { -total } else { total }
        }
        _ => return None,
    };
    if pos != b.len() {
        return None;
    }

    let local_ms = day_ms
        + i64::from(hh) * MS_PER_HOUR
        + i64::from(mi) * MS_PER_MINUTE
        + i64::from(ss) * MS_PER_SECOND
        + frac_ms;
    Some(Parsed {
        low_ms: local_ms - offset_minutes * MS_PER_MINUTE,
        precision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = MS_PER_DAY;

    fn range(s: &str) -> (i64, i64) {
        parse_date_range(s).unwrap_or_else(|| unreachable!("{s} should parse"))
    }

    #[test]
    fn civil_round_trip_and_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(1, 1, 1), -719_162);
        assert_eq!(days_from_civil(9999, 12, 31), 2_932_896);
        for z in (-800_000..3_000_000).step_by(7) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
        }
    }

    #[test]
    fn partial_dates_cover_their_period() {
        assert_eq!(range("1970"), (0, 365 * DAY - 1));
        assert_eq!(range("1972"), (730 * DAY, (730 + 366) * DAY - 1)); // leap year
        assert_eq!(range("1970-02"), (31 * DAY, 59 * DAY - 1));
        assert_eq!(
            range("1972-02"),
            (
                days_from_civil(1972, 2, 1) * DAY,
                days_from_civil(1972, 3, 1) * DAY - 1
            )
        );
        assert_eq!(range("1970-12"), (334 * DAY, 365 * DAY - 1));
        assert_eq!(range("1970-01-02"), (DAY, 2 * DAY - 1));
        assert_eq!(range("2024-02-29").1 - range("2024-02-29").0, DAY - 1);
        assert_eq!(range("1969-12-31"), (-DAY, -1));
        assert_eq!(range("2024"), (1_704_067_200_000, 1_735_689_599_999));
        assert_eq!(range("0001").0, -62_135_596_800_000);
        assert_eq!(range("9999-12-31").1, 253_402_300_799_999);
    }

    #[test]
    fn times_cover_their_precision() {
        assert_eq!(range("1970-01-01T00:00:00Z"), (0, 999));
        assert_eq!(range("1970-01-01T00:00Z"), (0, 59_999));
        assert_eq!(range("1970-01-01T00:00:00.5Z"), (500, 599));
        assert_eq!(range("1970-01-01T00:00:00.05Z"), (50, 59));
        assert_eq!(range("1970-01-01T00:00:00.123Z"), (123, 123));
        assert_eq!(range("1970-01-01T00:00:00.123456789Z"), (123, 123));
        assert_eq!(
            range("2024-05-17T09:30:15+00:00"),
            (1_715_938_215_000, 1_715_938_215_999)
        );
        assert_eq!(
            range("2024-05-17T09:30:15-00:00"),
            range("2024-05-17T09:30:15Z")
        );
    }

    #[test]
    fn offsets_move_to_utc_across_day_boundaries() {
        // 00:30 at +01:00 is 23:30 the day before in UTC.
        assert_eq!(
            range("2024-01-01T00:30:00+01:00").0,
            range("2023-12-31T23:30:00Z").0
        );
        // 23:30 at -05:00 is 04:30 the next day in UTC.
        assert_eq!(
            range("2024-02-28T23:30:00-05:00").0,
            range("2024-02-29T04:30:00Z").0
        );
        assert_eq!(
            range("2023-02-28T23:30:00-05:00").0,
            range("2023-03-01T04:30:00Z").0
        );
        assert_eq!(
            range("2024-12-31T23:59:59.999-14:00").0,
            range("2025-01-01T13:59:59.999Z").0
        );
        assert_eq!(
            range("2024-01-01T00:00:00+14:00").0,
            range("2023-12-31T10:00:00Z").0
        );
        assert_eq!(
            range("2024-06-01T12:00:00+05:30").0,
            range("2024-06-01T06:30:00Z").0
        );
        assert_eq!(range("1970-01-01T00:00:00+00:01"), (-60_000, -59_001));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "197",
            "19700",
            "0000",
            "0000-01-01",
            "abcd",
            "1970-1",
            "1970-00",
            "1970-13",
            "1970-01-1",
            "1970-01-00",
            "1970-01-32",
            "1970-04-31",
            "2023-02-29",
            "1900-02-29",
            "2100-02-29",
            "1970-01-01T",
            "1970-01-01T00:00:00",
            "1970-01-01T00:00",
            "1970-01-01T24:00:00Z",
            "1970-01-01T23:60:00Z",
            "1970-01-01T23:59:60Z",
            "1970-01-01T1:00:00Z",
            "1970-01-01T00:00:00.Z",
            "1970-01-01T00:00:00.1234567890Z",
            "1970-01-01T00:00.5Z",
            "1970-01-01T00:00:00+15:00",
            "1970-01-01T00:00:00+14:01",
            "1970-01-01T00:00:00-14:30",
            "1970-01-01T00:00:00+01:60",
            "1970-01-01T00:00:00+0100",
            "1970-01-01T00:00:00+01",
            "1970-01-01T00:00:00ZZ",
            "1970-01-01T00:00:00z",
            "1970-01-01t00:00:00Z",
            "1970-01-01 00:00:00Z",
            "1970-01-01Z",
            "1970-01-01+01:00",
            " 1970",
            "1970 ",
            "1970-01-01T00:00:00Z ",
            "+1970",
            "-001-01-01",
            "１９７０",
            "1970-01-01T00:00:00.１Z",
        ] {
            assert_eq!(parse_date_range(bad), None, "{bad:?} should be refused");
        }
    }

    #[test]
    fn leap_years() {
        assert!(parse_date_range("2024-02-29").is_some());
        assert!(parse_date_range("2000-02-29").is_some());
        assert!(parse_date_range("1600-02-29").is_some());
        assert!(parse_date_range("2000-02-29T12:00:00Z").is_some());
        assert!(parse_date_range("1900-02-29T12:00:00Z").is_none());
        assert_eq!(range("2000-02").1 - range("2000-02").0 + 1, 29 * DAY);
        assert_eq!(range("1900-02").1 - range("1900-02").0 + 1, 28 * DAY);
        assert_eq!(range("2000").1 - range("2000").0 + 1, 366 * DAY);
        assert_eq!(range("1900").1 - range("1900").0 + 1, 365 * DAY);
    }

    #[test]
    fn instants() {
        assert_eq!(parse_instant_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_instant_ms("1970-01-01T00:00:00.0019Z"), Some(1));
        assert_eq!(
            parse_instant_ms("2024-05-17T10:30:15.25+01:00"),
            Some(1_715_938_215_250)
        );
        assert_eq!(parse_instant_ms("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse_instant_ms("2024-05-17T10:30+01:00"), None);
        assert_eq!(parse_instant_ms("2024-05-17"), None);
        assert_eq!(parse_instant_ms("2024"), None);
        assert_eq!(parse_instant_ms("2024-05-17T10:30:15"), None);
    }

    /// Every instant formatted in years 0001..=9999 parses back to itself (a spread of values with varied
    /// digits in every field).
    #[test]
    fn formatted_instants_parse_back() {
        let (first, last) = (-62_135_596_800_000_i64, 253_402_300_799_999_i64);
        let mut ms = first;
        while ms <= last {
            let text = format_instant_ms(ms);
            assert_eq!(text.len(), 24, "{text}");
            assert_eq!(parse_instant_ms(&text), Some(ms), "{text}");
            ms += 7_919_876_543_211;
        }
        assert_eq!(parse_instant_ms(&format_instant_ms(last)), Some(last));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_instant_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_instant_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_instant_ms(-DAY), "1969-12-31T00:00:00.000Z");
        assert_eq!(
            format_instant_ms(1_715_938_215_250),
            "2024-05-17T09:30:15.250Z"
        );
        assert_eq!(
            format_instant_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            format_instant_ms(-62_135_596_800_000),
            "0001-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_instant_ms(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        // Absurd values must not panic.
        assert!(format_instant_ms(i64::MIN).starts_with('-'));
        assert!(format_instant_ms(i64::MAX).starts_with('+'));
    }

    #[test]
    fn format_parse_round_trip() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // Anywhere in 0001..=9999.
            let span = 253_402_300_799_999_i64 + 62_135_596_800_000;
            let ms = i64::try_from(x >> 11).unwrap_or(0) % span - 62_135_596_800_000;
            let s = format_instant_ms(ms);
            assert_eq!(parse_instant_ms(&s), Some(ms), "{s}");
            assert_eq!(parse_date_range(&s), Some((ms, ms)));
        }
    }
}
