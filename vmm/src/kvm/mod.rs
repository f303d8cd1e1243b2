//! The virtual machine on KVM: guest memory and its slot, boot state (ELF, page tables, GDT,
//! CPUID) and the vCPU whose run loop is the one place every exit is seen.

pub mod boot;
pub mod cpuid;
pub mod elf;
pub mod memory;
pub mod vcpu;

use kvm_ioctls::{Kvm, VmFd};

use crate::error::VmmError;
use memory::GuestMemory;
use vcpu::Vcpu;

/// A KVM virtual machine with its memory and its single vCPU, booted and ready to run.
///
/// Fields drop in declaration order, and that order is what keeps guest memory mapped for as
/// long as KVM can reach it: the vCPU fd first (it holds a reference to the VM in the kernel),
/// then the VM fd (closing the last reference destroys the VM and its memory slot), and only
/// then the mapping the slot pointed at. Keep `memory` last.
pub struct KvmVm {
    /// The VM's only vCPU (dropped first).
    pub vcpu: Vcpu,
    vm: std::sync::Arc<VmFd>,
    // Kept open for the VM's life.
    _kvm: Kvm,
    /// Guest memory (slot 0, from guest-physical address 0); dropped last, after every fd
    /// that gives KVM access to it.
    pub memory: GuestMemory,
}

impl KvmVm {
    /// Creates a VM with `mem_size` bytes of memory, loads `image` (an ELF guest), builds the
    /// boot state and returns the VM ready to run. `boot_args` and `net` go to the boot info.
    pub fn create(
        mem_size: u64,
        image: &[u8],
        params: &boot::BootParams,
    ) -> Result<Self, VmmError> {
        boot::check_mem_size(mem_size)?;
        let loaded = elf::parse(image, mem_size)?;
        let kvm = Kvm::new().map_err(|e| VmmError::Kvm("open /dev/kvm", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
        let memory = GuestMemory::new(mem_size)?;
        memory.register(&vm, params.tracked)?;
        elf::load(&loaded, image, &memory)?;
        boot::write_boot_structures(&memory, &loaded, params)?;
        let vcpu = Vcpu::create(&kvm, &vm, loaded.entry)?;
        Ok(KvmVm {
            _kvm: kvm,
            vm: std::sync::Arc::new(vm),
            memory,
            vcpu,
        })
    }

    /// A shared handle on the VM's file descriptor (for the dirty-page tracker, which may be
    /// used from another thread).
    pub fn vm_fd_shared(&self) -> std::sync::Arc<VmFd> {
        self.vm.clone()
    }
}
