//! Recorded client histories and the checks run on them afterwards: no acknowledged write
//! lost, no stale or impossible read, and — from the nodes' and the witness's own records —
//! never two primaries (DESIGN §7).
//!
//! # The history
//!
//! Every client operation is an [`Op`]: who issued it, the key, the call (`SET` of a value
//! unique in the whole history, `INCR`, `GET`), when it was sent and when its reply arrived
//! (nanoseconds on one monotonic clock), and the [`Outcome`]: answered, refused with an error
//! reply (not applied), or never answered (a timeout or a broken connection: *possibly*
//! applied — either outcome is fine). After the run every key is read once more on a fresh
//! connection (the *final reads*). [`check_kv`] then checks, per key:
//!
//! * **registers** (keys only ever `SET`): the final value is the value of a write that no
//!   acknowledged write followed in real time (one completed before the other began) — else
//!   the later acknowledged writes are **lost**; a `GET` returns a value some `SET` wrote,
//!   not one sent only after the `GET` completed, and not one that an acknowledged write
//!   begun after it completed had already replaced before the `GET` began — else the read is
//!   **stale** (a `nil` after an acknowledged write counts too: keys are never deleted);
//! * **counters** (keys only ever `INCR`ed): acknowledged results are distinct (a repeat means
//!   an acknowledged increment was lost: **lost**); an `INCR` that began after another
//!   completed returns more (else **stale**); no result exceeds the number of `INCR`s sent
//!   before it completed (a value never written: **stale**); the final value is at least every
//!   acknowledged result (else each acknowledged result above it is **lost**).
//!
//! These are the checks of a linearizable register and counter that can be made one
//! operation at a time (sound, not complete: a history they pass may still not be
//! linearizable in some corner they do not look at).
//!
//! # Split brain
//!
//! [`check_split_brain`] merges the nodes' release logs (node.toml `release_log`: one
//! [`Release`] per batch of output frames written to the TAP) and the witness's decisions
//! ([`parse_witness_grants`]: the `claim` lines of `ftvm-witness --log-json serve`): no
//! generation granted to two nodes; no node releasing under a generation the witness did not
//! grant it; no two nodes' release intervals overlapping; and no release under a generation
//! after another node released under a newer one (a fenced primary's late output). Each
//! [`SplitBrain`] is one episode (a batch overlapped, a node's late generation), however
//! many of the other node's batches it involves.
//!
//! # The simple writer
//!
//! [`start_writer`] / [`verify`] are the one-connection form the failover tests use: a
//! writer issues `SET <prefix>:<i> <unique value>` and `INCR <prefix>:ctr` one after another
//! on **one** TCP connection (a failover must not break it); [`verify`] reads every key back
//! and runs [`check_kv`] on the history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

// ---------------------------------------------------------------------------------------
// The recorded history
// ---------------------------------------------------------------------------------------

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `SET key value` (the value unique in the history).
    Set(String),
    /// `INCR key`.
    Incr,
    /// `GET key`.
    Get,
}

/// A server's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` (SET).
    Ok,
    /// `:n` (INCR).
    Int(i64),
    /// A bulk string or nil (GET).
    Value(Option<String>),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered: acknowledged.
    Done(Reply),
    /// Answered with an error reply (`-ERR …`): not applied.
    Refused(String),
    /// Never answered (a timeout, a broken connection; the text says which): possibly
    /// applied.
    Unknown(String),
}

/// One client operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// The client that issued it (its operations are sequential).
    pub client: u32,
    /// The key.
    pub key: String,
    /// The call.
    pub call: Call,
    /// When it was sent (ns on the history's clock).
    pub invoked: u64,
    /// When its answer arrived (None: never).
    pub completed: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
}

impl Op {
    fn is_write(&self) -> bool {
        !matches!(self.call, Call::Get)
    }

    fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Done(_))
    }

    /// One line for a history dump.
    pub fn line(&self) -> String {
        let call = match &self.call {
            Call::Set(v) => format!("SET {} {v}", self.key),
            Call::Incr => format!("INCR {}", self.key),
            Call::Get => format!("GET {}", self.key),
        };
        let out = match &self.outcome {
            Outcome::Done(Reply::Ok) => "OK".to_string(),
            Outcome::Done(Reply::Int(n)) => format!(":{n}"),
            Outcome::Done(Reply::Value(Some(v))) => format!("{v:?}"),
            Outcome::Done(Reply::Value(None)) => "nil".to_string(),
            Outcome::Refused(e) => format!("refused {e}"),
            Outcome::Unknown(e) => format!("unknown ({e})"),
        };
        let done = self
            .completed
            .map_or_else(|| "-".to_string(), |c| ms(c).to_string());
        format!(
            "c{} {:.3} {} {call} -> {out}",
            self.client,
            ms(self.invoked),
            done
        )
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// What [`check_kv`] found.
#[derive(Debug, Default, Clone)]
pub struct KvReport {
    /// Acknowledged writes (SET and INCR) in the history.
    pub acked_writes: usize,
    /// One line per acknowledged write lost.
    pub lost: Vec<String>,
    /// One line per stale or impossible read (GET, or the read half of an INCR).
    pub stale: Vec<String>,
    /// Problems of the history itself (a value written twice, a key both SET and INCRed, a
    /// key with writes but no final read).
    pub malformed: Vec<String>,
}

impl KvReport {
    /// True when nothing was lost, nothing stale, the history well-formed.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.stale.is_empty() && self.malformed.is_empty()
    }
}

