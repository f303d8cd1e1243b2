//! The kv guest's loop (kvnet + kvcore + smoltcp) on a host TAP, for profiling its network
//! path with `perf` (time in guest mode is invisible to host `perf`, DESIGN §1). It uses the
//! guest SDK's allocator (its source file, over a 64 MiB heap) and the guest's loop
//! structure; "exits" are counted where the guest would make one (a POLL or WAIT per step, a
//! POLL per disk write). Run as root inside a network namespace that owns the TAP:
//!
//! ```text
//! cargo build --release -p kvnet --features host --example tap_server
//! ip netns add kvp && ip netns exec kvp sh -c 'ip tuntap add dev kvp0 mode tap && \
//!     ip link set kvp0 up && ip addr add 10.77.0.1/24 dev kvp0 && ip link set lo up'
//! ip netns exec kvp target/release/examples/tap_server kvp0 10.77.0.2 /tmp/kvp.img 20 &
//! ip netns exec kvp redis-benchmark -h 10.77.0.2 -c 50 -n 200000 -t set,get -P 1
//! ```
//!
//! Arguments: TAP name, the server's IPv4 address (a /24), disk image path, seconds to run,
//! then optional guest arguments (`maxclients=N` …). Prints the work counters at the end;
//! divide by the requests redis-benchmark made for per-request figures.

use std::alloc::{GlobalAlloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use smoltcp::iface::{Config as IfConfig, Interface};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TunTapInterface, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

/// The guest SDK's allocator itself (size classes over linked_list_allocator).
#[path = "../../sdk/src/heap/classes.rs"]
#[allow(dead_code)]
mod classes;

/// The guest's allocator behind a lock (it assumes a single thread), set up on first use
/// (the std runtime allocates before `main`).
struct HostHeap {
    heap: classes::GuestHeap,
    lock: AtomicBool,
    ready: AtomicBool,
}

const HEAP_SIZE: usize = 64 << 20;
static mut HEAP_MEM: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

impl HostHeap {
    fn with<R>(&self, f: impl FnOnce(&classes::GuestHeap) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        if !self.ready.load(Ordering::Relaxed) {
            // SAFETY: HEAP_MEM is used only here, once (under the lock), as the heap's memory.
            unsafe {
                self.heap
                    .init(core::ptr::addr_of_mut!(HEAP_MEM).cast(), HEAP_SIZE)
            };
            self.ready.store(true, Ordering::Relaxed);
        }
        let r = f(&self.heap);
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: every call goes to the guest allocator under the lock, so it is entered by one
// thread at a time, as it requires.
unsafe impl GlobalAlloc for HostHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is passed on.
        self.with(|h| unsafe { h.alloc(layout) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        self.with(|h| unsafe { h.dealloc(ptr, layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's realloc contract is passed on.
        self.with(|h| unsafe { h.realloc(ptr, layout, new_size) })
    }
}

#[global_allocator]
static HEAP: HostHeap = HostHeap {
    heap: classes::GuestHeap::empty(),
    lock: AtomicBool::new(false),
    ready: AtomicBool::new(false),
};

/// Counts frames both ways and copies each received frame out, as the guest's virtio-net
/// driver does.
struct Counted {
    tap: TunTapInterface,
    rx: u64,
    tx: u64,
}

struct Rx(Vec<u8>);
impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
struct Tx<'a>(<TunTapInterface as Device>::TxToken<'a>, &'a mut u64);
impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        *self.1 += 1;
        self.0.consume(len, f)
    }
}

impl Device for Counted {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, t: Instant) -> Option<(Rx, Tx<'_>)> {
        let (rx, tx) = self.tap.receive(t)?;
        self.rx += 1;
        let frame = rx.consume(|f| f.to_vec());
        Some((Rx(frame), Tx(tx, &mut self.tx)))
    }
    fn transmit(&mut self, t: Instant) -> Option<Tx<'_>> {
        Some(Tx(self.tap.transmit(t)?, &mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = self.tap.capabilities();
        c.max_burst_size = Some(128);
        c
    }
}

struct Host {
    start: StdInstant,
    disk: File,
    disk_writes: u64,
}

impl kvnet::Platform for Host {
    type Error = std::io::Error;
    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
    fn write_disk(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.disk_writes += 1;
        self.disk.write_all_at(bytes, offset)?;
        self.disk.sync_data()
    }
}

fn main() -> std::io::Result<()> {
    run()
}

fn run() -> std::io::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: tap_server TAP IP DISK SECONDS [GUEST-ARGS...]");
        std::process::exit(2);
    }
    let ip: Ipv4Address = a[2].parse().expect("an IPv4 address");
    let secs: u64 = a[4].parse().expect("seconds");
    let cfg = kvnet::Config::from_args(&a[5..].join(" ")).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let size = 64u64 << 20;
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a[3])?;
    disk.set_len(size)?;
    let (mut store, mut log, line) = kvcore::host::recover(&disk, size)?;
    eprintln!("{line}");
    let mut dev = Counted {
        tap: TunTapInterface::new(&a[1], Medium::Ethernet)?,
        rx: 0,
        tx: 0,
    };
    let hw = HardwareAddress::Ethernet(EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    let mut host = Host {
        start: StdInstant::now(),
        disk,
        disk_writes: 0,
    };
    let mut iface = Interface::new(IfConfig::new(hw), &mut dev, kvnet::Platform::now(&host));
    iface.update_ip_addrs(|x| {
        let _ = x.push(IpCidr::new(ip.into(), 24));
    });
    let mut server = kvnet::Server::new(cfg, iface);
    eprintln!("listening on {ip}:6379");
    let fd = dev.tap.as_raw_fd();
    let (mut polls, mut waits) = (0u64, 0u64);
    let end = StdInstant::now() + Duration::from_secs(secs);
    let t0 = StdInstant::now();
    while StdInstant::now() < end {
        let more = server
            .step(&mut dev, &mut host, &mut store, &mut log)
            .map_err(|kvnet::StepError::Disk(e)| e)?;
        if more {
            polls += 1;
        } else {
            waits += 1;
            let now = kvnet::Platform::now(&host);
            let ms = kvnet::Platform::now_ms(&host);
            let delay = server.poll_delay(now, ms).unwrap_or(500_000_000);
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = (delay / 1_000_000).clamp(0, 500) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, timeout.max(if delay > 0 { 1 } else { 0 })) };
        }
    }
    let st = server.stats;
    let wall = t0.elapsed().as_secs_f64();
    println!("{st:#?}");
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    println!(
        "cpu user={:.2}s sys={:.2}s",
        secs(ru.ru_utime),
        secs(ru.ru_stime)
    );
    println!(
        "frames_rx={} frames_tx={} disk_writes={} poll_exits={polls} wait_exits={waits} wall={wall:.1}s",
        dev.rx, dev.tx, host.disk_writes
    );
    Ok(())
}
