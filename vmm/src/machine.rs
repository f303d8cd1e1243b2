//! The machine: a KVM VM, its MMIO bus and devices, an input source and a console, driven by
//! the run loop. The run loop is an explicit state machine over [`RunState`]; every exit comes
//! from [`Vcpu::run`](crate::kvm::vcpu::Vcpu::run), and every epoch boundary is handled in one
//! place, [`Machine::boundary`].

use std::fmt;

use kvm_bindings::kvm_regs;

use crate::bus::MmioBus;
use crate::epoch::{
    Boundary, BoundaryCx, ConsoleSink, Fingerprint, InputError, Inputs, MachineRequest,
};
use crate::error::VmmError;
use crate::kvm::vcpu::{fingerprint, VmExit};
use crate::kvm::KvmVm;
use crate::replay::codec::{End, EndKind};
use crate::replay::digest::MemoryDigest;
use crate::signals;
use crate::state::dirty::DirtyTracker;
use crate::state::{StateError, VmState};
use std::sync::Arc;

impl ConsoleSink for HashingConsole {
    fn write(&mut self, bytes: &[u8]) {
        self.digest = *blake3::keyed_hash(&self.digest, bytes).as_bytes();
        self.inner.write(bytes);
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest wrote the exit register.
    Exited {
        /// The status it wrote.
        status: u64,
    },
    /// The guest crashed, broke its contract, or KVM could not run it.
    Crashed(Box<CrashReport>),
    /// A signal stopped the node.
    Stopped {
        /// The signal number.
        signal: i32,
    },
}

/// What the operator needs to know about a crashed guest.
#[derive(Debug)]
pub struct CrashReport {
    /// Why the run ended.
    pub reason: String,
    /// Boundaries passed before the crash.
    pub boundary: Boundary,
    /// The general registers.
    pub regs: kvm_regs,
    /// CR0, CR2, CR3, CR4, EFER (when KVM could read them).
    pub control: Option<[u64; 5]>,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        writeln!(
            f,
            "guest crashed: {} (after boundary {})",
            self.reason, self.boundary
        )?;
        writeln!(
            f,
            "  rip={:#018x} rsp={:#018x} rflags={:#x}",
            r.rip, r.rsp, r.rflags
        )?;
        writeln!(
            f,
            "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(
            f,
            "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
            r.rsi, r.rdi, r.rbp, r.r8
        )?;
        writeln!(
            f,
            "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
            r.r9, r.r10, r.r11, r.r12
        )?;
        write!(
            f,
            "  r13={:#018x} r14={:#018x} r15={:#018x}",
            r.r13, r.r14, r.r15
        )?;
        if let Some([cr0, cr2, cr3, cr4, efer]) = self.control {
            write!(
                f,
                "\n  cr0={cr0:#x} cr2={cr2:#x} cr3={cr3:#x} cr4={cr4:#x} efer={efer:#x}"
            )?;
        }
        Ok(())
    }
}

/// States of the run loop.
#[derive(Debug)]
enum RunState {
    /// The guest runs (or is about to re-enter).
    Running,
    /// A boundary asked the machine to end.
    Finishing(Outcome),
}

/// Console output passed on and hashed (the replayer compares the hash). The digest is a
/// chain that fits in 32 bytes, so that it can be saved with the VM state: it starts as
/// blake3 of nothing, and each console write replaces it with blake3 keyed by it over the
/// bytes written.
struct HashingConsole {
    inner: Box<dyn ConsoleSink>,
    digest: [u8; 32],
}

/// A complete VM ready to run.
pub struct Machine {
    vm: KvmVm,
    bus: MmioBus,
    inputs: Box<dyn Inputs>,
    console: HashingConsole,
    boundary: Boundary,
    stop: std::sync::Arc<signals::StopSignal>,
    /// The dirty-page tracker, on tracked memory (which also keeps memory digests).
    dirty: Option<Arc<DirtyTracker>>,
    end: Option<End>,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    pause: PauseHandle,
}

/// Asks a running machine, from any thread, to pause at its next exit: its
/// [`run_until`](Machine::run_until) then returns `None` with the guest paused, ready for
/// [`save_state`](Machine::save_state). A guest that computes without exits is paused at its
/// next one (the guest contract asks for one every few milliseconds).
#[derive(Clone, Debug, Default)]
pub struct PauseHandle(Arc<PauseInner>);

#[derive(Debug)]
struct PauseInner {
    requested: std::sync::atomic::AtomicBool,
    /// Becomes readable on a request, so an input source blocked in a WAIT can return early
    /// (`LiveInputs::with_pause`); `None` if the eventfd could not be made.
    wake: Option<std::os::fd::OwnedFd>,
}

