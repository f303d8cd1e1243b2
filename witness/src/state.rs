//! The witness's rule as a pure state machine: no I/O, no clock, no randomness.
//!
//! Per FT pair the witness holds `(generation, holder, claim id)`. The one atomic operation is
//! `claim(pair, node, seen_generation, claim_id)`, where the claim id is chosen by the
//! claimant, fresh for every claim and reused by that claim's retries:
//!
//! * if `seen_generation` is the current generation, the claim is **granted**: the generation
//!   becomes `seen_generation + 1`, the holder becomes `node` and the claim id is stored;
//! * if the record is exactly `(seen_generation + 1, node, claim_id)`, the claim is a
//!   **retry** of a claim already granted (its reply was lost): the same grant is returned
//!   again and nothing changes;
//! * otherwise the claim is **denied** with the current `(generation, holder)` — also when
//!   the same node claims the same `seen_generation` with a different claim id: neither a
//!   restarted node process nor a later claim of the same node inherits an earlier grant.
//!
//! A node may claim only for a pair whose configuration lists it; anything else is refused
//! before the rule is applied. [`Witness::decide_claim`] only decides; the caller makes the
//! new state durable and then calls [`Witness::apply`] (see the service), so that no reply
//! can ever leave before the state it reports is on disk.

use std::collections::BTreeMap;
use std::fmt;

/// The claimant's identifier of one claim: 16 bytes, fresh (random) per claim, reused by
/// every retry of that claim.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimId(pub [u8; 16]);

impl ClaimId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh random claim id from the system's secure random source.
    ///
    /// # Panics
    /// If the operating system has no randomness to give (never on Linux after boot).
    pub fn random() -> ClaimId {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system's random source failed");
        ClaimId(b)
    }

    /// The id as 32 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hexadecimal digits.
    pub fn from_hex(s: &str) -> Result<ClaimId, String> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "invalid claim id {s:?}: expected 32 hexadecimal digits (16 bytes)"
            ));
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ClaimId(b))
    }
}

impl fmt::Debug for ClaimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimId({})", self.to_hex())
    }
}

impl fmt::Display for ClaimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for ClaimId {
    type Err = String;
    fn from_str(s: &str) -> Result<ClaimId, String> {
        ClaimId::from_hex(s)
    }
}

/// The durable state of one pair. Generation 0 with no holder is the state of a pair that was
/// never claimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairState {
    /// The current generation (fencing token); grows by exactly one per grant.
    pub generation: u64,
    /// The node granted the current generation (`None` before the first grant).
    pub holder: Option<String>,
    /// The claim id of the grant of the current generation (`None` before the first grant,
    /// and for a grant stored by a witness older than claim ids: such a grant is never
    /// repeated).
    pub claim_id: Option<ClaimId>,
}

/// Why a request was refused before the rule was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The pair is not in the witness configuration.
    UnknownPair,
    /// The node is not one of the pair's configured nodes.
    NotAuthorized,
}

/// What the rule decided for a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// A new grant: `new_state` must be made durable, then applied, then replied.
    Grant {
        /// The state after the grant (generation = seen + 1, holder = the claimant).
        new_state: PairState,
    },
    /// A retry of the grant the claimant already holds: reply with the same grant.
    Regrant {
        /// The unchanged current state.
        state: PairState,
    },
    /// Denied: reply with the current state.
    Deny {
        /// The unchanged current state.
        state: PairState,
    },
    /// Refused: the claimant may not claim for this pair.
    Refuse(Refusal),
}

/// The witness's whole state: the configured pairs and their states.
#[derive(Clone, Debug, Default)]
pub struct Witness {
    pairs: BTreeMap<String, (Vec<String>, PairState)>,
}

impl Witness {
    /// A witness for the configured `pairs` (pair name → allowed node names), with the
    /// durable `states` loaded from the store. A configured pair without a stored state starts
    /// at generation 0; stored states of pairs no longer configured are ignored.
    pub fn new(
        pairs: &BTreeMap<String, Vec<String>>,
        mut states: BTreeMap<String, PairState>,
    ) -> Witness {
        let pairs = pairs
            .iter()
            .map(|(p, nodes)| {
                let st = states.remove(p).unwrap_or_default();
                (p.clone(), (nodes.clone(), st))
            })
            .collect();
        Witness { pairs }
    }

