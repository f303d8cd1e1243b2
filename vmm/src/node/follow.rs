//! A backup's inputs: the replayer fed by the stream, until the primary is lost; then, at the
//! first boundary the stream does not cover, a pause for the witness's answer and — granted —
//! live inputs from that boundary on (DESIGN §5 "Failover": go live at
//! `max(W_acked, replayed) + 1`, the guest's clock continuing from the last logged value,
//! never backwards).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::tap::Tap;
use crate::epoch::{Boundary, ClockValue, Fingerprint, InputError, Inputs};
use crate::live::LiveInputs;
use crate::replay::codec::End;
use crate::replay::replayer::Replayer;
use crate::signals::StopSignal;

/// The vCPU thread's question to the node when the stream has run out.
#[derive(Debug)]
pub struct CaughtUp {
    /// The boundary the guest waits at: everything before it is replayed.
    pub boundary: Boundary,
    /// Why the stream ended.
    pub why: String,
    /// When the replay got here.
    pub at: Instant,
}

/// The node's answer.
#[derive(Debug)]
pub enum Decision {
    /// Granted: go live.
    GoLive,
    /// Denied (or the node is stopping): halt.
    Halt(String),
}

/// The backup's input source.
pub struct Follower {
    replayer: Replayer,
    live: Option<LiveInputs>,
    last_clock: ClockValue,
    last_at: Instant,
    stop: Arc<StopSignal>,
    tap: Option<Arc<Tap>>,
    caught_up: tokio::sync::mpsc::UnboundedSender<CaughtUp>,
    decision: std_mpsc::Receiver<Decision>,
    is_live: Arc<AtomicBool>,
    pause: Option<crate::machine::PauseHandle>,
}

impl Follower {
    /// Follows `replayer`; asks on `caught_up` and waits on `decision` when it runs out;
    /// sets `is_live` when it goes live.
    pub fn new(
        replayer: Replayer,
        stop: Arc<StopSignal>,
        tap: Option<Arc<Tap>>,
        caught_up: tokio::sync::mpsc::UnboundedSender<CaughtUp>,
        decision: std_mpsc::Receiver<Decision>,
        is_live: Arc<AtomicBool>,
    ) -> Self {
        Follower {
            replayer,
            live: None,
            last_clock: ClockValue::default(),
            last_at: Instant::now(),
            stop,
            tap,
            caught_up,
            decision,
            is_live,
            pause: None,
        }
    }

    /// Once live, a pause requested through `pause` ends a blocked WAIT (a join).
    pub fn with_pause(mut self, pause: crate::machine::PauseHandle) -> Self {
        self.pause = Some(pause);
        self
    }

    fn seen(&mut self, c: ClockValue) -> ClockValue {
        self.last_clock = c;
        self.last_at = Instant::now();
        c
    }

    fn go_live(&mut self, b: Boundary, why: String) -> Result<(), InputError> {
        let _ = self.caught_up.send(CaughtUp {
            boundary: b,
            why,
            at: Instant::now(),
        });
        loop {
            if let Some(sig) = self.stop.signalled() {
                return Err(InputError::Stopped(sig));
            }
            match self.decision.recv_timeout(Duration::from_millis(5)) {
                Ok(Decision::GoLive) => break,
                Ok(Decision::Halt(why)) => return Err(InputError::Halted(why)),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(InputError::Halted("the node is going down".into()))
                }
            }
        }
        // The guest's clock continues from the last value it saw, plus the time since.
        let since = self.last_at.elapsed().as_nanos() as u64;
        let mut live = LiveInputs::new(self.stop.clone(), self.last_clock.mono_ns + since)
            .with_wall_floor(self.last_clock.wall_ns + since);
        if let Some(t) = &self.tap {
            live = live.with_tap(t.clone());
        }
        if let Some(p) = &self.pause {
            live = live.with_pause(p.clone());
        }
        self.is_live.store(true, Ordering::SeqCst);
        self.live = Some(live);
        tracing::info!("live from boundary {b}");
        Ok(())
    }
}

macro_rules! either {
    ($s:ident, $l:ident => $le:expr, $r:ident => $re:expr) => {
        match $s.live.as_mut() {
            Some($l) => $le,
            None => {
                let $r = &mut $s.replayer;
                $re
            }
        }
    };
}

impl Inputs for Follower {
    fn wants_fingerprint(&self) -> bool {
        self.live.is_none()
    }
    fn boundary(&mut self, b: Boundary, fp: Option<Fingerprint>) -> Result<(), InputError> {
        if self.live.is_none() {
            match self.replayer.boundary(b, fp) {
                Err(InputError::PeerLost(why)) => self.go_live(b, why)?,
                other => return other,
            }
        }
        either!(self, l => l.boundary(b, fp), r => r.boundary(b, fp))
    }
    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError> {
        let c = either!(self, l => l.clock(b)?, r => r.clock(b)?);
        Ok(self.seen(c))
    }
    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError> {
        either!(self, l => l.entropy(b), r => r.entropy(b))
    }
    fn wait(&mut self, b: Boundary, deadline: u64, room: usize) -> Result<ClockValue, InputError> {
        let c = either!(self, l => l.wait(b, deadline, room)?, r => r.wait(b, deadline, room)?);
        Ok(self.seen(c))
    }
    fn net_rx(&mut self, b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        either!(self, l => l.net_rx(b, room), r => r.net_rx(b, room))
    }
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        either!(self, l => l.random(b, len), r => r.random(b, len))
    }
    fn disk_done(&mut self, b: Boundary, status: u8, hash: u64) -> Result<(), InputError> {
        either!(self, l => l.disk_done(b, status, hash), r => r.disk_done(b, status, hash))
    }
    fn digest_every(&self) -> u64 {
        match self.live {
            Some(_) => 0,
            None => self.replayer.digest_every(),
        }
    }
    fn memory_digest(&mut self, b: Boundary, d: [u8; 32], c: [u8; 32]) -> Result<(), InputError> {
        either!(self, _l => Ok(()), r => r.memory_digest(b, d, c))
    }
    fn stop_after(&self, b: Boundary) -> Option<i32> {
        match self.live {
            Some(_) => None,
            None => self.replayer.stop_after(b),
        }
    }
    fn finish(&mut self, end: &End) -> Result<(), InputError> {
        either!(self, _l => Ok(()), r => r.finish(end))
    }
}