impl Default for PauseInner {
    fn default() -> Self {
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .ok();
        PauseInner {
            requested: std::sync::atomic::AtomicBool::new(false),
            wake,
        }
    }
}

impl PauseHandle {
    /// A new handle (give it to the machine with [`Machine::set_pause_handle`] and to the
    /// live input source, so a pause also ends a blocked WAIT).
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests a pause (kept until the machine pauses).
    pub fn request(&self) {
        self.0
            .requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(fd) = &self.0.wake {
            // A full counter (EAGAIN) is readable already.
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }
    /// Whether a pause is requested and not yet taken.
    pub fn requested(&self) -> bool {
        self.0.requested.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// The eventfd that becomes readable on a request (`None` if it could not be made).
    pub fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.wake.as_ref().map(std::os::fd::AsFd::as_fd)
    }
    fn take(&self) -> bool {
        let was = self
            .0
            .requested
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if was {
            if let Some(fd) = &self.0.wake {
                // Non-blocking: nothing to read (EAGAIN) is fine.
                let _ = rustix::io::read(fd, &mut [0u8; 8]);
            }
        }
        was
    }
}

impl Machine {
    /// Assembles a machine.
    pub fn new(
        vm: KvmVm,
        bus: MmioBus,
        inputs: Box<dyn Inputs>,
        console: Box<dyn ConsoleSink>,
        stop: std::sync::Arc<signals::StopSignal>,
    ) -> Self {
        // Tracked memory only: DirtyTracker::new refuses the rest.
        let dirty = DirtyTracker::new(vm.vm_fd_shared(), &vm.memory).ok();
        Machine {
            vm,
            bus,
            inputs,
            console: HashingConsole {
                inner: console,
                digest: *blake3::hash(b"").as_bytes(),
            },
            boundary: 0,
            stop,
            dirty,
            end: None,
            progress: None,
            pause: PauseHandle::default(),
        }
    }

    /// Publishes every boundary the machine passes in `progress` (for `status`).
    pub fn set_progress(&mut self, progress: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.progress = Some(progress);
    }

    /// A handle to pause this machine from another thread.
    pub fn pause_handle(&self) -> PauseHandle {
        self.pause.clone()
    }

    /// Makes `pause` this machine's pause handle (one made before the machine, so its input
    /// source can watch it too).
    pub fn set_pause_handle(&mut self, pause: PauseHandle) {
        self.pause = pause;
    }

    /// Replaces the input source (between runs: a joiner restored from a state gets the
    /// replayer of the log that starts after it); returns the old one.
    pub fn set_inputs(&mut self, inputs: Box<dyn Inputs>) -> Box<dyn Inputs> {
        std::mem::replace(&mut self.inputs, inputs)
    }

    /// The final state, once [`run`](Self::run) has returned an outcome.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// The digest of guest memory now (on tracked memory; `None` otherwise).
    pub fn memory_digest(&mut self) -> Result<Option<[u8; 32]>, VmmError> {
        if self.dirty.is_none() {
            return Ok(None);
        }
        MemoryDigest::full(&self.vm.memory).map(Some)
    }

    /// Records how the run ended and lets the input source check or log it.
    fn finish(&mut self, outcome: &Outcome) -> Result<(), VmmError> {
        let kind = match outcome {
            Outcome::Exited { status } => EndKind::Exited(*status),
            Outcome::Crashed(_) => EndKind::Crashed,
            Outcome::Stopped { signal } => EndKind::Stopped(*signal),
        };
        let end = End {
            boundary: self.boundary,
            kind,
            fingerprint: self.fingerprint()?,
            memory_digest: self.memory_digest()?.unwrap_or([0; 32]),
            console_digest: self.console.digest,
        };
        self.end = Some(end.clone());
        self.inputs.finish(&end)?;
        Ok(())
    }

    /// Boundaries passed so far.
    pub fn boundaries(&self) -> Boundary {
        self.boundary
    }

    /// The VM (memory, vCPU).
    pub fn vm(&self) -> &KvmVm {
        &self.vm
    }

    /// The guest's fingerprint now.
    pub fn fingerprint(&self) -> Result<Fingerprint, VmmError> {
        let (rip, regs_hash) = fingerprint(&self.vm.vcpu.regs()?);
        Ok(Fingerprint { rip, regs_hash })
    }

    /// Runs the guest until it exits, crashes or a signal stops the node.
    pub fn run(&mut self) -> Result<Outcome, VmmError> {
        match self.run_until(Boundary::MAX)? {
            Some(outcome) => Ok(outcome),
            None => Err(VmmError::Config(
                "the machine paused (a pause request, or the last boundary number)".into(),
            )),
        }
    }

