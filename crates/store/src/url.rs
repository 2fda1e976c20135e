//! FHIR search URLs: parameters -> [`SearchQuery`]. Shared by the REST API (searches, conditional requests)
//! and event delivery (Subscription criteria).

use crate::{Clause, Cmp, Predicate, SearchQuery, Sort, SortField};
use fhir::{ParamKind, ResourceType, SearchParamDef};

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

/// Decode `a=b&c=d` (with `+` as space and percent escapes) into pairs, keeping order.
pub fn parse_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    let Some(raw) = raw else { return Vec::new() };
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

pub fn encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b':')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// A parsed search request.
#[derive(Debug)]
pub struct ParsedSearch {
    pub query: SearchQuery,
    /// `_include` parameters resolved to reference search parameters of the searched type.
    pub includes: Vec<&'static SearchParamDef>,
    /// `_summary=count`: only the total.
    pub summary_count: bool,
    /// Parameters that define the result set (everything but paging), for `self`/`next` links.
    pub link_params: Vec<(String, String)>,
    /// Chained parameters (`schedule.actor=...`), resolved by the caller into reference clauses.
    pub chains: Vec<Chain>,
}

/// A chained parameter: `param` (a reference parameter of the searched type) must point at a `target`
/// resource that matches the search `inner` (which may itself be chained).
#[derive(Debug)]
pub struct Chain {
    pub param: &'static SearchParamDef,
    pub target: ResourceType,
    pub inner: Vec<(String, String)>,
}

/// Parse `schedule.actor` or `schedule:Schedule.actor` into a chain on `rtype`.
fn parse_chain(rtype: ResourceType, key: &str, value: &str) -> Result<Chain, QueryError> {
    let (head, tail) = key.split_once('.').unwrap_or((key, ""));
    let (name, type_modifier) = match head.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (head, None),
    };
    let Some(param) = fhir::search_param(rtype, name).filter(|d| d.kind == ParamKind::Reference)
    else {
        return Err(QueryError::invalid(format!(
            "chained search '{key}': '{name}' is not a reference search parameter of {rtype}"
        )));
    };
    let target = match (type_modifier, param.targets) {
        (Some(m), _) => ResourceType::parse(m)
            .filter(|t| param.targets.contains(t))
            .ok_or_else(|| {
                QueryError::invalid(format!(
                    "chained search '{key}': '{m}' is not a target of '{name}'"
                ))
            })?,
        (None, [only]) => *only,
        (None, _) => {
            return Err(QueryError::invalid(format!(
                "chained search '{key}': '{name}' can point at several types; name one, e.g. {name}:{}.{tail}",
                param.targets.first().map(|t| t.as_str()).unwrap_or("Type")
            )));
        }
    };
    if tail.is_empty() {
        return Err(QueryError::invalid(format!(
            "chained search '{key}' names no parameter after '.'"
        )));
    }
    Ok(Chain {
        param,
        target,
        inner: vec![(tail.to_string(), value.to_string())],
    })
}

fn unsupported(msg: impl Into<String>) -> QueryError {
    QueryError {
        not_supported: true,
        message: msg.into(),
    }
}

/// Split a parameter value on commas not escaped as `\,`.
fn split_alternatives(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',') | Some('|') | Some('\\') | Some('$')) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_prefix(v: &str) -> (Cmp, &str) {
    let prefixes = [
        ("eq", Cmp::Eq),
        ("ne", Cmp::Ne),
        ("gt", Cmp::Gt),
        ("lt", Cmp::Lt),
        ("ge", Cmp::Ge),
        ("le", Cmp::Le),
        ("sa", Cmp::Sa),
        ("eb", Cmp::Eb),
        ("ap", Cmp::Ap),
    ];
    for (p, c) in prefixes {
        if let Some(rest) = v.strip_prefix(p)
            && rest.starts_with(|ch: char| ch.is_ascii_digit())
        {
            return (c, rest);
        }
    }
    (Cmp::Eq, v)
}

fn date_predicate(name: &str, v: &str, last_updated: bool) -> Result<Predicate, QueryError> {
    let (cmp, rest) = parse_prefix(v);
    let Some((low_ms, high_ms)) = fhir::parse_date_range(rest) else {
        return Err(QueryError::invalid(format!(
            "search parameter '{name}': '{v}' is not a FHIR date/dateTime (expected e.g. 2024-05-01 or ge2024-05-01T09:00:00Z)"
        )));
    };
    Ok(if last_updated {
        Predicate::LastUpdated {
            cmp,
            low_ms,
            high_ms,
        }
    } else {
        Predicate::Date {
            cmp,
            low_ms,
            high_ms,
        }
    })
}

