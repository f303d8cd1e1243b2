//! The Output Rule and its lease (DESIGN §4–§5), as a pure state machine: time is passed in
//! (nanoseconds on the primary's monotonic clock), frames go in and come out, no I/O.
//!
//! A frame the guest transmitted at boundary `E` may be written once the backup has
//! acknowledged the log complete through `E − 1`, and only within the lease of that
//! acknowledgement: every primary message has a sequence number and its send time; an ack
//! echoes the latest sequence number the backup received, and the frames it enables may be
//! written only before `t_sent(echo) + failure_timeout − margin`. A backup claims no sooner
//! than `failure_timeout` after its last receipt, so output released under the lease can never
//! overlap a backup that took over.

use std::collections::VecDeque;

use crate::epoch::Boundary;

/// What the gate does with held frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// With a backup: the Output Rule and the lease.
    Replicated,
    /// Granted to run alone by the witness: every frame goes out at once.
    Alone,
    /// Lost its backup, claim pending: everything is held.
    Holding,
}

/// The Output Rule's state on the primary.
#[derive(Debug)]
pub struct OutputGate {
    mode: GateMode,
    failure_timeout_ns: u64,
    margin_ns: u64,
    /// Send times of messages not yet echoed (ascending sequence numbers).
    sent: VecDeque<(u64, u64)>,
    /// The latest echoed message's send time.
    echoed: Option<(u64, u64)>,
    acked: Boundary,
    lease_until: u64,
    held: VecDeque<(Boundary, Vec<u8>)>,
    held_bytes: usize,
    cap_bytes: usize,
    /// Frames dropped because the held bytes passed the cap.
    pub dropped: u64,
    /// Frames released so far.
    pub released: u64,
}

impl OutputGate {
    /// A gate in replicated mode.
    pub fn new(failure_timeout_ns: u64, margin_ns: u64, cap_bytes: usize) -> Self {
        OutputGate {
            mode: GateMode::Replicated,
            failure_timeout_ns,
            margin_ns: margin_ns.min(failure_timeout_ns),
            sent: VecDeque::new(),
            echoed: None,
            acked: 0,
            lease_until: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            cap_bytes,
            dropped: 0,
            released: 0,
        }
    }

    /// The mode.
    pub fn mode(&self) -> GateMode {
        self.mode
    }

    /// Changes the mode (`Alone` after a grant, `Holding` after losing the backup).
    pub fn set_mode(&mut self, mode: GateMode) {
        self.mode = mode;
        if mode != GateMode::Replicated {
            self.lease_until = 0;
        }
    }

    /// A new backup (a joiner whose state is at boundary `from`): what the old one
    /// acknowledged and echoed no longer counts; its state counts as acknowledged through
    /// `from`, and there is no lease until its first ack.
    pub fn reset_backup(&mut self, from: Boundary) {
        self.sent.clear();
        self.echoed = None;
        self.acked = from;
        self.lease_until = 0;
    }

    /// Drops every held frame (a denied claim: nothing held may ever leave).
    pub fn drop_all(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        self.held_bytes = 0;
        n
    }

    /// The highest watermark the backup acknowledged.
    pub fn acked(&self) -> Boundary {
        self.acked
    }

    /// Frames held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Until when (ns) the current lease lets output go.
    pub fn lease_until(&self) -> u64 {
        self.lease_until
    }

    /// A primary message with sequence number `seq` was sent at `now`.
    pub fn sent(&mut self, seq: u64, now: u64) {
        self.sent.push_back((seq, now));
    }

    /// An ack arrived: the backup has the log through `watermark` and had received message
    /// `echo`. Returns that message's send time if this ack is the first to echo it.
    pub fn ack(&mut self, echo: u64, watermark: Boundary) -> Option<u64> {
        let mut first = None;
        while let Some(&(s, t)) = self.sent.front() {
            if s > echo {
                break;
            }
            self.sent.pop_front();
            if s == echo {
                self.echoed = Some((s, t));
                first = Some(t);
            }
        }
        if let Some((s, t)) = self.echoed {
            if s == echo && self.mode == GateMode::Replicated {
                let until = t + self.failure_timeout_ns - self.margin_ns;
                self.lease_until = self.lease_until.max(until);
            }
        }
        self.acked = self.acked.max(watermark);
        first
    }

