//! Request builders: method, path, headers and body of every MESH call, without the `Authorization` header
//! (the shell adds a fresh token to each attempt, since a token is single-use). Pure.

use crate::chunk::ChunkRange;
use crate::error::{Error, Result};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// The v2 media type: v2 JSON bodies (`message_id`, `links.next`) instead of the v1 ones.
pub const MESH_V2: &str = "application/vnd.mesh.v2+json";

/// Characters escaped in a path segment (everything but unreserved characters).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'&')
    .add(b'=')
    .add(b'+')
    .add(b'$')
    .add(b',');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// HTTP method of a MESH call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// PUT
    Put,
}

/// What one MESH call sends. `path` includes the query and starts with `/messageexchange`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method.
    pub method: Method,
    /// Path and query, relative to the base URL.
    pub path: String,
    /// Headers (never `Authorization`).
    pub headers: Vec<(String, String)>,
    /// Body bytes (empty for GET and PUT).
    pub body: Vec<u8>,
}

impl Request {
    fn new(method: Method, path: String) -> Request {
        Request {
            method,
            path,
            headers: vec![("Accept".into(), MESH_V2.into())],
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Request {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The value of a header (case-insensitive), for tests and logging.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for the first chunk of a send (`POST /outbox`): never retried blindly.
    pub fn is_first_send(&self) -> bool {
        self.method == Method::Post && self.path.ends_with("/outbox")
    }
}

/// Who is calling, for the handshake's `mex-*` headers (the sandbox refuses a handshake without `mex-OSVersion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// e.g. `carebridge==0.1.0`.
    pub client_version: String,
    /// e.g. `Linux`.
    pub os_name: String,
    /// Kernel release or `unknown`.
    pub os_version: String,
    /// e.g. `x86_64`.
    pub os_architecture: String,
}

fn mailbox_path(mailbox: &str) -> String {
    format!("/messageexchange/{}", seg(mailbox))
}

/// `POST /messageexchange/{mailbox}` with the client's `mex-*` headers.
pub fn handshake(mailbox: &str, client: &ClientInfo) -> Request {
    Request::new(Method::Post, mailbox_path(mailbox))
        .header("mex-ClientVersion", clean(&client.client_version))
        .header("mex-OSName", clean(&client.os_name))
        .header("mex-OSVersion", clean(&client.os_version))
        .header("mex-OSArchitecture", clean(&client.os_architecture))
        .header("mex-JavaVersion", "N/A")
}

/// Keep a descriptive header value printable ASCII (an odd kernel string must not break the handshake).
fn clean(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
        .collect();
    if t.trim().is_empty() {
        "unknown".into()
    } else {
        t.trim().to_string()
    }
}

/// The metadata of a message being sent; sent with the first chunk only.
#[derive(Debug, Clone, Copy)]
pub struct SendMeta<'a> {
    /// Recipient mailbox (`Mex-To`).
    pub to: &'a str,
    /// `Mex-WorkflowID`.
    pub workflow_id: &'a str,
    /// `Mex-Subject`.
    pub subject: Option<&'a str>,
    /// `Mex-LocalID`: the sender's reference, also what an uncertain send is reconciled by.
    pub local_id: &'a str,
    /// `Mex-FileName`.
    pub file_name: Option<&'a str>,
    /// `Mex-Content-Type`: the payload's media type once decoded.
    pub content_type: Option<&'a str>,
    /// `Mex-Content-Checksum` of the whole uncompressed payload.
    pub checksum: Option<&'a str>,
}

/// Refuse header values HTTP cannot carry or that would smuggle a header (CR/LF), and over-long ones.
fn header_text(name: &str, value: &str, max: usize) -> Result<String> {
    if !value.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(Error::Invalid(format!(
            "{name} must be printable ASCII (no line breaks or non-ASCII characters)"
        )));
    }
    if value.len() > max {
        return Err(Error::Invalid(format!(
            "{name} is longer than MESH's {max} characters"
        )));
    }
    Ok(value.to_string())
}

