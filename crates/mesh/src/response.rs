//! Response parsers: turn a MESH response into a value, or refuse it with a clear error. Pure.
//!
//! Refused: a MESH error body (v1 `errorEvent/errorCode/errorDescription`, v2 `detail[{event,code,msg}]`, the
//! sandbox's validation `detail[{loc,msg,type}]`), bad JSON, a JSON endpoint answering with another content type,
//! a send answer without a message id, a download whose chunk range does not add up or a 206 without one, and a
//! gzip body that does not decode.

use crate::chunk::{self, ChunkRange};
use crate::error::{Error, MeshErrorBody, Result};
use serde_json::Value;
use std::collections::BTreeMap;

/// What came back from one MESH call. Header names are lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Body bytes as received (not yet gzip-decoded).
    pub body: Vec<u8>,
}

impl Response {
    /// Build one, lower-casing header names.
    pub fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect(),
            body,
        }
    }

    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The refusal a non-success response stands for, with its MESH error body when it has one.
pub fn error_from(resp: &Response) -> Error {
    Error::Refused {
        status: resp.status,
        body: error_body(&resp.body),
    }
}

/// Read any of the error body shapes MESH and the sandbox send; `None` for an empty or unreadable body.
pub fn error_body(body: &[u8]) -> Option<MeshErrorBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let excerpt: String = text.trim().chars().take(200).collect();
        return Some(MeshErrorBody {
            description: excerpt,
            ..Default::default()
        });
    };
    let s = |v: &Value, k: &str| -> Option<String> {
        match v.get(k)? {
            Value::String(x) if !x.is_empty() => Some(x.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let message_id = s(&v, "messageID").or_else(|| s(&v, "message_id"));
    if v.get("errorDescription").is_some() || v.get("errorCode").is_some() {
        return Some(MeshErrorBody {
            event: s(&v, "errorEvent"),
            code: s(&v, "errorCode"),
            description: s(&v, "errorDescription").unwrap_or_default(),
            message_id,
        });
    }
    match v.get("detail") {
        Some(Value::Array(items)) => {
            let first = items.first().cloned().unwrap_or(Value::Null);
            let mut description = s(&first, "msg").unwrap_or_default();
            if let Some(Value::Array(loc)) = first.get("loc") {
                // FastAPI validation error: say which header or parameter.
                let loc: Vec<String> = loc
                    .iter()
                    .map(|p| match p {
                        Value::String(x) => x.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                description = format!("{description} ({})", loc.join("."));
            }
            if items.len() > 1 {
                description.push_str(&format!(" (+{} more)", items.len() - 1));
            }
            Some(MeshErrorBody {
                event: s(&first, "event"),
                code: s(&first, "code"),
                description,
                message_id,
            })
        }
        Some(Value::String(d)) => Some(MeshErrorBody {
            description: d.clone(),
            message_id,
            ..Default::default()
        }),
        _ => s(&v, "message").map(|m| MeshErrorBody {
            description: m,
            message_id,
            ..Default::default()
        }),
    }
}

/// Parse a JSON body of a JSON endpoint: refuses a non-JSON content type and invalid JSON.
fn json_body(resp: &Response, what: &str) -> Result<Value> {
    if let Some(ct) = resp.header("content-type") {
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let jsonish = media == "application/json"
            || (media.starts_with("application/vnd.mesh.") && media.ends_with("+json"));
        if !jsonish {
            return Err(Error::Malformed(format!(
                "{what}: expected a JSON content type, got '{ct}'"
            )));
        }
    }
    let v: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| Error::Malformed(format!("{what}: body is not JSON ({e})")))?;
    if !v.is_object() {
        return Err(Error::Malformed(format!(
            "{what}: body is not a JSON object"
        )));
    }
    Ok(v)
}

/// Handshake: 200 means the mailbox, password, shared key and certificate are accepted.
pub fn parse_handshake(resp: &Response) -> Result<()> {
    if resp.success() {
        Ok(())
    } else {
        Err(error_from(resp))
    }
}

/// First chunk of a send: 202 (or 200) with `{"message_id": ...}` (v2) or `{"messageID": ...}` (v1).
pub fn parse_send(resp: &Response) -> Result<String> {
    if !resp.success() {
        return Err(error_from(resp));
    }
    let v = json_body(resp, "send")?;
    // A success status with an error body is still an error (some gateways do this).
    if v.get("errorCode").is_some() || v.get("errorDescription").is_some() {
        return Err(Error::Refused {
            status: resp.status,
            body: error_body(&resp.body),
        });
    }
    let id = v
        .get("message_id")
        .or_else(|| v.get("messageID"))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if id.is_empty() {
        return Err(Error::Malformed(
            "send: accepted, but the answer has no message_id".into(),
        ));
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Malformed(format!(
            "send: message id '{id}' is not printable ASCII"
        )));
    }
    Ok(id.to_string())
}

/// A later chunk of a send: 202 or 200.
pub fn parse_chunk_upload(resp: &Response) -> Result<()> {
    if resp.success() {
        Ok(())
    } else {
        Err(error_from(resp))
    }
}

/// One page of the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// Message ids on this page.
    pub messages: Vec<String>,
    /// `links.next`, when more pages exist.
    pub next: Option<String>,
    /// `approx_inbox_count`, when given.
    pub approx_count: Option<u64>,
}

/// Inbox listing (v2 or v1 JSON).
pub fn parse_inbox(resp: &Response) -> Result<InboxPage> {
    if !resp.success() {
        return Err(error_from(resp));
    }
    let v = json_body(resp, "inbox")?;
    let Some(Value::Array(items)) = v.get("messages") else {
        return Err(Error::Malformed(
            "inbox: no 'messages' array in the answer".into(),
        ));
    };
    let mut messages = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_graphic()) => {
                messages.push(id.to_string())
            }
            _ => {
                return Err(Error::Malformed(format!(
                    "inbox: message id {item} is not a printable string"
                )));
            }
        }
    }
    let next = match v.get("links").and_then(|l| l.get("next")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(Error::Malformed(format!(
                "inbox: links.next is not a string: {other}"
            )));
        }
    };
    Ok(InboxPage {
        messages,
        next,
        approx_count: v.get("approx_inbox_count").and_then(Value::as_u64),
    })
}

