//! MESH API v2 client of Carebridge.
//!
//! Why it exists: trusts and GP systems exchange files and HL7 messages through NHS England's MESH mailboxes.
//! The hub sends appointment and patient events to a partner's mailbox and collects what partners send to its
//! own. This crate speaks the MESH REST API: the `NHSMESH` HMAC token, handshake, send (chunked above a
//! configurable size, each chunk gzipped on its own), inbox paging through `links.next`, chunked download,
//! acknowledgement, tracking and endpoint lookup.
//!
//! Layout: a pure core ([`auth`], [`chunk`], [`request`], [`response`], [`config`], [`environment`]) that
//! builds requests and judges responses without IO, clock or randomness of its own, and a thin async shell
//! ([`MeshClient`]) over HTTP/1.1 (hyper's connection API with rustls and optional mutual TLS; reqwest when a
//! proxy is set in the environment).
//!
//! Invariants:
//! - every request carries a fresh token (new nonce, increasing count, current minute): MESH refuses reuse;
//! - the first chunk of a send is never repeated blindly: an uncertain outcome is settled by tracking the
//!   send's LocalID, and the message is sent again only when MESH has no message with it;
//! - a server answer that does not add up (missing message id, wrong chunk range, bad JSON or gzip) is an error,
//!   never a guess; `mex-content-compressed` is not trusted, only `Content-Encoding` decides decoding;
//! - credentials go only to the configured base URL (`links.next` must stay on this mailbox's inbox path) and
//!   never into `Debug` output;
//! - never panics on server bytes.

pub mod auth;
pub mod chunk;
mod client;
pub mod config;
pub mod environment;
pub mod error;
pub mod request;
pub mod response;
mod transport;

pub use client::{MeshClient, RetryPolicy, SendOptions, Sent};
pub use config::{Mailbox, MailboxConfig};
pub use environment::Environment;
pub use error::{Error, MeshErrorBody, Result};
pub use response::{InboundMessage, LookupResult, MessageType, Tracking};
