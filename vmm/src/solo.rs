//! Running one VM unreplicated (`ftvm-node run --solo`): assemble the machine from options and
//! run it to its end.

use std::io::Write;
use std::sync::Arc;

use crate::bus::MmioBus;
use crate::devices::control::ControlDevice;
use crate::epoch::ConsoleSink;
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
