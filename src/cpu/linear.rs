//! Linear layer (PyTorch `nn.Linear`): `y = x W^T + b` with `W` stored `(out, in)`, and its
//! backward. Also serves the patch embedding (conv with kernel = stride = patch, after
//! `im2col`). The GEMMs are [`super::gemm`]; the bias gradient is summed over fixed blocks
//! of rows ([`super::sum_over_rows`]), so it is thread-count independent.

use rayon::prelude::*;

use super::gelu::{gelu_backward_in_place_serial, gelu_forward_serial};
use super::{gemm, gemm_then, sum_over_rows, Epilogue, SendPtr};

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
            y.par_chunks_mut(d_out).for_each(|row| add_bias(row, b));
        }
    }
}

/// `rows[i, j] += b[j]` on whole rows of `b.len()` elements.
fn add_bias(rows: &mut [f32], b: &[f32]) {
    if b.is_empty() {
        return;
    }
    for row in rows.chunks_exact_mut(b.len()) {
        for (yj, bj) in row.iter_mut().zip(b) {
            *yj += bj;
        }
    }
}

/// A Linear and the GELU after it: writes `h = x W^T + b` and `a = gelu(h)`, the same bits
/// as [`linear_forward`] then [`super::gelu::gelu_forward`], with the bias and the GELU
/// applied to each block of rows of `h` as the GEMM finishes it (no extra passes over `h`).
// (n, d_in) @ (d_out, d_in)^T + b -> h (n, d_out), a = gelu(h) (n, d_out)
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_forward(
    h: &mut [f32],
    a: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(
        h.len(),
        n * d_out,
        "linear_gelu_forward: h must be (n, d_out)"
    );
    assert_eq!(
        a.len(),
        n * d_out,
        "linear_gelu_forward: a must be (n, d_out)"
    );
    assert_eq!(
        x.len(),
        n * d_in,
        "linear_gelu_forward: x must be (n, d_in)"
    );
    assert_eq!(
        w.len(),
        d_out * d_in,
        "linear_gelu_forward: w must be (d_out, d_in)"
    );
    assert_eq!(b.len(), d_out, "linear_gelu_forward: b must be (d_out)");
    let pa = SendPtr::new(a);
    let epilogue = |r0: usize, rows: &mut [f32]| {
        add_bias(rows, b);
        // SAFETY: `a` has the shape of `h` (asserted), and these rows of `a` belong to
        // this block of rows of `h`, which the GEMM hands to one task only.
        let a_rows =
            unsafe { std::slice::from_raw_parts_mut(pa.get().add(r0 * d_out), rows.len()) };
        gelu_forward_serial(a_rows, rows);
    };
    gemm_then(
        n,
        d_in,
        d_out,
        1.0,
        x,
        (d_in, 1),
        w,
        (1, d_in),
        0.0,
        h,
        &epilogue,
    );
}

/// The gradients through `a = gelu(h)` then a Linear `y = a W^T + b`: writes
/// `dh = (dy W) * gelu'(h)` (overwriting `dh`) and accumulates `dW += dy^T a`,
/// `db += sum over rows of dy`. The same bits as [`linear_backward_into`] into a buffer
/// `da` then [`super::gelu::gelu_backward_into`]`(dh, da, h)`, with the derivative applied
/// to each block of rows as the GEMM finishes it, and no `da` buffer.
// dy (n, d_out), a (n, d_in), w (d_out, d_in), h (n, d_in) -> dh (n, d_in), dw +=, db +=
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_backward_into(
    dh: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    a: &[f32],
    w: &[f32],
    h: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(
        h.len(),
        n * d_in,
        "linear_gelu_backward_into: h must be (n, d_in)"
    );
    let epilogue = |r0: usize, rows: &mut [f32]| {
        gelu_backward_in_place_serial(rows, &h[r0 * d_in..r0 * d_in + rows.len()]);
    };
    backward(
        0.0,
        Some(dh),
        dw,
        db,
        dy,
        a,
        w,
        n,
        d_in,
        d_out,
        Some(&epilogue),
    );
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
    backward(1.0, dx, dw, db, dy, x, w, n, d_in, d_out, None);
}

/// [`linear_backward`] that overwrites `dx` (`dx = dy W`) instead of adding to it; `dW` and
/// `db` still accumulate. The same values as zeroing `dx` first (a zero's sign aside),
/// without the pass that zeroes it (the GEMM ignores the old contents).
// dy (n, d_out), x (n, d_in), w (d_out, d_in) -> dx (n, d_in), dw (d_out, d_in) +=, db (d_out) +=
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_into(
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
    backward(0.0, dx, dw, db, dy, x, w, n, d_in, d_out, None);
}

/// The backward passes: `dx = dx_beta * dx + dy W` (`dx_beta` 1 or 0), then `dx_epilogue`
/// on its rows if given.
#[allow(clippy::too_many_arguments)]
fn backward(
    dx_beta: f32,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    dx_epilogue: Option<Epilogue>,
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
        match dx_epilogue {
            Some(e) => gemm_then(
                n,
                d_out,
                d_in,
                1.0,
                dy,
                (d_out, 1),
                w,
                (d_in, 1),
                dx_beta,
                dx,
                e,
            ),
            None => gemm(
                n,
                d_out,
                d_in,
                1.0,
                dy,
                (d_out, 1),
                w,
                (d_in, 1),
                dx_beta,
                dx,
                (d_in, 1),
            ),
        }
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

/// `acc[j] += sum_i m[i, j]`, rows summed in fixed blocks ([`sum_over_rows`]).
// (n, d) -> (d) +=
pub(crate) fn sum_rows_into(acc: &mut [f32], m: &[f32], n: usize, d: usize) {
    sum_over_rows(
        d,
        n,
        |i, part| {
            for (a, v) in part.iter_mut().zip(&m[i * d..(i + 1) * d]) {
                *a += v;
            }
        },
        |part| {
            for (a, v) in acc.iter_mut().zip(part) {
                *a += v;
            }
        },
    );
}
