//! FHIR interactions: create, read, vread, update, delete, history, search, $validate.

use crate::App;
use crate::auth::Caller;
use crate::error::{ApiError, FHIR_JSON};
use crate::http_date::http_date;
use crate::org::{self, MAX_SCAN, OrgFilter, StoreLookup};
use crate::search::{self, link_url, parse_pairs, parse_search, push_entry, push_json_str};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir::{Issue, IssueType, ResourceType, operation_outcome};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use store::{HistoryQuery, IdempotencyRecord, SearchQuery, Store, StoreError, Stored, Tx};

type AppState<S> = State<Arc<App<S>>>;
/// The authenticated client, when authentication is on.
pub(crate) type MaybeCaller = Option<Extension<Caller>>;

/// A complete response computed inside a write transaction (so it can be stored for idempotent replay).
#[derive(Debug, Clone)]
pub struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = (status, self.body).into_response();
        for (k, v) in self.headers {
            if let (Ok(name), Ok(value)) =
                (header::HeaderName::try_from(k), HeaderValue::from_str(&v))
            {
                res.headers_mut().insert(name, value);
            }
        }
        res
    }
}

pub(crate) fn parse_type(s: &str) -> Result<ResourceType, ApiError> {
    ResourceType::parse(s).ok_or_else(|| {
        let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            IssueType::NotSupported,
            format!(
                "resource type '{s}' is not served here; supported: {}",
                known.join(", ")
            ),
        )
    })
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)"
        )))
    }
}

/// `Prefer: return=...`
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub(crate) fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for part in prefer.split(',') {
        match part.trim() {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

/// `If-Match: W/"3"` -> 3.
pub(crate) fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    let inner = s.trim_start_matches("W/").trim_matches('"');
    inner.parse::<u64>().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "If-Match must be a version ETag like W/\"3\", got '{s}'"
        ))
    })
}

pub(crate) fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

fn resource_headers(base: &str, s: &Stored, with_location: bool) -> Vec<(String, String)> {
    let mut h = vec![
        ("content-type".to_string(), FHIR_JSON.to_string()),
        ("etag".to_string(), etag(s.version)),
        ("last-modified".to_string(), http_date(s.last_updated_ms)),
    ];
    if with_location {
        h.push((
            "location".to_string(),
            format!("{base}/{}/{}/_history/{}", s.rtype, s.id, s.version),
        ));
    }
    h
}

pub(crate) fn stored_reply(
    base: &str,
    s: &Stored,
    status: u16,
    ret: Return,
    with_location: bool,
) -> Reply {
    let mut headers = resource_headers(base, s, with_location);
    let body = match ret {
        Return::Representation => s.json.clone(),
        Return::OperationOutcome => {
            let verb = if status == 201 { "created" } else { "updated" };
            operation_outcome(&[Issue::information(format!(
                "{}/{} {verb} (version {})",
                s.rtype, s.id, s.version
            ))])
            .to_string()
        }
        Return::Minimal => {
            headers.retain(|(k, _)| k != "content-type");
            String::new()
        }
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// A refusal decided by the booking engine, as an API error.
pub(crate) fn refused(e: booking::BookingError) -> ApiError {
    ApiError {
        status: StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::CONFLICT),
        issues: e.issues(),
    }
}

/// Store errors of a write, with a version conflict (a stale `If-Match`) reported as 412.
pub(crate) fn write_error(e: StoreError) -> ApiError {
    match e {
        StoreError::VersionConflict {
            expected, actual, ..
        } => ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            IssueType::Conflict,
            format!("If-Match version {expected} does not match the current version {actual}"),
        ),
        other => other.into(),
    }
}

/// Parse and validate a request body as a resource of `rtype`.
pub(crate) fn validated_body(rtype: ResourceType, body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(format!(
            "request body is empty; expected a {rtype} resource"
        )));
    }
    match fhir::validate_json(body, Some(rtype)) {
        Ok(v) => Ok(v.resource),
        Err(issues) => {
            let parse_failure = issues
                .iter()
                .all(|i| i.code == IssueType::Structure && i.expression.is_empty());
            if parse_failure {
                Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    issues,
                })
            } else {
                Err(ApiError::invalid_resource(issues))
            }
        }
    }
}

