//! One trial: a fresh pair lab (witness, nodes `a` and `b`, client host), clients running
//! all along, the seeded schedule applied step by step — each step's faults, then the heal
//! (what is down restarted until one node is primary and the other backup), then a quiet
//! time — and afterwards the checks: the clients' history with the final reads
//! ([`check_kv`]), the nodes' release logs and the witness's grants ([`check_split_brain`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::clients::{self, ClientConfig, ClientError, ClientRun};
use super::rng::Rng;
use super::schedule::{self, Action, Step};
use crate::capture::WireCapture;
use crate::checker::{
    check_kv, check_split_brain, parse_releases, parse_witness_grants, read_finals, wire_releases,
    Op, SplitBrain,
};
use crate::netns::{Netns, Spawned};
use crate::node::{node_binary, RunningNode};
use crate::pair::{start_witness_process, witness_binary, PairLab, PairOptions};

/// Knobs of a trial.
#[derive(Clone, Debug)]
pub struct TrialConfig {
    /// The trial's seed (its schedule and the clients' choices).
    pub seed: u64,
    /// Faults to apply (at least; a combination may add one).
    pub faults: usize,
    /// Client threads.
    pub clients: usize,
    /// How long a client waits for a reply before it gives up on the connection.
    pub reply_timeout: Duration,
    /// How long a heal may take before the trial fails.
    pub heal_limit: Duration,
    /// Where a failing trial's record goes (a directory per trial under it).
    pub out_dir: PathBuf,
    /// Write the record of every trial, not only the failing ones.
    pub keep: bool,
    /// Start no step after this.
    pub deadline: Option<Instant>,
    /// Print every event as it happens.
    pub verbose: bool,
    /// Act as the operator where the docs tell one to (a backup refused because its disk
    /// differs: `ftvm-resync`); without it such a trial fails to heal.
    pub operator: bool,
}

/// The longest a client waited between two answers.
#[derive(Clone, Debug, Default)]
pub struct Gap {
    /// How long (ns).
    pub ns: u64,
    /// The client.
    pub client: u32,
    /// When it began (s into the trial).
    pub at_s: f64,
    /// The step it belongs to (the first begun at most 100 ms before it began, else the one
    /// in force).
    pub during: String,
}

/// What a trial found.
#[derive(Debug, Default)]
pub struct TrialResult {
    /// Its seed.
    pub seed: u64,
    /// Steps applied.
    pub steps: usize,
    /// Faults applied.
    pub faults: usize,
    /// Client operations.
    pub ops: usize,
    /// Acknowledged writes.
    pub acked: usize,
    /// Lost acknowledged writes.
    pub lost: Vec<String>,
    /// Stale or impossible reads.
    pub stale: Vec<String>,
    /// Signs of two primaries (one per episode).
    pub dual: Vec<String>,
    /// Of those, the episodes in the window docs/operations.md names ([`in_stop_window`]).
    pub dual_window: usize,
    /// What the release logs alone would call two primaries: a batch whose interval, read by
    /// the node around its writes, spans a stop (reported, not counted: the wire decides).
    pub log_overlaps: Vec<String>,
    /// Guest frames the fabric capture saw.
    pub wire_frames: usize,
    /// Frames the nodes' release logs count (more than the wire sees when a client link was
    /// cut: those frames went nowhere).
    pub logged_frames: u64,
    /// Problems of the recorded history itself.
    pub malformed: Vec<String>,
    /// Every client error.
    pub client_errors: Vec<ClientError>,
    /// Exits the nodes made on their own (not our kill -9), by code and reason.
    pub exits: BTreeMap<String, usize>,
    /// Exits other than 66 (a lost claim), with the log's tail.
    pub unexpected: Vec<String>,
    /// Why the trial could not complete (a heal that never finished, the lab failing).
    pub failure: Option<String>,
    /// The longest client-observed gap.
    pub gap: Gap,
    /// The longest gap (ns) per kind of step it belongs to (gaps of 300 ms or more).
    pub gap_by_kind: BTreeMap<&'static str, u64>,
    /// The longest heal.
    pub heal_max: Duration,
    /// Generations granted after the first (every failover, every restart from the disk).
    pub failovers: usize,
    /// Operator resyncs the pair needed to re-form.
    pub resyncs: Vec<String>,
    /// Where the record went, if it was written.
    pub saved: Option<PathBuf>,
    /// How long the trial took.
    pub elapsed: Duration,
}

