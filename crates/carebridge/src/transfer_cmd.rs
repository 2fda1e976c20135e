//! `carebridge export` and `carebridge import`: FHIR bulk-data NDJSON (one file per resource type, one
//! resource per line) out of and into either store, e.g. to move from the embedded store to PostgreSQL.
//!
//! - `export --all-versions` writes every version, oldest first, including deletions (a line with the
//!   resource's type, id and `meta` tagged `urn:carebridge:export|deleted`); `import` replays them in order with
//!   their original `meta.lastUpdated`, so ids, version numbers and history are kept on an empty target.
//! - Without `--all-versions`, the latest live version of each resource is written; an import then starts each
//!   resource's history at version 1.
//! - Import writes through the store directly (no booking rules, no outbox events: the data was valid where it
//!   came from, and replaying it must not notify subscribers again). It is idempotent: a version the target
//!   already has is skipped. Subscriptions are not exported (their signing secrets never leave the store).

use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::Value;
use store::{HistoryQuery, Put, ResourceType, SearchQuery, Sort, SortField, Store, StoreError};
use store_sqlite::SqliteOptions;

use crate::admin_cmd::StoreArgs;
use crate::anystore::AnyStore;

const DELETED_SYSTEM: &str = "urn:carebridge:export";
const PAGE: usize = 1_000;

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Directory to write `<Type>.ndjson` files into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Every version (with deletions), not just the latest live one.
    #[arg(long)]
    pub all_versions: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// NDJSON files, or directories holding `*.ndjson`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

fn types() -> impl Iterator<Item = ResourceType> {
    ResourceType::ALL
        .into_iter()
        .filter(|t| *t != ResourceType::Subscription)
}

struct Progress {
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn tick(&self, what: &str, n: u64, total: Option<u64>) {
        if !self.tty {
            return;
        }
        let bar = match total {
            Some(t) if t > 0 => {
                let done = ((n as f64 / t as f64) * 30.0).round() as usize;
                format!(
                    "[{}{}] {n}/{t}",
                    "#".repeat(done.min(30)),
                    ".".repeat(30 - done.min(30))
                )
            }
            _ => format!("{n}"),
        };
        eprint!("\r{what:<18} {bar}   ");
    }

    fn done(&self, what: &str, n: u64) {
        if self.tty {
            eprint!("\r{:<70}\r", "");
        }
        eprintln!("{what:<18} {n:>9}");
    }
}

