//! One resync session over an established QUIC connection: the source side
//! ([`serve_connection`]) and the target side ([`pull_connection`], also used by `verify`).
//!
//! `ftvm-node` can run these over its own connections (ALPN [`ftvm_tls::ALPN_RESYNC`]) with a
//! disk it already holds open and locked; `ftvm-resync` wraps them in [`crate::net`].

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quinn::{Connection, RecvStream, SendStream};

use crate::cache::LeafCache;
use crate::hash::{self, Geometry, Hash};
use crate::local::{disk_tree, write_block, zero_leaf, Leaves};
use crate::merkle::{Tree, Walker};
use crate::proto::{expect_msg, read_msg, write_msg, FastOffer, Msg, MAX_NODES, MAX_RUNS, VERSION};
use crate::record::{bitmap_blocks, WrittenBlocks};
use crate::state::PullState;
use crate::stats::{Phase, Stats, Summary};
use crate::{Error, Result};

/// Blocks written between two checkpoints of a pull's resume state (at most): a checkpoint
/// is made at every multiple of this many blocks.
const CHECKPOINT_BLOCKS: usize = 512;
/// Time between two checkpoints (at most).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The fast-path inputs of one side: the leaf cache taken when the generation began and the
/// written-block record since then (shared with the running VMM, if any).
#[derive(Debug, Clone)]
pub struct FastPath {
    pub cache: Arc<LeafCache>,
    pub record: Arc<WrittenBlocks>,
}

impl FastPath {
    /// Loads the sidecars of `disk` (`DISK.ftvm-leaves`, `DISK.ftvm-written`), if both exist
    /// and belong to the same generation and geometry.
    pub fn load_sidecars(disk: &std::path::Path) -> Result<Option<FastPath>> {
        let (cp, rp) = (crate::cache_path(disk), crate::record_path(disk));
        if !cp.exists() || !rp.exists() {
            return Ok(None);
        }
        let cache = LeafCache::load(&cp)?;
        let record = WrittenBlocks::open(&rp)?;
        if cache.generation != record.generation() || cache.geometry != record.geometry() {
            return Err(Error::bad_file(
                cp,
                format!(
                    "leaf cache (generation {}) and record {} (generation {}) do not match",
                    cache.generation,
                    rp.display(),
                    record.generation()
                ),
            ));
        }
        Ok(Some(FastPath {
            cache: Arc::new(cache),
            record: Arc::new(record),
        }))
    }

    /// Starts generation `generation` for the disk open as `file` at `path`: hashes it fully
    /// and writes its leaf cache and an empty written-block record next to it (replacing
    /// earlier ones atomically). Call it when both disks of a pair are known equal (after a
    /// verified resync), on both hosts, with the same generation.
    pub fn baseline(
        file: &File,
        path: &std::path::Path,
        generation: u64,
        block_size: u32,
        stats: &Stats,
    ) -> Result<FastPath> {
        let geo = hash::file_geometry(file, path, block_size)?;
        let tree = disk_tree(
            file,
            path,
            geo,
            Leaves::Full,
            stats,
            &AtomicBool::new(false),
        )?;
        Self::baseline_from_leaves(path, generation, geo, tree.leaves().to_vec())
    }

    /// Like [`baseline`](Self::baseline) with leaf hashes already known (e.g. from a resync
    /// that just ended).
    pub fn baseline_from_leaves(
        path: &std::path::Path,
        generation: u64,
        geo: Geometry,
        leaves: Vec<Hash>,
    ) -> Result<FastPath> {
        let cache = LeafCache {
            generation,
            geometry: geo,
            leaves,
        };
        cache.save(crate::cache_path(path))?;
        let record = WrittenBlocks::create(crate::record_path(path), generation, geo)?;
        Ok(FastPath {
            cache: Arc::new(cache),
            record: Arc::new(record),
        })
    }

    fn usable_for(&self, geo: Geometry) -> bool {
        self.cache.geometry == geo
            && self.record.geometry() == geo
            && self.cache.generation == self.record.generation()
    }
}

