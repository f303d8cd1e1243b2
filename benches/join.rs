//! The cost of a join (DESIGN §5 "Cold start and joining", §10): a node that starts while its
//! peer runs alone joins the running primary, which copies the differing disk blocks and all
//! guest memory while the guest runs, pauses it briefly for the last pages and the state, and
//! carries on with the joiner as its backup.
//!
//! Each join: `kill -9` of the backup, the primary runs alone; (optionally) random bytes over
//! a share of the dead node's disk blocks; the kv guest under load from the client host
//! (`redis-benchmark` SETs plus the checker's one-connection writer, whose acknowledged writes
//! are verified afterwards); the node restarts and joins. The figures are the primary's own
//! `join` report (`ftvm-node status --json`), and the checker's longest gap between replies.
//!
//! Prints:
//! 1. the guest pause p50/p99/max over many joins of a 256M guest, against the goal p99 <
//!    100 ms (PASS/FAIL, not asserted);
//! 2. join time, bytes sent, bytes / guest memory and bytes / needed (what a join cannot
//!    avoid: each distinct page with data and each distinct block, once) at 64M, 256M, 1G of
//!    guest memory, against the goal bytes <= 1.1 x needed;
//! 3. join time and bytes against the share of disk blocks diverged (0%, 10%, 50% of a 64M
//!    disk).
//!
//! Also: the joiner's lag after the commit point (from the primary's "committed" log line to
//! the joiner's "joined" line, just before its first ack): the primary holds output from the
//! commit until that ack, and drops the joiner as a lost backup when it takes longer than
//! `failure_timeout`.
//!
//! The baseline, measured in the same run on each lab: plain TCP over the pair's channel link
//! (no TLS, no QUIC), 128 MiB from the primary's host to the joiner's. "x copy mem" is the
//! join time over the time that link takes for the guest's memory size, "x copy needed" over
//! the time it takes for the join's needed bytes.
//!
//! `cargo bench -p ftvm-benches --bench join` (root, /dev/kvm, redis-tools).
//! `FTVM_BENCH_JOINS` (joins of the 256M guest for the pause, default 12),
//! `FTVM_BENCH_REPS` (joins per other row, default 3), `FTVM_BENCH_QUICK=1` (3 and 1),
//! `FTVM_BENCH_FAILURE_TIMEOUT` (default the lab's 200ms: the joiner must ack within it
//! after the commit; the lag figures show how close it comes).
//! 24 joins in about 3 minutes; quick, 7 in about 1.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_tests::checker::{spawn_in_netns, start_writer, verify, History};
use ftvm_tests::node::RunningNode;
use ftvm_tests::pair::{PairLab, PairOptions};

const DISK: &str = "64M";
const ROLE: Duration = Duration::from_secs(20);
const JOIN: Duration = Duration::from_secs(90);
/// The baseline's transfer over the channel link.
const LINK_BYTES: u64 = 128 << 20;
/// A port on the channel link no node uses.
const LINK_PORT: u16 = 7390;

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    pct(v, 0.5)
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

/// xorshift64*: the scribbled blocks and bytes (no need for a crate).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// One join, from the primary's report.
struct Join {
    total_ms: f64,
    pause_ms: f64,
    pause_pages: f64,
    pause_blocks: f64,
    rounds: f64,
    bytes: f64,
    needed: f64,
    blocks_differing: f64,
    disk_blocks: f64,
    /// From the primary's commit to the joiner's first ack (ms, from the nodes' logs).
    lag_ms: f64,
    /// The checker's longest gap between two replies while the node joined.
    client_gap_ms: f64,
    /// A lost write, a wrong reply or a broken client connection.
    bad: bool,
}

/// The load on the kv guest while a node joins.
struct Load {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<History>,
    bench: Child,
}

