//! The recorder and the replayer on their own, without a VM: a scripted host stands in for the
//! live inputs, so that boundaries with exactly the inputs wanted (at the log's limits, or
//! stopped in the middle) can be produced at will.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm::epoch::{Boundary, ClockValue, Fingerprint, InputError, Inputs};
use vmm::replay::codec::{End, EndKind, Header, MAX_EVENT_BYTES};
use vmm::replay::recorder::Recorder;
use vmm::replay::replayer::Replayer;

/// A host whose network has `frames_waiting` frames of the largest size queued.
struct ScriptedHost {
    frames_waiting: usize,
    clock: u64,
    sent: u8,
}

impl ScriptedHost {
    fn new(frames_waiting: usize) -> Self {
        ScriptedHost {
            frames_waiting,
            clock: 1_000,
            sent: 0,
        }
    }
}

impl Inputs for ScriptedHost {
    fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
        self.clock += 1_000;
        Ok(ClockValue {
            mono_ns: self.clock,
            wall_ns: self.clock + 1_700_000_000_000_000_000,
        })
    }
    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        Ok(b.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn wait(&mut self, b: Boundary, deadline: u64, _room: usize) -> Result<ClockValue, InputError> {
        self.clock = self.clock.max(deadline);
        self.clock(b)
    }
    fn net_rx(&mut self, _b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        let n = room.min(self.frames_waiting);
        self.frames_waiting -= n;
        Ok((0..n)
            .map(|_| {
                self.sent = self.sent.wrapping_add(1);
                vec![self.sent; MAX_EVENT_BYTES as usize]
            })
            .collect())
    }
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        Ok(vec![b as u8; len])
    }
}

/// A log file in memory that stays readable after the recorder that owns the writer is gone.
#[derive(Clone, Default)]
struct SharedLog(Arc<Mutex<Vec<u8>>>);

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn header() -> Header {
    Header {
        image_hash: [1; 32],
        mem_size: 64 << 20,
        cpuid_hash: [2; 32],
        args: String::new(),
        machine: "net".into(),
        digest_every: 0,
    }
}

fn fp(b: Boundary) -> Option<Fingerprint> {
    Some(Fingerprint {
        rip: 0x1000 + b,
        regs_hash: b * 3,
    })
}

fn end(boundary: Boundary, kind: EndKind) -> End {
    End {
        boundary,
        kind,
        fingerprint: Fingerprint::default(),
        memory_digest: [0; 32],
        console_digest: [0; 32],
    }
}

/// The most a boundary can receive: every one of the RX queue's 256 buffers filled with a
/// frame of the largest size the log accepts. The recording must stay decodable, and every
/// frame must arrive, at this boundary or the next.
#[test]
fn a_boundary_receiving_the_most_frames_still_records_a_log_the_decoder_accepts() {
    let log = SharedLog::default();
    let mut rec = Recorder::new(ScriptedHost::new(256), log.clone(), header()).unwrap();
    let mut delivered = Vec::new();
    for b in 1..=3 {
        rec.boundary(b, fp(b)).unwrap();
        rec.wait(b, 0, 256).unwrap();
        delivered.push(rec.net_rx(b, 256).unwrap());
    }
    rec.finish(&end(3, EndKind::Exited(0))).unwrap();
    let bytes = log.0.lock().unwrap().clone();
    let mut rep = Replayer::from_bytes(&bytes).expect("the recorder wrote a log it cannot read");
    let taken: usize = delivered.iter().map(Vec::len).sum();
    assert_eq!(taken, 256, "every queued frame is delivered");
    for (i, frames) in delivered.iter().enumerate() {
        let b = i as u64 + 1;
        rep.boundary(b, fp(b)).unwrap();
        rep.wait(b, 0, 256).unwrap();
        assert_eq!(&rep.net_rx(b, 256).unwrap(), frames, "boundary {b}");
    }
    rep.finish(&end(3, EndKind::Exited(0))).unwrap();
}

/// A guest that submitted a disk request (taken at the WAIT's boundary) and then WAITed when
/// a signal stopped the recording: the replay must stop there too, not diverge.
#[test]
fn a_wait_stopped_after_a_disk_completion_replays_to_the_same_stop() {
    let log = SharedLog::default();
    let host = StopAt {
        inner: ScriptedHost::new(0),
        stop_at: 2,
    };
    let mut rec = Recorder::new(host, log.clone(), header()).unwrap();
    rec.boundary(1, fp(1)).unwrap();
    rec.disk_done(1, 0, 7).unwrap();
    rec.wait(1, 10, 0).unwrap();
    rec.boundary(2, fp(2)).unwrap();
    rec.disk_done(2, 0, 9).unwrap();
    let stopped = rec.wait(2, 20, 0);
    assert!(
        matches!(stopped, Err(InputError::Stopped(15))),
        "{stopped:?}"
    );
    rec.finish(&end(2, EndKind::Stopped(15))).unwrap();

    let bytes = log.0.lock().unwrap().clone();
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    rep.disk_done(1, 0, 7).unwrap();
    rep.wait(1, 10, 0).unwrap();
    rep.boundary(2, fp(2)).unwrap();
    let r = rep
        .disk_done(2, 0, 9)
        .and_then(|()| rep.wait(2, 20, 0).map(|_| ()));
    assert!(matches!(r, Err(InputError::Stopped(15))), "{r:?}");
    rep.finish(&end(2, EndKind::Stopped(15))).unwrap();
}

