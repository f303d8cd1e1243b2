//! Rate-limited warnings for guest misbehaviour: a guest must not be able to flood the log.

use std::time::{Duration, Instant};

/// Lets through a few log lines per second and counts the rest.
#[derive(Debug, Default)]
pub struct RateLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// Lines allowed per second.
    const PER_SECOND: u32 = 5;

    /// Whether the next line may be logged.
    pub fn allow(&mut self, what: &str) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(s) if now.duration_since(s) < Duration::from_secs(1) => {}
            _ => {
                if self.suppressed > 0 {
                    tracing::warn!(
                        suppressed = self.suppressed,
                        "{what}: more guest misuse suppressed"
                    );
                }
                self.window_start = Some(now);
                self.in_window = 0;
                self.suppressed = 0;
            }
        }
        self.in_window += 1;
        if self.in_window > Self::PER_SECOND {
            self.suppressed += 1;
            false
        } else {
            true
        }
    }
}
