//! Launchers for `kernels/optim.cu`: the optimiser side of a training step over the flat
//! parameter buffer, in the CPU step's order (`train::step`): last-layer freeze
//! ([`cancel_last_layer_grads`]), gradient norm and non-finite flag ([`grad_norm`]),
//! clipping ([`clip_global_norm`] or [`clip_per_tensor`]), AdamW ([`DeviceAdamW::step`]),
//! teacher EMA ([`ema_update`]); plus [`round_bf16`] for the bf16 weight copy at start-up.
//! CPU twins: [`crate::optim`] and [`crate::train::step::SplitAdamW`].
//!
//! Nothing here waits on the host: the norm, the clipping factor and the skip decision stay
//! on the device. A step the CPU would skip (non-finite loss or gradient) is skipped on the
//! device too: AdamW and the EMA take an optional device flag ([`ScalarRef`], e.g.
//! [`GradNorm::skip`]) and change nothing, step counts included, when it is nonzero.
//!
//! Exactness: AdamW and the EMA are the CPU twins bit for bit (same f64 / f32 operations in
//! the same order, no fused multiply-adds; see the kernel file's header); the norms are
//! summed in f64 in a fixed, different order, so they agree with the CPU to ~1e-16 before
//! the final rounding to f32.
//!
//! The decay mask is uploaded as one byte per element ([`upload_decay_mask`]): 1 where
//! [`ParamTable::decay_mask`] is 1. It costs 1 byte of the 31 that AdamW moves per
//! element, and needs no search for the tensor an element belongs to.
//!
//! Alignment: [`Pool`](super::pool::Pool) blocks are 256-byte aligned, so whole-buffer
//! kernels use float4 accesses and a scalar tail; AdamW works on a sub-range (the last
//! layer may be frozen) and falls back to scalar accesses when the range start is not
//! 16-byte aligned (never for a [`ParamTable`], whose tensors start on 16 elements).

use std::ops::Range;

use half::bf16;

use super::bench::BenchCase;
use super::check::{
    compare, download_bf16, download_f32, poisoned_bf16, poisoned_f32, round_bf16 as round_host,
    Inputs, KernelCheck, Outcome, BF16_BOUND, FP32_BOUND,
};
use super::context::{blocks, grid_for, Arg, Gpu};
use super::pool::Buf;
use crate::error::Result;
use crate::model::config::{Arch, HeadConfig};
use crate::model::params::ParamTable;
use crate::model::vit::Network;
use crate::optim::{AdamW, OptimConfig, LAST_LAYER_PREFIX};
use crate::train::step::SplitAdamW;

/// The kernel file's stem.
const MODULE: &str = "optim";
/// Threads per block of the elementwise and reduction kernels.
const THREADS: u32 = 256;
/// Most blocks of the first stage of [`grad_norm`]: one wave of 256-thread blocks on an
/// H100 (132 SMs x 8). Fixed (the grid depends on the length only), so the sum is
/// deterministic on every card.
const NORM_BLOCKS: usize = 1024;
/// Elements per chunk of [`clip_per_tensor`] (one block each); the CPU's chunk size.
const CLIP_CHUNK: usize = 1 << 14;
/// f64 scalars per AdamW part (`ADAMW_SCALARS` in the kernel file).
const ADAMW_SCALARS: usize = 9;

/// Threads for `n` elements when float4 accesses are used (`vec4`): one per four elements
/// and one per tail element; otherwise one per element (the kernels' item mapping).
fn items(n: usize, vec4: bool) -> usize {
    if vec4 {
        n / 4 + n % 4
    } else {
        n
    }
}

/// A launch of one thread per item, 256 per block.
fn elementwise(items: usize) -> cudarc::driver::LaunchConfig {
    assert!(
        items.div_ceil(THREADS as usize) < i32::MAX as usize,
        "{items} items exceed one grid"
    );
    grid_for(items, THREADS)
}

/// Whether `ptr` is a multiple of `bytes`.
fn aligned(ptr: u64, bytes: u64) -> bool {
    ptr % bytes == 0
}

/// One f32 in device memory, read by a kernel: a skip flag (nonzero: skip) or a loss.
#[derive(Clone, Copy)]
pub struct ScalarRef<'a> {
    buf: &'a Buf<f32>,
    index: usize,
}

impl<'a> ScalarRef<'a> {
    /// Element `index` of `buf`.
    ///
    /// # Panics
    /// If `index` is out of `buf`.
    pub fn new(buf: &'a Buf<f32>, index: usize) -> ScalarRef<'a> {
        assert!(
            index < buf.len(),
            "scalar {index} of a buffer of {}",
            buf.len()
        );
        ScalarRef { buf, index }
    }

    fn ptr(&self) -> u64 {
        self.buf.ptr_at(self.index)
    }
}

/// The device address of an optional scalar; 0 (a null pointer) when absent.
fn opt_ptr(x: Option<ScalarRef<'_>>) -> u64 {
    x.map_or(0, |s| s.ptr())
}

// ---- decay mask and the bf16 copy ----------------------------------------------------------

/// A 0/1 f32 decay mask ([`ParamTable::decay_mask`]) as the bytes `adamw_step` reads.
///
/// # Panics
/// On a value other than 0 or 1 (the kernel only knows decay or no decay).
pub fn decay_mask_bytes(mask: &[f32]) -> Vec<u8> {
    mask.iter()
        .map(|&x| match x {
            0.0 => 0,
            1.0 => 1,
            _ => panic!("decay mask value {x}: only 0 and 1 are allowed"),
        })
        .collect()
}

/// `table`'s decay mask on the device, one byte per element (1: weight decay applies).
pub fn upload_decay_mask(gpu: &Gpu, table: &ParamTable) -> Result<Buf<u8>> {
    gpu.pool().upload(&decay_mask_bytes(&table.decay_mask()))
}

/// `y = bf16(x)` (round to nearest even), the bf16 weight copy the forward reads; needed at
/// start-up and after a restore, since [`DeviceAdamW::step`] and [`ema_update`] only keep it
/// current. Twin: [`crate::cuda::check::round_bf16`] (`half`'s conversion).
pub fn round_bf16(gpu: &Gpu, x: &Buf<f32>, y: &mut Buf<bf16>) -> Result<()> {
    assert_eq!(x.len(), y.len(), "round_bf16: lengths differ");
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: (x, y, n) as the kernel declares; both buffers hold n elements and, as pool
    // blocks, are 16-byte aligned.
    unsafe {
        gpu.launch(
            MODULE,
            "round_bf16",
            elementwise(items(n, true)),
            &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::U64(n as u64)],
        )
    }
}