    /// The current state of `pair`, or `None` if the pair is not configured.
    pub fn state(&self, pair: &str) -> Option<&PairState> {
        self.pairs.get(pair).map(|(_, s)| s)
    }

    /// The nodes allowed to claim for `pair`.
    pub fn nodes(&self, pair: &str) -> Option<&[String]> {
        self.pairs.get(pair).map(|(n, _)| n.as_slice())
    }

    /// Whether `node` belongs to at least one configured pair.
    pub fn knows_node(&self, node: &str) -> bool {
        self.pairs
            .values()
            .any(|(n, _)| n.iter().any(|x| x == node))
    }

    /// Names of the configured pairs.
    pub fn pair_names(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    /// Checks that `node` may act on `pair`.
    pub fn authorize(&self, pair: &str, node: &str) -> Result<&PairState, Refusal> {
        let (nodes, st) = self.pairs.get(pair).ok_or(Refusal::UnknownPair)?;
        if nodes.iter().any(|n| n == node) {
            Ok(st)
        } else {
            Err(Refusal::NotAuthorized)
        }
    }

    /// Decides `claim(pair, node, seen, claim_id)` without changing anything.
    pub fn decide_claim(
        &self,
        pair: &str,
        node: &str,
        seen: u64,
        claim_id: ClaimId,
    ) -> ClaimDecision {
        let st = match self.authorize(pair, node) {
            Ok(st) => st,
            Err(r) => return ClaimDecision::Refuse(r),
        };
        if seen == st.generation {
            // The generation cannot overflow in practice; refuse rather than wrap.
            match seen.checked_add(1) {
                Some(g) => ClaimDecision::Grant {
                    new_state: PairState {
                        generation: g,
                        holder: Some(node.to_string()),
                        claim_id: Some(claim_id),
                    },
                },
                None => ClaimDecision::Deny { state: st.clone() },
            }
        } else if seen.checked_add(1) == Some(st.generation)
            && st.holder.as_deref() == Some(node)
            && st.claim_id == Some(claim_id)
        {
            ClaimDecision::Regrant { state: st.clone() }
        } else {
            ClaimDecision::Deny { state: st.clone() }
        }
    }

    /// Installs a new state for a configured pair (after it was made durable).
    ///
    /// # Panics
    /// Never: an unknown pair is ignored (it cannot come from [`Witness::decide_claim`]).
    pub fn apply(&mut self, pair: &str, new_state: PairState) {
        if let Some((_, st)) = self.pairs.get_mut(pair) {
            *st = new_state;
        }
    }

    /// Decides and applies at once (for callers without a store, such as tests).
    pub fn claim(&mut self, pair: &str, node: &str, seen: u64, claim_id: ClaimId) -> ClaimDecision {
        let d = self.decide_claim(pair, node, seen, claim_id);
        if let ClaimDecision::Grant { new_state } = &d {
            self.apply(pair, new_state.clone());
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w() -> Witness {
        let mut pairs = BTreeMap::new();
        pairs.insert("p".to_string(), vec!["a".to_string(), "b".to_string()]);
        pairs.insert("q".to_string(), vec!["c".to_string(), "d".to_string()]);
        Witness::new(&pairs, BTreeMap::new())
    }

    fn id(n: u8) -> ClaimId {
        ClaimId([n; 16])
    }

    fn st(g: u64, h: &str, c: u8) -> PairState {
        PairState {
            generation: g,
            holder: Some(h.to_string()),
            claim_id: Some(id(c)),
        }
    }

    #[test]
    fn first_claim_is_granted_generation_one() {
        let mut w = w();
        assert_eq!(w.state("p"), Some(&PairState::default()));
        assert_eq!(
            w.claim("p", "a", 0, id(1)),
            ClaimDecision::Grant {
                new_state: st(1, "a", 1)
            }
        );
        assert_eq!(w.state("p"), Some(&st(1, "a", 1)));
    }

    #[test]
    fn second_claim_on_same_generation_is_denied_with_current_state() {
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        assert_eq!(
            w.claim("p", "b", 0, id(2)),
            ClaimDecision::Deny {
                state: st(1, "a", 1)
            }
        );
        // Even with the grantee's claim id: the holder must match too.
        assert_eq!(
            w.claim("p", "b", 0, id(1)),
            ClaimDecision::Deny {
                state: st(1, "a", 1)
            }
        );
        assert_eq!(w.state("p"), Some(&st(1, "a", 1)));
    }

    #[test]
    fn retry_by_the_grantee_returns_the_same_grant() {
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        assert_eq!(
            w.claim("p", "a", 0, id(1)),
            ClaimDecision::Regrant {
                state: st(1, "a", 1)
            }
        );
        assert_eq!(w.state("p"), Some(&st(1, "a", 1)));
    }

    #[test]
    fn a_new_claim_by_the_grantee_does_not_inherit_the_grant() {
        // The same node, the same seen generation, another claim id: a restarted node
        // process (or a later claim) is denied, with the current state.
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        assert_eq!(
            w.claim("p", "a", 0, id(9)),
            ClaimDecision::Deny {
                state: st(1, "a", 1)
            }
        );
        // ... and the original claim's retry still gets its grant.
        assert_eq!(
            w.claim("p", "a", 0, id(1)),
            ClaimDecision::Regrant {
                state: st(1, "a", 1)
            }
        );
    }

    #[test]
    fn a_grant_without_claim_id_is_never_repeated() {
        // A record written before claim ids existed.
        let mut cfg = BTreeMap::new();
        cfg.insert("p".to_string(), vec!["a".to_string()]);
        let old = PairState {
            generation: 4,
            holder: Some("a".into()),
            claim_id: None,
        };
        let mut states = BTreeMap::new();
        states.insert("p".to_string(), old.clone());
        let mut w = Witness::new(&cfg, states);
        for c in [0u8, 1, 255] {
            assert_eq!(
                w.claim("p", "a", 3, id(c)),
                ClaimDecision::Deny { state: old.clone() }
            );
        }
        assert_eq!(
            w.claim("p", "a", 4, id(7)),
            ClaimDecision::Grant {
                new_state: st(5, "a", 7)
            }
        );
    }

    #[test]
    fn retry_after_being_superseded_is_denied() {
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        w.claim("p", "b", 1, id(2));
        assert_eq!(
            w.claim("p", "a", 0, id(1)),
            ClaimDecision::Deny {
                state: st(2, "b", 2)
            }
        );
    }

    #[test]
    fn future_and_stale_generations_are_denied() {
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        w.claim("p", "b", 1, id(2));
        assert_eq!(
            w.claim("p", "a", 7, id(3)),
            ClaimDecision::Deny {
                state: st(2, "b", 2)
            }
        );
        assert_eq!(
            w.claim("p", "b", 0, id(2)),
            ClaimDecision::Deny {
                state: st(2, "b", 2)
            }
        );
        // The holder claiming again on the current generation is a fresh grant.
        assert_eq!(
            w.claim("p", "b", 2, id(4)),
            ClaimDecision::Grant {
                new_state: st(3, "b", 4)
            }
        );
    }

    #[test]
    fn refusals() {
        let mut w = w();
        assert_eq!(
            w.claim("zz", "a", 0, id(1)),
            ClaimDecision::Refuse(Refusal::UnknownPair)
        );
        assert_eq!(
            w.claim("p", "c", 0, id(1)),
            ClaimDecision::Refuse(Refusal::NotAuthorized)
        );
        assert_eq!(w.state("p"), Some(&PairState::default()));
        assert!(w.knows_node("d") && !w.knows_node("e"));
    }

    #[test]
    fn pairs_are_independent_and_state_is_restored() {
        let mut w = w();
        w.claim("p", "a", 0, id(1));
        w.claim("q", "d", 0, id(2));
        let mut states = BTreeMap::new();
        states.insert("p".to_string(), w.state("p").unwrap().clone());
        states.insert("q".to_string(), w.state("q").unwrap().clone());
        states.insert("gone".to_string(), st(9, "x", 3));
        let mut cfg = BTreeMap::new();
        cfg.insert("p".to_string(), vec!["a".to_string(), "b".to_string()]);
        cfg.insert("q".to_string(), vec!["c".to_string(), "d".to_string()]);
        let mut w2 = Witness::new(&cfg, states);
        assert_eq!(w2.state("gone"), None);
        assert_eq!(
            w2.claim("p", "a", 0, id(1)),
            ClaimDecision::Regrant {
                state: st(1, "a", 1)
            }
        );
        assert_eq!(
            w2.claim("q", "c", 0, id(2)),
            ClaimDecision::Deny {
                state: st(1, "d", 2)
            }
        );
    }

    #[test]
    fn generation_never_wraps() {
        let mut cfg = BTreeMap::new();
        cfg.insert("p".to_string(), vec!["a".to_string()]);
        let mut states = BTreeMap::new();
        states.insert("p".to_string(), st(u64::MAX, "a", 1));
        let mut w = Witness::new(&cfg, states);
        assert_eq!(
            w.claim("p", "a", u64::MAX, id(1)),
            ClaimDecision::Deny {
                state: st(u64::MAX, "a", 1)
            }
        );
    }

    #[test]
    fn claim_id_hex_round_trips_and_rejects_garbage() {
        let c = ClaimId::random();
        assert_ne!(c, ClaimId::random(), "two random claim ids collided");
        assert_eq!(ClaimId::from_hex(&c.to_hex()), Ok(c));
        assert_eq!(c.to_string().len(), 32);
        for bad in ["", "00", &"0".repeat(31), &"0".repeat(33), &"g".repeat(32)] {
            let e = ClaimId::from_hex(bad).unwrap_err();
            assert!(e.contains("32 hexadecimal digits"), "{e}");
        }
        assert_eq!(
            "000102030405060708090a0B0c0d0e0f".parse::<ClaimId>(),
            Ok(ClaimId([
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
            ]))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Random claim sequences: at most one node is ever granted a given generation,
        /// generations grow by one per grant, a grant only happens on the current generation,
        /// and a repeated grant answers only the exact claim (node and claim id) it repeats.
        #[test]
        fn at_most_one_grant_per_generation(
            ops in proptest::collection::vec((0usize..4, 0u64..8, any::<bool>(), 0u8..3), 1..200)
        ) {
            let nodes = ["a", "b", "c", "x"]; // "x" is not in the pair
            let mut cfg = BTreeMap::new();
            cfg.insert("p".to_string(), vec!["a".into(), "b".into(), "c".into()]);
            let mut w = Witness::new(&cfg, BTreeMap::new());
            let mut granted: BTreeMap<u64, (String, ClaimId)> = BTreeMap::new();
            for (n, seen_off, use_current, c) in ops {
                let node = nodes[n];
                let claim_id = id(c);
                let before = w.state("p").unwrap().clone();
                // Bias towards the current generation so that grants happen often.
                let seen = if use_current { before.generation } else { seen_off };
                let d = w.claim("p", node, seen, claim_id);
                let after = w.state("p").unwrap().clone();
                match d {
                    ClaimDecision::Grant { new_state } => {
                        prop_assert_eq!(seen, before.generation);
                        prop_assert_eq!(new_state.generation, before.generation + 1);
                        prop_assert_eq!(new_state.claim_id, Some(claim_id));
                        prop_assert_eq!(&after, &new_state);
                        let prev = granted.insert(new_state.generation, (node.to_string(), claim_id));
                        prop_assert!(prev.is_none(), "generation {} granted twice", new_state.generation);
                    }
                    ClaimDecision::Regrant { state } => {
                        prop_assert_eq!(&state, &before);
                        prop_assert_eq!(&after, &before);
                        prop_assert_eq!(granted.get(&state.generation), Some(&(node.to_string(), claim_id)));
                        prop_assert_eq!(seen + 1, state.generation);
                    }
                    ClaimDecision::Deny { state } => {
                        prop_assert_eq!(&state, &before);
                        prop_assert_eq!(&after, &before);
                        prop_assert_ne!(seen, before.generation);
                        // Never a denial of the exact claim the current grant answered.
                        prop_assert!(!(seen + 1 == before.generation
                            && before.holder.as_deref() == Some(node)
                            && before.claim_id == Some(claim_id)));
                    }
                    ClaimDecision::Refuse(r) => {
                        prop_assert_eq!(r, Refusal::NotAuthorized);
                        prop_assert_eq!(node, "x");
                        prop_assert_eq!(&after, &before);
                    }
                }
            }
            // Every generation up to the current one was granted exactly once.
            let cur = w.state("p").unwrap().generation;
            prop_assert_eq!(granted.len() as u64, cur);
            prop_assert_eq!(granted.keys().copied().collect::<Vec<_>>(), (1..=cur).collect::<Vec<_>>());
        }
    }
}
