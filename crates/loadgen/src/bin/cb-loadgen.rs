//! `cb-loadgen`: closed-loop HTTP/1.1 load against a FHIR R4 server's Patient endpoint, and (Carebridge only)
//! its booking engine.
//!
//! Prints one human line per run and, with `--json`, one JSON line per run (seeding included, as scenario
//! `seed`); booking scenarios also print a line describing their setup, and `contention` the PASS/FAIL line of
//! its correctness check. Exit status: 0 when every run got at least one 2xx response (and every contention
//! check passed), 1 otherwise, 2 on a usage error.

use loadgen::booking::{
    BookingRunner, BookingScenario, DEFAULT_CONTENTION_SLOTS, DEFAULT_PATIENTS, SLOT_BUDGET_RATE,
    SlotQueue, slot_budget,
};
use loadgen::scenario::{Runner, Scenario, Seeded, Stop, Target};
use loadgen::stats::Summary;
use std::path::PathBuf;

/// Slots `free-slots` sets up when `--slots` is not given: 50,000 (about 520 days of 15-minute slots).
const FREE_SLOTS_DEFAULT: usize = 50_000;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
usage: cb-loadgen --url http://HOST:PORT[/BASE] [options]

  --url URL                 FHIR base URL (Carebridge: http://127.0.0.1:PORT/fhir; a server at the root: http://HOST:PORT)
  --scenario LIST           comma-separated: create, read, search-identifier (Patient), book, contention,
                            free-slots (booking, Carebridge only); none: only seed
  --concurrency LIST        comma-separated connection counts, each run in turn [default: 32]
  --duration D              length of each run, e.g. 10s, 500ms [default: 10s]
  --requests N              stop each run after N requests instead of a duration
  --warmup D                unmeasured run before each measured one [default: 0s]
  --seed N                  create N patients first (for read/search) [default: 10000 when needed]
  --seed-concurrency C      connections used for seeding [default: 32]
  --seed-file FILE          use patients listed in FILE (id<TAB>nhs) instead of seeding
  --save-seed FILE          write the seeded patients to FILE
  --nhs-start N             offset of the first generated NHS number [default: from the clock]
  --threads N               client runtime threads [default: 1]
  --timeout D               per-request time limit [default: 30s]
  --patients N              patients created by each booking scenario's setup [default: 200]
  --slots N                 free slots created for `book` [default: 5000 per second of all its runs and
                            warm-ups, at least 1000; when used up, cancelled slots are booked again], or
                            for `free-slots` [default: 50000]
  --contention-slots N      slots the `contention` connections race for [default: 100]
  --json                    also print a JSON line per run
  --token T                 send `Authorization: Bearer T` with every request (a hub with authentication on)

  book: each iteration books a distinct free slot (POST Appointment, 201) and cancels it (POST
        Appointment/{id}/$transition status=cancelled, 200); reports bookings/s (completed pairs) and the
        latency of each request.
  contention: each iteration books a random slot of --contention-slots (201 or 409) and cancels a 201 at once;
        reports attempts/s, bookings/s, 409s, and checks afterwards that every slot is free, no booked
        appointment is left and the appointments created equal the 201s (PASS/FAIL).
  free-slots: each iteration lists one random day's free slots of the schedule (GET
        Slot?schedule=..&status=free&start=ge{day}&start=lt{day+1}); a 200 without a Slot counts as a failure;
        reports searches/s and latency.";

/// One scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Patient(Scenario),
    Booking(BookingScenario),
}

impl Job {
    fn parse(s: &str) -> Option<Job> {
        BookingScenario::parse(s)
            .map(Job::Booking)
            .or_else(|| Scenario::parse(s).map(Job::Patient))
    }
}

