//! How far the backup is behind (DESIGN §5 "Lag bound"), as a pure state machine: the time
//! since the primary sent the oldest log batch that the backup has not replayed yet. A
//! backup that has replayed everything it was sent has no lag, however long ago that was.

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

    /// A batch whose records reach boundary `watermark` was sent at `now`.
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

    /// The lag at `now`, in nanoseconds.
    pub fn lag_ns(&self, now: u64) -> u64 {
        self.sent
            .front()
            .map_or(0, |&(_, t)| now.saturating_sub(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unreplayed_batch() {
        let mut l = LagTracker::new();
        assert_eq!(l.lag_ns(100), 0);
        l.sent(10, 1_000);
        l.sent(20, 2_000);
        assert_eq!(l.lag_ns(5_000), 4_000);
        l.replayed(15);
        assert_eq!(l.lag_ns(5_000), 3_000);
        l.replayed(20);
        assert_eq!(l.lag_ns(1_000_000), 0, "caught up: no lag however old");
        // Reports that go backwards change nothing.
        l.sent(30, 6_000);
        l.replayed(12);
        assert_eq!(l.replayed_boundary(), 20);
        assert_eq!(l.lag_ns(7_000), 1_000);
    }
}
