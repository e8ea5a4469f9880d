//! Exact (erf) GELU, `gelu(x) = 0.5 x (1 + erf(x / sqrt 2))` = `x Phi(x)`, as PyTorch's
//! `nn.GELU()` default (`approximate='none'`) used by timm's ViT MLP and DINO's head.
//! Not the tanh approximation.
//!
//! It is the reference the GPU twin (`erff`, bf16 I/O) is checked against, so each result is
//! computed in f64 and rounded once to f32 (within one f32 ulp of the exact value, as
//! `tests/cpu_kernels.rs` asserts). It also showed on the CPU training step's profile (about
//! 20% of a step with the former scalar per-element `libm::erfc`), so the f64 evaluation is a
//! branch-free body that the compiler vectorises (8 lanes with AVX-512, 4 with AVX2), about
//! 9x faster single-threaded on AVX-512.
//!
//! Method, per element, in f64 (`z = x / sqrt 2`):
//! - `Phi(x) = erfc(|z|) / 2` for `x < 0` and `1 - erfc(|z|) / 2` for `x >= 0`: `erfc` is only
//!   evaluated at `|z|`, where it is at most 1, so nothing cancels and the left tail keeps its
//!   relative accuracy down to where `gelu` underflows f32 (unlike `1 + erf(..)`: PyTorch's f32
//!   formula returns 0 below about x = -5.5).
//! - `erfc(|z|) = t exp(-z^2 + P(t))`, `t = 1 / (1 + |z| / 2)`: the form of Numerical
//!   Recipes' Chebyshev fit, with `P` refitted to a relative error of 1.6e-10 (see `ERFC_P`).
//!   `x^2` is exact in f64 for an f32 `x`, so the large `-z^2` loses nothing.
//! - `exp` is inline and branch-free: Cody–Waite reduction by ln 2, a Taylor polynomial, and
//!   `2^k` written into the exponent field; the input range is bounded by clamping `x` to
//!   [-15, 15] (past -15 the result is -0, as the reference's underflow; past +15 it is `x`).
//! - Only IEEE-rounded operations are used, every fused multiply-add is an explicit
//!   `f64::mul_add` (correctly rounded everywhere), and the compiler does not reassociate, so
//!   the AVX-512, AVX2+FMA and portable paths chosen at run time give bit-identical results.
//!   The portable path calls the library `fma` instead of vectorising and is slower than the
//!   former code (~4x); every x86 CPU with AVX2 has FMA, and aarch64 has it in its baseline.
//!
//! Measured against the former f64 `libm::erfc` formulation (kept in the tests as the
//! reference) on every 1e-4 step of [-20, 20] plus random f32s there: forward relative error
//! at most 6.0e-8 (the f32 rounding itself) over the normal range and at most 1 ulp from the
//! reference's f32 everywhere; the derivative likewise 6.0e-8 of `Phi + |x phi|`, the size of
//! its terms. `gelu(+inf) = +inf`, `gelu(-inf) = NaN` (the reference's `-inf * 0`), NaN gives
//! NaN; the derivative is NaN at ±inf and NaN, like the reference.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;

/// Beyond `|x| > X_CUT` the left side is fixed: `|gelu(-15)| ~ 1e-50` rounds to -0 in f32.
/// Inside it, `-x^2 / 2 >= -112.5`, which keeps the exponential in range without a clamp.
/// (On the right, `1 - erfc(10.6) / 2` is exactly 1 in f64, so `gelu(x) = x` there by itself.)
const X_CUT: f64 = 15.0;

