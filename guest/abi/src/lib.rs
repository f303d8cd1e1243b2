//! The contract between the ftvm VMM and its guests.
//!
//! Both sides compile this crate: the VMM (`vmm/`) to lay out guest memory and decode MMIO
//! accesses, the guest SDK (`guest/sdk`) to find its boot information and to talk to the
//! control device. Everything here is plain constants and `#[repr(C)]` structures, so the
//! two sides cannot disagree. See `docs/guest-contract.md` for the rules a guest follows.
#![no_std]

/// Guest-physical (and, by identity mapping, guest-virtual) memory layout.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 4096;
    /// The GDT (and the TSS after it) live in this page; supervisor-only.
    pub const GDT_ADDR: u64 = 0x1000;
    /// The TSS the VMM installs (never used: the guest takes no interrupts).
    pub const TSS_ADDR: u64 = 0x1800;
    /// Top-level page table (PML4); supervisor-only.
    pub const PML4_ADDR: u64 = 0x2000;
    /// Page-directory-pointer table; supervisor-only.
    pub const PDPT_ADDR: u64 = 0x3000;
    /// Four page directories mapping the first 4 GiB with 2 MiB pages; supervisor-only.
    pub const PD_ADDR: u64 = 0x4000;
    /// The page table that maps the first 2 MiB with 4 KiB pages (so the pages above can be
    /// protected from the guest and page 0 can stay unmapped); supervisor-only.
    pub const PT0_ADDR: u64 = 0x8000;
    /// First page the guest can access; everything below is the VMM's.
    pub const FIRST_USER_PAGE: u64 = 0x10000;
    /// The [`BootInfo`](crate::BootInfo) page, readable by the guest.
    pub const BOOT_INFO_ADDR: u64 = 0x10000;
    /// The shared page: clock values written by the VMM at boundaries, console buffer.
    pub const SHARED_PAGE_ADDR: u64 = 0x11000;
    /// Lowest address a guest ELF segment may be loaded at.
    pub const IMAGE_MIN_ADDR: u64 = 0x20_0000;
    /// Base of the MMIO window (devices); guest RAM must end below it.
    pub const MMIO_BASE: u64 = 0xC000_0000;
    /// Size of the MMIO window.
    pub const MMIO_SIZE: u64 = 0x4000_0000;
    /// The highest guest memory size the layout allows (RAM ends at the MMIO window).
    pub const MAX_MEM_SIZE: u64 = MMIO_BASE;
    /// Smallest guest memory size the VMM accepts.
    pub const MIN_MEM_SIZE: u64 = 4 << 20;
    /// Size of the guest's stack, placed at the top of guest memory.
    pub const STACK_SIZE: u64 = 1 << 20;
}

/// The ftvm control device: console, clock, WAIT/POLL doorbells, entropy and exit.
pub mod control {
    /// Guest-physical base address of the control device's registers.
    pub const BASE: u64 = crate::layout::MMIO_BASE;
    /// Size of the control device's register window.
    pub const SIZE: u64 = 0x1000;
    /// Read: the magic value [`MAGIC_VALUE`].
    pub const MAGIC: u64 = 0x00;
    /// Read: the ABI version, [`VERSION_VALUE`].
    pub const VERSION: u64 = 0x08;
    /// Write: print that many bytes from the shared page's console buffer.
    pub const CONSOLE: u64 = 0x10;
    /// Write: block until an event is pending or the monotonic clock reaches the written
    /// deadline (ns). The shared page's clock is refreshed when it returns.
    pub const WAIT: u64 = 0x18;
    /// Write (any value): a POLL doorbell; new requests are taken, pending events applied and
    /// the shared page's clock refreshed, without blocking.
    pub const POLL: u64 = 0x20;
    /// Write: end the VM with the written value as its exit status.
    pub const EXIT: u64 = 0x28;
    /// Read: the monotonic clock (ns since boot); also refreshes the shared page.
    pub const CLOCK_MONO: u64 = 0x30;
    /// Read: the wall clock (ns since the Unix epoch); also refreshes the shared page.
    pub const CLOCK_WALL: u64 = 0x38;
    /// Read: 8 bytes of entropy from the VMM.
    pub const ENTROPY: u64 = 0x40;
    /// Value read from [`MAGIC`]: "FTVM".
    pub const MAGIC_VALUE: u64 = 0x4654_564d;
    /// Value read from [`VERSION`].
    pub const VERSION_VALUE: u64 = 1;
}

/// Offsets inside the shared page at [`layout::SHARED_PAGE_ADDR`].
pub mod shared {
    /// u64: monotonic clock in ns, as of the last clock refresh.
    pub const MONO_NS: u64 = 0x00;
    /// u64: wall clock in ns since the Unix epoch, as of the last clock refresh.
    pub const WALL_NS: u64 = 0x08;
    /// Start of the console buffer.
    pub const CONSOLE_BUF: u64 = 0x100;
    /// Size of the console buffer.
    pub const CONSOLE_BUF_LEN: u64 = crate::layout::PAGE_SIZE - CONSOLE_BUF;
}

/// Network configuration handed to the guest in its boot info.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Non-zero when a network device is configured.
    pub present: u32,
    /// IPv4 prefix length.
    pub prefix_len: u32,
    /// The guest NIC's MAC address (6 bytes used).
    pub mac: [u8; 8],
    /// The guest's IPv4 address.
    pub ipv4: [u8; 4],
    /// The default gateway (all zero: none).
    pub gateway: [u8; 4],
}

/// What the VMM tells the guest at boot, at [`layout::BOOT_INFO_ADDR`]; the entry point
/// receives its address in `rdi`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// ABI version, [`control::VERSION_VALUE`].
    pub version: u64,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// First byte of the heap (page-aligned, above the loaded image).
    pub heap_start: u64,
    /// One past the last byte of the heap (the stack's lowest byte).
    pub heap_end: u64,
    /// Top of the stack (initial `rsp`).
    pub stack_top: u64,
    /// Address of the shared page.
    pub shared_page: u64,
    /// Base address of the control device.
    pub control_base: u64,
    /// Number of virtio-mmio devices, at `virtio_base + i * virtio_stride`.
    pub virtio_count: u64,
    /// Base address of the first virtio-mmio device.
    pub virtio_base: u64,
    /// Distance between virtio-mmio devices.
    pub virtio_stride: u64,
    /// Network configuration.
    pub net: NetConfig,
    /// Length of the argument string in `args`.
    pub args_len: u64,
    /// Arguments for the guest program (UTF-8, not NUL-terminated).
    pub args: [u8; 256],
}

/// Value of [`BootInfo::magic`].
pub const BOOT_MAGIC: u64 = 0x4654_564d_424f_4f54;

/// Exit status a guest uses when it panics.
pub const EXIT_PANIC: u64 = 63;
