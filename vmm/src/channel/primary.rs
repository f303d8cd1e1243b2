//! The primary's side of the channel: the vCPU thread's adapters ([`ChannelLog`] for the
//! recorder's records, [`HeldFrames`] for transmitted frames, [`Throttle`] for the lag bound)
//! and the output task that owns the Output Rule ([`OutputGate`]).
//!
//! The vCPU thread never blocks on the network: it hands records and frames to the output
//! task through an unbounded queue, in the order it produced them, a boundary's in one message
//! ([`Handoff`]: one wake of the output task per boundary, not one per kind). The task sends a batch as
//! soon as it has one (so a frame waiting for its watermark is never delayed by batching),
//! applies acks, and writes released frames to the TAP. TAP writes change no guest state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::gate::{GateMode, OutputGate};
use super::lag::LagTracker;
use super::msg::{self, Msg, MsgReader};
use super::{now_ns, ChannelStats};
use crate::devices::tap::Tap;
use crate::devices::virtio::net::{FrameBatch, FrameSink};
use crate::epoch::{Boundary, ClockValue, Fingerprint, InputError, Inputs};
use crate::replay::codec::{Encoder, End, Record};
use crate::replay::recorder::LogSink;
use crate::signals::StopSignal;

/// What the vCPU thread hands to the output task.
#[derive(Debug)]
pub enum ToChannel {
    /// Encoded records; everything through `watermark` is now in the stream.
    Log {
        /// The records.
        bytes: Vec<u8>,
        /// The watermark after them.
        watermark: Boundary,
    },
    /// The frames the guest transmitted at `boundary`, in order.
    Frames {
        /// The boundary that took them.
        boundary: Boundary,
        /// The frames.
        frames: Vec<Vec<u8>>,
        /// When the vCPU handed them over ([`now_ns`]).
        taken_ns: u64,
    },
    /// A join's commit point, sent by the vCPU thread at the pause after boundary `from`:
    /// `link` is the new backup; `preamble` (the last pages and blocks and the state, encoded
    /// messages) goes out on it first, then the log that starts after `from`. From here on the
    /// Output Rule applies again with this backup.
    Attach {
        /// The joiner's connection.
        link: super::connect::Link,
        /// Its reader (bytes it sent that were not consumed yet).
        reader: MsgReader,
        /// Encoded messages to send before the log.
        preamble: Vec<u8>,
        /// The boundary of the state the joiner restores.
        from: Boundary,
    },
    /// What one boundary produced ([`Log`](Self::Log) and [`Frames`](Self::Frames)), in
    /// order: one message, so that the output task wakes once for it.
    Batch(Vec<ToChannel>),
}

/// The vCPU thread's end of its queue to the output task. Records and frames a boundary
/// produces are gathered and handed over in one message when the boundary has its frames,
/// when the vCPU is about to block in a WAIT, or when it leaves the boundary — whichever comes
/// first — so the output task (on another thread) is woken once per boundary. A boundary's
/// frames need the records before it (DESIGN §5), which are in the same message or an
/// earlier one: gathering never delays a frame's release.
#[derive(Clone)]
pub struct Handoff {
    gathered: Arc<std::sync::Mutex<Vec<ToChannel>>>,
    tx: mpsc::UnboundedSender<ToChannel>,
}

impl Handoff {
    /// A hand-off feeding `tx`.
    pub fn new(tx: mpsc::UnboundedSender<ToChannel>) -> Self {
        Handoff {
            gathered: Arc::default(),
            tx,
        }
    }

    fn gathered(&self) -> std::sync::MutexGuard<'_, Vec<ToChannel>> {
        self.gathered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gather(&self, m: ToChannel) {
        self.gathered().push(m);
    }

    /// Hands over what was gathered, as one message.
    pub fn send(&self) {
        let mut v = std::mem::take(&mut *self.gathered());
        let m = match v.len() {
            0 => return,
            1 => v.pop().expect("one"),
            _ => ToChannel::Batch(v),
        };
        // The task ends only when the node is going down: nothing to do about a lost batch.
        let _ = self.tx.send(m);
    }

    /// Drops the gathered records (a restarted log), keeping the frames.
    fn drop_log(&self) {
        self.gathered()
            .retain(|m| !matches!(m, ToChannel::Log { .. }));
    }
}