/// Fault injection for tests of interruption and bad peers (source side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After sending N blocks, close the connection abruptly (as if the process died).
    CloseAfterBlocks(u64),
    /// After N blocks, send garbage bytes and end the stream.
    GarbageAfterBlocks(u64),
    /// After N blocks, send half a Block message and end the stream.
    TruncateAfterBlocks(u64),
}

/// What the fault did, once it fired.
impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::CloseAfterBlocks(n) => write!(f, "connection closed after {n} blocks"),
            Fault::GarbageAfterBlocks(n) => write!(f, "garbage sent after {n} blocks"),
            Fault::TruncateAfterBlocks(n) => {
                write!(f, "truncated message sent after {n} blocks")
            }
        }
    }
}

/// The source disk served to pulls. The caller keeps whatever lock protects it.
#[derive(Debug)]
pub struct SourceDisk {
    file: File,
    path: PathBuf,
    fast: Option<FastPath>,
    fault: Option<Fault>,
    tree_cache: tokio::sync::Mutex<Option<(TreeKey, Arc<Tree>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TreeKey {
    block_size: u32,
    len: u64,
    mtime: Option<SystemTime>,
}

impl SourceDisk {
    /// Serves `file` (open for reading) with an optional fast path.
    pub fn new(file: File, path: impl Into<PathBuf>, fast: Option<FastPath>) -> Self {
        SourceDisk {
            file,
            path: path.into(),
            fast,
            fault: None,
            tree_cache: tokio::sync::Mutex::new(None),
        }
    }

    /// Injects a fault into every session (tests).
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    fn key(&self, block_size: u32) -> Result<TreeKey> {
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?;
        Ok(TreeKey {
            block_size,
            len: m.len(),
            mtime: m.modified().ok(),
        })
    }
}

/// What a source-side session did.
#[derive(Debug, Clone, Default)]
pub struct ServeReport {
    pub peer: Option<String>,
    pub blocks_sent: u64,
    pub fast_path: bool,
    /// Root verified equal by the client.
    pub verified: bool,
    /// The source's block hashes, when the client verified an equal root (to start a new
    /// generation with [`FastPath::baseline_from_leaves`] without hashing again).
    pub leaves: Vec<Hash>,
}

/// Sets a flag when dropped (stops background hashing when a session ends early).
struct CancelOnDrop(Arc<AtomicBool>);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn conn_err(e: impl std::fmt::Display) -> Error {
    Error::Connection(e.to_string())
}

/// Lazily awaited tree being built in the background.
struct PendingTree {
    task: Option<tokio::task::JoinHandle<Result<Tree>>>,
    tree: Option<Arc<Tree>>,
}

impl PendingTree {
    async fn get(&mut self) -> Result<Arc<Tree>> {
        if let Some(t) = &self.tree {
            return Ok(t.clone());
        }
        let task = self.task.take().expect("tree task");
        let t = Arc::new(
            task.await
                .map_err(|e| Error::Invalid(format!("hashing task: {e}")))??,
        );
        self.tree = Some(t.clone());
        Ok(t)
    }
}

/// Runs the source side of one session on `conn`.
pub async fn serve_connection(
    conn: &Connection,
    src: &SourceDisk,
    stats: &Arc<Stats>,
) -> Result<ServeReport> {
    let mut report = ServeReport {
        peer: ftvm_tls::peer_identity(conn),
        ..Default::default()
    };
    let (mut send, mut recv) = conn.accept_bi().await.map_err(conn_err)?;
    let r = serve_stream(&mut send, &mut recv, src, stats, &mut report).await;
    match &r {
        Ok(()) => {
            // The client ended its stream: the session is over.
            let _ = send.finish();
            conn.close(0u32.into(), b"done");
        }
        Err(Error::Connection(_)) => {}
        Err(e) if matches!(src.fault, Some(Fault::CloseAfterBlocks(_))) => {
            conn.close(99u32.into(), e.to_string().as_bytes());
        }
        Err(e) => {
            let msg = e.to_string();
            let _ = write_msg(
                &mut send,
                &Msg::Error {
                    message: msg.clone(),
                },
            )
            .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(1u32.into(), msg.as_bytes());
        }
    }
    r.map(|()| report)
}

async fn serve_stream(
    send: &mut SendStream,
    recv: &mut RecvStream,
    src: &SourceDisk,
    stats: &Arc<Stats>,
    report: &mut ServeReport,
) -> Result<()> {
    let (version, block_size, offer) = match expect_msg(recv, "Hello").await? {
        Msg::Hello {
            version,
            block_size,
            fast,
        } => (version, block_size, fast),
        m => return Err(Error::Protocol(format!("expected Hello, got {}", m.name()))),
    };
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "unsupported protocol version {version} (this side speaks {VERSION})"
        )));
    }
    let key = src.key(block_size)?;
    let geo = Geometry::new(key.len, block_size).map_err(|e| Error::Protocol(e.to_string()))?;
    let nbytes = geo.blocks().div_ceil(8) as usize;

    // Fast path if both sides have a cache and record of the same generation.
    let fast = match (&offer, &src.fast) {
        (Some(FastOffer { generation, bitmap }), Some(f))
            if f.usable_for(geo) && *generation == f.cache.generation && bitmap.len() == nbytes =>
        {
            let mine = f.record.bitmap();
            let mut union = mine.clone();
            for (u, b) in union.iter_mut().zip(bitmap) {
                *u |= b;
            }
            Some((f.clone(), mine, bitmap_blocks(&union, geo.blocks())))
        }
        _ => None,
    };
    report.fast_path = fast.is_some();
    write_msg(
        send,
        &Msg::Info {
            disk_size: geo.disk_size,
            block_size,
            fast: fast.as_ref().map(|(_, mine, _)| mine.clone()),
        },
    )
    .await?;

    // Build (or reuse) the tree in the background while the client hashes its side.
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let mut tree = PendingTree {
        task: None,
        tree: None,
    };
    let cached = if fast.is_none() {
        src.tree_cache
            .lock()
            .await
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, t)| t.clone())
    } else {
        None
    };
    if let Some(t) = cached {
        tree.tree = Some(t);
    } else {
        let file = src
            .file
            .try_clone()
            .map_err(|e| Error::io("dup", &src.path, e))?;
        let path = src.path.clone();
        let stats2 = stats.clone();
        let cancel2 = cancel.clone();
        let fast2 = fast.as_ref().map(|(f, _, c)| (f.cache.clone(), c.clone()));
        tree.task = Some(tokio::task::spawn_blocking(move || {
            let leaves = match &fast2 {
                Some((cache, cand)) => Leaves::Fast {
                    cache,
                    candidates: cand,
                },
                None => Leaves::Full,
            };
            disk_tree(&file, &path, geo, leaves, &stats2, &cancel2)
        }));
    }

    let mut buf = Vec::new();
    let mut sent = 0u64;
    loop {
        let msg = match read_msg(recv).await? {
            None => return Ok(()),
            Some(m) => m,
        };
        match msg {
            Msg::GetNodes { level, indices } => {
                let t = tree.get().await?;
                if fast.is_none() {
                    *src.tree_cache.lock().await = Some((key.clone(), t.clone()));
                }
                let level = level as usize;
                if level > t.top_level() {
                    return Err(Error::Protocol(format!("no tree level {level}")));
                }
                let mut hashes = Vec::with_capacity(indices.len());
                for i in indices {
                    hashes.push(t.node(level, i).ok_or_else(|| {
                        Error::Protocol(format!("no node {i} on tree level {level}"))
                    })?);
                }
                Stats::add(&stats.hashes_exchanged, hashes.len() as u64);
                write_msg(send, &Msg::Nodes { hashes }).await?;
            }
            Msg::GetBlocks { runs } => {
                stats.set_phase(Phase::Transferring);
                for (start, count) in runs {
                    let end = start
                        .checked_add(count as u64)
                        .filter(|&e| e <= geo.blocks());
                    let Some(end) = end else {
                        return Err(Error::Protocol(format!(
                            "blocks {start}+{count} beyond the end of the disk"
                        )));
                    };
                    for i in start..end {
                        if let Some(f) = src.fault {
                            inject(f, sent, send).await?;
                        }
                        hash::read_block(&src.file, &src.path, geo, i, &mut buf)?;
                        let m = if hash::is_zero(&buf) {
                            Stats::add(&stats.zero_blocks, 1);
                            Msg::Zero { index: i }
                        } else {
                            Stats::add(&stats.data_bytes, buf.len() as u64);
                            Msg::Block {
                                index: i,
                                data: std::mem::take(&mut buf),
                            }
                        };
                        write_msg(send, &m).await?;
                        if let Msg::Block { data, .. } = m {
                            buf = data;
                        }
                        sent += 1;
                        report.blocks_sent = sent;
                        Stats::add(&stats.blocks_sent, 1);
                    }
                }
            }
            Msg::Verify { root } => {
                stats.set_phase(Phase::Verifying);
                let t = tree.get().await?;
                let mine = t.root(geo);
                report.verified = mine == root;
                if report.verified {
                    report.leaves = t.leaves().to_vec();
                }
                write_msg(
                    send,
                    &Msg::Verified {
                        root: mine,
                        equal: mine == root,
                    },
                )
                .await?;
                stats.set_phase(Phase::Done);
            }
            Msg::Error { message } => return Err(Error::Remote(message)),
            m => {
                return Err(Error::Protocol(format!(
                    "unexpected {} from the client",
                    m.name()
                )))
            }
        }
    }
}

