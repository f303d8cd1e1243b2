//! A recording stopped by a signal during a WAIT whose boundary already carries a block
//! completion (the request submitted without an exit, taken at the WAIT) replays to the same
//! stop: found by review, not by the SDK's own disk helpers, which POLL.

mod common;

use std::time::Duration;

fn field(summary: &str, name: &str) -> String {
    summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {summary:?}"))
        .to_string()
}

#[test]
fn diskwait_stopped_at_random_moments_replays_to_the_same_stop() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(
        &disk,
        (0..1u32 << 20)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let disk = disk.to_str().unwrap();
    for i in 0..5u64 {
        let log = dir.path().join(format!("stopped-{i}.ftlog"));
        let node = common::Running::start(&[
            "run",
            "--solo",
            "--guest",
            "diskwait",
            "--disk",
            disk,
            "--record",
            log.to_str().unwrap(),
            "--digest-every",
            "97",
        ]);
        // Each round is one submit and one ~0.3 ms WAIT: the signal nearly always lands in a
        // WAIT, at a different round each time.
        node.expect_line(
            &format!("diskwait: round {}", 200 * (i + 1)),
            Duration::from_secs(60),
        );
        node.signal(libc::SIGTERM);
        let (status, err) = node.wait_within(Duration::from_secs(30));
        assert_eq!(status.code(), Some(143), "{err}");
        let rec = err
            .lines()
            .find(|l| l.starts_with("record:"))
            .unwrap_or_else(|| panic!("{err}"))
            .to_string();
        // The guest only reads the disk, so it is still as it was when the recording started.
        let o = common::run(&[
            "replay",
            "--guest",
            "diskwait",
            "--log",
            log.to_str().unwrap(),
            "--disk",
            disk,
        ]);
        let se = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "recording {i}: {se}");
        let rep = se
            .lines()
            .find(|l| l.starts_with("replay: identical"))
            .unwrap_or_else(|| panic!("{se}"));
        assert_eq!(field(rep, "boundaries"), field(&rec, "boundaries"), "{se}");
        assert_eq!(field(rep, "ending"), "signal:15", "{se}");
    }
}