fn token_predicate(v: &str) -> Predicate {
    match v.split_once('|') {
        None => Predicate::Token {
            system: None,
            code: Some(v.to_string()),
        },
        Some((s, c)) => Predicate::Token {
            system: Some(s.to_string()),
            code: if c.is_empty() {
                None
            } else {
                Some(c.to_string())
            },
        },
    }
}

fn reference_predicates(
    def: &SearchParamDef,
    modifier: Option<&str>,
    v: &str,
) -> Result<Vec<Predicate>, QueryError> {
    // Absolute URL: keep the `Type/id` tail.
    let trimmed = v.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.rsplitn(3, '/').collect();
    let tail = match segments.as_slice() {
        [id, ty, ..] if ResourceType::parse(ty).is_some() => Some(format!("{ty}/{id}")),
        _ => None,
    };
    if let Some(t) = tail {
        return Ok(vec![Predicate::Reference(t)]);
    }
    if v.contains('/') {
        return Err(QueryError::invalid(format!(
            "search parameter '{}': '{v}' is not a reference this server holds (expected Type/id or id)",
            def.name
        )));
    }
    if let Some(m) = modifier {
        let Some(t) = ResourceType::parse(m) else {
            return Err(unsupported(format!(
                "modifier ':{m}' is not supported on '{}'",
                def.name
            )));
        };
        return Ok(vec![Predicate::Reference(format!("{t}/{v}"))]);
    }
    Ok(def
        .targets
        .iter()
        .map(|t| Predicate::Reference(format!("{t}/{v}")))
        .collect())
}

pub fn parse_search(
    rtype: ResourceType,
    pairs: &[(String, String)],
) -> Result<ParsedSearch, QueryError> {
    let mut query = SearchQuery::new(rtype);
    query.count = DEFAULT_COUNT;
    let mut includes = Vec::new();
    let mut summary_count = false;
    let mut link_params = Vec::new();
    let mut chains = Vec::new();

    for (key, value) in pairs {
        if !key.starts_with('_') && key.contains('.') {
            chains.push(parse_chain(rtype, key, value)?);
            link_params.push((key.clone(), value.clone()));
            continue;
        }
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        let keep_in_links = !matches!(name, "_offset" | "_format" | "_pretty" | "_totalMethod");
        match name {
            "_count" => {
                let n: usize = value.parse().map_err(|_| {
                    QueryError::invalid(format!(
                        "_count must be a non-negative integer, got '{value}'"
                    ))
                })?;
                query.count = n.min(MAX_COUNT);
            }
            "_offset" => {
                query.offset = value.parse().map_err(|_| {
                    QueryError::invalid(format!(
                        "_offset must be a non-negative integer, got '{value}'"
                    ))
                })?;
            }
            // `_totalMethod` is sent by fhirpy's count(); the total is always exact here.
            "_format" | "_pretty" | "_totalMethod" => {}
            "_summary" => match value.as_str() {
                "count" => summary_count = true,
                "false" => {}
                other => {
                    return Err(unsupported(format!(
                        "_summary={other} is not supported (supported: count, false)"
                    )));
                }
            },
            "_total" => match value.as_str() {
                "accurate" | "estimate" => query.want_total = true,
                "none" => {}
                other => {
                    return Err(QueryError::invalid(format!(
                        "_total={other} is not valid (none, estimate, accurate)"
                    )));
                }
            },
            "_sort" => {
                for item in value.split(',').filter(|s| !s.is_empty()) {
                    let (descending, field) = match item.strip_prefix('-') {
                        Some(f) => (true, f),
                        None => (false, item),
                    };
                    let field = match field {
                        "_id" => SortField::Id,
                        "_lastUpdated" => SortField::LastUpdated,
                        f => match fhir::search_param(rtype, f) {
                            Some(d) if matches!(d.kind, ParamKind::String | ParamKind::Date) => {
                                SortField::Param(d.name.to_string())
                            }
                            _ => {
                                return Err(unsupported(format!(
                                    "_sort by '{f}' is not supported for {rtype} (use _id, _lastUpdated or a string/date parameter)"
                                )));
                            }
                        },
                    };
                    query.sort.push(Sort { field, descending });
                }
            }
            "_include" => {
                let mut parts = value.split(':');
                let (src, param) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if modifier.is_some() {
                    return Err(unsupported(format!(
                        "_include:{} is not supported",
                        modifier.unwrap_or("")
                    )));
                }
                if src != rtype.as_str() {
                    return Err(unsupported(format!(
                        "_include={value}: only includes from the searched type {rtype} are supported"
                    )));
                }
                match fhir::search_param(rtype, param) {
                    Some(d) if d.kind == ParamKind::Reference => includes.push(d),
                    _ => {
                        return Err(unsupported(format!(
                            "_include={value}: '{param}' is not a reference search parameter of {rtype}"
                        )));
                    }
                }
            }
            "_id" => {
                let any_of = split_alternatives(value)
                    .into_iter()
                    .map(Predicate::Id)
                    .collect();
                query.clauses.push(Clause {
                    param: "_id".into(),
                    any_of,
                });
            }
            "_lastUpdated" => {
                let any_of = split_alternatives(value)
                    .iter()
                    .map(|v| date_predicate("_lastUpdated", v, true))
                    .collect::<Result<Vec<_>, _>>()?;
                query.clauses.push(Clause {
                    param: "_lastUpdated".into(),
                    any_of,
                });
            }
            n if n.starts_with('_') => {
                return Err(unsupported(format!(
                    "search parameter '{n}' is not supported"
                )));
            }
            n => {
                let Some(def) = fhir::search_param(rtype, n) else {
                    let known: Vec<&str> =
                        fhir::search_params(rtype).iter().map(|p| p.name).collect();
                    return Err(QueryError::invalid(format!(
                        "unknown search parameter '{n}' for {rtype}; supported: _id, _lastUpdated, {}",
                        known.join(", ")
                    )));
                };
                let mut any_of = Vec::new();
                for alt in split_alternatives(value) {
                    match (def.kind, modifier) {
                        (ParamKind::Token, None) => any_of.push(token_predicate(&alt)),
                        (ParamKind::String, None) => any_of.push(Predicate::String {
                            value: fhir::normalize_string(&alt),
                            exact: None,
                        }),
                        (ParamKind::String, Some("exact")) => any_of.push(Predicate::String {
                            value: fhir::normalize_string(&alt),
                            exact: Some(alt.clone()),
                        }),
                        (ParamKind::Date, None) => any_of.push(date_predicate(n, &alt, false)?),
                        (ParamKind::Reference, m) => {
                            any_of.extend(reference_predicates(def, m, &alt)?)
                        }
                        (_, Some(m)) => {
                            return Err(unsupported(format!(
                                "modifier ':{m}' is not supported on '{n}'"
                            )));
                        }
                    }
                }
                query.clauses.push(Clause {
                    param: def.name.to_string(),
                    any_of,
                });
            }
        }
        if keep_in_links {
            link_params.push((key.clone(), value.clone()));
        }
    }
    // FHIR: `_count=0` is the same as `_summary=count`.
    if query.count == 0 {
        summary_count = true;
    }
    if summary_count {
        query.want_total = true;
    }
    Ok(ParsedSearch {
        query,
        includes,
        summary_count,
        link_params,
        chains,
    })
}

