//! Launchers for `kernels/attention.cu`: fused (flash-style) multi-head self-attention, the
//! GPU twins of [`crate::cpu::attention::attention_forward`] and
//! [`crate::cpu::attention::attention_backward`] (timm's `softmax(q k^T * hd^-0.5) v` per
//! head, no mask, `qkv` in timm's `(B, N, 3D)` layout, the output heads concatenated).
//!
//! Unlike the twins, nothing here holds the `(B, H, N, N)` probabilities: the forward keeps a
//! running max and sum per row (online softmax) and saves only the natural log-sum-exp of
//! each row, `lse (B, H, N)` fp32; the backward recomputes the probabilities from `q`, `k`
//! and `lse`. Storage is bf16 (`qkv`, `out`, `dout`, `dqkv`) with fp32 arithmetic.
//!
//! **`dqkv` is overwritten**, not accumulated into as the CPU twin does: it is a fresh
//! intermediate that only attention produces (the `qkv` Linear's backward reads it), so
//! overwriting saves a read of `(B, N, 3D)` and the memset before it. Every element is
//! written.
//!
//! Head dims 16, 32 and 64 have kernels (one per direction and head dim); any other is a
//! [`crate::error::Error::BadConfig`] on `model.heads`. Launches: one block of 128 threads
//! per (64-row tile, image, head), all heads and images of a batch in one 1-D grid; the
//! backward is two launches, dQ (which also writes the row sums `D_i = dO_i . O_i` to a
//! pool scratch) then dK/dV, with no atomics, so results repeat bit for bit.
//!
//! Two variants ([`Variant`]): the tensor-core kernels (`mma.sync`, bf16 operands, fp32
//! accumulation; the default), which round the probabilities and `dS` to bf16 before their
//! products as FlashAttention does, and the CUDA-core kernels (fp32 products;
//! `PWSELF_ATTENTION=simt`). On an H200 the tensor-core kernels ran 2.2 to 4.3 times faster
//! (bench/results/2026-11-26-gpu-H200-summary.md). `check-kernels` checks both.
//!
//! Accuracy: `D_i` comes from the bf16 `out` (as in FlashAttention), where the twin's
//! `rowsum(P * dP)` uses the exact output; that moves `dq` and `dk` by up to about 2e-3 of
//! their largest element, an absolute error that the checks judge against the gradient's
//! scale (see `check_backward`).
//!
//! What this module must not do: materialise anything `N x N` in device memory, or change
//! the twins' semantics other than the documented overwrite of `dqkv`.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::bench::BenchCase;
use super::check::{
    compare, compare_to_scale, download_bf16, download_f32, poisoned_bf16, poisoned_f32,
    round_bf16, to_bf16, Inputs, KernelCheck, Outcome, BF16_BOUND, FP32_BOUND,
};
use super::context::{blocks, Arg, Gpu};
use super::pool::Buf;
use crate::cpu;
use crate::error::{Error, Result};

/// The kernels' module: `kernels/attention.cu`.
const MODULE: &str = "attention";
/// Threads per block of every kernel here (their `__launch_bounds__`).
const THREADS: u32 = 128;
/// Rows (queries, or keys in the dK/dV kernel) one block owns (`ATT_OWN`).
const OWN_ROWS: usize = 64;
/// The head dims the kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Which implementation of the products: the tensor cores (`mma.sync`, the default) or the
/// CUDA cores (fp32 FMA loops; `PWSELF_ATTENTION=simt`), kept as the reference and fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// bf16 tensor-core products, fp32 accumulation (the `*_tc_hd*` kernels).
    TensorCore,
    /// fp32 products on the CUDA cores.
    Simt,
}

impl Variant {
    /// Both, the default first (check-kernels and bench run each).
    pub const ALL: [Variant; 2] = [Variant::TensorCore, Variant::Simt];

    /// The variant `PWSELF_ATTENTION` names (`tc`, the default, or `simt`).
    pub fn from_env() -> Result<Variant> {
        match std::env::var("PWSELF_ATTENTION").as_deref() {
            Err(_) | Ok("") | Ok("tc") => Ok(Variant::TensorCore),
            Ok("simt") => Ok(Variant::Simt),
            Ok(other) => Err(Error::bad_config(
                "PWSELF_ATTENTION",
                format!("{other:?} is not an attention variant: use tc (the default) or simt"),
            )),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::TensorCore => "tc",
            Variant::Simt => "simt",
        }
    }
}

