//! `$generate-slots`: expand a weekly opening template (Europe/London wall-clock times) into UTC slots with
//! deterministic keys.

use std::fmt;

use serde_json::{Value, json};

use crate::time::{
    MINUTES_PER_DAY, MS_PER_MINUTE, days_from_civil, days_in_month, format_compact_utc,
    format_instant_utc, london_wall_to_utc, utc_to_london_wall_minutes, weekday_index,
};

/// The hard ceiling on slots one generation may produce; [`SlotTemplate::max_slots`] can only lower it.
pub const MAX_SLOTS: usize = 10_000;

/// Longest schedule id that still leaves room for the `-YYYYMMDDTHHMMZ` suffix in a 64-character FHIR id.
const MAX_SCHEDULE_ID_LEN: usize = 64 - "-YYYYMMDDTHHMMZ".len();

/// A day of the week, coded as FHIR `days-of-week` (`mon` .. `sun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    /// Parse a FHIR `days-of-week` code (`mon`, `tue`, ...).
    pub fn parse(code: &str) -> Option<Self> {
        Weekday::ALL.into_iter().find(|d| d.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Weekday::Mon => "mon",
            Weekday::Tue => "tue",
            Weekday::Wed => "wed",
            Weekday::Thu => "thu",
            Weekday::Fri => "fri",
            Weekday::Sat => "sat",
            Weekday::Sun => "sun",
        }
    }

    /// 0 = Monday .. 6 = Sunday.
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A calendar date (proleptic Gregorian, years 1-9999), meaning a local date in Europe/London.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalDate {
    year: i32,
    month: u32,
    day: u32,
}

impl LocalDate {
    /// A valid date, or `None`.
    pub fn new(year: i32, month: u32, day: u32) -> Option<Self> {
        let ok = (1..=9999).contains(&year)
            && (1..=12).contains(&month)
            && day >= 1
            && day <= days_in_month(i64::from(year), month);
        ok.then_some(LocalDate { year, month, day })
    }

    /// Parse `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('-');
        let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
            return None;
        }
        let num = |p: &str| {
            p.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| p.parse::<u32>().ok())
                .flatten()
        };
        LocalDate::new(i32::try_from(num(y)?).ok()?, num(m)?, num(d)?)
    }

    pub fn year(self) -> i32 {
        self.year
    }
    pub fn month(self) -> u32 {
        self.month
    }
    pub fn day(self) -> u32 {
        self.day
    }

    /// Days since 1970-01-01.
    fn days(self) -> i64 {
        days_from_civil(i64::from(self.year), self.month, self.day)
    }
}

impl fmt::Display for LocalDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// A wall-clock time of day with minute precision, `00:00` ..= `24:00` (`24:00` only makes sense as the end
/// of an opening period).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WallTime {
    minutes: u32,
}

impl WallTime {
    /// `hour:minute`, or `None` when out of range.
    pub fn new(hour: u32, minute: u32) -> Option<Self> {
        let ok = (hour < 24 && minute < 60) || (hour == 24 && minute == 0);
        ok.then_some(WallTime {
            minutes: hour * 60 + minute,
        })
    }

    /// Parse `hh:mm` or FHIR `time` `hh:mm:ss` (seconds must be `00`).
    pub fn parse(s: &str) -> Option<Self> {
        let two = |p: &str| {
            (p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u32>().ok())
                .flatten()
        };
        let mut parts = s.split(':');
        let (h, m) = (two(parts.next()?)?, two(parts.next()?)?);
        match parts.next() {
            None => {}
            Some(sec) if two(sec) == Some(0) && parts.next().is_none() => {}
            Some(_) => return None,
        }
        WallTime::new(h, m)
    }

    /// Minutes after midnight.
    pub fn minutes(self) -> u32 {
        self.minutes
    }
}

impl fmt::Display for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.minutes / 60, self.minutes % 60)
    }
}

