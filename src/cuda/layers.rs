//! Launchers for `kernels/layers.cu`, the kernels around the ViT's matmuls: patch-embedding
//! [`im2col`], the position embedding's bicubic resampling ([`pos_embed_forward`]) and the
//! CLS/position add ([`add_cls_and_pos`]), layernorm (plain and fused with the residual add,
//! [`residual_layernorm_forward`]), bias + exact GELU ([`bias_gelu_forward`]), the bias add
//! and bias gradient of the other Linears, the DINO head's L2-normalisation and weight
//! norm, and the drop-path residual add. The GEMMs themselves are in [`super::blas`].
//!
//! Each launcher has the name of its CPU twin in [`crate::cpu`] and the same semantics:
//! forward launchers overwrite their outputs; backward launchers **accumulate** (`+=`) into
//! every gradient, like the twins, so a training step can chain them, with one exception,
//! [`bias_gelu_backward`]'s `d(x + b)` (a fresh intermediate, overwritten; see there).
//!
//! Storage: activations and their gradients `bf16`; parameters (the fp32 master weights:
//! layernorm gamma/beta, biases, CLS token, position embedding, the head's `V`), parameter
//! gradients and saved statistics (`mean`, `rstd`, norms) `f32`. Arithmetic is fp32.
//!
//! Determinism: no float atomics. A parameter gradient that sums over rows is reduced in two
//! passes, per-block partial sums in a fixed order and then `column_sum_finish` over the
//! blocks in index order, with launch shapes that depend only on the problem's size, so a
//! run repeats bit for bit on any card. The partial sums live in a buffer taken from the
//! pool for the duration of the launcher; like every kernel here, they are ordered on the
//! compute stream, so the pool may hand the block out again as soon as the launcher returns.
//!
//! What this module must not do: change the twins' semantics, or launch with a work size of
//! zero (a launch always has at least one block, which would then index out of bounds).

use cudarc::driver::{DeviceRepr, LaunchConfig};
use half::bf16;

use super::bench::BenchCase;
use super::check::{
    compare, download_bf16, download_f32, poisoned_bf16, poisoned_f32, round_bf16, to_bf16, Inputs,
    KernelCheck, Outcome, BF16_BOUND, FP32_BOUND,
};
use super::context::{blocks, Arg, Gpu};
use super::pool::{Buf, DeviceSlice, DeviceSliceMut};
use crate::cpu;
use crate::error::{Error, Result};

/// The kernels' module: `kernels/layers.cu`.
const MODULE: &str = "layers";

/// Rows per block of the one-warp-per-row kernels (256 threads).
const WARP_ROWS: usize = 8;
/// Threads per block of the kernels that stride one block over a row.
const ROW_THREADS: usize = 256;
/// Columns per block of the column-reducing bias kernels.
const COLUMN_THREADS: usize = 256;
/// Rows per chunk of the column-reducing bias kernels: each chunk writes one row of partial
/// sums, so the partials are 1/32 of the bf16 input's bytes.
const BIAS_ROWS_PER_CHUNK: usize = 64;
/// Threads per block of `add_cls_and_pos_backward`, which has only `T * D` threads in all.
const ACP_BACKWARD_THREADS: usize = 64;
/// Rows each warp of `layernorm_backward` takes (in a block of up to 8 warps).
const LN_ROWS_PER_WARP: usize = 4;
/// Shared memory `layernorm_backward` may use without an opt-in: each warp keeps `2 * d`
/// fp32 partial sums there.
const LN_SHARED_BYTES: usize = 48 * 1024;
/// The widest row `layernorm_backward` takes (one warp's partials fill the shared memory).
pub const LN_MAX_DIM: usize = LN_SHARED_BYTES / (2 * 4);

/// An `i32` kernel argument; the sizes of this family always fit one.
fn int(what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("layers: {what} = {x} does not fit an i32"))
}

/// Asserts that `buf` holds exactly `len` elements.
#[track_caller]
fn expect_len<T: DeviceRepr>(kernel: &str, what: &str, buf: &impl DeviceSlice<T>, len: usize) {
    assert_eq!(
        buf.len(),
        len,
        "{kernel}: {what} must hold {len} elements, holds {}",
        buf.len()
    );
}

/// One warp per row, [`WARP_ROWS`] rows per block.
fn warp_per_row(rows: usize) -> LaunchConfig {
    int("rows", rows);
    blocks(rows.div_ceil(WARP_ROWS), (32 * WARP_ROWS) as u32)
}

/// One block per row, its threads striding over `width` columns.
fn block_per_row(rows: usize, width: usize) -> LaunchConfig {
    int("rows", rows);
    let threads = width.div_ceil(32).clamp(1, ROW_THREADS / 32) * 32;
    blocks(rows, threads as u32)
}

/// Chunks of [`BIAS_ROWS_PER_CHUNK`] rows by blocks of [`COLUMN_THREADS`] columns.
fn row_chunks_by_columns(n: usize, h: usize) -> (LaunchConfig, usize) {
    let chunks = n.div_ceil(BIAS_ROWS_PER_CHUNK);
    let column_blocks = h.div_ceil(COLUMN_THREADS);
    int("row chunks", chunks);
    assert!(column_blocks <= 65535, "layers: h = {h} is too wide");
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, column_blocks as u32, 1),
        block_dim: (COLUMN_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunks)
}

