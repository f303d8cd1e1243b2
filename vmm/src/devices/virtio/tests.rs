//! The virtio transport and the net, block and rng devices on their own, driven the way a
//! guest driver drives them: split rings built in (real, mmap'ed) guest memory, registers
//! written through the MMIO transport, requests taken at boundaries. Malformed descriptor
//! chains, ring-index wrap-around and a driver stopping a queue or resetting the device
//! mid-run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::blk::{Block, S_IOERR, S_OK, S_UNSUPP};
use super::mmio::VirtioMmio;
use super::net::{FrameSink, Net, HDR_LEN};
use super::rng::{Rng, MAX_REQUEST};
use super::{VirtioDevice, F_VERSION_1};
use crate::bus::MmioDevice;
use crate::epoch::testing::VecConsole;
use crate::epoch::{Boundary, BoundaryCx, ClockValue, InputError, Inputs};
use crate::kvm::memory::GuestMemory;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// What the devices asked of the input source.
#[derive(Default)]
struct Asked {
    random: Vec<usize>,
    disk: Vec<(u8, u64)>,
    frames: VecDeque<Vec<u8>>,
    rx_rooms: Vec<usize>,
}

struct TestInputs(Arc<Mutex<Asked>>);

impl Inputs for TestInputs {
    fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
        Ok(ClockValue::default())
    }
    fn entropy(&mut self, _b: Boundary) -> Result<u64, InputError> {
        Ok(0)
    }
    fn wait(&mut self, _b: Boundary, _d: u64, _r: usize) -> Result<ClockValue, InputError> {
        Ok(ClockValue::default())
    }
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        self.0.lock().unwrap().random.push(len);
        Ok(vec![b as u8 | 0x80; len])
    }
    fn disk_done(&mut self, _b: Boundary, status: u8, hash: u64) -> Result<(), InputError> {
        self.0.lock().unwrap().disk.push((status, hash));
        Ok(())
    }
    fn net_rx(&mut self, _b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        let mut a = self.0.lock().unwrap();
        a.rx_rooms.push(room);
        let n = room.min(a.frames.len());
        Ok(a.frames.drain(..n).collect())
    }
}

/// Frames the device transmitted, and how many had been sent at each `flush`.
#[derive(Clone, Default)]
struct Sent(Arc<Mutex<Vec<Vec<u8>>>>, Arc<Mutex<Vec<usize>>>);

impl FrameSink for Sent {
    fn send(&mut self, _b: Boundary, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
    fn flush(&mut self) {
        let n = self.0.lock().unwrap().len();
        self.1.lock().unwrap().push(n);
    }
}

/// One split virtqueue as the driver sees it.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

/// A device behind the transport, a guest memory and a driver.
struct Rig<D: VirtioDevice> {
    dev: VirtioMmio<D>,
    mem: GuestMemory,
    inputs: TestInputs,
    asked: Arc<Mutex<Asked>>,
    console: VecConsole,
    boundary: Boundary,
    rings: Vec<Ring>,
    /// Where the next data buffer goes.
    heap: u64,
}

impl<D: VirtioDevice> Rig<D> {
    fn new(device: D) -> Self {
        let asked = Arc::new(Mutex::new(Asked::default()));
        Rig {
            dev: VirtioMmio::new(device),
            mem: GuestMemory::new(4 << 20).unwrap(),
            inputs: TestInputs(asked.clone()),
            asked,
            console: VecConsole::default(),
            boundary: 0,
            rings: Vec::new(),
            heap: 0x10_0000,
        }
    }

