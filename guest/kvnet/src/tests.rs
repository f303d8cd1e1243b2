//! The server against real smoltcp clients over an in-memory Ethernet wire, on a scripted
//! clock: connection limits, the refusal reply, idle timeouts, arguments.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::string::ToString;
use std::vec::Vec;

use smoltcp::iface::{Config as IfConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use super::*;

type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of a wire: frames sent here arrive at the other end. Like the guest's receive
/// ring, at most `ring` frames are waiting for the stack at once; the rest stay queued on the
/// wire (the TAP) until [`End::deliver`].
struct End {
    rx: Queue,
    tx: Queue,
    ring: VecDeque<Vec<u8>>,
    ring_size: usize,
}

impl End {
    /// Moves frames from the wire into the free part of the ring (what the VMM does at an exit).
    fn deliver(&mut self) {
        let mut q = self.rx.borrow_mut();
        while self.ring.len() < self.ring_size {
            match q.pop_front() {
                Some(f) => self.ring.push_back(f),
                None => break,
            }
        }
    }
}

fn wire(ring_size: usize) -> (End, End) {
    let a: Queue = Rc::default();
    let b: Queue = Rc::default();
    let end = |rx, tx| End {
        rx,
        tx,
        ring: VecDeque::new(),
        ring_size,
    };
    (end(a.clone(), b.clone()), end(b, a))
}

struct Rx(Vec<u8>);
impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
struct Tx(Queue);
impl TxToken for Tx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.borrow_mut().push_back(buf);
        r
    }
}

impl Device for End {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx;
    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx)> {
        let f = self.ring.pop_front()?;
        Some((Rx(f), Tx(self.tx.clone())))
    }
    fn transmit(&mut self, _t: Instant) -> Option<Tx> {
        Some(Tx(self.tx.clone()))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// The scripted clock and an in-memory disk; with `deferred` set, writes are left in flight
/// (as the guest's are) until the test lands them.
struct Plat {
    ms: Rc<Cell<u64>>,
    disk: Vec<u8>,
    deferred: bool,
    in_flight: Option<(u64, Vec<u8>)>,
    landed: Option<Result<(), ()>>,
    started: usize,
}

impl Plat {
    /// Completes the write in flight (its bytes reach the disk only if `ok`).
    fn land(&mut self, ok: bool) {
        let (offset, bytes) = self.in_flight.take().expect("a write in flight");
        if ok {
            self.write_disk(offset, &bytes).unwrap();
        }
        self.landed = Some(if ok { Ok(()) } else { Err(()) });
    }
}

impl Platform for Plat {
    type Error = ();
    fn now(&self) -> Instant {
        Instant::from_millis(self.ms.get() as i64)
    }
    fn now_ms(&self) -> u64 {
        1_700_000_000_000 + self.ms.get()
    }
    fn write_disk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), ()> {
        self.disk[offset as usize..][..bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn start_write(&mut self, offset: u64, bytes: Vec<u8>) -> Result<bool, ()> {
        self.started += 1;
        if !self.deferred {
            return self.write_disk(offset, &bytes).map(|()| true);
        }
        assert!(self.in_flight.is_none(), "two writes in flight");
        assert!(
            self.landed.is_none(),
            "a new write before the last one was reported"
        );
        self.in_flight = Some((offset, bytes));
        Ok(false)
    }
    fn write_done(&mut self) -> Option<Result<(), ()>> {
        self.landed.take()
    }
}

const SERVER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

fn iface(dev: &mut End, mac: u8, ip: Ipv4Address) -> Interface {
    let hw = HardwareAddress::Ethernet(EthernetAddress([2, 0, 0, 0, 0, mac]));
    let mut i = Interface::new(IfConfig::new(hw), dev, Instant::from_millis(0));
    i.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), 24));
    });
    i
}

/// A server and a client host on one wire.
struct Lab {
    server: Server,
    sdev: End,
    plat: Plat,
    store: Store,
    log: LogWriter,
    client: Interface,
    cdev: End,
    csockets: SocketSet<'static>,
    next_port: u16,
}

impl Lab {
    fn new(cfg: Config) -> Lab {
        // The server's ring holds 128 frames, as the guest's does: many more than its
        // listener pool, so a burst of SYNs meets an empty pool within one poll.
        let (mut sdev, mut cdev) = wire(128);
        cdev.ring_size = usize::MAX;
        let server = Server::new(cfg, iface(&mut sdev, 1, SERVER_IP));
        let client = iface(&mut cdev, 2, Ipv4Address::new(10, 0, 0, 1));
        let mut plat = Plat {
            ms: Rc::new(Cell::new(0)),
            disk: vec![0; 1 << 20],
            deferred: false,
            in_flight: None,
            landed: None,
            started: 0,
        };
        let mut log = LogWriter::format(1 << 20, 7).unwrap();
        let b = log.seal().unwrap();
        plat.write_disk(b.offset, &b.bytes).unwrap();
        log.mark_durable();
        Lab {
            server,
            sdev,
            plat,
            store: Store::new(3),
            log,
            client,
            cdev,
            csockets: SocketSet::new(Vec::new()),
            next_port: 40000,
        }
    }

