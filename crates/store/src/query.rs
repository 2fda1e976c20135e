//! Backend-neutral search and history queries. The API layer parses FHIR search URLs into these; each backend
//! translates them to its own SQL.

use fhir::ResourceType;

/// Comparison prefix of a FHIR date (or number) search value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// One matching rule against one indexed parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// `_id`
    Id(String),
    /// `_lastUpdated`: the resource's last-updated instant compared with the range `[low_ms, high_ms]`
    /// (the range a partial date/time like `2024-05` stands for).
    LastUpdated { cmp: Cmp, low_ms: i64, high_ms: i64 },
    /// Token parameter (identifier, gender, status, active...). `system: None` matches any system,
    /// `Some("")` matches values with no system. `code: None` (from `system|`) matches any code in the system.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// String parameter. `value` is normalised (see `fhir::normalize_string`) and matched as a prefix of the
    /// indexed normalised values; with `exact` (the `:exact` modifier: the string as sent), an entry matches
    /// only when its form as sent equals it (and its normalised value equals `value`, the normalisation of
    /// `exact`, which lets the backends use the same index).
    String {
        value: String,
        exact: Option<String>,
    },
    /// Date parameter: the indexed range `[low, high]` compared with the query range per FHIR's rules.
    Date { cmp: Cmp, low_ms: i64, high_ms: i64 },
    /// Reference parameter: `Type/id` exactly as indexed.
    Reference(String),
}

/// Alternatives (comma-separated values) for one parameter: matches if any alternative matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    /// Search parameter name (e.g. `identifier`, `birthdate`); ignored for `Id` and `LastUpdated` predicates.
    pub param: String,
    pub any_of: Vec<Predicate>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SortField {
    Id,
    LastUpdated,
    /// A string or date search parameter (sorted by its smallest indexed value; resources without a value last).
    Param(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sort {
    pub field: SortField,
    pub descending: bool,
}

/// A search over one resource type: clauses are ANDed. Deleted resources never match.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub rtype: ResourceType,
    pub clauses: Vec<Clause>,
    /// Applied in order; ties are broken by id so paging is stable.
    pub sort: Vec<Sort>,
    /// Page size; 0 returns no resources (useful with `want_total`).
    pub count: usize,
    pub offset: usize,
    /// Compute the total number of matches.
    pub want_total: bool,
}

impl SearchQuery {
    pub fn new(rtype: ResourceType) -> Self {
        SearchQuery {
            rtype,
            clauses: Vec::new(),
            sort: Vec::new(),
            count: 100,
            offset: 0,
            want_total: false,
        }
    }

    /// Convenience: add a single-alternative clause.
    pub fn with(mut self, param: &str, predicate: Predicate) -> Self {
        self.clauses.push(Clause {
            param: param.to_string(),
            any_of: vec![predicate],
        });
        self
    }
}

/// `_history` of one resource (`id: Some`) or of a type. Newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub rtype: ResourceType,
    pub id: Option<String>,
    /// Only versions updated at or after this instant.
    pub since_ms: Option<i64>,
    pub count: usize,
    pub offset: usize,
}

/// Whether a backend stores `entry` as an index row of a `rtype` resource: not when its parameter's values
/// are another parameter's rows (see `fhir::stored_as`).
pub fn stored_row(rtype: ResourceType, entry: &crate::IndexEntry) -> bool {
    fhir::stored_as(rtype, entry.param).is_none()
}

/// The parameter whose rows a reference search on `param` for `target` (`Type/id`) reads: `param` itself, or
/// the parameter it is stored as (`fhir::stored_as`). `None` when no row can match: a stored-as parameter
/// asked for a target of a type it does not cover (`patient=Practitioner/1` must not find the practitioner's
/// appointments through `actor`).
pub fn reference_rows<'p>(rtype: ResourceType, param: &'p str, target: &str) -> Option<&'p str> {
    let Some(base) = fhir::stored_as(rtype, param) else {
        return Some(param);
    };
    let ty = target.split_once('/').map(|(t, _)| t)?;
    fhir::search_param(rtype, param)
        .is_some_and(|def| def.targets.iter().any(|t| t.as_str() == ty))
        .then_some(base)
}