async fn inject(f: Fault, sent: u64, send: &mut SendStream) -> Result<()> {
    match f {
        Fault::CloseAfterBlocks(n) if sent >= n => Err(Error::Injected(f)),
        Fault::GarbageAfterBlocks(n) if sent >= n => {
            let _ = send.write_all(&[0xa5; 300]).await;
            let _ = send.finish();
            Err(Error::Injected(f))
        }
        Fault::TruncateAfterBlocks(n) if sent >= n => {
            let m = Msg::Block {
                index: 0,
                data: vec![1; 1000],
            }
            .encode();
            let _ = send.write_all(&m[..m.len() / 2]).await;
            let _ = send.finish();
            Err(Error::Injected(f))
        }
        _ => Ok(()),
    }
}

/// The target disk of a pull or verify. The caller keeps whatever lock protects it.
#[derive(Debug)]
pub struct TargetDisk {
    /// Open read-write for a pull (read-only suffices for verify).
    pub file: File,
    pub path: PathBuf,
}

/// Options of the target side.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub block_size: u32,
    /// Change the target's size to the source's if they differ.
    pub resize: bool,
    /// Only compare: report differing blocks, change nothing.
    pub verify_only: bool,
    /// Fast path inputs of this side (used if the source accepts).
    pub fast: Option<FastPath>,
    /// Where to keep resume state (`None`: no resume).
    pub state_path: Option<PathBuf>,
    /// When set (e.g. by a Ctrl-C handler), the transfer stops at the next block, keeps what
    /// was written for a later resume, and fails with [`Error::Cancelled`].
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Test hook: behave as interrupted after this many blocks were written.
    pub stop_after_blocks: Option<u64>,
    /// Test hook: abort the whole process (a crash, no cleanup) after this many blocks.
    pub crash_after_blocks: Option<u64>,
}

