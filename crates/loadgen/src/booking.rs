//! Booking scenarios against Carebridge's booking engine: `book` (distinct slots, book then cancel) and
//! `contention` (many connections racing for a few slots, with a correctness check afterwards).
//!
//! Why it exists: the Patient scenarios measure plain FHIR CRUD; a booking is a transaction that claims a slot
//! atomically, and its cancel releases it. These runs measure that path under load and check that the slot
//! invariant (a slot is busy exactly while one booked appointment holds it) survives racing connections.
//!
//! API used (see README "Booking"): POST `Practitioner`, `Patient`, `Schedule`; POST
//! `Schedule/{id}/$generate-slots` (at most 10,000 slots per call); GET `Slot?schedule=..&status=free`;
//! POST `Appointment` (status booked, the slot's start/end, a Patient participant: 201, or 409 when the slot
//! is busy); POST `Appointment/{id}/$transition` with status `cancelled` (200, releases the slot).
//!
//! Model: closed loop like [`crate::scenario`]. Each scenario sets up its own Practitioner, Patients, Schedule
//! and slots once per [`BookingRunner::setup`], so runs never share slots with other runs or invocations.
//! Dates start the day after tomorrow (UTC), so every slot is in the future even in British Summer Time.
//!
//! Invariants: nothing here panics on what a server sends; every failure is counted and reported; in `book`
//! no two connections ever hold the same slot (a slot is taken from a shared queue, and goes back to its end
//! only after its cancel succeeded, when the fresh slots are used up).

use crate::http::{Client, Response};
use crate::patient::NhsNumbers;
use crate::scenario::{Runner, Stop, Target};
use crate::stats::{Recorder, Summary};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most slots one `$generate-slots` call may create (the server refuses more).
pub const MAX_SLOTS_PER_CALL: usize = 10_000;
/// Days per `$generate-slots` call: 100 days of 96 quarter-hour slots is 9,600, under the limit.
const DAYS_PER_CALL: i64 = 100;
/// Slot length in minutes.
pub const SLOT_MINUTES: u32 = 15;
/// Slots per search page (the server's `_count` ceiling).
const PAGE: usize = 1000;
/// Default Patients per setup.
pub const DEFAULT_PATIENTS: usize = 200;
/// Default slots of the `contention` scenario.
pub const DEFAULT_CONTENTION_SLOTS: usize = 100;
/// Bookings per second assumed when sizing the `book` slot pool from a run's duration. Above the 3,000/s
/// target; if a run still uses the pool up, cancelled slots are reused (and counted).
pub const SLOT_BUDGET_RATE: f64 = 5_000.0;

const CANCEL_REASON_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason";
const JSON_HEADERS: [(&str, &str); 2] = [
    ("Content-Type", "application/fhir+json"),
    ("Accept", "application/fhir+json"),
];
const GET_HEADERS: [(&str, &str); 1] = [("Accept", "application/fhir+json")];

/// A booking scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookingScenario {
    /// Each iteration books a distinct free slot (201) and cancels the booking (200).
    Book,
    /// Connections book random slots of a small set (201 or 409) and cancel each success at once.
    Contention,
    /// Each iteration searches one random day's free slots of the schedule (200 with at least one slot).
    FreeSlots,
}

impl BookingScenario {
    pub fn parse(s: &str) -> Option<BookingScenario> {
        match s {
            "book" => Some(BookingScenario::Book),
            "contention" => Some(BookingScenario::Contention),
            "free-slots" => Some(BookingScenario::FreeSlots),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BookingScenario::Book => "book",
            BookingScenario::Contention => "contention",
            BookingScenario::FreeSlots => "free-slots",
        }
    }
}

/// A slot as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRef {
    pub id: String,
    pub start: String,
    pub end: String,
}

/// What one setup created on the server.
#[derive(Debug)]
pub struct Clinic {
    pub scenario: BookingScenario,
    pub practitioner: String,
    pub schedule: String,
    pub patients: Vec<String>,
    pub slots: Vec<SlotRef>,
    /// First local date of the generated slots (`YYYY-MM-DD`).
    pub first_day: String,
    /// The same date, in days since 1970-01-01.
    pub first_day_number: i64,
    /// Slots the `$generate-slots` calls reported created.
    pub generated: u64,
    /// `$generate-slots` calls made.
    pub generate_calls: u32,
    pub setup_time: Duration,
    /// `Appointment?_summary=count` right after setup (contention check baseline).
    pub appointments_before: Option<u64>,
    /// Booking 201s over every run on this clinic (contention check).
    pub created_total: AtomicU64,
    /// Booking requests that got no response (their outcome on the server is unknown).
    pub unknown_total: AtomicU64,
}

impl Clinic {
    /// One line describing the setup.
    pub fn line(&self) -> String {
        format!(
            "{} setup: Practitioner/{}, {} patients, Schedule/{}, {} slots of {SLOT_MINUTES} min from {} ({} created by {} $generate-slots call(s)) in {:.2}s",
            self.scenario.name(),
            self.practitioner,
            self.patients.len(),
            self.schedule,
            self.slots.len(),
            self.first_day,
            self.generated,
            self.generate_calls,
            self.setup_time.as_secs_f64()
        )
    }
}

