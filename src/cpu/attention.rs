//! Multi-head self-attention core, as timm's `Attention` computes it between the `qkv` and
//! `proj` Linears: `softmax(q k^T * hd^-0.5) v` per head, no mask, no dropout.
//!
//! Layout of `qkv` (B, N, 3D): timm's `reshape(B, N, 3, H, hd)`, so within a token row q of
//! head h is columns `[h*hd, (h+1)*hd)`, k starts at `D`, v at `2D`. The output (B, N, D)
//! concatenates heads in head order (timm's `transpose(1, 2).reshape(B, N, D)`), ready for
//! the `proj` Linear. The probabilities (B, H, N, N) are saved for the backward pass.
//!
//! Work is split over (batch, head) pairs; each pair reads and writes only its own
//! columns, and each output element is computed by one thread, so results do not depend
//! on the thread count. The per-head GEMMs are single-threaded `gemm` crate calls on strided
//! views.

use rayon::prelude::*;

use super::exp::exp_in_place;
use super::reduce::{dot, max, sum};
use super::{gemm_raw, SendPtr};

fn check_shapes(name: &str, qkv: usize, probs: usize, b: usize, n: usize, d: usize, heads: usize) {
    assert!(
        heads > 0 && d % heads == 0,
        "{name}: d must be a multiple of heads"
    );
    assert_eq!(qkv, b * n * 3 * d, "{name}: qkv must be (B, N, 3D)");
    assert_eq!(
        probs,
        b * heads * n * n,
        "{name}: probs must be (B, H, N, N)"
    );
}

/// Writes the attention output and saves the softmax probabilities.
///
/// Scores are `scale * q k^T` with `scale = hd^-0.5`; each row of the softmax subtracts its
/// maximum before `exp`, so logits of any size stay finite.
// qkv (B, N, 3D) -> out (B, N, D), probs (B, H, N, N)
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) {
    check_shapes("attention_forward", qkv.len(), probs.len(), b, n, d, heads);
    assert_eq!(
        out.len(),
        b * n * d,
        "attention_forward: out must be (B, N, D)"
    );
    if b == 0 || n == 0 || d == 0 {
        return;
    }
    let hd = d / heads;
    let scale = (hd as f32).powf(-0.5);
    let out_ptr = SendPtr::new(out);
    probs.par_chunks_mut(n * n).enumerate().for_each(|(bh, p)| {
        let (bi, h) = (bh / heads, bh % heads);
        let q = &qkv[bi * n * 3 * d + h * hd..];
        let k = &q[d..];
        let v = &q[2 * d..];
        // SAFETY: q, k, v are (N, hd) views with row stride 3D inside qkv's batch `bi`
        // (the last element read is (N-1)*3D + 2D + (h+1)*hd - 1 < N*3D); p is this
        // task's own (N, N) block. The output block of (bi, h) is rows of batch bi,
        // columns [h*hd, (h+1)*hd) of out: disjoint from every other task's.
        unsafe {
            // scores = scale * q k^T: (N, hd) @ (hd, N) -> (N, N)
            gemm_raw(
                n,
                hd,
                n,
                scale,
                q.as_ptr(),
                (3 * d, 1),
                k.as_ptr(),
                (1, 3 * d),
                0.0,
                p.as_mut_ptr(),
                (n, 1),
            );
        }
        for row in p.chunks_mut(n) {
            let m = max(row);
            row.iter_mut().for_each(|s| *s -= m);
            exp_in_place(row);
            let inv = 1.0 / sum(row);
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
        // SAFETY: see above; out has B*N*D elements and this block's last element is
        // bi*N*D + (N-1)*D + (h+1)*hd - 1.
        unsafe {
            // out_h = p v: (N, N) @ (N, hd) -> (N, hd)
            gemm_raw(
                n,
                n,
                hd,
                1.0,
                p.as_ptr(),
                (n, 1),
                v.as_ptr(),
                (3 * d, 1),
                0.0,
                out_ptr.get().add(bi * n * d + h * hd),
                (d, 1),
            );
        }
    });
}

/// Accumulates the gradient with respect to `qkv` (q, k and v parts) of
/// [`attention_forward`], given the saved probabilities.
///
/// Per head, with `P` the probabilities and `dO` the output gradient:
/// `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`,
/// `dQ += scale * dS K`, `dK += scale * dS^T Q`.
// dout (B, N, D), qkv (B, N, 3D), probs (B, H, N, N) -> dqkv (B, N, 3D) +=
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) {
    backward(
        "attention_backward",
        1.0,
        dqkv,
        dout,
        qkv,
        probs,
        b,
        n,
        d,
        heads,
    );
}

