//! VM state under real KVM: a machine replaying a recording is paused at boundary k and saved;
//! a fresh machine gets its memory and state and replays the same log from k + 1; the first
//! machine goes on too. Both must end exactly as the recording did and as each other (final
//! registers, memory digest, console digest, the rest of the vCPU and device state, the
//! disk), and the replayer checks the restored machine at every boundary on the way (inputs,
//! fingerprints, periodic memory digests).

mod common;

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ftvm_abi::layout::PAGE_SIZE;
use vmm::devices::virtio::net::DropFrames;
use vmm::epoch::{Boundary, ClockValue, ConsoleSink, Fingerprint, InputError, Inputs};
use vmm::error::VmmError;
use vmm::live::LiveInputs;
use vmm::machine::{Machine, Outcome};
use vmm::replay::codec::{Decoder, End, Event, Record};
use vmm::replay::recorder::Recorder;
use vmm::replay::replayer::Replayer;
use vmm::setup::{assemble, VmSetup};
use vmm::signals::{self, StopSignal};
use vmm::spec::{DeviceSpec, NetSpec};
use vmm::state::pages::PageBatch;
use vmm::state::{DeviceKind, StateError, VmState};

/// IA32_TSC: the host's counter, which the guest may not read (DESIGN §2); it differs between
/// two machines by construction and is left out of the comparison.
const MSR_TSC: u32 = 0x10;

struct Quiet;
impl ConsoleSink for Quiet {
    fn write(&mut self, _: &[u8]) {}
}

fn stop() -> Arc<StopSignal> {
    common::require_kvm();
    signals::install().expect("signal handling")
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect("open disk image")
}

/// Records a run of `setup` with `live` inputs into `log`; returns the recorded end.
fn record<I: Inputs + 'static>(
    setup: &VmSetup<'_>,
    disk: Option<&Path>,
    live: I,
    log: &Path,
    digest_every: u64,
) -> End {
    let out = BufWriter::new(File::create(log).unwrap());
    let rec = Recorder::new(live, out, setup.log_header(digest_every)).unwrap();
    let mut m = machine(setup, disk, Box::new(rec));
    m.run().unwrap();
    m.end().expect("an end").clone()
}

/// A machine replaying `log` (from boundary `from + 1` when given).
fn replayer(
    setup: &VmSetup<'_>,
    log: &[u8],
    disk: Option<&Path>,
    from: Option<Boundary>,
) -> Machine {
    let mut r = Replayer::from_bytes(log).unwrap();
    if let Some(k) = from {
        r.skip_through(k);
    }
    machine(setup, disk, Box::new(r))
}

/// A machine of `setup` (with dirty logging) on `inputs`, its console and frames dropped.
fn machine(setup: &VmSetup<'_>, disk: Option<&Path>, inputs: Box<dyn Inputs>) -> Machine {
    assemble(
        setup,
        disk.map(open_rw),
        Box::new(DropFrames),
        inputs,
        Box::new(Quiet),
        stop(),
        true,
    )
    .unwrap()
}

/// Copies every page of `from` that differs into `to` (which has not run); returns how many.
fn copy_memory(from: &Machine, to: &Machine) -> u64 {
    let (src, dst) = (from.memory().pages_handle(), to.memory().pages_handle());
    assert_eq!(src.pages(), dst.pages());
    let mut a = [0u8; PAGE_SIZE as usize];
    let mut b = [0u8; PAGE_SIZE as usize];
    let mut n = 0;
    for p in 0..src.pages() {
        src.read_page(p, &mut a).unwrap();
        dst.read_page(p, &mut b).unwrap();
        if a != b {
            dst.write_page(p, &a).unwrap();
            n += 1;
        }
    }
    n
}

