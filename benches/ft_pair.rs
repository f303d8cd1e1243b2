//! What replication costs: the kv guest through an FT pair against the same guest solo, in one
//! run (DESIGN §10): each simulated host's processes in a cgroup with the same CPU quota in
//! both runs (the client outside them), and the quota printed with the figures.
//!
//! Prints, as ratios pair/solo: redis-benchmark `-c 50` SET and GET at `-P 1` and `-P 16`;
//! the log's bytes per request and per second; the added latency at `-c 1` (p50, p99,
//! without quotas) against the channel's round trip measured in the same run; the backup's
//! lag p50/p99 under load. Each node's CPU per request and its use of a core over the run are
//! printed beside its thread times: a node at its quota is CPU-bound, and its throughput is
//! then the quota divided by the CPU a request costs.
//!
//! `cargo bench -p ftvm-benches --bench ft_pair` (root, /dev/kvm, redis-tools).
//! Each round runs both under one quota per host (DESIGN §10) and under a quota for the vCPU
//! thread beside another for the node's other threads (a host with a core to spare beside the
//! VM's; see [`Budget`]).
//!
//! `FTVM_BENCH_QUOTA` (percent of one core per host, default 60), `FTVM_BENCH_VCPU_QUOTA` and
//! `FTVM_BENCH_VMM_QUOTA` (the split budget's, default 40 each), `FTVM_BENCH_N` (requests
//! per run at `-P 1`, default 50000; 8 times as many at `-P 16`), `FTVM_BENCH_ROUNDS` (default 2; 0: the latency figures only), `FTVM_BENCH_BUDGET` (`one` or `split`: only that budget), `FTVM_BENCH_PERF=DIR` (a `perf
//! record -g` of the solo node, the primary and the backup under load, into DIR),
//! `FTVM_BENCH_PIN_a` / `FTVM_BENCH_PIN_b` (a CPU list for `taskset`: pins that simulated
//! host's node, all its threads, e.g. a to 0 and b to 1), `FTVM_BENCH_NODE_TOML` (lines
//! added to both nodes' node.toml, e.g. `io_nice = 0`),
//! `FTVM_BENCH_TRACE=DIR` (instead, `perf trace -s`: each thread's system calls, counted and
//! timed, into `DIR/NAME.txt`; it slows every run several-fold, so read its counts, not the
//! ratios), `FTVM_BENCH_KVM_EVENTS=DIR` (instead, `perf stat` of KVM's exit, page-fault and
//! shadow-MMU tracepoints, into `DIR/NAME.txt`).
//!
//! The latency at `-c 1` is taken three times: the backup at the default CPU weight; its vCPU
//! yielding (`cpu.shares` 2); and the backup as on a host of its own: its vCPU yielding and its
//! disk image on another device (tmpfs), so that its `fdatasync` does not queue behind the
//! primary's on this machine's one disk.

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
        anyhow::ensure!(
            std::path::Path::new("/sys/fs/cgroup/cpu").is_dir(),
            "this bench needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu (DESIGN §10)"
        );
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
    /// A cgroup with no quota and CPU weight `shares` (the default is 1024).
    fn weighted(name: &str, shares: u64) -> Result<Cgroup> {
        let g = Cgroup::new(name, 100)?;
        std::fs::write(g.path.join("cpu.cfs_quota_us"), "-1")?;
        std::fs::write(g.path.join("cpu.shares"), shares.to_string())?;
        Ok(g)
    }
    /// Moves every thread of process `pid` here.
    fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.path.display()))
    }
    /// Moves the one thread `tid` here (cgroup v1 places threads one by one).
    fn add_thread(&self, tid: u32) -> Result<()> {
        std::fs::write(self.path.join("tasks"), tid.to_string())
            .with_context(|| format!("moving thread {tid} into {}", self.path.display()))
    }
}

/// How a simulated host's CPU is budgeted (the same in the solo and the pair runs).
#[derive(Clone, Copy)]
enum Budget {
    /// DESIGN §10: one quota for all of a node's threads, as if the host had less than one
    /// core for the VM and its VMM together: whatever the VMM does to replicate comes out of
    /// the guest's time.
    OneQuota,
    /// A quota for the vCPU thread (the core the guest runs on) and another for the node's
    /// other threads (the VMM's work on the host's other cores), as on a host with a core to
    /// spare beside the VM's: the replication's work costs CPU (printed) but not the guest's.
    VcpuAndVmm,
}