    /// One round: the client host polls, the server steps, the client polls again. Returns
    /// what the step returned (more work ready at once).
    fn round(&mut self) -> bool {
        self.try_round().unwrap()
    }

    /// A round whose step may fail.
    fn try_round(&mut self) -> Result<bool, StepError<()>> {
        let now = self.plat.now();
        self.cdev.deliver();
        self.client.poll(now, &mut self.cdev, &mut self.csockets);
        self.sdev.deliver();
        let more = self.server.step(
            &mut self.sdev,
            &mut self.plat,
            &mut self.store,
            &mut self.log,
        )?;
        self.cdev.deliver();
        self.client.poll(now, &mut self.cdev, &mut self.csockets);
        Ok(more)
    }

    /// Rounds until `done` holds (at most 200).
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Lab) -> bool) {
        for _ in 0..200 {
            if done(self) {
                return;
            }
            self.round();
        }
        panic!("never happened: {what}");
    }

    fn advance_ms(&mut self, ms: u64) {
        self.plat.ms.set(self.plat.ms.get() + ms);
    }

    fn connect(&mut self) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1024]),
            tcp::SocketBuffer::new(vec![0; 1024]),
        );
        self.next_port += 1;
        s.connect(self.client.context(), (SERVER_IP, 6379), self.next_port)
            .unwrap();
        self.csockets.add(s)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.csockets.get_mut::<tcp::Socket>(h)
    }

    fn established(&mut self, h: SocketHandle) -> bool {
        self.sock(h).state() == tcp::State::Established
    }

    fn send(&mut self, h: SocketHandle, bytes: &[u8]) {
        assert_eq!(self.sock(h).send_slice(bytes), Ok(bytes.len()));
    }

    fn received(&mut self, h: SocketHandle) -> Vec<u8> {
        let mut out = Vec::new();
        let s = self.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                out.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        out
    }

    /// Sends `req` on `h` and returns the reply of `want` bytes.
    fn ask(&mut self, h: SocketHandle, req: &[u8], want: usize) -> Vec<u8> {
        self.send(h, req);
        let mut got = Vec::new();
        self.until("a reply", |l| {
            got.extend(l.received(h));
            got.len() >= want
        });
        got
    }

    /// The server closed `h` (the client saw its FIN, or a reset) and nothing is unread.
    fn closed_by_server(&mut self, h: SocketHandle) -> bool {
        use tcp::State::*;
        let s = self.sock(h);
        matches!(s.state(), CloseWait | LastAck | Closing | TimeWait | Closed) && !s.can_recv()
    }
}

fn cfg(max_clients: usize) -> Config {
    Config {
        max_clients,
        ..Config::default()
    }
}

#[test]
fn clients_past_the_limit_get_the_error_and_are_closed() {
    let mut lab = Lab::new(cfg(3));
    let clients: Vec<_> = (0..3).map(|_| lab.connect()).collect();
    lab.until("3 connected", |l| clients.iter().all(|&h| l.established(h)));
    for &h in &clients {
        assert_eq!(lab.ask(h, b"PING\r\n", 7), b"+PONG\r\n");
    }
    assert_eq!(lab.server.clients(), 3);
    let extra = lab.connect();
    let mut got = Vec::new();
    lab.until("the refusal and the close", |l| {
        got.extend(l.received(extra));
        l.closed_by_server(extra)
    });
    assert_eq!(got, MAX_CLIENTS_REPLY);
    assert_eq!(lab.server.stats.rejected, 1);
    // The three are still served; one leaving makes room for a new one.
    assert_eq!(lab.ask(clients[1], b"PING\r\n", 7), b"+PONG\r\n");
    lab.sock(clients[0]).close();
    lab.until("the server saw the close", |l| l.server.clients() == 2);
    let late = lab.connect();
    lab.until("connected", |l| l.established(late));
    assert_eq!(
        lab.ask(late, b"SET k v\r\nGET k\r\n", 12),
        b"+OK\r\n$1\r\nv\r\n"
    );
    assert_eq!(lab.server.clients(), 3);
    // INFO counts what is served.
    let info = lab.ask(late, b"INFO clients\r\n", 40);
    assert!(
        std::string::String::from_utf8_lossy(&info).contains("connected_clients:3"),
        "{info:?}"
    );
}