/// `P(w)` of `erfc(z) = t exp(-z^2 + P(w))`, `t = 1 / (1 + z / 2)`, `w = (2 t - 1.15) / 0.85`,
/// lowest degree first: the form of the Chebyshev fit in Numerical Recipes (W. H. Press et al.,
/// 2nd ed. 1992, §6.2, `erfcc`), refitted for this crate to higher accuracy. NR's own
/// coefficients (fractional error 1.2e-7) are too coarse for an f32-exact result, so these are
/// a least-squares Chebyshev fit of degree 12 (numpy `chebfit` at 4000 Chebyshev nodes, then
/// `cheb2poly`) of `ln erfc(z) + z^2 - ln t` on `t` in [0.15, 1] (z in [0, 11.3]), with Python's
/// `math.erfc` as the data. Measured relative error of the resulting `erfc`: 1.6e-10 on
/// z in [0, 10.7] (the tests check the kernel end to end against `libm::erfc`).
const ERFC_P: [f64; 13] = [
    -0.569_994_960_775_459_3,
    0.581_034_868_936_602_4,
    0.018_217_794_190_120_245,
    -0.031_170_833_883_900_66,
    -0.001_533_098_981_867_239_3,
    0.004_132_179_169_539_628,
    -0.000_232_646_850_918_611_76,
    -0.000_654_433_777_434_824_1,
    0.000_157_021_868_142_128_4,
    8.993_437_725_765_68e-5,
    -4.487_471_190_207_449e-5,
    -7.338_767_284_862_218e-6,
    6.389_364_951_063_326e-6,
];
/// `w = W_SCALE * t + W_SHIFT` maps `t` in [0.15, 1] to [-1, 1].
const W_SCALE: f64 = 2.0 / 0.85;
const W_SHIFT: f64 = -1.15 / 0.85;

/// `1 / sqrt(2 pi)`, the normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// ln 2 split Cody–Waite style (fdlibm's `ln2_hi`/`ln2_lo`): `LN2_HI` ends in 21 zero bits,
/// so `k * LN2_HI` is exact for every `|k| < 2^21`.
const LN2_HI: f64 = 0.693_147_180_369_123_8; // 0x3fe6_2e42_fee0_0000
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// `1.5 * 2^52`: adding and subtracting it rounds an f64 of magnitude below 2^51 to the nearest
/// integer (ties to even) with plain IEEE additions, the same on every path (no `round` call),
/// and the integer is then the low bits of the sum: no float-to-int conversion, whose
/// saturating semantics the compiler does not vectorise.
const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;

/// Horner with an explicit FMA per step (one rounding each).
#[inline(always)]
fn horner(coeffs: &[f64], v: f64) -> f64 {
    let mut acc: f64 = 0.0;
    for &c in coeffs.iter().rev() {
        acc = acc.mul_add(v, c);
    }
    acc
}

/// `1 / n!` for n = 0..=9, the Taylor coefficients of `exp`.
const EXP_TAYLOR: [f64; 10] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
];

/// `exp(a)` for `a` in about `[-120, 1]` (the callers' range), branch-free: `a = k ln 2 + r`
/// with `|r| <= ln 2 / 2`, a degree-9 Taylor polynomial (truncation below 8e-12 relative),
/// and `2^k` written into the exponent field (normal for every `k` in range).
#[inline(always)]
fn exp(a: f64) -> f64 {
    let shifted = a.mul_add(std::f64::consts::LOG2_E, ROUND_MAGIC);
    let kf = shifted - ROUND_MAGIC;
    let k = (shifted.to_bits() as i64).wrapping_sub(ROUND_MAGIC.to_bits() as i64);
    let r = kf.mul_add(-LN2_LO, kf.mul_add(-LN2_HI, a));
    // For a NaN `a`, `k` is meaningless (the wrapping operations keep it free of panics and
    // UB) and harmless: the polynomial is NaN and carries it.
    horner(&EXP_TAYLOR, r) * f64::from_bits((k.wrapping_add(1023) as u64) << 52)
}

/// `Phi(x)` for `x` in `[-X_CUT, X_CUT]` (or NaN), and `-x^2 / 2`.
#[inline(always)]
fn cdf(x: f64) -> (f64, f64) {
    // x is an f32, so x * x is exact in f64.
    let neg_half_sq = -0.5 * (x * x);
    let t = 2.0 / x.abs().mul_add(std::f64::consts::FRAC_1_SQRT_2, 2.0);
    let p = horner(&ERFC_P, t.mul_add(W_SCALE, W_SHIFT));
    let half_erfc = (0.5 * t) * exp(neg_half_sq + p);
    // erfc is only ever taken at |z|, where it is at most 1: neither side cancels.
    let big_phi = if x.is_sign_negative() {
        half_erfc
    } else {
        1.0 - half_erfc
    };
    (big_phi, neg_half_sq)
}

