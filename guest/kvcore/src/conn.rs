//! One client connection: input buffering, request parsing, execution, and replies held
//! back until the log records they depend on are durable.
//!
//! Every reply is tagged with [`LogWriter::appended`] as it stood right after its command
//! ran; it is released once [`LogWriter::durable`] reaches that tag. So a write's reply waits
//! for its record's flush, and so does any later reply that might have seen the write (a GET
//! after an unflushed SET), while replies that depend on nothing unflushed go out at once.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::aof::LogWriter;
use crate::commands::is_write_command;
use crate::resp::{self, write_error, Limits, Parse};
use crate::store::Store;

/// Room, beyond a write request's own record, that must be left on the disk for it to run.
const WRITE_MARGIN: u64 = 4096;

/// Whether the guest should keep the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Keep serving it.
    Open,
    /// No more requests are read (protocol error, QUIT, or a failed log append): send the
    /// remaining output as it is released, then close once [`Connection::finished`].
    Closing,
}

/// The server side of one client connection.
#[derive(Debug)]
pub struct Connection {
    limits: Limits,
    input: Vec<u8>,
    /// Replies not yet released, back to back.
    held: Vec<u8>,
    /// Each held reply's tag and where it ends in `held`, counted from `held_base`
    /// (replies with equal tags share an entry).
    held_ends: VecDeque<(u64, usize)>,
    /// Bytes taken out of `held` so far (the stream offset of `held[0]`).
    held_base: usize,
    status: Status,
    scratch: Vec<u8>,
    /// The arguments of the request being run; their allocations are reused.
    args: Vec<Vec<u8>>,
}

/// What a connection keeps between requests is small beside its socket buffers (16 KiB by
/// default), so a client that once sent a large or long request, or got a large reply,
/// does not keep that memory: at most this many argument vectors are kept ...
const KEEP_ARGS: usize = 8;

/// ... each only if its capacity is at most this ...
const KEEP_ARG_CAPACITY: usize = 512;

/// ... and the emptied reply buffer only if its capacity is at most this.
const KEEP_HELD_CAPACITY: usize = 2048;

impl Connection {
    /// A new connection whose requests are bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        Connection {
            limits,
            input: Vec::new(),
            held: Vec::new(),
            held_ends: VecDeque::new(),
            held_base: 0,
            status: Status::Open,
            scratch: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds bytes received from the client. Ignored once the connection is closing.
    pub fn feed(&mut self, data: &[u8]) {
        if self.status == Status::Open {
            self.input.extend_from_slice(data);
        }
    }

    /// Bytes received but not yet parsed (a partial request).
    pub fn buffered_input(&self) -> usize {
        self.input.len()
    }

    /// Bytes of replies produced but not yet taken by [`Connection::take_output`]. A guest
    /// may stop calling [`Connection::process`] while this is large (backpressure).
    pub fn pending_output(&self) -> usize {
        self.held.len()
    }

    /// The connection's status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Closing and every reply taken: close the socket now.
    pub fn finished(&self) -> bool {
        self.status == Status::Closing && self.held_ends.is_empty()
    }

    fn push_reply(&mut self, tag: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.held.extend_from_slice(bytes);
        let end = self.held_base + self.held.len();
        match self.held_ends.back_mut() {
            Some((t, e)) if *t == tag => *e = end,
            _ => self.held_ends.push_back((tag, end)),
        }
    }

    /// Runs every complete request in the input at time `now_ms`: replies are held in the
    /// connection, log records go to `log`. Call [`LogWriter::seal`], write and flush the
    /// batch, [`LogWriter::mark_durable`], then [`Connection::take_output`].
    pub fn process(&mut self, store: &mut Store, log: &mut LogWriter, now_ms: u64) -> Status {
        let mut pos = 0;
        while self.status == Status::Open {
            match resp::parse(&self.input[pos..], &self.limits, &mut self.args) {
                Parse::Incomplete => break,
                Parse::Empty { consumed } => pos += consumed,
                Parse::Error(e) => {
                    self.scratch.clear();
                    e.write_reply(&mut self.scratch);
                    let s = core::mem::take(&mut self.scratch);
                    self.push_reply(log.appended(), &s);
                    self.scratch = s;
                    self.status = Status::Closing;
                }
                Parse::Command { consumed } => {
                    pos += consumed;
                    let mut args = core::mem::take(&mut self.args);
                    self.run(&args, store, log, now_ms);
                    args.truncate(KEEP_ARGS);
                    for a in args.iter_mut() {
                        if a.capacity() > KEEP_ARG_CAPACITY {
                            *a = Vec::new();
                        }
                    }
                    self.args = args;
                }
            }
        }
        if self.status == Status::Open {
            self.input.drain(..pos);
        } else {
            self.input = Vec::new();
        }
        self.status
    }

