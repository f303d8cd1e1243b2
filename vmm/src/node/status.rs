//! What a running node shows: its shared state, the control socket that `ftvm-node status`
//! reads (one request line `status`, one JSON answer line), and the Prometheus endpoint.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::channel::msg::Role;
use crate::channel::ChannelStats;

/// A failover as `status` and the logs report it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverReport {
    /// Seconds since the node started, when it happened.
    pub at_s: f64,
    /// Why (what was lost).
    pub why: String,
    /// The generation before.
    pub from_generation: u64,
    /// The generation after (0 if denied).
    pub to_generation: u64,
    /// From the last receipt to the decision (ms).
    pub detection_ms: f64,
    /// Replaying what was acknowledged (ms, backup only).
    pub catch_up_ms: f64,
    /// The witness round trip(s) (ms).
    pub claim_ms: f64,
    /// From the grant to running live (ms).
    pub go_live_ms: f64,
    /// The boundary the node went live at (backup) or carried on from (primary).
    pub boundary: u64,
}

/// A join as `status` reports it, on both sides (progress while it runs, the figures after).
#[derive(Clone, Debug, Default, Serialize)]
pub struct JoinReport {
    /// The other node.
    pub peer: String,
    /// copying, pausing, done or failed.
    pub phase: String,
    /// Pre-copy rounds so far.
    pub rounds: u32,
    /// Guest pages sent or received.
    pub pages: u64,
    /// Disk blocks sent or received.
    pub blocks: u64,
    /// Disk blocks that differed at the start (the first round's blocks).
    pub blocks_differing: u64,
    /// Disk blocks in all.
    pub disk_blocks: u64,
    /// Bytes of join messages sent or received.
    pub bytes: u64,
    /// What the join could not avoid sending: each distinct page with data and each distinct
    /// disk block, once (primary; `bytes` / this is the copy's overhead).
    pub needed_bytes: u64,
    /// The guest pause (ms): from the pause request until the vCPU ran again (primary).
    pub pause_ms: f64,
    /// Pages and blocks sent in the pause.
    pub pause_pages: u64,
    /// Blocks sent in the pause.
    pub pause_blocks: u64,
    /// The boundary of the state (the log starts after it).
    pub boundary: u64,
    /// The whole join (ms).
    pub total_ms: f64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The node's state, shared by its tasks, `status` and metrics.
#[derive(Debug)]
pub struct Shared {
    /// This node's name.
    pub node: String,
    /// The pair's name.
    pub pair: String,
    /// The current role.
    pub role: Mutex<Role>,
    /// The generation this node runs (or last ran) in.
    pub generation: AtomicU64,
    /// The boundary the VM passed.
    pub boundary: Arc<AtomicU64>,
    /// Channel counters.
    pub stats: Arc<ChannelStats>,
    /// The peer's name (or names).
    pub peer: String,
    /// The peer's role as last seen.
    pub peer_role: Mutex<Option<Role>>,
    /// Whether the witness answered the last request.
    pub witness_reachable: AtomicBool,
    /// The last witness problem, if any.
    pub witness_error: Mutex<Option<String>>,
    /// Failovers so far.
    pub failovers: AtomicU64,
    /// The last failover.
    pub last_failover: Mutex<Option<FailoverReport>>,
    /// Why the node halted, if it did.
    pub halt_reason: Mutex<Option<String>>,
    /// Joins completed (either side).
    pub joins: AtomicU64,
    /// The join running now, or the last one.
    pub join: Mutex<Option<JoinReport>>,
    /// When the node started.
    pub started: Instant,
}

impl Shared {
    /// Fresh state for `node` of `pair`.
    pub fn new(pair: &str, node: &str, peer: &str, generation: u64) -> Self {
        Shared {
            node: node.into(),
            pair: pair.into(),
            role: Mutex::new(Role::Starting),
            generation: AtomicU64::new(generation),
            boundary: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(ChannelStats::default()),
            peer: peer.into(),
            peer_role: Mutex::new(None),
            witness_reachable: AtomicBool::new(true),
            witness_error: Mutex::new(None),
            failovers: AtomicU64::new(0),
            last_failover: Mutex::new(None),
            halt_reason: Mutex::new(None),
            joins: AtomicU64::new(0),
            join: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the role (and logs it).
    pub fn set_role(&self, r: Role) {
        let mut g = self.role.lock().unwrap_or_else(|p| p.into_inner());
        if *g != r {
            tracing::info!(
                "role: {} -> {} (generation {})",
                g.name(),
                r.name(),
                self.generation.load(Ordering::Relaxed)
            );
            *g = r;
        }
    }

    /// Updates the join report.
    pub fn update_join(&self, f: impl FnOnce(&mut JoinReport)) {
        let mut g = self.join.lock().unwrap_or_else(|p| p.into_inner());
        f(g.get_or_insert_with(JoinReport::default));
    }

    /// Sets the role and updates the join report as one change: a [`status`](Self::status)
    /// read sees both or neither (a joiner that became the backup has its join "done").
    pub fn set_role_with_join(&self, r: Role, f: impl FnOnce(&mut JoinReport)) {
        // Lock order: the join report, then the role (as in `status`).
        let mut g = self.join.lock().unwrap_or_else(|p| p.into_inner());
        self.set_role(r);
        f(g.get_or_insert_with(JoinReport::default));
    }

    /// Seconds since start.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The status document.
    pub fn status(&self) -> Status {
        let s = &self.stats;
        let boundary = self.boundary.load(Ordering::Relaxed);
        let replayed = ChannelStats::get(&s.replayed);
        let up = self.uptime_s().max(1e-3);
        // The role and the join report read together (see `set_role_with_join`).
        let (role, join) = {
            let j = self.join.lock().unwrap_or_else(|p| p.into_inner());
            (self.role(), j.clone())
        };
        Status {
            pair: self.pair.clone(),
            node: self.node.clone(),
            role: role.name(),
            generation: self.generation.load(Ordering::Relaxed),
            boundary,
            peer: self.peer.clone(),
            peer_role: self
                .peer_role
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|r| r.name()),
            peer_connected: s.peer_connected.load(Ordering::Relaxed),
            lag_ms: ChannelStats::get(&s.lag_ns) as f64 / 1e6,
            lag_boundaries: if role == Role::Primary {
                boundary.saturating_sub(replayed)
            } else {
                0
            },
            acked: ChannelStats::get(&s.acked),
            replayed,
            log_bytes: ChannelStats::get(&s.log_bytes),
            log_bytes_per_s: ChannelStats::get(&s.log_bytes) as f64 / up,
            held_frames: ChannelStats::get(&s.frames_held),
            released_frames: ChannelStats::get(&s.frames_released),
            dropped_frames: ChannelStats::get(&s.frames_dropped),
            released_boundary: ChannelStats::get(&s.released_boundary),
            throttle_waits: ChannelStats::get(&s.throttle_waits),
            digests_checked: ChannelStats::get(&s.digests_checked),
            heartbeats_missed: ChannelStats::get(&s.heartbeats_missed),
            channel_rtt_ms: ChannelStats::get(&s.rtt_ns) as f64 / 1e6,
            echoes: ChannelStats::get(&s.echoes),
            echo_ms_total: ChannelStats::get(&s.echo_ns) as f64 / 1e6,
            holds: ChannelStats::get(&s.holds),
            hold_ms_total: ChannelStats::get(&s.hold_ns) as f64 / 1e6,
            handoff_ms_total: ChannelStats::get(&s.handoff_ns) as f64 / 1e6,
            witness_reachable: self.witness_reachable.load(Ordering::Relaxed),
            witness_error: self
                .witness_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            failovers: self.failovers.load(Ordering::Relaxed),
            last_failover: self
                .last_failover
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            halt_reason: self
                .halt_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            joins: self.joins.load(Ordering::Relaxed),
            join,
            uptime_s: self.uptime_s(),
        }
    }
}

/// `ftvm-node status --json`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The pair.
    pub pair: String,
    /// This node.
    pub node: String,
    /// starting, primary, alone, backup, joining, claiming or halted.
    pub role: &'static str,
    /// The generation.
    pub generation: u64,
    /// The boundary the VM passed.
    pub boundary: u64,
    /// The peer.
    pub peer: String,
    /// The peer's role as last seen.
    pub peer_role: Option<&'static str>,
    /// Whether the channel is up.
    pub peer_connected: bool,
    /// The backup's lag (ms; primary).
    pub lag_ms: f64,
    /// The backup's lag in boundaries (primary).
    pub lag_boundaries: u64,
    /// The highest acknowledged watermark.
    pub acked: u64,
    /// The backup's last replayed boundary.
    pub replayed: u64,
    /// Log bytes sent or received.
    pub log_bytes: u64,
    /// Log bytes per second since start.
    pub log_bytes_per_s: f64,
    /// Frames held by the Output Rule now.
    pub held_frames: u64,
    /// Frames released so far.
    pub released_frames: u64,
    /// Frames dropped.
    pub dropped_frames: u64,
    /// The highest boundary whose frame was released.
    pub released_boundary: u64,
    /// Boundaries at which the lag bound held the vCPU.
    pub throttle_waits: u64,
    /// Memory digests compared (backup).
    pub digests_checked: u64,
    /// Heartbeat intervals with nothing from the peer.
    pub heartbeats_missed: u64,
    /// The channel's round trip (QUIC's estimate, ms; primary).
    pub channel_rtt_ms: f64,
    /// Primary messages echoed by an ack (primary).
    pub echoes: u64,
    /// Their times from send to the first ack that echoed them, summed (ms): the round trip
    /// as the channel's tasks see it (`echo_ms_total / echoes` is its mean).
    pub echo_ms_total: f64,
    /// Boundaries whose frames the Output Rule held and released (primary).
    pub holds: u64,
    /// Their times from the vCPU's hand-off to the first frame's release, summed (ms).
    pub hold_ms_total: f64,
    /// The part of `hold_ms_total` from the vCPU's hand-off to the output task's receipt.
    pub handoff_ms_total: f64,
    /// Whether the witness answered the last request.
    pub witness_reachable: bool,
    /// The last witness problem.
    pub witness_error: Option<String>,
    /// Failovers so far.
    pub failovers: u64,
    /// The last failover.
    pub last_failover: Option<FailoverReport>,
    /// Why the node halted.
    pub halt_reason: Option<String>,
    /// Joins completed.
    pub joins: u64,
    /// The join running now, or the last one.
    pub join: Option<JoinReport>,
    /// Seconds since start.
    pub uptime_s: f64,
}

/// Serves the control socket at `path` until the process ends.
pub async fn serve_control(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A socket left by a dead node (the disk lock makes a live one impossible).
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r);
            let read = tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await;
            let answer = match (read, line.trim()) {
                (Ok(Ok(_)), "status") => serde_json::to_string(&shared.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                _ => "{\"error\":\"unknown request (the only one is `status`)\"}".to_string(),
            };
            let _ = w.write_all(answer.as_bytes()).await;
            let _ = w.write_all(b"\n").await;
        });
    }
}

