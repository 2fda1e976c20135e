//! `carebridge hl7 convert|send`: operator tools for HL7 v2.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum Hl7Command {
    /// Print the FHIR resources a message maps to (a collection Bundle), without a store.
    Convert {
        /// A file holding one HL7 v2 message (or several, each starting with an MSH segment).
        file: PathBuf,
    },
    /// Send messages over MLLP and print each ACK (exit 1 when any ACK is not AA/CA).
    Send {
        /// Files holding HL7 v2 messages.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// host:port of the MLLP listener.
        #[arg(long)]
        to: String,
        /// Seconds to wait for each ACK.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// Split a file into messages: each starts at a line beginning with `MSH`.
fn messages(bytes: &[u8]) -> Vec<Vec<u8>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let at_line_start = i == 0 || matches!(bytes[i - 1], b'\r' | b'\n');
        if at_line_start && bytes[i..].starts_with(b"MSH") && i > start {
            out.push(bytes[start..i].to_vec());
            start = i;
        }
        i += 1;
    }
    if start < bytes.len() {
        out.push(bytes[start..].to_vec());
    }
    out.retain(|m| m.iter().any(|b| !b.is_ascii_whitespace()));
    out
}

pub fn run(cmd: Hl7Command) -> i32 {
    match cmd {
        Hl7Command::Convert { file } => match convert(&file) {
            Ok(ok) => i32::from(!ok),
            Err(e) => {
                eprintln!("carebridge: {e:#}");
                2
            }
        },
        Hl7Command::Send { files, to, timeout } => match send(&files, &to, timeout) {
            Ok(ok) => i32::from(!ok),
            Err(e) => {
                eprintln!("carebridge: {e:#}");
                2
            }
        },
    }
}

fn convert(file: &PathBuf) -> Result<bool> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut entries = Vec::new();
    let mut ok = true;
    for raw in messages(&bytes) {
        let msg = match hl7::Message::parse(&raw) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{}: not an HL7 v2 message: {}", file.display(), e.message);
                ok = false;
                continue;
            }
        };
        match hl7_adapter::map::intent(&msg) {
            Ok(mapped) => {
                for r in hl7_adapter::resources::preview(&mapped) {
                    let url = format!(
                        "{}/{}",
                        r["resourceType"].as_str().unwrap_or_default(),
                        r["id"].as_str().unwrap_or_default()
                    );
                    entries.push(json!({"fullUrl": url, "resource": r}));
                }
            }
            Err(r) => {
                let at = match (&r.segment, r.field) {
                    (Some((s, _)), Some(f)) if f > 0 => format!(" at {s}-{f}"),
                    (Some((s, _)), _) => format!(" at {s}"),
                    _ => String::new(),
                };
                eprintln!(
                    "{}: {} ({} {}){at}: {}",
                    file.display(),
                    if r.reject { "AR" } else { "AE" },
                    r.code.code(),
                    r.code.text(),
                    r.message
                );
                ok = false;
            }
        }
    }
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    println!("{}", serde_json::to_string_pretty(&bundle)?);
    Ok(ok)
}

fn send(files: &[PathBuf], to: &str, timeout: u64) -> Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = crate::mllp::Client::connect(to, Duration::from_secs(timeout)).await?;
        let mut all_ok = true;
        for f in files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            for raw in messages(&bytes) {
                let ack = client.send(&raw).await?;
                let text = String::from_utf8_lossy(&ack).into_owned();
                let code = hl7::Message::parse(&ack)
                    .ok()
                    .and_then(|m| m.get("MSA-1"))
                    .unwrap_or_default();
                if code != "AA" && code != "CA" {
                    all_ok = false;
                }
                println!("{}: {}", f.display(), text.replace('\r', "\n").trim_end());
            }
        }
        Ok(all_ok)
    })
}
