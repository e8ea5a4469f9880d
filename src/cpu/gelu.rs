//! Exact (erf) GELU, `gelu(x) = 0.5 x (1 + erf(x / sqrt 2))` = `x Phi(x)`, as PyTorch's
//! `nn.GELU()` default (`approximate='none'`) used by timm's ViT MLP and DINO's head.
//!
//! Each element is evaluated in f64 and rounded once to f32, with `Phi(x)` written as
//! `0.5 erfc(-x / sqrt 2)` (`libm::erfc`): unlike `1 + erf(..)`, this does not cancel for
//! negative `x`, so the result keeps its relative accuracy down the left tail too (PyTorch's
//! f32 `1 + erf` formula returns 0 below about x = -5.5; the difference is under 1e-7 in
//! absolute terms). It is the reference the GPU twin (`erff`, bf16 I/O) is checked against;
//! the extra accuracy costs nothing that matters, GELU being a small part of an MLP's time.
//! Not the tanh approximation.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Phi(x)`, the standard normal CDF, in f64 (via erfc: accurate in both tails).
#[inline]
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// Writes `y = gelu(x)` elementwise.
// (L) -> (L)
pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    assert_eq!(
        y.len(),
        x.len(),
        "gelu_forward: y and x must have the same length"
    );
    y.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(y, x)| {
            for (yi, &xi) in y.iter_mut().zip(x) {
                let x = f64::from(xi);
                *yi = (x * normal_cdf(x)) as f32;
            }
        });
}

/// Accumulates `dx += dy * gelu'(x)` with `gelu'(x) = Phi(x) + x phi(x)`.
// dy (L), x (L) -> dx (L) +=
pub fn gelu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "gelu_backward: dx, dy and x must have the same length"
    );
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            dy.par_chunks(ELEMENTWISE_CHUNK)
                .zip(x.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(dx, (dy, x))| {
            for ((dxi, &dyi), &xi) in dx.iter_mut().zip(dy).zip(x) {
                let x = f64::from(xi);
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
                *dxi += (f64::from(dyi) * (normal_cdf(x) + x * pdf)) as f32;
            }
        });
}