/// Runs booking scenarios against one target.
#[derive(Debug, Clone)]
pub struct BookingRunner {
    pub target: Target,
    pub nhs: Arc<NhsNumbers>,
    pub timeout: Duration,
    /// Patients created per setup.
    pub patients: usize,
    /// Connections used to create the patients.
    pub setup_concurrency: usize,
}

impl BookingRunner {
    pub fn new(target: Target, nhs: Arc<NhsNumbers>) -> BookingRunner {
        BookingRunner {
            target,
            nhs,
            timeout: Duration::from_secs(30),
            patients: DEFAULT_PATIENTS,
            setup_concurrency: 16,
        }
    }

    async fn client(&self) -> Result<Client, String> {
        let mut c = Client::connect(&self.target.addr)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.target.addr))?;
        c.set_timeout(self.timeout.max(Duration::from_secs(60)));
        Ok(c)
    }

    /// Create the Practitioner, Patients, Schedule and `slots` free slots of one scenario.
    pub async fn setup(&self, scenario: BookingScenario, slots: usize) -> Result<Clinic, String> {
        let t0 = Instant::now();
        let base = &self.target.base;
        let mut c = self.client().await?;
        let practitioner = create(
            &mut c,
            base,
            "Practitioner",
            r#"{"resourceType":"Practitioner","active":true,"name":[{"use":"official","family":"LOADGEN","given":["Bench"],"prefix":["Dr"]}]}"#,
        )
        .await?;
        let runner = Runner {
            target: self.target.clone(),
            nhs: self.nhs.clone(),
            timeout: self.timeout,
        };
        let (seeded, summary) = runner
            .seed(self.patients.max(1) as u64, self.setup_concurrency.max(1))
            .await?;
        if seeded.ids.is_empty() {
            return Err(format!(
                "creating patients failed: {}",
                summary.line().replace("seed c=", "patients c=")
            ));
        }
        let schedule = create(
            &mut c,
            base,
            "Schedule",
            &format!(
                r#"{{"resourceType":"Schedule","active":true,"actor":[{{"reference":"Practitioner/{practitioner}"}}],"comment":"cb-loadgen {} scenario"}}"#,
                scenario.name()
            ),
        )
        .await?;
        let first = today_utc_days() + 2;
        let (generated, calls) = generate(&mut c, base, &schedule, first, slots).await?;
        let mut list = fetch_free_slots(&mut c, base, &schedule, slots).await?;
        list.truncate(slots);
        if list.len() < slots {
            return Err(format!(
                "Schedule/{schedule}: {} free slots listed, {slots} needed",
                list.len()
            ));
        }
        let appointments_before = if scenario == BookingScenario::Contention {
            Some(appointment_count(&mut c, base, "").await?)
        } else {
            None
        };
        Ok(Clinic {
            scenario,
            practitioner,
            schedule,
            patients: seeded.ids,
            slots: list,
            first_day: format_date(first),
            first_day_number: first,
            generated,
            generate_calls: calls,
            setup_time: t0.elapsed(),
            appointments_before,
            created_total: AtomicU64::new(0),
            unknown_total: AtomicU64::new(0),
        })
    }

    /// Run `book` at `concurrency` until `stop`, taking slots from `queue`.
    pub async fn book(
        &self,
        clinic: Arc<Clinic>,
        queue: Arc<SlotQueue>,
        concurrency: usize,
        stop: Stop,
    ) -> BookSummary {
        let gate = Arc::new(Gate::new(stop));
        let handles = spawn_workers(concurrency, |w| {
            book_worker(
                self.target.clone(),
                self.timeout,
                clinic.clone(),
                queue.clone(),
                gate.clone(),
                w,
            )
        });
        let mut book = Recorder::default();
        let mut cancel = Recorder::default();
        let mut pairs = 0;
        for h in handles {
            match h.await {
                Ok(w) => {
                    book.merge(w.book);
                    cancel.merge(w.cancel);
                    pairs += w.pairs;
                }
                Err(e) => book.error(|| format!("worker task failed: {e}")),
            }
        }
        let elapsed = gate.start.elapsed();
        BookSummary {
            concurrency,
            elapsed,
            pairs,
            pairs_per_s: pairs as f64 / elapsed.as_secs_f64().max(1e-9),
            book: Summary::new("book", concurrency, book, elapsed),
            cancel: Summary::new("cancel", concurrency, cancel, elapsed),
            slots: clinic.slots.len(),
            slots_reused: queue.reused.load(Ordering::Relaxed),
        }
    }

    /// Run `free-slots` at `concurrency` until `stop`: each request lists the free slots of one random day
    /// of the clinic (`Slot?schedule=..&status=free&start=ge{day}&start=lt{next day}`). A response counts as
    /// a success only when it is a 200 searchset Bundle listing at least one Slot (every day has free slots).
    pub async fn free_slots(&self, clinic: Arc<Clinic>, concurrency: usize, stop: Stop) -> Summary {
        let gate = Arc::new(Gate::new(stop));
        let handles = spawn_workers(concurrency, |w| {
            free_slots_worker(
                self.target.clone(),
                self.timeout,
                clinic.clone(),
                gate.clone(),
                worker_seed(w),
            )
        });
        let mut rec = Recorder::default();
        for h in handles {
            match h.await {
                Ok(r) => rec.merge(r),
                Err(e) => rec.error(|| format!("worker task failed: {e}")),
            }
        }
        Summary::new("free-slots", concurrency, rec, gate.start.elapsed())
    }

    /// Run `contention` at `concurrency` until `stop` over the clinic's slots.
    pub async fn contention(
        &self,
        clinic: Arc<Clinic>,
        concurrency: usize,
        stop: Stop,
    ) -> ContentionSummary {
        let gate = Arc::new(Gate::new(stop));
        let handles = spawn_workers(concurrency, |w| {
            contention_worker(
                self.target.clone(),
                self.timeout,
                clinic.clone(),
                gate.clone(),
                worker_seed(w),
            )
        });
        let mut attempts = Recorder::default();
        let mut cancel = Recorder::default();
        let (mut created, mut conflicts, mut unknown) = (0, 0, 0);
        for h in handles {
            match h.await {
                Ok(w) => {
                    attempts.merge(w.attempts);
                    cancel.merge(w.cancel);
                    created += w.created;
                    conflicts += w.conflicts;
                    unknown += w.unknown;
                }
                Err(e) => attempts.error(|| format!("worker task failed: {e}")),
            }
        }
        let elapsed = gate.start.elapsed();
        clinic.created_total.fetch_add(created, Ordering::Relaxed);
        clinic.unknown_total.fetch_add(unknown, Ordering::Relaxed);
        let attempts = Summary::new("contention", concurrency, attempts, elapsed);
        let secs = elapsed.as_secs_f64().max(1e-9);
        ContentionSummary {
            concurrency,
            elapsed,
            slots: clinic.slots.len(),
            attempts_per_s: attempts.responses as f64 / secs,
            bookings_per_s: created as f64 / secs,
            created,
            conflicts,
            other_non_2xx: attempts.non_2xx.saturating_sub(conflicts),
            attempts,
            cancel: Summary::new("cancel", concurrency, cancel, elapsed),
            check: None,
        }
    }

    /// After the contention runs: every slot free, no booked appointment on any, and the appointments created
    /// equal the 201s counted (over every run on this clinic, warm-ups included).
    pub async fn check_contention(&self, clinic: &Clinic) -> Check {
        match self.check_inner(clinic).await {
            Ok(c) => c,
            Err(e) => Check {
                pass: false,
                detail: format!("the check itself failed: {e}"),
            },
        }
    }

    async fn check_inner(&self, clinic: &Clinic) -> Result<Check, String> {
        let base = &self.target.base;
        let mut c = self.client().await?;
        let mut not_free = Vec::new();
        let mut booked_left = 0;
        let mut per_slot_total = 0;
        for s in &clinic.slots {
            let r = get(&mut c, &format!("{base}/Slot/{}", s.id)).await?;
            let status = json(&r.body)
                .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| format!("HTTP {}", r.status));
            if r.status != 200 || status != "free" {
                not_free.push(format!("Slot/{} {status}", s.id));
            }
            booked_left +=
                appointment_count(&mut c, base, &format!("slot=Slot/{}&status=booked", s.id))
                    .await?;
            per_slot_total +=
                appointment_count(&mut c, base, &format!("slot=Slot/{}", s.id)).await?;
        }
        let total_after = appointment_count(&mut c, base, "").await?;
        let created = clinic.created_total.load(Ordering::Relaxed);
        let unknown = clinic.unknown_total.load(Ordering::Relaxed);
        let delta = clinic
            .appointments_before
            .map(|b| total_after.saturating_sub(b));
        let pass = not_free.is_empty()
            && booked_left == 0
            && per_slot_total == created
            && delta == Some(created);
        let mut detail = format!(
            "{}/{} slots free, {booked_left} booked appointments left; 201s {created}, appointments created {} (Appointment?_summary=count {} -> {total_after}), on these slots {per_slot_total}",
            clinic.slots.len() - not_free.len(),
            clinic.slots.len(),
            delta.map_or_else(|| "unknown".to_string(), |d| d.to_string()),
            clinic
                .appointments_before
                .map_or_else(|| "?".to_string(), |b| b.to_string()),
        );
        if unknown > 0 {
            detail.push_str(&format!(
                "; {unknown} booking requests got no response (outcome unknown)"
            ));
        }
        if !not_free.is_empty() {
            detail.push_str(&format!(
                "; not free: {}",
                not_free
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Check { pass, detail })
    }
}

