//! Token timing of one OpenAI stream, shared by the gateway (which feeds the limiter with it)
//! and the load generator (which reports it): a pure state machine over the times at which
//! content-bearing events arrive, with no clock of its own.
//!
//! - The first content gives the time to first token (TTFT), measured from when the request
//!   was sent.
//! - Every later read that carries `n` content events gives `n` inter-token gaps of `Δ / n`,
//!   where `Δ` is the time since the previous content: events coalesced into one read (by the
//!   server, a proxy or TCP) are spread over the gap instead of counting as zero-latency
//!   tokens.

use std::time::Duration;

/// What one read of content events measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timing {
    /// The first token arrived this many seconds after the request was sent.
    Ttft(f64),
    /// `count` inter-token gaps of `gap` seconds each.
    Gaps { gap: f64, count: usize },
}

/// The timer of one stream; times are on any monotonic clock (offsets from its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimer {
    sent: Duration,
    last: Option<Duration>,
}

impl StreamTimer {
    /// A stream whose request was sent at `sent`.
    pub fn new(sent: Duration) -> Self {
        StreamTimer { sent, last: None }
    }

    /// Moves the send time (the request left later than the timer was made). No effect once
    /// the first token has arrived.
    pub fn sent_at(&mut self, sent: Duration) {
        if self.last.is_none() {
            self.sent = sent;
        }
    }

    /// Whether the first token has arrived.
    pub fn started(&self) -> bool {
        self.last.is_some()
    }

    /// `n` content-bearing events arrived together at `now`; None when `n` is 0.
    pub fn on_content(&mut self, n: usize, now: Duration) -> Option<Timing> {
        if n == 0 {
            return None;
        }
        let timing = match self.last {
            None => Timing::Ttft(now.saturating_sub(self.sent).as_secs_f64()),
            Some(last) => Timing::Gaps {
                gap: now.saturating_sub(last).as_secs_f64() / n as f64,
                count: n,
            },
        };
        self.last = Some(now);
        Some(timing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[test]
    fn first_content_is_ttft_then_gaps_split_coalesced_events() {
        let clock = ManualClock::default();
        clock.advance(Duration::from_secs(3));
        let mut t = StreamTimer::new(clock.now());
        assert!(!t.started());
        clock.advance(Duration::from_millis(250));
        assert_eq!(t.on_content(0, clock.now()), None, "no content, no timing");
        assert!(!t.started());
        clock.advance(Duration::from_millis(250));
        assert_eq!(t.on_content(2, clock.now()), Some(Timing::Ttft(0.5)));
        assert!(t.started());
        clock.advance(Duration::from_millis(40));
        assert_eq!(
            t.on_content(1, clock.now()),
            Some(Timing::Gaps {
                gap: 0.04,
                count: 1
            })
        );
        // Four events in one read 100 ms after the last: four gaps of 25 ms, not 0.
        clock.advance(Duration::from_millis(100));
        assert_eq!(
            t.on_content(4, clock.now()),
            Some(Timing::Gaps {
                gap: 0.025,
                count: 4
            })
        );
    }

    #[test]
    fn send_time_moves_only_before_the_first_token() {
        let clock = ManualClock::default();
        let mut t = StreamTimer::new(clock.now());
        clock.advance(Duration::from_millis(100));
        t.sent_at(clock.now());
        clock.advance(Duration::from_millis(300));
        assert_eq!(t.on_content(1, clock.now()), Some(Timing::Ttft(0.3)));
        t.sent_at(Duration::ZERO);
        clock.advance(Duration::from_millis(10));
        assert!(matches!(
            t.on_content(1, clock.now()),
            Some(Timing::Gaps { count: 1, .. })
        ));
    }

    #[test]
    fn a_clock_that_goes_backwards_gives_zero_not_a_panic() {
        let mut t = StreamTimer::new(Duration::from_secs(5));
        assert_eq!(
            t.on_content(1, Duration::from_secs(4)),
            Some(Timing::Ttft(0.0))
        );
        assert_eq!(
            t.on_content(1, Duration::from_secs(3)),
            Some(Timing::Gaps { gap: 0.0, count: 1 })
        );
    }
}
