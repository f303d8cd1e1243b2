//! Joining a running primary without stopping it (DESIGN §5 "Cold start and joining"), both
//! sides.
//!
//! The primary (running alone) and the joiner speak on the joiner's channel connection:
//!
//! ```text
//! joiner  → Hello
//! primary → Join {generation, log version, block size, blocks}
//! joiner  → BlockHashes (one per disk block)
//! primary → Blocks* Pages*          round 1: every differing block, every page with data
//!                                   (protocol 3: the joiner cleared its memory)
//! primary → (Blocks | Pages)*       rounds 2..: what the guest dirtied meanwhile
//!           ── pause: the vCPU thread takes the last dirty pages and blocks, saves the
//!              state, restarts the recorder for the boundaries after it, and hands the
//!              connection to the output task (the commit point) ──
//! primary → Pages* Blocks* JoinState {generation, digest_every, disk root, state}
//! primary → Log …                   the ordinary stream, from the boundary after the state
//! joiner  → Ack …                   only after it restored the state and persisted the
//!                                   generation
//! ```
//!
//! Before the commit point a failed join leaves the primary alone as it was (it never held
//! output for the joiner). From it on the joiner is the backup: the Output Rule applies, and
//! losing it is backup loss (hold, claim, alone).

use std::fs::File;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use disksync::hash::Geometry;
use tokio::sync::{mpsc, oneshot};

use super::status::Shared;
use crate::channel::connect::{self, Link};
use crate::channel::msg::{self, Msg, MsgReader};
use crate::channel::primary::ToChannel;
use crate::join::blocks::{root_of, BlockBatch, BlockWrites};
use crate::join::rounds::{Next, RoundPolicy, Rounds};
use crate::kvm::memory::GuestPages;
use crate::machine::{Machine, PauseHandle};
use crate::replay::codec::Header;
use crate::replay::recorder::RecordSwitch;
use crate::state::dirty::{DirtyConsumer, DirtyTracker, Since};
use crate::state::pages::{pages_with_data, PageBatch, PageData};

/// Work the node hands to the vCPU thread, run while the machine is paused between two
/// boundaries.
pub type VcpuJob = Box<dyn FnOnce(&mut Machine) + Send>;

/// How long either side waits for the next message of a join before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary waits for a joiner to apply a round (the first one writes every page
/// of a fresh machine: seconds per GiB here).
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the primary needs to serve a join: handles on the running machine.
pub struct JoinSource {
    /// The machine's dirty-page tracker.
    pub tracker: Arc<DirtyTracker>,
    /// Guest memory, readable from any thread.
    pub pages: GuestPages,
    /// Pauses the machine.
    pub pause: PauseHandle,
    /// Jobs for the vCPU thread (run at the pause).
    pub jobs: std_mpsc::Sender<VcpuJob>,
    /// The disk's write tracker and a handle on the disk for reading (no disk: `None`).
    pub disk: Option<(Arc<BlockWrites>, File)>,
    /// Restarts the recorder for the joiner's log.
    pub switch: RecordSwitch,
    /// The header of the log the joiner gets.
    pub header: Header,
    /// The output task's queue (the commit point goes through it, in order with the log).
    pub tx: mpsc::UnboundedSender<ToChannel>,
    /// How pre-copy stops iterating.
    pub policy: RoundPolicy,
}

/// A joiner, with what it said in its hello.
pub struct JoinRequest {
    /// Its connection.
    pub link: Link,
    /// Its reader.
    pub reader: MsgReader,
    /// Its log versions (already checked against ours).
    pub log_version: u16,
    /// The channel protocol version both speak.
    pub protocol: u16,
}

/// The bytes a join cannot avoid sending: every distinct page sent with data and every
/// distinct disk block sent, once (what the benchmark compares the bytes sent against).
struct Needed {
    pages: Vec<bool>,
    blocks: Vec<bool>,
    bytes: u64,
}

impl Needed {
    fn new(pages: u64, blocks: u64) -> Self {
        Needed {
            pages: vec![false; pages as usize],
            blocks: vec![false; blocks as usize],
            bytes: 0,
        }
    }
    fn pages(&mut self, b: &PageBatch) {
        for (p, d) in &b.pages {
            if let PageData::Bytes(_) = d {
                if let Some(seen) = self.pages.get_mut(*p as usize) {
                    if !*seen {
                        *seen = true;
                        self.bytes += 4096;
                    }
                }
            }
        }
    }
    fn blocks(&mut self, b: &BlockBatch) {
        for (i, d) in &b.blocks {
            if let Some(seen) = self.blocks.get_mut(*i as usize) {
                if !*seen {
                    *seen = true;
                    self.bytes += d.len() as u64;
                }
            }
        }
    }
}

