//! `ftvm-demo`: the FT pair on this one machine, narrated (README command 1 runs it through
//! `scripts/demo.sh`). A witness and two nodes in their own network namespaces with the kv
//! guest, a client namespace with stock redis-benchmark and a checker of acknowledged writes;
//! a clean stop with both disks verified identical; `kill -9` of the primary under load with
//! the client carrying on and nothing lost. Every step checks its result: on failure it
//! prints one line saying what went wrong and exits 1. Ctrl-C cleans up too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_tests::checker::{start_writer, verify};
use ftvm_tests::node::{redis_text, RunningNode};
use ftvm_tests::pair::{PairLab, PairOptions};

const BOOT: Duration = Duration::from_secs(60);

fn say(s: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\x1b[1m== {s}\x1b[0m");
    } else {
        println!("== {s}");
    }
}

fn note(s: &str) {
    println!("   {s}");
}

static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the pipe stays open for the process's life.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// Deletes the lab's namespaces (and so kills what runs in them) on SIGINT/SIGTERM. A
/// handler, not a blocked mask: children inherit a signal mask (and would then ignore
/// SIGTERM), while handlers are reset at exec.
fn cleanup_on_signal(prefix: String) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two descriptors; sigaction with a zeroed struct, a valid handler
    // and an empty mask.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    let rd = fds[0];
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our own pipe.
        unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
        eprintln!("\nftvm-demo: interrupted, cleaning up");
        if let Ok(list) = ftvm_tests::netns::list_netns() {
            for ns in list.iter().filter(|n| n.starts_with(&prefix)) {
                if let Ok(o) = std::process::Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(p) = pid.parse::<i32>() {
                            // SAFETY: kill(2) of a process in the lab's own namespaces.
                            unsafe { libc::kill(p, libc::SIGKILL) };
                        }
                    }
                }
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
        std::process::exit(130);
    });
}