/// `Mex-MessageType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageType {
    /// An organisation-to-organisation message.
    Data,
    /// A report from MESH (e.g. non-delivery); its body is empty.
    Report,
    /// Anything else, kept verbatim.
    Other(String),
}

impl MessageType {
    /// From the header value (absent means DATA, as the official client assumes).
    pub fn parse(s: Option<&str>) -> MessageType {
        match s.map(str::trim) {
            None | Some("") => MessageType::Data,
            Some(t) if t.eq_ignore_ascii_case("DATA") => MessageType::Data,
            Some(t) if t.eq_ignore_ascii_case("REPORT") => MessageType::Report,
            Some(t) => MessageType::Other(t.to_string()),
        }
    }

    /// `DATA`, `REPORT` or the verbatim value.
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::Data => "DATA",
            MessageType::Report => "REPORT",
            MessageType::Other(s) => s,
        }
    }
}

/// One downloaded chunk, body decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedChunk {
    /// Which chunk this is of how many (`1:1` for an unchunked message or a report).
    pub range: ChunkRange,
    /// `mex-*` headers, names lower-cased.
    pub mex_headers: BTreeMap<String, String>,
    /// Decoded body.
    pub body: Vec<u8>,
    /// DATA or REPORT.
    pub message_type: MessageType,
}