impl PullOptions {
    /// Defaults for a pull into `disk`: 64 KiB blocks, resume state next to the disk.
    pub fn new(disk: &std::path::Path) -> Self {
        PullOptions {
            block_size: hash::DEFAULT_BLOCK_SIZE,
            resize: false,
            verify_only: false,
            fast: None,
            state_path: Some(crate::state_path(disk)),
            interrupt: None,
            stop_after_blocks: None,
            crash_after_blocks: None,
        }
    }
}

fn top_level_for(n: u64) -> usize {
    let mut l = 0;
    let mut len = n;
    while len > 1 {
        len = len.div_ceil(2);
        l += 1;
    }
    l
}

async fn get_nodes(
    send: &mut SendStream,
    recv: &mut RecvStream,
    level: usize,
    indices: &[u64],
    stats: &Stats,
) -> Result<Vec<Hash>> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MAX_NODES) {
        write_msg(
            send,
            &Msg::GetNodes {
                level: level as u8,
                indices: chunk.to_vec(),
            },
        )
        .await?;
        match expect_msg(recv, "Nodes").await? {
            Msg::Nodes { hashes } if hashes.len() == chunk.len() => out.extend(hashes),
            Msg::Nodes { hashes } => {
                return Err(Error::Protocol(format!(
                    "asked for {} nodes, got {}",
                    chunk.len(),
                    hashes.len()
                )))
            }
            m => return Err(Error::Protocol(format!("expected Nodes, got {}", m.name()))),
        }
    }
    Stats::add(&stats.hashes_exchanged, out.len() as u64);
    Ok(out)
}

