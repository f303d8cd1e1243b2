//! `ftvm-node`: runs an ftvm virtual machine.
//!
//! Exit status of `run`: the guest's own exit status when it is 0–63; 64 when the guest exited
//! with a larger status (printed); 65 for a bad guest image, memory size or configuration;
//! 70 when the guest crashed (a report with the reason, RIP and registers goes to stderr); 71
//! for a VMM/KVM failure; 128+N when signal N stopped the node; 2 for a bad command line.
//! `replay` adds 69 for a divergence and 66 for a log that is malformed or belongs to another
//! guest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use vmm::epoch::InputError;
use vmm::setup::VmSetup;
use vmm::solo::{HostResources, RecordOptions};
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
    /// The guest's console goes to stdout. The VM's options can also come from a TOML config
    /// file (--config) with the same names (solo, guest, mem, guest_args, disk, disk_size, tap,
    /// mac, ip, gateway, rng); options on the command line win. --record and --digest-every
    /// are command-line only. The exit status is the guest's status
    /// (0-63; 64 if larger), 65 for a bad image, size or configuration, 70 if the guest
    /// crashed, 71 for a VMM failure, 128+N if signal N stopped the node.
    Run(RunArgs),
    /// Replay a recorded log against a guest and check that it runs identically.
    ///
    /// The console goes to stdout as in the recorded run, and a one-line summary to stderr.
    /// Transmitted frames are dropped. The summary's `ending=` says how the recorded run ended
    /// (exit:STATUS, crash, or signal:N). The exit status is the guest's, as for `run` (0 when
    /// the recording was stopped by a signal and the replay stopped at the same point); 69 if the
    /// replay diverged (the report names the first boundary that differs and what differs);
    /// 66 if the log is malformed, truncated, or was recorded from a different guest image,
    /// memory size or machine.
    Replay {
        /// The guest the log was recorded from: a bundled name or a path.
        #[arg(long)]
        guest: String,
        /// The log file.
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
        /// Guest memory size; defaults to the recorded one (a different size is refused).
        #[arg(long)]
        mem: Option<String>,
        /// A copy of the disk image as it was when the recording started (needed when the
        /// recorded VM had a disk; it is written to, like the original was).
        #[arg(long, value_name = "IMG")]
        disk: Option<PathBuf>,
    },
    /// List the bundled guests, with what each is for (most are test guests).
    Guests,
    /// Show a running pair member's state: role, generation, boundary, peer, lag, log rate,
    /// held frames, witness reachability and the last failover.
    ///
    /// Reads the node's control socket (`control` in node.toml). Exit status 0, or 1 when the
    /// node cannot be reached.
    Status {
        /// The node's config file (for the control socket's path).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the JSON document (keys include role, generation, boundary, peer_connected,
        /// lag_ms, held_frames).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    /// Run unreplicated (no backup, no witness). Without --solo, `run --config node.toml` runs
    /// this node as a member of an FT pair (see docs/operations.md).
    #[arg(long)]
    #[serde(default)]
    solo: bool,
    /// Pair member only: claim the pair from the witness even if this node is not its last
    /// holder, once no peer running the VM has answered for failure_timeout + margin. For an
    /// operator who knows the other node is gone for good (DESIGN §5, rule (c)).
    #[arg(long)]
    #[serde(skip)]
    claim: bool,
    /// Read options from this TOML file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// A bundled guest by name (see `ftvm-node guests`) or a path to a guest ELF.
    #[arg(long)]
    guest: Option<String>,
    /// Guest memory size (bytes, or with a K/M/G suffix; a multiple of 2 MiB). Default 64M.
    #[arg(long)]
    mem: Option<String>,
    /// An argument string handed to the guest program.
    #[arg(long)]
    guest_args: Option<String>,
    /// The raw disk image for the VM's virtio-blk disk (created if missing).
    #[arg(long, value_name = "IMG")]
    disk: Option<PathBuf>,
    /// Size of the disk image when it is created (default 64M).
    #[arg(long, value_name = "SIZE")]
    disk_size: Option<String>,
    /// The TAP device for the VM's virtio-net NIC (created if missing).
    #[arg(long)]
    tap: Option<String>,
    /// The NIC's MAC address.
    #[arg(long)]
    mac: Option<String>,
    /// The guest's IPv4 address and prefix, e.g. 10.0.0.2/24.
    #[arg(long, value_name = "ADDR/PREFIX")]
    ip: Option<String>,
    /// The guest's default gateway.
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// Give the VM a virtio-rng device.
    #[arg(long)]
    #[serde(default)]
    rng: bool,
    /// Record every input the guest sees to this log file (replay it with `replay`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    record: Option<PathBuf>,
    /// With --record: log a blake3 digest of guest memory every N boundaries (0: only at the
    /// end). Default 10000.
    #[arg(long, value_name = "N", requires = "record")]
    #[serde(skip)]
    digest_every: Option<u64>,
}

