//! blake3 digests of guest memory kept up to date from the dirty-page tracker: each update
//! rehashes only the pages written since the last one (by the guest or by the VMM),
//! then the chunks of 256 page hashes that contain them, then the root over the chunk hashes.

use crate::error::VmmError;
use crate::kvm::memory::GuestMemory;
use crate::state::dirty::DirtyPages;
use ftvm_abi::layout::PAGE_SIZE;

const PAGES_PER_CHUNK: u64 = 256;

/// An incrementally maintained digest of guest memory.
pub struct MemoryDigest {
    page_hashes: Vec<[u8; 32]>,
    chunk_hashes: Vec<[u8; 32]>,
    /// Pages rehashed by the last update (for benchmarks and logs).
    pub last_rehashed: u64,
}

impl MemoryDigest {
    /// Starts from freshly mapped (all-zero) memory: every page has the zero page's hash.
    /// Everything written since the memory slot was registered is picked up by the first
    /// [`update`](Self::update).
    pub fn new_zeroed(mem: &GuestMemory) -> Self {
        let zero = *blake3::hash(&[0u8; PAGE_SIZE as usize]).as_bytes();
        let pages = mem.pages();
        let chunks = pages.div_ceil(PAGES_PER_CHUNK);
        let mut d = MemoryDigest {
            page_hashes: vec![zero; pages as usize],
            chunk_hashes: vec![[0; 32]; chunks as usize],
            last_rehashed: 0,
        };
        for c in 0..chunks {
            d.rehash_chunk(c);
        }
        d
    }

    fn rehash_chunk(&mut self, c: u64) {
        let start = (c * PAGES_PER_CHUNK) as usize;
        let end = (start + PAGES_PER_CHUNK as usize).min(self.page_hashes.len());
        let mut h = blake3::Hasher::new();
        for p in &self.page_hashes[start..end] {
            h.update(p);
        }
        self.chunk_hashes[c as usize] = *h.finalize().as_bytes();
    }

    /// Brings the digest up to date with `dirty`, the pages written since the last update (the
    /// digest's consumer of the VM's [`DirtyTracker`](crate::state::dirty::DirtyTracker)), and
    /// returns it.
    pub fn update(&mut self, mem: &GuestMemory, dirty: &DirtyPages) -> Result<[u8; 32], VmmError> {
        let mut page = [0u8; PAGE_SIZE as usize];
        let mut touched_chunks = Vec::new();
        let mut n = 0;
        for p in dirty.iter() {
            if p >= mem.pages() {
                break;
            }
            mem.page(p, &mut page)?;
            self.page_hashes[p as usize] = *blake3::hash(&page).as_bytes();
            let c = p / PAGES_PER_CHUNK;
            if touched_chunks.last() != Some(&c) {
                touched_chunks.push(c);
            }
            n += 1;
        }
        for c in touched_chunks {
            self.rehash_chunk(c);
        }
        self.last_rehashed = n;
        Ok(self.root())
    }

    /// The digest as of the last update.
    pub fn root(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for c in &self.chunk_hashes {
            h.update(c);
        }
        *h.finalize().as_bytes()
    }

    /// A digest computed from scratch by reading every page (for checking the incremental one).
    pub fn full(mem: &GuestMemory) -> Result<[u8; 32], VmmError> {
        let mut page = [0u8; PAGE_SIZE as usize];
        let mut chunk = blake3::Hasher::new();
        let mut root = blake3::Hasher::new();
        for p in 0..mem.pages() {
            mem.page(p, &mut page)?;
            chunk.update(blake3::hash(&page).as_bytes());
            if (p + 1) % PAGES_PER_CHUNK == 0 || p + 1 == mem.pages() {
                root.update(chunk.finalize().as_bytes());
                chunk = blake3::Hasher::new();
            }
        }
        Ok(*root.finalize().as_bytes())
    }
}