struct Args {
    target: Target,
    jobs: Vec<Job>,
    concurrency: Vec<usize>,
    stop: Stop,
    warmup: Duration,
    seed: Option<u64>,
    seed_concurrency: usize,
    seed_file: Option<PathBuf>,
    save_seed: Option<PathBuf>,
    nhs_start: u64,
    threads: usize,
    timeout: Duration,
    json: bool,
    patients: usize,
    slots: Option<usize>,
    contention_slots: usize,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut url = None;
    let mut a = Args {
        target: Target {
            addr: String::new(),
            base: String::new(),
        },
        jobs: Vec::new(),
        concurrency: vec![32],
        stop: Stop::After(Duration::from_secs(10)),
        warmup: Duration::ZERO,
        seed: None,
        seed_concurrency: 32,
        seed_file: None,
        save_seed: None,
        nhs_start: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() * 7919 + u64::from(d.subsec_micros()))
            .unwrap_or(0),
        threads: 1,
        timeout: Duration::from_secs(30),
        json: false,
        patients: DEFAULT_PATIENTS,
        slots: None,
        contention_slots: DEFAULT_CONTENTION_SLOTS,
    };
    let num = |v: &str, what: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{what} must be a whole number, got {v:?}"))
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "--json" {
            a.json = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(v.clone()),
            "--token" => loadgen::http::set_default_headers(vec![(
                "Authorization".into(),
                format!("Bearer {}", v.trim()),
            )]),
            "--scenario" => {
                a.jobs = v
                    .split(',')
                    .filter(|s| !s.is_empty() && *s != "seed")
                    .map(|s| Job::parse(s).ok_or_else(|| format!("unknown scenario {s:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--concurrency" => {
                a.concurrency = v
                    .split(',')
                    .map(|c| {
                        num(c, "--concurrency").and_then(|n| {
                            if n == 0 {
                                Err("--concurrency must be > 0".into())
                            } else {
                                Ok(n as usize)
                            }
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            "--duration" => a.stop = Stop::After(loadgen::parse_duration(v)?),
            "--requests" => a.stop = Stop::Requests(num(v, "--requests")?),
            "--warmup" => a.warmup = loadgen::parse_duration(v)?,
            "--seed" => a.seed = Some(num(v, "--seed")?),
            "--seed-concurrency" => {
                a.seed_concurrency = num(v, "--seed-concurrency")?.max(1) as usize
            }
            "--seed-file" => a.seed_file = Some(PathBuf::from(v)),
            "--save-seed" => a.save_seed = Some(PathBuf::from(v)),
            "--nhs-start" => a.nhs_start = num(v, "--nhs-start")?,
            "--threads" => a.threads = num(v, "--threads")?.max(1) as usize,
            "--timeout" => a.timeout = loadgen::parse_duration(v)?,
            "--patients" => a.patients = num(v, "--patients")?.max(1) as usize,
            "--slots" => a.slots = Some(num(v, "--slots")?.max(1) as usize),
            "--contention-slots" => {
                a.contention_slots = num(v, "--contention-slots")?.max(1) as usize
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    a.target = Target::parse(&url.ok_or("--url is required")?)?;
    Ok(a)
}

fn report(s: &Summary, json: bool) {
    println!("{}", s.line());
    if json {
        println!("{}", s.json());
    }
}

async fn run(a: Args) -> Result<bool, String> {
    let mut runner = Runner::new(a.target.clone(), a.nhs_start);
    runner.timeout = a.timeout;
    let needs_seed = a
        .jobs
        .iter()
        .any(|j| matches!(j, Job::Patient(s) if s.needs_seed()));
    let mut all_ok = true;
    let seeded = match (&a.seed_file, a.seed) {
        (Some(f), _) => Seeded::load(f)?,
        (_, n) if needs_seed || n.is_some() => {
            let n = n.unwrap_or(10_000);
            let (seeded, summary) = runner.seed(n, a.seed_concurrency).await?;
            report(&summary, a.json);
            if seeded.ids.is_empty() {
                return Err(format!(
                    "seeding created no patients at {}{}/Patient",
                    a.target.addr, a.target.base
                ));
            }
            if let Some(path) = &a.save_seed {
                seeded
                    .save(path)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            seeded
        }
        _ => Seeded::default(),
    };
    let seeded = Arc::new(seeded);
    for &job in &a.jobs {
        let sc = match job {
            Job::Patient(sc) => sc,
            Job::Booking(b) => {
                all_ok &= run_booking(&a, &runner, b).await?;
                continue;
            }
        };
        for &c in &a.concurrency {
            if !a.warmup.is_zero() {
                runner
                    .run(sc, c, Stop::After(a.warmup), seeded.clone())
                    .await?;
            }
            let s = runner.run(sc, c, a.stop, seeded.clone()).await?;
            all_ok &= s.ok_per_s > 0.0;
            report(&s, a.json);
        }
    }
    Ok(all_ok)
}

/// Set up one booking scenario and run it at each concurrency (after its warm-up). Whether every run made
/// bookings (and every contention check passed).
async fn run_booking(a: &Args, runner: &Runner, scenario: BookingScenario) -> Result<bool, String> {
    let mut br = BookingRunner::new(a.target.clone(), runner.nhs.clone());
    br.timeout = a.timeout;
    br.patients = a.patients;
    br.setup_concurrency = a.seed_concurrency;
    let runs = a.concurrency.len() as f64;
    let warmups = runs * a.warmup.as_secs_f64();
    let slots = match scenario {
        BookingScenario::Contention => a.contention_slots,
        BookingScenario::FreeSlots => a.slots.unwrap_or(FREE_SLOTS_DEFAULT),
        BookingScenario::Book => a.slots.unwrap_or_else(|| match a.stop {
            Stop::After(d) => slot_budget(runs * d.as_secs_f64() + warmups),
            Stop::Requests(n) => {
                (n as f64 * runs + warmups * SLOT_BUDGET_RATE).ceil() as usize + a.concurrency.len()
            }
        }),
    };
    let clinic = Arc::new(br.setup(scenario, slots).await?);
    println!("{}", clinic.line());
    let queue = Arc::new(SlotQueue::new(clinic.slots.len()));
    let mut ok = true;
    for &c in &a.concurrency {
        match scenario {
            BookingScenario::Book => {
                if !a.warmup.is_zero() {
                    br.book(clinic.clone(), queue.clone(), c, Stop::After(a.warmup))
                        .await;
                }
                let s = br.book(clinic.clone(), queue.clone(), c, a.stop).await;
                ok &= s.pairs > 0;
                println!("{}", s.line());
                if a.json {
                    println!("{}", s.json());
                }
            }
            BookingScenario::FreeSlots => {
                if !a.warmup.is_zero() {
                    br.free_slots(clinic.clone(), c, Stop::After(a.warmup))
                        .await;
                }
                let s = br.free_slots(clinic.clone(), c, a.stop).await;
                ok &= s.responses > 0 && s.non_2xx == 0 && s.errors == 0;
                println!("{}", s.line());
                if a.json {
                    println!("{}", s.json());
                }
            }
            BookingScenario::Contention => {
                if !a.warmup.is_zero() {
                    br.contention(clinic.clone(), c, Stop::After(a.warmup))
                        .await;
                }
                let mut s = br.contention(clinic.clone(), c, a.stop).await;
                let check = br.check_contention(&clinic).await;
                ok &= s.created > 0 && check.pass;
                s.check = Some(check);
                println!("{}", s.line());
                if a.json {
                    println!("{}", s.json());
                }
            }
        }
    }
    Ok(ok)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("cb-loadgen: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let code = match rt {
        Err(e) => {
            eprintln!("cb-loadgen: starting the runtime: {e}");
            2
        }
        Ok(rt) => match rt.block_on(run(args)) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("cb-loadgen: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}