fn open(args: &StoreArgs) -> Result<AnyStore> {
    AnyStore::open(
        &args.data_dir,
        args.database_url.as_deref(),
        SqliteOptions::default(),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn export(args: ExportArgs) -> Result<()> {
    let store = open(&args.store)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let progress = Progress::new();
    let rt = runtime()?;
    let mut total = 0u64;
    for rtype in types() {
        let path = args.out.join(format!("{rtype}.ndjson"));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let n = rt.block_on(async {
            if args.all_versions {
                export_history(&store, rtype, &mut out, &progress).await
            } else {
                export_latest(&store, rtype, &mut out, &progress).await
            }
        })?;
        out.flush()?;
        if n == 0 {
            let _ = std::fs::remove_file(&path);
        } else {
            progress.done(rtype.as_str(), n);
        }
        total += n;
    }
    eprintln!(
        "exported {total} {} to {} in {:.1} s",
        if args.all_versions {
            "versions"
        } else {
            "resources"
        },
        args.out.display(),
        progress.started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn export_latest(
    store: &AnyStore,
    rtype: ResourceType,
    out: &mut impl Write,
    p: &Progress,
) -> Result<u64> {
    let mut count = SearchQuery::new(rtype);
    count.count = 0;
    count.want_total = true;
    let total = store
        .search(&count)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .total;
    let mut n = 0u64;
    let mut offset = 0;
    loop {
        let mut q = SearchQuery::new(rtype);
        q.count = PAGE;
        q.offset = offset;
        q.sort = vec![Sort {
            field: SortField::Id,
            descending: false,
        }];
        let page = store
            .search(&q)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .resources;
        if page.is_empty() {
            return Ok(n);
        }
        offset += page.len();
        for s in page {
            out.write_all(s.json.as_bytes())?;
            out.write_all(b"\n")?;
            n += 1;
        }
        p.tick(rtype.as_str(), n, total);
    }
}

async fn export_history(
    store: &AnyStore,
    rtype: ResourceType,
    out: &mut impl Write,
    p: &Progress,
) -> Result<u64> {
    let mut all = Vec::new();
    let mut offset = 0;
    loop {
        let q = HistoryQuery {
            rtype,
            id: None,
            since_ms: None,
            count: PAGE,
            offset,
        };
        let page = store
            .history(&q)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .resources;
        if page.is_empty() {
            break;
        }
        offset += page.len();
        all.extend(page);
        p.tick(rtype.as_str(), all.len() as u64, None);
    }
    // Oldest first, so an import replays each resource's versions in order.
    all.sort_by(|a, b| {
        (a.last_updated_ms, &a.id, a.version).cmp(&(b.last_updated_ms, &b.id, b.version))
    });
    for s in &all {
        if s.deleted {
            let line = serde_json::json!({
                "resourceType": rtype.as_str(),
                "id": s.id,
                "meta": {
                    "versionId": s.version.to_string(),
                    "lastUpdated": s.last_updated(),
                    "tag": [{"system": DELETED_SYSTEM, "code": "deleted"}],
                },
            });
            out.write_all(line.to_string().as_bytes())?;
        } else {
            out.write_all(s.json.as_bytes())?;
        }
        out.write_all(b"\n")?;
    }
    Ok(all.len() as u64)
}

fn ndjson_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for i in inputs {
        if i.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(i)
                .with_context(|| format!("reading {}", i.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(i.clone());
        }
    }
    if files.is_empty() {
        bail!("no .ndjson files in {inputs:?}");
    }
    Ok(files)
}

/// One line to import.
struct Line {
    rtype: ResourceType,
    id: String,
    version: Option<u64>,
    last_updated_ms: Option<i64>,
    deleted: bool,
    resource: Value,
}

fn parse_line(path: &Path, n: usize, text: &str) -> Result<Line> {
    let at = || format!("{}:{n}", path.display());
    let resource: Value =
        serde_json::from_str(text).with_context(|| format!("{}: not JSON", at()))?;
    let rtype = resource["resourceType"]
        .as_str()
        .and_then(ResourceType::parse)
        .ok_or_else(|| anyhow!("{}: unknown or missing resourceType", at()))?;
    let id = resource["id"]
        .as_str()
        .ok_or_else(|| anyhow!("{}: no id", at()))?
        .to_owned();
    let meta = &resource["meta"];
    let deleted = meta["tag"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["system"] == DELETED_SYSTEM && t["code"] == "deleted")
    });
    Ok(Line {
        rtype,
        id,
        version: meta["versionId"].as_str().and_then(|v| v.parse().ok()),
        last_updated_ms: meta["lastUpdated"]
            .as_str()
            .and_then(fhir::parse_instant_ms),
        deleted,
        resource,
    })
}

pub fn import(args: ImportArgs) -> Result<()> {
    let files = ndjson_files(&args.inputs)?;
    let store = std::sync::Arc::new(open(&args.store)?);
    let progress = Progress::new();
    let rt = runtime()?;
    let (mut written, mut skipped) = (0u64, 0u64);
    for path in files {
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut batch = Vec::new();
        let mut n = 0u64;
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            batch.push(parse_line(&path, i + 1, &line)?);
            if batch.len() >= 500 {
                let (w, s) = rt.block_on(apply(&store, std::mem::take(&mut batch)))?;
                written += w;
                skipped += s;
                n += w + s;
                progress.tick(&name, n, None);
            }
        }
        if !batch.is_empty() {
            let (w, s) = rt.block_on(apply(&store, batch))?;
            written += w;
            skipped += s;
            n += w + s;
        }
        progress.done(&name, n);
    }
    eprintln!(
        "imported {written} versions ({skipped} already present, skipped) in {:.1} s",
        progress.started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Write a batch in one transaction; returns (written, skipped).
async fn apply(store: &std::sync::Arc<AnyStore>, lines: Vec<Line>) -> Result<(u64, u64)> {
    store
        .write(move |tx| {
            let (mut written, mut skipped) = (0u64, 0u64);
            for l in lines {
                let current = tx.read(l.rtype, &l.id)?;
                let have = current.as_ref().map_or(0, |c| c.version);
                if l.version.is_some_and(|v| v <= have) {
                    skipped += 1;
                    continue;
                }
                if l.deleted {
                    if current.as_ref().is_some_and(|c| !c.deleted) {
                        tx.delete(l.rtype, &l.id, None)?;
                        written += 1;
                    } else {
                        skipped += 1;
                    }
                    continue;
                }
                let mut resource = l.resource;
                if let Some(o) = resource.as_object_mut() {
                    o.remove("meta");
                }
                let index = fhir::index_entries(l.rtype, &resource);
                let put = Put {
                    rtype: l.rtype,
                    id: l.id,
                    resource,
                    index,
                    expected_version: None,
                    body: None,
                };
                match l.last_updated_ms {
                    Some(ms) => tx.put_at(put, ms)?,
                    None => tx.put(put)?,
                };
                written += 1;
            }
            Ok::<_, StoreError>((written, skipped))
        })
        .await
        .map_err(|e| anyhow!("{e}"))
}