/// `book`'s shared slot queue: fresh slots in order, then (when those are used up) slots whose booking was
/// cancelled, oldest first.
#[derive(Debug)]
pub struct SlotQueue {
    next: AtomicUsize,
    len: usize,
    recycled: Mutex<VecDeque<usize>>,
    /// Slots taken a second time or later.
    pub reused: AtomicU64,
}

impl SlotQueue {
    pub fn new(len: usize) -> SlotQueue {
        SlotQueue {
            next: AtomicUsize::new(0),
            len,
            recycled: Mutex::new(VecDeque::new()),
            reused: AtomicU64::new(0),
        }
    }

    /// Index of a slot no other connection holds, or `None` when every slot is held.
    pub fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i < self.len {
            return Some(i);
        }
        self.next.store(self.len, Ordering::Relaxed);
        let i = self.recycled.lock().ok()?.pop_front()?;
        self.reused.fetch_add(1, Ordering::Relaxed);
        Some(i)
    }

    /// Give back a slot that is free again.
    pub fn give_back(&self, i: usize) {
        if let Ok(mut q) = self.recycled.lock() {
            q.push_back(i);
        }
    }
}

/// Spawn `concurrency` (at least one) workers, worker `w` running `f(w)`.
fn spawn_workers<T, F>(
    concurrency: usize,
    mut f: impl FnMut(usize) -> F,
) -> Vec<tokio::task::JoinHandle<T>>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    (0..concurrency.max(1))
        .map(|w| tokio::spawn(f(w)))
        .collect()
}

