//! When pre-copy stops iterating (DESIGN §5: "iterated until the dirty set is small or stops
//! shrinking"): a pure policy fed the size of each round, tested on its own.

/// The knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundPolicy {
    /// A round at most this big (bytes of pages and blocks) is small enough: what is dirtied
    /// while it is sent goes in the pause.
    pub small_bytes: u64,
    /// Rounds that did not shrink (against the smallest so far) before giving up on
    /// shrinking.
    pub patience: u32,
    /// Most rounds in all.
    pub max_rounds: u32,
    /// How long a round waits between taking its set (in the first, every page) and reading
    /// it. A page or block the guest writes in that time is seen written and left for the
    /// next round or the pause: one the guest writes all the time would otherwise be sent
    /// twice.
    pub hot_sample: std::time::Duration,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        RoundPolicy {
            // Measured (benches/join.rs, kv under load, 256 MiB): what the guest writes in a
            // round's 250 ms is 5-7 MiB once its store has grown; at 4 MiB that took a
            // second round, half of which was written again and resent in the pause
            // (sent/needed 1.105). 8 MiB goes in the pause in about 40 ms here.
            small_bytes: 8 << 20,
            patience: 3,
            max_rounds: 30,
            // Measured (benches/join.rs, kv under load): with none the pause resent almost
            // every page it carried (sent/needed 1.3-1.5); 100 ms left 1.04-1.12, 250 ms
            // 1.03-1.05, for a pause of 11 -> 17 ms.
            hot_sample: std::time::Duration::from_millis(250),
        }
    }
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Copy what was dirtied meanwhile, while the guest runs.
    Again,
    /// Pause the guest and send the rest with the state.
    Pause(Why),
}

/// Why the copy pauses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The last round was small.
    Small,
    /// The rounds stopped shrinking.
    Stalled,
    /// Too many rounds.
    MaxRounds,
}

impl Why {
    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Why::Small => "the dirty set is small",
            Why::Stalled => "the dirty set stopped shrinking",
            Why::MaxRounds => "the round limit",
        }
    }
}

impl RoundPolicy {
    /// Whether `bytes` (what the guest dirtied since the last round was taken) can go in the
    /// pause without another round: a round that small would only be sent twice, once while
    /// the guest runs and again, re-dirtied, in the pause.
    pub fn fits_the_pause(&self, bytes: u64) -> bool {
        bytes <= self.small_bytes
    }
}

/// The rounds of one join.
#[derive(Clone, Debug)]
pub struct Rounds {
    policy: RoundPolicy,
    rounds: u32,
    smallest: u64,
    stalls: u32,
}

impl Rounds {
    /// Rounds under `policy`.
    pub fn new(policy: RoundPolicy) -> Self {
        Rounds {
            policy,
            rounds: 0,
            smallest: u64::MAX,
            stalls: 0,
        }
    }

    /// Rounds done.
    pub fn done(&self) -> u32 {
        self.rounds
    }

    /// A round sent `bytes` (pages and blocks dirtied since the previous one; the first round
    /// is everything that differs).
    pub fn after(&mut self, bytes: u64) -> Next {
        self.rounds += 1;
        // The first round is the whole copy; it says nothing about the dirtying rate.
        if self.rounds > 1 && bytes <= self.policy.small_bytes {
            return Next::Pause(Why::Small);
        }
        if self.rounds > 1 {
            if bytes < self.smallest {
                self.stalls = 0;
            } else {
                self.stalls += 1;
                if self.stalls >= self.policy.patience {
                    return Next::Pause(Why::Stalled);
                }
            }
            self.smallest = self.smallest.min(bytes);
        }
        if self.rounds >= self.policy.max_rounds {
            return Next::Pause(Why::MaxRounds);
        }
        Next::Again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoundPolicy {
        RoundPolicy {
            small_bytes: 100,
            patience: 2,
            max_rounds: 10,
            hot_sample: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn the_first_round_never_pauses_even_when_small() {
        let mut r = Rounds::new(policy());
        assert_eq!(r.after(0), Next::Again);
        assert_eq!(r.after(50), Next::Pause(Why::Small));
        assert_eq!(r.done(), 2);
    }

    #[test]
    fn shrinking_rounds_go_on_until_small() {
        let mut r = Rounds::new(policy());
        for b in [10_000, 5_000, 2_000, 800, 300] {
            assert_eq!(r.after(b), Next::Again, "round of {b}");
        }
        assert_eq!(r.after(90), Next::Pause(Why::Small));
    }

    #[test]
    fn rounds_that_stop_shrinking_pause() {
        let mut r = Rounds::new(policy());
        assert_eq!(r.after(10_000), Next::Again);
        assert_eq!(r.after(1_000), Next::Again);
        assert_eq!(r.after(1_200), Next::Again, "one stall is patience");
        assert_eq!(r.after(900), Next::Again, "a new smallest resets it");
        assert_eq!(r.after(950), Next::Again);
        assert_eq!(r.after(2_000), Next::Pause(Why::Stalled));
    }

    #[test]
    fn the_round_limit_holds() {
        let mut r = Rounds::new(RoundPolicy {
            patience: 100,
            ..policy()
        });
        let mut n = 0;
        let mut size = 1_000_000u64;
        loop {
            n += 1;
            size -= 1;
            if let Next::Pause(w) = r.after(size) {
                assert_eq!(w, Why::MaxRounds);
                break;
            }
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn a_dirty_set_within_the_small_size_fits_the_pause() {
        let p = RoundPolicy::default();
        assert!(p.fits_the_pause(p.small_bytes));
        assert!(!p.fits_the_pause(p.small_bytes + 1));
    }
}
