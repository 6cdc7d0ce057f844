//! A small multiplicative hasher for the limiter's model-name maps (the rustc "Fx" hash:
//! `h = (h.rotate_left(5) ^ word) · 0x51_7c_c1_b7_27_22_0a_95`, eight bytes at a time).
//!
//! It is not DoS-resistant, and need not be here: the named-model map is built once from the
//! policy and never grows, and the map of unknown models holds at most `max_dynamic_keys`
//! entries, so chosen collisions cannot make a table grow or degrade beyond that bound.

use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The Fx hasher.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, mut bytes: &[u8]) {
        while bytes.len() >= 8 {
            self.add(u64::from_le_bytes(bytes[..8].try_into().unwrap()));
            bytes = &bytes[8..];
        }
        if bytes.len() >= 4 {
            self.add(u64::from(u32::from_le_bytes(
                bytes[..4].try_into().unwrap(),
            )));
            bytes = &bytes[4..];
        }
        for &b in bytes {
            self.add(u64::from(b));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// `BuildHasher` for maps keyed by model name.
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn h(s: &str) -> u64 {
        FxBuildHasher::default().hash_one(s)
    }

    #[test]
    fn equal_strings_hash_equal_and_near_strings_differ() {
        assert_eq!(h("meta-llama/Llama-3.1-8B"), h("meta-llama/Llama-3.1-8B"));
        let names = ["a", "b", "ab", "ba", "model-1", "model-2", "model-10", ""];
        let hashes: std::collections::HashSet<u64> = names.iter().map(|n| h(n)).collect();
        assert_eq!(hashes.len(), names.len());
    }
}
