//! Stopping the node cleanly on SIGINT/SIGTERM, even while the guest computes without exits
//! or blocks in a WAIT: the handler records the signal, wakes any WAIT through an eventfd and
//! makes the vCPU leave guest mode through `immediate_exit`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::Arc;

use crate::kvm::vcpu::KickHandle;

static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static KICK: AtomicPtr<AtomicU8> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the eventfd stays open for the process's
        // life once installed (`StopSignal` is leaked into a static Arc).
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    let kick = KICK.load(Ordering::SeqCst);
    if !kick.is_null() {
        // SAFETY: KICK is set only while the vCPU that owns the byte is alive (see
        // `register_vcpu`/`VcpuRegistration`), and the store is atomic.
        unsafe { (*kick).store(1, Ordering::SeqCst) };
    }
}

/// The process-wide stop state: which signal (if any) asked the node to stop, and an eventfd
/// that becomes readable when it happens.
#[derive(Debug)]
pub struct StopSignal {
    fd: OwnedFd,
}

impl StopSignal {
    /// The signal that asked the node to stop, if any.
    pub fn signalled(&self) -> Option<i32> {
        match SIGNALLED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
    /// The eventfd to poll together with other sources.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
    /// Requests a stop as if `sig` had arrived (used by tests and the node's own shutdown).
    pub fn raise(&self, sig: i32) {
        on_signal(sig);
    }
}

/// Installs SIGINT/SIGTERM handling once per process and returns the stop state.
pub fn install() -> std::io::Result<Arc<StopSignal>> {
    static INSTALLED: std::sync::OnceLock<Arc<StopSignal>> = std::sync::OnceLock::new();
    if let Some(s) = INSTALLED.get() {
        return Ok(s.clone());
    }
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let stop = INSTALLED
        .get_or_init(|| Arc::new(StopSignal { fd: owned }))
        .clone();
    WAKE_FD.store(stop.fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid
        // argument; no SA_RESTART so that KVM_RUN and poll return EINTR.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            act.sa_flags = 0;
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
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
