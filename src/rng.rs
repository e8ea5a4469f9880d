//! Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//!
//! Every random draw in the data pipeline is a pure function of `(seed, counter)`: the
//! counter names what the draw is for (batch, image, view, patch, purpose). Nothing
//! depends on which thread or in which order work runs, and a CUDA kernel using the same
//! function and counters produces the same numbers, so the GPU view builder can be
//! checked against the CPU one draw for draw. This module must stay free of any state
//! shared between threads.

/// Multiplier and Weyl constants of Philox4x32 (Random123's values).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox4x32-10 block: 128 random bits for a 128-bit counter and a 64-bit key.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(ctr[0]);
        let p1 = u64::from(M1) * u64::from(ctr[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// What a stream of draws is for; it occupies the top bits of the last counter word so
/// that streams for different purposes never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Purpose {
    /// Spatial parameters of a batch's views (crop boxes, flips).
    Crop = 1,
    /// A patch's (or, in per-view mode, a view's) photometric parameters.
    Photometric = 2,
    /// Per-pixel additive noise of one patch or view.
    Noise = 3,
    /// The order in which an epoch visits the images.
    Shuffle = 4,
    /// Parameter initialisation.
    Init = 5,
    /// Stochastic-depth (drop-path) masks.
    DropPath = 6,
}

/// Bits of the last counter word left for the block index within one stream.
const BLOCK_BITS: u32 = 28;

/// A sequential stream of draws at a fixed `(seed, c0, c1, c2, purpose)`; the fourth
/// counter word counts 128-bit blocks. Up to 2^28 blocks (2^30 u32 draws) per stream.
#[derive(Clone, Debug)]
pub struct Stream {
    key: [u32; 2],
    ctr: [u32; 3],
    purpose: u32,
    block: u32,
    buf: [u32; 4],
    used: usize,
}

impl Stream {
    /// A stream named by three counter words and its purpose.
    pub fn new(seed: u64, ctr: [u32; 3], purpose: Purpose) -> Self {
        Stream {
            key: [seed as u32, (seed >> 32) as u32],
            ctr,
            purpose: (purpose as u32) << BLOCK_BITS,
            block: 0,
            buf: [0; 4],
            used: 4,
        }
    }

    /// The next 32 random bits.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            debug_assert!(self.block < (1 << BLOCK_BITS), "Philox stream exhausted");
            let c = [
                self.ctr[0],
                self.ctr[1],
                self.ctr[2],
                self.purpose | self.block,
            ];
            self.buf = philox4x32_10(c, self.key);
            self.block += 1;
            self.used = 0;
        }
        let x = self.buf[self.used];
        self.used += 1;
        x
    }

    /// A uniform f32 in [0, 1) with 24 random bits.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform f64 in [0, 1) with 53 random bits (two draws).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32() >> 5); // 27 bits
        let lo = u64::from(self.next_u32() >> 6); // 26 bits
        ((hi << 26) | lo) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform f32 in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// A uniform integer in [0, n) from 64 random bits (bias below n / 2^64). `n > 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        let x = (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32());
        ((u128::from(x) * u128::from(n)) >> 64) as u64
    }

    /// A standard normal f32 (Box-Muller, consuming two draws; the second value is dropped
    /// so that every call uses the same number of draws).
    #[inline]
    pub fn normal(&mut self) -> f32 {
        // 1 - u lies in (0, 1], so the log is finite.
        let u1 = 1.0 - self.next_f32();
        let u2 = self.next_f32();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's `tests/kat_vectors`, the three `philox4x32 10` lines
    /// (counter[4], key[2] -> result[4]).
    #[test]
    fn philox_matches_random123_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(philox4x32_10(ctr, key), want);
        }
    }

    #[test]
    fn streams_for_different_purposes_differ() {
        let mut a = Stream::new(7, [1, 2, 3], Purpose::Crop);
        let mut b = Stream::new(7, [1, 2, 3], Purpose::Photometric);
        let xa: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
        let xb: Vec<u32> = (0..8).map(|_| b.next_u32()).collect();
        assert_ne!(xa, xb);
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut s = Stream::new(42, [0, 0, 0], Purpose::Noise);
        let n = 200_000;
        let (mut su, mut sn, mut sn2) = (0.0f64, 0.0f64, 0.0f64);
        for _ in 0..n {
            let u = s.next_f32();
            assert!((0.0..1.0).contains(&u));
            su += f64::from(u);
            let z = f64::from(s.normal());
            assert!(z.is_finite());
            sn += z;
            sn2 += z * z;
        }
        let n = n as f64;
        // Standard errors: uniform mean 0.29/sqrt(n) = 6.5e-4; normal mean 2.2e-3,
        // variance 3.2e-3. Tolerances are about 5 standard errors.
        assert!((su / n - 0.5).abs() < 3.5e-3);
        assert!((sn / n).abs() < 1.2e-2);
        assert!((sn2 / n - 1.0).abs() < 1.6e-2);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut s = Stream::new(1, [9, 9, 9], Purpose::Shuffle);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let k = s.below(7) as usize;
            seen[k] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800 && c < 1200), "{seen:?}");
    }
}
