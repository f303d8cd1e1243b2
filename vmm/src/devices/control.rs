//! The ftvm control device: console, clock, WAIT and POLL doorbells, entropy and exit.
//! Register map: [`ftvm_abi::control`]. Every access is an epoch boundary.
//!
//! A guest may write anything anywhere: unknown registers read as zero and ignore writes,
//! console lengths are clamped to the buffer, and nothing a guest writes can make the VMM
//! fail. Misuse is logged, at most a few lines per second.

use ftvm_abi::{control as reg, layout, shared};

use super::ratelimit::RateLimit;
use crate::bus::MmioDevice;
use crate::epoch::{BoundaryCx, ClockValue, MachineRequest};
use crate::error::VmmError;
use crate::state::{DeviceKind, StateError};

/// The control device.
pub struct ControlDevice {
    warnings: RateLimit,
    /// The last clock value handed to the guest (its only state outside guest memory).
    last_clock: ClockValue,
}

impl Default for ControlDevice {
    fn default() -> Self {
        Self::new()
    }
}

fn value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes the clock into the shared page, where the guest reads it without an exit.
fn publish_clock(cx: &BoundaryCx<'_>, c: ClockValue) -> Result<(), VmmError> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&c.mono_ns.to_le_bytes());
    b[8..].copy_from_slice(&c.wall_ns.to_le_bytes());
    cx.mem.write(layout::SHARED_PAGE_ADDR + shared::MONO_NS, &b)
}

impl ControlDevice {
    /// A new control device.
    pub fn new() -> Self {
        ControlDevice {
            warnings: RateLimit::default(),
            last_clock: ClockValue::default(),
        }
    }

    fn misuse(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warnings.allow("control device") {
            tracing::warn!("control device: guest {what}");
        }
    }
}

