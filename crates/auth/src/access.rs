//! What a request needs: the scope decision per HTTP interaction, from method, path and query alone, so it can
//! run before routing (a request never reaches a handler, or learns whether a route exists, without a token).

use crate::scope::{Interaction, Scopes};

/// The permission an HTTP request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// No token: `/health`, `/fhir/metadata`, `/oauth2/token`.
    Open,
    /// Any valid token (unknown routes, answered 404 after authentication).
    Authenticated,
    /// The `admin` scope: `/admin/*`, `/metrics`, `$replay`, AuditEvent.
    Admin,
    /// Each of these (resource type or `*`, interaction).
    Scopes(Vec<(String, Interaction)>),
    /// Each of these and the `cross-org` scope: `/events` and Subscriptions (they carry every organisation's
    /// changes).
    CrossOrg(Vec<(String, Interaction)>),
    /// A Bundle (`POST /fhir`): decided per entry from the body ([`bundle_entry`]).
    Bundle,
}

impl Need {
    /// The first scope of `granted` that is missing, in SMART form (`system/Patient.r`, `admin`); `None` when
    /// the request may proceed. [`Need::Bundle`] is not decided here.
    pub fn missing(&self, granted: &Scopes) -> Option<String> {
        match self {
            Need::Open | Need::Authenticated | Need::Bundle => None,
            Need::Admin => (!granted.is_admin()).then(|| "admin".to_string()),
            Need::Scopes(list) => list
                .iter()
                .find(|(t, i)| !granted.allows(t, *i))
                .map(|(t, i)| Scopes::needed(t, *i)),
            Need::CrossOrg(list) => list
                .iter()
                .find(|(t, i)| !granted.allows(t, *i))
                .map(|(t, i)| Scopes::needed(t, *i))
                .or_else(|| (!granted.is_cross_org()).then(|| crate::scope::CROSS_ORG.to_string())),
        }
    }

    /// The (type, interaction) pairs this need names, if any.
    pub fn scopes(&self) -> &[(String, Interaction)] {
        match self {
            Need::Scopes(list) | Need::CrossOrg(list) => list,
            _ => &[],
        }
    }
}

fn one(t: &str, i: Interaction) -> Need {
    Need::Scopes(vec![(t.to_string(), i)])
}

fn is_type(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Percent-decode (`+` stays `+` in paths; in queries the caller maps it to a space first). Invalid escapes are
/// kept as they are; invalid UTF-8 is replaced, so the result never names a type the server would not see.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decide what `method path?query` needs. `method` is upper case; `path` and `query` are as received
/// (percent-encoded): they are decoded here the way the router and the handlers decode them, so an encoded
/// type name (`/fhir/%50atient/1`) or parameter (`%5Finclude`) is judged as what it means.
pub fn required(method: &str, path: &str, query: &str) -> Need {
    let method = if method == "HEAD" { "GET" } else { method };
    let decoded;
    let path = if path.contains('%') {
        decoded = percent_decode(path);
        decoded.as_str()
    } else {
        path
    };
    match path {
        "/health" | "/fhir/metadata" | "/oauth2/token" => return Need::Open,
        "/metrics" => return Need::Admin,
        "/events" => return Need::CrossOrg(vec![("*".into(), Interaction::Read)]),
        _ => {}
    }
    if path == "/admin" || path.starts_with("/admin/") {
        return Need::Admin;
    }
    let Some(rest) = path.strip_prefix("/fhir") else {
        return Need::Authenticated;
    };
    if !rest.is_empty() && !rest.starts_with('/') {
        return Need::Authenticated;
    }
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let Some(rtype) = segs.first().copied() else {
        return if method == "POST" {
            Need::Bundle
        } else {
            Need::Authenticated
        };
    };
    if !is_type(rtype) {
        return Need::Authenticated;
    }
    if rtype == "AuditEvent" {
        return Need::Admin;
    }
    use Interaction::*;
    let need = match (method, &segs[1..]) {
        ("GET", []) | ("POST", ["_search"]) => {
            let mut list = vec![(rtype.to_string(), Search)];
            list.extend(include_needs(query));
            Need::Scopes(list)
        }
        ("POST", []) | ("POST", ["$validate"]) => one(rtype, Create),
        ("PUT", []) | ("PATCH", []) => one(rtype, Update),
        ("DELETE", []) => one(rtype, Delete),
        ("GET", ["_history"]) => one(rtype, Read),
        ("POST", ["$merge"]) => one(rtype, Update),
        ("GET", [_]) | ("GET", [_, "_history"]) | ("GET", [_, "_history", _]) => one(rtype, Read),
        ("PUT", [_]) | ("PATCH", [_]) => one(rtype, Update),
        ("DELETE", [_]) => one(rtype, Delete),
        ("POST", [_, "$transition"]) => one(rtype, Update),
        ("POST", [_, "$replay"]) => Need::Admin,
        ("POST", [_, "$generate-slots"]) => {
            Need::Scopes(vec![(rtype.to_string(), Read), ("Slot".into(), Create)])
        }
        _ => Need::Authenticated,
    };
    // Subscriptions carry every organisation's changes: managing them needs `cross-org` too.
    match need {
        Need::Scopes(list) if rtype == "Subscription" => Need::CrossOrg(list),
        other => other,
    }
}

/// `_include` / `_revinclude` return other resources: reading them needs their read scope. `_include=A:p:T`
/// needs `T.r`; without a target type the included types are unknown here, so it needs `*.r`;
/// `_revinclude=S:p` needs `S.r`.
fn include_needs(query: &str) -> Vec<(String, Interaction)> {
    let mut out = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " "));
        let k = k.split(':').next().unwrap_or(&k);
        let v = percent_decode(&v.replace('+', " "));
        let parts: Vec<&str> = v.split(':').collect();
        match k {
            "_include" => match parts.as_slice() {
                [_, _, t, ..] if is_type(t) => out.push((t.to_string(), Interaction::Read)),
                _ => out.push(("*".into(), Interaction::Read)),
            },
            "_revinclude" => match parts.first() {
                Some(s) if is_type(s) => out.push((s.to_string(), Interaction::Read)),
                _ => out.push(("*".into(), Interaction::Read)),
            },
            _ => {}
        }
    }
    out
}

/// What one Bundle entry needs, from its `request.method` and `request.url` (`Patient`, `Patient/1`,
/// `Patient?identifier=...`). A nested Bundle needs everything (`*.cruds`), so it is never a way around scopes.
pub fn bundle_entry(method: &str, url: &str) -> Need {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let path = path.trim_start_matches('/');
    let need = required(
        &method.to_ascii_uppercase(),
        &format!("/fhir/{path}"),
        query,
    );
    match need {
        Need::Bundle | Need::Open | Need::Authenticated => Need::Scopes(
            [
                Interaction::Create,
                Interaction::Read,
                Interaction::Update,
                Interaction::Delete,
                Interaction::Search,
            ]
            .into_iter()
            .map(|i| ("*".to_string(), i))
            .collect(),
        ),
        other => other,
    }
}