/// Runs the target side of one session on `conn`: makes `target` equal to the source (or,
/// with `verify_only`, only finds the differing blocks) and verifies the root hash at the end.
pub async fn pull_connection(
    conn: &Connection,
    target: &TargetDisk,
    opts: &PullOptions,
    stats: &Arc<Stats>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    let r = pull_stream(&mut send, &mut recv, target, opts, stats, t0).await;
    let s = conn.stats();
    stats.wire_tx.store(s.udp_tx.bytes, Ordering::Relaxed);
    stats.wire_rx.store(s.udp_rx.bytes, Ordering::Relaxed);
    match r {
        Ok(mut summary) => {
            // End our stream; the source then closes the connection (and does the draining),
            // so this side can exit at once.
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(0u32.into(), b"done");
            summary.wire_bytes = s.udp_tx.bytes + s.udp_rx.bytes;
            Ok(summary)
        }
        Err(e) => {
            // If the connection itself ended, its reason may be clearer than a stream error.
            let e = match (e, conn.close_reason()) {
                (Error::Connection(_), Some(reason)) => Error::Connection(reason.to_string()),
                (e, _) => e,
            };
            if !matches!(e, Error::Remote(_) | Error::Connection(_)) {
                let _ = write_msg(
                    &mut send,
                    &Msg::Error {
                        message: e.to_string(),
                    },
                )
                .await;
            }
            conn.close(1u32.into(), e.to_string().as_bytes());
            Err(e)
        }
    }
}

