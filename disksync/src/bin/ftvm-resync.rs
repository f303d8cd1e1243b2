//! `ftvm-resync`: bring a diverged disk back in line with blake3 block hashes (DESIGN §6).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use disksync::hash::{self, hex, Geometry};
use disksync::local::{disk_tree, local_resync, Leaves, LocalOptions};
use disksync::lock::DiskLock;
use disksync::net::{self, ServeOptions};
use disksync::session::{FastPath, PullOptions, SourceDisk, TargetDisk};
use disksync::stats::{Phase, Stats, Summary};
use disksync::{Error, DEFAULT_BLOCK_SIZE};

/// Exit status of `verify` when the disks differ.
const EXIT_DIFFER: u8 = 4;
/// Exit status of `serve` when an injected fault fired (tests).
const EXIT_FAULT: u8 = 3;

#[derive(Parser)]
#[command(
    name = "ftvm-resync",
    version,
    about = "Bring a diverged disk image back in line with blake3 block hashes over QUIC + mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Tls {
    /// Certificate directory (ca.pem, NODE.pem, NODE.key), as made by
    /// `ftvm-witness certs init` (node certificates of the pair).
    #[arg(long)]
    tls: PathBuf,
    /// This side's identity name in the certificate directory.
    #[arg(long)]
    node: String,
}

