//! Live input sources: the host's clocks and entropy, and WAIT implemented by blocking on the
//! stop eventfd (and, with devices, their event sources) until the deadline.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::devices::tap::Tap;
use crate::epoch::{Boundary, ClockValue, InputError, Inputs};
use crate::signals::StopSignal;

/// The host as an input source.
pub struct LiveInputs {
    start: Instant,
    /// Added to the monotonic clock: where guest time stood when this source took over.
    mono_base: u64,
    stop: Arc<StopSignal>,
    tap: Option<Arc<Tap>>,
    /// Wall time never goes below this plus the time since `start` (a backup gone live
    /// continues from the primary's last wall clock even if its own clock is behind).
    wall_floor: u64,
    /// A pause request ends a blocked WAIT early (the machine then pauses at once).
    pause: Option<crate::machine::PauseHandle>,
}

impl LiveInputs {
    /// Live inputs whose monotonic clock starts at `mono_base` ns now.
    pub fn new(stop: Arc<StopSignal>, mono_base: u64) -> Self {
        LiveInputs {
            start: Instant::now(),
            mono_base,
            stop,
            tap: None,
            wall_floor: 0,
            pause: None,
        }
    }

    /// Wall time will not go below `wall_ns` (plus the time since this source was made).
    pub fn with_wall_floor(mut self, wall_ns: u64) -> Self {
        self.wall_floor = wall_ns;
        self
    }

    /// A pause requested through `pause` ends a WAIT early (a WAIT may always end before its
    /// deadline; the guest sees the clock and waits again), so a join's pause never waits
    /// for an idle guest's deadline.
    pub fn with_pause(mut self, pause: crate::machine::PauseHandle) -> Self {
        self.pause = Some(pause);
        self
    }

    /// Also receive frames from `tap`.
    pub fn with_tap(mut self, tap: Arc<Tap>) -> Self {
        self.tap = Some(tap);
        self
    }

    fn now(&self) -> ClockValue {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let since = self.start.elapsed().as_nanos() as u64;
        ClockValue {
            mono_ns: self.mono_base + since,
            wall_ns: wall.max(self.wall_floor.saturating_add(since)),
        }
    }

    fn check_stop(&self) -> Result<(), InputError> {
        match self.stop.signalled() {
            Some(sig) => Err(InputError::Stopped(sig)),
            None => Ok(()),
        }
    }
}

impl Inputs for LiveInputs {
    fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
        Ok(self.now())
    }

    fn entropy(&mut self, _b: Boundary) -> Result<u64, InputError> {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(std::io::Error::from)?;
        Ok(u64::from_le_bytes(b))
    }

    fn net_rx(&mut self, _b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        let mut frames = Vec::new();
        if let Some(tap) = &self.tap {
            while frames.len() < room {
                match tap.try_read()? {
                    Some(f) => frames.push(f),
                    None => break,
                }
            }
        }
        Ok(frames)
    }

    fn random(&mut self, _b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        let mut v = vec![0u8; len];
        getrandom::fill(&mut v).map_err(std::io::Error::from)?;
        Ok(v)
    }

    fn wait(
        &mut self,
        _b: Boundary,
        deadline_ns: u64,
        rx_room: usize,
    ) -> Result<ClockValue, InputError> {
        loop {
            self.check_stop()?;
            let now = self.now();
            if now.mono_ns >= deadline_ns {
                return Ok(now);
            }
            let left = deadline_ns - now.mono_ns;
            let ts = Timespec {
                tv_sec: (left / 1_000_000_000).min(i64::MAX as u64) as i64,
                tv_nsec: (left % 1_000_000_000) as i64,
            };
            // The stop eventfd always; the TAP when a frame could be delivered; the pause
            // eventfd when there is one.
            let stop = PollFd::new(&*self.stop, PollFlags::IN);
            let mut fds = [stop.clone(), stop.clone(), stop];
            let mut n = 1;
            let mut tap_at = None;
            if let (Some(t), true) = (&self.tap, rx_room > 0) {
                fds[n] = PollFd::new(&**t, PollFlags::IN);
                tap_at = Some(n);
                n += 1;
            }
            if let Some(fd) = self.pause.as_ref().and_then(|p| p.wake_fd()) {
                fds[n] = PollFd::from_borrowed_fd(fd, PollFlags::IN);
                n += 1;
            }
            let r = poll(&mut fds[..n], Some(&ts));
            if tap_at.is_some_and(|i| !fds[i].revents().is_empty()) {
                return Ok(self.now());
            }
            if self.pause.as_ref().is_some_and(|p| p.requested()) {
                return Ok(self.now());
            }
            match r {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
    }
}
