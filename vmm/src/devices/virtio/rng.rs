//! virtio-rng: each request's writable buffers are filled with random bytes from the input
//! source (recorded on the primary, replayed on the backup).

use virtio_queue::Queue;

use super::{complete, pop_request, write_segments, VirtioDevice, F_VERSION_1};
use crate::epoch::BoundaryCx;
use crate::error::VmmError;

/// Most bytes handed out per request.
pub const MAX_REQUEST: usize = 4096;
const QUEUE_SIZES: &[u16] = &[64];

/// The entropy device.
#[derive(Default)]
pub struct Rng;

impl VirtioDevice for Rng {
    fn name(&self) -> &'static str {
        "rng"
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn take_requests(
        &mut self,
        queues: &mut [Queue],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let q = &mut queues[0];
        while let Some(req) = pop_request(q, cx.mem) {
            let want: usize = req
                .segments
                .iter()
                .filter(|s| s.write)
                .map(|s| s.len as usize)
                .sum::<usize>()
                .min(MAX_REQUEST);
            let bytes = cx.inputs.random(cx.boundary, want)?;
            let n = write_segments(cx.mem, &req.segments, &bytes).unwrap_or(0);
            complete(q, cx.mem, req.head, n as u32)?;
        }
        Ok(())
    }
}