#[derive(Args, Clone)]
struct Remote {
    /// Address of the serving side: ADDR:PORT, or NAME@ADDR:PORT to give its identity too.
    #[arg(long)]
    from: String,
    /// Identity name the server's certificate must carry (default: NAME of --from NAME@ADDR).
    #[arg(long)]
    peer: Option<String>,
    /// Local disk image.
    #[arg(long)]
    disk: PathBuf,
    #[command(flatten)]
    tls: Tls,
    /// Block size in bytes (a power of two; both sides use the puller's).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Fast path: compare only blocks written since the generation of the leaf cache and
    /// written-block record next to each disk (PATH.ftvm-leaves, PATH.ftvm-written). The
    /// source must have the same generation; otherwise a full compare runs.
    #[arg(long)]
    fast: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a disk (read-only) to pull/verify clients: the pair's other node only.
    Serve {
        /// The disk image to serve (opened read-only, with a shared lock).
        #[arg(long)]
        disk: PathBuf,
        /// Address to listen on, e.g. 127.0.0.1:7400.
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        tls: Tls,
        /// Only these client identities may connect (repeatable; default: every other node
        /// of this node's pair; a witness or another pair's node is always refused).
        #[arg(long)]
        allow: Vec<String>,
        /// Exit after this many sessions.
        #[arg(long)]
        sessions: Option<u64>,
        /// Test hook: KIND=N with KIND close|garbage|truncate, fires after N blocks sent.
        #[cfg(feature = "test-hooks")]
        #[arg(long, hide = true)]
        fault: Option<String>,
    },
    /// Make the local disk equal to the source's (creates it if missing).
    Pull {
        #[command(flatten)]
        remote: Remote,
        /// Change the local disk's size to the source's if they differ.
        #[arg(long)]
        resize: bool,
        /// Ignore (and discard) the state of an interrupted pull.
        #[arg(long)]
        no_resume: bool,
    },
    /// List the block ranges that differ from the source; change nothing. Exit 0 if equal,
    /// 4 if they differ.
    Verify {
        #[command(flatten)]
        remote: Remote,
    },
    /// Make local file DST equal to SRC (no network; DST is created if missing).
    Local {
        /// The source image (read-only).
        src: PathBuf,
        /// The image to bring in line with SRC (created if missing).
        dst: PathBuf,
        /// Block size in bytes (a power of two).
        #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// Change DST's size to SRC's if they differ.
        #[arg(long)]
        resize: bool,
    },
    /// Print a disk's root hash and block count.
    Hash {
        /// The disk image.
        path: PathBuf,
        /// Block size in bytes (a power of two).
        #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// Also start generation GEN for the fast path: write the leaf cache
        /// (PATH.ftvm-leaves) and an empty written-block record (PATH.ftvm-written).
        #[arg(long, value_name = "GEN")]
        baseline: Option<u64>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvm-resync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Hash {
            path,
            block_size,
            baseline,
        } => {
            let disk = DiskLock::shared(&path)?;
            let geo = hash::file_geometry(disk.file(), &path, block_size)?;
            let stats = Arc::new(Stats::new());
            let progress = Progress::start(stats.clone(), "hash");
            let tree = disk_tree(
                disk.file(),
                &path,
                geo,
                Leaves::Full,
                &stats,
                &AtomicBool::new(false),
            );
            progress.stop();
            let tree = tree?;
            println!("root {}", hex(&tree.root(geo)));
            println!("blocks {} of {} bytes", geo.blocks(), geo.block_size);
            println!("size {}", geo.disk_size);
            if let Some(gen) = baseline {
                FastPath::baseline_from_leaves(&path, gen, geo, tree.leaves().to_vec())?;
                println!("baseline generation {gen}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Local {
            src,
            dst,
            block_size,
            resize,
        } => {
            let s = DiskLock::shared(&src)?;
            let created = !dst.exists();
            if created {
                create_disk(&dst)?;
            }
            let d = DiskLock::exclusive(&dst)?;
            let resize = resize || created;
            let stats = Arc::new(Stats::new());
            let progress = Progress::start(stats.clone(), "local");
            let r = local_resync(
                &s,
                &d,
                &LocalOptions {
                    block_size,
                    resize,
                    verify_only: false,
                },
                &stats,
            );
            progress.stop();
            print_summary(&r?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            disk,
            listen,
            tls,
            allow,
            sessions,
            #[cfg(feature = "test-hooks")]
            fault,
        } => {
            #[cfg(feature = "test-hooks")]
            let fault = fault.as_deref().map(parse_fault).transpose()?;
            #[cfg(not(feature = "test-hooks"))]
            let fault = None;
            let lock = DiskLock::shared(&disk)?;
            let fast = match FastPath::load_sidecars(&disk) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("fast path unavailable: {e}");
                    None
                }
            };
            let src = SourceDisk::new(lock.file().try_clone().context("dup disk fd")?, &disk, fast)
                .with_fault(fault);
            let rt = runtime()?;
            rt.block_on(async {
                let local = net::node_identity(&tls.tls, &tls.node)?;
                let ep = net::server_endpoint(listen, &tls.tls, &tls.node)?;
                eprintln!(
                    "ftvm-resync: serving {} on {} as {}",
                    disk.display(),
                    ep.local_addr()?,
                    tls.node
                );
                let stats = Arc::new(Stats::new());
                let opts = ServeOptions {
                    allow,
                    max_sessions: sessions,
                };
                tokio::select! {
                    r = net::serve(&ep, &local, Arc::new(src), &opts, stats) => match r {
                        Ok(()) => Ok(ExitCode::SUCCESS),
                        Err(e @ disksync::Error::Injected(_)) => {
                            eprintln!("ftvm-resync: {e}");
                            Ok(ExitCode::from(EXIT_FAULT))
                        }
                        Err(e) => Err(e.into()),
                    },
                    _ = tokio::signal::ctrl_c() => {
                        ep.close(0u32.into(), b"shutdown");
                        Ok(ExitCode::SUCCESS)
                    }
                }
            })
        }
        Cmd::Pull {
            remote,
            resize,
            no_resume,
        } => {
            let created = !remote.disk.exists();
            if created {
                create_disk(&remote.disk)?;
            }
            let lock = DiskLock::exclusive(&remote.disk)?;
            let state = disksync::state_path(&remote.disk);
            if no_resume {
                let _ = std::fs::remove_file(&state);
            }
            let opts = PullOptions {
                block_size: remote.block_size,
                resize: resize || created,
                verify_only: false,
                fast: fast_path(&remote)?,
                state_path: Some(state),
                interrupt: None,
                stop_after_blocks: test_hook("FTVM_RESYNC_STOP_AFTER_BLOCKS"),
                crash_after_blocks: test_hook("FTVM_RESYNC_CRASH_AFTER_BLOCKS"),
            };
            let summary = remote_session(&remote, &lock, &opts, "pull")?;
            print_summary(&summary);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { remote } => {
            let lock = DiskLock::shared(&remote.disk)?;
            let opts = PullOptions {
                block_size: remote.block_size,
                resize: false,
                verify_only: true,
                fast: fast_path(&remote)?,
                state_path: None,
                interrupt: None,
                stop_after_blocks: None,
                crash_after_blocks: None,
            };
            let summary = match remote_session(&remote, &lock, &opts, "verify") {
                Ok(s) => s,
                Err(e) => match e.downcast_ref::<Error>() {
                    Some(Error::SizeMismatch { .. }) => {
                        println!("differ: {e}");
                        return Ok(ExitCode::from(EXIT_DIFFER));
                    }
                    _ => return Err(e),
                },
            };
            let size = lock.file().metadata()?.len();
            let geo = Geometry::new(size, remote.block_size)?;
            for &(s, n) in &summary.differing_runs {
                println!(
                    "differ: blocks {}..{} (bytes {}..{})",
                    s,
                    s + n,
                    s * geo.block_size as u64,
                    ((s + n) * geo.block_size as u64).min(size)
                );
            }
            print_summary(&summary);
            if summary.blocks_differing > 0 {
                println!(
                    "disks differ in {} of {} blocks",
                    summary.blocks_differing, summary.blocks_compared
                );
                Ok(ExitCode::from(EXIT_DIFFER))
            } else {
                println!("disks are equal");
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Creates an empty disk image, saying so when its directory is what is missing.
fn create_disk(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "cannot create {}: the directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok(())
}

fn fast_path(remote: &Remote) -> anyhow::Result<Option<FastPath>> {
    if !remote.fast {
        return Ok(None);
    }
    let f = FastPath::load_sidecars(&remote.disk)?;
    if f.is_none() {
        bail!(
            "--fast needs {} and {} (see `ftvm-resync hash --baseline`)",
            disksync::cache_path(&remote.disk).display(),
            disksync::record_path(&remote.disk).display()
        );
    }
    Ok(f)
}

/// Test hooks are read from the environment so that they stay out of `--help`, and only in
/// a build with the `test-hooks` feature (which only the tests enable).
#[cfg(feature = "test-hooks")]
fn test_hook(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Without the `test-hooks` feature the environment cannot inject faults.
#[cfg(not(feature = "test-hooks"))]
fn test_hook(_name: &str) -> Option<u64> {
    None
}

#[cfg(feature = "test-hooks")]
fn parse_fault(s: &str) -> anyhow::Result<disksync::session::Fault> {
    use disksync::session::Fault;
    let (kind, n) = s.split_once('=').context("--fault KIND=N")?;
    let n: u64 = n.parse().context("--fault KIND=N")?;
    Ok(match kind {
        "close" => Fault::CloseAfterBlocks(n),
        "garbage" => Fault::GarbageAfterBlocks(n),
        "truncate" => Fault::TruncateAfterBlocks(n),
        _ => bail!("unknown fault {kind}"),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn remote_session(
    remote: &Remote,
    lock: &DiskLock,
    opts: &PullOptions,
    what: &'static str,
) -> anyhow::Result<Summary> {
    let (name, addr) = match remote.from.split_once('@') {
        Some((n, a)) => (Some(n.to_string()), a),
        None => (None, remote.from.as_str()),
    };
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--from {}: expected [NAME@]IP:PORT", remote.from))?;
    let Some(peer) = remote.peer.clone().or(name) else {
        bail!("give the server's identity name: --peer NAME or --from NAME@{addr}");
    };
    let mut opts = opts.clone();
    let interrupt = Arc::new(AtomicBool::new(false));
    opts.interrupt = Some(interrupt.clone());
    let target = TargetDisk {
        file: lock.file().try_clone()?,
        path: remote.disk.clone(),
    };
    let stats = Arc::new(Stats::new());
    let progress = Progress::start(stats.clone(), what);
    let rt = runtime()?;
    let r = rt.block_on(async {
        let pull = net::pull(
            &remote.tls.tls,
            &remote.tls.node,
            addr,
            &peer,
            &target,
            &opts,
            stats,
        );
        tokio::pin!(pull);
        tokio::select! {
            r = &mut pull => r,
            _ = tokio::signal::ctrl_c() => {
                // Stop at the next block, keeping what was written for a resume.
                eprintln!("ftvm-resync: interrupted; saving progress (rerun to resume; Ctrl-C again to quit now)");
                interrupt.store(true, Ordering::Relaxed);
                tokio::select! {
                    r = &mut pull => r,
                    _ = tokio::signal::ctrl_c() => Err(Error::Cancelled),
                }
            }
        }
    });
    progress.stop();
    Ok(r?)
}

fn print_summary(s: &Summary) {
    println!(
        "summary: {} blocks compared, {} differing, {} sent ({} zero), {} bytes on the wire, {:.3} s{}{}",
        s.blocks_compared,
        s.blocks_differing,
        s.blocks_sent,
        s.zero_blocks,
        s.wire_bytes,
        s.elapsed.as_secs_f64(),
        if s.resumed { ", resumed" } else { "" },
        if s.fast_path { ", fast path" } else { "" },
    );
    println!("ftvm-resync summary: {}", s.line());
}

/// Progress display: an indicatif bar on a terminal, plain periodic lines otherwise.
struct Progress {
    stop: std::sync::mpsc::Sender<()>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(stats: Arc<Stats>, what: &'static str) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let tty = std::io::stderr().is_terminal();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let bar = tty.then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{elapsed_precise}] {bar:30} {msg}",
                    )
                    .unwrap(),
                );
                b.set_prefix(what);
                b
            });
            let mut last_line = Instant::now();
            // Wakes every 100 ms, and at once when stopped.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(100))
            {
                let g = Stats::get;
                let (hashed, to_hash) = (g(&stats.bytes_hashed), g(&stats.bytes_to_hash));
                let (sent, to_send) = (g(&stats.blocks_sent), g(&stats.blocks_to_send));
                let secs = t0.elapsed().as_secs_f64().max(1e-3);
                let (pos, len) = match stats.phase() {
                    Phase::Transferring => (sent, to_send),
                    _ => (hashed, to_hash),
                };
                let msg = format!(
                    "{:?}: hashed {} / {} MiB, blocks sent {} / {}, {:.0} MiB/s hashed, {:.1} MiB/s data",
                    stats.phase(),
                    hashed >> 20,
                    to_hash >> 20,
                    sent,
                    to_send,
                    hashed as f64 / secs / 1048576.0,
                    g(&stats.data_bytes) as f64 / secs / 1048576.0,
                );
                match &bar {
                    Some(b) => {
                        b.set_length(len.max(1));
                        b.set_position(pos);
                        b.set_message(msg);
                    }
                    None if last_line.elapsed() >= Duration::from_secs(2) => {
                        eprintln!("ftvm-resync {what}: {msg}");
                        last_line = Instant::now();
                    }
                    None => {}
                }
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        });
        Progress {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
