//! Running a pair member: cold start (probe the peer, claim or join), then the VM as primary
//! (recording to the channel, output held by the Output Rule) or as backup (replaying the
//! stream), and failover when the peer is lost (DESIGN §5).
//!
//! Threads: the vCPU thread runs the [`Machine`](crate::machine::Machine) and never blocks on
//! the network; a tokio runtime (two workers) runs the channel tasks, the listener, the
//! witness client, the control socket and the metrics endpoint; on a backup a small thread
//! drains the TAP until the node goes live.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_tls::Identity;
use ftvm_witness::{ClaimOutcome, ClientOptions, WitnessClient};
use tokio::sync::mpsc;

use super::config::NodeConfig;
use super::follow::{CaughtUp, Decision, Follower};
use super::generation::GenerationFile;
use super::join::{JoinDisk, JoinPart, JoinRequest, JoinSource, VcpuJob};
use super::rules::{counts_as_running, decide_start, StartDecision, StartView};
use super::status::{FailoverReport, Shared};
use crate::channel::backup::{receive_task, BackupEnd, ChannelFeed, ReceiveConfig};
use crate::channel::connect::{self, Link};
use crate::channel::gate::GateMode;
use crate::channel::msg::{self, Hello, Msg, MsgReader, PairConfig, Role};
use crate::channel::primary::{
    output_task, ChannelLog, Handoff, HeldFrames, OutputCmd, OutputConfig, OutputEvent, Throttle,
    ToChannel,
};
use crate::channel::{now_ns, ChannelStats};
use crate::console::StdoutConsole;
use crate::devices::tap::{open_tap, Tap};
use crate::devices::virtio::net::FrameSink;
use crate::epoch::{Boundary, ClockValue, InputError, Inputs};
use crate::join::blocks::BlockWrites;
use crate::live::LiveInputs;
use crate::machine::Outcome;
use crate::machine::{Machine, PauseHandle};
use crate::plan::Plan;
use crate::replay::recorder::RecordSwitch;
use crate::replay::recorder::Recorder;
use crate::replay::replayer::Replayer;
use crate::setup::VmSetup;
use crate::signals::StopSignal;
use crate::VmmError;

/// How a pair member ended; `ftvm-node` maps it to its exit status (docs/operations.md).
#[derive(Debug)]
pub enum NodeExit {
    /// The VM ended (guest exit, crash, or a signal).
    Guest(Outcome),
    /// The witness gave the pair to the other node (exit 66).
    Denied(String),
    /// Divergence (exit 67).
    Diverged(String),
    /// A pairing refused for a configuration mismatch (exit 68).
    Refused(String),
    /// Bad configuration or resources (exit 65).
    Config(String),
    /// A VMM or host failure (exit 71).
    Failed(String),
    /// A signal stopped the node before its VM ran (128+N).
    Stopped(i32),
    /// A join failed before its commit point: the node starts over (internal; reported as
    /// 71 if it ever ends the node).
    JoinFailed(String),
}

/// Operator choices beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Claim even if this node is not the witness's holder (DESIGN §5 (c)), once no peer
    /// running the VM has answered for `failure_timeout` + margin.
    pub operator_claim: bool,
}

/// Everything the node's tasks share.
struct Node {
    cfg: NodeConfig,
    identity: Identity,
    image: &'static [u8],
    plan_args: String,
    devices: crate::spec::DeviceSpec,
    mem_size: u64,
    disk: Mutex<Option<File>>,
    disk_opts: Option<crate::spec::DiskOptions>,
    tap: Option<Arc<Tap>>,
    gen_file: GenerationFile,
    pair_config: PairConfig,
    disk_root: [u8; 32],
    /// The disk's leaf hashes at start (what a joiner sends) and its geometry.
    disk_leaves: Vec<[u8; 32]>,
    disk_geo: Option<disksync::hash::Geometry>,
    /// The guest's disk writes, tracked while a join copies the disk.
    writes: Option<Arc<BlockWrites>>,
    /// Where output releases are logged (`release_log`).
    release_log: Option<Arc<crate::channel::primary::ReleaseLog>>,
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    witnesses: Vec<WitnessClient>,
    margin: Duration,
    /// Where joiners go while a primary waits for its backup.
    joiners: Mutex<Option<mpsc::UnboundedSender<Joiner>>>,
    opts: RunOptions,
}

struct Joiner {
    link: Link,
    reader: MsgReader,
    hello: Hello,
}

/// The claim margin: the share of `failure_timeout` the lease gives up, and the extra quiet a
/// starting holder waits for.
fn margin_of(ft: Duration) -> Duration {
    (ft / 5).max(Duration::from_millis(5))
}

/// Runs a pair member until its VM ends or it halts.
pub fn run(cfg: NodeConfig, opts: RunOptions) -> NodeExit {
    match prepare(cfg, opts) {
        Ok((node, rt)) => {
            let node = Arc::new(node);
            rt.block_on(main(node))
        }
        Err(e) => e,
    }
}