    fn with_cx<T>(&mut self, f: impl FnOnce(&mut VirtioMmio<D>, &mut BoundaryCx<'_>) -> T) -> T {
        let mut request = None;
        let mut cx = BoundaryCx {
            boundary: self.boundary,
            mem: &self.mem,
            inputs: &mut self.inputs,
            console: &mut self.console,
            request: &mut request,
            rx_room: 0,
            doorbell: true,
        };
        f(&mut self.dev, &mut cx)
    }

    fn write(&mut self, offset: u64, v: u32) {
        self.with_cx(|d, cx| d.write(offset, &v.to_le_bytes(), cx))
            .unwrap();
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.with_cx(|d, cx| d.read(offset, &mut b, cx)).unwrap();
        u32::from_le_bytes(b)
    }

    /// One boundary: the device takes requests and applies events, as the machine does.
    fn boundary(&mut self) {
        self.boundary += 1;
        self.with_cx(|d, cx| {
            d.take_requests(cx)?;
            d.apply_events(cx)
        })
        .unwrap();
    }

    fn rx_room(&self) -> usize {
        self.dev.rx_room(&self.mem)
    }

    /// Negotiates VERSION_1 and readies every queue with `size` entries; DRIVER_OK.
    fn setup(&mut self, size: u16) {
        self.write(0x070, 0);
        self.write(0x070, 1 | 2);
        self.write(0x024, 1);
        self.write(0x020, (F_VERSION_1 >> 32) as u32);
        self.write(0x070, 1 | 2 | 8);
        assert_eq!(self.read(0x070) & 8, 8, "FEATURES_OK refused");
        self.rings.clear();
        let queues = self.dev_queue_count();
        for q in 0..queues {
            let base = 0x1000 + q as u64 * 0x8000;
            let ring = Ring {
                size,
                desc: base,
                avail: base + 0x2000,
                used: base + 0x4000,
                avail_idx: 0,
                used_seen: 0,
                next_desc: 0,
            };
            self.write(0x030, q as u32);
            self.write(0x038, size.into());
            for (off, addr) in [(0x080, ring.desc), (0x090, ring.avail), (0x0a0, ring.used)] {
                self.write(off, addr as u32);
                self.write(off + 4, (addr >> 32) as u32);
            }
            self.write(0x044, 1);
            assert_eq!(self.read(0x044), 1, "queue {q} not ready");
            self.rings.push(ring);
        }
        self.write(0x070, 1 | 2 | 8 | 4);
    }

    fn dev_queue_count(&mut self) -> usize {
        (0..8u32)
            .take_while(|&q| {
                self.write(0x030, q);
                self.read(0x034) > 0
            })
            .count()
    }

    /// A buffer of `len` bytes (filled with `fill`) in guest memory.
    fn buffer(&mut self, len: usize, fill: u8) -> u64 {
        let at = self.heap;
        self.mem.write(at, &vec![fill; len]).unwrap();
        self.heap += (len as u64).div_ceil(64) * 64 + 64;
        at
    }

    /// Puts a chain of (addr, len, flags) on queue `q`'s available ring; returns its head.
    fn submit(&mut self, q: usize, chain: &[(u64, u32, u16)]) -> u16 {
        let r = &mut self.rings[q];
        let head = r.next_desc;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let idx = (head + i as u16) % r.size;
            let next = (idx + 1) % r.size;
            let flags = if i + 1 < chain.len() {
                flags | NEXT
            } else {
                flags
            };
            let d = r.desc + 16 * u64::from(idx);
            self.mem.write_u64(d, addr).unwrap();
            self.mem.write(d + 8, &len.to_le_bytes()).unwrap();
            self.mem.write(d + 12, &flags.to_le_bytes()).unwrap();
            self.mem.write(d + 14, &next.to_le_bytes()).unwrap();
        }
        r.next_desc = (head + chain.len() as u16) % r.size;
        self.publish(q, head);
        head
    }

    /// Makes descriptor `head` available (the raw avail-ring step).
    fn publish(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write(r.avail + 2, &r.avail_idx.to_le_bytes())
            .unwrap();
    }