impl std::fmt::Debug for super::connect::Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({})", self.peer)
    }
}

/// The recorder's sink on a primary: records are gathered in the [`Handoff`] with a watermark
/// record whenever a watermark has new records behind it (a watermark with nothing new is
/// implied by the next frame or batch), and go to the output task at the recorder's
/// `log_handoff` (the boundary's end, or before a WAIT) or with the boundary's frames.
pub struct ChannelLog {
    buf: Vec<u8>,
    out: Handoff,
    header_sent: bool,
}

impl ChannelLog {
    /// A sink feeding `out`.
    pub fn new(out: Handoff) -> Self {
        ChannelLog {
            buf: Vec::new(),
            out,
            header_sent: false,
        }
    }

    fn gather(&mut self, watermark: Boundary) {
        let bytes = std::mem::take(&mut self.buf);
        self.out.gather(ToChannel::Log { bytes, watermark });
    }
}

impl LogSink for ChannelLog {
    fn log_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if !self.header_sent {
            self.header_sent = true;
            self.gather(0);
        }
        Ok(())
    }
    fn log_watermark(&mut self, w: Boundary) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            Encoder::new().encode(&Record::Watermark(w), &mut self.buf);
            self.gather(w);
        }
        Ok(())
    }
    fn log_handoff(&mut self) {
        self.out.send();
    }
    fn log_flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.gather(Boundary::MAX);
        }
        self.out.send();
        Ok(())
    }
    fn log_restart(&mut self) {
        self.buf.clear();
        self.out.drop_log();
        self.header_sent = false;
    }
}

/// The NIC's sink on a primary: every frame goes to the output task to be held, a boundary's
/// frames in one hand-off (with the records gathered before them).
pub struct HeldFrames {
    out: Handoff,
    batch: FrameBatch,
    live: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl HeldFrames {
    /// A sink feeding `out`.
    pub fn new(out: Handoff) -> Self {
        HeldFrames {
            out,
            batch: FrameBatch::default(),
            live: None,
        }
    }

    /// Drops every frame while `live` is false (a backup's guest transmits nothing until the
    /// node goes live).
    pub fn while_live(mut self, live: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.live = Some(live);
        self
    }
}

impl FrameSink for HeldFrames {
    fn send(&mut self, boundary: Boundary, frame: &[u8]) {
        if self.live.as_ref().is_none_or(|l| l.load(Ordering::Relaxed)) {
            self.batch.push(boundary, frame);
        }
    }
    fn flush(&mut self) {
        if let Some((boundary, frames)) = self.batch.take() {
            self.out.gather(ToChannel::Frames {
                boundary,
                frames,
                taken_ns: now_ns(),
            });
            self.out.send();
        }
    }
}

/// Wraps the primary's inputs: at every boundary, waits while the lag bound holds the vCPU
/// (the backup more than `max_lag` behind), stopping promptly on a signal.
pub struct Throttle<I: Inputs> {
    inner: I,
    stats: Arc<ChannelStats>,
    stop: Arc<StopSignal>,
}

impl<I: Inputs> Throttle<I> {
    /// Wraps `inner`.
    pub fn new(inner: I, stats: Arc<ChannelStats>, stop: Arc<StopSignal>) -> Self {
        Throttle { inner, stats, stop }
    }