fn prepare(cfg: NodeConfig, opts: RunOptions) -> Result<(Node, tokio::runtime::Runtime), NodeExit> {
    let plan: Plan = cfg.vm.plan().map_err(NodeExit::Config)?;
    let stop = crate::signals::install()
        .map_err(|e| NodeExit::Failed(format!("cannot install signal handlers: {e}")))?;
    let mut devices = plan.devices.clone();
    let (disk, disk_root, disk_size, disk_leaves, disk_geo) = match &plan.disk {
        Some(d) => {
            let (f, sectors) =
                crate::devices::disk::open_disk(d).map_err(|e| NodeExit::Config(e.to_string()))?;
            devices.disk_sectors = Some(sectors);
            let (root, leaves, geo) = disk_hashes(&f, &d.path).map_err(NodeExit::Config)?;
            (Some(f), root, sectors * 512, leaves, Some(geo))
        }
        None => (None, [0; 32], 0, Vec::new(), None),
    };
    let tap = match &plan.tap {
        Some(t) => Some(open_tap(t).map_err(|e| NodeExit::Config(e.to_string()))?),
        None => None,
    };
    let identity =
        Identity::load(&cfg.tls, &cfg.node).map_err(|e| NodeExit::Config(format!("tls: {e}")))?;
    let gen_file = GenerationFile::new(&cfg.state);
    let persisted = gen_file.load().map_err(NodeExit::Config)?;
    let image: &'static [u8] = Box::leak(plan.image.bytes.to_vec().into_boxed_slice());
    let pair_config = PairConfig {
        pair: cfg.pair.clone(),
        image_hash: *blake3::hash(image).as_bytes(),
        cpuid_hash: crate::kvm::cpuid::baseline_hash(),
        mem_size: plan.mem_size,
        disk_size,
        failure_timeout_ns: cfg.failure_timeout.as_nanos() as u64,
        machine: format!("{} args={:?}", devices.describe(), plan.args),
        log_versions: (crate::replay::codec::VERSION, crate::replay::codec::VERSION),
        protocol_versions: msg::PROTOCOL_VERSIONS,
    };
    if pair_config.machine.len() > msg::MAX_STRING {
        // The hello carries it, and the peer's decoder refuses a longer string.
        return Err(NodeExit::Config(format!(
            "the machine's description (devices and guest_args) is {} bytes; at most {}: shorten guest_args",
            pair_config.machine.len(),
            msg::MAX_STRING
        )));
    }
    let peer_names = cfg
        .peers
        .iter()
        .map(|p| p.name.clone())
        .collect::<Vec<_>>()
        .join(",");
    let shared = Arc::new(Shared::new(&cfg.pair, &cfg.node, &peer_names, persisted));
    let rt = tokio::runtime::Builder::new_multi_thread()
        // One worker: the channel's tasks hand each other every message, and on one thread
        // a hand-off is a queue push, not a wake-up of another thread. Measured
        // (benches/ft_pair.rs, 60% quota): the primary's I/O CPU 1350 -> 870 ms and the
        // backup's 600 -> 330 ms for the same 80,000 requests. Blocking work goes through
        // `priority::blocking` (`block_in_place`, which hands the worker's other tasks to a new
        // thread, at the default nice value).
        .worker_threads(1)
        .thread_name("ftvm-io")
        .on_thread_start({
            let nice = cfg.io_nice;
            move || super::priority::set_thread_nice(nice)
        })
        .enable_all()
        .build()
        .map_err(|e| NodeExit::Failed(format!("tokio runtime: {e}")))?;
    let witnesses = {
        let _g = rt.enter();
        cfg.witnesses
            .iter()
            .map(|w| {
                WitnessClient::new(
                    w.addr,
                    &identity,
                    ClientOptions {
                        server_name: w.name.clone(),
                        attempt_timeout: (cfg.failure_timeout * 2).max(Duration::from_millis(500)),
                        attempts: 1,
                        ..ClientOptions::default()
                    },
                )
                .map_err(|e| NodeExit::Config(format!("witness {}: {e}", w.name)))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let release_log = match &cfg.release_log {
        Some(p) => {
            let sh = shared.clone();
            Some(Arc::new(
                crate::channel::primary::ReleaseLog::open(
                    p,
                    &cfg.node,
                    Box::new(move || sh.generation.load(Ordering::SeqCst)),
                )
                .map_err(|e| NodeExit::Config(format!("release_log {}: {e}", p.display())))?,
            ))
        }
        None => None,
    };
    tracing::info!(
        pair = %cfg.pair,
        node = %cfg.node,
        generation = persisted,
        disk_root = %disksync::hash::hex(&disk_root),
        "starting"
    );
    Ok((
        Node {
            margin: margin_of(cfg.failure_timeout),
            cfg,
            identity,
            image,
            plan_args: plan.args,
            devices,
            mem_size: plan.mem_size,
            disk: Mutex::new(disk),
            disk_opts: plan.disk.clone(),
            tap,
            gen_file,
            pair_config,
            disk_root,
            disk_leaves,
            writes: disk_geo.map(|g| Arc::new(BlockWrites::new(g))),
            release_log,
            disk_geo,
            shared,
            stop,
            witnesses,
            joiners: Mutex::new(None),
            opts,
        },
        rt,
    ))
}

/// A disk's Merkle root, its leaf hashes and its geometry (disksync's, 64 KiB blocks).
#[allow(clippy::type_complexity)]
fn disk_hashes(
    f: &File,
    path: &std::path::Path,
) -> Result<([u8; 32], Vec<[u8; 32]>, disksync::hash::Geometry), String> {
    let geo = disksync::hash::file_geometry(f, path, disksync::DEFAULT_BLOCK_SIZE)
        .map_err(|e| format!("disk {}: {e}", path.display()))?;
    let leaves = disksync::hash::hash_file(
        f,
        path,
        geo,
        &disksync::Stats::new(),
        &AtomicBool::new(false),
    )
    .map_err(|e| format!("hashing disk {}: {e}", path.display()))?;
    let root = disksync::Tree::from_leaves(leaves.clone()).root(geo);
    Ok((root, leaves, geo))
}

impl Node {
    /// Records the peer's role as this node last learned it.
    fn set_peer_role(&self, r: Option<Role>) {
        *self
            .shared
            .peer_role
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Opens the disk again after a failed join dropped the machine that had it.
    fn reopen_disk(&self) -> Result<(), NodeExit> {
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            if let Some(opts) = &self.disk_opts {
                let (f, _) = crate::devices::disk::open_disk(opts)
                    .map_err(|e| NodeExit::Failed(format!("reopening the disk: {e}")))?;
                *d = Some(f);
            }
        }
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    fn persist(&self, g: u64) -> Result<(), NodeExit> {
        self.gen_file.store(g).map_err(NodeExit::Failed)?;
        self.shared.generation.store(g, Ordering::SeqCst);
        Ok(())
    }

    fn hello(&self) -> Hello {
        Hello {
            node: self.cfg.node.clone(),
            role: self.shared.role(),
            generation: self.generation(),
            config: self.pair_config.clone(),
            disk_root: self.disk_root,
        }
    }

    fn setup(&self) -> VmSetup<'static> {
        VmSetup {
            image: self.image,
            mem_size: self.mem_size,
            args: self.plan_args.clone(),
            devices: self.devices.clone(),
        }
    }

    fn witness_problem(&self, e: Option<String>) {
        self.shared
            .witness_reachable
            .store(e.is_none(), Ordering::Relaxed);
        *self
            .shared
            .witness_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// The witness's `(generation, holder)` from the first witness that answers.
    async fn witness_status(&self) -> Option<(u64, Option<String>)> {
        let mut last = None;
        for w in &self.witnesses {
            match w.status(&self.cfg.pair).await {
                Ok(s) => {
                    self.witness_problem(None);
                    return Some((s.generation, s.holder));
                }
                Err(e) => last = Some(e.to_string()),
            }
        }
        self.witness_problem(last);
        None
    }

    /// Claims until a witness answers definitively (or the node is stopping: `None`).
    /// Unreachable witnesses are reported loudly and retried.
    async fn claim(&self, seen: u64) -> Option<ClaimOutcome> {
        let mut last_log = Instant::now() - Duration::from_secs(10);
        // One claim, one id: its retries (to any witness) reuse it.
        let id = ftvm_witness::state::ClaimId::random();
        loop {
            if self.stop.signalled().is_some() {
                return None;
            }
            let mut last = String::new();
            for w in &self.witnesses {
                match w.claim(&self.cfg.pair, seen, id).await {
                    Ok(o) => {
                        self.witness_problem(None);
                        return Some(o);
                    }
                    Err(e) if e.is_refusal() => {
                        self.witness_problem(Some(e.to_string()));
                        last = e.to_string();
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            self.witness_problem(Some(last.clone()));
            if last_log.elapsed() >= Duration::from_secs(3) {
                tracing::error!(
                    "WITNESS UNREACHABLE: cannot claim generation {} ({last}); nothing goes live and nothing held is released until a witness answers",
                    seen + 1
                );
                last_log = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn main(node: Arc<Node>) -> NodeExit {
    let ep = match connect::endpoint(node.cfg.listen, &node.identity, node.cfg.failure_timeout) {
        Ok(e) => e,
        Err(e) => return NodeExit::Config(format!("listen {}: {e}", node.cfg.listen)),
    };
    {
        let path = node.cfg.control.clone();
        let sh = node.shared.clone();
        tokio::spawn(async move {
            if let Err(e) = super::status::serve_control(&path, sh).await {
                tracing::error!("control socket {}: {e}", path.display());
            }
        });
    }
    if let Some(addr) = node.cfg.metrics {
        if let Err(e) = super::status::start_metrics(addr, node.shared.clone()) {
            return NodeExit::Config(e);
        }
    }
    tokio::spawn(listener(ep.clone(), node.clone()));
    let r = loop {
        let r = match cold_start(&ep, &node).await {
            Ok(Start::Primary) => run_primary(&node, None).await,
            Ok(Start::Backup(link, reader)) => run_backup(&node, link, reader, None).await,
            Ok(Start::Join(link, reader, generation)) => {
                run_backup(&node, link, reader, Some(generation)).await
            }
            Err(e) => e,
        };
        let NodeExit::JoinFailed(why) = r else {
            break r;
        };
        tracing::warn!("join failed before the commit point: {why}; asking again");
        node.shared.set_role(Role::Starting);
        if let Err(e) = node.reopen_disk() {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if let NodeExit::Denied(why) | NodeExit::Diverged(why) | NodeExit::Refused(why) = &r {
        node.shared.set_role(Role::Halted);
        *node
            .shared
            .halt_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
    }
    let st = &node.shared.stats;
    tracing::info!(
        released_frames = ChannelStats::get(&st.frames_released),
        last_release_unix_ns = ChannelStats::get(&st.last_release_unix_ns),
        prev_release_unix_ns = ChannelStats::get(&st.prev_release_unix_ns),
        generation = node.generation(),
        "node exiting: {r:?}"
    );
    ep.close(quinn::VarInt::from_u32(0), b"node stopping");
    let _ = std::fs::remove_file(&node.cfg.control);
    r
}

/// Accepts connections on the channel port. While the node waits for a backup they go to it;
/// otherwise the connector is told this node's role ("busy"), which is how a starting peer
/// learns whether someone runs the VM.
async fn listener(ep: quinn::Endpoint, node: Arc<Node>) {
    let members: Vec<String> = node.cfg.peers.iter().map(|p| p.name.clone()).collect();
    while let Some(inc) = ep.accept().await {
        let node = node.clone();
        let members = members.clone();
        tokio::spawn(async move {
            let mut link = match connect::accept(inc, &members, Duration::from_secs(3)).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("channel: {e}");
                    return;
                }
            };
            let mut reader = MsgReader::new();
            let hello = match connect::recv_msg(&mut link.recv, &mut reader, Duration::from_secs(3))
                .await
            {
                Ok(Msg::Hello(h)) => h,
                Ok(other) => {
                    tracing::warn!("channel: {} opened with {other:?}, not a hello", link.peer);
                    return;
                }
                Err(e) => {
                    tracing::debug!("channel: {}: {e}", link.peer);
                    return;
                }
            };
            if hello.node != link.peer {
                tracing::warn!(
                    "channel: {} says it is {:?}: refused",
                    link.peer,
                    hello.node
                );
                return;
            }
            let slot = node
                .joiners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let hello = match slot {
                Some(tx) => match tx.send(Joiner {
                    link,
                    reader,
                    hello,
                }) {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(j)) => {
                        link = j.link;
                        j.hello
                    }
                },
                None => hello,
            };
            let role = node.shared.role();
            let reason = match role {
                Role::Primary => "already has a backup".to_string(),
                Role::Alone => "running alone, not taking a joiner at this moment".to_string(),
                r => format!("{} (not running the VM as primary)", r.name()),
            };
            tracing::debug!(
                "channel: told {} (generation {}): {reason}",
                hello.node,
                hello.generation
            );
            let _ = connect::send_msg(
                &mut link.send,
                &Msg::Busy {
                    role,
                    generation: node.generation(),
                    reason,
                },
            )
            .await;
            let _ = link.send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), link.send.stopped()).await;
        });
    }
}

enum Start {
    Primary,
    Backup(Link, MsgReader),
    /// Join a running primary: the generation to adopt.
    Join(Link, MsgReader, u64),
}

/// What probing a peer found.
enum Probe {
    Accepted(Link, MsgReader, u64),
    Join(Link, MsgReader, u64),
    Busy(Role, u64, String),
    Unreachable(String),
}

async fn probe(
    ep: &quinn::Endpoint,
    node: &Node,
    addr: SocketAddr,
    name: &str,
) -> Result<Probe, NodeExit> {
    let mut link = match connect::connect(ep, addr, name, Duration::from_millis(500)).await {
        Ok(l) => l,
        Err(e) => return Ok(Probe::Unreachable(e.to_string())),
    };
    if let Err(e) = connect::send_msg(&mut link.send, &Msg::Hello(node.hello())).await {
        return Ok(Probe::Unreachable(e.to_string()));
    }
    let mut reader = MsgReader::new();
    match connect::recv_msg(&mut link.recv, &mut reader, Duration::from_secs(3)).await {
        Ok(Msg::Accept {
            log_version,
            generation,
            start_boundary,
        }) => {
            tracing::info!(
                "{name} accepted this node as its backup (generation {generation}, log version {log_version}, from boundary {start_boundary})"
            );
            Ok(Probe::Accepted(link, reader, generation))
        }
        Ok(Msg::Join {
            log_version,
            generation,
            block_size,
            blocks,
        }) => {
            let ours = node.disk_geo.map_or((disksync::DEFAULT_BLOCK_SIZE, 0), |g| {
                (g.block_size, g.blocks())
            });
            if (block_size, blocks) != ours {
                return Err(NodeExit::Refused(format!(
                    "{name} offered a join with {blocks} disk blocks of {block_size} bytes; this node's disk has {} of {}",
                    ours.1, ours.0
                )));
            }
            tracing::info!(
                "{name} runs alone in generation {generation} and takes this node as joiner (log version {log_version})"
            );
            Ok(Probe::Join(link, reader, generation))
        }
        Ok(Msg::Refuse { field, ours, theirs }) => Err(NodeExit::Refused(format!(
            "{name} refused the pairing: {field} differs ({name} has {ours}, this node has {theirs})"
        ))),
        Ok(Msg::Busy {
            role,
            generation,
            reason,
        }) => Ok(Probe::Busy(role, generation, reason)),
        Ok(other) => Ok(Probe::Unreachable(format!("unexpected answer {other:?}"))),
        Err(e) => Ok(Probe::Unreachable(e)),
    }
}

/// DESIGN §5 "Cold start and joining": try the peer(s); join one that runs the VM as primary;
/// otherwise claim only as the rules allow, and else keep trying.
async fn cold_start(ep: &quinn::Endpoint, node: &Arc<Node>) -> Result<Start, NodeExit> {
    let started = Instant::now();
    let mut running_peer_seen: Option<Instant> = None;
    let mut pair_exists = false;
    let mut last_note = Instant::now() - Duration::from_secs(10);
    let quiet_needed = node.cfg.failure_timeout + node.margin;
    loop {
        if let Some(sig) = node.stop.signalled() {
            return Err(NodeExit::Stopped(sig));
        }
        let persisted = node.generation();
        // Whether every peer answered that the pair is complete (one primary, one backup): a
        // spare then asks less often.
        let mut complete = !node.cfg.peers.is_empty();
        for p in &node.cfg.peers {
            let answer = probe(ep, node, p.addr, &p.name).await?;
            if !matches!(answer, Probe::Busy(Role::Primary | Role::Backup, _, _)) {
                complete = false;
            }
            match answer {
                Probe::Accepted(link, reader, generation) => {
                    node.set_peer_role(Some(Role::Primary));
                    // Adopt the primary's generation before the first ack.
                    node.persist(generation)?;
                    return Ok(Start::Backup(link, reader));
                }
                Probe::Join(link, reader, generation) => {
                    node.set_peer_role(Some(Role::Alone));
                    // The generation is adopted once the state is restored (DESIGN §5).
                    return Ok(Start::Join(link, reader, generation));
                }
                Probe::Busy(role, g, reason) => {
                    *node
                        .shared
                        .peer_role
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(role);
                    if counts_as_running(role, g, persisted) {
                        running_peer_seen = Some(Instant::now());
                    }
                    if role.runs_vm() {
                        pair_exists = true;
                    }
                    if last_note.elapsed() >= Duration::from_secs(3) {
                        tracing::info!("{} is {} in generation {g}: {reason}", p.name, role.name());
                        last_note = Instant::now();
                    }
                }
                Probe::Unreachable(why) => {
                    tracing::debug!("{} unreachable: {why}", p.name);
                }
            }
        }
        let silent = running_peer_seen.unwrap_or(started).elapsed();
        let witness = if persisted > 0 || node.opts.operator_claim {
            node.witness_status().await
        } else {
            None
        };
        let d = decide_start(&StartView {
            me: &node.cfg.node,
            persisted,
            witness: witness.as_ref().map(|(g, h)| (*g, h.as_deref())),
            running_peer_silent_for: silent,
            quiet_needed,
            operator_claim: node.opts.operator_claim,
            pair_exists,
        });
        if let StartDecision::Claim { seen } = d {
            node.shared.set_role(Role::Claiming);
            match node.claim(seen).await {
                Some(ClaimOutcome::Granted { generation }) => {
                    node.persist(generation)?;
                    tracing::info!("granted generation {generation}: this node runs the VM");
                    return Ok(Start::Primary);
                }
                Some(ClaimOutcome::Denied { generation, holder }) => {
                    pair_exists = true;
                    tracing::info!(
                        "claim denied: generation {generation} is held by {}; trying to join",
                        holder.as_deref().unwrap_or("nobody")
                    );
                    node.shared.set_role(Role::Starting);
                }
                None => return Err(NodeExit::Stopped(node.stop.signalled().unwrap_or(15))),
            }
        }
        // A spare of a complete pair asks every second (each ask is a TLS handshake on the
        // members); otherwise it asks again soon.
        let pause = if complete { 1000 } else { 100 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// A primary that waits for its backup before boundary 0: accepts the first joiner whose
/// configuration and disk match (`Some`); `None` when a member's disk differs, so the guest
/// starts alone and that member joins it.
async fn wait_for_backup(node: &Arc<Node>) -> Result<Option<(Link, MsgReader)>, NodeExit> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    *node.joiners.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    node.shared.set_role(Role::Primary);
    tracing::info!("waiting for a backup before starting the guest");
    let r = loop {
        let j = tokio::select! {
            j = rx.recv() => j,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let Some(sig) = node.stop.signalled() { break Err(NodeExit::Stopped(sig)); }
                continue;
            }
        };
        let Some(Joiner {
            mut link,
            reader,
            hello,
        }) = j
        else {
            break Err(NodeExit::Failed("listener stopped".into()));
        };
        let refuse = |field: &str, ours: String, theirs: String| Msg::Refuse {
            field: field.into(),
            ours,
            theirs,
        };
        if let Some((field, ours, theirs)) = msg::mismatch(&node.pair_config, &hello.config) {
            let _ = connect::send_msg(
                &mut link.send,
                &refuse(&field, ours.clone(), theirs.clone()),
            )
            .await;
            let _ = link.send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), link.send.stopped()).await;
            break Err(NodeExit::Refused(format!(
                "refused {} as backup: {field} differs (this node has {ours}, {} has {theirs})",
                hello.node, hello.node
            )));
        }
        if hello.generation > node.generation() {
            let _ = connect::send_msg(
                &mut link.send,
                &Msg::Busy {
                    role: Role::Primary,
                    generation: node.generation(),
                    reason: format!(
                        "your generation {} is newer than mine ({})",
                        hello.generation,
                        node.generation()
                    ),
                },
            )
            .await;
            continue;
        }
        if hello.disk_root != node.disk_root {
            // Not a backup from boundary 0 (DESIGN §5: its root must equal ours there). This
            // node starts the guest alone instead, and the peer joins it: the join's copy
            // brings its disk in line, with no operator.
            let (ours, theirs) = (
                disksync::hash::hex(&node.disk_root),
                disksync::hash::hex(&hello.disk_root),
            );
            tracing::warn!(
                "{} cannot be the backup from boundary 0: its disk differs (root {theirs}, this node's {ours}); starting the guest alone, {} joins it",
                hello.node,
                hello.node
            );
            let busy = Msg::Busy {
                role: Role::Primary,
                generation: node.generation(),
                reason: format!(
                    "your disk differs from mine (root {theirs}, mine {ours}): I start the guest alone; join me"
                ),
            };
            let _ = connect::send_msg(&mut link.send, &busy).await;
            let _ = link.send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), link.send.stopped()).await;
            break Ok(None);
        }
        let version = msg::negotiate(node.pair_config.log_versions, hello.config.log_versions)
            .expect("mismatch() checked the ranges overlap");
        if connect::send_msg(
            &mut link.send,
            &Msg::Accept {
                log_version: version,
                generation: node.generation(),
                start_boundary: 0,
            },
        )
        .await
        .is_err()
        {
            continue;
        }
        tracing::info!("{} is the backup", hello.node);
        node.set_peer_role(Some(Role::Backup));
        break Ok(Some((link, reader)));
    };
    *node.joiners.lock().unwrap_or_else(|p| p.into_inner()) = None;
    r
}

fn output_config(node: &Node) -> OutputConfig {
    let cfg = &node.cfg;
    OutputConfig {
        heartbeat: cfg.heartbeat,
        failure_timeout: cfg.failure_timeout,
        margin: margin_of(cfg.failure_timeout),
        max_lag: cfg.max_lag,
        cap_bytes: cfg.held_bytes as usize,
        release_log: node.release_log.clone(),
    }
}

/// The vCPU thread's handles on its machine, sent once the machine is built.
struct VcpuHandles {
    tracker: Option<Arc<crate::state::dirty::DirtyTracker>>,
    pages: crate::kvm::memory::GuestPages,
}

/// A running vCPU thread.
struct Vcpu {
    /// How the VM ended.
    done: tokio::sync::oneshot::Receiver<Result<Outcome, VmmError>>,
    /// The machine's handles (once built).
    handles: tokio::sync::oneshot::Receiver<VcpuHandles>,
    /// Jobs run at a pause.
    jobs: std_mpsc::Sender<VcpuJob>,
    /// Pauses the machine.
    pause: PauseHandle,
}

/// The vCPU thread: builds the machine (on this thread) and runs it, running the jobs it is
/// given whenever `pause` pauses it; the result comes back on a oneshot.
fn spawn_vcpu(
    build: impl FnOnce() -> Result<Machine, VmmError> + Send + 'static,
    progress: Arc<std::sync::atomic::AtomicU64>,
    pause: PauseHandle,
) -> Vcpu {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (htx, hrx) = tokio::sync::oneshot::channel();
    let (jtx, jrx) = std_mpsc::channel::<VcpuJob>();
    let p = pause.clone();
    std::thread::Builder::new()
        .name("ftvm-vcpu".into())
        .spawn(move || {
            let r = build().and_then(|mut m| {
                m.set_progress(progress);
                m.set_pause_handle(p);
                let _ = htx.send(VcpuHandles {
                    tracker: m.dirty_tracker().cloned(),
                    pages: m.memory().pages_handle(),
                });
                loop {
                    match m.run_until(Boundary::MAX)? {
                        Some(outcome) => break Ok(outcome),
                        None => {
                            while let Ok(job) = jrx.try_recv() {
                                job(&mut m);
                            }
                        }
                    }
                }
            });
            let _ = tx.send(r);
        })
        .expect("spawning the vCPU thread");
    Vcpu {
        done: rx,
        handles: hrx,
        jobs: jtx,
        pause,
    }
}

/// Placeholder inputs of a joiner's machine until its state is restored (never asked: the
/// machine does not run before).
struct NotYet;

impl Inputs for NotYet {
    fn clock(&mut self, _b: Boundary) -> Result<ClockValue, InputError> {
        Err(InputError::Log(
            "the joiner has no inputs before its state".into(),
        ))
    }
    fn entropy(&mut self, _b: Boundary) -> Result<u64, InputError> {
        Err(InputError::Log(
            "the joiner has no inputs before its state".into(),
        ))
    }
    fn wait(&mut self, _b: Boundary, _d: u64, _r: usize) -> Result<ClockValue, InputError> {
        Err(InputError::Log(
            "the joiner has no inputs before its state".into(),
        ))
    }
    fn random(&mut self, _b: Boundary, _l: usize) -> Result<Vec<u8>, InputError> {
        Err(InputError::Log(
            "the joiner has no inputs before its state".into(),
        ))
    }
}

fn vm_result(
    r: Result<Result<Outcome, VmmError>, tokio::sync::oneshot::error::RecvError>,
) -> NodeExit {
    match r {
        Ok(Ok(o)) => NodeExit::Guest(o),
        Ok(Err(VmmError::Input(InputError::Divergence { boundary, what }))) => {
            NodeExit::Diverged(format!("diverged at boundary {boundary}: {what}"))
        }
        Ok(Err(VmmError::Input(InputError::Halted(why)))) => NodeExit::Denied(why),
        Ok(Err(
            e @ (VmmError::BadImage(_)
            | VmmError::ImageTooLarge(_)
            | VmmError::MemSize { .. }
            | VmmError::Config(_)
            | VmmError::Disk { .. }
            | VmmError::Tap { .. }),
        )) => NodeExit::Config(e.to_string()),
        Ok(Err(e)) => NodeExit::Failed(e.to_string()),
        Err(_) => NodeExit::Failed("the vCPU thread died".into()),
    }
}

/// Runs the VM as primary (with the backup's `link` if there is one).
/// Counts a failover and keeps its report for `status`.
fn record_failover(node: &Node, report: FailoverReport) {
    node.shared.failovers.fetch_add(1, Ordering::Relaxed);
    *node
        .shared
        .last_failover
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(report);
}

/// Sends the gratuitous ARP of the guest's address from this host, so that switches learn its
/// MAC on this host's port (a cold start on the other host than last time, or a go-live). It is
/// the node's frame, not the guest's: it carries nothing the guest computed.
fn announce(node: &Node) {
    if let (Some(tap), Some(net)) = (&node.tap, &node.devices.net) {
        super::garp::announce(tap, net);
    }
}

async fn run_primary(node: &Arc<Node>, link: Option<(Link, MsgReader)>) -> NodeExit {
    let link = match link {
        Some(l) => Some(l),
        None if node.cfg.wait_for_backup => match wait_for_backup(node).await {
            Ok(l) => l,
            Err(e) => return e,
        },
        None => None,
    };
    let replicated = link.is_some();
    // The guest's MAC may have been on the other host's port until now.
    announce(node);
    node.shared.set_role(if replicated {
        Role::Primary
    } else {
        Role::Alone
    });
    let (tx, rx) = mpsc::unbounded_channel::<ToChannel>();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let stats = node.shared.stats.clone();
    let out = tokio::spawn(output_task(
        rx,
        cmd_rx,
        ev_tx,
        link,
        node.tap.clone(),
        output_config(node),
        if replicated {
            GateMode::Replicated
        } else {
            GateMode::Alone
        },
        stats.clone(),
    ));
    let setup = node.setup();
    let disk = node.disk.lock().unwrap_or_else(|p| p.into_inner()).take();
    let disk_reader = match disk.as_ref().map(File::try_clone).transpose() {
        Ok(d) => d,
        Err(e) => return NodeExit::Failed(format!("disk: {e}")),
    };
    let (stop, tap, digest_every) = (node.stop.clone(), node.tap.clone(), node.cfg.digest_every);
    let switch = RecordSwitch::new();
    let pause = PauseHandle::new();
    let writes = node.writes.clone();
    let (sw, p, txc) = (switch.clone(), pause.clone(), tx.clone());
    let vcpu = spawn_vcpu(
        move || {
            let mut live = LiveInputs::new(stop.clone(), 0).with_pause(p);
            if let Some(t) = &tap {
                live = live.with_tap(t.clone());
            }
            let handoff = Handoff::new(txc);
            let rec = if replicated {
                Recorder::new(
                    live,
                    ChannelLog::new(handoff.clone()),
                    setup.log_header(digest_every),
                )?
                .with_switch(sw)
            } else {
                Recorder::dormant(live, ChannelLog::new(handoff.clone()), sw)
            };
            let inputs = Throttle::new(rec, stats, stop.clone());
            let sink: Box<dyn FrameSink> = Box::new(HeldFrames::new(handoff));
            crate::setup::assemble_tracked(
                &setup,
                disk,
                sink,
                Box::new(inputs),
                Box::new(StdoutConsole::default()),
                stop,
                true,
                writes,
            )
        },
        node.shared.boundary.clone(),
        pause,
    );
    serve(
        node,
        Running {
            vcpu,
            out,
            ev_rx,
            cmd_tx,
            tx,
            switch,
            disk_reader,
        },
    )
    .await
}

/// A VM this node runs as primary or alone, with what serving it needs.
struct Running {
    vcpu: Vcpu,
    out: tokio::task::JoinHandle<crate::channel::gate::OutputGate>,
    ev_rx: mpsc::UnboundedReceiver<OutputEvent>,
    cmd_tx: mpsc::UnboundedSender<OutputCmd>,
    tx: mpsc::UnboundedSender<ToChannel>,
    switch: RecordSwitch,
    disk_reader: Option<File>,
}

/// Serves the VM as primary or alone until it ends: failover on backup loss, and joiners
/// accepted while alone.
async fn serve(node: &Arc<Node>, r: Running) -> NodeExit {
    let Running {
        mut vcpu,
        out,
        mut ev_rx,
        cmd_tx,
        tx,
        switch,
        disk_reader,
    } = r;
    let source = match (&mut vcpu.handles).await {
        Ok(VcpuHandles {
            tracker: Some(tracker),
            pages,
        }) => Some(Arc::new(JoinSource {
            tracker,
            pages,
            pause: vcpu.pause.clone(),
            jobs: vcpu.jobs.clone(),
            disk: match (node.writes.clone(), disk_reader) {
                (Some(w), Some(f)) => Some((w, f)),
                _ => None,
            },
            switch: switch.clone(),
            header: node.setup().log_header(node.cfg.digest_every),
            tx,
            policy: crate::join::rounds::RoundPolicy::default(),
        })),
        Ok(_) => {
            tracing::warn!("the machine keeps no dirty log: this node cannot take joiners");
            None
        }
        // The build failed: the result tells why.
        Err(_) => None,
    };
    let (jtx, mut jrx) = mpsc::unbounded_channel();
    *node.joiners.lock().unwrap_or_else(|p| p.into_inner()) = Some(jtx);
    let mut halted: Option<NodeExit> = None;
    let mut joining: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    // From a join's start until its joiner is attached (or the join failed): no other joiner
    // is taken, so the output task never gets a second backup.
    let mut join_busy = false;
    let exit = loop {
        tokio::select! {
            r = &mut vcpu.done => {
                break halted.take().unwrap_or_else(|| vm_result(r));
            }
            ev = ev_rx.recv() => match ev {
                Some(OutputEvent::BackupLost(why)) => {
                    node.set_peer_role(None);
                    if let Some(e) = primary_failover(node, &cmd_tx, format!("backup lost: {why}")).await {
                        halted = Some(e);
                        node.stop.raise(libc::SIGTERM);
                    } else {
                        // Alone: nobody receives a log until the next join restarts it.
                        switch.stop();
                    }
                }
                Some(OutputEvent::Diverged { boundary, what }) => {
                    node.set_peer_role(None);
                    tracing::error!("the backup diverged at boundary {boundary}: {what}");
                    if let Some(e) = primary_failover(node, &cmd_tx, format!("backup diverged at boundary {boundary}: {what}")).await {
                        halted = Some(e);
                        node.stop.raise(libc::SIGTERM);
                    } else {
                        switch.stop();
                    }
                }
                Some(OutputEvent::Attached { peer, from }) => {
                    join_busy = false;
                    node.set_peer_role(Some(Role::Backup));
                    node.shared.joins.fetch_add(1, Ordering::Relaxed);
                    node.shared.set_role(Role::Primary);
                    tracing::info!("{peer} is the backup from boundary {from}");
                }
                Some(OutputEvent::Finished) | None => {}
            },
            j = jrx.recv() => {
                if let Some(j) = j {
                    if let Some(h) = accept_joiner(node, j, join_busy, source.as_ref()).await {
                        joining = Some(h);
                        join_busy = true;
                    }
                }
            }
            r = async { joining.as_mut().expect("guarded").await }, if joining.is_some() => {
                joining = None;
                let err = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) => Some(format!("join task: {e}")),
                };
                if let Some(e) = err {
                    join_busy = false;
                    tracing::warn!("join failed before the commit point: {e}; running alone as before");
                    node.shared.update_join(|j| {
                        j.phase = "failed".into();
                        j.error = Some(e);
                    });
                }
            }
        }
    };
    *node.joiners.lock().unwrap_or_else(|p| p.into_inner()) = None;
    if let Some(h) = joining {
        h.abort();
    }
    drop(source);
    // Let the output task send the end record and release what it may.
    let _ = tokio::time::timeout(node.cfg.failure_timeout * 2, out).await;
    exit
}

/// A node that connected while this one runs the VM: a joiner is taken only while alone and
/// no other join runs; anyone else is told why not. Returns the join's task.
async fn accept_joiner(
    node: &Arc<Node>,
    j: Joiner,
    busy: bool,
    source: Option<&Arc<JoinSource>>,
) -> Option<tokio::task::JoinHandle<Result<(), String>>> {
    let Joiner {
        mut link,
        reader,
        hello,
    } = j;
    let tell = |reason: String| Msg::Busy {
        role: node.shared.role(),
        generation: node.generation(),
        reason,
    };
    let protocol = msg::negotiate(
        node.pair_config.protocol_versions,
        hello.config.protocol_versions,
    );
    let answer = if let Some((field, ours, theirs)) =
        msg::mismatch(&node.pair_config, &hello.config)
    {
        tracing::error!(
            "refused {} as joiner: {field} differs (this node has {ours}, {} has {theirs})",
            hello.node,
            hello.node
        );
        Msg::Refuse {
            field,
            ours,
            theirs,
        }
    } else if node.shared.role() != Role::Alone {
        tell("already has a backup".into())
    } else if busy {
        tell("another node is joining".into())
    } else if hello.generation > node.generation() {
        tell(format!(
            "your generation {} is newer than mine ({})",
            hello.generation,
            node.generation()
        ))
    } else if protocol.is_none_or(|v| v < msg::JOIN_PROTOCOL) {
        tell(format!(
            "joining a running primary needs channel protocol {} on both nodes",
            msg::JOIN_PROTOCOL
        ))
    } else if let Some(v) =
        protocol.filter(|&v| msg::join_state_version(v) != Some(crate::state::codec::VERSION))
    {
        tell(format!(
            "this node saves VM state in format {}, which channel protocol {v} does not carry: upgrade the other node",
            crate::state::codec::VERSION
        ))
    } else if let Some(src) = source {
        let log_version = msg::negotiate(node.pair_config.log_versions, hello.config.log_versions)
            .expect("mismatch() checked the ranges overlap");
        tracing::info!(
            "{} asks to join (its generation {}, this node's {}): copying while the guest runs",
            hello.node,
            hello.generation,
            node.generation()
        );
        let (src, node) = (src.clone(), node.clone());
        return Some(tokio::spawn(async move {
            super::join::serve_join(
                &src,
                JoinRequest {
                    link,
                    reader,
                    log_version,
                    protocol: protocol.expect("checked above"),
                },
                node.generation(),
                &node.shared,
            )
            .await
        }));
    } else {
        tell("this node cannot take joiners (no dirty log)".into())
    };
    let _ = connect::send_msg(&mut link.send, &answer).await;
    let _ = link.send.finish();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_millis(500), link.send.stopped()).await;
    });
    None
}