async fn pull_stream(
    send: &mut SendStream,
    recv: &mut RecvStream,
    target: &TargetDisk,
    opts: &PullOptions,
    stats: &Arc<Stats>,
    t0: Instant,
) -> Result<Summary> {
    stats.set_phase(Phase::Connecting);
    let bs = opts.block_size;
    Geometry::new(0, bs)?;
    write_msg(
        send,
        &Msg::Hello {
            version: VERSION,
            block_size: bs,
            fast: opts.fast.as_ref().map(|f| FastOffer {
                generation: f.record.generation(),
                bitmap: f.record.bitmap(),
            }),
        },
    )
    .await?;
    let (disk_size, server_fast) = match expect_msg(recv, "Info").await? {
        Msg::Info {
            disk_size,
            block_size,
            fast,
        } if block_size == bs => (disk_size, fast),
        Msg::Info { block_size, .. } => {
            return Err(Error::Protocol(format!(
                "source answered block size {block_size}, asked for {bs}"
            )))
        }
        m => return Err(Error::Protocol(format!("expected Info, got {}", m.name()))),
    };
    let local_size = target
        .file
        .metadata()
        .map_err(|e| Error::io("stat", &target.path, e))?
        .len();
    if local_size != disk_size {
        if !opts.resize || opts.verify_only {
            return Err(Error::SizeMismatch {
                source_size: disk_size,
                target_size: local_size,
            });
        }
        target
            .file
            .set_len(disk_size)
            .map_err(|e| Error::io("resize", &target.path, e))?;
    }
    let geo = Geometry::new(disk_size, bs)?;
    let n = geo.blocks();
    stats.blocks_total.store(n, Ordering::Relaxed);

    // Fast path: both sides have a cache + record of the same generation.
    let fast = match (&opts.fast, server_fast) {
        (Some(f), Some(sbits)) if f.usable_for(geo) && sbits.len() == n.div_ceil(8) as usize => {
            let mut union = f.record.bitmap();
            for (u, b) in union.iter_mut().zip(&sbits) {
                *u |= b;
            }
            Some((f.cache.clone(), bitmap_blocks(&union, n)))
        }
        _ => None,
    };

    // Resume state of an earlier, interrupted pull into this disk.
    let mut state = None;
    if let (false, Some(sp)) = (opts.verify_only, &opts.state_path) {
        match PullState::load(sp) {
            Ok(Some(s)) if s.geo == geo => state = Some(s),
            Ok(Some(s)) => s.remove()?,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("ignoring unusable resume state: {e}");
                let _ = std::fs::remove_file(sp);
            }
        }
    }

    // Hash the local side in the background (concurrently with the source). When resuming,
    // only if the source turns out to have changed since the interrupted run.
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let start_hashing = || -> Result<tokio::task::JoinHandle<Result<Tree>>> {
        let file = target
            .file
            .try_clone()
            .map_err(|e| Error::io("dup", &target.path, e))?;
        let path = target.path.clone();
        let (stats, cancel) = (stats.clone(), cancel.clone());
        let fast = fast.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let leaves = match &fast {
                Some((cache, cand)) => Leaves::Fast {
                    cache,
                    candidates: cand,
                },
                None => Leaves::Full,
            };
            disk_tree(&file, &path, geo, leaves, &stats, &cancel)
        }))
    };
    let join = |r: std::result::Result<Result<Tree>, tokio::task::JoinError>| {
        r.map_err(|e| Error::Invalid(format!("hashing task: {e}")))?
    };

    let top = top_level_for(n);
    let mut summary = Summary {
        blocks_compared: n,
        fast_path: fast.is_some(),
        ..Default::default()
    };
    let mut local_tree;
    let differing: Vec<(u64, Hash)>;
    let mut resumed_state = None;
    let source_top;
    if let Some(s) = state.take() {
        let remote_top = if n == 0 {
            [0; 32]
        } else {
            get_nodes(send, recv, top, &[0], stats).await?[0]
        };
        if remote_top == s.source_top {
            local_tree = Tree::from_leaves(s.leaves.clone());
            let pending = s.pending();
            let remote = get_nodes(send, recv, 0, &pending, stats).await?;
            differing = pending.into_iter().zip(remote).collect();
            summary.resumed = true;
            resumed_state = Some(s);
            tracing::info!(
                "resuming an interrupted pull: {} blocks still to transfer",
                differing.len()
            );
        } else {
            tracing::info!("the source changed since the interrupted pull: starting over");
            s.remove()?;
            local_tree = join(start_hashing()?.await)?;
            stats.set_phase(Phase::Comparing);
            differing = walk(send, recv, &local_tree, stats).await?;
        }
        source_top = remote_top;
    } else {
        local_tree = join(start_hashing()?.await)?;
        stats.set_phase(Phase::Comparing);
        differing = walk(send, recv, &local_tree, stats).await?;
        source_top = differing_top(&local_tree, &differing);
    }
    summary.blocks_differing = differing.len() as u64;
    summary.bytes_hashed = Stats::get(&stats.bytes_hashed);
    stats
        .blocks_differing
        .store(differing.len() as u64, Ordering::Relaxed);
    summary.differing_runs = hash::runs_of(differing.iter().map(|&(i, _)| i));

    if opts.verify_only {
        summary.root = local_tree.root(geo);
        summary.hashes_exchanged = Stats::get(&stats.hashes_exchanged);
        summary.elapsed = t0.elapsed();
        stats.set_phase(Phase::Done);
        return Ok(summary);
    }

    if !differing.is_empty() {
        // Write-ahead: the blocks about to change are in the local record before they change.
        if let Some(f) = &opts.fast {
            if f.record.geometry() == geo {
                for &(i, _) in &differing {
                    f.record.mark_block(i);
                }
                f.record.flush()?;
            }
        }
        let mut st = match (resumed_state, &opts.state_path) {
            (Some(s), _) => Some(s),
            (None, Some(sp)) => Some(PullState::create(
                sp,
                geo,
                source_top,
                local_tree.leaves().to_vec(),
                &differing.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
            )?),
            (None, None) => None,
        };
        transfer(
            send,
            recv,
            target,
            geo,
            &differing,
            &mut local_tree,
            st.as_mut(),
            stats,
            &mut summary,
            opts,
        )
        .await?;
        resumed_state = st;
    }

    // Verify the root on both sides.
    stats.set_phase(Phase::Verifying);
    let mine = local_tree.root(geo);
    write_msg(send, &Msg::Verify { root: mine }).await?;
    let (theirs, equal) = match expect_msg(recv, "Verified").await? {
        Msg::Verified { root, equal } => (root, equal),
        m => {
            return Err(Error::Protocol(format!(
                "expected Verified, got {}",
                m.name()
            )))
        }
    };
    if let Some(s) = resumed_state {
        s.remove()?;
    }
    if theirs != mine || !equal {
        return Err(Error::RootMismatch {
            local: hash::hex(&mine),
            remote: hash::hex(&theirs),
        });
    }
    summary.root = mine;
    summary.leaves = local_tree.leaves().to_vec();
    summary.hashes_exchanged = Stats::get(&stats.hashes_exchanged);
    summary.elapsed = t0.elapsed();
    stats.set_phase(Phase::Done);
    Ok(summary)
}

