//! The soak's clients: threads in the client namespace, each with one connection at a time,
//! issuing random `SET`s of unique values, `GET`s and `INCR`s on a few shared keys and
//! recording every operation ([`crate::checker::Op`]). A broken connection is recorded (as a
//! client error of its kind) and replaced by a new one.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::rng::Rng;
use crate::checker::{spawn_in_netns, Call, Conn, Op, Outcome, Reply, Resp};
use crate::netns::Netns;

/// Keys only ever `SET` (and read).
pub const REGISTERS: usize = 8;
/// Keys only ever `INCR`ed (and read).
pub const COUNTERS: usize = 2;

/// Every key a trial's clients use.
pub fn keys() -> Vec<String> {
    (0..REGISTERS)
        .map(|i| format!("r{i}"))
        .chain((0..COUNTERS).map(|i| format!("n{i}")))
        .collect()
}

/// A client's problem: an operation without a normal answer, or a failed connect.
#[derive(Clone, Debug)]
pub struct ClientError {
    /// When (ns on the trial's clock).
    pub at: u64,
    /// The client.
    pub client: u32,
    /// Its kind (`reply: timeout`, `reply: reset`, `connect: refused`, `error reply`, …).
    pub kind: String,
    /// The error's text and the operation.
    pub detail: String,
}

/// What one client did.
#[derive(Debug, Default)]
pub struct ClientRun {
    /// Every operation, in order.
    pub ops: Vec<Op>,
    /// Its errors.
    pub errors: Vec<ClientError>,
    /// The longest time between two answers, and when it began (ns on the trial's clock).
    pub max_gap: (u64, u64),
    /// Every gap between two answers of at least [`GAP_RECORDED`]: (when it began, how long).
    pub gaps: Vec<(u64, u64)>,
}

/// The shortest gap between two answers that [`ClientRun::gaps`] records (ns).
pub const GAP_RECORDED: u64 = 300_000_000;

/// The kind of an I/O error, for the summary.
pub fn kind_of(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::WouldBlock | K::TimedOut => "timeout".into(),
        K::ConnectionReset => "reset".into(),
        K::ConnectionAborted => "aborted".into(),
        K::UnexpectedEof => "closed by the server".into(),
        K::BrokenPipe => "broken pipe".into(),
        K::ConnectionRefused => "refused".into(),
        K::InvalidData => "protocol".into(),
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) => "host unreachable".into(),
            Some(libc::ENETUNREACH) => "network unreachable".into(),
            _ => format!("{:?}", e.kind()),
        },
    }
}

/// Knobs of the clients.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// How long a reply may take before the client gives up on it (and on the connection).
    pub reply_timeout: Duration,
    /// Seed of the clients' choices.
    pub seed: u64,
    /// The trial's clock origin.
    pub epoch: Instant,
}

/// Starts `n` clients in `ns`; they run until `stop` is set.
pub fn start(
    ns: &Netns,
    n: usize,
    cfg: &ClientConfig,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<ClientRun>>> {
    let mut out = Vec::new();
    for id in 0..n as u32 {
        let cfg = cfg.clone();
        let stop = stop.clone();
        out.push(spawn_in_netns(ns, move || run(id, &cfg, &stop))?);
    }
    Ok(out)
}

fn run(id: u32, cfg: &ClientConfig, stop: &AtomicBool) -> ClientRun {
    let mut rng = Rng::new(cfg.seed.wrapping_mul(1_000_003).wrapping_add(id as u64));
    let now = || cfg.epoch.elapsed().as_nanos() as u64;
    let mut out = ClientRun::default();
    let mut conn: Option<Conn> = None;
    // Connect failures are counted once per outage (the first), not once per retry.
    let mut connect_failed = false;
    let mut last_answer = now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(cfg.addr, Duration::from_secs(3), cfg.reply_timeout) {
                Ok(c) => {
                    connect_failed = false;
                    conn.insert(c)
                }
                Err(e) => {
                    if !connect_failed {
                        out.errors.push(ClientError {
                            at: now(),
                            client: id,
                            kind: format!("connect: {}", kind_of(&e)),
                            detail: e.to_string(),
                        });
                    }
                    connect_failed = true;
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        seq += 1;
        let (key, call) = match rng.below(100) {
            0..=39 => (
                format!("r{}", rng.below(REGISTERS as u64)),
                Call::Set(format!("c{id}.{seq}")),
            ),
            40..=64 => (format!("r{}", rng.below(REGISTERS as u64)), Call::Get),
            65..=94 => (format!("n{}", rng.below(COUNTERS as u64)), Call::Incr),
            _ => (format!("n{}", rng.below(COUNTERS as u64)), Call::Get),
        };
        let args: Vec<&str> = match &call {
            Call::Set(v) => vec!["SET", &key, v],
            Call::Incr => vec!["INCR", &key],
            Call::Get => vec!["GET", &key],
        };
        let invoked = now();
        let res = c.call(&args);
        let t = now();
        let describe = || args.join(" ");
        let (completed, outcome) = match res {
            Ok(r) => {
                let gap = t.saturating_sub(last_answer);
                if gap > out.max_gap.0 {
                    out.max_gap = (gap, last_answer);
                }
                if gap >= GAP_RECORDED {
                    out.gaps.push((last_answer, gap));
                }
                last_answer = t;
                let outcome = match (&call, r) {
                    (Call::Set(_), Resp::Simple(s)) if s == "OK" => Outcome::Done(Reply::Ok),
                    (Call::Incr, Resp::Int(n)) => Outcome::Done(Reply::Int(n)),
                    (Call::Get, Resp::Bulk(v)) => Outcome::Done(Reply::Value(v)),
                    (_, Resp::Error(e)) => {
                        out.errors.push(ClientError {
                            at: t,
                            client: id,
                            kind: "error reply".into(),
                            detail: format!("{}: -{e}", describe()),
                        });
                        Outcome::Refused(e)
                    }
                    (_, other) => {
                        out.errors.push(ClientError {
                            at: t,
                            client: id,
                            kind: "unexpected reply".into(),
                            detail: format!("{}: {other:?}", describe()),
                        });
                        // An answer was given, but not the expected one: as good as unknown.
                        Outcome::Unknown(format!("unexpected reply {other:?}"))
                    }
                };
                let completed = match outcome {
                    Outcome::Unknown(_) => None,
                    _ => Some(t),
                };
                (completed, outcome)
            }
            Err(e) => {
                let kind = format!("reply: {}", kind_of(&e));
                out.errors.push(ClientError {
                    at: t,
                    client: id,
                    kind: kind.clone(),
                    detail: format!("{} after {} ms: {e}", describe(), (t - invoked) / 1_000_000),
                });
                conn = None;
                (None, Outcome::Unknown(kind))
            }
        };
        out.ops.push(Op {
            client: id,
            key,
            call,
            invoked,
            completed,
            outcome,
        });
    }
    // A wait still going on when the clients stop counts as well (the pair may have been
    // unreachable until the end).
    let gap = now().saturating_sub(last_answer);
    if gap > out.max_gap.0 {
        out.max_gap = (gap, last_answer);
    }
    if gap >= GAP_RECORDED {
        out.gaps.push((last_answer, gap));
    }
    out
}