/// Checks a history against the final reads (`key → value`, read after every operation
/// ended); see the module documentation for the rules.
pub fn check_kv(ops: &[Op], finals: &BTreeMap<String, Option<String>>) -> KvReport {
    let mut r = KvReport::default();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
        if op.is_write() && op.acked() {
            r.acked_writes += 1;
        }
    }
    for (key, kops) in by_key {
        let sets = kops.iter().any(|o| matches!(o.call, Call::Set(_)));
        let incrs = kops.iter().any(|o| matches!(o.call, Call::Incr));
        let fin = finals.get(key).map(|v| v.as_deref());
        if fin.is_none() && (sets || incrs) {
            r.malformed
                .push(format!("{key}: written, but no final read was made"));
        }
        match (sets, incrs) {
            (true, true) => r.malformed.push(format!(
                "{key}: both SET and INCRed (the checker cannot tell)"
            )),
            (_, true) => check_counter(key, &kops, fin, &mut r),
            _ => check_register(key, &kops, fin, &mut r),
        }
    }
    r
}

/// Acknowledged writes of one key sorted by completion, with a running maximum of their
/// invocation times: "the latest-begun acknowledged write completed before `t`".
struct Acked<'a> {
    by_completion: Vec<(u64, &'a Op)>,
    /// `max_invoked[i]`: the op with the latest invocation among `by_completion[..=i]`.
    max_invoked: Vec<&'a Op>,
}

impl<'a> Acked<'a> {
    fn new(ops: impl Iterator<Item = &'a Op>) -> Self {
        let mut by_completion: Vec<(u64, &Op)> =
            ops.filter_map(|o| o.completed.map(|c| (c, o))).collect();
        by_completion.sort_by_key(|(c, _)| *c);
        let mut max_invoked: Vec<&Op> = Vec::with_capacity(by_completion.len());
        for (_, o) in &by_completion {
            let m = match max_invoked.last() {
                Some(p) if p.invoked >= o.invoked => *p,
                _ => *o,
            };
            max_invoked.push(m);
        }
        Acked {
            by_completion,
            max_invoked,
        }
    }

    /// Of the acknowledged writes completed strictly before `t`, the one begun last.
    fn latest_before(&self, t: u64) -> Option<&'a Op> {
        let n = self.by_completion.partition_point(|(c, _)| *c < t);
        n.checked_sub(1).map(|i| self.max_invoked[i])
    }
}

fn check_register(key: &str, ops: &[&Op], fin: Option<Option<&str>>, r: &mut KvReport) {
    // Every value that may be on the server: acknowledged or possibly applied writes.
    let mut writes: HashMap<&str, &Op> = HashMap::new();
    let mut refused: BTreeSet<&str> = BTreeSet::new();
    for o in ops {
        if let Call::Set(v) = &o.call {
            if matches!(o.outcome, Outcome::Refused(_)) {
                refused.insert(v);
            } else if writes.insert(v, o).is_some() {
                r.malformed
                    .push(format!("{key}: the value {v:?} was written twice"));
            }
        }
    }
    let acked = Acked::new(
        ops.iter()
            .copied()
            .filter(|o| matches!(o.call, Call::Set(_)) && o.acked()),
    );
    let describe = |o: &Op| o.line();
    for g in ops.iter().filter(|o| matches!(o.call, Call::Get)) {
        let (Outcome::Done(Reply::Value(v)), Some(gc)) = (&g.outcome, g.completed) else {
            continue;
        };
        match v {
            None => {
                if let Some(w) = acked.latest_before(g.invoked) {
                    r.stale.push(format!(
                        "{key}: [{}] read nil after [{}] was acknowledged",
                        describe(g),
                        describe(w)
                    ));
                }
            }
            Some(v) => match writes.get(v.as_str()) {
                None => r.stale.push(format!(
                    "{key}: [{}] read a value never written{}",
                    describe(g),
                    if refused.contains(v.as_str()) {
                        " (its SET was refused)"
                    } else {
                        ""
                    }
                )),
                Some(w) if w.invoked > gc => r.stale.push(format!(
                    "{key}: [{}] read the value of [{}], sent only after the read completed",
                    describe(g),
                    describe(w)
                )),
                Some(w) => {
                    if let (Some(wc), Some(later)) = (w.completed, acked.latest_before(g.invoked)) {
                        if later.invoked > wc {
                            r.stale.push(format!(
                                "{key}: [{}] read the value of [{}], which [{}] had replaced \
                                 (acknowledged before the read began)",
                                describe(g),
                                describe(w),
                                describe(later)
                            ));
                        }
                    }
                }
            },
        }
    }
    let Some(fin) = fin else { return };
    let acked_sets = || acked.by_completion.iter().map(|(_, o)| *o);
    match fin {
        None => {
            for w in acked_sets() {
                r.lost
                    .push(format!("{key}: [{}] lost: the key is gone", describe(w)));
            }
        }
        Some(v) => match writes.get(v) {
            None => {
                r.stale.push(format!(
                    "{key}: the final read returned {v:?}, a value never written"
                ));
                for w in acked_sets() {
                    r.lost.push(format!(
                        "{key}: [{}] lost: the key holds {v:?}",
                        describe(w)
                    ));
                }
            }
            Some(w) => {
                // A write that was never answered may have been applied last of all.
                if let Some(wc) = w.completed {
                    for l in acked_sets().filter(|l| l.invoked > wc) {
                        r.lost.push(format!(
                            "{key}: [{}] lost: the key holds the earlier [{}]",
                            describe(l),
                            describe(w)
                        ));
                    }
                }
            }
        },
    }
}

