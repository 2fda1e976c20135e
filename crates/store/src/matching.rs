//! In-memory evaluation of a [`SearchQuery`]'s clauses against one resource version's index entries, with the
//! same semantics as the backends' SQL. Used where a single resource must be tested against a search (the
//! criteria of a Subscription) without a round trip to the store.

use crate::{Clause, Cmp, IndexEntry, IndexValue, Predicate, ResourceType, SearchQuery};

/// FHIR's date comparison of an indexed range `[low, high]` with a query range `[qlo, qhi]`.
pub fn range_matches(cmp: Cmp, low: i64, high: i64, qlo: i64, qhi: i64) -> bool {
    match cmp {
        Cmp::Eq => low >= qlo && high <= qhi,
        Cmp::Ne => !(low >= qlo && high <= qhi),
        Cmp::Gt => high > qhi,
        Cmp::Lt => low < qlo,
        Cmp::Ge => high >= qlo,
        Cmp::Le => low <= qhi,
        Cmp::Sa => low > qhi,
        Cmp::Eb => high < qlo,
        Cmp::Ap => low <= qhi && high >= qlo,
    }
}

fn predicate_matches(
    rtype: ResourceType,
    param: &str,
    p: &Predicate,
    id: &str,
    last_updated_ms: i64,
    entries: &[IndexEntry],
) -> bool {
    let also = fhir::also_indexed_under(rtype, param);
    let of_param = || {
        entries
            .iter()
            .filter(move |e| e.param == param || also.contains(&e.param))
            .map(|e| &e.value)
    };
    match p {
        Predicate::Id(want) => id == want,
        Predicate::LastUpdated {
            cmp,
            low_ms,
            high_ms,
        } => range_matches(*cmp, last_updated_ms, last_updated_ms, *low_ms, *high_ms),
        Predicate::Token { system, code } => of_param().any(|v| match v {
            IndexValue::Token { system: s, code: c } => {
                let system_ok = match system.as_deref() {
                    None => true,
                    Some("") => s.is_none(),
                    Some(want) => s.as_deref() == Some(want),
                };
                system_ok && code.as_deref().is_none_or(|want| c == want)
            }
            _ => false,
        }),
        Predicate::String { value, exact } => of_param().any(|v| match v {
            IndexValue::String {
                value: normalized,
                exact: as_sent,
            } => match exact {
                Some(want) => as_sent == want && normalized == value,
                None => normalized.starts_with(value.as_str()),
            },
            _ => false,
        }),
        Predicate::Date {
            cmp,
            low_ms,
            high_ms,
        } => of_param().any(|v| match v {
            IndexValue::Date {
                low_ms: lo,
                high_ms: hi,
            } => range_matches(*cmp, *lo, *hi, *low_ms, *high_ms),
            _ => false,
        }),
        Predicate::Reference(target) => {
            of_param().any(|v| matches!(v, IndexValue::Reference(r) if r == target))
        }
    }
}

fn clause_matches(
    rtype: ResourceType,
    c: &Clause,
    id: &str,
    last_updated_ms: i64,
    entries: &[IndexEntry],
) -> bool {
    c.any_of
        .iter()
        .any(|p| predicate_matches(rtype, &c.param, p, id, last_updated_ms, entries))
}

/// True when a live resource of `query.rtype` with this id, last-updated instant and index entries satisfies
/// every clause of `query` (sorting and paging are ignored).
pub fn matches(
    query: &SearchQuery,
    id: &str,
    last_updated_ms: i64,
    entries: &[IndexEntry],
) -> bool {
    query
        .clauses
        .iter()
        .all(|c| clause_matches(query.rtype, c, id, last_updated_ms, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Patient `name` search also reads the `family` and `given` entries (where a HumanName's family and
    /// given parts are indexed); other types' `name` does not.
    #[test]
    fn patient_name_reads_family_and_given() {
        let entries = vec![IndexEntry {
            param: "given",
            value: IndexValue::String {
                value: "zoe".into(),
                exact: "Zoë".into(),
            },
        }];
        let name = |rtype| {
            SearchQuery::new(rtype).with(
                "name",
                Predicate::String {
                    value: "zo".into(),
                    exact: None,
                },
            )
        };
        assert!(matches(&name(ResourceType::Patient), "a", 0, &entries));
        assert!(matches(&name(ResourceType::Practitioner), "a", 0, &entries));
        assert!(!matches(
            &name(ResourceType::Organization),
            "a",
            0,
            &entries
        ));
    }

    fn entries() -> Vec<IndexEntry> {
        vec![
            IndexEntry {
                param: "status",
                value: IndexValue::Token {
                    system: Some("http://hl7.org/fhir/appointmentstatus".into()),
                    code: "cancelled".into(),
                },
            },
            IndexEntry {
                param: "actor",
                value: IndexValue::Reference("Patient/1".into()),
            },
            IndexEntry {
                param: "date",
                value: IndexValue::Date {
                    low_ms: 1_000,
                    high_ms: 2_000,
                },
            },
            IndexEntry {
                param: "name",
                value: IndexValue::String {
                    value: "smith".into(),
                    exact: "Smith".into(),
                },
            },
        ]
    }

    #[test]
    fn clauses_and_alternatives() {
        let q = SearchQuery::new(ResourceType::Appointment)
            .with(
                "status",
                Predicate::Token {
                    system: None,
                    code: Some("cancelled".into()),
                },
            )
            .with("actor", Predicate::Reference("Patient/1".into()));
        assert!(matches(&q, "a", 0, &entries()));
        let q = SearchQuery::new(ResourceType::Appointment).with(
            "status",
            Predicate::Token {
                system: Some(String::new()),
                code: Some("cancelled".into()),
            },
        );
        assert!(
            !matches(&q, "a", 0, &entries()),
            "system '' means no system"
        );
        let q = SearchQuery::new(ResourceType::Appointment).with(
            "name",
            Predicate::String {
                value: "smi".into(),
                exact: None,
            },
        );
        assert!(matches(&q, "a", 0, &entries()));
        let exact = |v: &str| {
            SearchQuery::new(ResourceType::Appointment).with(
                "name",
                Predicate::String {
                    value: v.to_lowercase(),
                    exact: Some(v.into()),
                },
            )
        };
        assert!(!matches(&exact("Smi"), "a", 0, &entries()));
        assert!(!matches(&exact("smith"), "a", 0, &entries()), "case counts");
        assert!(matches(&exact("Smith"), "a", 0, &entries()));
        let q = SearchQuery::new(ResourceType::Appointment).with(
            "date",
            Predicate::Date {
                cmp: Cmp::Ge,
                low_ms: 1_500,
                high_ms: 1_600,
            },
        );
        assert!(matches(&q, "a", 0, &entries()));
        let q = SearchQuery::new(ResourceType::Appointment).with(
            "date",
            Predicate::Date {
                cmp: Cmp::Sa,
                low_ms: 1_500,
                high_ms: 1_600,
            },
        );
        assert!(!matches(&q, "a", 0, &entries()));
        assert!(
            matches(&SearchQuery::new(ResourceType::Appointment), "a", 0, &[]),
            "no clauses: everything"
        );
        let q = SearchQuery::new(ResourceType::Appointment).with("_id", Predicate::Id("b".into()));
        assert!(!matches(&q, "a", 0, &entries()));
    }
}
