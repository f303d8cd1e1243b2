//! Building a disk's tree (full or fast path) and resync between two local files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::cache::LeafCache;
use crate::hash::{self, Geometry, Hash};
use crate::lock::DiskLock;
use crate::merkle::Tree;
use crate::stats::{Phase, Stats, Summary};
use crate::{Error, Result};

/// Where the leaves of a disk's tree come from.
#[derive(Debug, Clone, Copy)]
pub enum Leaves<'a> {
    /// Hash every block.
    Full,
    /// Fast path: take the cached leaves and re-hash only `candidates` (ascending) — the
    /// blocks written since the cache's generation, on either side.
    Fast {
        cache: &'a LeafCache,
        candidates: &'a [u64],
    },
}

/// Builds the Merkle tree of `file`.
pub fn disk_tree(
    file: &File,
    path: &Path,
    geo: Geometry,
    leaves: Leaves<'_>,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<Tree> {
    stats.set_phase(Phase::Hashing);
    let leaves = match leaves {
        Leaves::Full => hash::hash_file(file, path, geo, stats, cancel)?,
        Leaves::Fast { cache, candidates } => {
            if cache.geometry != geo {
                return Err(Error::Invalid(format!(
                    "leaf cache geometry {:?} does not match the disk {:?}",
                    cache.geometry, geo
                )));
            }
            let mut leaves = cache.leaves.clone();
            let runs = hash::runs_of(candidates.iter().copied());
            hash::hash_runs(file, path, geo, &runs, &mut leaves, stats, cancel)?;
            leaves
        }
    };
    Ok(Tree::from_leaves(leaves))
}

/// Writes `data` as block `i` of `file` (a zero block may be passed as an empty slice).
pub(crate) fn write_block(
    file: &File,
    path: &Path,
    geo: Geometry,
    i: u64,
    data: &[u8],
) -> Result<()> {
    let (off, len) = geo.block(i);
    if data.is_empty() {
        let zeros = vec![0u8; len];
        file.write_all_at(&zeros, off)
    } else {
        debug_assert_eq!(data.len(), len);
        file.write_all_at(data, off)
    }
    .map_err(|e| Error::io("write", path, e))
}

/// Leaf hash of an all-zero block `i`.
pub(crate) fn zero_leaf(geo: Geometry, i: u64) -> Hash {
    let (_, len) = geo.block(i);
    hash::leaf_hash(&vec![0u8; len])
}

/// Options of a local resync.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub block_size: u32,
    /// Change the target's size to the source's if they differ.
    pub resize: bool,
    /// Only compare; change nothing.
    pub verify_only: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            block_size: hash::DEFAULT_BLOCK_SIZE,
            resize: false,
            verify_only: false,
        }
    }
}

/// Makes `dst` equal to `src` (two local files): hashes both on all cores, copies only the
/// differing blocks in place, and verifies the root hash at the end.
pub fn local_resync(
    src: &DiskLock,
    dst: &DiskLock,
    opts: &LocalOptions,
    stats: &Stats,
) -> Result<Summary> {
    let t0 = Instant::now();
    let cancel = AtomicBool::new(false);
    let sgeo = hash::file_geometry(src.file(), src.path(), opts.block_size)?;
    let mut dgeo = hash::file_geometry(dst.file(), dst.path(), opts.block_size)?;
    if sgeo != dgeo {
        if !opts.resize || opts.verify_only {
            return Err(Error::SizeMismatch {
                source_size: sgeo.disk_size,
                target_size: dgeo.disk_size,
            });
        }
        dst.file()
            .set_len(sgeo.disk_size)
            .map_err(|e| Error::io("resize", dst.path(), e))?;
        dgeo = sgeo;
    }
    let geo = sgeo;
    stats
        .blocks_total
        .store(geo.blocks(), std::sync::atomic::Ordering::Relaxed);
    let src_stats = Stats::new();
    let (stree, dtree) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            disk_tree(
                src.file(),
                src.path(),
                geo,
                Leaves::Full,
                &src_stats,
                &cancel,
            )
        });
        let d = disk_tree(dst.file(), dst.path(), dgeo, Leaves::Full, stats, &cancel);
        (h.join().unwrap(), d)
    });
    let (stree, mut dtree) = (stree?, dtree?);
    stats.set_phase(Phase::Comparing);
    let differing = dtree.diff(&stree);
    Stats::add(&stats.blocks_differing, differing.len() as u64);
    let mut summary = Summary {
        blocks_compared: geo.blocks(),
        blocks_differing: differing.len() as u64,
        bytes_hashed: Stats::get(&stats.bytes_hashed) + Stats::get(&src_stats.bytes_hashed),
        differing_runs: hash::runs_of(differing.iter().copied()),
        ..Default::default()
    };
    if opts.verify_only {
        summary.root = dtree.root(geo);
        summary.elapsed = t0.elapsed();
        stats.set_phase(Phase::Done);
        return Ok(summary);
    }
    stats.set_phase(Phase::Transferring);
    stats
        .blocks_to_send
        .store(differing.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut buf = Vec::new();
    for &i in &differing {
        hash::read_block(src.file(), src.path(), geo, i, &mut buf)?;
        let h = hash::leaf_hash(&buf);
        if Some(h) != stree.node(0, i) {
            return Err(Error::BlockMismatch { index: i });
        }
        if hash::is_zero(&buf) {
            write_block(dst.file(), dst.path(), geo, i, &[])?;
            summary.zero_blocks += 1;
            Stats::add(&stats.zero_blocks, 1);
        } else {
            write_block(dst.file(), dst.path(), geo, i, &buf)?;
            summary.data_bytes += buf.len() as u64;
            Stats::add(&stats.data_bytes, buf.len() as u64);
        }
        dtree.set_leaf(i, h);
        summary.blocks_sent += 1;
        Stats::add(&stats.blocks_sent, 1);
    }
    dst.file()
        .sync_data()
        .map_err(|e| Error::io("fdatasync", dst.path(), e))?;
    stats.set_phase(Phase::Verifying);
    let (lr, rr) = (dtree.root(geo), stree.root(geo));
    if lr != rr {
        return Err(Error::RootMismatch {
            local: hash::hex(&lr),
            remote: hash::hex(&rr),
        });
    }
    summary.root = lr;
    summary.elapsed = t0.elapsed();
    stats.set_phase(Phase::Done);
    Ok(summary)
}
