//! virtio-net on a TAP device.
//!
//! TX frames are taken at every boundary (copied out, completed at once) and handed to a
//! [`FrameSink`]: solo, straight to the TAP; on a primary, held by the Output Rule until the
//! backup has the log; on a backup or in a replay, dropped. RX frames come from the input
//! source at WAIT/POLL boundaries, at most one per available receive buffer.

use virtio_queue::{Queue, QueueOwnedT};

use super::{
    available, complete, pop_request, read_segments, write_segments, VirtioDevice, F_VERSION_1,
};
use crate::devices::ratelimit::RateLimit;
use crate::epoch::{Boundary, BoundaryCx};
use crate::error::VmmError;
use crate::kvm::memory::GuestMemory;

/// The virtio-net header (VERSION_1 layout) that precedes every frame.
pub const HDR_LEN: usize = 12;
const F_MAC: u64 = 1 << 5;
const QUEUE_SIZES: &[u16] = &[256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame accepted from the guest.
pub const MAX_TX_FRAME: usize = 65_536;

/// Where transmitted frames go.
pub trait FrameSink: Send {
    /// A frame the guest transmitted at boundary `b`.
    fn send(&mut self, b: Boundary, frame: &[u8]);
    /// The boundary's last frame was sent: a sink that gathers a boundary's frames hands them
    /// on now (one hand-off per boundary rather than one per frame).
    fn flush(&mut self) {}
}

/// The frames of one boundary, gathered between a sink's `send`s and its `flush`.
#[derive(Debug, Default)]
pub struct FrameBatch {
    boundary: Boundary,
    frames: Vec<Vec<u8>>,
}

impl FrameBatch {
    /// Adds a frame taken at `boundary`.
    pub fn push(&mut self, boundary: Boundary, frame: &[u8]) {
        self.boundary = boundary;
        self.frames.push(frame.to_vec());
    }

    /// The gathered frames and their boundary, if any, leaving the batch empty.
    pub fn take(&mut self) -> Option<(Boundary, Vec<Vec<u8>>)> {
        if self.frames.is_empty() {
            return None;
        }
        Some((self.boundary, std::mem::take(&mut self.frames)))
    }
}

/// Drops every frame (a backup, a replay).
pub struct DropFrames;

impl FrameSink for DropFrames {
    fn send(&mut self, _b: Boundary, _frame: &[u8]) {}
}

/// The network device.
pub struct Net {
    mac: [u8; 6],
    sink: Box<dyn FrameSink>,
    warnings: RateLimit,
}

impl Net {
    /// A NIC with `mac` whose transmitted frames go to `sink`.
    pub fn new(mac: [u8; 6], sink: Box<dyn FrameSink>) -> Self {
        Net {
            mac,
            sink,
            warnings: RateLimit::default(),
        }
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "net"
    }
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config: the MAC at 0; everything else reads as zero.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn take_requests(
        &mut self,
        queues: &mut [Queue],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let q = &mut queues[TX];
        let mut sent = false;
        while let Some(req) = pop_request(q, cx.mem) {
            match read_segments(cx.mem, &req.segments, MAX_TX_FRAME + HDR_LEN) {
                Ok(bytes) if bytes.len() > HDR_LEN => {
                    self.sink.send(cx.boundary, &bytes[HDR_LEN..]);
                    sent = true;
                }
                Ok(_) => {
                    if self.warnings.allow("virtio-net") {
                        tracing::warn!("virtio-net: guest sent a frame shorter than its header");
                    }
                }
                Err(e) => {
                    if self.warnings.allow("virtio-net") {
                        tracing::warn!("virtio-net: malformed transmit request: {e}");
                    }
                }
            }
            complete(q, cx.mem, req.head, 0)?;
        }
        if sent {
            self.sink.flush();
        }
        Ok(())
    }

    fn rx_room(&self, queues: &[Queue], mem: &GuestMemory) -> usize {
        available(&queues[RX], mem)
    }

    fn apply_events(
        &mut self,
        queues: &mut [Queue],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let room = available(&queues[RX], cx.mem);
        if room == 0 {
            return Ok(());
        }
        let frames = cx.inputs.net_rx(cx.boundary, room)?;
        let q = &mut queues[RX];
        for frame in frames {
            let Some(req) = pop_request(q, cx.mem) else {
                break;
            };
            let cap: usize = req
                .segments
                .iter()
                .filter(|s| s.write)
                .map(|s| s.len as usize)
                .sum();
            let mut buf = vec![0u8; HDR_LEN + frame.len()];
            buf[10] = 1; // num_buffers
            buf[HDR_LEN..].copy_from_slice(&frame);
            if cap < buf.len() {
                if self.warnings.allow("virtio-net") {
                    tracing::warn!(
                        "virtio-net: dropped a {}-byte frame: receive buffer holds {cap}",
                        frame.len()
                    );
                }
                q.go_to_previous_position();
                continue;
            }
            let n = write_segments(cx.mem, &req.segments, &buf).unwrap_or(0);
            complete(q, cx.mem, req.head, n as u32)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod batch_tests {
    use super::FrameBatch;

    #[test]
    fn a_batch_hands_over_its_frames_in_order_once() {
        let mut b = FrameBatch::default();
        assert!(b.take().is_none(), "an empty batch hands nothing over");
        b.push(7, &[1]);
        b.push(7, &[2, 2]);
        assert_eq!(b.take(), Some((7, vec![vec![1], vec![2, 2]])));
        assert!(b.take().is_none(), "taken once");
        b.push(9, &[3]);
        assert_eq!(b.take(), Some((9, vec![vec![3]])));
    }
}
