//! What matters for replication: a log whose records are internally consistent (re-encoded,
//! with a valid inputs hash) but whose inputs differ from what the recorded guest saw must be
//! caught by the guest-side checks (fingerprint, memory digest, console or final state) at or
//! after that boundary, never accepted. The log's own inputs hash cannot catch these.

mod common;

use common::{read_log, record, write_log};
use vmm::replay::codec::{inputs_hash, Event, Record};

/// Changes the first event after boundary `after` that `f` changes, and recomputes that
/// record's inputs hash: the log stays internally consistent. Returns the boundary.
fn change_consistently(recs: &mut [Record], after: u64, f: impl Fn(&mut Event) -> bool) -> u64 {
    for r in recs.iter_mut() {
        if let Record::Boundary {
            boundary,
            events,
            inputs_hash: h,
            ..
        } = r
        {
            if *boundary > after && events.iter_mut().any(&f) {
                *h = inputs_hash(events);
                return *boundary;
            }
        }
    }
    panic!("nothing to change after boundary {after}");
}

/// Replays `recs` and asserts a divergence found by the guest-side checks at or after
/// `changed`.
fn assert_caught(guest: &str, recs: &[Record], changed: u64, what: &str, disk: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("consistent.ftlog");
    write_log(&bad, recs);
    // The log decodes and passes its own checks.
    vmm::replay::replayer::Replayer::from_bytes(&std::fs::read(&bad).unwrap()).unwrap();
    let mut a = vec!["replay", "--guest", guest, "--log", bad.to_str().unwrap()];
    if let Some(d) = disk {
        a.extend(["--disk", d]);
    }
    let o = common::run(&a);
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(69), "{what}: accepted: {se}");
    let at: u64 = se
        .split("diverged at boundary ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {se}"));
    assert!(
        at >= changed,
        "{what}: diverged at {at}, before the change at {changed}: {se}"
    );
    assert!(
        !se.contains("are not those recorded"),
        "{what}: the log's own hash: {se}"
    );
}

#[test]
fn consistent_logs_with_other_clock_entropy_or_wait_inputs_are_caught_by_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("clockwork", "800", "500", &log, None);
    let orig = read_log(&log);
    type Change = Box<dyn Fn(&mut Event) -> bool>;
    let cases: Vec<(&str, u64, Change)> = vec![
        (
            "clock +1 ns",
            700,
            Box::new(|e| match e {
                Event::Clock(c) => {
                    c.mono_ns += 1;
                    c.wall_ns += 1;
                    true
                }
                _ => false,
            }),
        ),
        (
            "entropy, one bit",
            1500,
            Box::new(|e| match e {
                Event::Entropy(v) => {
                    *v ^= 1 << 40;
                    true
                }
                _ => false,
            }),
        ),
        (
            "end of a WAIT, monotonic",
            300,
            Box::new(|e| match e {
                Event::WaitEnded(c) => {
                    c.mono_ns += 7;
                    c.wall_ns += 7;
                    true
                }
                _ => false,
            }),
        ),
    ];
    for (what, after, f) in cases {
        let mut recs = orig.clone();
        let b = change_consistently(&mut recs, after, f);
        assert_caught("clockwork", &recs, b, what, None);
    }
}

/// The wall clock alone (the guest reads it from its shared page without an exit, in some
/// rounds only): changed in every clock reading from some boundary on, the guest sees it, and
/// without periodic digests the final memory digest or the registers catch it.
///
/// (An input the guest never looks at, e.g. the wall time of a WAIT's end that clockwork
/// overwrites at its next clock read unread, leaves the replay identical in every guest
/// state and is rightly accepted: there is nothing a backup would do differently.)
#[test]
fn without_periodic_digests_a_consistent_wall_clock_change_is_caught_by_the_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("clockwork", "400", "0", &log, None);
    let mut recs = read_log(&log);
    let first = change_consistently(&mut recs, 100, |e| matches!(e, Event::Clock(_)));
    for r in recs.iter_mut() {
        if let Record::Boundary {
            boundary,
            events,
            inputs_hash: h,
            ..
        } = r
        {
            if *boundary >= first {
                for e in events.iter_mut() {
                    if let Event::Clock(c) = e {
                        c.wall_ns += 3_000;
                    }
                }
                *h = inputs_hash(events);
            }
        }
    }
    assert_caught("clockwork", &recs, first, "wall clock, no digests", None);
}

#[test]
fn a_consistent_log_with_another_disk_result_is_caught_at_that_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(
        &disk,
        (0..1u32 << 20).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let disk = disk.to_str().unwrap();
    let log = dir.path().join("orig.ftlog");
    record("diskwait", "300", "100", &log, Some(disk));
    let mut recs = read_log(&log);
    let b = change_consistently(&mut recs, 150, |e| match e {
        Event::DiskDone { hash, .. } => {
            *hash ^= 1;
            true
        }
        _ => false,
    });
    assert_caught("diskwait", &recs, b, "disk read result", Some(disk));
}