/// A seed for worker `w`'s random numbers: the clock, mixed with the worker's number.
fn worker_seed(w: usize) -> u64 {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    clock ^ ((w as u64 + 1) * 0x9E37_79B9_7F4A_7C15)
}

/// When a run stops.
struct Gate {
    stop: Stop,
    start: Instant,
    deadline: Instant,
    issued: AtomicU64,
}

impl Gate {
    fn new(stop: Stop) -> Gate {
        let start = Instant::now();
        Gate {
            stop,
            start,
            deadline: match stop {
                Stop::After(d) => start + d,
                Stop::Requests(_) => start,
            },
            issued: AtomicU64::new(0),
        }
    }

    /// Claim one more iteration.
    fn claim(&self) -> bool {
        match self.stop {
            Stop::After(_) => Instant::now() < self.deadline,
            Stop::Requests(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
        }
    }
}

/// The JSON of a booking of `slot` for `patient` with `practitioner`.
pub fn appointment_json(slot: &SlotRef, patient: &str, practitioner: &str) -> String {
    format!(
        r#"{{"resourceType":"Appointment","status":"booked","description":"cb-loadgen booking","start":"{}","end":"{}","slot":[{{"reference":"Slot/{}"}}],"participant":[{{"actor":{{"reference":"Patient/{patient}"}},"status":"accepted"}},{{"actor":{{"reference":"Practitioner/{practitioner}"}},"status":"accepted"}}]}}"#,
        slot.start, slot.end, slot.id
    )
}

/// The `$transition` Parameters that cancel an appointment at the patient's request.
pub fn cancel_json() -> String {
    format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"status","valueCode":"cancelled"}},{{"name":"reason","valueCoding":{{"system":"{CANCEL_REASON_SYSTEM}","code":"pat"}}}}]}}"#
    )
}

struct BookWorker {
    book: Recorder,
    cancel: Recorder,
    pairs: u64,
}

async fn connect(target: &Target, timeout: Duration, rec: &mut Recorder) -> Option<Client> {
    match Client::connect(&target.addr).await {
        Ok(mut c) => {
            c.set_timeout(timeout);
            Some(c)
        }
        Err(e) => {
            rec.error(|| format!("connecting to {}: {e}", target.addr));
            None
        }
    }
}

