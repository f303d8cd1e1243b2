//! `spin`: announces itself, then computes forever without a single exit (breaking the
//! contract's POLL rule). The node must still stop within a second of SIGINT/SIGTERM.
#![no_std]
#![no_main]

use ftvm_guest::println;

ftvm_guest::entry!(main);

fn main(_boot: &ftvm_guest::Boot) -> i32 {
    println!("spin: spinning");
    let mut x: u64 = 1;
    loop {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
