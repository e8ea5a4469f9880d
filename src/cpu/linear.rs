//! Linear layer (PyTorch `nn.Linear`): `y = x W^T + b` with `W` stored `(out, in)`, and its
//! backward. Also serves the patch embedding (conv with kernel = stride = patch, after
//! `im2col`). The GEMMs are [`super::gemm`]; the bias gradient is summed over rows
//! in index order, in parallel only across column blocks, so it is thread-count
//! independent.

use rayon::prelude::*;

use super::{gemm, COLUMN_BLOCK};

/// Writes `y = x W^T + b` (bias optional).
// (n, d_in) @ (d_out, d_in)^T + b -> (n, d_out)
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(y.len(), n * d_out, "linear_forward: y must be (n, d_out)");
    assert_eq!(x.len(), n * d_in, "linear_forward: x must be (n, d_in)");
    assert_eq!(
        w.len(),
        d_out * d_in,
        "linear_forward: w must be (d_out, d_in)"
    );
    // W^T as a (d_in, d_out) matrix: element (p, j) is w[j * d_in + p], strides (1, d_in).
    gemm(
        n,
        d_in,
        d_out,
        1.0,
        x,
        (d_in, 1),
        w,
        (1, d_in),
        0.0,
        y,
        (d_out, 1),
    );
    if let Some(b) = b {
        assert_eq!(b.len(), d_out, "linear_forward: b must be (d_out)");
        if d_out > 0 {
            y.par_chunks_mut(d_out).for_each(|row| {
                for (yj, bj) in row.iter_mut().zip(b) {
                    *yj += bj;
                }
            });
        }
    }
}

/// Accumulates the gradients of [`linear_forward`]: `dx += dy W` (skipped when `dx` is
/// `None`, e.g. for the patch embedding, whose input needs no gradient), `dW += dy^T x`,
/// `db += sum over rows of dy`.
// dy (n, d_out), x (n, d_in), w (d_out, d_in) -> dx (n, d_in) +=, dw (d_out, d_in) +=, db (d_out) +=
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(
        dy.len(),
        n * d_out,
        "linear_backward: dy must be (n, d_out)"
    );
    assert_eq!(x.len(), n * d_in, "linear_backward: x must be (n, d_in)");
    assert_eq!(
        w.len(),
        d_out * d_in,
        "linear_backward: w must be (d_out, d_in)"
    );
    assert_eq!(
        dw.len(),
        d_out * d_in,
        "linear_backward: dw must be (d_out, d_in)"
    );
    if let Some(dx) = dx {
        assert_eq!(dx.len(), n * d_in, "linear_backward: dx must be (n, d_in)");
        // (n, d_out) @ (d_out, d_in) -> (n, d_in)
        gemm(
            n,
            d_out,
            d_in,
            1.0,
            dy,
            (d_out, 1),
            w,
            (d_in, 1),
            1.0,
            dx,
            (d_in, 1),
        );
    }
    // dy^T as a (d_out, n) matrix: strides (1, d_out).
    // (d_out, n) @ (n, d_in) -> (d_out, d_in)
    gemm(
        d_out,
        n,
        d_in,
        1.0,
        dy,
        (1, d_out),
        x,
        (d_in, 1),
        1.0,
        dw,
        (d_in, 1),
    );
    if let Some(db) = db {
        assert_eq!(db.len(), d_out, "linear_backward: db must be (d_out)");
        sum_rows_into(db, dy, n, d_out);
    }
}

/// `acc[j] += sum_i m[i, j]`, rows summed in index order; parallel across column blocks.
// (n, d) -> (d) +=
pub(crate) fn sum_rows_into(acc: &mut [f32], m: &[f32], n: usize, d: usize) {
    acc.par_chunks_mut(COLUMN_BLOCK)
        .enumerate()
        .for_each(|(blk, acc)| {
            let c0 = blk * COLUMN_BLOCK;
            for i in 0..n {
                let row = &m[i * d + c0..i * d + c0 + acc.len()];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
        });
}
