//! The PW-Self loss forward and backward of one training batch on the GPU: the twin of
//! [`StepRunner::forward_backward`], composed from [`super::vit`], [`super::head`] and
//! [`super::ce`], plus the two small kernels of `kernels/tokens.cu` ([`gather_rows`],
//! [`scatter_rows`]) that move the matched student tokens between the backbone and the head.
//!
//! Order, as the CPU: the teacher backbone on the global views (concatenated view-major),
//! the teacher head on every one of its tokens (its logits are then `(G, B, T_g, K)`, the
//! layout [`ce::GpuTeacher`] reads); the student backbone on the globals (call 0) and on the
//! locals (call 1), written into one token buffer `[call 0; call 1]`; the matched student
//! tokens gathered in [`StudentLayout::gather_list`] order; the student head on them; the
//! matched cross-entropy; then the head backward, the scatter of its input gradient into a
//! zeroed token gradient, and the student backbone backward of both calls into the flat fp32
//! gradient buffer (zeroed at the start).
//!
//! [`GpuStep::step`] then runs the optimiser side as [`StepRunner::step`] does, from
//! [`super::optim`] and [`ce::update_center`]: last-layer freeze, gradient norm and skip flag,
//! clipping, the split AdamW, the teacher EMA, the bf16 copies, the centre.
//!
//! Stochastic depth: the student's two calls draw the CPU's masks for the step (seed, step,
//! call 0 for the globals and 1 for the locals), so the GPU trains the same objective.

use half::bf16;

use super::blas::Blas;
use super::ce::{self, GpuLayout, GpuStudent, GpuTeacher, TeacherShape};
use super::check::{self, compare, compare_to_scale, Inputs, KernelCheck, Outcome};
use super::context::{grid_for, Arg, Gpu};
use super::head::GpuHead;
use super::layers::ImageElement;
use super::optim::{self, DeviceAdamW, GradNorm, ScalarRef, TensorClipPlan};
use super::pool::{Buf, DevView, DeviceSlice, DeviceSliceMut};
use super::vit::{zero_device, GpuBackbone};
use crate::error::Result;
use crate::loss::{LossConfig, StudentLayout};
use crate::model::vit::{DropPath, Network};
use crate::optim::{ClipMode, OptimConfig, Schedules};
use crate::train::step::{StepRunner, StepStats, Weights};
use crate::views::batch::ViewBatch;
use crate::views::config::ViewConfig;
use crate::views::matching::PairMatches;

/// Threads per block of the row kernels.
const THREADS: u32 = 256;

// ---------------------------------------------------------------------------------------
// Row gather and scatter.

/// Row numbers into a `(rows_total, d)` buffer, on the device, checked on the host against
/// `rows_total` when made (so the kernels never read or write outside that buffer).
pub struct RowIndex {
    dev: Buf<u32>,
    host: Vec<u32>,
    rows_total: usize,
}

impl RowIndex {
    /// Uploads `index`, every entry a row of a buffer of `rows_total` rows.
    ///
    /// # Panics
    /// If an entry is `rows_total` or more, or there are more than `i32::MAX` of them.
    pub fn new(gpu: &Gpu, index: &[u32], rows_total: usize) -> Result<RowIndex> {
        assert!(
            index.iter().all(|&r| (r as usize) < rows_total),
            "RowIndex: a row number is outside the {rows_total} rows"
        );
        assert!(
            index.len() <= i32::MAX as usize,
            "RowIndex: too many rows for one launch"
        );
        // An empty list is uploaded as one unused element (the kernels never read it).
        let dev = if index.is_empty() {
            gpu.pool().upload(&[0u32])?
        } else {
            gpu.pool().upload(index)?
        };
        Ok(RowIndex {
            dev,
            host: index.to_vec(),
            rows_total,
        })
    }

    /// Number of rows listed.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// True when no row is listed.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// Rows of the buffer the entries index.
    pub fn rows_total(&self) -> usize {
        self.rows_total
    }
}

/// Whether every entry of `index` is different.
fn distinct(index: &[u32]) -> bool {
    let mut sorted = index.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).all(|w| w[0] != w[1])
}

/// Shape checks common to both kernels; returns `rows * d`.
fn check_rows(what: &str, gathered: usize, big: usize, index: &RowIndex, d: usize) -> usize {
    assert!(d > 0 && d <= i32::MAX as usize, "{what}: bad row width {d}");
    assert_eq!(
        gathered,
        index.len() * d,
        "{what}: the gathered side must be (rows, d)"
    );
    assert_eq!(
        big,
        index.rows_total * d,
        "{what}: the indexed side must be (rows_total, d)"
    );
    index.len() * d
}

/// Enqueues `gather_rows`: `out[r, :] = src[index[r], :]` (bf16 rows of width `d`; `out`
/// `(rows, d)`, `src` `(rows_total, d)`). One thread per element of `out`. The twin is
/// [`twin::gather_rows`].
///
/// # Panics
/// On lengths that disagree with `index`.
pub fn gather_rows(
    gpu: &Gpu,
    out: &mut impl DeviceSliceMut<bf16>,
    src: &impl DeviceSlice<bf16>,
    index: &RowIndex,
    d: usize,
) -> Result<()> {
    let n = check_rows("gather_rows", out.len(), src.len(), index, d);
    // SAFETY: (out, src, index, rows, d) as the kernel declares; out holds rows * d
    // elements, src rows_total * d, and every index is below rows_total (RowIndex::new).
    unsafe {
        gpu.launch(
            "tokens",
            "gather_rows",
            grid_for(n, THREADS),
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(src.ptr()),
                Arg::Ptr(index.dev.ptr()),
                (index.len() as i32).into(),
                (d as i32).into(),
            ],
        )
    }
}

