//! The disk: a virtio-blk device used through its non-blocking calls, waiting for each
//! completion with POLL exits (the VMM completes a request at the exit where it takes it).

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
}

/// The guest's disk.
pub struct Disk {
    blk: VirtIOBlk<GuestHal, Mmio>,
}

impl Disk {
    /// Wraps the probed block device.
    pub fn new(blk: VirtIOBlk<GuestHal, Mmio>) -> Self {
        Disk { blk }
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
