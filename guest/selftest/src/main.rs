//! `selftest`: exercises the guest SDK — allocation, floating point, the clock and a wait with a
//! deadline — then prints `selftest: ok` and exits 0. Any failed check panics (status 101).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use ftvm_guest::{println, time};

ftvm_guest::entry!(main);

fn main(_boot: &ftvm_guest::Boot) -> i32 {
    // Allocation: a growing vector, strings and a map, freed and reused.
    let mut v: Vec<u64> = (0..100_000).collect();
    v.retain(|x| x % 3 == 0);
    assert_eq!(v.len(), 33_334);
    assert_eq!(v.iter().sum::<u64>(), 1_666_683_333);
    let mut m = BTreeMap::new();
    for i in 0..1000u32 {
        m.insert(i, alloc::format!("value-{i}"));
    }
    assert_eq!(m[&999], "value-999");
    drop(m);
    let s: String = (0..64).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    assert!(s.starts_with("abc"));
    println!("selftest: allocation ok");

    // Floating point (SSE2): Leibniz series for pi and a Newton square root.
    let mut pi = 0.0f64;
    for k in 0..200_000 {
        let term = 4.0 / (2 * k + 1) as f64;
        pi += if k % 2 == 0 { term } else { -term };
    }
    assert!((pi - core::f64::consts::PI).abs() < 1e-5, "pi = {pi}");
    let mut r = 2.0f64;
    for _ in 0..20 {
        r = 0.5 * (r + 2.0 / r);
    }
    assert!((r * r - 2.0).abs() < 1e-12);
    println!("selftest: floating point ok (pi ~ {pi:.5}, sqrt 2 ~ {r:.9})");

    // The clock: monotonic, and the wall clock is a plausible date (after 2020).
    assert!(time::wall_clock_ns() > 1_577_836_800_000_000_000);
    let t0 = time::clock_ns();
    let t1 = time::clock_ns();
    assert!(t1 >= t0, "clock went backwards: {t0} -> {t1}");
    assert_eq!(
        time::now_ns(),
        t1,
        "the shared page holds the last clock read"
    );

    // A wait with a deadline returns no earlier than the deadline when nothing else happens.
    let deadline = t1 + 5_000_000;
    time::sleep_until(deadline);
    let t2 = time::clock_ns();
    assert!(
        t2 >= deadline,
        "woke at {t2}, before the deadline {deadline}"
    );
    println!("selftest: clock ok (waited {} us)", (t2 - t1) / 1000);

    println!("selftest: ok");
    0
}
