//! `badvirtio`: drives every virtio device by hand with malformed descriptor chains —
//! addresses outside guest memory, loops, impossible lengths, missing status buffers, wrong
//! directions, out-of-range sectors and indexes, a queue laid out outside memory — and checks
//! that the VMM fails each request (IOERR where there is a status byte) and keeps running.
//! Prints `badvirtio: survived N malformed requests` and exits 0, or exits 1 on a surprise.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc_zeroed, Layout};
use ftvm_guest::{control, println};

ftvm_guest::entry!(main);

const QSIZE: u16 = 8;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const FAR: u64 = 0x7000_0000_0000;

fn rd(base: u64, off: u64) -> u32 {
    // SAFETY: a virtio-mmio register of a device the VMM announced.
    unsafe { core::ptr::read_volatile((base + off) as *const u32) }
}
fn wr(base: u64, off: u64, v: u32) {
    // SAFETY: as in `rd`.
    unsafe { core::ptr::write_volatile((base + off) as *mut u32, v) }
}

/// A split virtqueue laid out in one zeroed page.
struct Ring {
    page: u64,
    avail_idx: u16,
}

impl Ring {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.page + u64::from(i % QSIZE) * 16;
        // SAFETY: inside the ring's own page.
        unsafe {
            core::ptr::write_volatile(d as *mut u64, addr);
            core::ptr::write_volatile((d + 8) as *mut u32, len);
            core::ptr::write_volatile((d + 12) as *mut u16, flags);
            core::ptr::write_volatile((d + 14) as *mut u16, next);
        }
    }
    fn avail(&self) -> u64 {
        self.page + 16 * u64::from(QSIZE)
    }
    fn used(&self) -> u64 {
        self.page + 2048
    }
    fn used_idx(&self) -> u16 {
        // SAFETY: inside the ring's own page.
        unsafe { core::ptr::read_volatile((self.used() + 2) as *const u16) }
    }
    /// Offers chain `head` and returns whether the device gave it back.
    fn offer(&mut self, head: u16) -> bool {
        let before = self.used_idx();
        let slot = self.avail() + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: inside the ring's own page.
        unsafe {
            core::ptr::write_volatile(slot as *mut u16, head);
            core::ptr::write_volatile((self.avail() + 2) as *mut u16, self.avail_idx);
        }
        control::poll();
        self.used_idx() != before
    }
}

fn page() -> u64 {
    // SAFETY: a non-zero, page-aligned layout.
    unsafe { alloc_zeroed(Layout::from_size_align(4096, 4096).expect("layout")) as u64 }
}

/// Sets up queue `q` of the device at `base`; returns the ring, or None if the device refused.
fn setup(base: u64, q: u32, page_addr: u64) -> Option<Ring> {
    wr(base, 0x30, q);
    if rd(base, 0x34) < u32::from(QSIZE) {
        return None;
    }
    wr(base, 0x38, u32::from(QSIZE));
    let ring = Ring {
        page: page_addr,
        avail_idx: 0,
    };
    for (off, addr) in [(0x80, ring.page), (0x90, ring.avail()), (0xa0, ring.used())] {
        wr(base, off, addr as u32);
        wr(base, off + 4, (addr >> 32) as u32);
    }
    wr(base, 0x44, 1);
    (rd(base, 0x44) == 1).then_some(ring)
}

