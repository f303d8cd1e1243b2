//! `kv`: a Redis-protocol (RESP2) server on port 6379, durable on its virtio-blk disk.
//!
//! Every write is appended to a log on the disk and its reply is sent only after the data is
//! on the disk (one group commit per loop iteration, left in flight so that the exit which
//! ends the iteration both transmits the previous commit's replies and writes this one; the
//! VMM's disk is write-through). At boot
//! the data is rebuilt from the disk; a torn or corrupt tail is cut off and reported.
//!
//! The network loop (accepting up to `maxclients` clients, refusing one more with Redis's
//! `-ERR max number of clients reached`, closing idle clients) is the `kvnet` crate.
//!
//! Arguments (space separated, all optional): `max-request=BYTES` (largest request a client
//! may send; larger ones close that connection), `maxclients=N` (most concurrent clients,
//! default 1024; bounded by memory: each connection holds 16 KiB of socket buffers, and a
//! limit whose buffers would take more than half the heap is refused), `timeout=SECONDS`
//! (close clients idle that long; default 0, never).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;

use ftvm_guest::disk::Disk;
use ftvm_guest::net::{self, GuestNet};
use ftvm_guest::{control, println, time, virtio};
use kvcore::{aof, LogWriter, Store};
use kvnet::{Config, Server, StepError};

ftvm_guest::entry!(main);

/// Longest the loop sleeps when idle (smoltcp's timers usually ask for less).
const MAX_IDLE_NS: u64 = 500_000_000;

fn now_ms() -> u64 {
    time::wall_now_ns() / 1_000_000
}

/// The VMM's clock and the virtio-blk disk.
struct Guest {
    disk: Disk,
}

impl kvnet::Platform for Guest {
    type Error = ftvm_guest::disk::DiskError;
    fn now(&self) -> ftvm_guest::smoltcp::time::Instant {
        net::now()
    }
    fn now_ms(&self) -> u64 {
        now_ms()
    }
    fn write_disk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Self::Error> {
        self.disk.write(offset, bytes)
    }
    fn start_write(
        &mut self,
        offset: u64,
        bytes: alloc::vec::Vec<u8>,
    ) -> Result<bool, Self::Error> {
        self.disk.start_write(offset, bytes)
    }
    fn write_done(&mut self) -> Option<Result<(), Self::Error>> {
        self.disk.write_done()
    }
}

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let cfg = match Config::from_args(boot.args()) {
        Ok(c) => c,
        Err(e) => {
            println!("kv: {e}");
            return 2;
        }
    };
    let heap = (boot.info().heap_end - boot.info().heap_start) as usize;
    if cfg.peak_socket_bytes() > heap / 2 {
        println!(
            "kv: maxclients={} needs up to {} MiB of socket buffers, more than half the {} MiB heap: at most {} fit (give the VM more --mem)",
            cfg.max_clients,
            cfg.peak_socket_bytes() >> 20,
            heap >> 20,
            cfg.max_clients_for(heap)
        );
        return 2;
    }
    let Some(netcfg) = boot.net() else {
        println!("kv: no network configured (run with --tap, --mac and --ip)");
        return 2;
    };
    let devs = virtio::probe(boot);
    let (Some(net), Some(blk)) = (devs.net, devs.blk) else {
        println!("kv: needs a virtio-net and a virtio-blk device");
        return 2;
    };
    let mut disk = Disk::new(blk);
    let capacity = disk.capacity();

    // Rebuild the data from the disk.
    let mut store = Store::new(control::entropy());
    time::clock_ns();
    store.set_started_ms(now_ms());
    let mut replayer = aof::Replayer::new();
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let off = replayer.next_offset();
        if off >= capacity {
            break;
        }
        let n = (capacity - off).min(chunk.len() as u64) as usize;
        if let Err(e) = disk.read(off, &mut chunk[..n]) {
            println!("kv: cannot read the disk at {off}: {e:?}");
            return 1;
        }
        if replayer.feed(&chunk[..n], &mut store) {
            break;
        }
    }
    drop(chunk);
    let mut log = match replayer.finish() {
        Ok(rec) => {
            println!("kv: {rec}");
            LogWriter::resume(&rec, capacity)
        }
        Err(aof::HeaderError::Blank) => {
            println!("kv: blank disk, formatting {capacity} bytes");
            match LogWriter::format(capacity, control::entropy()) {
                Ok(l) => l,
                Err(e) => {
                    println!("kv: cannot format the disk: {e:?}");
                    return 1;
                }
            }
        }
        Err(e) => {
            println!("kv: the disk holds no usable log: {e}");
            return 1;
        }
    };
    println!("kv: {} keys", store.len());

    // The network.
    let mut dev = match GuestNet::new(net) {
        Ok(d) => d,
        Err(e) => {
            println!("kv: virtio-net: {e:?}");
            return 1;
        }
    };
    let iface = net::interface(&mut dev, &netcfg, control::entropy());
    let mut server = Server::new(cfg, iface);
    let mut guest = Guest { disk };
    let [a, b, c, d] = netcfg.ipv4;
    println!(
        "kv: listening on {a}.{b}.{c}.{d}:{} (up to {} clients, idle timeout {} s, requests up to {} bytes)",
        cfg.port,
        cfg.max_clients,
        cfg.idle_timeout_ms / 1000,
        cfg.limits.max_request_len
    );
    loop {
        let before = server.stats;
        let more = match server.step(&mut dev, &mut guest, &mut store, &mut log) {
            Ok(b) => b,
            Err(StepError::Disk(e)) => {
                println!("kv: disk write failed: {e:?}; stopping");
                return 1;
            }
        };
        if server.stats.compactions != before.compactions {
            println!("kv: compacting the log ({} keys)", store.len());
        }
        if server.stats.compaction_failures != before.compaction_failures {
            println!("kv: cannot compact the log");
        }
        // End the iteration: POLL when work is ready, else WAIT for a frame or a timer (the
        // frames this iteration queued are taken at either exit).
        if more || dev.has_rx() {
            control::poll();
        } else {
            let delay = server
                .poll_delay(net::now(), now_ms())
                .map_or(MAX_IDLE_NS, |d| d.min(MAX_IDLE_NS));
            time::wait_until(time::now_ns().saturating_add(delay.max(1)));
        }
    }
}
