//! Resume state of an interrupted pull (`DISK.ftvm-pull`).
//!
//! Layout: a 4 KiB header (magic, geometry, the source's top hash), the target's leaf hashes
//! as they will be once the pull is complete for the blocks already done (n × 32 bytes), and
//! a bitmap of blocks still pending. Written atomically at the start of the transfer, then
//! updated in place at checkpoints, always after the target's data was fdatasync'ed: a torn
//! update can only make a done block look pending (it is sent again) or, at worst, make the
//! final root check fail, after which the state is discarded and a full compare runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::hash::{Geometry, Hash};
use crate::record::{bitmap_blocks, write_atomic};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FTVMPULL";
const HEADER: u64 = 4096;

pub(crate) struct PullState {
    path: PathBuf,
    file: File,
    pub geo: Geometry,
    pub source_top: Hash,
    pub leaves: Vec<Hash>,
    pending: Vec<u8>,
}

impl PullState {
    fn bitmap_off(geo: Geometry) -> u64 {
        HEADER + geo.blocks() * 32
    }

    pub fn create(
        path: &Path,
        geo: Geometry,
        source_top: Hash,
        leaves: Vec<Hash>,
        pending: &[u64],
    ) -> Result<Self> {
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&geo.block_size.to_le_bytes());
        h[12..20].copy_from_slice(&geo.disk_size.to_le_bytes());
        h[20..52].copy_from_slice(&source_top);
        let body: Vec<u8> = leaves.iter().flatten().copied().collect();
        let mut bits = vec![0u8; geo.blocks().div_ceil(8) as usize];
        for &i in pending {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
        write_atomic(path, &[&h, &body, &bits])?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        Ok(PullState {
            path: path.to_owned(),
            file,
            geo,
            source_top,
            leaves,
            pending: bits,
        })
    }

    /// Loads a state; `Ok(None)` if there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let bad = |r: &str| Error::bad_file(path, r.to_string());
        if data.len() < HEADER as usize || &data[..8] != MAGIC {
            return Err(bad("not a pull state file"));
        }
        let bs = u32::from_le_bytes(data[8..12].try_into().unwrap());
        let size = u64::from_le_bytes(data[12..20].try_into().unwrap());
        let geo = Geometry::new(size, bs).map_err(|e| bad(&e.to_string()))?;
        let n = geo.blocks() as usize;
        let boff = Self::bitmap_off(geo) as usize;
        if data.len() != boff + n.div_ceil(8) {
            return Err(bad("length does not match its geometry"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        Ok(Some(PullState {
            path: path.to_owned(),
            file,
            geo,
            source_top: data[20..52].try_into().unwrap(),
            leaves: data[HEADER as usize..boff]
                .chunks(32)
                .map(|c| c.try_into().unwrap())
                .collect(),
            pending: data[boff..].to_vec(),
        }))
    }

    pub fn pending(&self) -> Vec<u64> {
        bitmap_blocks(&self.pending, self.geo.blocks())
    }

    /// Records blocks as done (their data already fdatasync'ed) with their new leaf hashes.
    pub fn checkpoint(&mut self, done: &[(u64, Hash)]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let mut bytes = std::collections::BTreeSet::new();
        for &(i, h) in done {
            self.leaves[i as usize] = h;
            self.file
                .write_all_at(&h, HEADER + i * 32)
                .map_err(|e| Error::io("write", &self.path, e))?;
            self.pending[(i / 8) as usize] &= !(1 << (i % 8));
            bytes.insert((i / 8) as usize);
        }
        let boff = Self::bitmap_off(self.geo);
        for b in bytes {
            self.file
                .write_all_at(&self.pending[b..b + 1], boff + b as u64)
                .map_err(|e| Error::io("write", &self.path, e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))
    }

    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(|e| Error::io("remove", &self.path, e))
    }
}
