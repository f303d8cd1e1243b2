//! Record and replay under real KVM: identical replays, divergence found at exactly the
//! tampered boundary, malformed and mismatched logs refused before the guest starts.

mod common;

use std::path::Path;

use common::{read_log, run, write_log};
use vmm::replay::codec::{Decoder, Event, Record};

fn out(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn record(guest: &str, args: &str, log: &Path) -> (String, String) {
    out(&common::record(guest, args, "500", log, None))
}

fn replay(guest: &str, log: &Path) -> std::process::Output {
    run(&["replay", "--guest", guest, "--log", log.to_str().unwrap()])
}

fn field(summary: &str, name: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {summary:?}"))
        .parse()
        .unwrap()
}

#[test]
fn clockwork_replays_identically_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("clockwork.ftlog");
    let (recorded, rec_err) = record("clockwork", "1500", &log);
    assert!(
        recorded.contains("clockwork: done rounds=1500"),
        "{recorded}"
    );
    let boundaries = field(&rec_err, "boundaries");
    assert!(boundaries > 3000, "{rec_err}");
    for _ in 0..3 {
        let o = replay("clockwork", &log);
        let (so, se) = out(&o);
        assert!(o.status.success(), "{se}");
        assert_eq!(so, recorded, "the replayed console differs");
        assert!(se.contains("replay: identical"), "{se}");
        assert_eq!(field(&se, "boundaries"), boundaries);
    }
    // Two recordings differ (the inputs are live), each replays to its own result.
    let log2 = dir.path().join("clockwork2.ftlog");
    let (recorded2, _) = record("clockwork", "1500", &log2);
    assert_ne!(
        recorded, recorded2,
        "two live runs should not see identical inputs"
    );
    let (so, _) = out(&replay("clockwork", &log2));
    assert_eq!(so, recorded2);
}

#[test]
fn a_run_of_more_than_100k_boundaries_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("long.ftlog");
    let (recorded, rec_err) = record("clockwork", "40000", &log);
    assert!(field(&rec_err, "boundaries") >= 100_000, "{rec_err}");
    let o = replay("clockwork", &log);
    let (so, se) = out(&o);
    assert!(o.status.success(), "{se}");
    assert_eq!(so, recorded);
    assert_eq!(field(&se, "boundaries"), field(&rec_err, "boundaries"));
    assert!(field(&se, "digests") >= 200, "{se}");
}

#[test]
fn selftest_and_exitbench_replay_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (guest, args) in [("selftest", ""), ("exitbench", "clock 3000")] {
        let log = dir.path().join(format!("{guest}.ftlog"));
        let (recorded, _) = record(guest, args, &log);
        let o = replay(guest, &log);
        let (so, se) = out(&o);
        assert!(o.status.success(), "{guest}: {se}");
        assert_eq!(so, recorded, "{guest}");
    }
}

/// Picks the `n`th boundary record with an event of the wanted kind and changes it.
fn tamper(recs: &mut [Record], n: usize, f: impl Fn(&mut Event) -> bool) -> u64 {
    let mut seen = 0;
    for r in recs.iter_mut() {
        if let Record::Boundary {
            boundary, events, ..
        } = r
        {
            for e in events.iter_mut() {
                if f(&mut e.clone()) {
                    if seen == n {
                        assert!(f(e));
                        return *boundary;
                    }
                    seen += 1;
                }
            }
        }
    }
    panic!("no event to tamper with");
}