/// The first chunk of a send: `POST /messageexchange/{mailbox}/outbox`.
/// `body` is the chunk as sent (already gzipped when `gzipped`); `total` is the number of chunks.
pub fn send_first(
    mailbox: &str,
    meta: &SendMeta<'_>,
    body: Vec<u8>,
    gzipped: bool,
    total: u32,
) -> Result<Request> {
    if meta.to.trim().is_empty() {
        return Err(Error::Invalid(
            "recipient mailbox (Mex-To) is required".into(),
        ));
    }
    if meta.workflow_id.trim().is_empty() {
        return Err(Error::Invalid(
            "workflow id (Mex-WorkflowID) is required".into(),
        ));
    }
    if meta.local_id.trim().is_empty() {
        return Err(Error::Invalid("local id (Mex-LocalID) is required".into()));
    }
    if body.is_empty() {
        return Err(Error::Invalid(
            "MESH does not accept an empty message body".into(),
        ));
    }
    let range = ChunkRange {
        number: 1,
        total: total.max(1),
    };
    let mut r = Request::new(Method::Post, format!("{}/outbox", mailbox_path(mailbox)))
        .header("Content-Type", "application/octet-stream")
        .header(
            "Mex-To",
            header_text("Mex-To", &meta.to.to_ascii_uppercase(), 100)?,
        )
        .header(
            "Mex-WorkflowID",
            header_text("Mex-WorkflowID", meta.workflow_id, 300)?,
        )
        .header(
            "Mex-LocalID",
            header_text("Mex-LocalID", meta.local_id, 300)?,
        )
        .header("Mex-Chunk-Range", range.header());
    if let Some(s) = meta.subject {
        r = r.header("Mex-Subject", header_text("Mex-Subject", s, 500)?);
    }
    if let Some(f) = meta.file_name {
        r = r.header("Mex-FileName", header_text("Mex-FileName", f, 300)?);
    }
    if let Some(ct) = meta.content_type {
        r = r.header(
            "Mex-Content-Type",
            header_text("Mex-Content-Type", ct, 300)?,
        );
    }
    if let Some(c) = meta.checksum {
        r = r.header(
            "Mex-Content-Checksum",
            header_text("Mex-Content-Checksum", c, 100)?,
        );
    }
    if gzipped {
        // Transport compression only: `Content-Encoding` tells MESH (and every receiving client) to gunzip.
        // `Mex-Content-Compressed` is deliberately not set: receivers read it as "the decoded payload is itself
        // compressed", which it is not.
        r = r.header("Content-Encoding", "gzip");
    }
    r.body = body;
    Ok(r)
}

/// Chunk `number` (2..=total) of a send: `POST /messageexchange/{mailbox}/outbox/{id}/{number}`.
/// The `Content-Encoding` must match the first chunk's.
pub fn send_chunk(
    mailbox: &str,
    message_id: &str,
    number: u32,
    total: u32,
    body: Vec<u8>,
    gzipped: bool,
) -> Request {
    let mut r = Request::new(
        Method::Post,
        format!(
            "{}/outbox/{}/{number}",
            mailbox_path(mailbox),
            seg(message_id)
        ),
    )
    .header("Content-Type", "application/octet-stream")
    .header("Mex-Chunk-Range", ChunkRange { number, total }.header());
    if gzipped {
        r = r.header("Content-Encoding", "gzip");
    }
    r.body = body;
    r
}

/// First inbox page: `GET /messageexchange/{mailbox}/inbox[?max_results=n]` (MESH allows 10..=5000; values
/// outside are clamped).
pub fn inbox(mailbox: &str, max_results: Option<u32>) -> Request {
    let mut path = format!("{}/inbox", mailbox_path(mailbox));
    if let Some(n) = max_results {
        path.push_str(&format!("?max_results={}", n.clamp(10, 5000)));
    }
    Request::new(Method::Get, path)
}

/// The next inbox page from `links.next`. The link must be a path of this mailbox's inbox on the same server:
/// an absolute URL (another host would receive our credentials) or any other path is refused.
pub fn inbox_next(mailbox: &str, next: &str) -> Result<Request> {
    let prefix = format!("{}/inbox", mailbox_path(mailbox));
    let ok = next.starts_with(&prefix)
        && matches!(next.as_bytes().get(prefix.len()), None | Some(b'?'))
        && next.chars().all(|c| c.is_ascii_graphic());
    if !ok {
        return Err(Error::Malformed(format!(
            "links.next '{next}' is not a page of {prefix}"
        )));
    }
    Ok(Request::new(Method::Get, next.to_string()))
}

