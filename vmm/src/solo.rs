//! Running one VM unreplicated (`ftvm-node run --solo`), optionally recording it, and
//! replaying a recording: assembling the machine from a [`VmSetup`] and running it to its end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::bus::MmioBus;
use crate::devices::control::ControlDevice;
use crate::devices::tap::Tap;
use crate::devices::virtio::blk::{Block, SECTOR};
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::net::{DropFrames, FrameSink, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::{VIRTIO_BASE, VIRTIO_STRIDE};
use crate::epoch::{Boundary, ConsoleSink, InputError, Inputs};
use crate::error::VmmError;
use crate::kvm::boot::BootParams;
use crate::kvm::KvmVm;
use crate::live::LiveInputs;
use crate::machine::{Machine, Outcome};
use crate::replay::codec::{End, Header};
use crate::replay::recorder::Recorder;
use crate::replay::replayer::Replayer;
use crate::replay::LogStats;
use crate::signals::StopSignal;
use crate::spec::{DeviceSpec, DiskOptions};
use ftvm_abi::control;

/// Console output to the process's stdout (flushed at every write) and, line by line, to the
/// node's log (target `guest`, level info).
#[derive(Default)]
pub struct StdoutConsole {
    line: Vec<u8>,
}

impl ConsoleSink for StdoutConsole {
    fn write(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the VM.
        let _ = out.write_all(bytes);
        let _ = out.flush();
        for &b in bytes {
            if b == b'\n' || self.line.len() >= 4096 {
                tracing::info!(target: "guest", "{}", String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
    }
}

/// Frames straight to the TAP (an unreplicated VM has no Output Rule to obey).
pub struct TapSink(pub Arc<Tap>);

impl FrameSink for TapSink {
    fn send(&mut self, _b: Boundary, frame: &[u8]) {
        if let Err(e) = self.0.write_frame(frame) {
            tracing::warn!("TAP {}: dropped a frame: {e}", self.0.name());
        }
    }
}

/// Parses a size: a number of bytes with an optional K/M/G (or KiB/MiB/GiB) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K, M or G suffix")
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use K, M or G)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Everything that defines a VM.
#[derive(Clone, Debug)]
pub struct VmSetup<'a> {
    /// The guest ELF image.
    pub image: &'a [u8],
    /// Guest memory size.
    pub mem_size: u64,
    /// The guest's argument string.
    pub args: String,
    /// The guest-visible devices.
    pub devices: DeviceSpec,
}

impl<'a> VmSetup<'a> {
    /// A VM with no devices but the control device.
    pub fn plain(image: &'a [u8], mem_size: u64, args: &str) -> Self {
        VmSetup {
            image,
            mem_size,
            args: args.to_string(),
            devices: DeviceSpec::default(),
        }
    }

    fn boot_params(&self, dirty_log: bool) -> BootParams {
        BootParams {
            args: self.args.clone(),
            net: self.devices.net.as_ref().map(|n| n.boot_config()),
            dirty_log,
            virtio_count: self.devices.virtio_count(),
        }
    }

    /// The header a recording of this VM carries.
    pub fn log_header(&self, digest_every: u64) -> Header {
        Header {
            image_hash: *blake3::hash(self.image).as_bytes(),
            mem_size: self.mem_size,
            cpuid_hash: crate::kvm::cpuid::baseline_hash(),
            args: self.args.clone(),
            machine: self.devices.describe(),
            digest_every,
        }
    }
}

/// Opens the disk image read-write under an exclusive advisory lock (the one `ftvm-resync`
/// honours), creating it with `opts.create_size` bytes if it does not exist. Returns the file
/// and its capacity in sectors.
pub fn open_disk(opts: &DiskOptions) -> Result<(File, u64), VmmError> {
    let err = |why: String| VmmError::Disk {
        path: opts.path.display().to_string(),
        why,
    };
    let created = !opts.path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&opts.path)
        .map_err(
            |e| match opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() => {
                    err(format!("the directory {} does not exist", dir.display()))
                }
                _ => err(e.to_string()),
            },
        )?;
    let file = disksync::lock::DiskLock::lock_exclusive(file, &opts.path)
        .map_err(|e| match e {
            disksync::Error::Locked(_) => {
                err("in use by another process (ftvm-node or ftvm-resync)".into())
            }
            disksync::Error::OpenForWriting { pids, .. } => err(format!(
                "in use by another process: open for writing by process(es) {pids:?}"
            )),
            e => err(e.to_string()),
        })?
        .into_file();
    if created {
        if opts.create_size == 0 || !opts.create_size.is_multiple_of(SECTOR) {
            return Err(err(format!(
                "size {} is not a positive multiple of 512",
                opts.create_size
            )));
        }
        file.set_len(opts.create_size)
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(
            "created disk image {} of {} bytes",
            opts.path.display(),
            opts.create_size
        );
    }
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len < SECTOR {
        return Err(err(format!("{len} bytes is smaller than one sector")));
    }
    Ok((file, len / SECTOR))
}

