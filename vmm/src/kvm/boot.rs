//! Boot state: the GDT, page tables and boot info the VMM writes into guest memory, and the
//! initial segment and control registers that start the guest in 64-bit mode at CPL 3.
//!
//! The page tables identity-map the first 4 GiB. The first 2 MiB use 4 KiB pages so that
//! page 0 stays unmapped (null dereferences fault) and the VMM's structures below
//! [`FIRST_USER_PAGE`] are supervisor-only: a ring-3 guest cannot rewrite its own page tables.
//! Everything else is mapped user read/write with 2 MiB pages, including addresses past the
//! end of RAM: an access there is an MMIO exit, and the bus reports it.

use ftvm_abi::layout::*;
use ftvm_abi::{control, BootInfo, NetConfig, BOOT_MAGIC};
use kvm_bindings::{kvm_segment, kvm_sregs};

use super::elf::LoadedImage;
use super::memory::GuestMemory;
use crate::error::VmmError;

/// Selector of the 64-bit user code segment (GDT index 3, RPL 3).
pub const USER_CS: u16 = 0x18 | 3;
/// Selector of the user data segment (GDT index 4, RPL 3).
pub const USER_DS: u16 = 0x20 | 3;
/// Selector of the TSS (GDT index 5).
pub const TSS_SEL: u16 = 0x28;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
const PTE_PS: u64 = 0x80;

/// What the node tells the guest at boot, beyond memory layout.
#[derive(Clone, Debug, Default)]
pub struct BootParams {
    /// Argument string for the guest program (at most 256 bytes).
    pub args: String,
    /// Network configuration, if the VM has a NIC.
    pub net: Option<NetConfig>,
    /// Guest memory is tracked: the machine keeps memory digests and a dirty-page tracker
    /// (which turns KVM's dirty log on while it has a consumer).
    pub tracked: bool,
    /// Number of virtio-mmio devices after the control device.
    pub virtio_count: u64,
}

/// Checks that `size` is a usable guest memory size.
pub fn check_mem_size(size: u64) -> Result<(), VmmError> {
    let why = if size < MIN_MEM_SIZE {
        format!("below the minimum of {} MiB", MIN_MEM_SIZE >> 20)
    } else if size > MAX_MEM_SIZE {
        format!("above the maximum of {} MiB", MAX_MEM_SIZE >> 20)
    } else if !size.is_multiple_of(2 << 20) {
        "not a multiple of 2 MiB".to_string()
    } else {
        return Ok(());
    };
    Err(VmmError::MemSize { size, why })
}

/// The GDT: null, kernel code/data (unused), user code/data, and the TSS descriptor.
fn gdt() -> [u64; 7] {
    let tss_base = TSS_ADDR;
    let tss_limit = 0x67u64;
    let tss_low = (tss_limit & 0xffff)
        | ((tss_base & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, type 9: available 64-bit TSS
        | (((tss_base >> 24) & 0xff) << 56);
    let tss_high = tss_base >> 32;
    [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00af_fb00_0000_ffff, // 0x18 user code, 64-bit, DPL 3
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
        tss_low,
        tss_high,
    ]
}

/// Writes the GDT, TSS, page tables and boot info into guest memory.
pub fn write_boot_structures(
    mem: &GuestMemory,
    image: &LoadedImage,
    params: &BootParams,
) -> Result<(), VmmError> {
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt_bytes)?;
    // TSS: all zero but the I/O map base, placed past the limit (no I/O bitmap).
    mem.write(TSS_ADDR + 0x66, &0x68u16.to_le_bytes())?;

    mem.write_u64(PML4_ADDR, PDPT_ADDR | PTE_P | PTE_RW | PTE_US)?;
    for i in 0..4u64 {
        mem.write_u64(
            PDPT_ADDR + i * 8,
            (PD_ADDR + i * PAGE_SIZE) | PTE_P | PTE_RW | PTE_US,
        )?;
    }
    let mut pd = vec![0u8; 4 * PAGE_SIZE as usize];
    for i in 0..2048u64 {
        let entry = if i == 0 {
            PT0_ADDR | PTE_P | PTE_RW | PTE_US
        } else {
            (i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS
        };
        pd[i as usize * 8..][..8].copy_from_slice(&entry.to_le_bytes());
    }
    mem.write(PD_ADDR, &pd)?;
    let mut pt = vec![0u8; PAGE_SIZE as usize];
    for i in 1..512u64 {
        let addr = i * PAGE_SIZE;
        let flags = if addr < FIRST_USER_PAGE {
            PTE_P | PTE_RW
        } else {
            PTE_P | PTE_RW | PTE_US
        };
        pt[i as usize * 8..][..8].copy_from_slice(&(addr | flags).to_le_bytes());
    }
    mem.write(PT0_ADDR, &pt)?;

    let stack_top = mem.size();
    let heap_end = stack_top - STACK_SIZE;
    let mut args = [0u8; 256];
    let a = params.args.as_bytes();
    if a.len() > args.len() {
        return Err(VmmError::BadImage(format!(
            "guest arguments are {} bytes; at most {} fit",
            a.len(),
            args.len()
        )));
    }
    args[..a.len()].copy_from_slice(a);
    let info = BootInfo {
        magic: BOOT_MAGIC,
        version: control::VERSION_VALUE,
        mem_size: mem.size(),
        heap_start: image.end.max(IMAGE_MIN_ADDR),
        heap_end,
        stack_top,
        shared_page: SHARED_PAGE_ADDR,
        control_base: control::BASE,
        virtio_count: params.virtio_count,
        virtio_base: crate::devices::VIRTIO_BASE,
        virtio_stride: crate::devices::VIRTIO_STRIDE,
        net: params.net.unwrap_or_default(),
        args_len: a.len() as u64,
        args,
    };
    // SAFETY: BootInfo is a #[repr(C)] struct of integers and byte arrays with no padding
    // holes that matter (all fields are naturally aligned u64/u32/u8 arrays), so viewing it as
    // bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&info as *const BootInfo).cast::<u8>(),
            std::mem::size_of::<BootInfo>(),
        )
    };
    mem.write(BOOT_INFO_ADDR, bytes)?;
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs` for 64-bit mode at CPL 3 with the VMM's GDT and page tables. SSE is enabled
/// (CR4.OSFXSR/OSXMMEXCPT) and CR4.TSD makes `rdtsc` fault at CPL 3 where the CPU honours it.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (7 * 8 - 1) as u16;
    // No IDT: any exception escalates to a triple fault, which KVM reports as a shutdown.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // CR0: PE | MP | ET | NE | WP | PG.
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    // CR4: TSD | PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr4 = 0x4 | 0x20 | 0x200 | 0x400;
    sregs.cr3 = PML4_ADDR;
    // EFER: LME | LMA.
    sregs.efer = 0x100 | 0x400;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert!(check_mem_size(64 << 20).is_ok());
        assert!(check_mem_size(MAX_MEM_SIZE).is_ok());
        assert!(check_mem_size(1 << 20).is_err());
        assert!(check_mem_size(MAX_MEM_SIZE + (2 << 20)).is_err());
        assert!(check_mem_size((64 << 20) + 4096).is_err());
    }
}
