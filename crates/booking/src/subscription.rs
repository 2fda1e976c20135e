//! Write rules of `Subscription`: criteria that the server can evaluate, a channel it can deliver to, and the
//! signing secret kept out of the resource (it is never returned on read).

use crate::error::BookingError;
use crate::{Outcome, Refusal, event_kind, util};
use fhir::ResourceType;
use serde_json::Value;
use store::Tx;

/// Extension carrying the subscriber's Standard Webhooks secret (`whsec_...`) on create/update.
pub const SECRET_EXTENSION: &str = "urn:carebridge:subscription-signing-secret";
/// Where secrets are kept (store key-value namespace), keyed by Subscription id.
pub const SECRET_NAMESPACE: &str = "subscription-secret";

/// Payloads a rest-hook channel may ask for (none = an id-only signal).
pub const PAYLOADS: [&str; 2] = ["application/cloudevents+json", "application/fhir+json"];

fn invalid(message: impl Into<String>, expression: &str) -> BookingError {
    BookingError::invalid(message, Some(expression.to_string()))
}

/// Remove the secret extension from `resource`, returning its value (or an error naming where it is wrong).
fn take_secret(resource: &mut Value) -> Result<Option<String>, BookingError> {
    let Some(exts) = resource.get_mut("extension").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let Some(i) = exts
        .iter()
        .position(|e| e.get("url").and_then(Value::as_str) == Some(SECRET_EXTENSION))
    else {
        return Ok(None);
    };
    let ext = exts.remove(i);
    let empty = exts.is_empty();
    if empty && let Some(o) = resource.as_object_mut() {
        o.remove("extension");
    }
    let secret = ext
        .get("valueString")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "the signing-secret extension needs a valueString 'whsec_...'",
                &format!("Subscription.extension[{i}]"),
            )
        })?;
    delivery::check_secret(secret).map_err(|e| {
        invalid(
            e.to_string(),
            &format!("Subscription.extension[{i}].valueString"),
        )
    })?;
    Ok(Some(secret.to_string()))
}

/// Check what the delivery runner needs, normalise the status, and split off the secret.
fn prepare(resource: &mut Value) -> Result<Option<String>, BookingError> {
    let criteria = resource
        .get("criteria")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Err(e) = store::url::parse_criteria(criteria) {
        return Err(invalid(
            format!("criteria '{criteria}' cannot be evaluated: {e}"),
            "Subscription.criteria",
        ));
    }
    let channel = resource.get("channel").cloned().unwrap_or(Value::Null);
    match channel.get("type").and_then(Value::as_str).unwrap_or("") {
        "rest-hook" => {
            let endpoint = channel
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(invalid(
                    "a rest-hook channel needs an http:// or https:// endpoint",
                    "Subscription.channel.endpoint",
                ));
            }
            if let Some(payload) = channel.get("payload").and_then(Value::as_str)
                && !PAYLOADS.contains(&payload)
            {
                return Err(invalid(
                    format!(
                        "payload '{payload}' is not supported; use {} or leave it out for an id-only signal",
                        PAYLOADS.join(" or ")
                    ),
                    "Subscription.channel.payload",
                ));
            }
            for (i, h) in channel
                .get("header")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let ok = h
                    .as_str()
                    .and_then(|h| h.split_once(':'))
                    .is_some_and(|(n, _)| {
                        !n.trim().is_empty()
                            && n.trim()
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !ok {
                    return Err(invalid(
                        "a channel header must look like 'Name: value'",
                        &format!("Subscription.channel.header[{i}]"),
                    ));
                }
            }
        }
        "message" => {
            let endpoint = channel
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or("");
            if let Err(why) = check_message_endpoint(endpoint) {
                return Err(invalid(why, "Subscription.channel.endpoint"));
            }
        }
        other => {
            return Err(invalid(
                format!("channel type '{other}' is not supported (supported: rest-hook, message)"),
                "Subscription.channel.type",
            ));
        }
    }
    // The server decides the status: a requested subscription becomes active; `off` pauses it.
    match resource.get("status").and_then(Value::as_str) {
        Some("requested") | Some("error") => {
            if let Some(o) = resource.as_object_mut() {
                o.insert("status".into(), Value::String("active".into()));
                o.remove("error");
            }
        }
        _ => {}
    }
    take_secret(resource)
}

