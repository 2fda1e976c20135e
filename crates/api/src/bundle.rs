//! `POST /fhir`: FHIR R4 `batch` and `transaction` Bundles, and [`process_bundle`], the same processing for
//! adapters (the MESH inbound poller) that receive a Bundle without an HTTP request.
//!
//! Why it exists: senders deliver related changes together (a patient, its schedule, a slot and the appointment
//! that books it). A `transaction` must apply all of them or none; a `batch` applies each on its own and says
//! what happened to every entry. Both go through exactly the code paths of the REST API: every resource is
//! validated by `fhir` before anything is written, and every change goes through `booking`.
//!
//! Transaction processing (http.html#transaction):
//! 1. Outside the store: every entry is parsed; each create gets its server id; `reference` elements (at any
//!    depth) naming another entry's `fullUrl` (`urn:uuid:...`, or any fullUrl of a create or of an update by
//!    id) are rewritten to `Type/id`; every resource is validated. Any problem fails the Bundle here.
//! 2. One `Store::write` closure: DELETEs (entry order); the `ifNoneExist` searches of conditional creates (a
//!    match reuses the existing id in every reference to that entry); creates and updates in dependency order
//!    (an entry is written after the entries its resource references, otherwise POST before PUT, each in
//!    entry order, so a booking finds the slot it claims); GETs (read and plain search) last. An entry that
//!    fails aborts the closure, which rolls back everything the transaction wrote (resources, outbox events),
//!    and the answer is that entry's error, located as `Bundle.entry[i]...`.
//!
//! Batch processing: entries run one after the other in entry order, each write in its own `Store::write`,
//! each GET through the router (so every read and search the REST API offers works); the answer is always
//! 200 with a `batch-response` entry per request entry (an `outcome` for the failed ones). References are not
//! rewritten in a batch (FHIR forbids dependencies between batch entries).
//!
//! `Idempotency-Key` on `POST /fhir`: a transaction stores its response in its own write; a batch stores it
//! after the last entry (a retry that arrives while the first request is still running is not held back).

use crate::App;
use crate::auth::Caller;
use crate::error::{ApiError, FHIR_JSON};
use crate::handlers::{
    IdemKey, MaybeCaller, Return, etag, idempotency_key, parse_type, prefer_return, refused,
    request_hash, valid_id, write_error,
};
use crate::org::{self, MAX_SCAN, OrgFilter};
use crate::search::{link_url, parse_pairs, parse_search};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir::{Issue, IssueType, ResourceType, operation_outcome};
use serde_json::{Map, Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use store::{IdempotencyRecord, SearchQuery, Store, StoreError, Stored, Tx};
use tower::ServiceExt;

/// Most entries one Bundle may carry: a transaction holds the store's writer for all of them.
pub const MAX_ENTRIES: usize = 10_000;

/// Largest `POST /fhir` body accepted (the other interactions keep axum's default of 2 MB).
pub(crate) const MAX_BODY_BYTES: usize = 32 << 20;

/// The answer to a Bundle: the HTTP status and the body (a `batch-response` / `transaction-response`
/// Bundle, or an OperationOutcome when the Bundle as a whole was refused).
#[derive(Debug, Clone, PartialEq)]
pub struct BundleResponse {
    /// 200 for a processed batch or a committed transaction; the failing entry's status (4xx/5xx) for a
    /// transaction that was rolled back; 400/413/422 for a Bundle that could not be processed at all.
    pub status: u16,
    /// The response Bundle, or an OperationOutcome when `status` is not 200.
    pub body: Value,
}

/// Apply a batch or transaction Bundle (already parsed) as `POST /fhir` would.
///
/// `base_url` is the hub's FHIR base (`http://host:8080/fhir`) or its public URL (`http://host:8080`, to
/// which `/fhir` is appended); it prefixes the `fullUrl` and `location` of the response entries, and absolute
/// `request.url`s must start with it. Never panics; every failure is in the returned status and body.
pub async fn process_bundle<S: Store>(
    store: &Arc<S>,
    base_url: &str,
    bundle: Value,
) -> BundleResponse {
    let base = fhir_base(base_url);
    let answer = run(store, &base, bundle, Return::Representation, None, None).await;
    BundleResponse {
        status: answer.status,
        body: answer.body,
    }
}

/// The `POST /fhir` handler: the body as JSON, `Idempotency-Key` and `Prefer: return=...`, then the same
/// processing as [`process_bundle`].
pub(crate) async fn post<S: Store>(
    State(app): State<Arc<App<S>>>,
    RawQuery(query): RawQuery,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bytes = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&body);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a Bundle of type batch or transaction",
        ));
    }
    let bundle: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Structure,
            format!("The body is not valid JSON: {e}"),
        )
    })?;
    let idem = idempotency_key(&headers, &caller)?.map(|key| Idem {
        key,
        hash: request_hash("POST", "", query.as_deref(), &body),
    });
    let answer = run(
        &app.store,
        &app.fhir_base(),
        bundle,
        prefer_return(&headers),
        idem,
        caller.map(|axum::Extension(c)| c),
    )
    .await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, answer.body.to_string()).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    if answer.replayed {
        res.headers_mut().insert(
            header::HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    Ok(res)
}

/// `http://h/fhir/` or `http://h` -> `http://h/fhir`.
fn fhir_base(base_url: &str) -> String {
    let trimmed = base_url.trim().trim_end_matches('/');
    if trimmed.ends_with("/fhir") {
        trimmed.to_string()
    } else {
        format!("{trimmed}/fhir")
    }
}

// ---------------------------------------------------------------------------------------------------------
// The whole request

/// `Idempotency-Key` and the hash of the request it was first used with.
struct Idem {
    key: IdemKey,
    hash: String,
}

/// What the handler sends back.
struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

impl Answer {
    fn error(e: ApiError) -> Answer {
        Answer {
            status: e.status.as_u16(),
            body: operation_outcome(&e.issues),
            replayed: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Batch,
    Transaction,
}

async fn run<S: Store>(
    store: &Arc<S>,
    base: &str,
    bundle: Value,
    ret: Return,
    idem: Option<Idem>,
    caller: Option<Caller>,
) -> Answer {
    let (mode, entries) = match bundle_entries(bundle) {
        Ok(x) => x,
        Err(e) => return Answer::error(e),
    };
    match mode {
        Mode::Transaction => {
            let filter = org::filter_of(&caller.map(axum::Extension));
            transaction(store.as_ref(), base, entries, ret, idem, filter).await
        }
        Mode::Batch => batch(store, base, entries, ret, idem, caller).await,
    }
}

/// Check the Bundle itself and take out its entries.
fn bundle_entries(bundle: Value) -> Result<(Mode, Vec<Value>), ApiError> {
    let Value::Object(mut obj) = bundle else {
        return Err(ApiError::bad_request(
            "POST /fhir takes a Bundle (a JSON object) of type batch or transaction",
        ));
    };
    match obj.get("resourceType") {
        Some(Value::String(t)) if t == "Bundle" => {}
        Some(Value::String(t)) => {
            return Err(ApiError::bad_request(format!(
                "POST /fhir takes a Bundle of type batch or transaction, not a {t}; create a {t} with POST /fhir/{t}"
            ))
            .at("resourceType"));
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Required,
                "POST /fhir takes a Bundle: resourceType must be \"Bundle\"",
            )
            .at("resourceType"));
        }
    }
    let mode = match obj.get("type") {
        Some(Value::String(t)) if t == "transaction" => Mode::Transaction,
        Some(Value::String(t)) if t == "batch" => Mode::Batch,
        Some(Value::String(t)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                IssueType::NotSupported,
                format!(
                    "a Bundle of type '{t}' cannot be processed at POST /fhir; only 'batch' and 'transaction' are"
                ),
            )
            .at("Bundle.type"));
        }
        Some(_) => {
            return Err(ApiError::bad_request("Bundle.type must be a string").at("Bundle.type"));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Required,
                "Bundle.type is required (batch or transaction)",
            )
            .at("Bundle.type"));
        }
    };
    let entries = match obj.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::bad_request("Bundle.entry must be an array").at("Bundle.entry"));
        }
    };
    if entries.len() > MAX_ENTRIES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooCostly,
            format!(
                "the Bundle has {} entries; at most {MAX_ENTRIES} are accepted in one request",
                entries.len()
            ),
        )
        .at("Bundle.entry"));
    }
    Ok((mode, entries))
}

