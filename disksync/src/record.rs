//! The written-block record: which blocks a running VM wrote since a generation began.
//!
//! A bitmap file (one bit per block, 4 KiB header) next to the image. The VMM's block device
//! calls [`WrittenBlocks::mark`] for every write and [`WrittenBlocks::flush`] to persist.
//! Bits only ever go from 0 to 1 within a generation, so the file is updated in place, page by
//! page, and a torn page write can only lose bits that were not yet flushed. A new generation
//! replaces the file atomically ([`WrittenBlocks::create`]: temp file, fsync, rename).
//!
//! **Write-ahead rule** (as DRBD's activity log): when `mark` returns `true` (a block is marked
//! for the first time in this generation), call `flush` before the data write can reach the
//! disk; otherwise a crash may leave data on disk that the record does not know about. Writes
//! to blocks already marked need no flush of the record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::hash::Geometry;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FTVMWBR1";
const HEADER: u64 = 4096;
const PAGE: usize = 4096;

/// The persisted set of blocks written since `generation` began.
#[derive(Debug)]
pub struct WrittenBlocks {
    path: PathBuf,
    file: Mutex<File>,
    geo: Geometry,
    generation: u64,
    words: Vec<AtomicU64>,
    dirty_pages: Vec<AtomicBool>,
    any_dirty: AtomicBool,
}