/// DESIGN §5 "Primary loses its backup": output is already held; claim; granted → alone and
/// release; denied → drop everything held and halt (the returned exit).
async fn primary_failover(
    node: &Arc<Node>,
    cmds: &mpsc::UnboundedSender<OutputCmd>,
    why: String,
) -> Option<NodeExit> {
    let t0 = Instant::now();
    let g = node.generation();
    let _ = cmds.send(OutputCmd::SetMode(GateMode::Holding));
    node.shared.set_role(Role::Claiming);
    tracing::warn!("{why}: claiming generation {}", g + 1);
    let outcome = node.claim(g).await;
    let claim_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut report = FailoverReport {
        at_s: node.shared.uptime_s(),
        why: why.clone(),
        from_generation: g,
        claim_ms,
        boundary: node.shared.boundary.load(Ordering::Relaxed),
        ..Default::default()
    };
    let exit = match outcome {
        Some(ClaimOutcome::Granted { generation }) => {
            if let Err(e) = node.persist(generation) {
                let _ = cmds.send(OutputCmd::DropAll);
                return Some(e);
            }
            let _ = cmds.send(OutputCmd::SetMode(GateMode::Alone));
            node.shared.set_role(Role::Alone);
            report.to_generation = generation;
            tracing::warn!(
                "granted generation {generation}: running alone ({why}; claim {claim_ms:.1} ms)"
            );
            None
        }
        Some(ClaimOutcome::Denied { generation, holder }) => {
            let _ = cmds.send(OutputCmd::DropAll);
            Some(NodeExit::Denied(format!(
                "the witness gave the pair to {} (generation {generation}): halting, held output dropped",
                holder.as_deref().unwrap_or("another node")
            )))
        }
        None => {
            let _ = cmds.send(OutputCmd::DropAll);
            Some(NodeExit::Stopped(node.stop.signalled().unwrap_or(15)))
        }
    };
    record_failover(node, report);
    exit
}

