//! The network loop of the bundled `kv` guest: smoltcp TCP sockets on one port in front of
//! kvcore, with Redis's connection rules: at most `maxclients` clients (one more is answered
//! `-ERR max number of clients reached` and closed) and idle clients closed after `timeout`.
//!
//! `no_std` + `alloc` and generic over the smoltcp [`Device`] and a [`Platform`] (clock and
//! disk), so the same loop runs in the guest (virtio-net, virtio-blk, the VMM's clock) and on
//! a host (a TAP, a file, the host's clock) to be profiled with `perf` and unit-tested.
//!
//! # Accepting connections
//!
//! A smoltcp socket in the listen state takes one connection. The server keeps a small pool of
//! [`Config::listeners`] listening sockets and takes frames in one at a time
//! (`poll_ingress_single`), refilling the pool after every `listeners` frames — so however
//! many SYNs arrive together, each finds a listener — and turns each listener that took a
//! connection into a client (or a refused client past the limit). Client sockets are created
//! on demand and dropped (or returned to the pool) when closed, so memory follows the number
//! of connections: [`Config::socket_bytes`] each. The pool stays small because every socket
//! costs time in every poll (smoltcp visits each one per frame and per transmit pass).
//!
//! # One iteration ([`Server::step`])
//!
//! Note a group commit that landed since the last step; take in the received frames; accept;
//! read every client and run its complete requests; start writing the iteration's log
//! records to the disk (group commit: replies that depend on them are held until the write
//! has landed); send the released replies; close what is finished, rejected or idle;
//! transmit (and run smoltcp's timers). The caller then ends the iteration with a POLL (if
//! more work is ready at once, or a write is in flight) or a WAIT of at most
//! [`Server::poll_delay`].
//!
//! On a platform whose writes complete at once ([`Platform::start_write`]'s default) a
//! commit's replies go in the step that wrote it. In the guest the write is left in flight:
//! the VMM takes it at the exit that ends the step — after that step's frames, since the NIC
//! comes before the disk on the bus — and the step after sends its replies. So one exit per
//! iteration both transmits the replies of one commit and writes the next.
#![no_std]
#![warn(missing_docs)]
extern crate alloc;
#[cfg(any(test, feature = "host"))]
extern crate std;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use kvcore::{Connection, Limits, LogWriter, Store};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

/// How long a connection we closed may take to finish closing before it is aborted (a peer
/// that never sends its FIN would otherwise hold the socket forever; Linux's
/// `tcp_fin_timeout` is the same 60 s).
pub const CLOSE_TIMEOUT_MS: u64 = 60_000;

/// Connections being refused or closing that the memory bound allows for beyond the clients
/// (see [`Config::peak_socket_bytes`]).
pub const CLOSING_RESERVE: usize = 128;

/// The reply to a client past the limit (Redis's wording).
pub const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";

/// The server's settings (the guest's arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// TCP port.
    pub port: u16,
    /// Request limits per connection.
    pub limits: Limits,
    /// Most clients served at once (`maxclients=N`); one more gets [`MAX_CLIENTS_REPLY`].
    pub max_clients: usize,
    /// Close a client idle this long, in milliseconds (`timeout=SECONDS`; 0: never).
    pub idle_timeout_ms: u64,
    /// Listening sockets kept ready; the pool is refilled every this many received frames,
    /// so any number of SYNs at once finds listeners.
    pub listeners: usize,
    /// Receive buffer of each socket, bytes (the TCP window it offers).
    pub rx_buffer: usize,
    /// Transmit buffer of each socket, bytes.
    pub tx_buffer: usize,
}

impl Default for Config {
    /// Port 6379, default limits, 1024 clients, no idle timeout, 8 listeners, 8 KiB
    /// receive and 8 KiB transmit buffers (so 1024 clients hold 8 MiB of socket buffers
    /// each way).
    fn default() -> Self {
        Config {
            port: 6379,
            limits: Limits::default(),
            max_clients: 1024,
            idle_timeout_ms: 0,
            listeners: 8,
            rx_buffer: 8 * 1024,
            tx_buffer: 8 * 1024,
        }
    }
}