/// Names the parts in which two states differ (empty when equal), without printing the
/// kilobytes of a whole state.
fn differences(a: &VmState, b: &VmState) -> Vec<String> {
    let mut d = Vec::new();
    let (x, y) = (&a.vcpu, &b.vcpu);
    let mut check = |name: &str, same: bool, detail: String| {
        if !same {
            d.push(format!("{name}: {detail}"));
        }
    };
    check(
        "boundary",
        a.boundary == b.boundary,
        format!("{} vs {}", a.boundary, b.boundary),
    );
    check("memory size", a.mem_size == b.mem_size, String::new());
    check("cpuid", a.cpuid_hash == b.cpuid_hash, String::new());
    check(
        "console digest",
        a.console_digest == b.console_digest,
        String::new(),
    );
    check(
        "memory digest",
        a.memory_digest == b.memory_digest,
        String::new(),
    );
    macro_rules! show {
        ($name:literal, $p:expr, $q:expr) => {
            check($name, $p == $q, format!("{:x?} vs {:x?}", $p, $q))
        };
    }
    show!("regs", x.regs, y.regs);
    show!("sregs", x.sregs, y.sregs);
    show!("fpu", x.fpu, y.fpu);
    // By the state each area gives the vCPU: XSTATE_BV's bit for a component in its initial
    // state is the processor's to set or clear (see `vmm::state::xsave`).
    let xs = vmm::state::xsave::differences(&x.xsave, &y.xsave);
    check("xsave", xs.is_empty(), format!("{xs:?}"));
    show!("xcrs", x.xcrs, y.xcrs);
    show!("debugregs", x.debugregs, y.debugregs);
    show!("events", x.events, y.events);
    check("mp_state", x.mp_state == y.mp_state, String::new());
    let ms: Vec<String> = x
        .msrs
        .iter()
        .zip(&y.msrs)
        .filter(|(p, q)| p != q)
        .map(|(p, q)| format!("{:#x}={:#x} vs {:#x}={:#x}", p.0, p.1, q.0, q.1))
        .collect();
    check(
        "msrs",
        x.msrs == y.msrs,
        format!("{} vs {} entries; {ms:?}", x.msrs.len(), y.msrs.len()),
    );
    check(
        "devices",
        a.devices == b.devices,
        format!("{:?} vs {:?}", a.devices, b.devices),
    );
    d
}

/// The state of a machine that has ended, minus the host's TSC.
fn final_state(m: &mut Machine) -> VmState {
    let mut s = m.save_state().unwrap();
    s.vcpu.msrs.retain(|&(i, _)| i != MSR_TSC);
    s
}

/// Pauses a replay of `log` at `k`, saves it, restores the state into a fresh machine and runs
/// both to the end; checks that they end identically and as recorded. `disk` is the image as
/// the recording started; each machine gets its own copy in `dir`. Returns the saved state.
fn save_at_and_compare(
    setup: &VmSetup<'_>,
    log: &[u8],
    recorded: &End,
    disk: Option<&Path>,
    dir: &Path,
    k: Boundary,
) -> VmState {
    let copy = |name: &str| -> Option<PathBuf> {
        disk.map(|d| {
            let p = dir.join(format!("{name}-{k}.img"));
            std::fs::copy(d, &p).unwrap();
            p
        })
    };
    let disk1 = copy("vm1");
    let mut m1 = replayer(setup, log, disk1.as_deref(), None);
    assert!(
        m1.run_until(k).unwrap().is_none(),
        "the run ended before boundary {k}"
    );
    assert_eq!(m1.boundaries(), k);
    let state = m1.save_state().unwrap();
    let bytes = state.encode();
    let decoded = VmState::decode(&bytes).unwrap();
    assert_eq!(decoded, state);
    // The second machine: its own disk as the first one's is at k, the memory, the state.
    let disk2 = disk1.as_ref().map(|d1| {
        let p = dir.join(format!("vm2-{k}.img"));
        std::fs::copy(d1, &p).unwrap();
        p
    });
    let mut m2 = replayer(setup, log, disk2.as_deref(), Some(k));
    copy_memory(&m1, &m2);
    m2.restore_state(&decoded).unwrap();
    assert_eq!(m2.boundaries(), k);
    let o1 = m1.run().unwrap();
    let o2 = m2.run().unwrap();
    assert_eq!(format!("{o1:?}"), format!("{o2:?}"), "k={k}");
    let (e1, e2) = (m1.end().unwrap().clone(), m2.end().unwrap().clone());
    assert_eq!(e1, e2, "k={k}: the two machines ended differently");
    assert_eq!(
        (e1.boundary, e1.kind),
        (recorded.boundary, recorded.kind),
        "k={k}"
    );
    if !matches!(recorded.kind, vmm::replay::codec::EndKind::Stopped(_)) {
        assert_eq!(e1, *recorded, "k={k}: not the recorded end");
    }
    let diff = differences(&final_state(&mut m1), &final_state(&mut m2));
    assert!(diff.is_empty(), "k={k}: final states differ: {diff:#?}");
    if let (Some(a), Some(b)) = (disk1, disk2) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "k={k}: the disks differ"
        );
    }
    state
}