// ---------------------------------------------------------------------------------------------------------
// Entries

/// One request entry, parsed.
struct Entry {
    index: usize,
    /// `METHOD url`, for messages.
    label: String,
    full_url: Option<String>,
    op: Op,
}

enum Op {
    Create {
        rtype: ResourceType,
        /// The id this create will get (assigned before the write so references can name it).
        id: String,
        resource: Value,
        if_none_exist: Option<SearchQuery>,
    },
    Update {
        rtype: ResourceType,
        target: Target,
        resource: Value,
        if_match: Option<u64>,
    },
    Delete {
        rtype: ResourceType,
        id: String,
        if_match: Option<u64>,
    },
    /// A GET of a transaction, run inside its write.
    Read { rtype: ResourceType, id: String },
    Search {
        rtype: ResourceType,
        query: SearchQuery,
        link_params: Vec<(String, String)>,
    },
    /// A GET of a batch: any read or search, through the router (`path?query` below the FHIR base).
    Get { path: String },
}

enum Target {
    Id(String),
    Conditional(SearchQuery),
}

impl Entry {
    /// `Type/id` this entry writes, when known before the write.
    fn target(&self) -> Option<String> {
        match &self.op {
            Op::Create { rtype, id, .. }
            | Op::Update {
                rtype,
                target: Target::Id(id),
                ..
            }
            | Op::Delete { rtype, id, .. } => Some(format!("{rtype}/{id}")),
            _ => None,
        }
    }

    fn resource_mut(&mut self) -> Option<(ResourceType, &mut Value)> {
        match &mut self.op {
            Op::Create {
                rtype, resource, ..
            }
            | Op::Update {
                rtype, resource, ..
            } => Some((*rtype, resource)),
            _ => None,
        }
    }

    fn is_write(&self) -> bool {
        matches!(self.op, Op::Create { .. } | Op::Update { .. })
    }

    /// Where a problem of this entry is reported: `Bundle.entry[i]` + `suffix`.
    fn at(&self, suffix: &str) -> String {
        format!("Bundle.entry[{}]{suffix}", self.index)
    }
}

fn entry_at(index: usize, suffix: &str) -> String {
    format!("Bundle.entry[{index}]{suffix}")
}

/// `request.url` relative to the FHIR base, without a leading `/`; `None` when it names another server.
fn relative_url<'a>(base: &str, url: &'a str) -> Option<&'a str> {
    let url = url.trim();
    let rest = match url.strip_prefix(base) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => rest,
        _ if url
            .split('?')
            .next()
            .is_some_and(|path| path.contains("://")) =>
        {
            return None;
        }
        _ => url,
    };
    Some(rest.trim_start_matches('/'))
}

/// `W/"3"` (or `"3"`, or `3`) -> 3.
fn parse_version_etag(s: &str) -> Option<u64> {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// The search of a conditional create or update (`identifier=a|b`, also written `Patient?identifier=a|b`).
fn conditional_query(rtype: ResourceType, raw: &str, at: String) -> Result<SearchQuery, ApiError> {
    let raw = raw.trim();
    let raw = match raw.split_once('?') {
        Some((head, tail)) if !head.contains('=') => tail,
        _ => raw,
    };
    let pairs = parse_pairs(Some(raw));
    if pairs.is_empty() {
        return Err(ApiError::bad_request("a conditional request needs search parameters").at(at));
    }
    let mut parsed = parse_search(rtype, &pairs).map_err(|e| ApiError::from(e).at(at.clone()))?;
    if !parsed.chains.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::NotSupported,
            "chained parameters are not supported in conditional requests",
        )
        .at(at));
    }
    parsed.query.count = 2;
    parsed.query.offset = 0;
    Ok(parsed.query)
}

fn not_supported(message: impl Into<String>, at: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, IssueType::NotSupported, message).at(at)
}

