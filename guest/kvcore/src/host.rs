//! The kv server loop on a host (feature `host`): the guest's loop with std sockets and a file
//! as the disk, for baselines (the benchmark runs it natively beside the VM) and trials.
//!
//! One thread, non-blocking sockets; one iteration reads every socket, processes every
//! connection, writes the group-commit batch and `fdatasync`s it, then sends the released
//! replies — the order the guest uses with its write-through virtio-blk disk.

use alloc::vec;
use alloc::vec::Vec;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{aof, Connection, Limits, LogWriter, Store};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Rebuilds the store from `disk` (`size` bytes), formatting a blank disk; returns the store,
/// the log writer and the recovery line to print.
pub fn recover(disk: &File, size: u64) -> std::io::Result<(Store, LogWriter, std::string::String)> {
    let mut store = Store::new(now_ms());
    store.set_started_ms(now_ms());
    let mut rp = aof::Replayer::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let off = rp.next_offset();
        if off >= size {
            break;
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        disk.read_exact_at(&mut buf[..n], off)?;
        if rp.feed(&buf[..n], &mut store) {
            break;
        }
    }
    let bad = |e: std::string::String| std::io::Error::new(ErrorKind::InvalidData, e);
    match rp.finish() {
        Ok(rec) => {
            let line = std::format!("{rec}");
            Ok((store, LogWriter::resume(&rec, size), line))
        }
        Err(aof::HeaderError::Blank) => {
            let log = LogWriter::format(size, now_ms()).map_err(|e| bad(std::format!("{e:?}")))?;
            Ok((store, log, "blank disk, formatted".into()))
        }
        Err(e) => Err(bad(std::format!("{e}"))),
    }
}

/// Serves `listener` until `stop` is set, durable on `disk`, starting from what [`recover`]
/// returned.
pub fn serve(
    listener: TcpListener,
    disk: &File,
    mut store: Store,
    mut log: LogWriter,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut conns: Vec<(TcpStream, Connection, Vec<u8>)> = Vec::new();
    let mut rx = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            conns.push((s, Connection::new(Limits::default()), Vec::new()));
            busy = true;
        }
        store.set_connected_clients(conns.len() as u64);
        let t = now_ms();
        let mut dead = vec![false; conns.len()];
        for (i, (s, c, _)) in conns.iter_mut().enumerate() {
            loop {
                match s.read(&mut rx) {
                    Ok(0) => {
                        dead[i] = true;
                        break;
                    }
                    Ok(n) => {
                        c.feed(&rx[..n]);
                        busy = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        dead[i] = true;
                        break;
                    }
                }
            }
            c.process(&mut store, &mut log, t);
        }
        if let Some(b) = log.seal() {
            disk.write_all_at(&b.bytes, b.offset)?;
            disk.sync_data()?;
            log.mark_durable();
            if log.should_compact() && !log.has_unsealed() {
                let _ = log.compact(&store, t);
            }
        }
        for (i, (s, c, out)) in conns.iter_mut().enumerate() {
            c.take_output(&log, out);
            while !out.is_empty() {
                match s.write(out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        dead[i] = true;
                        break;
                    }
                }
            }
            if c.finished() && out.is_empty() {
                dead[i] = true;
            }
        }
        let mut i = 0;
        conns.retain(|_| {
            i += 1;
            !dead[i - 1]
        });
        if !busy {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}