fn boundaries_with(log: &[u8], pred: impl Fn(&Event) -> bool) -> Vec<Boundary> {
    let mut d = Decoder::new(log);
    let mut v = Vec::new();
    while let Some(r) = d.next_record().unwrap() {
        if let Record::Boundary {
            boundary, events, ..
        } = r
        {
            if events.iter().any(&pred) {
                v.push(boundary);
            }
        }
    }
    v
}

#[test]
fn clockwork_saved_anywhere_continues_exactly_as_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("clockwork.ftlog");
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, "800");
    let recorded = record(&setup, None, LiveInputs::new(stop(), 0), &log_path, 97);
    assert!(matches!(
        recorded.kind,
        vmm::replay::codec::EndKind::Exited(0)
    ));
    let log = std::fs::read(&log_path).unwrap();
    let last = recorded.boundary;
    assert!(last > 2000, "{last} boundaries");
    for k in [0, 1, 2, 97, last / 3, last / 2 + 1, last - 1] {
        let s = save_at_and_compare(&setup, &log, &recorded, None, dir.path(), k);
        assert_eq!(s.boundary, k);
        if k > 2 {
            // The guest has read the clock by then: the control device carries it.
            assert_ne!(s.last_clock(), Some(ClockValue::default()), "k={k}");
        }
    }
}

#[test]
fn a_restore_that_differs_from_the_saved_machine_is_refused_or_caught() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("clockwork.ftlog");
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, "300");
    let recorded = record(&setup, None, LiveInputs::new(stop(), 0), &log_path, 50);
    let log = std::fs::read(&log_path).unwrap();
    let k = recorded.boundary / 2;
    let mut m1 = replayer(&setup, &log, None, None);
    assert!(m1.run_until(k).unwrap().is_none());
    let state = m1.save_state().unwrap();

    // Memory not copied: the memory digest check refuses the restore.
    let mut m2 = replayer(&setup, &log, None, Some(k));
    let e = m2.restore_state(&state).unwrap_err();
    assert!(e.to_string().contains("memory digest"), "{e}");

    // A machine with other memory size or other devices does not take the state.
    let other = VmSetup::plain(image, 128 << 20, "300");
    let mut m3 = machine(&other, None, Box::new(LiveInputs::new(stop(), 0)));
    let e = m3.restore_state(&state).unwrap_err();
    assert!(e.to_string().contains("bytes of memory"), "{e}");
    let mut with_rng = setup.clone();
    with_rng.devices.rng = true;
    let mut m4 = machine(&with_rng, None, Box::new(LiveInputs::new(stop(), 0)));
    copy_memory(&m1, &m4);
    let e = m4.restore_state(&state).unwrap_err();
    assert!(
        matches!(e, VmmError::State(StateError::Mismatch(ref m)) if m.contains("devices at")),
        "{e}"
    );

    // A tampered state restores, but the replay catches the difference.
    let tamper = |f: &dyn Fn(&mut VmState)| -> VmmError {
        let mut s = state.clone();
        f(&mut s);
        let mut m = replayer(&setup, &log, None, Some(k));
        copy_memory(&m1, &m);
        m.restore_state(&VmState::decode(&s.encode()).unwrap())
            .unwrap();
        m.run().unwrap_err()
    };
    let e = tamper(&|s| s.console_digest[0] ^= 1);
    assert!(e.to_string().contains("console output differs"), "{e}");
    let e = tamper(&|s| s.boundary += 1);
    assert!(e.to_string().contains("divergence"), "{e}");
    let e = tamper(&|s| s.vcpu.regs.rsp ^= 0x1000);
    assert!(
        e.to_string().contains("divergence"),
        "a moved stack went unnoticed: {e}"
    );

    // The untampered state still continues to the recorded end.
    let mut m = replayer(&setup, &log, None, Some(k));
    copy_memory(&m1, &m);
    m.restore_state(&state).unwrap();
    assert!(matches!(m.run().unwrap(), Outcome::Exited { status: 0 }));
    assert_eq!(m.end().unwrap(), &recorded);
}