/// An `Idempotency-Key`: as stored (tied to the client that sent it, so another client's same key never
/// replays this client's response) and as the client wrote it.
#[derive(Debug, Clone)]
pub(crate) struct IdemKey {
    pub(crate) stored: String,
    pub(crate) shown: String,
}

pub(crate) fn idempotency_key(
    headers: &HeaderMap,
    caller: &MaybeCaller,
) -> Result<Option<IdemKey>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let k = v.to_str().unwrap_or("").trim();
            if k.is_empty() || k.len() > 255 {
                Err(ApiError::bad_request(
                    "Idempotency-Key must be 1-255 visible characters",
                ))
            } else {
                let stored = match caller {
                    Some(Extension(c)) => format!("{}:{}:{k}", c.client_id.len(), c.client_id),
                    None => k.to_string(),
                };
                Ok(Some(IdemKey {
                    stored,
                    shown: k.to_string(),
                }))
            }
        }
    }
}

pub(crate) fn request_hash(method: &str, path: &str, query: Option<&str>, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"?");
    h.update(query.unwrap_or("").as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

/// Run a write with optional `Idempotency-Key` handling: a retry with the same key and the same request
/// replays the stored reply; the same key with a different request is refused.
pub(crate) async fn idempotent_write<S, F>(
    store: &S,
    key: Option<IdemKey>,
    hash: String,
    f: F,
) -> Result<Reply, ApiError>
where
    S: Store,
    F: FnOnce(&mut dyn Tx) -> store::Result<Result<Reply, ApiError>> + Send + 'static,
{
    idempotent_write_reading(store, store::ReadAhead::default(), key, hash, f).await
}

/// [`idempotent_write`], telling the store what `f` will read ([`store::ReadAhead`]).
pub(crate) async fn idempotent_write_reading<S, F>(
    store: &S,
    ahead: store::ReadAhead,
    key: Option<IdemKey>,
    hash: String,
    f: F,
) -> Result<Reply, ApiError>
where
    S: Store,
    F: FnOnce(&mut dyn Tx) -> store::Result<Result<Reply, ApiError>> + Send + 'static,
{
    store
        .write_reading(ahead, move |tx| {
            if let Some(key) = &key
                && let Some(rec) = tx.idempotency_get(&key.stored)? {
                    if rec.request_hash != hash {
                        return Ok(Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            IssueType::BusinessRule,
                            format!("Idempotency-Key '{}' was already used for a different request; use a new key", key.shown),
                        )));
                    }
                    let mut headers = rec.headers;
                    headers.push(("idempotent-replayed".into(), "true".into()));
                    return Ok(Ok(Reply { status: rec.status, headers, body: rec.body }));
                }
            let reply = match f(tx)? {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            if let Some(key) = key {
                tx.idempotency_put(IdempotencyRecord {
                    key: key.stored,
                    request_hash: hash,
                    status: reply.status,
                    headers: reply.headers.clone(),
                    body: reply.body.clone(),
                    created_ms: tx.now_ms(),
                })?;
            }
            Ok(Ok(reply))
        })
        .await
        .map_err(write_error)?
}

fn conditional_query(rtype: ResourceType, raw: &str) -> Result<SearchQuery, ApiError> {
    let pairs = parse_pairs(Some(raw));
    if pairs.is_empty() {
        return Err(ApiError::bad_request(
            "a conditional request needs search parameters",
        ));
    }
    let mut parsed = parse_search(rtype, &pairs)?;
    if !parsed.chains.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::NotSupported,
            "chained parameters are not supported in conditional requests",
        ));
    }
    parsed.query.count = 2;
    parsed.query.offset = 0;
    Ok(parsed.query)
}

