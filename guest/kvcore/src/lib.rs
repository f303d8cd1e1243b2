//! The engine of the bundled `kv` guest: a RESP2 parser and writer, the command set, and the
//! durable append-only log kept on the guest's virtio-blk disk. `no_std` + `alloc`, so that
//! the same code runs in the freestanding guest and in the host's unit tests.
//!
//! Nothing here reads a clock or a random source: time (`now_ms`) and entropy are passed in
//! by the caller, so two replicas fed the same inputs behave identically.
//!
//! # Driving it from the guest loop
//!
//! ```
//! use kvcore::{aof, Connection, Limits, LogWriter, Store};
//!
//! // Boot: replay the disk (here an in-memory image; a guest reads sectors in chunks with
//! // `aof::Replayer`), or format a blank one.
//! let mut disk = vec![0u8; 64 * 1024];
//! let mut store = Store::new(0x5eed);
//! let mut log = match aof::replay(&disk, &mut store) {
//!     Ok(rec) => { /* print `rec` on the console */ LogWriter::resume(&rec, disk.len() as u64) }
//!     Err(aof::HeaderError::Blank) => LogWriter::format(disk.len() as u64, 42).unwrap(),
//!     Err(e) => panic!("{e}"),
//! };
//! let mut conn = Connection::new(Limits::default());
//!
//! // One loop iteration: feed what each socket received, process, then group-commit.
//! conn.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nGET k\r\n");
//! conn.process(&mut store, &mut log, 1_000);
//! if let Some(batch) = log.seal() {
//!     // write batch.bytes at batch.offset on the block device, then FLUSH, then:
//!     disk[batch.offset as usize..][..batch.bytes.len()].copy_from_slice(&batch.bytes);
//!     log.mark_durable();
//!     // At a quiet moment, keep the log from filling the disk: the next batches then
//!     // write a snapshot of the store and switch the log over to it.
//!     if log.should_compact() && !log.has_unsealed() {
//!         let _ = log.compact(&store, 1_000);
//!     }
//! }
//! let mut tx = Vec::new();
//! conn.take_output(&log, &mut tx); // only now may the replies be sent
//! assert_eq!(tx, b"+OK\r\n$1\r\nv\r\n");
//!
//! // After a crash, the disk gives the data back.
//! let mut again = Store::new(1);
//! let rec = aof::replay(&disk, &mut again).unwrap();
//! assert_eq!((rec.records, rec.stop), (1, aof::Stop::Clean));
//! ```
#![no_std]
#![warn(missing_docs)]
extern crate alloc;
#[cfg(any(test, feature = "host"))]
extern crate std;

pub mod aof;
pub mod commands;
pub mod conn;
mod crc;
#[cfg(feature = "host")]
pub mod host;
pub mod resp;
pub mod store;

pub use aof::{LogWriter, Recovery, Replayer};
pub use commands::{Effect, Outcome};
pub use conn::{Connection, Status};
pub use resp::Limits;
pub use store::Store;