/// Parse one entry (its resource not yet validated).
fn parse_entry(mode: Mode, base: &str, index: usize, entry: Value) -> Result<Entry, ApiError> {
    let at = |suffix: &str| entry_at(index, suffix);
    let Value::Object(mut obj) = entry else {
        return Err(ApiError::bad_request("a Bundle entry must be a JSON object").at(at("")));
    };
    let full_url = match obj.get("fullUrl") {
        None => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(_) => {
            return Err(
                ApiError::bad_request("fullUrl must be a non-empty string").at(at(".fullUrl"))
            );
        }
    };
    let Some(Value::Object(request)) = obj.remove("request") else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Required,
            format!(
                "every entry of a {} needs a request (method and url)",
                if mode == Mode::Batch {
                    "batch"
                } else {
                    "transaction"
                }
            ),
        )
        .at(at(".request")));
    };
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match request.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(
                ApiError::bad_request(format!("request.{name} must be a string"))
                    .at(at(&format!(".request.{name}"))),
            ),
        }
    };
    let method = text("method")?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Required,
            "request.method is required",
        )
        .at(at(".request.method"))
    })?;
    let url = text("url")?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Required,
            "request.url is required",
        )
        .at(at(".request.url"))
    })?;
    let if_match = match text("ifMatch")? {
        None => None,
        Some(s) => Some(parse_version_etag(&s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "ifMatch must be a version ETag like W/\"3\", got '{s}'"
            ))
            .at(at(".request.ifMatch"))
        })?),
    };
    let if_none_exist = text("ifNoneExist")?;
    for unsupported in ["ifNoneMatch", "ifModifiedSince"] {
        if request.contains_key(unsupported) {
            return Err(not_supported(
                format!("request.{unsupported} is not supported in a Bundle entry"),
                at(&format!(".request.{unsupported}")),
            ));
        }
    }
    let label = format!("{method} {url}");
    let rel = relative_url(base, &url).ok_or_else(|| {
        ApiError::bad_request(format!(
            "request.url '{url}' names another server; use a URL relative to {base}"
        ))
        .at(at(".request.url"))
    })?;
    let (path, query) = match rel.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rel, None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let url_error = |message: String| ApiError::bad_request(message).at(at(".request.url"));
    let rtype = match segments.first() {
        Some(t) => parse_type(t).map_err(|e| e.at(at(".request.url"))),
        None => Err(url_error(format!(
            "request.url '{url}' names no resource type"
        ))),
    };
    let resource = obj.remove("resource");
    let take_resource = |rtype: ResourceType| -> Result<Value, ApiError> {
        match resource {
            Some(Value::Object(r)) => {
                match r.get("resourceType") {
                    Some(Value::String(t)) if t == rtype.as_str() => {}
                    other => {
                        let shown = other.and_then(Value::as_str).unwrap_or("(none)");
                        return Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            IssueType::Invalid,
                            format!(
                                "resourceType is '{shown}' but request.url '{url}' expects a {rtype}"
                            ),
                        )
                        .at(at(".resource.resourceType")));
                    }
                }
                Ok(Value::Object(r))
            }
            Some(_) => {
                Err(ApiError::bad_request("resource must be a JSON object").at(at(".resource")))
            }
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Required,
                format!("a {method} entry needs a resource"),
            )
            .at(at(".resource"))),
        }
    };

    let op = match method.as_str() {
        "POST" => {
            let rtype = rtype?;
            if segments.len() != 1 || query.is_some() {
                return Err(not_supported(
                    format!(
                        "a POST entry creates a resource: its url must be the type alone (e.g. {rtype}), got '{url}'"
                    ),
                    at(".request.url"),
                ));
            }
            let mut resource = take_resource(rtype)?;
            let id = uuid::Uuid::now_v7().to_string();
            if let Some(obj) = resource.as_object_mut() {
                obj.insert("id".into(), Value::String(id.clone()));
            }
            let if_none_exist = match &if_none_exist {
                Some(raw) => Some(conditional_query(rtype, raw, at(".request.ifNoneExist"))?),
                None => None,
            };
            Op::Create {
                rtype,
                id,
                resource,
                if_none_exist,
            }
        }
        "PUT" => {
            let rtype = rtype?;
            let target = match (segments.as_slice(), query) {
                ([_, id], None) => {
                    if !valid_id(id) {
                        return Err(url_error(format!(
                            "'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)"
                        )));
                    }
                    Target::Id((*id).to_string())
                }
                ([_], Some(q)) => {
                    Target::Conditional(conditional_query(rtype, q, at(".request.url"))?)
                }
                _ => {
                    return Err(url_error(format!(
                        "a PUT entry's url must be Type/id or Type?search, got '{url}'"
                    )));
                }
            };
            let resource = take_resource(rtype)?;
            let body_id = resource.get("id").and_then(Value::as_str);
            match (&target, body_id) {
                (Target::Id(id), None) => {
                    return Err(ApiError::bad_request(format!(
                        "the resource must carry id '{id}' to match request.url"
                    ))
                    .at(at(".resource.id")));
                }
                (Target::Id(id), Some(body_id)) if body_id != id => {
                    return Err(ApiError::bad_request(format!(
                        "resource id '{body_id}' does not match the id '{id}' of request.url"
                    ))
                    .at(at(".resource.id")));
                }
                (Target::Conditional(_), Some(body_id)) if !valid_id(body_id) => {
                    return Err(ApiError::bad_request(format!(
                        "'{body_id}' is not a valid FHIR id"
                    ))
                    .at(at(".resource.id")));
                }
                _ => {}
            }
            Op::Update {
                rtype,
                target,
                resource,
                if_match,
            }
        }
        "DELETE" => {
            let rtype = rtype?;
            match (segments.as_slice(), query) {
                ([_, id], None) => {
                    if !valid_id(id) {
                        return Err(url_error(format!(
                            "'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)"
                        )));
                    }
                    Op::Delete {
                        rtype,
                        id: (*id).to_string(),
                        if_match,
                    }
                }
                ([_], Some(_)) => {
                    return Err(not_supported(
                        "conditional delete is not supported; delete by Type/id",
                        at(".request.url"),
                    ));
                }
                _ => {
                    return Err(url_error(format!(
                        "a DELETE entry's url must be Type/id, got '{url}'"
                    )));
                }
            }
        }
        "GET" if mode == Mode::Batch => {
            if segments.is_empty() {
                return Err(url_error(format!(
                    "request.url '{url}' names nothing to read"
                )));
            }
            Op::Get {
                path: rel.to_string(),
            }
        }
        "GET" => {
            let rtype = rtype?;
            let pairs = parse_pairs(query);
            match segments.as_slice() {
                [_, id] if pairs.iter().all(|(k, _)| k == "_format" || k == "_pretty") => {
                    if !valid_id(id) {
                        return Err(url_error(format!(
                            "'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)"
                        )));
                    }
                    Op::Read {
                        rtype,
                        id: (*id).to_string(),
                    }
                }
                [_] => {
                    let parsed = parse_search(rtype, &pairs)
                        .map_err(|e| ApiError::from(e).at(at(".request.url")))?;
                    if !parsed.chains.is_empty()
                        || !parsed.includes.is_empty()
                        || parsed.summary_count
                    {
                        return Err(not_supported(
                            "inside a transaction, GET supports reads and plain searches (no chained parameters, _include or _summary=count); send this search in a batch",
                            at(".request.url"),
                        ));
                    }
                    Op::Search {
                        rtype,
                        query: parsed.query,
                        link_params: parsed.link_params,
                    }
                }
                _ => {
                    return Err(not_supported(
                        format!(
                            "inside a transaction, GET supports Type/id and Type?search only, got '{url}'; send it in a batch"
                        ),
                        at(".request.url"),
                    ));
                }
            }
        }
        "PATCH" => {
            return Err(not_supported(
                "PATCH entries are not supported; send the whole resource with PUT",
                at(".request.method"),
            ));
        }
        "HEAD" => {
            return Err(not_supported(
                "HEAD entries are not supported",
                at(".request.method"),
            ));
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::CodeInvalid,
                format!(
                    "request.method '{other}' is not an HTTP verb of FHIR (GET, POST, PUT, DELETE)"
                ),
            )
            .at(at(".request.method")));
        }
    };
    if if_none_exist.is_some() && !matches!(op, Op::Create { .. }) {
        return Err(
            ApiError::bad_request("ifNoneExist applies to POST entries only")
                .at(at(".request.ifNoneExist")),
        );
    }
    if if_match.is_some() && !matches!(op, Op::Update { .. } | Op::Delete { .. }) {
        return Err(
            ApiError::bad_request("ifMatch applies to PUT and DELETE entries only")
                .at(at(".request.ifMatch")),
        );
    }
    Ok(Entry {
        index,
        label,
        full_url,
        op,
    })
}

