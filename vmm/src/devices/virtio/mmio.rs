//! The virtio-mmio transport (version 2, "modern"): the register window through which the
//! guest's driver discovers a device, negotiates features and sets up queues.

use virtio_queue::{Queue, QueueT};

use super::VirtioDevice;
use crate::bus::MmioDevice;
use crate::devices::ratelimit::RateLimit;
use crate::epoch::BoundaryCx;
use crate::error::VmmError;
use crate::kvm::memory::GuestMemory;
use crate::state::{DeviceKind, StateError, VirtioState, CONFIG_ID_BYTES};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4654_564d; // "FTVM"
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;

/// A virtio device on the MMIO bus.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    warnings: RateLimit,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Wraps `device`.
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n).expect("queue sizes are powers of two"))
            .collect();
        VirtioMmio {
            device,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            warnings: RateLimit::default(),
        }
    }

    fn active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    /// The first bytes of the configuration space, which identify the device (MAC, capacity).
    fn config_id(&self) -> [u8; CONFIG_ID_BYTES] {
        let mut c = [0u8; CONFIG_ID_BYTES];
        self.device.read_config(0, &mut c);
        c
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn misuse(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warnings.allow(self.device.name()) {
            tracing::warn!("virtio-{}: guest {what}", self.device.name());
        }
    }
}

impl<D: VirtioDevice> MmioDevice for VirtioMmio<D> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn read(
        &mut self,
        offset: u64,
        data: &mut [u8],
        _cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return Ok(());
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |q| u32::from(q.max_size())),
            0x044 => q.map_or(0, |q| u32::from(q.ready())),
            0x060 => 0, // no interrupts: the guest polls its used rings
            0x070 => self.status,
            0x0fc => 0,
            _ => {
                self.misuse(format_args!("read unknown register {offset:#x}"));
                0
            }
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
        data[n..].fill(0);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let setup = self.status & STATUS_DRIVER_OK == 0;
        // A queue the driver stopped using (QueueReady = 0, virtio 1.1 §4.2.2.2) may be
        // reconfigured even after DRIVER_OK; it is not taken from again.
        let queue_off = self
            .queues
            .get(self.queue_sel as usize)
            .is_some_and(|q| !q.ready());
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if setup => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if setup || queue_off => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            // Stopping a queue is allowed at any time (the driver then reads 0 back).
            0x044 if !setup && v == 0 => {
                if let Some(q) = self.queue() {
                    q.set_ready(false);
                }
            }
            0x044 if setup => {
                let mem = cx.mem;
                let mut bad = false;
                if let Some(q) = self.queue() {
                    q.set_event_idx(false);
                    q.set_ready(v == 1);
                    if v == 1 {
                        if q.is_valid(mem.mmap()) {
                            // Suppress per-request notify exits: requests are taken at every
                            // boundary anyway (DESIGN §4).
                            let _ = q.disable_notification(mem.mmap());
                        } else {
                            q.set_ready(false);
                            bad = true;
                        }
                    }
                }
                if bad {
                    let sel = self.queue_sel;
                    self.misuse(format_args!("readied queue {sel} with an invalid layout"));
                }
            }
            0x050 | 0x064 => {} // notify: requests are taken at every boundary; no interrupts
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    let mut v = v;
                    if v & STATUS_FEATURES_OK != 0
                        && self.driver_features & !self.device.features() != 0
                    {
                        self.misuse(format_args!("accepted features it was not offered"));
                        v &= !STATUS_FEATURES_OK;
                    }
                    self.status = v;
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup || queue_off => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(low, high),
                        0x090 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => self.misuse(format_args!(
                "wrote {v:#x} to {offset:#x} (read-only, unknown, or after DRIVER_OK)"
            )),
        }
        Ok(())
    }

    fn take_requests(&mut self, cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        if self.active() {
            self.device.take_requests(&mut self.queues, cx)?;
        }
        Ok(())
    }

    fn apply_events(&mut self, cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        if self.active() {
            self.device.apply_events(&mut self.queues, cx)?;
        }
        Ok(())
    }

    fn rx_room(&self, mem: &GuestMemory) -> usize {
        if self.active() {
            self.device.rx_room(&self.queues, mem)
        } else {
            0
        }
    }

    fn save_state(&self) -> Option<DeviceKind> {
        Some(DeviceKind::Virtio(VirtioState {
            device_type: self.device.device_type(),
            device_features: self.device.features(),
            config: self.config_id(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(Queue::state).collect(),
        }))
    }

    fn restore_state(&mut self, state: &DeviceKind) -> Result<(), StateError> {
        let DeviceKind::Virtio(v) = state else {
            return Err(StateError::Mismatch(format!(
                "the state holds {state:?}, not a virtio device"
            )));
        };
        let mine = (
            self.device.device_type(),
            self.device.features(),
            self.config_id(),
        );
        if (v.device_type, v.device_features, v.config) != mine {
            return Err(StateError::Mismatch(format!(
                "saved from virtio type {} (features {:#x}, config {:02x?}), this is type {} (features {:#x}, config {:02x?})",
                v.device_type, v.device_features, v.config, mine.0, mine.1, mine.2
            )));
        }
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size()).collect();
        let saved: Vec<u16> = v.queues.iter().map(|q| q.max_size).collect();
        if max != saved {
            return Err(StateError::Mismatch(format!(
                "queue maximum sizes {saved:?} saved, {max:?} here"
            )));
        }
        let queues = v
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(*q).map_err(|e| StateError::Mismatch(format!("queue {i}: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.status = v.status;
        self.device_features_sel = v.device_features_sel;
        self.driver_features_sel = v.driver_features_sel;
        self.driver_features = v.driver_features;
        self.queue_sel = v.queue_sel;
        Ok(())
    }
}