/// Runs the VM as backup of the primary at the other end of `link`: from boot, or — `join`
/// holding the generation to adopt — from the state the primary sends while it runs.
async fn run_backup(
    node: &Arc<Node>,
    link: Link,
    reader: MsgReader,
    join: Option<u64>,
) -> NodeExit {
    node.shared.set_role(if join.is_some() {
        Role::Joining
    } else {
        Role::Backup
    });
    let stats = node.shared.stats.clone();
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let (feed_tx, feed_rx) = std_mpsc::channel();
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    // The receive task's pieces: taken by whichever path starts it.
    let mut pieces = Some((link, reader, header_tx, header_rx, feed_tx, report_rx));
    let receive_cfg = |start_after| ReceiveConfig {
        heartbeat: node.cfg.heartbeat,
        failure_timeout: node.cfg.failure_timeout,
        start_after,
    };
    let setup = node.setup();
    // From boot: the log starts now, and its header says how to build the replayer.
    let (mut recv, boot_header) = match join {
        None => {
            let (link, reader, header_tx, header_rx, feed_tx, report_rx) =
                pieces.take().expect("unused");
            let mut recv = tokio::spawn(receive_task(
                link,
                reader,
                header_tx,
                feed_tx,
                report_rx,
                receive_cfg(0),
                stats.clone(),
            ));
            let header = tokio::select! {
                h = header_rx => match h {
                    Ok(h) => h,
                    Err(_) => {
                        return match (&mut recv).await {
                            Ok(BackupEnd::BadLog { boundary, what }) => NodeExit::Diverged(format!("bad log at boundary {boundary}: {what}")),
                            other => NodeExit::Failed(format!("the primary went away before the log started: {other:?}")),
                        }
                    }
                },
                _ = tokio::time::sleep(Duration::from_secs(10)) => return NodeExit::Failed("no log header from the primary within 10 s".into()),
            };
            let ours = setup.log_header(header.digest_every);
            if header != ours {
                let what = format!("the primary's log header differs from this node's machine (primary: {header:?}, here: {ours:?})");
                let _ = report_tx.send(Msg::Divergence {
                    boundary: 0,
                    what: what.clone(),
                });
                return NodeExit::Diverged(what);
            }
            (Some(recv), Some(header))
        }
        Some(_) => (None, None),
    };
    let is_live = Arc::new(AtomicBool::new(false));
    let is_live_stop = is_live.clone();
    if let Some(t) = node.tap.clone() {
        let live = is_live.clone();
        let stop = node.stop.clone();
        std::thread::Builder::new()
            .name("ftvm-tap-drain".into())
            .spawn(move || drain_tap(&t, &live, &stop))
            .expect("spawning the TAP drain thread");
    }
    let (caught_tx, mut caught_rx) = mpsc::unbounded_channel::<CaughtUp>();
    let (decide_tx, decide_rx) = std_mpsc::channel::<Decision>();
    // Frames: dropped while following (the primary sent them), through the output task once
    // live.
    let (tx, rx) = mpsc::unbounded_channel::<ToChannel>();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let out = tokio::spawn(output_task(
        rx,
        cmd_rx,
        ev_tx,
        None,
        node.tap.clone(),
        output_config(node),
        GateMode::Alone,
        stats.clone(),
    ));
    let disk = node.disk.lock().unwrap_or_else(|p| p.into_inner()).take();
    let disk_handle = match disk.as_ref().map(File::try_clone).transpose() {
        Ok(d) => d,
        Err(e) => return NodeExit::Failed(format!("disk: {e}")),
    };
    let (stop, tap) = (node.stop.clone(), node.tap.clone());
    let live_for_sink = is_live.clone();
    let switch = RecordSwitch::new();
    let pause = PauseHandle::new();
    let (parts_tx, parts_rx) = std_mpsc::channel::<JoinPart>();
    let (restored_tx, restored_rx) = tokio::sync::oneshot::channel::<Result<Boundary, String>>();
    let (sw, p, txc, writes) = (
        switch.clone(),
        pause.clone(),
        tx.clone(),
        node.writes.clone(),
    );
    let stats_c = stats.clone();
    let vcpu = spawn_vcpu(
        move || {
            let stats = stats_c;
            let handoff = Handoff::new(txc.clone());
            let feed = ChannelFeed::new(feed_rx, stop.clone(), stats.clone());
            let follower = |replayer: Replayer| {
                let f = Follower::new(replayer, stop.clone(), tap, caught_tx, decide_rx, is_live)
                    .with_pause(p);
                // Dormant until a join after this node went live restarts it.
                let rec = Recorder::dormant(f, ChannelLog::new(handoff.clone()), sw);
                Throttle::new(rec, stats.clone(), stop.clone())
            };
            let sink: Box<dyn FrameSink> =
                Box::new(HeldFrames::new(handoff.clone()).while_live(live_for_sink));
            let assemble = |inputs: Box<dyn Inputs>| {
                crate::setup::assemble_tracked(
                    &setup,
                    disk,
                    sink,
                    inputs,
                    Box::new(StdoutConsole::default()),
                    stop.clone(),
                    true,
                    writes,
                )
            };
            if let Some(header) = boot_header {
                let replayer = Replayer::streaming(header, Box::new(feed));
                return assemble(Box::new(follower(replayer)));
            }
            // Joining: memory arrives page by page, then the state.
            let restore = || -> Result<(Machine, Boundary, u64), VmmError> {
                let mut m = assemble(Box::new(NotYet))?;
                let pages = m.memory().pages_handle();
                // All zero before the copy: the primary's first round leaves out its zero
                // pages (protocol 3; harmless with an older primary, which sends them all).
                let cleared = pages.clear()?;
                tracing::debug!("joining: cleared {cleared} pages the boot wrote");
                loop {
                    match parts_rx.recv() {
                        Ok(JoinPart::Pages(b)) => {
                            crate::state::pages::PageBatch::decode(&b, pages.pages())?
                                .apply(&pages)?;
                        }
                        Ok(JoinPart::Sync(done)) => {
                            let _ = done.send(());
                        }
                        Ok(JoinPart::State {
                            state,
                            digest_every,
                        }) => {
                            let st = crate::state::VmState::decode(&state)?;
                            m.restore_state(&st)?;
                            return Ok((m, st.boundary, digest_every));
                        }
                        Err(_) => {
                            return Err(VmmError::Config(
                                "the join ended before the state arrived".into(),
                            ))
                        }
                    }
                }
            };
            match restore() {
                Ok((mut m, k, digest_every)) => {
                    let mut replayer =
                        Replayer::streaming(setup.log_header(digest_every), Box::new(feed));
                    replayer.skip_through(k);
                    m.set_inputs(Box::new(follower(replayer)));
                    let _ = restored_tx.send(Ok(k));
                    Ok(m)
                }
                Err(e) => {
                    let _ = restored_tx.send(Err(e.to_string()));
                    Err(e)
                }
            }
        },
        node.shared.boundary.clone(),
        pause,
    );
    let mut vcpu = vcpu;
    // A joiner counts as running the VM only from its first ack (DESIGN §5): the boundary of
    // its state, which its first ack acknowledges.
    let mut joined_at: Option<Boundary> = None;
    if let Some(generation) = join {
        let (mut link, mut reader, header_tx, header_rx, feed_tx, report_rx) =
            pieces.take().expect("unused");
        let t0 = Instant::now();
        node.shared.update_join(|j| {
            *j = super::status::JoinReport {
                peer: link.peer.clone(),
                phase: "copying".into(),
                disk_blocks: node.disk_geo.map_or(0, |g| g.blocks()),
                ..Default::default()
            }
        });
        let jdisk = match (
            disk_handle.as_ref().map(File::try_clone).transpose(),
            node.disk_geo,
        ) {
            (Ok(Some(file)), Some(geo)) => Some(JoinDisk {
                file,
                geo,
                leaves: node.disk_leaves.clone(),
            }),
            (Ok(_), _) => None,
            (Err(e), _) => return NodeExit::Failed(format!("disk: {e}")),
        };
        // Ends by itself when the join is done or failed.
        let _bar = join_progress_bar(node);
        let copied =
            super::join::receive_copy(&mut link, &mut reader, jdisk, parts_tx, &node.shared).await;
        let fail = |e: String| {
            node.shared.update_join(|j| {
                j.phase = "failed".into();
                j.error = Some(e.clone());
            });
            NodeExit::Failed(format!("join failed: {e}"))
        };
        // Before the commit a failed join leaves nothing behind: the machine is dropped (its
        // thread ends once the copy's queue closes) and the node may ask again.
        let retry = |e: String, vcpu: Vcpu| {
            node.shared.update_join(|j| {
                j.phase = "failed".into();
                j.error = Some(e.clone());
            });
            // Stops the TAP drain thread of this attempt.
            is_live_stop.store(true, Ordering::SeqCst);
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), vcpu.done).await;
                NodeExit::JoinFailed(e)
            }
        };
        let copied = match copied {
            Ok(c) => c,
            Err(e) => return retry(e, vcpu).await,
        };
        let t_restore = Instant::now();
        let k = match tokio::time::timeout(Duration::from_secs(30), restored_rx).await {
            Ok(Ok(Ok(k))) => k,
            Ok(Ok(Err(e))) => return retry(format!("restoring the state: {e}"), vcpu).await,
            _ => return fail("the state was not restored within 30 s".into()),
        };
        joined_at = Some(k);
        if copied.generation != generation {
            return fail(format!(
                "the primary offered generation {generation} and sent state for {}",
                copied.generation
            ));
        }
        let restore_ms = t_restore.elapsed().as_secs_f64() * 1e3;
        // The commit, on this side: adopt the generation before the first ack.
        let t_persist = Instant::now();
        if let Err(e) = node.persist(generation) {
            return e;
        }
        tracing::info!(
            "joining: state restored in {restore_ms:.1} ms, generation {generation} persisted in {:.1} ms",
            t_persist.elapsed().as_secs_f64() * 1e3
        );
        node.set_peer_role(Some(Role::Primary));
        node.shared.set_role_with_join(Role::Backup, |j| {
            j.phase = "done".into();
            j.boundary = k;
            j.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        });
        node.shared.joins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "joined at boundary {k} in generation {generation} ({:.0} ms): backup from here on",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let mut r = tokio::spawn(receive_task(
            link,
            reader,
            header_tx,
            feed_tx,
            report_rx,
            receive_cfg(k),
            stats.clone(),
        ));
        let header = tokio::select! {
            h = header_rx => h.ok(),
            _ = tokio::time::sleep(Duration::from_secs(10)) => None,
        };
        let Some(header) = header else {
            return match (&mut r).await {
                Ok(BackupEnd::BadLog { boundary, what }) => {
                    NodeExit::Diverged(format!("bad log at boundary {boundary}: {what}"))
                }
                other => NodeExit::Failed(format!(
                    "no log from the primary after the state: {other:?}"
                )),
            };
        };
        let ours = setup_header(node, header.digest_every);
        if header != ours {
            let what = format!("the primary's log header differs from this node's machine (primary: {header:?}, here: {ours:?})");
            let _ = report_tx.send(Msg::Divergence {
                boundary: k,
                what: what.clone(),
            });
            return NodeExit::Diverged(what);
        }
        recv = Some(r);
    } else {
        drop(parts_tx);
    }
    let mut recv = recv.expect("the receive task runs from here on");
    let mut lost: Option<(String, u64, Boundary)> = None;
    let mut decided_at: Option<Instant> = None;
    let mut recv_done = false;
    loop {
        tokio::select! {
            r = &mut vcpu.done => {
                let exit = vm_result(r);
                if let NodeExit::Diverged(what) = &exit {
                    tracing::error!("{what}");
                    let b = node.shared.boundary.load(Ordering::Relaxed);
                    let _ = report_tx.send(Msg::Divergence { boundary: b, what: what.clone() });
                    if !recv_done { let _ = tokio::time::timeout(Duration::from_secs(1), &mut recv).await; }
                }
                drop(cmd_tx);
                let _ = tokio::time::timeout(Duration::from_secs(1), out).await;
                return exit;
            }
            e = &mut recv, if !recv_done => {
                recv_done = true;
                match on_stream_end(node, e) {
                    Ok(l) => {
                        if l.is_some() { decided_at = Some(Instant::now()); }
                        lost = l;
                    }
                    Err(e) => return e,
                }
            }
            c = caught_rx.recv() => {
                let Some(c) = c else { continue };
                if !recv_done {
                    // The replay ran out of stream before this loop saw the stream end: the
                    // receive task is ending; take its report first.
                    recv_done = true;
                    match on_stream_end(node, (&mut recv).await) {
                        Ok(l) => {
                            if l.is_some() { decided_at = Some(Instant::now()); }
                            lost = l;
                        }
                        Err(e) => return e,
                    }
                }
                let Some((why, last_receipt, acked)) = lost.clone() else {
                    // The stream ended without a loss report (cannot happen: the feed closes
                    // only when the receive task ends).
                    let _ = decide_tx.send(Decision::Halt("the stream ended".into()));
                    continue;
                };
                if let Some(k) = joined_at.filter(|&k| acked < k) {
                    let why = format!("the primary was lost before this joiner's first ack (state at boundary {k}): it may not claim");
                    tracing::error!("{why}");
                    let _ = decide_tx.send(Decision::Halt(why.clone()));
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut vcpu.done).await;
                    return NodeExit::Failed(why);
                }
                let exit = backup_failover(node, &decide_tx, &cmd_tx, c, why, last_receipt, acked, decided_at.unwrap_or_else(Instant::now)).await;
                if let Some(e) = exit {
                    // The vCPU is told to halt; its thread ends with Halted.
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut vcpu.done).await;
                    return e;
                }
                // Live and alone: serve the VM as a primary does (joiners, failover).
                return serve(
                    node,
                    Running {
                        vcpu,
                        out,
                        ev_rx,
                        cmd_tx,
                        tx,
                        switch,
                        disk_reader: disk_handle,
                    },
                )
                .await;
            }
        }
    }
}