fn check_counter(key: &str, ops: &[&Op], fin: Option<Option<&str>>, r: &mut KvReport) {
    let results: Vec<(&Op, i64)> = ops
        .iter()
        .filter_map(|o| match (&o.call, &o.outcome) {
            (Call::Incr, Outcome::Done(Reply::Int(n))) => Some((*o, *n)),
            _ => None,
        })
        .collect();
    // INCRs that may have been applied, by invocation time.
    let mut sent: Vec<u64> = ops
        .iter()
        .filter(|o| matches!(o.call, Call::Incr) && !matches!(o.outcome, Outcome::Refused(_)))
        .map(|o| o.invoked)
        .collect();
    sent.sort_unstable();
    let sent_before = |t: u64| sent.partition_point(|&i| i < t) as i64;
    let mut seen: HashMap<i64, &Op> = HashMap::new();
    for (o, n) in &results {
        if let Some(first) = seen.insert(*n, o) {
            r.lost.push(format!(
                "{key}: [{}] repeats the result of [{}]: an acknowledged increment was lost",
                o.line(),
                first.line()
            ));
        }
    }
    // Real-time order: by completion, with the running maximum result.
    let mut by_completion: Vec<(u64, &Op, i64)> = results
        .iter()
        .filter_map(|(o, n)| o.completed.map(|c| (c, *o, *n)))
        .collect();
    by_completion.sort_by_key(|(c, _, _)| *c);
    let mut running: Vec<(&Op, i64)> = Vec::with_capacity(by_completion.len());
    for (_, o, n) in &by_completion {
        let m = match running.last() {
            Some((p, pm)) if *pm >= *n => (*p, *pm),
            _ => (*o, *n),
        };
        running.push(m);
    }
    let max_before = |t: u64| {
        let k = by_completion.partition_point(|(c, _, _)| *c < t);
        k.checked_sub(1).map(|i| running[i])
    };
    let mut read = |o: &Op, n: i64, what: &str| {
        let oc = o.completed.unwrap_or(u64::MAX);
        if let Some((p, m)) = max_before(o.invoked) {
            if m > n {
                r.stale.push(format!(
                    "{key}: [{}] {what} {n}, though [{}] had returned {m} before it began",
                    o.line(),
                    p.line()
                ));
            }
        }
        let possible = sent_before(oc);
        if n > possible || n < 0 {
            r.stale.push(format!(
                "{key}: [{}] {what} {n}, a value never written ({possible} INCRs sent by then)",
                o.line()
            ));
        }
    };
    for (o, n) in &results {
        read(o, *n, "returned");
    }
    let mut unreadable = Vec::new();
    for g in ops.iter().filter(|o| matches!(o.call, Call::Get)) {
        if let Outcome::Done(Reply::Value(v)) = &g.outcome {
            match v.as_deref().map(str::parse::<i64>) {
                None => read(g, 0, "read"),
                Some(Ok(n)) => read(g, n, "read"),
                Some(Err(_)) => {
                    unreadable.push(format!("{key}: [{}] read a value never written", g.line()))
                }
            }
        }
    }
    r.stale.extend(unreadable);
    let Some(fin) = fin else { return };
    let c = match fin.map(str::parse::<i64>) {
        None => 0,
        Some(Ok(c)) => c,
        Some(Err(_)) => {
            r.stale.push(format!(
                "{key}: the final read returned {fin:?}, not a counter"
            ));
            -1
        }
    };
    for (o, n) in &results {
        if *n > c {
            r.lost
                .push(format!("{key}: [{}] lost: the counter reads {c}", o.line()));
        }
    }
    if c > sent.len() as i64 {
        r.stale.push(format!(
            "{key}: the final read returned {c}, more than the {} INCRs ever sent",
            sent.len()
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Split brain
// ---------------------------------------------------------------------------------------

/// One batch of output a node wrote to its TAP (a line of its `release_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Unix ns before the first TAP write.
    pub first_ns: u64,
    /// Unix ns after the last.
    pub last_ns: u64,
    /// The node.
    pub node: String,
    /// The generation it ran in.
    pub generation: u64,
    /// Frames in the batch.
    pub frames: u64,
    /// The highest boundary of the batch.
    pub boundary: u64,
}

/// Parses a release log (`<first ns> <last ns> <node> <generation> <frames> <boundary>` per
/// line); returns the releases and the lines it could not parse (a line torn by a kill -9).
pub fn parse_releases(text: &str) -> (Vec<Release>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        match (num(0), num(1), f.get(2), num(3), num(4), num(5), f.len()) {
            (Some(a), Some(b), Some(n), Some(g), Some(fr), Some(bd), 6) => out.push(Release {
                first_ns: a,
                last_ns: b,
                node: n.to_string(),
                generation: g,
                frames: fr,
                boundary: bd,
            }),
            _ => bad.push(line.to_string()),
        }
    }
    (out, bad)
}

/// The releases as the wire saw them: every guest frame a capture saw arrive from a node's
/// host ([`crate::capture::WireFrame`]) becomes a release of one frame at the instant it
/// reached the fabric, under the generation of the node's logged batch it belongs to: the
/// batch whose interval holds it (a frame is written, and so arrives, inside its batch's
/// interval); else the node's latest batch begun before it (a batch whose log line a
/// `kill -9` cut off: the node was still in that generation); else its first batch. A frame
/// of a node that logged no batch at all is left out and counted.
pub fn wire_releases(
    frames: &[crate::capture::WireFrame],
    logged: &[Release],
) -> (Vec<Release>, usize) {
    let mut by_node: BTreeMap<&str, Vec<&Release>> = BTreeMap::new();
    for r in logged {
        by_node.entry(&r.node).or_default().push(r);
    }
    for v in by_node.values_mut() {
        v.sort_by_key(|r| (r.first_ns, r.last_ns));
    }
    let (mut out, mut unattributed) = (Vec::new(), 0);
    for f in frames {
        let Some(batches) = by_node.get(f.node.as_str()) else {
            unattributed += 1;
            continue;
        };
        // Batches begun no later than the frame; the last of them holds it if any does.
        let i = batches.partition_point(|r| r.first_ns <= f.unix_ns);
        let b = if i > 0 { batches[i - 1] } else { batches[0] };
        out.push(Release {
            first_ns: f.unix_ns,
            last_ns: f.unix_ns,
            node: f.node.clone(),
            generation: b.generation,
            frames: 1,
            boundary: b.boundary,
        });
    }
    (out, unattributed)
}

/// A generation the witness granted (or granted again to the same claim).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The pair.
    pub pair: String,
    /// The generation.
    pub generation: u64,
    /// The node it went to.
    pub node: String,
    /// The claim it answered.
    pub claim_id: String,
}

/// The grants in a witness log written with `ftvm-witness --log-json serve` (its
/// `event=claim` lines with `decision` granted or regranted).
pub fn parse_witness_grants(text: &str) -> Vec<Grant> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| v.get(k).or_else(|| v.get("fields").and_then(|f| f.get(k)));
        if field("event").and_then(|e| e.as_str()) != Some("claim") {
            continue;
        }
        if !matches!(
            field("decision").and_then(|d| d.as_str()),
            Some("granted" | "regranted")
        ) {
            continue;
        }
        let s = |k: &str| {
            field(k)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        out.push(Grant {
            pair: s("pair"),
            generation: field("generation").and_then(|g| g.as_u64()).unwrap_or(0),
            node: s("node"),
            claim_id: s("claim_id"),
        });
    }
    out
}

