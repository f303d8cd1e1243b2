//! `diskwait`: submits a block read without an exit (the device's NO_NOTIFY flag lets the
//! driver skip the notify) and then WAITs, so the request is taken at the WAIT's boundary and
//! that boundary carries a disk completion *before* the WAIT blocks. A signal that stops the
//! recording during such a WAIT must replay to the same stop. Needs a disk (`--disk`) of at
//! least 64 KiB. Prints a line every 200 rounds; runs until stopped, or for `ROUNDS` rounds
//! if an argument is given.
#![no_std]
#![no_main]

use ftvm_guest::virtio::probe;
use ftvm_guest::virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, SECTOR_SIZE};
use ftvm_guest::{println, time};

ftvm_guest::entry!(main);

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let rounds: Option<u64> = boot.args().trim().parse().ok();
    let Some(mut blk) = probe(boot).blk else {
        println!("diskwait: no disk");
        return 2;
    };
    let sectors = (blk.capacity() as usize).min(128);
    let mut buf = [0u8; SECTOR_SIZE];
    let mut sum: u64 = 0;
    let mut round: u64 = 0;
    println!("diskwait: started");
    while rounds.is_none_or(|n| round < n) {
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        let sector = (round as usize * 7) % sectors;
        // SAFETY: `req`, `buf` and `resp` are not touched until the request completes, and are
        // passed unchanged to complete it.
        let token = match unsafe { blk.read_blocks_nb(sector, &mut req, &mut buf, &mut resp) } {
            Ok(t) => t,
            Err(e) => {
                println!("diskwait: submit failed: {e:?}");
                return 1;
            }
        };
        // The WAIT is the exit at which the VMM takes (and completes) the request.
        let woke = time::wait_until(time::now_ns() + 300_000);
        while blk.peek_used() != Some(token) {
            time::wait_until(time::now_ns() + 300_000);
        }
        // SAFETY: as above.
        if let Err(e) = unsafe { blk.complete_read_blocks(token, &req, &mut buf, &mut resp) } {
            println!("diskwait: read failed: {e:?}");
            return 1;
        }
        if resp.status() != RespStatus::OK {
            println!("diskwait: read status {:?}", resp.status());
            return 1;
        }
        sum = sum.rotate_left(5) ^ u64::from(buf[round as usize % SECTOR_SIZE]) ^ woke;
        round += 1;
        if round.is_multiple_of(200) {
            println!("diskwait: round {round} sum {sum:016x}");
        }
    }
    println!("diskwait: done rounds={round} sum={sum:016x}");
    0
}
