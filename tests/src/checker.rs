//! A client that records what was acknowledged, and checks it afterwards (the "nothing lost"
//! half of every failover test).
//!
//! A writer keeps **one** TCP connection to the service (a failover must not break it) and
//! issues, one after another, `SET <prefix>:<i> <unique value>` and `INCR <prefix>:ctr`,
//! recording each operation's invocation and completion time and its reply. Afterwards
//! [`verify`] reads every key back on a fresh connection: every acknowledged SET must be
//! readable with its value (nothing overwrites these keys), INCR replies must be distinct and
//! increase in real-time order, and the counter must be at least the last acknowledged value.
//! An operation sent but never acknowledged may or may not have been applied: both are fine.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// One operation of the history.
#[derive(Clone, Debug)]
pub struct Op {
    /// `SET` or `INCR`.
    pub kind: &'static str,
    /// The key.
    pub key: String,
    /// The value written (SET).
    pub value: String,
    /// When it was sent.
    pub invoked: Instant,
    /// When its reply arrived (None: never acknowledged).
    pub completed: Option<Instant>,
    /// The reply (`+OK`, `:17`, or an error).
    pub reply: Option<String>,
}

/// What a writer did.
#[derive(Debug, Default)]
pub struct History {
    /// Every operation, in order.
    pub ops: Vec<Op>,
    /// A connection error, if the writer's connection broke (a failover must not cause one).
    pub client_error: Option<String>,
    /// The longest time between two consecutive replies.
    pub max_gap: Duration,
}

impl History {
    /// Acknowledged operations.
    pub fn acked(&self) -> usize {
        self.ops.iter().filter(|o| o.completed.is_some()).count()
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged writes.
    pub acked: usize,
    /// Acknowledged SETs not readable with their value.
    pub lost: Vec<String>,
    /// INCR anomalies (repeats, going backwards, counter below an acknowledged value).
    pub incr_anomalies: Vec<String>,
    /// Error replies.
    pub errors: Vec<String>,
}

impl Verdict {
    /// True when nothing was lost, no anomaly, no error.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.incr_anomalies.is_empty() && self.errors.is_empty()
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// Reads one RESP reply as text (`+OK`, `:5`, `-ERR …`, or the bulk string's content, `$-1`
/// as `(nil)`).
fn read_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let line = line.trim_end().to_string();
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.parse().unwrap_or(-1);
        if n < 0 {
            return Ok("(nil)".into());
        }
        let mut buf = vec![0u8; n as usize + 2];
        std::io::Read::read_exact(r, &mut buf)?;
        buf.truncate(n as usize);
        return Ok(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(line)
}

/// Runs `f` on a new thread inside `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let path = format!("/run/netns/{}", ns.name());
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    Ok(std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open netns file descriptor changes only this thread's network
        // namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    }))
}

/// Starts a writer in `ns` against `addr`:6379 until `stop` is set. Each reply may take up to
/// `reply_timeout` (a failover's pause included).
pub fn start_writer(
    ns: &Netns,
    addr: Ipv4Addr,
    prefix: &str,
    stop: Arc<AtomicBool>,
    reply_timeout: Duration,
) -> Result<std::thread::JoinHandle<History>> {
    let prefix = prefix.to_string();
    spawn_in_netns(ns, move || writer(addr, &prefix, &stop, reply_timeout))
}

fn writer(addr: Ipv4Addr, prefix: &str, stop: &AtomicBool, reply_timeout: Duration) -> History {
    let mut h = History::default();
    let conn =
        match TcpStream::connect_timeout(&SocketAddr::from((addr, 6379)), Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                h.client_error = Some(format!("connect: {e}"));
                return h;
            }
        };
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(reply_timeout));
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let mut last = Instant::now();
    let mut i = 0u64;
    let ctr = format!("{prefix}:ctr");
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (kind, key, value) = if i.is_multiple_of(2) {
            ("INCR", ctr.clone(), String::new())
        } else {
            (
                "SET",
                format!("{prefix}:{i}"),
                format!("v{i}-{}", i.wrapping_mul(2654435761) % 1_000_003),
            )
        };
        let req = if kind == "SET" {
            resp(&["SET", &key, &value])
        } else {
            resp(&["INCR", &key])
        };
        let invoked = Instant::now();
        h.ops.push(Op {
            kind,
            key,
            value,
            invoked,
            completed: None,
            reply: None,
        });
        if let Err(e) = w.write_all(&req) {
            h.client_error = Some(format!("write: {e}"));
            break;
        }
        match read_reply(&mut r) {
            Ok(rep) => {
                let now = Instant::now();
                h.max_gap = h.max_gap.max(now - last);
                last = now;
                let op = h.ops.last_mut().expect("pushed");
                op.completed = Some(now);
                op.reply = Some(rep);
            }
            Err(e) => {
                h.client_error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    h
}

/// Checks `hist` against the service at `addr` (read on a fresh connection from `ns`).
pub fn verify(ns: &Netns, addr: Ipv4Addr, hist: &History) -> Result<Verdict> {
    let ops = hist.ops.clone();
    let joined = spawn_in_netns(ns, move || -> Result<Verdict> {
        let conn =
            TcpStream::connect_timeout(&SocketAddr::from((addr, 6379)), Duration::from_secs(10))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = conn.try_clone()?;
        let mut r = BufReader::new(conn);
        let mut v = Verdict::default();
        let mut last_incr: Option<i64> = None;
        let mut ctr_key = None;
        for op in &ops {
            let Some(rep) = &op.reply else { continue };
            v.acked += 1;
            if rep.starts_with('-') {
                v.errors.push(format!("{} {}: {rep}", op.kind, op.key));
                continue;
            }
            match op.kind {
                "SET" => {
                    w.write_all(&resp(&["GET", &op.key]))?;
                    let got = read_reply(&mut r)?;
                    if got != op.value {
                        v.lost
                            .push(format!("{} = {:?}, read {got:?}", op.key, op.value));
                    }
                }
                _ => {
                    ctr_key = Some(op.key.clone());
                    let n: i64 = rep.trim_start_matches(':').parse().unwrap_or(-1);
                    if let Some(prev) = last_incr {
                        if n <= prev {
                            v.incr_anomalies.push(format!("INCR gave {n} after {prev}"));
                        }
                    }
                    last_incr = Some(n);
                }
            }
        }
        if let (Some(k), Some(last)) = (ctr_key, last_incr) {
            w.write_all(&resp(&["GET", &k]))?;
            let got: i64 = read_reply(&mut r)?.parse().unwrap_or(-1);
            if got < last {
                v.incr_anomalies.push(format!(
                    "counter reads {got}, below the acknowledged {last}"
                ));
            }
        }
        Ok(v)
    })?;
    match joined.join() {
        Ok(r) => r,
        Err(_) => bail!("the verifier panicked"),
    }
}
