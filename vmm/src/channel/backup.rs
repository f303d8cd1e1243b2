//! The backup's side of the channel: the receive task decodes records as they arrive (the
//! recorder's codec, incrementally), checks each boundary record's inputs hash, hands the
//! records to the replayer on the vCPU thread through [`ChannelFeed`], and acknowledges a
//! watermark only once every record through it has been decoded and checked — so everything
//! it acks, it can replay. It also reports the boundary it has replayed, sends its own
//! heartbeat (an ack) every heartbeat interval, and notices a silent primary.

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::msg::{self, Msg, MsgReader};
use super::{now_ns, ChannelStats};
use crate::epoch::{Boundary, InputError};
use crate::replay::codec::{inputs_hash, Header, Record, StreamDecoder};
use crate::replay::replayer::RecordFeed;
use crate::signals::StopSignal;

/// The replayer's feed on a backup.
pub struct ChannelFeed {
    rx: std_mpsc::Receiver<Result<Record, InputError>>,
    stop: Arc<StopSignal>,
    stats: Arc<ChannelStats>,
}

impl ChannelFeed {
    /// A feed reading what the receive task sends on the other end of `rx`.
    pub fn new(
        rx: std_mpsc::Receiver<Result<Record, InputError>>,
        stop: Arc<StopSignal>,
        stats: Arc<ChannelStats>,
    ) -> Self {
        ChannelFeed { rx, stop, stats }
    }
}

impl RecordFeed for ChannelFeed {
    fn next_record(&mut self) -> Result<Record, InputError> {
        loop {
            if let Some(sig) = self.stop.signalled() {
                return Err(InputError::Stopped(sig));
            }
            match self.rx.recv_timeout(Duration::from_millis(5)) {
                Ok(r) => return r,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(InputError::PeerLost("the logging channel closed".into()))
                }
            }
        }
    }
    fn digest_checked(&mut self) {
        ChannelStats::add(&self.stats.digests_checked, 1);
    }
    fn replayed(&mut self, b: Boundary) {
        self.stats
            .replayed
            .store(b.saturating_sub(1), Ordering::Relaxed);
    }
}

/// How the receive task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEnd {
    /// The primary's stream ended after its end record (the VM ended on the primary).
    Complete,
    /// Nothing arrived for `failure_timeout`, or the connection failed or closed early.
    PrimaryLost {
        /// Why.
        why: String,
        /// When the last message arrived (`now_ns` clock).
        last_receipt: u64,
        /// The highest watermark acknowledged.
        acked: Boundary,
    },
    /// The log did not decode or check: reported to the primary.
    BadLog {
        /// The boundary (or the last good watermark + 1).
        boundary: Boundary,
        /// What was wrong.
        what: String,
    },
    /// The node is stopping (the vCPU side went away).
    Stopped,
}

/// Knobs of the receive task.
#[derive(Clone, Debug)]
pub struct ReceiveConfig {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The pair's failure timeout.
    pub failure_timeout: Duration,
    /// The boundary the log starts after (0 from boot; a joiner's restored state): it is
    /// acknowledged from the first ack on.
    pub start_after: Boundary,
}

/// Messages the vCPU side wants sent to the primary (a divergence report).
pub type Reports = tokio::sync::mpsc::UnboundedReceiver<Msg>;