/// The three kernels of one head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kernels {
    hd: usize,
    forward: &'static str,
    dq: &'static str,
    dkv: &'static str,
}

/// The kernels of `variant` for `d / heads`, or the error that names the setting to change.
fn kernels_for(d: usize, heads: usize, variant: Variant) -> Result<Kernels> {
    let hd = d / heads;
    let tc = variant == Variant::TensorCore;
    let (forward, dq, dkv) = match (hd, tc) {
        (16, false) => (
            "attention_forward_hd16",
            "attention_backward_dq_hd16",
            "attention_backward_dkv_hd16",
        ),
        (32, false) => (
            "attention_forward_hd32",
            "attention_backward_dq_hd32",
            "attention_backward_dkv_hd32",
        ),
        (64, false) => (
            "attention_forward_hd64",
            "attention_backward_dq_hd64",
            "attention_backward_dkv_hd64",
        ),
        (16, true) => (
            "attention_forward_tc_hd16",
            "attention_backward_dq_tc_hd16",
            "attention_backward_dkv_tc_hd16",
        ),
        (32, true) => (
            "attention_forward_tc_hd32",
            "attention_backward_dq_tc_hd32",
            "attention_backward_dkv_tc_hd32",
        ),
        (64, true) => (
            "attention_forward_tc_hd64",
            "attention_backward_dq_tc_hd64",
            "attention_backward_dkv_tc_hd64",
        ),
        _ => {
            return Err(Error::bad_config(
                "model.heads",
                format!(
                    "the head dim model.dim / model.heads = {d} / {heads} = {hd} has no CUDA \
                     attention kernel: the kernels take head dims {HEAD_DIMS:?}, so choose \
                     heads (or dim) to make dim / heads one of them, or train with --device cpu"
                ),
            ))
        }
    };
    Ok(Kernels {
        hd,
        forward,
        dq,
        dkv,
    })
}

/// `hd^-0.5` exactly as the CPU twin computes it.
fn softmax_scale(hd: usize) -> f32 {
    (hd as f32).powf(-0.5)
}

/// An `i32` kernel argument.
fn int(what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("attention: {what} = {x} does not fit an i32"))
}

/// One block per (64-row tile, image, head), in one dimension (no 65535 limit on B * H).
fn grid(b: usize, n: usize, heads: usize) -> LaunchConfig {
    let count = n.div_ceil(OWN_ROWS) * b * heads;
    int("blocks", count);
    blocks(count, THREADS)
}

/// The twins' shape asserts, plus the lengths of the GPU-only `lse`.
#[track_caller]
fn check_shapes(name: &str, qkv: usize, lse: usize, b: usize, n: usize, d: usize, heads: usize) {
    assert!(
        heads > 0 && d % heads == 0,
        "{name}: d must be a multiple of heads"
    );
    assert_eq!(qkv, b * n * 3 * d, "{name}: qkv must be (B, N, 3D)");
    assert_eq!(lse, b * heads * n, "{name}: lse must be (B, H, N)");
    int("n", n);
    int("heads", heads);
}

/// The kernels read and write rows with 8- and 16-byte accesses.
#[track_caller]
fn assert_aligned(name: &str, what: &str, ptr: u64) {
    assert_eq!(ptr % 16, 0, "{name}: {what} must be 16-byte aligned");
}

/// Writes the attention output and the per-row log-sum-exp of the scaled scores.
///
/// `softmax(scale * q k^T) v` per (image, head) with `scale = hd^-0.5`, as
/// [`cpu::attention::attention_forward`], but the probabilities are never stored: `lse[b, h,
/// i] = ln sum_j exp(scale * q_i . k_j)` (natural log) is what [`attention_backward`] needs
/// to recompute them. Errors when `d / heads` is not 16, 32 or 64.
// qkv (B, N, 3D) -> out (B, N, D), lse (B, H, N)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    gpu: &Gpu,
    out: &mut Buf<bf16>,
    lse: &mut Buf<f32>,
    qkv: &Buf<bf16>,
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) -> Result<()> {
    attention_forward_with(gpu, out, lse, qkv, (b, n, d, heads), Variant::from_env()?)
}