/// One sign of two primaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitBrain {
    /// The witness granted one generation to more than one node.
    GrantedTwice {
        /// The generation.
        generation: u64,
        /// The nodes.
        nodes: Vec<String>,
    },
    /// A node released under a generation the witness did not grant it.
    Ungranted {
        /// The node.
        node: String,
        /// The generation.
        generation: u64,
        /// How many batches.
        batches: usize,
        /// Whom the witness granted it to (empty: nobody).
        holders: Vec<String>,
    },
    /// Another node released while this batch was being written (one episode per batch).
    Overlap {
        /// The batch that began first.
        batch: Release,
        /// The first of the other node's batches that began inside it.
        other: Release,
        /// How many of the other node's batches began inside it.
        others: usize,
    },
    /// A node released under a generation after another node had released under a newer
    /// one (one episode per node and generation).
    Late {
        /// The first late batch.
        first: Release,
        /// How many late batches that node released under that generation.
        batches: usize,
        /// The newer generation's release that came before it.
        newer: Release,
    },
}

impl SplitBrain {
    /// The batch of the superseded primary, where there is one: for an overlap the batch of
    /// the older generation, for a late release the first late batch.
    pub fn stale_batch(&self) -> Option<&Release> {
        match self {
            SplitBrain::Overlap { batch, other, .. } => {
                Some(if other.generation < batch.generation {
                    other
                } else {
                    batch
                })
            }
            SplitBrain::Late { first, .. } => Some(first),
            _ => None,
        }
    }

    /// For a late release: how many batches were late.
    pub fn late_batches(&self) -> usize {
        match self {
            SplitBrain::Late { batches, .. } => *batches,
            _ => 1,
        }
    }
}

impl std::fmt::Display for SplitBrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
        match self {
            SplitBrain::GrantedTwice { generation, nodes } => write!(
                f,
                "generation {generation} was granted to {} nodes: {nodes:?}",
                nodes.len()
            ),
            SplitBrain::Ungranted {
                node,
                generation,
                batches,
                holders,
            } => write!(
                f,
                "{node} released {batches} batch(es) under generation {generation}, {}",
                if holders.is_empty() {
                    "never granted".to_string()
                } else {
                    format!("granted to {holders:?}")
                }
            ),
            SplitBrain::Overlap {
                batch,
                other,
                others,
            } => write!(
                f,
                "{} released a batch (generation {}, {} frames) from {} to {} ns ({:.1} ms) while \
                 {} released {others} batch(es) under generation {}, the first at {} ns",
                batch.node,
                batch.generation,
                batch.frames,
                batch.first_ns,
                batch.last_ns,
                ms(batch.first_ns, batch.last_ns),
                other.node,
                other.generation,
                other.first_ns
            ),
            SplitBrain::Late {
                first,
                batches,
                newer,
            } => write!(
                f,
                "{} released {batches} batch(es) under generation {} (the first at {} ns) after {} \
                 had released under generation {} at {} ns ({:.1} ms before)",
                first.node,
                first.generation,
                first.first_ns,
                newer.node,
                newer.generation,
                newer.first_ns,
                ms(newer.first_ns, first.first_ns)
            ),
        }
    }
}