/// `METHOD url` of a raw entry, for messages about an entry that could not be parsed.
fn raw_label(entry: &Value) -> String {
    let part = |name: &str| {
        entry
            .pointer(&format!("/request/{name}"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    format!("{} {}", part("method"), part("url"))
}

/// Validate the entry's resource exactly like the REST API does (nothing invalid reaches the store).
fn validate_entry(entry: &mut Entry) -> Result<(), ApiError> {
    if let Some((rtype, resource)) = entry.resource_mut() {
        let issues = fhir::validate(rtype, resource);
        if issues.iter().any(Issue::is_error) {
            return Err(ApiError::invalid_resource(issues));
        }
    }
    Ok(())
}

/// Report an entry's failure at the Bundle level (a transaction): FHIRPath expressions of the resource
/// (`Appointment.status`) become `Bundle.entry[i].resource.status`, diagnostics name the entry, and an
/// issue without a location gets `Bundle.entry[i]`.
fn locate(mut e: ApiError, index: usize, label: &str, rtype: Option<ResourceType>) -> ApiError {
    let resource_at = entry_at(index, ".resource");
    for issue in &mut e.issues {
        for expr in &mut issue.expression {
            if expr.starts_with("Bundle.") {
                continue;
            }
            let inner = match rtype {
                Some(t) if expr.as_str() == t.as_str() => "",
                Some(t) => expr
                    .strip_prefix(t.as_str())
                    .filter(|rest| rest.starts_with('.'))
                    .unwrap_or(expr.as_str()),
                None => expr.as_str(),
            };
            let sep = if inner.is_empty() || inner.starts_with('.') {
                ""
            } else {
                "."
            };
            *expr = format!("{resource_at}{sep}{inner}");
        }
        if issue.is_error() {
            issue.diagnostics = format!("Bundle.entry[{index}] ({label}): {}", issue.diagnostics);
        }
    }
    let unlocated = e.issues.iter().all(|i| i.expression.is_empty());
    if unlocated && let Some(first) = e.issues.iter_mut().find(|i| i.is_error()) {
        first.expression.push(entry_at(index, ""));
    }
    e
}

// ---------------------------------------------------------------------------------------------------------
// References between entries

/// Rewrite every `reference` (at any depth) found in `map`; report (`unresolved`) those that look like a
/// reference to another entry but name none: `urn:uuid:`/`urn:oid:` ones and conditional references.
fn rewrite_references(
    v: &mut Value,
    map: &HashMap<String, String>,
    path: &mut String,
    unresolved: &mut Vec<(String, String)>,
) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match child {
                    Value::String(s) if k == "reference" => {
                        if let Some(to) = map.get(s.as_str()) {
                            *s = to.clone();
                        } else if s.starts_with("urn:uuid:")
                            || s.starts_with("urn:oid:")
                            || is_conditional_reference(s)
                        {
                            unresolved.push((path.clone(), s.clone()));
                        }
                    }
                    _ => rewrite_references(child, map, path, unresolved),
                }
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                rewrite_references(child, map, path, unresolved);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// `Patient?identifier=...`: a conditional reference (not supported).
fn is_conditional_reference(s: &str) -> bool {
    match s.split_once('?') {
        Some((head, _)) => ResourceType::parse(head).is_some() || head.contains("/fhir/"),
        None => false,
    }
}

/// Every `reference` string in `v`.
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                match child {
                    Value::String(s) if k == "reference" => out.push(s.clone()),
                    _ => references(child, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| references(c, out)),
        _ => {}
    }
}

/// The order of a transaction's creates and updates: each after the entries its resource references
/// (a cycle is broken in the default order), otherwise POST before PUT, each in entry order.
fn write_order(entries: &[Entry]) -> Vec<usize> {
    let rank = |e: &Entry| (usize::from(!matches!(e.op, Op::Create { .. })), e.index);
    let writes: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].is_write())
        .collect();
    let by_target: HashMap<String, usize> = writes
        .iter()
        .filter_map(|&i| entries[i].target().map(|t| (t, i)))
        .collect();
    let mut indegree: HashMap<usize, usize> = writes.iter().map(|&i| (i, 0)).collect();
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for &i in &writes {
        let mut refs = Vec::new();
        if let Op::Create { resource, .. } | Op::Update { resource, .. } = &entries[i].op {
            references(resource, &mut refs);
        }
        let deps: HashSet<usize> = refs
            .iter()
            .filter_map(|r| by_target.get(r).copied())
            .filter(|&j| j != i)
            .collect();
        for j in deps {
            dependents.entry(j).or_default().push(i);
            *indegree.entry(i).or_default() += 1;
        }
    }
    let mut waiting: BTreeSet<(usize, usize)> = writes.iter().map(|&i| rank(&entries[i])).collect();
    let mut ready: BTreeSet<(usize, usize)> = writes
        .iter()
        .filter(|i| indegree.get(i) == Some(&0))
        .map(|&i| rank(&entries[i]))
        .collect();
    let mut order = Vec::with_capacity(writes.len());
    while let Some(next) = ready.pop_first().or_else(|| waiting.first().copied()) {
        if !waiting.remove(&next) {
            continue;
        }
        let i = next.1;
        order.push(i);
        for &d in dependents.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(n) = indegree.get_mut(&d) {
                *n = n.saturating_sub(1);
                if *n == 0 && waiting.contains(&rank(&entries[d])) {
                    ready.insert(rank(&entries[d]));
                }
            }
        }
    }
    order
}

// ---------------------------------------------------------------------------------------------------------
// Executing entries inside a store transaction

/// What an entry did.
enum Done {
    /// A create or an update-as-create: 201.
    Created(Stored),
    /// An update: 200.
    Updated(Stored),
    /// A conditional create that matched: 200, nothing written.
    Existing(Stored),
    /// 204 (with the tombstone's version when something was deleted).
    Deleted(Option<Stored>),
    /// A read in a transaction: 200.
    Read(Stored),
    /// A GET answered with a body (a search in a transaction, any GET of a batch): its status and body.
    Got {
        status: u16,
        body: Value,
        etag: Option<String>,
    },
    /// A failed batch entry: its status and OperationOutcome.
    Failed { status: u16, outcome: Value },
}

impl Done {
    fn failed(e: ApiError) -> Done {
        Done::Failed {
            status: e.status.as_u16(),
            outcome: operation_outcome(&e.issues),
        }
    }
}

type Step = store::Result<Result<Done, ApiError>>;

fn exec_create(
    tx: &mut dyn Tx,
    index: usize,
    rtype: ResourceType,
    id: String,
    resource: Value,
    if_none_exist: Option<&SearchQuery>,
    mut filter: Option<&mut OrgFilter>,
) -> Step {
    if let Some(q) = if_none_exist {
        let mut found = tx.search(q)?;
        if let Some(f) = filter.as_deref_mut() {
            found = f.tx_visible(tx, found)?;
        }
        match found.as_slice() {
            [] => {}
            [existing] => return Ok(Ok(Done::Existing(existing.clone()))),
            _ => {
                return Ok(Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    IssueType::Duplicate,
                    "ifNoneExist matched more than one resource",
                )
                .at(entry_at(index, ".request.ifNoneExist"))));
            }
        }
    }
    if let Some(f) = filter
        && let Err(e) = f.tx_check_write(tx, rtype, &id, &resource)?
    {
        return Ok(Err(e));
    }
    Ok(booking::write_resource(tx, rtype, id, resource, Some(0))?
        .map(|o| Done::Created(o.into_stored()))
        .map_err(refused))
}

/// The id a PUT writes: the URL's, or what its conditional search finds (else the body's id, else a new one).
fn update_id(
    tx: &mut dyn Tx,
    index: usize,
    target: &Target,
    resource: &Value,
    filter: Option<&mut OrgFilter>,
) -> store::Result<Result<String, ApiError>> {
    let q = match target {
        Target::Id(id) => return Ok(Ok(id.clone())),
        Target::Conditional(q) => q,
    };
    let mut found = tx.search(q)?;
    if let Some(f) = filter {
        found = f.tx_visible(tx, found)?;
    }
    let body_id = resource.get("id").and_then(Value::as_str);
    Ok(match (found.as_slice(), body_id) {
        ([], Some(id)) => Ok(id.to_string()),
        ([], None) => Ok(uuid::Uuid::now_v7().to_string()),
        ([one], Some(id)) if one.id != id => Err(ApiError::bad_request(format!(
            "resource id '{id}' differs from the matching resource {}/{}",
            one.rtype, one.id
        ))
        .at(entry_at(index, ".resource.id"))),
        ([one], _) => Ok(one.id.clone()),
        _ => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            IssueType::Duplicate,
            "the conditional update's search matched more than one resource",
        )
        .at(entry_at(index, ".request.url"))),
    })
}