/// Enqueues `scatter_rows`: `dst[index[r], :] += src[r, :]` (bf16 rows of width `d`, the sum
/// in fp32 rounded once to bf16; `dst` `(rows_total, d)`, `src` `(rows, d)`). No atomics:
/// the indices must be distinct (a [`StudentLayout::gather_list`] has no duplicates), which
/// debug builds assert. The twin is [`twin::scatter_rows`].
///
/// # Panics
/// On lengths that disagree with `index`; in debug builds, on a repeated index.
pub fn scatter_rows(
    gpu: &Gpu,
    dst: &mut impl DeviceSliceMut<bf16>,
    src: &impl DeviceSlice<bf16>,
    index: &RowIndex,
    d: usize,
) -> Result<()> {
    let n = check_rows("scatter_rows", src.len(), dst.len(), index, d);
    debug_assert!(
        distinct(&index.host),
        "scatter_rows: the indices must be distinct (the kernel uses no atomics)"
    );
    // SAFETY: (dst, src, index, rows, d) as the kernel declares; dst holds rows_total * d
    // elements, src rows * d, every index is below rows_total (RowIndex::new), and distinct
    // indices mean no two threads touch the same element.
    unsafe {
        gpu.launch(
            "tokens",
            "scatter_rows",
            grid_for(n, THREADS),
            &[
                Arg::Ptr(dst.ptr()),
                Arg::Ptr(src.ptr()),
                Arg::Ptr(index.dev.ptr()),
                (index.len() as i32).into(),
                (d as i32).into(),
            ],
        )
    }
}

/// The CPU twins of the row kernels, on bf16 values as the kernels store them.
pub mod twin {
    use half::bf16;

    /// `out[r, :] = src[index[r], :]` for rows of width `d`.
    pub fn gather_rows(out: &mut [bf16], src: &[bf16], index: &[u32], d: usize) {
        assert_eq!(
            out.len(),
            index.len() * d,
            "gather_rows: out must be (rows, d)"
        );
        for (row, &i) in out.chunks_exact_mut(d).zip(index) {
            let i = i as usize;
            row.copy_from_slice(&src[i * d..(i + 1) * d]);
        }
    }

    /// `dst[index[r], :] += src[r, :]` for rows of width `d`: each sum in f32, rounded to
    /// bf16 (nearest even), in row order.
    pub fn scatter_rows(dst: &mut [bf16], src: &[bf16], index: &[u32], d: usize) {
        assert_eq!(
            src.len(),
            index.len() * d,
            "scatter_rows: src must be (rows, d)"
        );
        for (row, &i) in src.chunks_exact(d).zip(index) {
            let i = i as usize;
            for (a, g) in dst[i * d..(i + 1) * d].iter_mut().zip(row) {
                *a = bf16::from_f32(a.to_f32() + g.to_f32());
            }
        }
    }
}

