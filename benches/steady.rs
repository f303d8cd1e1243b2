//! No spurious failover under full load: the pair runs `redis-benchmark` back to back (`-c 50`
//! `-P 16`, SET and GET) for `FTVM_BENCH_MINUTES` (default 10) with the default timeouts of
//! node.toml (heartbeat 10 ms, failure_timeout 200 ms; `FTVM_BENCH_HEARTBEAT` and
//! `FTVM_BENCH_TIMEOUT` change them), no CPU quota, everything on this machine's 2 cores.
//!
//! Every second it reads both nodes' status: the roles must stay primary and backup, the
//! generation must not change and no failover may be counted. Prints the requests served, the
//! throughput, the heartbeats missed on each side and the worst lag seen, then exits 1 if any
//! failover happened (with the report of it).
//!
//! `cargo bench -p ftvm-benches --bench steady` (root, /dev/kvm, redis-tools).

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_tests::pair::{PairLab, PairOptions};

fn main() -> Result<()> {
    let minutes: f64 = std::env::var("FTVM_BENCH_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    ftvm_benches::build_bins(&[("vmm", "ftvm-node"), ("ftvm-witness", "ftvm-witness")])?;
    let mut opts = PairOptions {
        heartbeat: "10ms".into(),
        failure_timeout: "200ms".into(),
        // Room for redis-benchmark's 100,000 keys: a 16M disk keeps the kv guest compacting.
        disk_size: "256M".into(),
        mem: "128M".into(),
        ..PairOptions::default()
    };
    if let Ok(v) = std::env::var("FTVM_BENCH_HEARTBEAT") {
        opts.heartbeat = v;
    }
    if let Ok(v) = std::env::var("FTVM_BENCH_TIMEOUT") {
        opts.failure_timeout = v;
    }
    let mut lab = PairLab::new(opts.clone())?;
    let (pn, _p, bn, _b) = lab.start_pair("kv: listening on")?;
    let gen0 = lab.status(&pn)?["generation"].clone();
    println!(
        "steady: {minutes} min of redis-benchmark -c 50 -P 16 (SET, GET) through the pair, heartbeat {}, failure_timeout {}, no quota",
        opts.heartbeat, opts.failure_timeout
    );
    let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let ip = lab.guest_ip.to_string();
    let mut bench = lab
        .client
        .ns
        .command("sh")
        .args([
            "-c",
            &format!(
                "while :; do redis-benchmark -h {ip} -c 50 -P 16 -n 1000000 -r 100000 -t set,get --csv || exit 1; done"
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("redis-benchmark loop")?;
    let out = bench.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut rps = Vec::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let f: Vec<&str> = line.split(',').map(|x| x.trim_matches('"')).collect();
            if f.len() >= 2 && (f[0] == "SET" || f[0] == "GET") {
                if let Ok(v) = f[1].parse::<f64>() {
                    rps.push(v);
                }
            }
        }
        rps
    });
    let started = Instant::now();
    let mut worst_lag = 0f64;
    let mut bad = None;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
        let (sp, sb) = match (lab.status(&pn), lab.status(&bn)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                bad = Some(format!(
                    "after {:.0} s: {e:#}",
                    started.elapsed().as_secs_f64()
                ));
                break;
            }
        };
        worst_lag = worst_lag.max(sp["lag_ms"].as_f64().unwrap_or(0.0));
        let ok = sp["role"] == "primary"
            && sb["role"] == "backup"
            && sp["generation"] == gen0
            && sb["generation"] == gen0
            && sp["failovers"] == 0
            && sb["failovers"] == 0;
        if !ok {
            bad = Some(format!(
                "after {:.0} s: {pn} {} gen {} failovers {} ({}), {bn} {} gen {} failovers {} ({})",
                started.elapsed().as_secs_f64(),
                sp["role"],
                sp["generation"],
                sp["failovers"],
                sp["last_failover"],
                sb["role"],
                sb["generation"],
                sb["failovers"],
                sb["last_failover"]
            ));
            break;
        }
        if let Some(st) = bench.try_wait()? {
            bad = Some(format!("redis-benchmark failed ({st})"));
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The loop and its redis-benchmark, which holds the pipe open.
    // SAFETY: kill(2) on the process group this bench created; no memory is involved.
    unsafe { libc::kill(-(bench.id() as i32), libc::SIGKILL) };
    let _ = bench.wait();
    let rps = reader.join().unwrap_or_default();
    if let Some(why) = bad {
        bail!("spurious failover or failure: {why}\n{}", lab.logs(60));
    }
    let (sp, sb) = (lab.status(&pn)?, lab.status(&bn)?);
    println!(
        "  ran {elapsed:.0} s, {} redis-benchmark results, mean {:.0} req/s",
        rps.len(),
        rps.iter().sum::<f64>() / rps.len().max(1) as f64
    );
    println!(
        "  heartbeats missed: {pn} (primary) {}, {bn} (backup) {}; worst lag sampled {worst_lag:.1} ms",
        sp["heartbeats_missed"], sb["heartbeats_missed"]
    );
    println!("  spurious failovers: 0 (roles and generation {gen0} unchanged throughout)");
    Ok(())
}
