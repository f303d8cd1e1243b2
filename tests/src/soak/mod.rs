//! `ftvm-soak`: a seeded randomised fault-injection soak of the FT pair (docs/testing.md).
//!
//! Each trial builds a fresh pair lab, runs clients against the guest, applies a seeded
//! schedule of faults ([`schedule`]) and heals the pair after each, then checks the recorded
//! history and the nodes' and witness's records ([`crate::checker`]). [`Totals`] adds the
//! trials up into the summary whose last line scripts parse.

pub mod clients;
pub mod rng;
pub mod schedule;
pub mod trial;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use trial::{Gap, TrialResult};

/// The run so far.
#[derive(Debug, Default)]
pub struct Totals {
    /// Trials run.
    pub trials: usize,
    /// Faults applied.
    pub faults: usize,
    /// Client operations.
    pub ops: usize,
    /// Acknowledged writes.
    pub acked: usize,
    /// Lost acknowledged writes.
    pub lost: usize,
    /// Stale or impossible reads.
    pub stale: usize,
    /// Signs of two primaries (episodes).
    pub dual: usize,
    /// Of those, the episodes in the window docs/operations.md names.
    pub dual_window: usize,
    /// Overlaps the release logs alone show (not counted: the wire decides).
    pub log_overlaps: usize,
    /// Guest frames the fabric capture saw, and frames the nodes logged.
    pub wire_frames: (u64, u64),
    /// Client errors, by kind.
    pub error_kinds: BTreeMap<String, usize>,
    /// Nodes' own exits, by code and reason.
    pub exits: BTreeMap<String, usize>,
    /// Generations granted after each trial's first.
    pub failovers: usize,
    /// The longest heal.
    pub heal_max: Duration,
    /// The longest client-observed gap, with its trial's seed.
    pub gap: Option<(u64, Gap)>,
    /// The longest gap (ns) per kind of step.
    pub gap_by_kind: BTreeMap<&'static str, u64>,
    /// Trials that found something or could not complete: seed, what, record.
    pub failed: Vec<(u64, String, Option<PathBuf>)>,
    /// Trials with an exit other than 66 (recorded, not failed).
    pub unexpected_exits: Vec<(u64, Option<PathBuf>)>,
    /// Operator resyncs needed, with their trial's seed.
    pub resyncs: Vec<(u64, String)>,
}

impl Totals {
    /// Adds a trial.
    pub fn add(&mut self, r: &TrialResult) {
        self.trials += 1;
        self.faults += r.faults;
        self.ops += r.ops;
        self.acked += r.acked;
        self.lost += r.lost.len();
        self.stale += r.stale.len();
        self.dual += r.dual.len();
        self.dual_window += r.dual_window;
        self.log_overlaps += r.log_overlaps.len();
        self.wire_frames.0 += r.wire_frames as u64;
        self.wire_frames.1 += r.logged_frames;
        for e in &r.client_errors {
            *self.error_kinds.entry(e.kind.clone()).or_default() += 1;
        }
        for (c, n) in &r.exits {
            *self.exits.entry(c.clone()).or_default() += n;
        }
        self.failovers += r.failovers;
        self.heal_max = self.heal_max.max(r.heal_max);
        for (k, g) in &r.gap_by_kind {
            let e = self.gap_by_kind.entry(k).or_default();
            *e = (*e).max(*g);
        }
        if self.gap.as_ref().is_none_or(|(_, g)| r.gap.ns > g.ns) {
            self.gap = Some((r.seed, r.gap.clone()));
        }
        if !r.ok() {
            let mut what = Vec::new();
            for (n, k) in [
                (r.lost.len(), "lost"),
                (r.stale.len(), "stale"),
                (r.dual.len(), "dual primary"),
                (r.malformed.len(), "malformed"),
            ] {
                if n > 0 {
                    what.push(format!("{k}={n}"));
                }
            }
            if let Some(f) = &r.failure {
                what.push(f.lines().next().unwrap_or_default().to_string());
            }
            self.failed.push((r.seed, what.join(", "), r.saved.clone()));
        }
        for x in &r.resyncs {
            self.resyncs.push((r.seed, x.clone()));
        }
        if !r.unexpected.is_empty() {
            self.unexpected_exits.push((r.seed, r.saved.clone()));
        }
    }

