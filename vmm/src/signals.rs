//! Stopping the node cleanly on SIGINT/SIGTERM, even while the guest computes without exits
//! or blocks in a WAIT: the handler records the signal, wakes any WAIT through an eventfd and
//! makes the vCPU leave guest mode through `immediate_exit`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::event::{eventfd, EventfdFlags};

use crate::kvm::vcpu::KickHandle;

static SIGNALLED: AtomicI32 = AtomicI32::new(0);
/// The process's one stop state, made by the first [`install`] and never dropped (the
/// handler reaches its eventfd through here).
static INSTALLED: OnceLock<Arc<StopSignal>> = OnceLock::new();
static KICK: AtomicPtr<AtomicU8> = AtomicPtr::new(std::ptr::null_mut());

/// What a stop signal does; async-signal-safe (atomic loads and stores and one `write(2)`).
fn note_stop(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    // `OnceLock::get` is one atomic load: it is `None` until `install` has finished.
    if let Some(stop) = INSTALLED.get() {
        // write(2) is async-signal-safe (rustix makes the raw syscall); a full counter
        // (EAGAIN) already wakes every poller.
        let _ = rustix::io::write(&stop.wake, &1u64.to_ne_bytes());
    }
    let kick = KICK.load(Ordering::SeqCst);
    if !kick.is_null() {
        // SAFETY: KICK is set only while the vCPU that owns the byte is alive (see
        // `register_vcpu`/`VcpuRegistration`), and the store is atomic.
        unsafe { (*kick).store(1, Ordering::SeqCst) };
    }
}

extern "C" fn on_signal(sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    note_stop(sig);
}

/// The process-wide stop state: which signal (if any) asked the node to stop, and an eventfd
/// that becomes readable when it happens.
#[derive(Debug)]
pub struct StopSignal {
    wake: OwnedFd,
}

impl StopSignal {
    /// The signal that asked the node to stop, if any.
    pub fn signalled(&self) -> Option<i32> {
        match SIGNALLED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
    /// Requests a stop as if `sig` had arrived (used by tests and the node's own shutdown).
    pub fn raise(&self, sig: i32) {
        note_stop(sig);
    }
}

/// The eventfd to poll together with other sources.
impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

/// Installs SIGINT/SIGTERM handling once per process and returns the stop state.
pub fn install() -> std::io::Result<Arc<StopSignal>> {
    if let Some(s) = INSTALLED.get() {
        return Ok(s.clone());
    }
    let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    let stop = INSTALLED
        .get_or_init(|| Arc::new(StopSignal { wake }))
        .clone();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // No SA_RESTART, so that KVM_RUN and poll return EINTR; the handler only does
        // async-signal-safe work (`note_stop`).
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(std::io::Error::from)?;
    }
    Ok(stop)
}

/// While alive, a stop signal also kicks this vCPU out of guest mode.
pub struct VcpuRegistration(());

/// Registers the vCPU so that a stop signal interrupts `KVM_RUN`. Drop the registration
/// before the vCPU.
pub fn register_vcpu(kick: KickHandle) -> VcpuRegistration {
    KICK.store(kick.as_ptr() as *mut AtomicU8, Ordering::SeqCst);
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        kick.kick();
    }
    VcpuRegistration(())
}

impl Drop for VcpuRegistration {
    fn drop(&mut self) {
        KICK.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}
