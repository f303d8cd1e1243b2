//! virtio devices for the guest: the DMA glue `virtio-drivers` needs (identity-mapped memory
//! from the heap) and probing the devices the VMM announces in the boot info.
//!
//! Devices never interrupt and the VMM takes requests only at exits, so only the drivers'
//! non-blocking calls are used; a caller waits for a completion with POLL or WAIT exits.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The transport type of every device.
pub type Mmio = MmioTransport<'static>;

/// DMA for `virtio-drivers`: guest memory is identity-mapped, so a buffer's address is its
/// "physical" address.
pub struct GuestHal;

fn dma_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("valid DMA layout")
}

// SAFETY: allocations are zeroed, page-aligned and stay valid until dma_dealloc; addresses are
// identity-mapped, so the physical address equals the virtual one.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has non-zero size (pages >= 1 per the trait's use).
        let p = unsafe { alloc_zeroed(dma_layout(pages.max(1))) };
        let p = NonNull::new(p).expect("out of memory for virtio DMA");
        (p.as_ptr() as usize as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: allocated by dma_alloc with the same page count.
        unsafe { dealloc(vaddr.as_ptr(), dma_layout(pages.max(1))) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("non-null MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The devices found at boot.
#[derive(Default)]
pub struct Devices {
    /// The network device's transport (build a [`crate::net::GuestNet`] from it).
    pub net: Option<Mmio>,
    /// The block device.
    pub blk: Option<VirtIOBlk<GuestHal, Mmio>>,
    /// The entropy device's transport.
    pub rng: Option<Mmio>,
}

/// Probes every virtio-mmio slot the boot info announces.
pub fn probe(boot: &crate::Boot) -> Devices {
    let info = boot.info();
    let mut d = Devices::default();
    for i in 0..info.virtio_count {
        let addr = info.virtio_base + i * info.virtio_stride;
        let Some(header) = NonNull::new(addr as usize as *mut VirtIOHeader) else {
            continue;
        };
        // SAFETY: the VMM maps a virtio-mmio register window of `virtio_stride` bytes here for
        // the guest's whole life, and nothing else uses it.
        let transport = match unsafe { MmioTransport::new(header, info.virtio_stride as usize) } {
            Ok(t) => t,
            Err(e) => {
                crate::println!("virtio: slot {i}: {e:?}");
                continue;
            }
        };
        match transport.device_type() {
            DeviceType::Network => d.net = Some(transport),
            DeviceType::Block => match VirtIOBlk::new(transport) {
                Ok(b) => d.blk = Some(b),
                Err(e) => crate::println!("virtio-blk: {e:?}"),
            },
            DeviceType::EntropySource => d.rng = Some(transport),
            other => crate::println!("virtio: slot {i}: unused device {other:?}"),
        }
    }
    d
}