#[test]
fn tampering_is_found_at_exactly_that_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("clockwork", "800", &log);
    let orig = read_log(&log);

    type Tamper = Box<dyn Fn(&mut Vec<Record>) -> u64>;
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "clock",
            Box::new(|r| {
                tamper(r, 300, |e| match e {
                    Event::Clock(c) => {
                        c.mono_ns += 1;
                        true
                    }
                    _ => false,
                })
            }),
        ),
        (
            "entropy byte",
            Box::new(|r| {
                tamper(r, 200, |e| match e {
                    Event::Entropy(v) => {
                        *v ^= 0x100;
                        true
                    }
                    _ => false,
                })
            }),
        ),
        (
            "wait end",
            Box::new(|r| {
                tamper(r, 100, |e| match e {
                    Event::WaitEnded(c) => {
                        c.wall_ns -= 5;
                        true
                    }
                    _ => false,
                })
            }),
        ),
        (
            "fingerprint",
            Box::new(|r| {
                let rec = r
                    .iter_mut()
                    .filter(|x| matches!(x, Record::Boundary { .. }))
                    .nth(500)
                    .unwrap();
                let Record::Boundary {
                    boundary,
                    fingerprint,
                    ..
                } = rec
                else {
                    unreachable!()
                };
                fingerprint.regs_hash ^= 1;
                *boundary
            }),
        ),
    ];
    for (what, f) in cases {
        let mut recs = orig.clone();
        let b = f(&mut recs);
        let bad = dir.path().join("bad.ftlog");
        write_log(&bad, &recs);
        let o = replay("clockwork", &bad);
        let (_, se) = out(&o);
        assert_eq!(o.status.code(), Some(69), "{what}: {se}");
        assert!(
            se.contains(&format!("replay diverged at boundary {b}:")),
            "{what} at {b}: {se}"
        );
    }
}

#[test]
fn a_faithfully_logged_but_different_input_makes_the_guest_itself_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("clockwork", "800", &log);
    let mut recs = read_log(&log);
    // Change an entropy value and fix up the inputs hash, as if the primary had really
    // handed the guest that value: the guest's own state must then differ later on.
    let mut changed_at = 0;
    for r in recs.iter_mut() {
        if let Record::Boundary {
            boundary,
            events,
            inputs_hash,
            ..
        } = r
        {
            if *boundary > 1000 {
                if let Some(Event::Entropy(v)) = events.first_mut() {
                    *v = v.wrapping_add(12345);
                    *inputs_hash = vmm::replay::codec::inputs_hash(events);
                    changed_at = *boundary;
                    break;
                }
            }
        }
    }
    assert!(changed_at > 0);
    let bad = dir.path().join("bad.ftlog");
    write_log(&bad, &recs);
    let o = replay("clockwork", &bad);
    let (_, se) = out(&o);
    assert_eq!(o.status.code(), Some(69), "{se}");
    let at: u64 = se
        .split("diverged at boundary ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{se}"));
    assert!(
        at > changed_at,
        "diverged at {at}, changed at {changed_at}: {se}"
    );
    // The log itself is consistent: what differs is the guest, not the recorded inputs.
    assert!(!se.contains("are not those recorded"), "{se}");
}

#[test]
fn malformed_and_mismatched_logs_are_refused_before_the_guest_starts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("clockwork", "300", &log);
    let bytes = std::fs::read(&log).unwrap();

    let cut = dir.path().join("cut.ftlog");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = replay("clockwork", &cut);
    let (so, se) = out(&o);
    assert_eq!(o.status.code(), Some(66), "{se}");
    assert!(se.contains("truncated record at offset"), "{se}");
    assert!(so.is_empty(), "the guest must not start: {so}");

    // Cut exactly between records: no end record.
    let mut d = Decoder::new(&bytes);
    d.next_record().unwrap();
    d.next_record().unwrap();
    std::fs::write(&cut, &bytes[..d.position()]).unwrap();
    let (_, se) = out(&replay("clockwork", &cut));
    assert!(se.contains("no end record"), "{se}");

    let garbage = dir.path().join("garbage.ftlog");
    std::fs::write(&garbage, b"definitely not a log").unwrap();
    let o = replay("clockwork", &garbage);
    assert_eq!(o.status.code(), Some(66));

    let o = replay("selftest", &log);
    let (so, se) = out(&o);
    assert_eq!(o.status.code(), Some(66), "{se}");
    assert!(se.contains("different guest image"), "{se}");
    assert!(so.is_empty());

    let o = run(&[
        "replay",
        "--guest",
        "clockwork",
        "--log",
        log.to_str().unwrap(),
        "--mem",
        "128M",
    ]);
    let (so, se) = out(&o);
    assert_eq!(o.status.code(), Some(66), "{se}");
    assert!(se.contains("bytes of guest memory"), "{se}");
    assert!(so.is_empty());
}