    fn run(&mut self, args: &[Vec<u8>], store: &mut Store, log: &mut LogWriter, now_ms: u64) {
        let mut out = core::mem::take(&mut self.scratch);
        out.clear();
        // Refuse a write up front when its record would not fit, so the store is not
        // changed without a record. (A rewritten record, SPOP's SREM, can be larger than
        // the request; if even the margin is not enough, the append below fails and the
        // client gets an error and is disconnected instead of an acknowledgement.)
        if is_write_command(&args[0])
            && LogWriter::record_len(args) as u64 + WRITE_MARGIN > log.room()
        {
            write_error(&mut out, "ERR disk log is full, write refused");
        } else {
            let outcome = store.execute(args, now_ms, &mut out);
            if let Some(rec) = outcome.log_args(args) {
                if let Err(e) = log.append(now_ms, rec) {
                    // The store changed but the change cannot be made durable: never
                    // acknowledge it, and stop serving this client.
                    out.clear();
                    let mut msg = alloc::string::String::from("ERR ");
                    use core::fmt::Write;
                    let _ = write!(msg, "{e}");
                    write_error(&mut out, &msg);
                    self.status = Status::Closing;
                }
            }
            if outcome.close {
                self.status = Status::Closing;
            }
        }
        self.push_reply(log.appended(), &out);
        self.scratch = out;
    }