    /// Runs the guest until boundary `until` has been handled, then returns `None` with the
    /// guest paused there (the vCPU out of guest mode; [`save_state`](Self::save_state) or
    /// another `run_until`/[`run`](Self::run) may follow), or until the run ends first
    /// (`Some(outcome)`). Returns `None` at once if the machine is already at or past `until`,
    /// and at the next exit when a pause is requested through a [`PauseHandle`] (where pauses
    /// are expected, use `run_until(Boundary::MAX)` rather than [`run`](Self::run), which
    /// fails on a pause).
    pub fn run_until(&mut self, until: Boundary) -> Result<Option<Outcome>, VmmError> {
        let kick = self.vm.vcpu.kick_handle();
        let _registration = signals::register_vcpu(kick);
        let mut state = RunState::Running;
        loop {
            state = match state {
                RunState::Finishing(outcome) => {
                    self.finish(&outcome)?;
                    return Ok(Some(outcome));
                }
                RunState::Running if self.boundary >= until || self.pause.take() => {
                    return Ok(None)
                }
                RunState::Running => {
                    if let Some(signal) = self.stop.signalled() {
                        RunState::Finishing(Outcome::Stopped { signal })
                    } else if let Some(signal) = self.inputs.stop_after(self.boundary) {
                        RunState::Finishing(Outcome::Stopped { signal })
                    } else {
                        let exit = self.vm.vcpu.run()?;
                        self.on_exit(exit)?
                    }
                }
            };
        }
    }

    /// Turns one exit into the next state.
    fn on_exit(&mut self, exit: VmExit) -> Result<RunState, VmmError> {
        let crash = |m: &Self, reason: String| -> Result<RunState, VmmError> {
            Ok(RunState::Finishing(Outcome::Crashed(Box::new(
                m.crash_report(reason)?,
            ))))
        };
        match exit {
            VmExit::MmioRead { addr, len } => {
                let mut data = [0u8; 8];
                let r = self.boundary(addr, Access::Read(&mut data[..len]));
                self.vm.vcpu.complete_mmio_read(&data[..len]);
                self.after_boundary(r)
            }
            VmExit::MmioWrite { addr, len, data } => {
                let r = self.boundary(addr, Access::Write(&data[..len]));
                self.after_boundary(r)
            }
            VmExit::Interrupted => Ok(RunState::Running),
            VmExit::Shutdown => crash(
                self,
                "triple fault (an exception with no handler: KVM_EXIT_SHUTDOWN)".into(),
            ),
            VmExit::InternalError { suberror } => {
                crash(self, format!("KVM internal error (suberror {suberror})"))
            }
            VmExit::FailEntry { reason } => {
                crash(self, format!("VM entry failed (reason {reason:#x})"))
            }
            VmExit::Forbidden(what) => crash(self, format!("guest contract violation: {what}")),
            VmExit::Other(what) => crash(self, format!("unexpected exit: {what}")),
        }
    }

    fn after_boundary(
        &mut self,
        r: Result<Option<MachineRequest>, VmmError>,
    ) -> Result<RunState, VmmError> {
        match r {
            Ok(None) => Ok(RunState::Running),
            Ok(Some(MachineRequest::Exit(status))) => {
                Ok(RunState::Finishing(Outcome::Exited { status }))
            }
            Err(VmmError::Input(InputError::Stopped(signal))) => {
                Ok(RunState::Finishing(Outcome::Stopped { signal }))
            }
            Err(VmmError::Bus(e)) => Ok(RunState::Finishing(Outcome::Crashed(Box::new(
                self.crash_report(e.to_string())?,
            )))),
            Err(e) => Err(e),
        }
    }

