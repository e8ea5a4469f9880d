//! LayerNorm over the last dimension (PyTorch `nn.LayerNorm`, eps 1e-6 as in timm's ViT),
//! forward and backward. Statistics are computed in f32 with a two-pass variance (biased,
//! divided by `d`). Rows run in parallel; the weight and bias gradients are summed over
//! rows in index order (parallel across column blocks only), so results do not depend on
//! the thread count.

use rayon::prelude::*;

use super::COLUMN_BLOCK;

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
            let m = x.iter().sum::<f32>() / d as f32;
            let v = x.iter().map(|&xi| (xi - m) * (xi - m)).sum::<f32>() / d as f32;
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
            let mut g_mean = 0.0f32;
            let mut gx_mean = 0.0f32;
            for ((&dyi, &xi), &wi) in dy.iter().zip(x).zip(w) {
                let g = dyi * wi;
                g_mean += g;
                gx_mean += g * (xi - m) * s;
            }
            g_mean /= d as f32;
            gx_mean /= d as f32;
            for (((dxi, &dyi), &xi), &wi) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                let xhat = (xi - m) * s;
                *dxi += (dyi * wi - g_mean - xhat * gx_mean) * s;
            }
        });
    // Parameter gradients: each column block sums the rows in index order.
    dw.par_chunks_mut(COLUMN_BLOCK)
        .zip(db.par_chunks_mut(COLUMN_BLOCK))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            let c0 = blk * COLUMN_BLOCK;
            let c1 = c0 + dw.len();
            for i in 0..n {
                let (m, s) = (mean[i], rstd[i]);
                let dy = &dy[i * d + c0..i * d + c1];
                let x = &x[i * d + c0..i * d + c1];
                for (((dwj, dbj), &dyj), &xj) in dw.iter_mut().zip(db.iter_mut()).zip(dy).zip(x) {
                    *dwj += dyj * ((xj - m) * s);
                    *dbj += dyj;
                }
            }
        });
}