/// Book then cancel; `Some(cancelled)` when the booking got a 201 (cancelled: the cancel got a 200).
async fn book_and_cancel(
    client: &mut Client,
    base: &str,
    body: &str,
    book: &mut Recorder,
    cancel: &mut Recorder,
    allowed: u16,
) -> BookOutcome {
    let t0 = Instant::now();
    let resp = match client
        .request(
            "POST",
            &format!("{base}/Appointment"),
            &JSON_HEADERS,
            body.as_bytes(),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            book.error(|| format!("POST {base}/Appointment: {e}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
            return BookOutcome::NoResponse;
        }
    };
    book.response_allowing(t0.elapsed(), resp.status, &resp.body, allowed);
    if resp.status != 201 {
        return BookOutcome::Refused(resp.status);
    }
    let Some(id) = resource_id(&resp, "Appointment") else {
        book.error(|| "a booking 201 carried neither a Location nor a body id".into());
        return BookOutcome::Booked { cancelled: false };
    };
    let path = format!("{base}/Appointment/{id}/$transition");
    let t1 = Instant::now();
    match client
        .request("POST", &path, &JSON_HEADERS, cancel_json().as_bytes())
        .await
    {
        Ok(r) => {
            cancel.response(t1.elapsed(), r.status, &r.body);
            BookOutcome::Booked {
                cancelled: r.status == 200,
            }
        }
        Err(e) => {
            cancel.error(|| format!("POST {path}: {e}"));
            BookOutcome::Booked { cancelled: false }
        }
    }
}

enum BookOutcome {
    NoResponse,
    Refused(u16),
    Booked { cancelled: bool },
}

async fn book_worker(
    target: Target,
    timeout: Duration,
    clinic: Arc<Clinic>,
    queue: Arc<SlotQueue>,
    gate: Arc<Gate>,
    w: usize,
) -> BookWorker {
    let mut out = BookWorker {
        book: Recorder::default(),
        cancel: Recorder::default(),
        pairs: 0,
    };
    let Some(mut client) = connect(&target, timeout, &mut out.book).await else {
        return out;
    };
    let mut n = w;
    while gate.claim() {
        let Some(i) = queue.take() else {
            out.book
                .error(|| "no free slot left in the queue (every slot held or lost)".into());
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (Some(slot), Some(patient)) = (
            clinic.slots.get(i),
            clinic.patients.get(n % clinic.patients.len().max(1)),
        ) else {
            break;
        };
        n += 1;
        let body = appointment_json(slot, patient, &clinic.practitioner);
        if let BookOutcome::Booked { cancelled: true } = book_and_cancel(
            &mut client,
            &target.base,
            &body,
            &mut out.book,
            &mut out.cancel,
            201,
        )
        .await
        {
            out.pairs += 1;
            queue.give_back(i);
        }
    }
    out
}

async fn free_slots_worker(
    target: Target,
    timeout: Duration,
    clinic: Arc<Clinic>,
    gate: Arc<Gate>,
    mut rng: u64,
) -> Recorder {
    let mut rec = Recorder::default();
    let Some(mut client) = connect(&target, timeout, &mut rec).await else {
        return rec;
    };
    let per_day = (24 * 60 / SLOT_MINUTES) as u64;
    let days = (clinic.slots.len() as u64 / per_day).max(1);
    let first = clinic.first_day_number;
    while gate.claim() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let day = first + (rng % days) as i64;
        let path = format!(
            "{}/Slot?schedule=Schedule/{}&status=free&start=ge{}&start=lt{}",
            target.base,
            clinic.schedule,
            format_date(day),
            format_date(day + 1)
        );
        let t = Instant::now();
        match get(&mut client, &path).await {
            Ok(r) => {
                let listed = parse_slot_page(&r.body).map_or(0, |v| v.len());
                let status = if r.status == 200 && listed == 0 {
                    // A day without a free slot listed is a wrong answer here: counted as non-2xx.
                    599
                } else {
                    r.status
                };
                rec.response(t.elapsed(), status, &r.body);
            }
            Err(e) => {
                rec.error(|| e);
                match connect(&target, timeout, &mut rec).await {
                    Some(c) => client = c,
                    None => break,
                }
            }
        }
    }
    rec
}

struct ContentionWorker {
    attempts: Recorder,
    cancel: Recorder,
    created: u64,
    conflicts: u64,
    unknown: u64,
}

async fn contention_worker(
    target: Target,
    timeout: Duration,
    clinic: Arc<Clinic>,
    gate: Arc<Gate>,
    seed: u64,
) -> ContentionWorker {
    let mut out = ContentionWorker {
        attempts: Recorder::default(),
        cancel: Recorder::default(),
        created: 0,
        conflicts: 0,
        unknown: 0,
    };
    let Some(mut client) = connect(&target, timeout, &mut out.attempts).await else {
        return out;
    };
    let mut rng = Rng(seed | 1);
    let slots = clinic.slots.len().max(1) as u64;
    let patients = clinic.patients.len().max(1) as u64;
    while gate.claim() {
        let (Some(slot), Some(patient)) = (
            clinic.slots.get((rng.next() % slots) as usize),
            clinic.patients.get((rng.next() % patients) as usize),
        ) else {
            break;
        };
        let body = appointment_json(slot, patient, &clinic.practitioner);
        match book_and_cancel(
            &mut client,
            &target.base,
            &body,
            &mut out.attempts,
            &mut out.cancel,
            409,
        )
        .await
        {
            BookOutcome::NoResponse => out.unknown += 1,
            BookOutcome::Refused(409) => out.conflicts += 1,
            BookOutcome::Refused(_) => {}
            BookOutcome::Booked { .. } => out.created += 1,
        }
    }
    out
}

/// xorshift64*: enough randomness to pick slots, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Results

/// The result of one `book` run.
#[derive(Debug, Clone)]
pub struct BookSummary {
    pub concurrency: usize,
    pub elapsed: Duration,
    /// Completed iterations: booking 201 and cancel 200.
    pub pairs: u64,
    pub pairs_per_s: f64,
    /// The booking requests.
    pub book: Summary,
    /// The cancel requests.
    pub cancel: Summary,
    pub slots: usize,
    pub slots_reused: u64,
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

fn latency(s: &Summary) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(s.p50_us),
        ms(s.p90_us),
        ms(s.p99_us),
        ms(s.max_us)
    )
}

