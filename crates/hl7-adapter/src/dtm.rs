//! HL7 v2 date/time (`DTM`, `TS` component 1) to and from epoch milliseconds.
//!
//! `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`. A value without an offset is wall-clock time in
//! Europe/London (the convention of English trust feeds), converted with the scheduling crate's GMT/BST
//! rules; one with an offset is exact.

/// Parse an HL7 date/time into epoch milliseconds (UTC). `None` when it is not a valid DTM or is only a date
/// with less than day precision.
pub fn parse_ms(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let (body, offset_min) = split_offset(raw)?;
    let (main, frac) = match body.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (body, None),
    };
    if !main.bytes().all(|b| b.is_ascii_digit())
        || main.len() < 8
        || main.len() % 2 != 0
        || main.len() > 14
    {
        return None;
    }
    let num =
        |a: usize, b: usize| -> Option<u32> { main.get(a..b).map_or(Some(0), |s| s.parse().ok()) };
    let year: i32 = main.get(0..4)?.parse().ok()?;
    let month = num(4, 6)?;
    let day = num(6, 8)?;
    let hour = if main.len() >= 10 { num(8, 10)? } else { 0 };
    let minute = if main.len() >= 12 { num(10, 12)? } else { 0 };
    let second = if main.len() >= 14 { num(12, 14)? } else { 0 };
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let millis: i64 = match frac {
        None => 0,
        Some(f) => {
            if f.is_empty() || f.len() > 4 || !f.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let mut digits = f.to_owned();
            while digits.len() < 3 {
                digits.push('0');
            }
            digits.get(0..3)?.parse().ok()?
        }
    };
    let base = match offset_min {
        Some(off) => {
            let days = days_from_civil(year, month, day)?;
            days * 86_400_000 + i64::from(hour * 3600 + minute * 60) * 1000
                - i64::from(off) * 60_000
        }
        None => scheduling::london_local_to_utc_ms(year, month, day, hour * 60 + minute)?,
    };
    Some(base + i64::from(second) * 1000 + millis)
}

/// The date part (`YYYY-MM-DD`, or shorter when the value is less precise) of an HL7 date, for FHIR `date`
/// elements such as `birthDate`. `None` when malformed.
pub fn parse_date(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits: String = raw.chars().take_while(char::is_ascii_digit).collect();
    match digits.len() {
        4 => Some(digits),
        6 => {
            let m: u32 = digits.get(4..6)?.parse().ok()?;
            (1..=12)
                .contains(&m)
                .then(|| format!("{}-{}", &digits[0..4], &digits[4..6]))
        }
        n if n >= 8 => {
            let y: i32 = digits.get(0..4)?.parse().ok()?;
            let m: u32 = digits.get(4..6)?.parse().ok()?;
            let d: u32 = digits.get(6..8)?.parse().ok()?;
            days_from_civil(y, m, d)?;
            Some(format!(
                "{}-{}-{}",
                &digits[0..4],
                &digits[4..6],
                &digits[6..8]
            ))
        }
        _ => None,
    }
}

/// Format epoch milliseconds as an HL7 DTM with seconds and an explicit UTC offset (`20240101120000+0000`).
pub fn format_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000) / 1000;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}+0000",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn split_offset(raw: &str) -> Option<(&str, Option<i32>)> {
    match raw.rfind(['+', '-']) {
        Some(i) => {
            let (body, off) = raw.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let digits = off.get(1..)?;
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let h: i32 = digits.get(0..2)?.parse().ok()?;
            let m: i32 = digits.get(2..4)?.parse().ok()?;
            if h > 14 || m > 59 {
                return None;
            }
            Some((body, Some(sign * (h * 60 + m))))
        }
        None => Some((raw, None)),
    }
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

fn days_from_civil(y: i32, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_exact() {
        let ms = parse_ms("20210924093000+0215").unwrap();
        assert_eq!(fhir::format_instant_ms(ms), "2021-09-24T07:15:00.000Z");
        assert_eq!(
            parse_ms("20240101120000-0500")
                .map(fhir::format_instant_ms)
                .unwrap(),
            "2024-01-01T17:00:00.000Z"
        );
        assert_eq!(parse_ms("20240101120000.5+0000").unwrap() % 1000, 500);
    }

    #[test]
    fn no_offset_is_london_wall_clock() {
        // Winter: GMT; summer: BST (UTC+1).
        assert_eq!(
            fhir::format_instant_ms(parse_ms("202401151030").unwrap()),
            "2024-01-15T10:30:00.000Z"
        );
        assert_eq!(
            fhir::format_instant_ms(parse_ms("20240715103000").unwrap()),
            "2024-07-15T09:30:00.000Z"
        );
        assert_eq!(
            fhir::format_instant_ms(parse_ms("20240715").unwrap()),
            "2024-07-14T23:00:00.000Z"
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "2024",
            "202401",
            "2024013",
            "20241301",
            "20240230",
            "20240101256000",
            "2024010112x0",
            "20240101+01",
            "20240101120000.12345",
        ] {
            assert_eq!(parse_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_and_formatting() {
        assert_eq!(parse_date("19880818").as_deref(), Some("1988-08-18"));
        assert_eq!(
            parse_date("198808181126+0215").as_deref(),
            Some("1988-08-18")
        );
        assert_eq!(parse_date("198808").as_deref(), Some("1988-08"));
        assert_eq!(parse_date("19880230"), None);
        assert_eq!(
            format_ms(parse_ms("20240101120000+0000").unwrap()),
            "20240101120000+0000"
        );
        assert_eq!(format_ms(0), "19700101000000+0000");
    }
}
