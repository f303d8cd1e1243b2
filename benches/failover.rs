//! The cost of a failover, over many trials: `kill -9` of the primary under a steady client
//! (one connection, one request at a time, as the checker of acknowledged writes does).
//!
//! Prints p50/p99/max of our part (detection, catch-up, claim, go-live — from the survivor's
//! own report) and of the gap the client observed between two replies, with the timeouts
//! used, and counts trials with a lost write or a client error (must be 0). DESIGN §10: the
//! client's gap has TCP's retransmission timeout (≥ 200 ms) as its floor.
//!
//! `cargo bench -p ftvm-benches --bench failover` (root, /dev/kvm, redis-tools);
//! `FTVM_BENCH_TRIALS` (default 20); the timeouts are the `kill -9` tests' (heartbeat 5 ms,
//! failure_timeout 60 ms) unless `FTVM_BENCH_HEARTBEAT` / `FTVM_BENCH_TIMEOUT` say otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ftvm_tests::checker::{start_writer, verify};
use ftvm_tests::pair::{PairLab, PairOptions};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Trial {
    parts: [f64; 4],
    ours: f64,
    gap: f64,
    bad: bool,
}

fn trial(opts: &PairOptions) -> Result<Trial> {
    let mut lab = PairLab::new(opts.clone())?;
    lab.start_witness()?;
    let mut a = lab.start_node("a", &[])?;
    let mut b = lab.start_node("b", &[])?;
    a.expect_line("kv: listening on", Duration::from_secs(60))?;
    b.expect_line("kv: listening on", Duration::from_secs(60))?;
    let (primary, bn) = if lab.status("a")?["role"] == "primary" {
        (a, "b")
    } else {
        (b, "a")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(
        &lab.client.ns,
        lab.guest_ip,
        "f",
        stop.clone(),
        Duration::from_secs(20),
    )?;
    std::thread::sleep(Duration::from_millis(700));
    primary.kill9();
    let t = Instant::now();
    let s = loop {
        let s = lab.status(bn)?;
        if s["role"] == "alone" {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("no failover: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    let hist = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let v = verify(&lab.client.ns, lab.guest_ip, &hist)?;
    let f = &s["last_failover"];
    let g = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    let parts = [
        g("detection_ms"),
        g("catch_up_ms"),
        g("claim_ms"),
        g("go_live_ms"),
    ];
    Ok(Trial {
        ours: parts.iter().sum(),
        parts,
        gap: hist.max_gap.as_secs_f64() * 1e3,
        bad: !v.ok() || hist.client_error.is_some(),
    })
}

fn main() -> Result<()> {
    let trials: usize = std::env::var("FTVM_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    ftvm_benches::build_bins(&[("vmm", "ftvm-node"), ("ftvm-witness", "ftvm-witness")])?;
    // The timeouts of the run (default: those of the kill -9 tests, 5 ms and 60 ms):
    // FTVM_BENCH_HEARTBEAT, FTVM_BENCH_TIMEOUT.
    let mut opts = PairOptions::fast_failover();
    if let Ok(v) = std::env::var("FTVM_BENCH_HEARTBEAT") {
        opts.heartbeat = v;
    }
    if let Ok(v) = std::env::var("FTVM_BENCH_TIMEOUT") {
        opts.failure_timeout = v;
    }
    let mut rs = Vec::new();
    for i in 0..trials {
        match trial(&opts) {
            Ok(t) => rs.push(t),
            Err(e) => eprintln!("trial {i}: {e:#}"),
        }
        eprintln!("trial {} of {trials} done", i + 1);
    }
    if rs.is_empty() {
        bail!("no trial completed");
    }
    println!(
        "failover: kill -9 of the primary under a one-connection client, {} trials (heartbeat {}, failure_timeout {})",
        rs.len(),
        opts.heartbeat,
        opts.failure_timeout
    );
    let row = |name: &str, mut v: Vec<f64>| {
        let (p50, p99, max) = (pct(&mut v, 0.5), pct(&mut v, 0.99), pct(&mut v, 1.0));
        println!("  {name:<28} p50 {p50:>8.1} ms   p99 {p99:>8.1} ms   max {max:>8.1} ms");
    };
    for (i, name) in ["detection", "catch-up", "claim", "go-live"]
        .iter()
        .enumerate()
    {
        row(
            &format!("our part: {name}"),
            rs.iter().map(|t| t.parts[i]).collect(),
        );
    }
    row("our part: total", rs.iter().map(|t| t.ours).collect());
    row(
        "client gap between replies",
        rs.iter().map(|t| t.gap).collect(),
    );
    println!(
        "  trials with a lost write or a client error: {} of {}",
        rs.iter().filter(|t| t.bad).count(),
        rs.len()
    );
    Ok(())
}
