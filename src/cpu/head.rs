//! The two non-Linear pieces at the end of the DINO head, forward and backward:
//! - [`l2norm_forward`]: `F.normalize(x, dim=-1, p=2, eps=1e-12)` on the bottleneck
//!   features;
//! - [`weight_norm_forward`]: the last layer's weight `W = V / ||V||_row` (PyTorch
//!   `weight_norm(Linear(bottleneck, K, bias=False))`, `dim=0`, gain `weight_g` fixed to 1
//!   as in DINO's `norm_last_layer=True`); the layer itself is then a plain
//!   [`super::linear`] without bias.
//!
//! Rows are independent and run in parallel; no cross-row reductions.

use rayon::prelude::*;

/// The floor on the norm in `F.normalize` (its default `eps`).
pub const L2NORM_EPS: f32 = 1e-12;

/// Writes `y = x / max(||x||, 1e-12)` per row and saves the unclamped norms.
// x (n, d) -> y (n, d), norms (n)
pub fn l2norm_forward(y: &mut [f32], norms: &mut [f32], x: &[f32], n: usize, d: usize) {
    assert_eq!(x.len(), n * d, "l2norm_forward: x must be (n, d)");
    assert_eq!(y.len(), n * d, "l2norm_forward: y must be (n, d)");
    assert_eq!(norms.len(), n, "l2norm_forward: norms must be (n)");
    if n == 0 {
        return;
    }
    if d == 0 {
        norms.fill(0.0);
        return;
    }
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(norms.par_iter_mut())
        .for_each(|((y, x), norm)| {
            let nrm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let inv = 1.0 / nrm.max(L2NORM_EPS);
            for (yi, &xi) in y.iter_mut().zip(x) {
                *yi = xi * inv;
            }
            *norm = nrm;
        });
}

/// Accumulates the gradient of [`l2norm_forward`]: with `r = ||x||` and `y = x / r`,
/// `dx += (dy - y (y . dy)) / r`; a row whose norm was clamped (`r <= 1e-12`) is a plain
/// scaling, `dx += dy / 1e-12` (PyTorch's `clamp_min` passes no gradient to the norm there).
// dy (n, d), x (n, d), norms (n) -> dx (n, d) +=
pub fn l2norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], norms: &[f32], n: usize, d: usize) {
    assert_eq!(x.len(), n * d, "l2norm_backward: x must be (n, d)");
    assert_eq!(dy.len(), n * d, "l2norm_backward: dy must be (n, d)");
    assert_eq!(dx.len(), n * d, "l2norm_backward: dx must be (n, d)");
    assert_eq!(norms.len(), n, "l2norm_backward: norms must be (n)");
    if n == 0 || d == 0 {
        return;
    }
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
        .zip(norms.par_iter())
        .for_each(|((dx, (dy, x)), &r)| {
            if r > L2NORM_EPS {
                let inv = 1.0 / r;
                let dot = dy.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() * inv;
                for ((dxi, &dyi), &xi) in dx.iter_mut().zip(dy).zip(x) {
                    *dxi += (dyi - xi * inv * dot) * inv;
                }
            } else {
                for (dxi, &dyi) in dx.iter_mut().zip(dy) {
                    *dxi += dyi / L2NORM_EPS;
                }
            }
        });
}

/// Writes the weight-normalised matrix `W[k] = V[k] / ||V[k]||` (gain 1) and saves the row
/// norms. PyTorch adds no epsilon here: a zero row of `V` gives NaN, as it does in PyTorch
/// (the head initialises `V` randomly, so rows are never zero in practice).
// v (K, Db) -> w (K, Db), row_norms (K)
pub fn weight_norm_forward(w: &mut [f32], row_norms: &mut [f32], v: &[f32], k: usize, db: usize) {
    assert_eq!(v.len(), k * db, "weight_norm_forward: v must be (K, Db)");
    assert_eq!(w.len(), k * db, "weight_norm_forward: w must be (K, Db)");
    assert_eq!(
        row_norms.len(),
        k,
        "weight_norm_forward: row_norms must be (K)"
    );
    if k == 0 || db == 0 {
        return;
    }
    w.par_chunks_mut(db)
        .zip(v.par_chunks(db))
        .zip(row_norms.par_iter_mut())
        .for_each(|((w, v), norm)| {
            let nrm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            // PyTorch's `_weight_norm` computes v * (g / ||v||).
            let s = 1.0 / nrm;
            for (wi, &vi) in w.iter_mut().zip(v) {
                *wi = vi * s;
            }
            *norm = nrm;
        });
}

/// Accumulates the gradient of [`weight_norm_forward`] into `V`:
/// `dV[k] += (dW[k] - (dW[k] . w_k) w_k) / ||V[k]||` with `w_k = V[k] / ||V[k]||`.
// dw (K, Db), v (K, Db), row_norms (K) -> dv (K, Db) +=
pub fn weight_norm_backward(
    dv: &mut [f32],
    dw: &[f32],
    v: &[f32],
    row_norms: &[f32],
    k: usize,
    db: usize,
) {
    assert_eq!(v.len(), k * db, "weight_norm_backward: v must be (K, Db)");
    assert_eq!(dw.len(), k * db, "weight_norm_backward: dw must be (K, Db)");
    assert_eq!(dv.len(), k * db, "weight_norm_backward: dv must be (K, Db)");
    assert_eq!(
        row_norms.len(),
        k,
        "weight_norm_backward: row_norms must be (K)"
    );
    if k == 0 || db == 0 {
        return;
    }
    dv.par_chunks_mut(db)
        .zip(dw.par_chunks(db).zip(v.par_chunks(db)))
        .zip(row_norms.par_iter())
        .for_each(|((dv, (dw, v)), &r)| {
            let inv = 1.0 / r;
            let dot = dw.iter().zip(v).map(|(a, b)| a * b).sum::<f32>() * inv;
            for ((dvi, &dwi), &vi) in dv.iter_mut().zip(dw).zip(v) {
                *dvi += (dwi - dot * vi * inv) * inv;
            }
        });
}
