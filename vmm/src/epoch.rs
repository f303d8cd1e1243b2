//! Epochs and the event-source seam.
//!
//! The guest's execution is a sequence of epochs separated by **boundaries**: the exits the
//! guest causes deterministically (MMIO accesses), numbered 1, 2, 3, … identically wherever the
//! guest runs. Guest-visible state changes only at a boundary (DESIGN §3). Everything
//! nondeterministic the guest sees enters through [`Inputs`]: at boundary `E` the VMM asks it
//! what happens there. Live sources answer from the host (clock, entropy, timers); a recorder
//! answers from live sources and appends each answer to a log; a replayer answers from a log.
//! Nothing else in the VMM knows which one it is talking to.

use thiserror::Error;

use crate::kvm::memory::GuestMemory;

/// The number of an epoch boundary (the first boundary is 1).
pub type Boundary = u64;

/// The guest's clock as the VMM hands it out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockValue {
    /// Monotonic nanoseconds since the VM booted.
    pub mono_ns: u64,
    /// Wall-clock nanoseconds since the Unix epoch.
    pub wall_ns: u64,
}

/// A small fingerprint of the guest at a boundary: where it is and a hash of its registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// The guest's instruction pointer.
    pub rip: u64,
    /// blake3 (truncated) of the general registers, RIP and RFLAGS.
    pub regs_hash: u64,
}

/// Why an input source could not answer.
#[derive(Debug, Error)]
pub enum InputError {
    /// The node is stopping (a signal, an operator request).
    #[error("stopped by signal {0}")]
    Stopped(i32),
    /// A host facility failed.
    #[error("input source failed: {0}")]
    Io(#[from] std::io::Error),
    /// Replay found the guest doing something other than what the log recorded.
    #[error("divergence at boundary {boundary}: {what}")]
    Divergence {
        /// The first boundary that differs.
        boundary: Boundary,
        /// What differs.
        what: String,
    },
    /// The log cannot be used.
    #[error("log: {0}")]
    Log(String),
    /// A backup's primary is lost: the stream has nothing more for this boundary.
    #[error("the primary is lost: {0}")]
    PeerLost(String),
    /// The node halted (a denied claim): the guest must not run on.
    #[error("halted: {0}")]
    Halted(String),
}

/// The source of everything nondeterministic the guest sees. Called only at boundaries, in
/// boundary order.
pub trait Inputs: Send {
    /// Whether [`Inputs::boundary`] needs a fingerprint (computing one costs an ioctl).
    fn wants_fingerprint(&self) -> bool {
        false
    }
    /// Called once at the start of every boundary, before any question about it.
    fn boundary(
        &mut self,
        _b: Boundary,
        _fingerprint: Option<Fingerprint>,
    ) -> Result<(), InputError> {
        Ok(())
    }
    /// Called once at the end of every boundary that completed, just before the guest
    /// resumes: every question about `b` has been asked.
    fn boundary_end(&mut self, _b: Boundary) -> Result<(), InputError> {
        Ok(())
    }
    /// The clock at boundary `b`.
    fn clock(&mut self, b: Boundary) -> Result<ClockValue, InputError>;
    /// Eight bytes of entropy at boundary `b`.
    fn entropy(&mut self, b: Boundary) -> Result<u64, InputError>;
    /// The guest WAITs at `b` until `deadline_ns` (monotonic) or an event; returns the clock
    /// when the wait ends. `rx_room` is how many received frames the guest could take now
    /// (a frame arriving is an event only if there is room for it).
    fn wait(
        &mut self,
        b: Boundary,
        deadline_ns: u64,
        rx_room: usize,
    ) -> Result<ClockValue, InputError>;
    /// Frames received from the network, at most `room` of them, to deliver at `b`.
    fn net_rx(&mut self, _b: Boundary, _room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        Ok(Vec::new())
    }
    /// `len` random bytes for a virtio-rng request at `b`.
    fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError>;
    /// A block request completed at `b` with this status and hash of the data read. Both
    /// hosts perform block I/O on their own disk: a recorder logs the result, a replayer
    /// checks that this host's result is the recorded one (a difference is disk divergence).
    fn disk_done(&mut self, _b: Boundary, _status: u8, _hash: u64) -> Result<(), InputError> {
        Ok(())
    }
    /// Every how many boundaries a memory digest is wanted (0: never).
    fn digest_every(&self) -> u64 {
        0
    }
    /// The digest of guest memory when the guest reached boundary `b` (before anything was
    /// applied there).
    /// `console` is the digest of everything the guest printed before `b`.
    fn memory_digest(
        &mut self,
        _b: Boundary,
        _digest: [u8; 32],
        _console: [u8; 32],
    ) -> Result<(), InputError> {
        Ok(())
    }
    /// Whether the run must stop right after boundary `b` (a replay reaching the point where
    /// the recorded run was stopped by a signal between two exits): the signal, if so.
    fn stop_after(&self, _b: Boundary) -> Option<i32> {
        None
    }
    /// The run ended in `end`.
    fn finish(&mut self, _end: &crate::replay::codec::End) -> Result<(), InputError> {
        Ok(())
    }
}

/// Where console output goes.
pub trait ConsoleSink: Send {
    /// Takes bytes the guest printed.
    fn write(&mut self, bytes: &[u8]);
}

/// What a boundary asks of the machine beyond resuming the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineRequest {
    /// The guest asked to end the VM with this status.
    Exit(u64),
}

