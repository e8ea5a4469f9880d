//! `exp` over f32 slices, vectorised: the softmaxes of attention and of the loss.
//!
//! `f32::exp` is a call into the C library per element, which the compiler cannot
//! vectorise; on the CPU step's profile it was about 4% of the samples (`__expf_fma`). This
//! is the same function as a branch-free body that the compiler vectorises (16 lanes with
//! AVX-512, 8 with AVX2), chosen at run time like the GELU's (`super::gelu`).
//!
//! Method, per element: `x = k ln 2 + r` with `|r| <= ln 2 / 2` (Cody–Waite: `ln 2` in two
//! parts, the first with few enough bits that `k * LN2_HI` is exact), `exp(r)` by the
//! classic minimax polynomial of Cephes' `expf` (S. L. Moshier; relative error about 1e-7),
//! and `2^k` applied as two exact power-of-two factors, so that `k = 128` (x near the top
//! of the range) does not overflow on the way. Only IEEE-rounded operations and explicit
//! fused multiply-adds, so every path gives the same bits.
//!
//! Range: `exp(x) = 0` below `ln(2^-126)` (where the C library returns a subnormal below
//! 1.2e-38: an absolute difference no softmax can see), `+inf` above `ln(f32::MAX)`, NaN for
//! NaN. `tests` checks every result within 2 ulp of the f64 `exp` over the normal range.

use super::gelu::{best_path, Path};

/// Below this, `exp(x)` is under `2^-126` (the smallest normal f32): 0 here.
const X_MIN: f32 = -87.336_55;
/// Above this, `exp(x)` overflows f32.
const X_MAX: f32 = 88.722_84;
/// `1.5 * 2^23`: adding and subtracting it rounds an f32 of magnitude below `2^22` to the
/// nearest integer (ties to even) with plain IEEE additions, and the integer is then the low
/// bits of the sum: no float-to-int conversion. (Shared with `super::gelu`'s exp.)
pub(super) const ROUND_MAGIC: f32 = 12_582_912.0;
/// `ln 2 = LN2_HI + LN2_LO`, Cody–Waite style; `LN2_HI` has 9 significant bits, so
/// `k * LN2_HI` is exact for every `|k| <= 2^15` (here `|k| <= 128`).
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// `exp(r) = 1 + r + r^2 P(r)` on `|r| <= ln 2 / 2`, lowest degree first (Cephes `expf`,
/// whose first coefficient, 0.50000001, is 0.5 in f32).
const EXP_P: [f32; 6] = [
    0.5,
    1.666_666_5e-1,
    4.166_579_6e-2,
    8.333_452e-3,
    1.398_2e-3,
    1.987_569_1e-4,
];

/// `exp(x)`, branch-free (the selects compile to blends).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    // clamp keeps NaN, which stays NaN through the polynomial.
    let xc = x.clamp(X_MIN, X_MAX);
    let shifted = xc.mul_add(std::f32::consts::LOG2_E, ROUND_MAGIC);
    let kf = shifted - ROUND_MAGIC;
    // k in [-126, 128]; for NaN it is meaningless and harmless (the wrapping operations
    // keep it free of panics).
    let k = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = kf.mul_add(-LN2_LO, kf.mul_add(-LN2_HI, xc));
    let mut p = EXP_P[5];
    for &c in EXP_P[..5].iter().rev() {
        p = p.mul_add(r, c);
    }
    let e = (r * r).mul_add(p, r) + 1.0;
    // 2^k = 2^(k/2) * 2^(k - k/2), each factor a normal number for every k in range.
    let k1 = k >> 1;
    let scale = |j: i32| f32::from_bits((j.wrapping_add(127) as u32 & 0xff) << 23);
    let y = (e * scale(k1)) * scale(k.wrapping_sub(k1));
    if x < X_MIN {
        0.0
    } else if x > X_MAX {
        f32::INFINITY
    } else {
        y
    }
}

#[inline(always)]
fn body(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn body_avx512(xs: &mut [f32]) {
    body(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn body_avx2(xs: &mut [f32]) {
    body(xs);
}

/// Replaces every element of `xs` by its exponential (serial: the callers run it inside
/// their own parallel tasks, one softmax row at a time).
pub fn exp_in_place(xs: &mut [f32]) {
    match best_path() {
        // SAFETY: best_path returns these only when the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { body_avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { body_avx2(xs) },
        Path::Portable => body(xs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in f32 units in the last place (finite, same sign or zero).
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_the_f64_exp_over_the_normal_range() {
        // Every 1e-3 step of [-87.3, 88.7], plus the points around each k ln 2 boundary.
        let mut xs: Vec<f32> = (-87_300..=88_700).map(|i| i as f32 * 1e-3).collect();
        for k in -125..=127 {
            let b = (k as f64 * std::f64::consts::LN_2) as f32;
            xs.extend([b, f32::from_bits(b.to_bits() + 1), b - b.abs() * 1e-7]);
        }
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let mut worst = 0;
        for (&x, &y) in xs.iter().zip(&got) {
            let want = f64::from(x).exp() as f32;
            if want.is_finite() && want >= f32::MIN_POSITIVE {
                let u = ulps(y, want);
                assert!(u <= 2, "exp({x}) = {y}, want {want} ({u} ulp)");
                worst = worst.max(u);
            }
        }
        assert!(
            worst >= 1,
            "the sweep should reach the rounding error somewhere"
        );
    }

    #[test]
    fn edges_zero_infinity_and_nan() {
        let mut xs = [
            0.0,
            -0.0,
            -88.0,
            -1e30,
            f32::NEG_INFINITY,
            89.0,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut xs);
        assert_eq!(&xs[..2], &[1.0, 1.0]);
        assert_eq!(&xs[2..5], &[0.0, 0.0, 0.0]);
        assert_eq!(&xs[5..7], &[f32::INFINITY, f32::INFINITY]);
        assert!(xs[7].is_nan());
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let xs: Vec<f32> = (0..10_000)
            .map(|i| (i as f32 * 0.37).sin() * 80.0)
            .collect();
        let mut portable = xs.clone();
        body(&mut portable);
        let mut best = xs.clone();
        exp_in_place(&mut best);
        assert!(portable
            .iter()
            .zip(&best)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