impl TrialResult {
    /// True when the trial found nothing wrong and completed.
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.stale.is_empty()
            && self.dual.is_empty()
            && self.malformed.is_empty()
            && self.failure.is_none()
    }
}

/// A timestamped record of what happened.
struct Events {
    epoch: Instant,
    lines: Vec<String>,
    /// When each step began, its label and kind.
    steps: Vec<(u64, String, &'static str)>,
    verbose: bool,
}

impl Events {
    /// The step a gap belongs to: the first begun at most 100 ms before the gap began (its
    /// last answer came just before the fault) and before it ended; else the one in force.
    fn step_of_gap(&self, start: u64, len: u64) -> Option<usize> {
        let early = start.saturating_sub(100_000_000);
        self.steps
            .iter()
            .position(|(t, _, _)| *t >= early && *t < start + len)
            .or_else(|| self.steps.iter().rposition(|(t, _, _)| *t <= start))
    }
}

impl Events {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn note(&mut self, s: impl AsRef<str>) {
        let line = format!(
            "{:9.3}s {:>19} {}",
            self.epoch.elapsed().as_secs_f64(),
            unix_ns(),
            s.as_ref()
        );
        if self.verbose {
            eprintln!("soak: {line}");
        }
        self.lines.push(line);
    }
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `ftvm-node status --json` with a time limit (a node that does not answer must not stop
/// the soak).
fn status(lab: &PairLab, name: &str) -> Result<serde_json::Value> {
    let mut child = Command::new(node_binary()?)
        .args(["status", "--json", "--config"])
        .arg(lab.config(name))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("status {name}: no answer within 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "status {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The pair's processes and the faults in force.
struct Rig<'a> {
    lab: &'a PairLab,
    names: Vec<String>,
    nodes: BTreeMap<String, Option<RunningNode>>,
    dead_since: BTreeMap<String, Instant>,
    stopped: BTreeSet<String>,
    link_cut: BTreeSet<String>,
    fabric_cut: BTreeSet<String>,
    witness: Option<Spawned>,
    witness_log: PathBuf,
    ev: Events,
    exits: BTreeMap<String, usize>,
    unexpected: Vec<String>,
    /// A node refused as backup because its disk differs (exit 68 `disk_root`): the
    /// operator's resync is due.
    needs_resync: Option<String>,
    /// Whether the soak may act as the operator.
    operator: bool,
    resyncs: Vec<String>,
    /// Every SIGSTOP: node, unix ns of the stop, of the SIGCONT (`u64::MAX` until then).
    stops: Vec<(String, u64, u64)>,
}

/// Whether a split-brain episode is the one window docs/operations.md names: the superseded
/// primary was stopped between its lease check and its TAP writes, and wrote that one batch
/// when it was resumed — a single batch, begun at most 5 ms before the SIGSTOP was sent (the
/// signal takes a moment to land) or at most 50 ms after the SIGCONT, and finished after it.
pub fn in_stop_window(sb: &SplitBrain, stops: &[(String, u64, u64)]) -> bool {
    let Some(b) = sb.stale_batch() else {
        return false;
    };
    if sb.late_batches() != 1 {
        return false;
    }
    stops.iter().any(|(n, stop, cont)| {
        *n == b.node
            && b.first_ns + 5_000_000 >= *stop
            && b.first_ns <= cont.saturating_add(50_000_000)
            && b.last_ns + 1_000_000 >= *cont
    })
}

/// The reason in a node's `node exiting:` log line, with numbers and hashes elided so that
/// equal reasons group together.
fn exit_reason(log_tail: &str) -> String {
    let Some(line) = log_tail
        .lines()
        .rev()
        .find(|l| l.contains("node exiting: "))
    else {
        return "no exit line".into();
    };
    let r = line.split("node exiting: ").nth(1).unwrap_or_default();
    let r = r.split(" released_frames=").next().unwrap_or(r);
    // Every word with a digit in it (numbers, hashes) becomes `#`.
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in r.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.chars().take(140).collect()
}

impl<'a> Rig<'a> {
    fn new(lab: &'a PairLab, ev: Events) -> Rig<'a> {
        let names: Vec<String> = lab.nodes.iter().map(|h| h.role.clone()).collect();
        Rig {
            lab,
            nodes: names.iter().map(|n| (n.clone(), None)).collect(),
            dead_since: names.iter().map(|n| (n.clone(), Instant::now())).collect(),
            names,
            stopped: BTreeSet::new(),
            link_cut: BTreeSet::new(),
            fabric_cut: BTreeSet::new(),
            witness: None,
            witness_log: lab.path().join("witness.log"),
            ev,
            exits: BTreeMap::new(),
            unexpected: Vec::new(),
            needs_resync: None,
            operator: true,
            resyncs: Vec::new(),
            stops: Vec::new(),
        }
    }

    fn other(&self, name: &str) -> String {
        self.names
            .iter()
            .find(|n| *n != name)
            .cloned()
            .unwrap_or_default()
    }

    /// Starts the witness (`--log-json`, its log appended to `witness.log`: the grants).
    fn start_witness(&mut self) -> Result<()> {
        if self.witness.as_mut().is_some_and(|w| w.is_running()) {
            return Ok(());
        }
        let dir = self.lab.path();
        let data = dir.join("witness-data");
        let mut cmd = self.lab.witness.ns.command(witness_binary()?);
        cmd.args(["--log-json", "serve", "--config"])
            .arg(dir.join("witness.toml"));
        if !data.exists() {
            cmd.arg("--init");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.witness_log)?;
        cmd.env("FTVM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let sp = start_witness_process(cmd, Duration::from_secs(30))?;
        self.witness = Some(sp);
        Ok(())
    }

    fn start_node(&mut self, name: &str) -> Result<()> {
        let slot = self.nodes.get_mut(name).context("no such node")?;
        if slot.is_none() {
            *slot = Some(self.lab.start_node(name, &[])?);
            self.ev.note(format!("{name} started"));
        }
        Ok(())
    }

    /// Collects nodes that exited on their own.
    fn reap(&mut self) {
        let names = self.names.clone();
        for name in names {
            let slot = self.nodes.get_mut(&name).expect("node");
            if slot.as_mut().is_none_or(|n| n.is_running()) {
                continue;
            }
            let n = slot.take().expect("checked");
            self.stopped.remove(&name);
            self.dead_since.insert(name.clone(), Instant::now());
            let code = match n.wait(Duration::from_secs(5)) {
                Ok((st, _)) => match st.code() {
                    Some(c) => c.to_string(),
                    None => {
                        use std::os::unix::process::ExitStatusExt;
                        format!("signal {}", st.signal().unwrap_or(0))
                    }
                },
                Err(e) => format!("unknown ({e})"),
            };
            let why = match code.as_str() {
                "66" => "halted: the witness gave the pair to the other node",
                "67" => "halted: DIVERGED",
                "68" => "refused: configuration mismatch",
                _ => "UNEXPECTED",
            };
            let log = std::fs::read_to_string(self.lab.log(&name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            let reason = exit_reason(&tail);
            self.ev
                .note(format!("{name} exited {code} ({why}): {reason}"));
            *self.exits.entry(format!("{code} {reason}")).or_default() += 1;
            if code == "68" && reason.contains("disk_root differs") {
                self.needs_resync = Some(name.clone());
            }
            if code != "66" {
                self.unexpected.push(format!(
                    "{name} exited {code} at {:.3}s ({why}); its log ends:\n{tail}",
                    self.ev.epoch.elapsed().as_secs_f64()
                ));
            }
        }
    }

    fn act(&mut self, a: &Action) -> Result<()> {
        self.ev.note(format!("  {a}"));
        match a {
            Action::Kill(n) => {
                self.reap();
                if let Some(node) = self.nodes.get_mut(n).and_then(Option::take) {
                    node.kill9();
                    self.dead_since.insert(n.clone(), Instant::now());
                }
                self.stopped.remove(n);
            }
            Action::Stop(n) => {
                if let Some(Some(node)) = self.nodes.get(n) {
                    self.stops.push((n.clone(), unix_ns(), u64::MAX));
                    node.signal(libc::SIGSTOP);
                    self.stopped.insert(n.clone());
                }
            }
            Action::Cont(n) => {
                if self.stopped.remove(n) {
                    if let Some(Some(node)) = self.nodes.get(n) {
                        node.signal(libc::SIGCONT);
                    }
                    let now = unix_ns();
                    if let Some(s) = self.stops.iter_mut().rev().find(|s| s.0 == *n) {
                        s.2 = s.2.min(now);
                    }
                }
            }
            Action::CutLink(n) => {
                self.lab.lab.cut_link(self.lab.host(n), true)?;
                self.link_cut.insert(n.clone());
            }
            Action::RestoreLink(n) => {
                self.lab.lab.cut_link(self.lab.host(n), false)?;
                self.link_cut.remove(n);
            }
            Action::CutFabric(n) => {
                self.lab.lab.cut(self.lab.host(n))?;
                self.fabric_cut.insert(n.clone());
            }
            Action::RestoreFabric(n) => {
                self.lab.lab.restore(self.lab.host(n))?;
                self.fabric_cut.remove(n);
            }
            Action::KillWitness => self.witness = None,
            Action::StartWitness => self.start_witness()?,
            Action::Start(n) => self.start_node(n)?,
        }
        Ok(())
    }

    /// Undoes every fault still in force (the step's own actions normally did).
    fn restore_all(&mut self) -> Result<()> {
        for n in self.stopped.clone() {
            self.act(&Action::Cont(n))?;
        }
        for n in self.link_cut.clone() {
            self.act(&Action::RestoreLink(n))?;
        }
        for n in self.fabric_cut.clone() {
            self.act(&Action::RestoreFabric(n))?;
        }
        if !self.witness.as_mut().is_some_and(|w| w.is_running()) {
            self.act(&Action::StartWitness)?;
        }
        Ok(())
    }

    /// What docs/operations.md tells an operator to do when a backup is refused because
    /// its disk differs: stop the node that keeps the good disk, bring the other disk in
    /// line with `ftvm-resync pull`, start both again.
    fn operator_resync(&mut self, stale: &str) -> Result<()> {
        let good = self.other(stale);
        self.ev.note(format!(
            "OPERATOR: {stale} was refused as backup (its disk differs from {good}'s): stop \
             {good}, ftvm-resync pull {stale}'s disk from {good}, start both"
        ));
        self.resyncs.push(format!(
            "{:.1}s: {stale} refused by {good} (disk_root differs)",
            self.ev.epoch.elapsed().as_secs_f64()
        ));
        if let Some(node) = self.nodes.get_mut(&good).and_then(Option::take) {
            node.signal(libc::SIGTERM);
            match node.wait(Duration::from_secs(20)) {
                Ok((st, _)) => self.ev.note(format!("  {good} stopped: {st}")),
                Err(e) => self
                    .ev
                    .note(format!("  {good} did not stop ({e:#}): killed")),
            }
        }
        self.stopped.remove(&good);
        let resync = crate::netns::sibling_binary("ftvm-resync", "FTVM_RESYNC")?;
        let log_path = self.lab.path().join("resync.log");
        let log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
        };
        let host = self.lab.host(&good);
        let listen = format!("{}:7410", host.ip);
        let mut serve = host.ns.command(&resync);
        serve
            .args(["serve", "--disk"])
            .arg(self.lab.disk(&good))
            .args(["--listen", &listen, "--tls"])
            .arg(self.lab.tls())
            .args(["--node", &good, "--allow", stale])
            .stdin(Stdio::null())
            .stdout(log()?)
            .stderr(log()?);
        let server = Spawned::start(serve)?;
        let mut pulled = false;
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(300));
            let mut pull = self.lab.host(stale).ns.command(&resync);
            pull.args(["pull", "--from", &format!("{good}@{listen}"), "--disk"])
                .arg(self.lab.disk(stale))
                .arg("--tls")
                .arg(self.lab.tls())
                .args(["--node", stale])
                .stdin(Stdio::null())
                .stdout(log()?)
                .stderr(log()?);
            if pull.status()?.success() {
                pulled = true;
                break;
            }
        }
        drop(server);
        if !pulled {
            bail!("the operator's ftvm-resync pull of {stale} from {good} failed (resync.log)");
        }
        self.ev
            .note(format!("  {stale}'s disk now equals {good}'s"));
        self.start_node(&good)?;
        self.start_node(stale)?;
        Ok(())
    }

    /// Every node's role (`down`: no process; `?`: no answer).
    fn roles(&self) -> BTreeMap<String, String> {
        self.names
            .iter()
            .map(|n| {
                let r = match &self.nodes[n] {
                    None => "down".to_string(),
                    Some(_) => match status(self.lab, n) {
                        Ok(s) => s["role"].as_str().unwrap_or("?").to_string(),
                        Err(_) => "?".to_string(),
                    },
                };
                (n.clone(), r)
            })
            .collect()
    }

    fn primary_backup(roles: &BTreeMap<String, String>) -> Option<(String, String)> {
        let p = roles.iter().find(|(_, r)| *r == "primary")?.0.clone();
        let b = roles.iter().find(|(_, r)| *r == "backup")?.0.clone();
        Some((p, b))
    }

    /// Restarts what is down until one node is primary and the other backup (seen twice in
    /// a row), or fails after `limit`.
    fn heal(&mut self, limit: Duration) -> Result<(Duration, String, String)> {
        let t0 = Instant::now();
        self.restore_all()?;
        let mut good = 0;
        let mut halted_since: BTreeMap<String, Instant> = BTreeMap::new();
        let mut last = BTreeMap::new();
        loop {
            self.reap();
            let roles = self.roles();
            if roles != last {
                self.ev.note(format!("  roles {roles:?}"));
                last = roles.clone();
            }
            if let Some(stale) = self.needs_resync.take() {
                if self.operator {
                    self.operator_resync(&stale)?;
                    continue;
                }
            }
            for name in self.names.clone() {
                if self.nodes[&name].is_some() {
                    continue;
                }
                let other = self.other(&name);
                let other_live = matches!(roles[&other].as_str(), "alone" | "primary");
                let both_down = self.nodes[&other].is_none();
                // Give the survivor time to take over first, as after a real crash; then
                // restart anyway (a restart during the takeover is a schedule of its own).
                if other_live || both_down || self.dead_since[&name].elapsed().as_secs() >= 3 {
                    self.start_node(&name)?;
                }
            }
            for (name, role) in &roles {
                if role == "halted" {
                    let since = *halted_since
                        .entry(name.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(5) {
                        self.ev
                            .note(format!("{name} stays halted but runs: kill -9"));
                        self.act(&Action::Kill(name.clone()))?;
                    }
                } else {
                    halted_since.remove(name);
                }
            }
            match Self::primary_backup(&roles) {
                Some((p, b)) => {
                    good += 1;
                    if good >= 2 {
                        return Ok((t0.elapsed(), p, b));
                    }
                }
                None => good = 0,
            }
            if t0.elapsed() > limit {
                let mut s = String::new();
                for n in &self.names {
                    if self.nodes[n].is_some() {
                        s += &format!(
                            "\n{n}: {}",
                            status(self.lab, n)
                                .map_or_else(|e| format!("{e:#}"), |v| v.to_string())
                        );
                    }
                }
                bail!("the pair did not heal within {limit:?}: roles {roles:?}{s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Runs one trial.
pub fn run_trial(cfg: &TrialConfig) -> TrialResult {
    let started = Instant::now();
    let mut res = TrialResult {
        seed: cfg.seed,
        ..TrialResult::default()
    };
    let schedule = schedule::generate(&mut Rng::new(cfg.seed), cfg.faults);
    let lab = match PairLab::new(PairOptions::default()) {
        Ok(l) => l,
        Err(e) => {
            res.failure = Some(format!("cannot build the pair lab: {e:#}"));
            return res;
        }
    };
    for n in &lab.options().nodes {
        let line = format!(
            "release_log = \"{}\"\n",
            lab.path().join(format!("{n}.releases")).display()
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(lab.config(n))
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            res.failure = Some(format!("node.toml of {n}: {e}"));
            return res;
        }
    }
    // What leaves each node's host, seen from the fabric (the split-brain check's truth).
    let ports: Vec<(String, String)> = lab
        .options()
        .nodes
        .iter()
        .map(|n| (n.clone(), lab.host(n).fabric_port.clone()))
        .collect();
    let mac = lab.host(&lab.options().nodes[0]).guest_mac.clone();
    let capture = match mac
        .context("the lab's guest has no MAC")
        .and_then(|m| WireCapture::start(lab.lab.fabric(), ports, &m))
    {
        Ok(c) => c,
        Err(e) => {
            res.failure = Some(format!("cannot capture on the fabric: {e:#}"));
            return res;
        }
    };
    let ev = Events {
        epoch: Instant::now(),
        lines: Vec::new(),
        steps: Vec::new(),
        verbose: cfg.verbose,
    };
    let mut rig = Rig::new(&lab, ev);
    rig.operator = cfg.operator;
    rig.ev
        .note(format!("trial seed {}: {} steps", cfg.seed, schedule.len()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let driven = drive(&mut rig, cfg, &schedule, &stop, &mut handles, &mut res);
    stop.store(true, Ordering::Relaxed);
    let mut runs: Vec<ClientRun> = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => runs.push(r),
            Err(_) => res.failure = Some("a client thread panicked".into()),
        }
    }
    if let Err(e) = driven {
        rig.ev.note(format!("FAILED: {e:#}"));
        res.failure = Some(format!("{e:#}"));
    }
    let ops: Vec<Op> = runs.iter().flat_map(|r| r.ops.iter().cloned()).collect();
    res.ops = ops.len();
    // The final reads (only worth trying on a pair that healed).
    let finals = if res.failure.is_none() {
        match read_finals(
            &lab.client.ns,
            lab.guest_ip,
            clients::keys(),
            Duration::from_secs(60),
        ) {
            Ok(f) => Some(f),
            Err(e) => {
                res.failure = Some(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    let kv = check_kv(&ops, finals.as_ref().unwrap_or(&BTreeMap::new()));
    res.acked = kv.acked_writes;
    res.lost = kv.lost;
    res.stale = kv.stale;
    res.malformed = kv
        .malformed
        .into_iter()
        .filter(|m| finals.is_some() || !m.contains("no final read"))
        .collect();
    // Gaps and errors.
    for (i, r) in runs.iter().enumerate() {
        if r.max_gap.0 > res.gap.ns {
            let during = match rig.ev.step_of_gap(r.max_gap.1, r.max_gap.0) {
                Some(i) => rig.ev.steps[i].1.clone(),
                None => "before the first step".to_string(),
            };
            res.gap = Gap {
                ns: r.max_gap.0,
                client: i as u32,
                at_s: r.max_gap.1 as f64 / 1e9,
                during,
            };
        }
        res.client_errors.extend(r.errors.iter().cloned());
        for (start, len) in &r.gaps {
            let kind = rig
                .ev
                .step_of_gap(*start, *len)
                .map_or("before the first step", |i| rig.ev.steps[i].2);
            let e = res.gap_by_kind.entry(kind).or_default();
            *e = (*e).max(*len);
        }
    }
    // Everything stops; then the split-brain check on what the nodes and the witness wrote.
    let names = rig.names.clone();
    for n in &names {
        if let Some(node) = rig.nodes.get_mut(n).and_then(Option::take) {
            node.kill9();
        }
    }
    rig.witness = None;
    let wire = match capture.finish() {
        Ok(w) => w,
        Err(e) => {
            res.failure = Some(format!("the fabric capture failed: {e:#}"));
            crate::capture::Captured::default()
        }
    };
    if wire.dropped > 0 {
        res.malformed.push(format!(
            "the fabric capture dropped {} frames: the split-brain check is incomplete",
            wire.dropped
        ));
    }
    res.wire_frames = wire.frames.len();
    let mut releases = Vec::new();
    for n in &names {
        let text =
            std::fs::read_to_string(lab.path().join(format!("{n}.releases"))).unwrap_or_default();
        let (r, bad) = parse_releases(&text);
        releases.extend(r);
        // A line torn by kill -9 is the only kind expected, and only as a file's last line.
        if bad.len() > 1 {
            res.malformed
                .push(format!("{n}.releases: {} lines unreadable", bad.len()));
        }
    }
    let grants =
        parse_witness_grants(&std::fs::read_to_string(&rig.witness_log).unwrap_or_default());
    res.failovers = grants
        .iter()
        .map(|g| g.generation)
        .collect::<BTreeSet<_>>()
        .len()
        .saturating_sub(1);
    // The logs' own view, for the record: a batch whose clock reads span a stop looks late
    // even when its frames left before the stop.
    for sb in check_split_brain(&releases, &grants) {
        res.log_overlaps.push(sb.to_string());
    }
    let (on_wire, unattributed) = wire_releases(&wire.frames, &releases);
    if unattributed > 0 {
        res.malformed.push(format!(
            "{unattributed} guest frames on the wire from a node that logged no release"
        ));
    }
    for sb in check_split_brain(&on_wire, &grants) {
        if in_stop_window(&sb, &rig.stops) {
            res.dual_window += 1;
            res.dual.push(format!(
                "{sb} [the documented window: stopped after its lease check, the batch written \
                 when resumed]"
            ));
        } else {
            res.dual.push(sb.to_string());
        }
    }
    if releases.is_empty() && res.failure.is_none() {
        res.malformed
            .push("no release was logged at all (is release_log honoured?)".into());
    }
    let logged_frames: u64 = releases.iter().map(|r| r.frames).sum();
    res.logged_frames = logged_frames;
    if logged_frames > 0 && wire.frames.is_empty() && res.failure.is_none() {
        res.malformed.push(format!(
            "the fabric capture saw none of the {logged_frames} frames the nodes logged"
        ));
    }
    res.exits = std::mem::take(&mut rig.exits);
    res.unexpected = std::mem::take(&mut rig.unexpected);
    res.resyncs = std::mem::take(&mut rig.resyncs);
    res.elapsed = started.elapsed();
    rig.ev.note(format!(
        "done: {} ops, {} acked writes, lost {}, stale {}, dual {}, {} client errors, {} releases, {} grants",
        res.ops,
        res.acked,
        res.lost.len(),
        res.stale.len(),
        res.dual.len(),
        res.client_errors.len(),
        releases.len(),
        grants.len()
    ));
    if cfg.keep || !res.ok() || !res.unexpected.is_empty() {
        match save(
            cfg,
            &schedule,
            &rig.ev,
            &res,
            &ops,
            finals.as_ref(),
            lab.path(),
        ) {
            Ok(p) => res.saved = Some(p),
            Err(e) => eprintln!("soak: cannot write the trial's record: {e:#}"),
        }
    }
    res
}

fn drive(
    rig: &mut Rig<'_>,
    cfg: &TrialConfig,
    schedule: &[Step],
    stop: &Arc<AtomicBool>,
    handles: &mut Vec<std::thread::JoinHandle<ClientRun>>,
    res: &mut TrialResult,
) -> Result<()> {
    rig.start_witness()?;
    for n in rig.names.clone() {
        rig.start_node(&n)?;
    }
    let (t, mut primary, mut backup) = rig
        .heal(Duration::from_secs(120))
        .context("the pair did not start")?;
    rig.ev.note(format!(
        "pair up in {t:?}: {primary} primary, {backup} backup"
    ));
    let lab = rig.lab;
    let ip = lab.guest_ip;
    let client_ns: Netns = lab.client.ns.clone();
    if !Netns::wait_until(Duration::from_secs(60), || {
        client_ns.tcp_open(ip, 6379, Duration::from_secs(1))
    })? {
        bail!("the guest never listened on {ip}:6379");
    }
    let ccfg = ClientConfig {
        addr: ip,
        reply_timeout: cfg.reply_timeout,
        seed: cfg.seed,
        epoch: rig.ev.epoch,
    };
    handles.extend(clients::start(&client_ns, cfg.clients, &ccfg, stop)?);
    std::thread::sleep(Duration::from_secs(1));
    for (i, step) in schedule.iter().enumerate() {
        if cfg.deadline.is_some_and(|d| Instant::now() >= d) {
            rig.ev.note("time is up: no more steps");
            break;
        }
        let acts = schedule::actions(step, &primary, &backup);
        let label = format!(
            "step {}: {step} [primary {primary}, backup {backup}]",
            i + 1
        );
        rig.ev.note(&label);
        let now = rig.ev.now_ns();
        rig.ev.steps.push((now, label, step.kind()));
        let t0 = Instant::now();
        for (at, a) in acts {
            let when = t0 + Duration::from_millis(at);
            std::thread::sleep(when.saturating_duration_since(Instant::now()));
            rig.act(&a)?;
        }
        res.steps += 1;
        res.faults += step.faults.len();
        let (took, p, b) = rig.heal(cfg.heal_limit)?;
        res.heal_max = res.heal_max.max(took);
        rig.ev
            .note(format!("healed in {took:?}: {p} primary, {b} backup"));
        (primary, backup) = (p, b);
        std::thread::sleep(Duration::from_millis(step.quiet_ms));
    }
    Ok(())
}

fn save(
    cfg: &TrialConfig,
    schedule: &[Step],
    ev: &Events,
    res: &TrialResult,
    ops: &[Op],
    finals: Option<&BTreeMap<String, Option<String>>>,
    lab_dir: &Path,
) -> Result<PathBuf> {
    let dir = cfg.out_dir.join(format!("seed-{}", cfg.seed));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let w = |name: &str, text: String| std::fs::write(dir.join(name), text);
    w(
        "seed.txt",
        format!(
            "seed {}\nfaults {}\nclients {}\nreproduce: ftvm-soak --trials 1 --seed {} --faults {} --clients {}\n",
            cfg.seed, cfg.faults, cfg.clients, cfg.seed, cfg.faults, cfg.clients
        ),
    )?;
    w(
        "schedule.txt",
        schedule
            .iter()
            .enumerate()
            .map(|(i, s)| format!("step {}: {s}\n", i + 1))
            .collect(),
    )?;
    w("events.txt", ev.lines.join("\n") + "\n")?;
    let mut a = String::new();
    let mut section = |title: &str, lines: &[String]| {
        a += &format!("== {title}: {}\n", lines.len());
        for l in lines {
            a += l;
            a += "\n";
        }
    };
    section("lost", &res.lost);
    section("stale reads", &res.stale);
    section(
        "wire",
        &[format!(
            "{} guest frames seen on the fabric, {} logged by the nodes",
            res.wire_frames, res.logged_frames
        )],
    );
    section("dual primary (on the wire)", &res.dual);
    section(
        "release-log intervals that overlap (not counted: see the wire)",
        &res.log_overlaps,
    );
    section("malformed history", &res.malformed);
    section("unexpected exits", &res.unexpected);
    section("operator resyncs", &res.resyncs);
    section("failure", &res.failure.iter().cloned().collect::<Vec<_>>());
    section(
        "client errors",
        &res.client_errors
            .iter()
            .map(|e| {
                format!(
                    "{:.3}s c{} {}: {}",
                    e.at as f64 / 1e9,
                    e.client,
                    e.kind,
                    e.detail
                )
            })
            .collect::<Vec<_>>(),
    );
    w("anomalies.txt", a)?;
    let mut h = String::from("# client invoked_ms completed_ms call -> outcome\n");
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by_key(|o| o.invoked);
    for o in sorted {
        h += &o.line();
        h += "\n";
    }
    h += "# final reads\n";
    for (k, v) in finals.into_iter().flatten() {
        h += &format!("{k} = {v:?}\n");
    }
    w("history.txt", h)?;
    for entry in std::fs::read_dir(lab_dir)? {
        let p = entry?.path();
        let keep = p
            .extension()
            .is_some_and(|e| e == "log" || e == "releases" || e == "toml");
        if keep && p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().expect("file")))?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::{exit_reason, in_stop_window};
    use crate::checker::{Release, SplitBrain};

    fn rel(node: &str, g: u64, a: u64, b: u64) -> Release {
        Release {
            first_ns: a,
            last_ns: b,
            node: node.into(),
            generation: g,
            frames: 2,
            boundary: 0,
        }
    }

    #[test]
    fn a_batch_written_across_a_stop_is_the_documented_window() {
        const MS: u64 = 1_000_000;
        let stops = vec![("a".to_string(), 1000 * MS, 2000 * MS)];
        // The stop landed inside a's batch, which finished after the SIGCONT.
        let sb = SplitBrain::Overlap {
            batch: rel("a", 4, 1000 * MS + 20_000, 2000 * MS + 500_000),
            other: rel("b", 5, 1300 * MS, 1300 * MS + 1),
            others: 40,
        };
        assert!(in_stop_window(&sb, &stops));
        // The stop came between the lease check and the first write: the batch began later.
        let late = |batches| SplitBrain::Late {
            first: rel("a", 4, 2000 * MS + 300_000, 2000 * MS + 400_000),
            batches,
            newer: rel("b", 5, 1300 * MS, 1300 * MS + 1),
        };
        assert!(in_stop_window(&late(1), &stops));
        // Two late batches, or no stop of that node: not the window.
        assert!(!in_stop_window(&late(2), &stops));
        assert!(!in_stop_window(
            &sb,
            &[("b".to_string(), 1000 * MS, 2000 * MS)]
        ));
        // A batch long after the resume is not either.
        let sb = SplitBrain::Overlap {
            batch: rel("a", 4, 2500 * MS, 2600 * MS),
            other: rel("b", 5, 2550 * MS, 2550 * MS + 1),
            others: 1,
        };
        assert!(!in_stop_window(&sb, &stops));
    }

    #[test]
    fn exit_reasons_group_without_their_numbers() {
        let tail = "x\n2026-12-01T12:59:48.428258Z  INFO vmm::node::run: node exiting: \
                    Refused(\"b refused the pairing: disk_root differs (b has a8d9, this node has \
                    7b62)\") released_frames=0 last_release_unix_ns=0\nftvm-node: …";
        assert_eq!(
            exit_reason(tail),
            "Refused(\"b refused the pairing: disk_root differs (b has #, this node has #)\")"
        );
        assert_eq!(
            exit_reason(
                "node exiting: Denied(\"the witness gave the pair to a (generation 12): halting\")"
            ),
            "Denied(\"the witness gave the pair to a (generation #): halting\")"
        );
        assert_eq!(exit_reason("nothing"), "no exit line");
    }
}