/// On a terminal, a progress bar of the join (pages received against guest memory, with
/// blocks, bytes and rounds); `None` otherwise (the log says the same every 2 s).
fn join_progress_bar(node: &Arc<Node>) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pages = node.mem_size / 4096;
    let shared = node.shared.clone();
    Some(tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new(pages);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "joining [{bar:30}] {pos}/{len} pages {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        loop {
            let j = shared.status().join.unwrap_or_default();
            bar.set_position(j.pages.min(pages));
            bar.set_message(format!(
                "{} blocks, {:.1} MB, round {}, {}",
                j.blocks,
                j.bytes as f64 / 1e6,
                j.rounds + 1,
                j.phase
            ));
            if j.phase == "done" || j.phase == "failed" || shared.role() != Role::Joining {
                bar.finish();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }))
}

fn setup_header(node: &Node, digest_every: u64) -> crate::replay::codec::Header {
    node.setup().log_header(digest_every)
}

/// What the end of the receive task means: `Some((why, last receipt, acked))` when the
/// primary is lost (the node is then deciding to claim).
fn on_stream_end(
    node: &Node,
    e: Result<BackupEnd, tokio::task::JoinError>,
) -> Result<Option<(String, u64, Boundary)>, NodeExit> {
    match e {
        Ok(BackupEnd::PrimaryLost {
            why,
            last_receipt,
            acked,
        }) => {
            tracing::warn!(
                "primary lost: {why}; replaying what was acknowledged (through {acked})"
            );
            node.shared.set_role(Role::Claiming);
            Ok(Some((why, last_receipt, acked)))
        }
        Ok(BackupEnd::BadLog { boundary, what }) => {
            tracing::error!("bad log from the primary at boundary {boundary}: {what}");
            Ok(None)
        }
        Ok(BackupEnd::Complete) | Ok(BackupEnd::Stopped) => Ok(None),
        Err(e) => Err(NodeExit::Failed(format!("receive task: {e}"))),
    }
}