/// POST /fhir/{type}
pub async fn create<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let rtype = parse_type(&rtype)?;
    let mut resource = validated_body(rtype, &body)?;
    let key = idempotency_key(&headers, &caller)?;
    let mut filter = org::filter_of(&caller);
    let hash = request_hash("POST", rtype.as_str(), query.as_deref(), &body);
    let ret = prefer_return(&headers);
    let condition = match headers.get("if-none-exist").and_then(|v| v.to_str().ok()) {
        Some(raw) => Some(conditional_query(rtype, raw.trim_start_matches('?'))?),
        None => None,
    };
    let id = uuid::Uuid::now_v7().to_string();
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    let base = app.fhir_base();
    let mut ahead = booking::ahead::for_write(rtype, &id, &resource);
    ahead.searches.extend(condition.clone());
    let resource = booking::Incoming::prepare(rtype, &id, resource);
    idempotent_write_reading(app.store.as_ref(), ahead, key, hash, move |tx| {
        if let Some(q) = &condition {
            let mut found = tx.search(q)?;
            if let Some(f) = &mut filter {
                // Another organisation's match is not a match: it cannot be seen.
                found = f.tx_visible(tx, found)?;
            }
            match found.as_slice() {
                [] => {}
                [existing] => return Ok(Ok(stored_reply(&base, existing, 200, ret, true))),
                _ => {
                    return Ok(Err(ApiError::new(
                        StatusCode::PRECONDITION_FAILED,
                        IssueType::Duplicate,
                        "If-None-Exist matched more than one resource",
                    )));
                }
            }
        }
        if let Some(f) = &mut filter
            && let Err(e) = f.tx_check_write(tx, rtype, &id, resource.value())?
        {
            return Ok(Err(e));
        }
        Ok(booking::write_resource(tx, rtype, id, resource, Some(0))?
            .map(|o| stored_reply(&base, o.stored(), 201, ret, true))
            .map_err(refused))
    })
    .await
}

/// The shared body of update, conditional update and patch: store `resource` as `id`, creating when absent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn put_resource(
    tx: &mut dyn Tx,
    base: &str,
    rtype: ResourceType,
    id: String,
    resource: impl Into<booking::Incoming>,
    expected: Option<u64>,
    ret: Return,
    filter: Option<&mut OrgFilter>,
) -> store::Result<Result<Reply, ApiError>> {
    let resource = resource.into();
    if let Some(f) = filter {
        if let Err(e) = f.tx_check_current(tx, rtype, &id)? {
            return Ok(Err(e));
        }
        if let Err(e) = f.tx_check_write(tx, rtype, &id, resource.value())? {
            return Ok(Err(e));
        }
    }
    Ok(booking::write_resource(tx, rtype, id, resource, expected)?
        .map(|o| {
            let created = o.is_created();
            stored_reply(
                base,
                o.stored(),
                if created { 201 } else { 200 },
                ret,
                created,
            )
        })
        .map_err(refused))
}

/// PUT /fhir/{type}/{id}
pub async fn update<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let rtype = parse_type(&rtype)?;
    check_id(&id)?;
    let mut filter = org::filter_of(&caller);
    if let Some(f) = &mut filter {
        f.check_instance(app.store.as_ref(), rtype, &id).await?;
    }
    let resource = validated_body(rtype, &body)?;
    match resource.get("id").and_then(Value::as_str) {
        None => {
            return Err(ApiError::bad_request(format!(
                "the resource must carry id '{id}' to match the URL"
            ))
            .at(format!("{rtype}.id")));
        }
        Some(body_id) if body_id != id => {
            return Err(ApiError::bad_request(format!(
                "resource id '{body_id}' does not match the URL id '{id}'"
            ))
            .at(format!("{rtype}.id")));
        }
        _ => {}
    }
    let expected = if_match(&headers)?;
    let key = idempotency_key(&headers, &caller)?;
    let hash = request_hash("PUT", &format!("{rtype}/{id}"), None, &body);
    let ret = prefer_return(&headers);
    let base = app.fhir_base();
    let ahead = booking::ahead::for_write(rtype, &id, &resource);
    let resource = booking::Incoming::prepare(rtype, &id, resource);
    idempotent_write_reading(app.store.as_ref(), ahead, key, hash, move |tx| {
        put_resource(
            tx,
            &base,
            rtype,
            id,
            resource,
            expected,
            ret,
            filter.as_mut(),
        )
    })
    .await
}