/// [`attention_backward`] that overwrites `dqkv` instead of adding to it (each element of
/// `dqkv` is one GEMM output): the same values as zeroing `dqkv` first (a zero's sign
/// aside), without the pass that zeroes it.
// dout (B, N, D), qkv (B, N, 3D), probs (B, H, N, N) -> dqkv (B, N, 3D)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_into(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) {
    backward(
        "attention_backward_into",
        0.0,
        dqkv,
        dout,
        qkv,
        probs,
        b,
        n,
        d,
        heads,
    );
}

/// Both backward passes: `dqkv = beta * dqkv + ...` (`beta` 1 or 0).
#[allow(clippy::too_many_arguments)]
fn backward(
    name: &str,
    beta: f32,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) {
    check_shapes(name, qkv.len(), probs.len(), b, n, d, heads);
    assert_eq!(dqkv.len(), b * n * 3 * d, "{name}: dqkv must be (B, N, 3D)");
    assert_eq!(dout.len(), b * n * d, "{name}: dout must be (B, N, D)");
    if b == 0 || n == 0 || d == 0 {
        return;
    }
    let hd = d / heads;
    let scale = (hd as f32).powf(-0.5);
    let dqkv_ptr = SendPtr::new(dqkv);
    probs.par_chunks(n * n).enumerate().for_each_init(
        || vec![0.0f32; n * n],
        |dp, (bh, p)| {
            let (bi, h) = (bh / heads, bh % heads);
            let q = &qkv[bi * n * 3 * d + h * hd..];
            let k = &q[d..];
            let v = &q[2 * d..];
            let dout_h = &dout[bi * n * d + h * hd..];
            // SAFETY: the reads are (N, hd) views with row stride 3D (qkv) or D (dout) inside
            // batch bi (as in the forward). The writes go to the q, k and v columns of head
            // h in batch bi of dqkv, which no other task touches; dp is this task's scratch.
            unsafe {
                let dq = dqkv_ptr.get().add(bi * n * 3 * d + h * hd);
                let dk = dq.add(d);
                let dv = dq.add(2 * d);
                // dV += P^T dO: (N, N)^T @ (N, hd) -> (N, hd)
                gemm_raw(
                    n,
                    n,
                    hd,
                    1.0,
                    p.as_ptr(),
                    (1, n),
                    dout_h.as_ptr(),
                    (d, 1),
                    beta,
                    dv,
                    (3 * d, 1),
                );
                // dP = dO V^T: (N, hd) @ (hd, N) -> (N, N)
                gemm_raw(
                    n,
                    hd,
                    n,
                    1.0,
                    dout_h.as_ptr(),
                    (d, 1),
                    v.as_ptr(),
                    (1, 3 * d),
                    0.0,
                    dp.as_mut_ptr(),
                    (n, 1),
                );
                // Softmax backward, in place: dS = P * (dP - rowsum(P * dP)).
                for (dp_row, p_row) in dp.chunks_mut(n).zip(p.chunks(n)) {
                    let rowsum = dot(dp_row, p_row);
                    for (g, &pi) in dp_row.iter_mut().zip(p_row) {
                        *g = pi * (*g - rowsum);
                    }
                }
                // dQ += scale * dS K: (N, N) @ (N, hd) -> (N, hd)
                gemm_raw(
                    n,
                    n,
                    hd,
                    scale,
                    dp.as_ptr(),
                    (n, 1),
                    k.as_ptr(),
                    (3 * d, 1),
                    beta,
                    dq,
                    (3 * d, 1),
                );
                // dK += scale * dS^T Q: (N, N)^T @ (N, hd) -> (N, hd)
                gemm_raw(
                    n,
                    n,
                    hd,
                    scale,
                    dp.as_ptr(),
                    (1, n),
                    q.as_ptr(),
                    (3 * d, 1),
                    beta,
                    dk,
                    (3 * d, 1),
                );
            }
        },
    );
}