fn header(geo: Geometry, generation: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&geo.block_size.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..32].copy_from_slice(&geo.disk_size.to_le_bytes());
    h
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub(crate) fn write_atomic(path: &Path, contents: &[&[u8]]) -> Result<()> {
    let tmp = crate::sidecar(path, "tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    for c in contents {
        f.write_all(c).map_err(|e| Error::io("write", &tmp, e))?;
    }
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename to", path, e))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl WrittenBlocks {
    /// Starts an empty record for `generation` at `path`, replacing any previous one
    /// atomically.
    pub fn create(path: impl AsRef<Path>, generation: u64, geo: Geometry) -> Result<Self> {
        let path = path.as_ref();
        let nbytes = geo.blocks().div_ceil(8) as usize;
        write_atomic(path, &[&header(geo, generation), &vec![0u8; nbytes]])?;
        Self::open(path)
    }

    /// Opens an existing record.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let mut h = vec![0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io("read header of", path, e))?;
        if &h[..8] != MAGIC || h[8..12] != 1u32.to_le_bytes() {
            return Err(Error::bad_file(
                path,
                "not a written-block record (bad magic/version)",
            ));
        }
        let bs = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let generation = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let size = u64::from_le_bytes(h[24..32].try_into().unwrap());
        let geo = Geometry::new(size, bs).map_err(|e| Error::bad_file(path, e.to_string()))?;
        let nbytes = geo.blocks().div_ceil(8) as usize;
        let mut bits = vec![0u8; nbytes];
        file.read_exact_at(&mut bits, HEADER)
            .map_err(|e| Error::bad_file(path, format!("bitmap truncated: {e}")))?;
        let r = Self::empty(path, file, geo, generation);
        r.or_bitmap(&bits);
        r.any_dirty.store(false, Ordering::Relaxed);
        for p in &r.dirty_pages {
            p.store(false, Ordering::Relaxed);
        }
        Ok(r)
    }

    fn empty(path: &Path, file: File, geo: Geometry, generation: u64) -> Self {
        let nbytes = geo.blocks().div_ceil(8) as usize;
        WrittenBlocks {
            path: path.to_owned(),
            file: Mutex::new(file),
            geo,
            generation,
            words: (0..geo.blocks().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            dirty_pages: (0..nbytes.div_ceil(PAGE))
                .map(|_| AtomicBool::new(false))
                .collect(),
            any_dirty: AtomicBool::new(false),
        }
    }

    /// The generation this record started at.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The disk geometry it covers.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks every block touched by a write of `len` bytes at `offset`. Returns `true` if at
    /// least one block was not marked before (then [`flush`](Self::flush) before the data
    /// write, see the module docs). Thread-safe.
    pub fn mark(&self, offset: u64, len: u64) -> bool {
        let mut new = false;
        for b in self.geo.blocks_of(offset, len) {
            new |= self.mark_block(b);
        }
        new
    }

    /// Marks block `i`; returns `true` if it was not marked before.
    pub fn mark_block(&self, i: u64) -> bool {
        if i >= self.geo.blocks() {
            return false;
        }
        let bit = 1u64 << (i % 64);
        let old = self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if old & bit == 0 {
            self.dirty_pages[(i / 8) as usize / PAGE].store(true, Ordering::Release);
            self.any_dirty.store(true, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Marked blocks, ascending.
    pub fn blocks(&self) -> Vec<u64> {
        bitmap_blocks(&self.bitmap(), self.geo.blocks())
    }

    /// The bitmap as bytes (bit `i % 8` of byte `i / 8` is block `i`).
    pub fn bitmap(&self) -> Vec<u8> {
        let nbytes = self.geo.blocks().div_ceil(8) as usize;
        let mut out: Vec<u8> = self
            .words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        out.truncate(nbytes);
        out
    }

    /// Marks every block set in `bits` (a bitmap as returned by [`bitmap`](Self::bitmap)).
    pub fn or_bitmap(&self, bits: &[u8]) {
        for i in bitmap_blocks(bits, self.geo.blocks()) {
            self.mark_block(i);
        }
    }

    /// Persists the marks made since the last flush (in-place page writes, then fdatasync).
    pub fn flush(&self) -> Result<()> {
        let file = self.file.lock().unwrap();
        if !self.any_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let bits = self.bitmap();
        for (p, d) in self.dirty_pages.iter().enumerate() {
            if d.swap(false, Ordering::AcqRel) {
                let lo = p * PAGE;
                let hi = (lo + PAGE).min(bits.len());
                file.write_all_at(&bits[lo..hi], HEADER + lo as u64)
                    .map_err(|e| Error::io("write", &self.path, e))?;
            }
        }
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))
    }
}

/// Blocks set in a bitmap, ascending, below `nblocks`.
pub fn bitmap_blocks(bits: &[u8], nblocks: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (byte_i, &b) in bits.iter().enumerate() {
        if b == 0 {
            continue;
        }
        for bit in 0..8 {
            let i = byte_i as u64 * 8 + bit;
            if b & (1 << bit) != 0 && i < nblocks {
                out.push(i);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_flush_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ftvm-written");
        let geo = Geometry::new(100 * 4096 * 8 * 4096 + 3, 4096).unwrap(); // > 1 bitmap page
        let r = WrittenBlocks::create(&p, 7, geo).unwrap();
        assert!(r.mark(4095, 2)); // blocks 0 and 1
        assert!(!r.mark(0, 1));
        assert!(r.mark(geo.disk_size - 1, 1)); // last block
        assert!(r.mark(40000 * 4096, 1));
        assert!(!r.mark(geo.disk_size, 10)); // beyond the end: nothing
        r.flush().unwrap();
        r.mark(5 * 4096, 1); // not flushed
        drop(r);
        let r = WrittenBlocks::open(&p).unwrap();
        assert_eq!(r.generation(), 7);
        assert_eq!(r.geometry(), geo);
        assert_eq!(r.blocks(), vec![0, 1, 40000, geo.blocks() - 1]);
        assert_eq!(r.count(), 4);
        let r2 = WrittenBlocks::create(&p, 8, geo).unwrap();
        assert_eq!(r2.count(), 0);
        assert_eq!(WrittenBlocks::open(&p).unwrap().generation(), 8);
    }

    #[test]
    fn rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        assert!(matches!(
            WrittenBlocks::open(&p),
            Err(Error::BadFile { .. })
        ));
    }
}
