//! Joining a running primary end to end (DESIGN §5 "Cold start and joining"): after a
//! failover the survivor runs alone; a node that starts — the old primary with a disk that
//! holds writes the survivor never saw, or a stranger with a blank disk — joins it while the
//! guest serves clients, and afterwards both run the same VM (memory digests checked on the
//! stream, the disks byte-identical after a clean stop).
//!
//! These need root, iproute2, redis-tools and /dev/kvm; without them they fail loudly.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_tests::checker::{start_writer, verify, History};
use ftvm_tests::node::{redis_text, RunningNode};
use ftvm_tests::pair::{PairLab, PairOptions};

const ROLE: Duration = Duration::from_secs(15);
const JOIN: Duration = Duration::from_secs(40);

fn pair(opts: PairOptions) -> PairLab {
    match PairLab::new(opts) {
        Ok(l) => l,
        Err(e) => panic!("\n!!!!!!!!!!\ncannot build the pair lab: {e:#}\n!!!!!!!!!!\n"),
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<History>,
}

fn start_load(lab: &PairLab) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(
        &lab.client.ns,
        lab.guest_ip,
        "w",
        stop.clone(),
        Duration::from_secs(20),
    )
    .unwrap();
    Load { stop, writer }
}

/// Stops the checker and verifies every acknowledged write.
fn finish_load(lab: &PairLab, load: Load) -> History {
    load.stop.store(true, Ordering::Relaxed);
    let hist = load.writer.join().unwrap();
    assert_eq!(
        hist.client_error,
        None,
        "the checker's connection broke (it must carry on)\n{}",
        lab.logs(30)
    );
    assert!(
        hist.acked() > 20,
        "the checker got only {} replies",
        hist.acked()
    );
    let v = verify(&lab.client.ns, lab.guest_ip, &hist).unwrap();
    assert!(v.ok(), "lost or wrong: {v:?}");
    eprintln!(
        "checker: {} acknowledged, 0 lost; longest gap between replies {:?}",
        v.acked, hist.max_gap
    );
    hist
}

/// Waits until `name`'s status satisfies `ok`.
fn wait_status(
    lab: &PairLab,
    name: &str,
    limit: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(s) = lab.status(name) {
            if ok(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{name}: {what} did not happen within {limit:?}; last status {last:?}\n{}",
        lab.logs(40)
    );
}

/// Stops the primary cleanly; the backup ends with it at the same boundary (its replay
/// checks the end record's memory and console digests); then the disks must be equal.
fn stop_and_compare(lab: &PairLab, primary: RunningNode, backup: RunningNode) {
    primary.signal(libc::SIGTERM);
    let (ps, perr) = primary.wait(Duration::from_secs(20)).unwrap();
    let (bs, berr) = backup.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(ps.code(), Some(128 + 15), "primary: {perr}");
    assert_eq!(
        bs.code(),
        Some(128 + 15),
        "the joined backup ended as the primary did (same end record, same digests): {berr}"
    );
    assert!(
        lab.disks_equal().unwrap(),
        "the joined backup's disk equals the primary's"
    );
}

/// After the join: the backup follows (memory digests compared on the stream), the primary
/// holds output for it again.
fn check_joined(lab: &PairLab, primary: &str, backup: &str, generation: u64) {
    let sp = lab.wait_role(primary, "primary", JOIN).unwrap();
    let sb = lab.wait_role(backup, "backup", ROLE).unwrap();
    assert_eq!(sp["generation"], generation, "{sp}");
    assert_eq!(
        sb["generation"], generation,
        "the joiner adopted the generation: {sb}"
    );
    let before = sb["digests_checked"].as_u64().unwrap();
    wait_status(
        lab,
        backup,
        ROLE,
        "a memory digest compared after the join",
        |s| s["digests_checked"].as_u64().unwrap_or(0) > before + 1,
    );
    // The primary reports its new backup (role, peer) as soon as the output task attached it;
    // the join's own record of the pause may follow a moment later.
    let sp = wait_status(lab, primary, ROLE, "the join's end on the primary", |s| {
        matches!(s["join"]["phase"].as_str(), Some("done" | "failed"))
    });
    let j = &sp["join"];
    eprintln!("join (primary side): {j}");
    let log = std::fs::read_to_string(lab.log(backup)).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("joining:") || l.contains("joined at"))
    {
        eprintln!("  {backup}: {}", l.split_once("Z ").map_or(l, |x| x.1));
    }
    assert_eq!(j["phase"], "done", "{sp}");
    assert!(j["pause_ms"].as_f64().unwrap() < 2000.0, "{sp}");
}