/// Zeroes `x[range]`.
fn zero_range(gpu: &Gpu, x: &mut Buf<f32>, range: Range<usize>) -> Result<()> {
    assert!(
        range.start <= range.end && range.end <= x.len(),
        "zero {range:?} of {}",
        x.len()
    );
    let n = range.len();
    if n == 0 {
        return Ok(());
    }
    let p = x.ptr_at(range.start);
    let vec4 = aligned(p, 16);
    // SAFETY: (x, n, vec4) as declared; x + [0, n) lies in the buffer; vec4 only if aligned.
    unsafe {
        gpu.launch(
            MODULE,
            "cancel_grads_zero",
            elementwise(items(n, vec4)),
            &[Arg::Ptr(p), Arg::U64(n as u64), Arg::I32(i32::from(vec4))],
        )
    }
}

/// Zeroes the gradients of the head's last layer while `epoch < freeze_epochs` and says
/// whether it did: the device twin of [`crate::optim::cancel_last_layer_grads`]. Then pass
/// `frozen = true` to [`DeviceAdamW::step`].
pub fn cancel_last_layer_grads(
    gpu: &Gpu,
    grads: &mut Buf<f32>,
    table: &ParamTable,
    epoch: usize,
    freeze_epochs: usize,
) -> Result<bool> {
    assert_eq!(grads.len(), table.total(), "gradients and table differ");
    if epoch >= freeze_epochs {
        return Ok(false);
    }
    let mut any = false;
    for t in table
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(LAST_LAYER_PREFIX))
    {
        zero_range(gpu, grads, t.range())?;
        any = true;
    }
    Ok(any)
}

// ---- AdamW -------------------------------------------------------------------------------

/// The device twin of [`SplitAdamW`]: AdamW's moments over the whole flat buffer, and the
/// step counts of its two parts (everything before the last layer, and the last layer,
/// which the freeze leaves alone) on the device, so that a step skipped on the device does
/// not count. Per step and part, `adamw_prepare` (one thread) counts the step and computes
/// the bias corrections in f64 exactly as [`AdamW::step`]; `adamw_step` then updates the
/// weights, moments and the weights' bf16 copy in one pass.
pub struct DeviceAdamW {
    /// First moment, the parameters' layout.
    pub m: Buf<f32>,
    /// Second moment, the parameters' layout.
    pub v: Buf<f32>,
    /// Step counts `[main, last layer]` (each [`AdamW::step`]).
    pub steps: Buf<u64>,
    /// Per part, the [`ADAMW_SCALARS`] f64 values of its last step.
    scalars: Buf<f64>,
    /// Where the last layer starts.
    pub split: usize,
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

impl DeviceAdamW {
    /// Fresh state (zero moments, no step) for a buffer of `len` whose last layer starts at
    /// `split`, with `cfg`'s betas and epsilon.
    pub fn new(gpu: &Gpu, len: usize, split: usize, cfg: &OptimConfig) -> Result<DeviceAdamW> {
        assert!(split <= len, "split {split} past a buffer of {len}");
        let mut m = gpu.pool().alloc::<f32>(len)?;
        let mut v = gpu.pool().alloc::<f32>(len)?;
        zero_range(gpu, &mut m, 0..len)?;
        zero_range(gpu, &mut v, 0..len)?;
        Ok(DeviceAdamW {
            m,
            v,
            steps: gpu.pool().upload(&[0u64, 0])?,
            scalars: gpu.pool().alloc::<f64>(2 * ADAMW_SCALARS)?,
            split,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
        })
    }

    /// A copy of the CPU state (e.g. restored from a checkpoint).
    ///
    /// # Panics
    /// If the two parts have different betas or epsilon (SplitAdamW gives them one config).
    pub fn from_host(gpu: &Gpu, host: &SplitAdamW) -> Result<DeviceAdamW> {
        let (a, b) = (&host.main, &host.last);
        assert!(
            a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.eps == b.eps,
            "the two AdamW parts must share betas and eps"
        );
        Ok(DeviceAdamW {
            m: gpu.pool().upload(&host.m())?,
            v: gpu.pool().upload(&host.v())?,
            steps: gpu.pool().upload(&[a.step, b.step])?,
            scalars: gpu.pool().alloc::<f64>(2 * ADAMW_SCALARS)?,
            split: host.split,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
        })
    }

    /// The state as the CPU holds it (for checkpoints and comparisons); waits for the GPU.
    pub fn to_host(&self) -> Result<SplitAdamW> {
        let (m, v, steps) = (self.m.to_vec()?, self.v.to_vec()?, self.steps.to_vec()?);
        let s = self.split;
        let part = |r: Range<usize>, step| AdamW {
            m: m[r.clone()].to_vec(),
            v: v[r].to_vec(),
            step,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
        };
        Ok(SplitAdamW {
            main: part(0..s, steps[0]),
            last: part(s..m.len(), steps[1]),
            split: s,
        })
    }

    /// One update of `params` (f32 master weights) and their bf16 copy `params_bf16`, as
    /// [`SplitAdamW::step`]: with `frozen` the last layer is left alone (weights, moments,
    /// step count). `mask` is [`upload_decay_mask`]'s. With `skip` nonzero on the device
    /// nothing changes.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut Buf<f32>,
        params_bf16: &mut Buf<bf16>,
        grads: &Buf<f32>,
        lr: f32,
        wd: f32,
        mask: &Buf<u8>,
        frozen: bool,
        skip: Option<ScalarRef<'_>>,
    ) -> Result<()> {
        let n = self.m.len();
        assert!(
            params.len() == n
                && params_bf16.len() == n
                && grads.len() == n
                && mask.len() == n
                && self.v.len() == n,
            "AdamW: params, bf16 copy, grads, mask and moments must have one layout"
        );
        let skip = opt_ptr(skip);
        self.part(
            gpu,
            0,
            0..self.split,
            params,
            params_bf16,
            grads,
            lr,
            wd,
            mask,
            skip,
        )?;
        if !frozen {
            let r = self.split..n;
            self.part(gpu, 1, r, params, params_bf16, grads, lr, wd, mask, skip)?;
        }
        Ok(())
    }

