//! Stochastic depth per sample (timm's `drop_path`): a residual branch is dropped for a
//! whole sample with probability `p` and kept samples are scaled by `1 / (1 - p)`, so the
//! expectation is unchanged.
//!
//! The mask is a per-sample vector of `0` or `1 / (1 - p)` drawn by [`drop_path_mask`]. The
//! ViT block uses it fused into the residual add ([`residual_add_scaled`]:
//! `x += mask[b] * branch`), which saves a pass and a buffer; [`drop_path_forward`] and
//! [`drop_path_backward`] apply it on its own for any other use. With drop path off
//! (teacher, evaluation, `p = 0`) the mask is all ones and every function here is exact
//! (multiplying by 1 is exact in f32).

use rayon::prelude::*;

use crate::rng::{Purpose, Stream};

/// Fills `mask` with one value per sample: `0` (dropped) or `1 / (1 - p)` (kept). Sample `i`
/// is dropped when the `i`-th `next_f32()` draw of `Stream::new(seed, ctr, Purpose::DropPath)`
/// is below `p` (timm: `bernoulli_(1 - p)`, then divided by `1 - p`). `p = 0` keeps everything
/// (mask of ones, no randomness consumed), `p = 1` drops everything. Pass a counter that names
/// the step, the forward pass and the block, e.g.
/// `[step as u32, (step >> 32) as u32, pass << 16 | (2 * block + branch)]`.
///
/// Panics if `p` is outside `[0, 1]`: the config loader must reject such a rate first.
// -> mask (B)
pub fn drop_path_mask(mask: &mut [f32], p: f32, seed: u64, ctr: [u32; 3]) {
    assert!(
        (0.0..=1.0).contains(&p),
        "drop_path_mask: the drop-path rate must lie in [0, 1], got {p}"
    );
    if p == 0.0 {
        mask.fill(1.0);
        return;
    }
    let scale = if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 };
    let mut rng = Stream::new(seed, ctr, Purpose::DropPath);
    for m in mask.iter_mut() {
        *m = if rng.next_f32() < p { 0.0 } else { scale };
    }
}

/// Writes `y[b] = mask[b] * x[b]` for each sample's `per_sample` elements.
// x (B, L), mask (B) -> y (B, L)
pub fn drop_path_forward(y: &mut [f32], x: &[f32], mask: &[f32], b: usize, per_sample: usize) {
    check("drop_path_forward", x.len(), mask.len(), b, per_sample);
    assert_eq!(y.len(), x.len(), "drop_path_forward: y must be (B, L)");
    if per_sample == 0 {
        return;
    }
    y.par_chunks_mut(per_sample)
        .zip(x.par_chunks(per_sample))
        .zip(mask.par_iter())
        .for_each(|((y, x), &m)| {
            for (yi, &xi) in y.iter_mut().zip(x) {
                *yi = m * xi;
            }
        });
}

/// Accumulates the gradient of [`drop_path_forward`]: `dx[b] += mask[b] * dy[b]`.
// dy (B, L), mask (B) -> dx (B, L) +=
pub fn drop_path_backward(dx: &mut [f32], dy: &[f32], mask: &[f32], b: usize, per_sample: usize) {
    check("drop_path_backward", dy.len(), mask.len(), b, per_sample);
    assert_eq!(dx.len(), dy.len(), "drop_path_backward: dx must be (B, L)");
    scaled_accumulate(dx, dy, mask, per_sample);
}

/// The residual add of a ViT block with drop path fused in: `x[b] += mask[b] * branch[b]`.
// x (B, L) +=, branch (B, L), mask (B)
pub fn residual_add_scaled(x: &mut [f32], branch: &[f32], mask: &[f32], b: usize, l: usize) {
    check("residual_add_scaled", branch.len(), mask.len(), b, l);
    assert_eq!(
        x.len(),
        branch.len(),
        "residual_add_scaled: x must be (B, L)"
    );
    scaled_accumulate(x, branch, mask, l);
}

/// [`residual_add_scaled`] into a separate output: `out[b] = x[b] + mask[b] * branch[b]`,
/// the same arithmetic as copying `x` to `out` and adding, in one parallel pass (the ViT
/// block's `x_mid` and `x_out` keep `x_in` and `x_mid` for the backward).
// x (B, L), branch (B, L), mask (B) -> out (B, L)
pub fn residual_add_scaled_into(
    out: &mut [f32],
    x: &[f32],
    branch: &[f32],
    mask: &[f32],
    b: usize,
    l: usize,
) {
    check("residual_add_scaled_into", branch.len(), mask.len(), b, l);
    assert!(
        x.len() == branch.len() && out.len() == branch.len(),
        "residual_add_scaled_into: out and x must be (B, L)"
    );
    if l == 0 {
        return;
    }
    out.par_chunks_mut(l)
        .zip(x.par_chunks(l).zip(branch.par_chunks(l)))
        .zip(mask.par_iter())
        .for_each(|((out, (x, branch)), &m)| {
            for ((o, &x), &s) in out.iter_mut().zip(x).zip(branch) {
                *o = x + m * s;
            }
        });
}

/// The branch gradient of [`residual_add_scaled`]: `dbranch[b] += mask[b] * dx[b]`. The
/// skip path's gradient is `dx` itself, which the caller keeps accumulating in place.
// dx (B, L), mask (B) -> dbranch (B, L) +=
pub fn residual_add_scaled_backward(
    dbranch: &mut [f32],
    dx: &[f32],
    mask: &[f32],
    b: usize,
    l: usize,
) {
    check("residual_add_scaled_backward", dx.len(), mask.len(), b, l);
    assert_eq!(
        dbranch.len(),
        dx.len(),
        "residual_add_scaled_backward: dbranch must be (B, L)"
    );
    scaled_accumulate(dbranch, dx, mask, l);
}

/// [`residual_add_scaled_backward`] that overwrites: `dbranch[b] = mask[b] * dx[b]`, the
/// same values as zeroing `dbranch` first (a zero's sign aside), without the pass that
/// zeroes it.
// dx (B, L), mask (B) -> dbranch (B, L)
pub fn residual_add_scaled_backward_into(
    dbranch: &mut [f32],
    dx: &[f32],
    mask: &[f32],
    b: usize,
    l: usize,
) {
    check(
        "residual_add_scaled_backward_into",
        dx.len(),
        mask.len(),
        b,
        l,
    );
    assert_eq!(
        dbranch.len(),
        dx.len(),
        "residual_add_scaled_backward_into: dbranch must be (B, L)"
    );
    if l == 0 {
        return;
    }
    dbranch
        .par_chunks_mut(l)
        .zip(dx.par_chunks(l))
        .zip(mask.par_iter())
        .for_each(|((out, src), &m)| {
            for (o, &s) in out.iter_mut().zip(src) {
                *o = m * s;
            }
        });
}

fn check(name: &str, len: usize, mask: usize, b: usize, per_sample: usize) {
    assert_eq!(len, b * per_sample, "{name}: tensors must be (B, L)");
    assert_eq!(mask, b, "{name}: mask must be (B)");
}

/// `acc[b] += mask[b] * src[b]` per sample of `l` elements.
fn scaled_accumulate(acc: &mut [f32], src: &[f32], mask: &[f32], l: usize) {
    if l == 0 {
        return;
    }
    acc.par_chunks_mut(l)
        .zip(src.par_chunks(l))
        .zip(mask.par_iter())
        .for_each(|((acc, src), &m)| {
            for (a, &s) in acc.iter_mut().zip(src) {
                *a += m * s;
            }
        });
}
