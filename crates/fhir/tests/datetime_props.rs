//! Property tests for the date/time functions: total on arbitrary input, consistent ranges, round trips.

use fhir::{format_instant_ms, parse_date_range, parse_instant_ms};
use proptest::prelude::*;

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in ms.
const MIN_MS: i64 = -62_135_596_800_000;
const MAX_MS: i64 = 253_402_300_799_999;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_strings(s in "\\PC{0,40}") {
        if let Some((low, high)) = parse_date_range(&s) {
            prop_assert!(low <= high);
        }
        let _ = parse_instant_ms(&s);
    }

    #[test]
    fn never_panics_on_date_shaped_strings(s in "[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,10})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?") {
        if let Some((low, high)) = parse_date_range(&s) {
            prop_assert!(low <= high);
            if let Some(ms) = parse_instant_ms(&s) {
                prop_assert_eq!(ms, low);
            }
        }
    }

    #[test]
    fn format_never_panics(ms in any::<i64>()) {
        let s = format_instant_ms(ms);
        prop_assert!(s.ends_with('Z'));
    }

    #[test]
    fn instants_round_trip(ms in MIN_MS..=MAX_MS) {
        let s = format_instant_ms(ms);
        prop_assert_eq!(s.len(), 24);
        prop_assert_eq!(parse_instant_ms(&s), Some(ms));
        prop_assert_eq!(parse_date_range(&s), Some((ms, ms)));
        // The enclosing second, day, month and year all contain the instant.
        for prefix_len in [19usize, 10, 7, 4] {
            let partial = if prefix_len == 19 { format!("{}Z", &s[..19]) } else { s[..prefix_len].to_string() };
            let Some((low, high)) = parse_date_range(&partial) else {
                return Err(TestCaseError::fail(format!("{partial} did not parse")));
            };
            prop_assert!(low <= ms && ms <= high, "{} = {}..{} should contain {}", partial, low, high, ms);
        }
    }

    #[test]
    fn offsets_shift_by_their_amount(ms in (MIN_MS + 86_400_000)..=(MAX_MS - 86_400_000), h in 0i64..=14, m in 0i64..60, neg in any::<bool>()) {
        prop_assume!(h < 14 || m == 0);
        let offset = (h * 60 + m) * 60_000 * if neg { -1 } else { 1 };
        // Write the local wall time of `ms` at this offset, then parse it back.
        let local = format_instant_ms(ms + offset);
        let text = format!("{}{}{:02}:{:02}", &local[..23], if neg { '-' } else { '+' }, h, m);
        prop_assert_eq!(parse_instant_ms(&text), Some(ms), "{}", text);
    }
}