    /// Client errors in all.
    pub fn client_errors(&self) -> usize {
        self.error_kinds.values().sum()
    }

    /// The line scripts parse.
    pub fn summary_line(&self) -> String {
        format!(
            "soak: trials={} faults={} acked={} lost={} stale_reads={} dual_primary={} client_errors={}",
            self.trials,
            self.faults,
            self.acked,
            self.lost,
            self.stale,
            self.dual,
            self.client_errors()
        )
    }

    /// The process's exit status: 1 if anything was lost, read stale or released by two
    /// primaries; 3 if a trial could not complete (a heal that never finished, a malformed
    /// history); 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.lost + self.stale + self.dual > 0 {
            1
        } else if !self.failed.is_empty() {
            3
        } else {
            0
        }
    }

    /// The summary: the details, then [`Totals::summary_line`] last.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "soak: {} client operations, {} generations granted after the first (failovers and restarts), longest heal {:.1} s\n",
            self.ops,
            self.failovers,
            self.heal_max.as_secs_f64()
        );
        if let Some((seed, g)) = &self.gap {
            s += &format!(
                "soak: longest client-observed gap {:.0} ms (trial seed {seed}, client {}, {:.1} s in, during {})\n",
                g.ns as f64 / 1e6,
                g.client,
                g.at_s,
                g.during
            );
        }
        if !self.gap_by_kind.is_empty() {
            s += "soak: longest gap by the kind of step it fell in (gaps of 300 ms or more):\n";
            for (k, g) in &self.gap_by_kind {
                s += &format!("soak:   {k}: {:.0} ms\n", *g as f64 / 1e6);
            }
        }
        let kinds: Vec<String> = self
            .error_kinds
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        s += &format!(
            "soak: client errors by kind: {}\n",
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            }
        );
        s += &format!(
            "soak: node exits of their own (not our kill -9), by code and reason: {}\n",
            self.exits.values().sum::<usize>()
        );
        for (c, n) in &self.exits {
            s += &format!("soak:   {n} × {c}\n");
        }
        if self.dual > 0 {
            s += &format!(
                "soak: dual_primary episodes (on the wire): {}, of which {} in the window \
                 docs/operations.md names (a primary stopped between a frame's lease check and \
                 its TAP write writes that frame when resumed)\n",
                self.dual, self.dual_window
            );
        }
        s += &format!(
            "soak: guest frames seen on the fabric {}, logged by the nodes {}; release-log \
             overlaps (a batch's clock reads spanning a stop; not counted) {}\n",
            self.wire_frames.0, self.wire_frames.1, self.log_overlaps
        );
        s += &format!(
            "soak: operator resyncs needed (the pair could not re-form by itself): {}\n",
            self.resyncs.len()
        );
        for (seed, what) in &self.resyncs {
            s += &format!("soak:   trial seed {seed} at {what}\n");
        }
        for (seed, p) in &self.unexpected_exits {
            s += &format!(
                "soak: trial seed {seed} had an exit other than 66{}\n",
                p.as_ref()
                    .map(|p| format!(": {}", p.display()))
                    .unwrap_or_default()
            );
        }
        for (seed, what, p) in &self.failed {
            s += &format!(
                "soak: FAILED trial seed {seed}: {what}{}\n",
                p.as_ref()
                    .map(|p| format!(" (record: {})", p.display()))
                    .unwrap_or_default()
            );
        }
        s += &self.summary_line();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_ends_with_the_parsable_line() {
        let mut t = Totals::default();
        let mut r = TrialResult {
            faults: 5,
            acked: 100,
            lost: vec!["x".into()],
            ..TrialResult::default()
        };
        r.client_errors.push(clients::ClientError {
            at: 0,
            client: 0,
            kind: "reply: timeout".into(),
            detail: String::new(),
        });
        t.add(&r);
        t.add(&TrialResult::default());
        let s = t.summary();
        assert_eq!(
            s.lines().last().unwrap(),
            "soak: trials=2 faults=5 acked=100 lost=1 stale_reads=0 dual_primary=0 client_errors=1"
        );
        assert_eq!(t.exit_code(), 1);
        assert!(s.contains("reply: timeout ×1"));
    }
}