/// Opens the TAP device.
pub fn open_tap(name: &str) -> Result<Arc<Tap>, VmmError> {
    Tap::open(name).map(Arc::new).map_err(|e| VmmError::Tap {
        name: name.to_string(),
        why: e.to_string(),
    })
}

/// Assembles a machine: the VM, the control device and the virtio devices of `setup`.
pub fn assemble(
    setup: &VmSetup<'_>,
    disk: Option<File>,
    sink: Box<dyn FrameSink>,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
    dirty_log: bool,
) -> Result<Machine, VmmError> {
    assemble_tracked(setup, disk, sink, inputs, console, stop, dirty_log, None)
}

/// [`assemble`], with the disk's writes reported to `writes` (a pair member, for joins).
#[allow(clippy::too_many_arguments)]
pub fn assemble_tracked(
    setup: &VmSetup<'_>,
    disk: Option<File>,
    sink: Box<dyn FrameSink>,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
    dirty_log: bool,
    writes: Option<Arc<crate::join::blocks::BlockWrites>>,
) -> Result<Machine, VmmError> {
    let mut vm = KvmVm::create(setup.mem_size, setup.image, &setup.boot_params(dirty_log))?;
    vm.vcpu.set_stack(setup.mem_size)?;
    let mut bus = MmioBus::new();
    bus.insert(control::BASE, control::SIZE, Box::new(ControlDevice::new()))?;
    let mut slot = VIRTIO_BASE;
    let mut sink = Some(sink);
    if let Some(n) = &setup.devices.net {
        let net = Net::new(n.mac, sink.take().unwrap_or_else(|| Box::new(DropFrames)));
        bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(net)))?;
        slot += VIRTIO_STRIDE;
    }
    match (setup.devices.disk_sectors, disk) {
        (Some(sectors), Some(file)) => {
            let mut blk = Block::new(file).map_err(|e| VmmError::Config(format!("disk: {e}")))?;
            if let Some(w) = writes {
                blk = blk.with_write_tracking(w);
            }
            if blk.sectors() != sectors {
                return Err(VmmError::Config(format!(
                    "the disk has {} sectors, the machine expects {sectors}",
                    blk.sectors()
                )));
            }
            bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(blk)))?;
            slot += VIRTIO_STRIDE;
        }
        (None, None) => {}
        _ => {
            return Err(VmmError::Config(
                "a disk needs both a size and an image".into(),
            ))
        }
    }
    if setup.devices.rng {
        bus.insert(slot, VIRTIO_STRIDE, Box::new(VirtioMmio::new(Rng)))?;
    }
    Ok(Machine::new(vm, bus, inputs, console, stop))
}

/// Builds a machine with only the control device (benchmarks, simple guests).
pub fn build_machine(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    inputs: Box<dyn Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
) -> Result<Machine, VmmError> {
    let setup = VmSetup::plain(image, mem_size, &params.args);
    assemble(
        &setup,
        None,
        Box::new(DropFrames),
        inputs,
        console,
        stop,
        params.dirty_log,
    )
}

/// Options for recording a run.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The log file to write.
    pub path: std::path::PathBuf,
    /// A memory digest every this many boundaries (0: only at the end).
    pub digest_every: u64,
}

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// Boundaries passed.
    pub boundaries: u64,
    /// The log's figures (zero when nothing was recorded).
    pub log: LogStats,
    /// Wall time of the run.
    pub elapsed: std::time::Duration,
    /// The final state.
    pub end: Option<End>,
}

/// Host resources of a live run.
#[derive(Default)]
pub struct HostResources {
    /// The TAP for the NIC.
    pub tap: Option<Arc<Tap>>,
    /// The disk image and its capacity in sectors.
    pub disk: Option<(File, u64)>,
}