fn exec_update(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: String,
    mut resource: Value,
    if_match: Option<u64>,
    filter: Option<&mut OrgFilter>,
) -> Step {
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    if let Some(f) = filter {
        if let Err(e) = f.tx_check_current(tx, rtype, &id)? {
            return Ok(Err(e));
        }
        if let Err(e) = f.tx_check_write(tx, rtype, &id, &resource)? {
            return Ok(Err(e));
        }
    }
    Ok(booking::write_resource(tx, rtype, id, resource, if_match)?
        .map(|o| match o {
            booking::Outcome::Created(s) => Done::Created(s),
            booking::Outcome::Updated(s) => Done::Updated(s),
        })
        .map_err(refused))
}

fn exec_delete(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
    if_match: Option<u64>,
    filter: Option<&mut OrgFilter>,
) -> Step {
    if let Some(f) = filter
        && let Err(e) = confined_instance(f, tx, rtype, id)?
    {
        return Ok(Err(e));
    }
    Ok(booking::delete_resource(tx, rtype, id, if_match)?
        .map(Done::Deleted)
        .map_err(refused))
}

/// For a confined client, inside a transaction: 404 for a resource of another organisation, and (so the two
/// cannot be told apart) for a missing or deleted one of a separated type.
fn confined_instance(
    f: &mut OrgFilter,
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
) -> store::Result<Result<(), ApiError>> {
    if ::auth::org::kind(rtype.as_str()) == ::auth::org::Kind::Shared {
        return Ok(Ok(()));
    }
    match tx.read(rtype, id)? {
        Some(s) if !s.deleted => f.tx_check_current(tx, rtype, id),
        _ => Ok(Err(org::not_known(rtype, id))),
    }
}

fn exec_read(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
    filter: Option<&mut OrgFilter>,
) -> Step {
    if let Some(f) = filter
        && let Err(e) = confined_instance(f, tx, rtype, id)?
    {
        return Ok(Err(e));
    }
    Ok(match tx.read(rtype, id)? {
        None => Err(ApiError::not_found(format!("{rtype}/{id} is not known"))),
        Some(s) if s.deleted => Err(ApiError::new(
            StatusCode::GONE,
            IssueType::Deleted,
            format!("{rtype}/{id} was deleted (version {})", s.version),
        )),
        Some(s) => Ok(Done::Read(s)),
    })
}

fn exec_search(
    tx: &mut dyn Tx,
    base: &str,
    rtype: ResourceType,
    query: &SearchQuery,
    link_params: &[(String, String)],
    filter: Option<&mut OrgFilter>,
) -> Step {
    let count = query.count;
    let offset = query.offset;
    let mut q = query.clone();
    q.count = count + 1;
    let filter = filter.filter(|_| ::auth::org::kind(rtype.as_str()) != ::auth::org::Kind::Shared);
    let (found, more) = match filter {
        None => {
            let mut found = tx.search(&q)?;
            let more = found.len() > count;
            found.truncate(count);
            (found, more)
        }
        Some(f) => {
            // Filtered before paging, as on the REST search.
            q.count = MAX_SCAN + 1;
            q.offset = 0;
            let scanned = tx.search(&q)?;
            if scanned.len() > MAX_SCAN {
                return Ok(Err(org::too_costly(rtype)));
            }
            let visible = f.tx_visible(tx, scanned)?;
            let more = visible.len() > offset + count;
            (visible.into_iter().skip(offset).take(count).collect(), more)
        }
    };
    let mut entries = Vec::with_capacity(found.len());
    for s in &found {
        entries.push(json!({
            "fullUrl": format!("{base}/{}/{}", s.rtype, s.id),
            "resource": stored_json(s)?,
            "search": {"mode": "match"},
        }));
    }
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("type".into(), json!("searchset"));
    if !more {
        bundle.insert("total".into(), json!(offset + found.len()));
    }
    let mut links =
        vec![json!({"relation": "self", "url": link_url(base, rtype, link_params, count, offset)})];
    if more {
        links.push(json!({"relation": "next", "url": link_url(base, rtype, link_params, count, offset + count)}));
    }
    bundle.insert("link".into(), Value::Array(links));
    if !entries.is_empty() {
        bundle.insert("entry".into(), Value::Array(entries));
    }
    Ok(Ok(Done::Got {
        status: 200,
        body: Value::Object(bundle),
        etag: None,
    }))
}

fn stored_json(s: &Stored) -> store::Result<Value> {
    fhir::parse_json(&s.json)
        .map_err(|e| StoreError::Backend(format!("stored {}/{} is not JSON: {e}", s.rtype, s.id)))
}

/// Run one batch entry's write (its own transaction).
fn exec_batch_write(tx: &mut dyn Tx, index: usize, op: Op, mut filter: Option<OrgFilter>) -> Step {
    match op {
        Op::Create {
            rtype,
            id,
            resource,
            if_none_exist,
        } => exec_create(
            tx,
            index,
            rtype,
            id,
            resource,
            if_none_exist.as_ref(),
            filter.as_mut(),
        ),
        Op::Update {
            rtype,
            target,
            resource,
            if_match,
        } => {
            let id = match update_id(tx, index, &target, &resource, filter.as_mut())? {
                Ok(id) => id,
                Err(e) => return Ok(Err(e)),
            };
            exec_update(tx, rtype, id, resource, if_match, filter.as_mut())
        }
        Op::Delete {
            rtype,
            id,
            if_match,
        } => exec_delete(tx, rtype, &id, if_match, filter.as_mut()),
        Op::Read { .. } | Op::Search { .. } | Op::Get { .. } => Ok(Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueType::Exception,
            "a GET entry reached the write path",
        ))),
    }
}

/// A store error of entry `index`, as the API reports it (a stale `ifMatch` located at `request.ifMatch`).
fn entry_store_error(e: StoreError, index: usize, if_match: bool) -> ApiError {
    let stale = if_match && matches!(e, StoreError::VersionConflict { .. });
    let err = write_error(e);
    if stale {
        err.at(entry_at(index, ".request.ifMatch"))
    } else {
        err
    }
}

fn has_if_match(op: &Op) -> bool {
    matches!(
        op,
        Op::Update {
            if_match: Some(_),
            ..
        } | Op::Delete {
            if_match: Some(_),
            ..
        }
    )
}

// ---------------------------------------------------------------------------------------------------------
// Transaction

/// Why a transaction's closure stopped: a refusal (rolled back by returning an error) or a storage failure.
enum Abort {
    Refused(ApiError),
    Store(StoreError, ApiError),
}

enum TxOut {
    Done(Vec<Option<Done>>),
    Answered(Value),
    Replay(IdempotencyRecord),
}

