//! `GET /fhir/metadata`: a CapabilityStatement listing exactly what this server implements.

use crate::App;
use crate::error::FHIR_JSON;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use fhir::{ParamKind, ResourceType};
use serde_json::{Value, json};
use std::sync::Arc;
use store::Store;

fn kind(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Token => "token",
        ParamKind::String => "string",
        ParamKind::Date => "date",
        ParamKind::Reference => "reference",
    }
}

/// The operations a type supports (`$validate` everywhere, plus the booking operations).
fn operations(t: ResourceType, fhir_base: &str) -> Vec<Value> {
    let mut ops = vec![
        json!({"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}),
    ];
    match t {
        ResourceType::Patient => ops.push(json!({
            "name": "merge",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-merge",
            "documentation": "Parameters source-patient, target-patient (References): deactivates the source with a replaced-by link and moves its future appointments to the target"
        })),
        ResourceType::Appointment => ops.push(json!({
            "name": "transition",
            "definition": format!("{fhir_base}/OperationDefinition/Appointment-transition"),
            "documentation": "Parameters status (code) and optional reason (Coding, R4 appointment-cancellation-reason)"
        })),
        ResourceType::Schedule => ops.push(json!({
            "name": "generate-slots",
            "definition": format!("{fhir_base}/OperationDefinition/Schedule-generate-slots"),
            "documentation": "Parameters daysOfWeek, openingTime (09:00-12:30), slotMinutes, start, end (Europe/London dates, inclusive); idempotent"
        })),
        _ => {}
    }
    ops
}

/// The CapabilityStatement for a server at `fhir_base`.
pub fn capability_statement(fhir_base: &str) -> Value {
    let resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|&t| {
            let mut params = vec![
                json!({"name": "_id", "type": "token"}),
                json!({"name": "_lastUpdated", "type": "date"}),
            ];
            params.extend(fhir::search_params(t).iter().map(
                |p| json!({"name": p.name, "type": kind(p.kind), "documentation": p.expression}),
            ));
            let includes: Vec<String> = fhir::search_params(t)
                .iter()
                .filter(|p| p.kind == ParamKind::Reference)
                .map(|p| format!("{t}:{}", p.name))
                .collect();
            let interactions: Vec<Value> = [
                "read",
                "vread",
                "update",
                "patch",
                "delete",
                "history-instance",
                "history-type",
                "create",
                "search-type",
            ]
            .iter()
            .map(|c| json!({"code": c}))
            .collect();
            json!({
                "type": t.as_str(),
                "profile": t.uk_core_profile(),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "not-supported",
                "searchInclude": includes,
                "searchParam": params,
                "operation": operations(t, fhir_base),
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "publisher": "Carebridge",
        "kind": "instance",
        "software": {"name": "Carebridge", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Carebridge integration hub", "url": fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [
                {"code": "transaction", "documentation": "POST /fhir with a transaction Bundle: all entries in one store transaction, all or nothing; urn:uuid references are resolved"},
                {"code": "batch", "documentation": "POST /fhir with a batch Bundle: each entry on its own"},
            ],
        }],
    })
}

pub async fn metadata<S: Store>(State(app): State<Arc<App<S>>>) -> impl IntoResponse {
    let mut cs = capability_statement(&app.fhir_base());
    // An empty system-level interaction list is not valid FHIR: drop it.
    if let Some(rest) = cs.pointer_mut("/rest/0").and_then(Value::as_object_mut)
        && rest
            .get("interaction")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    {
        rest.remove("interaction");
    }
    ([(header::CONTENT_TYPE, FHIR_JSON)], cs.to_string())
}
