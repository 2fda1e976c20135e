//! FHIR date, dateTime and instant handling without a date crate: partial dates map to the range of
//! milliseconds they stand for, in UTC.

/// Parse a FHIR `date`, `dateTime` or `instant` (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DDThh:mm[:ss[.fff]](Z|±hh:mm)`)
/// into the inclusive UTC range `[low, high]` in ms since the epoch. A value without an offset but with a time
/// is refused (FHIR requires the offset). Returns None for anything malformed.
pub fn parse_date_range(s: &str) -> Option<(i64, i64)> {
    let _ = s;
    None // TODO(helper): implement
}

/// Parse a full instant (must have seconds and an offset) into ms since the epoch.
pub fn parse_instant_ms(s: &str) -> Option<i64> {
    let _ = s;
    None // TODO(helper): implement
}

/// Format ms since the epoch as `YYYY-MM-DDThh:mm:ss.sssZ`.
pub fn format_instant_ms(ms: i64) -> String {
    let _ = ms;
    String::new() // TODO(helper): implement
}