    /// An epoch boundary: the one place where the VMM changes guest-visible state. In order:
    /// (1) devices take new guest requests, (2) events for this boundary are applied,
    /// (3) the MMIO access is completed; the caller then resumes the vCPU.
    fn boundary(
        &mut self,
        addr: u64,
        access: Access<'_>,
    ) -> Result<Option<MachineRequest>, VmmError> {
        let b = self.boundary + 1;
        let fp = if self.inputs.wants_fingerprint() {
            Some(self.fingerprint()?)
        } else {
            None
        };
        // The input source may end the run here (a replay reaching a recorded stop): the run
        // then stopped before this boundary, as the recorded one did.
        self.inputs.boundary(b, fp)?;
        self.boundary = b;
        if let Some(p) = &self.progress {
            p.store(b, std::sync::atomic::Ordering::Relaxed);
        }
        let every = self.inputs.digest_every();
        if every > 0 && b.is_multiple_of(every) {
            if let Some(d) = self.memory_digest()? {
                let console = self.console.digest;
                self.inputs.memory_digest(b, d, console)?;
            }
        }
        let mut request = None;
        let mut cx = BoundaryCx {
            boundary: b,
            mem: &self.vm.memory,
            inputs: self.inputs.as_mut(),
            console: &mut self.console,
            request: &mut request,
            rx_room: 0,
            doorbell: false,
        };
        // (1) Every device takes the guest's new requests.
        for dev in self.bus.devices_mut() {
            dev.take_requests(&mut cx)?;
        }
        cx.rx_room = self.bus.devices_mut().map(|d| d.rx_room(cx.mem)).sum();
        // The access itself (a WAIT blocks here until there is something to apply).
        match access {
            Access::Read(data) => self.bus.read(addr, data, &mut cx)?,
            Access::Write(data) => self.bus.write(addr, data, &mut cx)?,
        }
        // (2) At WAIT and POLL, device events (received frames) are applied.
        if cx.doorbell {
            for dev in self.bus.devices_mut() {
                dev.apply_events(&mut cx)?;
            }
        }
        self.inputs.boundary_end(b)?;
        Ok(request)
    }

    /// Guest memory.
    pub fn memory(&self) -> &crate::kvm::memory::GuestMemory {
        &self.vm.memory
    }

    /// The VM's one dirty-page tracker (on tracked memory): subscribe to it for pre-copy (KVM's
    /// dirty log is on while it has a consumer).
    pub fn dirty_tracker(&self) -> Option<&Arc<DirtyTracker>> {
        self.dirty.as_ref()
    }

    /// Saves everything the guest can observe besides memory. The machine must be paused
    /// between runs (after [`run_until`](Self::run_until) returned `None`, or before the first
    /// run): the access of the last boundary is completed inside KVM first, without running
    /// guest code, so the state is complete. Guest memory is not included: copy it page by
    /// page (with the dirty tracker for pre-copy) while or after saving; the state's memory
    /// digest lets the restored machine check the copy.
    pub fn save_state(&mut self) -> Result<VmState, VmmError> {
        self.vm.vcpu.complete_pending()?;
        let vcpu = self.vm.vcpu.save_state()?;
        let devices = self.bus.save_state()?;
        Ok(VmState {
            boundary: self.boundary,
            mem_size: self.vm.memory.size(),
            cpuid_hash: crate::kvm::cpuid::baseline_hash(),
            console_digest: self.console.digest,
            memory_digest: self.memory_digest()?,
            vcpu,
            devices,
        })
    }

    /// Makes this machine continue from `state`: a machine assembled from the same setup
    /// (image, memory size, devices) that has not run, whose guest memory already holds the
    /// saved machine's memory. Checks that the state fits (memory size, CPUID table, devices)
    /// and, when both machines keep memory digests, that the memory is the saved one.
    /// Afterwards the machine's next boundary is `state.boundary + 1`; give it inputs that
    /// start there (e.g. a replayer after `skip_through(state.boundary)`).
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), VmmError> {
        if self.boundary != 0 || self.end.is_some() {
            return Err(StateError::Mismatch(format!(
                "the machine has already run ({} boundaries)",
                self.boundary
            ))
            .into());
        }
        if state.mem_size != self.vm.memory.size() {
            return Err(StateError::Mismatch(format!(
                "the state has {} bytes of memory, this machine {}",
                state.mem_size,
                self.vm.memory.size()
            ))
            .into());
        }
        if state.cpuid_hash != crate::kvm::cpuid::baseline_hash() {
            return Err(
                StateError::Mismatch("the state has a different CPUID table".into()).into(),
            );
        }
        if let (Some(want), Some(have)) = (state.memory_digest, self.memory_digest()?) {
            if want != have {
                return Err(StateError::Mismatch(
                    "guest memory differs from the saved machine's (memory digest)".into(),
                )
                .into());
            }
        }
        self.bus.restore_state(&state.devices)?;
        self.vm.vcpu.restore_state(&state.vcpu)?;
        self.console.digest = state.console_digest;
        self.boundary = state.boundary;
        if let Some(p) = &self.progress {
            p.store(state.boundary, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn crash_report(&self, reason: String) -> Result<CrashReport, VmmError> {
        let regs = self.vm.vcpu.regs()?;
        let control = self
            .vm
            .vcpu
            .sregs()
            .ok()
            .map(|s| [s.cr0, s.cr2, s.cr3, s.cr4, s.efer]);
        Ok(CrashReport {
            reason,
            boundary: self.boundary,
            regs,
            control,
        })
    }
}

/// The guest's MMIO access at a boundary.
enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}