/// Stops every WAIT from boundary `stop_at` on, as a signal arriving there would.
struct StopAt {
    inner: ScriptedHost,
    stop_at: Boundary,
}

impl Inputs for StopAt {
    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError> {
        self.inner.clock(b)
    }
    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        self.inner.entropy(b)
    }
    fn wait(&mut self, b: Boundary, deadline: u64, room: usize) -> Result<ClockValue, InputError> {
        if b >= self.stop_at {
            return Err(InputError::Stopped(15));
        }
        self.inner.wait(b, deadline, room)
    }
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        self.inner.random(b, len)
    }
}

/// Records: boundary 1 reads the clock and entropy, boundary 2 nothing, boundary 3 WAITs and
/// reads the clock; then the run exits at boundary 4.
fn small_log() -> Vec<u8> {
    let log = SharedLog::default();
    let mut rec = Recorder::new(ScriptedHost::new(0), log.clone(), header()).unwrap();
    rec.boundary(1, fp(1)).unwrap();
    rec.clock(1).unwrap();
    rec.entropy(1).unwrap();
    rec.boundary(2, fp(2)).unwrap();
    rec.boundary(3, fp(3)).unwrap();
    rec.wait(3, 50_000, 0).unwrap();
    rec.clock(3).unwrap();
    rec.boundary(4, fp(4)).unwrap();
    let stats = rec.stats_handle();
    rec.finish(&end(4, EndKind::Exited(0))).unwrap();
    assert_eq!(
        stats.lock().unwrap().boundary_records,
        2,
        "boundaries 1 and 3 are logged, 2 and 4 (no inputs) are not"
    );
    let bytes = log.0.lock().unwrap().clone();
    bytes
}

fn divergence_at(r: Result<impl std::fmt::Debug, InputError>) -> (Boundary, String) {
    match r {
        Err(InputError::Divergence { boundary, what }) => (boundary, what),
        other => panic!("expected a divergence, got {other:?}"),
    }
}

#[test]
fn a_faithful_guest_replays_the_small_log() {
    let bytes = small_log();
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    assert_eq!(rep.stats().boundary_records, 2);
    rep.boundary(1, fp(1)).unwrap();
    let c = rep.clock(1).unwrap();
    assert_eq!(c.mono_ns, 2_000);
    assert_eq!(rep.entropy(1).unwrap(), 0x9e37_79b9_7f4a_7c15);
    rep.boundary(2, fp(2)).unwrap();
    rep.boundary(3, fp(3)).unwrap();
    assert_eq!(rep.wait(3, 50_000, 0).unwrap().mono_ns, 51_000);
    rep.clock(3).unwrap();
    rep.boundary(4, fp(4)).unwrap();
    rep.finish(&end(4, EndKind::Exited(0))).unwrap();
}

#[test]
fn the_replayer_names_the_first_boundary_where_the_guest_differs() {
    let bytes = small_log();
    // Elsewhere at a boundary with inputs: its registers differ.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    let (b, what) = divergence_at(rep.boundary(1, fp(9)));
    assert_eq!(b, 1);
    assert!(what.contains("guest state differs"), "{what}");

    // Asks for another kind of input than was logged.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    let (b, what) = divergence_at(rep.entropy(1));
    assert_eq!(b, 1);
    assert!(what.contains("read entropy"), "{what}");

    // Asks for fewer inputs than logged: found when it moves on.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    rep.clock(1).unwrap();
    let (b, what) = divergence_at(rep.boundary(2, fp(2)));
    assert_eq!(b, 1);
    assert!(what.contains("did not ask for"), "{what}");

    // Asks for an input at a boundary that had none.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    rep.clock(1).unwrap();
    rep.entropy(1).unwrap();
    rep.boundary(2, fp(2)).unwrap();
    let (b, _) = divergence_at(rep.clock(2));
    assert_eq!(b, 2);

    // Passes boundary 3 without its WAIT.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    rep.clock(1).unwrap();
    rep.entropy(1).unwrap();
    rep.boundary(2, fp(2)).unwrap();
    let (b, what) = divergence_at(rep.boundary(4, fp(4)));
    assert_eq!(b, 3);
    assert!(what.contains("without asking"), "{what}");

    // Ends differently.
    let mut rep = Replayer::from_bytes(&bytes).unwrap();
    rep.boundary(1, fp(1)).unwrap();
    rep.clock(1).unwrap();
    rep.entropy(1).unwrap();
    rep.boundary(2, fp(2)).unwrap();
    rep.boundary(3, fp(3)).unwrap();
    rep.wait(3, 50_000, 0).unwrap();
    rep.clock(3).unwrap();
    rep.boundary(4, fp(4)).unwrap();
    let (b, what) = divergence_at(rep.finish(&end(4, EndKind::Exited(1))));
    assert_eq!(b, 4);
    assert!(what.contains("ended differently"), "{what}");
}

#[test]
fn a_recording_cut_short_is_refused_before_replay() {
    let bytes = small_log();
    // Cut right before its end record.
    let mut d = vmm::replay::codec::Decoder::new(&bytes);
    let mut last = 0;
    while let Some(r) = d.next_record().unwrap() {
        if !matches!(r, vmm::replay::codec::Record::End(_)) {
            last = d.position();
        }
    }
    assert!(Replayer::from_bytes(&bytes[..last]).is_err());
}