/// Download chunk `number` of a message: chunk 1 is `GET .../inbox/{id}`, later ones `GET .../inbox/{id}/{n}`.
/// Sends `Accept-Encoding: identity`; a gzip body is still decoded if a server sends one anyway.
pub fn download(mailbox: &str, message_id: &str, number: u32) -> Request {
    let base = format!("{}/inbox/{}", mailbox_path(mailbox), seg(message_id));
    let path = if number <= 1 {
        base
    } else {
        format!("{base}/{number}")
    };
    Request::new(Method::Get, path).header("Accept-Encoding", "identity")
}

/// `PUT /messageexchange/{mailbox}/inbox/{id}/status/acknowledged`.
pub fn acknowledge(mailbox: &str, message_id: &str) -> Request {
    Request::new(
        Method::Put,
        format!(
            "{}/inbox/{}/status/acknowledged",
            mailbox_path(mailbox),
            seg(message_id)
        ),
    )
}

/// `GET /messageexchange/{mailbox}/outbox/tracking?messageID={id}`.
pub fn track(mailbox: &str, message_id: &str) -> Request {
    Request::new(
        Method::Get,
        format!(
            "{}/outbox/tracking?messageID={}",
            mailbox_path(mailbox),
            seg(message_id)
        ),
    )
}

/// `GET /messageexchange/{mailbox}/outbox/tracking/{local_id}`: the API's (deprecated) tracking by LocalID;
/// the spec has no `?localID=` query. 404 when absent, 300 when the LocalID is not unique.
pub fn track_local_id(mailbox: &str, local_id: &str) -> Request {
    Request::new(
        Method::Get,
        format!(
            "{}/outbox/tracking/{}",
            mailbox_path(mailbox),
            seg(local_id)
        ),
    )
}