/// Everything a device may use while handling an access at a boundary.
pub struct BoundaryCx<'a> {
    /// The boundary being handled.
    pub boundary: Boundary,
    /// Guest memory (write only through [`GuestMemory::write`]).
    pub mem: &'a GuestMemory,
    /// The event source.
    pub inputs: &'a mut dyn Inputs,
    /// The console.
    pub console: &'a mut dyn ConsoleSink,
    /// Set by a device to stop the machine after this boundary.
    pub request: &'a mut Option<MachineRequest>,
    /// How many received frames the devices could take at this boundary.
    pub rx_room: usize,
    /// Set by the control device when the access is a WAIT or POLL: device events
    /// (received frames) are applied at such boundaries.
    pub doorbell: bool,
}

/// Test helpers: a guest memory without a VM and a scripted clock, for unit tests of devices.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A scripted input source: the clock advances by `step` on every question.
    pub struct ScriptedInputs {
        /// Current clock.
        pub now: ClockValue,
        /// Clock advance per question.
        pub step: u64,
        /// Next entropy value.
        pub next_entropy: u64,
        /// Deadlines the guest waited for.
        pub waits: Vec<u64>,
    }

    impl Inputs for ScriptedInputs {
        fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
            self.now.mono_ns += self.step;
            self.now.wall_ns += self.step;
            Ok(self.now)
        }
        fn entropy(&mut self, _b: Boundary) -> Result<u64, InputError> {
            self.next_entropy = self
                .next_entropy
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1);
            Ok(self.next_entropy)
        }
        fn wait(
            &mut self,
            _b: Boundary,
            deadline: u64,
            _room: usize,
        ) -> Result<ClockValue, InputError> {
            self.waits.push(deadline);
            self.now.mono_ns = self.now.mono_ns.max(deadline);
            Ok(self.now)
        }
        fn random(&mut self, b: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
            Ok((0..len).map(|i| (b as usize + i) as u8).collect())
        }
    }

    /// Console output collected in memory.
    #[derive(Default)]
    pub struct VecConsole(pub Vec<u8>);
    impl ConsoleSink for VecConsole {
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    /// Owns what a [`BoundaryCx`] borrows.
    pub struct TestBoundary {
        /// 4 MiB of guest memory.
        pub mem: GuestMemory,
        /// The inputs.
        pub inputs: ScriptedInputs,
        /// The console.
        pub console: VecConsole,
        /// The last request.
        pub request: Option<MachineRequest>,
        /// Boundary counter.
        pub boundary: Boundary,
    }

    impl Default for TestBoundary {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestBoundary {
        /// A fresh context.
        pub fn new() -> Self {
            TestBoundary {
                mem: GuestMemory::new(4 << 20).unwrap(),
                inputs: ScriptedInputs {
                    now: ClockValue {
                        mono_ns: 0,
                        wall_ns: 1_700_000_000_000_000_000,
                    },
                    step: 1000,
                    next_entropy: 1,
                    waits: Vec::new(),
                },
                console: VecConsole::default(),
                request: None,
                boundary: 0,
            }
        }
        /// The context for the next boundary.
        pub fn cx(&mut self) -> BoundaryCx<'_> {
            self.boundary += 1;
            BoundaryCx {
                boundary: self.boundary,
                mem: &self.mem,
                inputs: &mut self.inputs,
                console: &mut self.console,
                request: &mut self.request,
                rx_room: 0,
                doorbell: false,
            }
        }
    }
}
