//! The leaf cache: a disk's block hashes at the moment a generation (and its written-block
//! record) began. With the record it gives the fast path: only marked blocks are re-hashed,
//! the other leaves come from the cache.

use std::path::{Path, PathBuf};

use crate::hash::{Geometry, Hash};
use crate::record::write_atomic;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FTVMLEAF";
const HEADER: usize = 64;

/// Leaf hashes of a disk at the start of `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafCache {
    pub generation: u64,
    pub geometry: Geometry,
    pub leaves: Vec<Hash>,
}

impl LeafCache {
    /// Writes the cache to `path` atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        if self.leaves.len() as u64 != self.geometry.blocks() {
            return Err(Error::Invalid(
                "leaf count does not match the geometry".into(),
            ));
        }
        let body: Vec<u8> = self.leaves.iter().flatten().copied().collect();
        let mut h = vec![0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..32].copy_from_slice(&self.geometry.disk_size.to_le_bytes());
        h[32..64].copy_from_slice(blake3::hash(&body).as_bytes());
        write_atomic(path.as_ref(), &[&h, &body])
    }

    /// Loads and checks a cache.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let bad = |r: &str| Error::bad_file(PathBuf::from(path), r.to_string());
        if data.len() < HEADER || &data[..8] != MAGIC || data[8..12] != 1u32.to_le_bytes() {
            return Err(bad("not a leaf cache (bad magic/version)"));
        }
        let bs = u32::from_le_bytes(data[12..16].try_into().unwrap());
        let generation = u64::from_le_bytes(data[16..24].try_into().unwrap());
        let size = u64::from_le_bytes(data[24..32].try_into().unwrap());
        let geometry = Geometry::new(size, bs).map_err(|e| bad(&e.to_string()))?;
        let body = &data[HEADER..];
        if body.len() as u64 != geometry.blocks() * 32 {
            return Err(bad("length does not match its geometry"));
        }
        if blake3::hash(body).as_bytes() != &data[32..64] {
            return Err(bad("checksum mismatch"));
        }
        let leaves = body.chunks(32).map(|c| c.try_into().unwrap()).collect();
        Ok(LeafCache {
            generation,
            geometry,
            leaves,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let geo = Geometry::new(3 * 4096 + 1, 4096).unwrap();
        let c = LeafCache {
            generation: 3,
            geometry: geo,
            leaves: vec![[1; 32], [2; 32], [3; 32], [4; 32]],
        };
        c.save(&p).unwrap();
        assert_eq!(LeafCache::load(&p).unwrap(), c);
        let mut d = std::fs::read(&p).unwrap();
        d[100] ^= 1;
        std::fs::write(&p, d).unwrap();
        assert!(matches!(LeafCache::load(&p), Err(Error::BadFile { .. })));
    }
}