#[test]
fn the_old_primary_rejoins_after_a_failover_with_writes_the_survivor_never_saw() {
    let mut lab = pair(PairOptions::default());
    let (pn, primary, bn, backup) = lab.start_pair("kv: listening on").unwrap();
    let load = start_load(&lab);
    std::thread::sleep(Duration::from_millis(800));
    primary.kill9();
    lab.wait_role(&bn, "alone", ROLE).unwrap();
    // Writes the survivor never saw: scribble over a few blocks of the dead node's disk.
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(lab.disk(&pn))
        .unwrap();
    for block in [3u64, 17, 40] {
        disk.write_all_at(&[0xa5; 65536], block * 65536).unwrap();
    }
    drop(disk);
    let joiner = lab.start_node(&pn, &[]).unwrap();
    check_joined(&lab, &bn, &pn, 2);
    let sp = lab.status(&bn).unwrap();
    assert!(
        sp["join"]["blocks_differing"].as_u64().unwrap() >= 3,
        "the scribbled blocks were found and sent: {sp}"
    );
    // The pair works as a pair again: writes go on, and the checker lost nothing.
    std::thread::sleep(Duration::from_millis(500));
    finish_load(&lab, load);
    assert_eq!(
        redis_text(&lab.client.ns, lab.guest_ip, &["SET", "after", "join"]).unwrap(),
        "OK"
    );
    stop_and_compare(&lab, backup, joiner);
}

#[test]
fn a_fresh_node_with_a_blank_disk_joins_a_primary_running_alone() {
    let mut lab = pair(PairOptions::default());
    let (pn, primary, bn, backup) = lab.start_pair("kv: listening on").unwrap();
    assert_eq!(
        redis_text(&lab.client.ns, lab.guest_ip, &["SET", "k", "v"]).unwrap(),
        "OK"
    );
    backup.kill9();
    lab.wait_role(&pn, "alone", ROLE).unwrap();
    // A stranger: blank disk, no generation file.
    let path = lab.disk(&bn);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::remove_file(&path).unwrap();
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    drop(f);
    let mut state = path.clone().into_os_string();
    state.push(".ftvm-generation");
    let _ = std::fs::remove_file(&state);
    let load = start_load(&lab);
    let joiner = lab.start_node(&bn, &[]).unwrap();
    check_joined(&lab, &pn, &bn, 2);
    let sp = lab.status(&pn).unwrap();
    assert!(
        sp["join"]["blocks_differing"].as_u64().unwrap() > 0,
        "a blank disk differs: {sp}"
    );
    finish_load(&lab, load);
    assert_eq!(
        redis_text(&lab.client.ns, lab.guest_ip, &["GET", "k"]).unwrap(),
        "v"
    );
    stop_and_compare(&lab, primary, joiner);
}

#[test]
fn ten_cycles_of_kill_the_primary_and_rejoin_lose_nothing() {
    let mut lab = pair(PairOptions::default());
    let (pn, p, bn, b) = lab.start_pair("kv: listening on").unwrap();
    let (mut primary, mut backup) = ((pn, p), (bn, b));
    let load = start_load(&lab);
    let mut pauses = Vec::new();
    for cycle in 0..10u64 {
        std::thread::sleep(Duration::from_millis(300));
        let (dead, proc_) = primary;
        proc_.kill9();
        lab.wait_role(&backup.0, "alone", ROLE).unwrap();
        let joiner = lab.start_node(&dead, &[]).unwrap();
        check_joined(&lab, &backup.0, &dead, 2 + cycle);
        pauses.push(
            lab.status(&backup.0).unwrap()["join"]["pause_ms"]
                .as_f64()
                .unwrap(),
        );
        // The survivor is the primary now, the rejoined node its backup.
        primary = backup;
        backup = (dead, joiner);
    }
    let hist = finish_load(&lab, load);
    eprintln!(
        "10 cycles: {} writes acknowledged, 0 lost; join pauses (ms): {pauses:?}",
        hist.acked()
    );
    stop_and_compare(&lab, primary.1, backup.1);
}

