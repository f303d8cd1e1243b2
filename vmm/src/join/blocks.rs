//! Disk blocks during a join: [`BlockWrites`] records which blocks the guest writes while
//! the copy runs (so they are sent again), and [`BlockBatch`] is how blocks travel.
//!
//! Blocks are disksync's (64 KiB by default, the last one possibly short), hashed with
//! disksync's leaf hash, so the joiner's hashes and the primary's compare directly and the
//! final check is disksync's Merkle root.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use disksync::hash::Geometry;
use thiserror::Error;

/// Most blocks one batch carries.
pub const MAX_BATCH_BLOCKS: usize = 64;

/// A block batch that does not decode.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("block batch malformed at byte {offset}: {what}")]
pub struct BatchError {
    /// Where.
    pub offset: usize,
    /// What is wrong.
    pub what: String,
}

/// The blocks the guest wrote since tracking started or since the last [`take`](Self::take).
/// The block device marks a block after its write completed; a copier takes the set first and
/// reads the blocks after, so a block written after it was read is in the next set.
#[derive(Debug)]
pub struct BlockWrites {
    geo: Geometry,
    active: AtomicBool,
    dirty: Mutex<BTreeSet<u64>>,
}

impl BlockWrites {
    /// A tracker for a disk of this geometry, not tracking yet.
    pub fn new(geo: Geometry) -> Self {
        BlockWrites {
            geo,
            active: AtomicBool::new(false),
            dirty: Mutex::new(BTreeSet::new()),
        }
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Starts tracking with an empty set.
    pub fn start(&self) {
        self.lock().clear();
        self.active.store(true, Ordering::SeqCst);
    }

    /// Stops tracking (and forgets the set).
    pub fn stop(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.lock().clear();
    }

    /// Whether tracking is on.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// The guest wrote `len` bytes at byte `offset` (called after the write completed).
    pub fn wrote(&self, offset: u64, len: u64) {
        if self.active() {
            self.lock().extend(self.geo.blocks_of(offset, len));
        }
    }

    /// The blocks written since the last take, ascending; the set starts empty again.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }

    /// How many blocks were written since the last take.
    pub fn count(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Whether block `i` was written since the last take (a copier skips it: the next set
    /// has it).
    pub fn pending(&self, i: u64) -> bool {
        self.lock().contains(&i)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Disk blocks with their contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBatch {
    /// (block index, contents), indices strictly increasing.
    pub blocks: Vec<(u64, Vec<u8>)>,
}

impl BlockBatch {
    /// Reads the blocks `indices` yields (ascending; at most [`MAX_BATCH_BLOCKS`] are taken,
    /// the rest are left in the iterator) from `disk`.
    pub fn read(
        disk: &File,
        geo: Geometry,
        indices: &mut impl Iterator<Item = u64>,
    ) -> std::io::Result<BlockBatch> {
        let mut blocks = Vec::new();
        for i in indices.by_ref() {
            let (off, len) = geo.block(i);
            let mut buf = vec![0u8; len];
            disk.read_exact_at(&mut buf, off)?;
            blocks.push((i, buf));
            if blocks.len() == MAX_BATCH_BLOCKS {
                break;
            }
        }
        Ok(BlockBatch { blocks })
    }

    /// Bytes of block contents.
    pub fn data_bytes(&self) -> u64 {
        self.blocks.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// `count u32 | count × (block u64 | len u32 | bytes[len])`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.data_bytes() as usize + 12 * self.blocks.len());
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for (i, d) in &self.blocks {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&(d.len() as u32).to_le_bytes());
            out.extend_from_slice(d);
        }
        out
    }

    /// Decodes a batch for a disk of geometry `geo`: indices strictly increasing and on the
    /// disk, every block exactly its length, nothing trailing.
    pub fn decode(buf: &[u8], geo: Geometry) -> Result<BlockBatch, BatchError> {
        let err = |offset: usize, what: String| BatchError { offset, what };
        let mut pos = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], BatchError> {
            if buf.len() - pos < n {
                return Err(err(pos, format!("truncated {what}")));
            }
            let s = &buf[pos..pos + n];
            pos += n;
            Ok(s)
        };
        let count = u32::from_le_bytes(take(4, "count")?.try_into().expect("4")) as usize;
        if count > MAX_BATCH_BLOCKS {
            return Err(err(0, format!("{count} blocks (limit {MAX_BATCH_BLOCKS})")));
        }
        let mut blocks = Vec::with_capacity(count);
        let mut last: Option<u64> = None;
        for _ in 0..count {
            let i = u64::from_le_bytes(take(8, "block index")?.try_into().expect("8"));
            let len = u32::from_le_bytes(take(4, "block length")?.try_into().expect("4")) as usize;
            if i >= geo.blocks() {
                return Err(err(
                    0,
                    format!("block {i} is past the disk ({} blocks)", geo.blocks()),
                ));
            }
            if last.is_some_and(|l| i <= l) {
                return Err(err(0, format!("block {i} out of order")));
            }
            let want = geo.block(i).1;
            if len != want {
                return Err(err(0, format!("block {i} has {len} bytes, not {want}")));
            }
            blocks.push((i, take(len, "block data")?.to_vec()));
            last = Some(i);
        }
        if pos != buf.len() {
            return Err(err(pos, format!("{} trailing bytes", buf.len() - pos)));
        }
        Ok(BlockBatch { blocks })
    }

    /// Writes the blocks into `disk` (not synced: the caller syncs once at the end) and
    /// updates `leaves`, the disk's leaf hashes.
    pub fn apply(
        &self,
        disk: &File,
        geo: Geometry,
        leaves: &mut [[u8; 32]],
    ) -> std::io::Result<()> {
        for (i, d) in &self.blocks {
            disk.write_all_at(d, geo.block(*i).0)?;
            if let Some(l) = leaves.get_mut(*i as usize) {
                *l = disksync::hash::leaf_hash(d);
            }
        }
        Ok(())
    }
}

/// The leaf hashes of every block of `disk`.
pub fn hash_disk(disk: &File, geo: Geometry) -> std::io::Result<Vec<[u8; 32]>> {
    let mut leaves = Vec::with_capacity(geo.blocks() as usize);
    let mut buf = Vec::new();
    for i in 0..geo.blocks() {
        let (off, len) = geo.block(i);
        buf.resize(len, 0);
        disk.read_exact_at(&mut buf, off)?;
        leaves.push(disksync::hash::leaf_hash(&buf));
    }
    Ok(leaves)
}

/// The disk's Merkle root from its leaf hashes.
pub fn root_of(leaves: &[[u8; 32]], geo: Geometry) -> [u8; 32] {
    disksync::Tree::from_leaves(leaves.to_vec()).root(geo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geo() -> Geometry {
        Geometry::new(3 * 4096 + 100, 4096).unwrap()
    }

    #[test]
    fn writes_are_tracked_only_while_active_and_take_empties_the_set() {
        let w = BlockWrites::new(geo());
        w.wrote(0, 10);
        assert!(w.take().is_empty(), "not tracking yet");
        w.start();
        w.wrote(4095, 2);
        w.wrote(3 * 4096, 50);
        assert_eq!(w.take(), vec![0, 1, 3]);
        assert!(w.take().is_empty());
        w.stop();
        w.wrote(0, 1);
        assert!(w.take().is_empty());
    }

    #[test]
    fn a_batch_round_trips_and_applies() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("a"))
            .unwrap();
        src.set_len(geo().disk_size).unwrap();
        src.write_all_at(&[7u8; 5000], 0).unwrap();
        src.write_all_at(&[9u8; 100], 3 * 4096).unwrap();
        let dst = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("b"))
            .unwrap();
        dst.set_len(geo().disk_size).unwrap();
        let mut leaves = hash_disk(&dst, geo()).unwrap();
        assert_ne!(leaves, hash_disk(&src, geo()).unwrap());
        let b = BlockBatch::read(&src, geo(), &mut [0u64, 1, 3].into_iter()).unwrap();
        let d = BlockBatch::decode(&b.encode(), geo()).unwrap();
        assert_eq!(d, b);
        d.apply(&dst, geo(), &mut leaves).unwrap();
        assert_eq!(leaves, hash_disk(&src, geo()).unwrap());
        assert_eq!(hash_disk(&dst, geo()).unwrap(), leaves);
        assert_eq!(
            root_of(&leaves, geo()),
            root_of(&hash_disk(&src, geo()).unwrap(), geo())
        );
    }

    #[test]
    fn bad_batches_are_refused() {
        let one = |i: u64, len: u32| {
            let mut v = 1u32.to_le_bytes().to_vec();
            v.extend_from_slice(&i.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend(std::iter::repeat_n(0u8, len as usize));
            v
        };
        assert!(BlockBatch::decode(&one(0, 4096), geo()).is_ok());
        assert!(BlockBatch::decode(&one(3, 100), geo()).is_ok());
        assert!(
            BlockBatch::decode(&one(4, 4096), geo()).is_err(),
            "past the disk"
        );
        assert!(
            BlockBatch::decode(&one(3, 4096), geo()).is_err(),
            "last block is short"
        );
        assert!(
            BlockBatch::decode(&one(0, 100), geo()).is_err(),
            "wrong length"
        );
        let mut t = one(0, 4096);
        t.push(0);
        assert!(BlockBatch::decode(&t, geo()).is_err(), "trailing byte");
        let mut two = 2u32.to_le_bytes().to_vec();
        for _ in 0..2 {
            two.extend_from_slice(&1u64.to_le_bytes());
            two.extend_from_slice(&4096u32.to_le_bytes());
            two.extend(std::iter::repeat_n(0u8, 4096));
        }
        assert!(BlockBatch::decode(&two, geo()).is_err(), "repeated block");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = BlockBatch::decode(&b, geo());
        }
    }
}
