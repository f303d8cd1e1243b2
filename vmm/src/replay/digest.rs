//! blake3 digests of guest memory: each page hashed with blake3, the hashes of each run of 256
//! pages hashed into a chunk hash, and the digest is blake3 over the chunk hashes
//! (docs/log-format.md, "Memory digests").
//!
//! A digest reads every page. It used to be kept incrementally from KVM's dirty log, rehashing
//! only the pages written since the last digest; under PVM that log costs the guest a
//! write-protect fault for each page it writes after each read of the log and 4 KiB mappings
//! throughout, which measured as a third of the pair's CPU per request. Reading all of a
//! 64 MiB guest costs milliseconds once per `digest_every` boundaries instead (the figures are
//! in docs/architecture.md). Pages the guest never touched read as zeros, and a page of zeros
//! is recognised by comparison, which is cheaper than hashing it.

use crate::error::VmmError;
use crate::kvm::memory::GuestMemory;
use ftvm_abi::layout::PAGE_SIZE;

/// Pages per chunk hash.
const PAGES_PER_CHUNK: u64 = 256;

/// Digests of guest memory.
pub struct MemoryDigest;

impl MemoryDigest {
    /// The digest of `mem` as it is now (read page by page; the vCPU must not be running).
    pub fn full(mem: &GuestMemory) -> Result<[u8; 32], VmmError> {
        const PAGE: usize = PAGE_SIZE as usize;
        const ZERO: [u8; PAGE] = [0; PAGE];
        let zero_hash = blake3::hash(&ZERO);
        // A chunk's pages are read in one copy: one bounds check and one volatile copy per
        // 1 MiB rather than per page.
        let mut buf = vec![0u8; PAGES_PER_CHUNK as usize * PAGE];
        let mut root = blake3::Hasher::new();
        let pages = mem.pages();
        for first in (0..pages).step_by(PAGES_PER_CHUNK as usize) {
            let n = (pages - first).min(PAGES_PER_CHUNK) as usize;
            let bytes = &mut buf[..n * PAGE];
            mem.read(first * PAGE_SIZE, bytes)?;
            let mut chunk = blake3::Hasher::new();
            for page in bytes.chunks_exact(PAGE) {
                let h = if page == ZERO {
                    zero_hash
                } else {
                    blake3::hash(page)
                };
                chunk.update(h.as_bytes());
            }
            root.update(chunk.finalize().as_bytes());
        }
        Ok(*root.finalize().as_bytes())
    }
}