/// A search URL the server cannot run: malformed (`not_supported: false`) or using something this server does
/// not implement (`not_supported: true`). Both are client errors (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub not_supported: bool,
    pub message: String,
}

impl QueryError {
    pub fn invalid(message: impl Into<String>) -> QueryError {
        QueryError {
            not_supported: false,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for QueryError {}

/// Parse a Subscription-style criteria string `Type?param=value&...` (no chains) into a query.
pub fn parse_criteria(criteria: &str) -> Result<SearchQuery, QueryError> {
    let (ty, params) = criteria.split_once('?').unwrap_or((criteria, ""));
    let rtype = ResourceType::parse(ty.trim()).ok_or_else(|| {
        QueryError::invalid(format!("criteria must start with a served resource type, e.g. Appointment?status=booked (got '{ty}')"))
    })?;
    let parsed = parse_search(rtype, &parse_pairs(Some(params)))?;
    if !parsed.chains.is_empty() || !parsed.includes.is_empty() || parsed.summary_count {
        return Err(unsupported(
            "criteria may not use chained parameters, _include or _summary",
        ));
    }
    Ok(parsed.query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_respect_escapes() {
        assert_eq!(
            split_alternatives(r"a,b\,c"),
            vec!["a".to_string(), "b,c".to_string()]
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("ge2024-01-01"), (Cmp::Ge, "2024-01-01"));
        assert_eq!(parse_prefix("2024"), (Cmp::Eq, "2024"));
    }

    #[test]
    fn pairs_decode() {
        let p = parse_pairs(Some(
            "identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009&name=a+b",
        ));
        assert_eq!(p[0].1, "https://fhir.nhs.uk/Id/nhs-number|9000000009");
        assert_eq!(p[1].1, "a b");
    }
}