    /// Moves every reply whose log records are durable (per `log`) to `out`, in order.
    pub fn take_output(&mut self, log: &LogWriter, out: &mut Vec<u8>) {
        let mut upto = self.held_base;
        while let Some(&(tag, end)) = self.held_ends.front() {
            if tag > log.durable() {
                break;
            }
            self.held_ends.pop_front();
            upto = end;
        }
        let n = upto - self.held_base;
        if n > 0 {
            out.extend_from_slice(&self.held[..n]);
            self.held.drain(..n);
            self.held_base = upto;
            if self.held.is_empty() && self.held.capacity() > KEEP_HELD_CAPACITY {
                self.held = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn setup() -> (Store, LogWriter, Vec<u8>) {
        let mut log = LogWriter::format(1 << 20, 9).unwrap();
        let mut disk = alloc::vec![0u8; 1 << 20];
        commit(&mut log, &mut disk);
        (Store::new(1), log, disk)
    }

    fn commit(log: &mut LogWriter, disk: &mut [u8]) {
        if let Some(b) = log.seal() {
            disk[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
            log.mark_durable();
        }
    }

    #[test]
    fn write_replies_wait_for_the_flush() {
        let (mut store, mut log, mut disk) = setup();
        let mut c = Connection::new(Limits::default());
        let mut out = Vec::new();
        c.feed(b"PING\r\n");
        c.process(&mut store, &mut log, 0);
        c.take_output(&log, &mut out);
        assert_eq!(out, b"+PONG\r\n", "nothing pending: released at once");
        out.clear();
        c.feed(b"SET a 1\r\nGET a\r\n");
        c.process(&mut store, &mut log, 0);
        c.take_output(&log, &mut out);
        assert!(out.is_empty(), "the write and the read after it wait");
        // Another connection reading the unflushed value waits too.
        let mut c2 = Connection::new(Limits::default());
        c2.feed(b"GET a\r\n");
        c2.process(&mut store, &mut log, 0);
        c2.take_output(&log, &mut out);
        assert!(out.is_empty());
        let b = log.seal().unwrap();
        c.take_output(&log, &mut out);
        assert!(out.is_empty(), "sealed is not durable");
        disk[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
        log.mark_durable();
        c.take_output(&log, &mut out);
        assert_eq!(out, b"+OK\r\n$1\r\n1\r\n");
        out.clear();
        c2.take_output(&log, &mut out);
        assert_eq!(out, b"$1\r\n1\r\n");
        assert_eq!(c.pending_output(), 0);
    }

    #[test]
    fn replies_leave_in_order_as_far_as_the_log_is_durable() {
        let (mut store, mut log, mut disk) = setup();
        let mut c = Connection::new(Limits::default());
        let mut out = Vec::new();
        // A large value first: its reply grows the buffer past what is kept.
        let big = alloc::vec![b'x'; 5000];
        let mut req = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$5000\r\n".to_vec();
        req.extend_from_slice(&big);
        req.extend_from_slice(b"\r\nGET big\r\n");
        c.feed(&req);
        c.process(&mut store, &mut log, 0);
        commit(&mut log, &mut disk);
        c.take_output(&log, &mut out);
        let mut want = b"+OK\r\n$5000\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"\r\n");
        assert_eq!(out, want);
        assert_eq!(c.pending_output(), 0);
        out.clear();
        // Two commits: only the replies of the durable one leave.
        c.feed(b"SET a 1\r\nGET a\r\n");
        c.process(&mut store, &mut log, 0);
        commit(&mut log, &mut disk);
        c.feed(b"SET b 22\r\nGET b\r\n");
        c.process(&mut store, &mut log, 0);
        c.take_output(&log, &mut out);
        assert_eq!(out, b"+OK\r\n$1\r\n1\r\n");
        assert_eq!(c.pending_output(), b"+OK\r\n$2\r\n22\r\n".len());
        commit(&mut log, &mut disk);
        c.take_output(&log, &mut out);
        assert_eq!(out, b"+OK\r\n$1\r\n1\r\n+OK\r\n$2\r\n22\r\n");
        assert_eq!(c.pending_output(), 0);
    }

    #[test]
    fn protocol_error_replies_then_closes() {
        let (mut store, mut log, _) = setup();
        let mut c = Connection::new(Limits::default());
        c.feed(b"PING\r\n*1\r\n$x\r\nPING\r\n");
        assert_eq!(c.process(&mut store, &mut log, 0), Status::Closing);
        assert!(!c.finished());
        let mut out = Vec::new();
        c.take_output(&log, &mut out);
        assert_eq!(
            out,
            b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n".as_slice()
        );
        assert!(c.finished());
        c.feed(b"PING\r\n");
        assert_eq!(c.buffered_input(), 0);
    }

    #[test]
    fn oversized_request_closes() {
        let (mut store, mut log, mut disk) = setup();
        let limits = Limits {
            max_request_len: 1000,
            ..Limits::default()
        };
        // 23 bytes of headers + 900 + CRLF fits.
        let mut c = Connection::new(limits);
        c.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$900\r\n");
        assert_eq!(c.process(&mut store, &mut log, 0), Status::Open);
        c.feed(&[b'x'; 900]);
        c.feed(b"\r\n");
        assert_eq!(c.process(&mut store, &mut log, 0), Status::Open);
        assert_eq!(store.len(), 1);
        // A declared size over the limit is refused before its data arrives.
        let mut c = Connection::new(limits);
        c.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nz\r\n$990\r\n");
        assert_eq!(c.process(&mut store, &mut log, 0), Status::Closing);
        let mut out = Vec::new();
        c.take_output(&log, &mut out);
        assert!(out.is_empty(), "ordered after the unflushed SET");
        commit(&mut log, &mut disk);
        c.take_output(&log, &mut out);
        assert_eq!(out, b"-ERR Protocol error: request too large\r\n");
        assert!(c.finished());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn quit() {
        let (mut store, mut log, _) = setup();
        let mut c = Connection::new(Limits::default());
        c.feed(b"QUIT\r\nPING\r\n");
        assert_eq!(c.process(&mut store, &mut log, 0), Status::Closing);
        let mut out = Vec::new();
        c.take_output(&log, &mut out);
        assert_eq!(out, b"+OK\r\n");
        assert!(c.finished());
    }

    fn mbulk(args: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        crate::resp::write_array_len(&mut v, args.len());
        for a in args {
            crate::resp::write_bulk(&mut v, a);
        }
        v
    }

    /// What `redis-benchmark` sends: its start-up queries, then the default suite, 16
    /// requests pipelined at a time. Fed in one piece and byte by byte, same replies.
    #[test]
    fn redis_benchmark_traffic() {
        let mut input = Vec::new();
        input.extend(mbulk(&[b"CONFIG", b"GET", b"save"]));
        input.extend(mbulk(&[b"CONFIG", b"GET", b"appendonly"]));
        let val = [b'x'; 3];
        let suite: Vec<Vec<u8>> = alloc::vec![
            b"PING\r\n".to_vec(),
            mbulk(&[b"PING"]),
            mbulk(&[b"SET", b"key:__rand_int__", &val]),
            mbulk(&[b"GET", b"key:__rand_int__"]),
            mbulk(&[b"INCR", b"counter:__rand_int__"]),
            mbulk(&[b"LPUSH", b"mylist", &val]),
            mbulk(&[b"RPUSH", b"mylist", &val]),
            mbulk(&[b"LPOP", b"mylist"]),
            mbulk(&[b"RPOP", b"mylist"]),
            mbulk(&[b"SADD", b"myset", b"element:__rand_int__"]),
            mbulk(&[b"HSET", b"myhash", b"element:__rand_int__", &val]),
            mbulk(&[b"SPOP", b"myset"]),
            mbulk(&[b"ZADD", b"myzset", b"0", b"element:__rand_int__"]),
            mbulk(&[b"ZPOPMIN", b"myzset"]),
            mbulk(&[b"LPUSH", b"mylist", &val]),
            mbulk(&[b"LRANGE", b"mylist", b"0", b"99"]),
            mbulk(&[b"LRANGE", b"mylist", b"0", b"599"]),
            mbulk(&[
                b"MSET", b"key:1", &val, b"key:2", &val, b"key:3", &val, b"key:4", &val, b"key:5",
                &val, b"key:6", &val, b"key:7", &val, b"key:8", &val, b"key:9", &val, b"key:10",
                &val,
            ]),
        ];
        for req in &suite {
            for _ in 0..16 {
                input.extend_from_slice(req);
            }
        }
        let run = |chunk: usize| {
            let (mut store, mut log, mut disk) = setup();
            let mut c = Connection::new(Limits::default());
            let mut out = Vec::new();
            for (i, part) in input.chunks(chunk).enumerate() {
                c.feed(part);
                assert_eq!(c.process(&mut store, &mut log, i as u64), Status::Open);
                commit(&mut log, &mut disk);
                c.take_output(&log, &mut out);
            }
            assert_eq!(c.buffered_input(), 0);
            (out, disk)
        };
        let (whole, disk) = run(input.len());
        let text = alloc::string::String::from_utf8_lossy(&whole);
        assert!(
            !text.contains("-ERR") && !text.contains("WRONGTYPE"),
            "{text}"
        );
        assert!(text.starts_with(
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n+PONG\r\n"
        ));
        let (bytewise, _) = run(1);
        assert_eq!(whole, bytewise);
        let (odd, _) = run(37);
        assert_eq!(whole, odd);
        // Everything acknowledged is on the disk.
        let mut s = Store::new(5);
        let rec = crate::aof::replay(&disk, &mut s).unwrap();
        assert!(rec.stop.is_clean());
        let (mut store, mut log, _) = setup();
        let mut c = Connection::new(Limits::default());
        c.feed(&input);
        c.process(&mut store, &mut log, 0);
        assert_eq!(
            s.entries().collect::<Vec<_>>(),
            store.entries().collect::<Vec<_>>()
        );
    }

    #[test]
    fn full_disk_refuses_writes_but_serves_reads() {
        let mut store = Store::new(1);
        let mut log = LogWriter::format(4096, 1).unwrap();
        let mut c = Connection::new(Limits::default());
        c.feed(b"SET a b\r\nGET a\r\n");
        c.process(&mut store, &mut log, 0);
        log.seal();
        log.mark_durable();
        let mut out = Vec::new();
        c.take_output(&log, &mut out);
        assert_eq!(
            out,
            b"-ERR disk log is full, write refused\r\n$-1\r\n".as_slice()
        );
    }

    /// Garbage on one connection (random bytes, split at random points) never panics and
    /// never disturbs another connection being served at the same time.
    #[test]
    fn garbage_on_one_connection_does_not_disturb_another() {
        let (mut store, mut log, mut disk) = setup();
        let mut x: u64 = 0xdead_beef;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let limits = Limits {
            max_bulk_len: 1000,
            max_args: 16,
            max_inline_len: 200,
            max_request_len: 4000,
        };
        let mut good = Connection::new(limits);
        let mut closed = 0;
        for round in 0..2000u64 {
            let mut bad = Connection::new(limits);
            for _ in 0..(next() % 8) {
                let n = (next() % 300) as usize;
                let bytes: Vec<u8> = (0..n)
                    .map(|_| match next() % 6 {
                        0 => b'*',
                        1 => b'$',
                        2 => b'\r',
                        3 => b'\n',
                        _ => next() as u8,
                    })
                    .collect();
                bad.feed(&bytes);
                if bad.process(&mut store, &mut log, round) == Status::Closing {
                    closed += 1;
                    break;
                }
            }
            good.feed(alloc::format!("SET k{round} v\r\nGET k{round}\r\n").as_bytes());
            assert_eq!(good.process(&mut store, &mut log, round), Status::Open);
            commit(&mut log, &mut disk);
            let mut out = Vec::new();
            good.take_output(&log, &mut out);
            assert_eq!(out, b"+OK\r\n$1\r\nv\r\n", "round {round}");
            bad.take_output(&log, &mut Vec::new());
        }
        assert!(closed > 100, "{closed}");
    }
}
