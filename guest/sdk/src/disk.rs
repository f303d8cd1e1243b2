//! The disk: a virtio-blk device used through its non-blocking calls, waiting for each
//! completion with POLL exits (the VMM completes a request at the exit where it takes it).
//!
//! A write can also be left in flight ([`Disk::start_write`]): the device takes it at the
//! guest's next exit, whichever it is, and [`Disk::write_done`] then reports it. A guest that
//! has other work for that exit (frames to transmit, say) saves the exit a waiting write
//! costs.

use alloc::boxed::Box;
use alloc::vec::Vec;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};

use crate::virtio::{GuestHal, Mmio};

/// Largest single request (bigger transfers are split).
const CHUNK: usize = 1 << 20;

/// A disk error.
#[derive(Debug)]
pub enum DiskError {
    /// The offset or length is not sector-aligned, or lies beyond the disk.
    Range,
    /// The driver refused the request.
    Driver(virtio_drivers::Error),
    /// The device reported a failure.
    Status(RespStatus),
    /// A started write is still in flight: one request at a time.
    Busy,
}

/// A write left in flight: the request, its data and its status stay here, at fixed heap
/// addresses, until the device has completed it.
struct PendingWrite {
    token: u16,
    req: BlkReq,
    resp: BlkResp,
    data: Vec<u8>,
}

/// The guest's disk.
pub struct Disk {
    blk: VirtIOBlk<GuestHal, Mmio>,
    pending: Option<Box<PendingWrite>>,
}

impl Disk {
    /// Wraps the probed block device.
    pub fn new(blk: VirtIOBlk<GuestHal, Mmio>) -> Self {
        Disk { blk, pending: None }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blk.capacity() * SECTOR_SIZE as u64
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let aligned = offset.is_multiple_of(SECTOR_SIZE as u64) && len.is_multiple_of(SECTOR_SIZE);
        if !aligned || offset + len as u64 > self.capacity() {
            return Err(DiskError::Range);
        }
        Ok(())
    }

    fn wait(&mut self, token: u16) {
        while self.blk.peek_used() != Some(token) {
            crate::control::poll();
        }
    }

    /// Reads `buf.len()` bytes at `offset` (both sector-aligned).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.idle()?;
        self.check(offset, buf.len())?;
        for (block, range) in chunks(offset, buf.len()) {
            let chunk = &mut buf[range];
            let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
            // SAFETY: `req`, `chunk` and `resp` stay untouched until the request completes,
            // and are passed again unchanged to complete it.
            unsafe {
                let token = self
                    .blk
                    .read_blocks_nb(block, &mut req, chunk, &mut resp)
                    .map_err(DiskError::Driver)?;
                self.wait(token);
                self.blk
                    .complete_read_blocks(token, &req, chunk, &mut resp)
                    .map_err(DiskError::Driver)?;
            }
            ok(&resp)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (both sector-aligned); returns once it is on the disk (the
    /// device is write-through).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.idle()?;
        self.check(offset, data.len())?;
        for (block, range) in chunks(offset, data.len()) {
            let chunk = &data[range];
            let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
            // SAFETY: as in `read`.
            unsafe {
                let token = self
                    .blk
                    .write_blocks_nb(block, &mut req, chunk, &mut resp)
                    .map_err(DiskError::Driver)?;
                self.wait(token);
                self.blk
                    .complete_write_blocks(token, &req, chunk, &mut resp)
                    .map_err(DiskError::Driver)?;
            }
            ok(&resp)?;
        }
        Ok(())
    }
}

impl Disk {
    fn idle(&self) -> Result<(), DiskError> {
        match self.pending {
            Some(_) => Err(DiskError::Busy),
            None => Ok(()),
        }
    }

    /// Starts writing `data` at `offset` (both sector-aligned) without waiting for it:
    /// `Ok(false)` while it is in flight — the device takes it at the next exit, and
    /// [`write_done`](Self::write_done) reports it after that — or `Ok(true)` if it is on the
    /// disk already (a write larger than one request is done at once, as by
    /// [`write`](Self::write)). One write at a time: [`DiskError::Busy`] while one is in flight.
    pub fn start_write(&mut self, offset: u64, data: Vec<u8>) -> Result<bool, DiskError> {
        self.idle()?;
        self.check(offset, data.len())?;
        if data.len() > CHUNK || data.is_empty() {
            return self.write(offset, &data).map(|()| true);
        }
        let mut p = Box::new(PendingWrite {
            token: 0,
            req: BlkReq::default(),
            resp: BlkResp::default(),
            data,
        });
        let block = offset as usize / SECTOR_SIZE;
        let w = &mut *p;
        // SAFETY: `req`, `data` and `resp` live in the box, which is kept (and not touched)
        // in `self.pending` until `write_done` completes the request with the same three.
        w.token = unsafe {
            self.blk
                .write_blocks_nb(block, &mut w.req, &w.data, &mut w.resp)
                .map_err(DiskError::Driver)?
        };
        self.pending = Some(p);
        Ok(false)
    }

    /// The write [`start_write`](Self::start_write) left in flight: `None` while the device
    /// has not completed it (or none is in flight), else its result.
    pub fn write_done(&mut self) -> Option<Result<(), DiskError>> {
        let token = self.pending.as_ref()?.token;
        if self.blk.peek_used() != Some(token) {
            return None;
        }
        let mut p = self.pending.take()?;
        let w = &mut *p;
        // SAFETY: the same request, buffers and status the write was started with, untouched
        // since; the device has completed it.
        let r = unsafe {
            self.blk
                .complete_write_blocks(w.token, &w.req, &w.data, &mut w.resp)
        };
        Some(r.map_err(DiskError::Driver).and_then(|()| ok(&w.resp)))
    }
}

/// Splits `[offset, offset+len)` into requests of at most [`CHUNK`] bytes: (first block,
/// byte range within the caller's buffer).
fn chunks(offset: u64, len: usize) -> impl Iterator<Item = (usize, core::ops::Range<usize>)> {
    (0..len).step_by(CHUNK).map(move |done| {
        let end = (done + CHUNK).min(len);
        ((offset as usize + done) / SECTOR_SIZE, done..end)
    })
}

fn ok(resp: &BlkResp) -> Result<(), DiskError> {
    match resp.status() {
        RespStatus::OK => Ok(()),
        s => Err(DiskError::Status(s)),
    }
}
