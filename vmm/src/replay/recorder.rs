//! The recorder: live inputs whose every answer is also appended to a log, with the guest's
//! fingerprint at each boundary where something was applied, memory digests, and the end.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::codec::{
    inputs_hash, Encoder, End, Event, Header, Record, MAX_EVENTS, MAX_EVENT_BYTES, MAX_PAYLOAD,
};
use super::LogStats;
use crate::epoch::{Boundary, ClockValue, Fingerprint, InputError, Inputs};

/// Where a recorder's encoded records go: a file (any [`Write`]) or the logging channel.
pub trait LogSink: Send {
    /// Appends encoded records.
    fn log_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Every record for every boundary up to and including `w` has been passed to
    /// [`log_bytes`](Self::log_bytes) (DESIGN §5's watermark). Files ignore it.
    fn log_watermark(&mut self, _w: Boundary) -> std::io::Result<()> {
        Ok(())
    }
    /// The vCPU is leaving the boundary (resuming the guest, or about to block in a WAIT):
    /// what was gathered for a receiver goes now. Files ignore it.
    fn log_handoff(&mut self) {}
    /// The run ended: make everything durable or sent.
    fn log_flush(&mut self) -> std::io::Result<()>;
    /// A new log starts (the recorder was restarted for a joiner): drop anything buffered
    /// of the old one. Files ignore it.
    fn log_restart(&mut self) {}
}

/// What a [`RecordSwitch`] asks of its recorder at its next boundary.
#[derive(Debug)]
enum SwitchCmd {
    /// Start a new log with this header from the next boundary on.
    Start(Header),
    /// Stop recording (nobody receives the log).
    Stop,
}

/// Starts and stops a recorder from outside the input source it is part of, between two
/// boundaries (a join's pause: the new backup's log starts at the boundary after the saved
/// state; a primary running alone records nothing).
#[derive(Clone, Debug, Default)]
pub struct RecordSwitch(Arc<(std::sync::atomic::AtomicBool, Mutex<Option<SwitchCmd>>)>);

