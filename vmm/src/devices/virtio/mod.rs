//! virtio devices over the MMIO transport: the transport ([`mmio`]), and net, block and rng
//! devices. Queues are rust-vmm's `virtio-queue` split rings, which bound-check descriptor
//! chains; every address in a chain is checked again against guest memory when used. A bad
//! chain fails that request, never the VMM.
//!
//! In the epoch model the devices never interrupt: requests are taken at boundaries (step 1),
//! and completions and received frames are written into guest memory at boundaries; the guest
//! finds them in the used rings at its next look. The VMM sets each used ring's NO_NOTIFY flag
//! when the driver readies the queue, so the guest does not exit per request.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod rng;

#[cfg(test)]
mod tests;

use virtio_queue::{Queue, QueueT};

use crate::epoch::BoundaryCx;
use crate::error::VmmError;
use crate::kvm::memory::GuestMemory;

/// The VIRTIO_F_VERSION_1 feature bit.
pub const F_VERSION_1: u64 = 1 << 32;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (otherwise it reads it).
    pub write: bool,
}

/// A request popped from a queue: its head index and its buffers.
pub struct Request {
    /// Head descriptor index (to return it in the used ring).
    pub head: u16,
    /// The chain's buffers, in order.
    pub segments: Vec<Segment>,
}

/// Pops the next available request, if any. An available-ring entry naming a descriptor
/// beyond the table is skipped: it cannot be returned in the used ring (the guest only broke
/// its own queue), and it must not fail the VMM.
pub fn pop_request(queue: &mut Queue, mem: &GuestMemory) -> Option<Request> {
    let chain = loop {
        let chain = queue.pop_descriptor_chain(mem.mmap())?;
        if chain.head_index() < queue.size() {
            break chain;
        }
    };
    let head = chain.head_index();
    let segments = chain
        .map(|d| Segment {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        })
        .collect();
    Some(Request { head, segments })
}

/// Reads `data.len()` bytes of a device's configuration space at `offset`, where the space is
/// `cfg` followed by zeros.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| cfg.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Puts a finished request in the used ring with `len` bytes written.
pub fn complete(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> Result<(), VmmError> {
    queue
        .add_used(mem.mmap(), head, len)
        .map_err(|e| crate::kvm::memory::MemoryError::UsedRing(e).into())
}

/// Requests available in `queue` and not yet taken.
pub fn available(queue: &Queue, mem: &GuestMemory) -> usize {
    if !queue.ready() {
        return 0;
    }
    match queue.avail_idx(mem.mmap(), std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => usize::from((idx - std::num::Wrapping(queue.next_avail())).0)
            .min(usize::from(queue.size())),
        Err(_) => 0,
    }
}

/// A device model behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The virtio device type (1 net, 2 block, 4 rng).
    fn device_type(&self) -> u32;
    /// The feature bits offered.
    fn features(&self) -> u64;
    /// Maximum size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Step 1: takes new requests from the queues (the device is active).
    fn take_requests(
        &mut self,
        queues: &mut [Queue],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError>;
    /// Step 2 at WAIT/POLL: applies pending events.
    fn apply_events(
        &mut self,
        _queues: &mut [Queue],
        _cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        Ok(())
    }
    /// Frames the guest could receive now.
    fn rx_room(&self, _queues: &[Queue], _mem: &GuestMemory) -> usize {
        0
    }
}

/// Copies `data` into the writable segments, in order; returns the bytes written.
pub fn write_segments(mem: &GuestMemory, segs: &[Segment], data: &[u8]) -> Result<usize, VmmError> {
    let mut off = 0;
    for s in segs.iter().filter(|s| s.write) {
        if off == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - off);
        mem.write(s.addr, &data[off..off + n])?;
        off += n;
    }
    Ok(off)
}

/// Reads the readable segments, in order, up to `limit` bytes (longer chains are an error).
pub fn read_segments(mem: &GuestMemory, segs: &[Segment], limit: usize) -> Result<Vec<u8>, String> {
    let total: usize = segs
        .iter()
        .filter(|s| !s.write)
        .map(|s| s.len as usize)
        .sum();
    if total > limit {
        return Err(format!("{total} bytes of request data (limit {limit})"));
    }
    let mut out = vec![0u8; total];
    let mut off = 0;
    for s in segs.iter().filter(|s| !s.write) {
        mem.read(s.addr, &mut out[off..off + s.len as usize])
            .map_err(|e| e.to_string())?;
        off += s.len as usize;
    }
    Ok(out)
}