async fn transaction<S: Store>(
    store: &S,
    base: &str,
    raw_entries: Vec<Value>,
    ret: Return,
    idem: Option<Idem>,
    filter: Option<OrgFilter>,
) -> Answer {
    let mut entries = Vec::with_capacity(raw_entries.len());
    for (i, raw) in raw_entries.into_iter().enumerate() {
        let label = raw_label(&raw);
        match parse_entry(Mode::Transaction, base, i, raw) {
            Ok(e) => entries.push(e),
            Err(e) => return Answer::error(locate(e, i, &label, None)),
        }
    }

    // fullUrl -> Type/id of the entries that write a known id.
    let mut map: HashMap<String, String> = HashMap::new();
    let mut touched: HashMap<String, usize> = HashMap::new();
    for e in &entries {
        let Some(target) = e.target() else { continue };
        if let Some(&first) = touched.get(&target) {
            return Answer::error(locate(
                ApiError::bad_request(format!(
                    "{target} is also changed by Bundle.entry[{first}]; a transaction may change a resource only once"
                ))
                .at(e.at(".request.url")),
                e.index,
                &e.label,
                None,
            ));
        }
        touched.insert(target.clone(), e.index);
        if let Some(full) = &e.full_url
            && !matches!(e.op, Op::Delete { .. })
        {
            if map.contains_key(full) {
                return Answer::error(locate(
                    ApiError::bad_request(format!(
                        "fullUrl '{full}' is used by more than one entry"
                    ))
                    .at(e.at(".fullUrl")),
                    e.index,
                    &e.label,
                    None,
                ));
            }
            if *full != target {
                map.insert(full.clone(), target);
            }
        }
    }
    for e in &mut entries {
        let (index, label) = (e.index, e.label.clone());
        let Some((rtype, resource)) = e.resource_mut() else {
            continue;
        };
        let mut unresolved = Vec::new();
        let mut path = entry_at(index, ".resource");
        rewrite_references(resource, &map, &mut path, &mut unresolved);
        if let Some((at, reference)) = unresolved.into_iter().next() {
            let message = if reference.starts_with("urn:") {
                format!("reference '{reference}' names no fullUrl of this transaction")
            } else {
                format!(
                    "conditional references ('{reference}') are not supported; reference Type/id"
                )
            };
            return Answer::error(locate(
                ApiError::bad_request(message).at(at),
                index,
                &label,
                Some(rtype),
            ));
        }
        if let Err(err) = validate_entry(e) {
            return Answer::error(locate(err, index, &label, Some(rtype)));
        }
    }

    let order = write_order(&entries);
    let base_owned = base.to_string();
    let failure: Arc<Mutex<Option<ApiError>>> = Arc::default();
    let failure_in = failure.clone();
    let written = store
        .write(move |tx| {
            match run_transaction(tx, &base_owned, entries, &order, ret, idem, touched, filter) {
                Ok(out) => Ok(out),
                Err(abort) => {
                    let (store_error, api_error) = match abort {
                        Abort::Refused(e) => (
                            StoreError::Conflict("the transaction was rolled back".into()),
                            e,
                        ),
                        Abort::Store(se, e) => (se, e),
                    };
                    if let Ok(mut slot) = failure_in.lock() {
                        *slot = Some(api_error);
                    }
                    Err(store_error)
                }
            }
        })
        .await;
    match written {
        Ok(TxOut::Done(results)) => Answer {
            status: 200,
            body: response_bundle(base, Mode::Transaction, results, ret),
            replayed: false,
        },
        Ok(TxOut::Answered(body)) => Answer {
            status: 200,
            body,
            replayed: false,
        },
        Ok(TxOut::Replay(rec)) => match serde_json::from_str(&rec.body) {
            Ok(body) => Answer {
                status: rec.status,
                body,
                replayed: true,
            },
            Err(e) => Answer::error(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                IssueType::Exception,
                format!("the stored response of this Idempotency-Key cannot be read: {e}"),
            )),
        },
        Err(e) => {
            let stashed = failure.lock().ok().and_then(|mut slot| slot.take());
            Answer::error(stashed.unwrap_or_else(|| write_error(e)))
        }
    }
}

