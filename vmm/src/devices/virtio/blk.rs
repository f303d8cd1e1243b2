//! virtio-blk on a raw image file.
//!
//! Every request is taken at a boundary and completed at the same boundary, against this
//! host's own disk: write data is copied out of guest memory first (a bounce buffer), read data
//! is read into a private buffer and copied into guest memory only then. Writes are
//! write-through (the device offers no FLUSH: a write completes after `fdatasync`), so an
//! acknowledged write is on the disk. Each completion goes to the input source as
//! `disk_done(status, blake3 of the data read)`: the primary logs it, the backup — which does
//! the same I/O on its own disk — checks it (a difference is disk divergence).

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::Queue;

use super::{complete, pop_request, read_segments, Segment, VirtioDevice, F_VERSION_1};
use crate::devices::ratelimit::RateLimit;
use crate::epoch::BoundaryCx;
use crate::error::VmmError;

/// Sector size.
pub const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error (also for malformed requests).
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const S_UNSUPP: u8 = 2;
/// Largest data transfer of one request.
pub const MAX_TRANSFER: usize = 4 << 20;
const QUEUE_SIZES: &[u16] = &[256];

/// The block device.
pub struct Block {
    file: File,
    sectors: u64,
    id: [u8; 20],
    warnings: RateLimit,
    writes: Option<std::sync::Arc<crate::join::blocks::BlockWrites>>,
}

impl Block {
    /// A block device on `file` (its length, rounded down to whole sectors, is the capacity).
    pub fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut id = [0u8; 20];
        id[..9].copy_from_slice(b"ftvm-disk");
        Ok(Block {
            file,
            sectors: len / SECTOR,
            id,
            warnings: RateLimit::default(),
            writes: None,
        })
    }

    /// Reports every completed write to `writes` (a join's copy of the disk).
    pub fn with_write_tracking(
        mut self,
        writes: std::sync::Arc<crate::join::blocks::BlockWrites>,
    ) -> Self {
        self.writes = Some(writes);
        self
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn bad(&mut self, why: &str) -> (u8, usize, u64) {
        if self.warnings.allow("virtio-blk") {
            tracing::warn!("virtio-blk: malformed request: {why}");
        }
        (S_IOERR, 0, 0)
    }

    /// Performs one request; returns (status, bytes written into guest data buffers, hash).
    fn execute(&mut self, segs: &[Segment], cx: &BoundaryCx<'_>) -> (u8, usize, u64) {
        let mem = cx.mem;
        let Some((hdr, rest)) = segs.split_first() else {
            return self.bad("empty chain");
        };
        let Some((_status, data)) = rest.split_last() else {
            return self.bad("no status descriptor");
        };
        if hdr.write || hdr.len < 16 {
            return self.bad("header is not a readable 16-byte buffer");
        }
        let mut h = [0u8; 16];
        if mem.read(hdr.addr, &mut h).is_err() {
            return self.bad("header outside guest memory");
        }
        let kind = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let total: usize = data.iter().map(|s| s.len as usize).sum();
        let in_range = |total: usize| {
            (total as u64).is_multiple_of(SECTOR)
                && sector
                    .checked_add(total as u64 / SECTOR)
                    .is_some_and(|end| end <= self.sectors)
        };
        match kind {
            T_IN => {
                if data.iter().any(|s| !s.write) || total > MAX_TRANSFER || !in_range(total) {
                    return self.bad("read: buffers not writable, too large, or out of range");
                }
                let mut buf = vec![0u8; total];
                if let Err(e) = self.file.read_exact_at(&mut buf, sector * SECTOR) {
                    tracing::error!("virtio-blk: read of sector {sector}: {e}");
                    return (S_IOERR, 0, 0);
                }
                let hash =
                    u64::from_le_bytes(blake3::hash(&buf).as_bytes()[..8].try_into().expect("8"));
                match super::write_segments(mem, data, &buf) {
                    Ok(n) => (S_OK, n, hash),
                    Err(_) => self.bad("read buffer outside guest memory"),
                }
            }
            T_OUT => {
                if data.iter().any(|s| s.write) || !in_range(total) {
                    return self.bad("write: buffers not readable or out of range");
                }
                let buf = match read_segments(mem, data, MAX_TRANSFER) {
                    Ok(b) => b,
                    Err(e) => return self.bad(&e),
                };
                let r = self
                    .file
                    .write_all_at(&buf, sector * SECTOR)
                    .and_then(|_| self.file.sync_data());
                if let Some(w) = &self.writes {
                    // Marked after the write: a copier that read the block before it sees
                    // the mark in its next round.
                    w.wrote(sector * SECTOR, buf.len() as u64);
                }
                match r {
                    Ok(()) => (S_OK, 0, 0),
                    Err(e) => {
                        tracing::error!("virtio-blk: write of sector {sector}: {e}");
                        (S_IOERR, 0, 0)
                    }
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0, 0),
                Err(_) => (S_IOERR, 0, 0),
            },
            T_GET_ID => {
                let id = self.id;
                match super::write_segments(mem, data, &id) {
                    Ok(n) => (S_OK, n, 0),
                    Err(_) => self.bad("id buffer outside guest memory"),
                }
            }
            _ => (S_UNSUPP, 0, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        "blk"
    }
    fn device_type(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config: capacity (u64, sectors) at 0; everything else reads as zero.
        super::read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn take_requests(
        &mut self,
        queues: &mut [Queue],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let q = &mut queues[0];
        while let Some(req) = pop_request(q, cx.mem) {
            let (status, written, hash) = self.execute(&req.segments, cx);
            if let Some(st) = req.segments.last().filter(|s| s.write && s.len >= 1) {
                // A status buffer outside guest memory: the guest only harms itself.
                let _ = cx.mem.write(st.addr, &[status]);
            }
            complete(q, cx.mem, req.head, written as u32 + 1)?;
            cx.inputs.disk_done(cx.boundary, status, hash)?;
        }
        Ok(())
    }
}