impl RecordSwitch {
    /// A switch with nothing asked.
    pub fn new() -> Self {
        Self::default()
    }
    /// From the next boundary on, record a new log that starts with `header`; the records
    /// of boundaries already passed are dropped.
    pub fn start(&self, header: Header) {
        self.set(SwitchCmd::Start(header));
    }
    /// From the next boundary on, record nothing.
    pub fn stop(&self) {
        self.set(SwitchCmd::Stop);
    }
    fn set(&self, c: SwitchCmd) {
        *self.0 .1.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        self.0 .0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn take(&self) -> Option<SwitchCmd> {
        if !self.0 .0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.0 .1.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl<W: Write + Send> LogSink for W {
    fn log_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }
    fn log_flush(&mut self) -> std::io::Result<()> {
        self.flush()
    }
}

struct Pending {
    boundary: Boundary,
    fingerprint: Fingerprint,
    events: Vec<Event>,
    digest: Option<([u8; 32], [u8; 32])>,
    /// An upper bound of the encoded size of the boundary record so far.
    bytes: u64,
}

/// Encoded size of a boundary record without its events, at most (boundary and event count
/// varints, fingerprint, inputs hash).
const RECORD_BOUND: u64 = 10 + 16 + 8 + 10;
/// Encoded size of one received frame, at most.
const FRAME_BOUND: u64 = 1 + 10 + MAX_EVENT_BYTES;

/// Encoded size of `e` inside a boundary record, at most.
fn event_bound(e: &Event) -> u64 {
    match e {
        Event::Clock(_) | Event::WaitEnded(_) => 1 + 10 + 10,
        Event::Entropy(_) => 1 + 8,
        Event::NetRx(b) | Event::Random(b) => 1 + 10 + b.len() as u64,
        Event::DiskDone { .. } => 1 + 1 + 8,
    }
}

/// Live inputs that record.
pub struct Recorder<I: Inputs, W: LogSink> {
    live: I,
    out: W,
    enc: Encoder,
    buf: Vec<u8>,
    pending: Option<Pending>,
    digest_every: u64,
    stats: LogStats,
    published: Arc<Mutex<LogStats>>,
    /// Whether records are being written (a dormant recorder passes every question on).
    active: bool,
    switch: Option<RecordSwitch>,
}

impl<I: Inputs, W: LogSink> Recorder<I, W> {
    /// Starts a log on `out` with `header`.
    pub fn new(live: I, mut out: W, header: Header) -> Result<Self, InputError> {
        let mut enc = Encoder::new();
        let mut buf = Vec::new();
        let digest_every = header.digest_every;
        enc.encode(&Record::Header(header), &mut buf);
        out.log_bytes(&buf)?;
        let stats = LogStats {
            bytes: buf.len() as u64,
            ..Default::default()
        };
        buf.clear();
        Ok(Recorder {
            live,
            out,
            enc,
            buf,
            pending: None,
            digest_every,
            stats,
            published: Arc::default(),
            active: true,
            switch: None,
        })
    }

    /// A recorder that records nothing until `switch` starts it.
    pub fn dormant(live: I, out: W, switch: RecordSwitch) -> Self {
        Recorder {
            live,
            out,
            enc: Encoder::new(),
            buf: Vec::new(),
            pending: None,
            digest_every: 0,
            stats: LogStats::default(),
            published: Arc::default(),
            active: false,
            switch: Some(switch),
        }
    }

    /// Lets `switch` stop and restart this recorder.
    pub fn with_switch(mut self, switch: RecordSwitch) -> Self {
        self.switch = Some(switch);
        self
    }

    fn apply_switch(&mut self) -> Result<(), InputError> {
        match self.switch.as_ref().and_then(RecordSwitch::take) {
            None => {}
            Some(SwitchCmd::Start(header)) => {
                self.pending = None;
                self.out.log_restart();
                // The clock is delta-encoded: a new log starts from a fresh encoder, as its
                // decoder does.
                self.enc = Encoder::new();
                self.digest_every = header.digest_every;
                self.active = true;
                self.write(&Record::Header(header))?;
            }
            Some(SwitchCmd::Stop) => {
                self.pending = None;
                self.out.log_restart();
                self.active = false;
            }
        }
        Ok(())
    }

    /// Where the final figures appear when the run finishes (the recorder itself is owned by
    /// the machine by then).
    pub fn stats_handle(&self) -> Arc<Mutex<LogStats>> {
        self.published.clone()
    }

    fn write(&mut self, rec: &Record) -> Result<(), InputError> {
        self.buf.clear();
        self.enc.encode(rec, &mut self.buf);
        self.out.log_bytes(&self.buf)?;
        self.stats.bytes += self.buf.len() as u64;
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), InputError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if !p.events.is_empty() {
            // Never write a record the decoder refuses (the frame cap in `net_rx` keeps every
            // boundary within the limits; this catches an input source breaking its bounds).
            let oversized = p.events.iter().any(|e| match e {
                Event::NetRx(b) | Event::Random(b) => b.len() as u64 > MAX_EVENT_BYTES,
                _ => false,
            });
            if p.bytes > MAX_PAYLOAD || p.events.len() as u64 > MAX_EVENTS || oversized {
                return Err(InputError::Log(format!(
                    "boundary {}: {} inputs ({} bytes at most) exceed what a log record may hold",
                    p.boundary,
                    p.events.len(),
                    p.bytes
                )));
            }
            self.stats.boundary_records += 1;
            self.stats.events += p.events.len() as u64;
            let rec = Record::Boundary {
                boundary: p.boundary,
                fingerprint: p.fingerprint,
                inputs_hash: inputs_hash(&p.events),
                events: p.events,
            };
            self.write(&rec)?;
        }
        if let Some((digest, console)) = p.digest {
            self.stats.digests += 1;
            self.write(&Record::Digest {
                boundary: p.boundary,
                digest,
                console: Some(console),
            })?;
        }
        Ok(())
    }

    /// Passes on a live answer. A stop interrupting the boundary being recorded drops that
    /// boundary's inputs: the recorded run never completed it, and a replay stops at its first
    /// question there as at a boundary without inputs (its memory digest, taken before anything
    /// was applied, is still logged). Logging the inputs taken before the stop instead would
    /// make the replay find the interrupted question unanswered and report a divergence.
    fn passed<T>(&mut self, r: Result<T, InputError>) -> Result<T, InputError> {
        if let (Err(InputError::Stopped(_)), Some(p)) = (&r, self.pending.as_mut()) {
            p.events.clear();
            p.bytes = RECORD_BOUND;
        }
        r
    }

    fn push(&mut self, e: Event) {
        if let Some(p) = self.pending.as_mut() {
            p.bytes += event_bound(&e);
            p.events.push(e);
        }
    }
}

impl<I: Inputs, W: LogSink> Inputs for Recorder<I, W> {
    fn wants_fingerprint(&self) -> bool {
        // A switch may start recording at any boundary: a switchable recorder always takes
        // the fingerprint (one ioctl).
        self.active || self.switch.is_some() || self.live.wants_fingerprint()
    }