    /// Part `k` (0: main, 1: last layer) over `range`: prepare, then the elementwise pass.
    #[allow(clippy::too_many_arguments)]
    fn part(
        &mut self,
        gpu: &Gpu,
        k: usize,
        range: Range<usize>,
        params: &mut Buf<f32>,
        params_bf16: &mut Buf<bf16>,
        grads: &Buf<f32>,
        lr: f32,
        wd: f32,
        mask: &Buf<u8>,
        skip: u64,
    ) -> Result<()> {
        let scalars = self.scalars.ptr_at(k * ADAMW_SCALARS);
        // SAFETY: (step, s, skip, lr, wd, b1, b2, eps) as declared: steps holds 2 u64,
        // scalars 2 * ADAMW_SCALARS f64; skip is null or one f32 (ScalarRef); one thread.
        unsafe {
            gpu.launch(
                MODULE,
                "adamw_prepare",
                blocks(1, 1),
                &[
                    Arg::Ptr(self.steps.ptr_at(k)),
                    Arg::Ptr(scalars),
                    Arg::Ptr(skip),
                    Arg::F32(lr),
                    Arg::F32(wd),
                    Arg::F64(self.beta1),
                    Arg::F64(self.beta2),
                    Arg::F64(self.eps),
                ],
            )?;
        }
        let n = range.len();
        if n == 0 {
            return Ok(());
        }
        let at = range.start;
        let (p, pb, g, mk) = (
            params.ptr_at(at),
            params_bf16.ptr_at(at),
            grads.ptr_at(at),
            mask.ptr_at(at),
        );
        let (m, v) = (self.m.ptr_at(at), self.v.ptr_at(at));
        let vec4 = [p, g, m, v].iter().all(|&x| aligned(x, 16)) && aligned(pb, 8) && aligned(mk, 4);
        // SAFETY: (p, p_bf16, g, mask, m, v, n, vec4, scalars, skip) as declared; every
        // pointer + [0, n) lies in its buffer (lengths checked in step); vec4 only when
        // aligned; the scalars were written by the prepare launch just before, on the
        // same stream.
        unsafe {
            gpu.launch(
                MODULE,
                "adamw_step",
                elementwise(items(n, vec4)),
                &[
                    Arg::Ptr(p),
                    Arg::Ptr(pb),
                    Arg::Ptr(g),
                    Arg::Ptr(mk),
                    Arg::Ptr(m),
                    Arg::Ptr(v),
                    Arg::U64(n as u64),
                    Arg::I32(i32::from(vec4)),
                    Arg::Ptr(scalars),
                    Arg::Ptr(skip),
                ],
            )
        }
    }
}

// ---- teacher EMA ---------------------------------------------------------------------------

/// `teacher = momentum * teacher + (1 - momentum) * student` over the whole buffer, in f32
/// as [`crate::optim::ema_update`] (bit for bit), and the teacher's bf16 copy. With `skip`
/// nonzero on the device nothing changes.
pub fn ema_update(
    gpu: &Gpu,
    teacher: &mut Buf<f32>,
    teacher_bf16: &mut Buf<bf16>,
    student: &Buf<f32>,
    momentum: f32,
    skip: Option<ScalarRef<'_>>,
) -> Result<()> {
    let n = teacher.len();
    assert!(
        student.len() == n && teacher_bf16.len() == n,
        "teacher, its bf16 copy and student must have one layout"
    );
    if n == 0 {
        return Ok(());
    }
    let one_minus = 1.0 - momentum;
    // SAFETY: (t, t_bf16, s, n, momentum, one_minus, skip) as declared; whole pool blocks
    // of n elements, 16-byte aligned; skip null or one f32.
    unsafe {
        gpu.launch(
            MODULE,
            "ema_update",
            elementwise(items(n, true)),
            &[
                Arg::Ptr(teacher.ptr()),
                Arg::Ptr(teacher_bf16.ptr()),
                Arg::Ptr(student.ptr()),
                Arg::U64(n as u64),
                Arg::F32(momentum),
                Arg::F32(one_minus),
                Arg::Ptr(opt_ptr(skip)),
            ],
        )
    }
}

// ---- gradient norm and clipping -----------------------------------------------------------

/// Index in [`GradNorm::stats`] of the L2 norm of the gradients ([`crate::optim::l2_norm`]).
pub const STAT_NORM: usize = 0;
/// Index in [`GradNorm::stats`] of the non-finite flag, 1 when a gradient is NaN or
/// infinite ([`crate::optim::has_non_finite`]).
pub const STAT_NON_FINITE: usize = 1;
/// Index in [`GradNorm::stats`] of the skip flag: 1 when the CPU step would skip (the flag
/// above, a non-finite norm, or a non-finite loss).
pub const STAT_SKIP: usize = 2;

/// What [`grad_norm`] writes, on the device, with its scratch.
pub struct GradNorm {
    partial: Buf<f64>,
    partial_flag: Buf<u32>,
    /// The sum of squares of the gradients in f64 (one value), which
    /// [`clip_global_norm`] reads.
    pub sumsq: Buf<f64>,
    /// `[norm, non-finite, skip]`, see [`STAT_NORM`], [`STAT_NON_FINITE`], [`STAT_SKIP`].
    pub stats: Buf<f32>,
}

/// [`GradNorm::stats`] on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradNormStats {
    /// L2 norm of the gradients before clipping.
    pub norm: f32,
    /// Whether a gradient was NaN or infinite.
    pub non_finite: bool,
    /// Whether the step was skipped.
    pub skip: bool,
}

impl GradNorm {
    /// Buffers for one norm at a time.
    pub fn new(gpu: &Gpu) -> Result<GradNorm> {
        Ok(GradNorm {
            partial: gpu.pool().alloc(NORM_BLOCKS)?,
            partial_flag: gpu.pool().alloc(NORM_BLOCKS)?,
            sumsq: gpu.pool().alloc(1)?,
            stats: gpu.pool().alloc(3)?,
        })
    }

    /// The skip flag, for [`DeviceAdamW::step`] and [`ema_update`].
    pub fn skip(&self) -> ScalarRef<'_> {
        ScalarRef::new(&self.stats, STAT_SKIP)
    }

    /// The stats on the host (waits for the GPU).
    pub fn read(&self) -> Result<GradNormStats> {
        let s = self.stats.to_vec()?;
        Ok(GradNormStats {
            norm: s[STAT_NORM],
            non_finite: s[STAT_NON_FINITE] != 0.0,
            skip: s[STAT_SKIP] != 0.0,
        })
    }
}

