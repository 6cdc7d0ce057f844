//! Uniform random numbers for the shedding decision and Retry-After jitter, injected so tests
//! are deterministic. [`SplitMix64`] (Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014) is a few instructions per draw and needs no allocation.

/// A source of uniform numbers in `[0, 1)`.
pub trait Uniform {
    fn next_f64(&mut self) -> f64;
}

/// The SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Uniform for SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        // The top 53 bits give every representable multiple of 2^-53 in [0, 1).
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Replays a fixed list of values (cycling), for tests that need exact draws.
#[derive(Debug, Clone)]
pub struct Sequence {
    values: Vec<f64>,
    next: usize,
}

impl Sequence {
    pub fn new(values: Vec<f64>) -> Self {
        assert!(!values.is_empty(), "a Sequence needs at least one value");
        Sequence { values, next: 0 }
    }
}

impl Uniform for Sequence {
    fn next_f64(&mut self) -> f64 {
        let v = self.values[self.next % self.values.len()];
        self.next += 1;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_in_unit_interval() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
            sum += x;
        }
        let mean = sum / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
