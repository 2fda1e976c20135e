use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// `OperationOutcome.issue.code` values used by the hub (<http://hl7.org/fhir/issue-type>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    CodeInvalid,
    BusinessRule,
    Conflict,
    Duplicate,
    NotFound,
    Deleted,
    NotSupported,
    Processing,
    Exception,
    Security,
    Forbidden,
    Login,
    TooCostly,
    Informational,
}

impl IssueType {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueType::Invalid => "invalid",
            IssueType::Structure => "structure",
            IssueType::Required => "required",
            IssueType::Value => "value",
            IssueType::Invariant => "invariant",
            IssueType::CodeInvalid => "code-invalid",
            IssueType::BusinessRule => "business-rule",
            IssueType::Conflict => "conflict",
            IssueType::Duplicate => "duplicate",
            IssueType::NotFound => "not-found",
            IssueType::Deleted => "deleted",
            IssueType::NotSupported => "not-supported",
            IssueType::Processing => "processing",
            IssueType::Exception => "exception",
            IssueType::Security => "security",
            IssueType::Forbidden => "forbidden",
            IssueType::Login => "login",
            IssueType::TooCostly => "too-costly",
            IssueType::Informational => "informational",
        }
    }
}

/// One problem found in a resource or a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueType,
    /// Human-readable explanation.
    pub diagnostics: String,
    /// FHIRPath locations, e.g. `Patient.identifier[0].value`. Empty when the issue is not about an element.
    pub expression: Vec<String>,
}

impl Issue {
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Issue {
        self.expression.push(expression.into());
        self
    }

    pub fn warning(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Warning,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn information(diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Information,
            code: IssueType::Informational,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self.severity, Severity::Error | Severity::Fatal)
    }
}

/// Build an OperationOutcome resource from issues (an `information` "All OK" issue when there are none).
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let list: Vec<Value> = if issues.is_empty() {
        vec![json!({"severity": "information", "code": "informational", "diagnostics": "All OK"})]
    } else {
        issues
            .iter()
            .map(|i| {
                let mut o = json!({
                    "severity": i.severity.as_str(),
                    "code": i.code.as_str(),
                    "diagnostics": i.diagnostics,
                });
                if !i.expression.is_empty()
                    && let Some(m) = o.as_object_mut()
                {
                    m.insert("expression".into(), json!(i.expression));
                }
                o
            })
            .collect()
    };
    json!({"resourceType": "OperationOutcome", "issue": list})
}
