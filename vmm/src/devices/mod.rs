//! Device models on the MMIO bus.

pub mod control;
pub mod disk;
pub mod ratelimit;
pub mod tap;
pub mod virtio;

/// Base address of the first virtio-mmio device (after the control device).
pub const VIRTIO_BASE: u64 = ftvm_abi::control::BASE + 0x1000;
/// Distance between virtio-mmio devices.
pub const VIRTIO_STRIDE: u64 = 0x1000;
