//! Benchmark scenarios against a FHIR R4 server: `create`, `read` and `search-identifier` on Patient.
//!
//! Why it exists: the same three runs must be made against Carebridge (`/fhir`) and peer servers (Helios serves
//! at `/`), so everything is relative to a [`Target`] base path.
//!
//! Model: closed loop. `C` connections, each with exactly one request in flight; a run stops at a deadline or
//! after a total request count. Read and search runs work over patients created beforehand by [`Runner::seed`], whose
//! server-assigned ids come from the `Location` header (or the body's `id`).

use crate::http::{Client, Response};
use crate::patient::{NHS_NUMBER_SYSTEM, NhsNumbers, patient_json};
use crate::stats::{Recorder, Summary};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the FHIR endpoint is: `addr` is `host:port`, `base` the path prefix without trailing slash (`""` for
/// a server at the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: String,
    pub base: String,
}

impl Target {
    /// Parse `http://host[:port][/base]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("only http:// URLs are supported, got {url:?}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        let addr = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            addr,
            base: path.trim_end_matches('/').to_string(),
        })
    }
}

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// POST {base}/Patient with a fresh UK Core Patient.
    Create,
    /// GET {base}/Patient/{id} over the seeded ids.
    Read,
    /// `GET {base}/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{n}` over the seeded NHS numbers.
    SearchIdentifier,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        match s {
            "create" => Some(Scenario::Create),
            "read" => Some(Scenario::Read),
            "search-identifier" => Some(Scenario::SearchIdentifier),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create",
            Scenario::Read => "read",
            Scenario::SearchIdentifier => "search-identifier",
        }
    }

    /// Whether the scenario needs seeded patients.
    pub fn needs_seed(self) -> bool {
        self != Scenario::Create
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

/// Patients known to exist on the server: parallel lists of ids and NHS numbers.
#[derive(Debug, Default, Clone)]
pub struct Seeded {
    pub ids: Vec<String>,
    pub nhs_numbers: Vec<String>,
}

impl Seeded {
    /// Write as `id<TAB>nhs` lines.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (id, nhs) in self.ids.iter().zip(&self.nhs_numbers) {
            writeln!(f, "{id}\t{nhs}")?;
        }
        f.flush()
    }

    /// Read a file written by [`Seeded::save`].
    pub fn load(path: &Path) -> Result<Seeded, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut s = Seeded::default();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let (id, nhs) = line
                .split_once('\t')
                .ok_or_else(|| format!("{}:{}: expected id<TAB>nhs", path.display(), n + 1))?;
            s.ids.push(id.to_string());
            s.nhs_numbers.push(nhs.to_string());
        }
        Ok(s)
    }
}

/// Everything the workers of one run share.
struct Shared {
    target: Target,
    scenario: Scenario,
    stop: Stop,
    deadline: Instant,
    timeout: Duration,
    issued: AtomicU64,
    cursor: AtomicU64,
    nhs: Arc<NhsNumbers>,
    seeded: Arc<Seeded>,
    /// Keep (id, nhs) of successful creates.
    collect: bool,
}

