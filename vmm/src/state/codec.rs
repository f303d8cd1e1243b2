//! The encoding of a [`VmState`] (version 1), specified in `docs/vm-state.md`: a header
//! (magic, version, body length), the sections in a fixed order, each `tag | len | payload`,
//! and a blake3 checksum of everything before it. The decoder is strict: a truncated input, a
//! wrong checksum, an unknown version, a section out of order, a field out of range, a
//! payload not consumed exactly or trailing bytes are refused with an error naming the byte
//! offset — never a panic.

use kvm_bindings::{kvm_debugregs, kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_bindings::{kvm_vcpu_events, KVM_MAX_XCRS};
use virtio_queue::{Queue, QueueState};

use super::{
    DeviceKind, DeviceState, StateError, VcpuState, VirtioState, VmState, CONFIG_ID_BYTES,
    MAX_DEVICES, MAX_MSRS, MAX_QUEUES, MAX_XCRS, XSAVE_BYTES,
};
use crate::epoch::ClockValue;

/// The first bytes of every encoded state.
pub const MAGIC: &[u8; 8] = b"FTVMSTAT";
/// The encoding version this code writes and reads.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 4;
const CHECKSUM_LEN: usize = 32;
/// Largest encoded state accepted (a real one is about 5 KiB).
pub const MAX_ENCODED: usize = 1 << 20;

/// The section tags, in the order they appear.
const SECTIONS: [(u8, &str); 11] = [
    (1, "machine"),
    (2, "regs"),
    (3, "sregs"),
    (4, "fpu"),
    (5, "xsave"),
    (6, "xcrs"),
    (7, "debugregs"),
    (8, "events"),
    (9, "mp_state"),
    (10, "msrs"),
    (11, "devices"),
];

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// Writes `tag | len | payload` with the payload produced by `f`.
    fn section(&mut self, tag: u8, f: impl FnOnce(&mut W)) {
        self.u8(tag);
        let at = self.0.len();
        self.u32(0);
        f(self);
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// A bounds-checked reader over one section's payload; offsets are absolute.
struct R<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        if self.end - self.pos < n {
            return Err(StateError::Truncated {
                offset: self.pos,
                what,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StateError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, StateError> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(malformed(at, format!("{what} is {v}, not 0 or 1"))),
        }
    }
}

fn malformed(offset: usize, what: impl Into<String>) -> StateError {
    StateError::Malformed {
        offset,
        what: what.into(),
    }
}

impl VmState {
    /// Encodes the state (version [`VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(6 << 10));
        w.bytes(MAGIC);
        w.u16(VERSION);
        w.u32(0); // body length, filled in below
        let v = &self.vcpu;
        w.section(1, |w| {
            w.u64(self.boundary);
            w.u64(self.mem_size);
            w.bytes(&self.cpuid_hash);
            w.bytes(&self.console_digest);
            match &self.memory_digest {
                Some(d) => {
                    w.u8(1);
                    w.bytes(d);
                }
                None => w.u8(0),
            }
        });
        w.section(2, |w| {
            for r in regs_list(&v.regs) {
                w.u64(r);
            }
        });
        w.section(3, |w| put_sregs(w, &v.sregs));
        w.section(4, |w| put_fpu(w, &v.fpu));
        w.section(5, |w| w.bytes(&v.xsave));
        w.section(6, |w| {
            w.u8(v.xcrs.len() as u8);
            for &(i, val) in &v.xcrs {
                w.u32(i);
                w.u64(val);
            }
        });
        w.section(7, |w| {
            let d = &v.debugregs;
            for r in d.db {
                w.u64(r);
            }
            w.u64(d.dr6);
            w.u64(d.dr7);
            w.u64(d.flags);
        });
        w.section(8, |w| put_events(w, &v.events));
        w.section(9, |w| w.u32(v.mp_state));
        w.section(10, |w| {
            w.u16(v.msrs.len() as u16);
            for &(i, val) in &v.msrs {
                w.u32(i);
                w.u64(val);
            }
        });
        w.section(11, |w| {
            w.u16(self.devices.len() as u16);
            for d in &self.devices {
                put_device(w, d);
            }
        });
        let body = (w.0.len() - HEADER_LEN) as u32;
        w.0[10..14].copy_from_slice(&body.to_le_bytes());
        let sum = blake3::hash(&w.0);
        w.bytes(sum.as_bytes());
        w.0
    }

    /// Decodes and validates an encoded state. Refuses, with the offset of the problem,
    /// anything [`encode`](Self::encode) would not have produced from a valid state.
    pub fn decode(buf: &[u8]) -> Result<VmState, StateError> {
        if buf.len() > MAX_ENCODED {
            return Err(malformed(
                0,
                format!("{} bytes is larger than any VM state", buf.len()),
            ));
        }
        let mut r = R {
            buf,
            pos: 0,
            end: buf.len(),
        };
        if r.take(8, "magic")? != MAGIC {
            return Err(malformed(0, "not a VM state (bad magic)"));
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(malformed(
                8,
                format!("unsupported version {version} (this build reads {VERSION})"),
            ));
        }
        let body = r.u32("body length")? as usize;
        let need = HEADER_LEN + body + CHECKSUM_LEN;
        if buf.len() < need {
            return Err(StateError::Truncated {
                offset: buf.len(),
                what: "the encoding is shorter than its stated length",
            });
        }
        if buf.len() > need {
            return Err(malformed(need, "trailing bytes after the checksum"));
        }
        let sum = blake3::hash(&buf[..HEADER_LEN + body]);
        if sum.as_bytes() != &buf[HEADER_LEN + body..] {
            return Err(StateError::Checksum);
        }
        r.end = HEADER_LEN + body;
        let mut sections: Vec<R<'_>> = Vec::with_capacity(SECTIONS.len());
        for (tag, name) in SECTIONS {
            let at = r.pos;
            let t = r.u8("section tag")?;
            if t != tag {
                return Err(malformed(
                    at,
                    format!("section tag {t} where section {tag} ({name}) belongs"),
                ));
            }
            let len = r.u32("section length")? as usize;
            let start = r.pos;
            r.take(len, "section payload")?;
            sections.push(R {
                buf,
                pos: start,
                end: start + len,
            });
        }
        if r.pos != r.end {
            return Err(malformed(r.pos, "bytes after the last section"));
        }
        let mut it = sections.into_iter();
        let mut next = || it.next().expect("one reader per section");
        let s = &mut next();
        let boundary = s.u64("boundary")?;
        let mem_size = s.u64("memory size")?;
        let cpuid_hash = s.arr("CPUID hash")?;
        let console_digest = s.arr("console digest")?;
        let memory_digest = if s.flag("memory digest flag")? {
            Some(s.arr("memory digest")?)
        } else {
            None
        };
        done(s, "machine")?;
        let s = &mut next();
        let regs = get_regs(s)?;
        done(s, "regs")?;
        let s = &mut next();
        let sregs = get_sregs(s)?;
        done(s, "sregs")?;
        let s = &mut next();
        let fpu = get_fpu(s)?;
        done(s, "fpu")?;
        let s = &mut next();
        let xsave = s.take(XSAVE_BYTES, "XSAVE area")?.to_vec();
        done(s, "xsave")?;
        let s = &mut next();
        let at = s.pos;
        let n = s.u8("XCR count")? as usize;
        if n > MAX_XCRS || n > KVM_MAX_XCRS as usize {
            return Err(malformed(at, format!("{n} XCRs (at most {MAX_XCRS})")));
        }
        let mut xcrs = Vec::with_capacity(n);
        for _ in 0..n {
            xcrs.push((s.u32("XCR index")?, s.u64("XCR value")?));
        }
        done(s, "xcrs")?;
        let s = &mut next();
        let mut debugregs = kvm_debugregs::default();
        for r in debugregs.db.iter_mut() {
            *r = s.u64("DR0-3")?;
        }
        debugregs.dr6 = s.u64("DR6")?;
        debugregs.dr7 = s.u64("DR7")?;
        debugregs.flags = s.u64("debugregs flags")?;
        done(s, "debugregs")?;
        let s = &mut next();
        let events = get_events(s)?;
        done(s, "events")?;
        let s = &mut next();
        let mp_state = s.u32("MP state")?;
        done(s, "mp_state")?;
        let s = &mut next();
        let at = s.pos;
        let n = s.u16("MSR count")? as usize;
        if n > MAX_MSRS {
            return Err(malformed(at, format!("{n} MSRs (at most {MAX_MSRS})")));
        }
        let mut msrs: Vec<(u32, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let at = s.pos;
            let i = s.u32("MSR index")?;
            if msrs.iter().any(|&(j, _)| j == i) {
                return Err(malformed(at, format!("MSR {i:#x} appears twice")));
            }
            msrs.push((i, s.u64("MSR value")?));
        }
        done(s, "msrs")?;
        let s = &mut next();
        let at = s.pos;
        let n = s.u16("device count")? as usize;
        if n > MAX_DEVICES {
            return Err(malformed(
                at,
                format!("{n} devices (at most {MAX_DEVICES})"),
            ));
        }
        let mut devices: Vec<DeviceState> = Vec::with_capacity(n);
        for _ in 0..n {
            let at = s.pos;
            let d = get_device(s)?;
            if devices.last().is_some_and(|p| p.base >= d.base) {
                return Err(malformed(
                    at,
                    format!("device at {:#x} out of address order", d.base),
                ));
            }
            devices.push(d);
        }
        done(s, "devices")?;
        Ok(VmState {
            boundary,
            mem_size,
            cpuid_hash,
            console_digest,
            memory_digest,
            vcpu: VcpuState {
                regs,
                sregs,
                fpu,
                xsave,
                xcrs,
                debugregs,
                events,
                mp_state,
                msrs,
            },
            devices,
        })
    }
}

fn done(r: &R<'_>, section: &str) -> Result<(), StateError> {
    if r.pos != r.end {
        return Err(malformed(
            r.pos,
            format!(
                "{} unread byte(s) at the end of section {section}",
                r.end - r.pos
            ),
        ));
    }
    Ok(())
}

fn regs_list(r: &kvm_regs) -> [u64; 18] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

fn get_regs(s: &mut R<'_>) -> Result<kvm_regs, StateError> {
    let mut v = [0u64; 18];
    for x in v.iter_mut() {
        *x = s.u64("general register")?;
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        v;
    Ok(kvm_regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    })
}

fn put_segment(w: &mut W, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(b);
    }
}

