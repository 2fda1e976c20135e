//! [`BookingError`]: why the booking engine refused a change, with the HTTP status and FHIRPath location the
//! API should report.

use std::fmt;

use fhir::{Issue, IssueType, ResourceType};
use scheduling::{DecisionError, DecisionErrorKind};

/// A refusal decided by domain rules. Returned as `Ok(Err(..))` from the service functions, always before
/// anything was written, so the caller's transaction holds no partial change.
#[derive(Debug, Clone, PartialEq)]
pub enum BookingError {
    /// A resource named by the request (the appointment to transition, a patient to merge...) does not exist
    /// or was deleted. HTTP 404.
    NotFound { rtype: ResourceType, id: String },
    /// The change conflicts with the current state (slot taken, slot held by an appointment, inactive
    /// schedule...). HTTP 409.
    Conflict {
        message: String,
        expression: Option<String>,
    },
    /// The content is unacceptable (unknown slot, times that do not match the slots...). HTTP 422.
    Invalid {
        message: String,
        expression: Option<String>,
    },
    /// Refused by the appointment state machine (`scheduling::decide`): 409 or 422, see
    /// [`DecisionError::http_status`]. Its Display names the from and to states.
    Decision(DecisionError),
    /// A uniqueness rule (one active Patient per NHS number). HTTP 409; `existing` is e.g. `Patient/12`.
    Duplicate {
        message: String,
        existing: Option<String>,
        expression: Option<String>,
    },
}

impl BookingError {
    pub(crate) fn conflict(message: impl Into<String>, expression: Option<String>) -> Self {
        BookingError::Conflict {
            message: message.into(),
            expression,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>, expression: Option<String>) -> Self {
        BookingError::Invalid {
            message: message.into(),
            expression,
        }
    }

    pub(crate) fn not_found(rtype: ResourceType, id: &str) -> Self {
        BookingError::NotFound {
            rtype,
            id: id.to_owned(),
        }
    }

    /// The HTTP status to answer with: 404, 409 or 422.
    pub fn http_status(&self) -> u16 {
        match self {
            BookingError::NotFound { .. } => 404,
            BookingError::Conflict { .. } | BookingError::Duplicate { .. } => 409,
            BookingError::Invalid { .. } => 422,
            BookingError::Decision(e) => e.http_status(),
        }
    }

    /// The FHIRPath location of the problem, for `OperationOutcome.issue.expression`.
    pub fn expression(&self) -> Option<String> {
        match self {
            BookingError::NotFound { .. } => None,
            BookingError::Conflict { expression, .. }
            | BookingError::Invalid { expression, .. }
            | BookingError::Duplicate { expression, .. } => expression.clone(),
            BookingError::Decision(e) => Some(decision_expression(&e.kind).to_owned()),
        }
    }

    /// The OperationOutcome issue type that fits.
    pub fn issue_type(&self) -> IssueType {
        match self {
            BookingError::NotFound { .. } => IssueType::NotFound,
            BookingError::Conflict { .. } => IssueType::Conflict,
            BookingError::Invalid { .. } => IssueType::BusinessRule,
            BookingError::Duplicate { .. } => IssueType::Duplicate,
            BookingError::Decision(e) if e.http_status() == 409 => IssueType::Conflict,
            BookingError::Decision(_) => IssueType::BusinessRule,
        }
    }

    /// The issues of the OperationOutcome to answer with: one error (with its expression), plus an
    /// information issue naming the existing resource of a duplicate.
    pub fn issues(&self) -> Vec<Issue> {
        let mut first = Issue::error(self.issue_type(), self.to_string());
        if let Some(e) = self.expression() {
            first = first.at(e);
        }
        let mut out = vec![first];
        if let BookingError::Duplicate {
            existing: Some(existing),
            ..
        } = self
        {
            out.push(Issue::information(format!("existing resource: {existing}")));
        }
        out
    }

    /// The same refusal as a [`store::StoreError`], for a closure that must abort (and roll back) after it
    /// already wrote something. `Duplicate` keeps its meaning; the others become `Conflict`/`Invalid`/
    /// `NotFound`.
    pub fn into_store_error(self) -> store::StoreError {
        match self {
            BookingError::NotFound { rtype, id } => store::StoreError::NotFound { rtype, id },
            BookingError::Duplicate {
                message, existing, ..
            } => store::StoreError::Duplicate { message, existing },
            BookingError::Invalid { message, .. } => store::StoreError::Invalid(message),
            other => store::StoreError::Conflict(other.to_string()),
        }
    }
}

fn decision_expression(kind: &DecisionErrorKind) -> &'static str {
    use DecisionErrorKind as K;
    match kind {
        K::IllegalTransition
        | K::ChangeToTerminal
        | K::InvalidInitialStatus
        | K::NoShowBeforeStart { .. } => "Appointment.status",
        K::RescheduleNotAllowed => "Appointment.slot",
        K::CancelReasonInvalid { .. } => "Appointment.cancelationReason",
        K::StartEndMismatch | K::TimesRequired => "Appointment.start",
        K::EndBeforeStart { .. } | K::EndsInPast { .. } => "Appointment.end",
    }
}

impl fmt::Display for BookingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BookingError::NotFound { rtype, id } => write!(f, "{rtype}/{id} is not known"),
            BookingError::Conflict { message, .. }
            | BookingError::Invalid { message, .. }
            | BookingError::Duplicate { message, .. } => f.write_str(message),
            BookingError::Decision(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BookingError {}

impl From<DecisionError> for BookingError {
    fn from(e: DecisionError) -> Self {
        BookingError::Decision(e)
    }
}