/// PUT /fhir/{type}?search
pub async fn conditional_update<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let rtype = parse_type(&rtype)?;
    let resource = validated_body(rtype, &body)?;
    let condition = conditional_query(rtype, query.as_deref().unwrap_or(""))?;
    let expected = if_match(&headers)?;
    let key = idempotency_key(&headers, &caller)?;
    let mut filter = org::filter_of(&caller);
    let hash = request_hash("PUT", rtype.as_str(), query.as_deref(), &body);
    let ret = prefer_return(&headers);
    let base = app.fhir_base();
    idempotent_write(app.store.as_ref(), key, hash, move |tx| {
        let mut found = tx.search(&condition)?;
        if let Some(f) = &mut filter {
            found = f.tx_visible(tx, found)?;
        }
        let body_id = resource
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let id = match (found.as_slice(), body_id) {
            ([], Some(id)) => {
                if !valid_id(&id) {
                    return Ok(Err(ApiError::bad_request(format!(
                        "'{id}' is not a valid FHIR id"
                    ))
                    .at(format!("{rtype}.id"))));
                }
                id
            }
            ([], None) => uuid::Uuid::now_v7().to_string(),
            ([one], Some(id)) if one.id != id => {
                return Ok(Err(ApiError::bad_request(format!(
                    "resource id '{id}' differs from the matching resource {}/{}",
                    one.rtype, one.id
                ))
                .at(format!("{rtype}.id"))));
            }
            ([one], _) => one.id.clone(),
            _ => {
                return Ok(Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    IssueType::Duplicate,
                    "the conditional update's search matched more than one resource",
                )));
            }
        };
        let mut resource = resource;
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        put_resource(
            tx,
            &base,
            rtype,
            id,
            resource,
            expected,
            ret,
            filter.as_mut(),
        )
    })
    .await
}

/// DELETE /fhir/{type}/{id}
pub async fn delete<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    check_id(&id)?;
    let expected = if_match(&headers)?;
    let mut filter = org::filter_of(&caller);
    if let Some(f) = &mut filter {
        f.check_instance(app.store.as_ref(), rtype, &id).await?;
        // A confined client cannot tell another organisation's resource from a missing one: both are 404.
        if ::auth::org::kind(rtype.as_str()) != ::auth::org::Kind::Shared
            && app.store.read(rtype, &id).await?.is_none()
        {
            return Err(org::not_known(rtype, &id));
        }
    }
    let deleted = app
        .store
        .write(move |tx| {
            if let Some(f) = &mut filter
                && let Err(e) = f.tx_check_current(tx, rtype, &id)?
            {
                tracing::debug!(reason = ?e.issues, "delete refused: another organisation's");
                return Ok(Err(booking::BookingError::NotFound {
                    rtype,
                    id: id.clone(),
                }));
            }
            booking::delete_resource(tx, rtype, &id, expected)
        })
        .await
        .map_err(write_error)?
        .map_err(refused)?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    if let Some(s) = deleted
        && let Ok(v) = HeaderValue::from_str(&etag(s.version))
    {
        res.headers_mut().insert(header::ETAG, v);
    }
    Ok(res)
}

fn read_response(base: &str, s: &Stored, headers: &HeaderMap) -> Response {
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && inm.trim() == etag(s.version)
    {
        let mut res = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&etag(s.version)) {
            res.headers_mut().insert(header::ETAG, v);
        }
        return res;
    }
    stored_reply(base, s, 200, Return::Representation, false).into_response()
}