/// [`attention_forward`] with the given [`Variant`]; `shape` is `(B, N, D, H)`.
pub fn attention_forward_with(
    gpu: &Gpu,
    out: &mut Buf<bf16>,
    lse: &mut Buf<f32>,
    qkv: &Buf<bf16>,
    shape: (usize, usize, usize, usize),
    variant: Variant,
) -> Result<()> {
    const NAME: &str = "attention_forward";
    let (b, n, d, heads) = shape;
    check_shapes(NAME, qkv.len(), lse.len(), b, n, d, heads);
    assert_eq!(out.len(), b * n * d, "{NAME}: out must be (B, N, D)");
    if d == 0 {
        return Ok(());
    }
    let k = kernels_for(d, heads, variant)?;
    if b == 0 || n == 0 {
        return Ok(());
    }
    assert_aligned(NAME, "qkv", qkv.ptr());
    assert_aligned(NAME, "out", out.ptr());
    // SAFETY: out holds B*N*D bf16, lse B*H*N floats and qkv B*N*3D bf16 (checked above);
    // the grid covers ceil(N / 64) tiles of every (image, head), and each block reads rows
    // < N of its image and writes rows < N of its tile only. Arguments match
    // attention_forward_hd*(bf16*, float*, const bf16*, int, int, float).
    unsafe {
        gpu.launch(
            MODULE,
            k.forward,
            grid(b, n, heads),
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(lse.ptr()),
                Arg::Ptr(qkv.ptr()),
                int("n", n).into(),
                int("heads", heads).into(),
                softmax_scale(k.hd).into(),
            ],
        )
    }
}

/// Writes (**overwrites**) the gradient with respect to `qkv` of [`attention_forward`],
/// given its output `out` and `lse`.
///
/// The math of [`cpu::attention::attention_backward`] (`dV = P^T dO`, `dP = dO V^T`,
/// `dS = P * (dP - D)`, `dQ = scale * dS K`, `dK = scale * dS^T Q`) with `P = exp(scale q
/// k^T - lse)` recomputed tile by tile and `D_i = dO_i . O_i` (mathematically the twin's
/// `rowsum(P * dP)`; here from the bf16 `out`, see the module doc on accuracy). The twin accumulates into `dqkv`; this
/// overwrites it (see the module doc). Takes `B * H * N` floats of scratch from the pool.
/// Errors when `d / heads` is not 16, 32 or 64.
// dout (B, N, D), qkv (B, N, 3D), out (B, N, D), lse (B, H, N) -> dqkv (B, N, 3D)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    dqkv: &mut Buf<bf16>,
    dout: &Buf<bf16>,
    qkv: &Buf<bf16>,
    out: &Buf<bf16>,
    lse: &Buf<f32>,
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) -> Result<()> {
    let variant = Variant::from_env()?;
    attention_backward_with(gpu, dqkv, [dout, qkv, out], lse, (b, n, d, heads), variant)
}