#[test]
fn a_joiner_killed_before_the_commit_point_leaves_the_primary_alone_as_it_was() {
    let mut lab = pair(PairOptions::default());
    let (pn, primary, bn, backup) = lab.start_pair("kv: listening on").unwrap();
    backup.kill9();
    lab.wait_role(&pn, "alone", ROLE).unwrap();
    let before = lab.status(&pn).unwrap();
    let load = start_load(&lab);
    let joiner = lab.start_node(&bn, &[]).unwrap();
    wait_status(&lab, &pn, JOIN, "the copy to start", |s| {
        s["join"]["phase"] == "copying"
    });
    // Stopped, the joiner answers no round, so the primary cannot reach the commit point
    // (a round waits for the joiner to apply it; the first starts 250 ms after the copy).
    joiner.signal(libc::SIGSTOP);
    let s = lab.status(&pn).unwrap();
    assert_eq!(s["join"]["phase"], "copying", "killed during the copy: {s}");
    joiner.kill9();
    let s = wait_status(
        &lab,
        &pn,
        JOIN,
        "the primary to notice the failed join",
        |s| s["join"]["phase"] == "failed",
    );
    assert_eq!(s["role"], "alone", "{s}");
    assert_eq!(
        s["generation"], before["generation"],
        "nothing was committed, so nothing was claimed: {s}"
    );
    assert_eq!(s["failovers"], before["failovers"], "{s}");
    assert_eq!(s["joins"], 0, "{s}");
    // And it can still take the node when it comes back.
    let joiner = lab.start_node(&bn, &[]).unwrap();
    check_joined(&lab, &pn, &bn, before["generation"].as_u64().unwrap());
    finish_load(&lab, load);
    stop_and_compare(&lab, primary, joiner);
}

#[test]
fn a_joiner_killed_after_the_commit_point_is_a_lost_backup() {
    let mut lab = pair(PairOptions::default());
    let (pn, _primary, bn, backup) = lab.start_pair("kv: listening on").unwrap();
    backup.kill9();
    lab.wait_role(&pn, "alone", ROLE).unwrap();
    let load = start_load(&lab);
    let joiner = lab.start_node(&bn, &[]).unwrap();
    lab.wait_role(&bn, "backup", JOIN).unwrap();
    joiner.kill9();
    // From the commit point the joiner was the backup: its loss is backup loss — hold, claim,
    // alone in a new generation.
    let s = wait_status(&lab, &pn, ROLE, "a claim after the backup's loss", |s| {
        s["role"] == "alone" && s["generation"] == 3
    });
    assert_eq!(s["joins"], 1, "{s}");
    finish_load(&lab, load);
}

#[test]
fn with_three_members_a_spare_joins_the_survivor_with_no_restart() {
    let mut lab = pair(PairOptions {
        nodes: vec!["a".into(), "b".into(), "c".into()],
        ..PairOptions::default()
    });
    let (pn, primary, bn, _backup) = lab.start_pair("kv: listening on").unwrap();
    let spare = lab.start_node("c", &[]).unwrap();
    // The spare asks, both members are busy: it waits (and never claims).
    wait_status(&lab, "c", ROLE, "the spare to see the pair", |s| {
        s["role"] == "starting" && s["peer_role"].is_string()
    });
    std::thread::sleep(Duration::from_secs(1));
    let s = lab.status("c").unwrap();
    assert_eq!(s["role"], "starting", "{s}");
    assert_eq!(s["generation"], 0, "{s}");
    let load = start_load(&lab);
    primary.kill9();
    let t = Instant::now();
    lab.wait_role(&bn, "alone", ROLE).unwrap();
    check_joined(&lab, &bn, "c", 2);
    eprintln!(
        "the spare joined {:?} after the primary's kill",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    finish_load(&lab, load);
    let _ = pn;
    drop(spare);
}
