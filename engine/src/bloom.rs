//! A Bloom filter over visitor ids: "never seen" answers skip the history store.
//!
//! Standard construction: m bits, k probes by double hashing of one 64-bit mix of the id
//! (Kirsch–Mitzenmacher). Serializable so a checkpoint carries it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bloom {
    bits: Vec<u64>,
    /// Number of bits (a power of two, so probes reduce with a mask).
    m: u64,
    k: u32,
}

fn mix(x: u64) -> u64 {
    // splitmix64 finalizer: a bijective, well-spread mix of sequential ids.
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Bloom {
    /// A filter for `expected` items at false-positive rate `fp`.
    pub fn new(expected: u64, fp: f64) -> Self {
        let n = expected.max(1) as f64;
        let ideal_m = -(n * fp.ln()) / (std::f64::consts::LN_2 * std::f64::consts::LN_2);
        let m = (ideal_m.ceil() as u64).max(64).next_power_of_two();
        let k = ((m as f64 / n) * std::f64::consts::LN_2)
            .round()
            .clamp(1.0, 16.0) as u32;
        Bloom {
            bits: vec![0; (m / 64) as usize],
            m,
            k,
        }
    }

    /// Bit index of probe `i` for an item's hash pair.
    fn probe(&self, (h1, h2): (u64, u64), i: u32) -> u64 {
        h1.wrapping_add(u64::from(i).wrapping_mul(h2)) & (self.m - 1)
    }

    fn hashes(item: u64) -> (u64, u64) {
        let h = mix(item);
        (h & 0xffff_ffff, (h >> 32) | 1)
    }

    pub fn insert(&mut self, item: u64) {
        let h = Self::hashes(item);
        for i in 0..self.k {
            let bit = self.probe(h, i);
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// False means certainly never inserted.
    pub fn may_contain(&self, item: u64) -> bool {
        let h = Self::hashes(item);
        (0..self.k).all(|i| {
            let bit = self.probe(h, i);
            self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    pub fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_about_the_configured_false_positive_rate() {
        let mut bloom = Bloom::new(100_000, 0.01);
        for v in (0..200_000).step_by(2) {
            bloom.insert(v);
        }
        assert!((0..200_000).step_by(2).all(|v| bloom.may_contain(v)));
        let fp = (1..200_000)
            .step_by(2)
            .filter(|v| bloom.may_contain(*v))
            .count();
        let rate = fp as f64 / 100_000.0;
        assert!(rate < 0.02, "false-positive rate {rate}");
    }
}