/// [`attention_backward`] with the given [`Variant`]; `inputs` are `[dout, qkv, out]` and
/// `shape` is `(B, N, D, H)`.
pub fn attention_backward_with(
    gpu: &Gpu,
    dqkv: &mut Buf<bf16>,
    inputs: [&Buf<bf16>; 3],
    lse: &Buf<f32>,
    shape: (usize, usize, usize, usize),
    variant: Variant,
) -> Result<()> {
    const NAME: &str = "attention_backward";
    let [dout, qkv, out] = inputs;
    let (b, n, d, heads) = shape;
    check_shapes(NAME, qkv.len(), lse.len(), b, n, d, heads);
    assert_eq!(dqkv.len(), b * n * 3 * d, "{NAME}: dqkv must be (B, N, 3D)");
    assert_eq!(dout.len(), b * n * d, "{NAME}: dout must be (B, N, D)");
    assert_eq!(out.len(), b * n * d, "{NAME}: out must be (B, N, D)");
    if d == 0 {
        return Ok(());
    }
    let k = kernels_for(d, heads, variant)?;
    if b == 0 || n == 0 {
        return Ok(());
    }
    for (what, ptr) in [
        ("dqkv", dqkv.ptr()),
        ("dout", dout.ptr()),
        ("qkv", qkv.ptr()),
        ("out", out.ptr()),
    ] {
        assert_aligned(NAME, what, ptr);
    }
    // D_i = dO_i . O_i, (B, H, N): written by the dQ kernel, read by the dK/dV kernel, both on
    // the compute stream, so the block may go back to the pool when this returns.
    let dvec = gpu.pool().alloc::<f32>(b * heads * n)?;
    let scale = softmax_scale(k.hd);
    // SAFETY: dqkv and qkv hold B*N*3D bf16, dout and out B*N*D bf16, lse and dvec B*H*N
    // floats (checked above). Each block touches rows < N of its own image and head only;
    // the dQ kernel writes the q columns of dqkv and dvec, the dK/dV kernel (after it, same
    // stream) the k and v columns. Arguments match attention_backward_dq_hd*(bf16*, float*,
    // const bf16* x3, const float*, int, int, float) and attention_backward_dkv_hd*(bf16*,
    // const bf16* x2, const float* x2, int, int, float).
    unsafe {
        gpu.launch(
            MODULE,
            k.dq,
            grid(b, n, heads),
            &[
                Arg::Ptr(dqkv.ptr()),
                Arg::Ptr(dvec.ptr()),
                Arg::Ptr(dout.ptr()),
                Arg::Ptr(qkv.ptr()),
                Arg::Ptr(out.ptr()),
                Arg::Ptr(lse.ptr()),
                int("n", n).into(),
                int("heads", heads).into(),
                scale.into(),
            ],
        )?;
        gpu.launch(
            MODULE,
            k.dkv,
            grid(b, n, heads),
            &[
                Arg::Ptr(dqkv.ptr()),
                Arg::Ptr(dout.ptr()),
                Arg::Ptr(qkv.ptr()),
                Arg::Ptr(lse.ptr()),
                Arg::Ptr(dvec.ptr()),
                int("n", n).into(),
                int("heads", heads).into(),
                scale.into(),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// (B, N, heads, head dim) of the checks: every head dim, lengths that are multiples of
/// none of the tiles (16, 32, 64), one tile and several, ViT-S/16's 197 tokens at 224 and
/// 37 at 96. About 2 s on the CPU emulator for both checks.
const CHECK_SHAPES: [(usize, usize, usize, usize); 7] = [
    (2, 17, 4, 16),
    (1, 70, 2, 16),
    (1, 50, 2, 32),
    (1, 129, 2, 32),
    (2, 37, 6, 64),
    (1, 101, 3, 64),
    (1, 197, 6, 64),
];

/// `ln sum_j exp(scale * q_i . k_j)` of every (image, head, query), `(B, H, N)`, in f64 from
/// the CPU twin's inputs (an independent reference: the twin keeps only probabilities).
fn lse_reference(qkv: &[f32], b: usize, n: usize, d: usize, heads: usize) -> Vec<f32> {
    let hd = d / heads;
    let scale = f64::from(softmax_scale(hd));
    let mut lse = Vec::with_capacity(b * heads * n);
    let mut scores = vec![0.0f64; n];
    for bi in 0..b {
        let rows = &qkv[bi * n * 3 * d..(bi + 1) * n * 3 * d];
        for h in 0..heads {
            for i in 0..n {
                let q = &rows[i * 3 * d + h * hd..][..hd];
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &rows[j * 3 * d + d + h * hd..][..hd];
                    *s = scale
                        * q.iter()
                            .zip(k)
                            .map(|(&x, &y)| f64::from(x) * f64::from(y))
                            .sum::<f64>();
                }
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let sum: f64 = scores.iter().map(|&s| (s - max).exp()).sum();
                lse.push((max + sum.ln()) as f32);
            }
        }
    }
    lse
}

/// The gradient of `qkv`, `(B, N, 3D)`, in f64 as the kernels define it: `D_i = dO_i . O_i`
/// with `O` = `out` as given (the bf16 output the GPU stores), the probabilities from f64
/// scores.
#[allow(clippy::too_many_arguments)]
fn backward_reference(
    qkv: &[f32],
    dout: &[f32],
    out: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
) -> Vec<f32> {
    let hd = d / heads;
    let scale = f64::from(softmax_scale(hd));
    let mut grad = vec![0.0f64; b * n * 3 * d];
    let mut p = vec![0.0f64; n * n];
    let mut ds = vec![0.0f64; n * n];
    let dot = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    };
    for bi in 0..b {
        let rows = &qkv[bi * n * 3 * d..(bi + 1) * n * 3 * d];
        let q = |i: usize, h: usize| &rows[i * 3 * d + h * hd..][..hd];
        let k = |j: usize, h: usize| &rows[j * 3 * d + d + h * hd..][..hd];
        let v = |j: usize, h: usize| &rows[j * 3 * d + 2 * d + h * hd..][..hd];
        let go = |i: usize, h: usize| &dout[(bi * n + i) * d + h * hd..][..hd];
        let o = |i: usize, h: usize| &out[(bi * n + i) * d + h * hd..][..hd];
        for h in 0..heads {
            for i in 0..n {
                let row = &mut p[i * n..(i + 1) * n];
                for (j, s) in row.iter_mut().enumerate() {
                    *s = scale * dot(q(i, h), k(j, h));
                }
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                row.iter_mut().for_each(|s| *s = (*s - max).exp());
                let sum: f64 = row.iter().sum();
                row.iter_mut().for_each(|s| *s /= sum);
                let di = dot(go(i, h), o(i, h));
                for j in 0..n {
                    ds[i * n + j] = p[i * n + j] * (dot(go(i, h), v(j, h)) - di);
                }
            }
            for i in 0..n {
                for j in 0..n {
                    let g = &mut grad[(bi * n) * 3 * d..];
                    for c in 0..hd {
                        g[i * 3 * d + h * hd + c] += scale * ds[i * n + j] * f64::from(k(j, h)[c]);
                        g[j * 3 * d + d + h * hd + c] +=
                            scale * ds[i * n + j] * f64::from(q(i, h)[c]);
                        g[j * 3 * d + 2 * d + h * hd + c] += p[i * n + j] * f64::from(go(i, h)[c]);
                    }
                }
            }
        }
    }
    grad.iter().map(|&x| x as f32).collect()
}

/// Columns `[part * d, (part + 1) * d)` of every `3d`-wide row: the q (0), k (1) or v (2)
/// block of a `(B, N, 3D)` tensor.
fn qkv_part(x: &[f32], d: usize, part: usize) -> Vec<f32> {
    x.chunks(3 * d)
        .flat_map(|row| row[part * d..(part + 1) * d].iter().copied())
        .collect()
}

fn shape_name(b: usize, n: usize, heads: usize, hd: usize) -> String {
    format!("B{b} N{n} H{heads} hd{hd}")
}

/// The forward against the twin: `out` within the bf16 bound, `lse` against the f64
/// log-sum-exp of the same scores within the fp32 bound (it is computed and stored fp32).
fn check_forward(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for variant in Variant::ALL {
        outcomes.extend(check_forward_variant(gpu, inp, variant)?);
    }
    Ok(outcomes)
}

fn check_forward_variant(gpu: &Gpu, inp: &mut Inputs, variant: Variant) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for &(b, n, heads, hd) in &CHECK_SHAPES {
        let d = heads * hd;
        let qkv = round_bf16(&inp.normal(b * n * 3 * d, 1.0));
        let mut want_out = vec![0.0f32; b * n * d];
        let mut probs = vec![0.0f32; b * heads * n * n];
        cpu::attention::attention_forward(&mut want_out, &mut probs, &qkv, b, n, d, heads);
        let want_lse = lse_reference(&qkv, b, n, d, heads);

        let qkv_gpu = gpu.pool().upload(&to_bf16(&qkv))?;
        let mut out = poisoned_bf16(gpu, b * n * d)?;
        let mut lse = poisoned_f32(gpu, b * heads * n)?;
        attention_forward_with(gpu, &mut out, &mut lse, &qkv_gpu, (b, n, d, heads), variant)?;
        let name = format!(
            "attention_forward[{}] {}",
            variant.label(),
            shape_name(b, n, heads, hd)
        );
        outcomes.push(match variant {
            Variant::Simt => compare(
                format!("{name}: out"),
                &download_bf16(&out)?,
                &want_out,
                BF16_BOUND,
            ),
            Variant::TensorCore => compare_to_scale(
                format!("{name}: out (error / max |out|)"),
                &download_bf16(&out)?,
                &want_out,
                TC_BOUND,
            ),
        });
        outcomes.push(compare(
            format!("{name}: lse"),
            &download_f32(&lse)?,
            &want_lse,
            FP32_BOUND,
        ));
    }
    Ok(outcomes)
}

/// The tensor-core kernels' bound, against the output's scale: they round the probabilities
/// (and dS) to bf16 before the products, which moves an output element by about
/// `2^-9 |p|_2 |v|`, up to a few 1e-3 of the largest element, wherever the element itself
/// lies (so the elementwise measure, with its floor at 1e-3 of the largest, does not apply).
/// A wrong index or a lost tile moves elements by a large part of the scale.
const TC_BOUND: f64 = 1e-2;

/// The backward, twice per shape.
///
/// Inputs: the twin's forward output rounded to bf16 (what the GPU stores) and the f64
/// log-sum-exp as `lse`, so the check does not depend on the forward kernel. The twin
/// accumulates into a zero `dqkv`; the GPU overwrites a poisoned one (an element it does not
/// write fails), so both hold the gradient itself.
///
/// 1. Against [`backward_reference`] (f64, with the kernels' `D_i = dO_i . O_i` on the bf16
///    `out`): every output elementwise within the bf16 bound. This is the exactness check.
/// 2. Against the CPU twin, whose `D_i = rowsum(P * dP)` is `dO_i . O_i` with the exact
///    `O_i`: `dv` (which does not involve `D`) elementwise within the bf16 bound; `dq` and
///    `dk` within the bf16 bound measured against the gradient's scale
///    ([`compare_to_scale`]). Rounding `O` to bf16 moves `D_i` by about `2^-9 |dO_i| |O_i|`,
///    which shifts `dq_i` by `scale * dD_i * (P k)_i` and `dk` likewise: an absolute error of
///    2e-4 to 2e-3 of the largest gradient (measured with f64 on these shapes, largest at
///    small N where `|O|` is largest), no more than the bf16 rounding of the stored
///    gradient's largest elements, but up to 200 times the elementwise measure's floor (1e-5
///    of the largest element) on the elements near zero. FlashAttention's backward has the
///    same property.
fn check_backward(gpu: &Gpu, inp: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for variant in Variant::ALL {
        outcomes.extend(check_backward_variant(gpu, inp, variant)?);
    }
    Ok(outcomes)
}

fn check_backward_variant(gpu: &Gpu, inp: &mut Inputs, variant: Variant) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for &(b, n, heads, hd) in &CHECK_SHAPES {
        let d = heads * hd;
        let qkv = round_bf16(&inp.normal(b * n * 3 * d, 1.0));
        let dout = round_bf16(&inp.normal(b * n * d, 1.0));
        let mut out = vec![0.0f32; b * n * d];
        let mut probs = vec![0.0f32; b * heads * n * n];
        cpu::attention::attention_forward(&mut out, &mut probs, &qkv, b, n, d, heads);
        let out = round_bf16(&out);
        let lse = lse_reference(&qkv, b, n, d, heads);
        let mut want = vec![0.0f32; b * n * 3 * d];
        cpu::attention::attention_backward(&mut want, &dout, &qkv, &probs, b, n, d, heads);
        let exact = backward_reference(&qkv, &dout, &out, b, n, d, heads);

        let mut dqkv = poisoned_bf16(gpu, b * n * 3 * d)?;
        let pool = gpu.pool();
        attention_backward_with(
            gpu,
            &mut dqkv,
            [
                &pool.upload(&to_bf16(&dout))?,
                &pool.upload(&to_bf16(&qkv))?,
                &pool.upload(&to_bf16(&out))?,
            ],
            &pool.upload(&lse)?,
            (b, n, d, heads),
            variant,
        )?;
        let got = download_bf16(&dqkv)?;
        let name = format!(
            "attention_backward[{}] {}",
            variant.label(),
            shape_name(b, n, heads, hd)
        );
        for (part, what) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let got = qkv_part(&got, d, part);
            outcomes.push(match variant {
                Variant::Simt => compare(
                    format!("{name}: {what} (f64, D from bf16 out)"),
                    &got,
                    &qkv_part(&exact, d, part),
                    BF16_BOUND,
                ),
                Variant::TensorCore => compare_to_scale(
                    format!("{name}: {what} (f64, D from bf16 out; error / max |{what}|)"),
                    &got,
                    &qkv_part(&exact, d, part),
                    TC_BOUND,
                ),
            });
            let want = qkv_part(&want, d, part);
            outcomes.push(if what == "dv" && variant == Variant::Simt {
                compare(format!("{name}: {what}"), &got, &want, BF16_BOUND)
            } else {
                compare_to_scale(
                    format!("{name}: {what} (error / max |{what}|)"),
                    &got,
                    &want,
                    BF16_BOUND,
                )
            });
        }
    }
    Ok(outcomes)
}