fn start_both(lab: &PairLab) -> Result<(String, RunningNode, String, RunningNode)> {
    let mut a = lab.start_node("a", &[])?;
    let mut b = lab.start_node("b", &[])?;
    a.expect_line("kv: listening on", BOOT)
        .context("node a's guest did not boot")?;
    b.expect_line("kv: listening on", BOOT)
        .context("node b's guest did not boot")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (sa, sb) = (lab.status("a")?, lab.status("b")?);
        match (sa["role"].as_str(), sb["role"].as_str()) {
            (Some("primary"), Some("backup")) => return Ok(("a".into(), a, "b".into(), b)),
            (Some("backup"), Some("primary")) => return Ok(("b".into(), b, "a".into(), a)),
            _ if Instant::now() > deadline => bail!(
                "no primary/backup pair formed: a is {}, b is {}",
                sa["role"],
                sb["role"]
            ),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn bench(lab: &PairLab, args: &[&str]) -> Result<std::process::Child> {
    Ok(lab
        .client
        .ns
        .command("redis-benchmark")
        .args(["-h", &lab.guest_ip.to_string(), "-q"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

fn bench_done(c: std::process::Child) -> Result<String> {
    let o = c.wait_with_output()?;
    let text = String::from_utf8_lossy(&o.stdout).replace('\r', "\n")
        + &String::from_utf8_lossy(&o.stderr);
    if !o.status.success() || text.to_lowercase().contains("error") {
        bail!("redis-benchmark failed: {}", text.trim());
    }
    Ok(text
        .lines()
        .filter(|l| l.contains("requests per second"))
        .map(|l| l.trim().to_string())
        .collect::<Vec<_>>()
        .join("; "))
}

fn run() -> Result<()> {
    let mut lab = PairLab::new(PairOptions {
        disk_size: "64M".into(),
        ..PairOptions::default()
    })?;
    cleanup_on_signal(lab.lab.id().to_string());
    let r = steps(&mut lab);
    if r.is_err() && std::env::var_os("FTVM_DEMO_LOGS").is_some() {
        eprintln!("{}", lab.logs(40));
    }
    r
}

fn steps(lab: &mut PairLab) -> Result<()> {
    let lab = &mut *lab;
    say("1. a witness and two nodes, each in its own network namespace, one kv VM on both");
    note(&format!(
        "files in {}; node logs a.log, b.log",
        lab.path().display()
    ));
    lab.start_witness()?;
    let (pn, primary, bn, backup) = start_both(lab)?;
    let s = lab.status(&pn)?;
    note(&format!(
        "{pn} is primary (generation {}), {bn} its backup, over a dedicated QUIC link",
        s["generation"]
    ));
    let ip = lab.guest_ip;
    if redis_text(
        &lab.client.ns,
        ip,
        &["SET", "demo", "hello from an FT pair"],
    )? != "OK"
    {
        bail!("SET through the pair failed");
    }
    note(&format!(
        "redis-cli GET demo -> {}",
        redis_text(&lab.client.ns, ip, &["GET", "demo"])?
    ));
    let out = bench_done(bench(
        lab,
        &["-n", "20000", "-c", "50", "-P", "16", "-t", "set,get"],
    )?)?;
    note(&format!("redis-benchmark -c 50 -P 16: {out}"));
    let (sp, sb) = (lab.status(&pn)?, lab.status(&bn)?);
    note(&format!(
        "log sent: {} bytes; backup lag {:.1} ms; backup compared {} memory digests",
        sp["log_bytes"],
        sp["lag_ms"].as_f64().unwrap_or(0.0),
        sb["digests_checked"]
    ));

    say("2. a clean stop of the primary: the backup stops at the same boundary");
    primary.signal(libc::SIGTERM);
    let (ps, _) = primary.wait(Duration::from_secs(20))?;
    let (bs, _) = backup.wait(Duration::from_secs(20))?;
    if ps.code() != Some(143) || bs.code() != Some(143) {
        bail!("the pair did not stop cleanly: primary {ps}, backup {bs}");
    }
    if !lab.disks_equal()? {
        bail!("after the clean stop the two disks differ");
    }
    note("both exited 143; the two disk images are byte-identical");

    say(
        "3. both restart from their disks and pair again; steady load: redis-benchmark + a checker",
    );
    let (pn, primary, bn, backup) = start_both(lab)?;
    note(&format!(
        "{pn} is primary again (generation {}), {bn} backup",
        lab.status(&pn)?["generation"]
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(
        &lab.client.ns,
        ip,
        "demo",
        stop.clone(),
        Duration::from_secs(20),
    )?;
    let load = bench(lab, &["-n", "60000", "-c", "8", "-t", "set,get"])?;
    std::thread::sleep(Duration::from_secs(2));
    let before = lab.status(&pn)?;

    say(&format!("4. kill -9 of the primary ({pn}) under load"));
    primary.kill9();
    let t = Instant::now();
    let s = loop {
        let s = lab.status(&bn)?;
        if s["role"] == "alone" {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("the backup did not go live: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let f = &s["last_failover"];
    note(&format!(
        "{bn} went live in generation {}: detection {:.0} ms + catch-up {:.1} ms + claim {:.1} ms + go-live {:.1} ms",
        s["generation"],
        f["detection_ms"].as_f64().unwrap_or(0.0),
        f["catch_up_ms"].as_f64().unwrap_or(0.0),
        f["claim_ms"].as_f64().unwrap_or(0.0),
        f["go_live_ms"].as_f64().unwrap_or(0.0)
    ));

    say(&format!(
        "5. {pn} restarts and joins the survivor while it serves (no pause the clients notice)"
    ));
    let t = Instant::now();
    let joiner = lab.start_node(&pn, &[])?;
    let (sp, sj) = loop {
        let (sp, sj) = (lab.status(&bn)?, lab.status(&pn));
        if let Ok(sj) = sj {
            if sp["role"] == "primary" && sj["role"] == "backup" {
                break (sp, sj);
            }
        }
        if t.elapsed() > Duration::from_secs(40) {
            bail!("{pn} did not rejoin: {sp}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let j = &sp["join"];
    note(&format!(
        "{pn} is {bn}'s backup again (generation {}) {:.1} s after it started: {} rounds, {} pages and {} disk blocks ({} differed), {:.1} MB sent; guest paused {:.1} ms",
        sj["generation"],
        t.elapsed().as_secs_f64(),
        j["rounds"],
        j["pages"],
        j["blocks"],
        j["blocks_differing"],
        j["bytes"].as_f64().unwrap_or(0.0) / 1e6,
        j["pause_ms"].as_f64().unwrap_or(0.0)
    ));
    std::thread::sleep(Duration::from_secs(2));

    say(&format!("6. kill -9 of the new primary ({bn}) under load"));
    let survivor = match lab.status(&bn) {
        Ok(_) => {
            // Kill the process of the current primary: bn was started in step 3.
            backup.kill9();
            &pn
        }
        Err(e) => bail!("{bn} is not running: {e}"),
    };
    let t = Instant::now();
    let s = loop {
        let s = lab.status(survivor)?;
        if s["role"] == "alone" {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("{survivor} did not go live: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let f = &s["last_failover"];
    note(&format!(
        "{survivor} went live in generation {}: detection {:.0} ms + claim {:.1} ms",
        s["generation"],
        f["detection_ms"].as_f64().unwrap_or(0.0),
        f["claim_ms"].as_f64().unwrap_or(0.0)
    ));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let hist = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the checker panicked"))?;
    if let Some(e) = &hist.client_error {
        bail!("the checker's TCP connection broke across a failover: {e}");
    }
    let out = bench_done(load)?;
    note(&format!("redis-benchmark carried on with no error: {out}"));
    note(&format!("the longest gap the checker saw between two replies: {:?} (TCP's retransmission timeout is its floor)", hist.max_gap));
    let v = verify(&lab.client.ns, ip, &hist)?;
    if !v.ok() {
        bail!("acknowledged writes lost or wrong after the failovers: {v:?}");
    }
    say(&format!(
        "7. {bn} restarts and joins {survivor}; then a clean stop, and the two disks are compared"
    ));
    let last = lab.start_node(&bn, &[])?;
    let t = Instant::now();
    loop {
        let sp = lab.status(survivor)?;
        if sp["role"] == "primary" && lab.status(&bn).is_ok_and(|s| s["role"] == "backup") {
            note(&format!(
                "{bn} joined in {:.1} s (guest paused {:.1} ms)",
                t.elapsed().as_secs_f64(),
                sp["join"]["pause_ms"].as_f64().unwrap_or(0.0)
            ));
            break;
        }
        if t.elapsed() > Duration::from_secs(40) {
            bail!("{bn} did not rejoin: {sp}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    joiner.signal(libc::SIGTERM);
    let (ps, _) = joiner.wait(Duration::from_secs(20))?;
    let (bs, _) = last.wait(Duration::from_secs(20))?;
    if ps.code() != Some(143) || bs.code() != Some(143) {
        bail!("the pair did not stop cleanly: primary {ps}, backup {bs}");
    }
    if !lab.disks_equal()? {
        bail!("after the clean stop the two disks differ");
    }
    note("both exited 143; the two disk images are byte-identical");
    let reqs = before["released_frames"].as_f64().unwrap_or(1.0).max(1.0);
    say("8. summary");
    note(&format!(
        "writes acknowledged {}, lost {}, failovers 2, joins 2, log {:.0} bytes per released frame before the first failover, disks equal",
        v.acked,
        v.lost.len(),
        before["log_bytes"].as_f64().unwrap_or(0.0) / reqs
    ));
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ftvm-demo: FAILED: {e:#}");
        std::process::exit(1);
    }
    println!(
        "ftvm-demo: the pair survived a clean stop, a kill -9, a rejoin and a second kill -9 with nothing lost"
    );
}
