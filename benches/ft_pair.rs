//! What replication costs: the kv guest through an FT pair against the same guest solo, in one
//! run (DESIGN §10): each simulated host's processes in a cgroup with the same CPU quota in
//! both runs (the client outside them), and the quota printed with the figures.
//!
//! Prints, as ratios pair/solo: redis-benchmark `-c 50` SET and GET at `-P 1` and `-P 16`;
//! the log's bytes per request and per second; the added latency at `-c 1` (p50, p99,
//! without quotas) against the channel's round trip measured in the same run; the backup's
//! lag p50/p99 under load.
//!
//! `cargo bench -p ftvm-benches --bench ft_pair` (root, /dev/kvm, redis-tools).
//! `FTVM_BENCH_QUOTA` (percent of one core per host, default 60), `FTVM_BENCH_N` (requests
//! per run, default 20000), `FTVM_BENCH_ROUNDS` (default 2), `FTVM_BENCH_PERF=DIR` (a `perf
//! record -g` of the solo node, the primary and the backup under load, into DIR).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_tests::netns::Host;
use ftvm_tests::node::RunningNode;
use ftvm_tests::pair::{PairLab, PairOptions};

/// A cgroup (v1 cpu controller) with a CPU quota: one simulated host.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn new(name: &str, percent: u64) -> Result<Cgroup> {
        let path = PathBuf::from(format!(
            "/sys/fs/cgroup/cpu/ftvm-bench-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("cgroup {}", path.display()))?;
        // A short period: with 100 ms, SET p99 is the throttle's gap (DESIGN §10).
        std::fs::write(path.join("cpu.cfs_period_us"), "10000")?;
        std::fs::write(path.join("cpu.cfs_quota_us"), (percent * 100).to_string())?;
        Ok(Cgroup { path })
    }
    fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes are gone by now; a cgroup with none can be removed.
        let _ = std::fs::remove_dir(&self.path);
    }
}

struct Bench {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn redis_benchmark(
    client: &Host,
    ip: std::net::Ipv4Addr,
    test: &str,
    n: u32,
    clients: u32,
    pipeline: u32,
) -> Result<Bench> {
    let o = client
        .ns
        .command("redis-benchmark")
        .args([
            "-h",
            &ip.to_string(),
            "-c",
            &clients.to_string(),
            "-n",
            &n.to_string(),
            "-P",
            &pipeline.to_string(),
        ])
        .args(["-r", "100000", "-t", test, "--csv"])
        .output()
        .context("redis-benchmark")?;
    let out = String::from_utf8_lossy(&o.stdout);
    for line in out.lines() {
        let f: Vec<&str> = line.split(',').map(|x| x.trim_matches('"')).collect();
        if f.len() >= 7 && f[0] == test.to_uppercase() {
            // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            return Ok(Bench {
                rps: f[1].parse()?,
                p50_ms: f[4].parse()?,
                p99_ms: f[6].parse()?,
            });
        }
    }
    bail!(
        "no result for {test} in {out:?} {}",
        String::from_utf8_lossy(&o.stderr)
    )
}

const CASES: &[(&str, u32)] = &[("set", 1), ("get", 1), ("set", 16), ("get", 16)];

fn throughput(lab: &PairLab, n: u32) -> Result<Vec<f64>> {
    CASES
        .iter()
        .map(|(t, p)| {
            let t0 = Instant::now();
            let r = redis_benchmark(&lab.client, lab.guest_ip, t, n, 50, *p).map(|b| b.rps);
            eprintln!("  {t} -P{p}: {:.1} s", t0.elapsed().as_secs_f64());
            r
        })
        .collect()
}

