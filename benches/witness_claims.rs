//! Witness claim latency and throughput against a local `ftvm-witness` process, for both
//! stores in one run: rocksdb, then etcd (a real 3-member etcd cluster on loopback, Debian's
//! `etcd-server`; skipped with a note if `etcd` is not installed).
//!
//! Run: `cargo bench -p ftvm-benches --bench witness_claims`
//!
//! The benchmark re-executes itself as the witness process (the same library code the
//! `ftvm-witness` binary runs: real QUIC with mutual TLS, real rocksdb with a synced write
//! per grant, or one etcd transaction per batch) on 127.0.0.1, then measures from this
//! process, for each store:
//!
//! * baseline: `ping` round trips (QUIC request/ack through the same service, no state, no
//!   rocksdb) and `status` queries (authorization + state read, no rocksdb);
//! * claims: one node claiming over and over as the holder (each claim is a new grant, so
//!   each one waits for a synced rocksdb write), median / p99 / claims per second;
//! * throughput: 16 nodes of 16 pairs claiming at once (grants share synced writes).
//!
//! Every phase is bounded in count and time; the whole run takes about a minute.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_witness::config::{EtcdConfig, PairConfig, StoreConfig};
use ftvm_witness::{ClaimId, ClaimOutcome, ClientOptions, Config, WitnessClient};

#[path = "../witness/tests/common/etcd.rs"]
#[allow(dead_code)]
mod etcd_cluster;

const CHILD_ENV: &str = "FTVM_WITNESS_BENCH_CHILD";
const PAIRS: usize = 16;

fn main() -> anyhow::Result<()> {
    if let Ok(cfg) = std::env::var(CHILD_ENV) {
        return child(Path::new(&cfg));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(parent())
}

/// The witness process.
fn child(cfg_path: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cfg = Config::load(cfg_path)?;
        let server = ftvm_witness::Server::start(&cfg, true).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {}", server.local_addr()?)?;
        out.flush()?;
        drop(out);
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await?;
        server.shutdown().await;
        anyhow::Ok(())
    })
}

fn stats(name: &str, mut v: Vec<Duration>, wall: Duration) -> f64 {
    v.sort();
    let n = v.len();
    let med = v[n / 2];
    let p99 = v[((n * 99) / 100).min(n - 1)];
    let per_s = n as f64 / wall.as_secs_f64();
    println!(
        "  {name:<34} n={n:>5}  median {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} /s",
        med.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        per_s
    );
    med.as_secs_f64()
}

async fn timed<F, Fut>(
    max_n: usize,
    max_t: Duration,
    mut f: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let mut v = Vec::with_capacity(max_n);
    for i in 0..max_n {
        let t = Instant::now();
        f(i).await?;
        v.push(t.elapsed());
        if start.elapsed() > max_t {
            break;
        }
    }
    Ok((v, start.elapsed()))
}

/// Medians of one store's run, in seconds.
struct Medians {
    ping: f64,
    status: f64,
    claim: f64,
}