/// Receives the log from `link`. The first record (the log header) goes to `header`, every
/// later one to `feed`. Ends as [`BackupEnd`] says.
pub async fn receive_task(
    link: super::connect::Link,
    mut reader: MsgReader,
    header: tokio::sync::oneshot::Sender<Header>,
    feed: std_mpsc::Sender<Result<Record, InputError>>,
    mut reports: Reports,
    cfg: ReceiveConfig,
    stats: Arc<ChannelStats>,
) -> BackupEnd {
    let super::connect::Link {
        conn,
        mut send,
        mut recv,
        ..
    } = link;
    stats.peer_connected.store(true, Ordering::Relaxed);
    let ft = cfg.failure_timeout.as_nanos() as u64;
    let mut header = Some(header);
    let mut dec = StreamDecoder::new();
    let mut decoded_w: Boundary = cfg.start_after;
    let mut echo = 0u64;
    let mut last_receipt = now_ns();
    let mut last_sent = 0u64;
    let mut ended = false;
    let mut tick = tokio::time::interval(cfg.heartbeat.max(Duration::from_millis(1)) / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::new();
    // Records decoded and checked but not yet handed to the vCPU: they go after the ack, so
    // waking the vCPU is not on the Output Rule's path (acking them needs only the check).
    let mut pending: Vec<Record> = Vec::new();
    let result = 'outer: loop {
        // Whole messages already buffered first.
        let mut got_any = false;
        loop {
            let m = match reader.next_msg() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    break 'outer BackupEnd::BadLog {
                        boundary: decoded_w + 1,
                        what: format!("bad channel message: {e}"),
                    }
                }
            };
            got_any = true;
            match m {
                Msg::Log { seq, bytes } => {
                    echo = echo.max(seq);
                    ChannelStats::add(&stats.log_bytes, bytes.len() as u64);
                    dec.push(&bytes);
                    loop {
                        let rec = match dec.next_record() {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                break 'outer BackupEnd::BadLog {
                                    boundary: decoded_w + 1,
                                    what: format!("the log does not decode: {e}"),
                                }
                            }
                        };
                        match &rec {
                            Record::Header(h) => {
                                if let Some(tx) = header.take() {
                                    let _ = tx.send(h.clone());
                                }
                                continue;
                            }
                            Record::Boundary {
                                boundary,
                                inputs_hash: hash,
                                events,
                                ..
                            } => {
                                let applied = inputs_hash(events);
                                if applied != *hash {
                                    break 'outer BackupEnd::BadLog {
                                        boundary: *boundary,
                                        what: format!(
                                            "record's inputs hash {hash:#018x} does not match its events ({applied:#018x})"
                                        ),
                                    };
                                }
                            }
                            Record::Watermark(w) => decoded_w = decoded_w.max(*w),
                            Record::End(e) => {
                                decoded_w = decoded_w.max(e.boundary);
                                ended = true;
                            }
                            Record::Digest { .. } => {}
                        }
                        pending.push(rec);
                    }
                }
                Msg::Heartbeat { seq } => echo = echo.max(seq),
                other => {
                    break 'outer BackupEnd::BadLog {
                        boundary: decoded_w + 1,
                        what: format!("unexpected message from the primary: {other:?}"),
                    }
                }
            }
        }
        if got_any {
            last_receipt = now_ns();
            if send_ack(&mut send, &mut buf, echo, decoded_w, &stats)
                .await
                .is_err()
            {
                break BackupEnd::PrimaryLost {
                    why: "cannot send acks".into(),
                    last_receipt,
                    acked: stats.acked.load(Ordering::Relaxed),
                };
            }
            ChannelStats::set(&stats.acked, decoded_w);
            ChannelStats::add(&stats.acks, 1);
            last_sent = now_ns();
            // Let the connection's task put the ack on the wire before the vCPU wakes.
            tokio::task::yield_now().await;
            for rec in pending.drain(..) {
                if feed.send(Ok(rec)).is_err() {
                    break 'outer BackupEnd::Stopped;
                }
            }
        }
        tokio::select! {
            biased;
            r = reports.recv() => {
                if let Some(m) = r {
                    buf.clear();
                    msg::encode(&m, &mut buf);
                    let _ = send.write_all(&buf).await;
                    let _ = send.finish();
                    // Give the report a moment to leave before the connection closes.
                    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
                    break BackupEnd::Stopped;
                }
            }
            c = recv.read_chunk(1 << 20, true) => match c {
                Ok(Some(c)) => reader.push(&c.bytes),
                Ok(None) | Err(_) if ended => break BackupEnd::Complete,
                Ok(None) => break BackupEnd::PrimaryLost {
                    why: "the primary closed the channel".into(),
                    last_receipt,
                    acked: stats.acked.load(Ordering::Relaxed),
                },
                Err(e) => break BackupEnd::PrimaryLost {
                    why: format!("channel: {e}"),
                    last_receipt,
                    acked: stats.acked.load(Ordering::Relaxed),
                },
            },
            _ = tick.tick() => {
                let now = now_ns();
                if now.saturating_sub(last_receipt) >= ft {
                    break BackupEnd::PrimaryLost {
                        why: format!("nothing from the primary for {:?}", cfg.failure_timeout),
                        last_receipt,
                        acked: stats.acked.load(Ordering::Relaxed),
                    };
                }
                if now.saturating_sub(last_sent) >= cfg.heartbeat.as_nanos() as u64 {
                    if send_ack(&mut send, &mut buf, echo, decoded_w, &stats).await.is_ok() {
                        last_sent = now;
                    }
                    if now.saturating_sub(last_receipt) > 2 * cfg.heartbeat.as_nanos() as u64 {
                        ChannelStats::add(&stats.heartbeats_missed, 1);
                    }
                }
            }
        }
    };
    stats.peer_connected.store(false, Ordering::Relaxed);
    match &result {
        BackupEnd::BadLog { boundary, what } => {
            buf.clear();
            msg::encode(
                &Msg::Divergence {
                    boundary: *boundary,
                    what: what.clone(),
                },
                &mut buf,
            );
            let _ = send.write_all(&buf).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
            // What was checked before the bad record is replayed up to it.
            for rec in pending.drain(..) {
                let _ = feed.send(Ok(rec));
            }
            let _ = feed.send(Err(InputError::Divergence {
                boundary: *boundary,
                what: what.clone(),
            }));
            conn.close(quinn::VarInt::from_u32(2), b"bad log");
        }
        BackupEnd::PrimaryLost { .. } => {
            // Claims are final: from here on nothing is acknowledged.
            conn.close(quinn::VarInt::from_u32(3), b"primary lost");
        }
        _ => conn.close(quinn::VarInt::from_u32(0), b"done"),
    }
    result
}

/// Sends an ack of `watermark` echoing message `echo`, with the boundary replayed so far.
async fn send_ack(
    send: &mut quinn::SendStream,
    buf: &mut Vec<u8>,
    echo: u64,
    watermark: Boundary,
    stats: &ChannelStats,
) -> Result<(), quinn::WriteError> {
    let ack = Msg::Ack {
        echo,
        watermark,
        replayed: stats.replayed.load(Ordering::Relaxed),
    };
    buf.clear();
    msg::encode(&ack, buf);
    send.write_all(buf).await
}