#[test]
fn the_memory_digest_is_the_documented_hash_of_every_page() {
    common::require_kvm();
    struct Null;
    impl vmm::epoch::ConsoleSink for Null {
        fn write(&mut self, _: &[u8]) {}
    }
    let stop = vmm::signals::install().unwrap();
    let params = vmm::kvm::boot::BootParams {
        args: "400".into(),
        tracked: true,
        ..Default::default()
    };
    let mut m = vmm::setup::build_machine(
        vmm::guests::bundled("clockwork").unwrap(),
        32 << 20,
        &params,
        Box::new(vmm::live::LiveInputs::new(stop.clone(), 0)),
        Box::new(Null),
        stop,
    )
    .unwrap();
    let outcome = m.run().unwrap();
    assert!(
        matches!(outcome, vmm::machine::Outcome::Exited { status: 0 }),
        "{outcome:?}"
    );
    // The digest as docs/log-format.md defines it, computed here page by page.
    let mem = &m.vm().memory;
    let mut root = blake3::Hasher::new();
    let mut chunk = blake3::Hasher::new();
    let mut written = 0;
    for p in 0..mem.pages() {
        let mut page = [0u8; 4096];
        mem.page(p, &mut page).unwrap();
        written += u64::from(page != [0u8; 4096]);
        chunk.update(blake3::hash(&page).as_bytes());
        if (p + 1) % 256 == 0 || p + 1 == mem.pages() {
            root.update(chunk.finalize().as_bytes());
            chunk = blake3::Hasher::new();
        }
    }
    assert!(written > 0, "the guest and its image wrote no page");
    let expected = *root.finalize().as_bytes();
    assert_eq!(m.memory_digest().unwrap().unwrap(), expected);
    assert_eq!(m.end().unwrap().memory_digest, expected);
}

#[test]
fn a_recording_stopped_between_exits_replays_to_the_same_stop() {
    // `spin` computes forever after its first line: the signal always lands between exits, and
    // the replay must stop there too instead of running the guest on (forever).
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spin.ftlog");
    let node = common::Running::start(&[
        "run",
        "--solo",
        "--guest",
        "spin",
        "--record",
        log.to_str().unwrap(),
    ]);
    node.expect_line("spin: spinning", std::time::Duration::from_secs(30));
    node.signal(libc::SIGTERM);
    let (status, err) = node.wait_within(std::time::Duration::from_secs(5));
    assert_eq!(status.code(), Some(143), "{err}");
    let rec = err
        .lines()
        .find(|l| l.starts_with("record:"))
        .unwrap()
        .to_string();
    let node =
        common::Running::start(&["replay", "--guest", "spin", "--log", log.to_str().unwrap()]);
    node.expect_line("spin: spinning", std::time::Duration::from_secs(30));
    let (status, err) = node.wait_within(std::time::Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "a matched replay succeeds: {err}");
    let rep = err
        .lines()
        .find(|l| l.starts_with("replay: identical"))
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(field(rep, "boundaries"), field(&rec, "boundaries"));
}

#[test]
fn recordings_stopped_at_random_moments_replay_to_the_same_stop() {
    // clockwork alternates computation and short WAITs: the signal lands in either.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        let log = dir.path().join(format!("stopped-{i}.ftlog"));
        let node = common::Running::start(&[
            "run",
            "--solo",
            "--guest",
            "clockwork",
            "--guest-args",
            "10000000",
            "--record",
            log.to_str().unwrap(),
        ]);
        node.expect_line(
            &format!("clockwork: round {}", 500 * (i + 1)),
            std::time::Duration::from_secs(60),
        );
        node.signal(libc::SIGTERM);
        let (status, err) = node.wait_within(std::time::Duration::from_secs(5));
        assert_eq!(status.code(), Some(143), "{err}");
        let rec = err
            .lines()
            .find(|l| l.starts_with("record:"))
            .unwrap()
            .to_string();
        let o = replay("clockwork", &log);
        let (_, se) = out(&o);
        assert_eq!(o.status.code(), Some(0), "a matched replay succeeds: {se}");
        let rep = se
            .lines()
            .find(|l| l.starts_with("replay: identical"))
            .unwrap_or_else(|| panic!("{se}"));
        assert_eq!(field(rep, "boundaries"), field(&rec, "boundaries"));
    }
}