/// Blocks of [`grad_norm`]'s first stage for `n` elements.
fn norm_blocks(n: usize) -> usize {
    n.div_ceil(4 * THREADS as usize).clamp(1, NORM_BLOCKS)
}

/// The L2 norm of `grads` ([`crate::optim::l2_norm`]: f64 sum, f32 result), whether any
/// gradient is NaN or infinite ([`crate::optim::has_non_finite`]), and whether the step must
/// be skipped, also when `loss` (optional, on the device) is not finite. Deterministic: a
/// fixed grid of f64 partial sums, then one block adds them in a fixed order.
pub fn grad_norm(
    gpu: &Gpu,
    grads: &Buf<f32>,
    loss: Option<ScalarRef<'_>>,
    out: &mut GradNorm,
) -> Result<()> {
    let n = grads.len();
    let g = norm_blocks(n);
    // SAFETY: (g, n, partial, partial_flag) as declared; grads is a 16-byte aligned pool
    // block of n elements; g <= NORM_BLOCKS partials of each kind.
    unsafe {
        gpu.launch(
            MODULE,
            "grad_norm_partial",
            blocks(g, THREADS),
            &[
                Arg::Ptr(grads.ptr()),
                Arg::U64(n as u64),
                Arg::Ptr(out.partial.ptr()),
                Arg::Ptr(out.partial_flag.ptr()),
            ],
        )?;
    }
    // SAFETY: (partial, partial_flag, count, loss, sumsq, stats) as declared: g partials
    // written above, loss null or one f32, sumsq 1 f64, stats 3 f32; one block.
    unsafe {
        gpu.launch(
            MODULE,
            "grad_norm_finish",
            blocks(1, THREADS),
            &[
                Arg::Ptr(out.partial.ptr()),
                Arg::Ptr(out.partial_flag.ptr()),
                Arg::I32(g as i32),
                Arg::Ptr(opt_ptr(loss)),
                Arg::Ptr(out.sumsq.ptr()),
                Arg::Ptr(out.stats.ptr()),
            ],
        )
    }
}

/// Clips `grads` to a global L2 norm of `max_norm` with the norm [`grad_norm`] left on the
/// device: when it exceeds `max_norm`, every gradient is scaled by
/// `(f32)(max_norm / (norm + 1e-6))` in f64, as [`crate::optim::clip_global_norm`].
pub fn clip_global_norm(
    gpu: &Gpu,
    grads: &mut Buf<f32>,
    norm: &GradNorm,
    max_norm: f32,
) -> Result<()> {
    let n = grads.len();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: (g, n, sumsq, max_norm) as declared; grads a 16-byte aligned pool block of n.
    unsafe {
        gpu.launch(
            MODULE,
            "clip_scale",
            elementwise(items(n, true)),
            &[
                Arg::Ptr(grads.ptr()),
                Arg::U64(n as u64),
                Arg::Ptr(norm.sumsq.ptr()),
                Arg::F32(max_norm),
            ],
        )
    }
}

/// The chunks of per-tensor clipping: `(chunks, first_chunk)` where chunk `c` is
/// `chunks[2c]` = first element, `chunks[2c + 1]` = length | tensor << 32 (length at most
/// [`CLIP_CHUNK`]), and tensor `t` owns chunks `first_chunk[t]..first_chunk[t + 1]`.
fn clip_chunks(table: &ParamTable) -> (Vec<u64>, Vec<u32>) {
    let mut chunks = Vec::new();
    let mut first = vec![0u32];
    for (t, info) in table.tensors().iter().enumerate() {
        let r = info.range();
        let mut at = r.start;
        while at < r.end {
            let len = (r.end - at).min(CLIP_CHUNK);
            chunks.push(at as u64);
            chunks.push(len as u64 | ((t as u64) << 32));
            at += len;
        }
        let count = u32::try_from(chunks.len() / 2).expect("chunk count fits u32");
        first.push(count);
    }
    (chunks, first)
}

/// The device side of per-tensor clipping for one [`ParamTable`]: the chunks (made once),
/// scratch, and every tensor's norm before the last clipping.
pub struct TensorClipPlan {
    chunks: Buf<u64>,
    first_chunk: Buf<u32>,
    partial: Buf<f64>,
    scales: Buf<f32>,
    /// Every tensor's L2 norm before the last [`clip_per_tensor`], in table order.
    pub norms: Buf<f32>,
    n_chunks: usize,
    total: usize,
}

impl TensorClipPlan {
    /// The plan for buffers laid out by `table`.
    pub fn new(gpu: &Gpu, table: &ParamTable) -> Result<TensorClipPlan> {
        let (chunks, first) = clip_chunks(table);
        let n_chunks = chunks.len() / 2;
        assert!(
            n_chunks < i32::MAX as usize && table.tensors().len() < i32::MAX as usize,
            "too many tensors or chunks for one grid"
        );
        Ok(TensorClipPlan {
            chunks: gpu.pool().upload(&chunks)?,
            first_chunk: gpu.pool().upload(&first)?,
            partial: gpu.pool().alloc(n_chunks)?,
            scales: gpu.pool().alloc(table.tensors().len())?,
            norms: gpu.pool().alloc(table.tensors().len())?,
            n_chunks,
            total: table.total(),
        })
    }
}