async fn send(link: &mut Link, m: &Msg, bytes: &mut u64) -> Result<(), String> {
    let mut buf = Vec::new();
    msg::encode(m, &mut buf);
    *bytes += buf.len() as u64;
    link.send
        .write_all(&buf)
        .await
        .map_err(|e| format!("sending to the joiner: {e}"))
}

/// Pages a round reads between two looks at what the guest wrote again (4 MiB).
const PEEK_PAGES: usize = 1024;

/// Sends the pages of `dirty` (this round's set, taken from `precopy`), in batches; returns how
/// many. A page the guest wrote again since the set was taken is skipped: it is still in
/// `precopy`'s record, so the next round (or the pause) sends its newer contents once instead
/// of this one now and that one later. With `skip_zero` (the first round, to a joiner whose
/// memory is all zero) all-zero pages are left out.
async fn send_pages(
    link: &mut Link,
    pages: &GuestPages,
    dirty: &crate::state::dirty::DirtyPages,
    precopy: &DirtyConsumer,
    skip_zero: bool,
    needed: &mut Needed,
    bytes: &mut u64,
) -> Result<(u64, u64), String> {
    let list: Vec<u64> = if skip_zero {
        // The pages with data first, then only those, in one burst: a page sent early in a
        // long scan of mostly empty memory would have longer to be written again.
        super::priority::blocking(|| pages_with_data(pages, dirty.iter()))
            .map_err(|e| format!("reading guest memory: {e}"))?
    } else {
        dirty.iter().collect()
    };
    let (mut n, mut skipped) = (0, 0);
    for chunk in list.chunks(PEEK_PAGES) {
        let again = precopy.peek().map_err(|e| format!("dirty tracking: {e}"))?;
        let mut it = chunk
            .iter()
            .copied()
            .filter(|&p| !again.contains(p))
            .peekable();
        while it.peek().is_some() {
            let mut batch = super::priority::blocking(|| PageBatch::read(pages, &mut it))
                .map_err(|e| format!("reading guest memory: {e}"))?;
            if skip_zero {
                batch.pages.retain(|(_, d)| !matches!(d, PageData::Zero));
                if batch.pages.is_empty() {
                    continue;
                }
            }
            n += batch.pages.len() as u64;
            needed.pages(&batch);
            send(
                link,
                &Msg::Pages {
                    bytes: batch.encode(),
                },
                bytes,
            )
            .await?;
        }
        skipped += chunk.iter().filter(|&&p| again.contains(p)).count() as u64;
    }
    Ok((n, skipped))
}

/// Sends blocks `list` of the disk, updating `leaves` with what was read; returns how many.
/// With `writes`, a block the guest wrote again since `list` was taken is skipped: the next
/// set has it.
#[allow(clippy::too_many_arguments)]
async fn send_blocks(
    link: &mut Link,
    disk: &File,
    geo: Geometry,
    list: &[u64],
    writes: Option<&BlockWrites>,
    leaves: &mut [[u8; 32]],
    needed: &mut Needed,
    bytes: &mut u64,
) -> Result<u64, String> {
    let mut it = list
        .iter()
        .copied()
        .filter(|&i| !writes.is_some_and(|w| w.pending(i)))
        .peekable();
    let mut n = 0;
    while it.peek().is_some() {
        let batch = super::priority::blocking(|| BlockBatch::read(disk, geo, &mut it))
            .map_err(|e| format!("reading the disk: {e}"))?;
        for (i, d) in &batch.blocks {
            leaves[*i as usize] = disksync::hash::leaf_hash(d);
        }
        n += batch.blocks.len() as u64;
        needed.blocks(&batch);
        send(
            link,
            &Msg::Blocks {
                bytes: batch.encode(),
            },
            bytes,
        )
        .await?;
    }
    Ok(n)
}