fn statuses(s: &Summary) -> String {
    s.statuses
        .iter()
        .map(|(k, n)| format!("{k}:{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn first_problem(parts: &[&Summary]) -> Option<String> {
    parts
        .iter()
        .find_map(|s| s.first_error.clone())
        .or_else(|| parts.iter().find_map(|s| s.first_non_2xx.clone()))
        .map(|p| p.replace('\n', " "))
}

impl BookSummary {
    /// One human-readable line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "book c={}: {:.1} bookings/s ({} book+cancel pairs in {:.2}s; {} slots, {} reused); booking {}; cancel {}; {} errors, {} non-2xx (booking statuses {}, cancel statuses {})",
            self.concurrency,
            self.pairs_per_s,
            self.pairs,
            self.elapsed.as_secs_f64(),
            self.slots,
            self.slots_reused,
            latency(&self.book),
            latency(&self.cancel),
            self.book.errors + self.cancel.errors,
            self.book.non_2xx + self.cancel.non_2xx,
            statuses(&self.book),
            statuses(&self.cancel),
        );
        if let Some(p) = first_problem(&[&self.book, &self.cancel]) {
            s.push_str(&format!("; first problem: {p}"));
        }
        s
    }

    /// One flat JSON object. `ok_per_s` is bookings/s (pairs); `p50_us`/`p99_us` are the booking request's.
    pub fn json(&self) -> Value {
        serde_json::json!({
            "scenario": "book",
            "concurrency": self.concurrency,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ok_per_s": self.pairs_per_s,
            "bookings_per_s": self.pairs_per_s,
            "pairs": self.pairs,
            "responses": self.book.responses + self.cancel.responses,
            "errors": self.book.errors + self.cancel.errors,
            "non_2xx": self.book.non_2xx + self.cancel.non_2xx,
            "p50_us": self.book.p50_us,
            "p90_us": self.book.p90_us,
            "p99_us": self.book.p99_us,
            "max_us": self.book.max_us,
            "book_responses": self.book.responses,
            "book_errors": self.book.errors,
            "book_non_2xx": self.book.non_2xx,
            "cancel_responses": self.cancel.responses,
            "cancel_errors": self.cancel.errors,
            "cancel_non_2xx": self.cancel.non_2xx,
            "cancel_p50_us": self.cancel.p50_us,
            "cancel_p90_us": self.cancel.p90_us,
            "cancel_p99_us": self.cancel.p99_us,
            "cancel_max_us": self.cancel.max_us,
            "book_statuses": statuses(&self.book),
            "cancel_statuses": statuses(&self.cancel),
            "slots": self.slots,
            "slots_reused": self.slots_reused,
            "first_error": self.book.first_error.clone().or_else(|| self.cancel.first_error.clone()),
            "first_non_2xx": self.book.first_non_2xx.clone().or_else(|| self.cancel.first_non_2xx.clone()),
        })
    }
}

/// The outcome of the contention correctness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub pass: bool,
    pub detail: String,
}

impl Check {
    pub fn line(&self) -> String {
        format!(
            "contention check: {} ({})",
            if self.pass { "PASS" } else { "FAIL" },
            self.detail
        )
    }
}

/// The result of one `contention` run.
#[derive(Debug, Clone)]
pub struct ContentionSummary {
    pub concurrency: usize,
    pub elapsed: Duration,
    pub slots: usize,
    /// Booking attempts that got a response, per second.
    pub attempts_per_s: f64,
    /// Booking 201s per second.
    pub bookings_per_s: f64,
    pub created: u64,
    pub conflicts: u64,
    /// Booking responses other than 201 and 409.
    pub other_non_2xx: u64,
    /// The booking attempts (201 and 409 alike).
    pub attempts: Summary,
    pub cancel: Summary,
    /// Filled in by [`BookingRunner::check_contention`].
    pub check: Option<Check>,
}

impl ContentionSummary {
    /// One human-readable line (and the check's, when made).
    pub fn line(&self) -> String {
        let mut s = format!(
            "contention c={} over {} slots: {:.1} attempts/s, {:.1} bookings/s ({} attempts, {} created, {} 409s in {:.2}s); attempt {}; cancel {}; {} errors, {} non-2xx other than 409 (attempt statuses {}, cancel statuses {})",
            self.concurrency,
            self.slots,
            self.attempts_per_s,
            self.bookings_per_s,
            self.attempts.responses,
            self.created,
            self.conflicts,
            self.elapsed.as_secs_f64(),
            latency(&self.attempts),
            latency(&self.cancel),
            self.attempts.errors + self.cancel.errors,
            self.other_non_2xx + self.cancel.non_2xx,
            statuses(&self.attempts),
            statuses(&self.cancel),
        );
        if let Some(p) = first_problem(&[&self.attempts, &self.cancel]) {
            s.push_str(&format!("; first problem: {p}"));
        }
        if let Some(c) = &self.check {
            s.push('\n');
            s.push_str(&c.line());
        }
        s
    }

