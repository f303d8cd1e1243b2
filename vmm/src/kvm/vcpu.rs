//! The vCPU: creation with the boot state, and [`Vcpu::run`], the single place where every
//! exit of the guest is seen and turned into a [`VmExit`]. The machine's run loop
//! (`crate::machine`) decides what each exit means.

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_xcrs, kvm_xsave, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::{boot, cpuid};
use crate::error::VmmError;
use crate::state::{StateError, VcpuState, XSAVE_BYTES};
use ftvm_abi::layout::BOOT_INFO_ADDR;

/// Why the vCPU stopped running guest code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest read `len` bytes of MMIO at `addr`; answer with [`Vcpu::complete_mmio_read`].
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: usize,
    },
    /// The guest wrote `data[..len]` to MMIO at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: usize,
        /// The bytes written.
        data: [u8; 8],
    },
    /// The host interrupted the run (a signal, `immediate_exit`): not a guest event.
    Interrupted,
    /// The guest triple-faulted (e.g. an exception with no handler).
    Shutdown,
    /// KVM could not run the guest (on PVM: e.g. SSE at ring 0).
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware failure reason.
        reason: u64,
    },
    /// The guest did something its contract forbids (port I/O, `hlt`).
    Forbidden(String),
    /// Any other exit.
    Other(String),
}

/// A handle that makes the vCPU's current or next `KVM_RUN` return at once. Usable from a
/// signal handler.
#[derive(Clone, Copy, Debug)]
pub struct KickHandle(*const AtomicU8);

// SAFETY: the pointer targets the `immediate_exit` byte of the vCPU's kvm_run page, which is
// shared with the kernel and written atomically; the handle is only used while the vCPU lives
// (the signal module clears it before the vCPU is dropped).
unsafe impl Send for KickHandle {}
// SAFETY: see `Send`; all accesses are atomic.
unsafe impl Sync for KickHandle {}

impl KickHandle {
    /// Asks the vCPU to leave (or not enter) guest mode.
    pub fn kick(&self) {
        // SAFETY: valid while the vCPU lives (see the `Send` impl).
        unsafe { (*self.0).store(1, Ordering::SeqCst) }
    }
    /// The raw pointer, for the signal handler's static.
    pub fn as_ptr(&self) -> *const AtomicU8 {
        self.0
    }
}

/// The VM's single vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    /// Whether KVM copies the general registers into the `kvm_run` page at every exit
    /// (`KVM_CAP_SYNC_REGS`).
    sync_regs: bool,
    /// Whether that copy is current: set by an exit, cleared by anything that writes the
    /// registers. While it is, [`Vcpu::regs`] needs no ioctl — a `KVM_GET_REGS` costs a vCPU
    /// load and put, which under this machine's hypervisor is dearer than the copy.
    regs_fresh: std::cell::Cell<bool>,
}

impl Vcpu {
    /// Creates vCPU 0 with the baseline CPUID and the registers that start the guest at
    /// `entry` in 64-bit mode at CPL 3, with `rdi` pointing at the boot info.
    pub fn create(kvm: &Kvm, vm: &VmFd, entry: u64) -> Result<Self, VmmError> {
        let fd = vm
            .create_vcpu(0)
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
        // Make sure the host supports the baseline at all (any KVM does).
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        fd.set_cpuid2(&cpuid::baseline())
            .map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
        let mut sregs = fd
            .get_sregs()
            .map_err(|e| VmmError::Kvm("KVM_GET_SREGS", e))?;
        boot::setup_sregs(&mut sregs);
        fd.set_sregs(&sregs)
            .map_err(|e| VmmError::Kvm("KVM_SET_SREGS", e))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu)
            .map_err(|e| VmmError::Kvm("KVM_SET_FPU", e))?;
        let regs = kvm_regs {
            rip: entry,
            rsp: 0, // set by `set_stack`
            rdi: BOOT_INFO_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        fd.set_regs(&regs)
            .map_err(|e| VmmError::Kvm("KVM_SET_REGS", e))?;
        let mut fd = fd;
        let sync_regs = kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs) as u32
            & kvm_bindings::KVM_SYNC_X86_REGS
            != 0;
        if sync_regs {
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        Ok(Vcpu {
            fd,
            sync_regs,
            regs_fresh: std::cell::Cell::new(false),
        })
    }

    /// Sets the initial stack pointer.
    pub fn set_stack(&mut self, rsp: u64) -> Result<(), VmmError> {
        let mut regs = self.regs()?;
        regs.rsp = rsp;
        self.regs_fresh.set(false);
        self.fd
            .set_regs(&regs)
            .map_err(|e| VmmError::Kvm("KVM_SET_REGS", e))
    }

    /// A handle to interrupt `run` from another thread or a signal handler.
    pub fn kick_handle(&mut self) -> KickHandle {
        let run = self.fd.get_kvm_run();
        KickHandle((&mut run.immediate_exit as *mut u8).cast::<AtomicU8>())
    }

