//! The cost of an exit: runs the `exitbench` guest under real KVM, once per kind of exit, and
//! prints exits per second for each with its ratio against the cheapest exit the VMM handles
//! (a read of the control device's MAGIC register, measured in the same run).
//!
//! `cargo bench -p ftvm-benches --bench poll_exit` (env `EXITS` overrides the 100 000 exits).

use std::sync::{Arc, Mutex};

use vmm::epoch::ConsoleSink;
use vmm::kvm::boot::BootParams;
use vmm::live::LiveInputs;
use vmm::machine::Outcome;

struct Capture(Arc<Mutex<Vec<u8>>>);
impl ConsoleSink for Capture {
    fn write(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

/// Runs `exitbench KIND N` and returns the guest-measured nanoseconds.
fn measure(kind: &str, n: u64) -> anyhow::Result<u64> {
    let stop = vmm::signals::install()?;
    let image = vmm::guests::bundled("exitbench").expect("bundled");
    let out = Arc::new(Mutex::new(Vec::new()));
    let params = BootParams {
        args: format!("{kind} {n}"),
        ..Default::default()
    };
    let mut m = vmm::setup::build_machine(
        image,
        64 << 20,
        &params,
        Box::new(LiveInputs::new(stop.clone(), 0)),
        Box::new(Capture(out.clone())),
        stop,
    )?;
    match m.run()? {
        Outcome::Exited { status: 0 } => {}
        other => anyhow::bail!("exitbench {kind}: {other:?}"),
    }
    if kind == "magic" {
        regs_cost(&m, n);
    }
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let ns = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ns="))
        .ok_or_else(|| anyhow::anyhow!("no result in {text:?}"))?;
    Ok(ns.parse()?)
}

/// Prints what reading the registers costs at a boundary (a fingerprint does it at every
/// one): by `KVM_GET_REGS`, against the copy KVM leaves in the run page at each exit.
fn regs_cost(m: &vmm::machine::Machine, n: u64) {
    let vcpu = &m.vm().vcpu;
    let time = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        (0..n).for_each(|_| f());
        t.elapsed().as_nanos() as f64 / n as f64 / 1e3
    };
    let ioctl = time(&|| {
        std::hint::black_box(vcpu.regs_from_kernel().expect("KVM_GET_REGS"));
    });
    let copy = time(&|| {
        std::hint::black_box(vcpu.regs().expect("registers"));
    });
    println!(
        "registers at a boundary: KVM_GET_REGS {ioctl:.2} us, the exit's copy {copy:.3} us (sync regs {}), {n} reads each",
        if vcpu.syncs_regs() { "on" } else { "off: both are the ioctl" }
    );
}

fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::var("EXITS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    println!("exit cost under KVM, {n} exits per kind (guest-side clock)");
    let base = measure("magic", n)?;
    let base_rate = n as f64 / (base as f64 / 1e9);
    println!(
        "{:<8} {:>10.0} exits/s {:>8.2} us/exit  ratio 1.00 (baseline: MAGIC register read)",
        "magic",
        base_rate,
        base as f64 / n as f64 / 1e3
    );
    for kind in ["poll", "clock"] {
        let ns = measure(kind, n)?;
        let rate = n as f64 / (ns as f64 / 1e9);
        println!(
            "{:<8} {:>10.0} exits/s {:>8.2} us/exit  ratio {:.2} vs baseline",
            kind,
            rate,
            ns as f64 / n as f64 / 1e3,
            ns as f64 / base as f64
        );
    }
    Ok(())
}
