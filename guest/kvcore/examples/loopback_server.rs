//! The kv server loop natively on loopback, for trying kvcore with stock `redis-cli` /
//! `redis-benchmark`:
//!
//! ```text
//! cargo run --release -p kvcore --features host --example loopback_server -- 127.0.0.1:16379 /tmp/kv.img [SIZE]
//! redis-benchmark -p 16379 -q -n 2000
//! ```

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;

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
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if disk.metadata()?.len() < size {
        disk.set_len(size)?;
    }
    let (store, log, line) = kvcore::host::recover(&disk, size)?;
    eprintln!("{line} ({} keys); listening on {addr}", store.len());
    kvcore::host::serve(
        TcpListener::bind(addr)?,
        &disk,
        store,
        log,
        &AtomicBool::new(false),
    )
}
