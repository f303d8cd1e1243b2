//! The MMIO bus: devices at non-overlapping guest-physical address ranges, and the device
//! trait through which every guest access reaches them — always at an epoch boundary.

use thiserror::Error;

use crate::epoch::BoundaryCx;
use crate::error::VmmError;
use crate::state::{DeviceKind, DeviceState, StateError};

/// A device reachable over MMIO. Both methods run at an epoch boundary, with the vCPU stopped;
/// `offset` is relative to the device's base. Data comes from an untrusted guest: a device
/// must answer any offset, size and value without panicking.
pub trait MmioDevice: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Fills `data` (1..=8 bytes) with the value of the register at `offset`.
    fn read(
        &mut self,
        offset: u64,
        data: &mut [u8],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError>;
    /// Handles a guest write of `data` (1..=8 bytes) to `offset`.
    fn write(&mut self, offset: u64, data: &[u8], cx: &mut BoundaryCx<'_>) -> Result<(), VmmError>;
    /// Step 1 of every boundary: take the guest's new requests from the device's queues.
    fn take_requests(&mut self, _cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        Ok(())
    }
    /// Step 2 at WAIT/POLL boundaries: apply pending events (received frames).
    fn apply_events(&mut self, _cx: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
        Ok(())
    }
    /// How many received frames the device could deliver to the guest now.
    fn rx_room(&self, _mem: &crate::kvm::memory::GuestMemory) -> usize {
        0
    }
    /// The device's guest-visible state, for saving the VM; `None` if it cannot be saved.
    fn save_state(&self) -> Option<DeviceKind> {
        None
    }
    /// Restores what [`save_state`](Self::save_state) returned (on a device built with the same
    /// configuration), at a boundary, with the vCPU stopped.
    fn restore_state(&mut self, _state: &DeviceKind) -> Result<(), StateError> {
        Err(StateError::Unsupported(format!(
            "device {} has no saved state",
            self.name()
        )))
    }
}

/// Errors configuring or using the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A device's range overlaps one already on the bus.
    #[error("MMIO range {base:#x}+{size:#x} for {name} overlaps {other} at {other_base:#x}+{other_size:#x}")]
    Overlap {
        /// The new device.
        name: &'static str,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
        /// The device already there.
        other: &'static str,
        /// That device's base.
        other_base: u64,
        /// That device's size.
        other_size: u64,
    },
    /// A device with an empty or overflowing range.
    #[error("MMIO range {base:#x}+{size:#x} for {name} is empty or wraps around")]
    BadRange {
        /// The device.
        name: &'static str,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// An access that no device claims.
    #[error("MMIO access to unmapped address {addr:#x}")]
    Unmapped {
        /// The guest-physical address.
        addr: u64,
    },
}

struct Slot {
    base: u64,
    size: u64,
    device: Box<dyn MmioDevice>,
}

/// The MMIO bus.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Slot>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base+size)`; refuses empty ranges and overlaps.
    pub fn insert(
        &mut self,
        base: u64,
        size: u64,
        device: Box<dyn MmioDevice>,
    ) -> Result<(), BusError> {
        let name = device.name();
        if size == 0 || base.checked_add(size).is_none() {
            return Err(BusError::BadRange { name, base, size });
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| base < s.base + s.size && s.base < base + size)
        {
            return Err(BusError::Overlap {
                name,
                base,
                size,
                other: s.device.name(),
                other_base: s.base,
                other_size: s.size,
            });
        }
        let at = self.slots.partition_point(|s| s.base < base);
        self.slots.insert(at, Slot { base, size, device });
        Ok(())
    }

    fn find(&mut self, addr: u64, len: usize) -> Result<(u64, &mut dyn MmioDevice), BusError> {
        let i = self.slots.partition_point(|s| s.base <= addr);
        let slot = i
            .checked_sub(1)
            .map(|i| &mut self.slots[i])
            .filter(|s| (addr - s.base).saturating_add(len as u64) <= s.size)
            .ok_or(BusError::Unmapped { addr })?;
        Ok((addr - slot.base, slot.device.as_mut()))
    }

    /// Dispatches a guest read at `addr`.
    pub fn read(
        &mut self,
        addr: u64,
        data: &mut [u8],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let (offset, dev) = self.find(addr, data.len())?;
        dev.read(offset, data, cx)
    }

    /// Dispatches a guest write at `addr`.
    pub fn write(
        &mut self,
        addr: u64,
        data: &[u8],
        cx: &mut BoundaryCx<'_>,
    ) -> Result<(), VmmError> {
        let (offset, dev) = self.find(addr, data.len())?;
        dev.write(offset, data, cx)
    }

    /// The state of every device, in address order.
    pub fn save_state(&self) -> Result<Vec<DeviceState>, StateError> {
        self.slots
            .iter()
            .map(|s| {
                let kind = s.device.save_state().ok_or_else(|| {
                    StateError::Unsupported(format!(
                        "device {} at {:#x} cannot be saved",
                        s.device.name(),
                        s.base
                    ))
                })?;
                Ok(DeviceState { base: s.base, kind })
            })
            .collect()
    }

    /// Restores every device from `states`, which must name exactly the devices of this bus
    /// (same addresses, same kinds).
    pub fn restore_state(&mut self, states: &[DeviceState]) -> Result<(), StateError> {
        if states.len() != self.slots.len()
            || states
                .iter()
                .zip(&self.slots)
                .any(|(d, s)| d.base != s.base)
        {
            let want: Vec<String> = states.iter().map(|d| format!("{:#x}", d.base)).collect();
            let have: Vec<String> = self
                .slots
                .iter()
                .map(|s| format!("{}@{:#x}", s.device.name(), s.base))
                .collect();
            return Err(StateError::Mismatch(format!(
                "the state has devices at [{}], this machine at [{}]",
                want.join(", "),
                have.join(", ")
            )));
        }
        for (d, s) in states.iter().zip(&mut self.slots) {
            s.device.restore_state(&d.kind).map_err(|e| match e {
                StateError::Mismatch(m) => StateError::Mismatch(format!(
                    "device {} at {:#x}: {m}",
                    s.device.name(),
                    s.base
                )),
                other => other,
            })?;
        }
        Ok(())
    }

    /// Lets every device take new requests from its queues (step 1 of a boundary).
    pub fn devices_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn MmioDevice>> {
        self.slots.iter_mut().map(|s| &mut s.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::testing::TestBoundary;

    struct Reg(&'static str, u64);
    impl MmioDevice for Reg {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&mut self, off: u64, d: &mut [u8], _: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
            let v = (self.1 + off).to_le_bytes();
            d.copy_from_slice(&v[..d.len()]);
            Ok(())
        }
        fn write(&mut self, _: u64, d: &[u8], _: &mut BoundaryCx<'_>) -> Result<(), VmmError> {
            let mut b = [0u8; 8];
            b[..d.len()].copy_from_slice(d);
            self.1 = u64::from_le_bytes(b);
            Ok(())
        }
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, Box::new(Reg("a", 0))).unwrap();
        bus.insert(0x3000, 0x1000, Box::new(Reg("c", 0))).unwrap();
        for (base, size) in [
            (0x1800, 0x100),
            (0x0800, 0x1000),
            (0x1fff, 0x2),
            (0x0, 0x10000),
        ] {
            let e = bus.insert(base, size, Box::new(Reg("b", 0))).unwrap_err();
            assert!(matches!(e, BusError::Overlap { name: "b", .. }), "{e}");
        }
        assert!(matches!(
            bus.insert(0x5000, 0, Box::new(Reg("z", 0))),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX - 1, 0x10, Box::new(Reg("w", 0))),
            Err(BusError::BadRange { .. })
        ));
        // Adjacent ranges are fine.
        bus.insert(0x2000, 0x1000, Box::new(Reg("b", 0))).unwrap();
    }

    #[test]
    fn dispatch_and_unmapped() {
        let mut t = TestBoundary::new();
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, Box::new(Reg("a", 100))).unwrap();
        bus.insert(0x2000, 0x100, Box::new(Reg("b", 200))).unwrap();
        let mut d = [0u8; 8];
        bus.read(0x2008, &mut d, &mut t.cx()).unwrap();
        assert_eq!(u64::from_le_bytes(d), 208);
        bus.write(0x1000, &7u64.to_le_bytes(), &mut t.cx()).unwrap();
        bus.read(0x1000, &mut d, &mut t.cx()).unwrap();
        assert_eq!(u64::from_le_bytes(d), 7);
        for addr in [0x0, 0x1100, 0x1ffc, 0x20fc, 0x9000, u64::MAX] {
            let e = bus.read(addr, &mut d, &mut t.cx()).unwrap_err();
            assert!(
                matches!(e, VmmError::Bus(BusError::Unmapped { addr: a }) if a == addr),
                "{addr:#x}: {e}"
            );
        }
    }
}
