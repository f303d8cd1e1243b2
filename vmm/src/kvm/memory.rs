//! Guest memory: one anonymous mapping registered as KVM slot 0 at guest-physical address 0,
//! with bounds-checked access for the VMM and (optionally) dirty-page tracking.
//!
//! The VMM writes guest memory only through [`GuestMemory::write`], which also records the
//! pages it touched, so the pages written since a point in time are KVM's dirty log (pages
//! the guest wrote) plus this record (pages the VMM wrote). Both logs are destructive to read,
//! so only the VM's one [`DirtyTracker`](crate::state::dirty::DirtyTracker) reads them, and
//! KVM's log is on only while the tracker has a consumer (a join's pre-copy): under PVM a
//! dirty-logged slot costs the guest a write-protect fault per page it writes after each read
//! of the log and 4 KiB mappings throughout, which measured as a third of the pair's CPU per
//! request (docs/architecture.md).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

/// The mapping type: vm-memory's mmap with a bitmap of the pages the VMM writes through it
/// (including the virtio queue code).
pub type Mmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

use crate::error::VmmError;
use ftvm_abi::layout::PAGE_SIZE;

/// What can go wrong setting up or copying guest memory (other than an address outside it,
/// [`VmmError::GuestAddress`]).
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The anonymous mapping could not be made.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// The size asked for, in bytes.
        size: u64,
        /// Why the mapping failed.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The mapping's host address could not be found.
    #[error("host address of guest memory: {0}")]
    HostAddress(#[source] vm_memory::GuestMemoryError),
    /// The mapping has no region.
    #[error("guest memory has no region")]
    NoRegion,
    /// A whole-page read failed.
    #[error("reading guest page {page}: {source}")]
    ReadPage {
        /// The page number.
        page: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A whole-page write failed.
    #[error("writing guest page {page}: {source}")]
    WritePage {
        /// The page number.
        page: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Dirty-page tracking was asked of memory registered without it.
    #[error("dirty-page tracking needs the memory registered as tracked")]
    NotTracked,
    /// `mincore` on guest memory failed.
    #[error("mincore on guest memory: {0}")]
    Mincore(#[source] std::io::Error),
    /// A virtio queue's used ring could not be written.
    #[error("virtio used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
}

/// The slot number of guest RAM.
pub const RAM_SLOT: u32 = 0;

/// Guest RAM.
pub struct GuestMemory {
    mmap: Mmap,
    size: u64,
    tracked: std::sync::atomic::AtomicBool,
}

impl GuestMemory {
    /// Maps `size` bytes of zeroed anonymous memory.
    pub fn new(size: u64) -> Result<Self, VmmError> {
        let mmap = Mmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Map { size, source })?;
        // Transparent huge pages where the host allows them (`madvise` mode, the common
        // default): the guest maps its RAM with 2 MiB pages, and KVM can map a 2 MiB guest
        // page with one large entry only where the host backs it with one. Fewer entries and
        // fewer first-touch faults: measured with `kv_redis` (FTVM_KV_BEFORE_NODE), the VM's
        // CPU per SET at -P 1 went from 12.5 to 12.0 µs in two runs. KVM's dirty log (on only
        // during a join's pre-copy) makes KVM map 4 KiB pages again while it is on; the guest
        // sees no difference either way.
        if let Ok(host) = mmap.get_host_address(GuestAddress(0)) {
            // SAFETY: advice only, on the mapping just made; it changes no contents.
            let r = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_HUGEPAGE) };
            if r != 0 {
                tracing::debug!(
                    "madvise(MADV_HUGEPAGE) on guest memory: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(GuestMemory {
            mmap,
            size,
            tracked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Registers the memory with `vm` as slot [`RAM_SLOT`] (without KVM's dirty log: a
    /// [`DirtyTracker`](crate::state::dirty::DirtyTracker) turns it on while it has
    /// consumers), `tracked` if a tracker and memory digests will be wanted.
    pub fn register(&self, vm: &VmFd, tracked: bool) -> Result<(), VmmError> {
        set_slot(vm, &self.mmap, self.size, false)?;
        self.tracked
            .store(tracked, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when `[addr, addr+len)` lies inside guest memory.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        let len = buf.len() as u64;
        let outside = || VmmError::GuestAddress { addr, len };
        if !self.contains(addr, len) {
            return Err(outside());
        }
        self.mmap
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| outside())
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, VmmError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes `data` at `addr` and records the pages touched. Only the boundary code (and boot)
    /// may call this: see the epoch invariant in DESIGN §3.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), VmmError> {
        let len = data.len() as u64;
        let outside = || VmmError::GuestAddress { addr, len };
        // Checked first: vm-memory would write the part inside before failing.
        if !self.contains(addr, len) {
            return Err(outside());
        }
        self.mmap
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| outside())
    }

    /// The underlying mapping, for code that works on vm-memory's traits (virtio queues).
    /// Its dirty bitmap is read only by [`DirtyTracker`](crate::state::dirty::DirtyTracker).
    /// Writes through it are tracked like [`write`](Self::write)'s.
    pub fn mmap(&self) -> &Mmap {
        &self.mmap
    }

    /// Writes a little-endian u64 at `addr`.
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), VmmError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// A view of one page, for hashing. `page` must be below `size / PAGE_SIZE`.
    pub fn page(&self, page: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> Result<(), VmmError> {
        self.read(page * PAGE_SIZE, buf)
    }

    /// Number of pages of guest memory.
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE)
    }

    /// Writes one whole page (`page` below [`pages`](Self::pages)); the page is recorded as
    /// written by the VMM like any [`write`](Self::write). For restoring a machine's memory
    /// (pre-copy): never while the guest runs.
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE as usize]) -> Result<(), VmmError> {
        let addr = page.checked_mul(PAGE_SIZE).ok_or(VmmError::GuestAddress {
            addr: u64::MAX,
            len: PAGE_SIZE,
        })?;
        self.write(addr, data)
    }

    /// A handle on the same memory that can be sent to another thread, to read pages while the
    /// vCPU runs (pre-copy) or to write them into a machine that does not run yet.
    pub fn pages_handle(&self) -> GuestPages {
        GuestPages {
            mmap: self.mmap.clone(),
            size: self.size,
        }
    }

    /// True when the memory was registered as tracked: a [`DirtyTracker`] may turn KVM's
    /// dirty log on and off (and the machine keeps memory digests).
    ///
    /// [`DirtyTracker`]: crate::state::dirty::DirtyTracker
    pub fn tracked(&self) -> bool {
        self.tracked.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// (Re-)registers `mmap` (`size` bytes) as slot [`RAM_SLOT`] of `vm`, with KVM's dirty-page
/// log on or off. Changing only the flags of a registered slot is allowed while the vCPU
/// runs: turning the log on write-protects every page (each page the guest writes from then
/// on is logged), turning it off lets KVM map large pages again.
pub(crate) fn set_slot(vm: &VmFd, mmap: &Mmap, size: u64, dirty_log: bool) -> Result<(), VmmError> {
    let host = mmap
        .get_host_address(GuestAddress(0))
        .map_err(MemoryError::HostAddress)?;
    let region = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        flags: if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the region describes the mapping `mmap`, `size` bytes (the whole mapping), whose
    // owner outlives every fd through which KVM can reach it: `KvmVm` declares its vCPU, then
    // its VM, then its memory, so it drops the vCPU fd (which keeps the VM alive in the kernel)
    // and the VM fd before unmapping; the dirty tracker, which may keep the VM's fd longer,
    // holds a clone of the mapping too and drops the fd first. It does not overlap any other
    // slot, and a re-registration changes only the flags.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
}

/// Takes the bitmap of pages the VMM wrote through `mmap` since the last call (bit `p % 64` of
/// word `p / 64` is page `p`). Only the dirty tracker calls this.
pub(crate) fn take_vmm_dirty(mmap: &Mmap) -> Result<Vec<u64>, VmmError> {
    let region = mmap.iter().next().ok_or(MemoryError::NoRegion)?;
    Ok(region.bitmap().get_and_reset())
}

/// A shareable handle on guest memory for whole-page access (see
/// [`GuestMemory::pages_handle`]). Reading a page while the guest runs may see it half
/// written: pre-copy reads a page after taking its dirty bit, so a page written meanwhile is
/// dirty again and sent again.
#[derive(Clone)]
pub struct GuestPages {
    mmap: Mmap,
    size: u64,
}

impl GuestPages {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE)
    }

    fn check(&self, page: u64) -> Result<GuestAddress, VmmError> {
        match page.checked_mul(PAGE_SIZE) {
            Some(a) if a.checked_add(PAGE_SIZE).is_some_and(|e| e <= self.size) => {
                Ok(GuestAddress(a))
            }
            _ => Err(VmmError::GuestAddress {
                addr: page.saturating_mul(PAGE_SIZE),
                len: PAGE_SIZE,
            }),
        }
    }

    /// Reads page `page`.
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> Result<(), VmmError> {
        let at = self.check(page)?;
        self.mmap
            .read_slice(buf, at)
            .map_err(|source| MemoryError::ReadPage { page, source }.into())
    }

    /// Makes every page all zero, writing zeros (recorded as written by the VMM, so digests
    /// follow) over the resident pages that are not; returns how many. A page the kernel
    /// never backed reads as zero and is left alone, so this costs in proportion to what was
    /// written (the loaded image), not to the memory's size. Only on a machine whose vCPU is
    /// not running: a joiner's, before the copy.
    pub fn clear(&self) -> Result<u64, VmmError> {
        let host = self
            .mmap
            .get_host_address(GuestAddress(0))
            .map_err(MemoryError::HostAddress)?;
        let pages = self.pages() as usize;
        let mut resident = vec![0u8; pages];
        // SAFETY: `host` is the start of the mapping `self.mmap` owns (page aligned, as mmap
        // returns it), `self.size` bytes long, alive for the call; `resident` has one byte per
        // page of that range, which is all mincore writes.
        let r = unsafe {
            libc::mincore(
                host.cast(),
                self.size as usize,
                resident.as_mut_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(MemoryError::Mincore(std::io::Error::last_os_error()).into());
        }
        let zero = [0u8; PAGE_SIZE as usize];
        let mut buf = [0u8; PAGE_SIZE as usize];
        let mut cleared = 0;
        for (p, &flags) in resident.iter().enumerate() {
            if flags & 1 == 0 {
                continue;
            }
            self.read_page(p as u64, &mut buf)?;
            if buf != zero {
                self.write_page(p as u64, &zero)?;
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Writes page `page` (recorded as written by the VMM). Only into a machine whose vCPU is
    /// not running: the epoch invariant (DESIGN §3) allows no other writes.
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE as usize]) -> Result<(), VmmError> {
        let at = self.check(page)?;
        self.mmap
            .write_slice(data, at)
            .map_err(|source| MemoryError::WritePage { page, source }.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_zeroes_what_was_written_and_counts_it() {
        let mem = GuestMemory::new(64 * PAGE_SIZE).unwrap();
        let pages = mem.pages_handle();
        let mut page = [0u8; PAGE_SIZE as usize];
        page[17] = 9;
        pages.write_page(3, &page).unwrap();
        pages.write_page(40, &page).unwrap();
        // Resident but already zero: not counted.
        pages.write_page(41, &[0; PAGE_SIZE as usize]).unwrap();
        let mut buf = [0u8; PAGE_SIZE as usize];
        pages.read_page(7, &mut buf).unwrap();
        take_vmm_dirty(&mem.mmap).unwrap();
        assert_eq!(pages.clear().unwrap(), 2);
        for p in 0..64 {
            pages.read_page(p, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "page {p} not cleared");
        }
        // The writes are the VMM's, so a digest sees them.
        let dirty = take_vmm_dirty(&mem.mmap).unwrap();
        assert_eq!(dirty[0], (1 << 3) | (1 << 40));
        assert_eq!(pages.clear().unwrap(), 0);
    }
}