/// Clips each tensor separately, as [`crate::optim::clip_per_tensor`] (DINO's official
/// code): `coef = max_norm / (norm + 1e-6)` in f64, the tensor scaled by `(f32) coef` when
/// `coef < 1`; padding untouched. The norms stay in [`TensorClipPlan::norms`].
pub fn clip_per_tensor(
    gpu: &Gpu,
    grads: &mut Buf<f32>,
    plan: &mut TensorClipPlan,
    max_norm: f32,
) -> Result<()> {
    assert_eq!(
        grads.len(),
        plan.total,
        "gradients and plan differ in layout"
    );
    let tensors = plan.norms.len();
    if tensors == 0 {
        return Ok(());
    }
    if plan.n_chunks > 0 {
        // SAFETY: (g, chunks, partial) as declared; every chunk lies in grads (built from
        // the table whose total is grads' length); one block per chunk.
        unsafe {
            gpu.launch(
                MODULE,
                "tensor_sumsq",
                blocks(plan.n_chunks, THREADS),
                &[
                    Arg::Ptr(grads.ptr()),
                    Arg::Ptr(plan.chunks.ptr()),
                    Arg::Ptr(plan.partial.ptr()),
                ],
            )?;
        }
    }
    // SAFETY: (partial, first_chunk, max_norm, norms, scales) as declared: first_chunk has
    // tensors + 1 entries, norms and scales `tensors`; one warp per tensor.
    unsafe {
        gpu.launch(
            MODULE,
            "tensor_clip_scales",
            blocks(tensors, 32),
            &[
                Arg::Ptr(plan.partial.ptr()),
                Arg::Ptr(plan.first_chunk.ptr()),
                Arg::F32(max_norm),
                Arg::Ptr(plan.norms.ptr()),
                Arg::Ptr(plan.scales.ptr()),
            ],
        )?;
    }
    if plan.n_chunks > 0 {
        // SAFETY: (g, chunks, scales) as declared; as tensor_sumsq.
        unsafe {
            gpu.launch(
                MODULE,
                "tensor_clip_apply",
                blocks(plan.n_chunks, THREADS),
                &[
                    Arg::Ptr(grads.ptr()),
                    Arg::Ptr(plan.chunks.ptr()),
                    Arg::Ptr(plan.scales.ptr()),
                ],
            )?;
        }
    }
    Ok(())
}

// ---- checks --------------------------------------------------------------------------------

/// This family's parity checks.
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "adamw_step",
            run: check_adamw,
        },
        KernelCheck {
            name: "ema_update",
            run: check_ema,
        },
        KernelCheck {
            name: "round_bf16",
            run: check_round_bf16,
        },
        KernelCheck {
            name: "grad_norm",
            run: check_grad_norm,
        },
        KernelCheck {
            name: "clip_global_norm",
            run: check_clip_global,
        },
        KernelCheck {
            name: "clip_per_tensor",
            run: check_clip_per_tensor,
        },
        KernelCheck {
            name: "cancel_last_layer_grads",
            run: check_cancel,
        },
    ]
}

/// A 0/1 mask drawn per element.
fn random_mask(inputs: &mut Inputs, n: usize) -> Vec<f32> {
    (0..n).map(|_| inputs.below(2) as f32).collect()
}

/// Four steps of DeviceAdamW against SplitAdamW from a random restored state (the last
/// layer frozen for the first two), then a step with the skip flag set, which must change
/// nothing. The split is odd, so the main part runs the float4 path with a 3-element tail
/// and the last layer the scalar path. Bit-identical by construction; FP32_BOUND.
fn check_adamw(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let (n, split) = (300_001, 250_003);
    let cfg = OptimConfig::default();
    let mut p_cpu = inputs.normal(n, 0.05);
    let mask = random_mask(inputs, n);
    let m0 = inputs.normal(n, 1e-3);
    let v0 = inputs.uniform(n, 1e-8, 1e-5);
    let mut host = SplitAdamW::from_state(m0, v0, (7, 0), split, &cfg)?;
    let mut dev = DeviceAdamW::from_host(gpu, &host)?;
    let mut p = gpu.pool().upload(&p_cpu)?;
    let mut p_bf16 = poisoned_bf16(gpu, n)?;
    let mask_dev = gpu.pool().upload(&decay_mask_bytes(&mask))?;
    for k in 0..4 {
        let g_host: Vec<f32> = inputs
            .normal(n, 0.01)
            .iter()
            .zip(inputs.uniform(n, 0.1, 3.0))
            .map(|(g, s)| g * s)
            .collect();
        let g = gpu.pool().upload(&g_host)?;
        let (lr, wd, frozen) = (1e-3 * (k + 1) as f32, 0.04 + 0.1 * k as f32, k < 2);
        host.step(&mut p_cpu, &g_host, lr, wd, &mask, frozen);
        dev.step(
            gpu,
            &mut p,
            &mut p_bf16,
            &g,
            lr,
            wd,
            &mask_dev,
            frozen,
            None,
        )?;
    }
    let flag = gpu.pool().upload(&[1.0f32])?;
    let g = gpu.pool().upload(&inputs.normal(n, 0.01))?;
    let skip = Some(ScalarRef::new(&flag, 0));
    dev.step(
        gpu,
        &mut p,
        &mut p_bf16,
        &g,
        1e-3,
        0.1,
        &mask_dev,
        false,
        skip,
    )?;

    let got = dev.to_host()?;
    let steps = [host.main.step as f32, host.last.step as f32];
    let got_steps = [got.main.step as f32, got.last.step as f32];
    Ok(vec![
        compare("adamw_step: params", &download_f32(&p)?, &p_cpu, FP32_BOUND),
        compare(
            "adamw_step: params bf16",
            &download_bf16(&p_bf16)?,
            &round_host(&p_cpu),
            BF16_BOUND,
        ),
        compare("adamw_step: m", &got.m(), &host.m(), FP32_BOUND),
        compare("adamw_step: v", &got.v(), &host.v(), FP32_BOUND),
        compare("adamw_step: step counts", &got_steps, &steps, FP32_BOUND),
    ])
}

/// Two EMA updates (momenta 0.996 and 0.5) and one with the skip flag set, against
/// optim::ema_update; n = 300003 exercises the scalar tail. Bit-identical: FP32_BOUND.
fn check_ema(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let n = 300_003;
    let mut t_cpu = inputs.normal(n, 0.05);
    let s_cpu: Vec<f32> = t_cpu
        .iter()
        .zip(inputs.normal(n, 0.01))
        .map(|(t, d)| t + d)
        .collect();
    let mut t = gpu.pool().upload(&t_cpu)?;
    let mut t_bf16 = poisoned_bf16(gpu, n)?;
    let s = gpu.pool().upload(&s_cpu)?;
    let flag = gpu.pool().upload(&[1.0f32])?;
    for (momentum, skip) in [(0.996f32, false), (0.3, true), (0.5, false)] {
        let skip_ref = skip.then(|| ScalarRef::new(&flag, 0));
        ema_update(gpu, &mut t, &mut t_bf16, &s, momentum, skip_ref)?;
        if !skip {
            crate::optim::ema_update(&mut t_cpu, &s_cpu, momentum);
        }
    }
    Ok(vec![
        compare(
            "ema_update: teacher",
            &download_f32(&t)?,
            &t_cpu,
            FP32_BOUND,
        ),
        compare(
            "ema_update: teacher bf16",
            &download_bf16(&t_bf16)?,
            &round_host(&t_cpu),
            BF16_BOUND,
        ),
    ])
}