/// kv namespace (never used by callers) of the (type, date parameter) pairs that are single-valued by their
/// FHIR definition (`fhir::single_valued`) but were stored with several values for one resource (key
/// `Type param`). The backends take index rows as given; while a pair is listed here, a search does not
/// combine its range clauses into one range over a single row.
pub const MULTI_VALUED: &str = "store:multi-valued";

/// kv namespace of the `fhir::instant_param` pairs stored with a row wider than `fhir::INSTANT_WIDTH_MS`
/// (key `Type param`); while a pair is listed, a search does not bound its rows' start by the width of an
/// instant.
pub const WIDE: &str = "store:wide";

/// The `(namespace, key)` pairs of [`MULTI_VALUED`] and [`WIDE`] that a put of a `rtype` resource with index
/// rows `index` lists: each single-valued date parameter it gives several rows, each instant parameter it
/// gives a row wider than an instant. Empty for a regular resource. Backends write them in the put's
/// transaction, so a listing commits (and replays) with the rows that caused it.
pub fn irregular_dates(
    rtype: ResourceType,
    index: &[crate::IndexEntry],
) -> Vec<(&'static str, String)> {
    let dates = index.iter().filter_map(|e| match e.value {
        crate::IndexValue::Date { low_ms, high_ms } => Some((e.param, low_ms, high_ms)),
        _ => None,
    });
    let mut listed: Vec<(&'static str, String)> = Vec::new();
    for (i, (param, low_ms, high_ms)) in dates.clone().enumerate() {
        let repeated = dates.clone().skip(i + 1).any(|(p, _, _)| p == param);
        let wide = high_ms.saturating_sub(low_ms) > fhir::INSTANT_WIDTH_MS;
        for (namespace, irregular) in [
            (MULTI_VALUED, repeated && fhir::single_valued(rtype, param)),
            (WIDE, wide && fhir::instant_param(rtype, param)),
        ] {
            if !irregular {
                continue;
            }
            let key = format!("{rtype} {param}");
            if !listed.iter().any(|(n, k)| *n == namespace && *k == key) {
                listed.push((namespace, key));
            }
        }
    }
    listed
}

/// The lower bound on a row's start that a date comparison implies when the row spans at most
/// `fhir::INSTANT_WIDTH_MS` (an `fhir::instant_param` not listed in [`WIDE`]): a row that must end at or
/// after `t` starts at or after `t - INSTANT_WIDTH_MS`. `None` when the comparison bounds the row's end from
/// above only (its start is bounded already, or not at all).
pub fn instant_start_floor(cmp: Cmp, low_ms: i64, high_ms: i64) -> Option<i64> {
    let ends_from = match cmp {
        Cmp::Ge | Cmp::Ap => low_ms,
        Cmp::Gt => high_ms,
        _ => return None,
    };
    Some(ends_from.saturating_sub(fhir::INSTANT_WIDTH_MS))
}

/// The parameter and direction of `q`'s only sort key when that is a date parameter FHIR allows once per
/// resource (`fhir::single_valued`), read from its own index rows only (no `fhir::also_indexed_under`):
/// a search the backends can answer by reading that parameter's index in order, provided it was never stored
/// with several values ([`MULTI_VALUED`], which the backend checks).
pub fn single_date_sort(q: &SearchQuery) -> Option<(&str, bool)> {
    let [
        Sort {
            field: SortField::Param(name),
            descending,
        },
    ] = q.sort.as_slice()
    else {
        return None;
    };
    let is_date =
        fhir::search_param(q.rtype, name).is_some_and(|p| p.kind == fhir::ParamKind::Date);
    (is_date
        && fhir::single_valued(q.rtype, name)
        && fhir::also_indexed_under(q.rtype, name).is_empty())
    .then_some((name.as_str(), *descending))
}