/// GET /fhir/{type}/{id}
pub async fn read<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    check_id(&id)?;
    let current = app.store.read(rtype, &id).await?;
    if let (Some(f), Some(s)) = (&mut org::filter_of(&caller), &current)
        && !f.visible(app.store.as_ref(), s).await?
    {
        return Err(org::not_known(rtype, &id));
    }
    match current {
        None => Err(ApiError::not_found(format!("{rtype}/{id} is not known"))),
        Some(s) if s.deleted => Err(ApiError::new(
            StatusCode::GONE,
            IssueType::Deleted,
            format!("{rtype}/{id} was deleted (version {})", s.version),
        )),
        Some(s) => Ok(read_response(&app.fhir_base(), &s, &headers)),
    }
}

/// GET /fhir/{type}/{id}/_history/{vid}
pub async fn vread<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    check_id(&id)?;
    if let Some(f) = &mut org::filter_of(&caller) {
        f.check_instance(app.store.as_ref(), rtype, &id).await?;
    }
    let version: u64 = vid
        .parse()
        .map_err(|_| ApiError::bad_request(format!("version '{vid}' is not a number")))?;
    match app.store.vread(rtype, &id, version).await? {
        None => Err(ApiError::not_found(format!(
            "{rtype}/{id} has no version {version}"
        ))),
        Some(s) if s.deleted => Err(ApiError::new(
            StatusCode::GONE,
            IssueType::Deleted,
            format!("version {version} of {rtype}/{id} is a deletion"),
        )),
        Some(s) => Ok(read_response(&app.fhir_base(), &s, &headers)),
    }
}

fn history_bundle(
    base: &str,
    result: &store::SearchResult,
    self_url: &str,
    next: Option<String>,
) -> String {
    let mut out = String::with_capacity(
        256 + result
            .resources
            .iter()
            .map(|s| s.json.len() + 200)
            .sum::<usize>(),
    );
    out.push_str("{\"resourceType\":\"Bundle\",\"type\":\"history\"");
    if let Some(total) = result.total {
        out.push_str(&format!(",\"total\":{total}"));
    }
    out.push_str(",\"link\":[{\"relation\":\"self\",\"url\":");
    push_json_str(&mut out, self_url);
    out.push('}');
    if let Some(n) = next {
        out.push_str(",{\"relation\":\"next\",\"url\":");
        push_json_str(&mut out, &n);
        out.push('}');
    }
    out.push_str("],\"entry\":[");
    for (i, s) in result.resources.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"fullUrl\":");
        push_json_str(&mut out, &format!("{base}/{}/{}", s.rtype, s.id));
        if !s.deleted {
            out.push_str(",\"resource\":");
            out.push_str(&s.json);
        }
        let (method, url, status) = if s.deleted {
            ("DELETE", format!("{}/{}", s.rtype, s.id), "204")
        } else if s.version == 1 {
            ("POST", s.rtype.to_string(), "201")
        } else {
            ("PUT", format!("{}/{}", s.rtype, s.id), "200")
        };
        out.push_str(&format!(
            ",\"request\":{{\"method\":\"{method}\",\"url\":\"{url}\"}},\"response\":{{\"status\":\"{status}\",\"etag\":\"W/\\\"{}\\\"\",\"lastModified\":\"{}\"}}}}",
            s.version,
            s.last_updated()
        ));
    }
    out.push_str("]}");
    out
}

fn history_params(raw: Option<&str>) -> Result<(usize, usize, Option<i64>), ApiError> {
    let mut count = search::DEFAULT_COUNT;
    let mut offset = 0;
    let mut since = None;
    for (k, v) in parse_pairs(raw) {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request("_count must be a number"))?
                    .min(search::MAX_COUNT)
            }
            "_offset" => {
                offset = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("_offset must be a number"))?
            }
            "_since" => {
                since = Some(fhir::parse_instant_ms(&v).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "_since must be a FHIR instant with a time zone, got '{v}'"
                    ))
                })?)
            }
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "_history does not support parameter '{other}'"
                )));
            }
        }
    }
    Ok((count, offset, since))
}

