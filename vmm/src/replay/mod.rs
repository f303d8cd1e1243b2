//! Deterministic record and replay (DESIGN §3): the log codec, the recorder (live inputs that
//! also append to a log), the replayer (inputs from a log, checked against the guest's
//! fingerprints and memory digests), incremental memory digests, and running a replay.

pub mod codec;
pub mod digest;
pub mod recorder;
pub mod replayer;
pub mod run;

/// Figures about a log, for the one-line summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Boundary records (boundaries at which something was applied).
    pub boundary_records: u64,
    /// Events in them.
    pub events: u64,
    /// Memory digests.
    pub digests: u64,
    /// Bytes of log.
    pub bytes: u64,
}
