//! How far the backup is behind (DESIGN §5 "Lag bound"), as a pure state machine: the span of
//! the primary's execution the backup has been sent but not replayed — from the oldest
//! unreplayed batch to the newest batch sent. That is what a failover would have to replay,
//! and what the primary bounds by holding its vCPU (while it is held it sends nothing new, so
//! the span cannot grow). A backup that has replayed everything it was sent has no lag.

use std::collections::VecDeque;

use crate::epoch::Boundary;

/// The primary's view of the backup's lag.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// (watermark of a batch, when it was sent), ascending.
    sent: VecDeque<(Boundary, u64)>,
    replayed: Boundary,
}

impl LagTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch whose records reach boundary `watermark` was sent at `now` (the primary's busy
    /// clock).
    pub fn sent(&mut self, watermark: Boundary, now: u64) {
        if self.sent.back().is_none_or(|&(w, _)| w < watermark) {
            self.sent.push_back((watermark, now));
        }
    }

    /// The backup reports it has replayed through `boundary`.
    pub fn replayed(&mut self, boundary: Boundary) {
        self.replayed = self.replayed.max(boundary);
        while self.sent.front().is_some_and(|&(w, _)| w <= self.replayed) {
            self.sent.pop_front();
        }
    }

    /// The last boundary the backup reported replayed.
    pub fn replayed_boundary(&self) -> Boundary {
        self.replayed
    }

    /// When the oldest batch the backup has not replayed was sent (`None`: it replayed all).
    pub fn oldest_sent(&self) -> Option<u64> {
        self.sent.front().map(|&(_, t)| t)
    }

    /// The lag, in nanoseconds of the primary's busy time.
    pub fn lag_ns(&self) -> u64 {
        match (self.sent.front(), self.sent.back()) {
            (Some(&(_, first)), Some(&(_, last))) => last.saturating_sub(first),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_span_of_sent_but_unreplayed_batches() {
        let mut l = LagTracker::new();
        assert_eq!(l.lag_ns(), 0);
        l.sent(10, 1_000);
        assert_eq!(l.lag_ns(), 0, "one batch in flight spans nothing yet");
        l.sent(20, 2_000);
        l.sent(30, 5_000);
        assert_eq!(l.lag_ns(), 4_000);
        l.replayed(15);
        assert_eq!(l.lag_ns(), 3_000);
        assert_eq!(l.oldest_sent(), Some(2_000));
        l.replayed(30);
        assert_eq!(l.lag_ns(), 0, "caught up: no lag");
        assert_eq!(l.oldest_sent(), None);
        // Reports that go backwards change nothing.
        l.sent(40, 6_000);
        l.sent(50, 7_500);
        l.replayed(12);
        assert_eq!(l.replayed_boundary(), 30);
        assert_eq!(l.lag_ns(), 1_500);
    }
}