    /// One flat JSON object. `ok_per_s` is successful bookings/s; `p50_us`/`p99_us` are the attempts'.
    pub fn json(&self) -> Value {
        serde_json::json!({
            "scenario": "contention",
            "concurrency": self.concurrency,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "slots": self.slots,
            "ok_per_s": self.bookings_per_s,
            "bookings_per_s": self.bookings_per_s,
            "attempts_per_s": self.attempts_per_s,
            "attempts": self.attempts.responses,
            "created": self.created,
            "conflicts": self.conflicts,
            "responses": self.attempts.responses + self.cancel.responses,
            "errors": self.attempts.errors + self.cancel.errors,
            "non_2xx": self.other_non_2xx + self.cancel.non_2xx,
            "p50_us": self.attempts.p50_us,
            "p90_us": self.attempts.p90_us,
            "p99_us": self.attempts.p99_us,
            "max_us": self.attempts.max_us,
            "cancel_p50_us": self.cancel.p50_us,
            "cancel_p99_us": self.cancel.p99_us,
            "attempt_statuses": statuses(&self.attempts),
            "cancel_statuses": statuses(&self.cancel),
            "check": self.check.as_ref().map(|c| if c.pass { "PASS" } else { "FAIL" }),
            "check_detail": self.check.as_ref().map(|c| c.detail.clone()),
            "first_error": self.attempts.first_error.clone().or_else(|| self.cancel.first_error.clone()),
            "first_non_2xx": self.attempts.first_non_2xx.clone().or_else(|| self.cancel.first_non_2xx.clone()),
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Setup helpers

fn json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

fn describe(resp: &Response) -> String {
    format!(
        "HTTP {}: {}",
        resp.status,
        String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)]).replace('\n', " ")
    )
}

/// The server-assigned id of a created `rtype`: the body's `id`, else from `Location`
/// (`.../{rtype}/{id}[/_history/{v}]`).
pub fn resource_id(resp: &Response, rtype: &str) -> Option<String> {
    if let Some(id) = json(&resp.body)
        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
        .filter(|id| !id.is_empty())
    {
        return Some(id);
    }
    let loc = resp.header("location")?;
    let path = loc.split(['?', '#']).next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').collect();
    let i = segs.iter().rposition(|s| *s == rtype)?;
    segs.get(i + 1)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
}

async fn post(c: &mut Client, path: &str, body: &str) -> Result<Response, String> {
    c.request("POST", path, &JSON_HEADERS, body.as_bytes())
        .await
        .map_err(|e| format!("POST {path}: {e}"))
}

async fn get(c: &mut Client, path: &str) -> Result<Response, String> {
    c.request("GET", path, &GET_HEADERS, b"")
        .await
        .map_err(|e| format!("GET {path}: {e}"))
}

async fn create(c: &mut Client, base: &str, rtype: &str, body: &str) -> Result<String, String> {
    let path = format!("{base}/{rtype}");
    let r = post(c, &path, body).await?;
    if r.status != 201 {
        return Err(format!("POST {path}: {}", describe(&r)));
    }
    resource_id(&r, rtype).ok_or_else(|| format!("POST {path}: 201 without an id"))
}

/// Generate at least `needed` slots (00:00-24:00 every day, 15 minutes) from day `first` (days since
/// 1970-01-01), `DAYS_PER_CALL` days per call. Returns (slots created, calls).
async fn generate(
    c: &mut Client,
    base: &str,
    schedule: &str,
    first: i64,
    needed: usize,
) -> Result<(u64, u32), String> {
    let path = format!("{base}/Schedule/{schedule}/$generate-slots");
    let per_day = (24 * 60 / SLOT_MINUTES) as usize;
    let mut created: u64 = 0;
    let mut calls = 0;
    let mut day = first;
    while (created as usize) < needed {
        // Enough days for what is still missing (plus one for a clock-change day), at most DAYS_PER_CALL.
        let missing = needed - created as usize;
        let days = (missing.div_ceil(per_day) as i64 + 1).min(DAYS_PER_CALL);
        let body = generate_json(day, day + days - 1);
        let r = post(c, &path, &body).await?;
        if r.status != 200 {
            return Err(format!("POST {path}: {}", describe(&r)));
        }
        let n = json(&r.body)
            .and_then(|v| {
                v.get("parameter")?
                    .as_array()?
                    .iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some("created"))?
                    .get("valueInteger")?
                    .as_u64()
            })
            .ok_or_else(|| format!("POST {path}: no `created` in {}", describe(&r)))?;
        if n == 0 {
            return Err(format!(
                "POST {path}: no slot created for {} .. {}",
                format_date(day),
                format_date(day + days - 1)
            ));
        }
        created += n;
        calls += 1;
        day += days;
    }
    Ok((created, calls))
}

/// `$generate-slots` Parameters: every day, 00:00-24:00, 15-minute slots, `from`..=`to` (days since epoch).
pub fn generate_json(from: i64, to: i64) -> String {
    format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"daysOfWeek","valueCode":"mon,tue,wed,thu,fri,sat,sun"}},{{"name":"openingTime","valueString":"00:00-24:00"}},{{"name":"slotMinutes","valuePositiveInt":{SLOT_MINUTES}}},{{"name":"start","valueDate":"{}"}},{{"name":"end","valueDate":"{}"}}]}}"#,
        format_date(from),
        format_date(to)
    )
}

