//! `timecheck`: a guest that checks its clocks never go backwards (across a failover, too).
//!
//! Forever (or for `ROUNDS` rounds, the argument), it reads the monotonic and the wall clock,
//! WAITs a millisecond, and compares with the last readings. A clock that went backwards is
//! reported (`timecheck: BACKWARDS ...`) and the guest exits with status 1. Every 1000 rounds
//! it prints `timecheck: ok round N mono M` so a test can see it go on.
#![no_std]
#![no_main]

use ftvm_guest::{println, time};

ftvm_guest::entry!(main);

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let rounds: u64 = boot.args().trim().parse().unwrap_or(u64::MAX);
    let (mut last_mono, mut last_wall) = (0u64, 0u64);
    let mut round = 0u64;
    while round < rounds {
        let mono = time::clock_ns();
        let wall = time::wall_now_ns();
        if mono < last_mono || wall < last_wall {
            println!(
                "timecheck: BACKWARDS at round {round}: mono {last_mono} -> {mono}, wall {last_wall} -> {wall}"
            );
            return 1;
        }
        last_mono = mono;
        last_wall = wall;
        let woke = time::wait_until(mono + 1_000_000);
        if woke < mono {
            println!(
                "timecheck: BACKWARDS at round {round}: a WAIT ended at {woke}, before {mono}"
            );
            return 1;
        }
        last_mono = last_mono.max(woke);
        if round.is_multiple_of(1000) {
            println!("timecheck: ok round {round} mono {mono}");
        }
        round += 1;
    }
    println!("timecheck: done rounds={rounds}");
    0
}
