//! The FHIR R4 REST API of Carebridge (axum), transport-neutral over any `store::Store`.
//!
//! Why it exists: it turns HTTP requests into validated, versioned writes (with their outbox events in the same
//! transaction) and reads, and every failure into an OperationOutcome with a precise location.
//!
//! Invariants: never names a concrete storage backend; never reads configuration or spawns tasks (the binary
//! does); nothing invalid reaches the store (every write is validated first); a write's response is sent only
//! after the store has made it durable.

pub mod auth;
pub mod bundle;
mod capability;
mod error;
mod feed;
mod handlers;
mod http_date;
pub mod metrics;
mod ops;
mod org;
mod search;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fhir::IssueType;
use std::sync::Arc;
use store::Store;

pub use error::{ApiError, FHIR_JSON};
pub use feed::{criteria_of, replay_from};

/// Configuration of the API layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Public base URL of the hub, without trailing slash, e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Delivery counters, shared with the delivery runner.
    pub metrics: Arc<metrics::Metrics>,
    /// Turns true when the hub starts shutting down: long polls answer at once so draining is quick.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Bearer-token authentication, scopes, rate limits and audit; `None` = open (tests, `--auth none`).
    pub auth: Option<Arc<auth::Guard>>,
}

impl ApiConfig {
    pub fn new(public_url: impl Into<String>) -> ApiConfig {
        ApiConfig {
            public_url: public_url.into(),
            metrics: Arc::default(),
            stopping: tokio::sync::watch::channel(false).1,
            auth: None,
        }
    }
}

/// Resolves when `stopping` turns true (never, if its sender is gone without having said so).
pub(crate) async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        if stopping.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Shared state of the handlers.
pub struct App<S: Store> {
    pub store: Arc<S>,
    pub config: ApiConfig,
}

impl<S: Store> App<S> {
    /// Base of the FHIR endpoint, e.g. `http://127.0.0.1:8080/fhir`.
    pub fn fhir_base(&self) -> String {
        format!("{}/fhir", self.config.public_url)
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// Build the HTTP router: `/health` and the FHIR API under `/fhir`.
pub fn router<S: Store>(store: Arc<S>, config: ApiConfig) -> Router {
    let app = Arc::new(App { store, config });
    let fhir = Router::new()
        .route(
            "/",
            post(bundle::post::<S>)
                .layer(axum::extract::DefaultBodyLimit::max(bundle::MAX_BODY_BYTES)),
        )
        .route("/metadata", get(capability::metadata::<S>))
        // Audit records: read-only (append-only trail), admins only.
        .route("/AuditEvent", get(auth::audit_search::<S>))
        .route("/AuditEvent/{id}", get(auth::audit_read::<S>))
        .route(
            "/{rtype}",
            get(handlers::search::<S>)
                .post(handlers::create::<S>)
                .put(handlers::conditional_update::<S>),
        )
        .route("/{rtype}/_search", post(handlers::search_post::<S>))
        .route("/{rtype}/_history", get(handlers::type_history::<S>))
        .route("/{rtype}/$validate", post(handlers::validate::<S>))
        .route("/{rtype}/$merge", post(ops::merge::<S>))
        .route("/{rtype}/{id}/$transition", post(ops::transition::<S>))
        .route("/{rtype}/{id}/$replay", post(feed::replay::<S>))
        .route(
            "/{rtype}/{id}/$generate-slots",
            post(ops::generate_slots::<S>),
        )
        .route(
            "/{rtype}/{id}",
            get(handlers::read::<S>)
                .put(handlers::update::<S>)
                .delete(handlers::delete::<S>)
                .patch(ops::patch::<S>),
        )
        .route(
            "/{rtype}/{id}/_history",
            get(handlers::instance_history::<S>),
        )
        .route("/{rtype}/{id}/_history/{vid}", get(handlers::vread::<S>))
        .fallback(fhir_fallback)
        .layer(middleware::from_fn(negotiate));
    Router::new()
        .route("/health", get(health))
        .route("/oauth2/token", post(auth::token::<S>))
        .route("/events", get(feed::events::<S>))
        .route("/metrics", get(feed::metrics::<S>))
        .route("/admin/deliveries", get(feed::deliveries::<S>))
        // `POST /fhir/` (trailing slash, as some clients send it) is the Bundle endpoint too.
        .route(
            "/fhir/",
            post(bundle::post::<S>)
                .layer(axum::extract::DefaultBodyLimit::max(bundle::MAX_BODY_BYTES))
                .layer(middleware::from_fn(negotiate)),
        )
        .nest("/fhir", fhir)
        .with_state(app.clone())
        .layer(middleware::from_fn_with_state(app, auth::layer::<S>))
        .layer(middleware::from_fn(request_ids))
}

async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}",
    )
}

async fn fhir_fallback(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        IssueType::NotSupported,
        format!(
            "{method} {} is not an interaction this server supports",
            uri.path()
        ),
    )
}

/// Echo `X-Request-ID` (generating one when absent) and `X-Correlation-ID` on every response, and carry both in
/// the request's log span.
async fn request_ids(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("-"))
        });
    let correlation_id = req.headers().get(&X_CORRELATION_ID).cloned();
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = request_id.to_str().unwrap_or("-"),
        correlation_id = correlation_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
    );
    let mut res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.in_scope(|| tracing::debug!(status = res.status().as_u16(), "response"));
    res.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    if let Some(c) = correlation_id {
        res.headers_mut().insert(X_CORRELATION_ID.clone(), c);
    }
    res
}

/// JSON only: an XML `Accept` or `_format` gets 406, an XML (or other non-JSON) body gets 415.
async fn negotiate(req: Request, next: Next) -> Response {
    let query = req.uri().query().unwrap_or("");
    let wants_xml_format = search::parse_pairs(Some(query))
        .iter()
        .any(|(k, v)| k == "_format" && v.contains("xml"));
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if wants_xml_format || (!accept.is_empty() && !accepts_json(accept)) {
        return ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            IssueType::NotSupported,
            format!(
                "this server produces application/fhir+json only (requested: {})",
                if wants_xml_format {
                    "_format=xml"
                } else {
                    accept
                }
            ),
        )
        .into_response();
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && let Some(ct) = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let ok = matches!(
            mime.as_str(),
            "application/fhir+json"
                | "application/json"
                | "application/json-patch+json"
                | "application/x-www-form-urlencoded"
        );
        if !ok {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueType::NotSupported,
                format!("request body must be application/fhir+json (got {ct})"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mime = part
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "*/*" || mime == "application/*" || mime.contains("json") || mime == "text/html" // browsers; answered with JSON
    })
}