fn get_segment(r: &mut R<'_>) -> Result<kvm_segment, StateError> {
    let base = r.u64("segment base")?;
    let limit = r.u32("segment limit")?;
    let selector = r.u16("segment selector")?;
    let [type_, present, dpl, db, s, l, g, avl, unusable] = r.arr::<9>("segment attributes")?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_,
        present,
        dpl,
        db,
        s,
        l,
        g,
        avl,
        unusable,
        padding: 0,
    })
}

fn put_sregs(w: &mut W, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg);
    }
    for t in [&s.gdt, &s.idt] {
        w.u64(t.base);
        w.u16(t.limit);
    }
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.u64(v);
    }
    for v in s.interrupt_bitmap {
        w.u64(v);
    }
}

fn get_sregs(r: &mut R<'_>) -> Result<kvm_sregs, StateError> {
    let mut s = kvm_sregs::default();
    for seg in [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
    ] {
        *seg = get_segment(r)?;
    }
    for t in [&mut s.gdt, &mut s.idt] {
        *t = kvm_dtable {
            base: r.u64("descriptor table base")?,
            limit: r.u16("descriptor table limit")?,
            padding: [0; 3],
        };
    }
    for v in [
        &mut s.cr0,
        &mut s.cr2,
        &mut s.cr3,
        &mut s.cr4,
        &mut s.cr8,
        &mut s.efer,
        &mut s.apic_base,
    ] {
        *v = r.u64("control register")?;
    }
    for v in s.interrupt_bitmap.iter_mut() {
        *v = r.u64("interrupt bitmap")?;
    }
    Ok(s)
}