/// Asks the node at the control socket `path` for its status (the JSON text).
pub fn query(path: &Path) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the node at {}: {e} (is it running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"status\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim().to_string())
}

/// Starts the Prometheus endpoint at `addr` and keeps its gauges current from `shared`.
pub fn start_metrics(addr: std::net::SocketAddr, shared: Arc<Shared>) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            publish(&shared);
        }
    });
    Ok(())
}

fn publish(sh: &Shared) {
    let st = sh.status();
    for r in [
        Role::Starting,
        Role::Primary,
        Role::Alone,
        Role::Backup,
        Role::Joining,
        Role::Claiming,
        Role::Halted,
    ] {
        metrics::gauge!("ftvm_node_role", "role" => r.name()).set(if st.role == r.name() {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!("ftvm_node_generation").set(st.generation as f64);
    metrics::gauge!("ftvm_node_boundary").set(st.boundary as f64);
    metrics::gauge!("ftvm_node_lag_seconds").set(st.lag_ms / 1e3);
    metrics::gauge!("ftvm_node_lag_boundaries").set(st.lag_boundaries as f64);
    metrics::gauge!("ftvm_node_peer_connected").set(if st.peer_connected { 1.0 } else { 0.0 });
    metrics::gauge!("ftvm_node_witness_reachable").set(if st.witness_reachable {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("ftvm_node_frames_held").set(st.held_frames as f64);
    let s = &sh.stats;
    let c = |name: &'static str, v: &AtomicU64| {
        metrics::counter!(name).absolute(v.load(Ordering::Relaxed));
    };
    c("ftvm_node_log_bytes_total", &s.log_bytes);
    c("ftvm_node_channel_messages_sent_total", &s.messages_sent);
    c("ftvm_node_acks_total", &s.acks);
    c("ftvm_node_heartbeats_missed_total", &s.heartbeats_missed);
    c("ftvm_node_frames_released_total", &s.frames_released);
    c("ftvm_node_frames_dropped_total", &s.frames_dropped);
    c("ftvm_node_throttle_waits_total", &s.throttle_waits);
    c("ftvm_node_digests_checked_total", &s.digests_checked);
    c("ftvm_node_frame_holds_total", &s.holds);
    c("ftvm_node_frame_hold_nanoseconds_total", &s.hold_ns);
    c("ftvm_node_frame_handoff_nanoseconds_total", &s.handoff_ns);
    c("ftvm_node_echoes_total", &s.echoes);
    c("ftvm_node_echo_nanoseconds_total", &s.echo_ns);
    metrics::counter!("ftvm_node_failovers_total").absolute(st.failovers);
    metrics::counter!("ftvm_node_joins_total").absolute(st.joins);
    if let Some(j) = &st.join {
        metrics::gauge!("ftvm_node_join_pages").set(j.pages as f64);
        metrics::gauge!("ftvm_node_join_blocks").set(j.blocks as f64);
        metrics::gauge!("ftvm_node_join_rounds").set(j.rounds as f64);
        metrics::gauge!("ftvm_node_join_pause_seconds").set(j.pause_ms / 1e3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_read_sees_a_joiners_role_and_its_join_report_together() {
        let shared = Arc::new(Shared::new("kv1", "b", "a", 0));
        shared.set_role(Role::Joining);
        shared.update_join(|j| j.phase = "restoring".into());
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    shared.set_role_with_join(Role::Backup, |j| j.phase = "done".into());
                    shared.set_role_with_join(Role::Joining, |j| j.phase = "restoring".into());
                }
            })
        };
        // Reads until the writer is done, one more after (so at least one read).
        loop {
            let done = writer.is_finished();
            let s = shared.status();
            let phase = s.join.map(|j| j.phase).unwrap_or_default();
            assert!(
                matches!(
                    (s.role, phase.as_str()),
                    ("backup", "done") | ("joining", "restoring")
                ),
                "role {} with join phase {phase}",
                s.role
            );
            if done {
                break;
            }
        }
        writer.join().unwrap();
    }
}
