//! Live input sources: the host's clocks and entropy, and WAIT implemented by blocking on the
//! stop eventfd (and, with devices, their event sources) until the deadline.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::epoch::{Boundary, ClockValue, InputError, Inputs};
use crate::signals::StopSignal;

/// The host as an input source.
pub struct LiveInputs {
    start: Instant,
    /// Added to the monotonic clock: where guest time stood when this source took over.
    mono_base: u64,
    stop: Arc<StopSignal>,
}

impl LiveInputs {
    /// Live inputs whose monotonic clock starts at `mono_base` ns now.
    pub fn new(stop: Arc<StopSignal>, mono_base: u64) -> Self {
        LiveInputs {
            start: Instant::now(),
            mono_base,
            stop,
        }
    }

    fn now(&self) -> ClockValue {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        ClockValue {
            mono_ns: self.mono_base + self.start.elapsed().as_nanos() as u64,
            wall_ns: wall,
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
        getrandom(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn wait(&mut self, _b: Boundary, deadline_ns: u64) -> Result<ClockValue, InputError> {
        loop {
            self.check_stop()?;
            let now = self.now();
            if now.mono_ns >= deadline_ns {
                return Ok(now);
            }
            let left = deadline_ns - now.mono_ns;
            let ts = libc::timespec {
                tv_sec: (left / 1_000_000_000).min(i64::MAX as u64) as libc::time_t,
                tv_nsec: (left % 1_000_000_000) as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: self.stop.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
            let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
        }
    }
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += r as usize;
        }
    }
    Ok(())
}