async fn history<S: Store>(
    app: &App<S>,
    rtype: ResourceType,
    id: Option<String>,
    raw: Option<&str>,
    mut filter: Option<OrgFilter>,
) -> Result<Response, ApiError> {
    let (count, offset, since_ms) = history_params(raw)?;
    if let (Some(f), Some(id)) = (&mut filter, &id) {
        f.check_instance(app.store.as_ref(), rtype, id).await?;
    }
    // A confined client's type history: every version of the resources it may see, filtered before paging.
    let filter = filter
        .filter(|_| id.is_none() && ::auth::org::kind(rtype.as_str()) != ::auth::org::Kind::Shared);
    let base = app.fhir_base();
    let path = match &id {
        Some(id) => format!("{base}/{rtype}/{id}/_history"),
        None => format!("{base}/{rtype}/_history"),
    };
    let q = HistoryQuery {
        rtype,
        id: id.clone(),
        since_ms,
        count: if filter.is_some() {
            MAX_SCAN + 1
        } else {
            count + 1
        },
        offset: if filter.is_some() { 0 } else { offset },
    };
    let mut result = app.store.history(&q).await?;
    if let Some(mut f) = filter {
        if result.resources.len() > MAX_SCAN {
            return Err(org::too_costly(rtype));
        }
        let mut seen: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
        let mut kept = Vec::with_capacity(result.resources.len());
        for s in std::mem::take(&mut result.resources) {
            let ok = match seen.get(&s.id) {
                Some(ok) => *ok,
                None => {
                    let ok = match app.store.read(rtype, &s.id).await? {
                        Some(current) => f.visible(app.store.as_ref(), &current).await?,
                        None => false,
                    };
                    seen.insert(s.id.clone(), ok);
                    ok
                }
            };
            if ok {
                kept.push(s);
            }
        }
        result.total = Some(kept.len() as u64);
        result.resources = kept.into_iter().skip(offset).take(count + 1).collect();
    }
    if let Some(id) = &id
        && result.resources.is_empty()
        && offset == 0
        && app.store.read(rtype, id).await?.is_none()
    {
        return Err(ApiError::not_found(format!("{rtype}/{id} is not known")));
    }
    let more = result.resources.len() > count;
    result.resources.truncate(count);
    let since_q = since_ms
        .map(|s| format!("&_since={}", search::encode(&fhir::format_instant_ms(s))))
        .unwrap_or_default();
    let self_url = format!(
        "{path}?_count={count}{since_q}{}",
        if offset > 0 {
            format!("&_offset={offset}")
        } else {
            String::new()
        }
    );
    let next = more.then(|| format!("{path}?_count={count}{since_q}&_offset={}", offset + count));
    let body = history_bundle(&base, &result, &self_url, next);
    Ok(([(header::CONTENT_TYPE, FHIR_JSON)], body).into_response())
}

/// GET /fhir/{type}/{id}/_history
pub async fn instance_history<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    caller: MaybeCaller,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    check_id(&id)?;
    history(
        &app,
        rtype,
        Some(id),
        raw.as_deref(),
        org::filter_of(&caller),
    )
    .await
}

/// GET /fhir/{type}/_history
pub async fn type_history<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    caller: MaybeCaller,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    history(&app, rtype, None, raw.as_deref(), org::filter_of(&caller)).await
}

