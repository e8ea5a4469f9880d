//! Patch embedding and token assembly of the ViT input:
//! - [`im2col`]: images to one row per patch, so the conv with kernel = stride = patch is a
//!   Linear ([`super::linear`]) with the conv weight `(D, C, p, p)` read as `(D, C*p*p)`;
//!   no image gradient is ever needed, so there is no `col2im`;
//! - position-embedding resampling for a view whose patch grid `g` differs from the
//!   reference grid `G` (timm's `resample_abs_pos_embed`: PyTorch bicubic, see
//!   [`pos_resample_matrix`]), with its backward;
//! - [`add_cls_and_pos`]: prepend the CLS token and add the (resampled) position
//!   embedding, with its backward.
//!
//! Resampling is linear in `pos_embed`, so it is one `(g, G)` matrix per axis, applied
//! separably; the CLS position passes through unchanged.

use rayon::prelude::*;

/// Unrolls non-overlapping `patch x patch` windows into rows: row `b*P*P + py*P + px`
/// (patches row-major, `P = side / patch`) holds channel `c`, pixel `(ky, kx)` of the
/// window at column `c*p*p + ky*p + kx`, the order of a PyTorch conv weight `(D, C, p, p)`
/// flattened.
// images (B, C, S, S) planar -> cols (B*P*P, C*p*p)
pub fn im2col(cols: &mut [f32], images: &[f32], b: usize, c: usize, side: usize, patch: usize) {
    assert!(
        patch > 0 && side % patch == 0,
        "im2col: side must be a multiple of patch"
    );
    let grid = side / patch;
    let width = c * patch * patch;
    assert_eq!(
        images.len(),
        b * c * side * side,
        "im2col: images must be (B, C, S, S)"
    );
    assert_eq!(
        cols.len(),
        b * grid * grid * width,
        "im2col: cols must be (B*P*P, C*p*p)"
    );
    if cols.is_empty() {
        return;
    }
    cols.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let (bi, cell) = (row / (grid * grid), row % (grid * grid));
            let (py, px) = (cell / grid, cell % grid);
            for ci in 0..c {
                let plane = &images[(bi * c + ci) * side * side..(bi * c + ci + 1) * side * side];
                for ky in 0..patch {
                    let src = (py * patch + ky) * side + px * patch;
                    let dst = (ci * patch + ky) * patch;
                    out[dst..dst + patch].copy_from_slice(&plane[src..src + patch]);
                }
            }
        });
}

/// PyTorch's cubic convolution coefficient A (`upsample_bicubic2d`).
const BICUBIC_A: f32 = -0.75;

/// Cubic convolution kernel for `|x| <= 1` (PyTorch `cubic_convolution1`).
fn cubic1(x: f32) -> f32 {
    ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
}

/// Cubic convolution kernel for `1 < |x| < 2` (PyTorch `cubic_convolution2`).
fn cubic2(x: f32) -> f32 {
    ((BICUBIC_A * x - 5.0 * BICUBIC_A) * x + 8.0 * BICUBIC_A) * x - 4.0 * BICUBIC_A
}

/// The `(g, G)` matrix `M` of 1-D bicubic resampling from `G` to `g` samples, as PyTorch's
/// `F.interpolate(mode='bicubic', align_corners=False, antialias=False)` computes it per
/// axis: output `i` reads source coordinate `x = (i + 0.5) * (G / g) - 0.5` (not clamped),
/// taps `floor(x) - 1 ..= floor(x) + 2` clamped to `[0, G-1]`, weights from the cubic
/// convolution kernel with `A = -0.75` at `t = x - floor(x)`. Clamped taps add into the
/// same column, so every row sums to 1. Arithmetic in f32, as PyTorch's CPU kernel does for
/// f32 tensors. `g == G` gives the identity.
// -> (g, G)
pub fn pos_resample_matrix(g: usize, big_g: usize) -> Vec<f32> {
    assert!(
        g > 0 && big_g > 0,
        "pos_resample_matrix: grids must be non-empty"
    );
    let mut m = vec![0.0f32; g * big_g];
    if g == big_g {
        for i in 0..g {
            m[i * g + i] = 1.0;
        }
        return m;
    }
    let scale = big_g as f32 / g as f32;
    for i in 0..g {
        let x = (i as f32 + 0.5) * scale - 0.5;
        let x0 = x.floor();
        let t = x - x0;
        let coeffs = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (tap, w) in coeffs.into_iter().enumerate() {
            let src = (x0 as i64 - 1 + tap as i64).clamp(0, big_g as i64 - 1) as usize;
            m[i * big_g + src] += w;
        }
    }
    m
}