    /// Used-ring entries (head, len) not seen yet.
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let r = &mut self.rings[q];
        let mut b = [0u8; 2];
        self.mem.read(r.used + 2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        while r.used_seen != idx {
            let e = r.used + 4 + 8 * u64::from(r.used_seen % r.size);
            let mut x = [0u8; 8];
            self.mem.read(e, &mut x).unwrap();
            let id = u32::from_le_bytes(x[..4].try_into().unwrap());
            out.push((id as u16, u32::from_le_bytes(x[4..].try_into().unwrap())));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(addr, &mut v).unwrap();
        v
    }
}

#[test]
fn the_transport_negotiates_and_refuses_what_was_not_offered() {
    let mut r = Rig::new(Rng);
    assert_eq!(r.read(0x000), 0x7472_6976);
    assert_eq!(r.read(0x004), 2);
    assert_eq!(r.read(0x008), 4);
    r.write(0x070, 1 | 2);
    r.write(0x024, 0);
    r.write(0x020, 1 << 5); // a feature rng does not offer
    r.write(0x070, 1 | 2 | 8);
    assert_eq!(
        r.read(0x070) & 8,
        0,
        "FEATURES_OK kept for an unoffered feature"
    );
    // A queue whose rings lie outside guest memory is not readied.
    r.write(0x070, 0);
    r.write(0x070, 1 | 2);
    r.write(0x030, 0);
    r.write(0x038, 8);
    r.write(0x080, 0xffff_f000);
    r.write(0x084, 0x10);
    r.write(0x044, 1);
    assert_eq!(r.read(0x044), 0);
}

#[test]
fn a_driver_may_stop_a_queue_after_driver_ok_and_reads_it_back_stopped() {
    // virtio 1.1 §4.2.2.2: to stop using a queue the driver writes 0 to QueueReady and reads
    // it back until it is 0 (virtio-drivers does this when a device is dropped). A transport
    // that ignores the write after DRIVER_OK leaves the driver spinning on exits forever.
    let mut r = Rig::new(Rng);
    r.setup(8);
    r.write(0x030, 0);
    r.write(0x044, 0);
    assert_eq!(
        r.read(0x044),
        0,
        "QueueReady still reads 1 after the driver stopped it"
    );
    // A stopped queue is not taken from, and may be reconfigured.
    let buf = r.buffer(16, 0);
    r.submit(0, &[(buf, 16, WRITE)]);
    r.boundary();
    assert!(r.used(0).is_empty());
    assert!(r.asked.lock().unwrap().random.is_empty());
    r.write(0x038, 4);
    assert_eq!(r.read(0x044), 0);
}

#[test]
fn a_reset_mid_run_stops_the_device_until_the_driver_sets_it_up_again() {
    let mut r = Rig::new(Rng);
    r.setup(8);
    let buf = r.buffer(32, 0);
    let head = r.submit(0, &[(buf, 32, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 32)]);
    assert_eq!(r.bytes(buf, 32), vec![1 | 0x80; 32]);
    // Reset: status 0. Requests made after it are not taken.
    r.write(0x070, 0);
    assert_eq!(r.read(0x070), 0);
    r.write(0x030, 0);
    assert_eq!(r.read(0x044), 0);
    r.submit(0, &[(buf, 32, WRITE)]);
    r.boundary();
    assert!(r.used(0).is_empty());
    assert_eq!(r.asked.lock().unwrap().random, vec![32]);
    // Set up again (fresh rings, indices from 0): it works as new.
    r.mem.write(0x1000, &[0u8; 0x8000]).unwrap();
    r.setup(8);
    let head = r.submit(0, &[(buf, 8, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 8)]);
}

#[test]
fn ring_indices_wrap_around_u16_and_the_queue_size() {
    // A two-entry queue and more than 65 536 requests: the available and used indices wrap
    // (at the ring size and at u16), requests keep completing in order.
    let mut r = Rig::new(Rng);
    r.setup(2);
    let buf = r.buffer(8, 0);
    for i in 0..70_000u32 {
        let head = r.submit(0, &[(buf, 8, WRITE)]);
        if i % 3 == 0 {
            // Sometimes two requests at one boundary.
            let h2 = r.submit(0, &[(buf, 4, WRITE)]);
            r.boundary();
            assert_eq!(r.used(0), vec![(head, 8), (h2, 4)], "round {i}");
        } else {
            r.boundary();
            assert_eq!(r.used(0), vec![(head, 8)], "round {i}");
        }
    }
    assert!(r.rings[0].avail_idx < 30_000, "the index wrapped");
}

#[test]
fn rng_caps_a_request_and_fills_only_writable_buffers() {
    let mut r = Rig::new(Rng);
    r.setup(8);
    let big = r.buffer(MAX_REQUEST + 100, 0);
    let head = r.submit(0, &[(big, (MAX_REQUEST + 100) as u32, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, MAX_REQUEST as u32)]);
    assert_eq!(r.bytes(big + MAX_REQUEST as u64, 100), vec![0; 100]);
    let ro = r.buffer(64, 0x55);
    let head = r.submit(0, &[(ro, 64, 0)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 0)]);
    assert_eq!(
        r.bytes(ro, 64),
        vec![0x55; 64],
        "a read-only buffer was written"
    );
    // A buffer outside guest memory: the request completes with nothing written.
    let head = r.submit(0, &[(0xffff_0000_0000, 64, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 0)]);
}

fn disk(sectors: u64) -> (tempfile::NamedTempFile, Block) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
    std::fs::write(f.path(), &data).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    (f, Block::new(file).unwrap())
}

