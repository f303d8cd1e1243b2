//! `crash`: touches an unmapped address. The VMM must end the run with a report naming the exit
//! reason, RIP and registers, and a non-zero status.
#![no_std]
#![no_main]

use ftvm_guest::println;

ftvm_guest::entry!(main);

/// An address far above anything the VMM maps (it maps the first 4 GiB).
const UNMAPPED: u64 = 0xdead_0000_0000;

fn main(_boot: &ftvm_guest::Boot) -> i32 {
    println!("crash: reading {UNMAPPED:#x}");
    // SAFETY: deliberately unsound: this guest exists to fault.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    println!("crash: survived a read of an unmapped address ({v})");
    0
}
