//! The replayer: answers the VMM's questions from a log and checks, at every boundary, that the
//! guest is where the recorded guest was. The first difference stops the replay with a
//! divergence report naming the boundary and what differs.

use std::collections::VecDeque;

use super::codec::{inputs_hash, DecodeError, Decoder, End, EndKind, Event, Header, Record};
use super::LogStats;
use crate::epoch::{Boundary, ClockValue, Fingerprint, InputError, Inputs};

/// Where a streaming replayer gets its records: the logging channel, in stream order.
pub trait RecordFeed: Send {
    /// The next record, blocking until one arrives. Fails with
    /// [`InputError::Stopped`] when the node is stopping and with another error when the
    /// stream ended; a feed never returns records that did not decode and check.
    fn next_record(&mut self) -> Result<Record, InputError>;
    /// Called at every boundary `b` the replay reaches (so `b - 1` is fully replayed).
    fn replayed(&mut self, _b: Boundary) {}
    /// A memory digest from the stream matched this replay's.
    fn digest_checked(&mut self) {}
}

/// Inputs read from a log.
pub struct Replayer {
    header: Header,
    records: VecDeque<Record>,
    current: Option<(Boundary, VecDeque<Event>)>,
    end: Option<End>,
    stats: LogStats,
    /// A stream the records come from (a backup), with the highest watermark seen.
    feed: Option<Box<dyn RecordFeed>>,
    watermark: Boundary,
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl Replayer {
    /// Decodes and validates a whole log (so a malformed log is refused before the guest
    /// starts).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let header = match d.next_record()? {
            Some(Record::Header(h)) => h,
            _ => {
                return Err(DecodeError::Malformed {
                    offset: 0,
                    what: "empty log".into(),
                })
            }
        };
        let mut records = VecDeque::new();
        let mut stats = LogStats {
            bytes: bytes.len() as u64,
            ..Default::default()
        };
        let mut end = None;
        while let Some(r) = d.next_record()? {
            match &r {
                Record::Boundary { events, .. } => {
                    stats.boundary_records += 1;
                    stats.events += events.len() as u64;
                }
                Record::Digest { .. } => stats.digests += 1,
                Record::End(e) => end = Some(e.clone()),
                _ => {}
            }
            records.push_back(r);
        }
        if end.is_none() {
            return Err(DecodeError::Truncated {
                offset: bytes.len() as u64,
                what: "the log has no end record (the recording was cut short)",
            });
        }
        Ok(Replayer {
            header,
            records,
            current: None,
            end,
            stats,
            feed: None,
            watermark: Boundary::MAX,
        })
    }

    /// A replayer fed by a stream (a backup): the log's `header` was already received and
    /// checked; at boundary `b` it waits until the stream's watermark is at least `b`, so it
    /// knows every event the primary logged there.
    pub fn streaming(header: Header, feed: Box<dyn RecordFeed>) -> Self {
        Replayer {
            header,
            records: VecDeque::new(),
            current: None,
            end: None,
            stats: LogStats::default(),
            feed: Some(feed),
            watermark: 0,
        }
    }

    /// The highest watermark received so far (a file-backed replayer has them all).
    pub fn watermark(&self) -> Boundary {
        self.watermark
    }

    /// Takes records from the feed until the watermark reaches `b` (or the end arrived).
    fn fill_to(&mut self, b: Boundary) -> Result<(), InputError> {
        let Some(feed) = self.feed.as_mut() else {
            return Ok(());
        };
        while self.watermark < b {
            let r = feed.next_record()?;
            match r {
                Record::Watermark(w) => self.watermark = self.watermark.max(w),
                Record::End(e) => {
                    self.end = Some(e.clone());
                    self.watermark = Boundary::MAX;
                    self.records.push_back(Record::End(e));
                }
                Record::Header(_) => {
                    return Err(InputError::Log("a second header on the stream".into()))
                }
                other => {
                    match &other {
                        Record::Boundary { events, .. } => {
                            self.stats.boundary_records += 1;
                            self.stats.events += events.len() as u64;
                        }
                        Record::Digest { .. } => self.stats.digests += 1,
                        _ => {}
                    }
                    self.records.push_back(other)
                }
            }
        }
        Ok(())
    }

    /// The log's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Figures about the log.
    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// The recorded end.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Drops the records of boundaries up to and including `k`, for a machine restored from a
    /// state saved after boundary `k` (its next boundary is `k + 1`). A streaming replayer
    /// takes its watermark as at least `k` (the stream of a joiner starts after `k`).
    pub fn skip_through(&mut self, k: Boundary) {
        self.current = None;
        self.watermark = self.watermark.max(k);
        while let Some(
            Record::Boundary { boundary: b, .. }
            | Record::Digest { boundary: b, .. }
            | Record::Watermark(b),
        ) = self.records.front()
        {
            if *b > k {
                break;
            }
            self.records.pop_front();
        }
    }

    fn diverge(boundary: Boundary, what: impl Into<String>) -> InputError {
        InputError::Divergence {
            boundary,
            what: what.into(),
        }
    }

    fn skip_watermarks(&mut self) {
        while matches!(self.records.front(), Some(Record::Watermark(_))) {
            self.records.pop_front();
        }
    }

    /// When the guest asks for an input at `b` and the log has none there: a recorded stop at
    /// `b` ends the replay the same way; anything else is a divergence.
    fn no_input(&self, b: Boundary, asked: &str) -> InputError {
        match self.end.as_ref() {
            Some(End {
                boundary,
                kind: EndKind::Stopped(sig),
                ..
            }) if *boundary == b => InputError::Stopped(*sig),
            _ => Self::diverge(
                b,
                format!(
                    "the guest asked for {asked}, but the log records no input at this boundary"
                ),
            ),
        }
    }

    fn next_event(&mut self, b: Boundary, asked: &str) -> Result<Event, InputError> {
        match self.current.as_mut() {
            Some((cb, events)) if *cb == b => match events.pop_front() {
                Some(e) => Ok(e),
                None => Err(Self::diverge(
                    b,
                    format!("the guest asked for {asked}, more inputs than the log records here"),
                )),
            },
            _ => Err(self.no_input(b, asked)),
        }
    }

    fn check_current_consumed(&mut self) -> Result<(), InputError> {
        if let Some((b, events)) = self.current.take() {
            if !events.is_empty() {
                return Err(Self::diverge(
                    b,
                    format!(
                    "the log records {} more input(s) here ({:?}) that the guest did not ask for",
                    events.len(),
                    events.front()
                ),
                ));
            }
        }
        Ok(())
    }
}

