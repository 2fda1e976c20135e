//! Interactions beyond CRUD: JSON Patch, and the booking operations `$transition`, `$merge` and
//! `$generate-slots`. Each runs as one store transaction and honours `Idempotency-Key` like create/update.

use crate::App;
use crate::error::{ApiError, FHIR_JSON};
use crate::handlers::{
    MaybeCaller, Reply, check_id, idempotency_key, idempotent_write, idempotent_write_reading,
    if_match, parse_type, prefer_return, put_resource, refused, request_hash, stored_reply,
};
use crate::org;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use booking::Coding;
use booking::scheduling::{LocalDate, OpeningPeriod, OpeningRule, SlotTemplate, Weekday};
use fhir::{Issue, IssueType, ResourceType, operation_outcome};
use serde_json::{Value, json};
use std::sync::Arc;
use store::Store;

type AppState<S> = State<Arc<App<S>>>;

// ---------------------------------------------------------------------------------------------------------
// JSON Patch (RFC 6902) over JSON Pointer (RFC 6901)

fn patch_error(index: usize, op: &str, path: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        IssueType::Processing,
        format!("patch operation {index} ({op} {path}): {msg}"),
    )
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("a JSON Pointer must be empty or start with '/'".into());
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    if token.is_empty()
        || (token.len() > 1 && token.starts_with('0'))
        || !token.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("'{token}' is not an array index"));
    }
    let i: usize = token
        .parse()
        .map_err(|_| format!("'{token}' is not an array index"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(format!("index {i} is out of bounds (length {len})"));
    }
    Ok(i)
}

fn get<'a>(doc: &'a Value, tokens: &[String]) -> Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t).ok_or_else(|| format!("no member '{t}'"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get(i)
                    .ok_or_else(|| format!("index {i} is out of bounds"))?
            }
            _ => return Err(format!("cannot descend into a scalar at '{t}'")),
        };
    }
    Ok(cur)
}

fn get_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or_else(|| format!("no member '{t}'"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get_mut(i)
                    .ok_or_else(|| format!("index {i} is out of bounds"))?
            }
            _ => return Err(format!("cannot descend into a scalar at '{t}'")),
        };
    }
    Ok(cur)
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
) -> Result<(&'a mut Value, String), String> {
    let Some((last, init)) = tokens.split_last() else {
        return Err("the operation needs a path below the root".into());
    };
    let cur = get_mut(doc, init)?;
    Ok((cur, last.clone()))
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    if tokens.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent_mut(doc, tokens)?;
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = array_index(&last, a.len(), true)?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err("the parent is not an object or array".into()),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let (parent, last) = parent_mut(doc, tokens)?;
    match parent {
        Value::Object(m) => m
            .shift_remove(&last)
            .ok_or_else(|| format!("no member '{last}'")),
        Value::Array(a) => {
            let i = array_index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err("the parent is not an object or array".into()),
    }
}

/// Apply a JSON Patch document to `doc`. Every operation is applied in order; the first failure stops.
pub fn apply_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Some(ops) = patch.as_array() else {
        return Err(ApiError::bad_request(
            "a JSON Patch body must be an array of operations",
        ));
    };
    for (i, op) in ops.iter().enumerate() {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op.get("path").and_then(Value::as_str);
        let Some(path) = path else {
            return Err(patch_error(i, name, "", "missing 'path'"));
        };
        let tokens = pointer_tokens(path).map_err(|e| patch_error(i, name, path, e))?;
        let from = || -> Result<Vec<String>, ApiError> {
            let f = op
                .get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| patch_error(i, name, path, "missing 'from'"))?;
            pointer_tokens(f).map_err(|e| patch_error(i, name, path, e))
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| patch_error(i, name, path, "missing 'value'"))
        };
        let result = match name {
            "add" => add(doc, &tokens, value()?),
            "remove" => remove(doc, &tokens).map(|_| ()),
            "replace" => {
                let v = value()?;
                get_mut(doc, &tokens).map(|slot| *slot = v)
            }
            "move" => {
                let f = from()?;
                if tokens.len() > f.len() && tokens.starts_with(&f) {
                    Err("cannot move a value into one of its own children".to_string())
                } else {
                    remove(doc, &f).and_then(|v| add(doc, &tokens, v))
                }
            }
            "copy" => {
                let f = from()?;
                get(doc, &f).cloned().and_then(|v| add(doc, &tokens, v))
            }
            "test" => {
                let v = value()?;
                match get(doc, &tokens) {
                    Ok(cur) if *cur == v => Ok(()),
                    Ok(cur) => Err(format!("test failed: found {cur}")),
                    Err(e) => Err(e),
                }
            }
            other => Err(format!(
                "unknown operation '{other}' (add, remove, replace, move, copy, test)"
            )),
        };
        result.map_err(|e| patch_error(i, name, path, e))?;
    }
    Ok(())
}

