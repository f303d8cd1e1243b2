//! A host-side stand-in for the `kv` guest's main loop, for trying kvcore with stock
//! `redis-cli` / `redis-benchmark` on loopback:
//!
//! ```text
//! cargo run --release -p kvcore --example loopback_server -- 127.0.0.1:16379 /tmp/kv.img [SIZE]
//! redis-benchmark -p 16379 -q -n 2000
//! ```
//!
//! One thread, non-blocking sockets, one loop iteration = read every socket, process every
//! connection, write the group-commit batch to the image file and fsync it, then send the
//! released replies: the same order the guest uses with its virtio-blk disk.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvcore::{aof, Connection, Limits, LogWriter, Store};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:16379", String::as_str);
    assert!(addr.starts_with("127.0.0.1:"), "loopback only");
    let path = args
        .get(2)
        .map_or("/tmp/kvcore-loopback.img", String::as_str);
    let size: u64 = args
        .get(3)
        .map_or(64 << 20, |s| s.parse().expect("size in bytes"));
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if disk.metadata()?.len() < size {
        disk.set_len(size)?;
    }
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut store = Store::new(now());
    store.set_started_ms(now());
    // Boot: replay the log in 64 KiB chunks, like the guest reading its disk.
    let t = Instant::now();
    let mut rp = aof::Replayer::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = disk.read(&mut buf)?;
        if n == 0 || rp.feed(&buf[..n], &mut store) {
            break;
        }
    }
    let mut log = match rp.finish() {
        Ok(rec) => {
            eprintln!("{rec} ({} keys, {:?})", store.len(), t.elapsed());
            LogWriter::resume(&rec, size)
        }
        Err(aof::HeaderError::Blank) => {
            eprintln!("kv log: blank disk, formatting");
            LogWriter::format(size, now()).expect("disk too small")
        }
        Err(e) => panic!("kv log: {e}"),
    };
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    eprintln!("listening on {addr}");
    let mut conns: Vec<(TcpStream, Connection, Vec<u8>)> = Vec::new();
    let mut rx = vec![0u8; 64 << 10];
    loop {
        let mut busy = false;
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            conns.push((s, Connection::new(Limits::default()), Vec::new()));
            busy = true;
        }
        store.set_connected_clients(conns.len() as u64);
        let t = now();
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
            disk.seek(SeekFrom::Start(b.offset))?;
            disk.write_all(&b.bytes)?;
            disk.sync_data()?;
            log.mark_durable();
            // A quiet moment: compact if the log's region is half full.
            if log.should_compact() && !log.has_unsealed() {
                match log.compact(&store, t) {
                    Ok(()) => eprintln!("kv log: compacting ({} keys)", store.len()),
                    Err(e) => eprintln!("kv log: cannot compact: {e}"),
                }
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
}