/// DESIGN §5 "Backup loses its primary": the replay has caught up through everything the
/// stream covered (`c.boundary - 1`); no sooner than `failure_timeout` after the last receipt,
/// claim; granted → persist, go live at `c.boundary`, gratuitous ARP, alone; denied → halt.
#[allow(clippy::too_many_arguments)]
async fn backup_failover(
    node: &Arc<Node>,
    decide: &std_mpsc::Sender<Decision>,
    _cmds: &mpsc::UnboundedSender<OutputCmd>,
    c: CaughtUp,
    why: String,
    last_receipt: u64,
    acked: Boundary,
    decided_at: Instant,
) -> Option<NodeExit> {
    let g = node.generation();
    let detection_ms = (now_ns().saturating_sub(last_receipt)) as f64 / 1e6
        - decided_at.elapsed().as_secs_f64() * 1e3;
    let catch_up_ms = c.at.duration_since(decided_at).as_secs_f64() * 1e3;
    // However the connection ended, claim no sooner than failure_timeout after the last
    // receipt: a stopped primary's lease has then run out.
    let earliest = last_receipt + node.cfg.failure_timeout.as_nanos() as u64;
    let now = now_ns();
    if now < earliest {
        tokio::time::sleep(Duration::from_nanos(earliest - now)).await;
    }
    tracing::warn!(
        "caught up at boundary {} (acknowledged through {acked}); claiming generation {}",
        c.boundary,
        g + 1
    );
    let t0 = Instant::now();
    let outcome = node.claim(g).await;
    let claim_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut report = FailoverReport {
        at_s: node.shared.uptime_s(),
        why: format!("primary lost: {why}"),
        from_generation: g,
        detection_ms: detection_ms.max(0.0),
        catch_up_ms,
        claim_ms,
        boundary: c.boundary,
        ..Default::default()
    };
    let exit = match outcome {
        Some(ClaimOutcome::Granted { generation }) => {
            if let Err(e) = node.persist(generation) {
                let _ = decide.send(Decision::Halt("cannot persist the generation".into()));
                return Some(e);
            }
            let t1 = Instant::now();
            let _ = decide.send(Decision::GoLive);
            announce(node);
            node.shared.set_role(Role::Alone);
            node.set_peer_role(None);
            report.to_generation = generation;
            report.go_live_ms = t1.elapsed().as_secs_f64() * 1e3;
            tracing::warn!(
                "granted generation {generation}: live at boundary {} (detection {:.1} ms, catch-up {catch_up_ms:.1} ms, claim {claim_ms:.1} ms)",
                c.boundary, report.detection_ms
            );
            None
        }
        Some(ClaimOutcome::Denied { generation, holder }) => {
            let why = format!(
                "the witness gave the pair to {} (generation {generation}): halting",
                holder.as_deref().unwrap_or("another node")
            );
            let _ = decide.send(Decision::Halt(why.clone()));
            Some(NodeExit::Denied(why))
        }
        None => {
            let _ = decide.send(Decision::Halt("stopping".into()));
            Some(NodeExit::Stopped(node.stop.signalled().unwrap_or(15)))
        }
    };
    record_failover(node, report);
    exit
}

/// Reads and discards what arrives on a backup's TAP until the node goes live.
fn drain_tap(tap: &Tap, live: &AtomicBool, stop: &StopSignal) {
    while !live.load(Ordering::SeqCst) && stop.signalled().is_none() {
        let mut fds = [rustix::event::PollFd::new(
            tap,
            rustix::event::PollFlags::IN,
        )];
        let limit = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        // An interrupted or failed wait just ends this round early.
        let _ = rustix::event::poll(&mut fds, Some(&limit));
        if live.load(Ordering::SeqCst) {
            return;
        }
        while let Ok(Some(_)) = tap.try_read() {}
    }
}
