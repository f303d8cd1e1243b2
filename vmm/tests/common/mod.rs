//! Shared helpers of the VMM's end-to-end tests: run `ftvm-node` for real under KVM.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vmm::replay::codec::{Decoder, Encoder, Record};

pub use ftvm_tests::node::require_kvm;

/// The node binary.
pub fn node() -> Command {
    require_kvm();
    Command::new(env!("CARGO_BIN_EXE_ftvm-node"))
}

/// Runs the node to completion.
pub fn run(args: &[&str]) -> Output {
    node().args(args).output().expect("spawn ftvm-node")
}

/// A node running in the background whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        let mut child = node()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvm-node");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits (at most `limit`) for a stdout line containing `needle`.
    pub fn expect_line(&self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle:?} within {limit:?}: {e}"),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    /// Waits for the process to end, at most `limit`; returns its status and stderr.
    pub fn wait_within(self, limit: Duration) -> (ExitStatus, String) {
        let mut child = self.child;
        let (tx, rx) = mpsc::channel();
        let mut stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            let status = child.wait();
            let _ = tx.send((status, s, child));
        });
        match rx.recv_timeout(limit) {
            Ok((status, s, _)) => (status.expect("wait"), s),
            Err(_) => panic!("ftvm-node did not exit within {limit:?}"),
        }
    }
}

/// The records of the log at `p`.
pub fn read_log(p: &Path) -> Vec<Record> {
    let bytes = std::fs::read(p).unwrap();
    let mut d = Decoder::new(&bytes);
    let mut v = Vec::new();
    while let Some(r) = d.next_record().unwrap() {
        v.push(r);
    }
    v
}

/// Writes `recs` as a log at `p` (re-encoded: clocks as deltas from the records before).
pub fn write_log(p: &Path, recs: &[Record]) {
    let mut e = Encoder::new();
    let mut b = Vec::new();
    for r in recs {
        e.encode(r, &mut b);
    }
    std::fs::write(p, b).unwrap();
}

/// Records a solo run of `guest` with `args` into `log`, a memory digest every
/// `digest_every` boundaries, with `disk` if given; asserts that the run succeeded.
pub fn record(
    guest: &str,
    args: &str,
    digest_every: &str,
    log: &Path,
    disk: Option<&str>,
) -> Output {
    let mut a = vec![
        "run",
        "--solo",
        "--guest",
        guest,
        "--guest-args",
        args,
        "--record",
        log.to_str().unwrap(),
        "--digest-every",
        digest_every,
    ];
    if let Some(d) = disk {
        a.extend(["--disk", d]);
    }
    let o = run(&a);
    assert!(
        o.status.success(),
        "record {guest}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}
