//! Block geometry and blake3 leaf hashing, on all cores (rayon), reading large and sequentially.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rayon::iter::{ParallelBridge, ParallelIterator};

use crate::stats::Stats;
use crate::{Error, Result};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// Default block size: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Smallest and largest block sizes accepted.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;

/// Bytes one hashing work item reads at once (rounded to whole blocks).
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

const LEAF_CONTEXT: &str = "ftvm-disksync 2026 v1 block leaf";
const NODE_CONTEXT: &str = "ftvm-disksync 2026 v1 tree node";
const ROOT_CONTEXT: &str = "ftvm-disksync 2026 v1 disk root";

fn leaf_template() -> &'static blake3::Hasher {
    static T: OnceLock<blake3::Hasher> = OnceLock::new();
    T.get_or_init(|| blake3::Hasher::new_derive_key(LEAF_CONTEXT))
}
fn node_template() -> &'static blake3::Hasher {
    static T: OnceLock<blake3::Hasher> = OnceLock::new();
    T.get_or_init(|| blake3::Hasher::new_derive_key(NODE_CONTEXT))
}

/// Hash of one block's contents.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = leaf_template().clone();
    h.update(data);
    *h.finalize().as_bytes()
}

/// Hash of an inner tree node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = node_template().clone();
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The disk's root hash: the tree's top node bound to the disk size and block size.
pub fn root_hash(top: &Hash, geo: Geometry) -> Hash {
    let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(top);
    h.update(&geo.disk_size.to_le_bytes());
    h.update(&geo.block_size.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Hex form of a hash.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size of a disk and how it is cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size: u64,
    pub block_size: u32,
}

impl Geometry {
    /// Checks the block size (a power of two between 512 B and 16 MiB).
    pub fn new(disk_size: u64, block_size: u32) -> Result<Self> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::Invalid(format!(
                "block size {block_size} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            )));
        }
        Ok(Self {
            disk_size,
            block_size,
        })
    }

    /// Number of blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size as u64)
    }

    /// Byte offset and length of block `i`.
    pub fn block(&self, i: u64) -> (u64, usize) {
        let off = i * self.block_size as u64;
        let len = (self.disk_size - off).min(self.block_size as u64);
        (off, len as usize)
    }

    /// Blocks touched by the byte range `[offset, offset+len)` (clamped to the disk).
    pub fn blocks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 || offset >= self.disk_size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let bs = self.block_size as u64;
        offset / bs..end.div_ceil(bs)
    }
}

/// Geometry of the file at `path` (its current size).
pub fn file_geometry(file: &File, path: &Path, block_size: u32) -> Result<Geometry> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    Geometry::new(len, block_size)
}

/// True if every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and `align_to` views as u128 only the
    // aligned middle of `data`, which it borrows.
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Number of hashing threads: every core (rayon's global pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Hashes every block of `file`.
pub fn hash_file(
    file: &File,
    path: &Path,
    geo: Geometry,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<Vec<Hash>> {
    let mut leaves = vec![[0u8; 32]; geo.blocks() as usize];
    hash_runs(
        file,
        path,
        geo,
        &[(0, geo.blocks())],
        &mut leaves,
        stats,
        cancel,
    )?;
    Ok(leaves)
}

/// Hashes the blocks in `runs` (`(first block, count)`, ascending, disjoint) into `leaves`.
///
/// The file is memory-mapped; work is cut into segments of up to 8 MiB that rayon's threads
/// (one per core) take in ascending order, so the file is read in large, nearly sequential
/// runs. Each segment's hashes go straight into its own part of `leaves`. On an error
/// (`cancel` raised, the file shrank) `leaves` may be partly updated.
pub fn hash_runs(
    file: &File,
    path: &Path,
    geo: Geometry,
    runs: &[(u64, u64)],
    leaves: &mut [Hash],
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let per_seg = (SEGMENT_BYTES / geo.block_size as u64).max(1);
    // (first block, its leaves), ascending: `leaves` cut into one disjoint slice per segment.
    let mut segs: Vec<(u64, &mut [Hash])> = Vec::new();
    let mut rest = leaves;
    let mut base = 0u64;
    for &(start, count) in runs {
        let end = start + count;
        assert!(end <= geo.blocks(), "run beyond the end of the disk");
        assert!(start >= base, "runs not ascending and disjoint");
        let mut s = start;
        while s < end {
            let n = per_seg.min(end - s);
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - base) as usize);
            let (seg, tail) = tail.split_at_mut(n as usize);
            segs.push((s, seg));
            rest = tail;
            base = s + n;
            s += n;
        }
    }
    let span = |s: u64, n: usize| {
        let (off, _) = geo.block(s);
        let (loff, llen) = geo.block(s + n as u64 - 1);
        (off, loff + llen as u64)
    };
    let total: u64 = segs
        .iter()
        .map(|(s, seg)| {
            let (off, end) = span(*s, seg.len());
            end - off
        })
        .sum();
    stats.bytes_to_hash.store(total, Ordering::Relaxed);
    stats.bytes_hashed.store(0, Ordering::Relaxed);

    if segs.is_empty() {
        return Ok(());
    }
    // Map the file: hashing straight from the page cache saves a copy per byte.
    // SAFETY: the caller holds the disk lock, so no one truncates or writes the file while
    // the mapping lives (a truncation under it would fault).
    let map =
        unsafe { memmap2::MmapOptions::new().map(file) }.map_err(|e| Error::io("mmap", path, e))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let bs = geo.block_size as usize;
    // `par_bridge` hands the segments out one at a time in the order of the iterator (not
    // split into far-apart halves as an indexed parallel iterator would be).
    let hashed = segs.into_iter().par_bridge().try_for_each(|(s, out)| {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let (off, end) = span(s, out.len());
        if end > map.len() as u64 {
            return Err(Error::io(
                "hash",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while hashing",
                ),
            ));
        }
        let data = &map[off as usize..end as usize];
        for (h, block) in out.iter_mut().zip(data.chunks(bs)) {
            *h = leaf_hash(block);
        }
        Stats::add(&stats.bytes_hashed, data.len() as u64);
        Ok(())
    });
    // A cancel raised while the last segments were hashed (or while another thread met a
    // shrunk file) still cancels.
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    hashed
}

