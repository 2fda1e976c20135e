//! MLLP ingest load generator: `cb-mllp-bench --addr HOST:PORT [--connections 4] [--messages 20000]
//! [--kind a28|a31|siu] [--window 1] [--warmup 500]`.
//!
//! Each connection is one thread with a blocking socket. With `--window 1` (what most engines do) it sends a
//! message and waits for its ACK before the next; a larger window keeps that many messages in flight per
//! connection (ACKs still come back in order). Every message is distinct (its own control id; `a28` and `siu`
//! also their own NHS number / appointment), so the hub really applies each one. Prints one JSON line:
//! messages, seconds, msgs_per_s, ACK latency p50/p99/max in microseconds, and how many ACKs were not AA/CA.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

fn nhs_number(n: u64) -> String {
    // 9 digits starting 94 + a modulus-11 check digit; skip the tenth of bases with no valid check digit.
    let mut base = 940_000_000 + n * 7 % 59_999_999;
    loop {
        let digits: Vec<u64> = base
            .to_string()
            .bytes()
            .map(|b| u64::from(b - b'0'))
            .collect();
        let total: u64 = digits
            .iter()
            .enumerate()
            .map(|(i, d)| d * (10 - i as u64))
            .sum();
        let check = (11 - total % 11) % 11;
        if check != 10 {
            return format!("{base}{check}");
        }
        base += 1;
    }
}

fn message(kind: &str, conn: usize, i: usize, run: u64) -> String {
    let control = format!("B{run}C{conn}N{i}");
    let n = (conn as u64) * 10_000_000 + i as u64 + run % 1000 * 100_000;
    match kind {
        "a31" => format!(
            "MSH|^~\\&|BENCH|RXX|HUB|RXX|20310101120000||ADT^A31^ADT_A05|{control}|P|2.4\rEVN|A31|20310101{:02}{:02}00\rPID|1||{}^^^NHS^NH||Bench^Update{i}||19800101|F\rPV1|1|N\r",
            (i / 60) % 24,
            i % 60,
            nhs_number(conn as u64)
        ),
        "siu" => {
            // One-minute appointments from 08:00, 480 a day per practitioner.
            let minute = i % 480;
            let (h, m) = (8 + minute / 60, minute % 60);
            let (eh, em) = (8 + (minute + 1) / 60, (minute + 1) % 60);
            format!(
                "MSH|^~\\&|BENCH|RXX|HUB|RXX|20310101120000||SIU^S12^SIU_S12|{control}|P|2.5.1\rSCH|{control}^BENCH\rTQ1|1||||||20310{}{:02}{h:02}{m:02}00|20310{}{:02}{eh:02}{em:02}00\rPID|1||{}^^^NHS^NH||Bench^Siu||19800101|F\rRGS|1\rAIP|1||R{run}C{conn}D{}^Doc^Bench|||\r",
                1 + (i / 480 / 28) % 9,
                1 + (i / 480) % 28,
                1 + (i / 480 / 28) % 9,
                1 + (i / 480) % 28,
                nhs_number(n),
                i % 97,
            )
        }
        _ => format!(
            "MSH|^~\\&|BENCH|RXX|HUB|RXX|20310101120000||ADT^A28^ADT_A05|{control}|P|2.4\rEVN|A28|20310101120000\rPID|1||{}^^^NHS^NH||Bench^Patient{i}||19800101|F|||1 Bench Street^^Leeds^^LS1 1AA\rPV1|1|N\r",
            nhs_number(n)
        ),
    }
}

fn frame(m: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(m.len() + 3);
    v.push(0x0b);
    v.extend_from_slice(m.as_bytes());
    v.extend_from_slice(&[0x1c, 0x0d]);
    v
}

/// Read one framed ACK; returns whether it was AA/CA.
fn read_ack(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            return Ok(text.contains("MSA|AA") || text.contains("MSA|CA"));
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Stats {
    latencies: Vec<u64>,
    refused: usize,
}

fn run_conn(
    addr: &str,
    kind: &str,
    conn: usize,
    from: usize,
    count: usize,
    window: usize,
    run: u64,
) -> std::io::Result<Stats> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut stats = Stats {
        latencies: Vec::with_capacity(count),
        refused: 0,
    };
    let mut in_flight = std::collections::VecDeque::new();
    let mut next = 0;
    while next < count || !in_flight.is_empty() {
        while next < count && in_flight.len() < window.max(1) {
            s.write_all(&frame(&message(kind, conn, from + next, run)))?;
            in_flight.push_back(Instant::now());
            next += 1;
        }
        let ok = read_ack(&mut s, &mut buf)?;
        if let Some(t) = in_flight.pop_front() {
            stats.latencies.push(t.elapsed().as_micros() as u64);
        }
        if !ok {
            stats.refused += 1;
        }
    }
    Ok(stats)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let addr = get("--addr", "127.0.0.1:2575");
    let conns: usize = get("--connections", "4").parse().unwrap_or(4);
    let total: usize = get("--messages", "20000").parse().unwrap_or(20_000);
    let warmup: usize = get("--warmup", "500").parse().unwrap_or(500);
    let window: usize = get("--window", "1").parse().unwrap_or(1);
    let kind = get("--kind", "a28");
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 100_000);
    // Warm-up on one connection (not measured).
    if warmup > 0
        && let Err(e) = run_conn(&addr, &kind, 99, 0, warmup, window, run)
    {
        println!("{{\"error\":\"warm-up: {e}\"}}");
        std::process::exit(1);
    }
    let per = total / conns.max(1);
    let started = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let (addr, kind) = (addr.clone(), kind.clone());
            std::thread::spawn(move || run_conn(&addr, &kind, c, 0, per, window, run))
        })
        .collect();
    let mut lat = Vec::new();
    let mut refused = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => {
                lat.extend(s.latencies);
                refused += s.refused;
            }
            Ok(Err(e)) => {
                println!("{{\"error\":\"{e}\"}}");
                std::process::exit(1);
            }
            Err(_) => std::process::exit(1),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"kind\":\"{kind}\",\"connections\":{conns},\"window\":{window},\"messages\":{},\"seconds\":{secs:.3},\"msgs_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"not_accepted\":{refused}}}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(0)
    );
}