impl RunArgs {
    /// Fills what the command line left out from the config file.
    fn merge(mut self, file: RunArgs) -> RunArgs {
        self.solo |= file.solo;
        self.guest = self.guest.or(file.guest);
        self.mem = self.mem.or(file.mem);
        self.guest_args = self.guest_args.or(file.guest_args);
        self.disk = self.disk.or(file.disk);
        self.disk_size = self.disk_size.or(file.disk_size);
        self.tap = self.tap.or(file.tap);
        self.mac = self.mac.or(file.mac);
        self.ip = self.ip.or(file.ip);
        self.gateway = self.gateway.or(file.gateway);
        self.rng |= file.rng;
        self
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,virtio_queue=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Guests => {
            for n in vmm::guests::names() {
                println!("{n:<10} {}", vmm::guests::purpose(n));
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) if !args.solo && !config_says_solo(args.config.as_deref()) => {
            run_pair(args)
        }
        Command::Run(args) => run(args),
        Command::Status { config, json } => status(&config, json),
        Command::Replay {
            guest,
            log,
            mem,
            disk,
        } => replay(&guest, &log, mem.as_deref(), disk),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ftvm-node: {msg}");
    ExitCode::from(code)
}

fn summary(what: &str, s: &vmm::solo::RunSummary) {
    use vmm::machine::Outcome;
    let ending = match &s.outcome {
        Outcome::Exited { status } => format!("exit:{status}"),
        Outcome::Crashed(_) => "crash".to_string(),
        Outcome::Stopped { signal } => format!("signal:{signal}"),
    };
    eprintln!(
        "{what}: boundaries={} records={} events={} digests={} log_bytes={} elapsed={:.3}s ending={ending}",
        s.boundaries,
        s.log.boundary_records,
        s.log.events,
        s.log.digests,
        s.log.bytes,
        s.elapsed.as_secs_f64()
    );
}

fn plan(a: RunArgs) -> Result<vmm::plan::Plan, String> {
    let a = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("config {}: {e}", path.display()))?;
            let file: RunArgs =
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
            a.merge(file)
        }
        None => a,
    };
    vmm::plan::VmOptions {
        guest: a.guest,
        mem: a.mem,
        guest_args: a.guest_args,
        disk: a.disk,
        disk_size: a.disk_size,
        tap: a.tap,
        mac: a.mac,
        ip: a.ip,
        gateway: a.gateway,
        rng: a.rng,
    }
    .plan()
}

/// Whether a config file asks for a solo run (`solo = true`); a pair member's file does not.
fn config_says_solo(path: Option<&std::path::Path>) -> bool {
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .and_then(|t| t.get("solo").and_then(|v| v.as_bool()))
        .unwrap_or(false)
}

fn run_pair(a: RunArgs) -> ExitCode {
    let Some(path) = a.config.clone() else {
        return fail(
            65,
            "give --solo for an unreplicated VM, or --config node.toml for a pair member",
        );
    };
    if a.guest.is_some()
        || a.mem.is_some()
        || a.disk.is_some()
        || a.tap.is_some()
        || a.record.is_some()
    {
        return fail(
            65,
            "a pair member takes its VM from the config file only (both members must agree): remove the VM options from the command line",
        );
    }
    let cfg = match vmm::node::config::NodeConfig::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(65, e),
    };
    use vmm::node::run::NodeExit;
    match vmm::node::run::run(
        cfg,
        vmm::node::run::RunOptions {
            operator_claim: a.claim,
        },
    ) {
        NodeExit::Guest(o) => exit_for(o),
        NodeExit::Denied(why) => fail(66, why),
        NodeExit::Diverged(why) => fail(67, why),
        NodeExit::Refused(why) => fail(68, why),
        NodeExit::Config(why) => fail(65, why),
        NodeExit::Failed(why) | NodeExit::JoinFailed(why) => fail(71, why),
        NodeExit::Stopped(sig) => {
            eprintln!("ftvm-node: stopped by signal {sig}");
            ExitCode::from(128u8.saturating_add(sig as u8))
        }
    }
}

fn status(config: &std::path::Path, json: bool) -> ExitCode {
    let cfg = match vmm::node::config::NodeConfig::load(config) {
        Ok(c) => c,
        Err(e) => return fail(65, e),
    };
    match vmm::node::status::query(&cfg.control) {
        Ok(text) if json => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                print!("{}", render(&v));
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, format!("bad answer from the node: {e}: {text}")),
        },
        Err(e) => fail(1, e),
    }
}