/// An opening period within a day, `[start, end)` in wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpeningPeriod {
    pub start: WallTime,
    pub end: WallTime,
}

impl OpeningPeriod {
    /// Parse `hh:mm-hh:mm`, e.g. `09:00-12:30` (not checked for end > start; [`generate_slots`] does that).
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-')?;
        Some(OpeningPeriod {
            start: WallTime::parse(a)?,
            end: WallTime::parse(b)?,
        })
    }
}

impl fmt::Display for OpeningPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// Opening periods that apply on some days of the week (the shape of FHIR `availableTime`, with several
/// periods per entry). A template may have several rules, e.g. Mon-Fri mornings and Tue/Thu afternoons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpeningRule {
    pub days: Vec<Weekday>,
    pub periods: Vec<OpeningPeriod>,
}

/// The input of `$generate-slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTemplate {
    /// The Schedule's logical id: a FHIR id of at most 49 characters, so that the slot keys are FHIR ids too.
    pub schedule_id: String,
    pub rules: Vec<OpeningRule>,
    /// Slot length in minutes, 1..=1440. Slots are laid back to back from each period's start; a remainder
    /// shorter than a slot at the end of a period is left unused.
    pub slot_minutes: u32,
    /// First local date, inclusive.
    pub start_date: LocalDate,
    /// Last local date, **inclusive** ("from Monday to Friday" means five days).
    pub end_date: LocalDate,
    /// Refuse when more slots than this would be produced; `None` means [`MAX_SLOTS`], and values above
    /// [`MAX_SLOTS`] are capped to it.
    pub max_slots: Option<usize>,
}

/// One generated slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotSpec {
    /// `{schedule_id}-{start as YYYYMMDDTHHMMZ}`: the same template and range always give the same keys, so
    /// the caller uses the key as the Slot id (or identifier value) and skips keys that already exist. That
    /// makes re-running a generation, or running it over an overlapping range, idempotent.
    pub key: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl SlotSpec {
    /// A free R4 Slot resource for this spec, with `id` = key.
    pub fn to_fhir_json(&self, schedule_reference: &str) -> Value {
        json!({
            "resourceType": "Slot",
            "id": self.key,
            "schedule": {"reference": schedule_reference},
            "status": "free",
            "start": format_instant_utc(self.start_ms),
            "end": format_instant_utc(self.end_ms),
        })
    }
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// Not a FHIR id (`[A-Za-z0-9\-\.]`), or longer than 49 characters.
    InvalidScheduleId(String),
    /// Slot length outside 1..=1440 minutes.
    InvalidSlotLength(u32),
    /// An opening period whose end is not after its start.
    EmptyPeriod(OpeningPeriod),
    /// Two periods that apply on the same weekday overlap (touching is fine).
    OverlappingPeriods {
        day: Weekday,
        first: OpeningPeriod,
        second: OpeningPeriod,
    },
    /// The end date is before the start date.
    ReversedDateRange { start: LocalDate, end: LocalDate },
    /// More than `limit` slots would be produced.
    TooManySlots { limit: usize },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::InvalidScheduleId(id) => write!(
                f,
                "schedule id {id:?} must be 1-{MAX_SCHEDULE_ID_LEN} characters of A-Z, a-z, 0-9, '-' and '.'"
            ),
            TemplateError::InvalidSlotLength(m) => {
                write!(f, "slot length {m} minutes is outside 1..=1440")
            }
            TemplateError::EmptyPeriod(p) => {
                write!(f, "opening period {p} does not end after it starts")
            }
            TemplateError::OverlappingPeriods { day, first, second } => {
                write!(f, "opening periods {first} and {second} overlap on {day}")
            }
            TemplateError::ReversedDateRange { start, end } => {
                write!(f, "end date {end} is before start date {start}")
            }
            TemplateError::TooManySlots { limit } => {
                write!(f, "the template would produce more than {limit} slots")
            }
        }
    }
}

