//! `kv`: a Redis-protocol (RESP2) server on port 6379, durable on its virtio-blk disk.
//!
//! Every write is appended to a log on the disk and its reply is sent only after the data is
//! on the disk (one group commit per loop iteration; the VMM's disk is write-through). At boot
//! the data is rebuilt from the disk; a torn or corrupt tail is cut off and reported.
//!
//! Arguments (space separated, all optional): `max-request=BYTES` (largest request a client
//! may send; larger ones close that connection), `sockets=N` (listening sockets, i.e. the most
//! concurrent clients, default 128).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest::disk::Disk;
use ftvm_guest::net::Stack;
use ftvm_guest::smoltcp::iface::SocketHandle;
use ftvm_guest::smoltcp::socket::tcp;
use ftvm_guest::{control, println, time, virtio};
use kvcore::{aof, Connection, Limits, LogWriter, Store};

ftvm_guest::entry!(main);

const PORT: u16 = 6379;
/// Longest the loop sleeps when idle (smoltcp's timers usually ask for less).
const MAX_IDLE_NS: u64 = 500_000_000;

struct Client {
    handle: SocketHandle,
    conn: Connection,
    out: Vec<u8>,
}

fn option(args: &str, key: &str) -> Option<u64> {
    args.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn now_ms() -> u64 {
    time::wall_now_ns() / 1_000_000
}

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let mut limits = Limits::default();
    if let Some(n) = option(boot.args(), "max-request") {
        limits.max_request_len = n as usize;
        limits.max_bulk_len = limits.max_bulk_len.min(n as usize);
        limits.max_inline_len = limits.max_inline_len.min(n as usize);
    }
    let nsockets = option(boot.args(), "sockets").unwrap_or(128) as usize;
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
    let mut net = match Stack::new(net, &netcfg, control::entropy()) {
        Ok(n) => n,
        Err(e) => {
            println!("kv: virtio-net: {e:?}");
            return 1;
        }
    };
    let [a, b, c, d] = netcfg.ipv4;
    let mut clients: Vec<Client> = (0..nsockets)
        .map(|_| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 16 * 1024]),
                tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            );
            s.set_nagle_enabled(false);
            let _ = s.listen(PORT);
            Client {
                handle: net.sockets.add(s),
                conn: Connection::new(limits),
                out: Vec::new(),
            }
        })
        .collect();
    println!(
        "kv: listening on {a}.{b}.{c}.{d}:{PORT} ({nsockets} sockets, requests up to {} bytes)",
        limits.max_request_len
    );

    let mut rx = vec![0u8; 16 * 1024];
    loop {
        let mut busy = false;
        net.poll();
        let now = now_ms();
        let mut connected = 0;
        for cl in clients.iter_mut() {
            let s = net.sockets.get_mut::<tcp::Socket>(cl.handle);
            while s.can_recv() {
                match s.recv_slice(&mut rx) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        cl.conn.feed(&rx[..n]);
                        busy = true;
                    }
                }
            }
            if s.is_active() {
                connected += 1;
            }
            cl.conn.process(&mut store, &mut log, now);
        }
        store.set_connected_clients(connected);
        // Group commit: the iteration's writes reach the disk before any reply leaves.
        if let Some(batch) = log.seal() {
            if let Err(e) = disk.write(batch.offset, &batch.bytes) {
                println!("kv: disk write failed: {e:?}; stopping");
                return 1;
            }
            log.mark_durable();
            if log.should_compact() && !log.has_unsealed() {
                match log.compact(&store, now) {
                    Ok(()) => println!("kv: compacting the log ({} keys)", store.len()),
                    Err(e) => println!("kv: cannot compact the log: {e:?}"),
                }
            }
            busy = true;
        }
        for cl in clients.iter_mut() {
            let s = net.sockets.get_mut::<tcp::Socket>(cl.handle);
            cl.conn.take_output(&log, &mut cl.out);
            while !cl.out.is_empty() && s.can_send() {
                match s.send_slice(&cl.out) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        cl.out.drain(..n);
                        busy = true;
                    }
                }
            }
            let peer_done = matches!(s.state(), tcp::State::CloseWait);
            if (cl.conn.finished() || peer_done)
                && cl.out.is_empty()
                && s.is_open()
                && s.state() != tcp::State::Listen
            {
                s.close();
            }
            if !s.is_open() {
                // Closed (or timed out): listen again with a fresh connection state.
                s.abort();
                let _ = s.listen(PORT);
                cl.conn = Connection::new(limits);
                cl.out.clear();
            }
        }
        net.poll();
        net.idle(busy, MAX_IDLE_NS);
    }
}
