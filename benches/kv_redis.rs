//! The kv guest under stock `redis-benchmark`: SET and GET throughput with `-P 1` and `-P 16`
//! (50 clients), and VM exits per request, against two baselines measured in the same run:
//!
//! - `redis-server` (Debian's 7.0) with the same durability — `appendonly yes`,
//!   `appendfsync always`: every write is on the disk before its reply — in the node's
//!   namespace, reached from the client namespace over the same bridge as the VM;
//! - the same engine (kvcore) running natively there, with the same durability (one
//!   `fdatasync` per group commit).
//!
//! Besides throughput it prints each server's CPU time per request (user + system, for the VM
//! the whole ftvm-node process including guest mode), which load from elsewhere on the
//! machine disturbs much less than throughput. Each figure is the median of five rounds; the order of the three servers rotates from
//! round to round, so load from elsewhere on the machine falls on all of them alike.
//!
//! `cargo bench -p ftvm-benches --bench kv_redis` (needs root, iproute2, redis-tools,
//! redis-server, KVM). With `FTVM_KV_BEFORE=path/to/kv.elf` a second kv guest image (e.g. one
//! built from an older commit) is measured in the same rounds, for before/after tables (its
//! ratios in the `before` rows are against the same baselines); `FTVM_KV_BEFORE_NODE` names
//! an older `ftvm-node` to run that image with.

use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_tests::netns::{Host, Lab};
use ftvm_tests::node::{in_netns, redis_text, RunningNode};

const ROUNDS: usize = 5;
/// Keys SET before a GET run, so that GETs find values.
const PRELOAD: u32 = 10_000;