/// `acc[c] += sum_q partials[offset + q * stride + c]` over `q < p`, `c < d`: the second pass
/// of every column reduction here.
fn column_sum_finish(
    gpu: &Gpu,
    acc: &mut impl DeviceSliceMut<f32>,
    partials: &impl DeviceSlice<f32>,
    offset: usize,
    p: usize,
    d: usize,
    stride: usize,
) -> Result<()> {
    assert_eq!(acc.len(), d, "column_sum_finish: acc must be (d)");
    assert!(
        p > 0 && d > 0 && d <= stride && offset + (p - 1) * stride + d <= partials.len(),
        "column_sum_finish: partials too short"
    );
    let cfg = blocks(d.div_ceil(32), 512);
    // SAFETY: acc holds d floats; the partials cover offset + (p - 1) * stride + d floats.
    unsafe {
        gpu.launch(
            MODULE,
            "column_sum_finish",
            cfg,
            &[
                Arg::Ptr(acc.ptr()),
                Arg::Ptr(partials.ptr_at(offset)),
                int("p", p).into(),
                int("d", d).into(),
                int("stride", stride).into(),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// Patch embedding

/// The element types the model input can have (what the view builder writes): `f32` or
/// `bf16`, each with its own instance of the im2col kernel.
pub trait ImageElement: DeviceRepr {
    /// The kernel that reads images of this type.
    const IM2COL: &'static str;
}
impl ImageElement for f32 {
    const IM2COL: &'static str = "im2col_f32";
}
impl ImageElement for bf16 {
    const IM2COL: &'static str = "im2col_bf16";
}

/// Twin of [`cpu::patch_embed::im2col`]: unrolls the non-overlapping `patch x patch` windows
/// of `images` into bf16 rows, column `c*p*p + ky*p + kx` (a flattened conv weight's order),
/// so the patch embedding is one GEMM.
// images (B, C, S, S) -> cols (B*G*G, C*p*p) bf16
pub fn im2col<T: ImageElement>(
    gpu: &Gpu,
    cols: &mut impl DeviceSliceMut<bf16>,
    images: &impl DeviceSlice<T>,
    b: usize,
    c: usize,
    side: usize,
    patch: usize,
) -> Result<()> {
    assert!(
        patch > 0 && side % patch == 0,
        "im2col: side must be a multiple of patch"
    );
    let grid = side / patch;
    let width = c * patch * patch;
    expect_len("im2col", "images (B, C, S, S)", images, b * c * side * side);
    expect_len(
        "im2col",
        "cols (B*G*G, C*p*p)",
        cols,
        b * grid * grid * width,
    );
    int("width", width);
    int("side", side);
    if cols.is_empty() {
        return Ok(());
    }
    let cfg = block_per_row(b * grid * grid, width);
    // SAFETY: one block per row of cols; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            T::IM2COL,
            cfg,
            &[
                Arg::Ptr(cols.ptr()),
                Arg::Ptr(images.ptr()),
                int("c", c).into(),
                int("side", side).into(),
                int("patch", patch).into(),
            ],
        )
    }
}

/// The `(g, G)` bicubic resampling matrix ([`cpu::patch_embed::pos_resample_matrix`]) on the
/// device, for [`pos_embed_forward`] and [`pos_embed_backward`]. Upload once per grid size.
pub fn pos_resample_matrix(gpu: &Gpu, g: usize, big_g: usize) -> Result<Buf<f32>> {
    gpu.pool()
        .upload(&cpu::patch_embed::pos_resample_matrix(g, big_g))
}

/// Twin of [`cpu::patch_embed::pos_embed_forward`]: the position embedding of a `g x g` view
/// from the stored `G x G` one, with `resample` from [`pos_resample_matrix`]`(g, G)`; fp32,
/// bit-identical to the twin (same order of sums, no fused multiply-adds).
// pos (1 + G*G, D), resample (g, G) -> out (1 + g*g, D)
pub fn pos_embed_forward(
    gpu: &Gpu,
    out: &mut impl DeviceSliceMut<f32>,
    pos: &impl DeviceSlice<f32>,
    resample: &impl DeviceSlice<f32>,
    g: usize,
    big_g: usize,
    d: usize,
) -> Result<()> {
    assert!(
        g > 0 && big_g > 0,
        "pos_embed_forward: grids must be non-empty"
    );
    expect_len(
        "pos_embed_forward",
        "pos (1+G*G, D)",
        pos,
        (1 + big_g * big_g) * d,
    );
    expect_len("pos_embed_forward", "out (1+g*g, D)", out, (1 + g * g) * d);
    expect_len("pos_embed_forward", "resample (g, G)", resample, g * big_g);
    if d == 0 {
        return Ok(());
    }
    let cfg = block_per_row(1 + g * g, d);
    // SAFETY: one block per row of out; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "pos_embed_forward",
            cfg,
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(pos.ptr()),
                Arg::Ptr(resample.ptr()),
                int("g", g).into(),
                int("G", big_g).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// Twin of [`cpu::patch_embed::pos_embed_backward`]: accumulates the gradient of
/// [`pos_embed_forward`] into the stored embedding's gradient; bit-identical to the twin.
// dout (1 + g*g, D), resample (g, G) -> dpos (1 + G*G, D) +=
pub fn pos_embed_backward(
    gpu: &Gpu,
    dpos: &mut impl DeviceSliceMut<f32>,
    dout: &impl DeviceSlice<f32>,
    resample: &impl DeviceSlice<f32>,
    g: usize,
    big_g: usize,
    d: usize,
) -> Result<()> {
    assert!(
        g > 0 && big_g > 0,
        "pos_embed_backward: grids must be non-empty"
    );
    expect_len(
        "pos_embed_backward",
        "dpos (1+G*G, D)",
        dpos,
        (1 + big_g * big_g) * d,
    );
    expect_len(
        "pos_embed_backward",
        "dout (1+g*g, D)",
        dout,
        (1 + g * g) * d,
    );
    expect_len("pos_embed_backward", "resample (g, G)", resample, g * big_g);
    if d == 0 {
        return Ok(());
    }
    let cfg = block_per_row(1 + big_g * big_g, d);
    // SAFETY: one block per row of dpos; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "pos_embed_backward",
            cfg,
            &[
                Arg::Ptr(dpos.ptr()),
                Arg::Ptr(dout.ptr()),
                Arg::Ptr(resample.ptr()),
                int("g", g).into(),
                int("G", big_g).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// Twin of [`cpu::patch_embed::add_cls_and_pos`]: the token sequence, `tokens[b, 0] = cls +
/// pos_view[0]`, `tokens[b, 1 + p] = patches[b*g*g + p] + pos_view[1 + p]`.
// patches (B*g*g, D) bf16, cls (D), pos_view (1 + g*g, D) -> tokens (B, 1 + g*g, D) bf16
#[allow(clippy::too_many_arguments)]
pub fn add_cls_and_pos(
    gpu: &Gpu,
    tokens: &mut impl DeviceSliceMut<bf16>,
    patches: &impl DeviceSlice<bf16>,
    cls: &impl DeviceSlice<f32>,
    pos_view: &impl DeviceSlice<f32>,
    b: usize,
    g: usize,
    d: usize,
) -> Result<()> {
    assert!(g > 0, "add_cls_and_pos: the grid must be non-empty");
    let t = 1 + g * g;
    expect_len("add_cls_and_pos", "tokens (B, 1+g*g, D)", tokens, b * t * d);
    expect_len(
        "add_cls_and_pos",
        "patches (B*g*g, D)",
        patches,
        b * g * g * d,
    );
    expect_len("add_cls_and_pos", "cls (D)", cls, d);
    expect_len("add_cls_and_pos", "pos_view (1+g*g, D)", pos_view, t * d);
    if tokens.is_empty() {
        return Ok(());
    }
    let cfg = block_per_row(b * t, d);
    // SAFETY: one block per token row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "add_cls_and_pos",
            cfg,
            &[
                Arg::Ptr(tokens.ptr()),
                Arg::Ptr(patches.ptr()),
                Arg::Ptr(cls.ptr()),
                Arg::Ptr(pos_view.ptr()),
                int("t", t).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// Twin of [`cpu::patch_embed::add_cls_and_pos_backward`]: accumulates `dpatches +=
/// dtokens[:, 1:]` (bf16) and the batch sums `dcls += sum_b dtokens[b, 0]`, `dpos_view +=
/// sum_b dtokens[b]` (fp32, summed in batch order: bit-identical to the twin).
// dtokens (B, 1 + g*g, D) bf16 -> dpatches (B*g*g, D) bf16 +=, dcls (D) +=, dpos_view (1 + g*g, D) +=
#[allow(clippy::too_many_arguments)]
pub fn add_cls_and_pos_backward(
    gpu: &Gpu,
    dpatches: &mut impl DeviceSliceMut<bf16>,
    dcls: &mut impl DeviceSliceMut<f32>,
    dpos_view: &mut impl DeviceSliceMut<f32>,
    dtokens: &impl DeviceSlice<bf16>,
    b: usize,
    g: usize,
    d: usize,
) -> Result<()> {
    assert!(
        g > 0,
        "add_cls_and_pos_backward: the grid must be non-empty"
    );
    let t = 1 + g * g;
    let name = "add_cls_and_pos_backward";
    expect_len(name, "dtokens (B, 1+g*g, D)", dtokens, b * t * d);
    expect_len(name, "dpatches (B*g*g, D)", dpatches, b * g * g * d);
    expect_len(name, "dcls (D)", dcls, d);
    expect_len(name, "dpos_view (1+g*g, D)", dpos_view, t * d);
    if dtokens.is_empty() {
        return Ok(());
    }
    int("b", b);
    int("t", t);
    let column_blocks = d.div_ceil(ACP_BACKWARD_THREADS);
    assert!(
        column_blocks <= 65535,
        "add_cls_and_pos_backward: D = {d} is too wide"
    );
    let cfg = LaunchConfig {
        grid_dim: (t as u32, column_blocks as u32, 1),
        block_dim: (ACP_BACKWARD_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the grid covers every (position row, column); the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "add_cls_and_pos_backward",
            cfg,
            &[
                Arg::Ptr(dpatches.ptr()),
                Arg::Ptr(dcls.ptr()),
                Arg::Ptr(dpos_view.ptr()),
                Arg::Ptr(dtokens.ptr()),
                int("b", b).into(),
                int("t", t).into(),
                int("d", d).into(),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// LayerNorm

/// Twin of [`cpu::layernorm::layernorm_forward`]: `y = (x - mean) * rstd * w + b` per row,
/// saving `mean` and `rstd` (fp32, two-pass variance). One warp per row.
// x (n, d) bf16, w (d), b (d) -> y (n, d) bf16, mean (n), rstd (n)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    gpu: &Gpu,
    y: &mut impl DeviceSliceMut<bf16>,
    mean: &mut impl DeviceSliceMut<f32>,
    rstd: &mut impl DeviceSliceMut<f32>,
    x: &impl DeviceSlice<bf16>,
    w: &impl DeviceSlice<f32>,
    b: &impl DeviceSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    let name = "layernorm_forward";
    expect_len(name, "x (n, d)", x, n * d);
    expect_len(name, "y (n, d)", y, n * d);
    expect_len(name, "mean (n)", mean, n);
    expect_len(name, "rstd (n)", rstd, n);
    expect_len(name, "w (d)", w, d);
    expect_len(name, "b (d)", b, d);
    if n == 0 || d == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row of x; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "layernorm_forward",
            warp_per_row(n),
            &[
                Arg::Ptr(y.ptr()),
                Arg::Ptr(mean.ptr()),
                Arg::Ptr(rstd.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(w.ptr()),
                Arg::Ptr(b.ptr()),
                int("n", n).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// The residual add of a ViT block fused with the layernorm that follows it: `x[s] +=
/// mask[s] * branch[s]` for each sample `s` of `rows_per_sample` rows (in place, bf16), then
/// [`layernorm_forward`] of the new `x`. Twin: [`cpu::drop_path::residual_add_scaled`] then
/// [`cpu::layernorm::layernorm_forward`] on the bf16-rounded sum (which is what the GPU
/// stores, and what the backward pass reads). One pass over `x` instead of two.
// x (S*R, d) bf16 +=, branch (S*R, d) bf16, mask (S), w, b (d) -> y (S*R, d) bf16, mean, rstd (S*R)
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    gpu: &Gpu,
    x: &mut impl DeviceSliceMut<bf16>,
    y: &mut impl DeviceSliceMut<bf16>,
    mean: &mut impl DeviceSliceMut<f32>,
    rstd: &mut impl DeviceSliceMut<f32>,
    branch: &impl DeviceSlice<bf16>,
    mask: &impl DeviceSlice<f32>,
    w: &impl DeviceSlice<f32>,
    b: &impl DeviceSlice<f32>,
    samples: usize,
    rows_per_sample: usize,
    d: usize,
) -> Result<()> {
    let name = "residual_layernorm_forward";
    let n = samples * rows_per_sample;
    expect_len(name, "x (n, d)", x, n * d);
    expect_len(name, "branch (n, d)", branch, n * d);
    expect_len(name, "y (n, d)", y, n * d);
    expect_len(name, "mean (n)", mean, n);
    expect_len(name, "rstd (n)", rstd, n);
    expect_len(name, "mask (samples)", mask, samples);
    expect_len(name, "w (d)", w, d);
    expect_len(name, "b (d)", b, d);
    if n == 0 || d == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row of x; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "residual_layernorm_forward",
            warp_per_row(n),
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(y.ptr()),
                Arg::Ptr(mean.ptr()),
                Arg::Ptr(rstd.ptr()),
                Arg::Ptr(branch.ptr()),
                Arg::Ptr(mask.ptr()),
                Arg::Ptr(w.ptr()),
                Arg::Ptr(b.ptr()),
                int("n", n).into(),
                int("d", d).into(),
                int("rows_per_sample", rows_per_sample).into(),
            ],
        )
    }
}

/// The widest row the vectorised `layernorm_backward_vec{1..6}` take: 6 groups of 4 columns per
/// lane (its registers hold six values per column group).
const LN_VEC_MAX_DIM: usize = 6 * 128;

/// The 4-column groups per lane of `layernorm_backward_vecV` for width `d`, or `None` when it
/// cannot run: `d` not a multiple of 4, wider than [`LN_VEC_MAX_DIM`], or a bf16 row pointer
/// not 8-byte aligned.
fn ln_backward_vectors(d: usize, bf16_ptrs: &[u64]) -> Option<usize> {
    (d % 4 == 0 && d <= LN_VEC_MAX_DIM && bf16_ptrs.iter().all(|p| p % 8 == 0))
        .then(|| d.div_ceil(128))
}

/// Warps per block of `layernorm_backward` for rows of `d`: up to 8, as many as the shared
/// memory holds (each keeps `2 * d` fp32 partial sums).
fn ln_backward_warps(d: usize) -> usize {
    (LN_SHARED_BYTES / (2 * 4 * d)).clamp(1, 8)
}

/// Twin of [`cpu::layernorm::layernorm_backward`]: accumulates `dx` (bf16) and the
/// parameter gradients `dw`, `db` (fp32, deterministic two-pass column sums).
///
/// Rows wider than [`LN_MAX_DIM`] are refused with an error naming the model width.
// dy (n, d) bf16, x (n, d) bf16, mean, rstd (n), w (d) -> dx (n, d) bf16 +=, dw (d) +=, db (d) +=
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    gpu: &Gpu,
    dx: &mut impl DeviceSliceMut<bf16>,
    dw: &mut impl DeviceSliceMut<f32>,
    db: &mut impl DeviceSliceMut<f32>,
    dy: &impl DeviceSlice<bf16>,
    x: &impl DeviceSlice<bf16>,
    mean: &impl DeviceSlice<f32>,
    rstd: &impl DeviceSlice<f32>,
    w: &impl DeviceSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    let name = "layernorm_backward";
    expect_len(name, "x (n, d)", x, n * d);
    expect_len(name, "dy (n, d)", dy, n * d);
    expect_len(name, "dx (n, d)", dx, n * d);
    expect_len(name, "mean (n)", mean, n);
    expect_len(name, "rstd (n)", rstd, n);
    expect_len(name, "w (d)", w, d);
    expect_len(name, "dw (d)", dw, d);
    expect_len(name, "db (d)", db, d);
    if n == 0 || d == 0 {
        return Ok(());
    }
    if d > LN_MAX_DIM {
        return Err(Error::bad_config(
            "embed_dim",
            format!(
                "{d} is wider than the GPU layernorm supports ({LN_MAX_DIM}): use a smaller \
                 embed_dim or --device cpu"
            ),
        ));
    }
    let warps = ln_backward_warps(d);
    let rows_per_block = warps * LN_ROWS_PER_WARP;
    let p = n.div_ceil(rows_per_block);
    let partials = gpu.pool().alloc::<f32>(p * 2 * d)?;
    let mut cfg = blocks(p, (32 * warps) as u32);
    cfg.shared_mem_bytes = (warps * 2 * d * 4) as u32;
    let args = [
        Arg::Ptr(dx.ptr()),
        Arg::Ptr(partials.ptr()),
        Arg::Ptr(dy.ptr()),
        Arg::Ptr(x.ptr()),
        Arg::Ptr(mean.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::Ptr(w.ptr()),
        int("n", n).into(),
        int("d", d).into(),
        int("rows_per_block", rows_per_block).into(),
    ];
    // The vectorised kernel: 4-column groups with 8-byte loads, which needs d % 4 == 0 and
    // 8-byte aligned rows; the generic one takes any width.
    let kernel = match ln_backward_vectors(d, &[dx.ptr(), dy.ptr(), x.ptr()]) {
        Some(1) => "layernorm_backward_vec1",
        Some(2) => "layernorm_backward_vec2",
        Some(3) => "layernorm_backward_vec3",
        Some(4) => "layernorm_backward_vec4",
        Some(5) => "layernorm_backward_vec5",
        Some(_) => "layernorm_backward_vec6",
        None => "layernorm_backward",
    };
    // SAFETY: p blocks of rows_per_block rows cover the n rows (the last one is clipped);
    // block q writes partials[q * 2d .. (q + 1) * 2d]; the shared memory holds warps * 2d
    // floats; the vectorised kernel's alignment and width were checked.
    unsafe {
        gpu.launch(MODULE, kernel, cfg, &args)?;
    }
    column_sum_finish(gpu, dw, &partials, 0, p, d, 2 * d)?;
    column_sum_finish(gpu, db, &partials, d, p, d, 2 * d)
}

// ---------------------------------------------------------------------------------------
// Bias, GELU

/// `y = gelu(x + b)` (exact erf GELU) with `x` the output of a GEMM without bias: the bias
/// add of [`cpu::linear::linear_forward`] fused with [`cpu::gelu::gelu_forward`]. The caller
/// keeps `x`; [`bias_gelu_backward`] recomputes `x + b` from it (one f32 add, the same
/// value), so nothing else is saved.
// x (n, h) bf16, b (h) -> y (n, h) bf16
pub fn bias_gelu_forward(
    gpu: &Gpu,
    y: &mut impl DeviceSliceMut<bf16>,
    x: &impl DeviceSlice<bf16>,
    b: &impl DeviceSlice<f32>,
    n: usize,
    h: usize,
) -> Result<()> {
    expect_len("bias_gelu_forward", "x (n, h)", x, n * h);
    expect_len("bias_gelu_forward", "y (n, h)", y, n * h);
    expect_len("bias_gelu_forward", "b (h)", b, h);
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: one block per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "bias_gelu_forward",
            block_per_row(n, h),
            &[
                Arg::Ptr(y.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(b.ptr()),
                int("h", h).into(),
            ],
        )
    }
}

/// Backward of [`bias_gelu_forward`]: **writes** `dpre = dy * gelu'(x + b)` (bf16; not
/// accumulated, since `d(x + b)` is a fresh intermediate whose only reader is the GEMM's
/// backward) and accumulates `db += sum over rows of dpre` (fp32, from the unrounded fp32
/// values; deterministic two-pass column sums). Twin: [`cpu::gelu::gelu_backward`] into a
/// zeroed `dpre`, then the bias part of [`cpu::linear::linear_backward`].
// dy (n, h) bf16, x (n, h) bf16, b (h) -> dpre (n, h) bf16, db (h) +=
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu_backward(
    gpu: &Gpu,
    dpre: &mut impl DeviceSliceMut<bf16>,
    db: &mut impl DeviceSliceMut<f32>,
    dy: &impl DeviceSlice<bf16>,
    x: &impl DeviceSlice<bf16>,
    b: &impl DeviceSlice<f32>,
    n: usize,
    h: usize,
) -> Result<()> {
    let name = "bias_gelu_backward";
    expect_len(name, "dy (n, h)", dy, n * h);
    expect_len(name, "x (n, h)", x, n * h);
    expect_len(name, "dpre (n, h)", dpre, n * h);
    expect_len(name, "b (h)", b, h);
    expect_len(name, "db (h)", db, h);
    if n == 0 || h == 0 {
        return Ok(());
    }
    let (cfg, chunks) = row_chunks_by_columns(n, h);
    let partials = gpu.pool().alloc::<f32>(chunks * h)?;
    // SAFETY: the grid covers every (row chunk, column); chunk q writes partials[q*h .. +h].
    unsafe {
        gpu.launch(
            MODULE,
            "bias_gelu_backward",
            cfg,
            &[
                Arg::Ptr(dpre.ptr()),
                Arg::Ptr(partials.ptr()),
                Arg::Ptr(dy.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(b.ptr()),
                int("n", n).into(),
                int("h", h).into(),
                int("rows_per_chunk", BIAS_ROWS_PER_CHUNK).into(),
            ],
        )?;
    }
    column_sum_finish(gpu, db, &partials, 0, chunks, h, h)
}

/// `y += b` on every row: the bias part of [`cpu::linear::linear_forward`], for a Linear
/// whose GEMM wrote no bias.
// y (n, h) bf16 +=, b (h)
pub fn bias_add(
    gpu: &Gpu,
    y: &mut impl DeviceSliceMut<bf16>,
    b: &impl DeviceSlice<f32>,
    n: usize,
    h: usize,
) -> Result<()> {
    expect_len("bias_add", "y (n, h)", y, n * h);
    expect_len("bias_add", "b (h)", b, h);
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: one block per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "bias_add",
            block_per_row(n, h),
            &[Arg::Ptr(y.ptr()), Arg::Ptr(b.ptr()), int("h", h).into()],
        )
    }
}

/// `db += sum over rows of dy`: the bias part of [`cpu::linear::linear_backward`]
/// (`sum_rows_into`), fp32, deterministic two-pass column sums.
// dy (n, h) bf16 -> db (h) +=
pub fn bias_backward(
    gpu: &Gpu,
    db: &mut impl DeviceSliceMut<f32>,
    dy: &impl DeviceSlice<bf16>,
    n: usize,
    h: usize,
) -> Result<()> {
    expect_len("bias_backward", "dy (n, h)", dy, n * h);
    expect_len("bias_backward", "db (h)", db, h);
    if n == 0 || h == 0 {
        return Ok(());
    }
    let (cfg, chunks) = row_chunks_by_columns(n, h);
    let partials = gpu.pool().alloc::<f32>(chunks * h)?;
    // SAFETY: as in bias_gelu_backward.
    unsafe {
        gpu.launch(
            MODULE,
            "bias_backward",
            cfg,
            &[
                Arg::Ptr(partials.ptr()),
                Arg::Ptr(dy.ptr()),
                int("n", n).into(),
                int("h", h).into(),
                int("rows_per_chunk", BIAS_ROWS_PER_CHUNK).into(),
            ],
        )?;
    }
    column_sum_finish(gpu, db, &partials, 0, chunks, h, h)
}

// ---------------------------------------------------------------------------------------
// DINO head

/// Twin of [`cpu::head::l2norm_forward`]: `y = x / max(||x||, 1e-12)` per row, saving the
/// unclamped norms. One warp per row.
// x (n, d) bf16 -> y (n, d) bf16, norms (n)
pub fn l2norm_forward(
    gpu: &Gpu,
    y: &mut impl DeviceSliceMut<bf16>,
    norms: &mut impl DeviceSliceMut<f32>,
    x: &impl DeviceSlice<bf16>,
    n: usize,
    d: usize,
) -> Result<()> {
    expect_len("l2norm_forward", "x (n, d)", x, n * d);
    expect_len("l2norm_forward", "y (n, d)", y, n * d);
    expect_len("l2norm_forward", "norms (n)", norms, n);
    // d == 0 still runs: it writes norms = 0, as the twin does.
    if n == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "l2norm_forward",
            warp_per_row(n),
            &[
                Arg::Ptr(y.ptr()),
                Arg::Ptr(norms.ptr()),
                Arg::Ptr(x.ptr()),
                int("n", n).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// Twin of [`cpu::head::l2norm_backward`]: accumulates `dx += (dy - y (y . dy)) / ||x||`
/// (a clamped row: `dx += dy / 1e-12`). One warp per row.
// dy (n, d) bf16, x (n, d) bf16, norms (n) -> dx (n, d) bf16 +=
#[allow(clippy::too_many_arguments)]
pub fn l2norm_backward(
    gpu: &Gpu,
    dx: &mut impl DeviceSliceMut<bf16>,
    dy: &impl DeviceSlice<bf16>,
    x: &impl DeviceSlice<bf16>,
    norms: &impl DeviceSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    expect_len("l2norm_backward", "x (n, d)", x, n * d);
    expect_len("l2norm_backward", "dy (n, d)", dy, n * d);
    expect_len("l2norm_backward", "dx (n, d)", dx, n * d);
    expect_len("l2norm_backward", "norms (n)", norms, n);
    if n == 0 || d == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "l2norm_backward",
            warp_per_row(n),
            &[
                Arg::Ptr(dx.ptr()),
                Arg::Ptr(dy.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::Ptr(norms.ptr()),
                int("n", n).into(),
                int("d", d).into(),
            ],
        )
    }
}

/// Twin of [`cpu::head::weight_norm_forward`]: `W[k] = V[k] / ||V[k]||` from the fp32 master
/// `V`, written as the bf16 operand of the last layer's GEMM, and the row norms (fp32).
// v (K, Db) -> w (K, Db) bf16, row_norms (K)
pub fn weight_norm_forward(
    gpu: &Gpu,
    w: &mut impl DeviceSliceMut<bf16>,
    row_norms: &mut impl DeviceSliceMut<f32>,
    v: &impl DeviceSlice<f32>,
    k: usize,
    db: usize,
) -> Result<()> {
    expect_len("weight_norm_forward", "v (K, Db)", v, k * db);
    expect_len("weight_norm_forward", "w (K, Db)", w, k * db);
    expect_len("weight_norm_forward", "row_norms (K)", row_norms, k);
    if k == 0 || db == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "weight_norm_forward",
            warp_per_row(k),
            &[
                Arg::Ptr(w.ptr()),
                Arg::Ptr(row_norms.ptr()),
                Arg::Ptr(v.ptr()),
                int("k", k).into(),
                int("db", db).into(),
            ],
        )
    }
}

/// Twin of [`cpu::head::weight_norm_backward`]: accumulates `dV[k] += (dW[k] - (dW[k] . w_k)
/// w_k) / ||V[k]||`. All fp32: `dw` is the GEMM's fp32 weight gradient, `dv` a slice of the
/// flat gradient buffer.
// dw (K, Db), v (K, Db), row_norms (K) -> dv (K, Db) +=
#[allow(clippy::too_many_arguments)]
pub fn weight_norm_backward(
    gpu: &Gpu,
    dv: &mut impl DeviceSliceMut<f32>,
    dw: &impl DeviceSlice<f32>,
    v: &impl DeviceSlice<f32>,
    row_norms: &impl DeviceSlice<f32>,
    k: usize,
    db: usize,
) -> Result<()> {
    expect_len("weight_norm_backward", "v (K, Db)", v, k * db);
    expect_len("weight_norm_backward", "dw (K, Db)", dw, k * db);
    expect_len("weight_norm_backward", "dv (K, Db)", dv, k * db);
    expect_len("weight_norm_backward", "row_norms (K)", row_norms, k);
    if k == 0 || db == 0 {
        return Ok(());
    }
    // SAFETY: one warp per row; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "weight_norm_backward",
            warp_per_row(k),
            &[
                Arg::Ptr(dv.ptr()),
                Arg::Ptr(dw.ptr()),
                Arg::Ptr(v.ptr()),
                Arg::Ptr(row_norms.ptr()),
                int("k", k).into(),
                int("db", db).into(),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// Residual add with drop path

/// Blocks of 256 threads over each sample's `l` elements (at most 1024 per sample, the rest
/// by striding), one grid row per sample.
fn per_sample(b: usize, l: usize) -> LaunchConfig {
    assert!(
        b <= 65535,
        "layers: {b} samples are more than a grid column holds"
    );
    int("l", l);
    LaunchConfig {
        grid_dim: (l.div_ceil(256).clamp(1, 1024) as u32, b as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Twin of [`cpu::drop_path::residual_add_scaled`]: `x[s] += mask[s] * branch[s]` per sample
/// of `l` elements (bf16, rounded once from the twin's f32 value).
// x (B, L) bf16 +=, branch (B, L) bf16, mask (B)
pub fn residual_add_scaled(
    gpu: &Gpu,
    x: &mut impl DeviceSliceMut<bf16>,
    branch: &impl DeviceSlice<bf16>,
    mask: &impl DeviceSlice<f32>,
    b: usize,
    l: usize,
) -> Result<()> {
    expect_len("residual_add_scaled", "x (B, L)", x, b * l);
    expect_len("residual_add_scaled", "branch (B, L)", branch, b * l);
    expect_len("residual_add_scaled", "mask (B)", mask, b);
    if x.is_empty() {
        return Ok(());
    }
    // SAFETY: grid row s covers sample s's l elements; the sizes were checked above.
    unsafe {
        gpu.launch(
            MODULE,
            "residual_add_scaled",
            per_sample(b, l),
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(branch.ptr()),
                Arg::Ptr(mask.ptr()),
                int("l", l).into(),
            ],
        )
    }
}

/// Twin of [`cpu::drop_path::residual_add_scaled_backward`]: `dbranch[s] += mask[s] * dx[s]`
/// (bf16). The skip path's gradient is `dx` itself.
// dx (B, L) bf16, mask (B) -> dbranch (B, L) bf16 +=
pub fn residual_add_scaled_backward(
    gpu: &Gpu,
    dbranch: &mut impl DeviceSliceMut<bf16>,
    dx: &impl DeviceSlice<bf16>,
    mask: &impl DeviceSlice<f32>,
    b: usize,
    l: usize,
) -> Result<()> {
    let name = "residual_add_scaled_backward";
    expect_len(name, "dbranch (B, L)", dbranch, b * l);
    expect_len(name, "dx (B, L)", dx, b * l);
    expect_len(name, "mask (B)", mask, b);
    if dx.is_empty() {
        return Ok(());
    }
    // SAFETY: as in residual_add_scaled.
    unsafe {
        gpu.launch(
            MODULE,
            "residual_add_scaled_backward",
            per_sample(b, l),
            &[
                Arg::Ptr(dbranch.ptr()),
                Arg::Ptr(dx.ptr()),
                Arg::Ptr(mask.ptr()),
                int("l", l).into(),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// Bound for fp32 outputs that sum many terms in another order than the CPU twin (column
/// sums over rows; a row's dot product feeding a difference). Both sides round differently,
/// by about `2^-24 * sqrt(terms)` of the terms' scale, and an output that cancels to near
/// zero is judged against the floor of the error measure, 1e-3 of the largest output: a
/// simulation of these orders in f32 (numpy, columns of 100 to 3000 rows, 256-wide dots)
/// gives up to 3e-4, hence 1e-3. Still far below what a wrong index or a missed row gives.
const REDUCE_BOUND: f64 = 1e-3;

fn up_bf16(gpu: &Gpu, v: &[f32]) -> Result<Buf<bf16>> {
    gpu.pool().upload(&to_bf16(v))
}

fn up_f32(gpu: &Gpu, v: &[f32]) -> Result<Buf<f32>> {
    gpu.pool().upload(v)
}

/// `rows` rows of `d` values around a per-row offset in ±[0.5, 2]: a residual stream's rows
/// do not have zero mean, and a mean near zero would be judged against the measure's floor,
/// where two orders of summation differ by more than the fp32 bound.
fn offset_rows(inp: &mut Inputs, rows: usize, d: usize) -> Vec<f32> {
    let mut x = inp.normal(rows * d, 1.0);
    for row in x.chunks_mut(d.max(1)) {
        let off = inp.uniform(1, 0.5, 2.0)[0] * if inp.below(2) == 0 { -1.0 } else { 1.0 };
        row.iter_mut().for_each(|v| *v += off);
    }
    x
}

/// A drop-path mask of `b` samples with both kinds of entries: `0` and `1 / (1 - 0.1)`.
fn drop_mask(b: usize) -> Vec<f32> {
    (0..b)
        .map(|i| if i % 3 == 1 { 0.0 } else { 1.0 / 0.9 })
        .collect()
}

fn check_im2col(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    // (B, C, S, p): C*p*p below and above one block's threads, several images.
    for &(b, c, side, patch) in &[(2, 3, 20, 4), (3, 1, 28, 7), (2, 3, 30, 10)] {
        let grid = side / patch;
        let images = inp.uniform(b * c * side * side, -2.0, 2.0);
        let n_cols = b * grid * grid * c * patch * patch;
        let shape = format!("{b}x{c}x{side}x{side} p{patch}");

        let mut want = vec![0.0f32; n_cols];
        cpu::patch_embed::im2col(&mut want, &images, b, c, side, patch);
        let mut cols = poisoned_bf16(gpu, n_cols)?;
        im2col(gpu, &mut cols, &up_f32(gpu, &images)?, b, c, side, patch)?;
        out.push(compare(
            format!("im2col_f32 {shape}"),
            &download_bf16(&cols)?,
            &want,
            BF16_BOUND,
        ));

        // bf16 images: a pure copy, so exact.
        let rounded = round_bf16(&images);
        cpu::patch_embed::im2col(&mut want, &rounded, b, c, side, patch);
        let mut cols = poisoned_bf16(gpu, n_cols)?;
        im2col(gpu, &mut cols, &up_bf16(gpu, &images)?, b, c, side, patch)?;
        out.push(compare(
            format!("im2col_bf16 {shape} (exact copy)"),
            &download_bf16(&cols)?,
            &want,
            FP32_BOUND,
        ));
    }
    Ok(out)
}

fn check_pos_embed(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    // (g, G, D): downsampling, upsampling, identity; D not a multiple of 32, and above 256.
    for &(g, big_g, d) in &[(3, 5, 45), (7, 5, 40), (4, 4, 33), (6, 14, 300)] {
        let shape = format!("g{g} G{big_g} D{d}");
        let pos = inp.normal((1 + big_g * big_g) * d, 0.02);
        let m = pos_resample_matrix(gpu, g, big_g)?;

        let mut want = vec![0.0f32; (1 + g * g) * d];
        cpu::patch_embed::pos_embed_forward(&mut want, &pos, g, big_g, d);
        let mut got = poisoned_f32(gpu, want.len())?;
        pos_embed_forward(gpu, &mut got, &up_f32(gpu, &pos)?, &m, g, big_g, d)?;
        // Same order of sums and no fma: bit-identical, so the fp32 bound is generous.
        out.push(compare(
            format!("pos_embed_forward {shape}"),
            &download_f32(&got)?,
            &want,
            FP32_BOUND,
        ));

        let dout = inp.normal((1 + g * g) * d, 1.0);
        let mut want = inp.normal(pos.len(), 1.0);
        let mut dpos = up_f32(gpu, &want)?;
        cpu::patch_embed::pos_embed_backward(&mut want, &dout, g, big_g, d);
        pos_embed_backward(gpu, &mut dpos, &up_f32(gpu, &dout)?, &m, g, big_g, d)?;
        out.push(compare(
            format!("pos_embed_backward {shape}"),
            &download_f32(&dpos)?,
            &want,
            FP32_BOUND,
        ));
    }
    Ok(out)
}

fn check_add_cls_and_pos(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &(b, g, d) in &[(3, 5, 70), (2, 3, 300)] {
        let t = 1 + g * g;
        let shape = format!("{b}x{t}x{d}");
        let patches = round_bf16(&inp.normal(b * g * g * d, 1.0));
        let cls = inp.normal(d, 0.02);
        let pos = inp.normal(t * d, 0.5);

        let mut want = vec![0.0f32; b * t * d];
        cpu::patch_embed::add_cls_and_pos(&mut want, &patches, &cls, &pos, b, g, d);
        let mut tokens = poisoned_bf16(gpu, want.len())?;
        add_cls_and_pos(
            gpu,
            &mut tokens,
            &up_bf16(gpu, &patches)?,
            &up_f32(gpu, &cls)?,
            &up_f32(gpu, &pos)?,
            b,
            g,
            d,
        )?;
        out.push(compare(
            format!("add_cls_and_pos {shape}"),
            &download_bf16(&tokens)?,
            &want,
            BF16_BOUND,
        ));

        let dtokens = round_bf16(&inp.normal(b * t * d, 1.0));
        let mut want_dpatches = round_bf16(&inp.normal(b * g * g * d, 1.0));
        let mut want_dcls = inp.normal(d, 1.0);
        let mut want_dpos = inp.normal(t * d, 1.0);
        let mut dpatches = up_bf16(gpu, &want_dpatches)?;
        let mut dcls = up_f32(gpu, &want_dcls)?;
        let mut dpos = up_f32(gpu, &want_dpos)?;
        cpu::patch_embed::add_cls_and_pos_backward(
            &mut want_dpatches,
            &mut want_dcls,
            &mut want_dpos,
            &dtokens,
            b,
            g,
            d,
        );
        add_cls_and_pos_backward(
            gpu,
            &mut dpatches,
            &mut dcls,
            &mut dpos,
            &up_bf16(gpu, &dtokens)?,
            b,
            g,
            d,
        )?;
        let name = format!("add_cls_and_pos_backward {shape}");
        out.push(compare(
            format!("{name}: dpatches"),
            &download_bf16(&dpatches)?,
            &want_dpatches,
            BF16_BOUND,
        ));
        // The batch sums run in the twin's order: bit-identical.
        out.push(compare(
            format!("{name}: dcls"),
            &download_f32(&dcls)?,
            &want_dcls,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("{name}: dpos_view"),
            &download_f32(&dpos)?,
            &want_dpos,
            FP32_BOUND,
        ));
    }
    Ok(out)
}

/// Shapes for the layernorm checks: D not a multiple of 32, more rows than one block (and
/// than one block of the backward's 32 rows), a D that takes fewer than 8 warps backward.
/// Widths for both backward kernels: the generic one (77, 1000) and the vectorised one with
/// 1, 2 (33 groups: one lane takes two), 3 and 6 groups per lane (40, 132, 384, 768).
const LN_SHAPES: [(usize, usize); 6] = [
    (37, 77),
    (301, 384),
    (70, 40),
    (45, 1000),
    (29, 132),
    (53, 768),
];

fn check_layernorm(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &(n, d) in &LN_SHAPES {
        let shape = format!("{n}x{d}");
        let x = round_bf16(&offset_rows(inp, n, d));
        let w: Vec<f32> = inp.normal(d, 0.1).iter().map(|v| 1.0 + v).collect();
        let b = inp.normal(d, 0.1);
        let (xg, wg, bg) = (up_bf16(gpu, &x)?, up_f32(gpu, &w)?, up_f32(gpu, &b)?);

        let mut want_y = vec![0.0f32; n * d];
        let mut want_mean = vec![0.0f32; n];
        let mut want_rstd = vec![0.0f32; n];
        cpu::layernorm::layernorm_forward(
            &mut want_y,
            &mut want_mean,
            &mut want_rstd,
            &x,
            &w,
            &b,
            n,
            d,
        );
        let mut y = poisoned_bf16(gpu, n * d)?;
        let mut mean = poisoned_f32(gpu, n)?;
        let mut rstd = poisoned_f32(gpu, n)?;
        layernorm_forward(gpu, &mut y, &mut mean, &mut rstd, &xg, &wg, &bg, n, d)?;
        let name = format!("layernorm_forward {shape}");
        out.push(compare(
            format!("{name}: y"),
            &download_bf16(&y)?,
            &want_y,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: mean"),
            &download_f32(&mean)?,
            &want_mean,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("{name}: rstd"),
            &download_f32(&rstd)?,
            &want_rstd,
            FP32_BOUND,
        ));

        // Backward on the twin's statistics, so both sides see the same inputs.
        let dy = round_bf16(&inp.normal(n * d, 1.0));
        let mut want_dx = round_bf16(&inp.normal(n * d, 1.0));
        let mut want_dw = inp.normal(d, 1.0);
        let mut want_db = inp.normal(d, 1.0);
        let mut dx = up_bf16(gpu, &want_dx)?;
        let mut dw = up_f32(gpu, &want_dw)?;
        let mut db = up_f32(gpu, &want_db)?;
        cpu::layernorm::layernorm_backward(
            &mut want_dx,
            &mut want_dw,
            &mut want_db,
            &dy,
            &x,
            &want_mean,
            &want_rstd,
            &w,
            n,
            d,
        );
        layernorm_backward(
            gpu,
            &mut dx,
            &mut dw,
            &mut db,
            &up_bf16(gpu, &dy)?,
            &xg,
            &up_f32(gpu, &want_mean)?,
            &up_f32(gpu, &want_rstd)?,
            &wg,
            n,
            d,
        )?;
        let name = format!("layernorm_backward {shape}");
        out.push(compare(
            format!("{name}: dx"),
            &download_bf16(&dx)?,
            &want_dx,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: dw"),
            &download_f32(&dw)?,
            &want_dw,
            REDUCE_BOUND,
        ));
        out.push(compare(
            format!("{name}: db"),
            &download_f32(&db)?,
            &want_db,
            REDUCE_BOUND,
        ));
    }
    Ok(out)
}

fn check_residual_layernorm(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    // (samples, rows per sample, D)
    for &(s, r, d) in &[(3, 29, 77), (4, 50, 384)] {
        let n = s * r;
        let shape = format!("{s}x{r}x{d}");
        let x0 = round_bf16(&offset_rows(inp, n, d));
        let branch = round_bf16(&inp.normal(n * d, 0.5));
        let mask = drop_mask(s);
        let w: Vec<f32> = inp.normal(d, 0.1).iter().map(|v| 1.0 + v).collect();
        let b = inp.normal(d, 0.1);

        let mut want_x = x0.clone();
        cpu::drop_path::residual_add_scaled(&mut want_x, &branch, &mask, s, r * d);
        // The GPU stores x in bf16 and normalises what it stored.
        let want_x = round_bf16(&want_x);
        let mut want_y = vec![0.0f32; n * d];
        let mut want_mean = vec![0.0f32; n];
        let mut want_rstd = vec![0.0f32; n];
        cpu::layernorm::layernorm_forward(
            &mut want_y,
            &mut want_mean,
            &mut want_rstd,
            &want_x,
            &w,
            &b,
            n,
            d,
        );

        let mut x = up_bf16(gpu, &x0)?;
        let mut y = poisoned_bf16(gpu, n * d)?;
        let mut mean = poisoned_f32(gpu, n)?;
        let mut rstd = poisoned_f32(gpu, n)?;
        residual_layernorm_forward(
            gpu,
            &mut x,
            &mut y,
            &mut mean,
            &mut rstd,
            &up_bf16(gpu, &branch)?,
            &up_f32(gpu, &mask)?,
            &up_f32(gpu, &w)?,
            &up_f32(gpu, &b)?,
            s,
            r,
            d,
        )?;
        let name = format!("residual_layernorm_forward {shape}");
        // One rounding of the same f32 sum (no fma): exact.
        out.push(compare(
            format!("{name}: x (exact)"),
            &download_bf16(&x)?,
            &want_x,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("{name}: y"),
            &download_bf16(&y)?,
            &want_y,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: mean"),
            &download_f32(&mean)?,
            &want_mean,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("{name}: rstd"),
            &download_f32(&rstd)?,
            &want_rstd,
            FP32_BOUND,
        ));
    }
    Ok(out)
}

fn check_bias_gelu(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    // h below and above one column block; n not a multiple of the 64-row chunk.
    for &(n, h) in &[(130, 77), (200, 600)] {
        let shape = format!("{n}x{h}");
        let x = round_bf16(&inp.normal(n * h, 1.5));
        let b = inp.normal(h, 0.5);
        let pre: Vec<f32> = x
            .chunks(h)
            .flat_map(|row| row.iter().zip(&b).map(|(xi, bi)| xi + bi))
            .collect();
        let (xg, bg) = (up_bf16(gpu, &x)?, up_f32(gpu, &b)?);

        let mut want = vec![0.0f32; n * h];
        cpu::gelu::gelu_forward(&mut want, &pre);
        let mut y = poisoned_bf16(gpu, n * h)?;
        bias_gelu_forward(gpu, &mut y, &xg, &bg, n, h)?;
        out.push(compare(
            format!("bias_gelu_forward {shape}"),
            &download_bf16(&y)?,
            &want,
            BF16_BOUND,
        ));

        let dy = round_bf16(&inp.normal(n * h, 1.0));
        let mut want_dpre = vec![0.0f32; n * h];
        cpu::gelu::gelu_backward(&mut want_dpre, &dy, &pre);
        let mut want_db = inp.normal(h, 1.0);
        let mut db = up_f32(gpu, &want_db)?;
        cpu::linear::sum_rows_into(&mut want_db, &want_dpre, n, h);
        let mut dpre = poisoned_bf16(gpu, n * h)?;
        bias_gelu_backward(gpu, &mut dpre, &mut db, &up_bf16(gpu, &dy)?, &xg, &bg, n, h)?;
        let name = format!("bias_gelu_backward {shape}");
        out.push(compare(
            format!("{name}: dpre"),
            &download_bf16(&dpre)?,
            &want_dpre,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: db"),
            &download_f32(&db)?,
            &want_db,
            REDUCE_BOUND,
        ));
    }
    Ok(out)
}

fn check_bias(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &(n, h) in &[(130, 77), (70, 300)] {
        let shape = format!("{n}x{h}");
        let y0 = round_bf16(&inp.normal(n * h, 1.0));
        let b = inp.normal(h, 0.5);
        // The bias loop of cpu::linear::linear_forward: y += b per row, in f32.
        let want: Vec<f32> = y0
            .chunks(h)
            .flat_map(|row| row.iter().zip(&b).map(|(yi, bi)| yi + bi))
            .collect();
        let mut y = up_bf16(gpu, &y0)?;
        bias_add(gpu, &mut y, &up_f32(gpu, &b)?, n, h)?;
        out.push(compare(
            format!("bias_add {shape}"),
            &download_bf16(&y)?,
            &want,
            BF16_BOUND,
        ));

        let dy = round_bf16(&inp.normal(n * h, 1.0));
        let mut want_db = inp.normal(h, 1.0);
        let mut db = up_f32(gpu, &want_db)?;
        cpu::linear::sum_rows_into(&mut want_db, &dy, n, h);
        bias_backward(gpu, &mut db, &up_bf16(gpu, &dy)?, n, h)?;
        out.push(compare(
            format!("bias_backward {shape}"),
            &download_f32(&db)?,
            &want_db,
            REDUCE_BOUND,
        ));
    }
    Ok(out)
}

fn check_l2norm(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &(n, d) in &[(45, 77), (300, 256)] {
        let shape = format!("{n}x{d}");
        let mut x = inp.normal(n * d, 1.0);
        // Rows 3 and 17 have a norm below 1e-12: the clamped branch.
        let clamped = |row: usize| row == 3 || row == 17;
        for (row, chunk) in x.chunks_mut(d).enumerate() {
            if clamped(row) {
                chunk.iter_mut().for_each(|v| *v *= 1e-15);
            }
        }
        let x = round_bf16(&x);
        let xg = up_bf16(gpu, &x)?;

        let mut want_y = vec![0.0f32; n * d];
        let mut want_norms = vec![0.0f32; n];
        cpu::head::l2norm_forward(&mut want_y, &mut want_norms, &x, n, d);
        let mut y = poisoned_bf16(gpu, n * d)?;
        let mut norms = poisoned_f32(gpu, n)?;
        l2norm_forward(gpu, &mut y, &mut norms, &xg, n, d)?;
        let name = format!("l2norm_forward {shape}");
        out.push(compare(
            format!("{name}: y"),
            &download_bf16(&y)?,
            &want_y,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: norms"),
            &download_f32(&norms)?,
            &want_norms,
            FP32_BOUND,
        ));

        let dy = round_bf16(&inp.normal(n * d, 1.0));
        let mut want_dx = round_bf16(&inp.normal(n * d, 1.0));
        let mut dx = up_bf16(gpu, &want_dx)?;
        cpu::head::l2norm_backward(&mut want_dx, &dy, &x, &want_norms, n, d);
        l2norm_backward(
            gpu,
            &mut dx,
            &up_bf16(gpu, &dy)?,
            &xg,
            &up_f32(gpu, &want_norms)?,
            n,
            d,
        )?;
        // The clamped rows' gradients are ~1e12 times the others: compared on their own,
        // or they would set the scale the other rows are judged against.
        let got = download_bf16(&dx)?;
        let split = |v: &[f32], keep: bool| -> Vec<f32> {
            v.chunks(d)
                .enumerate()
                .filter(|(row, _)| clamped(*row) == keep)
                .flat_map(|(_, c)| c.iter().copied())
                .collect()
        };
        let name = format!("l2norm_backward {shape}");
        out.push(compare(
            format!("{name}: dx"),
            &split(&got, false),
            &split(&want_dx, false),
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: dx (clamped rows)"),
            &split(&got, true),
            &split(&want_dx, true),
            BF16_BOUND,
        ));
    }
    Ok(out)
}

fn check_weight_norm(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &(k, db) in &[(45, 77), (300, 256)] {
        let shape = format!("{k}x{db}");
        let v = inp.normal(k * db, 1.0);
        let vg = up_f32(gpu, &v)?;

        let mut want_w = vec![0.0f32; k * db];
        let mut want_norms = vec![0.0f32; k];
        cpu::head::weight_norm_forward(&mut want_w, &mut want_norms, &v, k, db);
        let mut w = poisoned_bf16(gpu, k * db)?;
        let mut norms = poisoned_f32(gpu, k)?;
        weight_norm_forward(gpu, &mut w, &mut norms, &vg, k, db)?;
        let name = format!("weight_norm_forward {shape}");
        out.push(compare(
            format!("{name}: w"),
            &download_bf16(&w)?,
            &want_w,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("{name}: row_norms"),
            &download_f32(&norms)?,
            &want_norms,
            FP32_BOUND,
        ));

        let dw = inp.normal(k * db, 1.0);
        let mut want_dv = inp.normal(k * db, 0.05);
        let mut dv = up_f32(gpu, &want_dv)?;
        cpu::head::weight_norm_backward(&mut want_dv, &dw, &v, &want_norms, k, db);
        weight_norm_backward(
            gpu,
            &mut dv,
            &up_f32(gpu, &dw)?,
            &vg,
            &up_f32(gpu, &want_norms)?,
            k,
            db,
        )?;
        // The dot product over Db runs in another order than the twin's.
        out.push(compare(
            format!("weight_norm_backward {shape}"),
            &download_f32(&dv)?,
            &want_dv,
            REDUCE_BOUND,
        ));
    }
    Ok(out)
}

fn check_residual_add_scaled(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    // l above and below one block; more elements per sample than the 1024-block cap.
    for &(b, l) in &[(3, 1000), (5, 77), (2, 300_001)] {
        let shape = format!("{b}x{l}");
        let mask = drop_mask(b);
        let maskg = up_f32(gpu, &mask)?;
        let x0 = round_bf16(&inp.normal(b * l, 1.0));
        let branch = round_bf16(&inp.normal(b * l, 0.5));
        let mut want = x0.clone();
        cpu::drop_path::residual_add_scaled(&mut want, &branch, &mask, b, l);
        let mut x = up_bf16(gpu, &x0)?;
        residual_add_scaled(gpu, &mut x, &up_bf16(gpu, &branch)?, &maskg, b, l)?;
        // One rounding of the twin's own f32 value (no fma): exact after rounding it too.
        out.push(compare(
            format!("residual_add_scaled {shape} (exact)"),
            &download_bf16(&x)?,
            &round_bf16(&want),
            FP32_BOUND,
        ));

        let dx = round_bf16(&inp.normal(b * l, 1.0));
        let db0 = round_bf16(&inp.normal(b * l, 1.0));
        let mut want = db0.clone();
        cpu::drop_path::residual_add_scaled_backward(&mut want, &dx, &mask, b, l);
        let mut dbranch = up_bf16(gpu, &db0)?;
        residual_add_scaled_backward(gpu, &mut dbranch, &up_bf16(gpu, &dx)?, &maskg, b, l)?;
        out.push(compare(
            format!("residual_add_scaled_backward {shape} (exact)"),
            &download_bf16(&dbranch)?,
            &round_bf16(&want),
            FP32_BOUND,
        ));
    }
    Ok(out)
}

/// This family's parity checks: every kernel, forward and backward, against its CPU twin.
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "im2col",
            run: check_im2col,
        },
        KernelCheck {
            name: "pos_embed_forward/backward",
            run: check_pos_embed,
        },
        KernelCheck {
            name: "add_cls_and_pos (+ backward)",
            run: check_add_cls_and_pos,
        },
        KernelCheck {
            name: "layernorm_forward/backward",
            run: check_layernorm,
        },
        KernelCheck {
            name: "residual_layernorm_forward",
            run: check_residual_layernorm,
        },
        KernelCheck {
            name: "bias_gelu_forward/backward",
            run: check_bias_gelu,
        },
        KernelCheck {
            name: "bias_add, bias_backward",
            run: check_bias,
        },
        KernelCheck {
            name: "l2norm_forward/backward",
            run: check_l2norm,
        },
        KernelCheck {
            name: "weight_norm_forward/backward",
            run: check_weight_norm,
        },
        KernelCheck {
            name: "residual_add_scaled (+ backward)",
            run: check_residual_add_scaled,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Benches

/// `n` values in [-1, 1], cheap to make at bench sizes (no randomness needed for timing).
fn filler(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.618_034).sin()).collect()
}

fn bench_bf16(gpu: &Gpu, n: usize) -> Result<Buf<bf16>> {
    gpu.pool().upload(&to_bf16(&filler(n)))
}

fn bench_f32(gpu: &Gpu, n: usize) -> Result<Buf<f32>> {
    gpu.pool().upload(&filler(n))
}

/// This family's benchmark cases at ViT-S/16 training shapes: batch 64 of 224 (14 x 14
/// patches, 197 tokens), width 384, MLP 1536, the head's bottleneck 256 and K = 65536; the
/// local crops' 96 (6 x 6 patches, 37 tokens) where the position embedding is resampled.
/// `bytes` counts every element each launch must read or write once (read-modify-write
/// twice), plus the column reductions' partial sums.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    const B: usize = 64;
    const SIDE: usize = 224;
    const PATCH: usize = 16;
    const C: usize = 3;
    const G: usize = SIDE / PATCH;
    const T: usize = 1 + G * G;
    const D: usize = 384;
    const H: usize = 4 * D;
    const N: usize = B * T;
    const G_LOCAL: usize = 96 / PATCH;
    const N_LOCAL: usize = 8 * B * (1 + G_LOCAL * G_LOCAL);
    const BOTTLENECK: usize = 256;
    const K: usize = 65536;
    let mut cases = Vec::new();
    let nd = (N * D) as u64;

    // im2col, bf16 and f32 input.
    {
        let images = bench_bf16(gpu, B * C * SIDE * SIDE)?;
        let mut cols = gpu.pool().alloc::<bf16>(B * G * G * C * PATCH * PATCH)?;
        cases.push(BenchCase {
            name: format!("im2col_bf16 {B}x{C}x{SIDE}x{SIDE} p{PATCH}"),
            bytes: (2 * 2 * B * C * SIDE * SIDE) as u64,
            flops: 0,
            run: Box::new(move || im2col(gpu, &mut cols, &images, B, C, SIDE, PATCH)),
        });
        let images = bench_f32(gpu, B * C * SIDE * SIDE)?;
        let mut cols = gpu.pool().alloc::<bf16>(B * G * G * C * PATCH * PATCH)?;
        cases.push(BenchCase {
            name: format!("im2col_f32 {B}x{C}x{SIDE}x{SIDE} p{PATCH}"),
            bytes: ((4 + 2) * B * C * SIDE * SIDE) as u64,
            flops: 0,
            run: Box::new(move || im2col(gpu, &mut cols, &images, B, C, SIDE, PATCH)),
        });
    }
    // Position embedding resampled for the local crops (G 14 -> g 6).
    {
        let big_rows = 1 + G * G;
        let rows = 1 + G_LOCAL * G_LOCAL;
        let bytes = ((big_rows + rows) * D * 4 + G_LOCAL * G * 4) as u64;
        let m = pos_resample_matrix(gpu, G_LOCAL, G)?;
        let pos = bench_f32(gpu, big_rows * D)?;
        let mut out = gpu.pool().alloc::<f32>(rows * D)?;
        cases.push(BenchCase {
            name: format!("pos_embed_forward g{G_LOCAL} G{G} D{D}"),
            bytes,
            flops: 0,
            run: Box::new(move || pos_embed_forward(gpu, &mut out, &pos, &m, G_LOCAL, G, D)),
        });
        let m = pos_resample_matrix(gpu, G_LOCAL, G)?;
        let dout = bench_f32(gpu, rows * D)?;
        let mut dpos = bench_f32(gpu, big_rows * D)?;
        cases.push(BenchCase {
            name: format!("pos_embed_backward g{G_LOCAL} G{G} D{D}"),
            bytes: bytes + (big_rows * D * 4) as u64,
            flops: 0,
            run: Box::new(move || pos_embed_backward(gpu, &mut dpos, &dout, &m, G_LOCAL, G, D)),
        });
    }
    // CLS and position add.
    {
        let patches = bench_bf16(gpu, B * G * G * D)?;
        let cls = bench_f32(gpu, D)?;
        let pos = bench_f32(gpu, T * D)?;
        let mut tokens = gpu.pool().alloc::<bf16>(N * D)?;
        cases.push(BenchCase {
            name: format!("add_cls_and_pos {B}x{T}x{D}"),
            bytes: (B * G * G * D * 2 + (T + 1) * D * 4 + N * D * 2) as u64,
            flops: 0,
            run: Box::new(move || add_cls_and_pos(gpu, &mut tokens, &patches, &cls, &pos, B, G, D)),
        });
        let dtokens = bench_bf16(gpu, N * D)?;
        let mut dpatches = bench_bf16(gpu, B * G * G * D)?;
        let mut dcls = bench_f32(gpu, D)?;
        let mut dpos = bench_f32(gpu, T * D)?;
        cases.push(BenchCase {
            name: format!("add_cls_and_pos_backward {B}x{T}x{D}"),
            bytes: (N * D * 2 + B * G * G * D * 2 * 2 + (T + 1) * D * 4 * 2) as u64,
            flops: 0,
            run: Box::new(move || {
                add_cls_and_pos_backward(
                    gpu,
                    &mut dpatches,
                    &mut dcls,
                    &mut dpos,
                    &dtokens,
                    B,
                    G,
                    D,
                )
            }),
        });
    }
    // LayerNorm: globals and locals forward, fused residual forward, backward.
    for (label, n) in [("", N), (" (local crops)", N_LOCAL)] {
        let x = bench_bf16(gpu, n * D)?;
        let w = bench_f32(gpu, D)?;
        let b = bench_f32(gpu, D)?;
        let mut y = gpu.pool().alloc::<bf16>(n * D)?;
        let mut mean = gpu.pool().alloc::<f32>(n)?;
        let mut rstd = gpu.pool().alloc::<f32>(n)?;
        cases.push(BenchCase {
            name: format!("layernorm_forward {n}x{D}{label}"),
            bytes: (n * D * 2 * 2 + n * 8 + D * 8) as u64,
            flops: 0,
            run: Box::new(move || {
                layernorm_forward(gpu, &mut y, &mut mean, &mut rstd, &x, &w, &b, n, D)
            }),
        });
    }
    {
        let mut x = bench_bf16(gpu, N * D)?;
        let branch = bench_bf16(gpu, N * D)?;
        let mask = gpu.pool().upload(&drop_mask(B))?;
        let w = bench_f32(gpu, D)?;
        let b = bench_f32(gpu, D)?;
        let mut y = gpu.pool().alloc::<bf16>(N * D)?;
        let mut mean = gpu.pool().alloc::<f32>(N)?;
        let mut rstd = gpu.pool().alloc::<f32>(N)?;
        cases.push(BenchCase {
            name: format!("residual_layernorm_forward {B}x{T}x{D}"),
            bytes: nd * 2 * 4 + (N * 8 + D * 8) as u64,
            flops: 0,
            run: Box::new(move || {
                residual_layernorm_forward(
                    gpu, &mut x, &mut y, &mut mean, &mut rstd, &branch, &mask, &w, &b, B, T, D,
                )
            }),
        });
    }
    {
        let dy = bench_bf16(gpu, N * D)?;
        let x = bench_bf16(gpu, N * D)?;
        let mean = bench_f32(gpu, N)?;
        let rstd: Buf<f32> = gpu.pool().upload(&vec![1.0f32; N])?;
        let w = bench_f32(gpu, D)?;
        let mut dx = bench_bf16(gpu, N * D)?;
        let mut dw = bench_f32(gpu, D)?;
        let mut db = bench_f32(gpu, D)?;
        let p = N.div_ceil(ln_backward_warps(D) * LN_ROWS_PER_WARP);
        cases.push(BenchCase {
            name: format!("layernorm_backward {N}x{D}"),
            bytes: nd * 2 * 4 + (N * 8 + D * 4 * 5 + p * 2 * D * 4 * 2) as u64,
            flops: 0,
            run: Box::new(move || {
                layernorm_backward(
                    gpu, &mut dx, &mut dw, &mut db, &dy, &x, &mean, &rstd, &w, N, D,
                )
            }),
        });
    }
    // Bias + GELU on the MLP's hidden layer, and the plain bias of the other Linears.
    {
        let nh = (N * H) as u64;
        let partial_bytes = (N.div_ceil(BIAS_ROWS_PER_CHUNK) * H * 4 * 2) as u64;
        let x = bench_bf16(gpu, N * H)?;
        let b = bench_f32(gpu, H)?;
        let mut y = gpu.pool().alloc::<bf16>(N * H)?;
        cases.push(BenchCase {
            name: format!("bias_gelu_forward {N}x{H}"),
            bytes: nh * 2 * 2 + (H * 4) as u64,
            flops: 0,
            run: Box::new(move || bias_gelu_forward(gpu, &mut y, &x, &b, N, H)),
        });
        let x = bench_bf16(gpu, N * H)?;
        let b = bench_f32(gpu, H)?;
        let dy = bench_bf16(gpu, N * H)?;
        let mut dpre = gpu.pool().alloc::<bf16>(N * H)?;
        let mut db = bench_f32(gpu, H)?;
        cases.push(BenchCase {
            name: format!("bias_gelu_backward {N}x{H}"),
            bytes: nh * 2 * 3 + partial_bytes + (H * 4 * 3) as u64,
            flops: 0,
            run: Box::new(move || bias_gelu_backward(gpu, &mut dpre, &mut db, &dy, &x, &b, N, H)),
        });
        let mut y = bench_bf16(gpu, N * D)?;
        let b = bench_f32(gpu, D)?;
        cases.push(BenchCase {
            name: format!("bias_add {N}x{D}"),
            bytes: nd * 2 * 2 + (D * 4) as u64,
            flops: 0,
            run: Box::new(move || bias_add(gpu, &mut y, &b, N, D)),
        });
        let dy = bench_bf16(gpu, N * D)?;
        let mut db = bench_f32(gpu, D)?;
        cases.push(BenchCase {
            name: format!("bias_backward {N}x{D}"),
            bytes: nd * 2 + (N.div_ceil(BIAS_ROWS_PER_CHUNK) * D * 4 * 2 + D * 8) as u64,
            flops: 0,
            run: Box::new(move || bias_backward(gpu, &mut db, &dy, N, D)),
        });
    }
    // DINO head on every token: L2 norm of the bottleneck, weight norm of the last layer.
    {
        let nb = (N * BOTTLENECK) as u64;
        let x = bench_bf16(gpu, N * BOTTLENECK)?;
        let mut y = gpu.pool().alloc::<bf16>(N * BOTTLENECK)?;
        let mut norms = gpu.pool().alloc::<f32>(N)?;
        cases.push(BenchCase {
            name: format!("l2norm_forward {N}x{BOTTLENECK}"),
            bytes: nb * 2 * 2 + (N * 4) as u64,
            flops: 0,
            run: Box::new(move || l2norm_forward(gpu, &mut y, &mut norms, &x, N, BOTTLENECK)),
        });
        let x = bench_bf16(gpu, N * BOTTLENECK)?;
        let dy = bench_bf16(gpu, N * BOTTLENECK)?;
        let norms: Buf<f32> = gpu.pool().upload(&vec![1.0f32; N])?;
        let mut dx = bench_bf16(gpu, N * BOTTLENECK)?;
        cases.push(BenchCase {
            name: format!("l2norm_backward {N}x{BOTTLENECK}"),
            bytes: nb * 2 * 4 + (N * 4) as u64,
            flops: 0,
            run: Box::new(move || l2norm_backward(gpu, &mut dx, &dy, &x, &norms, N, BOTTLENECK)),
        });
        let kb = (K * BOTTLENECK) as u64;
        let v = bench_f32(gpu, K * BOTTLENECK)?;
        let mut w = gpu.pool().alloc::<bf16>(K * BOTTLENECK)?;
        let mut row_norms = gpu.pool().alloc::<f32>(K)?;
        cases.push(BenchCase {
            name: format!("weight_norm_forward {K}x{BOTTLENECK}"),
            bytes: kb * (4 + 2) + (K * 4) as u64,
            flops: 0,
            run: Box::new(move || {
                weight_norm_forward(gpu, &mut w, &mut row_norms, &v, K, BOTTLENECK)
            }),
        });
        let v = bench_f32(gpu, K * BOTTLENECK)?;
        let dw = bench_f32(gpu, K * BOTTLENECK)?;
        let row_norms: Buf<f32> = gpu.pool().upload(&vec![1.0f32; K])?;
        let mut dv = bench_f32(gpu, K * BOTTLENECK)?;
        cases.push(BenchCase {
            name: format!("weight_norm_backward {K}x{BOTTLENECK}"),
            bytes: kb * 4 * 4 + (K * 4) as u64,
            flops: 0,
            run: Box::new(move || {
                weight_norm_backward(gpu, &mut dv, &dw, &v, &row_norms, K, BOTTLENECK)
            }),
        });
    }
    // Residual add with drop path.
    {
        let mask = gpu.pool().upload(&drop_mask(B))?;
        let mut x = bench_bf16(gpu, N * D)?;
        let branch = bench_bf16(gpu, N * D)?;
        cases.push(BenchCase {
            name: format!("residual_add_scaled {B}x{T}x{D}"),
            bytes: nd * 2 * 3 + (B * 4) as u64,
            flops: 0,
            run: Box::new(move || residual_add_scaled(gpu, &mut x, &branch, &mask, B, T * D)),
        });
        let mask = gpu.pool().upload(&drop_mask(B))?;
        let dx = bench_bf16(gpu, N * D)?;
        let mut dbranch = bench_bf16(gpu, N * D)?;
        cases.push(BenchCase {
            name: format!("residual_add_scaled_backward {B}x{T}x{D}"),
            bytes: nd * 2 * 3 + (B * 4) as u64,
            flops: 0,
            run: Box::new(move || {
                residual_add_scaled_backward(gpu, &mut dbranch, &dx, &mask, B, T * D)
            }),
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layernorm_backward_shared_memory_fits_without_opt_in() {
        for d in [1, 40, 77, 384, 768, 1000, 1024, 1536, 4096, LN_MAX_DIM] {
            let warps = ln_backward_warps(d);
            assert!((1..=8).contains(&warps), "d {d}: {warps} warps");
            assert!(warps * 2 * d * 4 <= LN_SHARED_BYTES, "d {d}: shared memory");
        }
        assert_eq!(ln_backward_warps(384), 8);
        assert_eq!(ln_backward_warps(768), 8);
        assert_eq!(ln_backward_warps(1000), 6);
    }

    #[test]
    fn layernorm_backward_takes_the_vectorised_kernel_only_where_it_can_run() {
        assert_eq!(ln_backward_vectors(384, &[0, 256, 1024]), Some(3));
        assert_eq!(ln_backward_vectors(768, &[8]), Some(6));
        assert_eq!(ln_backward_vectors(40, &[8]), Some(1));
        assert_eq!(ln_backward_vectors(132, &[8]), Some(2));
        assert_eq!(
            ln_backward_vectors(77, &[0]),
            None,
            "width not a multiple of 4"
        );
        assert_eq!(ln_backward_vectors(772, &[0]), None, "wider than 768");
        assert_eq!(
            ln_backward_vectors(384, &[0, 4]),
            None,
            "a row pointer 4-byte aligned"
        );
    }

    #[test]
    fn launch_shapes_cover_the_work() {
        let cfg = warp_per_row(301);
        assert_eq!(cfg.block_dim.0, 256);
        assert!(cfg.grid_dim.0 as usize * WARP_ROWS >= 301);
        assert_eq!(block_per_row(5, 77).block_dim.0, 96);
        assert_eq!(block_per_row(5, 3000).block_dim.0, 256);
        assert_eq!(block_per_row(5, 1).block_dim.0, 32);
        let (cfg, chunks) = row_chunks_by_columns(200, 600);
        assert_eq!(chunks, 4);
        assert_eq!(cfg.grid_dim, (4, 3, 1));
        let cfg = per_sample(3, 300_001);
        assert_eq!(cfg.grid_dim, (1024, 3, 1));
        assert_eq!(per_sample(5, 77).grid_dim, (1, 5, 1));
    }

    #[test]
    fn offset_rows_have_means_away_from_zero() {
        let mut inp = Inputs::new(1, 0);
        let x = offset_rows(&mut inp, 50, 77);
        for row in x.chunks(77) {
            let m = row.iter().sum::<f32>() / 77.0;
            assert!(m.abs() > 0.1, "row mean {m}");
        }
    }
}