/// Parse the answer to downloading chunk `expected` (1-based). `expected_total` is the chunk count announced by
/// chunk 1, once known. Refuses a 206 without `mex-chunk-range`, a range other than the chunk asked for, a 206
/// on the last chunk, a 200 before the last chunk, and an undecodable body.
pub fn parse_download(
    resp: &Response,
    expected: u32,
    expected_total: Option<u32>,
) -> Result<DownloadedChunk> {
    if resp.status != 200 && resp.status != 206 {
        return Err(if resp.success() {
            Error::Malformed(format!(
                "download: unexpected status {} (want 200 or 206)",
                resp.status
            ))
        } else {
            error_from(resp)
        });
    }
    let mex_headers: BTreeMap<String, String> = resp
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("mex-"))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let message_type = MessageType::parse(resp.header("mex-messagetype"));
    let body = match resp
        .header("content-encoding")
        .map(|e| e.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("identity") => resp.body.clone(),
        Some("gzip") | Some("x-gzip") => {
            if resp.body.is_empty() && message_type == MessageType::Report {
                Vec::new()
            } else {
                chunk::gunzip(&resp.body)
                    .map_err(|e| Error::Malformed(format!("download chunk {expected}: {e}")))?
            }
        }
        Some(other) => {
            return Err(Error::Malformed(format!(
                "download: unsupported content-encoding '{other}'"
            )));
        }
    };
    if message_type == MessageType::Report {
        // Reports carry no data and their range header may say "1:0"; nothing to reassemble.
        return Ok(DownloadedChunk {
            range: ChunkRange {
                number: 1,
                total: 1,
            },
            mex_headers,
            body,
            message_type,
        });
    }
    let range = match resp.header("mex-chunk-range") {
        Some(h) if !h.trim().is_empty() => {
            Some(ChunkRange::parse(h).map_err(|e| Error::Malformed(format!("download: {e}")))?)
        }
        _ => None,
    };
    let range = match (resp.status, range) {
        (206, None) => {
            return Err(Error::Malformed(
                "download: 206 Partial Content without a mex-chunk-range header".into(),
            ));
        }
        (_, Some(r)) => r,
        (_, None) if expected == 1 => ChunkRange {
            number: 1,
            total: 1,
        },
        (_, None) => {
            return Err(Error::Malformed(format!(
                "download: chunk {expected} came without a mex-chunk-range header"
            )));
        }
    };
    if range.number != expected {
        return Err(Error::Malformed(format!(
            "download: asked for chunk {expected}, got chunk range {}",
            range.header()
        )));
    }
    if let Some(t) = expected_total
        && t != range.total
    {
        return Err(Error::Malformed(format!(
            "download: chunk range {} does not match the {t} chunks announced",
            range.header()
        )));
    }
    if let Some(tc) = resp
        .header("mex-total-chunks")
        .and_then(|t| t.trim().parse::<u32>().ok())
        && tc != range.total
    {
        return Err(Error::Malformed(format!(
            "download: mex-total-chunks {tc} disagrees with mex-chunk-range {}",
            range.header()
        )));
    }
    match resp.status {
        206 if range.number == range.total => Err(Error::Malformed(format!(
            "download: 206 Partial Content on the last chunk ({})",
            range.header()
        ))),
        200 if range.number != range.total => Err(Error::Malformed(format!(
            "download: 200 OK but chunk range {} says more chunks follow",
            range.header()
        ))),
        _ => Ok(DownloadedChunk {
            range,
            mex_headers,
            body,
            message_type,
        }),
    }
}

/// A downloaded message: chunks joined, gzip decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// MESH message id.
    pub id: String,
    /// `mex-*` headers of the first chunk, names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub body: Vec<u8>,
    /// DATA or REPORT.
    pub message_type: MessageType,
    /// `mex-workflowid`.
    pub workflow_id: Option<String>,
    /// `mex-localid`.
    pub local_id: Option<String>,
    /// `mex-subject`.
    pub subject: Option<String>,
    /// `mex-filename`.
    pub file_name: Option<String>,
    /// `mex-from`: the sending mailbox.
    pub from: Option<String>,
    /// `mex-to`: this mailbox.
    pub to: Option<String>,
}

/// Join downloaded chunks (in order, as checked by [`parse_download`]) into a message, verifying a
/// `sha256:` content checksum when the sender gave one.
pub fn assemble(id: &str, chunks: Vec<DownloadedChunk>) -> Result<InboundMessage> {
    let Some(first) = chunks.first() else {
        return Err(Error::Malformed("download: no chunks".into()));
    };
    let total = first.range.total as usize;
    if chunks.len() != total
        || chunks
            .iter()
            .enumerate()
            .any(|(i, c)| c.range.number as usize != i + 1)
    {
        return Err(Error::Malformed(format!(
            "download: got {} chunks in the wrong order or number for a {total}-chunk message",
            chunks.len()
        )));
    }
    let headers = first.mex_headers.clone();
    let message_type = first.message_type.clone();
    let body = chunk::reassemble(chunks.into_iter().map(|c| c.body).collect());
    if message_type == MessageType::Data
        && let Some(sum) = headers.get("mex-content-checksum")
    {
        chunk::verify_checksum(sum, &body)?;
    }
    let get = |k: &str| headers.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(InboundMessage {
        id: id.to_string(),
        workflow_id: get("mex-workflowid"),
        local_id: get("mex-localid"),
        subject: get("mex-subject"),
        file_name: get("mex-filename"),
        from: get("mex-from"),
        to: get("mex-to"),
        headers,
        body,
        message_type,
    })
}