/// A disk image holding a kv log of `keys` SETs of `value_len`-byte values.
fn kv_disk(path: &Path, capacity: u64, keys: usize, value_len: usize) {
    let mut log = kvcore::LogWriter::format(capacity, 0x5eed).unwrap();
    let f = File::create(path).unwrap();
    f.set_len(capacity).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..keys {
        let value = vec![b'a' + (i % 26) as u8; value_len];
        let args = vec![b"SET".to_vec(), format!("key:{i}").into_bytes(), value];
        log.append(1_700_000_000_000 + i as u64, &args).unwrap();
        if i % 64 == 63 || i + 1 == keys {
            let b = log.seal().expect("a batch");
            f.write_all_at(&b.bytes, b.offset).unwrap();
            log.mark_durable();
        }
    }
    f.sync_all().unwrap();
}

const HOST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&HOST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GUEST_IP);
    f
}

fn ping(seq: u16, payload_len: usize) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..payload_len).map(|i| (i as u16 ^ seq) as u8));
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&seq.to_be_bytes());
    ip.extend_from_slice(&[0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// A host for the kv guest with a virtual clock (WAITs end at their deadline at once) and a
/// scripted peer on the network: once the guest can receive, an ARP request, then `pings`
/// ICMP echo requests, a few per WAIT/POLL; the run stops 300 boundaries after the last one.
/// (Only the recording uses it: the replays take everything from the log.)
struct ScriptedHost {
    now: ClockValue,
    x: u64,
    sent: usize,
    pings: usize,
    stop_at: Option<Boundary>,
    boundary: Boundary,
}

impl ScriptedHost {
    fn new(pings: usize) -> Self {
        ScriptedHost {
            now: ClockValue {
                mono_ns: 0,
                wall_ns: 1_750_000_000_000_000_000,
            },
            x: 0x9e37_79b9_7f4a_7c15,
            sent: 0,
            pings,
            stop_at: None,
            boundary: 0,
        }
    }
    fn tick(&mut self, ns: u64) -> ClockValue {
        self.now.mono_ns += ns;
        self.now.wall_ns += ns;
        self.now
    }
}

impl Inputs for ScriptedHost {
    fn boundary(&mut self, b: Boundary, _: Option<Fingerprint>) -> Result<(), InputError> {
        self.boundary = b;
        match self.stop_at {
            Some(s) if b >= s => Err(InputError::Stopped(libc::SIGTERM)),
            _ => Ok(()),
        }
    }
    fn clock(&mut self, _: Boundary) -> Result<ClockValue, InputError> {
        Ok(self.tick(1_000))
    }
    fn entropy(&mut self, _: Boundary) -> Result<u64, InputError> {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        Ok(self.x)
    }
    fn wait(&mut self, _: Boundary, deadline: u64, room: usize) -> Result<ClockValue, InputError> {
        if room > 0 && self.sent <= self.pings {
            return Ok(self.tick(5_000));
        }
        let now = self.tick(1_000);
        self.now.mono_ns = now.mono_ns.max(deadline);
        self.now.wall_ns += self.now.mono_ns - now.mono_ns;
        Ok(self.now)
    }
    fn net_rx(&mut self, b: Boundary, room: usize) -> Result<Vec<Vec<u8>>, InputError> {
        let mut v = Vec::new();
        while v.len() < room.min(3) && self.sent <= self.pings {
            v.push(if self.sent == 0 {
                arp_request()
            } else {
                ping(self.sent as u16, 64 + self.sent % 900)
            });
            self.sent += 1;
            if self.sent > self.pings {
                self.stop_at = Some(b + 300);
            }
        }
        Ok(v)
    }
    fn random(&mut self, _: Boundary, len: usize) -> Result<Vec<u8>, InputError> {
        Ok((0..len).map(|i| i as u8).collect())
    }
}

#[test]
fn kv_saved_inside_its_disk_and_network_phases_continues_exactly_as_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let image = vmm::guests::bundled("kv").unwrap();
    let capacity: u64 = 16 << 20;
    let disk0 = dir.path().join("disk0.img");
    kv_disk(&disk0, capacity, 6000, 700);
    let setup = VmSetup {
        image,
        mem_size: 64 << 20,
        args: "maxclients=4".into(),
        devices: DeviceSpec {
            net: Some(NetSpec {
                mac: GUEST_MAC,
                ip: GUEST_IP.into(),
                prefix: 24,
                gateway: None,
            }),
            disk_sectors: Some(capacity / 512),
            rng: false,
        },
    };
    let rec_disk = dir.path().join("recorded.img");
    std::fs::copy(&disk0, &rec_disk).unwrap();
    let log_path = dir.path().join("kv.ftlog");
    let recorded = record(
        &setup,
        Some(&rec_disk),
        ScriptedHost::new(400),
        &log_path,
        150,
    );
    assert!(
        matches!(recorded.kind, vmm::replay::codec::EndKind::Stopped(_)),
        "{recorded:?}"
    );
    let log = std::fs::read(&log_path).unwrap();
    let disk_phase = boundaries_with(&log, |e| matches!(e, Event::DiskDone { .. }));
    let net_phase = boundaries_with(&log, |e| matches!(e, Event::NetRx(_)));
    assert!(disk_phase.len() >= 10, "{} disk requests", disk_phase.len());
    assert!(
        net_phase.len() >= 100,
        "{} receiving boundaries",
        net_phase.len()
    );
    let ks = [
        disk_phase[disk_phase.len() / 2],
        disk_phase[disk_phase.len() / 2] + 1,
        net_phase[net_phase.len() / 2],
        net_phase[net_phase.len() / 3] + 1,
        recorded.boundary - 5,
    ];
    for k in ks {
        let s = save_at_and_compare(&setup, &log, &recorded, Some(&disk0), dir.path(), k);
        let ready = s
            .devices
            .iter()
            .filter_map(|d| match &d.kind {
                DeviceKind::Virtio(v) => Some(v.queues.iter().filter(|q| q.ready).count()),
                _ => None,
            })
            .sum::<usize>();
        if k >= net_phase[0] {
            assert_eq!(ready, 3, "k={k}: net rx, tx and blk queues are set up");
        }
    }
    // The replays ended with the recording's disk.
    let vm1 = dir.path().join(format!("vm1-{}.img", ks[0]));
    assert!(std::fs::read(vm1).unwrap() == std::fs::read(&rec_disk).unwrap());
}

/// Records `rounds` rounds of clockwork; returns the setup's args, the log and its end.
fn clockwork_log(dir: &Path, rounds: u32, digest_every: u64) -> (String, Vec<u8>, End) {
    let log_path = dir.join(format!("clockwork-{rounds}.ftlog"));
    let args = rounds.to_string();
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let end = record(
        &setup,
        None,
        LiveInputs::new(stop(), 0),
        &log_path,
        digest_every,
    );
    (args, std::fs::read(&log_path).unwrap(), end)
}

#[test]
fn every_field_of_a_state_lands_in_the_restored_vcpu() {
    // The guest runs at ring 3 and cannot touch most of the vCPU's state (MSRs, debug
    // registers); check at the KVM level that what the state carries is what the restored
    // vCPU holds, with values the guest would never have set.
    let dir = tempfile::tempdir().unwrap();
    let (args, log, _) = clockwork_log(dir.path(), 100, 0);
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let mut m1 = replayer(&setup, &log, None, None);
    assert!(m1.run_until(40).unwrap().is_none());
    let mut s = m1.save_state().unwrap();
    let set = |s: &mut VmState, index: u32, value: u64| {
        let m = s.vcpu.msrs.iter_mut().find(|(i, _)| *i == index);
        m.unwrap_or_else(|| panic!("MSR {index:#x} not saved")).1 = value;
    };
    set(&mut s, 0xc000_0102, 0x1234_5000); // KERNEL_GS_BASE
    set(&mut s, 0x175, 0x8000); // SYSENTER_ESP
    set(&mut s, 0xc000_0082, 0xffff_8000_0000_1000); // LSTAR
    s.vcpu.debugregs.db = [0x1000, 0x2000, 0x3000, 0x4000];
    s.vcpu.regs.r13 = 0xdead_beef;
    // XMM15 byte 3, in the FPU and in the XSAVE area's legacy region (XMM0 at byte 160),
    // with the SSE bit of XSTATE_BV (byte 512) set: otherwise XRSTOR takes SSE as in its
    // initial state and ignores the registers in the area.
    s.vcpu.fpu.xmm[15][3] ^= 0x5a;
    s.vcpu.xsave[160 + 15 * 16 + 3] ^= 0x5a;
    s.vcpu.xsave[512] |= 2;
    let mut m2 = replayer(&setup, &log, None, Some(40));
    copy_memory(&m1, &m2);
    m2.restore_state(&s).unwrap();
    let mut back = m2.save_state().unwrap();
    for st in [&mut s, &mut back] {
        st.vcpu.msrs.retain(|&(i, _)| i != MSR_TSC);
    }
    let diff = differences(&back, &s);
    assert!(diff.is_empty(), "the restored vCPU differs: {diff:#?}");
}

#[test]
fn pre_copy_from_another_thread_while_the_guest_runs_rebuilds_memory_exactly() {
    // The way a join copies memory: a second thread takes dirty pages from the tracker and
    // copies them while the guest runs; after the pause, the last dirty pages, then the state.
    let dir = tempfile::tempdir().unwrap();
    let (args, log, recorded) = clockwork_log(dir.path(), 1500, 113);
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let k = recorded.boundary * 2 / 3;
    let mut m1 = replayer(&setup, &log, None, None);
    let mut m2 = replayer(&setup, &log, None, Some(k));
    let tracker = m1.dirty_tracker().expect("dirty logging").clone();
    // A tracked machine runs with KVM's dirty log off until someone subscribes.
    let vm = m1.vm().vm_fd_shared();
    assert!(vm
        .get_dirty_log(vmm::kvm::memory::RAM_SLOT, 64 << 20)
        .is_err());
    let consumer = tracker
        .subscribe(vmm::state::dirty::Since::Everything)
        .unwrap();
    assert_eq!(tracker.consumers(), 1, "the pre-copy");
    let (src, dst) = (m1.memory().pages_handle(), m2.memory().pages_handle());
    let pages = m1.memory().pages();
    // One round: take the dirty pages, read them in batches, encode, decode, apply (what a
    // join sends over the channel); returns (pages, bytes encoded).
    let copy = move |c: &vmm::state::dirty::DirtyConsumer| -> (u64, u64) {
        let d = c.take().unwrap();
        let mut numbers = d.iter();
        let (mut n, mut bytes) = (0, 0);
        loop {
            let batch = PageBatch::read(&src, &mut numbers).unwrap();
            if batch.pages.is_empty() {
                break (n, bytes);
            }
            let wire = batch.encode();
            bytes += wire.len() as u64;
            let received = PageBatch::decode(&wire, pages).unwrap();
            n += received.pages.len() as u64;
            received.apply(&dst).unwrap();
        }
    };
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let copier = {
        let running = running.clone();
        let copy = copy.clone();
        std::thread::spawn(move || {
            let mut rounds = Vec::new();
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                rounds.push(copy(&consumer));
                // Pacing only (the copy is correct at any speed): leave the vCPU its core.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (rounds, consumer)
        })
    };
    assert!(m1.run_until(k).unwrap().is_none());
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let (rounds, consumer) = copier.join().unwrap();
    assert!(!rounds.is_empty());
    assert_eq!(rounds[0].0, pages, "the first round sends every page");
    // The pause: the last dirty pages, then the state (whose memory digest the restore
    // checks against the copy).
    let (last, last_bytes) = copy(&consumer);
    drop(consumer);
    let state = m1.save_state().unwrap();
    m2.restore_state(&state).unwrap();
    assert_eq!(
        m2.memory_digest().unwrap(),
        Some(vmm::replay::digest::MemoryDigest::full(m1.memory()).unwrap())
    );
    let sent: u64 = rounds.iter().map(|r| r.1).sum::<u64>() + last_bytes;
    let copied: u64 = rounds.iter().map(|r| r.0).sum::<u64>() + last;
    eprintln!(
        "pre-copy: {} rounds while running, pages {:?}…; {last} pages ({last_bytes} bytes) in \
         the pause; {sent} bytes sent for {copied} pages ({} MiB)",
        rounds.len(),
        &rounds[..rounds.len().min(6)],
        (copied * PAGE_SIZE) >> 20
    );
    assert!(matches!(m1.run().unwrap(), Outcome::Exited { status: 0 }));
    assert!(matches!(m2.run().unwrap(), Outcome::Exited { status: 0 }));
    assert_eq!(m1.end().unwrap(), &recorded);
    assert_eq!(m2.end().unwrap(), &recorded);
}

/// Checks that some page differs between the snapshots `before` and `after` and that `dirty`
/// reports every page that does.
fn assert_reports_every_change(
    before: &[[u8; PAGE_SIZE as usize]],
    after: &[[u8; PAGE_SIZE as usize]],
    dirty: &vmm::state::dirty::DirtyPages,
) {
    let changed: Vec<u64> = (0..before.len() as u64)
        .filter(|&p| before[p as usize] != after[p as usize])
        .collect();
    assert!(!changed.is_empty(), "the guest wrote nothing");
    for &p in &changed {
        assert!(dirty.contains(p), "page {p} changed but was not reported");
    }
}

#[test]
fn consumers_of_the_tracker_never_steal_each_others_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (args, log, _) = clockwork_log(dir.path(), 400, 0);
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let mut m = replayer(&setup, &log, None, None);
    let tracker = m.dirty_tracker().unwrap().clone();
    let a = tracker.subscribe(vmm::state::dirty::Since::Now).unwrap();
    let b = tracker.subscribe(vmm::state::dirty::Since::Now).unwrap();
    let snapshot = |m: &Machine| -> Vec<[u8; PAGE_SIZE as usize]> {
        let h = m.memory().pages_handle();
        (0..h.pages())
            .map(|p| {
                let mut buf = [0u8; PAGE_SIZE as usize];
                h.read_page(p, &mut buf).unwrap();
                buf
            })
            .collect()
    };
    assert!(m.run_until(100).unwrap().is_none());
    let _ = a.take().unwrap();
    let _ = b.take().unwrap();
    let before = snapshot(&m);
    assert!(m.run_until(400).unwrap().is_none());
    // A digest in between (which reads every page) takes nothing from a or b.
    let digest = m.memory_digest().unwrap().unwrap();
    assert_eq!(
        digest,
        vmm::replay::digest::MemoryDigest::full(m.memory()).unwrap()
    );
    let da = a.take().unwrap();
    assert_reports_every_change(&before, &snapshot(&m), &da);
    // a took its pages; b still has them all (and a has none left).
    let db = b.take().unwrap();
    assert_eq!(db, da);
    assert!(a.take().unwrap().is_empty(), "the machine is paused");
    drop(a);
    assert_eq!(tracker.consumers(), 1, "b");
    // KVM's dirty log is on while a consumer is subscribed, and off once the last one left.
    let vm = m.vm().vm_fd_shared();
    let slot = vmm::kvm::memory::RAM_SLOT;
    assert!(vm.get_dirty_log(slot, 64 << 20).is_ok(), "b is subscribed");
    drop(b);
    assert_eq!(tracker.consumers(), 0);
    assert!(
        vm.get_dirty_log(slot, 64 << 20).is_err(),
        "no consumer: KVM's dirty log is off"
    );
    // A new consumer turns it on again and sees what the guest writes from then on.
    let c = tracker.subscribe(vmm::state::dirty::Since::Now).unwrap();
    let before = snapshot(&m);
    assert!(m.run_until(700).unwrap().is_none());
    let after = snapshot(&m);
    assert_reports_every_change(&before, &after, &c.take().unwrap());
}