/// Runs a VM alone with live inputs (recording them if `record` is given).
pub fn run_live(
    setup: &VmSetup<'_>,
    host: HostResources,
    stop: Arc<StopSignal>,
    record: Option<&RecordOptions>,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let mut live = LiveInputs::new(stop.clone(), 0);
    let sink: Box<dyn FrameSink> = match &host.tap {
        Some(t) => {
            live = live.with_tap(t.clone());
            Box::new(TapSink(t.clone()))
        }
        None => Box::new(DropFrames),
    };
    let disk = host.disk.map(|(f, _)| f);
    let t = std::time::Instant::now();
    let (mut m, stats) = match record {
        None => (
            assemble(setup, disk, sink, Box::new(live), console, stop, false)?,
            None,
        ),
        Some(opts) => {
            let file = File::create(&opts.path).map_err(|e| {
                VmmError::Input(InputError::Log(format!(
                    "cannot create {}: {e}",
                    opts.path.display()
                )))
            })?;
            let recorder = Recorder::new(
                live,
                std::io::BufWriter::with_capacity(1 << 20, file),
                setup.log_header(opts.digest_every),
            )?;
            let stats = recorder.stats_handle();
            (
                assemble(setup, disk, sink, Box::new(recorder), console, stop, true)?,
                Some(stats),
            )
        }
    };
    let outcome = m.run()?;
    tracing::info!(boundaries = m.boundaries(), "VM ended: {outcome:?}");
    let log = stats
        .map(|s| *s.lock().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    Ok(RunSummary {
        outcome,
        boundaries: m.boundaries(),
        log,
        elapsed: t.elapsed(),
        end: m.end().cloned(),
    })
}

/// Runs `image` alone with live inputs, recording every input (no devices).
pub fn run_recorded(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    stop: Arc<StopSignal>,
    opts: &RecordOptions,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let setup = VmSetup::plain(image, mem_size, &params.args);
    run_live(&setup, HostResources::default(), stop, Some(opts), console)
}

/// Checks that a log was recorded from this image and memory size, before anything runs.
pub fn check_header(h: &Header, image: &[u8], mem_size: u64) -> Result<(), String> {
    if h.image_hash != *blake3::hash(image).as_bytes() {
        return Err("the log was recorded with a different guest image".into());
    }
    if h.mem_size != mem_size {
        return Err(format!(
            "the log was recorded with {} bytes of guest memory, not {mem_size}",
            h.mem_size
        ));
    }
    if h.cpuid_hash != crate::kvm::cpuid::baseline_hash() {
        return Err("the log was recorded with a different CPUID table".into());
    }
    Ok(())
}

/// Replays `log` against `image`; `mem_size` defaults to the recorded size; `disk` is a copy
/// of the disk image as it was when the recording started (required if the VM had a disk).
/// Transmitted frames are dropped. Returns the summary when the replay ended exactly as the
/// recording did; a divergence is an error.
pub fn replay(
    image: &[u8],
    log: &[u8],
    mem_size: Option<u64>,
    disk: Option<&Path>,
    stop: Arc<StopSignal>,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let refuse = |e: String| VmmError::Input(InputError::Log(format!("refused: {e}")));
    let replayer =
        Replayer::from_bytes(log).map_err(|e| VmmError::Input(InputError::Log(e.to_string())))?;
    let h = replayer.header().clone();
    let mem_size = mem_size.unwrap_or(h.mem_size);
    check_header(&h, image, mem_size).map_err(refuse)?;
    let devices = DeviceSpec::parse(&h.machine).map_err(refuse)?;
    let disk_file = match (devices.disk_sectors, disk) {
        (Some(_), None) => return Err(refuse("the recorded VM had a disk: give a copy of it as it was when the recording started (--disk)".into())),
        (Some(sectors), Some(p)) => {
            let (f, s) = open_disk(&DiskOptions {
                path: p.to_path_buf(),
                create_size: 0,
            })?;
            if s != sectors {
                return Err(refuse(format!("the recorded disk had {sectors} sectors, {} has {s}", p.display())));
            }
            Some(f)
        }
        (None, _) => None,
    };
    let setup = VmSetup {
        image,
        mem_size,
        args: h.args.clone(),
        devices,
    };
    let log_stats = replayer.stats();
    let t = std::time::Instant::now();
    let mut m = assemble(
        &setup,
        disk_file,
        Box::new(DropFrames),
        Box::new(replayer),
        console,
        stop,
        true,
    )?;
    let outcome = m.run()?;
    Ok(RunSummary {
        outcome,
        boundaries: m.boundaries(),
        log: log_stats,
        elapsed: t.elapsed(),
        end: m.end().cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