/// Acknowledge: 200 (v2 has no body).
pub fn parse_ack(resp: &Response) -> Result<()> {
    if resp.success() {
        Ok(())
    } else {
        Err(error_from(resp))
    }
}

/// Tracking information of a sent message (v2 snake_case or v1 camelCase answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Tracking {
    /// MESH message id.
    pub message_id: String,
    /// The sender's LocalID.
    pub local_id: Option<String>,
    /// Status, lower-cased: `uploading`, `accepted`, `acknowledged`, `undeliverable`, `error` ...
    pub status: Option<String>,
    /// Status code, e.g. `00`.
    pub status_code: Option<String>,
    /// Status event, e.g. `TRANSFER`.
    pub status_event: Option<String>,
    /// Status description.
    pub status_description: Option<String>,
    /// Whether the status is a success.
    pub status_success: Option<bool>,
    /// Recipient mailbox.
    pub recipient: Option<String>,
    /// Workflow id.
    pub workflow_id: Option<String>,
    /// File name.
    pub file_name: Option<String>,
    /// The answer as received.
    pub raw: Value,
}

fn tracking_from(v: Value) -> Result<Tracking> {
    let s = |keys: &[&str]| -> Option<String> {
        keys.iter().find_map(|k| match v.get(*k) {
            Some(Value::String(x)) if !x.is_empty() => Some(x.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    };
    let message_id = s(&["message_id", "messageId", "dtsId"])
        .ok_or_else(|| Error::Malformed("tracking: the answer has no message id".into()))?;
    let status_success = ["status_success", "statusSuccess"]
        .iter()
        .find_map(|k| match v.get(*k) {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(x)) if x.eq_ignore_ascii_case("SUCCESS") => Some(true),
            Some(Value::String(x)) if x.eq_ignore_ascii_case("ERROR") => Some(false),
            _ => None,
        });
    Ok(Tracking {
        message_id,
        local_id: s(&["local_id", "localId"]),
        status: s(&["status"]).map(|x| x.to_ascii_lowercase()),
        status_code: s(&["status_code", "statusCode"]),
        status_event: s(&["status_event", "statusEvent"]),
        status_description: s(&["status_description", "statusDescription"]),
        status_success,
        recipient: s(&["recipient"]),
        workflow_id: s(&["workflow_id", "workflowId"]),
        file_name: s(&["filename", "fileName"]),
        raw: v,
    })
}

/// Tracking by message id.
pub fn parse_tracking(resp: &Response) -> Result<Tracking> {
    if !resp.success() {
        return Err(error_from(resp));
    }
    tracking_from(json_body(resp, "tracking")?)
}

/// Tracking by LocalID: `Ok(None)` on 404 (no message with that LocalID), an error on 300 (not unique).
pub fn parse_tracking_local(resp: &Response) -> Result<Option<Tracking>> {
    match resp.status {
        404 => Ok(None),
        300 => Err(Error::Refused {
            status: 300,
            body: Some(MeshErrorBody {
                description: "more than one message has this LocalID".into(),
                ..Default::default()
            }),
        }),
        _ => parse_tracking(resp).map(Some),
    }
}

/// One mailbox found by endpoint lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupResult {
    /// Mailbox id.
    pub mailbox_id: String,
    /// Mailbox name or description.
    pub mailbox_name: Option<String>,
}

/// Endpoint lookup (v2 `{results:[{mailbox_id, mailbox_name}]}` or v1 `{results:[{address, description}]}`).
pub fn parse_lookup(resp: &Response) -> Result<Vec<LookupResult>> {
    if !resp.success() {
        return Err(error_from(resp));
    }
    let v = json_body(resp, "endpoint lookup")?;
    let Some(Value::Array(items)) = v.get("results") else {
        return Err(Error::Malformed(
            "endpoint lookup: no 'results' array in the answer".into(),
        ));
    };
    items
        .iter()
        .map(|r| {
            let id = r
                .get("mailbox_id")
                .or_else(|| r.get("address"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Error::Malformed(format!("endpoint lookup: result without a mailbox id: {r}"))
                })?;
            Ok(LookupResult {
                mailbox_id: id.to_string(),
                mailbox_name: r
                    .get("mailbox_name")
                    .or_else(|| r.get("description"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    const V2: &str = "application/vnd.mesh.v2+json";

    fn resp(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
        Response::new(
            status,
            headers
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            body.to_vec(),
        )
    }

    fn json(status: u16, body: &str) -> Response {
        resp(status, &[("Content-Type", V2)], body.as_bytes())
    }

    #[test]
    fn send_ok_v2_and_v1() {
        assert_eq!(
            parse_send(&json(202, r#"{"message_id":"896C0DCF"}"#)).unwrap(),
            "896C0DCF"
        );
        let v1 = resp(
            202,
            &[("content-type", "application/json")],
            br#"{"messageID":"20200529155357895317_3573F8"}"#,
        );
        assert_eq!(parse_send(&v1).unwrap(), "20200529155357895317_3573F8");
    }

    #[test]
    fn send_refusals() {
        let missing = parse_send(&json(202, r#"{"status":"ok"}"#)).unwrap_err();
        assert!(matches!(&missing, Error::Malformed(m) if m.contains("no message_id")));
        assert!(matches!(
            parse_send(&json(202, r#"{"message_id":""}"#)),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse_send(&json(202, "{not json")),
            Err(Error::Malformed(m)) if m.contains("not JSON")
        ));
        assert!(matches!(
            parse_send(&json(202, "[1,2]")),
            Err(Error::Malformed(_))
        ));
        let html = resp(202, &[("content-type", "text/html")], b"<html>proxy</html>");
        assert!(matches!(
            parse_send(&html),
            Err(Error::Malformed(m)) if m.contains("content type")
        ));
    }

    #[test]
    fn mesh_error_bodies() {
        // v1 error body.
        let e = parse_send(&resp(
            417,
            &[("content-type", "application/json")],
            br#"{"messageID":"M1","errorEvent":"SEND","errorCode":"12","errorDescription":"Unregistered to address"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.status(), Some(417));
        assert_eq!(e.mesh_code(), Some("12"));
        let text = e.to_string();
        assert!(
            text.contains("417") && text.contains("12") && text.contains("SEND"),
            "{text}"
        );

        // v2 error body.
        let e = parse_send(&json(
            417,
            r#"{"message_id":"M1","internal_id":"I","detail":[{"event":"SEND","code":"12","msg":"Unregistered to address"}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.mesh_code(), Some("12"));
        assert!(e.to_string().contains("Unregistered to address"));

        // The sandbox's validation error.
        let e = parse_handshake(&resp(
            400,
            &[("content-type", "application/json")],
            br#"{"detail":[{"type":"missing","loc":["header","mex-osversion"],"msg":"Field required"}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.status(), Some(400));
        assert!(
            e.to_string()
                .contains("Field required (header.mex-osversion)"),
            "{e}"
        );

        // A success status carrying an error body is an error too.
        let e = parse_send(&json(
            202,
            r#"{"errorEvent":"SEND","errorCode":"06","errorDescription":"Malformed"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.mesh_code(), Some("06"));

        // 403 with an empty body: say it is authentication.
        let e = parse_handshake(&resp(403, &[], b"")).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");

        // Not JSON at all: keep an excerpt.
        let e = parse_inbox(&resp(
            502,
            &[("content-type", "text/html")],
            b"<h1>Bad gateway</h1>",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("Bad gateway"), "{e}");
    }

    #[test]
    fn inbox_pages() {
        let p = parse_inbox(&json(
            200,
            r#"{"messages":["A","B"],"links":{"self":"/x","next":"/messageexchange/X/inbox?continue_from=abc"},"approx_inbox_count":700}"#,
        ))
        .unwrap();
        assert_eq!(p.messages, ["A", "B"]);
        assert_eq!(
            p.next.as_deref(),
            Some("/messageexchange/X/inbox?continue_from=abc")
        );
        assert_eq!(p.approx_count, Some(700));
        let v1 = parse_inbox(&resp(
            200,
            &[("content-type", "application/json")],
            br#"{"messages":[]}"#,
        ))
        .unwrap();
        assert!(v1.messages.is_empty() && v1.next.is_none());
    }

    #[test]
    fn inbox_refusals() {
        for body in [
            r#"{"links":{}}"#,
            r#"{"messages":"A"}"#,
            r#"{"messages":[1]}"#,
            r#"{"messages":[""]}"#,
            r#"{"messages":["A"],"links":{"next":5}}"#,
            "",
        ] {
            assert!(
                matches!(parse_inbox(&json(200, body)), Err(Error::Malformed(_))),
                "{body}"
            );
        }
        let wrong_type = resp(
            200,
            &[("content-type", "text/plain")],
            br#"{"messages":[]}"#,
        );
        assert!(matches!(parse_inbox(&wrong_type), Err(Error::Malformed(_))));
    }

    fn chunk_resp(status: u16, range: Option<&str>, body: &[u8]) -> Response {
        let mut h = vec![
            ("content-type", "application/octet-stream"),
            ("mex-messagetype", "DATA"),
            ("mex-from", "X26ABC1"),
        ];
        if let Some(r) = range {
            h.push(("mex-chunk-range", r));
        }
        resp(status, &h, body)
    }

    #[test]
    fn download_single_and_chunked() {
        let one = parse_download(&chunk_resp(200, Some("1:1"), b"abc"), 1, None).unwrap();
        assert_eq!(one.range.total, 1);
        assert_eq!(one.body, b"abc");
        assert_eq!(
            one.mex_headers.get("mex-from").map(String::as_str),
            Some("X26ABC1")
        );
        // No range header on a plain 200 is a single-chunk message.
        assert_eq!(
            parse_download(&chunk_resp(200, None, b"abc"), 1, None)
                .unwrap()
                .range
                .total,
            1
        );
        let c1 = parse_download(&chunk_resp(206, Some("1:3"), b"aa"), 1, None).unwrap();
        let c2 = parse_download(&chunk_resp(206, Some("2:3"), b"bb"), 2, Some(3)).unwrap();
        let gz = crate::chunk::gzip(b"cc");
        let mut last = chunk_resp(200, Some("3:3"), &gz);
        last.headers
            .push(("content-encoding".into(), "gzip".into()));
        let c3 = parse_download(&last, 3, Some(3)).unwrap();
        let m = assemble("M1", vec![c1, c2, c3]).unwrap();
        assert_eq!(m.body, b"aabbcc");
        assert_eq!(m.from.as_deref(), Some("X26ABC1"));
        assert_eq!(m.message_type, MessageType::Data);
    }

    #[test]
    fn download_refusals() {
        let cases: Vec<(Response, u32, Option<u32>, &str)> = vec![
            (
                chunk_resp(206, None, b"x"),
                1,
                None,
                "without a mex-chunk-range",
            ),
            (
                chunk_resp(206, Some("bogus"), b"x"),
                1,
                None,
                "mex-chunk-range",
            ),
            (
                chunk_resp(206, Some("2:3"), b"x"),
                1,
                None,
                "asked for chunk 1",
            ),
            (
                chunk_resp(206, Some("3:3"), b"x"),
                3,
                Some(3),
                "206 Partial Content on the last",
            ),
            (
                chunk_resp(200, Some("1:3"), b"x"),
                1,
                None,
                "more chunks follow",
            ),
            (
                chunk_resp(206, Some("2:4"), b"x"),
                2,
                Some(3),
                "does not match",
            ),
            (
                chunk_resp(200, None, b"x"),
                2,
                Some(2),
                "without a mex-chunk-range",
            ),
            (chunk_resp(204, None, b""), 1, None, "unexpected status"),
        ];
        for (r, n, t, needle) in cases {
            let e = parse_download(&r, n, t).unwrap_err();
            assert!(
                matches!(&e, Error::Malformed(m) if m.contains(needle)),
                "{needle}: {e}"
            );
        }
        let mut bad_gzip = chunk_resp(200, Some("1:1"), b"not gzip");
        bad_gzip
            .headers
            .push(("content-encoding".into(), "gzip".into()));
        assert!(matches!(
            parse_download(&bad_gzip, 1, None),
            Err(Error::Malformed(_))
        ));
        let mut br = chunk_resp(200, Some("1:1"), b"x");
        br.headers.push(("content-encoding".into(), "br".into()));
        assert!(matches!(
            parse_download(&br, 1, None),
            Err(Error::Malformed(_))
        ));
        let mut total = chunk_resp(206, Some("1:2"), b"x");
        total.headers.push(("mex-total-chunks".into(), "3".into()));
        assert!(matches!(
            parse_download(&total, 1, None),
            Err(Error::Malformed(_))
        ));
        let gone = parse_download(&resp(410, &[], b""), 1, None).unwrap_err();
        assert_eq!(gone.status(), Some(410));
    }

    #[test]
    fn compressed_flag_is_not_trusted() {
        // `mex-content-compressed: Y` without Content-Encoding: the body is returned as is.
        let mut r = chunk_resp(200, Some("1:1"), b"plain");
        r.headers
            .push(("mex-content-compressed".into(), "Y".into()));
        assert_eq!(parse_download(&r, 1, None).unwrap().body, b"plain");
    }

    #[test]
    fn report_messages() {
        let r = resp(
            200,
            &[
                ("mex-messagetype", "REPORT"),
                ("mex-chunk-range", "1:0"),
                ("mex-statuscode", "14"),
                ("mex-linkedmsgid", "M0"),
            ],
            b"",
        );
        let c = parse_download(&r, 1, None).unwrap();
        let m = assemble("R1", vec![c]).unwrap();
        assert_eq!(m.message_type, MessageType::Report);
        assert!(m.body.is_empty());
        assert_eq!(
            m.headers.get("mex-statuscode").map(String::as_str),
            Some("14")
        );
    }

    #[test]
    fn assemble_checks() {
        let c = |n, t, b: &[u8]| DownloadedChunk {
            range: ChunkRange {
                number: n,
                total: t,
            },
            mex_headers: BTreeMap::new(),
            body: b.to_vec(),
            message_type: MessageType::Data,
        };
        assert!(assemble("M", vec![]).is_err());
        assert!(assemble("M", vec![c(1, 3, b"a"), c(2, 3, b"b")]).is_err());
        assert!(assemble("M", vec![c(1, 2, b"a"), c(1, 2, b"b")]).is_err());
        let mut first = c(1, 2, b"hello ");
        first.mex_headers.insert(
            "mex-content-checksum".into(),
            crate::chunk::checksum(b"hello world"),
        );
        assert_eq!(
            assemble("M", vec![first.clone(), c(2, 2, b"world")])
                .unwrap()
                .body,
            b"hello world"
        );
        assert!(matches!(
            assemble("M", vec![first, c(2, 2, b"w0rld")]),
            Err(Error::Malformed(m)) if m.contains("checksum")
        ));
    }

    #[test]
    fn tracking_v2_and_v1() {
        let t = parse_tracking(&json(
            200,
            r#"{"message_id":"M1","local_id":"L1","status":"acknowledged","status_success":true,"recipient":"X26ABC2"}"#,
        ))
        .unwrap();
        assert_eq!(t.message_id, "M1");
        assert_eq!(t.local_id.as_deref(), Some("L1"));
        assert_eq!(t.status.as_deref(), Some("acknowledged"));
        assert_eq!(t.status_success, Some(true));
        let v1 = parse_tracking_local(&resp(
            200,
            &[("content-type", "application/json")],
            br#"{"messageId":"M2","localId":"L2","status":"Accepted","statusSuccess":"SUCCESS","dtsId":"M2"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(v1.message_id, "M2");
        assert_eq!(v1.status.as_deref(), Some("accepted"));
        assert_eq!(v1.status_success, Some(true));
        assert_eq!(parse_tracking_local(&resp(404, &[], b"")).unwrap(), None);
        assert_eq!(
            parse_tracking_local(&resp(300, &[], b""))
                .unwrap_err()
                .status(),
            Some(300)
        );
        assert!(matches!(
            parse_tracking(&json(200, r#"{"status":"accepted"}"#)),
            Err(Error::Malformed(_))
        ));
        assert_eq!(
            parse_tracking(&resp(404, &[], b"")).unwrap_err().status(),
            Some(404)
        );
    }

    #[test]
    fn lookup_results() {
        let v2 = parse_lookup(&json(
            200,
            r#"{"results":[{"mailbox_id":"X26ABC2","mailbox_name":"TESTMB2"}]}"#,
        ))
        .unwrap();
        assert_eq!(
            v2,
            [LookupResult {
                mailbox_id: "X26ABC2".into(),
                mailbox_name: Some("TESTMB2".into())
            }]
        );
        let v1 = parse_lookup(&resp(
            200,
            &[("content-type", "application/json")],
            br#"{"query_id":"q","results":[{"endpoint_type":"MESH","description":"d","address":"X26HC022"}]}"#,
        ))
        .unwrap();
        assert_eq!(v1[0].mailbox_id, "X26HC022");
        assert!(parse_lookup(&json(200, r#"{"results":[{"mailbox_name":"x"}]}"#)).is_err());
        assert!(parse_lookup(&json(200, r#"{}"#)).is_err());
    }
}
