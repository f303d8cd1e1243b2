//! The kv guest under stock `redis-benchmark`: SET and GET throughput with `-P 1` and `-P 16`
//! (50 clients), and VM exits per request, each against a baseline measured in the same run:
//! the same engine (kvcore) running natively in the node's namespace, with the same durability
//! (one `fdatasync` per group commit) and the same network path from the client namespace.
//!
//! `cargo bench -p ftvm-benches --bench kv_redis` (needs root, iproute2, redis-tools, KVM).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_tests::netns::{Host, Lab};
use ftvm_tests::node::{in_netns, RunningNode};

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

/// Makes sure the `ftvm-node` next to this benchmark is current (`cargo bench` builds only
/// the libraries it links).
fn build_node() -> Result<()> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let st = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "vmm",
            "--bin",
            "ftvm-node",
            "--manifest-path",
            manifest,
        ])
        .status()?;
    if !st.success() {
        bail!("building ftvm-node failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    ftvm_tests::netns::preflight()?;
    build_node()?;
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

    // Baseline: kvcore natively, on the node's own address.
    let disk_path = dir.path().join("native.img");
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
    let server = std::thread::spawn(move || kvcore::host::serve(listener, &disk, store, log, &s2));
    let mut native = Vec::new();
    for (t, p, n) in cases {
        native.push(redis_benchmark(&client, node.ip, t, n, p)?);
    }
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("native server panicked"))??;

    println!("kv under redis-benchmark, 50 clients; baseline: the same engine natively in the node's namespace");
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>14}",
        "test", "VM req/s", "native req/s", "ratio", "exits/request"
    );
    for ((t, p, n), base) in cases.into_iter().zip(native) {
        let disk = dir.path().join(format!("vm-{t}-{p}.img"));
        let mut vm = RunningNode::kv(&node, &disk, &[])?;
        vm.expect_line("kv: listening on", Duration::from_secs(60))?;
        if t == "get" {
            // GET reads keys SET wrote; give it the same key space.
            redis_benchmark(&client, node.guest_ip.unwrap(), "set", 10_000, 16)?;
        }
        let rps = redis_benchmark(&client, node.guest_ip.unwrap(), t, n, p)?;
        vm.signal(libc::SIGTERM);
        let (_, err) = vm.wait(Duration::from_secs(10))?;
        let bounds: f64 = err
            .split("passed ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .context("boundary count")?;
        let requests = n as f64 + if t == "get" { 10_000.0 } else { 0.0 };
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>8.2} {:>14.3}",
            format!("{} -P {p}", t.to_uppercase()),
            rps,
            base,
            rps / base,
            bounds / requests
        );
    }
    Ok(())
}