fn redis_benchmark(
    client: &Host,
    ip: std::net::Ipv4Addr,
    test: &str,
    n: u32,
    pipeline: u32,
) -> Result<f64> {
    let o = client
        .ns
        .command("redis-benchmark")
        .args([
            "-h",
            &ip.to_string(),
            "-c",
            "50",
            "-n",
            &n.to_string(),
            "-P",
            &pipeline.to_string(),
        ])
        .args(["-t", test, "--csv"])
        .output()
        .context("redis-benchmark")?;
    let out = String::from_utf8_lossy(&o.stdout);
    for line in out.lines() {
        let f: Vec<&str> = line.split(',').map(|x| x.trim_matches('"')).collect();
        if f.len() > 1 && f[0] == test.to_uppercase() {
            return Ok(f[1].parse()?);
        }
    }
    bail!(
        "no result for {test} in {out:?} {}",
        String::from_utf8_lossy(&o.stderr)
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Vm,
    /// The image named by `FTVM_KV_BEFORE`.
    Before,
    Redis,
    Native,
}

/// `redis-server` in `node`'s namespace on its address, durable like the kv guest; killed on
/// drop.
struct RedisServer {
    child: Child,
}

impl RedisServer {
    fn start(node: &Host, dir: &std::path::Path) -> Result<RedisServer> {
        let child = node
            .ns
            .command("redis-server")
            .args(["--bind", &node.ip.to_string(), "--port", "6379"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (scripts/setup installs it)")?;
        let server = RedisServer { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if matches!(redis_text(&node.ns, node.ip, &["PING"]), Ok(t) if t == "PONG") {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, including a vCPU's time in guest mode) `pid` has used, in µs.
fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz * 1e6)
}

/// The process whose command line has `arg` as one of its arguments.
fn pid_with_arg(arg: &str) -> Result<u32> {
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd.split(|&b| b == 0).any(|a| a == arg.as_bytes()) {
                return Ok(pid);
            }
        }
    }
    bail!("no process with argument {arg}")
}

/// What one run measured.
struct Figures {
    rps: f64,
    /// The server's CPU time per request, µs.
    cpu_us: f64,
    /// For a VM: boundaries (exits) per request.
    exits: Option<f64>,
}

/// One measurement: requests per second, the server's CPU per request, and for the VM the
/// boundaries (exits) per request.
fn measure(
    server: Server,
    node: &Host,
    client: &Host,
    dir: &std::path::Path,
    run: usize,
    (t, p, n): (&str, u32, u32),
) -> Result<Figures> {
    let preload = t == "get";
    // Requests per second and the server's CPU µs per request of the measured test.
    let bench = |ip, pid: u32| -> Result<(f64, f64)> {
        if preload {
            redis_benchmark(client, ip, "set", PRELOAD, 16)?;
        }
        let cpu0 = cpu_us(pid)?;
        let rps = redis_benchmark(client, ip, t, n, p)?;
        Ok((rps, (cpu_us(pid)? - cpu0) / n as f64))
    };
    match server {
        Server::Vm | Server::Before => {
            let disk = dir.join(format!("vm-{run}.img"));
            let mut vm = if server == Server::Vm {
                RunningNode::kv(node, &disk, &[])?
            } else {
                let image = std::env::var("FTVM_KV_BEFORE").context("FTVM_KV_BEFORE")?;
                let args: Vec<String> = [
                    "run",
                    "--solo",
                    "--guest",
                    &image,
                    "--disk",
                    &disk.display().to_string(),
                    "--disk-size",
                    "16M",
                    "--tap",
                    node.tap.as_deref().context("a node")?,
                    "--mac",
                    node.guest_mac.as_deref().context("a node")?,
                    "--ip",
                    &node.guest_cidr().context("a node")?,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                // FTVM_KV_BEFORE_NODE: an older ftvm-node to run it with (the harness takes
                // the binary from FTVM_NODE; nothing else runs while it is set).
                let before_node = std::env::var_os("FTVM_KV_BEFORE_NODE");
                let saved = std::env::var_os("FTVM_NODE");
                if let Some(b) = &before_node {
                    std::env::set_var("FTVM_NODE", b);
                }
                let started = RunningNode::start(&node.ns, &args);
                if before_node.is_some() {
                    match saved {
                        Some(v) => std::env::set_var("FTVM_NODE", v),
                        None => std::env::remove_var("FTVM_NODE"),
                    }
                }
                started?
            };
            vm.expect_line("kv: listening on", Duration::from_secs(60))?;
            let pid = pid_with_arg(&disk.display().to_string())?;
            let (rps, cpu) = bench(node.guest_ip.context("a node")?, pid)?;
            vm.signal(libc::SIGTERM);
            let (_, err) = vm.wait(Duration::from_secs(10))?;
            let bounds: f64 = err
                .split("passed ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .context("boundary count")?;
            let requests = n as f64 + if preload { PRELOAD as f64 } else { 0.0 };
            Ok(Figures {
                rps,
                cpu_us: cpu,
                exits: Some(bounds / requests),
            })
        }
        Server::Redis => {
            let d = dir.join(format!("redis-{run}"));
            std::fs::create_dir_all(&d)?;
            let r = RedisServer::start(node, &d)?;
            let (rps, cpu) = bench(node.ip, r.child.id())?;
            Ok(Figures {
                rps,
                cpu_us: cpu,
                exits: None,
            })
        }
        Server::Native => {
            let disk_path = dir.join(format!("native-{run}.img"));
            let disk = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&disk_path)?;
            disk.set_len(64 << 20)?;
            let stop = Arc::new(AtomicBool::new(false));
            let addr = std::net::SocketAddr::from((node.ip, 6379));
            let listener = in_netns(&node.ns, move || TcpListener::bind(addr))??;
            let (store, log, _) = kvcore::host::recover(&disk, 64 << 20)?;
            let s2 = stop.clone();
            let th =
                std::thread::spawn(move || kvcore::host::serve(listener, &disk, store, log, &s2));
            // The server is a thread of this otherwise idle process.
            let r = bench(node.ip, std::process::id());
            stop.store(true, Ordering::Relaxed);
            th.join()
                .map_err(|_| anyhow::anyhow!("native server panicked"))??;
            let (rps, cpu) = r?;
            Ok(Figures {
                rps,
                cpu_us: cpu,
                exits: None,
            })
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    ftvm_tests::netns::preflight()?;
    ftvm_benches::build_bins(&[("vmm", "ftvm-node")])?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node")?;
    let client = lab.add_host("client")?;
    let dir = tempfile::tempdir()?;
    let cases = [
        ("set", 1, 20_000),
        ("get", 1, 20_000),
        ("set", 16, 200_000),
        ("get", 16, 200_000),
    ];
    let mut servers = vec![Server::Vm, Server::Redis, Server::Native];
    if std::env::var_os("FTVM_KV_BEFORE").is_some() {
        servers.push(Server::Before);
    }
    // rps[case][server]: one figure per round; the same for CPU per request and exits.
    let mut rps = vec![vec![Vec::new(); servers.len()]; cases.len()];
    let mut cpu = vec![vec![Vec::new(); servers.len()]; cases.len()];
    let mut exits = vec![vec![Vec::new(); servers.len()]; cases.len()];
    let mut run = 0;
    for round in 0..ROUNDS {
        for (ci, case) in cases.iter().enumerate() {
            for k in 0..servers.len() {
                let si = (k + round) % servers.len();
                run += 1;
                let f = measure(servers[si], &node, &client, dir.path(), run, *case)?;
                rps[ci][si].push(f.rps);
                cpu[ci][si].push(f.cpu_us);
                if let Some(e) = f.exits {
                    exits[ci][si].push(e);
                }
            }
        }
    }

    println!(
        "kv under redis-benchmark, 50 clients, median of {ROUNDS} rounds (server order rotated \
         each round); baselines: redis-server (appendonly yes, appendfsync always) and the \
         same engine natively, both in the node's namespace on the same bridge"
    );
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>9} {:>10} {:>8} {:>8} {:>8} {:>10}",
        "test",
        "VM req/s",
        "redis req/s",
        "native req/s",
        "vs redis",
        "vs native",
        "VM cpu",
        "redis",
        "native",
        "exits/req"
    );
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "", "", "", "", "", "", "µs/req", "µs/req", "µs/req"
    );
    let row = |name: &str, rps: f64, base: (f64, f64), cpu: [f64; 3], exits: f64| {
        println!(
            "{:<10} {:>10.0} {:>12.0} {:>12.0} {:>9.2} {:>10.2} {:>8.1} {:>8.1} {:>8.1} {:>10.3}",
            name,
            rps,
            base.0,
            base.1,
            rps / base.0,
            rps / base.1,
            cpu[0],
            cpu[1],
            cpu[2],
            exits
        )
    };
    for (ci, (t, p, _)) in cases.iter().enumerate() {
        let raw = format!("{:?}", rps[ci]);
        // Each round's VM/redis ratio: the two ran seconds apart, so drift in the
        // machine's speed from round to round (large here) cancels out of it.
        let mut per_round: Vec<f64> = rps[ci][0]
            .iter()
            .zip(&rps[ci][1])
            .map(|(vm, redis)| vm / redis)
            .collect();
        let shown: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
        let m = |v: &mut Vec<f64>| median(v);
        let base = (m(&mut rps[ci][1]), m(&mut rps[ci][2]));
        let (cr, cn) = (m(&mut cpu[ci][1]), m(&mut cpu[ci][2]));
        row(
            &format!("{} -P {p}", t.to_uppercase()),
            m(&mut rps[ci][0]),
            base,
            [m(&mut cpu[ci][0]), cr, cn],
            m(&mut exits[ci][0]),
        );
        if servers.len() > 3 {
            row(
                "  before",
                m(&mut rps[ci][3]),
                base,
                [m(&mut cpu[ci][3]), cr, cn],
                m(&mut exits[ci][3]),
            );
        }
        println!("           req/s each round, per server (VM, redis, native[, before]): {raw}");
        println!(
            "           VM/redis each round: [{}], median {:.2}",
            shown.join(", "),
            median(&mut per_round)
        );
    }
    Ok(())
}
