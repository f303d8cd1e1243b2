//! `ftvm-node`: runs an ftvm virtual machine.
//!
//! Exit status of `run`: the guest's own exit status when it is 0–63; 64 when the guest exited
//! with a larger status (printed); 65 for a bad guest image or memory size; 70 when the guest
//! crashed (a report with the reason, RIP and registers goes to stderr); 71 for a VMM/KVM
//! failure; 128+N when signal N stopped the node; 2 for a bad command line. `replay` adds 69
//! for a divergence and 66 for a log that is malformed or belongs to another guest.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::kvm::boot::BootParams;
use vmm::machine::Outcome;
use vmm::epoch::InputError;
use vmm::VmmError;

/// Fault-tolerant virtual machines on KVM: the node.
#[derive(Parser)]
#[command(name = "ftvm-node", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM in the foreground until the guest exits.
    ///
    /// The guest's console goes to stdout. The exit status is the guest's status (0-63; 64 if
    /// larger), 65 for a bad image or memory size, 70 if the guest crashed, 71 for a VMM
    /// failure, 128+N if signal N stopped the node.
    Run {
        /// Run unreplicated (no backup, no witness).
        #[arg(long, required = true)]
        solo: bool,
        /// A bundled guest by name (see `ftvm-node guests`) or a path to a guest ELF.
        #[arg(long)]
        guest: String,
        /// Guest memory size (bytes, or with a K/M/G suffix; a multiple of 2 MiB).
        #[arg(long, default_value = "64M")]
        mem: String,
        /// An argument string handed to the guest program.
        #[arg(long, default_value = "")]
        guest_args: String,
        /// Record every input the guest sees to this log file (replay it with `replay`).
        #[arg(long, value_name = "FILE")]
        record: Option<std::path::PathBuf>,
        /// With --record: log a blake3 digest of guest memory every N boundaries (0: only at
        /// the end).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        digest_every: u64,
    },
    /// Replay a recorded log against a guest and check that it runs identically.
    ///
    /// The console goes to stdout as in the recorded run, and a one-line summary to stderr.
    /// The exit status is the guest's, as for `run`; 69 if the replay diverged (the report
    /// names the first boundary that differs and what differs); 66 if the log is malformed,
    /// truncated, or was recorded from a different guest image or memory size.
    Replay {
        /// The guest the log was recorded from: a bundled name or a path.
        #[arg(long)]
        guest: String,
        /// The log file.
        #[arg(long, value_name = "FILE")]
        log: std::path::PathBuf,
        /// Guest memory size; defaults to the recorded one (a different size is refused).
        #[arg(long)]
        mem: Option<String>,
    },
    /// List the bundled guests.
    Guests,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Guests => {
            for n in vmm::guests::names() {
                println!("{n}");
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            solo: _,
            guest,
            mem,
            guest_args,
            record,
            digest_every,
        } => {
            let rec = record.map(|path| vmm::solo::RecordOptions { path, digest_every });
            run(&guest, &mem, guest_args, rec)
        }
        Command::Replay { guest, log, mem } => replay(&guest, &log, mem.as_deref()),
    }
}

fn summary(what: &str, s: &vmm::solo::RunSummary) {
    eprintln!(
        "{what}: boundaries={} records={} events={} digests={} log_bytes={} elapsed={:.3}s",
        s.boundaries,
        s.log.boundary_records,
        s.log.events,
        s.log.digests,
        s.log.bytes,
        s.elapsed.as_secs_f64()
    );
}

fn replay(guest: &str, log: &std::path::Path, mem: Option<&str>) -> ExitCode {
    let mem_size = match mem.map(vmm::solo::parse_size) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return fail(65, format!("--mem: {e}")),
    };
    let image = match vmm::guests::resolve(guest) {
        Ok(i) => i,
        Err(e) => return fail(65, e),
    };
    let bytes = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) => return fail(66, format!("cannot read log {}: {e}", log.display())),
    };
    let stop = match vmm::signals::install() {
        Ok(s) => s,
        Err(e) => return fail(71, format!("cannot install signal handlers: {e}")),
    };
    match vmm::solo::replay(&image.bytes, &bytes, mem_size, None, stop, Box::new(vmm::solo::StdoutConsole)) {
        Ok(s) => {
            summary("replay: identical", &s);
            exit_for(s.outcome)
        }
        Err(VmmError::Input(InputError::Divergence { boundary, what })) => fail(
            69,
            format!("replay diverged at boundary {boundary}: {what}"),
        ),
        Err(VmmError::Input(InputError::Log(e))) => fail(66, format!("{}: {e}", log.display())),
        Err(e) => fail(71, e),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ftvm-node: {msg}");
    ExitCode::from(code)
}

fn run(guest: &str, mem: &str, args: String, record: Option<vmm::solo::RecordOptions>) -> ExitCode {
    let mem_size = match vmm::solo::parse_size(mem) {
        Ok(s) => s,
        Err(e) => return fail(65, format!("--mem: {e}")),
    };
    if let Err(e) = vmm::kvm::boot::check_mem_size(mem_size) {
        return fail(65, format!("--mem: {e}"));
    }
    let image = match vmm::guests::resolve(guest) {
        Ok(i) => i,
        Err(e) => return fail(65, e),
    };
    let stop = match vmm::signals::install() {
        Ok(s) => s,
        Err(e) => return fail(71, format!("cannot install signal handlers: {e}")),
    };
    let params = BootParams {
        args,
        ..Default::default()
    };
    let result = match &record {
        None => vmm::solo::run_solo(&image.bytes, mem_size, &params, stop),
        Some(opts) => vmm::solo::run_recorded(
            &image.bytes,
            mem_size,
            &params,
            stop,
            opts,
            Box::new(vmm::solo::StdoutConsole),
        )
        .map(|s| {
            summary("record", &s);
            s.outcome
        }),
    };
    match result {
        Ok(outcome) => exit_for(outcome),
        Err(e @ (VmmError::BadImage(_) | VmmError::ImageTooLarge(_) | VmmError::MemSize { .. })) => {
            fail(65, format!("{}: {e}", image.label))
        }
        Err(e) => fail(71, e),
    }
}

fn exit_for(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Exited { status } if status < 64 => ExitCode::from(status as u8),
        Outcome::Exited { status } => fail(64, format!("guest exited with status {status}")),
        Outcome::Crashed(report) => fail(70, report),
        Outcome::Stopped { signal } => {
            eprintln!("ftvm-node: stopped by signal {signal}");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
    }
}
