//! Passive outlier ejection of one endpoint, from the outcomes of the requests sent to it
//! (nothing is sent only to check).
//!
//! - A failure is a connection that could not be made (refused, reset before the request
//!   was written) or a 5xx answer. [`EJECT_AFTER`] failures in a row eject the endpoint: it
//!   takes no new request for [`BASE_EJECTION`] seconds, doubled for each ejection in a row,
//!   at most [`MAX_EJECTION`].
//! - When the time is up the endpoint is back on probation: it takes requests again, and the
//!   first outcome decides. A success ends the probation (and resets the doubling); a failure
//!   ejects it again at once, for twice as long.
//! - Any success resets the count of failures in a row.
//!
//! The state is plain `Copy` data; callers pass the time (seconds on the limiter's clock).
//! Ejection never makes a fleet refuse everything: when every endpoint is ejected, the
//! routing ignores ejection (see [`super`]), so a fleet whose endpoints all failed at once is
//! tried again rather than closed.

/// Failures in a row that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// The first ejection's length, seconds.
pub const BASE_EJECTION: f64 = 10.0;
/// The longest ejection, seconds.
pub const MAX_EJECTION: f64 = 300.0;

/// One endpoint's failures and ejection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Health {
    /// Failures in a row.
    failures: u32,
    /// Ejections in a row (without a success between).
    ejections: u32,
    /// Ejected until then (seconds); 0 when never ejected.
    until: f64,
    /// Ejected, or back from an ejection without a success yet.
    probation: bool,
}

/// A change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Ejected for `seconds` after `failures` failures in a row.
    Ejected { seconds: f64, failures: u32 },
    /// A success after an ejection: in the fleet again.
    Returned,
}

impl Health {
    /// Whether the endpoint takes no new request at `now`.
    #[inline]
    pub fn ejected(&self, now: f64) -> bool {
        now < self.until
    }

    /// When the ejection ends (seconds; 0 if never ejected).
    #[inline]
    pub fn until(&self) -> f64 {
        self.until
    }

    /// A request to the endpoint failed at `now`.
    pub fn failure(&mut self, now: f64) -> Option<Change> {
        if self.ejected(now) {
            return None; // a request sent before the ejection: already counted for
        }
        self.failures += 1;
        if !self.probation && self.failures < EJECT_AFTER {
            return None;
        }
        let failures = std::mem::take(&mut self.failures);
        self.ejections += 1;
        let seconds = (BASE_EJECTION * 2f64.powi(self.ejections as i32 - 1)).min(MAX_EJECTION);
        self.until = now + seconds;
        self.probation = true;
        Some(Change::Ejected { seconds, failures })
    }

    /// A request to the endpoint got an answer that is not a server error.
    pub fn success(&mut self) -> Option<Change> {
        self.failures = 0;
        if !self.probation {
            return None;
        }
        self.probation = false;
        self.ejections = 0;
        Some(Change::Returned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_in_a_row_eject_and_a_success_between_resets_the_count() {
        let mut h = Health::default();
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failure(1.0), None);
        }
        assert_eq!(h.success(), None);
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failure(2.0), None);
        }
        assert!(!h.ejected(2.0));
        let change = h.failure(2.0);
        assert_eq!(
            change,
            Some(Change::Ejected {
                seconds: BASE_EJECTION,
                failures: EJECT_AFTER
            })
        );
        assert!(h.ejected(2.0) && h.ejected(2.0 + BASE_EJECTION - 0.001));
        // Failures of requests sent before the ejection change nothing.
        assert_eq!(h.failure(3.0), None);
        assert!(!h.ejected(2.0 + BASE_EJECTION));
    }

    #[test]
    fn on_probation_one_failure_ejects_for_twice_as_long_and_a_success_returns() {
        let mut h = Health::default();
        for _ in 0..EJECT_AFTER {
            h.failure(0.0);
        }
        let mut t = BASE_EJECTION;
        let mut expected = BASE_EJECTION;
        for _ in 0..8 {
            expected = (expected * 2.0).min(MAX_EJECTION);
            match h.failure(t) {
                Some(Change::Ejected { seconds, failures }) => {
                    assert_eq!((seconds, failures), (expected, 1));
                }
                other => panic!("{other:?}"),
            }
            t += expected;
        }
        assert_eq!(expected, MAX_EJECTION, "capped");
        assert_eq!(h.success(), Some(Change::Returned));
        assert_eq!(h.success(), None);
        // Back to normal: it takes five failures again, and the first ejection is short.
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(h.failure(t), None);
        }
        assert_eq!(
            h.failure(t),
            Some(Change::Ejected {
                seconds: BASE_EJECTION,
                failures: EJECT_AFTER
            })
        );
    }
}