    /// The guest transmitted `frame` at boundary `b`.
    pub fn hold(&mut self, b: Boundary, frame: Vec<u8>) {
        self.held_bytes += frame.len();
        self.held.push_back((b, frame));
        while self.held_bytes > self.cap_bytes {
            match self.held.pop_front() {
                Some((_, f)) => {
                    self.held_bytes -= f.len();
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// The frames that may be written now, in transmit order.
    pub fn release(&mut self, now: u64) -> Vec<(Boundary, Vec<u8>)> {
        std::iter::from_fn(|| self.release_one(now)).collect()
    }

    /// The next frame that may be written at `now`, if any. The output task asks for each
    /// frame with a clock read just before its write, so a process stopped in the middle of a
    /// burst finds its lease run out for the rest when it resumes.
    pub fn release_one(&mut self, now: u64) -> Option<(Boundary, Vec<u8>)> {
        let ok = match (self.mode, self.held.front()) {
            (_, None) => false,
            (GateMode::Holding, _) => false,
            (GateMode::Alone, _) => true,
            (GateMode::Replicated, Some((b, _))) => {
                b.saturating_sub(1) <= self.acked && now < self.lease_until
            }
        };
        if !ok {
            return None;
        }
        let (b, f) = self.held.pop_front().expect("front exists");
        self.held_bytes -= f.len();
        self.released += 1;
        Some((b, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FT: u64 = 150_000_000;
    const MARGIN: u64 = 20_000_000;

    fn gate() -> OutputGate {
        OutputGate::new(FT, MARGIN, 1 << 20)
    }

    #[test]
    fn a_frame_waits_for_the_ack_of_the_previous_boundary() {
        let mut g = gate();
        g.sent(1, 0);
        g.hold(10, vec![1]);
        assert!(g.release(1).is_empty(), "nothing acked");
        g.ack(1, 8);
        assert!(g.release(2).is_empty(), "acked 8 < 9");
        g.ack(1, 9);
        assert_eq!(g.release(3), vec![(10, vec![1])]);
        assert_eq!(g.released, 1);
    }

    #[test]
    fn an_ack_gives_the_send_time_of_the_message_it_is_first_to_echo() {
        let mut g = gate();
        g.sent(1, 100);
        g.sent(2, 250);
        assert_eq!(g.ack(2, 5), Some(250), "echoes 2 (and passes over 1)");
        assert_eq!(g.ack(2, 6), None, "2 was echoed already");
        assert_eq!(g.ack(1, 6), None, "1 went unechoed and is gone");
        g.sent(3, 400);
        assert_eq!(g.ack(3, 7), Some(400));
    }

    #[test]
    fn frames_leave_in_order_and_a_later_frame_waits_behind_an_earlier_one() {
        let mut g = gate();
        g.sent(1, 0);
        g.hold(5, vec![1]);
        g.hold(7, vec![2]);
        g.hold(9, vec![3]);
        g.ack(1, 6);
        assert_eq!(g.release(1), vec![(5, vec![1]), (7, vec![2])]);
        g.ack(1, 8);
        assert_eq!(g.release(1), vec![(9, vec![3])]);
    }

    #[test]
    fn a_new_backup_starts_without_the_old_ones_acks_or_lease() {
        let mut g = OutputGate::new(100, 10, 1 << 20);
        g.sent(1, 0);
        g.ack(1, 50);
        g.reset_backup(40);
        g.hold(30, vec![1]);
        g.hold(41, vec![2]);
        g.hold(45, vec![3]);
        assert_eq!(g.acked(), 40);
        assert!(g.release(1).is_empty(), "no lease from the new backup yet");
        g.sent(2, 5);
        g.ack(2, 40);
        assert_eq!(
            g.release(6),
            vec![(30, vec![1]), (41, vec![2])],
            "frames through 41 need W >= 40 only"
        );
        assert!(g.release(6).is_empty(), "frame 45 needs W >= 44");
    }

    #[test]
    fn the_lease_is_anchored_on_the_echoed_message_not_on_the_arrival_of_the_ack() {
        let mut g = gate();
        g.sent(1, 0);
        g.sent(2, 100_000_000);
        g.hold(2, vec![1]);
        // An ack echoing message 1 that sat in a socket buffer and arrives late.
        g.ack(1, 5);
        let deadline = FT - MARGIN;
        assert!(g.release(deadline).is_empty(), "lease of message 1 ran out");
        assert_eq!(g.lease_until(), deadline);
        // A fresher ack echoing message 2 extends it.
        g.ack(2, 5);
        assert_eq!(g.release(deadline), vec![(2, vec![1])]);
        assert_eq!(g.lease_until(), 100_000_000 + deadline);
    }

    #[test]
    fn a_stale_duplicate_ack_does_not_extend_the_lease() {
        let mut g = gate();
        g.sent(1, 0);
        g.ack(1, 1);
        g.sent(2, 500_000_000);
        // The same echo again later: the lease stays anchored on message 1's send time.
        g.ack(1, 1);
        assert_eq!(g.lease_until(), FT - MARGIN);
    }

    #[test]
    fn holding_releases_nothing_alone_releases_everything_drop_all_empties() {
        let mut g = gate();
        g.sent(1, 0);
        g.hold(1, vec![1]);
        g.set_mode(GateMode::Holding);
        g.ack(1, 100);
        assert!(g.release(1).is_empty());
        g.set_mode(GateMode::Alone);
        g.hold(200, vec![2]);
        assert_eq!(g.release(u64::MAX).len(), 2);
        g.set_mode(GateMode::Holding);
        g.hold(201, vec![3]);
        assert_eq!(g.drop_all(), 1);
        g.set_mode(GateMode::Alone);
        assert!(g.release(1).is_empty());
    }

    #[test]
    fn the_cap_drops_the_oldest_frames_and_counts_them() {
        let mut g = OutputGate::new(FT, MARGIN, 10);
        g.hold(1, vec![0; 4]);
        g.hold(2, vec![0; 4]);
        g.hold(3, vec![0; 4]);
        assert_eq!(g.dropped, 1);
        assert_eq!(g.held(), 2);
        assert_eq!(g.held_bytes(), 8);
    }

    #[test]
    fn a_burst_stops_where_the_lease_runs_out() {
        let mut g = gate();
        g.sent(1, 0);
        g.hold(2, vec![1]);
        g.hold(3, vec![2]);
        g.ack(1, 5);
        let deadline = FT - MARGIN;
        assert_eq!(g.release_one(deadline - 1), Some((2, vec![1])));
        // Stopped here, resumed after the lease: the rest of the burst stays held.
        assert_eq!(g.release_one(deadline), None);
        assert_eq!(g.held(), 1);
    }
}
