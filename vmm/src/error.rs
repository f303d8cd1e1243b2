//! Errors of the VMM library.

use thiserror::Error;

/// Anything that can go wrong creating or running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be set up or copied.
    #[error(transparent)]
    Memory(#[from] crate::kvm::memory::MemoryError),
    /// The requested memory size is not usable.
    #[error("invalid memory size {size}: {why}")]
    MemSize {
        /// The size asked for, in bytes.
        size: u64,
        /// Why it is refused.
        why: String,
    },
    /// The guest image is not a loadable ELF.
    #[error("invalid guest image: {0}")]
    BadImage(String),
    /// The guest image does not fit in guest memory.
    #[error("guest image does not fit: {0}")]
    ImageTooLarge(String),
    /// An access outside guest memory.
    #[error("guest address range {addr:#x}+{len:#x} is outside guest memory")]
    GuestAddress {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// An MMIO bus configuration error.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// The disk image cannot be used.
    #[error("disk {path}: {why}")]
    Disk {
        /// The image path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The TAP device cannot be used.
    #[error("TAP {name}: {why}")]
    Tap {
        /// The interface name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The node's configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// A VM state cannot be saved, decoded or restored.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// An input source failed (live sources, a log).
    #[error(transparent)]
    Input(#[from] crate::epoch::InputError),
}