    /// Runs the guest until the next exit and classifies it. This is the one place every
    /// exit passes through.
    pub fn run(&mut self) -> Result<VmExit, VmmError> {
        // KVM fills the copy on every return from KVM_RUN past its argument checks, an
        // interrupted one included; a failed run leaves it stale.
        self.regs_fresh.set(false);
        let exit = match self.fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => VmExit::MmioRead {
                addr,
                len: data.len().min(8),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut buf = [0u8; 8];
                let len = data.len().min(8);
                buf[..len].copy_from_slice(&data[..len]);
                VmExit::MmioWrite {
                    addr,
                    len,
                    data: buf,
                }
            }
            Ok(VcpuExit::Intr) => VmExit::Interrupted,
            Ok(VcpuExit::Shutdown) => VmExit::Shutdown,
            Ok(VcpuExit::InternalError) => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member
                // of the exit union.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VmExit::InternalError { suberror }
            }
            Ok(VcpuExit::FailEntry(reason, _)) => VmExit::FailEntry { reason },
            Ok(VcpuExit::IoIn(port, _)) => VmExit::Forbidden(format!("port input from {port:#x}")),
            Ok(VcpuExit::IoOut(port, _)) => VmExit::Forbidden(format!("port output to {port:#x}")),
            Ok(VcpuExit::Hlt) => VmExit::Forbidden("hlt".into()),
            Ok(other) => VmExit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VmExit::Interrupted,
            Err(e) => return Err(VmmError::Kvm("KVM_RUN", e)),
        };
        if exit == VmExit::Interrupted {
            self.fd.set_kvm_immediate_exit(0);
        }
        self.regs_fresh.set(self.sync_regs);
        Ok(exit)
    }

    /// Supplies the data of the pending MMIO read; it reaches the guest on the next `run`.
    pub fn complete_mmio_read(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after a KVM_EXIT_MMIO read exit, when the `mmio` member
        // of the exit union is the live one; `len` is bounded by the array size.
        unsafe {
            let mmio = &mut run.__bindgen_anon_1.mmio;
            let n = (mmio.len as usize).min(mmio.data.len()).min(data.len());
            mmio.data[..n].copy_from_slice(&data[..n]);
        }
    }

    /// The general-purpose registers: KVM's copy from the last exit when it is current, else
    /// read with `KVM_GET_REGS`.
    pub fn regs(&self) -> Result<kvm_regs, VmmError> {
        if self.regs_fresh.get() {
            return Ok(self.fd.sync_regs().regs);
        }
        self.regs_from_kernel()
    }

    /// Whether KVM hands this vCPU's registers over at every exit (`KVM_CAP_SYNC_REGS`).
    pub fn syncs_regs(&self) -> bool {
        self.sync_regs
    }

    /// The general-purpose registers read with `KVM_GET_REGS`, whatever copy there is.
    pub fn regs_from_kernel(&self) -> Result<kvm_regs, VmmError> {
        self.fd
            .get_regs()
            .map_err(|e| VmmError::Kvm("KVM_GET_REGS", e))
    }

    /// The special registers.
    pub fn sregs(&self) -> Result<kvm_bindings::kvm_sregs, VmmError> {
        self.fd
            .get_sregs()
            .map_err(|e| VmmError::Kvm("KVM_GET_SREGS", e))
    }
}

/// The MSRs saved with a vCPU: those in KVM's index list (`KVM_GET_MSR_INDEX_LIST`), read
/// once per process.
fn msr_indices() -> Result<&'static [u32], VmmError> {
    static LIST: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l);
    }
    let kvm = Kvm::new().map_err(|e| VmmError::Kvm("open /dev/kvm", e))?;
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VmmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(LIST.get_or_init(|| list.as_slice().to_vec()))
}

fn msrs_of(entries: &[(u32, u64)]) -> Result<Msrs, VmmError> {
    let e: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&e)
        .map_err(|e| VmmError::State(StateError::Unsupported(format!("MSR list: {e:?}"))))
}

