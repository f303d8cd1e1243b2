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
    /// Replies not yet released: (tag, bytes), in order.
    held: VecDeque<(u64, Vec<u8>)>,
    held_bytes: usize,
    status: Status,
    scratch: Vec<u8>,
}

impl Connection {
    /// A new connection whose requests are bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        Connection {
            limits,
            input: Vec::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            status: Status::Open,
            scratch: Vec::new(),
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
        self.held_bytes
    }

    /// The connection's status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Closing and every reply taken: close the socket now.
    pub fn finished(&self) -> bool {
        self.status == Status::Closing && self.held.is_empty()
    }

    fn push_reply(&mut self, tag: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.held_bytes += bytes.len();
        match self.held.back_mut() {
            Some((t, b)) if *t == tag => b.extend_from_slice(bytes),
            _ => self.held.push_back((tag, bytes.to_vec())),
        }
    }

    /// Runs every complete request in the input at time `now_ms`: replies are held in the
    /// connection, log records go to `log`. Call [`LogWriter::seal`], write and flush the
    /// batch, [`LogWriter::mark_durable`], then [`Connection::take_output`].
    pub fn process(&mut self, store: &mut Store, log: &mut LogWriter, now_ms: u64) -> Status {
        let mut pos = 0;
        while self.status == Status::Open {
            match resp::parse(&self.input[pos..], &self.limits) {
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
                Parse::Command { args, consumed } => {
                    pos += consumed;
                    self.run(&args, store, log, now_ms);
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
        while let Some((tag, _)) = self.held.front() {
            if *tag > log.durable() {
                break;
            }
            if let Some((_, b)) = self.held.pop_front() {
                self.held_bytes -= b.len();
                out.extend_from_slice(&b);
            }
        }
    }
}
