//! Running one VM unreplicated (`ftvm-node run --solo`): assemble the machine from options and
//! run it to its end.

use std::io::Write;
use std::sync::Arc;

use crate::bus::MmioBus;
use crate::devices::control::ControlDevice;
use crate::epoch::{ConsoleSink, InputError};
use crate::replay::codec::{End, Header};
use crate::replay::recorder::Recorder;
use crate::replay::replayer::Replayer;
use crate::replay::LogStats;
use crate::error::VmmError;
use crate::kvm::boot::BootParams;
use crate::kvm::KvmVm;
use crate::live::LiveInputs;
use crate::machine::{Machine, Outcome};
use crate::signals::StopSignal;
use ftvm_abi::control;

/// Console output to the process's stdout, flushed at every write.
pub struct StdoutConsole;

impl ConsoleSink for StdoutConsole {
    fn write(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the VM.
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

/// Parses a memory size: a number of bytes with an optional K/M/G (or KiB/MiB/GiB) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional K, M or G suffix"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?} (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Builds the machine for an unreplicated run of `image` with `mem_size` bytes of memory.
pub fn build_machine(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    inputs: Box<dyn crate::epoch::Inputs>,
    console: Box<dyn ConsoleSink>,
    stop: Arc<StopSignal>,
) -> Result<Machine, VmmError> {
    let mut vm = KvmVm::create(mem_size, image, params)?;
    vm.vcpu.set_stack(mem_size)?;
    let mut bus = MmioBus::new();
    bus.insert(control::BASE, control::SIZE, Box::new(ControlDevice::new()))?;
    Ok(Machine::new(vm, bus, inputs, console, stop))
}

/// Runs `image` alone with live inputs and the console on stdout.
pub fn run_solo(image: &[u8], mem_size: u64, params: &BootParams, stop: Arc<StopSignal>) -> Result<Outcome, VmmError> {
    let inputs = Box::new(LiveInputs::new(stop.clone(), 0));
    let mut m = build_machine(image, mem_size, params, inputs, Box::new(StdoutConsole), stop)?;
    let outcome = m.run()?;
    tracing::info!(boundaries = m.boundaries(), "VM ended: {outcome:?}");
    Ok(outcome)
}

/// Options for recording a solo run.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The log file to write.
    pub path: std::path::PathBuf,
    /// A memory digest every this many boundaries (0: only at the end).
    pub digest_every: u64,
}

/// The header a recording of `image` with these parameters carries.
pub fn log_header(image: &[u8], mem_size: u64, params: &BootParams, digest_every: u64) -> Header {
    Header {
        image_hash: *blake3::hash(image).as_bytes(),
        mem_size,
        cpuid_hash: crate::kvm::cpuid::baseline_hash(),
        args: params.args.clone(),
        digest_every,
    }
}

/// What a recorded or replayed run did.
#[derive(Debug)]
pub struct RunSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// Boundaries passed.
    pub boundaries: u64,
    /// The log's figures.
    pub log: LogStats,
    /// Wall time of the run.
    pub elapsed: std::time::Duration,
    /// The final state.
    pub end: Option<End>,
}

/// Runs `image` alone with live inputs, recording every input to `opts.path`.
pub fn run_recorded(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    stop: Arc<StopSignal>,
    opts: &RecordOptions,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let file = std::fs::File::create(&opts.path).map_err(|e| {
        VmmError::Input(InputError::Log(format!("cannot create {}: {e}", opts.path.display())))
    })?;
    let header = log_header(image, mem_size, params, opts.digest_every);
    let recorder = Recorder::new(
        LiveInputs::new(stop.clone(), 0),
        std::io::BufWriter::with_capacity(1 << 20, file),
        header,
    )?;
    let stats = recorder.stats_handle();
    let params = BootParams {
        dirty_log: true,
        ..params.clone()
    };
    let t = std::time::Instant::now();
    let mut m = build_machine(image, mem_size, &params, Box::new(recorder), console, stop)?;
    let outcome = m.run()?;
    let log = *stats.lock().unwrap_or_else(|p| p.into_inner());
    Ok(RunSummary {
        outcome,
        boundaries: m.boundaries(),
        log,
        elapsed: t.elapsed(),
        end: m.end().cloned(),
    })
}

/// Checks that a log was recorded from this image (and memory size and arguments), before
/// anything runs.
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

/// Replays `log` against `image`; `mem_size` defaults to the recorded size. Returns the
/// summary when the replay ended exactly as the recording did; a divergence is an error.
pub fn replay(
    image: &[u8],
    log: &[u8],
    mem_size: Option<u64>,
    stop: Arc<StopSignal>,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let replayer = Replayer::from_bytes(log)
        .map_err(|e| VmmError::Input(InputError::Log(e.to_string())))?;
    let h = replayer.header().clone();
    let mem_size = mem_size.unwrap_or(h.mem_size);
    check_header(&h, image, mem_size)
        .map_err(|e| VmmError::Input(InputError::Log(format!("refused: {e}"))))?;
    let log_stats = replayer.stats();
    let params = BootParams {
        args: h.args.clone(),
        dirty_log: true,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let mut m = build_machine(image, mem_size, &params, Box::new(replayer), console, stop)?;
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