/// The bf16 copy against half's conversion: both round to nearest even, so they agree
/// exactly (FP32_BOUND rather than BF16_BOUND: the rounding itself is under test).
fn check_round_bf16(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let n = 300_003;
    let x_cpu = inputs.normal(n, 1.0);
    let x = gpu.pool().upload(&x_cpu)?;
    let mut y = poisoned_bf16(gpu, n)?;
    round_bf16(gpu, &x, &mut y)?;
    Ok(vec![compare(
        "round_bf16",
        &download_bf16(&y)?,
        &round_host(&x_cpu),
        FP32_BOUND,
    )])
}

/// grad_norm's outputs, stats poisoned before the launch.
fn run_grad_norm(gpu: &Gpu, grads: &[f32], loss: Option<f32>) -> Result<(Vec<f32>, f64)> {
    let g = gpu.pool().upload(grads)?;
    let loss_buf = loss.map(|l| gpu.pool().upload(&[l])).transpose()?;
    let mut out = GradNorm::new(gpu)?;
    out.stats = poisoned_f32(gpu, 3)?;
    out.sumsq = gpu.pool().upload(&[f64::NAN])?;
    grad_norm(
        gpu,
        &g,
        loss_buf.as_ref().map(|b| ScalarRef::new(b, 0)),
        &mut out,
    )?;
    Ok((out.stats.to_vec()?, out.sumsq.to_vec()?[0]))
}

/// The CPU's `[norm, non-finite, skip]` for `grads` and `loss`.
fn cpu_norm_stats(grads: &[f32], loss: Option<f32>) -> Vec<f32> {
    let norm = crate::optim::l2_norm(grads);
    let bad = crate::optim::has_non_finite(grads);
    let skip = bad || !norm.is_finite() || loss.is_some_and(|l| !l.is_finite());
    vec![norm, f32::from(u8::from(bad)), f32::from(u8::from(skip))]
}

/// Bound on the relative difference of two f64 sums of the same 300001 non-negative terms
/// in different orders: each is within ~(terms added in sequence) x 2^-53 of the exact sum,
/// at most ~2e-12 here (the CPU adds 16384 per chunk, then 19 chunks; the GPU ~300 per
/// thread, then trees). Tight enough that one element left out (~3e-6 of the sum) fails,
/// which the f32 norm alone would not show under FP32_BOUND.
const SUMSQ_BOUND: f64 = 1e-10;

/// compare's measure for one f64 value, without rounding it to f32 first.
fn compare_f64(name: &str, gpu: f64, cpu: f64, bound: f64) -> Outcome {
    let err = if gpu == cpu {
        0.0
    } else {
        (gpu - cpu).abs() / cpu.abs().max(f64::MIN_POSITIVE)
    };
    Outcome {
        name: name.to_string(),
        elements: 1,
        // NaN (a NaN sum) counts as infinite error.
        max_rel_err: if err.is_nan() { f64::INFINITY } else { err },
        bound,
        worst: Some((0, gpu, cpu)),
    }
}

/// The norm (f64 sums in another order: ~1e-16 apart before rounding to f32, so FP32_BOUND
/// is loose), the non-finite flag and the skip flag: clean gradients, a NaN loss, one
/// injected NaN, one infinity in the scalar tail.
fn check_grad_norm(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let n = 300_001;
    let grads: Vec<f32> = inputs
        .normal(n, 0.01)
        .iter()
        .zip(inputs.uniform(n, 0.1, 10.0))
        .map(|(g, s)| g * s)
        .collect();
    let sumsq: f64 = grads.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let mut with_nan = grads.clone();
    with_nan[inputs.below(n)] = f32::NAN;
    let mut with_inf = grads.clone();
    with_inf[n - 1] = f32::INFINITY;
    let mut out = Vec::new();
    let cases: [(&str, &[f32], Option<f32>); 4] = [
        ("clean", &grads, Some(1.5)),
        ("NaN loss", &grads, Some(f32::NAN)),
        ("one NaN", &with_nan, None),
        ("one inf", &with_inf, None),
    ];
    for (what, g, loss) in cases {
        let (stats, gpu_sumsq) = run_grad_norm(gpu, g, loss)?;
        let cpu = cpu_norm_stats(g, loss);
        // The flags apart from the norm: an infinite norm would set compare's scale to
        // infinity and hide a wrong flag.
        out.push(compare(
            format!("grad_norm ({what}): norm"),
            &stats[..1],
            &cpu[..1],
            FP32_BOUND,
        ));
        out.push(compare(
            format!("grad_norm ({what}): [non-finite, skip]"),
            &stats[1..],
            &cpu[1..],
            FP32_BOUND,
        ));
        if what == "clean" {
            out.push(compare_f64(
                "grad_norm: sum of squares (f64)",
                gpu_sumsq,
                sumsq,
                SUMSQ_BOUND,
            ));
        }
    }
    Ok(out)
}

/// Global clipping above the limit (every gradient scaled) and below it (none touched).
/// The factor comes from a differently ordered f64 sum: at most 1 ulp apart, FP32_BOUND.
fn check_clip_global(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let n = 300_001;
    let grads = inputs.normal(n, 0.05); // norm ~ 27
    let mut out = Vec::new();
    for max_norm in [3.0f32, 1e3] {
        let mut cpu = grads.clone();
        let cpu_norm = crate::optim::clip_global_norm(&mut cpu, max_norm);
        let mut g = gpu.pool().upload(&grads)?;
        let mut norm = GradNorm::new(gpu)?;
        norm.stats = poisoned_f32(gpu, 3)?;
        grad_norm(gpu, &g, None, &mut norm)?;
        clip_global_norm(gpu, &mut g, &norm, max_norm)?;
        out.push(compare(
            format!("clip_global_norm (max {max_norm}): grads"),
            &download_f32(&g)?,
            &cpu,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("clip_global_norm (max {max_norm}): norm"),
            &[norm.read()?.norm],
            &[cpu_norm],
            FP32_BOUND,
        ));
    }
    Ok(out)
}