/// A guest argument the server does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// A word that is not `key=value` with a known key.
    Unknown(alloc::string::String),
    /// A known key with a value that is not a number in its range.
    BadValue(alloc::string::String),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Unknown(w) => write!(
                f,
                "unknown argument {w:?} (known: max-request=BYTES maxclients=N timeout=SECONDS)"
            ),
            ArgError::BadValue(w) => write!(f, "bad value in {w:?}"),
        }
    }
}

impl Config {
    /// Parses the guest's arguments (space separated, all optional): `max-request=BYTES`
    /// (largest request; a larger one closes its connection), `maxclients=N` (at least 1),
    /// `timeout=SECONDS` (close clients idle that long; 0, the default, never).
    pub fn from_args(args: &str) -> Result<Config, ArgError> {
        let mut c = Config::default();
        for w in args.split_whitespace() {
            let bad = || ArgError::BadValue(w.into());
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| ArgError::Unknown(w.into()))?;
            let n: u64 = v.parse().map_err(|_| bad())?;
            match k {
                "max-request" => {
                    let n = usize::try_from(n).map_err(|_| bad())?;
                    if n == 0 {
                        return Err(bad());
                    }
                    c.limits.max_request_len = n;
                    c.limits.max_bulk_len = c.limits.max_bulk_len.min(n);
                    c.limits.max_inline_len = c.limits.max_inline_len.min(n);
                }
                "maxclients" => {
                    c.max_clients = usize::try_from(n).map_err(|_| bad())?;
                    if c.max_clients == 0 {
                        return Err(bad());
                    }
                }
                "timeout" => c.idle_timeout_ms = n.checked_mul(1000).ok_or_else(bad)?,
                _ => return Err(ArgError::Unknown(w.into())),
            }
        }
        Ok(c)
    }

    /// Socket buffer bytes one connection holds.
    pub fn socket_bytes(&self) -> usize {
        self.rx_buffer + self.tx_buffer
    }

    /// Socket buffer bytes at the limit: every client, the listener pool, and
    /// [`CLOSING_RESERVE`] connections being refused or closing. This is what bounds
    /// `maxclients` (a guest refuses a limit whose sockets would take more than half its
    /// heap).
    pub fn peak_socket_bytes(&self) -> usize {
        (self.max_clients + self.listeners + CLOSING_RESERVE).saturating_mul(self.socket_bytes())
    }

    /// The largest `maxclients` whose [`peak_socket_bytes`](Self::peak_socket_bytes) fit in
    /// half of a heap of `heap_bytes`.
    pub fn max_clients_for(&self, heap_bytes: usize) -> usize {
        (heap_bytes / 2 / self.socket_bytes()).saturating_sub(self.listeners + CLOSING_RESERVE)
    }
}