/// The closure of a transaction. Any `Err` makes the caller roll everything back.
#[allow(clippy::too_many_arguments)]
fn run_transaction(
    tx: &mut dyn Tx,
    base: &str,
    mut entries: Vec<Entry>,
    order: &[usize],
    ret: Return,
    idem: Option<Idem>,
    mut touched: HashMap<String, usize>,
    mut filter: Option<OrgFilter>,
) -> Result<TxOut, Abort> {
    if let Some(idem) = &idem {
        let rec = tx.idempotency_get(&idem.key.stored).map_err(|e| {
            let api = write_error(e.clone());
            Abort::Store(e, api)
        })?;
        if let Some(rec) = rec {
            if rec.request_hash != idem.hash {
                return Err(Abort::Refused(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueType::BusinessRule,
                    format!(
                        "Idempotency-Key '{}' was already used for a different request; use a new key",
                        idem.key.shown
                    ),
                )));
            }
            return Ok(TxOut::Replay(rec));
        }
    }

    let n = entries.len();
    let mut results: Vec<Option<Done>> = (0..n).map(|_| None).collect();

    // Checks a step's outcome: a refusal or a storage failure aborts, located at the entry.
    fn step(entry: &Entry, rtype: Option<ResourceType>, r: Step) -> Result<Done, Abort> {
        match r {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(Abort::Refused(locate(e, entry.index, &entry.label, rtype))),
            Err(se) => {
                let api = entry_store_error(se.clone(), entry.index, has_if_match(&entry.op));
                Err(Abort::Store(
                    se,
                    locate(api, entry.index, &entry.label, rtype),
                ))
            }
        }
    }

    // 1. DELETE
    for e in entries.iter() {
        if let Op::Delete {
            rtype,
            id,
            if_match,
        } = &e.op
        {
            let r = exec_delete(tx, *rtype, id, *if_match, filter.as_mut());
            results[e.index] = Some(step(e, Some(*rtype), r)?);
        }
    }

    // 2. Conditional creates: a match reuses the existing resource (and its id in every reference).
    let mut remap: HashMap<String, String> = HashMap::new();
    let mut matched: HashSet<usize> = HashSet::new();
    for e in entries.iter() {
        if let Op::Create {
            rtype,
            id,
            if_none_exist: Some(q),
            ..
        } = &e.op
        {
            let found = match tx.search(q).and_then(|found| match filter.as_mut() {
                Some(f) => f.tx_visible(tx, found),
                None => Ok(found),
            }) {
                Ok(found) => found,
                Err(se) => {
                    let api = locate(write_error(se.clone()), e.index, &e.label, Some(*rtype));
                    return Err(Abort::Store(se, api));
                }
            };
            match found.as_slice() {
                [] => {}
                [one] => {
                    remap.insert(format!("{rtype}/{id}"), format!("{}/{}", one.rtype, one.id));
                    matched.insert(e.index);
                    results[e.index] = Some(Done::Existing(one.clone()));
                }
                _ => {
                    return Err(Abort::Refused(locate(
                        ApiError::new(
                            StatusCode::PRECONDITION_FAILED,
                            IssueType::Duplicate,
                            "ifNoneExist matched more than one resource",
                        )
                        .at(e.at(".request.ifNoneExist")),
                        e.index,
                        &e.label,
                        Some(*rtype),
                    )));
                }
            }
        }
    }
    if !remap.is_empty() {
        for e in entries.iter_mut() {
            let index = e.index;
            if let Some((_, resource)) = e.resource_mut() {
                let mut path = entry_at(index, ".resource");
                rewrite_references(resource, &remap, &mut path, &mut Vec::new());
            }
        }
    }

    // 3. POST and PUT, in dependency order.
    for &i in order {
        if matched.contains(&i) {
            continue;
        }
        let Some(e) = entries.get_mut(i) else {
            continue;
        };
        let index = e.index;
        let op = std::mem::replace(
            &mut e.op,
            Op::Get {
                path: String::new(),
            },
        );
        let done = match op {
            Op::Create {
                rtype,
                id,
                resource,
                if_none_exist,
            } => {
                let r = exec_create(
                    tx,
                    index,
                    rtype,
                    id,
                    resource,
                    if_none_exist.as_ref(),
                    filter.as_mut(),
                );
                match step(e, Some(rtype), r)? {
                    Done::Existing(s) => {
                        return Err(Abort::Refused(locate(
                            ApiError::new(
                                StatusCode::CONFLICT,
                                IssueType::Duplicate,
                                format!(
                                    "ifNoneExist matches {}/{}, created by another entry of this transaction",
                                    s.rtype, s.id
                                ),
                            )
                            .at(entry_at(index, ".request.ifNoneExist")),
                            index,
                            &e.label,
                            Some(rtype),
                        )));
                    }
                    done => done,
                }
            }
            Op::Update {
                rtype,
                target,
                resource,
                if_match,
            } => {
                let id = match update_id(tx, index, &target, &resource, filter.as_mut()) {
                    Ok(Ok(id)) => id,
                    Ok(Err(err)) => {
                        return Err(Abort::Refused(locate(err, index, &e.label, Some(rtype))));
                    }
                    Err(se) => {
                        let api = locate(write_error(se.clone()), index, &e.label, Some(rtype));
                        return Err(Abort::Store(se, api));
                    }
                };
                if let Target::Conditional(_) = target {
                    let key = format!("{rtype}/{id}");
                    if let Some(&first) = touched.get(&key) {
                        return Err(Abort::Refused(locate(
                            ApiError::bad_request(format!(
                                "the conditional update resolves to {key}, also changed by Bundle.entry[{first}]; a transaction may change a resource only once"
                            ))
                            .at(entry_at(index, ".request.url")),
                            index,
                            &e.label,
                            Some(rtype),
                        )));
                    }
                    touched.insert(key, index);
                }
                // Keep ifMatch visible to `step` for locating a stale version.
                e.op = Op::Update {
                    rtype,
                    target: Target::Id(id.clone()),
                    resource: Value::Null,
                    if_match,
                };
                let r = exec_update(tx, rtype, id, resource, if_match, filter.as_mut());
                step(e, Some(rtype), r)?
            }
            other => {
                e.op = other;
                continue;
            }
        };
        results[index] = Some(done);
    }

    // 4. GET
    for e in entries.iter() {
        let r = match &e.op {
            Op::Read { rtype, id } => exec_read(tx, *rtype, id, filter.as_mut()),
            Op::Search {
                rtype,
                query,
                link_params,
            } => exec_search(tx, base, *rtype, query, link_params, filter.as_mut()),
            _ => continue,
        };
        results[e.index] = Some(step(e, None, r)?);
    }

    match idem {
        None => Ok(TxOut::Done(results)),
        Some(idem) => {
            let body = response_bundle(base, Mode::Transaction, results, ret);
            let record = IdempotencyRecord {
                key: idem.key.stored,
                request_hash: idem.hash,
                status: 200,
                headers: vec![("content-type".into(), FHIR_JSON.into())],
                body: body.to_string(),
                created_ms: tx.now_ms(),
            };
            tx.idempotency_put(record).map_err(|e| {
                let api = write_error(e.clone());
                Abort::Store(e, api)
            })?;
            Ok(TxOut::Answered(body))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Batch

async fn batch<S: Store>(
    store: &Arc<S>,
    base: &str,
    raw_entries: Vec<Value>,
    ret: Return,
    idem: Option<Idem>,
    caller: Option<Caller>,
) -> Answer {
    let filter = org::filter_of(&caller.clone().map(axum::Extension));
    if let Some(idem) = &idem {
        let key = idem.key.stored.clone();
        match store.write(move |tx| tx.idempotency_get(&key)).await {
            Err(e) => return Answer::error(write_error(e)),
            Ok(Some(rec)) if rec.request_hash != idem.hash => {
                return Answer::error(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueType::BusinessRule,
                    format!(
                        "Idempotency-Key '{}' was already used for a different request; use a new key",
                        idem.key.shown
                    ),
                ));
            }
            Ok(Some(rec)) => {
                return match serde_json::from_str(&rec.body) {
                    Ok(body) => Answer {
                        status: rec.status,
                        body,
                        replayed: true,
                    },
                    Err(e) => Answer::error(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        IssueType::Exception,
                        format!("the stored response of this Idempotency-Key cannot be read: {e}"),
                    )),
                };
            }
            Ok(None) => {}
        }
    }

    let mut router: Option<axum::Router> = None;
    let mut results = Vec::with_capacity(raw_entries.len());
    for (i, raw) in raw_entries.into_iter().enumerate() {
        let mut entry = match parse_entry(Mode::Batch, base, i, raw) {
            Ok(e) => e,
            Err(e) => {
                results.push(Some(Done::failed(e)));
                continue;
            }
        };
        if let Err(e) = validate_entry(&mut entry) {
            results.push(Some(Done::failed(e)));
            continue;
        }
        let done = match entry.op {
            Op::Get { path } => {
                let router = router.get_or_insert_with(|| {
                    let public = base.strip_suffix("/fhir").unwrap_or(base);
                    crate::router(store.clone(), crate::ApiConfig::new(public))
                });
                sub_get(router, &path, caller.as_ref()).await
            }
            op => {
                let if_match = has_if_match(&op);
                let filter = filter.clone();
                match store
                    .write(move |tx| exec_batch_write(tx, i, op, filter))
                    .await
                {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => Done::failed(e),
                    Err(e) => Done::failed(entry_store_error(e, i, if_match)),
                }
            }
        };
        results.push(Some(done));
    }
    let body = response_bundle(base, Mode::Batch, results, ret);
    if let Some(idem) = idem {
        let record_body = body.to_string();
        let stored = store
            .write(move |tx| {
                let created_ms = tx.now_ms();
                tx.idempotency_put(IdempotencyRecord {
                    key: idem.key.stored,
                    request_hash: idem.hash,
                    status: 200,
                    headers: vec![("content-type".into(), FHIR_JSON.into())],
                    body: record_body,
                    created_ms,
                })
            })
            .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "the batch was applied but its Idempotency-Key response was not stored");
        }
    }
    Answer {
        status: 200,
        body,
        replayed: false,
    }
}

/// A GET entry of a batch, answered by the router as a REST request would be.
async fn sub_get(router: &axum::Router, path: &str, caller: Option<&Caller>) -> Done {
    let request = Request::builder()
        .method("GET")
        .uri(format!("/fhir/{path}"))
        .header(header::ACCEPT, "application/fhir+json")
        .body(Body::empty());
    let request = match request {
        Ok(mut r) => {
            // The entry is answered as this client: the same organisation filter applies.
            if let Some(c) = caller {
                r.extensions_mut().insert(c.clone());
            }
            r
        }
        Err(e) => {
            return Done::failed(ApiError::bad_request(format!(
                "request.url '{path}' is not a valid URL: {e}"
            )));
        }
    };
    let response = match router.clone().oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match axum::body::to_bytes(response.into_body(), 256 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return Done::failed(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                IssueType::Exception,
                format!("reading the answer of GET {path}: {e}"),
            ));
        }
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    if (200..300).contains(&status) {
        Done::Got { status, body, etag }
    } else {
        Done::Failed {
            status,
            outcome: body,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The response Bundle

fn status_line(status: u16) -> String {
    match StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

fn response_bundle(base: &str, mode: Mode, results: Vec<Option<Done>>, ret: Return) -> Value {
    let entries: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Some(done) => response_entry(base, done, ret),
            // Unreachable: every entry of a committed transaction has a result.
            None => json!({"response": {"status": status_line(500)}}),
        })
        .collect();
    let kind = match mode {
        Mode::Batch => "batch-response",
        Mode::Transaction => "transaction-response",
    };
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": kind,
        "entry": entries,
    })
}