async fn parent() -> anyhow::Result<()> {
    let run_start = Instant::now();
    let dir = tempfile::tempdir()?;
    let nodes: Vec<String> = (0..PAIRS).map(|i| format!("node-{i}")).collect();
    let mut names: Vec<&str> = vec!["witness"];
    names.extend(nodes.iter().map(String::as_str));
    ftvm_tls::init_dir(dir.path(), &names)?;

    let rocks = run_store(
        dir.path(),
        &nodes,
        StoreConfig::Rocksdb,
        "rocksdb synced per grant",
    )
    .await?;

    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let have_etcd = Command::new(etcd_cluster::etcd_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let etcd = if have_etcd {
        let cluster = etcd_cluster::EtcdCluster::start(&etcd_dir, 3);
        let endpoints: Vec<String> = cluster
            .endpoints_toml()
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|e| e.trim_matches('"').to_string())
            .collect();
        let store = StoreConfig::Etcd(EtcdConfig {
            endpoints,
            prefix: "/bench/".into(),
            timeout_ms: Some(5000),
            startup_timeout_ms: None,
            ca: None,
            cert: None,
            key: None,
        });
        let m = run_store(
            dir.path(),
            &nodes,
            store,
            "etcd: 3 members on loopback, one transaction per batch",
        )
        .await?;
        drop(cluster);
        Some(m)
    } else {
        println!(
            "etcd: skipped, `{}` not found (scripts/setup installs etcd-server)",
            etcd_cluster::etcd_bin()
        );
        None
    };

    println!("ratios:");
    println!(
        "  rocksdb claim median / ping median   = {:>6.1}x",
        rocks.claim / rocks.ping
    );
    println!(
        "  rocksdb claim median / status median = {:>6.1}x",
        rocks.claim / rocks.status
    );
    println!("  (the difference is mostly the synced rocksdb write: fsync of the WAL)");
    if let Some(e) = etcd {
        println!(
            "  etcd claim median / ping median      = {:>6.1}x",
            e.claim / e.ping
        );
        println!(
            "  etcd status median / ping median     = {:>6.1}x  (every status is confirmed by etcd)",
            e.status / e.ping
        );
        println!(
            "  etcd claim median / rocksdb claim    = {:>6.1}x",
            e.claim / rocks.claim
        );
    }
    println!(
        "witness_claims: done in {:.1} s",
        run_start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts a witness process on `store` and measures it.
async fn run_store(
    dir: &Path,
    nodes: &[String],
    store: StoreConfig,
    what: &str,
) -> anyhow::Result<Medians> {
    let mut pairs = std::collections::BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        pairs.insert(
            format!("vm{i}"),
            PairConfig {
                nodes: vec![n.clone()],
            },
        );
    }
    let kind = store.kind();
    let cfg = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join(format!("data-{kind}")),
        tls_dir: dir.to_path_buf(),
        identity: "witness".into(),
        metrics_listen: None,
        idle_timeout_ms: None,
        store,
        pairs,
    };
    let cfg_path = dir.join(format!("witness-{kind}.toml"));
    std::fs::write(&cfg_path, cfg.to_toml())?;

    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, &cfg_path)
        .env("FTVM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the witness process")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let addr: SocketAddr = match line.strip_prefix("ready ") {
        Some(a) => a.trim().parse()?,
        None => bail!("witness process did not start: {line:?}"),
    };

    let opts = ClientOptions {
        attempt_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let mut clients = Vec::new();
    for n in nodes {
        let id = ftvm_tls::Identity::load(dir, n)?;
        let c = WitnessClient::new(addr, &id, opts.clone())?;
        c.ping().await?;
        clients.push(Arc::new(c));
    }
    let c0 = clients[0].clone();
    // Warm up.
    for _ in 0..200 {
        c0.ping().await?;
    }

    println!("witness_claims [{kind}]: local ftvm-witness process on {addr} (QUIC + mTLS, {what})");
    println!("baseline (same run, same connection):");
    let (v, wall) = timed(3000, Duration::from_secs(4), |_| {
        let c = c0.clone();
        async move { Ok(c.ping().await?) }
    })
    .await?;
    let ping_med = stats("ping (QUIC request/ack, no state)", v, wall);
    let (v, wall) = timed(3000, Duration::from_secs(4), |_| {
        let c = c0.clone();
        async move {
            c.status("vm0").await?;
            Ok(())
        }
    })
    .await?;
    let status_med = stats("status (auth + state read)", v, wall);

    println!("claims (each a new grant, durable in the store before the reply):");
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (v, wall) = timed(2000, Duration::from_secs(10), |_| {
        let c = c0.clone();
        let g = generation.clone();
        async move {
            let seen = g.load(std::sync::atomic::Ordering::Relaxed);
            match c.claim("vm0", seen, ClaimId::random()).await? {
                ClaimOutcome::Granted { generation } => {
                    g.store(generation, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
                d => bail!("unexpected denial {d:?}"),
            }
        }
    })
    .await?;
    let claim_med = stats("claim, 1 client", v, wall);
    let (v, wall) = timed(3000, Duration::from_secs(4), |_| {
        let c = clients[1].clone();
        async move {
            match c.claim("vm1", u64::MAX - 1, ClaimId::random()).await? {
                ClaimOutcome::Denied { .. } => Ok(()),
                g => bail!("unexpected grant {g:?}"),
            }
        }
    })
    .await?;
    stats("denied claim (no write)", v, wall);

    // Throughput: every node claims its own pair in a loop, all at once.
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let pair = format!("vm{i}");
        set.spawn(async move {
            let mut seen = c.status(&pair).await?.generation;
            let mut lat = Vec::new();
            while Instant::now() < stop_at && lat.len() < 20_000 {
                let t = Instant::now();
                match c.claim(&pair, seen, ClaimId::random()).await? {
                    ClaimOutcome::Granted { generation } => seen = generation,
                    d => bail!("unexpected denial {d:?}"),
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let t = Instant::now();
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let wall = t.elapsed();
    println!("throughput ({PAIRS} clients on {PAIRS} pairs at once, grants share durable writes):");
    stats(&format!("claim, {PAIRS} clients"), all, wall);

    drop(child.stdin.take()); // the witness exits when its stdin closes
    let st = child.wait()?;
    if !st.success() {
        bail!("witness process exited with {st}");
    }
    Ok(Medians {
        ping: ping_med,
        status: status_med,
        claim: claim_med,
    })
}
