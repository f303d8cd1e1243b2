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
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(CHUNK);
            let chunk = &mut buf[done..done + n];
            let block = (offset as usize + done) / SECTOR_SIZE;
            let mut req = BlkReq::default();
            let mut resp = BlkResp::default();
            // SAFETY: `req`, `chunk` and `resp` stay untouched until the request completes
            // below, and are passed again unchanged to complete it.
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
            if resp.status() != RespStatus::OK {
                return Err(DiskError::Status(resp.status()));
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (both sector-aligned); returns once it is on the disk (the
    /// device is write-through).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check(offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(CHUNK);
            let chunk = &data[done..done + n];
            let block = (offset as usize + done) / SECTOR_SIZE;
            let mut req = BlkReq::default();
            let mut resp = BlkResp::default();
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
            if resp.status() != RespStatus::OK {
                return Err(DiskError::Status(resp.status()));
            }
            done += n;
        }
        Ok(())
    }
}