    fn boundary(
        &mut self,
        b: Boundary,
        fingerprint: Option<Fingerprint>,
    ) -> Result<(), InputError> {
        self.apply_switch()?;
        if !self.active {
            return self.live.boundary(b, fingerprint);
        }
        // The previous boundary's record went out when it ended (`boundary_end`); one that
        // did not end goes now.
        if self.pending.is_some() {
            self.flush_pending()?;
            if b > 1 {
                self.out.log_watermark(b - 1)?;
            }
        }
        self.pending = Some(Pending {
            boundary: b,
            fingerprint: fingerprint.unwrap_or_default(),
            events: Vec::new(),
            digest: None,
            bytes: RECORD_BOUND,
        });
        self.live.boundary(b, fingerprint)
    }

    fn boundary_end(&mut self, b: Boundary) -> Result<(), InputError> {
        // The boundary's record is complete: it goes out now, while the guest works towards
        // the output that will need it (DESIGN §5: a frame of boundary E waits for E − 1).
        if self.active {
            self.flush_pending()?;
            self.out.log_watermark(b)?;
        }
        // Whether recording or not: a primary's frames go to the channel through the sink.
        self.out.log_handoff();
        self.live.boundary_end(b)
    }

    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError> {
        let r = self.live.clock(b);
        let c = self.passed(r)?;
        self.push(Event::Clock(c));
        Ok(c)
    }

    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        let r = self.live.entropy(b);
        let v = self.passed(r)?;
        self.push(Event::Entropy(v));
        Ok(v)
    }

    fn wait(
        &mut self,
        b: Boundary,
        deadline_ns: u64,
        rx_room: usize,
    ) -> Result<ClockValue, InputError> {
        // Nothing gathered may wait for the end of a WAIT (DESIGN §5: the frames taken here
        // need the records before it acknowledged).
        self.out.log_handoff();
        let r = self.live.wait(b, deadline_ns, rx_room);
        let c = self.passed(r)?;
        self.push(Event::WaitEnded(c));
        Ok(c)
    }

