//! Live counters of a resync, read by the progress display and the summary.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

/// Phases a resync goes through (for progress display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Hashing = 1,
    Comparing = 2,
    Transferring = 3,
    Verifying = 4,
    Done = 5,
}

/// Counters updated by the library while it works; cheap to share (`Arc<Stats>`).
#[derive(Debug, Default)]
pub struct Stats {
    phase: AtomicU8,
    /// Bytes of disk data hashed so far (local side).
    pub bytes_hashed: AtomicU64,
    /// Bytes the current hashing pass will hash in total.
    pub bytes_to_hash: AtomicU64,
    /// Blocks on the disk (compared by the Merkle walk).
    pub blocks_total: AtomicU64,
    /// Blocks found to differ.
    pub blocks_differing: AtomicU64,
    /// Blocks that must travel in this session (differing, not yet done).
    pub blocks_to_send: AtomicU64,
    /// Blocks transferred and written (or sent, on the source side).
    pub blocks_sent: AtomicU64,
    /// Of those, all-zero blocks that travelled as a marker only.
    pub zero_blocks: AtomicU64,
    /// Block payload bytes transferred (data, not counting zero markers).
    pub data_bytes: AtomicU64,
    /// Tree node hashes exchanged.
    pub hashes_exchanged: AtomicU64,
    /// UDP bytes sent and received on the connection (set at the end of a session).
    pub wire_tx: AtomicU64,
    pub wire_rx: AtomicU64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }
    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Hashing,
            2 => Phase::Comparing,
            3 => Phase::Transferring,
            4 => Phase::Verifying,
            _ => Phase::Done,
        }
    }
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// What a finished resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Blocks on the disk.
    pub blocks_compared: u64,
    /// Blocks found to differ (in a resumed pull: the differing blocks of the first run).
    pub blocks_differing: u64,
    /// Blocks transferred and written in this run.
    pub blocks_sent: u64,
    /// Of those, all-zero blocks sent as a marker only.
    pub zero_blocks: u64,
    /// Block payload bytes transferred.
    pub data_bytes: u64,
    /// Tree hashes exchanged.
    pub hashes_exchanged: u64,
    /// Bytes of the local disk hashed (the fast path hashes only candidate blocks).
    pub bytes_hashed: u64,
    /// UDP bytes sent plus received (0 for a local resync).
    pub wire_bytes: u64,
    /// True if this run resumed an interrupted pull.
    pub resumed: bool,
    /// True if the fast path (leaf cache + written-block records) was used.
    pub fast_path: bool,
    /// Differing block ranges `(first, count)` (for `verify`; after a pull, what was fixed).
    pub differing_runs: Vec<(u64, u64)>,
    /// The verified root hash at the end (for `verify`: the local root).
    pub root: crate::Hash,
    /// Wall time.
    pub elapsed: std::time::Duration,
    /// The target's block hashes at the end of a pull (empty for verify): with
    /// [`crate::session::FastPath::baseline_from_leaves`] they start a new generation without
    /// hashing the disk again.
    pub leaves: Vec<crate::Hash>,
}

impl Summary {
    /// One machine-readable line: `key=value` pairs.
    pub fn line(&self) -> String {
        format!(
            "compared={} differing={} sent={} zero={} data_bytes={} hashes={} hashed_bytes={} wire_bytes={} resumed={} fast={} elapsed={:.3}s root={}",
            self.blocks_compared,
            self.blocks_differing,
            self.blocks_sent,
            self.zero_blocks,
            self.data_bytes,
            self.hashes_exchanged,
            self.bytes_hashed,
            self.wire_bytes,
            self.resumed,
            self.fast_path,
            self.elapsed.as_secs_f64(),
            crate::hash::hex(&self.root),
        )
    }
}
