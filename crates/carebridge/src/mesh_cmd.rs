//! `carebridge mesh handshake|send|inbox|download|ack|track|lookup`: operator commands on a configured MESH
//! mailbox (`[[mesh.mailboxes]]` in the `--config` TOML file). Plain text by default, `--json` for scripts;
//! any failure prints one line naming the mailbox and exits 1.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use clap::{Args, Subcommand};
use mesh::{InboundMessage, MeshClient, SendOptions};
use serde_json::json;
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MeshArgs {
    /// TOML configuration file with `[[mesh.mailboxes]]` entries (the same file `serve` reads).
    #[arg(long, env = "CAREBRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Mailbox id to act as [default: the first configured mailbox].
    #[arg(long, global = true)]
    mailbox: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Subcommand, Debug)]
pub enum MeshCommand {
    /// Check that MESH accepts the mailbox's credentials.
    Handshake,
    /// Send a file (or `-` for standard input); prints the MESH message id.
    Send {
        /// Recipient mailbox id.
        #[arg(long)]
        to: String,
        /// MESH workflow id.
        #[arg(long)]
        workflow_id: String,
        #[arg(long)]
        subject: Option<String>,
        /// Your unique reference for the message [default: generated].
        #[arg(long)]
        local_id: Option<String>,
        /// File name announced to the recipient [default: the file's name].
        #[arg(long)]
        file_name: Option<String>,
        /// Media type of the payload (Mex-Content-Type).
        #[arg(long)]
        content_type: Option<String>,
        /// gzip every chunk (default: only when the message is chunked).
        #[arg(long, conflicts_with = "no_compress")]
        compress: bool,
        /// Never gzip.
        #[arg(long)]
        no_compress: bool,
        /// The payload file, or `-` for standard input.
        file: PathBuf,
    },
    /// List the message ids in the inbox (every page).
    Inbox {
        /// Stop after this many ids.
        #[arg(long)]
        max: Option<usize>,
    },
    /// Download a message (all chunks, decoded); the body goes to --out or standard output.
    Download {
        id: String,
        /// Write the body to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Acknowledge the message once it is safely written.
        #[arg(long)]
        ack: bool,
    },
    /// Acknowledge a downloaded message (removes it from the inbox).
    Ack { id: String },
    /// Tracking of a sent message, by message id or by --local-id.
    Track {
        #[arg(required_unless_present = "local_id", conflicts_with = "local_id")]
        id: Option<String>,
        #[arg(long)]
        local_id: Option<String>,
    },
    /// Mailboxes that receive a workflow for an organisation (ODS code).
    Lookup {
        ods_code: String,
        workflow_id: String,
    },
}

/// Run a `mesh` subcommand; returns the process exit code.
pub fn run(args: MeshArgs) -> i32 {
    let mut mailbox_id = args.mailbox.clone();
    let result = (|| -> Result<()> {
        let client = client_for(&args, &mut mailbox_id)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        runtime.block_on(execute(&client, &args))
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            let who = mailbox_id
                .map(|m| format!("mailbox {}: ", m.to_ascii_uppercase()))
                .unwrap_or_default();
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("carebridge mesh: {who}{text}");
            1
        }
    }
}

