//! A sliding-window counter over minutes: what a tenant used in the current minute, and in the
//! previous one weighted by how much of it the last 60 s still overlap (as Cloudflare's and
//! Kong's sliding-window rate limits count). Two numbers per budget, and no burst beyond the
//! limit: a client offering twice its budget for three minutes gets three minutes' worth,
//! where a token bucket of a minute's capacity would let a fourth through.

/// The window, seconds.
pub const MINUTE: f64 = 60.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// When the current minute began, seconds.
    start: f64,
    /// Used in the current minute (less after refunds, more after a settlement over the
    /// estimate), and in the previous one.
    current: f64,
    previous: f64,
}

impl Window {
    /// A window of nothing used, its first minute starting `now`.
    pub fn new(now: f64) -> Self {
        Window {
            start: now,
            current: 0.0,
            previous: 0.0,
        }
    }

    /// Moves on to the minute `now` falls in.
    pub fn roll(&mut self, now: f64) {
        let k = ((now - self.start) / MINUTE).floor();
        if k >= 1.0 {
            self.previous = if k == 1.0 { self.current } else { 0.0 };
            self.current = 0.0;
            self.start += k * MINUTE;
        }
    }

    /// What counts against the limit at `now` (rolled): the last 60 s, estimated.
    pub fn used(&self, now: f64) -> f64 {
        let overlap = 1.0 - ((now - self.start) / MINUTE).clamp(0.0, 1.0);
        self.previous.max(0.0) * overlap + self.current
    }

    /// Counts `n` more (negative: gives back).
    pub fn add(&mut self, n: f64, limit: f64) {
        self.current = (self.current + n).max(-limit);
    }

    /// Seconds from `now` until `n` more fit under `limit` (0 when they do now); infinite
    /// when they never can (`n > limit`).
    pub fn wait(&self, limit: f64, n: f64, now: f64) -> f64 {
        if n > limit {
            return f64::INFINITY;
        }
        let elapsed = now - self.start;
        let previous = self.previous.max(0.0);
        if self.current + n <= limit {
            if previous <= 0.0 {
                return 0.0;
            }
            // This minute, as the previous one's weight fades.
            let at = 1.0 - (limit - n - self.current) / previous;
            return settled(at * MINUTE - elapsed);
        }
        // The next minute, as this one's weight fades.
        let at = 1.0 - (limit - n) / self.current;
        settled(MINUTE + at * MINUTE - elapsed)
    }

    /// Seconds from `now` until nothing counts any more.
    pub fn reset(&self, now: f64) -> f64 {
        let elapsed = now - self.start;
        if self.current > 0.0 {
            2.0 * MINUTE - elapsed
        } else if self.previous > 0.0 {
            MINUTE - elapsed
        } else {
            0.0
        }
    }
}

/// A wait in seconds, none under a microsecond (rounding).
fn settled(wait: f64) -> f64 {
    if wait < 1e-6 { 0.0 } else { wait }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits `n` whenever it fits, stepping `step` seconds from `from` to `to`.
    fn offer(w: &mut Window, limit: f64, (from, to, step): (f64, f64, f64)) -> f64 {
        let (mut t, mut got) = (from, 0.0);
        while t < to {
            w.roll(t);
            if w.used(t) + 1.0 <= limit {
                w.add(1.0, limit);
                got += 1.0;
            }
            t += step;
        }
        got
    }

    #[test]
    fn twice_the_budget_for_three_minutes_gets_three_minutes_worth() {
        let mut w = Window::new(0.0);
        let got = offer(&mut w, 120.0, (0.0, 180.0, 0.25));
        assert!((got / 360.0 - 1.0).abs() <= 0.05, "{got} of 360");
    }

    #[test]
    fn a_burst_of_the_whole_limit_then_a_wait_that_says_when() {
        let mut w = Window::new(0.0);
        assert_eq!(
            offer(&mut w, 3.0, (0.0, 1.0, 0.1)),
            3.0,
            "a full minute's worth"
        );
        assert_eq!(w.used(1.0), 3.0);
        // Nothing fits this minute; next minute, one fits once a third of it has passed.
        assert_eq!(w.wait(3.0, 1.0, 1.0), 79.0);
        assert_eq!(w.reset(1.0), 119.0);
        w.roll(80.0);
        assert!((w.used(80.0) - 2.0).abs() < 1e-9);
        assert_eq!(w.wait(3.0, 1.0, 80.0), 0.0);
        // Two idle minutes forget everything.
        w.roll(200.0);
        assert_eq!((w.used(200.0), w.reset(200.0)), (0.0, 0.0));
        assert_eq!(
            w.wait(3.0, 4.0, 200.0),
            f64::INFINITY,
            "more than the limit"
        );
    }

    #[test]
    fn refunds_give_back_and_overuse_is_owed_into_the_next_minute() {
        let mut w = Window::new(0.0);
        w.add(100.0, 100.0);
        w.add(-40.0, 100.0);
        assert_eq!(w.used(1.0), 60.0);
        w.add(-1000.0, 100.0);
        assert_eq!(w.used(1.0), -100.0, "a credit of at most the limit");
        let mut w = Window::new(0.0);
        w.add(250.0, 100.0); // settled at 2.5 times the limit
        w.roll(90.0);
        // Half the previous minute still counts: 125 > 100.
        assert!(w.used(90.0) > 100.0);
        assert_eq!(
            w.wait(100.0, 1.0, 90.0),
            0.0f64.max(1.0 - 99.0 / 250.0) * 60.0 - 30.0
        );
    }
}