fn render(v: &serde_json::Value) -> String {
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let mut s = format!(
        "{}/{}: {} in generation {}, boundary {}\n",
        g("pair").as_str().unwrap_or("?"),
        g("node").as_str().unwrap_or("?"),
        g("role").as_str().unwrap_or("?"),
        g("generation"),
        g("boundary")
    );
    for k in [
        "peer",
        "peer_role",
        "peer_connected",
        "lag_ms",
        "lag_boundaries",
        "acked",
        "replayed",
        "log_bytes",
        "log_bytes_per_s",
        "held_frames",
        "released_frames",
        "dropped_frames",
        "digests_checked",
        "witness_reachable",
        "witness_error",
        "failovers",
        "last_failover",
        "joins",
        "join",
        "halt_reason",
    ] {
        let val = g(k);
        if !val.is_null() {
            s += &format!("  {k}: {val}\n");
        }
    }
    s
}

fn run(a: RunArgs) -> ExitCode {
    let record = a.record.clone().map(|path| RecordOptions {
        path,
        digest_every: a
            .digest_every
            .unwrap_or(vmm::node::config::DEFAULT_DIGEST_EVERY),
    });
    let mut p = match plan(a) {
        Ok(p) => p,
        Err(e) => return fail(65, e),
    };
    let stop = match vmm::signals::install() {
        Ok(s) => s,
        Err(e) => return fail(71, format!("cannot install signal handlers: {e}")),
    };
    let mut host = HostResources::default();
    if let Some(d) = &p.disk {
        match vmm::devices::disk::open_disk(d) {
            Ok((f, sectors)) => {
                p.devices.disk_sectors = Some(sectors);
                host.disk = Some(f);
            }
            Err(e) => return fail(65, e),
        }
    }
    if let Some(t) = &p.tap {
        match vmm::devices::tap::open_tap(t) {
            Ok(tap) => host.tap = Some(tap),
            Err(e) => return fail(65, e),
        }
    }
    let setup = VmSetup {
        image: &p.image.bytes,
        mem_size: p.mem_size,
        args: p.args.clone(),
        devices: p.devices.clone(),
    };
    match vmm::solo::run_live(
        &setup,
        host,
        stop,
        record.as_ref(),
        Box::new(vmm::console::StdoutConsole::default()),
    ) {
        Ok(s) => {
            if record.is_some() {
                summary("record", &s);
            }
            if let vmm::machine::Outcome::Stopped { .. } = s.outcome {
                eprintln!("ftvm-node: the VM passed {} boundaries", s.boundaries);
            }
            exit_for(s.outcome)
        }
        Err(
            e @ (VmmError::BadImage(_) | VmmError::ImageTooLarge(_) | VmmError::MemSize { .. }),
        ) => fail(65, format!("{}: {e}", p.image.label)),
        Err(e @ (VmmError::Config(_) | VmmError::Disk { .. } | VmmError::Tap { .. })) => {
            fail(65, e)
        }
        Err(e) => fail(71, e),
    }
}

fn replay(
    guest: &str,
    log: &std::path::Path,
    mem: Option<&str>,
    disk: Option<PathBuf>,
) -> ExitCode {
    let mem_size = match mem.map(vmm::plan::parse_size) {
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
    let console = Box::new(vmm::console::StdoutConsole::default());
    match vmm::replay::run::replay(
        &image.bytes,
        &bytes,
        mem_size,
        disk.as_deref(),
        stop,
        console,
    ) {
        Ok(s) => {
            summary("replay: identical", &s);
            match s.outcome {
                // The replay reached the point where a signal stopped the recording: a match.
                vmm::machine::Outcome::Stopped { signal } => {
                    eprintln!("replay: the recorded run was stopped here by signal {signal}");
                    ExitCode::SUCCESS
                }
                outcome => exit_for(outcome),
            }
        }
        Err(VmmError::Input(InputError::Divergence { boundary, what })) => fail(
            69,
            format!("replay diverged at boundary {boundary}: {what}"),
        ),
        Err(VmmError::Input(InputError::Log(e))) => fail(66, format!("{}: {e}", log.display())),
        Err(e @ (VmmError::Disk { .. } | VmmError::Config(_))) => fail(66, e),
        Err(e) => fail(71, e),
    }
}

fn exit_for(outcome: vmm::machine::Outcome) -> ExitCode {
    use vmm::machine::Outcome;
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