/// The client of the chosen mailbox; `mailbox_id` learns which one it is as soon as that is known, so even a
/// configuration error names it.
fn client_for(args: &MeshArgs, mailbox_id: &mut Option<String>) -> Result<MeshClient> {
    let Some(path) = &args.config else {
        bail!(
            "no configuration: pass --config FILE (or set CAREBRIDGE_CONFIG) with [[mesh.mailboxes]]"
        );
    };
    let mailboxes = crate::config::mesh_mailboxes(path)?;
    let chosen = match &args.mailbox {
        Some(id) => mailboxes
            .iter()
            .find(|m| m.mailbox.eq_ignore_ascii_case(id))
            .ok_or_else(|| anyhow!("mailbox {id} is not configured in {}", path.display()))?,
        None => mailboxes
            .first()
            .ok_or_else(|| anyhow!("{} has no [[mesh.mailboxes]] entry", path.display()))?,
    };
    *mailbox_id = Some(chosen.mailbox.clone());
    MeshClient::new(chosen).map_err(|e| anyhow!("{e}"))
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn execute(client: &MeshClient, args: &MeshArgs) -> Result<()> {
    let mb = client.mailbox().to_string();
    let mesh_err = |e: mesh::Error| anyhow!("{e}");
    match &args.command {
        MeshCommand::Handshake => {
            client.handshake().await.map_err(mesh_err)?;
            let url = &client.settings().base_url;
            if args.json {
                print_json(&json!({"mailbox": mb, "url": url, "handshake": "ok"}));
            } else {
                println!("{mb}: handshake OK ({url})");
            }
        }
        MeshCommand::Send {
            to,
            workflow_id,
            subject,
            local_id,
            file_name,
            content_type,
            compress,
            no_compress,
            file,
        } => {
            let stdin = file.as_os_str() == "-";
            let payload = if stdin {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("reading standard input")?;
                buf
            } else {
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?
            };
            let file_name = file_name.clone().or_else(|| {
                (!stdin)
                    .then(|| file.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .flatten()
            });
            let opts = SendOptions {
                workflow_id: workflow_id.clone(),
                subject: subject.clone(),
                local_id: local_id.clone(),
                file_name,
                content_type: content_type.clone(),
                compress: match (compress, no_compress) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            let sent = client
                .send_detailed(to, &payload, opts)
                .await
                .map_err(mesh_err)?;
            if args.json {
                print_json(&json!({
                    "mailbox": mb,
                    "to": to.to_ascii_uppercase(),
                    "message_id": sent.message_id,
                    "local_id": sent.local_id,
                    "chunks": sent.chunks,
                    "compressed": sent.compressed,
                    "reconciled": sent.reconciled,
                    "bytes": payload.len(),
                }));
            } else {
                println!("{}", sent.message_id);
            }
        }
        MeshCommand::Inbox { max } => {
            let ids = client.inbox(*max).await.map_err(mesh_err)?;
            if args.json {
                print_json(&json!({"mailbox": mb, "count": ids.len(), "messages": ids}));
            } else {
                for id in ids {
                    println!("{id}");
                }
            }
        }
        MeshCommand::Download { id, out, ack } => {
            let msg = client.download(id).await.map_err(mesh_err)?;
            if let Some(path) = out {
                std::fs::write(path, &msg.body)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if *ack {
                client.ack(id).await.map_err(mesh_err)?;
            }
            if args.json {
                let mut v = describe(&msg);
                v["acknowledged"] = json!(*ack);
                match out {
                    Some(p) => v["out"] = json!(p.display().to_string()),
                    None => {
                        v["body_base64"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(&msg.body))
                    }
                }
                print_json(&v);
            } else if let Some(path) = out {
                println!(
                    "{id}: {} bytes ({}) from {} workflow {} -> {}{}",
                    msg.body.len(),
                    msg.message_type.as_str(),
                    msg.from.as_deref().unwrap_or("?"),
                    msg.workflow_id.as_deref().unwrap_or("?"),
                    path.display(),
                    if *ack { ", acknowledged" } else { "" }
                );
            } else {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(&msg.body)
                    .and_then(|()| stdout.flush())
                    .context("writing standard output")?;
            }
        }
        MeshCommand::Ack { id } => {
            client.ack(id).await.map_err(mesh_err)?;
            if args.json {
                print_json(&json!({"mailbox": mb, "message_id": id, "acknowledged": true}));
            } else {
                println!("{id}: acknowledged");
            }
        }
        MeshCommand::Track { id, local_id } => {
            let t = match (id, local_id) {
                (_, Some(l)) => client
                    .track_local_id(l)
                    .await
                    .map_err(mesh_err)?
                    .ok_or_else(|| anyhow!("HTTP 404: no message sent with LocalID '{l}'"))?,
                (Some(id), None) => client.track(id).await.map_err(mesh_err)?,
                (None, None) => bail!("give a message id or --local-id"),
            };
            if args.json {
                print_json(&t.raw);
            } else {
                println!(
                    "{} status={} local_id={} recipient={} workflow={}",
                    t.message_id,
                    t.status.as_deref().unwrap_or("?"),
                    t.local_id.as_deref().unwrap_or("-"),
                    t.recipient.as_deref().unwrap_or("?"),
                    t.workflow_id.as_deref().unwrap_or("?"),
                );
            }
        }
        MeshCommand::Lookup {
            ods_code,
            workflow_id,
        } => {
            let results = client
                .lookup(ods_code, workflow_id)
                .await
                .map_err(mesh_err)?;
            if args.json {
                let items: Vec<_> = results
                    .iter()
                    .map(|r| json!({"mailbox_id": r.mailbox_id, "mailbox_name": r.mailbox_name}))
                    .collect();
                print_json(&json!({"results": items}));
            } else {
                for r in results {
                    println!(
                        "{}\t{}",
                        r.mailbox_id,
                        r.mailbox_name.as_deref().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

fn describe(msg: &InboundMessage) -> serde_json::Value {
    json!({
        "message_id": msg.id,
        "message_type": msg.message_type.as_str(),
        "from": msg.from,
        "to": msg.to,
        "workflow_id": msg.workflow_id,
        "local_id": msg.local_id,
        "subject": msg.subject,
        "file_name": msg.file_name,
        "bytes": msg.body.len(),
        "headers": msg.headers,
    })
}
