//! The seeded fault schedule of a trial: a list of steps, each one fault or a few faults close
//! together, expanded against the node names at the moment the step starts into timed
//! [`Action`]s.
//!
//! Targets are roles ("the primary", "the backup"), resolved when a step begins (the pair
//! is healed before every step: one primary, one backup), so one seed gives the same
//! schedule however the previous steps turned out.

use std::fmt;

use super::rng::Rng;

/// The lab's `failure_timeout` (ms): stops shorter than it should go unnoticed, longer ones
/// cause a failover.
pub const FAILURE_TIMEOUT_MS: u64 = 200;

/// Whom a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The node that is primary when the step begins.
    Primary,
    /// The node that is backup when the step begins.
    Backup,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Primary => "primary",
            Target::Backup => "backup",
        })
    }
}

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9`; the heal restarts the node once the survivor runs alone.
    Kill(Target),
    /// `SIGSTOP`, `SIGCONT` after `ms`.
    Stop {
        /// Whom.
        target: Target,
        /// How long.
        ms: u64,
    },
    /// The channel link taken down at `side`'s end, up again after `ms`.
    CutChannel {
        /// Whose end.
        side: Target,
        /// How long.
        ms: u64,
    },
    /// The primary's fabric link (its clients and its witness path) cut for `ms`.
    CutClient {
        /// How long.
        ms: u64,
    },
    /// The witness killed (`kill -9`) and restarted after `ms`.
    KillWitness {
        /// How long it stays down.
        ms: u64,
    },
    /// `kill -9` and a new process at once (after `after_ms`): it rejoins.
    Restart {
        /// Whom.
        target: Target,
        /// The delay before the new process starts.
        after_ms: u64,
    },
}

impl Fault {
    /// The fault's kind, for figures per kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(Target::Primary) => "kill -9 primary",
            Fault::Kill(Target::Backup) => "kill -9 backup",
            Fault::Stop { ms, .. } if *ms < FAILURE_TIMEOUT_MS => "SIGSTOP < timeout",
            Fault::Stop {
                target: Target::Primary,
                ..
            } => "SIGSTOP primary > timeout",
            Fault::Stop { .. } => "SIGSTOP backup > timeout",
            Fault::CutChannel { .. } => "channel cut",
            Fault::CutClient { .. } => "primary's client link cut",
            Fault::KillWitness { .. } => "witness killed",
            Fault::Restart {
                target: Target::Primary,
                ..
            } => "restart primary",
            Fault::Restart { .. } => "restart backup",
        }
    }
}

impl Step {
    /// The step's kind: its fault's, or `combination`.
    pub fn kind(&self) -> &'static str {
        match self.faults.as_slice() {
            [(_, f)] => f.kind(),
            _ => "combination",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rel = |ms: u64| {
            if ms < FAILURE_TIMEOUT_MS {
                "< timeout"
            } else {
                "> timeout"
            }
        };
        match self {
            Fault::Kill(t) => write!(f, "kill -9 {t}"),
            Fault::Stop { target, ms } => {
                write!(f, "SIGSTOP {target} {ms} ms ({}) then SIGCONT", rel(*ms))
            }
            Fault::CutChannel { side, ms } => {
                write!(f, "cut the channel at the {side}'s end for {ms} ms")
            }
            Fault::CutClient { ms } => write!(f, "cut the primary's client link for {ms} ms"),
            Fault::KillWitness { ms } => write!(f, "kill -9 the witness, restart after {ms} ms"),
            Fault::Restart { target, after_ms } => {
                write!(
                    f,
                    "restart {target} (kill -9, start again after {after_ms} ms)"
                )
            }
        }
    }
}

/// One step: faults at offsets (ms) from its start, then the heal, then a quiet time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `(offset ms, fault)`, by offset.
    pub faults: Vec<(u64, Fault)>,
    /// Quiet time after the heal (ms).
    pub quiet_ms: u64,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (at, fault)) in self.faults.iter().enumerate() {
            if i > 0 {
                write!(f, " + ")?;
            }
            if self.faults.len() > 1 {
                write!(f, "@{at}ms ")?;
            }
            write!(f, "{fault}")?;
        }
        write!(f, "; quiet {} ms", self.quiet_ms)
    }
}

fn target(rng: &mut Rng) -> Target {
    if rng.chance(50) {
        Target::Primary
    } else {
        Target::Backup
    }
}

fn short_stop(rng: &mut Rng) -> u64 {
    rng.range(20, FAILURE_TIMEOUT_MS * 3 / 4)
}

fn long_stop(rng: &mut Rng) -> u64 {
    rng.range(FAILURE_TIMEOUT_MS + 100, 1500)
}

/// One fault chosen at random (kills and cuts most often).
fn single(rng: &mut Rng) -> Fault {
    match rng.below(100) {
        0..=13 => Fault::Kill(Target::Primary),
        14..=23 => Fault::Kill(Target::Backup),
        24..=29 => Fault::Stop {
            target: target(rng),
            ms: short_stop(rng),
        },
        30..=41 => Fault::Stop {
            target: if rng.chance(65) {
                Target::Primary
            } else {
                Target::Backup
            },
            ms: long_stop(rng),
        },
        42..=57 => Fault::CutChannel {
            side: target(rng),
            ms: rng.range(50, 2500),
        },
        58..=69 => Fault::CutClient {
            ms: rng.range(200, 3000),
        },
        70..=81 => Fault::KillWitness {
            ms: rng.range(300, 4000),
        },
        _ => Fault::Restart {
            target: target(rng),
            after_ms: rng.range(0, 500),
        },
    }
}

/// Faults close together: the combinations that matter most, or two at random.
fn combination(rng: &mut Rng) -> Vec<(u64, Fault)> {
    let near = |rng: &mut Rng| rng.range(0, 300);
    match rng.below(6) {
        // A failover needed while the witness is away.
        0 => vec![
            (
                0,
                Fault::KillWitness {
                    ms: rng.range(500, 3000),
                },
            ),
            (rng.range(50, 300), Fault::Kill(Target::Primary)),
        ],
        // Both nodes down: the holder restarts from its disk.
        1 => vec![
            (0, Fault::Kill(Target::Backup)),
            (near(rng), Fault::Kill(Target::Primary)),
        ],
        // A stalled primary whose channel is also cut.
        2 => vec![
            (
                0,
                Fault::Stop {
                    target: Target::Primary,
                    ms: long_stop(rng),
                },
            ),
            (
                near(rng),
                Fault::CutChannel {
                    side: target(rng),
                    ms: rng.range(200, 2000),
                },
            ),
        ],
        // The primary cut off from everything: clients, witness and backup.
        3 => vec![
            (
                0,
                Fault::CutClient {
                    ms: rng.range(500, 3000),
                },
            ),
            (
                near(rng),
                Fault::CutChannel {
                    side: Target::Primary,
                    ms: rng.range(300, 2500),
                },
            ),
        ],
        // The primary dies while its backup restarts.
        4 => vec![
            (0, Fault::Kill(Target::Primary)),
            (
                near(rng),
                Fault::Restart {
                    target: Target::Backup,
                    after_ms: rng.range(0, 400),
                },
            ),
        ],
        _ => {
            let a = single(rng);
            let b = single(rng);
            vec![(0, a), (near(rng), b)]
        }
    }
}

/// A schedule of at least `faults` faults for `seed`'s generator.
pub fn generate(rng: &mut Rng, faults: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut n = 0;
    while n < faults {
        let mut f = if faults - n >= 2 && rng.chance(22) {
            combination(rng)
        } else {
            vec![(0, single(rng))]
        };
        f.sort_by_key(|(at, _)| *at);
        n += f.len();
        steps.push(Step {
            faults: f,
            quiet_ms: rng.range(500, 2500),
        });
    }
    steps
}

/// What the runner does at a moment of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `kill -9` a node (and reap it).
    Kill(String),
    /// `SIGSTOP`.
    Stop(String),
    /// `SIGCONT`.
    Cont(String),
    /// Channel link down at this node's end.
    CutLink(String),
    /// Channel link up again.
    RestoreLink(String),
    /// The node's fabric link down.
    CutFabric(String),
    /// The node's fabric link up again.
    RestoreFabric(String),
    /// `kill -9` the witness.
    KillWitness,
    /// Start the witness.
    StartWitness,
    /// Start a node (if it is not running).
    Start(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Kill(n) => write!(f, "kill -9 {n}"),
            Action::Stop(n) => write!(f, "SIGSTOP {n}"),
            Action::Cont(n) => write!(f, "SIGCONT {n}"),
            Action::CutLink(n) => write!(f, "channel link down at {n}"),
            Action::RestoreLink(n) => write!(f, "channel link up at {n}"),
            Action::CutFabric(n) => write!(f, "fabric link of {n} down"),
            Action::RestoreFabric(n) => write!(f, "fabric link of {n} up"),
            Action::KillWitness => write!(f, "kill -9 the witness"),
            Action::StartWitness => write!(f, "start the witness"),
            Action::Start(n) => write!(f, "start {n}"),
        }
    }
}

/// The step's actions at their offsets (ms), sorted, for the named primary and backup.
pub fn actions(step: &Step, primary: &str, backup: &str) -> Vec<(u64, Action)> {
    let name = |t: Target| match t {
        Target::Primary => primary.to_string(),
        Target::Backup => backup.to_string(),
    };
    let mut out = Vec::new();
    for (at, fault) in &step.faults {
        let at = *at;
        match fault {
            Fault::Kill(t) => out.push((at, Action::Kill(name(*t)))),
            Fault::Stop { target, ms } => {
                out.push((at, Action::Stop(name(*target))));
                out.push((at + ms, Action::Cont(name(*target))));
            }
            Fault::CutChannel { side, ms } => {
                out.push((at, Action::CutLink(name(*side))));
                out.push((at + ms, Action::RestoreLink(name(*side))));
            }
            Fault::CutClient { ms } => {
                out.push((at, Action::CutFabric(primary.to_string())));
                out.push((at + ms, Action::RestoreFabric(primary.to_string())));
            }
            Fault::KillWitness { ms } => {
                out.push((at, Action::KillWitness));
                out.push((at + ms, Action::StartWitness));
            }
            Fault::Restart { target, after_ms } => {
                out.push((at, Action::Kill(name(*target))));
                out.push((at + after_ms, Action::Start(name(*target))));
            }
        }
    }
    // Stable: at equal times, the order the faults were listed in.
    out.sort_by_key(|(at, _)| *at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let a = generate(&mut Rng::new(42), 30);
        let b = generate(&mut Rng::new(42), 30);
        assert_eq!(a, b);
        assert_ne!(a, generate(&mut Rng::new(43), 30));
        let n: usize = a.iter().map(|s| s.faults.len()).sum();
        assert!(n >= 30);
    }

    #[test]
    fn every_kind_of_fault_comes_up() {
        let steps = generate(&mut Rng::new(1), 400);
        let text: String = steps.iter().map(|s| format!("{s}\n")).collect();
        for needle in [
            "kill -9 primary",
            "kill -9 backup",
            "(< timeout)",
            "(> timeout)",
            "cut the channel",
            "client link",
            "the witness",
            "restart",
            " + ",
        ] {
            assert!(text.contains(needle), "{needle} never scheduled");
        }
    }

    #[test]
    fn actions_restore_what_they_break() {
        let step = Step {
            faults: vec![
                (0, Fault::CutClient { ms: 500 }),
                (
                    100,
                    Fault::Stop {
                        target: Target::Backup,
                        ms: 50,
                    },
                ),
            ],
            quiet_ms: 0,
        };
        let a = actions(&step, "a", "b");
        assert_eq!(
            a,
            vec![
                (0, Action::CutFabric("a".into())),
                (100, Action::Stop("b".into())),
                (150, Action::Cont("b".into())),
                (500, Action::RestoreFabric("a".into())),
            ]
        );
    }
}