/// Writes the position embedding of a view with a `g x g` patch grid from the stored one
/// (grid `G`): row 0 (CLS) is copied, the patch rows are `My P My^T`-style resampled per
/// channel, `out[1 + i*g + j] = sum_{a, c} M[i, a] M[j, c] pos[1 + a*G + c]` with
/// `M = pos_resample_matrix(g, G)`.
// pos (1 + G*G, D) -> out (1 + g*g, D)
pub fn pos_embed_forward(out: &mut [f32], pos: &[f32], g: usize, big_g: usize, d: usize) {
    assert_eq!(
        pos.len(),
        (1 + big_g * big_g) * d,
        "pos_embed_forward: pos must be (1+G*G, D)"
    );
    assert_eq!(
        out.len(),
        (1 + g * g) * d,
        "pos_embed_forward: out must be (1+g*g, D)"
    );
    if g == big_g {
        out.copy_from_slice(pos);
        return;
    }
    let m = pos_resample_matrix(g, big_g);
    out[..d].copy_from_slice(&pos[..d]);
    // Along x: tmp[a, j] = sum_c M[j, c] pos[a, c]   (G, G, D) -> (G, g, D)
    let mut tmp = vec![0.0f32; big_g * g * d];
    for a in 0..big_g {
        for j in 0..g {
            let t = &mut tmp[(a * g + j) * d..(a * g + j + 1) * d];
            for c in 0..big_g {
                let w = m[j * big_g + c];
                let src = &pos[(1 + a * big_g + c) * d..(2 + a * big_g + c) * d];
                for (ti, &s) in t.iter_mut().zip(src) {
                    *ti += w * s;
                }
            }
        }
    }
    // Along y: out[i, j] = sum_a M[i, a] tmp[a, j]   (G, g, D) -> (g, g, D)
    for i in 0..g {
        for j in 0..g {
            let o = &mut out[(1 + i * g + j) * d..(2 + i * g + j) * d];
            o.fill(0.0);
            for a in 0..big_g {
                let w = m[i * big_g + a];
                let src = &tmp[(a * g + j) * d..(a * g + j + 1) * d];
                for (oi, &s) in o.iter_mut().zip(src) {
                    *oi += w * s;
                }
            }
        }
    }
}

/// Accumulates the gradient of [`pos_embed_forward`] into the stored position embedding:
/// `dpos[0] += dout[0]`, `dpos[1 + a*G + c] += sum_{i, j} M[i, a] M[j, c] dout[1 + i*g + j]`.
// dout (1 + g*g, D) -> dpos (1 + G*G, D) +=
pub fn pos_embed_backward(dpos: &mut [f32], dout: &[f32], g: usize, big_g: usize, d: usize) {
    assert_eq!(
        dpos.len(),
        (1 + big_g * big_g) * d,
        "pos_embed_backward: dpos must be (1+G*G, D)"
    );
    assert_eq!(
        dout.len(),
        (1 + g * g) * d,
        "pos_embed_backward: dout must be (1+g*g, D)"
    );
    if g == big_g {
        for (a, &b) in dpos.iter_mut().zip(dout) {
            *a += b;
        }
        return;
    }
    let m = pos_resample_matrix(g, big_g);
    for (a, &b) in dpos[..d].iter_mut().zip(&dout[..d]) {
        *a += b;
    }
    // Transpose of the y pass: tmp[a, j] = sum_i M[i, a] dout[i, j]   (g, g, D) -> (G, g, D)
    let mut tmp = vec![0.0f32; big_g * g * d];
    for a in 0..big_g {
        for j in 0..g {
            let t = &mut tmp[(a * g + j) * d..(a * g + j + 1) * d];
            for i in 0..g {
                let w = m[i * big_g + a];
                let src = &dout[(1 + i * g + j) * d..(2 + i * g + j) * d];
                for (ti, &s) in t.iter_mut().zip(src) {
                    *ti += w * s;
                }
            }
        }
    }
    // Transpose of the x pass: dpos[a, c] += sum_j M[j, c] tmp[a, j]   (G, g, D) -> (G, G, D)
    for a in 0..big_g {
        for c in 0..big_g {
            let o = &mut dpos[(1 + a * big_g + c) * d..(2 + a * big_g + c) * d];
            for j in 0..g {
                let w = m[j * big_g + c];
                let src = &tmp[(a * g + j) * d..(a * g + j + 1) * d];
                for (oi, &s) in o.iter_mut().zip(src) {
                    *oi += w * s;
                }
            }
        }
    }
}