/// A block request header: type, reserved, sector.
fn blk_header(r: &mut Rig<Block>, kind: u32, sector: u64) -> u64 {
    let h = r.buffer(16, 0);
    r.mem.write(h, &kind.to_le_bytes()).unwrap();
    r.mem.write_u64(h + 8, sector).unwrap();
    h
}

#[test]
fn blk_reads_writes_and_identifies_itself() {
    let (_f, dev) = disk(64);
    let mut r = Rig::new(dev);
    r.setup(16);
    assert_eq!(r.read(0x100), 64, "capacity in sectors");
    // Write two sectors at sector 3, read them back.
    let h = blk_header(&mut r, 1, 3);
    let data = r.buffer(1024, 0xab);
    let st = r.buffer(1, 0xff);
    let head = r.submit(0, &[(h, 16, 0), (data, 1024, 0), (st, 1, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 1)]);
    assert_eq!(r.bytes(st, 1), vec![S_OK]);
    let h = blk_header(&mut r, 0, 3);
    let back = r.buffer(1024, 0);
    let st = r.buffer(1, 0xff);
    let head = r.submit(0, &[(h, 16, 0), (back, 1024, WRITE), (st, 1, WRITE)]);
    r.boundary();
    assert_eq!(r.used(0), vec![(head, 1025)]);
    assert_eq!(r.bytes(back, 1024), vec![0xab; 1024]);
    let hash = u64::from_le_bytes(
        blake3::hash(&[0xab; 1024]).as_bytes()[..8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(r.asked.lock().unwrap().disk, vec![(S_OK, 0), (S_OK, hash)]);
    // GET_ID, and a type the device does not know.
    let h = blk_header(&mut r, 8, 0);
    let id = r.buffer(20, 0);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (id, 20, WRITE), (st, 1, WRITE)]);
    let h = blk_header(&mut r, 77, 0);
    let st2 = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (st2, 1, WRITE)]);
    r.boundary();
    assert_eq!(&r.bytes(id, 9), b"ftvm-disk");
    assert_eq!(r.bytes(st, 1), vec![S_OK]);
    assert_eq!(r.bytes(st2, 1), vec![S_UNSUPP]);
}