impl std::error::Error for TemplateError {}

/// Expand `template` into slots, sorted by start.
///
/// Wall-clock times are Europe/London. Around the clock changes:
/// - a slot starting at a wall time that does not exist (spring forward, 01:00-01:59 on the last Sunday in
///   March) is skipped;
/// - a slot starting at an ambiguous wall time (fall back, 01:00-01:59 on the last Sunday in October) uses the
///   first occurrence (BST);
/// - a slot whose elapsed length would differ from its wall-clock length because a change falls inside it
///   (or whose end wall time does not exist) is skipped too, so every slot lasts exactly `slot_minutes` and no
///   two slots overlap.
pub fn generate_slots(template: &SlotTemplate) -> Result<Vec<SlotSpec>, TemplateError> {
    let id = &template.schedule_id;
    if id.is_empty()
        || id.len() > MAX_SCHEDULE_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(TemplateError::InvalidScheduleId(id.clone()));
    }
    let len = template.slot_minutes;
    if !(1..=1_440).contains(&len) {
        return Err(TemplateError::InvalidSlotLength(len));
    }
    if template.end_date < template.start_date {
        return Err(TemplateError::ReversedDateRange {
            start: template.start_date,
            end: template.end_date,
        });
    }
    let limit = template.max_slots.map_or(MAX_SLOTS, |m| m.min(MAX_SLOTS));

    // Periods per weekday (index 0 = Monday), checked for emptiness and overlap.
    let mut per_day: Vec<Vec<OpeningPeriod>> = vec![Vec::new(); 7];
    for rule in &template.rules {
        let mut days = rule.days.clone();
        days.sort_unstable();
        days.dedup();
        for p in &rule.periods {
            if p.end <= p.start {
                return Err(TemplateError::EmptyPeriod(*p));
            }
            for d in &days {
                if let Some(list) = per_day.get_mut(d.index()) {
                    list.push(*p);
                }
            }
        }
    }
    for (day, list) in Weekday::ALL.into_iter().zip(per_day.iter_mut()) {
        list.sort_by_key(|p| (p.start, p.end));
        for pair in list.windows(2) {
            if let [first, second] = pair
                && second.start < first.end
            {
                return Err(TemplateError::OverlappingPeriods {
                    day,
                    first: *first,
                    second: *second,
                });
            }
        }
    }

    let len_minutes = i64::from(len);
    let mut out = Vec::new();
    for day in template.start_date.days()..=template.end_date.days() {
        let Some(periods) = usize::try_from(weekday_index(day))
            .ok()
            .and_then(|i| per_day.get(i))
        else {
            continue;
        };
        for p in periods {
            let mut t = i64::from(p.start.minutes());
            while t + len_minutes <= i64::from(p.end.minutes()) {
                let wall_start = day * MINUTES_PER_DAY + t;
                if let Some(start_ms) = london_wall_to_utc(wall_start) {
                    let end_ms = start_ms + len_minutes * MS_PER_MINUTE;
                    if utc_to_london_wall_minutes(end_ms) == wall_start + len_minutes {
                        if out.len() >= limit {
                            return Err(TemplateError::TooManySlots { limit });
                        }
                        out.push(SlotSpec {
                            key: format!("{id}-{}", format_compact_utc(start_ms)),
                            start_ms,
                            end_ms,
                        });
                    }
                }
                t += len_minutes;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::time::parse_instant_ms;

    fn template(
        days: &[Weekday],
        periods: &[&str],
        minutes: u32,
        from: &str,
        to: &str,
    ) -> SlotTemplate {
        SlotTemplate {
            schedule_id: "sched-1".into(),
            rules: vec![OpeningRule {
                days: days.to_vec(),
                periods: periods
                    .iter()
                    .map(|p| OpeningPeriod::parse(p).unwrap())
                    .collect(),
            }],
            slot_minutes: minutes,
            start_date: LocalDate::parse(from).unwrap(),
            end_date: LocalDate::parse(to).unwrap(),
            max_slots: None,
        }
    }

    const WEEKDAYS: [Weekday; 5] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
    ];

    fn starts(slots: &[SlotSpec]) -> Vec<String> {
        slots
            .iter()
            .map(|s| format_instant_utc(s.start_ms))
            .collect()
    }

    fn first_of_day<'a>(slots: &'a [SlotSpec], date: &str) -> &'a SlotSpec {
        slots
            .iter()
            .find(|s| format_instant_utc(s.start_ms).starts_with(date))
            .unwrap()
    }

    #[test]
    fn parsing_inputs() {
        assert_eq!(WallTime::parse("09:00").unwrap().minutes(), 540);
        assert_eq!(WallTime::parse("12:30:00").unwrap().to_string(), "12:30");
        assert_eq!(WallTime::parse("24:00").unwrap().minutes(), 1_440);
        for bad in [
            "9:00",
            "24:01",
            "12:60",
            "12:30:15",
            "12:30:00:00",
            "",
            "ab:cd",
        ] {
            assert_eq!(WallTime::parse(bad), None, "{bad}");
        }
        assert_eq!(
            LocalDate::parse("2024-02-29").unwrap().to_string(),
            "2024-02-29"
        );
        for bad in [
            "2025-02-29",
            "2025-1-01",
            "0000-01-01",
            "2025-01-01-",
            "+025-01-01",
        ] {
            assert_eq!(LocalDate::parse(bad), None, "{bad}");
        }
        assert_eq!(
            OpeningPeriod::parse("09:00-12:30").unwrap().to_string(),
            "09:00-12:30"
        );
        assert_eq!(Weekday::parse("sun"), Some(Weekday::Sun));
        assert_eq!(Weekday::parse("Sunday"), None);
    }

    #[test]
    fn weekday_mornings() {
        // Mon 2025-06-02 .. Sun 2025-06-08 inclusive: five weekdays of 14 quarter-hours.
        let t = template(&WEEKDAYS, &["09:00-12:30"], 15, "2025-06-02", "2025-06-08");
        let slots = generate_slots(&t).unwrap();
        assert_eq!(slots.len(), 5 * 14);
        assert_eq!(slots[0].key, "sched-1-20250602T0800Z");
        assert_eq!(
            format_instant_utc(slots[0].start_ms),
            "2025-06-02T08:00:00Z"
        );
        assert_eq!(format_instant_utc(slots[13].end_ms), "2025-06-02T11:30:00Z");
        // Inclusive end date: a one-day range gives that day.
        let one = template(&WEEKDAYS, &["09:00-12:30"], 15, "2025-06-06", "2025-06-06");
        assert_eq!(generate_slots(&one).unwrap().len(), 14);
        // 50-minute slots in a 3.5 h period: four slots, the last 30 minutes unused.
        let odd = template(&WEEKDAYS, &["09:00-12:30"], 50, "2025-06-02", "2025-06-02");
        assert_eq!(
            starts(&generate_slots(&odd).unwrap()),
            [
                "2025-06-02T08:00:00Z",
                "2025-06-02T08:50:00Z",
                "2025-06-02T09:40:00Z",
                "2025-06-02T10:30:00Z"
            ]
        );
    }

    #[test]
    fn several_periods_and_rules() {
        let mut t = template(
            &WEEKDAYS,
            &["09:00-10:00", "14:00-15:00"],
            30,
            "2025-01-06",
            "2025-01-12",
        );
        t.rules.push(OpeningRule {
            days: vec![Weekday::Sat, Weekday::Sat],
            periods: vec![OpeningPeriod::parse("10:00-11:00").unwrap()],
        });
        let slots = generate_slots(&t).unwrap();
        assert_eq!(slots.len(), 5 * 4 + 2);
        assert_eq!(
            starts(&slots[..4]),
            [
                "2025-01-06T09:00:00Z",
                "2025-01-06T09:30:00Z",
                "2025-01-06T14:00:00Z",
                "2025-01-06T14:30:00Z"
            ]
        );
        assert_eq!(
            starts(&slots[20..]),
            ["2025-01-11T10:00:00Z", "2025-01-11T10:30:00Z"]
        );
    }

    /// 09:00 local is 09:00Z in winter (GMT) and 08:00Z in summer (BST), across both 2025 changes.
    #[test]
    fn weeks_spanning_the_clock_changes() {
        let spring = generate_slots(&template(
            &WEEKDAYS,
            &["09:00-12:30"],
            15,
            "2025-03-24",
            "2025-04-04",
        ))
        .unwrap();
        assert_eq!(spring.len(), 10 * 14);
        assert_eq!(
            first_of_day(&spring, "2025-03-28").key,
            "sched-1-20250328T0900Z"
        );
        assert_eq!(
            first_of_day(&spring, "2025-03-31").key,
            "sched-1-20250331T0800Z"
        );
        let autumn = generate_slots(&template(
            &WEEKDAYS,
            &["09:00-12:30"],
            15,
            "2025-10-20",
            "2025-10-31",
        ))
        .unwrap();
        assert_eq!(autumn.len(), 10 * 14);
        assert_eq!(
            first_of_day(&autumn, "2025-10-24").key,
            "sched-1-20251024T0800Z"
        );
        assert_eq!(
            first_of_day(&autumn, "2025-10-27").key,
            "sched-1-20251027T0900Z"
        );
        for s in spring.iter().chain(&autumn) {
            assert_eq!(s.end_ms - s.start_ms, 15 * MS_PER_MINUTE);
        }
    }

    #[test]
    fn night_of_the_spring_change() {
        // 30 March 2025: 01:00-01:59 does not exist. 00:30-01:00 ends at a wall time that does not exist either.
        let t = template(
            &[Weekday::Sun],
            &["00:00-03:00"],
            30,
            "2025-03-30",
            "2025-03-30",
        );
        assert_eq!(
            starts(&generate_slots(&t).unwrap()),
            [
                "2025-03-30T00:00:00Z",
                "2025-03-30T01:00:00Z",
                "2025-03-30T01:30:00Z"
            ]
        );
    }

    #[test]
    fn night_of_the_autumn_change() {
        // 26 October 2025: 01:00-01:59 happens twice; the first (BST) pass is used. 01:30-02:00 would last 90
        // minutes, so it is skipped.
        let t = template(
            &[Weekday::Sun],
            &["00:00-03:00"],
            30,
            "2025-10-26",
            "2025-10-26",
        );
        let slots = generate_slots(&t).unwrap();
        assert_eq!(
            starts(&slots),
            [
                "2025-10-25T23:00:00Z",
                "2025-10-25T23:30:00Z",
                "2025-10-26T00:00:00Z",
                "2025-10-26T02:00:00Z",
                "2025-10-26T02:30:00Z"
            ]
        );
        for pair in slots.windows(2) {
            assert!(pair[0].end_ms <= pair[1].start_ms);
        }
    }

    #[test]
    fn idempotent_keys() {
        let a = generate_slots(&template(
            &WEEKDAYS,
            &["09:00-17:00"],
            10,
            "2025-03-24",
            "2025-04-06",
        ))
        .unwrap();
        let b = generate_slots(&template(
            &WEEKDAYS,
            &["09:00-17:00"],
            10,
            "2025-03-24",
            "2025-04-06",
        ))
        .unwrap();
        assert_eq!(a, b);
        let mut keys: Vec<_> = a.iter().map(|s| s.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), a.len());
        // An overlapping later run produces the same keys for the shared days.
        let c = generate_slots(&template(
            &WEEKDAYS,
            &["09:00-17:00"],
            10,
            "2025-03-31",
            "2025-04-13",
        ))
        .unwrap();
        let shared: Vec<_> = c.iter().filter(|s| a.contains(s)).collect();
        assert_eq!(shared.len(), 5 * 48);
        assert!(a.iter().all(|s| s.key.len() <= 64));
    }

    #[test]
    fn fhir_slot() {
        let s = SlotSpec {
            key: "s-20250602T0800Z".into(),
            start_ms: parse_instant_ms("2025-06-02T08:00:00Z").unwrap(),
            end_ms: parse_instant_ms("2025-06-02T08:15:00Z").unwrap(),
        };
        assert_eq!(
            s.to_fhir_json("Schedule/s"),
            json!({"resourceType": "Slot", "id": "s-20250602T0800Z", "schedule": {"reference": "Schedule/s"},
                   "status": "free", "start": "2025-06-02T08:00:00Z", "end": "2025-06-02T08:15:00Z"})
        );
    }

    #[test]
    fn refusals() {
        let base = template(&WEEKDAYS, &["09:00-12:30"], 15, "2025-06-02", "2025-06-08");
        let with = |f: &dyn Fn(&mut SlotTemplate)| {
            let mut t = base.clone();
            f(&mut t);
            generate_slots(&t).unwrap_err()
        };
        assert!(matches!(
            with(&|t| t.schedule_id = "bad id".into()),
            TemplateError::InvalidScheduleId(_)
        ));
        assert!(matches!(
            with(&|t| t.schedule_id = String::new()),
            TemplateError::InvalidScheduleId(_)
        ));
        assert!(matches!(
            with(&|t| t.schedule_id = "a".repeat(50)),
            TemplateError::InvalidScheduleId(_)
        ));
        assert!(
            generate_slots(&SlotTemplate {
                schedule_id: "a".repeat(49),
                ..base.clone()
            })
            .is_ok()
        );
        assert_eq!(
            with(&|t| t.slot_minutes = 0),
            TemplateError::InvalidSlotLength(0)
        );
        assert_eq!(
            with(&|t| t.slot_minutes = 1_441),
            TemplateError::InvalidSlotLength(1_441)
        );
        let e = with(&|t| t.end_date = LocalDate::new(2025, 6, 1).unwrap());
        assert_eq!(
            e.to_string(),
            "end date 2025-06-01 is before start date 2025-06-02"
        );
        let e = with(&|t| {
            t.rules[0]
                .periods
                .push(OpeningPeriod::parse("12:00-13:00").unwrap())
        });
        assert_eq!(
            e.to_string(),
            "opening periods 09:00-12:30 and 12:00-13:00 overlap on mon"
        );
        // Touching periods are fine.
        let mut touching = base.clone();
        touching.rules[0]
            .periods
            .push(OpeningPeriod::parse("12:30-13:00").unwrap());
        assert_eq!(generate_slots(&touching).unwrap().len(), 5 * 16);
        let e = with(&|t| {
            t.rules[0]
                .periods
                .push(OpeningPeriod::parse("13:00-13:00").unwrap())
        });
        assert!(matches!(e, TemplateError::EmptyPeriod(_)));
        // Count guard: 70 slots against a limit of 69, and a year of one-minute slots against the ceiling.
        assert_eq!(
            with(&|t| t.max_slots = Some(69)),
            TemplateError::TooManySlots { limit: 69 }
        );
        assert!(
            generate_slots(&SlotTemplate {
                max_slots: Some(70),
                ..base.clone()
            })
            .is_ok()
        );
        let e = with(&|t| {
            t.slot_minutes = 1;
            t.rules[0].periods = vec![OpeningPeriod::parse("00:00-24:00").unwrap()];
            t.max_slots = Some(usize::MAX);
            t.end_date = LocalDate::new(2025, 6, 15).unwrap(); // ten weekdays of 1440 slots
        });
        assert_eq!(e, TemplateError::TooManySlots { limit: MAX_SLOTS });
    }
}