async fn run_search<S: Store>(
    app: &App<S>,
    rtype: ResourceType,
    pairs: Vec<(String, String)>,
    mut filter: Option<OrgFilter>,
) -> Result<Response, ApiError> {
    let parsed = parse_search(rtype, &pairs)?;
    let base = app.fhir_base();
    let count = parsed.query.count;
    let offset = parsed.query.offset;
    let mut q = parsed.query.clone();
    for chain in &parsed.chains {
        q.clauses.push(resolve_chain(app, chain, 0).await?);
    }
    if parsed.summary_count {
        q.count = 0;
    } else {
        q.count = count + 1;
    }
    // A confined client's search is filtered before paging and counting, so pages and totals hold only what
    // it may see (shared types need no filter).
    let filtered =
        filter.is_some() && ::auth::org::kind(rtype.as_str()) != ::auth::org::Kind::Shared;
    let (result, more) = if let (true, Some(f)) = (filtered, &mut filter) {
        q.count = MAX_SCAN + 1;
        q.offset = 0;
        q.want_total = false;
        let scanned = app.store.search(&q).await?.resources;
        if scanned.len() > MAX_SCAN {
            return Err(org::too_costly(rtype));
        }
        let mut visible = Vec::new();
        let mut lookup = StoreLookup(app.store.as_ref());
        for s in scanned {
            if f.owns_stored(&mut lookup, &s).await? {
                visible.push(s);
            }
        }
        let total = visible.len();
        let resources: Vec<Stored> = if parsed.summary_count {
            Vec::new()
        } else {
            visible.into_iter().skip(offset).take(count).collect()
        };
        (
            store::SearchResult {
                resources,
                total: Some(total as u64),
            },
            total > offset + count,
        )
    } else {
        let mut result = app.store.search(&q).await?;
        let more = result.resources.len() > count;
        result.resources.truncate(count);
        (result, more)
    };
    let total = result.total.or_else(|| {
        (!more && !parsed.summary_count).then(|| (offset + result.resources.len()) as u64)
    });

    // _include: resolve the references of the matches.
    let mut included: Vec<Stored> = Vec::new();
    if !parsed.includes.is_empty() {
        let mut seen = std::collections::HashSet::new();
        for s in &result.resources {
            seen.insert(format!("{}/{}", s.rtype, s.id));
        }
        for s in &result.resources {
            let Ok(v) = serde_json::from_str::<Value>(&s.json) else {
                continue;
            };
            for e in fhir::index_entries(rtype, &v) {
                if !parsed.includes.iter().any(|d| d.name == e.param) {
                    continue;
                }
                let fhir::IndexValue::Reference(r) = e.value else {
                    continue;
                };
                if !seen.insert(r.clone()) {
                    continue;
                }
                let Some((t, id)) = r.split_once('/') else {
                    continue;
                };
                let Some(t) = ResourceType::parse(t) else {
                    continue;
                };
                if let Some(found) = app.store.read(t, id).await?
                    && !found.deleted
                {
                    if let Some(f) = &mut filter
                        && !f
                            .owns_stored(&mut StoreLookup(app.store.as_ref()), &found)
                            .await?
                    {
                        continue;
                    }
                    included.push(found);
                }
            }
        }
    }

    let mut out = String::with_capacity(
        512 + result
            .resources
            .iter()
            .chain(included.iter())
            .map(|s| s.json.len() + 120)
            .sum::<usize>(),
    );
    out.push_str("{\"resourceType\":\"Bundle\",\"type\":\"searchset\"");
    if let Some(t) = total {
        out.push_str(&format!(",\"total\":{t}"));
    }
    out.push_str(",\"link\":[{\"relation\":\"self\",\"url\":");
    push_json_str(
        &mut out,
        &link_url(&base, rtype, &parsed.link_params, count, offset),
    );
    out.push('}');
    if more && !parsed.summary_count {
        out.push_str(",{\"relation\":\"next\",\"url\":");
        push_json_str(
            &mut out,
            &link_url(&base, rtype, &parsed.link_params, count, offset + count),
        );
        out.push('}');
    }
    if offset > 0 && !parsed.summary_count {
        out.push_str(",{\"relation\":\"previous\",\"url\":");
        push_json_str(
            &mut out,
            &link_url(
                &base,
                rtype,
                &parsed.link_params,
                count,
                offset.saturating_sub(count),
            ),
        );
        out.push('}');
    }
    out.push(']');
    let any_entry = !(result.resources.is_empty() && included.is_empty());
    if !parsed.summary_count && any_entry {
        out.push_str(",\"entry\":[");
        for s in &result.resources {
            push_entry(&mut out, &base, s, "match");
        }
        for s in &included {
            push_entry(&mut out, &base, s, "include");
        }
        out.push(']');
    }
    out.push('}');
    Ok(([(header::CONTENT_TYPE, FHIR_JSON)], out).into_response())
}