/// PATCH /fhir/{type}/{id} with `application/json-patch+json`.
pub async fn patch<S: Store>(
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
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json-patch+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueType::NotSupported,
            format!("PATCH takes a JSON Patch document (application/json-patch+json), not '{ct}'"),
        ));
    }
    let ops: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the JSON Patch body is not JSON: {e}")))?;
    let expected = if_match(&headers)?;
    let key = idempotency_key(&headers, &caller)?;
    let hash = request_hash("PATCH", &format!("{rtype}/{id}"), None, &body);
    let ret = prefer_return(&headers);
    let base = app.fhir_base();
    idempotent_write(app.store.as_ref(), key, hash, move |tx| {
        if let Some(f) = &mut filter
            && let Err(e) = f.tx_check_current(tx, rtype, &id)?
        {
            return Ok(Err(e));
        }
        let current = match tx.read(rtype, &id)? {
            None => {
                return Ok(Err(ApiError::not_found(format!(
                    "{rtype}/{id} is not known"
                ))));
            }
            Some(c) if c.deleted => {
                return Ok(Err(ApiError::new(
                    StatusCode::GONE,
                    IssueType::Deleted,
                    format!("{rtype}/{id} was deleted"),
                )));
            }
            Some(c) => c,
        };
        let mut doc: Value = match serde_json::from_str(&current.json) {
            Ok(v) => v,
            Err(e) => {
                return Err(store::StoreError::Backend(format!(
                    "stored {rtype}/{id} is not JSON: {e}"
                )));
            }
        };
        if let Err(e) = apply_patch(&mut doc, &ops) {
            return Ok(Err(e));
        }
        if doc.get("id").and_then(Value::as_str) != Some(id.as_str()) {
            return Ok(Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                IssueType::Processing,
                "a patch may not change or remove the resource id",
            )
            .at(format!("{rtype}.id"))));
        }
        let issues = fhir::validate(rtype, &mut doc);
        if issues.iter().any(Issue::is_error) {
            return Ok(Err(ApiError::invalid_resource(issues)));
        }
        let expected = Some(expected.unwrap_or(current.version));
        put_resource(tx, &base, rtype, id, doc, expected, ret, filter.as_mut())
    })
    .await
}

// ---------------------------------------------------------------------------------------------------------
// Parameters helpers

fn parameters(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(
            ApiError::bad_request("this operation takes a Parameters resource").at("resourceType"),
        );
    }
    Ok(v.get("parameter")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

fn params_named<'a>(
    ps: &'a [Value],
    name: &'a str,
) -> impl Iterator<Item = (usize, &'a Value)> + 'a {
    ps.iter()
        .enumerate()
        .filter(move |(_, p)| p.get("name").and_then(Value::as_str) == Some(name))
}

fn param_str(ps: &[Value], names: &[&str], value_keys: &[&str]) -> Option<(usize, String)> {
    for n in names {
        for (i, p) in params_named(ps, n) {
            for k in value_keys {
                if let Some(s) = p.get(*k).and_then(Value::as_str) {
                    return Some((i, s.to_string()));
                }
            }
        }
    }
    None
}

fn missing(name: &str) -> ApiError {
    ApiError::bad_request(format!("missing parameter '{name}'")).at("Parameters.parameter")
}

fn resource_reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), FHIR_JSON.into())],
        body: body.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// $transition