#[test]
fn a_machine_paused_from_another_thread_is_saved_and_continues_in_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (args, log, recorded) = clockwork_log(dir.path(), 600, 71);
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let mut m1 = replayer(&setup, &log, None, None);
    let pause = m1.pause_handle();
    // Requested before the run: it pauses at once.
    pause.request();
    assert!(m1.run_until(Boundary::MAX).unwrap().is_none());
    assert_eq!(m1.boundaries(), 0);
    assert!(!pause.requested());
    // Requested from another thread once the guest has written memory (so it has run).
    let watcher = {
        let tracker = m1.dirty_tracker().unwrap().clone();
        let pause = pause.clone();
        std::thread::spawn(move || {
            let c = tracker.subscribe(vmm::state::dirty::Since::Now).unwrap();
            while c.take().unwrap().count() < 64 {
                std::thread::yield_now();
            }
            pause.request();
        })
    };
    assert!(
        m1.run_until(Boundary::MAX).unwrap().is_none(),
        "paused, not ended"
    );
    watcher.join().unwrap();
    let k = m1.boundaries();
    assert!(k > 0 && k < recorded.boundary, "paused at {k}");
    let state = m1.save_state().unwrap();
    let mut m2 = replayer(&setup, &log, None, Some(k));
    copy_memory(&m1, &m2);
    m2.restore_state(&state).unwrap();
    assert!(matches!(m1.run().unwrap(), Outcome::Exited { status: 0 }));
    assert!(matches!(m2.run().unwrap(), Outcome::Exited { status: 0 }));
    assert_eq!(m1.end().unwrap(), &recorded);
    assert_eq!(m2.end().unwrap(), &recorded);
}