/// redis-benchmark between two tests: every client closes and as many new ones connect at
/// once. At the limit, none of the new ones may be refused.
#[test]
fn clients_leaving_and_arriving_together_at_the_limit() {
    let mut lab = Lab::new(cfg(5));
    let old: Vec<_> = (0..5).map(|_| lab.connect()).collect();
    lab.until("5 connected", |l| old.iter().all(|&h| l.established(h)));
    for &h in &old {
        assert_eq!(lab.ask(h, b"PING\r\n", 7), b"+PONG\r\n");
    }
    for &h in &old {
        lab.sock(h).close();
    }
    let new: Vec<_> = (0..5).map(|_| lab.connect()).collect();
    lab.until("5 new connected", |l| new.iter().all(|&h| l.established(h)));
    for &h in &new {
        assert_eq!(lab.ask(h, b"PING\r\n", 7), b"+PONG\r\n");
    }
    assert_eq!(lab.server.stats.rejected, 0);
    assert_eq!(lab.server.clients(), 5);
}

#[test]
fn a_thousand_idle_clients_do_not_lock_a_new_one_out() {
    let mut lab = Lab::new(Config {
        max_clients: 1001,
        ..Config::default()
    });
    let idle: Vec<_> = (0..1000).map(|_| lab.connect()).collect();
    lab.until("1000 connected", |l| idle.iter().all(|&h| l.established(h)));
    assert_eq!(lab.server.clients(), 1000);
    let fresh = lab.connect();
    lab.until("connected", |l| l.established(fresh));
    assert_eq!(lab.ask(fresh, b"PING\r\n", 7), b"+PONG\r\n");
    let past = lab.connect();
    let mut got = Vec::new();
    lab.until("the refusal", |l| {
        got.extend(l.received(past));
        l.closed_by_server(past)
    });
    assert_eq!(got, MAX_CLIENTS_REPLY);
    // Every idle client is still there and served.
    for &h in [idle[0], idle[999]].iter() {
        assert!(!lab.closed_by_server(h));
        assert_eq!(lab.ask(h, b"PING\r\n", 7), b"+PONG\r\n");
    }
    // Memory follows the connections: once the refused client closes its end, its socket
    // is gone (back to the listener pool), leaving the clients and the pool.
    let pool = lab.server.config().listeners;
    assert_eq!(lab.server.sockets(), 1001 + pool + 1);
    lab.sock(past).close();
    lab.until("the refused socket freed", |l| {
        l.server.sockets() == 1001 + pool
    });
}

#[test]
fn a_peer_that_never_finishes_closing_is_aborted() {
    let mut lab = Lab::new(cfg(1));
    let a = lab.connect();
    lab.until("connected", |l| l.established(a));
    let b = lab.connect();
    let mut got = Vec::new();
    lab.until("refused", |l| {
        got.extend(l.received(b));
        l.closed_by_server(b)
    });
    assert_eq!(got, MAX_CLIENTS_REPLY);
    let pool = lab.server.config().listeners;
    assert_eq!(
        lab.server.sockets(),
        1 + pool + 1,
        "b's socket waits for b's FIN"
    );
    lab.advance_ms(CLOSE_TIMEOUT_MS);
    lab.round();
    assert_eq!(lab.server.sockets(), 1 + pool);
}

#[test]
fn idle_clients_are_closed_after_the_timeout_and_busy_ones_are_not() {
    let mut lab = Lab::new(Config {
        idle_timeout_ms: 1000,
        ..cfg(10)
    });
    let (quiet, busy) = (lab.connect(), lab.connect());
    lab.until("connected", |l| l.established(quiet) && l.established(busy));
    assert_eq!(lab.ask(quiet, b"PING\r\n", 7), b"+PONG\r\n");
    for _ in 0..4 {
        lab.advance_ms(300);
        assert_eq!(lab.ask(busy, b"PING\r\n", 7), b"+PONG\r\n");
        lab.round();
    }
    // 1.2 s after its last request the quiet one is gone, the busy one is not.
    assert!(lab.closed_by_server(quiet));
    assert!(!lab.closed_by_server(busy));
    assert_eq!(lab.server.stats.timed_out, 1);
    assert_eq!(lab.server.clients(), 1);
    // The wait the server asks for never sleeps past the next timeout.
    let (now, now_ms) = (lab.plat.now(), lab.plat.now_ms());
    let d = lab.server.poll_delay(now, now_ms).expect("a timer");
    assert!(d <= 1_000_000_000, "{d}");
}

#[test]
fn a_step_asks_to_poll_again_only_when_work_is_ready() {
    let mut lab = Lab::new(cfg(10));
    let h = lab.connect();
    let admitted = (0..20).any(|_| lab.round());
    assert!(
        admitted,
        "the step that admits a connection asks for another at once"
    );
    lab.until("connected", |l| l.established(h));
    lab.round();
    lab.send(h, b"SET k v\r\nPING\r\n");
    assert!(
        !lab.round(),
        "requests answered (and committed) leave nothing ready"
    );
    assert_eq!(lab.received(h), b"+OK\r\n+PONG\r\n");
    assert!(!lab.round());
}