/// A table of odd-sized tensors (padding between them, tensors of one element and of
/// several chunks), the head's last layer last.
fn odd_table() -> ParamTable {
    let mut t = ParamTable::new();
    t.push("a.weight", &[37, 5]);
    t.push("a.bias", &[37]);
    t.push("b.weight", &[129, 300]);
    t.push("c", &[1]);
    t.push("d.weight", &[5, 6554]);
    t.push("e.bias", &[7]);
    t.push("f.weight", &[250, 401]);
    t.push(format!("{LAST_LAYER_PREFIX}.weight_v"), &[300, 31]);
    t
}

/// Per-tensor clipping on the odd table, tensor norms spread around the limit so that some
/// tensors clip and some do not; the padding holds random values that must survive.
/// FP32_BOUND as for the global clip.
fn check_clip_per_tensor(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let table = odd_table();
    let mut grads = inputs.normal(table.total(), 1.0);
    for info in table.tensors() {
        let target = 10f32.powf(inputs.uniform(1, -1.5, 1.0)[0]);
        let s = target / (info.len() as f32).sqrt();
        grads[info.range()].iter_mut().for_each(|x| *x *= s);
    }
    let max_norm = 1.0;
    let mut cpu = grads.clone();
    let cpu_norms = crate::optim::clip_per_tensor(&mut cpu, &table, max_norm);
    let mut g = gpu.pool().upload(&grads)?;
    let mut plan = TensorClipPlan::new(gpu, &table)?;
    plan.norms = poisoned_f32(gpu, table.tensors().len())?;
    clip_per_tensor(gpu, &mut g, &mut plan, max_norm)?;
    Ok(vec![
        compare(
            "clip_per_tensor: grads",
            &download_f32(&g)?,
            &cpu,
            FP32_BOUND,
        ),
        compare(
            "clip_per_tensor: norms",
            &download_f32(&plan.norms)?,
            &cpu_norms,
            FP32_BOUND,
        ),
    ])
}

/// The freeze during epoch 0 (the last layer zeroed) and after it (nothing touched).
fn check_cancel(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let table = odd_table();
    let grads = inputs.normal(table.total(), 0.01);
    let mut out = Vec::new();
    for epoch in [0, 1] {
        let mut cpu = grads.clone();
        let cpu_did = crate::optim::cancel_last_layer_grads(&mut cpu, &table, epoch, 1);
        let mut g = gpu.pool().upload(&grads)?;
        let did = cancel_last_layer_grads(gpu, &mut g, &table, epoch, 1)?;
        out.push(compare(
            format!("cancel_last_layer_grads (epoch {epoch}): grads"),
            &download_f32(&g)?,
            &cpu,
            FP32_BOUND,
        ));
        out.push(compare(
            format!("cancel_last_layer_grads (epoch {epoch}): returned"),
            &[f32::from(u8::from(did))],
            &[f32::from(u8::from(cpu_did))],
            FP32_BOUND,
        ));
    }
    Ok(out)
}

// ---- benches -------------------------------------------------------------------------------

/// `n` values of N(0, std^2): a 2^20 random block repeated (drawing 10^8 values would cost
/// more host time than the bench).
fn tiled_normal(inputs: &mut Inputs, n: usize, std: f32) -> Vec<f32> {
    let block = inputs.normal(n.min(1 << 20), std);
    block.iter().copied().cycle().take(n).collect()
}