/// Assembles the token sequence: `tokens[b, 0] = cls + pos_view[0]`,
/// `tokens[b, 1 + p] = patches[b*g*g + p] + pos_view[1 + p]`.
// patches (B*g*g, D), cls (D), pos_view (1 + g*g, D) -> tokens (B, 1 + g*g, D)
pub fn add_cls_and_pos(
    tokens: &mut [f32],
    patches: &[f32],
    cls: &[f32],
    pos_view: &[f32],
    b: usize,
    g: usize,
    d: usize,
) {
    assert!(g > 0, "add_cls_and_pos: the grid must be non-empty");
    let t = 1 + g * g;
    assert_eq!(
        tokens.len(),
        b * t * d,
        "add_cls_and_pos: tokens must be (B, 1+g*g, D)"
    );
    assert_eq!(
        patches.len(),
        b * g * g * d,
        "add_cls_and_pos: patches must be (B*g*g, D)"
    );
    assert_eq!(cls.len(), d, "add_cls_and_pos: cls must be (D)");
    assert_eq!(
        pos_view.len(),
        t * d,
        "add_cls_and_pos: pos_view must be (1+g*g, D)"
    );
    if tokens.is_empty() {
        return;
    }
    tokens
        .par_chunks_mut(t * d)
        .zip(patches.par_chunks(g * g * d))
        .for_each(|(seq, patches)| {
            for ((o, &c), &p) in seq[..d].iter_mut().zip(cls).zip(&pos_view[..d]) {
                *o = c + p;
            }
            for ((o, &x), &p) in seq[d..].iter_mut().zip(patches).zip(&pos_view[d..]) {
                *o = x + p;
            }
        });
}

/// Accumulates the gradients of [`add_cls_and_pos`]: `dpatches += dtokens[:, 1:]`,
/// `dcls += sum_b dtokens[b, 0]`, `dpos_view += sum_b dtokens[b]` (batch summed in index
/// order).
// dtokens (B, 1 + g*g, D) -> dpatches (B*g*g, D) +=, dcls (D) +=, dpos_view (1 + g*g, D) +=
pub fn add_cls_and_pos_backward(
    dpatches: &mut [f32],
    dcls: &mut [f32],
    dpos_view: &mut [f32],
    dtokens: &[f32],
    b: usize,
    g: usize,
    d: usize,
) {
    assert!(
        g > 0,
        "add_cls_and_pos_backward: the grid must be non-empty"
    );
    let t = 1 + g * g;
    assert_eq!(
        dtokens.len(),
        b * t * d,
        "add_cls_and_pos_backward: dtokens must be (B, 1+g*g, D)"
    );
    assert_eq!(
        dpatches.len(),
        b * g * g * d,
        "add_cls_and_pos_backward: dpatches must be (B*g*g, D)"
    );
    assert_eq!(dcls.len(), d, "add_cls_and_pos_backward: dcls must be (D)");
    assert_eq!(
        dpos_view.len(),
        t * d,
        "add_cls_and_pos_backward: dpos_view must be (1+g*g, D)"
    );
    if dtokens.is_empty() {
        return;
    }
    dpatches
        .par_chunks_mut(g * g * d)
        .zip(dtokens.par_chunks(t * d))
        .for_each(|(dp, seq)| {
            for (a, &s) in dp.iter_mut().zip(&seq[d..]) {
                *a += s;
            }
        });
    // Each position row sums the batch in index order.
    dpos_view
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(row, acc)| {
            for bi in 0..b {
                let src = &dtokens[(bi * t + row) * d..(bi * t + row + 1) * d];
                for (a, &s) in acc.iter_mut().zip(src) {
                    *a += s;
                }
            }
        });
    for bi in 0..b {
        for (a, &s) in dcls.iter_mut().zip(&dtokens[bi * t * d..bi * t * d + d]) {
            *a += s;
        }
    }
}