/// The row of every gathered student token in the token buffer `[call 0; call 1]` (the
/// globals' `(G * B, T_g)` tokens, then the locals' `(L * B, T_l)`), in
/// [`StudentLayout::gather_list`] order: the CPU's `token_at` of
/// [`StepRunner::forward_backward`] in rows.
pub fn gather_indices(layout: &StudentLayout, globals: usize, t_g: usize, t_l: usize) -> Vec<u32> {
    let b = layout.batch();
    let call1 = globals * b * t_g;
    layout
        .gather_list()
        .map(|(image, view, token)| {
            let (view, token) = (view as usize, token as usize);
            let row = if view < globals {
                (view * b + image) * t_g + token
            } else {
                call1 + ((view - globals) * b + image) * t_l + token
            };
            u32::try_from(row).expect("token rows fit in u32")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The step.

/// What a step needs of a batch besides its pixels.
#[derive(Clone, Copy, Debug)]
pub struct StepBatch<'a> {
    /// The global batch index (the step number).
    pub index: u64,
    /// Images in the batch.
    pub images: usize,
    /// The teacher/student pairs and their matched tokens.
    pub pairs: &'a [PairMatches],
}

impl<'a> StepBatch<'a> {
    /// `batch`'s index, size and pairs.
    pub fn of(batch: &'a ViewBatch) -> StepBatch<'a> {
        StepBatch {
            index: batch.index,
            images: batch.len(),
            pairs: &batch.pairs,
        }
    }
}

/// A batch's views on the device: the globals and (when there are local views) the locals.
pub struct StepViews<'a, T> {
    /// `(G, B, C, S_g, S_g)`.
    pub globals: DevView<'a, T>,
    /// `(L, B, C, S_l, S_l)`; `None` without local views.
    pub locals: Option<DevView<'a, T>>,
}

/// The teacher and student networks on the device and the loss forward and backward of a
/// batch (see the module documentation).
pub struct GpuStep {
    net: Network,
    views: ViewConfig,
    loss: LossConfig,
    steps_per_epoch: u64,
    /// The run's seed (names the stochastic-depth draws).
    seed: u64,
    blas: Blas,
    teacher: GpuBackbone,
    student: GpuBackbone,
    head: GpuHead,
    /// The teacher centre `(T_g, K)` fp32.
    center: Buf<f32>,
    /// The student's gradient, the flat fp32 layout of [`Network::table`].
    grads: Buf<f32>,
    /// The last batch's teacher logits `(G, B, T_g, K)`, for the centre update.
    teacher_logits: Option<Buf<bf16>>,
    /// Clipping, freeze and AdamW settings (the runner's).
    optim: OptimConfig,
    /// The lr, weight decay and teacher momentum per step (the runner's).
    schedules: Schedules,
    /// The student's AdamW state.
    adam: DeviceAdamW,
    /// [`optim::upload_decay_mask`] of the network's table.
    decay_mask: Buf<u8>,
    /// The gradient norm and skip flag of the last step.
    norm: GradNorm,
    /// Per-tensor clipping's plan, made when the configuration asks for it.
    clip_plan: Option<TensorClipPlan>,
}

/// The weights a [`GpuStep`] holds, on the host.
#[derive(Clone, Debug)]
pub struct HostWeights {
    /// The student's fp32 master parameters (the flat layout of [`Network::table`]).
    pub student: Vec<f32>,
    /// The teacher's fp32 master parameters.
    pub teacher: Vec<f32>,
    /// The teacher centre `(T_g, K)`.
    pub center: Vec<f32>,
}

impl GpuStep {
    /// Uploads `w`'s student and teacher parameters (fp32 masters, bf16 copies made on the
    /// device), its AdamW state and its centre, for batches of `runner`'s network, views,
    /// loss, optimiser settings and schedules.
    ///
    pub fn new(gpu: &Gpu, runner: &StepRunner, w: &Weights) -> Result<GpuStep> {
        let net = runner.net.clone();
        let total = net.table.total();
        assert!(
            w.student.len() == total && w.teacher.len() == total,
            "GpuStep::new: weights of another network"
        );
        assert_eq!(
            w.center.len(),
            runner.teacher_tokens() * net.head.out_dim,
            "GpuStep::new: the centre must be (T_g, K)"
        );
        let teacher = GpuBackbone::new(gpu, &net, &w.teacher)?;
        let student = GpuBackbone::new(gpu, &net, &w.student)?;
        let head = GpuHead::new(&net);
        let clip_plan = match runner.optim.clip_mode {
            ClipMode::PerTensor if runner.optim.clip_grad > 0.0 => {
                Some(TensorClipPlan::new(gpu, &net.table)?)
            }
            _ => None,
        };
        assert_eq!(
            w.adam.split,
            runner.last_layer_offset(),
            "GpuStep::new: AdamW state split elsewhere than the last layer"
        );
        Ok(GpuStep {
            views: runner.views.clone(),
            loss: runner.loss.clone(),
            steps_per_epoch: runner.steps_per_epoch,
            seed: runner.seed,
            blas: Blas::new(gpu)?,
            teacher,
            student,
            head,
            center: gpu.pool().upload(&w.center)?,
            grads: gpu.pool().alloc::<f32>(total)?,
            teacher_logits: None,
            optim: runner.optim.clone(),
            schedules: runner.schedules,
            adam: DeviceAdamW::from_host(gpu, &w.adam)?,
            decay_mask: optim::upload_decay_mask(gpu, &net.table)?,
            norm: GradNorm::new(gpu)?,
            clip_plan,
            net,
        })
    }

    /// The gradient of the last [`forward_backward`](Self::forward_backward), fp32, the
    /// flat layout of [`Network::table`].
    pub fn grads(&self) -> &Buf<f32> {
        &self.grads
    }

    /// The teacher logits `(G, B, T_g, K)` of the last batch (for the centre update).
    pub fn teacher_logits(&self) -> Option<&Buf<bf16>> {
        self.teacher_logits.as_ref()
    }

    /// Tokens per global view, `1 + grid^2`.
    fn teacher_tokens(&self) -> usize {
        let g = self.views.grid(0);
        1 + g * g
    }

    /// The loss of `batch` (f64, the row losses summed on the host) and its gradient w.r.t.
    /// the student parameters, left in [`grads`](Self::grads). Changes no weight.
    ///
    /// # Panics
    /// If `batch` was not built with this step's views.
    pub fn forward_backward(&mut self, gpu: &Gpu, batch: &ViewBatch) -> Result<f64> {
        let (ng, nl) = (self.views.global.count, self.views.local.count);
        assert_eq!(
            batch.views.len(),
            ng + nl,
            "GpuStep::forward_backward: the batch has another number of views"
        );
        let globals = gpu.pool().upload(&batch.views[..ng].concat())?;
        let locals = if nl > 0 {
            Some(gpu.pool().upload(&batch.views[ng..].concat())?)
        } else {
            None
        };
        let views = StepViews {
            globals: globals.slice(0..globals.len()),
            locals: locals.as_ref().map(|l| l.slice(0..l.len())),
        };
        self.forward_backward_on(gpu, StepBatch::of(batch), views)
    }

    /// [`forward_backward`](Self::forward_backward) on views already on the device (f32 or
    /// bf16, e.g. from [`super::views::GpuViewBuilder`]): the globals `(G, B, C, S_g, S_g)`
    /// and the locals `(L, B, C, S_l, S_l)`, view-major as [`super::views::ViewLayout`]
    /// lays them out.
    ///
    /// # Panics
    /// If the views do not have the sizes of this step's view configuration for `batch`.
    pub fn forward_backward_on<T: ImageElement>(
        &mut self,
        gpu: &Gpu,
        batch: StepBatch<'_>,
        views: StepViews<'_, T>,
    ) -> Result<f64> {
        let step = batch.index;
        let epoch = step / self.steps_per_epoch.max(1);
        let (b, d, k) = (batch.images, self.net.vit.embed_dim, self.net.head.out_dim);
        let (ng, nl) = (self.views.global.count, self.views.local.count);
        let (gside, lside) = (self.views.global.side, self.views.local.side);
        let c = self.net.vit.in_chans;
        assert_eq!(
            views.globals.len(),
            ng * b * c * gside * gside,
            "GpuStep::forward_backward_on: globals of another size"
        );
        assert_eq!(
            views.locals.as_ref().map_or(0, |l| l.len()),
            nl * b * c * lside * lside,
            "GpuStep::forward_backward_on: locals of another size"
        );
        let t_g = self.teacher_tokens();
        let lg = self.views.grid(ng);
        let t_l = if nl > 0 { 1 + lg * lg } else { 0 };
        let teacher_temp = self.loss.teacher_temp_at(epoch as usize);
        let pool = gpu.pool();
        let blas = &self.blas;
        let globals = &views.globals;

        // Teacher: globals (view-major), no drop path, head on every token.
        let (t_out, t_acts) = self
            .teacher
            .forward(gpu, blas, globals, ng * b, gside, None)?;
        drop(t_acts);
        let t_last = self.head.last_layer(gpu, self.teacher.master())?;
        let (t_logits, t_head) = self.head.forward(
            gpu,
            blas,
            self.teacher.master(),
            &self.teacher.half,
            &t_last,
            &t_out,
            ng * b * t_g,
        )?;
        drop((t_head, t_out, t_last));

        // Student: globals (call 0) and locals (call 1) into one token buffer, with the
        // CPU's stochastic-depth masks for this step.
        let drop_path = |call| {
            Some(DropPath {
                seed: self.seed,
                step,
                call,
            })
        };
        let (n0, n1) = (ng * b * t_g, nl * b * t_l);
        let mut tokens = pool.alloc::<bf16>((n0 + n1) * d)?;
        let s_acts0 = self.student.forward_into(
            gpu,
            blas,
            &mut tokens.slice_mut(0..n0 * d),
            globals,
            ng * b,
            gside,
            drop_path(0),
        )?;
        let s_acts1 = match &views.locals {
            Some(locals) => Some(self.student.forward_into(
                gpu,
                blas,
                &mut tokens.slice_mut(n0 * d..(n0 + n1) * d),
                locals,
                nl * b,
                lside,
                drop_path(1),
            )?),
            None => None,
        };

        // Only the matched student tokens go through the head.
        let layout = StudentLayout::new(batch.pairs, b, self.loss.kind.uses_patches());
        let rows = layout.rows();
        let index = RowIndex::new(gpu, &gather_indices(&layout, ng, t_g, t_l), n0 + n1)?;
        let mut gathered = pool.alloc::<bf16>(rows * d)?;
        gather_rows(gpu, &mut gathered, &tokens, &index, d)?;
        drop(tokens);
        let s_last = self.head.last_layer(gpu, self.student.master())?;
        let (s_logits, s_head) = self.head.forward(
            gpu,
            blas,
            self.student.master(),
            &self.student.half,
            &s_last,
            &gathered,
            rows,
        )?;

        // Loss and its gradient w.r.t. the student logits.
        let gl = GpuLayout::for_loss(gpu, &layout, self.loss.kind)?;
        let teacher = GpuTeacher {
            logits: &t_logits,
            center: &self.center,
            shape: TeacherShape {
                views: ng,
                batch: b,
                tokens: t_g,
                classes: k,
            },
            temperature: teacher_temp,
        };
        let student = GpuStudent {
            logits: &s_logits,
            temperature: self.loss.student_temp,
        };
        let mut dlogits = pool.alloc::<bf16>(rows * k)?;
        let loss = ce::matched_ce(gpu, &gl, &teacher, &student, &mut dlogits)?;
        drop((gl, s_logits));

        // Backward.
        zero_device(gpu, &mut self.grads)?;
        let mut dgathered = pool.alloc::<bf16>(rows * d)?;
        self.head.backward(
            gpu,
            blas,
            self.student.master(),
            &self.student.half,
            &s_last,
            &s_head,
            &gathered,
            &dlogits,
            &mut dgathered,
            &mut self.grads,
        )?;
        drop((s_head, s_last, gathered, dlogits));
        let mut dtokens = pool.alloc::<bf16>((n0 + n1) * d)?;
        zero_device(gpu, &mut dtokens)?;
        scatter_rows(gpu, &mut dtokens, &dgathered, &index, d)?;
        drop(dgathered);
        self.student.backward(
            gpu,
            blas,
            &s_acts0,
            &dtokens.slice(0..n0 * d),
            &mut self.grads,
        )?;
        if let Some(acts) = &s_acts1 {
            self.student.backward(
                gpu,
                blas,
                acts,
                &dtokens.slice(n0 * d..(n0 + n1) * d),
                &mut self.grads,
            )?;
        }
        self.teacher_logits = Some(t_logits);
        Ok(loss)
    }

    /// One training step on `batch` (its index is the step number): the twin of
    /// [`StepRunner::step`]. [`forward_backward`](Self::forward_backward), then the
    /// last-layer freeze, the gradient norm, clipping, the split AdamW (which writes the
    /// student's bf16 copy), the teacher EMA (which writes the teacher's), the GEMM bias
    /// copies, and the centre update with this batch's teacher logits. The lr, weight
    /// decay, momentum and teacher temperature are the runner's schedules at the batch
    /// index, as the CPU's.
    ///
    /// A non-finite loss, norm or gradient skips AdamW (step counts included), the EMA and
    /// the centre, as the CPU does: AdamW and the EMA read the skip flag on the device; the
    /// host reads it back (with the norm, for the stats) before the centre update. On a
    /// skipped step the gradient buffer may have been clipped (the CPU leaves it).
    ///
    /// # Panics
    /// As [`forward_backward`](Self::forward_backward).
    pub fn step(&mut self, gpu: &Gpu, batch: &ViewBatch) -> Result<StepStats> {
        let loss = self.forward_backward(gpu, batch)?;
        self.finish_step(gpu, StepBatch::of(batch), loss)
    }

    /// [`step`](Self::step) on views already on the device, as
    /// [`forward_backward_on`](Self::forward_backward_on) takes them.
    pub fn step_on<T: ImageElement>(
        &mut self,
        gpu: &Gpu,
        batch: StepBatch<'_>,
        views: StepViews<'_, T>,
    ) -> Result<StepStats> {
        let loss = self.forward_backward_on(gpu, batch, views)?;
        self.finish_step(gpu, batch, loss)
    }

    /// The optimiser side of a step, after the forward and backward gave `loss`.
    fn finish_step(&mut self, gpu: &Gpu, batch: StepBatch<'_>, loss: f64) -> Result<StepStats> {
        let step = batch.index;
        let epoch = step / self.steps_per_epoch.max(1);
        let b = batch.images;
        let layout = StudentLayout::new(batch.pairs, b, self.loss.kind.uses_patches());
        let mut stats = StepStats {
            step,
            epoch,
            loss: loss as f32,
            lr: self.schedules.lr.at(step),
            weight_decay: self.schedules.weight_decay.at(step),
            momentum: self.schedules.momentum.at(step),
            teacher_temp: self.loss.teacher_temp_at(epoch as usize),
            head_rows: layout.rows(),
            ..StepStats::default()
        };
        // Frozen: the last layer's gradients are zeroed (out of the norm and the clipping)
        // and AdamW leaves that layer alone (see SplitAdamW).
        let frozen = optim::cancel_last_layer_grads(
            gpu,
            &mut self.grads,
            &self.net.table,
            epoch as usize,
            self.optim.freeze_last_layer,
        )?;
        // The loss as the CPU's f32, on the device for the skip flag.
        let loss_dev = gpu.pool().upload(&[stats.loss])?;
        optim::grad_norm(
            gpu,
            &self.grads,
            Some(ScalarRef::new(&loss_dev, 0)),
            &mut self.norm,
        )?;
        if self.optim.clip_grad > 0.0 {
            let max_norm = self.optim.clip_grad as f32;
            match (self.optim.clip_mode, self.clip_plan.as_mut()) {
                (ClipMode::PerTensor, Some(plan)) => {
                    optim::clip_per_tensor(gpu, &mut self.grads, plan, max_norm)?;
                }
                (ClipMode::PerTensor, None) => unreachable!("GpuStep::new makes the plan"),
                (ClipMode::GlobalNorm, _) => {
                    optim::clip_global_norm(gpu, &mut self.grads, &self.norm, max_norm)?;
                }
            }
        }
        let skip = Some(self.norm.skip());
        self.adam.step(
            gpu,
            &mut self.student.master,
            &mut self.student.half,
            &self.grads,
            stats.lr as f32,
            stats.weight_decay as f32,
            &self.decay_mask,
            frozen,
            skip,
        )?;
        optim::ema_update(
            gpu,
            &mut self.teacher.master,
            &mut self.teacher.half,
            &self.student.master,
            stats.momentum as f32,
            skip,
        )?;
        // AdamW and the EMA wrote the bf16 copies the GEMMs read (all of them that changed:
        // a frozen last layer is not written and did not change).
        let norm = self.norm.read()?;
        stats.grad_norm = norm.norm;
        stats.skipped = norm.skip;
        drop(loss_dev);
        if !stats.skipped {
            let logits = self
                .teacher_logits
                .as_ref()
                .expect("forward_backward keeps the teacher logits");
            let shape = TeacherShape {
                views: self.views.global.count,
                batch: b,
                tokens: self.teacher_tokens(),
                classes: self.net.head.out_dim,
            };
            ce::update_center(
                gpu,
                &mut self.center,
                logits,
                shape,
                self.loss.center_momentum,
            )?;
        }
        Ok(stats)
    }

    /// The teacher's final-norm CLS features `(N, D)` of `images` `(N, C, side, side)` f32
    /// (normalised as the model sees them): for the kNN evaluation during training.
    pub fn teacher_cls(
        &self,
        gpu: &Gpu,
        images: &[f32],
        n: usize,
        side: usize,
    ) -> Result<Vec<f32>> {
        let dev = gpu.pool().upload(images)?;
        let (out, acts) = self.teacher.forward(gpu, &self.blas, &dev, n, side, None)?;
        std::mem::drop(acts);
        let d = self.net.vit.embed_dim;
        let tokens = check::download_bf16(&out)?;
        let t = tokens.len() / (n * d).max(1);
        Ok((0..n)
            .flat_map(|i| tokens[i * t * d..i * t * d + d].iter().copied())
            .collect())
    }

    /// Everything a checkpoint holds, on the host (waits for the GPU): both networks' fp32
    /// masters, the student's AdamW state and the centre, as the CPU's [`Weights`].
    pub fn download_state(&self) -> Result<Weights> {
        let w = self.download_weights()?;
        Ok(Weights {
            student: w.student,
            teacher: w.teacher,
            adam: self.adam.to_host()?,
            center: w.center,
        })
    }

    /// The student and teacher fp32 masters and the centre, on the host (waits for the
    /// GPU): for checkpoints and comparisons.
    pub fn download_weights(&self) -> Result<HostWeights> {
        Ok(HostWeights {
            student: self.student.master().to_vec()?,
            teacher: self.teacher.master().to_vec()?,
            center: self.center.to_vec()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Checks.

/// gather_rows and scatter_rows against their twins: 301 of 1000 rows (a random choice
/// without repeats, so the scatter's distinctness holds), width 67 (not a multiple of the
/// block or a vector width), more than one block. Both exact: the kernels copy, or add two
/// bf16 values in fp32 and round once as the twin does. The gather's output is poisoned;
/// the scatter's destination starts random, so every row it must leave alone is checked.
fn check_rows_kernels(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let (total, rows, d) = (1000usize, 301usize, 67usize);
    let mut all: Vec<u32> = (0..total as u32).collect();
    for i in (1..total).rev() {
        all.swap(i, inputs.below(i + 1));
    }
    let index_host = &all[..rows];
    let index = RowIndex::new(gpu, index_host, total)?;
    let big = check::to_bf16(&inputs.normal(total * d, 1.0));
    let small = check::to_bf16(&inputs.normal(rows * d, 1.0));
    let widen = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();

    let big_dev = gpu.pool().upload(&big)?;
    let mut out = check::poisoned_bf16(gpu, rows * d)?;
    gather_rows(gpu, &mut out, &big_dev, &index, d)?;
    let mut cpu_out = vec![bf16::ZERO; rows * d];
    twin::gather_rows(&mut cpu_out, &big, index_host, d);

    let small_dev = gpu.pool().upload(&small)?;
    let mut dst = gpu.pool().upload(&big)?;
    scatter_rows(gpu, &mut dst, &small_dev, &index, d)?;
    let mut cpu_dst = big.clone();
    twin::scatter_rows(&mut cpu_dst, &small, index_host, d);

    Ok(vec![
        compare(
            format!("gather_rows ({rows} of {total} rows of {d})"),
            &check::download_bf16(&out)?,
            &widen(&cpu_out),
            0.0,
        ),
        compare(
            format!("scatter_rows ({rows} of {total} rows of {d})"),
            &check::download_bf16(&dst)?,
            &widen(&cpu_dst),
            0.0,
        ),
    ])
}

/// Bound on the loss's relative error. The loss is a cross-entropy between the teacher's
/// and the student's softmaxes, both from logits that went through a backbone and a head
/// in bf16 (each ~1e-2 of its scale off the f32 twin: the backbone and head checks), then
/// divided by the temperatures; the loss moves by about the logits' error over the
/// temperature times the probability mass that moves, averaged over all rows and classes,
/// so well under 1e-2 of a loss of order log K (a sharp teacher at tau_t = 0.04 makes it
/// the loss's most sensitive input). Measured on the emulator, seeds 0-3: 3e-5 to 2.5e-3.
/// An indexing mistake (a wrong token gathered, a wrong teacher row) changes it by O(1).
const LOSS_BOUND: f64 = 2e-2;

/// Bound on [`compare_to_scale`] of each parameter gradient. Between the loss and a
/// backbone tensor's gradient sit, in bf16: the teacher's backbone and head (the target
/// `p_t`, ~1e-2 of the logits' scale, which the teacher temperature amplifies in the
/// softmax), the student's backbone and head forward, the CE gradient (stored bf16), the
/// head backward and the backbone backward (each checked alone at 5e-2 of scale with
/// measured ~1-2e-2). Measured end to end they stay at most 1.7e-2, so 5e-2 keeps a 3x
/// margin while a wiring mistake stays well outside it. A wiring mistake (a token scattered to the wrong row, a call's backward skipped, the
/// gradient not zeroed, locals and globals swapped) moves a tensor by the order of its
/// own scale. Measured on the emulator, seeds 0-3: at most 1.7e-2 (norm weights, the
/// position embedding, first-block biases), most tensors ~5e-3. Mutations tried: the
/// locals' backward skipped gave 0.8-0.98 on the backbone tensors; every local token
/// gathered and scattered one row off gave 0.11-0.38 (cls_token, pos_embed 0.38).
const GRAD_BOUND: f64 = 5e-2;

/// What [`step_setup`] makes: the runner, its weights and one batch.
struct StepSetup {
    runner: StepRunner,
    w: Weights,
    batch: ViewBatch,
    net: Network,
    /// The configuration in words, for outcome names.
    what: String,
}

/// The step checks' set-up:
/// Femto with 4-pixel patches on the small28 views of the embedded Fashion-MNIST pack, 2
/// global views of 28 and 3 local views of 12, batch 2, a 3-layer head (hidden 96,
/// bottleneck 32, K = 64), PWML, stochastic depth 0.3 (the student's masks drawn as the CPU draws them). Parameters from
/// [`StepRunner::init_weights`] moved toward a trained network's (the 1-D tensors get
/// N(0, 0.2^2) added, the blocks' and the head MLP's weights are scaled from std 0.02 to
/// 0.1, as the backbone and head checks do, so every tensor matters against the bf16
/// drift); the student then gets N(0, 0.02^2) added everywhere so that it differs from the
/// teacher; a random centre; everything rounded to bf16 so both sides see the same
/// numbers.
fn step_setup(inputs: &mut Inputs) -> Result<StepSetup> {
    use crate::loss::LossKind;
    use crate::model::config::{Arch, HeadConfig};
    use crate::train::TrainConfig;
    use crate::views::config::Preset;

    let (batch_size, locals) = (2usize, 3usize);
    let mut cfg = TrainConfig::default();
    cfg.views.preset = Some(Preset::Small28);
    cfg.views.global_views = Some(2);
    cfg.views.local_views = Some(locals);
    cfg.model.arch = Arch::Femto;
    cfg.model.patch = Some(4);
    cfg.model.drop_path = 0.3;
    cfg.head = HeadConfig {
        layers: 3,
        hidden: 96,
        bottleneck: 32,
        out_dim: 64,
    };
    cfg.loss.kind = LossKind::Pwml;
    let (views, vit) = cfg.resolve(28, 28, 1)?;
    let net = Network::new(vit, cfg.head.clone())?;
    let steps_per_epoch = 10;
    let schedules = cfg.optim.schedules(batch_size, 2, steps_per_epoch)?;
    let seed = inputs.below(1 << 30) as u64;
    let runner = StepRunner::new(
        net.clone(),
        views.clone(),
        cfg.loss.clone(),
        cfg.optim.clone(),
        schedules,
        steps_per_epoch as u64,
        seed,
    );
    let mut w = runner.init_weights();
    for info in net.table.tensors() {
        let r = info.range();
        if info.shape.len() == 1 {
            let noise = inputs.normal(info.len(), 0.2);
            w.teacher[r]
                .iter_mut()
                .zip(noise)
                .for_each(|(x, z)| *x += z);
        } else if info.name.starts_with("blocks.") || info.name.starts_with("head.mlp.") {
            w.teacher[r].iter_mut().for_each(|x| *x *= 5.0);
        }
    }
    let noise = inputs.normal(w.teacher.len(), 0.02);
    w.student = w.teacher.iter().zip(noise).map(|(x, z)| x + z).collect();
    w.student = check::round_bf16(&w.student);
    w.teacher = check::round_bf16(&w.teacher);
    w.center = check::round_bf16(&inputs.normal(w.center.len(), 0.1));

    let pack = crate::data::default_pack(crate::data::Split::Train)?;
    let images: Vec<u32> = (0..batch_size)
        .map(|_| inputs.below(pack.len()) as u32)
        .collect();
    let mut batch =
        crate::views::batch::ViewBuilder::new(views, seed, &pack)?.build(&pack, 3, 0, &images)?;
    // The GPU's im2col rounds the f32 images to bf16 for the patch GEMM; the CPU gets the
    // same rounded values.
    for v in &mut batch.views {
        *v = check::round_bf16(v);
    }

    Ok(StepSetup {
        what: format!(
            "(Femto, B {batch_size}, 2x28 + {locals}x12 views, K {}, PWML)",
            net.head.out_dim
        ),
        runner,
        w,
        batch,
        net,
    })
}

/// [`step_setup`]'s batch through [`GpuStep::forward_backward`] and
/// [`StepRunner::forward_backward`]. Outcomes: the loss, every tensor's gradient, the whole
/// gradient buffer.
fn check_step(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let StepSetup {
        mut runner,
        w,
        batch,
        net,
        ..
    } = step_setup(inputs)?;
    let batch_size = batch.len();
    let locals = batch.views.len() - 2;
    let cpu = runner.forward_backward(&w, &batch);
    let cpu_grads = runner.grads().to_vec();
    let mut step = GpuStep::new(gpu, &runner, &w)?;
    // Poisoned first, so that a tensor the step never writes fails.
    let total = net.table.total();
    step.grads = check::poisoned_f32(gpu, total)?;
    let gpu_loss = step.forward_backward(gpu, &batch)?;
    let gpu_grads = check::download_f32(step.grads())?;

    let what = format!(
        "step forward_backward (Femto, B {batch_size}, 2x28 + {locals}x12 views, K {}, PWML, \
         {} head rows)",
        net.head.out_dim, cpu.head_rows
    );
    let cpu_loss = f64::from(cpu.loss);
    let mut outcomes = vec![Outcome {
        name: format!("{what}: loss {gpu_loss:.6} vs {cpu_loss:.6}, relative error"),
        elements: 1,
        max_rel_err: if gpu_loss.is_finite() {
            (gpu_loss - cpu_loss).abs() / cpu_loss.abs().max(f64::MIN_POSITIVE)
        } else {
            f64::INFINITY
        },
        bound: LOSS_BOUND,
        worst: Some((0, gpu_loss, cpu_loss)),
    }];
    outcomes.extend(check::compare_tensors(
        &net.table,
        &what,
        &gpu_grads,
        &cpu_grads,
        GRAD_BOUND,
        |_| true,
    ));
    outcomes.push(compare_to_scale(
        format!("{what}: the whole gradient buffer"),
        &gpu_grads,
        &cpu_grads,
        GRAD_BOUND,
    ));
    Ok(outcomes)
}

/// Bound on [`compare_to_scale`] of each tensor's change in one full step (student and
/// teacher). The student's change is AdamW's `lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`:
/// it normalises the gradient, so the gradient's bf16 error (at most ~1.7e-2 of each
/// tensor's gradient scale, [`GRAD_BOUND`]'s measurements) reaches the change divided by
/// the gradient's own size, not the tensor's. At a fresh state (first step) `m_hat /
/// sqrt(v_hat)` is `sign(g)`, and any element whose gradient is below the error flips,
/// an error of 2 lr: no bound tells a bug apart. With a restored state of realistic
/// moments (see [`check_full_step`]) the new gradient enters with weight `1 - beta1 = 0.1`
/// against moments of the tensor's gradient scale, so the change's error is ~0.1 x the
/// gradient's relative error x (max |g| / rms g) over a change of order lr: a few 1e-3.
/// The teacher's change is `(1 - momentum) (student' - teacher)`, dominated by the
/// student-teacher difference both sides share. A missing or wrong update (no EMA, no
/// AdamW, the frozen layer written, the wrong lr) is off by the order of the change itself.
/// Measured on the emulator (seed 0): student at most 1.5e-3 (pos_embed), teacher at most
/// 2e-5, the centre 3.4e-3. Mutations tried: no EMA (momentum 1) gave 1.0 on every teacher
/// tensor; the frozen last layer stepped gave an infinite error there; the centre update
/// left out gave 1.0.
const CHANGE_BOUND: f64 = 1e-1;

/// Bound on [`compare_to_scale`] of the centre's change `(1 - m) (mean t - C)`: the teacher
/// logits are bf16 off the f32 twin by ~1e-2 of their scale (the backbone and head checks)
/// and the mean over G * B = 4 rows does not shrink that; 5e-2 keeps a margin.
const CENTER_BOUND: f64 = 5e-2;

/// The change `after - before` of one tensor, compared to the CPU's: [`compare_to_scale`],
/// except that a tensor the CPU leaves exactly alone (the frozen last layer) must be left
/// exactly alone on the GPU too.
fn compare_change(
    name: String,
    gpu: (&[f32], &[f32]),
    cpu: (&[f32], &[f32]),
    bound: f64,
) -> Outcome {
    let delta = |(before, after): (&[f32], &[f32])| -> Vec<f32> {
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    };
    let (dg, dc) = (delta(gpu), delta(cpu));
    if dc.iter().all(|&x| x == 0.0) {
        let worst = dg.iter().position(|&x| x != 0.0);
        return Outcome {
            name: format!("{name} (unchanged on the CPU: must be exactly unchanged)"),
            elements: dg.len(),
            max_rel_err: if worst.is_some() { f64::INFINITY } else { 0.0 },
            bound: 0.0,
            worst: worst.map(|i| (i, f64::from(dg[i]), 0.0)),
        };
    }
    compare_to_scale(name, &dg, &dc, bound)
}

/// One full step, [`GpuStep::step`] against [`StepRunner::step`], on [`step_setup`]'s
/// configuration (step 3 of epoch 0: the last layer frozen; global clipping at 3; the lr
/// held at 1e-3, the weight decay and teacher momentum the schedules'). AdamW
/// starts from a restored state as after 10 steps (see [`CHANGE_BOUND`] for why not a fresh
/// one): per tensor, `m ~ N(0, r^2)` and `v = r^2 (0.5 + U(0, 1))` with `r` the rms of that
/// tensor's gradient on this batch (the CPU's); the frozen last layer has zero moments and
/// no step, as during a freeze. Outcomes: the skip flags, the gradient norm (relative,
/// [`GRAD_BOUND`]), each student and teacher tensor's change ([`compare_change`],
/// [`CHANGE_BOUND`]) and the centre's change ([`CENTER_BOUND`]).
fn check_full_step(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    use crate::train::step::SplitAdamW;
    let StepSetup {
        mut runner,
        mut w,
        batch,
        net,
        what,
    } = step_setup(inputs)?;
    runner.forward_backward(&w, &batch);
    let g = runner.grads().to_vec();
    let split = runner.last_layer_offset();
    let (mut m, mut v) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
    for info in net.table.tensors() {
        let r = info.range();
        if r.start >= split {
            continue;
        }
        let rms = (g[r.clone()]
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            / r.len() as f64)
            .sqrt() as f32;
        let noise = inputs.normal(r.len(), 1.0);
        let spread = inputs.uniform(r.len(), 0.5, 1.5);
        for (((mi, vi), z), u) in m[r.clone()]
            .iter_mut()
            .zip(&mut v[r.clone()])
            .zip(noise)
            .zip(spread)
        {
            *mi = rms * z;
            *vi = rms * rms * u;
        }
    }
    w.adam = SplitAdamW::from_state(m, v, (10, 0), split, &runner.optim)?;
    // A constant lr of 1e-3 (DINO's ViT-S/16 peak): the schedule's warm-up lr at step 3 of
    // this tiny batch is ~1e-7, a change of a few ulps of weights near 1, which f32 rounding
    // would dominate. Both sides read the runner's schedules.
    runner.schedules.lr = crate::optim::CosineSchedule {
        base: 1e-3,
        final_value: 1e-3,
        warmup_iters: 0,
        start_warmup: 1e-3,
        ..runner.schedules.lr
    };

    let mut step = GpuStep::new(gpu, &runner, &w)?;
    let before = w.clone();
    let cpu = runner.step(&mut w, &batch);
    let gpu_stats = step.step(gpu, &batch)?;
    let after = step.download_weights()?;

    let what = format!("step one full step {what}");
    let mut outcomes = vec![
        Outcome {
            name: format!(
                "{what}: skipped {} vs {} (must agree, and not skip)",
                gpu_stats.skipped, cpu.skipped
            ),
            elements: 1,
            max_rel_err: if gpu_stats.skipped == cpu.skipped && !cpu.skipped {
                0.0
            } else {
                f64::INFINITY
            },
            bound: 0.0,
            worst: None,
        },
        Outcome {
            name: format!(
                "{what}: grad norm {} vs {}, relative error",
                gpu_stats.grad_norm, cpu.grad_norm
            ),
            elements: 1,
            max_rel_err: if gpu_stats.grad_norm.is_finite() {
                f64::from((gpu_stats.grad_norm - cpu.grad_norm).abs())
                    / f64::from(cpu.grad_norm.abs()).max(f64::MIN_POSITIVE)
            } else {
                f64::INFINITY
            },
            bound: GRAD_BOUND,
            worst: Some((0, f64::from(gpu_stats.grad_norm), f64::from(cpu.grad_norm))),
        },
    ];
    for (side, b, gpu_after, cpu_after) in [
        ("student", &before.student, &after.student, &w.student),
        ("teacher", &before.teacher, &after.teacher, &w.teacher),
    ] {
        for info in net.table.tensors() {
            let r = info.range();
            outcomes.push(compare_change(
                format!("{what}: {side} {} change", info.name),
                (&b[r.clone()], &gpu_after[r.clone()]),
                (&b[r.clone()], &cpu_after[r]),
                CHANGE_BOUND,
            ));
        }
    }
    outcomes.push(compare_change(
        format!("{what}: centre change"),
        (&before.center, &after.center),
        (&before.center, &w.center),
        CENTER_BOUND,
    ));
    Ok(outcomes)
}

/// This family's parity checks (`check-kernels --filter step`).
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "step gather_rows/scatter_rows (301 of 1000 rows of 67)",
            run: check_rows_kernels,
        },
        KernelCheck {
            name: "step forward_backward (Femto, patch 4, 2x28 + 3x12 views, B 2, K 64, PWML)",
            run: check_step,
        },
        KernelCheck {
            name: "step one full step (forward_backward, freeze, norm, clip, AdamW, EMA, centre)",
            run: check_full_step,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_gather_and_scatter_rows() {
        let b = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
        let src = b(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut out = vec![bf16::ZERO; 4];
        twin::gather_rows(&mut out, &src, &[2, 0], 2);
        assert_eq!(out, b(&[5.0, 6.0, 1.0, 2.0]));
        let mut dst = src.clone();
        twin::scatter_rows(&mut dst, &b(&[10.0, 20.0, 30.0, 40.0]), &[2, 0], 2);
        assert_eq!(dst, b(&[31.0, 42.0, 3.0, 4.0, 15.0, 26.0]));
        assert!(distinct(&[3, 1, 2]) && !distinct(&[3, 1, 3]));
    }
}