/// `gelu(x) = x Phi(x)`, rounded once to f32.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let xd = f64::from(x);
    let (big_phi, _) = cdf(xd.clamp(-X_CUT, X_CUT));
    let y = (xd * big_phi) as f32;
    // Past the left cut: -0 like the reference (NaN for -inf: its -inf * 0).
    if xd < -X_CUT {
        x * 0.0
    } else {
        y
    }
}

/// `gelu'(x) = Phi(x) + x phi(x)`, `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`, in f64.
#[inline(always)]
fn gelu_grad(x: f32) -> f64 {
    let xc = f64::from(x).clamp(-X_CUT, X_CUT);
    let (big_phi, neg_half_sq) = cdf(xc);
    let d = big_phi + xc * (FRAC_1_SQRT_2PI * exp(neg_half_sq));
    // At ±inf the clamped terms are finite; the reference gives NaN there (its `inf * 0`).
    // A NaN `x` is NaN already.
    if x.is_infinite() {
        f64::NAN
    } else {
        d
    }
}

#[inline(always)]
fn forward_body(y: &mut [f32], x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = gelu(xi);
    }
}

#[inline(always)]
fn backward_body(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    for ((dxi, &dyi), &xi) in dx.iter_mut().zip(dy).zip(x) {
        // As the f64 reference: the product rounded to f32, then an f32 add.
        *dxi += (f64::from(dyi) * gelu_grad(xi)) as f32;
    }
}

