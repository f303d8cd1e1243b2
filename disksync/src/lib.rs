//! Bringing a diverged disk back in line with blake3 block hashes (DESIGN §6).
//!
//! A disk image is cut into fixed blocks (64 KiB by default); each block gets a blake3 leaf
//! hash, a binary Merkle tree is built over the leaves, and two sides compare their trees
//! top-down so that only differing subtrees are walked and only differing blocks travel.
//! Every resync ends with the root hash (which also covers the disk size and block size)
//! verified on both sides.
//!
//! Pieces:
//! - [`hash`]: block geometry, leaf hashing of whole files or selected blocks on all cores;
//! - [`merkle`]: the tree and the top-down comparison ([`merkle::Walker`]);
//! - [`record`]: the written-block record ([`record::WrittenBlocks`]) a running VM keeps, and
//!   [`cache::LeafCache`], the leaf hashes at the generation the record started at: together
//!   they make the fast path that hashes only blocks written since;
//! - [`lock`]: the advisory disk lock shared with `ftvm-node`;
//! - [`proto`], [`session`], [`net`]: the QUIC + mutual-TLS transport (serve / pull / verify);
//! - [`local`]: two local files, no network.

pub mod cache;
pub mod error;
pub mod hash;
pub mod local;
pub mod lock;
pub mod merkle;
pub mod net;
pub mod proto;
pub mod record;
pub mod session;
pub mod stats;

mod state;

pub use error::{Error, Result};
pub use hash::{Geometry, Hash, DEFAULT_BLOCK_SIZE};
pub use merkle::Tree;
pub use stats::Stats;

/// Sidecar file names next to a disk image `PATH`: `PATH.ftvm-written` (written-block
/// record), `PATH.ftvm-leaves` (leaf cache), `PATH.ftvm-pull` (resume state of a pull).
pub fn sidecar(disk: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    std::path::PathBuf::from(s)
}

/// Default path of a disk's written-block record.
pub fn record_path(disk: &std::path::Path) -> std::path::PathBuf {
    sidecar(disk, "ftvm-written")
}

/// Default path of a disk's leaf cache.
pub fn cache_path(disk: &std::path::Path) -> std::path::PathBuf {
    sidecar(disk, "ftvm-leaves")
}

/// Default path of a pull's resume state.
pub fn state_path(disk: &std::path::Path) -> std::path::PathBuf {
    sidecar(disk, "ftvm-pull")
}
