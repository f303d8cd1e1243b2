//! The logging channel between primary and backup (DESIGN §5 "The stream"): one QUIC
//! connection with mutual TLS, one bidirectional stream carrying [`msg`] frames — log records
//! in the recorder's own codec primary→backup, acks and divergence reports backup→primary.
//!
//! Pieces:
//! - [`msg`]: the message types and their framing, the handshake's configuration comparison;
//! - [`gate`]: the Output Rule and its lease, as a pure state machine;
//! - [`lag`]: the backup's lag, as a pure state machine;
//! - [`primary`]: the primary's output task — takes records and frames from the vCPU thread
//!   (never blocking it), sends batches and heartbeats, applies acks, releases frames;
//! - [`backup`]: the backup's receive task — decodes and checks records as they arrive, feeds
//!   the replayer, acknowledges.
//! - [`connect`]: endpoints, connecting and accepting with the peer's identity checked.

pub mod backup;
pub mod connect;
pub mod gate;
pub mod lag;
pub mod msg;
pub mod primary;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters and gauges of the channel, shared with `status` and the metrics endpoint.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Log bytes sent (primary) or received (backup).
    pub log_bytes: AtomicU64,
    /// Channel messages sent.
    pub messages_sent: AtomicU64,
    /// Acks received (primary) or sent (backup).
    pub acks: AtomicU64,
    /// Heartbeat intervals that passed with nothing from the peer.
    pub heartbeats_missed: AtomicU64,
    /// Frames held by the Output Rule now.
    pub frames_held: AtomicU64,
    /// Frames released to the TAP.
    pub frames_released: AtomicU64,
    /// Frames dropped (held bytes over the cap, or a denied claim).
    pub frames_dropped: AtomicU64,
    /// The highest watermark acknowledged by the backup.
    pub acked: AtomicU64,
    /// The last boundary the backup replayed.
    pub replayed: AtomicU64,
    /// The backup's lag, in nanoseconds.
    pub lag_ns: AtomicU64,
    /// The highest boundary whose frame was released (never above `acked + 1`).
    pub released_boundary: AtomicU64,
    /// Whether a peer is connected.
    pub peer_connected: AtomicBool,
    /// Whether the lag bound holds the vCPU now.
    pub throttled: AtomicBool,
    /// Boundaries at which the vCPU was held by the lag bound.
    pub throttle_waits: AtomicU64,
    /// Memory digests compared (backup).
    pub digests_checked: AtomicU64,
    /// The primary's busy time ([`busy_ns`](Self::busy_ns)) when the oldest batch the backup
    /// has not replayed was sent (0: none). The vCPU bounds its lag against it at every
    /// boundary, whenever the output task last ran.
    pub lag_oldest_busy_ns: AtomicU64,
    /// The lag bound, in nanoseconds (0: none).
    pub max_lag_ns: AtomicU64,
    /// Boundaries whose frames the Output Rule held and released.
    pub holds: AtomicU64,
    /// Their time from the vCPU's hand-off to the first frame's release, summed (ns).
    pub hold_ns: AtomicU64,
    /// Their time from the vCPU's hand-off to the output task's receipt, summed (ns).
    pub handoff_ns: AtomicU64,
    /// Primary messages echoed by an ack, and the time from each one's send to the first ack
    /// that echoed it, summed (ns): the round trip the Output Rule waits for, from the
    /// channel's tasks' point of view (QUIC's own estimate is `rtt_ns`).
    pub echoes: AtomicU64,
    /// See [`echoes`](Self::echoes).
    pub echo_ns: AtomicU64,
    /// The channel's round-trip time as QUIC estimates it, in nanoseconds.
    pub rtt_ns: AtomicU64,
    /// Wall-clock time (Unix ns) of the last frame released to the TAP (0: none yet).
    pub last_release_unix_ns: AtomicU64,
    /// Wall-clock time (Unix ns) of the release batch before the last one.
    pub prev_release_unix_ns: AtomicU64,
    /// Time the primary's vCPU spent not executing the guest (blocked in a WAIT, or held by
    /// the lag bound), as `(idle time so far, start of the idle period in progress or 0)`, in
    /// nanoseconds: the lag is measured in the rest, the primary's busy time, so an idle
    /// primary does not count as work the backup has to replay.
    pub idle: std::sync::Mutex<(u64, u64)>,
}

impl ChannelStats {
    /// The primary's busy clock: [`now_ns`] minus the time its vCPU was idle (an idle period
    /// in progress counts from its start), so it never goes backwards.
    pub fn busy_ns(&self) -> u64 {
        let (total, since) = *self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = if since > 0 { since } else { now_ns() };
        now.saturating_sub(total)
    }

    /// The vCPU stops executing the guest (a WAIT, or held by the lag bound).
    pub fn idle_begin(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).1 = now_ns().max(1);
    }

    /// The vCPU executes the guest again.
    pub fn idle_end(&self) {
        let mut g = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 > 0 {
            g.0 += now_ns().saturating_sub(g.1);
            g.1 = 0;
        }
    }
}

impl ChannelStats {
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets a gauge.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }
}

/// Monotonic nanoseconds since the first call (the channel's injected clock in production).
pub fn now_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}
