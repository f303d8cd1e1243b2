//! What defines a VM ([`VmSetup`]: its image, memory size, arguments and devices) and
//! assembling a [`Machine`] from it: the VM, the control device and the virtio devices on
//! the MMIO bus. Solo runs, replays and pair members all assemble their machine here.

use std::fs::File;
use std::sync::Arc;

use crate::bus::MmioBus;
use crate::devices::control::ControlDevice;
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::net::{DropFrames, FrameSink, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::{VIRTIO_BASE, VIRTIO_STRIDE};
use crate::epoch::{ConsoleSink, Inputs};
use crate::error::VmmError;
use crate::kvm::boot::BootParams;
use crate::kvm::KvmVm;
use crate::machine::Machine;
use crate::replay::codec::Header;
use crate::signals::StopSignal;
use crate::spec::DeviceSpec;
use ftvm_abi::control;

/// Everything that defines a VM.
#[derive(Clone, Debug)]
pub struct VmSetup<'a> {
    /// The guest ELF image.
    pub image: &'a [u8],
    /// Guest memory size.
    pub mem_size: u64,
    /// The guest's argument string.
    pub args: String,
    /// The guest-visible devices.
    pub devices: DeviceSpec,
}

impl<'a> VmSetup<'a> {
    /// A VM with no devices but the control device.
    pub fn plain(image: &'a [u8], mem_size: u64, args: &str) -> Self {
        VmSetup {
            image,
            mem_size,
            args: args.to_string(),
            devices: DeviceSpec::default(),
        }
    }

    fn boot_params(&self, tracked: bool) -> BootParams {
        BootParams {
            args: self.args.clone(),
            net: self.devices.net.as_ref().map(|n| n.boot_config()),
            tracked,
            virtio_count: self.devices.virtio_count(),
        }
    }

    /// The header a recording of this VM carries.
    pub fn log_header(&self, digest_every: u64) -> Header {
        Header {
            image_hash: *blake3::hash(self.image).as_bytes(),
            mem_size: self.mem_size,
            cpuid_hash: crate::kvm::cpuid::baseline_hash(),
            args: self.args.clone(),
            machine: self.devices.describe(),
            digest_every,
        }
    }
}

/// Assembles a machine: the VM, the control device and the virtio devices of `setup`.
pub fn assemble(
    setup: &VmSetup<'_>,
    disk: Option<File>,
    sink: Box<dyn FrameSink>,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
    tracked: bool,
) -> Result<Machine, VmmError> {
    assemble_tracked(setup, disk, sink, inputs, console, stop, tracked, None)
}

/// [`assemble`], with the disk's writes reported to `writes` (a pair member, for joins).
#[allow(clippy::too_many_arguments)]
pub fn assemble_tracked(
    setup: &VmSetup<'_>,
    disk: Option<File>,
    sink: Box<dyn FrameSink>,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
    tracked: bool,
    writes: Option<Arc<crate::join::blocks::BlockWrites>>,
) -> Result<Machine, VmmError> {
    let mut vm = KvmVm::create(setup.mem_size, setup.image, &setup.boot_params(tracked))?;
    vm.vcpu.set_stack(setup.mem_size)?;
    let mut bus = MmioBus::new();
    bus.insert(control::BASE, control::SIZE, Box::new(ControlDevice::new()))?;
    // Bus order is the order in which devices take requests at a boundary. The NIC comes
    // before the disk, so one exit transmits the replies of a commit already on the disk
    // before it writes the next (the kv guest leaves that write in flight for this exit).
    let mut slot = VIRTIO_BASE;
    let mut sink = Some(sink);
    if let Some(n) = &setup.devices.net {
        let net = Net::new(n.mac, sink.take().unwrap_or_else(|| Box::new(DropFrames)));
        bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(net)))?;
        slot += VIRTIO_STRIDE;
    }
    match (setup.devices.disk_sectors, disk) {
        (Some(sectors), Some(file)) => {
            let mut blk = Block::new(file).map_err(|e| VmmError::Config(format!("disk: {e}")))?;
            if let Some(w) = writes {
                blk = blk.with_write_tracking(w);
            }
            if blk.sectors() != sectors {
                return Err(VmmError::Config(format!(
                    "the disk has {} sectors, the machine expects {sectors}",
                    blk.sectors()
                )));
            }
            bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(blk)))?;
            slot += VIRTIO_STRIDE;
        }
        (None, None) => {}
        _ => {
            return Err(VmmError::Config(
                "a disk needs both a size and an image".into(),
            ))
        }
    }
    if setup.devices.rng {
        bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(Rng)))?;
    }
    Ok(Machine::new(vm, bus, inputs, console, stop))
}

/// Builds a machine with only the control device (benchmarks, simple guests).
pub fn build_machine(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
) -> Result<Machine, VmmError> {
    let setup = VmSetup::plain(image, mem_size, &params.args);
    assemble(
        &setup,
        None,
        Box::new(DropFrames),
        inputs,
        console,
        stop,
        params.tracked,
    )
}
