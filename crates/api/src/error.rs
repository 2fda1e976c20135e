//! Every failure the API reports becomes an OperationOutcome with a fitting HTTP status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir::{Issue, IssueType, operation_outcome};
use store::StoreError;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// An error response: a status and the issues to put in its OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueType, diagnostics: impl Into<String>) -> ApiError {
        ApiError {
            status,
            issues: vec![Issue::error(code, diagnostics)],
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> ApiError {
        if let Some(first) = self.issues.first_mut() {
            first.expression.push(expression.into());
        }
        self
    }

    pub fn bad_request(diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, IssueType::Invalid, diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, IssueType::NotFound, diagnostics)
    }

    pub fn invalid_resource(issues: Vec<Issue>) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            issues,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match &e {
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            StoreError::Gone { .. } => {
                ApiError::new(StatusCode::GONE, IssueType::Deleted, e.to_string())
            }
            StoreError::VersionConflict { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                IssueType::Conflict,
                e.to_string(),
            ),
            StoreError::Duplicate { message, existing } => {
                let mut err =
                    ApiError::new(StatusCode::CONFLICT, IssueType::Duplicate, message.clone());
                if let Some(existing) = existing {
                    err.issues
                        .push(Issue::information(format!("existing resource: {existing}")));
                }
                err
            }
            StoreError::Conflict(m) => {
                ApiError::new(StatusCode::CONFLICT, IssueType::Conflict, m.clone())
            }
            StoreError::Invalid(m) => ApiError::bad_request(m.clone()),
            StoreError::Unavailable(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Exception,
                m.clone(),
            ),
            StoreError::Backend(m) => {
                tracing::error!(error = %m, "storage failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    IssueType::Exception,
                    "internal storage failure; the change was not applied",
                )
            }
        }
    }
}

impl From<store::url::QueryError> for ApiError {
    fn from(e: store::url::QueryError) -> ApiError {
        let code = if e.not_supported {
            IssueType::NotSupported
        } else {
            IssueType::Invalid
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = operation_outcome(&self.issues).to_string();
        let mut res = (self.status, body).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        res
    }
}