/// `GET /messageexchange/endpointlookup/{ods}/{workflow}`: the mailboxes an organisation receives a workflow on.
pub fn lookup(ods_code: &str, workflow_id: &str) -> Request {
    Request::new(
        Method::Get,
        format!(
            "/messageexchange/endpointlookup/{}/{}",
            seg(ods_code),
            seg(workflow_id)
        ),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn client() -> ClientInfo {
        ClientInfo {
            client_version: "carebridge==0.1.0".into(),
            os_name: "Linux".into(),
            os_version: "6.1.0\n#1 SMP".into(),
            os_architecture: "x86_64".into(),
        }
    }

    #[test]
    fn handshake_headers() {
        let r = handshake("X26ABC1", &client());
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/messageexchange/X26ABC1");
        assert_eq!(r.header_value("accept"), Some(MESH_V2));
        assert_eq!(r.header_value("mex-osversion"), Some("6.1.0_#1 SMP"));
        for h in [
            "mex-ClientVersion",
            "mex-OSName",
            "mex-OSArchitecture",
            "mex-JavaVersion",
        ] {
            assert!(r.header_value(h).is_some(), "{h}");
        }
        assert!(r.body.is_empty());
        assert!(r.header_value("authorization").is_none());
    }

    fn meta() -> SendMeta<'static> {
        SendMeta {
            to: "x26abc2",
            workflow_id: "TEST_WORKFLOW",
            subject: Some("adt"),
            local_id: "local-1",
            file_name: Some("adt.hl7"),
            content_type: Some("text/plain"),
            checksum: Some("sha256:00"),
        }
    }

    #[test]
    fn send_first_chunk() {
        let r = send_first("X26ABC1", &meta(), b"payload".to_vec(), false, 1).unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/messageexchange/X26ABC1/outbox");
        assert!(r.is_first_send());
        assert_eq!(r.header_value("mex-to"), Some("X26ABC2"));
        assert_eq!(r.header_value("mex-workflowid"), Some("TEST_WORKFLOW"));
        assert_eq!(r.header_value("mex-subject"), Some("adt"));
        assert_eq!(r.header_value("mex-localid"), Some("local-1"));
        assert_eq!(r.header_value("mex-filename"), Some("adt.hl7"));
        assert_eq!(r.header_value("mex-content-type"), Some("text/plain"));
        assert_eq!(r.header_value("mex-content-checksum"), Some("sha256:00"));
        assert_eq!(r.header_value("mex-chunk-range"), Some("1:1"));
        assert_eq!(
            r.header_value("content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(r.header_value("content-encoding"), None);
        assert_eq!(r.header_value("mex-content-compressed"), None);
        assert_eq!(r.body, b"payload");

        let g = send_first("X26ABC1", &meta(), vec![1, 2], true, 3).unwrap();
        assert_eq!(g.header_value("mex-chunk-range"), Some("1:3"));
        assert_eq!(g.header_value("content-encoding"), Some("gzip"));
    }

    #[test]
    fn send_first_refusals() {
        let empty_to = SendMeta { to: " ", ..meta() };
        let no_wf = SendMeta {
            workflow_id: "",
            ..meta()
        };
        let no_local = SendMeta {
            local_id: "",
            ..meta()
        };
        let injected = SendMeta {
            subject: Some("a\r\nMex-To: EVIL"),
            ..meta()
        };
        let unicode = SendMeta {
            file_name: Some("résumé.txt"),
            ..meta()
        };
        let long_subject = "s".repeat(501);
        let long = SendMeta {
            subject: Some(&long_subject),
            ..meta()
        };
        for m in [empty_to, no_wf, no_local, injected, unicode, long] {
            assert!(matches!(
                send_first("X26ABC1", &m, b"x".to_vec(), false, 1),
                Err(Error::Invalid(_))
            ));
        }
        assert!(matches!(
            send_first("X26ABC1", &meta(), Vec::new(), false, 1),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn later_chunks() {
        let r = send_chunk("X26ABC1", "ABC123", 2, 3, b"zz".to_vec(), true);
        assert_eq!(r.path, "/messageexchange/X26ABC1/outbox/ABC123/2");
        assert_eq!(r.header_value("mex-chunk-range"), Some("2:3"));
        assert_eq!(r.header_value("content-encoding"), Some("gzip"));
        assert!(r.header_value("mex-to").is_none());
        assert!(!r.is_first_send());
    }

    #[test]
    fn inbox_and_paging() {
        assert_eq!(
            inbox("X26ABC2", None).path,
            "/messageexchange/X26ABC2/inbox"
        );
        assert_eq!(
            inbox("X26ABC2", Some(3)).path,
            "/messageexchange/X26ABC2/inbox?max_results=10"
        );
        let next = "/messageexchange/X26ABC2/inbox?max_results=10&continue_from=abc%3D";
        assert_eq!(inbox_next("X26ABC2", next).unwrap().path, next);
        for bad in [
            "https://evil.example/messageexchange/X26ABC2/inbox?continue_from=x",
            "//evil.example/messageexchange/X26ABC2/inbox",
            "/messageexchange/X26ABC3/inbox?continue_from=x",
            "/messageexchange/X26ABC2/inboxes",
            "/messageexchange/X26ABC2/outbox",
            "/messageexchange/X26ABC2/inbox?a=b c",
        ] {
            assert!(
                matches!(inbox_next("X26ABC2", bad), Err(Error::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn download_ack_track_lookup() {
        let d1 = download("X26ABC2", "MSG1", 1);
        assert_eq!(d1.path, "/messageexchange/X26ABC2/inbox/MSG1");
        assert_eq!(d1.header_value("accept-encoding"), Some("identity"));
        assert_eq!(
            download("X26ABC2", "MSG1", 3).path,
            "/messageexchange/X26ABC2/inbox/MSG1/3"
        );
        let a = acknowledge("X26ABC2", "MSG1");
        assert_eq!(a.method, Method::Put);
        assert_eq!(
            a.path,
            "/messageexchange/X26ABC2/inbox/MSG1/status/acknowledged"
        );
        assert_eq!(
            track("X26ABC1", "MSG 1/x").path,
            "/messageexchange/X26ABC1/outbox/tracking?messageID=MSG%201%2Fx"
        );
        assert_eq!(
            track_local_id("X26ABC1", "local/1?").path,
            "/messageexchange/X26ABC1/outbox/tracking/local%2F1%3F"
        );
        assert_eq!(
            lookup("X26", "TEST_WORKFLOW").path,
            "/messageexchange/endpointlookup/X26/TEST_WORKFLOW"
        );
    }
}