/// This family's benchmark cases, on the flat buffer of ViT-S/16 at 224 with DINO's head
/// (K = 65536): the table's total, about 43.6M elements.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    let net = Network::new(Arch::Small.vit(16, 3, 224), HeadConfig::dino(65536))?;
    let table = &net.table;
    let n = table.total();
    let split = table.info(&format!("{LAST_LAYER_PREFIX}.weight_v")).offset;
    let mut inputs = Inputs::new(0, 0);
    let params = tiled_normal(&mut inputs, n, 0.02);
    let grads = tiled_normal(&mut inputs, n, 1e-3);
    let shape = format!("ViT-S/16 + DINO head, n={n}");
    let nb = n as u64;
    let mut cases = Vec::new();

    // AdamW: both parts, as an unfrozen step. Per element: params, m, v read and written
    // (24 B), grads read (4), mask read (1), bf16 copy written (2).
    {
        let mut adam = DeviceAdamW::new(gpu, n, split, &OptimConfig::default())?;
        let mut p = gpu.pool().upload(&params)?;
        let mut pb = gpu.pool().alloc::<bf16>(n)?;
        let g = gpu.pool().upload(&grads)?;
        let mask = upload_decay_mask(gpu, table)?;
        cases.push(BenchCase {
            name: format!("adamw_step (prepare + step, 2 parts) {shape}"),
            bytes: 31 * nb,
            flops: 0,
            run: Box::new(move || {
                adam.step(gpu, &mut p, &mut pb, &g, 5e-4, 0.04, &mask, false, None)
            }),
        });
    }
    // EMA: teacher read and written (8 B), student read (4), bf16 copy written (2).
    {
        let mut t = gpu.pool().upload(&params)?;
        let mut tb = gpu.pool().alloc::<bf16>(n)?;
        let s = gpu.pool().upload(&grads)?;
        cases.push(BenchCase {
            name: format!("ema_update {shape}"),
            bytes: 14 * nb,
            flops: 0,
            run: Box::new(move || ema_update(gpu, &mut t, &mut tb, &s, 0.996, None)),
        });
    }
    // Norm: grads read once (4 B).
    {
        let g = gpu.pool().upload(&grads)?;
        let mut out = GradNorm::new(gpu)?;
        cases.push(BenchCase {
            name: format!("grad_norm (partial + finish) {shape}"),
            bytes: 4 * nb,
            flops: 0,
            run: Box::new(move || grad_norm(gpu, &g, None, &mut out)),
        });
    }
    // Global clip with the norm above the limit: grads read and written (8 B).
    {
        let mut g = gpu.pool().upload(&grads)?;
        let mut norm = GradNorm::new(gpu)?;
        grad_norm(gpu, &g, None, &mut norm)?;
        cases.push(BenchCase {
            name: format!("clip_global_norm (clip_scale) {shape}"),
            bytes: 8 * nb,
            flops: 0,
            run: Box::new(move || clip_global_norm(gpu, &mut g, &norm, 1e-3)),
        });
    }
    // Per-tensor clip with every tensor over the limit (a limit of 1e-30): grads read for
    // the norms (4 B), then read and written (8 B).
    {
        let mut g = gpu.pool().upload(&grads)?;
        let mut plan = TensorClipPlan::new(gpu, table)?;
        cases.push(BenchCase {
            name: format!("clip_per_tensor (sumsq + scales + apply) {shape}"),
            bytes: 12 * nb,
            flops: 0,
            run: Box::new(move || clip_per_tensor(gpu, &mut g, &mut plan, 1e-30)),
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Stream};

    /// The kernel's `powi_like_host`, in Rust.
    fn powi_mirror(mut a: f64, b: i32) -> f64 {
        let recip = b < 0;
        let mut e = b.unsigned_abs();
        let mut r = 1.0;
        loop {
            if e & 1 == 1 {
                r *= a;
            }
            e >>= 1;
            if e == 0 {
                break;
            }
            a *= a;
        }
        if recip {
            1.0 / r
        } else {
            r
        }
    }

    #[test]
    fn powi_mirror_is_f64_powi() {
        for b in [0.9, 0.999, 0.99, 0.95, 0.5, 0.123_456_789] {
            let ts = (1..20_000).chain([65_535, 1 << 20, 123_456_789, i32::MAX]);
            for t in ts {
                assert_eq!(powi_mirror(b, t).to_bits(), b.powi(t).to_bits(), "{b}^{t}");
            }
        }
    }

    /// adamw_prepare + adamw_one, operation for operation, in Rust.
    fn kernel_mirror(
        p: &mut [f32],
        g: &[f32],
        mask: &[u8],
        m: &mut [f32],
        v: &mut [f32],
        step: &mut u64,
        (lr, wd, b1, b2, eps): (f32, f32, f64, f64, f64),
    ) {
        *step += 1;
        let t = i32::try_from(*step).unwrap_or(i32::MAX);
        let (omb1, omb2) = (1.0 - b1, 1.0 - b2);
        let step_size = f64::from(lr) / (1.0 - powi_mirror(b1, t));
        let bc2_sqrt = (1.0 - powi_mirror(b2, t)).sqrt();
        let lr_wd = f64::from(lr) * f64::from(wd);
        let keep = [1.0 - lr_wd * 0.0, 1.0 - lr_wd * 1.0];
        for i in 0..p.len() {
            let gd = f64::from(g[i]);
            let mut x = f64::from(p[i]) * keep[usize::from(mask[i])];
            let m1 = b1 * f64::from(m[i]) + omb1 * gd;
            let v1 = b2 * f64::from(v[i]) + omb2 * gd * gd;
            m[i] = m1 as f32;
            v[i] = v1 as f32;
            let denom = f64::from(v[i]).sqrt() / bc2_sqrt + eps;
            x -= step_size * f64::from(m[i]) / denom;
            p[i] = x as f32;
        }
    }

    #[test]
    fn kernel_formulas_are_adamw_step_bit_for_bit() {
        let n = 5000;
        let mut rng = Stream::new(3, [0, 0, 0], Purpose::Init);
        let mut draw = |s: f32| (0..n).map(|_| rng.normal() * s).collect::<Vec<f32>>();
        let p0 = draw(0.05);
        let m0 = draw(1e-3);
        let v0: Vec<f32> = draw(1e-3).iter().map(|x| x * x).collect();
        let mask: Vec<f32> = draw(1.0).iter().map(|&x| f32::from(x > 0.0)).collect();
        let mask_b = decay_mask_bytes(&mask);
        let mut cpu = AdamW::from_state(m0.clone(), v0.clone(), 41).expect("state");
        cpu.beta2 = 0.99;
        let (mut p_cpu, mut p_k, mut m_k, mut v_k, mut step_k) = (p0.clone(), p0, m0, v0, 41);
        for k in 0..6 {
            let g = draw(0.01);
            let (lr, wd) = (1e-3 * (k + 1) as f32, 0.04 * (k + 1) as f32);
            cpu.step(&mut p_cpu, &g, lr, wd, &mask);
            let h = (lr, wd, cpu.beta1, cpu.beta2, cpu.eps);
            kernel_mirror(&mut p_k, &g, &mask_b, &mut m_k, &mut v_k, &mut step_k, h);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p_k), bits(&p_cpu));
        assert_eq!(bits(&m_k), bits(&cpu.m));
        assert_eq!(bits(&v_k), bits(&cpu.v));
        assert_eq!(step_k, cpu.step);
    }

    #[test]
    fn clip_chunks_cover_every_tensor_once() {
        let table = odd_table();
        let (chunks, first) = clip_chunks(&table);
        assert_eq!(first.len(), table.tensors().len() + 1);
        for (t, info) in table.tensors().iter().enumerate() {
            let mut at = info.offset;
            for c in first[t] as usize..first[t + 1] as usize {
                let (start, w) = (chunks[2 * c] as usize, chunks[2 * c + 1]);
                let (len, tensor) = ((w & 0xffff_ffff) as usize, (w >> 32) as usize);
                assert_eq!((start, tensor), (at, t));
                assert!(len > 0 && len <= CLIP_CHUNK);
                at += len;
            }
            assert_eq!(at, info.range().end, "{}", info.name);
        }
        assert_eq!(first[3] - first[2], 3, "b.weight (38700) takes 3 chunks");
    }

    #[test]
    fn decay_mask_bytes_are_the_mask() {
        assert_eq!(decay_mask_bytes(&[0.0, 1.0, 1.0, 0.0]), vec![0, 1, 1, 0]);
        let table = odd_table();
        let mask = table.decay_mask();
        let bytes = decay_mask_bytes(&mask);
        assert!(bytes.iter().zip(&mask).all(|(&b, &m)| f32::from(b) == m));
    }

    #[test]
    #[should_panic(expected = "only 0 and 1")]
    fn decay_mask_bytes_refuse_fractions() {
        decay_mask_bytes(&[0.5]);
    }

    #[test]
    fn item_counts_cover_every_element() {
        for n in [0, 1, 3, 4, 5, 1023, 300_001] {
            assert_eq!(items(n, false), n);
            let v = items(n, true);
            assert_eq!(4 * (n / 4) + (v - n / 4), n);
        }
        assert_eq!(norm_blocks(0), 1);
        assert_eq!(norm_blocks(1), 1);
        assert_eq!(norm_blocks(1025), 2);
        assert_eq!(norm_blocks(1 << 30), NORM_BLOCKS);
    }
}