/// POST /fhir/Appointment/{id}/$transition with Parameters `status` (code) and optional `reason`
/// (Coding or CodeableConcept from the R4 cancellation-reason code system).
pub async fn transition<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    if parse_type(&rtype)? != ResourceType::Appointment {
        return Err(ApiError::not_found(format!(
            "$transition is defined on Appointment, not {rtype}"
        )));
    }
    check_id(&id)?;
    let mut filter = org::filter_of(&caller);
    if let Some(f) = &mut filter {
        f.check_instance(app.store.as_ref(), ResourceType::Appointment, &id)
            .await?;
    }
    let ps = parameters(&body)?;
    let (_, to) = param_str(&ps, &["status"], &["valueCode", "valueString"])
        .ok_or_else(|| missing("status"))?;
    let reason = params_named(&ps, "reason")
        .chain(params_named(&ps, "cancelationReason"))
        .find_map(|(_, p)| {
            p.get("valueCoding").cloned().or_else(|| {
                p.get("valueCodeableConcept")
                    .and_then(|c| c.get("coding"))
                    .and_then(|c| c.get(0))
                    .cloned()
            })
        })
        .map(|c| Coding {
            system: c.get("system").and_then(Value::as_str).map(str::to_string),
            code: c.get("code").and_then(Value::as_str).map(str::to_string),
        });
    let key = idempotency_key(&headers, &caller)?;
    let hash = request_hash(
        "POST",
        &format!("Appointment/{id}/$transition"),
        None,
        &body,
    );
    let ret = prefer_return(&headers);
    let base = app.fhir_base();
    let ahead = booking::ahead::for_transition(&id);
    idempotent_write_reading(app.store.as_ref(), ahead, key, hash, move |tx| {
        if let Some(f) = &mut filter
            && let Err(e) = f.tx_check_current(tx, ResourceType::Appointment, &id)?
        {
            return Ok(Err(e));
        }
        Ok(booking::transition(tx, &id, &to, reason)?
            .map(|s| stored_reply(&base, &s, 200, ret, false))
            .map_err(refused))
    })
    .await
}

// ---------------------------------------------------------------------------------------------------------
// $merge

fn patient_ref(ps: &[Value], names: &[&str]) -> Result<String, ApiError> {
    for n in names {
        for (i, p) in params_named(ps, n) {
            let r = p
                .get("valueReference")
                .and_then(|r| r.get("reference"))
                .and_then(Value::as_str)
                .or_else(|| p.get("valueString").and_then(Value::as_str));
            if let Some(r) = r {
                let id = r.strip_prefix("Patient/").unwrap_or(r);
                if id.contains('/') || id.is_empty() {
                    return Err(
                        ApiError::bad_request(format!("'{r}' is not a Patient reference"))
                            .at(format!("Parameters.parameter[{i}].valueReference")),
                    );
                }
                return Ok(id.to_string());
            }
        }
    }
    Err(missing(names.first().copied().unwrap_or("")))
}

/// POST /fhir/Patient/$merge with Parameters `source-patient` and `target-patient` (References).
pub async fn merge<S: Store>(
    State(app): AppState<S>,
    Path(rtype): Path<String>,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    if parse_type(&rtype)? != ResourceType::Patient {
        return Err(ApiError::not_found(format!(
            "$merge is defined on Patient, not {rtype}"
        )));
    }
    let ps = parameters(&body)?;
    let source = patient_ref(&ps, &["source-patient", "source"])?;
    let target = patient_ref(&ps, &["target-patient", "target"])?;
    let mut filter = org::filter_of(&caller);
    if let Some(f) = &mut filter {
        for p in [&source, &target] {
            f.check_instance(app.store.as_ref(), ResourceType::Patient, p)
                .await?;
        }
    }
    let key = idempotency_key(&headers, &caller)?;
    let hash = request_hash("POST", "Patient/$merge", None, &body);
    idempotent_write(app.store.as_ref(), key, hash, move |tx| {
        if let Some(f) = &mut filter {
            for p in [&source, &target] {
                if let Err(e) = f.tx_check_current(tx, ResourceType::Patient, p)? {
                    return Ok(Err(e));
                }
            }
        }
        Ok(booking::merge_patients(tx, &source, &target)?
            .map(|m| {
                let target_json: Value =
                    serde_json::from_str(&m.target.json).unwrap_or(Value::Null);
                let outcome = operation_outcome(&[Issue::information(format!(
                    "Patient/{source} merged into Patient/{target}; {} future appointment(s) moved",
                    m.appointments.len()
                ))]);
                resource_reply(
                    200,
                    json!({"resourceType": "Parameters", "parameter": [
                        {"name": "outcome", "resource": outcome},
                        {"name": "result", "resource": target_json},
                    ]}),
                )
            })
            .map_err(refused))
    })
    .await
}

// ---------------------------------------------------------------------------------------------------------
// $generate-slots

