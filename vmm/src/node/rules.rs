//! The claim rules of DESIGN §5 ("Who may claim") as pure functions, tested on their own.

use std::time::Duration;

use crate::channel::msg::Role;

/// What a starting node knows when it decides.
#[derive(Clone, Debug)]
pub struct StartView<'a> {
    /// This node.
    pub me: &'a str,
    /// The generation it persisted.
    pub persisted: u64,
    /// The witness's `(generation, holder)`, if it answered.
    pub witness: Option<(u64, Option<&'a str>)>,
    /// How long since a peer running the VM at a generation ≥ `persisted` last answered
    /// (or since this node started, if none ever did).
    pub running_peer_silent_for: Duration,
    /// `failure_timeout` + margin.
    pub quiet_needed: Duration,
    /// The operator asked this node to claim (`--claim`).
    pub operator_claim: bool,
    /// This node learned that the pair already runs: a peer answered that it runs the VM, or
    /// the witness denied this node's claim of a new pair. A fresh node (generation 0) then
    /// only joins (a spare waiting for a slot must not claim again and again).
    pub pair_exists: bool,
}

/// A starting node's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// Claim with this `seen` generation.
    Claim {
        /// The generation the claim names as current.
        seen: u64,
    },
    /// Do not claim: keep trying to join a peer.
    KeepJoining,
}

/// DESIGN §5: a starting node never claims, except (a) at generation 0 (a new pair), (b) as
/// the witness's holder at a generation ≥ its persisted one when no peer running the VM has
/// answered for `failure_timeout` + margin, or (c) by an explicit operator flag. A generation
/// learned any other way (a denial, a handshake, `status`) is never used to claim.
pub fn decide_start(v: &StartView<'_>) -> StartDecision {
    let quiet = v.running_peer_silent_for >= v.quiet_needed;
    if v.operator_claim {
        if let Some((g, _)) = v.witness {
            if quiet {
                return StartDecision::Claim { seen: g };
            }
        }
        return StartDecision::KeepJoining;
    }
    if v.persisted == 0 {
        return if v.pair_exists {
            StartDecision::KeepJoining
        } else {
            StartDecision::Claim { seen: 0 }
        };
    }
    match v.witness {
        Some((g, Some(holder))) if holder == v.me && g >= v.persisted && quiet => {
            StartDecision::Claim { seen: g }
        }
        _ => StartDecision::KeepJoining,
    }
}

/// Whether a peer's answer counts as "a peer running the VM" for [`StartView`].
pub fn counts_as_running(peer_role: Role, peer_generation: u64, persisted: u64) -> bool {
    peer_role.runs_vm() && peer_generation >= persisted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>() -> StartView<'a> {
        StartView {
            me: "a",
            persisted: 3,
            witness: Some((3, Some("a"))),
            running_peer_silent_for: Duration::from_secs(1),
            quiet_needed: Duration::from_millis(300),
            operator_claim: false,
            pair_exists: false,
        }
    }

    #[test]
    fn a_new_pair_claims_generation_zero() {
        let v = StartView {
            persisted: 0,
            witness: None,
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::Claim { seen: 0 });
    }

    #[test]
    fn a_fresh_node_of_a_running_pair_only_joins() {
        let v = StartView {
            persisted: 0,
            witness: Some((4, Some("b"))),
            pair_exists: true,
            running_peer_silent_for: Duration::from_secs(60),
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
    }

    #[test]
    fn the_last_holder_claims_only_after_quiet() {
        assert_eq!(decide_start(&view()), StartDecision::Claim { seen: 3 });
        let v = StartView {
            running_peer_silent_for: Duration::from_millis(100),
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
    }

    #[test]
    fn a_node_that_is_not_the_holder_never_claims() {
        let v = StartView {
            witness: Some((4, Some("b"))),
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
        // Holder at an older generation than persisted: something is wrong, do not claim.
        let v = StartView {
            witness: Some((2, Some("a"))),
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
        // Witness unreachable: nothing to go on.
        let v = StartView {
            witness: None,
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
    }

    #[test]
    fn the_operator_flag_claims_on_the_witness_generation_after_quiet() {
        let v = StartView {
            witness: Some((9, Some("b"))),
            operator_claim: true,
            ..view()
        };
        assert_eq!(decide_start(&v), StartDecision::Claim { seen: 9 });
        let v = StartView {
            running_peer_silent_for: Duration::ZERO,
            ..v
        };
        assert_eq!(decide_start(&v), StartDecision::KeepJoining);
    }

    #[test]
    fn only_peers_running_the_vm_at_our_generation_or_later_count() {
        assert!(counts_as_running(Role::Primary, 3, 3));
        assert!(counts_as_running(Role::Claiming, 4, 3));
        assert!(!counts_as_running(Role::Backup, 2, 3));
        for r in [Role::Starting, Role::Joining, Role::Halted] {
            assert!(!counts_as_running(r, 9, 3));
        }
    }
}