    fn net_rx(&mut self, b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        // Take no more frames than the boundary's record can carry: the rest stay queued on
        // the host and arrive at a later boundary (net_rx is the last question of a boundary).
        let used = self.pending.as_ref().map_or(RECORD_BOUND, |p| p.bytes);
        let room = room.min((MAX_PAYLOAD.saturating_sub(used) / FRAME_BOUND) as usize);
        let frames = self.live.net_rx(b, room)?;
        for f in &frames {
            self.push(Event::NetRx(f.clone()));
        }
        Ok(frames)
    }

    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        let r = self.live.random(b, len);
        let v = self.passed(r)?;
        self.push(Event::Random(v.clone()));
        Ok(v)
    }

    fn disk_done(&mut self, b: Boundary, status: u8, hash: u64) -> Result<(), InputError> {
        let r = self.live.disk_done(b, status, hash);
        self.passed(r)?;
        self.push(Event::DiskDone { status, hash });
        Ok(())
    }

    fn digest_every(&self) -> u64 {
        if self.active {
            self.digest_every
        } else {
            self.live.digest_every()
        }
    }

    fn memory_digest(
        &mut self,
        _b: Boundary,
        digest: [u8; 32],
        console: [u8; 32],
    ) -> Result<(), InputError> {
        if !self.active {
            return self.live.memory_digest(_b, digest, console);
        }
        if let Some(p) = self.pending.as_mut() {
            p.digest = Some((digest, console));
        }
        Ok(())
    }

    fn stop_after(&self, b: Boundary) -> Option<i32> {
        self.live.stop_after(b)
    }

    fn finish(&mut self, end: &End) -> Result<(), InputError> {
        if !self.active {
            self.out.log_handoff();
            return self.live.finish(end);
        }
        self.flush_pending()?;
        self.write(&Record::End(end.clone()))?;
        self.out.log_flush()?;
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = self.stats;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::codec::StreamDecoder;

    /// A clock that moves 1 ms per question.
    struct Ticks(u64);
    impl Inputs for Ticks {
        fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
            self.0 += 1_000_000;
            Ok(ClockValue {
                mono_ns: self.0,
                wall_ns: 1_700_000_000_000_000_000 + self.0,
            })
        }
        fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
            Ok(b * 7)
        }
        fn wait(&mut self, b: Boundary, _d: u64, _r: usize) -> Result<ClockValue, InputError> {
            self.clock(b)
        }
        fn random(&mut self, _b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
            Ok(vec![3; len])
        }
    }

    /// Keeps each log (a restart begins a new one).
    #[derive(Default)]
    struct Logs(Vec<Vec<u8>>);
    impl LogSink for Logs {
        fn log_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            if self.0.is_empty() {
                self.0.push(Vec::new());
            }
            self.0.last_mut().expect("one").extend_from_slice(bytes);
            Ok(())
        }
        fn log_flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn log_restart(&mut self) {
            self.0.push(Vec::new());
        }
    }

    fn header() -> Header {
        Header {
            image_hash: [1; 32],
            mem_size: 1 << 20,
            cpuid_hash: [2; 32],
            args: String::new(),
            machine: String::new(),
            digest_every: 0,
        }
    }

    fn decode_all(bytes: &[u8]) -> Vec<Record> {
        let mut d = StreamDecoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(r) = d.next_record().expect("a restarted log decodes on its own") {
            out.push(r);
        }
        out
    }

    fn run(rec: &mut Recorder<Ticks, Logs>, from: Boundary, to: Boundary) {
        for b in from..=to {
            rec.boundary(b, Some(Fingerprint::default())).unwrap();
            rec.clock(b).unwrap();
        }
    }

    #[test]
    fn a_switch_stops_and_restarts_the_log_and_a_restarted_log_decodes_from_scratch() {
        let sw = RecordSwitch::new();
        let mut rec = Recorder::new(Ticks(0), Logs::default(), header())
            .unwrap()
            .with_switch(sw.clone());
        run(&mut rec, 1, 5);
        sw.stop();
        run(&mut rec, 6, 9);
        sw.start(header());
        run(&mut rec, 10, 12);
        let logs = &rec.out.0;
        // The first log, the (empty) stretch while stopped, the restarted one.
        let last = decode_all(logs.last().unwrap());
        assert!(matches!(last[0], Record::Header(_)), "{last:?}");
        let bounds: Vec<Boundary> = last
            .iter()
            .filter_map(|r| match r {
                Record::Boundary { boundary, .. } => Some(*boundary),
                _ => None,
            })
            .collect();
        assert_eq!(bounds, vec![10, 11], "boundary 12 is still pending");
        for r in &last {
            if let Record::Boundary {
                events,
                inputs_hash: h,
                ..
            } = r
            {
                assert_eq!(*h, inputs_hash(events), "events decode as recorded");
            }
        }
        let first = decode_all(&logs[0]);
        assert!(first
            .iter()
            .any(|r| matches!(r, Record::Boundary { boundary: 4, .. })));
        assert!(
            !logs[1..logs.len() - 1].iter().any(|l| !l.is_empty()),
            "nothing is recorded while stopped"
        );
    }

    /// Keeps every call in order: records' boundaries, watermarks, hand-offs.
    #[derive(Default)]
    struct Calls(Vec<String>, StreamDecoder);
    impl LogSink for Calls {
        fn log_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.1.push(bytes);
            while let Some(r) = self.1.next_record().expect("decodes") {
                if let Record::Boundary { boundary, .. } = r {
                    self.0.push(format!("record {boundary}"));
                }
            }
            Ok(())
        }
        fn log_watermark(&mut self, w: Boundary) -> std::io::Result<()> {
            self.0.push(format!("watermark {w}"));
            Ok(())
        }
        fn log_handoff(&mut self) {
            self.0.push("handoff".into());
        }
        fn log_flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_boundarys_record_and_watermark_are_handed_off_when_it_ends_and_before_a_wait() {
        let mut rec = Recorder::new(Ticks(0), Calls::default(), header()).unwrap();
        rec.boundary(1, Some(Fingerprint::default())).unwrap();
        rec.clock(1).unwrap();
        assert!(rec.out.0.is_empty(), "nothing of boundary 1 before it ends");
        rec.boundary_end(1).unwrap();
        assert_eq!(rec.out.0, ["record 1", "watermark 1", "handoff"]);
        // Boundary 2 WAITs: what was gathered goes before the wait blocks; its own record
        // only once it ended (a primary blocked in a WAIT at 2 advertises 1).
        rec.boundary(2, Some(Fingerprint::default())).unwrap();
        rec.wait(2, 0, 0).unwrap();
        assert_eq!(rec.out.0[3..], ["handoff"]);
        rec.boundary_end(2).unwrap();
        assert_eq!(rec.out.0[4..], ["record 2", "watermark 2", "handoff"]);
    }

    #[test]
    fn a_dormant_recorder_passes_questions_on_and_records_nothing_until_started() {
        let sw = RecordSwitch::new();
        let mut rec = Recorder::dormant(Ticks(0), Logs::default(), sw.clone());
        run(&mut rec, 1, 3);
        assert!(rec.out.0.iter().all(|l| l.is_empty()));
        sw.start(header());
        run(&mut rec, 4, 6);
        let log = decode_all(rec.out.0.last().unwrap());
        assert!(matches!(log[0], Record::Header(_)));
        assert!(log
            .iter()
            .any(|r| matches!(r, Record::Boundary { boundary: 4, .. })));
    }
}