fn start_solo(lab: &PairLab) -> Result<RunningNode> {
    let a = lab.host("a");
    let args: Vec<String> = [
        "run",
        "--solo",
        "--guest",
        "kv",
        "--disk",
        &lab.disk("solo").display().to_string(),
        "--disk-size",
        "64M",
        "--tap",
        a.tap.as_deref().unwrap(),
        "--mac",
        a.guest_mac.as_deref().unwrap(),
        "--ip",
        &format!("{}/24", lab.guest_ip),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut n = RunningNode::start(&a.ns, &args)?;
    n.expect_line("kv: listening on", Duration::from_secs(60))?;
    // A solo run sends no gratuitous ARP: the fabric may still send the guest's MAC to the
    // host where the pair's primary ran.
    lab.lab.forget_macs()?;
    Ok(n)
}

struct Pair {
    primary: String,
    nodes: Vec<RunningNode>,
}

fn start_pair(lab: &mut PairLab) -> Result<Pair> {
    for n in ["a", "b"] {
        let _ = std::fs::remove_file(lab.disk(n));
        let _ = std::fs::remove_file(lab.disk(n).with_extension("img.ftvm-generation"));
    }
    let _ = std::fs::remove_dir_all(lab.path().join("witness-data"));
    lab.kill_witness();
    lab.start_witness()?;
    let mut a = lab.start_node("a", &[])?;
    let mut b = lab.start_node("b", &[])?;
    a.expect_line("kv: listening on", Duration::from_secs(60))?;
    b.expect_line("kv: listening on", Duration::from_secs(60))?;
    let primary = if lab.status("a")?["role"] == "primary" {
        "a"
    } else {
        "b"
    };
    Ok(Pair {
        primary: primary.into(),
        nodes: vec![a, b],
    })
}

/// CPU time (user + system, in clock ticks) of every thread of `pid`, by thread name.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime are fields 14 and 15; comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        *m.entry(comm).or_insert(0) += ticks;
    }
    m
}

/// Counts a process's KVM exits to the VMM (`kvm:kvm_userspace_exit`) and MMIO exits
/// (`kvm:kvm_mmio`) with `perf stat` while it runs; `None` where perf or its tracepoints are
/// missing.
struct ExitCounter(Option<std::process::Child>);

impl ExitCounter {
    fn start(pid: u32) -> ExitCounter {
        ExitCounter(perf(
            &["stat", "-x,", "-e", "kvm:kvm_userspace_exit,kvm:kvm_mmio"],
            pid,
            std::process::Stdio::piped(),
        ))
    }

    /// Stops counting: (exits to the VMM, MMIO exits).
    fn finish(self) -> Option<(u64, u64)> {
        let out = interrupt(self.0?)?;
        let text = String::from_utf8_lossy(&out.stderr);
        let count = |ev: &str| {
            text.lines()
                .find(|l| l.contains(ev))
                .and_then(|l| l.split(',').next())
                .and_then(|c| c.trim().parse::<u64>().ok())
        };
        Some((count("kvm_userspace_exit")?, count("kvm_mmio")?))
    }
}

/// `perf ARGS -p PID`, attached to a running process; `None` where perf cannot start.
fn perf(args: &[&str], pid: u32, stderr: std::process::Stdio) -> Option<std::process::Child> {
    std::process::Command::new("perf")
        .args(args)
        .arg("-p")
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .ok()
}

/// Stops a `perf` child as Ctrl-C would (it then writes its results) and collects its output.
fn interrupt(child: std::process::Child) -> Option<std::process::Output> {
    // SAFETY: kill(2) on our own child's pid, which it has not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait_with_output().ok()
}

/// With `FTVM_BENCH_PERF=DIR`, `perf record -g` of a process while it serves the load, into
/// `DIR/NAME.data` (for `perf report -i`); stopped by [`Profile::finish`].
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(pid: u32, name: &str) -> Profile {
        let Ok(dir) = std::env::var("FTVM_BENCH_PERF") else {
            return Profile(None);
        };
        let _ = std::fs::create_dir_all(&dir);
        let out = std::path::Path::new(&dir).join(format!("{name}.data"));
        let out = out.to_string_lossy();
        Profile(perf(
            &["record", "-g", "-F", "2000", "-o", &out],
            pid,
            std::process::Stdio::null(),
        ))
    }

    fn finish(self) {
        if let Some(child) = self.0 {
            let _ = interrupt(child);
        }
    }
}

/// `exits/request` for the printout.
fn per_request(exits: Option<(u64, u64)>, requests: f64) -> String {
    match exits {
        Some((u, m)) => format!(
            "{:.2} exits to the VMM per request ({:.2} MMIO)",
            u as f64 / requests,
            m as f64 / requests
        ),
        None => "exits not counted (no perf kvm tracepoints)".into(),
    }
}