impl MmioDevice for ControlDevice {
    fn name(&self) -> &'static str {
        "control"
    }

    fn read(
        &mut self,
        offset: u64,
        data: &mut [u8],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        if data.len() != 8 && !matches!(offset, reg::MAGIC | reg::VERSION) {
            self.misuse(format_args!(
                "read {} bytes at {offset:#x} (registers are 8 bytes)",
                data.len()
            ));
        }
        let v = match offset {
            reg::MAGIC => reg::MAGIC_VALUE,
            reg::VERSION => reg::VERSION_VALUE,
            reg::CLOCK_MONO | reg::CLOCK_WALL => {
                let c = cx.inputs.clock(cx.boundary)?;
                publish_clock(cx, c)?;
                self.last_clock = c;
                if offset == reg::CLOCK_MONO {
                    c.mono_ns
                } else {
                    c.wall_ns
                }
            }
            reg::ENTROPY => cx.inputs.entropy(cx.boundary)?,
            _ => {
                self.misuse(format_args!("read unknown register {offset:#x}"));
                0
            }
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        let v = value(data);
        match offset {
            reg::CONSOLE => {
                let len = if v > shared::CONSOLE_BUF_LEN {
                    self.misuse(format_args!(
                        "printed {v} bytes (buffer holds {})",
                        shared::CONSOLE_BUF_LEN
                    ));
                    shared::CONSOLE_BUF_LEN
                } else {
                    v
                };
                let mut buf = vec![0u8; len as usize];
                cx.mem
                    .read(layout::SHARED_PAGE_ADDR + shared::CONSOLE_BUF, &mut buf)?;
                cx.console.write(&buf);
            }
            reg::WAIT => {
                let c = cx.inputs.wait(cx.boundary, v, cx.rx_room)?;
                publish_clock(cx, c)?;
                self.last_clock = c;
                cx.doorbell = true;
            }
            reg::POLL => {
                let c = cx.inputs.clock(cx.boundary)?;
                publish_clock(cx, c)?;
                self.last_clock = c;
                cx.doorbell = true;
            }
            reg::EXIT => *cx.request = Some(MachineRequest::Exit(v)),
            _ => self.misuse(format_args!(
                "wrote {v:#x} to read-only or unknown register {offset:#x}"
            )),
        }
        Ok(())
    }

    fn save_state(&self) -> Option<DeviceKind> {
        Some(DeviceKind::Control {
            last_clock: self.last_clock,
        })
    }

    fn restore_state(&mut self, state: &DeviceKind) -> Result<(), StateError> {
        match state {
            DeviceKind::Control { last_clock } => {
                self.last_clock = *last_clock;
                Ok(())
            }
            other => Err(StateError::Mismatch(format!(
                "the state holds {other:?}, not a control device"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::testing::TestBoundary;

    fn rd(dev: &mut ControlDevice, t: &mut TestBoundary, off: u64) -> u64 {
        let mut d = [0u8; 8];
        dev.read(off, &mut d, &mut t.cx()).unwrap();
        u64::from_le_bytes(d)
    }
    fn wr(dev: &mut ControlDevice, t: &mut TestBoundary, off: u64, v: u64) {
        dev.write(off, &v.to_le_bytes(), &mut t.cx()).unwrap();
    }
    fn shared_clock(t: &TestBoundary) -> (u64, u64) {
        let a = layout::SHARED_PAGE_ADDR;
        (t.mem.read_u64(a).unwrap(), t.mem.read_u64(a + 8).unwrap())
    }

    #[test]
    fn identity_registers() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        assert_eq!(rd(&mut d, &mut t, reg::MAGIC), reg::MAGIC_VALUE);
        assert_eq!(rd(&mut d, &mut t, reg::VERSION), reg::VERSION_VALUE);
    }

    #[test]
    fn clock_reads_publish_to_the_shared_page() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        let m1 = rd(&mut d, &mut t, reg::CLOCK_MONO);
        assert_eq!(shared_clock(&t).0, m1);
        let w = rd(&mut d, &mut t, reg::CLOCK_WALL);
        assert_eq!(shared_clock(&t), (m1 + 1000, w));
        wr(&mut d, &mut t, reg::POLL, 0);
        assert_eq!(shared_clock(&t).0, m1 + 2000);
    }

    #[test]
    fn wait_passes_the_deadline_and_publishes_the_wake_time() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        wr(&mut d, &mut t, reg::WAIT, 5_000_000);
        assert_eq!(t.inputs.waits, vec![5_000_000]);
        assert_eq!(shared_clock(&t).0, 5_000_000);
    }

    #[test]
    fn console_prints_the_staged_bytes() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        t.mem
            .write(
                layout::SHARED_PAGE_ADDR + shared::CONSOLE_BUF,
                b"hello\nworld",
            )
            .unwrap();
        wr(&mut d, &mut t, reg::CONSOLE, 6);
        assert_eq!(t.console.0, b"hello\n");
        // An oversized length is clamped to the buffer.
        wr(&mut d, &mut t, reg::CONSOLE, u64::MAX);
        assert_eq!(t.console.0.len(), 6 + shared::CONSOLE_BUF_LEN as usize);
    }

    #[test]
    fn exit_requests_the_status() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        wr(&mut d, &mut t, reg::EXIT, 42);
        assert_eq!(t.request, Some(MachineRequest::Exit(42)));
    }

    #[test]
    fn garbage_everywhere_is_harmless() {
        let (mut d, mut t) = (ControlDevice::new(), TestBoundary::new());
        let mut x = 0x1234_5678_9abc_def1u64;
        for off in 0..0x1000u64 {
            for len in [1usize, 2, 4, 8] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut buf = [0u8; 8];
                d.read(off, &mut buf[..len], &mut t.cx()).unwrap();
                if off != reg::EXIT && off != reg::WAIT {
                    d.write(off, &x.to_le_bytes()[..len], &mut t.cx()).unwrap();
                }
            }
        }
        assert_eq!(t.request, None);
    }
}
