//! VM state: everything the guest can observe besides its memory, saved from a paused machine
//! and restored into a freshly assembled one so that it continues exactly as the original
//! would have (DESIGN §5, "Joining"). The encoding (version 1) is specified in
//! `docs/vm-state.md` and implemented in [`codec`]; guest memory travels separately, page by
//! page (see [`GuestPages`](crate::kvm::memory::GuestPages)), with the dirty pages of the
//! one [`dirty::DirtyTracker`].
//!
//! What the state holds:
//! - the boundary number the machine has passed;
//! - the vCPU: general and special registers, the FPU and the XSAVE area, XCRs, debug
//!   registers, pending events, the MP state and every MSR KVM lists and lets us read;
//! - every device on the bus, by base address: the control device (the last clock value it
//!   handed out) and each virtio-mmio transport (status, feature negotiation, queue selector,
//!   and every queue: size, ready, ring addresses, next_avail, next_used, event idx);
//! - the running console digest and the memory digest at the save (a check for the memory
//!   copy: the restored machine recomputes its own and must find the same).
//!
//! A machine is saved only between two runs of its vCPU, after a boundary has been handled
//! (`Machine::save_state`); the pending MMIO access is completed inside KVM first, so nothing
//! of the exit remains outside the state.

pub mod codec;
pub mod dirty;
pub mod pages;
pub mod xsave;

use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};
use thiserror::Error;
use virtio_queue::QueueState;

use crate::epoch::{Boundary, ClockValue};

/// Size of the XSAVE area saved (the `KVM_GET_XSAVE` region: 4096 bytes, enough for every
/// component the baseline CPUID lets a guest enable).
pub const XSAVE_BYTES: usize = 4096;
/// Most MSRs a state may carry (KVM lists about 40 here).
pub const MAX_MSRS: usize = 1024;
/// Most extended control registers a state may carry (KVM's own limit).
pub const MAX_XCRS: usize = 16;
/// Most devices a state may carry.
pub const MAX_DEVICES: usize = 64;
/// Most queues one virtio device may have in a state.
pub const MAX_QUEUES: usize = 64;
/// Length of the configuration-space prefix kept to identify a virtio device (MAC, capacity).
pub const CONFIG_ID_BYTES: usize = 16;

/// Why a state cannot be decoded, saved or restored.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    /// The encoding ends before a field.
    #[error("VM state truncated at byte {offset}: {what}")]
    Truncated {
        /// Where the missing bytes should start.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// The encoding is not a valid VM state.
    #[error("VM state malformed at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What is wrong.
        what: String,
    },
    /// The checksum over the encoding does not match (corrupted in transit or storage).
    #[error("VM state checksum mismatch: the state is corrupted")]
    Checksum,
    /// The state does not fit the machine it is restored into.
    #[error("VM state does not fit this machine: {0}")]
    Mismatch(String),
    /// Something of the machine cannot be saved.
    #[error("cannot save VM state: {0}")]
    Unsupported(String),
}

/// The state of the machine's only vCPU.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// General registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The x87/SSE state as `KVM_GET_FPU` reports it.
    pub fpu: kvm_fpu,
    /// The XSAVE area (`KVM_GET_XSAVE`), [`XSAVE_BYTES`] long; restored after the FPU, so it
    /// is what the guest ends up with.
    pub xsave: Vec<u8>,
    /// Extended control registers: (index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending and injected exceptions, interrupts, NMI, SMM and shadow state.
    pub events: kvm_vcpu_events,
    /// The multiprocessing state (`KVM_MP_STATE_*`).
    pub mp_state: u32,
    /// Model-specific registers: (index, value), in KVM's list order.
    pub msrs: Vec<(u32, u64)>,
}

/// The state of one device on the MMIO bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The device's base address on the bus (identifies it).
    pub base: u64,
    /// What kind of device, with its state.
    pub kind: DeviceKind,
}

/// The per-kind state of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The ftvm control device. Its shared page lives in guest memory, so the only state
    /// outside memory is the last clock value it handed to the guest.
    Control {
        /// The last clock value the guest was given (zero before the first).
        last_clock: ClockValue,
    },
    /// A virtio device behind the MMIO transport.
    Virtio(VirtioState),
}

/// The state of a virtio-mmio transport and its queues. The device models themselves (net,
/// blk, rng) complete every request at the boundary that takes it, so no request is ever in
/// flight inside them: their guest-visible state is the transport's and the queues'. The
/// identity fields (type, offered features, queue maximum sizes, config prefix) are checked
/// on restore, not restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioState {
    /// The virtio device type (1 net, 2 block, 4 rng).
    pub device_type: u32,
    /// The features the device offers.
    pub device_features: u64,
    /// The first [`CONFIG_ID_BYTES`] of its configuration space (MAC, capacity).
    pub config: [u8; CONFIG_ID_BYTES],
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Every queue, in index order (virtio-queue's own state: maximum size, size, ready,
    /// descriptor/avail/used addresses, next_avail, next_used, event idx).
    pub queues: Vec<QueueState>,
}

/// Everything the guest can observe besides its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct VmState {
    /// Boundaries the machine has passed; the restored machine's next boundary is this + 1.
    pub boundary: Boundary,
    /// Guest memory size in bytes (must equal the target machine's).
    pub mem_size: u64,
    /// Hash of the CPUID table the vCPU was given (must equal the target's).
    pub cpuid_hash: [u8; 32],
    /// The running console digest (see `docs/vm-state.md`).
    pub console_digest: [u8; 32],
    /// The memory digest at the save, when the machine keeps one (dirty logging).
    pub memory_digest: Option<[u8; 32]>,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// Every device on the bus, in address order.
    pub devices: Vec<DeviceState>,
}

impl VmState {
    /// The last clock value the guest was given (from the control device): where a node that
    /// goes live from this state must start its clock so guest time never goes backwards.
    pub fn last_clock(&self) -> Option<ClockValue> {
        self.devices.iter().find_map(|d| match d.kind {
            DeviceKind::Control { last_clock } => Some(last_clock),
            _ => None,
        })
    }
}