fn put_fpu(w: &mut W, f: &kvm_fpu) {
    for r in &f.fpr {
        w.bytes(r);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for x in &f.xmm {
        w.bytes(x);
    }
    w.u32(f.mxcsr);
}

fn get_fpu(r: &mut R<'_>) -> Result<kvm_fpu, StateError> {
    let mut f = kvm_fpu::default();
    for x in f.fpr.iter_mut() {
        *x = r.arr("x87 register")?;
    }
    f.fcw = r.u16("FCW")?;
    f.fsw = r.u16("FSW")?;
    f.ftwx = r.u8("FTW")?;
    f.last_opcode = r.u16("FOP")?;
    f.last_ip = r.u64("FPU IP")?;
    f.last_dp = r.u64("FPU DP")?;
    for x in f.xmm.iter_mut() {
        *x = r.arr("XMM register")?;
    }
    f.mxcsr = r.u32("MXCSR")?;
    Ok(f)
}

fn put_events(w: &mut W, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for b in [x.injected, x.nr, x.has_error_code, x.pending] {
        w.u8(b);
    }
    w.u32(x.error_code);
    let i = &e.interrupt;
    for b in [i.injected, i.nr, i.soft, i.shadow] {
        w.u8(b);
    }
    let n = &e.nmi;
    for b in [n.injected, n.pending, n.masked] {
        w.u8(b);
    }
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let s = &e.smi;
    for b in [s.smm, s.pending, s.smm_inside_nmi, s.latched_init] {
        w.u8(b);
    }
    w.u8(e.triple_fault.pending);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

fn get_events(r: &mut R<'_>) -> Result<kvm_vcpu_events, StateError> {
    let mut e = kvm_vcpu_events::default();
    let [a, b, c, d] = r.arr("exception")?;
    (
        e.exception.injected,
        e.exception.nr,
        e.exception.has_error_code,
        e.exception.pending,
    ) = (a, b, c, d);
    e.exception.error_code = r.u32("exception error code")?;
    let [a, b, c, d] = r.arr("interrupt")?;
    (
        e.interrupt.injected,
        e.interrupt.nr,
        e.interrupt.soft,
        e.interrupt.shadow,
    ) = (a, b, c, d);
    let [a, b, c] = r.arr("NMI")?;
    (e.nmi.injected, e.nmi.pending, e.nmi.masked) = (a, b, c);
    e.sipi_vector = r.u32("SIPI vector")?;
    e.flags = r.u32("events flags")?;
    let [a, b, c, d] = r.arr("SMI")?;
    (
        e.smi.smm,
        e.smi.pending,
        e.smi.smm_inside_nmi,
        e.smi.latched_init,
    ) = (a, b, c, d);
    e.triple_fault.pending = r.u8("triple fault")?;
    e.exception_has_payload = r.u8("exception payload flag")?;
    e.exception_payload = r.u64("exception payload")?;
    Ok(e)
}

fn put_device(w: &mut W, d: &DeviceState) {
    w.u64(d.base);
    match &d.kind {
        DeviceKind::Control { last_clock } => {
            w.u8(0);
            w.u64(last_clock.mono_ns);
            w.u64(last_clock.wall_ns);
        }
        DeviceKind::Virtio(v) => {
            w.u8(1);
            w.u32(v.device_type);
            w.u64(v.device_features);
            w.bytes(&v.config);
            w.u32(v.status);
            w.u32(v.device_features_sel);
            w.u32(v.driver_features_sel);
            w.u64(v.driver_features);
            w.u32(v.queue_sel);
            w.u8(v.queues.len() as u8);
            for q in &v.queues {
                w.u16(q.max_size);
                w.u16(q.size);
                w.u8(u8::from(q.ready));
                w.u8(u8::from(q.event_idx_enabled));
                w.u16(q.next_avail);
                w.u16(q.next_used);
                w.u64(q.desc_table);
                w.u64(q.avail_ring);
                w.u64(q.used_ring);
            }
        }
    }
}

fn get_device(r: &mut R<'_>) -> Result<DeviceState, StateError> {
    let base = r.u64("device base")?;
    let at = r.pos;
    let kind = match r.u8("device kind")? {
        0 => DeviceKind::Control {
            last_clock: ClockValue {
                mono_ns: r.u64("clock (monotonic)")?,
                wall_ns: r.u64("clock (wall)")?,
            },
        },
        1 => {
            let device_type = r.u32("virtio device type")?;
            let device_features = r.u64("device features")?;
            let config = r.arr::<CONFIG_ID_BYTES>("config prefix")?;
            let status = r.u32("status")?;
            let device_features_sel = r.u32("DeviceFeaturesSel")?;
            let driver_features_sel = r.u32("DriverFeaturesSel")?;
            let driver_features = r.u64("driver features")?;
            let queue_sel = r.u32("QueueSel")?;
            let at = r.pos;
            let n = r.u8("queue count")? as usize;
            if n > MAX_QUEUES {
                return Err(malformed(at, format!("{n} queues (at most {MAX_QUEUES})")));
            }
            let mut queues = Vec::with_capacity(n);
            for i in 0..n {
                let at = r.pos;
                let q = QueueState {
                    max_size: r.u16("queue max size")?,
                    size: r.u16("queue size")?,
                    ready: r.flag("queue ready")?,
                    event_idx_enabled: r.flag("queue event idx")?,
                    next_avail: r.u16("next_avail")?,
                    next_used: r.u16("next_used")?,
                    desc_table: r.u64("descriptor table address")?,
                    avail_ring: r.u64("avail ring address")?,
                    used_ring: r.u64("used ring address")?,
                };
                // virtio-queue's own checks: sizes (power of two, at most the maximum) and
                // ring alignments.
                if let Err(e) = Queue::try_from(q) {
                    return Err(malformed(at, format!("queue {i}: {e:?}")));
                }
                queues.push(q);
            }
            DeviceKind::Virtio(VirtioState {
                device_type,
                device_features,
                config,
                status,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                queues,
            })
        }
        k => return Err(malformed(at, format!("unknown device kind {k}"))),
    };
    Ok(DeviceState { base, kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A state whose every field is derived from `seed`, with `nq` queues per virtio device.
    pub(crate) fn sample(seed: u64, with_digest: bool) -> VmState {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let regs = kvm_regs {
            rax: next(),
            rip: next(),
            rflags: 0x202,
            r15: next(),
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x33;
        sregs.cs.l = 1;
        sregs.cs.base = next();
        sregs.tr.limit = next() as u32;
        sregs.gdt.base = next();
        sregs.gdt.limit = 0x37;
        sregs.cr3 = next() & !0xfff;
        sregs.efer = 0xd01;
        sregs.interrupt_bitmap[3] = next();
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[7] = next().to_le_bytes().repeat(2).try_into().unwrap();
        fpu.fpr[2][9] = next() as u8;
        let mut events = kvm_vcpu_events {
            flags: 13,
            exception_payload: next(),
            ..Default::default()
        };
        events.interrupt.shadow = (next() & 1) as u8;
        let mut debugregs = kvm_debugregs {
            dr6: 0xffff0ff0,
            dr7: 0x400,
            ..Default::default()
        };
        debugregs.db[1] = next();
        let xsave: Vec<u8> = (0..XSAVE_BYTES).map(|_| next() as u8).collect();
        let nmsr = (next() % 50) as u32;
        let msrs = (0..nmsr).map(|i| (0x100 + i, next())).collect();
        let queue = |next: &mut dyn FnMut() -> u64| QueueState {
            max_size: 256,
            size: 1 << (next() % 9),
            ready: next() & 1 == 1,
            event_idx_enabled: false,
            next_avail: next() as u16,
            next_used: next() as u16,
            desc_table: next() & !0xf,
            avail_ring: next() & !0x1,
            used_ring: next() & !0x3,
        };
        let mut devices = vec![DeviceState {
            base: 0xd000_0000,
            kind: DeviceKind::Control {
                last_clock: ClockValue {
                    mono_ns: next(),
                    wall_ns: next(),
                },
            },
        }];
        for i in 0..(next() % 4) {
            let nq = 1 + (next() % 3) as usize;
            devices.push(DeviceState {
                base: 0xd000_1000 + i * 0x1000,
                kind: DeviceKind::Virtio(VirtioState {
                    device_type: 1 + i as u32,
                    device_features: next(),
                    config: [next() as u8; CONFIG_ID_BYTES],
                    status: 0xf,
                    device_features_sel: 1,
                    driver_features_sel: 0,
                    driver_features: next(),
                    queue_sel: (next() % 3) as u32,
                    queues: (0..nq).map(|_| queue(&mut next)).collect(),
                }),
            });
        }
        VmState {
            boundary: next(),
            mem_size: 64 << 20,
            cpuid_hash: [7; 32],
            console_digest: [next() as u8; 32],
            memory_digest: with_digest.then(|| [next() as u8; 32]),
            vcpu: VcpuState {
                regs,
                sregs,
                fpu,
                xsave,
                xcrs: vec![(0, 0x7)],
                debugregs,
                events,
                mp_state: 0,
                msrs,
            },
            devices,
        }
    }

    /// Re-seals a modified encoding with a correct checksum (a forgery, not a corruption).
    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        b.truncate(b.len() - CHECKSUM_LEN);
        let body = (b.len() - HEADER_LEN) as u32;
        b[10..14].copy_from_slice(&body.to_le_bytes());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Offset of the payload of section `tag` in an encoding.
    fn section_at(b: &[u8], tag: u8) -> usize {
        let mut p = HEADER_LEN;
        loop {
            let len = u32::from_le_bytes(b[p + 1..p + 5].try_into().unwrap()) as usize;
            if b[p] == tag {
                return p + 5;
            }
            p += 5 + len;
        }
    }

    #[test]
    fn a_state_round_trips() {
        for seed in 1..20 {
            let s = sample(seed, seed % 2 == 0);
            let b = s.encode();
            assert_eq!(VmState::decode(&b).unwrap(), s);
        }
    }

    #[test]
    fn forgeries_with_a_valid_checksum_are_refused_by_name() {
        let s = sample(3, true);
        let b = s.encode();
        let check = |b: Vec<u8>, needle: &str| {
            let e = VmState::decode(&reseal(b)).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle:?} not in {e}");
        };
        // An unknown version.
        let mut f = b.clone();
        f[8] = 2;
        check(f, "unsupported version 2");
        // A digest flag that is neither 0 nor 1.
        let mut f = b.clone();
        f[section_at(&b, 1) + 8 + 8 + 32 + 32] = 2;
        check(f, "memory digest flag is 2");
        // Too many XCRs.
        let mut f = b.clone();
        f[section_at(&b, 6)] = 17;
        check(f, "17 XCRs");
        // A section out of order.
        let mut f = b.clone();
        f[section_at(&b, 4) - 5] = 5;
        check(f, "section tag 5 where section 4 (fpu) belongs");
        // A virtio queue whose size is not a power of two.
        let s2 = {
            let mut s2 = sample(3, true);
            s2.devices.push(DeviceState {
                base: 0xe000_0000,
                kind: DeviceKind::Virtio(VirtioState {
                    device_type: 2,
                    device_features: 0,
                    config: [0; CONFIG_ID_BYTES],
                    status: 0,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    driver_features: 0,
                    queue_sel: 0,
                    queues: vec![QueueState {
                        max_size: 256,
                        size: 3,
                        ..Default::default()
                    }],
                }),
            });
            s2
        };
        check(s2.encode(), "queue 0: InvalidSize");
        // Devices out of address order.
        let mut s3 = sample(5, false);
        s3.devices.push(DeviceState {
            base: 0x1000,
            kind: DeviceKind::Control {
                last_clock: ClockValue::default(),
            },
        });
        check(s3.encode(), "out of address order");
        // A duplicated MSR.
        let mut s4 = sample(5, false);
        s4.vcpu.msrs = vec![(0x10, 1), (0x10, 2)];
        check(s4.encode(), "MSR 0x10 appears twice");
        // A section with a byte too many.
        let mut f = b.clone();
        let p = section_at(&b, 9);
        f[p - 4] = 5;
        f.insert(p + 4, 0);
        check(f, "1 unread byte(s) at the end of section mp_state");
        // Bytes after the checksum.
        let mut f = b.clone();
        f.push(0);
        assert!(matches!(
            VmState::decode(&f),
            Err(StateError::Malformed { .. })
        ));
        // Not a state at all.
        assert!(VmState::decode(b"FTVMLOG\0\x01\x00")
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = VmState::decode(&bytes);
        }

        #[test]
        fn arbitrary_states_round_trip(seed in any::<u64>(), digest in any::<bool>()) {
            let s = sample(seed, digest);
            prop_assert_eq!(VmState::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn every_truncation_is_refused(seed in any::<u64>(), cut in any::<proptest::sample::Index>()) {
            let b = sample(seed, true).encode();
            let n = cut.index(b.len());
            let e = VmState::decode(&b[..n]).unwrap_err();
            prop_assert!(matches!(e, StateError::Truncated { .. }), "{}", e);
        }

        #[test]
        fn every_corruption_is_refused(seed in any::<u64>(), at in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut b = sample(seed, false).encode();
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(VmState::decode(&b).is_err());
        }

        #[test]
        fn resealed_garbage_in_any_section_never_panics(seed in any::<u64>(), at in any::<proptest::sample::Index>(), junk in any::<u8>()) {
            let mut b = sample(seed, true).encode();
            let i = HEADER_LEN + at.index(b.len() - HEADER_LEN - CHECKSUM_LEN);
            b[i] = junk;
            let b = reseal(b);
            if let Ok(s) = VmState::decode(&b) {
                // Whatever decodes must encode back to the same bytes.
                prop_assert_eq!(s.encode(), b);
            }
        }
    }
}