/// Every sign of two primaries in the releases and grants (empty: none), one entry per
/// episode: a generation granted to two nodes; a node releasing under a generation not
/// granted to it (per node and generation); another node releasing while a batch was being
/// written (per batch); a release under a generation after another node released under a
/// newer one (per node and generation).
pub fn check_split_brain(releases: &[Release], grants: &[Grant]) -> Vec<SplitBrain> {
    let mut out = Vec::new();
    let mut holders: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for g in grants {
        holders.entry(g.generation).or_default().insert(&g.node);
    }
    for (g, nodes) in &holders {
        if nodes.len() > 1 {
            out.push(SplitBrain::GrantedTwice {
                generation: *g,
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
            });
        }
    }
    let mut sorted: Vec<&Release> = releases.iter().collect();
    sorted.sort_by_key(|r| (r.first_ns, r.last_ns));
    let mut ungranted: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for r in &sorted {
        let ok = holders
            .get(&r.generation)
            .is_some_and(|n| n.contains(r.node.as_str()));
        if !ok {
            *ungranted.entry((&r.node, r.generation)).or_default() += 1;
        }
    }
    for ((node, g), n) in ungranted {
        out.push(SplitBrain::Ungranted {
            node: node.to_string(),
            generation: g,
            batches: n,
            holders: holders
                .get(&g)
                .map(|h| h.iter().map(|n| n.to_string()).collect())
                .unwrap_or_default(),
        });
    }
    // Overlaps: the latest-ending batch of every node so far; an episode per batch overlapped.
    let mut open: BTreeMap<&str, &Release> = BTreeMap::new();
    let mut overlapped: BTreeMap<(&str, u64), (&Release, &Release, usize)> = BTreeMap::new();
    for r in &sorted {
        for (node, o) in &open {
            if *node != r.node && o.last_ns >= r.first_ns {
                overlapped
                    .entry((&o.node, o.first_ns))
                    .and_modify(|e| e.2 += 1)
                    .or_insert((o, r, 1));
            }
        }
        match open.get(r.node.as_str()) {
            Some(o) if o.last_ns >= r.last_ns => {}
            _ => {
                open.insert(&r.node, r);
            }
        }
    }
    for (batch, other, others) in overlapped.into_values() {
        out.push(SplitBrain::Overlap {
            batch: batch.clone(),
            other: other.clone(),
            others,
        });
    }
    // A superseded generation releasing after another node released under a newer one.
    let mut newest: BTreeMap<&str, &Release> = BTreeMap::new();
    let mut late: BTreeMap<(&str, u64), (usize, &Release, &Release)> = BTreeMap::new();
    for r in &sorted {
        let newer = newest
            .iter()
            .filter(|(n, x)| **n != r.node && x.generation > r.generation)
            .map(|(_, x)| *x)
            .max_by_key(|x| x.generation);
        if let Some(n) = newer {
            late.entry((&r.node, r.generation))
                .and_modify(|e| e.0 += 1)
                .or_insert((1, r, n));
        }
        match newest.get(r.node.as_str()) {
            Some(x) if x.generation >= r.generation => {}
            _ => {
                newest.insert(&r.node, r);
            }
        }
    }
    for (batches, first, newer) in late.into_values() {
        out.push(SplitBrain::Late {
            first: first.clone(),
            batches,
            newer: newer.clone(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// A RESP client
// ---------------------------------------------------------------------------------------

/// A RESP request.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// Reads one RESP reply as text (`+OK`, `:5`, `-ERR …`, or the bulk string's content, `$-1`
/// as `(nil)`).
fn read_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let line = line.trim_end().to_string();
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.parse().unwrap_or(-1);
        if n < 0 {
            return Ok("(nil)".into());
        }
        let mut buf = vec![0u8; n as usize + 2];
        std::io::Read::read_exact(r, &mut buf)?;
        buf.truncate(n as usize);
        return Ok(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(line)
}

/// A reply of the RESP client [`Conn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// `+…`.
    Simple(String),
    /// `-…`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$…` (None: `$-1`).
    Bulk(Option<String>),
}

/// One client connection speaking RESP.
pub struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    /// Connects to `addr`:6379 (the calling thread must be in the client's namespace).
    pub fn connect(addr: Ipv4Addr, connect: Duration, reply: Duration) -> std::io::Result<Conn> {
        let c = TcpStream::connect_timeout(&SocketAddr::from((addr, 6379)), connect)?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(reply))?;
        c.set_write_timeout(Some(reply))?;
        Ok(Conn {
            w: c.try_clone()?,
            r: BufReader::new(c),
        })
    }

    /// Sends one request and reads its reply.
    pub fn call(&mut self, args: &[&str]) -> std::io::Result<Resp> {
        self.w.write_all(&resp(args))?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let bad = |l: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, l.to_string());
        let line = line.trim_end_matches(['\r', '\n']);
        let (tag, rest) = line.split_at(line.len().min(1));
        match tag {
            "+" => Ok(Resp::Simple(rest.to_string())),
            "-" => Ok(Resp::Error(rest.to_string())),
            ":" => rest.parse().map(Resp::Int).map_err(|_| bad(line)),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad(line))?;
                if n < 0 {
                    return Ok(Resp::Bulk(None));
                }
                let mut buf = vec![0u8; n as usize + 2];
                std::io::Read::read_exact(&mut self.r, &mut buf)?;
                buf.truncate(n as usize);
                Ok(Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned())))
            }
            _ => Err(bad(line)),
        }
    }
}

