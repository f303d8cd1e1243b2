//! The ftvm guest SDK.
//!
//! A guest is a freestanding x86-64 program started by the VMM at CPL 3 with identity paging
//! (see `docs/guest-contract.md`). This crate gives it an entry point and stack, a heap, a panic
//! handler that reports on the console and exits with [`ftvm_abi::EXIT_PANIC`], console
//! printing ([`print!`]/[`println!`]), the VMM's clock, waiting until a deadline, POLL and
//! entropy. A guest program writes:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! ftvm_guest::entry!(main);
//! fn main(boot: &ftvm_guest::Boot) -> i32 { ftvm_guest::println!("hello"); 0 }
//! ```
#![no_std]

extern crate alloc;

pub mod console;
pub mod control;
pub mod disk;
mod entry;
mod heap;
mod mem;
pub mod net;
mod panic;
pub mod time;
pub mod virtio;

pub use entry::Boot;
pub use ftvm_abi as abi;
pub use smoltcp;
pub use virtio_drivers;