/// Which compiled copy of the loops runs. The copies differ only in the instructions the
/// compiler may pick; the arithmetic is the same IEEE operations, so results are identical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// The widest path this CPU supports (feature detection is cached by std).
pub(crate) fn best_path() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Path::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Path::Avx2;
        }
    }
    Path::Portable
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn forward_avx512(y: &mut [f32], x: &[f32]) {
    forward_body(y, x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(y: &mut [f32], x: &[f32]) {
    forward_body(y, x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn backward_avx512(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    backward_body(dx, dy, x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    backward_body(dx, dy, x);
}

/// `path` must be one the CPU supports: from [`best_path`], `Portable`, or checked likewise.
fn forward_chunk(path: Path, y: &mut [f32], x: &[f32]) {
    match path {
        // SAFETY: callers pass these only when the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { forward_avx512(y, x) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { forward_avx2(y, x) },
        Path::Portable => forward_body(y, x),
    }
}

/// `path` must be one the CPU supports: from [`best_path`], `Portable`, or checked likewise.
fn backward_chunk(path: Path, dx: &mut [f32], dy: &[f32], x: &[f32]) {
    match path {
        // SAFETY: callers pass these only when the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { backward_avx512(dx, dy, x) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { backward_avx2(dx, dy, x) },
        Path::Portable => backward_body(dx, dy, x),
    }
}

/// Writes `y = gelu(x)` elementwise.
// (L) -> (L)
pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    assert_eq!(
        y.len(),
        x.len(),
        "gelu_forward: y and x must have the same length"
    );
    let path = best_path();
    y.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(y, x)| forward_chunk(path, y, x));
}

/// Accumulates `dx += dy * gelu'(x)` with `gelu'(x) = Phi(x) + x phi(x)` (`dy * gelu'(x)`
/// in f64, rounded to f32, then added).
// dy (L), x (L) -> dx (L) +=
pub fn gelu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "gelu_backward: dx, dy and x must have the same length"
    );
    let path = best_path();
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            dy.par_chunks(ELEMENTWISE_CHUNK)
                .zip(x.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(dx, (dy, x))| backward_chunk(path, dx, dy, x));
}

#[cfg(test)]
mod tests {
    use super::*;

    const REF_FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

    /// `Phi(x)` in f64 via erfc (accurate in both tails): the former implementation.
    fn ref_cdf(x: f64) -> f64 {
        0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }

    /// `gelu(x)` in f64 (the reference, before the final rounding).
    fn ref_gelu64(x: f64) -> f64 {
        x * ref_cdf(x)
    }

    /// `gelu'(x)` in f64.
    fn ref_grad64(x: f64) -> f64 {
        let pdf = REF_FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
        ref_cdf(x) + x * pdf
    }

    /// The former `gelu_forward`, kept as the oracle and the timing baseline.
    fn ref_forward(y: &mut [f32], x: &[f32]) {
        y.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(x.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(y, x)| {
                for (yi, &xi) in y.iter_mut().zip(x) {
                    *yi = ref_gelu64(f64::from(xi)) as f32;
                }
            });
    }

    /// The former `gelu_backward`.
    fn ref_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
        dx.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                dy.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(x.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(|(dx, (dy, x))| {
                for ((dxi, &dyi), &xi) in dx.iter_mut().zip(dy).zip(x) {
                    *dxi += (f64::from(dyi) * ref_grad64(f64::from(xi))) as f32;
                }
            });
    }

    /// SplitMix64: a reproducible stream for the random inputs.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// N(0, 1) by Box–Muller.
        fn normal(&mut self) -> f64 {
            let u = 1.0 - self.uniform();
            let v = self.uniform();
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    /// Every 1e-4 step of [-20, 20], the f32s around the cut and zero, and random bit patterns
    /// (all exponents, both signs) whose value lies in [-20, 20].
    fn sweep_inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        for base in [15.0_f32, -15.0, 0.0, -0.0] {
            let mut v = base;
            let mut w = base;
            for _ in 0..1000 {
                xs.push(v);
                xs.push(w);
                v = v.next_up();
                w = w.next_down();
            }
        }
        let mut rng = Rng(0x5eed);
        while xs.len() < 1_400_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            if x.is_finite() && x.abs() <= 20.0 {
                xs.push(x);
            }
        }
        xs
    }

    /// Distance in units in the last place of `want` (an f32), counted on the f32 grid.
    fn ulps(got: f32, want: f32) -> u64 {
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b < 0x8000_0000 {
                b
            } else {
                0x8000_0000 - b
            }
        };
        (key(got) - key(want)).unsigned_abs()
    }

    #[test]
    fn forward_matches_f64_reference() {
        let xs = sweep_inputs();
        let mut y = vec![0.0; xs.len()];
        gelu_forward(&mut y, &xs);
        let (mut max_rel, mut max_ulp, mut at_rel, mut at_ulp) = (0.0_f64, 0, 0.0, 0.0);
        let mut differ = 0;
        for (&x, &got) in xs.iter().zip(&y) {
            let want64 = ref_gelu64(f64::from(x));
            let want = want64 as f32;
            let u = ulps(got, want);
            differ += usize::from(u != 0);
            if u > max_ulp {
                (max_ulp, at_ulp) = (u, x);
            }
            // Relative error over the whole normal range.
            if want64.abs() > 1.2e-38 {
                let rel = (f64::from(got) - want64).abs() / want64.abs();
                if rel > max_rel {
                    (max_rel, at_rel) = (rel, x);
                }
            } else {
                // Subnormal results: within one step of the smallest subnormal.
                assert!(
                    (f64::from(got) - want64).abs() <= 1.41e-45,
                    "x = {x:e}: {got:e} vs {want64:e}"
                );
            }
        }
        eprintln!(
            "gelu forward: {} inputs, {differ} differ from the reference's f32; \
             max rel err {max_rel:.3e} at x = {at_rel}, max {max_ulp} ulp at x = {at_ulp}",
            xs.len()
        );
        // Measured: 5.97e-8 (2^-24 is 5.96e-8: the rounding to f32 itself), at most 1 ulp.
        assert!(
            max_rel <= 6.1e-8,
            "max relative error {max_rel:e} at {at_rel}"
        );
        assert!(max_ulp <= 1, "{max_ulp} ulp at {at_ulp}");
    }

    #[test]
    fn backward_matches_f64_reference() {
        let xs = sweep_inputs();
        let dy = vec![1.0; xs.len()];
        let mut dx = vec![0.0; xs.len()];
        gelu_backward(&mut dx, &dy, &xs);
        // The derivative has a root near x = -0.75 where Phi and x phi cancel: its error is
        // measured against the size of the terms, `Phi + |x phi|` (in f64), and as a plain
        // relative error away from the root.
        let (mut max_scaled, mut max_rel, mut at_s, mut at_r) = (0.0_f64, 0.0_f64, 0.0, 0.0);
        let (mut differ, mut max_ulp) = (0, 0);
        for (&x, &got) in xs.iter().zip(&dx) {
            let x64 = f64::from(x);
            let want = ref_grad64(x64);
            let u = ulps(got, want as f32);
            differ += usize::from(u != 0);
            max_ulp = max_ulp.max(u);
            let size = ref_cdf(x64) + (x64 * REF_FRAC_1_SQRT_2PI * (-0.5 * x64 * x64).exp()).abs();
            let err = (f64::from(got) - want).abs();
            if size > 1e-30 {
                let s = err / size;
                if s > max_scaled {
                    (max_scaled, at_s) = (s, x);
                }
                if (x64 + 0.7518).abs() > 0.05 {
                    let rel = err / want.abs();
                    if rel > max_rel {
                        (max_rel, at_r) = (rel, x);
                    }
                }
            } else {
                assert!(
                    err <= 4.0 * 1.4e-45 + 1e-36,
                    "x = {x:e}: {got:e} vs {want:e}"
                );
            }
        }
        eprintln!(
            "gelu backward: {} inputs, {differ} differ from the reference's f32 (max {max_ulp} ulp); \
             max err / (Phi + |x phi|) {max_scaled:.3e} at x = {at_s}, \
             max rel err (|x + 0.75| > 0.05) {max_rel:.3e} at x = {at_r}",
            xs.len()
        );
        // Measured: 5.98e-8 for both (the rounding to f32 itself).
        assert!(
            max_scaled <= 6.1e-8,
            "scaled error {max_scaled:e} at {at_s}"
        );
        assert!(max_rel <= 6.1e-8, "relative error {max_rel:e} at {at_r}");
    }

    #[test]
    fn constants_are_what_the_comments_say() {
        assert_eq!(LN2_HI.to_bits(), 0x3fe6_2e42_fee0_0000);
        assert_eq!(LN2_HI.to_bits() & ((1 << 21) - 1), 0);
        assert!((LN2_HI - std::f64::consts::LN_2).abs() < 2e-10);
        assert!((LN2_HI - std::f64::consts::LN_2 + LN2_LO).abs() < 1e-16);
        assert_eq!(ROUND_MAGIC, 1.5 * (1u64 << 52) as f64);
        assert_eq!(FRAC_1_SQRT_2PI, REF_FRAC_1_SQRT_2PI);
        assert!((W_SCALE.mul_add(0.15, W_SHIFT) + 1.0).abs() < 1e-15);
        assert!((W_SCALE + W_SHIFT - 1.0).abs() < 1e-15);
        // The fit covers the clamped range: t at |x| = X_CUT is above 0.15.
        let t_at_cut = 2.0 / (2.0 + X_CUT * std::f64::consts::FRAC_1_SQRT_2);
        assert!(t_at_cut > 0.15, "{t_at_cut}");
        // exp itself against std, over the callers' range.
        for i in 0..=12_000 {
            let a = -118.0 + f64::from(i) * 0.01;
            let rel = (exp(a) - a.exp()).abs() / a.exp();
            assert!(rel < 1e-11, "exp({a}): rel err {rel:e}");
        }
        // The fitted erfc against libm's.
        for i in 0..=10_700 {
            let z = f64::from(i) * 1e-3;
            let t = 2.0 / (2.0 + z);
            let got = t * exp(-z * z + horner(&ERFC_P, t.mul_add(W_SCALE, W_SHIFT)));
            let rel = (got - libm::erfc(z)).abs() / libm::erfc(z);
            assert!(rel < 2e-10, "erfc({z}): rel err {rel:e}");
        }
    }

    #[test]
    fn backward_accumulates() {
        let x: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 1.3e-3).collect();
        let dy: Vec<f32> = (0..10_000).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        let dx0: Vec<f32> = (0..10_000).map(|i| (i % 11) as f32 * 0.25 - 1.0).collect();
        let mut dx = dx0.clone();
        gelu_backward(&mut dx, &dy, &x);
        let mut fresh = vec![0.0; x.len()];
        gelu_backward(&mut fresh, &dy, &x);
        for i in 0..x.len() {
            let want = f64::from(dx0[i]) + f64::from(dy[i]) * ref_grad64(f64::from(x[i]));
            assert!(
                (f64::from(dx[i]) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "i = {i}: {} vs {want}",
                dx[i]
            );
            // fma(dy, g, dx0) is the rounded exact sum of dx0 and the fresh term's pre-image.
            assert!((dx[i] - (dx0[i] + fresh[i])).abs() <= 2.5e-7 * (1.0 + dx[i].abs()));
        }
    }

    #[test]
    fn derivative_matches_finite_difference_of_forward() {
        for &x in &[
            -12.0_f32, -8.0, -5.0, -3.0, -1.5, -0.75, -0.3, 0.0, 0.2, 0.9, 2.0, 4.5,
        ] {
            let mut g = [0.0_f32];
            gelu_backward(&mut g, &[1.0], &[x]);
            // Central difference of the forward, with the f32 evaluations taken in f64.
            let h = 1e-3_f32;
            let mut y = [0.0_f32; 2];
            gelu_forward(&mut y, &[x - h, x + h]);
            let fd = (f64::from(y[1]) - f64::from(y[0])) / (f64::from(x + h) - f64::from(x - h));
            let want = ref_grad64(f64::from(x));
            // h^2 curvature term and the forward's own rounding over 2h.
            let tol = 1e-3 * want.abs()
                + 4e-7 * (f64::from(y[0].abs()) + f64::from(y[1].abs())) / f64::from(2.0 * h);
            assert!(
                (fd - f64::from(g[0])).abs() <= tol.max(1e-40),
                "x = {x}: fd {fd} vs {}",
                g[0]
            );
        }
    }

    #[test]
    fn dispatch_paths_are_bit_identical() {
        let mut rng = Rng(42);
        let n = 1 << 20;
        let mut x: Vec<f32> = (0..n).map(|_| (rng.normal() * 4.0) as f32).collect();
        // Special values and both cuts too.
        x[..12].copy_from_slice(&[
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            15.0,
            -15.0,
            -14.0,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
        ]);
        let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let dx0: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let mut y_port = vec![0.0; n];
        forward_chunk(Path::Portable, &mut y_port, &x);
        let mut dx_port = dx0.clone();
        backward_chunk(Path::Portable, &mut dx_port, &dy, &x);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut paths = vec![best_path()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            paths.push(Path::Avx2);
        }
        eprintln!("paths compared with Portable: {paths:?}");
        for path in paths {
            let mut y = vec![0.0; n];
            forward_chunk(path, &mut y, &x);
            assert!(bits(&y) == bits(&y_port), "{path:?} forward differs");
            let mut dx = dx0.clone();
            backward_chunk(path, &mut dx, &dy, &x);
            assert!(bits(&dx) == bits(&dx_port), "{path:?} backward differs");
        }
        // And the public entry points use one of them.
        let mut y = vec![0.0; n];
        gelu_forward(&mut y, &x);
        assert!(bits(&y) == bits(&y_port));
    }

    #[test]
    fn nan_and_infinities_match_reference() {
        let x = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e30,
            -1e30,
            -20.0,
        ];
        let mut y = [1.0_f32; 8];
        gelu_forward(&mut y, &x);
        let mut y_ref = [1.0_f32; 8];
        ref_forward(&mut y_ref, &x);
        assert!(y[0].is_nan() && y_ref[0].is_nan());
        assert_eq!(y[1], f32::INFINITY);
        // The reference gives -inf * Phi(-inf) = -inf * 0 = NaN.
        assert!(y[2].is_nan() && y_ref[2].is_nan());
        for i in 3..8 {
            assert_eq!(y[i].to_bits(), y_ref[i].to_bits(), "x = {}", x[i]);
        }
        assert_eq!(y[4].to_bits(), (-0.0_f32).to_bits());
        assert_eq!(y[7].to_bits(), (-0.0_f32).to_bits());

        let dy = [1.0_f32; 8];
        let mut dx = [0.0_f32; 8];
        gelu_backward(&mut dx, &dy, &x);
        let mut dx_ref = [0.0_f32; 8];
        ref_backward(&mut dx_ref, &dy, &x);
        for i in 0..3 {
            assert!(dx[i].is_nan() && dx_ref[i].is_nan(), "x = {}", x[i]);
        }
        for i in 3..8 {
            assert_eq!(dx[i], dx_ref[i], "x = {}", x[i]);
        }
    }

    #[test]
    fn independent_of_thread_count() {
        let mut rng = Rng(7);
        let n = 3 * ELEMENTWISE_CHUNK + 123;
        let x: Vec<f32> = (0..n).map(|_| (rng.normal() * 3.0) as f32).collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let mut y = vec![0.0; n];
                gelu_forward(&mut y, &x);
                let mut dx = vec![0.5; n];
                gelu_backward(&mut dx, &dy, &x);
                (
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                )
            })
        };
        assert!(run(1) == run(3));
    }

    #[test]
    #[should_panic(expected = "gelu_forward: y and x must have the same length")]
    fn forward_length_mismatch_panics() {
        gelu_forward(&mut [0.0; 2], &[0.0; 3]);
    }

    /// Single-thread timing of the former f64 kernels against these, ns per element, on 10M
    /// elements (memory traffic included) and on 64K elements reused (L2-resident)
    /// (`cargo test --release --lib cpu::gelu::tests::timing -- --ignored --nocapture`).
    #[test]
    #[ignore = "a timing printout (before vs after), not a check: run it by hand with --ignored --nocapture"]
    fn timing() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("thread pool");
        for (n, reps) in [(10_000_000, 1), (1 << 16, 150)] {
            let mut rng = Rng(1);
            let x: Vec<f32> = (0..n).map(|_| (rng.normal() * 2.0) as f32).collect();
            let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let mut y = vec![0.0_f32; n];
            let mut dx = vec![0.0_f32; n];
            let median_ns = |f: &mut dyn FnMut()| {
                let mut t: Vec<f64> = (0..7)
                    .map(|_| {
                        let s = std::time::Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        s.elapsed().as_secs_f64() * 1e9 / (n * reps) as f64
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                t[3]
            };
            pool.install(|| {
                let before_f = median_ns(&mut || ref_forward(&mut y, &x));
                let after_f = median_ns(&mut || gelu_forward(&mut y, &x));
                let before_b = median_ns(&mut || ref_backward(&mut dx, &dy, &x));
                let after_b = median_ns(&mut || gelu_backward(&mut dx, &dy, &x));
                eprintln!(
                    "path {:?}, 1 thread, n = {n} x {reps}, N(0,1)*2, median of 7 (ns/element):\n  \
                     forward:  old (scalar libm) {before_f:.2}, new {after_f:.2} ({:.1}x)\n  \
                     backward: old (scalar libm) {before_b:.2}, new {after_b:.2} ({:.1}x)",
                    best_path(),
                    before_f / after_f,
                    before_b / after_b
                );
            });
        }
        // Each compiled path on its own (one chunk call, no rayon), L2-resident.
        let n = 1 << 16;
        let mut rng = Rng(1);
        let x: Vec<f32> = (0..n).map(|_| (rng.normal() * 2.0) as f32).collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let mut y = vec![0.0_f32; n];
        let mut dx = vec![0.0_f32; n];
        let mut paths = vec![best_path()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            paths.push(Path::Avx2);
        }
        paths.push(Path::Portable);
        for path in paths {
            let reps = if path == Path::Portable { 5 } else { 150 };
            let time = |f: &mut dyn FnMut()| {
                let s = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                s.elapsed().as_secs_f64() * 1e9 / (n * reps) as f64
            };
            let f = time(&mut || forward_chunk(path, &mut y, &x));
            let b = time(&mut || backward_chunk(path, &mut dx, &dy, &x));
            eprintln!("path {path:?} alone, n = {n}: forward {f:.2}, backward {b:.2} ns/element");
        }
    }
}
