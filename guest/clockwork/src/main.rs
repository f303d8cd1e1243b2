//! `clockwork`: a guest that diverges at once if any input is not replayed faithfully.
//!
//! Each round reads the clock and entropy; how much work it does, which path it takes, what it
//! allocates and where it writes in a 2 MiB arena all depend on those values; some rounds WAIT
//! with deadlines that race against the work just done (whether the deadline has already
//! passed depends on timing), others POLL. At the end it prints a checksum over everything.
//! Arguments: `ROUNDS` (default 2000). Each round makes 3–5 exits, so 25 000 rounds give more
//! than 100 000 boundaries.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use ftvm_guest::{control, println, time};

ftvm_guest::entry!(main);

fn mix(a: u64, b: u64) -> u64 {
    let x = (a ^ b.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let rounds: u64 = boot.args().trim().parse().unwrap_or(2000);
    let mut arena = vec![0u64; 256 * 1024];
    let mut held: VecDeque<Vec<u8>> = VecDeque::new();
    let mut sum: u64 = 0;
    let (mut waits, mut late_waits, mut polls) = (0u64, 0u64, 0u64);
    for round in 0..rounds {
        let t = time::clock_ns();
        let e = control::entropy();
        sum = mix(sum, t ^ e);
        // Work whose amount and placement depend on time and entropy.
        let work = 50 + (mix(t, e) % 400) as usize;
        let mut at = (e as usize) % arena.len();
        for i in 0..work {
            at = (at + (sum as usize | 1) + i) % arena.len();
            arena[at] = mix(arena[at], sum.wrapping_add(i as u64));
            sum = sum.rotate_left(3) ^ arena[at];
        }
        // A path that depends on the low bits of the clock.
        if t & 1 == 0 {
            let n = (e % 3000) as usize + 1;
            held.push_back(vec![(sum & 0xff) as u8; n]);
        } else if let Some(v) = held.pop_front() {
            sum = mix(sum, v.len() as u64);
        }
        if held.len() > 64 {
            held.clear();
        }
        match (e >> 8) % 4 {
            // A deadline racing the work just done: short enough that it has sometimes
            // already passed when the WAIT starts.
            0 | 1 => {
                let deadline = t + (e >> 16) % 60_000;
                let woke = time::wait_until(deadline);
                waits += 1;
                if woke > deadline + 20_000 {
                    late_waits += 1;
                }
                sum = mix(sum, woke);
            }
            2 => {
                control::poll();
                polls += 1;
                sum = mix(sum, time::now_ns());
            }
            _ => {
                sum = mix(sum, time::wall_now_ns());
            }
        }
        if round % 500 == 0 {
            println!("clockwork: round {round} sum {sum:016x}");
        }
    }
    let folded = arena.iter().fold(0u64, |a, &x| mix(a, x));
    println!(
        "clockwork: done rounds={rounds} waits={waits} late={late_waits} polls={polls} sum={sum:016x} arena={folded:016x}"
    );
    0
}