impl Vcpu {
    /// Completes the exit the vCPU stopped at (the MMIO access of the last boundary) inside
    /// KVM without running any guest instruction: `KVM_RUN` with `immediate_exit` set. KVM
    /// keeps an unfinished access in state userspace cannot read, so this must come before
    /// [`save_state`](Self::save_state). Invisible to the guest.
    pub fn complete_pending(&mut self) -> Result<(), VmmError> {
        // (Completing the access moves RIP: read the registers from KVM after it.)
        self.regs_fresh.set(false);
        self.fd.set_kvm_immediate_exit(1);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Ok(VcpuExit::Intr) => Ok(()),
            Err(e) => Err(VmmError::Kvm("KVM_RUN (completing the pending exit)", e)),
            Ok(other) => Err(VmmError::State(StateError::Unsupported(format!(
                "completing the pending exit ran the guest to another exit: {other:?}"
            )))),
        };
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    /// Reads everything KVM keeps of the vCPU (call [`complete_pending`](Self::complete_pending)
    /// first). Every MSR of KVM's list is read; one KVM cannot read here is an error.
    pub fn save_state(&self) -> Result<VcpuState, VmmError> {
        let fd = &self.fd;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = fd.get_fpu().map_err(|e| VmmError::Kvm("KVM_GET_FPU", e))?;
        let xsave = fd
            .get_xsave()
            .map_err(|e| VmmError::Kvm("KVM_GET_XSAVE", e))?;
        let xsave: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        debug_assert_eq!(xsave.len(), XSAVE_BYTES);
        let x = fd
            .get_xcrs()
            .map_err(|e| VmmError::Kvm("KVM_GET_XCRS", e))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        let xcrs = x.xcrs[..n].iter().map(|c| (c.xcr, c.value)).collect();
        let debugregs = fd
            .get_debug_regs()
            .map_err(|e| VmmError::Kvm("KVM_GET_DEBUGREGS", e))?;
        let events = fd
            .get_vcpu_events()
            .map_err(|e| VmmError::Kvm("KVM_GET_VCPU_EVENTS", e))?;
        let mp_state = fd
            .get_mp_state()
            .map_err(|e| VmmError::Kvm("KVM_GET_MP_STATE", e))?
            .mp_state;
        let indices = msr_indices()?;
        let mut m = msrs_of(&indices.iter().map(|&i| (i, 0)).collect::<Vec<_>>())?;
        let n = fd
            .get_msrs(&mut m)
            .map_err(|e| VmmError::Kvm("KVM_GET_MSRS", e))?;
        if n != indices.len() {
            return Err(VmmError::State(StateError::Unsupported(format!(
                "KVM_GET_MSRS read {n} of {} MSRs: MSR {:#x} cannot be read",
                indices.len(),
                indices[n]
            ))));
        }
        let msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            msrs,
        })
    }

    /// Puts `s` into the vCPU (a fresh one, created with the same CPUID table). An MSR KVM
    /// refuses to set is accepted only if the vCPU already holds the saved value (KVM refuses
    /// to write some MSRs back even with their own value, e.g. MSR_KVM_ASYNC_PF_INT 0);
    /// otherwise the restore fails naming it.
    pub fn restore_state(&mut self, s: &VcpuState) -> Result<(), VmmError> {
        let fd = &self.fd;
        let mut rest: &[(u32, u64)] = &s.msrs;
        while !rest.is_empty() {
            let n = fd
                .set_msrs(&msrs_of(rest)?)
                .map_err(|e| VmmError::Kvm("KVM_SET_MSRS", e))?;
            if n == rest.len() {
                break;
            }
            let (index, want) = rest[n];
            let mut one = msrs_of(&[(index, 0)])?;
            let have = match fd.get_msrs(&mut one) {
                Ok(1) => Some(one.as_slice()[0].data),
                _ => None,
            };
            if have != Some(want) {
                return Err(VmmError::State(StateError::Mismatch(format!(
                    "KVM refuses MSR {index:#x} = {want:#x} (the vCPU holds {have:x?})"
                ))));
            }
            rest = &rest[n + 1..];
        }
        fd.set_sregs(&s.sregs)
            .map_err(|e| VmmError::Kvm("KVM_SET_SREGS", e))?;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: s.xcrs.len() as u32,
            ..Default::default()
        };
        for (slot, &(xcr, value)) in xcrs.xcrs.iter_mut().zip(&s.xcrs) {
            slot.xcr = xcr;
            slot.value = value;
        }
        fd.set_xcrs(&xcrs)
            .map_err(|e| VmmError::Kvm("KVM_SET_XCRS", e))?;
        fd.set_fpu(&s.fpu)
            .map_err(|e| VmmError::Kvm("KVM_SET_FPU", e))?;
        if s.xsave.len() != XSAVE_BYTES {
            return Err(VmmError::State(StateError::Mismatch(format!(
                "an XSAVE area of {} bytes (expected {XSAVE_BYTES})",
                s.xsave.len()
            ))));
        }
        let mut xsave = kvm_xsave::default();
        for (w, b) in xsave.region.iter_mut().zip(s.xsave.chunks_exact(4)) {
            *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        // SAFETY: `xsave` is a plain 4096-byte kvm_xsave with no extra (FAM) part, which is
        // what KVM_SET_XSAVE reads; it lives across the call.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| VmmError::Kvm("KVM_SET_XSAVE", e))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(|e| VmmError::Kvm("KVM_SET_DEBUGREGS", e))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: s.mp_state,
        })
        .map_err(|e| VmmError::Kvm("KVM_SET_MP_STATE", e))?;
        self.regs_fresh.set(false);
        fd.set_regs(&s.regs)
            .map_err(|e| VmmError::Kvm("KVM_SET_REGS", e))?;
        fd.set_vcpu_events(&s.events)
            .map_err(|e| VmmError::Kvm("KVM_SET_VCPU_EVENTS", e))?;
        Ok(())
    }
}

/// A small fingerprint of the vCPU's registers: RIP and a blake3 of the general registers.
pub fn fingerprint(regs: &kvm_regs) -> (u64, u64) {
    let mut h = blake3::Hasher::new();
    for v in [
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rsp,
        regs.rbp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rip,
        regs.rflags,
    ] {
        h.update(&v.to_le_bytes());
    }
    let d = h.finalize();
    (
        regs.rip,
        u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes")),
    )
}
