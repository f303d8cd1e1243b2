//! `hostile`: writes garbage of every size to every control-device register (except EXIT),
//! reads every register, asks the console to print more than its buffer, then waits forever.
//! The VMM must survive all of it and still stop cleanly on SIGINT/SIGTERM.
#![no_std]
#![no_main]

use ftvm_guest::abi::control;
use ftvm_guest::println;

ftvm_guest::entry!(main);

fn main(_boot: &ftvm_guest::Boot) -> i32 {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let base = control::BASE;
    let mut off = 0u64;
    while off < control::SIZE {
        // The EXIT and WAIT registers would end or block the run; everything else gets junk.
        let skip = off & !7 == control::EXIT || off & !7 == control::WAIT;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: MMIO accesses to the control device's window, which the VMM handles.
        unsafe {
            let _ = core::ptr::read_volatile((base + off) as *const u8);
            if off.is_multiple_of(8) {
                let _ = core::ptr::read_volatile((base + off) as *const u64);
            }
            if !skip {
                core::ptr::write_volatile((base + off) as *mut u8, x as u8);
                if off.is_multiple_of(4) {
                    core::ptr::write_volatile((base + off) as *mut u32, x as u32);
                }
                if off.is_multiple_of(8) {
                    core::ptr::write_volatile((base + off) as *mut u64, x);
                }
            }
        }
        off += 1;
    }
    // A console length far beyond the buffer.
    ftvm_guest::control::write(control::CONSOLE, u64::MAX);
    println!();
    println!("hostile: survived; waiting forever");
    loop {
        ftvm_guest::control::write(control::WAIT, u64::MAX);
    }
}