/// Reads every key in `keys` on a fresh connection from `ns` (retrying connection problems
/// for up to `limit`): the final reads of a history.
pub fn read_finals(
    ns: &Netns,
    addr: Ipv4Addr,
    keys: Vec<String>,
    limit: Duration,
) -> Result<BTreeMap<String, Option<String>>> {
    let h = spawn_in_netns(ns, move || -> Result<BTreeMap<String, Option<String>>> {
        let deadline = Instant::now() + limit;
        let mut last_err = String::new();
        while Instant::now() < deadline {
            let attempt = || -> Result<BTreeMap<String, Option<String>>> {
                let mut c = Conn::connect(addr, Duration::from_secs(5), Duration::from_secs(15))?;
                let mut out = BTreeMap::new();
                for k in &keys {
                    match c.call(&["GET", k])? {
                        Resp::Bulk(v) => {
                            out.insert(k.clone(), v);
                        }
                        other => bail!("GET {k}: {other:?}"),
                    }
                }
                Ok(out)
            };
            match attempt() {
                Ok(m) => return Ok(m),
                Err(e) => last_err = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("the final reads failed for {limit:?}: {last_err}")
    })?;
    h.join()
        .map_err(|_| anyhow::anyhow!("the final reader panicked"))?
}

/// Runs `f` on a new thread inside `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let path = format!("/run/netns/{}", ns.name());
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    Ok(std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open netns file descriptor changes only this thread's network
        // namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    }))
}

// ---------------------------------------------------------------------------------------
// The simple one-connection writer of the failover tests
// ---------------------------------------------------------------------------------------

/// One operation of a [`History`].
#[derive(Clone, Debug)]
pub struct WriterOp {
    /// `SET` or `INCR`.
    pub kind: &'static str,
    /// The key.
    pub key: String,
    /// The value written (SET).
    pub value: String,
    /// When it was sent.
    pub invoked: Instant,
    /// When its reply arrived (None: never acknowledged).
    pub completed: Option<Instant>,
    /// The reply (`+OK`, `:17`, or an error).
    pub reply: Option<String>,
}

/// What a writer did.
#[derive(Debug)]
pub struct History {
    /// Every operation, in order.
    pub ops: Vec<WriterOp>,
    /// A connection error, if the writer's connection broke (a failover must not cause one).
    pub client_error: Option<String>,
    /// The longest time between two consecutive replies.
    pub max_gap: Duration,
    /// The clock origin of [`History::to_ops`].
    pub epoch: Instant,
}

impl Default for History {
    fn default() -> Self {
        History {
            ops: Vec::new(),
            client_error: None,
            max_gap: Duration::ZERO,
            epoch: Instant::now(),
        }
    }
}

impl History {
    /// Acknowledged operations.
    pub fn acked(&self) -> usize {
        self.ops.iter().filter(|o| o.completed.is_some()).count()
    }

    /// The history as checker operations (client 0).
    pub fn to_ops(&self) -> Vec<Op> {
        let ns = |t: Instant| t.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.ops
            .iter()
            .map(|o| {
                let outcome = match (&o.reply, o.kind) {
                    (None, _) => Outcome::Unknown(
                        self.client_error
                            .clone()
                            .unwrap_or_else(|| "no reply".into()),
                    ),
                    (Some(r), _) if r.starts_with('-') => Outcome::Refused(r.clone()),
                    (Some(r), "INCR") => match r.trim_start_matches(':').parse() {
                        Ok(n) => Outcome::Done(Reply::Int(n)),
                        Err(_) => Outcome::Refused(format!("unexpected reply {r:?}")),
                    },
                    (Some(_), _) => Outcome::Done(Reply::Ok),
                };
                Op {
                    client: 0,
                    key: o.key.clone(),
                    call: if o.kind == "INCR" {
                        Call::Incr
                    } else {
                        Call::Set(o.value.clone())
                    },
                    invoked: ns(o.invoked),
                    completed: o.completed.map(ns),
                    outcome,
                }
            })
            .collect()
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged writes.
    pub acked: usize,
    /// Acknowledged writes lost (a SET not readable with its value, an INCR repeated or
    /// above the counter's final value).
    pub lost: Vec<String>,
    /// Stale or impossible results (an INCR going backwards in real time, a value never
    /// written) and problems of the history itself.
    pub incr_anomalies: Vec<String>,
    /// Error replies.
    pub errors: Vec<String>,
}

impl Verdict {
    /// True when nothing was lost, no anomaly, no error.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.incr_anomalies.is_empty() && self.errors.is_empty()
    }
}

/// Starts a writer in `ns` against `addr`:6379 until `stop` is set. Each reply may take up to
/// `reply_timeout` (a failover's pause included).
pub fn start_writer(
    ns: &Netns,
    addr: Ipv4Addr,
    prefix: &str,
    stop: Arc<AtomicBool>,
    reply_timeout: Duration,
) -> Result<std::thread::JoinHandle<History>> {
    let prefix = prefix.to_string();
    spawn_in_netns(ns, move || writer(addr, &prefix, &stop, reply_timeout))
}

fn writer(addr: Ipv4Addr, prefix: &str, stop: &AtomicBool, reply_timeout: Duration) -> History {
    let mut h = History::default();
    let conn =
        match TcpStream::connect_timeout(&SocketAddr::from((addr, 6379)), Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                h.client_error = Some(format!("connect: {e}"));
                return h;
            }
        };
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(reply_timeout));
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let mut last = Instant::now();
    let mut i = 0u64;
    let ctr = format!("{prefix}:ctr");
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (kind, key, value) = if i.is_multiple_of(2) {
            ("INCR", ctr.clone(), String::new())
        } else {
            (
                "SET",
                format!("{prefix}:{i}"),
                format!("v{i}-{}", i.wrapping_mul(2654435761) % 1_000_003),
            )
        };
        let req = if kind == "SET" {
            resp(&["SET", &key, &value])
        } else {
            resp(&["INCR", &key])
        };
        let invoked = Instant::now();
        h.ops.push(WriterOp {
            kind,
            key,
            value,
            invoked,
            completed: None,
            reply: None,
        });
        if let Err(e) = w.write_all(&req) {
            h.client_error = Some(format!("write: {e}"));
            break;
        }
        match read_reply(&mut r) {
            Ok(rep) => {
                let now = Instant::now();
                h.max_gap = h.max_gap.max(now - last);
                last = now;
                let op = h.ops.last_mut().expect("pushed");
                op.completed = Some(now);
                op.reply = Some(rep);
            }
            Err(e) => {
                h.client_error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    h
}

/// Checks `hist` against the service at `addr` (every key read on a fresh connection from
/// `ns`, then [`check_kv`]).
pub fn verify(ns: &Netns, addr: Ipv4Addr, hist: &History) -> Result<Verdict> {
    let keys: BTreeSet<String> = hist.ops.iter().map(|o| o.key.clone()).collect();
    let finals = read_finals(
        ns,
        addr,
        keys.into_iter().collect(),
        Duration::from_secs(20),
    )?;
    let ops = hist.to_ops();
    let report = check_kv(&ops, &finals);
    let mut v = Verdict {
        acked: report.acked_writes,
        lost: report.lost,
        incr_anomalies: report.stale,
        errors: Vec::new(),
    };
    v.incr_anomalies.extend(report.malformed);
    for o in &hist.ops {
        if let Some(r) = o.reply.as_ref().filter(|r| r.starts_with('-')) {
            v.errors.push(format!("{} {}: {r}", o.kind, o.key));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn op(client: u32, key: &str, call: Call, t: (u64, Option<u64>), out: Outcome) -> Op {
        Op {
            client,
            key: key.into(),
            call,
            invoked: t.0 * MS,
            completed: t.1.map(|c| c * MS),
            outcome: out,
        }
    }
    fn set(c: u32, k: &str, v: &str, a: u64, b: u64) -> Op {
        op(
            c,
            k,
            Call::Set(v.into()),
            (a, Some(b)),
            Outcome::Done(Reply::Ok),
        )
    }
    fn set_unknown(c: u32, k: &str, v: &str, a: u64) -> Op {
        op(
            c,
            k,
            Call::Set(v.into()),
            (a, None),
            Outcome::Unknown("timeout".into()),
        )
    }
    fn get(c: u32, k: &str, v: Option<&str>, a: u64, b: u64) -> Op {
        op(
            c,
            k,
            Call::Get,
            (a, Some(b)),
            Outcome::Done(Reply::Value(v.map(str::to_string))),
        )
    }
    fn incr(c: u32, k: &str, n: i64, a: u64, b: u64) -> Op {
        op(c, k, Call::Incr, (a, Some(b)), Outcome::Done(Reply::Int(n)))
    }
    fn finals(kv: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = vec![
            set(0, "k", "a", 0, 2),
            get(1, "k", Some("a"), 3, 4),
            set(1, "k", "b", 5, 6),
            // Concurrent with the write of c: either value is fine.
            set(0, "k", "c", 7, 10),
            get(1, "k", Some("b"), 8, 9),
            get(1, "k", Some("c"), 11, 12),
            incr(0, "n", 1, 0, 1),
            incr(1, "n", 2, 2, 3),
            incr(0, "n", 3, 4, 5),
        ];
        let r = check_kv(&ops, &finals(&[("k", Some("c")), ("n", Some("3"))]));
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.acked_writes, 6);
    }

    #[test]
    fn an_acknowledged_write_missing_at_the_end_is_lost() {
        let ops = vec![set(0, "k", "a", 0, 1), set(0, "k", "b", 2, 3)];
        let r = check_kv(&ops, &finals(&[("k", Some("a"))]));
        assert_eq!(r.lost.len(), 1, "{r:?}");
        assert!(r.lost[0].contains("SET k b"), "{r:?}");
        assert!(r.stale.is_empty());
        // Gone altogether: both are lost.
        let r = check_kv(&ops, &finals(&[("k", None)]));
        assert_eq!(r.lost.len(), 2, "{r:?}");
    }

    #[test]
    fn a_write_never_acknowledged_may_or_may_not_be_there() {
        let ops = vec![set(0, "k", "a", 0, 1), set_unknown(0, "k", "b", 2)];
        assert!(check_kv(&ops, &finals(&[("k", Some("a"))])).ok());
        assert!(check_kv(&ops, &finals(&[("k", Some("b"))])).ok());
        // Acknowledged after the unknown one began: b may still have landed last.
        let ops = vec![set_unknown(0, "k", "b", 0), set(1, "k", "a", 1, 2)];
        assert!(check_kv(&ops, &finals(&[("k", Some("b"))])).ok());
    }

    #[test]
    fn a_stale_read_is_reported() {
        let ops = vec![
            set(0, "k", "a", 0, 1),
            set(0, "k", "b", 2, 3),
            get(1, "k", Some("a"), 4, 5),
        ];
        let r = check_kv(&ops, &finals(&[("k", Some("b"))]));
        assert_eq!(r.stale.len(), 1, "{r:?}");
        assert!(r.stale[0].contains("had replaced"), "{r:?}");
        assert!(r.lost.is_empty(), "{r:?}");
        // A nil after an acknowledged write is stale too.
        let ops = vec![set(0, "k", "a", 0, 1), get(1, "k", None, 2, 3)];
        assert_eq!(check_kv(&ops, &finals(&[("k", Some("a"))])).stale.len(), 1);
        // A read overlapping the write may see the old value.
        let ops = vec![
            set(0, "k", "a", 0, 1),
            set(0, "k", "b", 2, 6),
            get(1, "k", Some("a"), 4, 5),
        ];
        assert!(check_kv(&ops, &finals(&[("k", Some("b"))])).ok());
    }

    #[test]
    fn a_value_never_written_is_reported() {
        let ops = vec![
            set(0, "k", "a", 0, 1),
            get(1, "k", Some("zzz"), 2, 3),
            // Read before its write was even sent.
            get(1, "k", Some("late"), 4, 5),
            set(0, "k", "late", 6, 7),
        ];
        let r = check_kv(&ops, &finals(&[("k", Some("late"))]));
        assert_eq!(r.stale.len(), 2, "{r:?}");
    }

    #[test]
    fn counter_anomalies_are_reported() {
        // A repeated result: an acknowledged increment was lost.
        let ops = vec![incr(0, "n", 1, 0, 1), incr(1, "n", 1, 2, 3)];
        let r = check_kv(&ops, &finals(&[("n", Some("1"))]));
        assert_eq!(r.lost.len(), 1, "{r:?}");
        // Going backwards in real time.
        let unknown = |c| {
            op(
                c,
                "n",
                Call::Incr,
                (0, None),
                Outcome::Unknown("reset".into()),
            )
        };
        let ops = vec![
            incr(0, "n", 3, 0, 1),
            unknown(1),
            unknown(2),
            incr(3, "n", 2, 2, 3),
        ];
        let r = check_kv(&ops, &finals(&[("n", Some("3"))]));
        assert_eq!(r.stale.len(), 1, "{r:?}");
        assert!(r.lost.is_empty(), "{r:?}");
        // Below the last acknowledged result at the end.
        let ops = vec![incr(0, "n", 1, 0, 1), incr(0, "n", 2, 2, 3)];
        let r = check_kv(&ops, &finals(&[("n", Some("1"))]));
        assert_eq!(r.lost.len(), 1, "{r:?}");
        // More than was ever sent.
        let ops = vec![incr(0, "n", 5, 0, 1)];
        let r = check_kv(&ops, &finals(&[("n", Some("5"))]));
        assert_eq!(r.stale.len(), 2, "{r:?}");
    }

    fn rel(node: &str, g: u64, a: u64, b: u64) -> Release {
        Release {
            first_ns: a,
            last_ns: b,
            node: node.into(),
            generation: g,
            frames: 1,
            boundary: 0,
        }
    }
    fn grant(g: u64, node: &str) -> Grant {
        Grant {
            pair: "kv1".into(),
            generation: g,
            node: node.into(),
            claim_id: format!("c{g}{node}"),
        }
    }

    #[test]
    fn a_clean_release_history_passes() {
        let rels = vec![
            rel("a", 1, 10, 20),
            rel("a", 1, 30, 40),
            rel("b", 2, 50, 60),
            rel("a", 3, 70, 80),
        ];
        let grants = vec![grant(1, "a"), grant(2, "b"), grant(2, "b"), grant(3, "a")];
        assert_eq!(check_split_brain(&rels, &grants), Vec::<SplitBrain>::new());
    }

    #[test]
    fn the_wire_decides_when_a_batch_that_spans_a_stop_really_left() {
        use crate::capture::WireFrame;
        let wire = |node: &str, t: u64| WireFrame {
            unix_ns: t,
            node: node.into(),
        };
        // a's last batch under 1 spans 100..900 (stopped after its writes, resumed at 900);
        // b went live under 2 at 300.
        let logged = vec![
            rel("a", 1, 10, 20),
            rel("a", 1, 100, 900),
            rel("b", 2, 300, 310),
            rel("b", 2, 400, 410),
        ];
        let grants = vec![grant(1, "a"), grant(2, "b")];
        assert_eq!(
            check_split_brain(&logged, &grants).len(),
            1,
            "the log alone: an overlap"
        );
        // On the wire, a's frames arrived at 15 and 101, before b's.
        let seen = vec![
            wire("a", 15),
            wire("a", 101),
            wire("b", 305),
            wire("b", 405),
        ];
        let (rels, left) = wire_releases(&seen, &logged);
        assert_eq!(left, 0);
        assert_eq!(rels[2].generation, 2);
        assert_eq!(check_split_brain(&rels, &grants), Vec::<SplitBrain>::new());
        // A frame of a that really left after the resume is caught.
        let mut late = seen.clone();
        late.push(wire("a", 899));
        let (rels, _) = wire_releases(&late, &logged);
        let found = check_split_brain(&rels, &grants);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(matches!(found[0], SplitBrain::Late { .. }), "{found:?}");
        // A frame whose batch's line a kill -9 cut off goes with the generation before it.
        let (rels, _) = wire_releases(&[wire("a", 950)], &logged);
        assert_eq!(rels[0].generation, 1);
        // A frame of a node that logged nothing is counted, not dropped silently.
        let (_, left) = wire_releases(&[wire("c", 5)], &logged);
        assert_eq!(left, 1);
    }

    #[test]
    fn two_overlapping_generations_are_reported() {
        // a's generation-1 batch is still being written when b releases three under 2 (one
        // episode), and a releases once more after b went live (another).
        let rels = vec![
            rel("a", 1, 10, 20),
            rel("b", 2, 15, 16),
            rel("b", 2, 17, 18),
            rel("b", 2, 19, 25),
            rel("a", 1, 30, 31),
        ];
        let grants = vec![grant(1, "a"), grant(2, "b")];
        let p = check_split_brain(&rels, &grants);
        assert_eq!(p.len(), 2, "{p:?}");
        let SplitBrain::Overlap { batch, others, .. } = &p[0] else {
            panic!("{p:?}")
        };
        assert_eq!((batch.node.as_str(), batch.first_ns, *others), ("a", 10, 3));
        assert_eq!(p[0].stale_batch(), Some(&rel("a", 1, 10, 20)));
        assert!(
            p[0].to_string().contains("while b released 3 batch(es)"),
            "{}",
            p[0]
        );
        let SplitBrain::Late {
            first,
            batches,
            newer,
        } = &p[1]
        else {
            panic!("{p:?}")
        };
        assert_eq!(
            (first.first_ns, *batches, newer.node.as_str()),
            (30, 1, "b")
        );
    }

    #[test]
    fn a_fenced_primary_releasing_after_its_successor_is_reported() {
        // No overlap in time, but a released under generation 1 after b went live in 2.
        let rels = vec![
            rel("a", 1, 10, 20),
            rel("b", 2, 30, 40),
            rel("a", 1, 50, 51),
        ];
        let p = check_split_brain(&rels, &[grant(1, "a"), grant(2, "b")]);
        assert_eq!(p.len(), 1, "{p:?}");
        let text = p[0].to_string();
        assert!(
            text.contains("a released 1 batch(es) under generation 1"),
            "{text}"
        );
    }

    #[test]
    fn one_generation_granted_twice_or_released_by_another_node_is_reported() {
        let p = check_split_brain(&[], &[grant(1, "a"), grant(2, "a"), grant(2, "b")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].to_string().contains("granted to 2 nodes"), "{p:?}");
        let p = check_split_brain(&[rel("b", 1, 0, 1), rel("a", 5, 2, 3)], &[grant(1, "a")]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter().any(
                |x| matches!(x, SplitBrain::Ungranted { node, holders, .. } if node == "b" && holders == &["a"])
            ),
            "{p:?}"
        );
    }

    #[test]
    fn logs_parse() {
        let (r, bad) = parse_releases("10 20 a 1 3 77\n30 40 b 2 1 80\n50 6");
        assert_eq!(
            r,
            vec![
                rel_full("a", 1, 10, 20, 3, 77),
                rel_full("b", 2, 30, 40, 1, 80)
            ]
        );
        assert_eq!(bad, vec!["50 6".to_string()]);
        let w = r#"{"timestamp":"x","level":"INFO","event":"claim","decision":"granted","pair":"kv1","node":"a","seen":0,"claim_id":"ab","generation":1,"latency_us":5}
{"timestamp":"x","level":"INFO","event":"claim","decision":"denied","pair":"kv1","node":"b","seen":0,"claim_id":"cd","generation":1,"holder":"a"}
{"timestamp":"x","level":"INFO","event":"claim","decision":"regranted","pair":"kv1","node":"a","seen":0,"claim_id":"ab","generation":1}
not json"#;
        let g = parse_witness_grants(w);
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0],
            Grant {
                pair: "kv1".into(),
                generation: 1,
                node: "a".into(),
                claim_id: "ab".into()
            }
        );
    }

    fn rel_full(node: &str, g: u64, a: u64, b: u64, frames: u64, bd: u64) -> Release {
        Release {
            frames,
            boundary: bd,
            ..rel(node, g, a, b)
        }
    }
}
