//! `ftvm-node`: runs an ftvm virtual machine.
//!
//! Exit status of `run`: the guest's own exit status when it is 0–63; 64 when the guest exited
//! with a larger status (printed); 65 for a bad guest image or memory size; 70 when the guest
//! crashed (a report with the reason, RIP and registers goes to stderr); 71 for a VMM/KVM
//! failure; 128+N when signal N stopped the node; 2 for a bad command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::kvm::boot::BootParams;
use vmm::machine::Outcome;
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
        } => run(&guest, &mem, guest_args),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ftvm-node: {msg}");
    ExitCode::from(code)
}

fn run(guest: &str, mem: &str, args: String) -> ExitCode {
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
    match vmm::solo::run_solo(&image.bytes, mem_size, &params, stop) {
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