/// Turns a sorted list of block indices into `(first, count)` runs.
pub fn runs_of(indices: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in indices {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Reads block `i` of `file` into `buf` (resized to the block's length).
pub fn read_block(
    file: &File,
    path: &Path,
    geo: Geometry,
    i: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (off, len) = geo.block(i);
    buf.resize(len, 0);
    file.read_exact_at(buf, off)
        .map_err(|e| Error::io("read", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let g = Geometry::new(10 * 4096 + 5, 4096).unwrap();
        assert_eq!(g.blocks(), 11);
        assert_eq!(g.block(10), (40960, 5));
        assert_eq!(g.blocks_of(4095, 2), 0..2);
        assert_eq!(g.blocks_of(40960, 100), 10..11);
        assert_eq!(g.blocks_of(50000, 1), 0..0);
        assert_eq!(g.blocks_of(0, 0), 0..0);
        assert!(Geometry::new(1, 1000).is_err());
        assert_eq!(Geometry::new(0, 4096).unwrap().blocks(), 0);
    }

    #[test]
    fn runs() {
        assert_eq!(runs_of([1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs_of([]).is_empty());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[3..]));
    }

    /// Segments hashed on every core give each block's own leaf hash, in place, for whole
    /// files and for runs with gaps (several segments, a short last block).
    #[test]
    fn parallel_hashing_matches_block_by_block() {
        let bs = 4096u32;
        let size = 3 * SEGMENT_BYTES + 5 * bs as u64 + 123;
        let mut data = vec![0u8; size as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let geo = Geometry::new(size, bs).unwrap();
        let want: Vec<Hash> = data.chunks(bs as usize).map(leaf_hash).collect();
        let stats = Stats::default();
        let no = AtomicBool::new(false);
        let p = Path::new("test.img");
        assert_eq!(hash_file(&f, p, geo, &stats, &no).unwrap(), want);
        assert_eq!(stats.bytes_hashed.load(Ordering::Relaxed), size);

        let n = geo.blocks();
        let runs = [(0, 1), (5, 2100), (3000, 3000), (n - 2, 2)];
        let mut leaves = vec![[7u8; 32]; n as usize];
        hash_runs(&f, p, geo, &runs, &mut leaves, &stats, &no).unwrap();
        for (i, l) in leaves.iter().enumerate() {
            let i = i as u64;
            let hashed = runs.iter().any(|&(s, c)| (s..s + c).contains(&i));
            assert_eq!(
                *l,
                if hashed { want[i as usize] } else { [7; 32] },
                "block {i}"
            );
        }

        let yes = AtomicBool::new(true);
        assert!(matches!(
            hash_file(&f, p, geo, &stats, &yes),
            Err(Error::Cancelled)
        ));
        let bigger = Geometry::new(size + SEGMENT_BYTES, bs).unwrap();
        let e = hash_file(&f, p, bigger, &stats, &no).unwrap_err();
        assert!(e.to_string().contains("file shrank"), "{e}");
    }

    #[test]
    fn leaf_differs_from_plain_blake3() {
        assert_ne!(leaf_hash(b"abc"), *blake3::hash(b"abc").as_bytes());
        assert_ne!(leaf_hash(b""), leaf_hash(&[0]));
    }
}