pub(crate) fn write_subscription(
    tx: &mut dyn Tx,
    id: &str,
    mut resource: Value,
    expected_version: Option<u64>,
) -> Refusal<Outcome> {
    let secret = match prepare(&mut resource) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let current = util::live(tx, ResourceType::Subscription, id)?;
    let live_version = current.as_ref().map_or(0, |c| c.version);
    util::check_expected(
        ResourceType::Subscription,
        id,
        expected_version,
        live_version,
    )?;
    let existing_secret = tx.kv_get(SECRET_NAMESPACE, id)?;
    let rest_hook = resource.pointer("/channel/type").and_then(Value::as_str) == Some("rest-hook");
    if rest_hook && secret.is_none() && existing_secret.is_none() {
        return Ok(Err(invalid(
            format!(
                "a rest-hook subscription needs a signing secret: add the extension {SECRET_EXTENSION} with valueString 'whsec_<base64 key>'"
            ),
            "Subscription.extension",
        )));
    }
    let stored = util::put(
        tx,
        ResourceType::Subscription,
        id,
        resource,
        Some(expected_version.unwrap_or(live_version)),
    )?;
    if let Some(secret) = &secret {
        tx.kv_put(SECRET_NAMESPACE, id, Some(secret))?;
    }
    let created = current.is_none();
    util::event(
        tx,
        &stored,
        &event_kind(
            ResourceType::Subscription,
            if created { "created" } else { "updated" },
        ),
        Value::Null,
    )?;
    Ok(Ok(if created {
        Outcome::Created(stored)
    } else {
        Outcome::Updated(stored)
    }))
}

/// Set a subscription's status (and `error` text) as the delivery runner sees it; a no-op when unchanged.
/// Returns the new version when one was written.
pub fn set_status(
    tx: &mut dyn Tx,
    id: &str,
    status: &str,
    error: Option<&str>,
) -> store::Result<Option<store::Stored>> {
    let Some(current) = util::live(tx, ResourceType::Subscription, id)? else {
        return Ok(None);
    };
    let mut json = util::json_of(&current)?;
    let same_status = json.get("status").and_then(Value::as_str) == Some(status);
    let same_error = json.get("error").and_then(Value::as_str) == error;
    if same_status && same_error {
        return Ok(None);
    }
    if let Some(o) = json.as_object_mut() {
        o.insert("status".into(), Value::String(status.into()));
        match error {
            Some(e) => o.insert("error".into(), Value::String(e.into())),
            None => o.remove("error"),
        };
    }
    let stored = util::put(
        tx,
        ResourceType::Subscription,
        id,
        json,
        Some(current.version),
    )?;
    util::event(
        tx,
        &stored,
        &event_kind(ResourceType::Subscription, "updated"),
        Value::Null,
    )?;
    Ok(Some(stored))
}

/// A `message` channel's endpoint: `mllp://host:port` (HL7 v2 over MLLP) or `mesh://MAILBOX?workflow_id=WF`
/// (a MESH mailbox, optionally `&from=MAILBOX`).
pub fn check_message_endpoint(endpoint: &str) -> Result<(), String> {
    if let Some(rest) = endpoint.strip_prefix("mllp://") {
        let hostport = rest.trim_end_matches('/');
        let ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if ok {
            return Ok(());
        }
        return Err(format!(
            "'{endpoint}' is not an MLLP endpoint: use mllp://host:port"
        ));
    }
    if let Some(rest) = endpoint.strip_prefix("mesh://") {
        let (mailbox, query) = rest.split_once('?').unwrap_or((rest, ""));
        let has_workflow = query.split('&').any(|kv| {
            kv.strip_prefix("workflow_id=")
                .is_some_and(|v| !v.is_empty())
        });
        if !mailbox.is_empty() && mailbox.bytes().all(|b| b.is_ascii_alphanumeric()) && has_workflow
        {
            return Ok(());
        }
        return Err(format!(
            "'{endpoint}' is not a MESH endpoint: use mesh://MAILBOX?workflow_id=WORKFLOW (optionally &from=MAILBOX)"
        ));
    }
    Err(format!(
        "a message channel needs an mllp://host:port or mesh://MAILBOX?workflow_id=... endpoint, not '{endpoint}'"
    ))
}
