//! `exitbench`: makes N exits of one kind and reports how long they took by the VMM's clock.
//! Arguments: `KIND N`, KIND one of `poll` (POLL doorbell writes), `magic` (reads of the
//! MAGIC register: the cheapest exit the VMM handles) or `clock` (CLOCK_MONO reads).
//! Prints `exitbench: kind=K exits=N ns=T`.
#![no_std]
#![no_main]

use ftvm_guest::abi::control;
use ftvm_guest::{control as ctl, println, time};

ftvm_guest::entry!(main);

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let mut words = boot.args().split_whitespace();
    let kind = words.next().unwrap_or("poll");
    let n: u64 = match words.next().map(str::parse) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            println!("exitbench: usage: KIND N");
            return 2;
        }
    };
    let t0 = time::clock_ns();
    match kind {
        "poll" => (0..n).for_each(|_| ctl::poll()),
        "magic" => (0..n).for_each(|_| {
            core::hint::black_box(ctl::read(control::MAGIC));
        }),
        "clock" => (0..n).for_each(|_| {
            core::hint::black_box(time::clock_ns());
        }),
        _ => {
            println!("exitbench: unknown kind {kind:?} (poll, magic, clock)");
            return 2;
        }
    }
    let t1 = time::clock_ns();
    println!("exitbench: kind={kind} exits={n} ns={}", t1 - t0);
    0
}