#[test]
fn blk_fails_malformed_chains_and_keeps_serving() {
    let (f, dev) = disk(64);
    let before = std::fs::read(f.path()).unwrap();
    let mut r = Rig::new(dev);
    r.setup(32);
    let ok_status = |r: &mut Rig<Block>| -> (u64, u64) {
        let h = blk_header(r, 0, 0);
        let d = r.buffer(512, 0);
        let st = r.buffer(1, 0xff);
        r.submit(0, &[(h, 16, 0), (d, 512, WRITE), (st, 1, WRITE)]);
        (d, st)
    };
    let mut statuses = Vec::new();
    // 1. Header only: no status descriptor.
    let h = blk_header(&mut r, 0, 0);
    r.submit(0, &[(h, 16, 0)]);
    // 2. A header the device would have to write (write-only) and too short.
    let h = blk_header(&mut r, 0, 0);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 8, WRITE), (st, 1, WRITE)]);
    statuses.push(st);
    // 3. A read past the end of the disk.
    let h = blk_header(&mut r, 0, 63);
    let d = r.buffer(1024, 0);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (d, 1024, WRITE), (st, 1, WRITE)]);
    statuses.push(st);
    // 4. A write whose data lies outside guest memory.
    let h = blk_header(&mut r, 1, 0);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (0xffff_0000_0000, 512, 0), (st, 1, WRITE)]);
    statuses.push(st);
    // 5. A read into a read-only buffer, not a multiple of the sector size.
    let h = blk_header(&mut r, 0, 0);
    let d = r.buffer(100, 0x11);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (d, 100, 0), (st, 1, WRITE)]);
    statuses.push(st);
    // 6. A header outside guest memory.
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(0xffff_0000_0000, 16, 0), (st, 1, WRITE)]);
    statuses.push(st);
    // And a good request after all of them.
    let (good, good_st) = ok_status(&mut r);
    r.boundary();
    assert_eq!(
        r.used(0).len(),
        7,
        "every request completes, well-formed or not"
    );
    for st in statuses {
        assert_eq!(r.bytes(st, 1), vec![S_IOERR]);
    }
    assert_eq!(r.bytes(good_st, 1), vec![S_OK]);
    assert_eq!(r.bytes(good, 4), before[..4].to_vec());
    let disk = r.asked.lock().unwrap().disk.clone();
    assert_eq!(disk.len(), 7);
    assert!(disk[..6].iter().all(|&(s, _)| s == S_IOERR), "{disk:?}");
    assert_eq!(
        std::fs::read(f.path()).unwrap(),
        before,
        "a malformed write changed the disk"
    );
}

#[test]
fn a_descriptor_loop_or_a_head_beyond_the_table_fails_that_request_only() {
    let (_f, dev) = disk(8);
    let mut r = Rig::new(dev);
    r.setup(8);
    // Descriptor 0 chains to itself forever.
    let h = blk_header(&mut r, 0, 0);
    let d = r.rings[0].desc;
    r.mem.write_u64(d, h).unwrap();
    r.mem.write(d + 8, &16u32.to_le_bytes()).unwrap();
    r.mem.write(d + 12, &NEXT.to_le_bytes()).unwrap();
    r.mem.write(d + 14, &0u16.to_le_bytes()).unwrap();
    r.rings[0].next_desc = 1;
    r.publish(0, 0);
    // A head index beyond the table.
    r.publish(0, 200);
    r.boundary();
    // Then a good request is still served.
    let h = blk_header(&mut r, 0, 0);
    let data = r.buffer(512, 0);
    let st = r.buffer(1, 0xff);
    r.submit(0, &[(h, 16, 0), (data, 512, WRITE), (st, 1, WRITE)]);
    r.boundary();
    r.boundary();
    assert_eq!(r.bytes(st, 1), vec![S_OK], "the device stopped serving");
}