impl Load {
    fn start(lab: &PairLab) -> Result<Load> {
        // Overwrites within a small key space: the AOF's snapshot stays small on a 64M disk.
        let bench = lab
            .client
            .ns
            .command("redis-benchmark")
            .args(["-h", &lab.guest_ip.to_string()])
            .args(["-c", "4", "-n", "100000000", "-t", "set", "-r", "20000"])
            .args(["-d", "64", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-benchmark (redis-tools)")?;
        let stop = Arc::new(AtomicBool::new(false));
        // A key prefix of its own per join: the lab (and its counter) outlives each join.
        static JOINS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let prefix = format!("j{}", JOINS.fetch_add(1, Ordering::Relaxed));
        let writer = start_writer(
            &lab.client.ns,
            lab.guest_ip,
            &prefix,
            stop.clone(),
            Duration::from_secs(30),
        )?;
        Ok(Load {
            stop,
            writer,
            bench,
        })
    }

    /// Stops the load; the checker's history.
    fn finish(mut self) -> Result<History> {
        let _ = self.bench.kill();
        let _ = self.bench.wait();
        self.stop.store(true, Ordering::Relaxed);
        self.writer
            .join()
            .map_err(|_| anyhow::anyhow!("the checker's writer panicked"))
    }
}

/// A running pair whose backup is killed and rejoins, again and again.
struct Rig {
    lab: PairLab,
    pn: String,
    _primary: RunningNode,
    bn: String,
    backup: Option<RunningNode>,
    link_mb_s: f64,
    failure_timeout: String,
}

/// The channel link's address of node `name` (its `listen` in node.toml).
fn channel_ip(lab: &PairLab, name: &str) -> Result<Ipv4Addr> {
    let text = std::fs::read_to_string(lab.config(name))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .context("listen in node.toml")?;
    Ok(line.split(':').next().unwrap_or_default().parse()?)
}

/// The baseline: plain TCP over the channel link, primary's host to the joiner's (MB/s).
fn link_rate(lab: &PairLab, from: &str, to: &str) -> Result<f64> {
    let dst = channel_ip(lab, to)?;
    let listener = {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = spawn_in_netns(&lab.host(to).ns, move || -> Result<u64> {
            let l = TcpListener::bind((dst, LINK_PORT))?;
            tx.send(()).ok();
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let r = s.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            Ok(n)
        })?;
        rx.recv_timeout(Duration::from_secs(5))
            .context("the baseline's receiver did not start")?;
        h
    };
    let t = Instant::now();
    let sender = spawn_in_netns(&lab.host(from).ns, move || -> Result<()> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((dst, LINK_PORT)),
            Duration::from_secs(5),
        )?;
        let mut buf = vec![0u8; 1 << 20];
        Rng(0x9e37_79b9_7f4a_7c15).fill(&mut buf);
        for _ in 0..LINK_BYTES / buf.len() as u64 {
            s.write_all(&buf)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline's sender panicked"))??;
    let got = listener
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline's receiver panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    if got != LINK_BYTES {
        bail!("the baseline's receiver got {got} of {LINK_BYTES} bytes");
    }
    Ok(got as f64 / secs / 1e6)
}

/// The time of day of a log line ("2026-12-01T12:30:54.854065Z  INFO …"), in seconds.
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let mut f = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The time of the last line of `name`'s log containing `needle`, and that line.
fn last_line(lab: &PairLab, name: &str, needle: &str) -> Option<(f64, String)> {
    let text = std::fs::read_to_string(lab.log(name)).ok()?;
    let l = text.lines().rev().find(|l| l.contains(needle))?;
    Some((log_time(l)?, l.to_string()))
}

/// From the primary's last commit to the joiner's "joined" line for the same boundary (ms).
fn commit_lag_ms(lab: &PairLab, primary: &str, joiner: &str) -> Option<f64> {
    let (tc, l) = last_line(lab, primary, "committed at boundary ")?;
    let k = l
        .split("committed at boundary ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (tj, _) = last_line(lab, joiner, &format!("joined at boundary {k} "))?;
    let mut d = tj - tc;
    if d < -43200.0 {
        d += 86400.0;
    }
    Some(d * 1e3)
}

impl Rig {
    fn start(mem: &str, failure_timeout: &str) -> Result<Rig> {
        let mut lab = PairLab::new(PairOptions {
            mem: mem.into(),
            disk_size: DISK.into(),
            failure_timeout: failure_timeout.into(),
            ..PairOptions::default()
        })?;
        let (pn, primary, bn, backup) = lab.start_pair("kv: listening on")?;
        let link_mb_s = link_rate(&lab, &pn, &bn)?;
        Ok(Rig {
            lab,
            pn,
            _primary: primary,
            bn,
            backup: Some(backup),
            link_mb_s,
            failure_timeout: failure_timeout.into(),
        })
    }

    /// Random bytes over `share` of the (stopped) backup's disk blocks.
    fn scribble(&self, share: f64, rng: &mut Rng) -> Result<u64> {
        let path = self.lab.disk(&self.bn);
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        let bs = disksync::DEFAULT_BLOCK_SIZE as u64;
        let blocks = f.metadata()?.len().div_ceil(bs);
        let n = (share * blocks as f64).round() as u64;
        // A partial Fisher-Yates shuffle: n distinct blocks.
        let mut idx: Vec<u64> = (0..blocks).collect();
        let mut buf = vec![0u8; bs as usize];
        for i in 0..n as usize {
            let j = i + (rng.next() % (blocks - i as u64)) as usize;
            idx.swap(i, j);
            rng.fill(&mut buf);
            f.write_all_at(&buf, idx[i] * bs)?;
        }
        f.sync_all()?;
        Ok(n)
    }

    fn status_until(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(s) = self.lab.status(name) {
                if ok(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{name}: {what} did not happen within {limit:?}; last status {last:?}\n{}",
            self.lab.logs(30)
        )
    }

    /// Waits until the restarted node is the backup and the primary's report is complete.
    fn joined(&self, joins_before: u64) -> Result<serde_json::Value> {
        self.lab.wait_role(&self.pn, "primary", JOIN)?;
        self.lab.wait_role(&self.bn, "backup", ROLE)?;
        self.status_until(&self.pn, ROLE, "the join's report", |s| {
            s["joins"].as_u64().unwrap_or(0) > joins_before && s["join"]["phase"] == "done"
        })
    }

    /// Kills the backup, lets the primary run alone, scribbles over `share` of the dead
    /// node's disk, and restarts it under load until it is the backup again.
    fn join(&mut self, share: f64, rng: &mut Rng) -> Result<Join> {
        if let Some(b) = self.backup.take() {
            b.kill9();
        }
        self.lab.wait_role(&self.pn, "alone", ROLE)?;
        if share > 0.0 {
            self.scribble(share, rng)?;
        }
        let joins = self.lab.status(&self.pn)?["joins"].as_u64().unwrap_or(0);
        let load = Load::start(&self.lab)?;
        std::thread::sleep(Duration::from_millis(500));
        let r = match self.lab.start_node(&self.bn, &[]) {
            Ok(node) => {
                self.backup = Some(node);
                self.joined(joins)
            }
            Err(e) => Err(e),
        };
        // The pair runs as a pair again for a moment before the load stops.
        std::thread::sleep(Duration::from_millis(300));
        let hist = load.finish()?;
        let lag_ms = commit_lag_ms(&self.lab, &self.pn, &self.bn).unwrap_or(f64::NAN);
        let s = r.with_context(|| {
            if lag_ms.is_nan() {
                "no commit".to_string()
            } else {
                format!(
                    "the joiner was ready {lag_ms:.0} ms after the primary's commit (failure_timeout {})",
                    self.failure_timeout
                )
            }
        })?;
        let v = verify(&self.lab.client.ns, self.lab.guest_ip, &hist)?;
        let j = &s["join"];
        let g = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        if hist.client_error.is_some() || !v.ok() {
            eprintln!(
                "  checker: client error {:?}, verdict {v:?}",
                hist.client_error
            );
        }
        Ok(Join {
            total_ms: g("total_ms"),
            pause_ms: g("pause_ms"),
            pause_pages: g("pause_pages"),
            pause_blocks: g("pause_blocks"),
            rounds: g("rounds"),
            bytes: g("bytes"),
            needed: g("needed_bytes"),
            blocks_differing: g("blocks_differing"),
            disk_blocks: g("disk_blocks"),
            lag_ms,
            client_gap_ms: hist.max_gap.as_secs_f64() * 1e3,
            bad: hist.client_error.is_some() || !v.ok(),
        })
    }

    /// `n` joins with `share` of the disk scribbled before each; failed ones are reported
    /// and counted.
    fn joins(&mut self, n: usize, share: f64, rng: &mut Rng, what: &str) -> Row {
        let mut row = Row {
            joins: Vec::new(),
            failed: Vec::new(),
            link_mb_s: self.link_mb_s,
        };
        for i in 0..n {
            let t = Instant::now();
            match self.join(share, rng) {
                Ok(j) => {
                    eprintln!(
                        "{what}: join {} of {n}: total {:.0} ms, pause {:.1} ms ({} pages, {} blocks), {:.1} MiB, joiner lag {:.0} ms, client gap {:.0} ms ({:.1} s in all)",
                        i + 1,
                        j.total_ms,
                        j.pause_ms,
                        j.pause_pages,
                        j.pause_blocks,
                        mib(j.bytes),
                        j.lag_ms,
                        j.client_gap_ms,
                        t.elapsed().as_secs_f64()
                    );
                    row.joins.push(j);
                }
                Err(e) => {
                    eprintln!("{what}: join {} of {n} failed: {e:#}", i + 1);
                    row.failed.push(format!("{e}"));
                    // The next join starts from a primary running alone with no joiner.
                    if let Some(b) = self.backup.take() {
                        b.kill9();
                    }
                }
            }
        }
        row
    }
}

/// The joins of one row of a table.
struct Row {
    joins: Vec<Join>,
    /// Why each failed join failed (the first line).
    failed: Vec<String>,
    /// The lab's baseline (MB/s).
    link_mb_s: f64,
}

impl Row {
    fn median(&self, f: impl Fn(&Join) -> f64) -> f64 {
        median(&self.joins.iter().map(f).collect::<Vec<_>>())
    }
    fn count(&self) -> String {
        format!(
            "{}/{}",
            self.joins.len(),
            self.joins.len() + self.failed.len()
        )
    }
    /// The time the baseline link takes for `bytes` (ms).
    fn copy_ms(&self, bytes: f64) -> f64 {
        bytes / (self.link_mb_s * 1e6) * 1e3
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let quick = std::env::var("FTVM_BENCH_QUICK").is_ok_and(|v| v != "0");
    let pause_joins = env_usize("FTVM_BENCH_JOINS", if quick { 3 } else { 12 });
    let reps = env_usize("FTVM_BENCH_REPS", if quick { 1 } else { 3 });
    let ft = std::env::var("FTVM_BENCH_FAILURE_TIMEOUT").unwrap_or_else(|_| "200ms".into());
    ftvm_benches::build_bins(&[("vmm", "ftvm-node"), ("ftvm-witness", "ftvm-witness")])?;
    let t0 = Instant::now();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let shares = [0.0, 0.1, 0.5];

    // 64M: the disk-divergence rows (0% is also the memory row).
    let by_share: Vec<Row> = {
        let mut rig = Rig::start("64M", &ft)?;
        shares
            .iter()
            .map(|&s| {
                rig.joins(
                    reps,
                    s,
                    &mut rng,
                    &format!("64M, {:.0}% diverged", s * 100.0),
                )
            })
            .collect()
    };
    // 256M: the pause, and the memory row.
    let j256 = Rig::start("256M", &ft)?.joins(pause_joins, 0.0, &mut rng, "256M");
    let j1g = Rig::start("1G", &ft)?.joins(reps, 0.0, &mut rng, "1G");

    let rows: Vec<&Row> = by_share.iter().chain([&j256, &j1g]).collect();
    let all: Vec<&Join> = rows.iter().flat_map(|r| &r.joins).collect();
    let failed: Vec<&String> = rows.iter().flat_map(|r| &r.failed).collect();
    println!(
        "join: kill -9 of the backup, the primary runs alone, the node restarts and joins it{}",
        if quick { " (QUICK mode)" } else { "" }
    );
    println!(
        "  load during each join: redis-benchmark -c 4 SET -r 20000 -d 64 and the checker's writer, from the client host"
    );
    println!(
        "  figures: the primary's join report; disk {DISK} ({} blocks of {} KiB); failure_timeout {ft}; {} joins ({} failed) in {:.0} s",
        all.first().map_or(0.0, |j| j.disk_blocks),
        disksync::DEFAULT_BLOCK_SIZE >> 10,
        all.len() + failed.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "  baseline: plain TCP over the channel link (no TLS/QUIC), {} MiB, per lab: 64M {:.0} MB/s, 256M {:.0} MB/s, 1G {:.0} MB/s",
        LINK_BYTES >> 20,
        by_share[0].link_mb_s,
        j256.link_mb_s,
        j1g.link_mb_s
    );

    println!(
        "    x copy mem / x copy needed: join time over the baseline's time for the guest memory size / for the join's needed bytes"
    );
    println!("1. guest pause, 256M guest, {} joins", j256.count());
    if j256.joins.is_empty() {
        println!("  no join completed");
    } else {
        let line = |name: &str, f: &dyn Fn(&Join) -> f64, unit: &str| {
            let v: Vec<f64> = j256.joins.iter().map(f).collect();
            println!(
                "  {name:<36} p50 {:>8.1}{unit}  p99 {:>8.1}{unit}  max {:>8.1}{unit}",
                pct(&v, 0.5),
                pct(&v, 0.99),
                pct(&v, 1.0)
            );
        };
        line("pause", &|j| j.pause_ms, " ms");
        line("pages sent in the pause", &|j| j.pause_pages, "   ");
        line("blocks sent in the pause", &|j| j.pause_blocks, "   ");
        line("joiner's lag: commit to first ack", &|j| j.lag_ms, " ms");
        line(
            "client: longest gap between replies",
            &|j| j.client_gap_ms,
            " ms",
        );
        let p99 = pct(
            &j256.joins.iter().map(|j| j.pause_ms).collect::<Vec<_>>(),
            0.99,
        );
        println!(
            "  goal pause p99 < 100 ms: {} (p99 = {:.2} x goal)",
            if p99 < 100.0 { "PASS" } else { "FAIL" },
            p99 / 100.0
        );
    }

    println!("2. against guest memory size (disk not diverged), medians");
    println!(
        "  {:<5} {:>5} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}  goal <= 1.1",
        "mem",
        "joins",
        "total ms",
        "x copy",
        "x copy",
        "rounds",
        "lag ms",
        "needed",
        "sent",
        "sent/mem",
        "sent/"
    );
    println!(
        "  {:<5} {:>5} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "", "", "", "mem", "needed", "", "", "MiB", "MiB", "", "needed"
    );
    let mem_rows: [(&str, u64, &Row); 3] = [
        ("64M", 64 << 20, &by_share[0]),
        ("256M", 256 << 20, &j256),
        ("1G", 1 << 30, &j1g),
    ];
    for (name, mem, r) in mem_rows {
        if r.joins.is_empty() {
            println!("  {name:<5} {:>5} no join completed", r.count());
            continue;
        }
        let ratio = r.median(|j| j.bytes / j.needed);
        let total = r.median(|j| j.total_ms);
        println!(
            "  {name:<5} {:>5} {:>9.0} {:>9.2} {:>9.1} {:>6.0} {:>8.0} {:>9.1} {:>9.1} {:>9.4} {:>9.3}  {}",
            r.count(),
            total,
            total / r.copy_ms(mem as f64),
            r.median(|j| j.total_ms / r.copy_ms(j.needed)),
            r.median(|j| j.rounds),
            r.median(|j| j.lag_ms),
            mib(r.median(|j| j.needed)),
            mib(r.median(|j| j.bytes)),
            r.median(|j| j.bytes) / mem as f64,
            ratio,
            if ratio <= 1.1 { "PASS" } else { "FAIL" }
        );
    }

    println!(
        "  sent beyond needed (pages the guest wrote again after they were sent, page headers, the state): {}",
        mem_rows
            .iter()
            .filter(|(_, _, r)| !r.joins.is_empty())
            .map(|(n, _, r)| format!("{n} {:.2} MiB", mib(r.median(|j| j.bytes - j.needed))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "3. against the share of the joiner's disk diverged (64M guest, {DISK} disk), medians"
    );
    println!(
        "  {:<5} {:>5} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>9}  goal <= 1.1",
        "share", "joins", "differing", "total ms", "vs 0%", "x copy", "sent MiB", "vs 0%", "sent/"
    );
    println!(
        "  {:<5} {:>5} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>9}",
        "", "", "blocks", "", "", "needed", "", "", "needed"
    );
    let base = &by_share[0];
    let (t0ms, b0) = if base.joins.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (base.median(|j| j.total_ms), base.median(|j| j.bytes))
    };
    for (sh, r) in shares.iter().zip(&by_share) {
        let name = format!("{:.0}%", sh * 100.0);
        if r.joins.is_empty() {
            println!("  {name:<5} {:>5} no join completed", r.count());
            continue;
        }
        let ratio = r.median(|j| j.bytes / j.needed);
        println!(
            "  {name:<5} {:>5} {:>9.0} {:>9.0} {:>7.2} {:>9.1} {:>9.1} {:>7.2} {:>9.3}  {}",
            r.count(),
            r.median(|j| j.blocks_differing),
            r.median(|j| j.total_ms),
            r.median(|j| j.total_ms) / t0ms,
            r.median(|j| j.total_ms / r.copy_ms(j.needed)),
            mib(r.median(|j| j.bytes)),
            r.median(|j| j.bytes) / b0,
            ratio,
            if ratio <= 1.1 { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "  joins with a lost write, a wrong reply or a broken client connection: {} of {} (must be 0)",
        all.iter().filter(|j| j.bad).count(),
        all.len()
    );
    for f in &failed {
        println!("  failed join: {}", f.lines().next().unwrap_or_default());
    }
    Ok(())
}