/// UDP datagrams (received, sent) so far in `host`'s namespace (its `/proc/net/snmp`): the
/// channel's packets, on a node's host.
fn udp_datagrams(host: &Host) -> (u64, u64) {
    let Ok(o) = host.ns.command("cat").arg("/proc/net/snmp").output() else {
        return (0, 0);
    };
    let text = String::from_utf8_lossy(&o.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return (0, 0);
    };
    let field = |want: &str| {
        names
            .split_whitespace()
            .position(|n| n == want)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("InDatagrams"), field("OutDatagrams"))
}

/// The CPU each thread group used between two samples, in ms.
fn cpu_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let tick_ms = 1000.0 / 100.0; // USER_HZ
    let mut parts: Vec<String> = after
        .iter()
        .map(|(k, v)| {
            (
                k,
                (v - before.get(k).copied().unwrap_or(0)) as f64 * tick_ms,
            )
        })
        .filter(|(_, ms)| *ms > 0.0)
        .map(|(k, ms)| format!("{k} {ms:.0}"))
        .collect();
    parts.sort();
    parts.join(", ")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let quota: u64 = std::env::var("FTVM_BENCH_QUOTA")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let n: u32 = std::env::var("FTVM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rounds: usize = std::env::var("FTVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    ftvm_benches::build_bins(&[("vmm", "ftvm-node"), ("ftvm-witness", "ftvm-witness")])?;
    let mut lab = PairLab::new(PairOptions {
        disk_size: "64M".into(),
        failure_timeout: "500ms".into(),
        ..PairOptions::default()
    })?;
    let (ga, gb) = (Cgroup::new("a", quota)?, Cgroup::new("b", quota)?);
    let mut solo: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let mut ft: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let (mut bytes_per_req, mut bytes_per_s, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    // Requests per run of the four cases.
    let requests = n as f64 * CASES.len() as f64;
    for round in 0..rounds {
        // Solo, host a's quota.
        let s = start_solo(&lab)?;
        ga.add(s.pid())?;
        let (c0, t0) = (thread_cpu(s.pid()), Instant::now());
        let exits = ExitCounter::start(s.pid());
        let prof = Profile::start(s.pid(), "solo");
        for (i, r) in throughput(&lab, n)?.into_iter().enumerate() {
            solo[i].push(r);
        }
        prof.finish();
        eprintln!(
            "  CPU ms by thread, solo, {:.1} s: {}; {}",
            t0.elapsed().as_secs_f64(),
            cpu_delta(&c0, &thread_cpu(s.pid())),
            per_request(exits.finish(), requests)
        );
        drop(s);
        let _ = std::fs::remove_file(lab.disk("solo"));
        // The pair, each node in its host's quota.
        let p = start_pair(&mut lab)?;
        ga.add(p.nodes[0].pid())?;
        gb.add(p.nodes[1].pid())?;
        let before = lab.status(&p.primary)?;
        let cpu0: Vec<_> = p.nodes.iter().map(|n| thread_cpu(n.pid())).collect();
        let primary_host = &lab.nodes[if p.primary == "a" { 0 } else { 1 }];
        let udp0 = udp_datagrams(primary_host);
        let exits: Vec<_> = p
            .nodes
            .iter()
            .map(|n| ExitCounter::start(n.pid()))
            .collect();
        let profs: Vec<_> = p
            .nodes
            .iter()
            .zip(["a", "b"])
            .map(|(n, name)| {
                let role = if name == p.primary {
                    "primary"
                } else {
                    "backup"
                };
                Profile::start(n.pid(), role)
            })
            .collect();
        let t0 = Instant::now();
        // Sample the lag while the -P 16 SET runs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let cfg = lab.config(&p.primary);
            std::thread::spawn(move || {
                let mut v = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(o) =
                        std::process::Command::new(ftvm_tests::node::node_binary().unwrap())
                            .args(["status", "--json", "--config"])
                            .arg(&cfg)
                            .output()
                    {
                        if let Ok(j) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                            v.push(j["lag_ms"].as_f64().unwrap_or(0.0));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                v
            })
        };
        let r = throughput(&lab, n)?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        lag.extend(sampler.join().unwrap());
        let secs = t0.elapsed().as_secs_f64();
        let exits: Vec<_> = exits.into_iter().map(ExitCounter::finish).collect();
        profs.into_iter().for_each(Profile::finish);
        for (i, n) in p.nodes.iter().enumerate() {
            let name = ["a", "b"][i];
            let role = if name == p.primary {
                "primary"
            } else {
                "backup"
            };
            eprintln!(
                "  CPU ms by thread, {name} ({role}), {secs:.1} s: {}; {}",
                cpu_delta(&cpu0[i], &thread_cpu(n.pid())),
                per_request(exits[i], requests)
            );
        }
        let udp1 = udp_datagrams(primary_host);
        eprintln!(
            "  the primary's UDP datagrams per request: {:.2} sent, {:.2} received",
            (udp1.1 - udp0.1) as f64 / requests,
            (udp1.0 - udp0.0) as f64 / requests
        );
        let after = lab.status(&p.primary)?;
        let boundaries =
            after["boundary"].as_u64().unwrap_or(0) - before["boundary"].as_u64().unwrap_or(0);
        eprintln!(
            "  the primary's boundaries per request: {:.2}",
            boundaries as f64 / requests
        );
        let bytes =
            after["log_bytes"].as_u64().unwrap_or(0) - before["log_bytes"].as_u64().unwrap_or(0);
        bytes_per_req.push(bytes as f64 / requests);
        bytes_per_s.push(bytes as f64 / secs);
        for (i, x) in r.into_iter().enumerate() {
            ft[i].push(x);
        }
        drop(p);
        eprintln!("round {} of {rounds} done", round + 1);
    }
    // Latency at -c 1, no quotas (DESIGN §10): solo, then the pair, with the channel's RTT.
    let s = start_solo(&lab)?;
    let solo_lat = redis_benchmark(&lab.client, lab.guest_ip, "set", 3000, 1, 1)?;
    drop(s);
    let _ = std::fs::remove_file(lab.disk("solo"));
    let mut p = start_pair(&mut lab)?;
    let pair_lat = redis_benchmark(&lab.client, lab.guest_ip, "set", 3000, 1, 1)?;
    let rtt_ms = lab.status(&p.primary)?["channel_rtt_ms"]
        .as_f64()
        .unwrap_or(0.0);
    let get_bytes = {
        let before = lab.status(&p.primary)?["log_bytes"].as_u64().unwrap_or(0);
        redis_benchmark(&lab.client, lab.guest_ip, "get", 5000, 10, 1)?;
        (lab.status(&p.primary)?["log_bytes"].as_u64().unwrap_or(0) - before) as f64 / 5000.0
    };
    p.nodes.clear();

    println!("ft_pair: the kv guest through an FT pair vs solo, redis-benchmark -c 50, n={n}, {rounds} round(s), medians");
    println!("  CPU quota: {quota}% of one core per simulated host (cgroup v1, 10 ms period), client unthrottled");
    println!(
        "  {:<10} {:>12} {:>12} {:>8}",
        "case", "solo req/s", "pair req/s", "pair/solo"
    );
    for (i, (t, pl)) in CASES.iter().enumerate() {
        let (s, f) = (median(&mut solo[i]), median(&mut ft[i]));
        println!(
            "  {:<10} {:>12.0} {:>12.0} {:>8.3}",
            format!("{} -P{pl}", t.to_uppercase()),
            s,
            f,
            f / s
        );
    }
    println!(
        "  log: {:.1} bytes/request (all four cases), {:.0} bytes/s; GET only: {get_bytes:.1} bytes/request (block reads are not on the channel)",
        median(&mut bytes_per_req),
        median(&mut bytes_per_s)
    );
    println!(
        "  latency -c 1 SET (no quota): solo p50 {:.3} ms p99 {:.3} ms; pair p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms = {:.2} x channel RTT ({rtt_ms:.3} ms)",
        solo_lat.p50_ms,
        solo_lat.p99_ms,
        pair_lat.p50_ms,
        pair_lat.p99_ms,
        pair_lat.p50_ms - solo_lat.p50_ms,
        if rtt_ms > 0.0 { (pair_lat.p50_ms - solo_lat.p50_ms) / rtt_ms } else { f64::NAN }
    );
    if !lag.is_empty() {
        let p50 = pct(&mut lag, 0.5);
        let p99 = pct(&mut lag, 0.99);
        println!(
            "  backup lag under load: p50 {p50:.2} ms p99 {p99:.2} ms ({} samples)",
            lag.len()
        );
    }
    Ok(())
}