/// This family's parity checks (`check-kernels --filter attention`).
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "attention_forward",
            run: check_forward,
        },
        KernelCheck {
            name: "attention_backward",
            run: check_backward,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Benches

/// `n` bf16 values in [-1, 1], cheap to make at bench sizes.
fn filler(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i % 100_003) as f32 * 0.618_034).sin()))
        .collect()
}

/// ViT-S/16 attention (dim 384, 6 heads, head dim 64) at the training shapes: batch 64 with
/// 2 global views of 224 (197 tokens) and 8 local views of 96 (37 tokens), and the globals
/// at patch 8 (224 / 8: 785 tokens), forward and backward.
///
/// Flops per (image, head): forward `4 N^2 hd` (`q k^T` and `P V`); backward `10 N^2 hd`,
/// 2.5 times the forward (`dO V^T`, `P^T dO`, `dS K`, `dS^T Q` and the recomputed `q k^T`),
/// the usual FlashAttention count; the kernels execute `14 N^2 hd`, since the dQ and the
/// dK/dV kernels each recompute `q k^T` and `dO V^T`. Bytes: forward reads qkv and writes
/// out and lse; backward reads qkv, dout, out and lse, writes dqkv, and writes and reads
/// the `D` scratch.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    const IMAGES: usize = 64;
    const D: usize = 384;
    const HEADS: usize = 6;
    const HD: usize = D / HEADS;
    let shapes = [
        ("globals 224/16", 2 * IMAGES, 197),
        ("locals 96/16", 8 * IMAGES, 37),
        ("globals 224/8", 2 * IMAGES, 785),
    ];
    let mut cases = Vec::new();
    for (variant, (label, b, n)) in Variant::ALL
        .into_iter()
        .flat_map(|v| shapes.into_iter().map(move |s| (v, s)))
    {
        let tokens = (b * n) as u64;
        let pairs = (b * HEADS) as u64 * (n * n) as u64;
        let forward_flops = 4 * pairs * HD as u64;
        let shape = format!("{b}x{n}x{D} h{HEADS} ({label})");
        let shape4 = (b, n, D, HEADS);

        let qkv = gpu.pool().upload(&filler(b * n * 3 * D))?;
        let mut out = gpu.pool().alloc::<bf16>(b * n * D)?;
        let mut lse = gpu.pool().alloc::<f32>(b * HEADS * n)?;
        cases.push(BenchCase {
            name: format!("attention_forward[{}] {shape}", variant.label()),
            bytes: tokens * (2 * 3 * D + 2 * D + 4 * HEADS) as u64,
            flops: forward_flops,
            run: Box::new(move || {
                attention_forward_with(gpu, &mut out, &mut lse, &qkv, shape4, variant)
            }),
        });

        // The backward's out and lse come from a forward pass, so the recomputed
        // probabilities are those of these inputs.
        let qkv = gpu.pool().upload(&filler(b * n * 3 * D))?;
        let mut out = gpu.pool().alloc::<bf16>(b * n * D)?;
        let mut lse = gpu.pool().alloc::<f32>(b * HEADS * n)?;
        attention_forward_with(gpu, &mut out, &mut lse, &qkv, shape4, variant)?;
        let dout = gpu.pool().upload(&filler(b * n * D))?;
        let mut dqkv = gpu.pool().alloc::<bf16>(b * n * 3 * D)?;
        cases.push(BenchCase {
            name: format!("attention_backward[{}] {shape}", variant.label()),
            bytes: tokens * (2 * (3 * D + D + D + 3 * D) + (4 + 8) * HEADS) as u64,
            flops: 10 * pairs * HD as u64,
            run: Box::new(move || {
                attention_backward_with(gpu, &mut dqkv, [&dout, &qkv, &out], &lse, shape4, variant)
            }),
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_head_dim_has_its_kernels_and_others_are_a_config_error() {
        for hd in HEAD_DIMS {
            for variant in Variant::ALL {
                let k = kernels_for(3 * hd, 3, variant).unwrap();
                assert_eq!(k.hd, hd);
                for name in [k.forward, k.dq, k.dkv] {
                    assert!(name.ends_with(&format!("_hd{hd}")), "{name}");
                    assert_eq!(
                        name.contains("_tc_"),
                        variant == Variant::TensorCore,
                        "{name}"
                    );
                }
            }
        }
        for (d, heads) in [(384, 8), (96, 1), (8, 1), (768, 6)] {
            match kernels_for(d, heads, Variant::TensorCore) {
                Err(Error::BadConfig { field, reason }) => {
                    assert_eq!(field, "model.heads");
                    assert!(reason.contains(&(d / heads).to_string()), "{reason}");
                }
                other => panic!("{d}/{heads}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_backward_reference_matches_the_twin_given_the_exact_output() {
        // With the unrounded output, D_i = dO_i . O_i is the twin's rowsum(P * dP): the f64
        // reference must then agree with the twin to fp32 accuracy.
        let (b, n, heads, hd) = (2, 23, 2, 16);
        let d = heads * hd;
        let mut inp = Inputs::new(1, 0);
        let qkv = inp.normal(b * n * 3 * d, 1.0);
        let dout = inp.normal(b * n * d, 1.0);
        let mut out = vec![0.0f32; b * n * d];
        let mut probs = vec![0.0f32; b * heads * n * n];
        cpu::attention::attention_forward(&mut out, &mut probs, &qkv, b, n, d, heads);
        let mut want = vec![0.0f32; b * n * 3 * d];
        cpu::attention::attention_backward(&mut want, &dout, &qkv, &probs, b, n, d, heads);
        let got = backward_reference(&qkv, &dout, &out, b, n, d, heads);
        let o = compare("reference vs twin", &got, &want, 1e-4);
        assert!(o.passed(), "{o:?}");
    }

    #[test]
    fn the_registries_take_this_familys_entry_points() {
        let _: super::super::bench::BenchFn = benches;
        assert_eq!(checks().len(), 2);
    }

    #[test]
    fn the_grid_has_one_block_per_row_tile_image_and_head() {
        // 197 tokens: 4 tiles of 64; ViT-S globals of a batch of 64: 128 images x 6 heads.
        let cfg = grid(128, 197, 6);
        assert_eq!(cfg.grid_dim, (4 * 128 * 6, 1, 1));
        assert_eq!(cfg.block_dim, (THREADS, 1, 1));
        assert_eq!(grid(1, 64, 1).grid_dim.0, 1);
        assert_eq!(grid(1, 65, 1).grid_dim.0, 2);
    }

    #[test]
    fn the_lse_reference_is_the_log_of_the_softmax_normaliser() {
        // One head of dim 4 (scale 1/2), two tokens: scores 0.5 * q . k by hand.
        let (b, n, d, heads) = (1, 2, 4, 1);
        #[rustfmt::skip]
        let qkv = [
            1.0, 0.0, 0.0, 0.0,   1.0, 1.0, 0.0, 0.0,   0.0, 0.0, 0.0, 0.0,
            0.0, 2.0, 0.0, 0.0,   0.0, 1.0, 0.0, 0.0,   0.0, 0.0, 0.0, 0.0,
        ];
        let lse = lse_reference(&qkv, b, n, d, heads);
        // Row 0: q = e0, k0 = e0 + e1, k1 = e1: scores 0.5, 0. Row 1: q = 2 e1: scores 1, 1.
        let want = [(0.5f64.exp() + 1.0).ln(), (2.0 * 1.0f64.exp()).ln()];
        for (g, w) in lse.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