fn response_entry(base: &str, done: Done, ret: Return) -> Value {
    let written = |s: Stored, status: u16| {
        let mut response = Map::new();
        response.insert("status".into(), json!(status_line(status)));
        response.insert(
            "location".into(),
            json!(format!(
                "{base}/{}/{}/_history/{}",
                s.rtype, s.id, s.version
            )),
        );
        response.insert("etag".into(), json!(etag(s.version)));
        response.insert("lastModified".into(), json!(s.last_updated()));
        let mut entry = Map::new();
        entry.insert(
            "fullUrl".into(),
            json!(format!("{base}/{}/{}", s.rtype, s.id)),
        );
        match ret {
            Return::Representation => {
                let resource = serde_json::from_str::<Value>(&s.json).unwrap_or(Value::Null);
                entry.insert("resource".into(), resource);
            }
            Return::OperationOutcome => {
                let verb = if status == 201 { "created" } else { "stored" };
                response.insert(
                    "outcome".into(),
                    operation_outcome(&[Issue::information(format!(
                        "{}/{} {verb} (version {})",
                        s.rtype, s.id, s.version
                    ))]),
                );
            }
            Return::Minimal => {}
        }
        entry.insert("response".into(), Value::Object(response));
        Value::Object(entry)
    };
    match done {
        Done::Created(s) => written(s, 201),
        Done::Updated(s) | Done::Existing(s) => written(s, 200),
        Done::Deleted(s) => {
            let mut response = Map::new();
            response.insert("status".into(), json!(status_line(204)));
            if let Some(s) = s {
                response.insert("etag".into(), json!(etag(s.version)));
            }
            json!({"response": response})
        }
        Done::Read(s) => {
            let resource = serde_json::from_str::<Value>(&s.json).unwrap_or(Value::Null);
            json!({
                "fullUrl": format!("{base}/{}/{}", s.rtype, s.id),
                "resource": resource,
                "response": {
                    "status": status_line(200),
                    "etag": etag(s.version),
                    "lastModified": s.last_updated(),
                },
            })
        }
        Done::Got { status, body, etag } => {
            let mut response = Map::new();
            response.insert("status".into(), json!(status_line(status)));
            if let Some(t) = etag {
                response.insert("etag".into(), json!(t));
            }
            if let Some(lm) = body.pointer("/meta/lastUpdated") {
                response.insert("lastModified".into(), lm.clone());
            }
            let mut entry = Map::new();
            if let (Some(t), Some(id)) = (
                body.get("resourceType").and_then(Value::as_str),
                body.get("id").and_then(Value::as_str),
            ) && t != "Bundle"
            {
                entry.insert("fullUrl".into(), json!(format!("{base}/{t}/{id}")));
            }
            if !body.is_null() {
                entry.insert("resource".into(), body);
            }
            entry.insert("response".into(), Value::Object(response));
            Value::Object(entry)
        }
        Done::Failed { status, outcome } => {
            json!({"response": {"status": status_line(status), "outcome": outcome}})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(index: usize, rtype: ResourceType, id: &str, refs: &[&str]) -> Entry {
        let refs: Vec<Value> = refs.iter().map(|r| json!({"reference": r})).collect();
        Entry {
            index,
            label: format!("POST {rtype}"),
            full_url: None,
            op: Op::Create {
                rtype,
                id: id.to_string(),
                resource: json!({"resourceType": rtype.as_str(), "x": refs}),
                if_none_exist: None,
            },
        }
    }

    #[test]
    fn writes_follow_references_then_post_before_put() {
        let entries = vec![
            post(0, ResourceType::Appointment, "a", &["Slot/s", "Patient/p"]),
            post(1, ResourceType::Slot, "s", &["Schedule/sc"]),
            Entry {
                index: 2,
                label: "PUT Schedule/sc".into(),
                full_url: None,
                op: Op::Update {
                    rtype: ResourceType::Schedule,
                    target: Target::Id("sc".into()),
                    resource: json!({"resourceType": "Schedule"}),
                    if_match: None,
                },
            },
            post(3, ResourceType::Patient, "p", &[]),
        ];
        assert_eq!(write_order(&entries), vec![3, 2, 1, 0]);
    }

    #[test]
    fn a_reference_cycle_falls_back_to_entry_order() {
        let entries = vec![
            post(0, ResourceType::Patient, "a", &["Patient/b"]),
            post(1, ResourceType::Patient, "b", &["Patient/a"]),
            post(2, ResourceType::Organization, "o", &[]),
        ];
        let order = write_order(&entries);
        assert_eq!(order.len(), 3);
        assert_eq!(order[0], 2, "{order:?}");
    }

    #[test]
    fn references_are_rewritten_at_any_depth() {
        let map: HashMap<String, String> =
            [("urn:uuid:1".to_string(), "Patient/9".to_string())].into();
        let mut v = json!({
            "participant": [{"actor": {"reference": "urn:uuid:1"}}],
            "extension": [{"valueReference": {"reference": "urn:uuid:1"}}],
            "other": {"reference": "urn:uuid:2"},
            "cond": {"reference": "Patient?identifier=x"},
            "kept": {"reference": "Patient/3"}
        });
        let mut unresolved = Vec::new();
        let mut path = "Bundle.entry[0].resource".to_string();
        rewrite_references(&mut v, &map, &mut path, &mut unresolved);
        assert_eq!(v["participant"][0]["actor"]["reference"], "Patient/9");
        assert_eq!(
            v["extension"][0]["valueReference"]["reference"],
            "Patient/9"
        );
        assert_eq!(v["kept"]["reference"], "Patient/3");
        assert_eq!(
            unresolved,
            vec![
                (
                    "Bundle.entry[0].resource.other.reference".to_string(),
                    "urn:uuid:2".to_string()
                ),
                (
                    "Bundle.entry[0].resource.cond.reference".to_string(),
                    "Patient?identifier=x".to_string()
                ),
            ]
        );
    }

    #[test]
    fn resource_expressions_are_located_in_the_bundle() {
        let e = ApiError::invalid_resource(vec![
            Issue::error(IssueType::CodeInvalid, "bad status").at("Appointment.status"),
            Issue::error(IssueType::Invalid, "bad type").at("resourceType"),
        ]);
        let e = locate(e, 2, "POST Appointment", Some(ResourceType::Appointment));
        assert_eq!(
            e.issues[0].expression,
            vec!["Bundle.entry[2].resource.status"]
        );
        assert_eq!(
            e.issues[1].expression,
            vec!["Bundle.entry[2].resource.resourceType"]
        );
        assert!(
            e.issues[0]
                .diagnostics
                .starts_with("Bundle.entry[2] (POST Appointment): ")
        );
        let bare = locate(ApiError::bad_request("x"), 1, "DELETE Patient/1", None);
        assert_eq!(bare.issues[0].expression, vec!["Bundle.entry[1]"]);
    }

    #[test]
    fn urls_and_bases() {
        assert_eq!(fhir_base("http://h:1"), "http://h:1/fhir");
        assert_eq!(fhir_base("http://h:1/fhir/"), "http://h:1/fhir");
        let base = "http://h/fhir";
        assert_eq!(relative_url(base, "Patient/1"), Some("Patient/1"));
        assert_eq!(relative_url(base, "/Patient?x=1"), Some("Patient?x=1"));
        assert_eq!(
            relative_url(base, "http://h/fhir/Patient/1"),
            Some("Patient/1")
        );
        assert_eq!(relative_url(base, "http://other/fhir/Patient/1"), None);
        assert_eq!(relative_url(base, "http://h/fhirx/Patient"), None);
        assert_eq!(
            relative_url(base, "Patient?identifier=https://x.example/id|1"),
            Some("Patient?identifier=https://x.example/id|1")
        );
        assert_eq!(parse_version_etag("W/\"3\""), Some(3));
        assert_eq!(parse_version_etag("x"), None);
    }
}