/// The source's top node after a walk: the local tree with the source's differing leaves
/// applied (every other leaf is equal).
fn differing_top(local: &Tree, differing: &[(u64, Hash)]) -> Hash {
    if differing.is_empty() {
        return local.top();
    }
    let mut t = local.clone();
    for &(i, h) in differing {
        t.set_leaf(i, h);
    }
    t.top()
}

async fn walk(
    send: &mut SendStream,
    recv: &mut RecvStream,
    local: &Tree,
    stats: &Stats,
) -> Result<Vec<(u64, Hash)>> {
    let mut w = Walker::new(local);
    while let Some((level, idx)) = w.request() {
        let idx = idx.to_vec();
        let remote = get_nodes(send, recv, level, &idx, stats).await?;
        w.feed(local, &remote).map_err(Error::Protocol)?;
    }
    Ok(w.differing().to_vec())
}

#[allow(clippy::too_many_arguments)]
async fn transfer(
    send: &mut SendStream,
    recv: &mut RecvStream,
    target: &TargetDisk,
    geo: Geometry,
    differing: &[(u64, Hash)],
    tree: &mut Tree,
    mut state: Option<&mut PullState>,
    stats: &Stats,
    summary: &mut Summary,
    opts: &PullOptions,
) -> Result<()> {
    stats.set_phase(Phase::Transferring);
    stats
        .blocks_to_send
        .store(differing.len() as u64, Ordering::Relaxed);
    let runs = hash::runs_of(differing.iter().map(|&(i, _)| i));
    let mut done: Vec<(u64, Hash)> = Vec::new();
    let mut last_cp = Instant::now();

    let checkpoint = |done: &mut Vec<(u64, Hash)>,
                      tree: &mut Tree,
                      state: &mut Option<&mut PullState>|
     -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        target
            .file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &target.path, e))?;
        if let Some(s) = state.as_deref_mut() {
            s.checkpoint(done)?;
        }
        for &(i, h) in done.iter() {
            tree.set_leaf(i, h);
        }
        done.clear();
        Ok(())
    };

    // Requests go out while blocks come in: the writer never waits for the reader, and the
    // source reads a block from disk only when the stream's flow-control window has room.
    let result: Result<()> = async {
        let requests = async {
            let mut pending_runs: Vec<(u64, u32)> = Vec::new();
            for &(s, c) in &runs {
                let mut s = s;
                let mut c = c;
                while c > 0 {
                    let k = c.min(u32::MAX as u64);
                    pending_runs.push((s, k as u32));
                    s += k;
                    c -= k;
                }
            }
            for chunk in pending_runs.chunks(MAX_RUNS) {
                write_msg(
                    send,
                    &Msg::GetBlocks {
                        runs: chunk.to_vec(),
                    },
                )
                .await?;
            }
            Ok::<(), Error>(())
        };
        let receive = async {
            for &(i, want) in differing {
                let interrupted = opts
                    .interrupt
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::Relaxed))
                    || opts.stop_after_blocks == Some(summary.blocks_sent);
                if interrupted {
                    return Err(Error::Cancelled);
                }
                if opts.crash_after_blocks == Some(summary.blocks_sent) {
                    eprintln!("test hook: aborting after {} blocks", summary.blocks_sent);
                    std::process::abort();
                }
                let (idx, data) = match expect_msg(recv, "Block").await? {
                    Msg::Block { index, data } => (index, Some(data)),
                    Msg::Zero { index } => (index, None),
                    m => return Err(Error::Protocol(format!("expected Block, got {}", m.name()))),
                };
                if idx != i {
                    return Err(Error::Protocol(format!(
                        "received block {idx}, expected block {i}"
                    )));
                }
                let (_, len) = geo.block(i);
                let h = match &data {
                    Some(d) if d.len() == len => hash::leaf_hash(d),
                    Some(d) => {
                        return Err(Error::Protocol(format!(
                            "block {i} has {} bytes, expected {len}",
                            d.len()
                        )))
                    }
                    None => zero_leaf(geo, i),
                };
                if h != want {
                    return Err(Error::BlockMismatch { index: i });
                }
                write_block(
                    &target.file,
                    &target.path,
                    geo,
                    i,
                    data.as_deref().unwrap_or(&[]),
                )?;
                match &data {
                    Some(d) => {
                        summary.data_bytes += d.len() as u64;
                        Stats::add(&stats.data_bytes, d.len() as u64);
                    }
                    None => {
                        summary.zero_blocks += 1;
                        Stats::add(&stats.zero_blocks, 1);
                    }
                }
                summary.blocks_sent += 1;
                Stats::add(&stats.blocks_sent, 1);
                done.push((i, h));
                // At every multiple of CHECKPOINT_BLOCKS blocks, whatever checkpoints time
                // added in between (so a crash after N blocks always keeps at least the last
                // multiple below N), and at least every CHECKPOINT_INTERVAL.
                let by_count = summary.blocks_sent.is_multiple_of(CHECKPOINT_BLOCKS as u64);
                if by_count || last_cp.elapsed() >= CHECKPOINT_INTERVAL {
                    checkpoint(&mut done, tree, &mut state)?;
                    last_cp = Instant::now();
                }
            }
            Ok(())
        };
        tokio::try_join!(requests, receive).map(|_| ())
    }
    .await;
    // Whatever happened, keep what was written: a rerun resumes from here.
    let cp = checkpoint(&mut done, tree, &mut state);
    result.and(cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_matches_tree() {
        for n in [0u64, 1, 2, 3, 4, 5, 1000, 1025] {
            let t = Tree::from_leaves(vec![[0; 32]; n as usize]);
            assert_eq!(top_level_for(n), t.top_level(), "n={n}");
        }
    }
}
