//! LayerNorm over the last dimension (PyTorch `nn.LayerNorm`, eps 1e-6 as in timm's ViT),
//! forward and backward. Statistics are computed in f32 with a two-pass variance (biased,
//! divided by `d`), each sum over a row in [`super::reduce`]'s fixed lane order. Rows run
//! in parallel; the weight and bias gradients are summed over fixed blocks of rows
//! ([`super::sum_over_rows`]), so results do not depend on the thread count.

use rayon::prelude::*;

use super::reduce::{dot, sum, sum_map, sum_map3};
use super::sum_over_rows;

/// The epsilon added to the variance (timm's ViT: `partial(nn.LayerNorm, eps=1e-6)`).
pub const LAYERNORM_EPS: f32 = 1e-6;

/// Writes `y = (x - mean) * rstd * w + b` per row and saves each row's `mean` and
/// `rstd = 1 / sqrt(var + eps)` for the backward pass.
// x (n, d), w (d), b (d) -> y (n, d), mean (n), rstd (n)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    d: usize,
) {
    assert_eq!(x.len(), n * d, "layernorm_forward: x must be (n, d)");
    assert_eq!(y.len(), n * d, "layernorm_forward: y must be (n, d)");
    assert_eq!(mean.len(), n, "layernorm_forward: mean must be (n)");
    assert_eq!(rstd.len(), n, "layernorm_forward: rstd must be (n)");
    assert!(
        w.len() == d && b.len() == d,
        "layernorm_forward: w, b must be (d)"
    );
    if n == 0 || d == 0 {
        return;
    }
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (mean, rstd))| {
            let m = sum(x) / d as f32;
            let v = sum_map(x, |xi| (xi - m) * (xi - m)) / d as f32;
            let s = 1.0 / (v + LAYERNORM_EPS).sqrt();
            for (((yi, &xi), &wi), &bi) in y.iter_mut().zip(x).zip(w).zip(b) {
                *yi = (xi - m) * s * wi + bi;
            }
            *mean = m;
            *rstd = s;
        });
}

/// Accumulates the gradients of [`layernorm_forward`] into `dx`, `dw` and `db`.
///
/// With `xhat = (x - mean) * rstd` and `g = dy * w`:
/// `dx += rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dw += sum_rows dy * xhat`,
/// `db += sum_rows dy`.
// dy (n, d), x (n, d), mean (n), rstd (n), w (d) -> dx (n, d) +=, dw (d) +=, db (d) +=
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    n: usize,
    d: usize,
) {
    assert_eq!(x.len(), n * d, "layernorm_backward: x must be (n, d)");
    assert_eq!(dy.len(), n * d, "layernorm_backward: dy must be (n, d)");
    assert_eq!(dx.len(), n * d, "layernorm_backward: dx must be (n, d)");
    assert!(
        mean.len() == n && rstd.len() == n,
        "layernorm_backward: mean, rstd must be (n)"
    );
    assert!(
        w.len() == d && dw.len() == d && db.len() == d,
        "layernorm_backward: w, dw, db must be (d)"
    );
    if n == 0 || d == 0 {
        return;
    }
    // Input gradient: rows are independent.
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dx, (dy, x)), (&m, &s))| {
            let g_mean = dot(dy, w) / d as f32;
            let gx_mean = sum_map3(dy, w, x, |dyi, wi, xi| dyi * wi * (xi - m) * s) / d as f32;
            for (((dxi, &dyi), &xi), &wi) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                let xhat = (xi - m) * s;
                *dxi += (dyi * wi - g_mean - xhat * gx_mean) * s;
            }
        });
    // Parameter gradients, `[dw; db]` per row, summed over fixed blocks of rows.
    sum_over_rows(
        2 * d,
        n,
        |i, part| {
            let (m, s) = (mean[i], rstd[i]);
            let (dy, x) = (&dy[i * d..(i + 1) * d], &x[i * d..(i + 1) * d]);
            let (pw, pb) = part.split_at_mut(d);
            for (((pwj, pbj), &dyj), &xj) in pw.iter_mut().zip(pb.iter_mut()).zip(dy).zip(x) {
                *pwj += dyj * ((xj - m) * s);
                *pbj += dyj;
            }
        },
        |part| {
            let (pw, pb) = part.split_at(d);
            dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
        },
    );
}
