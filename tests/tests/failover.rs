//! Failover end to end (DESIGN §5): either host can die and the VM carries on — the clients'
//! TCP connections survive, every acknowledged write is still there, never two primaries.
//!
//! These need root, iproute2, redis-tools and /dev/kvm; without them they fail loudly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ftvm_tests::checker::{start_writer, verify, History};
use ftvm_tests::node::RunningNode;
use ftvm_tests::pair::{PairLab, PairOptions};

const BOOT: Duration = Duration::from_secs(60);
const ROLE: Duration = Duration::from_secs(15);

fn pair(opts: PairOptions) -> PairLab {
    match PairLab::new(opts) {
        Ok(l) => l,
        Err(e) => panic!("\n!!!!!!!!!!\ncannot build the pair lab: {e:#}\n!!!!!!!!!!\n"),
    }
}

/// Starts both nodes; returns (primary name, primary, backup name, backup).
fn start_pair(lab: &mut PairLab) -> (String, RunningNode, String, RunningNode) {
    lab.start_witness().unwrap();
    let mut a = lab.start_node("a", &[]).unwrap();
    let mut b = lab.start_node("b", &[]).unwrap();
    a.expect_line("kv: listening on", BOOT).unwrap();
    b.expect_line("kv: listening on", BOOT).unwrap();
    if lab.status("a").unwrap()["role"] == "primary" {
        lab.wait_role("b", "backup", ROLE).unwrap();
        ("a".into(), a, "b".into(), b)
    } else {
        lab.wait_role("a", "backup", ROLE).unwrap();
        lab.wait_role("b", "primary", ROLE).unwrap();
        ("b".into(), b, "a".into(), a)
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<History>,
    bench: std::process::Child,
}

fn start_load(lab: &PairLab) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&lab.client.ns, lab.guest_ip, "w", stop.clone(), Duration::from_secs(20)).unwrap();
    let bench = lab
        .client
        .ns
        .command("redis-benchmark")
        .args(["-h", &lab.guest_ip.to_string(), "-q", "-n", "40000", "-c", "8", "-t", "set,get"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-benchmark (scripts/setup installs redis-tools)");
    Load { stop, writer, bench }
}

/// Stops the load and checks everything the clients were told.
fn finish_load(lab: &PairLab, load: Load) {
    std::thread::sleep(Duration::from_millis(500));
    load.stop.store(true, Ordering::Relaxed);
    let hist = load.writer.join().unwrap();
    let out = load.bench.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n") + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed across the failover: {text}");
    assert!(!text.to_lowercase().contains("error"), "redis-benchmark saw an error: {text}");
    assert_eq!(hist.client_error, None, "the checker's connection broke (it must carry on)");
    assert!(hist.acked() > 20, "the checker got only {} replies", hist.acked());
    let v = verify(&lab.client.ns, lab.guest_ip, &hist).unwrap();
    assert!(v.ok(), "lost or wrong: {v:?}");
    eprintln!(
        "checker: {} acknowledged, 0 lost; longest gap between replies {:?}",
        v.acked, hist.max_gap
    );
}

#[test]
fn kill_9_of_the_primary_under_load_the_backup_goes_live_and_nothing_is_lost() {
    let mut lab = pair(PairOptions::default());
    let (_pn, primary, bn, _backup) = start_pair(&mut lab);
    let load = start_load(&lab);
    std::thread::sleep(Duration::from_millis(800));
    primary.kill9();
    let s = lab.wait_role(&bn, "alone", ROLE).unwrap();
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(s["failovers"], 1, "{s}");
    finish_load(&lab, load);
    let s = lab.status(&bn).unwrap();
    eprintln!("failover: {}", s["last_failover"]);
}

#[test]
fn kill_9_of_the_backup_under_load_the_primary_goes_on_alone() {
    let mut lab = pair(PairOptions::default());
    let (pn, _primary, _bn, backup) = start_pair(&mut lab);
    let load = start_load(&lab);
    std::thread::sleep(Duration::from_millis(800));
    backup.kill9();
    let s = lab.wait_role(&pn, "alone", ROLE).unwrap();
    assert_eq!(s["generation"], 2, "{s}");
    finish_load(&lab, load);
}