impl Inputs for Replayer {
    fn wants_fingerprint(&self) -> bool {
        true
    }

    fn boundary(
        &mut self,
        b: Boundary,
        fingerprint: Option<Fingerprint>,
    ) -> Result<(), InputError> {
        self.check_current_consumed()?;
        if let Some(feed) = self.feed.as_mut() {
            feed.replayed(b);
        }
        self.fill_to(b)?;
        self.skip_watermarks();
        match self.records.front() {
            Some(Record::Boundary { boundary, .. }) if *boundary == b => {
                let Some(Record::Boundary {
                    fingerprint: recorded,
                    inputs_hash: hash,
                    events,
                    ..
                }) = self.records.pop_front()
                else {
                    unreachable!("just matched a boundary record")
                };
                let fp = fingerprint.unwrap_or_default();
                if fp != recorded {
                    return Err(Self::diverge(b, format!(
                        "guest state differs: recorded rip {:#x} registers {:#018x}, replay rip {:#x} registers {:#018x}",
                        recorded.rip, recorded.regs_hash, fp.rip, fp.regs_hash
                    )));
                }
                let applied = inputs_hash(&events);
                if applied != hash {
                    return Err(Self::diverge(b, format!(
                        "the inputs to apply ({events:?}) are not those recorded (hash {applied:#018x}, recorded {hash:#018x})"
                    )));
                }
                self.current = Some((b, events.into()));
                Ok(())
            }
            Some(Record::Boundary { boundary, .. }) if *boundary < b => Err(Self::diverge(
                *boundary,
                "the guest passed a boundary with logged inputs without asking for them",
            )),
            Some(Record::End(e)) if e.boundary < b => match e.kind {
                EndKind::Stopped(sig) => Err(InputError::Stopped(sig)),
                _ => Err(Self::diverge(
                    b,
                    format!(
                        "the guest went on past the recorded end (boundary {})",
                        e.boundary
                    ),
                )),
            },
            _ => Ok(()),
        }
    }

    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError> {
        match self.next_event(b, "the clock")? {
            Event::Clock(c) => Ok(c),
            other => Err(Self::diverge(
                b,
                format!("the guest read the clock; the log has {other:?}"),
            )),
        }
    }

    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        match self.next_event(b, "entropy")? {
            Event::Entropy(v) => Ok(v),
            other => Err(Self::diverge(
                b,
                format!("the guest read entropy; the log has {other:?}"),
            )),
        }
    }

    fn wait(
        &mut self,
        b: Boundary,
        _deadline_ns: u64,
        _rx_room: usize,
    ) -> Result<ClockValue, InputError> {
        match self.next_event(b, "a WAIT")? {
            Event::WaitEnded(c) => Ok(c),
            other => Err(Self::diverge(
                b,
                format!("the guest WAITed; the log has {other:?}"),
            )),
        }
    }

    fn net_rx(&mut self, b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        let mut frames = Vec::new();
        if let Some((cb, events)) = self.current.as_mut() {
            if *cb == b {
                while let Some(Event::NetRx(_)) = events.front() {
                    if let Some(Event::NetRx(f)) = events.pop_front() {
                        frames.push(f);
                    }
                }
            }
        }
        if frames.len() > room {
            return Err(Self::diverge(
                b,
                format!(
                    "the log delivers {} frames here, the guest has room for {room}",
                    frames.len()
                ),
            ));
        }
        Ok(frames)
    }

    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        match self.next_event(b, "random bytes")? {
            Event::Random(v) if v.len() == len => Ok(v),
            other => Err(Self::diverge(
                b,
                format!("the guest asked for {len} random bytes; the log has {other:?}"),
            )),
        }
    }

    fn disk_done(&mut self, b: Boundary, status: u8, hash: u64) -> Result<(), InputError> {
        match self.next_event(b, "a disk completion")? {
            Event::DiskDone { status: s, hash: h } if s == status && h == hash => Ok(()),
            Event::DiskDone { status: s, hash: h } => Err(Self::diverge(b, format!(
                "disk divergence: the recorded block request completed with status {s} and data hash {h:#018x}, here with status {status} and hash {hash:#018x}"
            ))),
            other => Err(Self::diverge(b, format!("a block request completed; the log has {other:?}"))),
        }
    }

    fn digest_every(&self) -> u64 {
        self.header.digest_every
    }

    fn stop_after(&self, b: Boundary) -> Option<i32> {
        match (self.end.as_ref(), self.records.front()) {
            (
                Some(End {
                    boundary,
                    kind: EndKind::Stopped(sig),
                    ..
                }),
                Some(Record::End(_)),
            ) if *boundary == b => Some(*sig),
            _ => None,
        }
    }

    fn memory_digest(
        &mut self,
        b: Boundary,
        digest: [u8; 32],
        console: [u8; 32],
    ) -> Result<(), InputError> {
        // The digest of `b` follows `b`'s boundary record, if there is one.
        let pos = self
            .records
            .iter()
            .position(|r| !matches!(r, Record::Watermark(_)));
        match pos.map(|i| (i, &self.records[i])) {
            Some((
                i,
                Record::Digest {
                    boundary,
                    digest: recorded,
                    console: recorded_console,
                },
            )) if *boundary == b => {
                if let Some(rc) = recorded_console {
                    if *rc != console {
                        return Err(Self::diverge(
                            b,
                            format!(
                                "the console output differs: recorded digest {}…, replay {}…",
                                hex(rc),
                                hex(&console)
                            ),
                        ));
                    }
                }
                if *recorded != digest {
                    return Err(Self::diverge(
                        b,
                        format!(
                            "guest memory differs: recorded digest {}…, replay {}…",
                            hex(recorded),
                            hex(&digest)
                        ),
                    ));
                }
                self.records.remove(i);
                if let Some(f) = self.feed.as_mut() {
                    f.digest_checked();
                }
                Ok(())
            }
            _ => Err(Self::diverge(
                b,
                "the log has no memory digest for this boundary",
            )),
        }
    }

    fn finish(&mut self, end: &End) -> Result<(), InputError> {
        self.check_current_consumed()?;
        if self.end.is_none() {
            if self.feed.is_some() && matches!(end.kind, EndKind::Stopped(_)) {
                // This node was stopped (a signal) while following a stream: there is no
                // recorded end to compare with.
                return Ok(());
            }
            self.fill_to(Boundary::MAX)?;
        }
        self.skip_watermarks();
        let recorded = match self.records.pop_front() {
            Some(Record::End(e)) => e,
            Some(Record::Boundary { boundary, .. }) | Some(Record::Digest { boundary, .. }) => {
                return Err(Self::diverge(
                    boundary,
                    format!(
                        "the replay ended ({:?} at boundary {}) before the recorded run did",
                        end.kind, end.boundary
                    ),
                ))
            }
            _ => return Err(InputError::Log("the log has no end record".into())),
        };
        let b = end.boundary;
        if recorded.kind != end.kind || recorded.boundary != end.boundary {
            return Err(Self::diverge(b, format!(
                "the run ended differently: recorded {:?} at boundary {}, replay {:?} at boundary {}",
                recorded.kind, recorded.boundary, end.kind, end.boundary
            )));
        }
        if matches!(end.kind, EndKind::Stopped(_)) {
            // A signal stops the guest between exits, at a point no replay can reproduce.
            return Ok(());
        }
        if recorded.fingerprint != end.fingerprint {
            return Err(Self::diverge(b, format!(
                "final registers differ: recorded rip {:#x} ({:#018x}), replay rip {:#x} ({:#018x})",
                recorded.fingerprint.rip, recorded.fingerprint.regs_hash, end.fingerprint.rip, end.fingerprint.regs_hash
            )));
        }
        if recorded.memory_digest != end.memory_digest {
            return Err(Self::diverge(
                b,
                format!(
                    "final memory differs: recorded {}…, replay {}…",
                    hex(&recorded.memory_digest),
                    hex(&end.memory_digest)
                ),
            ));
        }
        if recorded.console_digest != end.console_digest {
            return Err(Self::diverge(b, "the console output differs"));
        }
        Ok(())
    }
}