impl Shared {
    /// Claim the right to send one more request.
    fn claim(&self) -> bool {
        match self.stop {
            Stop::After(_) => Instant::now() < self.deadline,
            Stop::Requests(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
        }
    }
}

/// The server-assigned id of a created resource: from `Location` (`.../Patient/{id}[/_history/{v}]`), else the
/// body's `id`.
pub fn created_id(resp: &Response) -> Option<String> {
    if let Some(loc) = resp.header("location") {
        let path = loc.split(['?', '#']).next().unwrap_or("");
        let segs: Vec<&str> = path.split('/').collect();
        if let Some(i) = segs.iter().rposition(|s| *s == "Patient")
            && let Some(id) = segs.get(i + 1).filter(|s| !s.is_empty())
        {
            return Some(id.to_string());
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.body).ok()?;
    v.get("id").and_then(|i| i.as_str()).map(str::to_string)
}

const CREATE_HEADERS: [(&str, &str); 2] = [
    ("Content-Type", "application/fhir+json"),
    ("Accept", "application/fhir+json"),
];
const GET_HEADERS: [(&str, &str); 1] = [("Accept", "application/fhir+json")];

async fn worker(shared: Arc<Shared>) -> (Recorder, Seeded) {
    let mut rec = Recorder::default();
    let mut created = Seeded::default();
    let mut client = match Client::connect(&shared.target.addr).await {
        Ok(mut c) => {
            c.set_timeout(shared.timeout);
            c
        }
        Err(e) => {
            rec.error(|| format!("connecting to {}: {e}", shared.target.addr));
            return (rec, created);
        }
    };
    let base = &shared.target.base;
    let mut path = String::with_capacity(256);
    while shared.claim() {
        let i = shared.cursor.fetch_add(1, Ordering::Relaxed);
        path.clear();
        let mut nhs = String::new();
        let mut body = String::new();
        let (method, headers): (&str, &[(&str, &str)]) = match shared.scenario {
            Scenario::Create => {
                nhs = shared.nhs.next_number();
                body = patient_json(i, &nhs);
                path.push_str(&format!("{base}/Patient"));
                ("POST", &CREATE_HEADERS)
            }
            Scenario::Read => {
                let ids = &shared.seeded.ids;
                path.push_str(&format!(
                    "{base}/Patient/{}",
                    ids[(i % ids.len() as u64) as usize]
                ));
                ("GET", &GET_HEADERS)
            }
            Scenario::SearchIdentifier => {
                let nums = &shared.seeded.nhs_numbers;
                let n = &nums[(i % nums.len() as u64) as usize];
                path.push_str(&format!(
                    "{base}/Patient?identifier={NHS_NUMBER_SYSTEM}%7C{n}"
                ));
                ("GET", &GET_HEADERS)
            }
        };
        let t0 = Instant::now();
        match client
            .request(method, &path, headers, body.as_bytes())
            .await
        {
            Ok(resp) => {
                rec.response(t0.elapsed(), resp.status, &resp.body);
                if shared.collect && resp.is_success() {
                    match created_id(&resp) {
                        Some(id) => {
                            created.ids.push(id);
                            created.nhs_numbers.push(nhs);
                        }
                        None => rec.error(|| {
                            "a create response carried neither a Location nor a body id".into()
                        }),
                    }
                }
            }
            Err(e) => {
                rec.error(|| format!("{method} {path}: {e}"));
                // Do not spin on a server that is down or refusing.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (rec, created)
}

/// Runs scenarios against one target, with one source of NHS numbers across runs (so creates never repeat one).
#[derive(Debug, Clone)]
pub struct Runner {
    pub target: Target,
    pub nhs: Arc<NhsNumbers>,
    /// Per-request time limit.
    pub timeout: Duration,
}

impl Runner {
    pub fn new(target: Target, nhs_start: u64) -> Runner {
        Runner {
            target,
            nhs: Arc::new(NhsNumbers::starting_at(nhs_start)),
            timeout: Duration::from_secs(30),
        }
    }

    /// Run `scenario` at `concurrency` connections until `stop`. Read and search runs need a non-empty `seeded`.
    pub async fn run(
        &self,
        scenario: Scenario,
        concurrency: usize,
        stop: Stop,
        seeded: Arc<Seeded>,
    ) -> Result<Summary, String> {
        let (rec, _, elapsed) = self
            .drive(scenario, concurrency, stop, seeded, false)
            .await?;
        Ok(Summary::new(scenario.name(), concurrency, rec, elapsed))
    }

    /// Create `n` patients at `concurrency` and return the ones the server accepted, with the seeding run's
    /// summary (named `seed`).
    pub async fn seed(&self, n: u64, concurrency: usize) -> Result<(Seeded, Summary), String> {
        let (rec, created, elapsed) = self
            .drive(
                Scenario::Create,
                concurrency,
                Stop::Requests(n),
                Arc::new(Seeded::default()),
                true,
            )
            .await?;
        Ok((created, Summary::new("seed", concurrency, rec, elapsed)))
    }

    async fn drive(
        &self,
        scenario: Scenario,
        concurrency: usize,
        stop: Stop,
        seeded: Arc<Seeded>,
        collect: bool,
    ) -> Result<(Recorder, Seeded, Duration), String> {
        if scenario.needs_seed() && seeded.ids.is_empty() {
            return Err(format!(
                "scenario {} needs seeded patients (use --seed N or --seed-file)",
                scenario.name()
            ));
        }
        let start = Instant::now();
        let deadline = match stop {
            Stop::After(d) => start + d,
            Stop::Requests(_) => start,
        };
        let shared = Arc::new(Shared {
            target: self.target.clone(),
            scenario,
            stop,
            deadline,
            timeout: self.timeout,
            issued: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            nhs: self.nhs.clone(),
            seeded,
            collect,
        });
        let handles: Vec<_> = (0..concurrency.max(1))
            .map(|_| tokio::spawn(worker(shared.clone())))
            .collect();
        let mut rec = Recorder::default();
        let mut created = Seeded::default();
        for h in handles {
            match h.await {
                Ok((r, c)) => {
                    rec.merge(r);
                    created.ids.extend(c.ids);
                    created.nhs_numbers.extend(c.nhs_numbers);
                }
                Err(e) => rec.error(|| format!("worker task failed: {e}")),
            }
        }
        Ok((rec, created, start.elapsed()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            Target::parse("http://127.0.0.1:8080/fhir/").unwrap(),
            Target {
                addr: "127.0.0.1:8080".into(),
                base: "/fhir".into()
            }
        );
        assert_eq!(
            Target::parse("http://localhost:9").unwrap(),
            Target {
                addr: "localhost:9".into(),
                base: "".into()
            }
        );
        assert_eq!(Target::parse("http://example/").unwrap().addr, "example:80");
        assert!(Target::parse("https://x").is_err());
    }

    #[test]
    fn id_from_location_or_body() {
        let r = |loc: Option<&str>, body: &str| Response {
            status: 201,
            headers: loc
                .map(|l| vec![("location".to_string(), l.to_string())])
                .unwrap_or_default(),
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(
            created_id(&r(Some("http://h/fhir/Patient/abc/_history/1"), "")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            created_id(&r(Some("Patient/x-1"), "")).as_deref(),
            Some("x-1")
        );
        assert_eq!(
            created_id(&r(None, r#"{"resourceType":"Patient","id":"q"}"#)).as_deref(),
            Some("q")
        );
        assert_eq!(created_id(&r(None, "not json")), None);
    }
}