/// The cgroups of one simulated host, for both budgets.
struct HostCpu {
    name: String,
    one: Cgroup,
    vcpu: Cgroup,
    vmm: Cgroup,
}

impl HostCpu {
    fn new(name: &str, one: u64, vcpu: u64, vmm: u64) -> Result<HostCpu> {
        Ok(HostCpu {
            name: name.to_string(),
            one: Cgroup::new(name, one)?,
            vcpu: Cgroup::new(&format!("{name}-vcpu"), vcpu)?,
            vmm: Cgroup::new(&format!("{name}-vmm"), vmm)?,
        })
    }

    /// Puts node `pid` under `budget`.
    fn place(&self, budget: Budget, pid: u32) -> Result<()> {
        if let Ok(cpu) = std::env::var(format!("FTVM_BENCH_PIN_{}", self.name)) {
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-cp", &cpu, &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()?
                .success();
            anyhow::ensure!(ok, "taskset {cpu} {pid}");
        }
        match budget {
            Budget::OneQuota => self.one.add(pid),
            Budget::VcpuAndVmm => {
                self.vmm.add(pid)?;
                let mut vcpus = threads_named(pid, "ftvm-vcpu");
                if vcpus.is_empty() {
                    // A solo run's vCPU is its main thread.
                    vcpus.push(pid);
                }
                vcpus.into_iter().try_for_each(|t| self.vcpu.add_thread(t))
            }
        }
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
    /// The client's CPU time (user + sys), seconds.
    client_cpu_s: f64,
}

/// CPU time (user + sys, seconds) of this process's children that have ended so far.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn redis_benchmark(
    client: &Host,
    ip: std::net::Ipv4Addr,
    test: &str,
    n: u32,
    clients: u32,
    pipeline: u32,
) -> Result<Bench> {
    let cpu0 = children_cpu_s();
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
    let client_cpu_s = children_cpu_s() - cpu0;
    let out = String::from_utf8_lossy(&o.stdout);
    for line in out.lines() {
        let f: Vec<&str> = line.split(',').map(|x| x.trim_matches('"')).collect();
        if f.len() >= 7 && f[0] == test.to_uppercase() {
            // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            return Ok(Bench {
                rps: f[1].parse()?,
                p50_ms: f[4].parse()?,
                p99_ms: f[6].parse()?,
                client_cpu_s,
            });
        }
    }
    bail!(
        "no result for {test} in {out:?} {}",
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The cases whose latency is measured at `-c 1`.
const LATENCY_CASES: [&str; 2] = ["set", "get"];

/// One latency case through the pair, with what the primary measured meanwhile.
struct PairLatency {
    bench: Bench,
    rtt_ms: f64,
    hold_ms: f64,
    handoff_ms: f64,
    echo_ms: f64,
}

/// A file removed when this goes out of scope, on error paths too (the backup's image on
/// tmpfs: 64 MiB of memory).
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Latency case `test` at `-c 1` through the pair whose primary is `primary`.
fn pair_latency(lab: &PairLab, primary: &str, test: &str, n: u32) -> Result<PairLatency> {
    let before = lab.status(primary)?;
    let bench = redis_benchmark(&lab.client, lab.guest_ip, test, n, 1, 1)?;
    let after = lab.status(primary)?;
    let d = |k: &str| after[k].as_f64().unwrap_or(0.0) - before[k].as_f64().unwrap_or(0.0);
    Ok(PairLatency {
        bench,
        rtt_ms: after["channel_rtt_ms"].as_f64().unwrap_or(0.0),
        hold_ms: d("hold_ms_total") / d("holds").max(1.0),
        handoff_ms: d("handoff_ms_total") / d("holds").max(1.0),
        echo_ms: d("echo_ms_total") / d("echoes").max(1.0),
    })
}

const CASES: &[(&str, u32)] = &[("set", 1), ("get", 1), ("set", 16), ("get", 16)];

/// Requests per run at pipeline depth `p`: more when pipelined, so that every run lasts long
/// enough to measure.
fn requests_for(n: u32, p: u32) -> u32 {
    if p > 1 {
        n * 8
    } else {
        n
    }
}

/// Frames (into the guest, out of it) so far on `host`'s TAP: the TAP's own counters, read in
/// the host's namespace (its tx is the guest's rx).
fn tap_frames(host: &Host) -> (u64, u64) {
    let Some(tap) = host.tap.as_deref() else {
        return (0, 0);
    };
    let read = |what: &str| -> u64 {
        host.ns
            .command("cat")
            .arg(format!("/sys/class/net/{tap}/statistics/{what}"))
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    };
    (read("tx_packets"), read("rx_packets"))
}

/// This machine's interrupts so far, all CPUs: (TLB shootdowns, function calls, reschedules).
fn interrupts() -> [u64; 3] {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    let count = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map_while(|w| w.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    [count("TLB:"), count("CAL:"), count("RES:")]
}

/// Runs the four cases against the guest, counting the exits of the nodes `pids` and the
/// frames on `tap`'s TAP (the host where the guest's output leaves) in each.
fn throughput(lab: &PairLab, n: u32, pids: &[u32], tap: &Host) -> Result<Vec<f64>> {
    // What each node burns with no load at all (a floor under every case's CPU).
    let idle0: Vec<ThreadCpu> = pids.iter().map(|&pid| thread_cpu(pid)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<String> = pids
        .iter()
        .zip(&idle0)
        .map(|(&pid, c0)| format!("{:.1}%", core_pct(cpu_total_ms(c0, &thread_cpu(pid)), 2.0)))
        .collect();
    eprintln!("  idle for 2 s: {} of a core", idle.join(", "));
    CASES
        .iter()
        .map(|(t, p)| {
            let t0 = Instant::now();
            let counters: Vec<_> = pids.iter().map(|&pid| ExitCounter::start(pid)).collect();
            let frames0 = tap_frames(tap);
            let irq0 = interrupts();
            let cpu0: Vec<ThreadCpu> = pids.iter().map(|&pid| thread_cpu(pid)).collect();
            let requests = requests_for(n, *p);
            let b = redis_benchmark(&lab.client, lab.guest_ip, t, requests, 50, *p)?;
            let secs = t0.elapsed().as_secs_f64();
            let exits: Vec<String> = counters
                .into_iter()
                .map(|c| match c.finish() {
                    Some((u, cs)) => format!(
                        "{:.4} ({:.4} context switches)",
                        u as f64 / requests as f64,
                        cs as f64 / requests as f64
                    ),
                    None => "-".into(),
                })
                .collect();
            let frames1 = tap_frames(tap);
            let irq1 = interrupts();
            // Each node's CPU per request in this case alone (its guest's part in brackets).
            let cpu: Vec<String> = pids
                .iter()
                .zip(&cpu0)
                .map(|(&pid, c0)| {
                    let c1 = thread_cpu(pid);
                    let guest: u64 = c1
                        .iter()
                        .map(|(k, v)| v[2] - c0.get(k).map_or(0, |b| b[2]))
                        .sum();
                    let io = c1.get("ftvm-io").map_or(0, |v| {
                        v[0] + v[1] - c0.get("ftvm-io").map_or(0, |b| b[0] + b[1])
                    });
                    let ms = cpu_total_ms(c0, &c1);
                    format!(
                        "{:.2} µs (guest {:.2}, ftvm-io {:.2}), {:.0}% of a core",
                        ms * 1000.0 / requests as f64,
                        guest as f64 * TICK_MS * 1000.0 / requests as f64,
                        io as f64 * TICK_MS * 1000.0 / requests as f64,
                        core_pct(ms, secs)
                    )
                })
                .collect();
            let per = |a: u64, b: u64| (b - a) as f64 / requests as f64;
            eprintln!(
                "  {t} -P{p}: {secs:.1} s, the client busy {:.0}% of a core; CPU per request: {}; exits to the VMM per request: {}; frames per request: {:.3} in, {:.3} out; interrupts per request (the machine's): TLB shootdowns {:.3}, function calls {:.3}, reschedules {:.3}",
                100.0 * b.client_cpu_s / secs,
                cpu.join(", "),
                exits.join(", "),
                per(frames0.0, frames1.0),
                per(frames0.1, frames1.1),
                per(irq0[0], irq1[0]),
                per(irq0[1], irq1[1]),
                per(irq0[2], irq1[2]),
            );
            Ok(b.rps)
        })
        .collect()
}

/// The guest alone on host a; `record`: recording its inputs to a file as it runs (with a
/// memory digest every `DEFAULT_DIGEST_EVERY` boundaries, as the pair's default).
fn start_solo(lab: &PairLab, record: Option<&std::path::Path>) -> Result<RunningNode> {
    let a = lab.host("a");
    let mut args: Vec<String> = [
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
    if let Some(log) = record {
        let _ = std::fs::remove_file(log);
        args.extend(["--record".into(), log.display().to_string()]);
        args.extend([
            "--digest-every".into(),
            vmm::node::config::DEFAULT_DIGEST_EVERY.to_string(),
        ]);
    }
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
    start_pair_with(lab, None)
}

/// Starts the pair; with `backup_disk`, node a first, as the primary (it claims before b
/// starts), and node b as its backup with its disk image at `backup_disk` (a path on another
/// device, as a host of its own would have: b's image in the lab is a link to it).
fn start_pair_with(lab: &mut PairLab, backup_disk: Option<&std::path::Path>) -> Result<Pair> {
    for n in ["a", "b"] {
        let _ = std::fs::remove_file(lab.disk(n));
        let _ = std::fs::remove_file(lab.disk(n).with_extension("img.ftvm-generation"));
    }
    let _ = std::fs::remove_dir_all(lab.path().join("witness-data"));
    lab.kill_witness();
    lab.start_witness()?;
    let mut a = lab.start_node("a", &[])?;
    if let Some(path) = backup_disk {
        let _ = std::fs::remove_file(path);
        std::os::unix::fs::symlink(path, lab.disk("b"))
            .with_context(|| format!("link b's disk to {}", path.display()))?;
        lab.wait_role("a", "primary", Duration::from_secs(60))?;
    }
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

/// CPU time of every thread of `pid` by thread name, in clock ticks: (user, system, the part
/// of user spent running the guest), then its context switches (voluntary, involuntary).
type ThreadCpu = std::collections::BTreeMap<String, [u64; 5]>;

/// See [`ThreadCpu`].
fn thread_cpu(pid: u32) -> ThreadCpu {
    let mut m = ThreadCpu::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ...: utime, stime and guest_time are fields 14, 15 and 43; comm
        // may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |n: usize| {
            f.get(n - 3)
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let e = m.entry(comm).or_insert([0; 5]);
        for (i, n) in [14, 15, 43].into_iter().enumerate() {
            e[i] += field(n);
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for (i, key) in [
            (3, "voluntary_ctxt_switches:"),
            (4, "nonvoluntary_ctxt_switches:"),
        ] {
            e[i] += status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    m
}

/// Counts a process's KVM exits to the VMM (`kvm:kvm_userspace_exit`) with `perf stat` while
/// it runs; `None` where perf or its tracepoint is missing. (`kvm:kvm_exit` and
/// `kvm:kvm_page_fault` count nothing under PVM, the hypervisor of these machines.)
struct ExitCounter(Option<std::process::Child>);

impl ExitCounter {
    fn start(pid: u32) -> ExitCounter {
        ExitCounter(perf(
            &[
                "stat",
                "-x,",
                "-e",
                "kvm:kvm_userspace_exit,context-switches",
            ],
            pid,
            std::process::Stdio::piped(),
        ))
    }

    /// Stops counting: (exits to the VMM, context switches of all its threads).
    fn finish(self) -> Option<(u64, u64)> {
        let out = interrupt(self.0?)?;
        let text = String::from_utf8_lossy(&out.stderr);
        let count = |ev: &str| {
            text.lines()
                .find(|l| l.contains(ev))
                .and_then(|l| l.split(',').next())
                .and_then(|c| c.trim().parse::<u64>().ok())
        };
        Some((count("kvm:kvm_userspace_exit")?, count("context-switches")?))
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
        // The first of the variables set picks the tool: (variable, file suffix, perf's
        // arguments before `-o FILE`).
        let tools: [(&str, &str, &[&str]); 3] = [
            ("FTVM_BENCH_TRACE", "txt", &["trace", "-s"]),
            ("FTVM_BENCH_KVM_EVENTS", "txt", &["stat", "-e", KVM_EVENTS]),
            ("FTVM_BENCH_PERF", "data", &["record", "-g", "-F", "2000"]),
        ];
        for (var, ext, args) in tools {
            let Ok(dir) = std::env::var(var) else {
                continue;
            };
            let _ = std::fs::create_dir_all(&dir);
            let out = std::path::Path::new(&dir).join(format!("{name}.{ext}"));
            let out = out.to_string_lossy();
            let mut all = args.to_vec();
            all.extend(["-o", &out]);
            return Profile(perf(&all, pid, std::process::Stdio::null()));
        }
        Profile(None)
    }

    fn finish(self) {
        if let Some(child) = self.0 {
            let _ = interrupt(child);
        }
    }
}

/// What `FTVM_BENCH_KVM_EVENTS` counts: KVM's exits (those it handles itself as well as the
/// VMM's), its page faults and the shadow MMU's work behind them.
const KVM_EVENTS: &str = "kvm:kvm_exit,kvm:kvm_userspace_exit,kvm:kvm_page_fault,kvm:kvm_mmio,\
kvmmmu:kvm_mmu_get_page,kvmmmu:kvm_mmu_sync_page,kvmmmu:kvm_mmu_unsync_page,\
kvmmmu:kvm_mmu_prepare_zap_page,kvmmmu:fast_page_fault,kvmmmu:kvm_mmu_set_spte";

/// The ids of `pid`'s threads named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
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

/// Milliseconds per clock tick of `/proc/*/stat`'s times (USER_HZ, 100).
const TICK_MS: f64 = 1000.0 / 100.0;

/// The CPU each thread group used between two samples, in ms.
fn cpu_delta(before: &ThreadCpu, after: &ThreadCpu) -> String {
    let mut parts: Vec<String> = after
        .iter()
        .map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or([0; 5]);
            let ms = |i: usize| (v[i] - b[i]) as f64 * TICK_MS;
            (k, ms(0), ms(1), ms(2), v[3] - b[3], v[4] - b[4])
        })
        .filter(|(_, u, s, ..)| u + s > 0.0)
        .map(|(k, u, s, g, vol, invol)| {
            format!(
                "{k} {:.0} (guest {g:.0}, user {:.0}, sys {s:.0}; switches {vol} waiting, {invol} preempted)",
                u + s,
                (u - g).max(0.0) // tick-sampled apart from guest time: clamped
            )
        })
        .collect();
    parts.sort();
    parts.join(", ")
}

/// All threads' CPU between two samples, in ms.
fn cpu_total_ms(before: &ThreadCpu, after: &ThreadCpu) -> f64 {
    after
        .iter()
        .map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or([0; 5]);
            (v[0] + v[1] - b[0] - b[1]) as f64 * TICK_MS
        })
        .sum()
}

/// A node's CPU per request and its use of one core over the run: throughput under a quota
/// is the quota divided by the CPU a request costs, so a run at its quota is CPU-bound.
fn cpu_use(ms: f64, secs: f64, requests: f64) -> String {
    format!(
        "{:.1} µs of CPU per request, {:.0}% of one core over the run",
        ms * 1000.0 / requests,
        core_pct(ms, secs)
    )
}

/// `ms` of CPU over `secs` of time, as a percentage of one core.
fn core_pct(ms: f64, secs: f64) -> f64 {
    ms / 10.0 / secs
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
        .unwrap_or(50_000);
    let env_u64 = |k: &str, d: u64| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let vcpu_quota = env_u64("FTVM_BENCH_VCPU_QUOTA", 40);
    let vmm_quota = env_u64("FTVM_BENCH_VMM_QUOTA", 40);
    let rounds: usize = std::env::var("FTVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    ftvm_benches::build_bins(&[("vmm", "ftvm-node"), ("ftvm-witness", "ftvm-witness")])?;
    let mut lab = PairLab::new(PairOptions {
        disk_size: "64M".into(),
        failure_timeout: "500ms".into(),
        // The node's default, and the solo recording's.
        digest_every: vmm::node::config::DEFAULT_DIGEST_EVERY,
        extra: std::env::var("FTVM_BENCH_NODE_TOML").unwrap_or_default(),
        ..PairOptions::default()
    })?;
    let hosts = [
        HostCpu::new("a", quota, vcpu_quota, vmm_quota)?,
        HostCpu::new("b", quota, vcpu_quota, vmm_quota)?,
    ];
    // `FTVM_BENCH_BUDGET=one` or `split`: only that budget (quicker experiments).
    let only = std::env::var("FTVM_BENCH_BUDGET").unwrap_or_default();
    let wanted = |bi: usize| only.is_empty() || only == ["one", "split"][bi];
    let budgets = [Budget::OneQuota, Budget::VcpuAndVmm];
    // Throughput by budget, then case.
    let mut solo: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CASES.len()]; budgets.len()];
    let mut recorded: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CASES.len()]; budgets.len()];
    let mut ft: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CASES.len()]; budgets.len()];
    let (mut bytes_per_req, mut bytes_per_s, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    // Requests per run of the four cases.
    let requests: f64 = CASES.iter().map(|&(_, p)| requests_for(n, p) as f64).sum();
    let log = lab.path().join("solo.ftlog");
    for (round, (bi, &budget)) in
        (0..rounds).flat_map(|r| budgets.iter().enumerate().map(move |b| (r, b)))
    {
        if !wanted(bi) {
            continue;
        }
        let label = ["one quota per host", "vCPU and VMM quotas"][bi];
        eprintln!("round {} of {rounds}, {label}", round + 1);
        // Solo, host a's budget; then solo recording to a file (what the recorder and its
        // memory digests cost, without the channel).
        for (record, results) in [(None, &mut solo), (Some(log.as_path()), &mut recorded)] {
            let name = if record.is_some() {
                "solo recording"
            } else {
                "solo"
            };
            let s = start_solo(&lab, record)?;
            hosts[0].place(budget, s.pid())?;
            let (c0, t0) = (thread_cpu(s.pid()), Instant::now());
            let prof = Profile::start(s.pid(), name);
            for (i, r) in throughput(&lab, n, &[s.pid()], lab.host("a"))?
                .into_iter()
                .enumerate()
            {
                results[bi][i].push(r);
            }
            prof.finish();
            let (secs, c1) = (t0.elapsed().as_secs_f64(), thread_cpu(s.pid()));
            eprintln!(
                "  CPU ms by thread, {name}, {secs:.1} s: {}; {}",
                cpu_delta(&c0, &c1),
                cpu_use(cpu_total_ms(&c0, &c1), secs, requests),
            );
            drop(s);
            let _ = std::fs::remove_file(lab.disk("solo"));
            let _ = std::fs::remove_file(&log);
        }
        // The pair, each node in its host's quota.
        let p = start_pair(&mut lab)?;
        hosts[0].place(budget, p.nodes[0].pid())?;
        hosts[1].place(budget, p.nodes[1].pid())?;
        let before = lab.status(&p.primary)?;
        let cpu0: Vec<_> = p.nodes.iter().map(|n| thread_cpu(n.pid())).collect();
        let primary_host = &lab.nodes[if p.primary == "a" { 0 } else { 1 }];
        let udp0 = udp_datagrams(primary_host);
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
        // Sample the lag while the load runs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            // Over the control socket from this process: a `ftvm-node status` process every
            // few ms would take CPU from the client and the nodes on these 2 cores.
            let socket = lab.path().join(format!("{}.sock", p.primary));
            std::thread::spawn(move || {
                let mut v = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(text) = vmm::node::status::query(&socket) {
                        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) {
                            v.push(j["lag_ms"].as_f64().unwrap_or(0.0));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                v
            })
        };
        // Exits: the primary's first.
        let pids: Vec<u32> = if p.primary == "a" { [0, 1] } else { [1, 0] }
            .iter()
            .map(|&i| p.nodes[i].pid())
            .collect();
        eprintln!("  (exits: the primary's, then the backup's)");
        let r = throughput(&lab, n, &pids, primary_host)?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        lag.extend(sampler.join().unwrap());
        let secs = t0.elapsed().as_secs_f64();
        profs.into_iter().for_each(Profile::finish);
        for (i, n) in p.nodes.iter().enumerate() {
            let name = ["a", "b"][i];
            let role = if name == p.primary {
                "primary"
            } else {
                "backup"
            };
            let c1 = thread_cpu(n.pid());
            eprintln!(
                "  CPU ms by thread, {name} ({role}), {secs:.1} s: {}; {}",
                cpu_delta(&cpu0[i], &c1),
                cpu_use(cpu_total_ms(&cpu0[i], &c1), secs, requests),
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
        let d = |k: &str| after[k].as_f64().unwrap_or(0.0) - before[k].as_f64().unwrap_or(0.0);
        let per = |n: f64, of: f64| if of > 0.0 { n / of } else { 0.0 };
        eprintln!(
            "  the primary's boundaries per request: {:.4}; under load a reply held {:.3} ms on average, a log message echoed {:.3} ms after its send",
            boundaries as f64 / requests,
            per(d("hold_ms_total"), d("holds")),
            per(d("echo_ms_total"), d("echoes")),
        );
        let bytes =
            after["log_bytes"].as_u64().unwrap_or(0) - before["log_bytes"].as_u64().unwrap_or(0);
        bytes_per_req.push(bytes as f64 / requests);
        bytes_per_s.push(bytes as f64 / secs);
        for (i, x) in r.into_iter().enumerate() {
            ft[bi][i].push(x);
        }
        drop(p);
    }
    // Latency at -c 1, no quotas (DESIGN §10): solo, solo recording to a file (what the
    // recorder and its memory digests cost the vCPU, without the channel), then the pair, with the
    // channel's RTT and the Output Rule's own figures for each case.
    let lat_n = 3000;
    let mut solo_lat = Vec::new();
    for record in [None, Some(log.as_path())] {
        let s = start_solo(&lab, record)?;
        let r: Result<Vec<Bench>> = LATENCY_CASES
            .iter()
            .map(|t| redis_benchmark(&lab.client, lab.guest_ip, t, lat_n, 1, 1))
            .collect();
        solo_lat.push(r?);
        drop(s);
        let _ = std::fs::remove_file(lab.disk("solo"));
        let _ = std::fs::remove_file(&log);
    }
    let mut p = start_pair(&mut lab)?;
    // Twice: the backup's vCPU at the default CPU weight, then at the lowest (cgroup v1
    // `cpu.shares` 2, no quota), so that on these 2 shared cores its replay yields to the
    // primary and the channel as it would on a host of its own (it is idle between requests
    // at -c 1, and acks do not wait for it).
    let yielding = Cgroup::weighted("backup-vcpu", 2)?;
    let backup_pid = p.nodes[if p.primary == "a" { 1 } else { 0 }].pid();
    let mut pair_lat: Vec<Vec<PairLatency>> = Vec::new();
    for pass in 0..2 {
        if pass == 1 {
            for t in threads_named(backup_pid, "ftvm-vcpu") {
                yielding.add_thread(t)?;
            }
        }
        let mut v = Vec::new();
        for t in LATENCY_CASES {
            v.push(pair_latency(&lab, &p.primary, t, lat_n)?);
        }
        pair_lat.push(v);
    }
    let get_bytes = {
        let before = lab.status(&p.primary)?["log_bytes"].as_u64().unwrap_or(0);
        redis_benchmark(&lab.client, lab.guest_ip, "get", 5000, 10, 1)?;
        (lab.status(&p.primary)?["log_bytes"].as_u64().unwrap_or(0) - before) as f64 / 5000.0
    };
    p.nodes.clear();
    // A third pass, the backup as on a host of its own: its vCPU yielding as above, and its
    // disk on another device (tmpfs), so that its `fdatasync` does not queue with the
    // primary's on this machine's one disk. The primary's disk stays where solo's is.
    let own_disk = RemovedOnDrop(
        std::path::Path::new("/dev/shm").join(format!("ftvm-bench-{}-b.img", std::process::id())),
    );
    {
        let p = start_pair_with(&mut lab, Some(&own_disk.0))?;
        anyhow::ensure!(
            p.primary == "a",
            "node a started first but b became primary"
        );
        for t in threads_named(p.nodes[1].pid(), "ftvm-vcpu") {
            yielding.add_thread(t)?;
        }
        let mut v = Vec::new();
        for t in LATENCY_CASES {
            v.push(pair_latency(&lab, &p.primary, t, lat_n)?);
        }
        pair_lat.push(v);
    }
    drop(own_disk);

    println!("ft_pair: the kv guest through an FT pair vs solo, redis-benchmark -c 50, n={n}, {rounds} round(s), medians");
    for (bi, title) in [
        format!("one CPU quota per simulated host (DESIGN §10): {quota}% of one core for all of a node's threads"),
        format!("a vCPU quota and a VMM quota per simulated host: {vcpu_quota}% of one core for the vCPU thread, {vmm_quota}% for the node's other threads"),
    ]
    .iter()
    .enumerate()
    .filter(|&(bi, _)| rounds > 0 && wanted(bi))
    {
        println!("  {title} (cgroup v1, 10 ms period; the client unthrottled)");
        println!(
            "    {:<10} {:>12} {:>12} {:>12} {:>10} {:>10}",
            "case", "solo req/s", "recording", "pair req/s", "rec/solo", "pair/solo"
        );
        for (i, (t, pl)) in CASES.iter().enumerate() {
            let (s, r, f) = (
                median(&mut solo[bi][i]),
                median(&mut recorded[bi][i]),
                median(&mut ft[bi][i]),
            );
            println!(
                "    {:<10} {:>12.0} {:>12.0} {:>12.0} {:>10.3} {:>10.3}",
                format!("{} -P{pl}", t.to_uppercase()),
                s,
                r,
                f,
                r / s,
                f / s
            );
        }
    }
    if rounds > 0 {
        println!(
            "  log: {:.1} bytes/request (all four cases), {:.0} bytes/s",
            median(&mut bytes_per_req),
            median(&mut bytes_per_s)
        );
    }
    println!("  log, GET only: {get_bytes:.1} bytes/request (block reads are not on the channel)");
    for (i, t) in LATENCY_CASES.iter().enumerate() {
        let (solo, rec) = (&solo_lat[0][i], &solo_lat[1][i]);
        println!(
            "  latency -c 1 {} (no quota): solo p50 {:.3} ms p99 {:.3} ms; solo recording to a file p50 {:.3} ms (+{:.3} ms: the recorder and its memory digests, no channel)",
            t.to_uppercase(),
            solo.p50_ms,
            solo.p99_ms,
            rec.p50_ms,
            rec.p50_ms - solo.p50_ms,
        );
        for (pass, label) in [
            "the backup's vCPU at the default weight",
            "the backup's vCPU yielding",
            "the backup as on a host of its own (its vCPU yielding, its disk on tmpfs)",
        ]
        .iter()
        .enumerate()
        {
            let pair = &pair_lat[pass][i];
            let added = pair.bench.p50_ms - solo.p50_ms;
            println!(
                "    pair, {label}: p50 {:.3} ms p99 {:.3} ms; added p50 {added:.3} ms = {:.2} x the channel's round trip as the Output Rule waits for it (a log message echoed by an ack {:.3} ms after its send), {:.2} x QUIC's RTT estimate ({:.3} ms); a reply held {:.3} ms on average ({:.3} ms of it the vCPU's hand-off)",
                pair.bench.p50_ms,
                pair.bench.p99_ms,
                if pair.echo_ms > 0.0 { added / pair.echo_ms } else { f64::NAN },
                pair.echo_ms,
                if pair.rtt_ms > 0.0 { added / pair.rtt_ms } else { f64::NAN },
                pair.rtt_ms,
                pair.hold_ms,
                pair.handoff_ms,
            );
        }
    }
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