fn main(boot: &ftvm_guest::Boot) -> i32 {
    let info = boot.info();
    let mut survived = 0u32;
    let status = page();
    let data = page();
    let hdr = page();
    for i in 0..info.virtio_count {
        let base = info.virtio_base + i * info.virtio_stride;
        let dev = rd(base, 0x08);
        wr(base, 0x70, 0);
        wr(base, 0x70, 1 | 2);
        wr(base, 0x24, 1);
        wr(base, 0x20, 1); // VERSION_1
        wr(base, 0x24, 0);
        wr(base, 0x20, 0);
        wr(base, 0x70, 1 | 2 | 8);
        // A queue whose rings lie outside guest memory must be refused.
        wr(base, 0x30, 0);
        wr(base, 0x38, u32::from(QSIZE));
        wr(base, 0x80, 0);
        wr(base, 0x84, 0x7000);
        wr(base, 0x44, 1);
        if rd(base, 0x44) != 0 {
            println!("badvirtio: device {dev} accepted a queue outside memory");
            return 1;
        }
        survived += 1;
        let queue = if dev == 1 { 1 } else { 0 }; // net: the transmit queue
        let Some(mut ring) = setup(base, queue, page()) else {
            println!("badvirtio: device {dev}: cannot set up queue {queue}");
            return 1;
        };
        wr(base, 0x70, 1 | 2 | 8 | 4);
        // SAFETY: the header page is ours.
        let set_hdr = |kind: u32, sector: u64| unsafe {
            core::ptr::write_volatile(hdr as *mut u32, kind);
            core::ptr::write_volatile((hdr + 8) as *mut u64, sector);
        };
        let status_byte = || {
            // SAFETY: the status page is ours.
            unsafe { core::ptr::read_volatile(status as *const u8) }
        };
        let mut cases: u32 = 0;
        let mut check = |ring: &mut Ring, head: u16, want_ioerr: bool| -> bool {
            // SAFETY: the status page is ours.
            unsafe { core::ptr::write_volatile(status as *mut u8, 0xee) };
            let used = ring.offer(head);
            cases += 1;
            used && (!want_ioerr || status_byte() == 1)
        };
        let blk = dev == 2;
        // 1. A buffer far outside guest memory (with a status byte for the block device).
        set_hdr(0, 0);
        ring.desc(0, hdr, 16, NEXT, 1);
        ring.desc(1, FAR, 512, NEXT | WRITE, 2);
        ring.desc(2, status, 1, WRITE, 0);
        if !check(&mut ring, if blk { 0 } else { 1 }, blk) {
            println!("badvirtio: device {dev}: far buffer not failed cleanly");
            return 1;
        }
        // 2. A descriptor loop.
        ring.desc(3, data, 64, NEXT | WRITE, 4);
        ring.desc(4, data, 64, NEXT | WRITE, 3);
        if !check(&mut ring, 3, false) {
            println!("badvirtio: device {dev}: loop not returned");
            return 1;
        }
        // 3. An impossible length.
        ring.desc(5, data, u32::MAX, WRITE, 0);
        if !check(&mut ring, 5, false) {
            println!("badvirtio: device {dev}: huge length not returned");
            return 1;
        }
        // 4. A next index past the table.
        ring.desc(6, data, 16, NEXT, 200);
        if !check(&mut ring, 6, false) {
            println!("badvirtio: device {dev}: bad next index not returned");
            return 1;
        }
        if blk {
            // 5. A read whose data buffer is device-readable (wrong direction).
            set_hdr(0, 0);
            ring.desc(0, hdr, 16, NEXT, 1);
            ring.desc(1, data, 512, NEXT, 2);
            ring.desc(2, status, 1, WRITE, 0);
            if !check(&mut ring, 0, true) {
                println!("badvirtio: blk: wrong-direction read not failed");
                return 1;
            }
            // 6. A read past the end of the disk.
            set_hdr(0, u64::MAX - 1);
            ring.desc(1, data, 512, NEXT | WRITE, 2);
            if !check(&mut ring, 0, true) {
                println!("badvirtio: blk: out-of-range read not failed");
                return 1;
            }
            // 7. A header with no status buffer at all.
            ring.desc(7, hdr, 16, 0, 0);
            if !check(&mut ring, 7, false) {
                println!("badvirtio: blk: header-only chain not returned");
                return 1;
            }
            // 8. A well-formed read still works afterwards.
            set_hdr(0, 0);
            ring.desc(0, hdr, 16, NEXT, 1);
            ring.desc(1, data, 512, NEXT | WRITE, 2);
            ring.desc(2, status, 1, WRITE, 0);
            // SAFETY: the status page is ours.
            unsafe { core::ptr::write_volatile(status as *mut u8, 0xee) };
            if !ring.offer(0) || status_byte() != 0 {
                println!("badvirtio: blk: a valid read failed after the bad ones");
                return 1;
            }
        }
        // 9. An avail index far ahead of the ring: the device must not run away.
        // SAFETY: inside the ring's own page.
        unsafe {
            core::ptr::write_volatile(
                (ring.avail() + 2) as *mut u16,
                ring.avail_idx.wrapping_add(1000),
            )
        };
        control::poll();
        survived += cases + 1;
        println!("badvirtio: device {dev}: {cases} malformed chains handled");
        wr(base, 0x70, 0);
    }
    println!("badvirtio: survived {survived} malformed requests");
    0
}