#[test]
fn a_reply_waits_for_its_write_in_flight_and_the_next_commit_waits_for_it_too() {
    let mut lab = Lab::new(cfg(10));
    lab.plat.deferred = true;
    let h = lab.connect();
    lab.until("connected", |l| l.established(h));
    lab.send(h, b"SET k v1\r\n");
    lab.until("the write started", |l| l.plat.in_flight.is_some());
    let other = lab.connect();
    lab.until("connected", |l| l.established(other));
    // While it is in flight: no reply, the step asks to be run again (a POLL, so the write
    // is taken at once), and a second client's write waits for the first to land.
    lab.send(other, b"SET j w\r\n");
    for _ in 0..5 {
        assert!(lab.round(), "a write in flight asks for a POLL");
    }
    assert_eq!(lab.received(h), b"", "a reply before its write landed");
    assert_eq!(lab.received(other), b"");
    assert_eq!(lab.plat.started, 1, "this commit's write only");
    assert!(
        !lab.plat.disk.windows(2).any(|w| w == b"v1"),
        "not on the disk yet"
    );
    // It lands: its reply goes, and the next commit (the second client's) starts.
    lab.plat.land(true);
    lab.round();
    assert_eq!(lab.received(h), b"+OK\r\n");
    assert!(lab.plat.disk.windows(2).any(|w| w == b"v1"));
    assert_eq!(lab.received(other), b"", "its write is in flight now");
    assert_eq!(lab.plat.started, 2);
    lab.plat.land(true);
    lab.round();
    assert_eq!(lab.received(other), b"+OK\r\n");
    assert!(!lab.round(), "nothing left to do");
}

#[test]
fn a_write_that_fails_in_flight_stops_the_server_and_its_reply_never_goes() {
    let mut lab = Lab::new(cfg(10));
    lab.plat.deferred = true;
    let h = lab.connect();
    lab.until("connected", |l| l.established(h));
    lab.send(h, b"SET k v\r\n");
    lab.until("the write started", |l| l.plat.in_flight.is_some());
    lab.plat.land(false);
    assert!(matches!(lab.try_round(), Err(StepError::Disk(()))));
    assert_eq!(
        lab.received(h),
        b"",
        "a reply for a write that is not on the disk"
    );
}

#[test]
fn without_a_timeout_idle_clients_stay() {
    let mut lab = Lab::new(cfg(10));
    let h = lab.connect();
    lab.until("connected", |l| l.established(h));
    lab.advance_ms(3_600_000);
    for _ in 0..5 {
        lab.round();
    }
    assert!(!lab.closed_by_server(h));
    assert_eq!(lab.ask(h, b"PING\r\n", 7), b"+PONG\r\n");
}

#[test]
fn arguments() {
    let c = Config::from_args("").unwrap();
    assert_eq!(c, Config::default());
    let c = Config::from_args("  maxclients=5000 timeout=30 max-request=8192 ").unwrap();
    assert_eq!(c.max_clients, 5000);
    assert_eq!(c.idle_timeout_ms, 30_000);
    assert_eq!(c.limits.max_request_len, 8192);
    assert_eq!(c.limits.max_bulk_len, 8192);
    for bad in [
        "maxclients=0",
        "maxclients=x",
        "timeout=-1",
        "max-request=0",
    ] {
        assert!(
            matches!(Config::from_args(bad), Err(ArgError::BadValue(_))),
            "{bad}"
        );
    }
    for unknown in ["sockets=10", "verbose", "maxclient=3"] {
        let e = Config::from_args(unknown).unwrap_err();
        assert!(matches!(e, ArgError::Unknown(_)), "{unknown}");
        assert!(e.to_string().contains("maxclients=N"), "{e}");
    }
    // What bounds the limit: socket buffers grow with it.
    let a = Config::from_args("maxclients=1000").unwrap();
    let b = Config::from_args("maxclients=2000").unwrap();
    assert_eq!(
        b.peak_socket_bytes() - a.peak_socket_bytes(),
        1000 * a.socket_bytes()
    );
    let heap = 60 << 20;
    let most = Config {
        max_clients: a.max_clients_for(heap),
        ..a
    };
    assert!(most.peak_socket_bytes() <= heap / 2);
    let one_more = Config {
        max_clients: most.max_clients + 1,
        ..a
    };
    assert!(one_more.peak_socket_bytes() > heap / 2);
    assert!(most.max_clients >= 1024, "the default fits in 64 MiB");
}