/// The clock and the disk the loop runs on.
pub trait Platform {
    /// How a disk write fails.
    type Error;
    /// smoltcp's clock (monotonic).
    fn now(&self) -> Instant;
    /// Wall-clock milliseconds, for kvcore (expiry, TIME, idle times).
    fn now_ms(&self) -> u64;
    /// Writes `bytes` at `offset` and returns once they are durable.
    fn write_disk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Self::Error>;
    /// Starts writing `bytes` at `offset`: `Ok(true)` if they are on the disk already,
    /// `Ok(false)` if the write is in flight ([`write_done`](Self::write_done) reports it).
    /// The default writes them at once with [`write_disk`](Self::write_disk).
    fn start_write(&mut self, offset: u64, bytes: Vec<u8>) -> Result<bool, Self::Error> {
        self.write_disk(offset, &bytes).map(|()| true)
    }
    /// The write [`start_write`](Self::start_write) left in flight: `None` while it is, else
    /// its result.
    fn write_done(&mut self) -> Option<Result<(), Self::Error>> {
        Some(Ok(()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Just took a connection; admitted or refused once the step's departures are known.
    New,
    /// A client being served.
    Client,
    /// Past the limit: gets the error reply, then is closed.
    Rejected,
    /// Closed by us, waiting for the TCP close to finish.
    Closing,
}

struct Slot {
    handle: SocketHandle,
    role: Role,
    conn: Connection,
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    sent: usize,
    /// Counted in `Server::clients` (a client whose peer has not closed).
    counted: bool,
    last_active_ms: u64,
}

/// Counters of the loop's work, for profiles (`examples/tap_server.rs` prints them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls of [`Server::step`].
    pub steps: u64,
    /// `Interface::poll` calls.
    pub polls: u64,
    /// Socket visits (slots examined, summed over passes).
    pub socket_visits: u64,
    /// Reads from sockets that returned data.
    pub reads: u64,
    /// Bytes received from clients.
    pub bytes_in: u64,
    /// Writes into sockets that took data.
    pub writes: u64,
    /// Bytes sent to clients.
    pub bytes_out: u64,
    /// Group commits (disk writes).
    pub commits: u64,
    /// Connections accepted as clients.
    pub accepted: u64,
    /// Connections refused past the limit.
    pub rejected: u64,
    /// Clients closed for being idle.
    pub timed_out: u64,
    /// Log compactions started.
    pub compactions: u64,
    /// Log compactions that could not start.
    pub compaction_failures: u64,
}

/// The kv server: its interface, sockets and clients.
pub struct Server {
    cfg: Config,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// Listening sockets.
    pool: Vec<SocketHandle>,
    /// Connections (every socket not in the pool).
    slots: Vec<Slot>,
    clients: usize,
    /// Whether a group commit's write is in flight.
    writing: bool,
    /// Work counters.
    pub stats: Stats,
}

/// Why the loop stopped.
#[derive(Debug)]
pub enum StepError<E> {
    /// The disk write of a group commit failed; the server cannot go on.
    Disk(E),
}

impl Server {
    /// A server on `iface` (configured with its address) with `cfg`.
    pub fn new(cfg: Config, iface: Interface) -> Self {
        Server {
            cfg,
            iface,
            sockets: SocketSet::new(Vec::new()),
            pool: Vec::new(),
            slots: Vec::new(),
            clients: 0,
            writing: false,
            stats: Stats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Clients being served now.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Open sockets (clients, listeners, refused and closing connections).
    pub fn sockets(&self) -> usize {
        self.slots.len() + self.pool.len()
    }

    /// The interface (for its addresses and routes).
    pub fn iface_mut(&mut self) -> &mut Interface {
        &mut self.iface
    }

    fn new_slot(&self, handle: SocketHandle, role: Role) -> Slot {
        Slot {
            handle,
            role,
            conn: Connection::new(self.cfg.limits),
            out: Vec::new(),
            sent: 0,
            counted: false,
            last_active_ms: 0,
        }
    }

    /// Tops the listener pool up to [`Config::listeners`].
    fn refill_pool(&mut self) {
        while self.pool.len() < self.cfg.listeners {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; self.cfg.rx_buffer]),
                tcp::SocketBuffer::new(vec![0; self.cfg.tx_buffer]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(self.cfg.port);
            self.pool.push(self.sockets.add(s));
        }
    }

    /// Moves the listeners that took a connection to the connections, as new ones.
    fn harvest_pool(&mut self) {
        let mut i = 0;
        while i < self.pool.len() {
            let h = self.pool[i];
            if self.sockets.get::<tcp::Socket>(h).state() != tcp::State::Listen {
                self.pool.swap_remove(i);
                let slot = self.new_slot(h, Role::New);
                self.slots.push(slot);
            } else {
                i += 1;
            }
        }
    }

    /// Takes in every received frame. The pool is refilled every `listeners` frames, so
    /// however many SYNs arrive at once, each finds a listener.
    fn ingress<D: Device>(&mut self, dev: &mut D, now: Instant) {
        use smoltcp::iface::PollIngressSingleResult as R;
        self.stats.polls += 1;
        loop {
            self.refill_pool();
            let mut frames = 0;
            while frames < self.cfg.listeners {
                if self.iface.poll_ingress_single(now, dev, &mut self.sockets) == R::None {
                    break;
                }
                frames += 1;
            }
            self.harvest_pool();
            if frames < self.cfg.listeners {
                break;
            }
        }
    }

    /// Transmits what the sockets have to send (and runs their timers).
    fn egress<D: Device>(&mut self, dev: &mut D, now: Instant) {
        use smoltcp::iface::PollResult;
        self.stats.polls += 1;
        while self.iface.poll_egress(now, dev, &mut self.sockets) == PollResult::SocketStateChanged
        {
        }
    }

    /// Puts a closed connection's socket back in the pool, or frees it.
    fn release(&mut self, i: usize) {
        let slot = self.slots.swap_remove(i);
        if slot.counted {
            self.clients -= 1;
        }
        if self.pool.len() < self.cfg.listeners {
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            s.abort();
            let _ = s.listen(self.cfg.port);
            self.pool.push(slot.handle);
        } else {
            self.sockets.remove(slot.handle);
        }
    }

    /// One iteration of the loop (see the crate docs). Returns whether more work is ready
    /// without any new input (a connection admitted in this step may hold a request already,
    /// a log compaction has batches left to write): the caller then POLLs. Otherwise it
    /// WAITs: the frames this step queued leave at that exit all the same, and the next frame
    /// or timer ends the wait. (POLLing after every step that did something, as before, cost
    /// an extra exit and an empty step per batch.)
    pub fn step<D: Device, P: Platform>(
        &mut self,
        dev: &mut D,
        platform: &mut P,
        store: &mut Store,
        log: &mut LogWriter,
    ) -> Result<bool, StepError<P::Error>> {
        self.stats.steps += 1;
        let now_ms = platform.now_ms();
        if self.writing {
            if let Some(r) = platform.write_done() {
                self.writing = false;
                r.map_err(StepError::Disk)?;
                self.landed(store, log, now_ms);
            }
        }
        self.ingress(dev, platform.now());

        // Read and run requests; note new connections and departures.
        let mut new = Vec::new();
        let mut i = 0;
        while i < self.slots.len() {
            self.stats.socket_visits += 1;
            let slot = &mut self.slots[i];
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if s.state() == tcp::State::Listen {
                // A reset during the handshake put the socket back to listening: released
                // below (not here, where `new` holds indices).
                i += 1;
                continue;
            }
            match slot.role {
                Role::New => new.push(i),
                // A client that sent its FIN (or reset) no longer counts against the limit,
                // as in Redis, which frees a client at EOF; what it sent before is still
                // answered.
                Role::Client
                    if slot.counted && (s.state() == tcp::State::CloseWait || !s.is_open()) =>
                {
                    self.clients -= 1;
                    slot.counted = false;
                }
                _ => {}
            }
            match slot.role {
                Role::Client => {
                    let mut got = false;
                    while s.can_recv() {
                        let conn = &mut slot.conn;
                        match s.recv(|buf| {
                            conn.feed(buf);
                            (buf.len(), buf.len())
                        }) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                got = true;
                                self.stats.reads += 1;
                                self.stats.bytes_in += n as u64;
                            }
                        }
                    }
                    if got {
                        slot.last_active_ms = now_ms;
                        slot.conn.process(store, log, now_ms);
                    }
                }
                // Whatever a refused client sends is dropped.
                Role::Rejected | Role::Closing => {
                    while s.can_recv() {
                        if !matches!(s.recv(|b| (b.len(), b.len())), Ok(n) if n > 0) {
                            break;
                        }
                    }
                }
                Role::New => {}
            }
            i += 1;
        }
        let more = !new.is_empty();
        // Admit the new connections once departures are counted (clients that leave and
        // others that arrive in one batch must not be refused); their requests are read at
        // the next step.
        for i in new {
            let slot = &mut self.slots[i];
            if self.clients < self.cfg.max_clients {
                slot.role = Role::Client;
                slot.counted = true;
                slot.last_active_ms = now_ms;
                self.clients += 1;
                self.stats.accepted += 1;
            } else {
                slot.role = Role::Rejected;
                slot.out.extend_from_slice(MAX_CLIENTS_REPLY);
                self.stats.rejected += 1;
            }
        }
        store.set_connected_clients(self.clients as u64);

        // Group commit: the iteration's writes reach the disk before any reply that depends
        // on them leaves. A write left in flight is taken by the device at the exit that ends
        // this step, after the frames queued below (the replies of the batch before, which is
        // on the disk): one exit per iteration instead of two.
        if !self.writing {
            if let Some(batch) = log.seal() {
                if platform
                    .start_write(batch.offset, batch.bytes)
                    .map_err(StepError::Disk)?
                {
                    self.landed(store, log, now_ms);
                } else {
                    self.writing = true;
                }
            }
        }

        // Send, close what is done, recycle what is closed.
        let mut i = 0;
        while i < self.slots.len() {
            self.stats.socket_visits += 1;
            let slot = &mut self.slots[i];
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if s.state() == tcp::State::Listen {
                self.release(i);
                continue;
            }
            if slot.role == Role::Client {
                slot.conn.take_output(log, &mut slot.out);
            }
            while slot.sent < slot.out.len() && s.can_send() {
                match s.send_slice(&slot.out[slot.sent..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        slot.sent += n;
                        self.stats.writes += 1;
                        self.stats.bytes_out += n as u64;
                    }
                }
            }
            if slot.sent == slot.out.len() {
                slot.out.clear();
                slot.sent = 0;
            }
            let flushed = slot.out.is_empty();
            let close = match slot.role {
                Role::Client => {
                    let idle = self.cfg.idle_timeout_ms > 0
                        && now_ms.saturating_sub(slot.last_active_ms) >= self.cfg.idle_timeout_ms
                        && slot.conn.pending_output() == 0;
                    if idle && flushed {
                        self.stats.timed_out += 1;
                    }
                    let peer_done = s.state() == tcp::State::CloseWait;
                    flushed
                        && (slot.conn.finished()
                            || idle
                            || (peer_done && slot.conn.pending_output() == 0))
                }
                Role::Rejected => flushed && s.state() != tcp::State::SynReceived,
                Role::New | Role::Closing => false,
            };
            if close || (slot.role == Role::Client && !s.is_open()) {
                if slot.counted {
                    self.clients -= 1;
                    slot.counted = false;
                }
                slot.role = Role::Closing;
                slot.last_active_ms = now_ms;
                s.close();
            }
            if slot.role == Role::Closing
                && now_ms.saturating_sub(slot.last_active_ms) >= CLOSE_TIMEOUT_MS
            {
                s.abort();
            }
            if slot.role != Role::New && !s.is_open() {
                // Closed (or in TIME-WAIT): reuse as a listener, or free it.
                self.release(i);
                continue;
            }
            i += 1;
        }
        store.set_connected_clients(self.clients as u64);
        self.egress(dev, platform.now());
        Ok(more || log.has_unsealed() || self.writing)
    }

    /// A group commit is on the disk: the replies that waited for it may go, and the log may
    /// start a compaction.
    fn landed(&mut self, store: &Store, log: &mut LogWriter, now_ms: u64) {
        log.mark_durable();
        self.stats.commits += 1;
        if log.should_compact() && !log.has_unsealed() {
            match log.compact(store, now_ms) {
                Ok(()) => self.stats.compactions += 1,
                Err(_) => self.stats.compaction_failures += 1,
            }
        }
    }

    /// How long the caller may WAIT before the next step: smoltcp's next timer or the next
    /// idle timeout, whichever is sooner (`None`: no timer, wait for a frame).
    pub fn poll_delay(&mut self, now: Instant, now_ms: u64) -> Option<u64> {
        let tcp = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| d.total_micros() * 1000);
        let idle = (self.cfg.idle_timeout_ms > 0)
            .then(|| {
                self.slots
                    .iter()
                    .filter(|s| s.role == Role::Client)
                    .map(|s| {
                        (s.last_active_ms + self.cfg.idle_timeout_ms).saturating_sub(now_ms)
                            * 1_000_000
                    })
                    .min()
            })
            .flatten();
        match (tcp, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests;