/// The primary's side: copies disk and memory to the joiner while the guest runs, then pauses
/// it and commits. `Ok` once the joiner is attached as backup (the output task has it);
/// `Err` with why the join failed before the commit point (the primary is alone as before).
pub async fn serve_join(
    src: &JoinSource,
    req: JoinRequest,
    generation: u64,
    shared: &Shared,
) -> Result<(), String> {
    let t_start = Instant::now();
    let JoinRequest {
        mut link,
        mut reader,
        log_version,
        protocol,
    } = req;
    let peer = link.peer.clone();
    let mut bytes = 0u64;
    let geo = src.disk.as_ref().map(|(w, _)| w.geometry());
    let disk_blocks = geo.map_or(0, |g| g.blocks());
    shared.update_join(|j| {
        *j = super::status::JoinReport {
            peer: peer.clone(),
            phase: "copying".into(),
            disk_blocks,
            ..Default::default()
        }
    });
    send(
        &mut link,
        &Msg::Join {
            log_version,
            generation,
            block_size: geo.map_or(disksync::DEFAULT_BLOCK_SIZE, |g| g.block_size),
            blocks: disk_blocks,
        },
        &mut bytes,
    )
    .await?;
    let theirs = match connect::recv_msg(&mut link.recv, &mut reader, STEP_TIMEOUT).await {
        Ok(Msg::BlockHashes { hashes }) => hashes,
        Ok(other) => return Err(format!("the joiner sent {other:?}, not its block hashes")),
        Err(e) => return Err(format!("no block hashes from the joiner: {e}")),
    };
    if theirs.len() as u64 != disk_blocks {
        return Err(format!(
            "the joiner listed {} blocks, the disk has {disk_blocks}",
            theirs.len()
        ));
    }
    // Tracking starts before anything is read: whatever is written from here on is sent
    // again.
    let precopy: DirtyConsumer = src
        .tracker
        .subscribe(Since::Everything)
        .map_err(|e| format!("dirty tracking: {e}"))?;
    if let Some((w, _)) = &src.disk {
        w.start();
    }
    let stop_tracking = || {
        if let Some((w, _)) = &src.disk {
            w.stop();
        }
    };
    let mut needed = Needed::new(src.pages.pages(), disk_blocks);
    let r = copy_rounds(
        src,
        &mut link,
        &mut reader,
        &precopy,
        &theirs,
        protocol >= msg::ZERO_PAGES_PROTOCOL,
        shared,
        &mut needed,
        &mut bytes,
    )
    .await;
    let leaves = match r {
        Ok(l) => l,
        Err(e) => {
            stop_tracking();
            return Err(e);
        }
    };
    // The pause: everything else happens on the vCPU thread, which then hands the
    // connection to the output task.
    shared.update_join(|j| j.phase = "pausing".into());
    let (done_tx, done_rx) = oneshot::channel();
    let job = final_job(FinalJob {
        precopy,
        pages: src.pages.clone(),
        disk: src
            .disk
            .as_ref()
            .map(|(w, f)| (w.clone(), f.try_clone().map_err(|e| e.to_string())))
            .map(|(w, f)| f.map(|f| (w, f)))
            .transpose()?,
        leaves,
        geo,
        needed,
        link,
        reader,
        switch: src.switch.clone(),
        header: src.header.clone(),
        tx: src.tx.clone(),
        generation,
        requested: Instant::now(),
        done: done_tx,
    });
    if src.jobs.send(job).is_err() {
        stop_tracking();
        return Err("the vCPU thread has ended".into());
    }
    src.pause.request();
    let fin = match tokio::time::timeout(STEP_TIMEOUT, done_rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => {
            stop_tracking();
            return Err("the VM ended before the pause".into());
        }
        Err(_) => {
            stop_tracking();
            return Err("the guest did not pause within 10 s".into());
        }
    };
    let fin = fin.inspect_err(|_| stop_tracking())?;
    shared.update_join(|j| {
        j.phase = "done".into();
        j.pause_ms = fin.pause.as_secs_f64() * 1e3;
        j.pause_pages = fin.pages;
        j.pause_blocks = fin.blocks;
        j.pages += fin.pages;
        j.blocks += fin.blocks;
        j.bytes = bytes + fin.bytes;
        j.needed_bytes = fin.needed;
        j.boundary = fin.boundary;
        j.total_ms = t_start.elapsed().as_secs_f64() * 1e3;
    });
    tracing::info!(
        "join of {peer}: committed at boundary {} (pause {:.1} ms: {} pages, {} blocks, {} bytes; whole join {:.0} ms)",
        fin.boundary,
        fin.pause.as_secs_f64() * 1e3,
        fin.pages,
        fin.blocks,
        fin.bytes,
        t_start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The rounds while the guest runs; returns the primary's leaf hashes as last read. With
/// `zero_joiner` (the joiner cleared its memory) the first round leaves out all-zero pages.
#[allow(clippy::too_many_arguments)]
async fn copy_rounds(
    src: &JoinSource,
    link: &mut Link,
    reader: &mut MsgReader,
    precopy: &DirtyConsumer,
    theirs: &[[u8; 32]],
    zero_joiner: bool,
    shared: &Shared,
    needed: &mut Needed,
    bytes: &mut u64,
) -> Result<Vec<[u8; 32]>, String> {
    let mut rounds = Rounds::new(src.policy);
    let mut leaves: Vec<[u8; 32]> = Vec::new();
    // Round 1, disk: every block whose hash differs from the joiner's.
    if let Some((w, disk)) = &src.disk {
        let geo = w.geometry();
        leaves = super::priority::blocking(|| crate::join::blocks::hash_disk(disk, geo))
            .map_err(|e| format!("hashing the disk: {e}"))?;
        let differing: Vec<u64> = (0..geo.blocks())
            .filter(|&i| leaves[i as usize] != theirs[i as usize])
            .collect();
        tracing::info!(
            "join of {}: {} of {} disk blocks differ",
            link.peer,
            differing.len(),
            geo.blocks()
        );
        shared.update_join(|j| j.blocks_differing = differing.len() as u64);
        let n = send_blocks(
            link,
            disk,
            geo,
            &differing,
            Some(w.as_ref()),
            &mut leaves,
            needed,
            bytes,
        )
        .await?;
        shared.update_join(|j| j.blocks += n);
    }
    loop {
        // After the first round: if what was dirtied since fits the pause, pause now instead
        // of sending it once now and its re-dirtied part again in the pause.
        if rounds.done() >= 1 {
            let pages = precopy
                .peek()
                .map_err(|e| format!("dirty tracking: {e}"))?
                .count();
            let blocks = src
                .disk
                .as_ref()
                .map_or(0, |(w, _)| w.count() * u64::from(w.geometry().block_size));
            let dirty = pages * ftvm_abi::layout::PAGE_SIZE + blocks;
            if src.policy.fits_the_pause(dirty) {
                tracing::info!(
                    "join of {}: pausing after {} rounds ({dirty} bytes dirty since: they go in the pause)",
                    link.peer,
                    rounds.done()
                );
                return Ok(leaves);
            }
        }
        let before = *bytes;
        let dirty = precopy.take().map_err(|e| format!("dirty tracking: {e}"))?;
        let blocks = src.disk.as_ref().map(|(w, _)| w.take());
        // What the guest writes meanwhile is hot: `send_pages` and `send_blocks` leave it for
        // the next round or the pause instead of sending it now and again then.
        tokio::time::sleep(src.policy.hot_sample).await;
        let first = rounds.done() == 0;
        let (np, skipped) = send_pages(
            link,
            &src.pages,
            &dirty,
            precopy,
            zero_joiner && first,
            needed,
            bytes,
        )
        .await?;
        let mut nb = 0;
        if let (Some((w, disk)), Some(list)) = (&src.disk, blocks) {
            nb = send_blocks(
                link,
                disk,
                w.geometry(),
                &list,
                Some(w.as_ref()),
                &mut leaves,
                needed,
                bytes,
            )
            .await?;
        }
        // Wait until the joiner has applied what it got: the pause must find it caught up.
        let round = rounds.done() + 1;
        send(link, &Msg::RoundDone { round }, bytes).await?;
        match connect::recv_msg(&mut link.recv, reader, APPLY_TIMEOUT).await {
            Ok(Msg::RoundApplied { round: r }) if r == round => {}
            Ok(other) => return Err(format!("the joiner answered round {round} with {other:?}")),
            Err(e) => return Err(format!("the joiner did not apply round {round}: {e}")),
        }
        let sent = *bytes - before;
        let next = rounds.after(sent);
        shared.update_join(|j| {
            j.rounds = rounds.done();
            j.pages += np;
            j.blocks += nb;
            j.bytes = *bytes;
        });
        tracing::debug!(
            "join of {}: round {}: {np} pages ({skipped} written again, left for later), {nb} blocks, {sent} bytes",
            link.peer,
            rounds.done()
        );
        if let Next::Pause(why) = next {
            tracing::info!(
                "join of {}: pausing after {} rounds ({})",
                link.peer,
                rounds.done(),
                why.name()
            );
            return Ok(leaves);
        }
    }
}

struct FinalJob {
    precopy: DirtyConsumer,
    pages: GuestPages,
    disk: Option<(Arc<BlockWrites>, File)>,
    leaves: Vec<[u8; 32]>,
    geo: Option<Geometry>,
    needed: Needed,
    link: Link,
    reader: MsgReader,
    switch: RecordSwitch,
    header: Header,
    tx: mpsc::UnboundedSender<ToChannel>,
    generation: u64,
    requested: Instant,
    done: oneshot::Sender<Result<Final, String>>,
}

/// What the pause did.
struct Final {
    boundary: u64,
    pages: u64,
    blocks: u64,
    bytes: u64,
    needed: u64,
    pause: Duration,
}

/// The vCPU thread's part of the pause: the last dirty pages and blocks, the state, the
/// recorder restarted for the boundaries after it, and the connection handed to the output
/// task with all of that as its preamble — the commit point.
fn final_job(j: FinalJob) -> VcpuJob {
    Box::new(move |m: &mut Machine| {
        let FinalJob {
            precopy,
            pages,
            disk,
            mut leaves,
            geo,
            mut needed,
            link,
            reader,
            switch,
            header,
            tx,
            generation,
            requested,
            done,
        } = j;
        let r = (|| -> Result<(Vec<u8>, u64, u64, u64), String> {
            let mut pre = Vec::new();
            let dirty = precopy.take().map_err(|e| format!("dirty tracking: {e}"))?;
            let mut it = dirty.iter().peekable();
            let mut np = 0;
            while it.peek().is_some() {
                let b = PageBatch::read(&pages, &mut it).map_err(|e| e.to_string())?;
                np += b.pages.len() as u64;
                needed.pages(&b);
                msg::encode(&Msg::Pages { bytes: b.encode() }, &mut pre);
            }
            let mut nb = 0;
            if let (Some((w, f)), Some(geo)) = (&disk, geo) {
                let list = w.take();
                w.stop();
                let mut it = list.into_iter().peekable();
                while it.peek().is_some() {
                    let b = BlockBatch::read(f, geo, &mut it).map_err(|e| e.to_string())?;
                    for (i, d) in &b.blocks {
                        leaves[*i as usize] = disksync::hash::leaf_hash(d);
                    }
                    nb += b.blocks.len() as u64;
                    needed.blocks(&b);
                    msg::encode(&Msg::Blocks { bytes: b.encode() }, &mut pre);
                }
            }
            let state = m
                .save_state()
                .map_err(|e| format!("saving the VM state: {e}"))?;
            let disk_root = geo.map_or([0; 32], |g| root_of(&leaves, g));
            msg::encode(
                &Msg::JoinState {
                    generation,
                    digest_every: header.digest_every,
                    disk_root,
                    state: state.encode(),
                },
                &mut pre,
            );
            Ok((pre, np, nb, state.boundary))
        })();
        drop(precopy);
        let out = match r {
            Ok((preamble, pages, blocks, boundary)) => {
                let bytes = preamble.len() as u64;
                // From the next boundary on the recorder writes the joiner's log; the output
                // task sends the preamble first and applies the Output Rule from here on.
                switch.start(header);
                match tx.send(ToChannel::Attach {
                    link,
                    reader,
                    preamble,
                    from: boundary,
                }) {
                    Ok(()) => Ok(Final {
                        boundary,
                        pages,
                        blocks,
                        bytes,
                        needed: needed.bytes,
                        pause: requested.elapsed(),
                    }),
                    Err(_) => {
                        switch.stop();
                        Err("the output task has ended".into())
                    }
                }
            }
            Err(e) => {
                if let Some((w, _)) = &disk {
                    w.stop();
                }
                Err(e)
            }
        };
        let _ = done.send(out);
    })
}

/// A piece of the copy for the joiner's vCPU thread.
pub enum JoinPart {
    /// Guest pages (a `PageBatch` encoding).
    Pages(Vec<u8>),
    /// Answer once every earlier part is applied.
    Sync(oneshot::Sender<()>),
    /// The final state (the encoded `VmState`) and the primary's `digest_every`.
    State {
        /// The encoded state.
        state: Vec<u8>,
        /// The log header's `digest_every`.
        digest_every: u64,
    },
}

/// The joiner's disk during a join.
pub struct JoinDisk {
    /// A handle on the disk (the machine has its own).
    pub file: File,
    /// Its geometry.
    pub geo: Geometry,
    /// Its leaf hashes, kept current as blocks arrive.
    pub leaves: Vec<[u8; 32]>,
}

/// What the joiner's copy ended with.
pub struct Copied {
    /// The generation to adopt.
    pub generation: u64,
}

/// The joiner's side of the copy: sends its block hashes, writes the blocks it gets into its
/// disk, passes pages and the state to the vCPU thread (`parts`), and checks the disk's
/// root against the primary's. Returns when the state was passed on.
pub async fn receive_copy(
    link: &mut Link,
    reader: &mut MsgReader,
    mut disk: Option<JoinDisk>,
    parts: std_mpsc::Sender<JoinPart>,
    shared: &Shared,
) -> Result<Copied, String> {
    let hashes = disk.as_ref().map(|d| d.leaves.clone()).unwrap_or_default();
    let mut bytes = 0u64;
    send(link, &Msg::BlockHashes { hashes }, &mut bytes).await?;
    let t0 = Instant::now();
    let mut last_note = Instant::now();
    loop {
        let m = connect::recv_msg(&mut link.recv, reader, STEP_TIMEOUT)
            .await
            .map_err(|e| format!("the copy from the primary stopped: {e}"))?;
        match m {
            Msg::Blocks { bytes: b } => {
                let Some(d) = disk.as_mut() else {
                    return Err("the primary sent disk blocks to a node without a disk".into());
                };
                bytes += b.len() as u64;
                let batch = BlockBatch::decode(&b, d.geo).map_err(|e| e.to_string())?;
                super::priority::blocking(|| batch.apply(&d.file, d.geo, &mut d.leaves))
                    .map_err(|e| format!("writing the disk: {e}"))?;
                shared.update_join(|j| {
                    j.blocks += batch.blocks.len() as u64;
                    j.bytes = bytes;
                });
            }
            Msg::Pages { bytes: b } => {
                bytes += b.len() as u64;
                // The batch's page count (its first field; the batch is decoded and checked
                // on the vCPU thread).
                let n = b
                    .get(..4)
                    .map_or(0, |c| u32::from_le_bytes(c.try_into().expect("4")) as u64);
                if parts.send(JoinPart::Pages(b)).is_err() {
                    return Err("the vCPU thread has ended".into());
                }
                shared.update_join(|j| {
                    j.pages += n;
                    j.bytes = bytes;
                });
            }
            Msg::JoinState {
                generation,
                digest_every,
                disk_root,
                state,
            } => {
                let t_state = Instant::now();
                if let Some(d) = &disk {
                    super::priority::blocking(|| d.file.sync_data())
                        .map_err(|e| format!("syncing the disk: {e}"))?;
                    let ours = root_of(&d.leaves, d.geo);
                    if ours != disk_root {
                        return Err(format!(
                            "after the copy the disk's root is {}, the primary's {}",
                            disksync::hash::hex(&ours),
                            disksync::hash::hex(&disk_root)
                        ));
                    }
                }
                bytes += state.len() as u64;
                tracing::info!(
                    "joining: the state arrived; the disk synced and its root checked in {:.1} ms",
                    t_state.elapsed().as_secs_f64() * 1e3
                );
                shared.update_join(|j| {
                    j.bytes = bytes;
                    j.phase = "restoring".into();
                });
                if parts
                    .send(JoinPart::State {
                        state,
                        digest_every,
                    })
                    .is_err()
                {
                    return Err("the vCPU thread has ended".into());
                }
                return Ok(Copied { generation });
            }
            Msg::RoundDone { round } => {
                // Blocks are made durable round by round, so the commit's sync is small.
                if let Some(d) = &disk {
                    super::priority::blocking(|| d.file.sync_data())
                        .map_err(|e| format!("syncing the disk: {e}"))?;
                }
                let (tx, rx) = oneshot::channel();
                if parts.send(JoinPart::Sync(tx)).is_err() {
                    return Err("the vCPU thread has ended".into());
                }
                rx.await
                    .map_err(|_| "the vCPU thread failed applying the copy".to_string())?;
                send(link, &Msg::RoundApplied { round }, &mut bytes).await?;
                shared.update_join(|j| j.rounds = round);
            }
            other => return Err(format!("unexpected message during the copy: {other:?}")),
        }
        if last_note.elapsed() >= Duration::from_secs(2) {
            let j = shared.status().join.unwrap_or_default();
            tracing::info!(
                "joining: {} pages, {} blocks, {:.1} MB received in {:.1} s",
                j.pages,
                j.blocks,
                bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
    }
}