#[test]
fn the_registers_kvm_hands_over_at_each_exit_are_the_ones_it_holds() {
    // Fingerprints read the registers KVM copies into the run page at every exit (no ioctl);
    // at every boundary, and after a restore, they must be what KVM_GET_REGS reads.
    let dir = tempfile::tempdir().unwrap();
    let (args, log, _) = clockwork_log(dir.path(), 100, 0);
    let image = vmm::guests::bundled("clockwork").unwrap();
    let setup = VmSetup::plain(image, 64 << 20, &args);
    let mut m = replayer(&setup, &log, None, None);
    assert!(
        m.vm().vcpu.syncs_regs(),
        "this KVM lacks KVM_CAP_SYNC_REGS: every fingerprint costs a KVM_GET_REGS"
    );
    let mut rips = std::collections::BTreeSet::new();
    for k in 1..=120 {
        assert!(m.run_until(k).unwrap().is_none(), "paused at {k}");
        let copy = m.vm().vcpu.regs().unwrap();
        let kernel = m.vm().vcpu.regs_from_kernel().unwrap();
        assert_eq!(copy, kernel, "boundary {k}");
        rips.insert(copy.rip);
    }
    assert!(
        rips.len() > 3,
        "the guest moved between boundaries: {rips:?}"
    );
    // After a restore the copy is stale until the next exit: the registers come from KVM.
    let s = m.save_state().unwrap();
    let mut m2 = replayer(&setup, &log, None, None);
    copy_memory(&m, &m2);
    m2.restore_state(&s).unwrap();
    assert_eq!(m2.vm().vcpu.regs().unwrap(), s.vcpu.regs);
}