#[test]
fn net_transmits_frames_ignores_short_ones_and_receives_only_into_room() {
    let sent = Sent::default();
    let mut r = Rig::new(Net::new([2, 0, 0, 0, 0, 1], Box::new(sent.clone())));
    r.setup(8);
    assert_eq!(r.read(0x100) & 0xff, 2, "MAC in the config space");
    // TX (queue 1): a frame, and one shorter than its header.
    let f = r.buffer(HDR_LEN + 60, 0x42);
    let short = r.buffer(4, 0x43);
    let a = r.submit(1, &[(f, (HDR_LEN + 60) as u32, 0)]);
    let b = r.submit(1, &[(short, 4, 0)]);
    r.boundary();
    assert_eq!(r.used(1), vec![(a, 0), (b, 0)]);
    assert_eq!(*sent.0.lock().unwrap(), vec![vec![0x42; 60]]);
    assert_eq!(
        *sent.1.lock().unwrap(),
        vec![1],
        "one flush after the boundary's frames"
    );
    // RX (queue 0): no buffers, no room, no frames asked for.
    r.asked
        .lock()
        .unwrap()
        .frames
        .extend([vec![1u8; 100], vec![2u8; 3000], vec![3u8; 50]]);
    assert_eq!(r.rx_room(), 0);
    r.boundary();
    assert!(r.asked.lock().unwrap().rx_rooms.is_empty());
    // Two 1 KiB buffers: the 3000-byte frame does not fit and is dropped; the buffer it was
    // offered takes the next frame.
    let b1 = r.buffer(1024, 0);
    let b2 = r.buffer(1024, 0);
    let h1 = r.submit(0, &[(b1, 1024, WRITE)]);
    let h2 = r.submit(0, &[(b2, 1024, WRITE)]);
    assert_eq!(r.rx_room(), 2);
    r.boundary();
    assert_eq!(r.asked.lock().unwrap().rx_rooms, vec![2]);
    assert_eq!(r.used(0), vec![(h1, (HDR_LEN + 100) as u32)]);
    assert_eq!(r.bytes(b1 + HDR_LEN as u64, 100), vec![1u8; 100]);
    assert_eq!(r.rx_room(), 1);
    r.boundary();
    assert_eq!(r.used(0), vec![(h2, (HDR_LEN + 50) as u32)]);
    assert_eq!(r.bytes(b2 + HDR_LEN as u64, 50), vec![3u8; 50]);
    assert!(r.asked.lock().unwrap().frames.is_empty());
    assert_eq!(
        *sent.1.lock().unwrap(),
        vec![1],
        "no flush at boundaries that sent nothing"
    );
}

#[test]
fn net_flushes_its_sink_once_per_boundary_that_transmitted() {
    let sent = Sent::default();
    let mut r = Rig::new(Net::new([2, 0, 0, 0, 0, 1], Box::new(sent.clone())));
    r.setup(8);
    // Three frames in one boundary: one flush, after all three.
    for byte in [1u8, 2, 3] {
        let f = r.buffer(HDR_LEN + 60, byte);
        r.submit(1, &[(f, (HDR_LEN + 60) as u32, 0)]);
    }
    r.boundary();
    assert_eq!(*sent.1.lock().unwrap(), vec![3]);
    // Only a frame shorter than its header: nothing sent, nothing flushed.
    let short = r.buffer(4, 9);
    r.submit(1, &[(short, 4, 0)]);
    r.boundary();
    assert_eq!(*sent.1.lock().unwrap(), vec![3]);
    // The next frame: a flush of its own.
    let f = r.buffer(HDR_LEN + 60, 4);
    r.submit(1, &[(f, (HDR_LEN + 60) as u32, 0)]);
    r.boundary();
    assert_eq!(*sent.1.lock().unwrap(), vec![3, 4]);
    let order: Vec<u8> = sent.0.lock().unwrap().iter().map(|f| f[0]).collect();
    assert_eq!(
        order,
        vec![1, 2, 3, 4],
        "frames in the order the guest sent them"
    );
}