fn slot_template(schedule_id: &str, ps: &[Value]) -> Result<SlotTemplate, ApiError> {
    let mut days = Vec::new();
    for (i, p) in params_named(ps, "daysOfWeek") {
        let code = p
            .get("valueCode")
            .or_else(|| p.get("valueString"))
            .and_then(Value::as_str)
            .unwrap_or("");
        for c in code.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            days.push(Weekday::parse(c).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "'{c}' is not a day of the week (mon, tue, wed, thu, fri, sat, sun)"
                ))
                .at(format!("Parameters.parameter[{i}]"))
            })?);
        }
    }
    if days.is_empty() {
        return Err(missing("daysOfWeek"));
    }
    let mut periods = Vec::new();
    for (i, p) in params_named(ps, "openingTime") {
        let s = p.get("valueString").and_then(Value::as_str).unwrap_or("");
        periods.push(OpeningPeriod::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!("'{s}' is not an opening time like 09:00-12:30"))
                .at(format!("Parameters.parameter[{i}].valueString"))
        })?);
    }
    if periods.is_empty() {
        return Err(missing("openingTime"));
    }
    let slot_minutes = params_named(ps, "slotMinutes")
        .find_map(|(_, p)| {
            p.get("valuePositiveInt")
                .or_else(|| p.get("valueInteger"))
                .and_then(Value::as_u64)
        })
        .ok_or_else(|| missing("slotMinutes"))?;
    let date = |name: &str| -> Result<LocalDate, ApiError> {
        let (i, s) =
            param_str(ps, &[name], &["valueDate", "valueString"]).ok_or_else(|| missing(name))?;
        LocalDate::parse(&s).ok_or_else(|| {
            ApiError::bad_request(format!("'{s}' is not a date (YYYY-MM-DD)"))
                .at(format!("Parameters.parameter[{i}].valueDate"))
        })
    };
    Ok(SlotTemplate {
        schedule_id: schedule_id.to_string(),
        rules: vec![OpeningRule { days, periods }],
        slot_minutes: u32::try_from(slot_minutes).unwrap_or(u32::MAX),
        start_date: date("start")?,
        end_date: date("end")?,
        max_slots: None,
    })
}

/// POST /fhir/Schedule/{id}/$generate-slots with Parameters `daysOfWeek` (code, repeating or comma
/// separated), `openingTime` (string `09:00-12:30`, repeating), `slotMinutes`, `start` and `end` (dates,
/// inclusive, Europe/London wall-clock). Idempotent: a repeat over the same range creates nothing.
pub async fn generate_slots<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    caller: MaybeCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    if parse_type(&rtype)? != ResourceType::Schedule {
        return Err(ApiError::not_found(format!(
            "$generate-slots is defined on Schedule, not {rtype}"
        )));
    }
    check_id(&id)?;
    let mut filter = org::filter_of(&caller);
    if let Some(f) = &mut filter {
        f.check_instance(app.store.as_ref(), ResourceType::Schedule, &id)
            .await?;
    }
    let template = slot_template(&id, &parameters(&body)?)?;
    let key = idempotency_key(&headers, &caller)?;
    let hash = request_hash(
        "POST",
        &format!("Schedule/{id}/$generate-slots"),
        None,
        &body,
    );
    idempotent_write(app.store.as_ref(), key, hash, move |tx| {
        if let Some(f) = &mut filter
            && let Err(e) = f.tx_check_current(tx, ResourceType::Schedule, &id)?
        {
            return Ok(Err(e));
        }
        Ok(booking::generate_slots(tx, &id, &template)?
            .map(|g| {
                resource_reply(
                    200,
                    json!({"resourceType": "Parameters", "parameter": [
                        {"name": "created", "valueInteger": g.created},
                        {"name": "skipped", "valueInteger": g.skipped},
                    ]}),
                )
            })
            .map_err(refused))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::apply_patch;
    use serde_json::json;

    #[test]
    fn rfc6902_operations() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        let ok = apply_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e"},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "test", "path": "/a/b", "value": [2, 3]},
                {"op": "add", "path": "/f~1g", "value": true},
            ]),
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            doc,
            json!({"a": {"b": [2, 3]}, "c": "y", "e": "y", "f/g": true})
        );
    }

    #[test]
    fn failures_name_the_operation() {
        let mut doc = json!({"a": 1});
        let err = apply_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/b", "value": 2}]),
        )
        .err();
        let msg = err
            .map(|e| e.issues[0].diagnostics.clone())
            .unwrap_or_default();
        assert!(msg.starts_with("patch operation 0 (replace /b)"), "{msg}");
        assert!(apply_patch(&mut doc, &json!([{"op": "test", "path": "/a", "value": 2}])).is_err());
        assert!(
            apply_patch(
                &mut doc,
                &json!([{"op": "move", "from": "/a", "path": "/a/x"}])
            )
            .is_err()
        );
        assert!(apply_patch(&mut doc, &json!({"op": "add"})).is_err());
        assert_eq!(doc, json!({"a": 1}));
    }
}
