//! The engine of the bundled `kv` guest: a RESP2 parser and writer, the command set, and the
//! durable append-only log kept on the guest's virtio-blk disk. `no_std` + `alloc`, so that
//! the same code runs in the freestanding guest and in the host's unit tests.
#![no_std]
extern crate alloc;