    /// Whether the lag bound holds the vCPU: as the output task last judged it, or — checked
    /// here, so a late output task cannot let the lag run past the bound — the busy time
    /// since the oldest batch the backup has not replayed is over `max_lag`.
    fn held(&self) -> bool {
        if self.stats.throttled.load(Ordering::Relaxed) {
            return true;
        }
        let max = self.stats.max_lag_ns.load(Ordering::Relaxed);
        let oldest = self.stats.lag_oldest_busy_ns.load(Ordering::Relaxed);
        max > 0 && oldest > 0 && self.stats.busy_ns().saturating_sub(oldest) > max
    }
}

impl<I: Inputs> Inputs for Throttle<I> {
    fn wants_fingerprint(&self) -> bool {
        self.inner.wants_fingerprint()
    }
    fn boundary_end(&mut self, b: Boundary) -> Result<(), InputError> {
        self.inner.boundary_end(b)
    }
    fn boundary(&mut self, b: Boundary, fp: Option<Fingerprint>) -> Result<(), InputError> {
        if self.held() {
            ChannelStats::add(&self.stats.throttle_waits, 1);
            self.stats.idle_begin();
            while self.held() {
                if let Some(sig) = self.stop.signalled() {
                    self.stats.idle_end();
                    return Err(InputError::Stopped(sig));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            self.stats.idle_end();
        }
        self.inner.boundary(b, fp)
    }
    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError> {
        self.inner.clock(b)
    }
    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        self.inner.entropy(b)
    }
    fn wait(&mut self, b: Boundary, deadline: u64, room: usize) -> Result<ClockValue, InputError> {
        self.stats.idle_begin();
        let r = self.inner.wait(b, deadline, room);
        self.stats.idle_end();
        r
    }
    fn net_rx(&mut self, b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        self.inner.net_rx(b, room)
    }
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        self.inner.random(b, len)
    }
    fn disk_done(&mut self, b: Boundary, status: u8, hash: u64) -> Result<(), InputError> {
        self.inner.disk_done(b, status, hash)
    }
    fn digest_every(&self) -> u64 {
        self.inner.digest_every()
    }
    fn memory_digest(&mut self, b: Boundary, d: [u8; 32], c: [u8; 32]) -> Result<(), InputError> {
        self.inner.memory_digest(b, d, c)
    }
    fn stop_after(&self, b: Boundary) -> Option<i32> {
        self.inner.stop_after(b)
    }
    fn finish(&mut self, end: &End) -> Result<(), InputError> {
        self.inner.finish(end)
    }
}

/// Where every release of output is appended, one line per batch written to the TAP:
/// `<unix ns before the first write> <unix ns after the last> <node> <generation> <frames>
/// <highest boundary>` — so a checker can merge two nodes' logs and find any moment both
/// released (docs/testing.md). Each line is one `write` on an `O_APPEND` file, so a
/// `kill -9` loses at most the batch being written.
pub struct ReleaseLog {
    file: std::sync::Mutex<std::fs::File>,
    node: String,
    generation: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl ReleaseLog {
    /// Appends to `path` (created if missing) for `node`, reading the generation current at
    /// each release from `generation`.
    pub fn open(
        path: &std::path::Path,
        node: &str,
        generation: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(ReleaseLog {
            file: std::sync::Mutex::new(file),
            node: node.to_string(),
            generation,
        })
    }

    fn record(&self, first_ns: u64, last_ns: u64, frames: usize, boundary: Boundary) {
        use std::io::Write;
        let line = format!(
            "{first_ns} {last_ns} {} {} {frames} {boundary}\n",
            self.node,
            (self.generation)()
        );
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!("release log: {e}");
        }
    }
}

impl std::fmt::Debug for ReleaseLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseLog({})", self.node)
    }
}

/// Knobs of the output task.
#[derive(Clone, Debug)]
pub struct OutputConfig {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The pair's failure timeout.
    pub failure_timeout: Duration,
    /// Safety margin subtracted from the lease.
    pub margin: Duration,
    /// The lag bound.
    pub max_lag: Duration,
    /// Most bytes of frames held.
    pub cap_bytes: usize,
    /// Where releases are logged, if anywhere.
    pub release_log: Option<Arc<ReleaseLog>>,
}

/// Why the output task gave up its backup, or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// The backup is lost (timeout, connection closed or failed).
    BackupLost(String),
    /// The backup reported a divergence.
    Diverged {
        /// The first differing boundary.
        boundary: Boundary,
        /// What differs.
        what: String,
    },
    /// A joiner became the backup (its preamble is on its way): the node is primary again.
    Attached {
        /// The joiner.
        peer: String,
        /// The boundary of its state.
        from: Boundary,
    },
    /// The vCPU thread finished and everything was sent (and released, if acked in time).
    Finished,
}

/// Commands from the node to the output task.
pub enum OutputCmd {
    /// Change the gate's mode (after a grant: `Alone`).
    SetMode(GateMode),
    /// Drop every held frame (denied claim).
    DropAll,
}

struct Attached {
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// The backup's half of the stream, read by the output task itself (an ack goes from the
    /// socket to the gate without another task in between).
    recv: quinn::RecvStream,
    reader: MsgReader,
    conn: quinn::Connection,
    writer: tokio::task::JoinHandle<()>,
    last_receipt: u64,
    last_sent: u64,
}