/// Most target resources a chained parameter may match before the search is refused as too costly.
const MAX_CHAIN_MATCHES: usize = 10_000;

/// Resolve a chained parameter into a reference clause: the ids of the target resources matching the inner
/// search (which may be chained again, up to a small depth).
fn resolve_chain<'a, S: Store>(
    app: &'a App<S>,
    chain: &'a search::Chain,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<store::Clause, ApiError>> + Send + 'a>>
{
    Box::pin(async move {
        if depth >= 3 {
            return Err(ApiError::bad_request(
                "chained searches may be at most three levels deep",
            ));
        }
        let inner = parse_search(chain.target, &chain.inner)?;
        let mut q = inner.query;
        for c in &inner.chains {
            q.clauses.push(resolve_chain(app, c, depth + 1).await?);
        }
        q.count = MAX_CHAIN_MATCHES + 1;
        q.offset = 0;
        q.sort.clear();
        let found = app.store.search(&q).await?;
        if found.resources.len() > MAX_CHAIN_MATCHES {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::TooCostly,
                format!(
                    "the chained search on {} matches more than {MAX_CHAIN_MATCHES} resources; narrow it",
                    chain.target
                ),
            ));
        }
        let mut any_of: Vec<store::Predicate> = found
            .resources
            .iter()
            .map(|s| store::Predicate::Reference(format!("{}/{}", s.rtype, s.id)))
            .collect();
        if any_of.is_empty() {
            // Nothing can match: a reference no resource holds.
            any_of.push(store::Predicate::Reference(format!("{}/", chain.target)));
        }
        Ok(store::Clause {
            param: chain.param.name.to_string(),
            any_of,
        })
    })
}

/// GET /fhir/{type}?...
pub async fn search<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    caller: MaybeCaller,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    run_search(
        &app,
        rtype,
        parse_pairs(raw.as_deref()),
        org::filter_of(&caller),
    )
    .await
}

/// POST /fhir/{type}/_search with form parameters (and/or URL parameters).
pub async fn search_post<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    caller: MaybeCaller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    let mut pairs = parse_pairs(raw.as_deref());
    let form = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("_search body must be UTF-8 form data"))?;
    pairs.extend(parse_pairs(Some(form)));
    run_search(&app, rtype, pairs, org::filter_of(&caller)).await
}

/// POST /fhir/{type}/$validate: the body is the resource, or a Parameters with a `resource` parameter.
pub async fn validate<S: Store>(
    State(_app): AppState<S>,
    Path(rtype): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rtype = parse_type(&rtype)?;
    // A body that cannot be a Parameters (it never names one) is checked as it is, without a parse here.
    let maybe_parameters = body.windows(12).any(|w| w == b"\"Parameters\"");
    let parsed = if maybe_parameters {
        serde_json::from_slice::<Value>(&body).ok()
    } else {
        None
    };
    let bytes: std::borrow::Cow<'_, [u8]> = match parsed {
        Some(v) if v.get("resourceType").and_then(Value::as_str) == Some("Parameters") => {
            let resource = v
                .get("parameter")
                .and_then(Value::as_array)
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p.get("name").and_then(Value::as_str) == Some("resource"))
                })
                .and_then(|p| p.get("resource"))
                .ok_or_else(|| {
                    ApiError::bad_request("Parameters must carry a 'resource' parameter")
                        .at("Parameters.parameter")
                })?;
            serde_json::to_vec(resource)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
                .into()
        }
        _ => body.as_ref().into(),
    };
    // Only the verdict is needed: check the bytes without building the resource.
    let issues = match fhir::check_json(&bytes, Some(rtype)) {
        Ok(warnings) => warnings,
        Err(issues) => issues,
    };
    Ok((
        [(header::CONTENT_TYPE, FHIR_JSON)],
        operation_outcome(&issues).to_string(),
    )
        .into_response())
}