/// The first `needed` free slots of a schedule, in start order (keyset paging on `start`).
async fn fetch_free_slots(
    c: &mut Client,
    base: &str,
    schedule: &str,
    needed: usize,
) -> Result<Vec<SlotRef>, String> {
    let mut out: Vec<SlotRef> = Vec::with_capacity(needed);
    while out.len() < needed {
        let count = (needed - out.len()).min(PAGE);
        let mut path = format!(
            "{base}/Slot?schedule=Schedule/{schedule}&status=free&_sort=start&_count={count}"
        );
        if let Some(last) = out.last() {
            path.push_str(&format!("&start=gt{}", last.start.replace('+', "%2B")));
        }
        let r = get(c, &path).await?;
        if r.status != 200 {
            return Err(format!("GET {path}: {}", describe(&r)));
        }
        let page = parse_slot_page(&r.body)
            .ok_or_else(|| format!("GET {path}: not a searchset Bundle"))?;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    Ok(out)
}

/// The Slots (id, start, end) of a searchset Bundle.
pub fn parse_slot_page(body: &[u8]) -> Option<Vec<SlotRef>> {
    let v = json(body)?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return None;
    }
    let empty = Vec::new();
    let entries = v.get("entry").and_then(Value::as_array).unwrap_or(&empty);
    Some(
        entries
            .iter()
            .filter_map(|e| {
                let r = e.get("resource")?;
                if r.get("resourceType")?.as_str()? != "Slot" {
                    return None;
                }
                Some(SlotRef {
                    id: r.get("id")?.as_str()?.to_string(),
                    start: r.get("start")?.as_str()?.to_string(),
                    end: r.get("end")?.as_str()?.to_string(),
                })
            })
            .collect(),
    )
}

/// `Appointment?{query}&_summary=count` (`query` may be empty): the `total`.
async fn appointment_count(c: &mut Client, base: &str, query: &str) -> Result<u64, String> {
    let sep = if query.is_empty() { "" } else { "&" };
    let path = format!("{base}/Appointment?{query}{sep}_summary=count");
    let r = get(c, &path).await?;
    if r.status != 200 {
        return Err(format!("GET {path}: {}", describe(&r)));
    }
    json(&r.body)
        .and_then(|v| v.get("total")?.as_u64())
        .ok_or_else(|| format!("GET {path}: no total in {}", describe(&r)))
}

// ---------------------------------------------------------------------------------------------------------
// Dates

/// Days since 1970-01-01 of today's UTC date.
pub fn today_utc_days() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01, proleptic Gregorian).
pub fn format_date(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Slots for a `book` setup: `SLOT_BUDGET_RATE` bookings/s over `seconds`, at least 1,000.
pub fn slot_budget(seconds: f64) -> usize {
    ((seconds.max(0.0) * SLOT_BUDGET_RATE).ceil() as usize).max(1_000)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(59), "1970-03-01");
        assert_eq!(format_date(11_016), "2000-02-29");
        assert_eq!(format_date(20_416), "2025-11-24");
        assert_eq!(format_date(20_818), "2026-12-31");
        assert!(today_utc_days() > 20_000);
    }

    #[test]
    fn generate_parameters_stay_under_the_limit() {
        let body = generate_json(20_416, 20_416 + DAYS_PER_CALL - 1);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["parameter"][3]["valueDate"], "2025-11-24");
        assert_eq!(v["parameter"][4]["valueDate"], "2026-03-03");
        assert!(DAYS_PER_CALL as usize * (24 * 60 / SLOT_MINUTES as usize) <= MAX_SLOTS_PER_CALL);
    }

    #[test]
    fn bodies_are_json() {
        let slot = SlotRef {
            id: "s-1".into(),
            start: "2030-03-04T09:00:00Z".into(),
            end: "2030-03-04T09:15:00Z".into(),
        };
        let a: Value = serde_json::from_str(&appointment_json(&slot, "p1", "dr1")).unwrap();
        assert_eq!(a["slot"][0]["reference"], "Slot/s-1");
        assert_eq!(a["participant"][0]["actor"]["reference"], "Patient/p1");
        assert_eq!(a["start"], "2030-03-04T09:00:00Z");
        let c: Value = serde_json::from_str(&cancel_json()).unwrap();
        assert_eq!(c["parameter"][0]["valueCode"], "cancelled");
        assert_eq!(c["parameter"][1]["valueCoding"]["code"], "pat");
    }

    #[test]
    fn slot_pages_and_ids() {
        let page = br#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Slot","id":"a","start":"2030-01-01T00:00:00Z","end":"2030-01-01T00:15:00Z"}},{"resource":{"resourceType":"Schedule","id":"s"}}]}"#;
        let slots = parse_slot_page(page).unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].id, "a");
        assert_eq!(
            parse_slot_page(br#"{"resourceType":"Bundle"}"#).unwrap(),
            vec![]
        );
        assert!(parse_slot_page(b"nope").is_none());
        let r = Response {
            status: 201,
            headers: vec![(
                "location".into(),
                "http://h/fhir/Appointment/x1/_history/1".into(),
            )],
            body: Vec::new(),
        };
        assert_eq!(resource_id(&r, "Appointment").as_deref(), Some("x1"));
        assert_eq!(resource_id(&r, "Schedule"), None);
    }

    #[test]
    fn queue_hands_out_distinct_slots_then_recycles() {
        let q = SlotQueue::new(2);
        assert_eq!((q.take(), q.take(), q.take()), (Some(0), Some(1), None));
        q.give_back(1);
        assert_eq!(q.take(), Some(1));
        assert_eq!(q.take(), None);
        assert_eq!(q.reused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn budget() {
        assert_eq!(slot_budget(0.0), 1_000);
        assert_eq!(slot_budget(12.0), 60_000);
    }
}
