//! `carebridge validate FILE...`: offline validation with the same rules as the server.

use fhir::{Severity, operation_outcome};
use std::path::PathBuf;

/// Validate each file; print a report per file. Returns the process exit code (0 all valid, 1 otherwise).
pub fn run(files: &[PathBuf], json: bool) -> i32 {
    let mut all_valid = true;
    for path in files {
        let issues = match std::fs::read(path) {
            Ok(bytes) => match fhir::check_json(&bytes, None) {
                Ok(warnings) => warnings,
                Err(issues) => issues,
            },
            Err(e) => vec![fhir::Issue::error(
                fhir::IssueType::NotFound,
                format!("cannot read file: {e}"),
            )],
        };
        let valid = !issues.iter().any(|i| i.is_error());
        all_valid &= valid;
        if json {
            let oo = operation_outcome(&issues);
            println!(
                "{}",
                serde_json::to_string_pretty(&oo).unwrap_or_else(|_| oo.to_string())
            );
        } else {
            println!(
                "{}: {}",
                path.display(),
                if valid { "valid" } else { "INVALID" }
            );
            for i in &issues {
                let sev = match i.severity {
                    Severity::Fatal | Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Information => "info",
                };
                let loc = if i.expression.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", i.expression.join(", "))
                };
                println!("  {sev} [{}]{loc}: {}", i.code.as_str(), i.diagnostics);
            }
        }
    }
    if all_valid { 0 } else { 1 }
}