/// The output task: runs until the vCPU side closes its queue (then returns
/// [`OutputEvent::Finished`] after a last release), reporting backup loss on `events`.
#[allow(clippy::too_many_arguments)]
pub async fn output_task(
    mut rx: mpsc::UnboundedReceiver<ToChannel>,
    mut cmds: mpsc::UnboundedReceiver<OutputCmd>,
    events: mpsc::UnboundedSender<OutputEvent>,
    link: Option<(super::connect::Link, MsgReader)>,
    tap: Option<Arc<Tap>>,
    cfg: OutputConfig,
    mode: GateMode,
    stats: Arc<ChannelStats>,
) -> OutputGate {
    let ft = cfg.failure_timeout.as_nanos() as u64;
    let mut gate = OutputGate::new(ft, cfg.margin.as_nanos() as u64, cfg.cap_bytes);
    gate.set_mode(mode);
    let mut lag = LagTracker::new();
    ChannelStats::set(&stats.max_lag_ns, cfg.max_lag.as_nanos() as u64);
    let mut seq = 0u64;
    let mut stream_w: Boundary = 0;
    let mut attached = link.map(|(l, reader)| attach(l, reader));
    if attached.is_some() {
        // (A backup's own output task starts without a link: its receive task owns the flag.)
        stats.peer_connected.store(true, Ordering::Relaxed);
    }
    let mut tick = tokio::time::interval(cfg.heartbeat.max(Duration::from_millis(1)) / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finished = false;
    let mut out = Vec::new();
    // The watermark the messages sent so far cover; whether `out` must go at once.
    let mut sent_w: Boundary = stream_w;
    let mut urgent = false;
    // The boundaries whose frames are held, with their hand-off times (for `hold_ns`).
    let mut taken: std::collections::VecDeque<(Boundary, u64)> = Default::default();
    loop {
        tokio::select! {
            biased;
            c = cmds.recv() => match c {
                Some(OutputCmd::SetMode(m)) => gate.set_mode(m),
                Some(OutputCmd::DropAll) => {
                    let n = gate.drop_all();
                    taken.clear();
                    ChannelStats::add(&stats.frames_dropped, n as u64);
                }
                None => {}
            },
            m = rx.recv(), if !finished => {
                let Some(first) = m else {
                    finished = true;
                    if attached.is_none() { break; }
                    send_log(&mut attached, &mut out, &mut seq, &mut gate, &mut lag, &events, &stats, stream_w, &mut sent_w);
                    continue;
                };
                let mut queue = std::collections::VecDeque::from([first]);
                let mut n = 0;
                while let Some(m) = queue.pop_front() {
                    match m {
                        ToChannel::Batch(ms) => {
                            for m in ms.into_iter().rev() {
                                queue.push_front(m);
                            }
                            continue;
                        }
                        ToChannel::Log { bytes, watermark } => {
                            ChannelStats::add(&stats.log_bytes, bytes.len() as u64);
                            if attached.is_some() {
                                out.extend_from_slice(&bytes);
                            }
                            if watermark != Boundary::MAX {
                                stream_w = stream_w.max(watermark);
                            } else {
                                urgent = true;
                            }
                        }
                        ToChannel::Frames { boundary, frames, taken_ns } => {
                            ChannelStats::add(&stats.handoff_ns, now_ns().saturating_sub(taken_ns));
                            taken.push_back((boundary, taken_ns));
                            let need = boundary.saturating_sub(1);
                            if attached.is_some() && stream_w < need {
                                Encoder::new().encode(&Record::Watermark(need), &mut out);
                                stream_w = need;
                            }
                            // The frames wait for an ack of `need`: what covers it goes now.
                            urgent |= need > sent_w;
                            for frame in frames {
                                gate.hold(boundary, frame);
                            }
                        }
                        ToChannel::Attach { link, reader, preamble, from } => {
                            let peer = link.peer.clone();
                            if let Some(old) = attached.take() {
                                old.conn.close(quinn::VarInt::from_u32(3), b"replaced");
                            }
                            out.clear();
                            let a = attach(link, reader);
                            let _ = a.out.send(preamble);
                            attached = Some(a);
                            // A new backup: nothing of it is acknowledged beyond its state, and
                            // no lease until its first ack.
                            gate.reset_backup(from);
                            gate.set_mode(GateMode::Replicated);
                            stream_w = from;
                            sent_w = from;
                            lag = LagTracker::new();
                            stats.peer_connected.store(true, Ordering::Relaxed);
                            ChannelStats::set(&stats.acked, from);
                            let _ = events.send(OutputEvent::Attached { peer, from });
                        }
                    }
                    n += 1;
                    if queue.is_empty() && n < 4096 && out.len() < (4 << 20) {
                        queue.extend(rx.try_recv().ok());
                    }
                }
                // Records no held frame waits for go at once when nothing sent is waiting for
                // its ack (so the round trip overlaps the guest's work towards its reply);
                // otherwise with the next frame, when the ack comes, at the next tick, or once
                // 64 KiB have gathered: one message (and one ack) per round trip or burst, not
                // per boundary.
                if urgent || out.len() >= FLUSH_BYTES || all_acked(&gate, sent_w) {
                    send_log(&mut attached, &mut out, &mut seq, &mut gate, &mut lag, &events, &stats, stream_w, &mut sent_w);
                    urgent = false;
                }
            }
            m = recv_inbound(&mut attached) => {
                match m {
                    Some(Ok(Msg::Ack { echo, watermark, replayed })) => {
                        let now = now_ns();
                        if let Some(a) = attached.as_mut() { a.last_receipt = now; }
                        if let Some(sent) = gate.ack(echo, watermark) {
                            ChannelStats::add(&stats.echoes, 1);
                            ChannelStats::add(&stats.echo_ns, now.saturating_sub(sent));
                        }
                        // Everything sent is acknowledged: what gathered meanwhile goes now.
                        if all_acked(&gate, sent_w) {
                            send_log(&mut attached, &mut out, &mut seq, &mut gate, &mut lag, &events, &stats, stream_w, &mut sent_w);
                        }
                        lag.replayed(replayed);
                        ChannelStats::add(&stats.acks, 1);
                        ChannelStats::set(&stats.acked, gate.acked());
                        ChannelStats::set(&stats.replayed, replayed);
                    }
                    Some(Ok(Msg::Divergence { boundary, what })) => {
                        if let Some(a) = attached.take() {
                            a.conn.close(quinn::VarInt::from_u32(2), b"diverged");
                        }
                        stats.peer_connected.store(false, Ordering::Relaxed);
                        gate.set_mode(GateMode::Holding);
                        let _ = events.send(OutputEvent::Diverged { boundary, what });
                    }
                    Some(Ok(other)) => {
                        let why = format!("unexpected message from the backup: {other:?}");
                        gate.set_mode(GateMode::Holding);
                        lose(&mut attached, &events, &stats, why);
                    }
                    Some(Err(why)) => {
                        gate.set_mode(GateMode::Holding);
                        lose(&mut attached, &events, &stats, why);
                    }
                    None => {}
                }
            }
            _ = tick.tick() => {
                if !out.is_empty() {
                    send_log(&mut attached, &mut out, &mut seq, &mut gate, &mut lag, &events, &stats, stream_w, &mut sent_w);
                }
                let now = now_ns();
                if let Some(a) = attached.as_mut() {
                    ChannelStats::set(&stats.rtt_ns, a.conn.rtt().as_nanos() as u64);
                    if now.saturating_sub(a.last_receipt) >= ft {
                        gate.set_mode(GateMode::Holding);
                        let why = format!("no ack from the backup for {:?}", cfg.failure_timeout);
                        lose(&mut attached, &events, &stats, why);
                    } else if now.saturating_sub(a.last_sent) >= cfg.heartbeat.as_nanos() as u64 {
                        seq += 1;
                        let mut frame = Vec::new();
                        msg::encode(&Msg::Heartbeat { seq }, &mut frame);
                        if a.out.send(frame).is_ok() {
                            gate.sent(seq, now);
                            a.last_sent = now;
                            ChannelStats::add(&stats.messages_sent, 1);
                        }
                        if now.saturating_sub(a.last_receipt) > 2 * cfg.heartbeat.as_nanos() as u64 {
                            ChannelStats::add(&stats.heartbeats_missed, 1);
                        }
                    }
                }
                if finished && (attached.is_none() || gate.held() == 0) {
                    break;
                }
            }
        }
        let l = if attached.is_some() { lag.lag_ns() } else { 0 };
        ChannelStats::set(&stats.lag_ns, l);
        let oldest = attached.as_ref().and(lag.oldest_sent()).unwrap_or(0);
        ChannelStats::set(&stats.lag_oldest_busy_ns, oldest);
        stats
            .throttled
            .store(l > cfg.max_lag.as_nanos() as u64, Ordering::Relaxed);
        // The lease is checked against a clock read just before each frame's write: a process
        // stopped in the middle of a burst finds the lease run out for the rest when it resumes.
        // A stop between one check and its `write` can still let that one frame out late
        // (docs/operations.md).
        let mut released = 0usize;
        let (mut first_unix, mut top) = (0u64, 0);
        loop {
            let now = now_ns();
            let Some((b, f)) = gate.release_one(now) else {
                break;
            };
            if released == 0 {
                first_unix = unix_ns();
            }
            if let Some(t) = &tap {
                if let Err(e) = t.write_frame(&f) {
                    tracing::warn!("TAP {}: dropped a frame: {e}", t.name());
                }
            }
            released += 1;
            top = b;
            while let Some(&(tb, t)) = taken.front() {
                if tb > b {
                    break;
                }
                taken.pop_front();
                ChannelStats::add(&stats.holds, 1);
                ChannelStats::add(&stats.hold_ns, now.saturating_sub(t));
            }
            ChannelStats::add(&stats.frames_released, 1);
            stats.released_boundary.fetch_max(b, Ordering::Relaxed);
        }
        if released > 0 {
            let last_unix = unix_ns();
            let prev = stats
                .last_release_unix_ns
                .swap(last_unix, Ordering::Relaxed);
            ChannelStats::set(&stats.prev_release_unix_ns, prev);
            if let Some(log) = &cfg.release_log {
                log.record(first_unix, last_unix, released, top);
            }
        }
        ChannelStats::set(&stats.frames_held, gate.held() as u64);
    }
    stats.throttled.store(false, Ordering::Relaxed);
    ChannelStats::set(&stats.lag_oldest_busy_ns, 0);
    if let Some(a) = attached.take() {
        // Let the last batch (with the end record) reach the backup before closing.
        drop(a.out);
        let _ = tokio::time::timeout(Duration::from_secs(2), a.writer).await;
        a.conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    let _ = events.send(OutputEvent::Finished);
    gate
}

/// Whether the backup acknowledged everything sent (watermark `sent_w`): nothing is in flight,
/// so records gathered now go at once.
fn all_acked(gate: &OutputGate, sent_w: Boundary) -> bool {
    gate.acked() >= sent_w
}

/// Records gathered past this go out without waiting for a frame or a tick.
const FLUSH_BYTES: usize = 64 << 10;

/// Sends what `out` holds as one log message (nothing if it is empty or there is no backup).
#[allow(clippy::too_many_arguments)]
fn send_log(
    attached: &mut Option<Attached>,
    out: &mut Vec<u8>,
    seq: &mut u64,
    gate: &mut OutputGate,
    lag: &mut LagTracker,
    events: &mpsc::UnboundedSender<OutputEvent>,
    stats: &ChannelStats,
    stream_w: Boundary,
    sent_w: &mut Boundary,
) {
    let Some(a) = attached.as_mut() else {
        out.clear();
        return;
    };
    if out.is_empty() {
        return;
    }
    *seq += 1;
    let now = now_ns();
    let mut frame = Vec::with_capacity(out.len() + 16);
    msg::encode(
        &Msg::Log {
            seq: *seq,
            bytes: std::mem::take(out),
        },
        &mut frame,
    );
    if a.out.send(frame).is_err() {
        lose(
            attached,
            events,
            stats,
            "the channel's writer stopped".into(),
        );
    } else {
        gate.sent(*seq, now);
        lag.sent(stream_w, stats.busy_ns());
        a.last_sent = now;
        *sent_w = stream_w;
        ChannelStats::add(&stats.messages_sent, 1);
    }
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn lose(
    attached: &mut Option<Attached>,
    events: &mpsc::UnboundedSender<OutputEvent>,
    stats: &ChannelStats,
    why: String,
) {
    if let Some(a) = attached.take() {
        a.conn.close(quinn::VarInt::from_u32(3), b"backup lost");
        stats.peer_connected.store(false, Ordering::Relaxed);
        tracing::warn!("backup lost: {why}");
        let _ = events.send(OutputEvent::BackupLost(why));
    }
}

/// The backup's next message (`read_chunk` is cancel-safe: a branch of the output task's
/// `select!` that loses the race loses no bytes).
async fn recv_inbound(a: &mut Option<Attached>) -> Option<Result<Msg, String>> {
    let Some(a) = a.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match a.reader.next_msg() {
            Ok(Some(m)) => return Some(Ok(m)),
            Ok(None) => {}
            Err(e) => return Some(Err(format!("bad message from the backup: {e}"))),
        }
        match a.recv.read_chunk(1 << 20, true).await {
            Ok(Some(c)) => a.reader.push(&c.bytes),
            Ok(None) => return Some(Err("the backup closed the channel".into())),
            Err(e) => return Some(Err(format!("channel: {e}"))),
        }
    }
}

fn attach(link: super::connect::Link, reader: MsgReader) -> Attached {
    let super::connect::Link {
        conn,
        mut send,
        recv,
        ..
    } = link;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(mut b) = out_rx.recv().await {
            while let Ok(more) = out_rx.try_recv() {
                b.extend_from_slice(&more);
            }
            if send.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    });
    let now = now_ns();
    Attached {
        out: out_tx,
        recv,
        reader,
        conn,
        writer,
        last_receipt: now,
        last_sent: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(m: &ToChannel) -> Vec<&'static str> {
        match m {
            ToChannel::Log { .. } => vec!["log"],
            ToChannel::Frames { .. } => vec!["frames"],
            ToChannel::Attach { .. } => vec!["attach"],
            ToChannel::Batch(v) => v.iter().flat_map(kinds).collect(),
        }
    }

    #[test]
    fn a_boundarys_records_and_frames_reach_the_output_task_as_one_message_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let h = Handoff::new(tx);
        let mut log = ChannelLog::new(h.clone());
        let mut nic = HeldFrames::new(h.clone());
        log.log_bytes(b"header").unwrap();
        log.log_bytes(b"record").unwrap();
        log.log_watermark(6).unwrap();
        assert!(rx.try_recv().is_err(), "gathered, not sent yet");
        nic.send(7, b"frame a");
        nic.send(7, b"frame b");
        nic.flush();
        let m = rx.try_recv().expect("one message");
        assert_eq!(kinds(&m), ["log", "log", "frames"]);
        assert!(rx.try_recv().is_err(), "and only one");
        // Nothing gathered: a hand-off sends nothing.
        log.log_handoff();
        assert!(rx.try_recv().is_err());
        // A lone record goes as itself when the boundary ends.
        log.log_bytes(b"record").unwrap();
        log.log_watermark(7).unwrap();
        log.log_handoff();
        assert_eq!(kinds(&rx.try_recv().unwrap()), ["log"]);
    }

    #[test]
    fn a_restarted_log_drops_gathered_records_but_not_frames() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let h = Handoff::new(tx);
        let mut log = ChannelLog::new(h.clone());
        log.log_bytes(b"old header").unwrap();
        h.gather(ToChannel::Frames {
            boundary: 3,
            frames: vec![b"frame".to_vec()],
            taken_ns: 0,
        });
        log.log_restart();
        log.log_handoff();
        assert_eq!(kinds(&rx.try_recv().unwrap()), ["frames"]);
    }

    #[test]
    fn a_backups_nic_passes_nothing_on_until_the_node_is_live() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let live = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut nic = HeldFrames::new(Handoff::new(tx)).while_live(live.clone());
        nic.send(1, b"dropped");
        nic.flush();
        assert!(rx.try_recv().is_err());
        live.store(true, Ordering::Relaxed);
        nic.send(2, b"sent");
        nic.flush();
        match rx.try_recv().unwrap() {
            ToChannel::Frames {
                boundary, frames, ..
            } => assert_eq!((boundary, frames), (2, vec![b"sent".to_vec()])),
            other => panic!("{other:?}"),
        }
    }
}
