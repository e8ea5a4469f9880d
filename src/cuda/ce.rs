//! Launchers for `kernels/ce.cu`: the matched-token cross-entropy of every PW-Self loss and
//! the teacher centre update, the GPU twins of [`crate::loss::matched_ce`] and
//! [`crate::loss::update_center`].
//!
//! The loss runs as two kernels: [`teacher_stats`] (max and log-sum-exp of each used
//! teacher row, fp32) and [`matched_ce_rows`] (per student row: the gradient, written bf16
//! in full, and the row's loss, fp32). [`matched_ce`] runs both and sums the row losses on
//! the host in f64 in row order, as the CPU does. A [`StudentLayout`] and its term weights
//! go to the device once, as a [`GpuLayout`].
//!
//! Device layouts: the teacher logits of all G global views are one `(G, B, T_g, K)` bf16
//! buffer (view `v` is the CPU's `TeacherLogits::views[v]`); the centre is `(T_g, K)` fp32;
//! student logits and gradient are `(R, K)` bf16 in the layout's row order.
//!
//! Per step, [`GpuLayout::new`] makes five small uploads and [`matched_ce`] two small
//! buffers, all from the caching pool; no K-wide temporary exists besides the gradient.

use std::cell::RefCell;
use std::rc::Rc;

use half::bf16;

use super::bench::BenchCase;
use super::check::{
    compare, download_bf16, download_f32, poisoned_bf16, poisoned_f32, round_bf16, to_bf16, Inputs,
    KernelCheck, Outcome, BF16_BOUND, FP32_BOUND,
};
use super::context::{blocks, grid_for, Arg, Gpu};
use super::pool::Buf;
use crate::error::Result;
use crate::loss::{self, LossKind, StudentLayout, TeacherLogits};
use crate::rng::{Purpose, Stream};
use crate::views::crop::{sample_crop, Scale};
use crate::views::matching::{batch_matches, MatchRule, Matches, PairMatches};

/// Threads per block of every kernel here (their `__launch_bounds__`).
const THREADS: u32 = 256;

/// Most terms of non-zero weight one student row may have (`MAX_ROW_TERMS` in ce.cu): one
/// per teacher view matched with the row's token, so at most the number of global views.
pub const MAX_ROW_TERMS: usize = 64;

/// The layout's terms as the kernels read them (host side of [`GpuLayout`]).
#[derive(Clone, Debug, PartialEq)]
struct PackedLayout {
    /// `(NT, 2)`: (global view, token) of every teacher token.
    teacher_rows: Vec<i32>,
    /// `(U + 1)`: CSR over the rows of one image, counting only terms of non-zero weight.
    term_start: Vec<i32>,
    /// Teacher token (index into `teacher_rows`) of each kept term.
    term_teacher: Vec<i32>,
    /// Weight of each kept term.
    term_weight: Vec<f32>,
    /// `(U)`: the sum of all the row's weights in f64, as the CPU forms it.
    row_total: Vec<f64>,
    /// Most kept terms of one row.
    max_row_terms: usize,
    /// 1 + the largest view and token any teacher token uses.
    views_needed: usize,
    tokens_needed: usize,
}

/// Packs `layout` with one weight per term. Terms of weight 0 are dropped (the CPU skips
/// them too); a row left with none is one whose every weight is 0, which the kernel fills
/// with zeros, as the CPU does.
fn pack(layout: &StudentLayout, weights: &[f32]) -> PackedLayout {
    assert_eq!(weights.len(), layout.terms().len(), "one weight per term");
    let to_i32 = |x: usize| i32::try_from(x).expect("layout index fits in i32");
    let mut p = PackedLayout {
        teacher_rows: Vec::with_capacity(2 * layout.teacher_tokens().len()),
        term_start: Vec::with_capacity(layout.rows_per_image() + 1),
        term_teacher: Vec::new(),
        term_weight: Vec::new(),
        row_total: Vec::with_capacity(layout.rows_per_image()),
        max_row_terms: 0,
        views_needed: 0,
        tokens_needed: 0,
    };
    for &(view, token) in layout.teacher_tokens() {
        p.teacher_rows.push(to_i32(view as usize));
        p.teacher_rows.push(to_i32(token as usize));
        p.views_needed = p.views_needed.max(view as usize + 1);
        p.tokens_needed = p.tokens_needed.max(token as usize + 1);
    }
    p.term_start.push(0);
    let mut at = 0;
    for u in 0..layout.rows_per_image() {
        let terms = layout.terms_of(u);
        let w = &weights[at..at + terms.len()];
        at += terms.len();
        p.row_total.push(w.iter().map(|&w| f64::from(w)).sum());
        let before = p.term_teacher.len();
        for (t, &w) in terms.iter().zip(w).filter(|(_, &w)| w != 0.0) {
            p.term_teacher.push(to_i32(t.teacher as usize));
            p.term_weight.push(w);
        }
        p.max_row_terms = p.max_row_terms.max(p.term_teacher.len() - before);
        p.term_start.push(to_i32(p.term_teacher.len()));
    }
    p
}

/// A [`StudentLayout`] with its term weights, on the device: what [`teacher_stats`] and
/// [`matched_ce_rows`] read to know which teacher rows each student row is compared with.
/// Made once per layout and loss (the layout changes with the crops, i.e. every step).
pub struct GpuLayout {
    batch: usize,
    rows_per_image: usize,
    teacher_tokens: usize,
    terms: usize,
    views_needed: usize,
    tokens_needed: usize,
    teacher_rows: Buf<i32>,
    term_start: Buf<i32>,
    term_teacher: Buf<i32>,
    term_weight: Buf<f32>,
    row_total: Buf<f64>,
}

impl GpuLayout {
    /// Uploads `layout` with `weights` (one per [`StudentLayout::terms`] entry, as
    /// [`loss::matched_ce`] takes them).
    ///
    /// # Panics
    /// If `weights` has the wrong length, or a row has more than [`MAX_ROW_TERMS`] terms of
    /// non-zero weight (more than 64 global views).
    pub fn new(gpu: &Gpu, layout: &StudentLayout, weights: &[f32]) -> Result<GpuLayout> {
        let p = pack(layout, weights);
        assert!(
            p.max_row_terms <= MAX_ROW_TERMS,
            "a student row with {} terms: the kernel holds at most {MAX_ROW_TERMS}",
            p.max_row_terms
        );
        assert!(
            layout.rows() <= i32::MAX as usize
                && layout.teacher_tokens().len() * layout.batch() <= i32::MAX as usize,
            "a layout of {} rows is too large for one launch",
            layout.rows()
        );
        let pool = gpu.pool();
        // An empty list is uploaded as one unused element (the kernels never read it).
        let nonempty_i32 = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        let nonempty_f32 = |v: &[f32]| if v.is_empty() { vec![0.0] } else { v.to_vec() };
        Ok(GpuLayout {
            batch: layout.batch(),
            rows_per_image: layout.rows_per_image(),
            teacher_tokens: layout.teacher_tokens().len(),
            terms: p.term_teacher.len(),
            views_needed: p.views_needed,
            tokens_needed: p.tokens_needed,
            teacher_rows: pool.upload(&p.teacher_rows)?,
            term_start: pool.upload(&p.term_start)?,
            term_teacher: pool.upload(&nonempty_i32(&p.term_teacher))?,
            term_weight: pool.upload(&nonempty_f32(&p.term_weight))?,
            row_total: pool.upload(&p.row_total)?,
        })
    }

    /// The layout with the weights of loss `kind` ([`StudentLayout::weights`]).
    ///
    /// # Panics
    /// As [`StudentLayout::weights`] and [`GpuLayout::new`].
    pub fn for_loss(gpu: &Gpu, layout: &StudentLayout, kind: LossKind) -> Result<GpuLayout> {
        GpuLayout::new(gpu, layout, &layout.weights(kind))
    }

    /// Images per batch, B.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Student rows per image, U.
    pub fn rows_per_image(&self) -> usize {
        self.rows_per_image
    }
    /// Student rows, R = B * U.
    pub fn rows(&self) -> usize {
        self.batch * self.rows_per_image
    }
    /// Teacher tokens some term uses, NT.
    pub fn teacher_tokens(&self) -> usize {
        self.teacher_tokens
    }
    /// Terms of non-zero weight over the rows of one image.
    pub fn nonzero_terms(&self) -> usize {
        self.terms
    }
    /// Length of the statistics buffer: `(NT * B, 2)` fp32, (max, ln Z) at `ti * B + b`.
    pub fn stats_len(&self) -> usize {
        2 * self.teacher_tokens * self.batch
    }
}

/// The shape of the teacher logits, `(views, batch, tokens, classes)` = `(G, B, T_g, K)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeacherShape {
    /// Global views, G.
    pub views: usize,
    /// Images, B.
    pub batch: usize,
    /// Tokens per global view, T_g.
    pub tokens: usize,
    /// Output dimension, K.
    pub classes: usize,
}

impl TeacherShape {
    /// Elements of the logits, `G * B * T_g * K`.
    pub fn logits_len(&self) -> usize {
        self.views * self.batch * self.tokens * self.classes
    }
    /// Elements of the centre, `T_g * K`.
    pub fn center_len(&self) -> usize {
        self.tokens * self.classes
    }

    /// Checks what every kernel here needs: a non-empty shape whose sizes fit the kernels'
    /// 32-bit arguments.
    fn assert_launchable(&self) {
        assert!(
            self.views > 0 && self.batch > 0 && self.tokens > 0 && self.classes > 0,
            "empty teacher logits {self:?}"
        );
        assert!(
            self.views * self.batch * self.tokens <= i32::MAX as usize
                && self.center_len() <= i32::MAX as usize,
            "teacher logits {self:?} too large for the kernels' 32-bit sizes"
        );
    }
}

/// The teacher's side of the loss on the device (the twin of [`TeacherLogits`]).
#[derive(Clone, Copy)]
pub struct GpuTeacher<'a> {
    /// `(G, B, T_g, K)` bf16: every token of every global view.
    pub logits: &'a Buf<bf16>,
    /// The centre C, `(T_g, K)` fp32.
    pub center: &'a Buf<f32>,
    /// The logits' shape.
    pub shape: TeacherShape,
    /// Teacher temperature `tau_t` of this epoch.
    pub temperature: f32,
}

/// The student's side of the loss on the device.
#[derive(Clone, Copy)]
pub struct GpuStudent<'a> {
    /// `(R, K)` bf16, in the layout's row order.
    pub logits: &'a Buf<bf16>,
    /// Student temperature `tau_s`.
    pub temperature: f32,
}

/// The shape checks of [`loss::matched_ce`], for the teacher side.
fn assert_teacher(layout: &GpuLayout, teacher: &GpuTeacher) {
    let s = teacher.shape;
    s.assert_launchable();
    assert!(teacher.temperature > 0.0, "temperatures must be positive");
    assert_eq!(
        s.batch, layout.batch,
        "teacher batch differs from the layout's"
    );
    assert_eq!(
        teacher.center.len(),
        s.center_len(),
        "center must be (T_g, K)"
    );
    assert_eq!(
        teacher.logits.len(),
        s.logits_len(),
        "teacher logits must be (G, B, T_g, K)"
    );
    assert!(
        layout.views_needed <= s.views && layout.tokens_needed <= s.tokens,
        "the layout uses teacher view {} and token {}, outside {} views of {} tokens",
        layout.views_needed.saturating_sub(1),
        layout.tokens_needed.saturating_sub(1),
        s.views,
        s.tokens
    );
}

/// Enqueues `teacher_stats`: for every teacher token `ti` of the layout and image `b`,
/// `stats[2 (ti B + b)]` = max and `stats[2 (ti B + b) + 1]` = ln Z of `(t - C) / tau_t`
/// over K (fp32). One block of 256 threads per (ti, b).
///
/// # Panics
/// On shapes that disagree with the layout, as [`loss::matched_ce`].
pub fn teacher_stats(
    gpu: &Gpu,
    layout: &GpuLayout,
    teacher: &GpuTeacher,
    stats: &mut Buf<f32>,
) -> Result<()> {
    assert_teacher(layout, teacher);
    assert_eq!(stats.len(), layout.stats_len(), "stats must be (NT * B, 2)");
    let s = teacher.shape;
    let tau_t = teacher.temperature;
    let cfg = blocks(layout.teacher_tokens * layout.batch, THREADS);
    // SAFETY: the arguments follow teacher_stats's parameters; every buffer's length was
    // checked above against the shape the kernel indexes, and every teacher token lies
    // inside the logits.
    unsafe {
        gpu.launch(
            "ce",
            "teacher_stats",
            cfg,
            &[
                Arg::Ptr(teacher.logits.ptr()),
                Arg::Ptr(teacher.center.ptr()),
                Arg::Ptr(layout.teacher_rows.ptr()),
                Arg::Ptr(stats.ptr()),
                (s.batch as i32).into(),
                (s.tokens as i32).into(),
                (s.classes as i32).into(),
                tau_t.into(),
                (1.0 / tau_t).into(),
            ],
        )
    }
}

/// Enqueues `matched_ce`: for every student row, the gradient of its weighted
/// cross-entropies (every element of `grad` written, bf16) and its loss (`row_loss`, fp32),
/// from the statistics [`teacher_stats`] wrote. One block of 256 threads per row.
///
/// # Panics
/// On shapes that disagree with the layout, or a temperature that is not positive.
pub fn matched_ce_rows(
    gpu: &Gpu,
    layout: &GpuLayout,
    teacher: &GpuTeacher,
    stats: &Buf<f32>,
    student: &GpuStudent,
    grad: &mut Buf<bf16>,
    row_loss: &mut Buf<f32>,
) -> Result<()> {
    assert_teacher(layout, teacher);
    let s = teacher.shape;
    let (tau_s, tau_t) = (student.temperature, teacher.temperature);
    assert!(tau_s > 0.0, "temperatures must be positive");
    assert_eq!(stats.len(), layout.stats_len(), "stats must be (NT * B, 2)");
    assert_eq!(
        student.logits.len(),
        layout.rows() * s.classes,
        "student logits must be (R, K)"
    );
    assert_eq!(grad.len(), student.logits.len(), "grad must be (R, K)");
    assert_eq!(row_loss.len(), layout.rows(), "row_loss must be (R)");
    let cfg = blocks(layout.rows(), THREADS);
    // SAFETY: the arguments follow matched_ce's parameters; lengths checked above; the
    // layout's CSR and teacher indices were built from a StudentLayout, so they stay inside
    // its buffers, and every row has at most MAX_ROW_TERMS terms (GpuLayout::new).
    unsafe {
        gpu.launch(
            "ce",
            "matched_ce",
            cfg,
            &[
                Arg::Ptr(student.logits.ptr()),
                Arg::Ptr(teacher.logits.ptr()),
                Arg::Ptr(teacher.center.ptr()),
                Arg::Ptr(stats.ptr()),
                Arg::Ptr(layout.teacher_rows.ptr()),
                Arg::Ptr(layout.term_start.ptr()),
                Arg::Ptr(layout.term_teacher.ptr()),
                Arg::Ptr(layout.term_weight.ptr()),
                Arg::Ptr(layout.row_total.ptr()),
                Arg::Ptr(grad.ptr()),
                Arg::Ptr(row_loss.ptr()),
                (s.batch as i32).into(),
                (layout.rows_per_image as i32).into(),
                (s.tokens as i32).into(),
                (s.classes as i32).into(),
                tau_s.into(),
                (1.0 / tau_s).into(),
                tau_t.into(),
                (1.0 / tau_t).into(),
            ],
        )
    }
}

/// The fused matched-token cross-entropy (the twin of [`loss::matched_ce`]): writes the
/// gradient w.r.t. the student logits to `grad` (bf16, every element) and returns the
/// weighted sum of the cross-entropies, the row losses summed in f64 in row order. Waits
/// for the GPU (it reads the loss back).
///
/// # Panics
/// As [`teacher_stats`] and [`matched_ce_rows`].
pub fn matched_ce(
    gpu: &Gpu,
    layout: &GpuLayout,
    teacher: &GpuTeacher,
    student: &GpuStudent,
    grad: &mut Buf<bf16>,
) -> Result<f64> {
    let mut stats = gpu.pool().alloc::<f32>(layout.stats_len())?;
    let mut row_loss = gpu.pool().alloc::<f32>(layout.rows())?;
    teacher_stats(gpu, layout, teacher, &mut stats)?;
    matched_ce_rows(gpu, layout, teacher, &stats, student, grad, &mut row_loss)?;
    Ok(row_loss.to_vec()?.iter().map(|&l| f64::from(l)).sum())
}

/// Enqueues `update_center` (the twin of [`loss::update_center`]): `C <- m C + (1 - m) *
/// mean over views and images of t[p]` per token position p. The sum runs in f64 in the
/// CPU's order, so the result is the CPU's bit for bit. One thread per 8 elements of C
/// (per element when K is not a multiple of 8).
///
/// # Panics
/// On shapes that disagree.
pub fn update_center(
    gpu: &Gpu,
    center: &mut Buf<f32>,
    teacher_logits: &Buf<bf16>,
    shape: TeacherShape,
    momentum: f32,
) -> Result<()> {
    shape.assert_launchable();
    assert_eq!(center.len(), shape.center_len(), "center must be (T_g, K)");
    assert_eq!(
        teacher_logits.len(),
        shape.logits_len(),
        "teacher logits must be (G, B, T_g, K)"
    );
    let vec = if shape.classes % 8 == 0 { 8 } else { 1 };
    let cfg = grid_for(shape.center_len() / vec, THREADS);
    // SAFETY: the arguments follow update_center's parameters; lengths checked above.
    unsafe {
        gpu.launch(
            "ce",
            "update_center",
            cfg,
            &[
                Arg::Ptr(center.ptr()),
                Arg::Ptr(teacher_logits.ptr()),
                (shape.views as i32).into(),
                (shape.batch as i32).into(),
                (shape.tokens as i32).into(),
                (shape.classes as i32).into(),
                momentum.into(),
                (1.0 - momentum).into(),
                // A double parameter: its 8 bytes, as the kernel reads them.
                Arg::F64(1.0 / (shape.views * shape.batch) as f64),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------
// Checks.

/// Bound on the loss, five times the fp32 bound: the GPU forms each `p_t` with the hardware
/// exponential (relative error about 2^-22 + |y| 6e-8 for exp(y), where the CPU uses libm)
/// and sums `w p log q` in fp32 within 8-element chunks (f64 beyond), so its loss is a sum
/// of K * terms products each off by ~1e-6 relative. On the CPU emulator with its exp made
/// GPU-like (product rounded to fp32, then a 2^-22 error) these checks measured 2e-7 at
/// most; an indexing error gives O(1).
const LOSS_BOUND: f64 = 5.0 * FP32_BOUND;

/// One loss check: a random layout, random logits, GPU against CPU.
struct CeCase {
    kind: LossKind,
    batch: usize,
    locals: usize,
    classes: usize,
    teacher_temp: f32,
}

/// The teacher/student pairs of a random batch of `source x source` images: 2 global views
/// of `grids.0` patches per side and `locals` local views of `grids.1`, crops drawn like the
/// paper's (scales 0.4-1 and 0.05-0.4); the last pair's matches are cut to the CLS pair, as
/// for crops that do not overlap.
fn random_pairs(
    rng: &mut Stream,
    source: u32,
    grids: (u32, u32),
    locals: usize,
) -> Vec<PairMatches> {
    let global = Scale { lo: 0.4, hi: 1.0 };
    let local = Scale { lo: 0.05, hi: 0.4 };
    let mut crops = Vec::new();
    let mut grid = Vec::new();
    for v in 0..2 + locals {
        let (scale, g) = if v < 2 {
            (global, grids.0)
        } else {
            (local, grids.1)
        };
        crops.push(sample_crop(rng, source, source, scale, 0.5));
        grid.push(g);
    }
    let mut pairs = batch_matches(&crops, &grid, 2, MatchRule::Paper).expect("one grid per crop");
    if let Some(last) = pairs.last_mut() {
        last.matches = Matches::cls_only();
    }
    pairs
}

fn check_ce(gpu: &Gpu, inputs: &mut Inputs, case: CeCase) -> Result<Vec<Outcome>> {
    const GLOBAL_GRID: u32 = 6;
    let pairs = random_pairs(inputs.stream(), 96, (GLOBAL_GRID, 3), case.locals);
    let layout = StudentLayout::new(&pairs, case.batch, true);
    let weights = layout.weights(case.kind);
    let shape = TeacherShape {
        views: 2,
        batch: case.batch,
        tokens: (1 + GLOBAL_GRID * GLOBAL_GRID) as usize,
        classes: case.classes,
    };
    let k = shape.classes;
    let student_temp = 0.1;

    // Logits at a trained head's scale, rounded to what the GPU reads.
    let teacher_host = round_bf16(&inputs.normal(shape.logits_len(), 3.0));
    let student_host = round_bf16(&inputs.normal(layout.rows() * k, 3.0));
    let center_host = inputs.normal(shape.center_len(), 1.0);

    let gl = GpuLayout::new(gpu, &layout, &weights)?;
    let logits = gpu.pool().upload(&to_bf16(&teacher_host))?;
    let center = gpu.pool().upload(&center_host)?;
    let student_logits = gpu.pool().upload(&to_bf16(&student_host))?;
    let teacher = GpuTeacher {
        logits: &logits,
        center: &center,
        shape,
        temperature: case.teacher_temp,
    };
    let student = GpuStudent {
        logits: &student_logits,
        temperature: student_temp,
    };
    let mut stats = poisoned_f32(gpu, gl.stats_len())?;
    let mut grad = poisoned_bf16(gpu, layout.rows() * k)?;
    let mut row_loss = poisoned_f32(gpu, layout.rows())?;
    teacher_stats(gpu, &gl, &teacher, &mut stats)?;
    matched_ce_rows(
        gpu,
        &gl,
        &teacher,
        &stats,
        &student,
        &mut grad,
        &mut row_loss,
    )?;
    let gpu_stats = download_f32(&stats)?;
    let gpu_grad = download_bf16(&grad)?;
    let gpu_loss: f64 = download_f32(&row_loss)?.iter().map(|&l| f64::from(l)).sum();

    let view_len = shape.logits_len() / shape.views;
    let views: Vec<&[f32]> = teacher_host.chunks(view_len).collect();
    let cpu_teacher = TeacherLogits {
        views: &views,
        center: &center_host,
        tokens: shape.tokens,
        classes: k,
        temperature: case.teacher_temp,
    };
    let mut cpu_grad = vec![0.0f32; layout.rows() * k];
    let cpu_loss = loss::matched_ce(
        &layout,
        &weights,
        &cpu_teacher,
        &student_host,
        student_temp,
        &mut cpu_grad,
    );
    let (cpu_max, cpu_ln_z): (Vec<f32>, Vec<f32>) = loss::teacher_stats(&layout, &cpu_teacher)
        .into_iter()
        .unzip();
    let gpu_max: Vec<f32> = gpu_stats.iter().step_by(2).copied().collect();
    let gpu_ln_z: Vec<f32> = gpu_stats.iter().skip(1).step_by(2).copied().collect();
    Ok(vec![
        compare(
            format!("teacher_stats: max (K = {k})"),
            &gpu_max,
            &cpu_max,
            FP32_BOUND,
        ),
        compare(
            format!("teacher_stats: ln Z (K = {k})"),
            &gpu_ln_z,
            &cpu_ln_z,
            FP32_BOUND,
        ),
        compare(
            format!("matched_ce: loss (K = {k})"),
            &[gpu_loss as f32],
            &[cpu_loss as f32],
            LOSS_BOUND,
        ),
        compare(
            format!("matched_ce: grad (K = {k})"),
            &gpu_grad,
            &cpu_grad,
            BF16_BOUND,
        ),
    ])
}

/// PWML, K not a multiple of 8 (the element-wise path), tau_t at its warm-up start.
fn check_pwml(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let case = CeCase {
        kind: LossKind::Pwml,
        batch: 3,
        locals: 4,
        classes: 1003,
        teacher_temp: 0.04,
    };
    check_ce(gpu, inputs, case)
}

/// DINO on a layout with patch rows: every patch row has only zero weights and must come
/// back as zeros; K a multiple of 8 (16-byte loads), then not.
fn check_dino(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for classes in [1024, 999] {
        let case = CeCase {
            kind: LossKind::Dino,
            batch: 2,
            locals: 3,
            classes,
            teacher_temp: 0.07,
        };
        out.extend(check_ce(gpu, inputs, case)?);
    }
    Ok(out)
}

/// PWLL with lambda, K a multiple of 8 but not of 16 nor of the block's 2048-element stride.
fn check_pwll(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let case = CeCase {
        kind: LossKind::Pwll { lambda: 0.3 },
        batch: 2,
        locals: 6,
        classes: 2056,
        teacher_temp: 0.05,
    };
    check_ce(gpu, inputs, case)
}

/// update_center with K not a multiple of 8, then a multiple of 8. The GPU sums in f64 in
/// the CPU's order and rounds each fp32 operation alike, so the fp32 bound is generous.
fn check_update_center(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for classes in [1003, 1024] {
        let shape = TeacherShape {
            views: 2,
            batch: 5,
            tokens: 37,
            classes,
        };
        let momentum = 0.9;
        let logits_host = round_bf16(&inputs.normal(shape.logits_len(), 3.0));
        let center_host = inputs.normal(shape.center_len(), 1.0);
        let logits = gpu.pool().upload(&to_bf16(&logits_host))?;
        let mut center = gpu.pool().upload(&center_host)?;
        update_center(gpu, &mut center, &logits, shape, momentum)?;
        let gpu_center = download_f32(&center)?;

        let mut cpu_center = center_host;
        let view_len = shape.logits_len() / shape.views;
        let views: Vec<&[f32]> = logits_host.chunks(view_len).collect();
        loss::update_center(
            &mut cpu_center,
            &views,
            shape.batch,
            shape.tokens,
            classes,
            momentum,
        );
        out.push(compare(
            format!("update_center: K = {classes}"),
            &gpu_center,
            &cpu_center,
            FP32_BOUND,
        ));
    }
    Ok(out)
}

/// This family's parity checks: teacher_stats and matched_ce under three losses (PWML,
/// DINO, PWLL) on layouts from random crops, and update_center, each at a K that takes the
/// element-wise path and one that takes the 16-byte path.
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "teacher_stats + matched_ce (PWML, K = 1003)",
            run: check_pwml,
        },
        KernelCheck {
            name: "teacher_stats + matched_ce (DINO, patch rows of weight 0, K = 1024, 999)",
            run: check_dino,
        },
        KernelCheck {
            name: "teacher_stats + matched_ce (PWLL lambda 0.3, K = 2056)",
            run: check_pwll,
        },
        KernelCheck {
            name: "update_center (K = 1003, 1024)",
            run: check_update_center,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Benches.

/// `n` bf16 values cycling through a few thousand N(0, 3^2) draws: realistic logits for a
/// timing, made at memory speed.
fn cycled_logits(rng: &mut Stream, n: usize) -> Vec<bf16> {
    // A period that divides no row length, so rows differ.
    const PERIOD: usize = 8191;
    let pattern: Vec<bf16> = (0..PERIOD)
        .map(|_| bf16::from_f32(3.0 * rng.normal()))
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let take = PERIOD.min(n - out.len());
        out.extend_from_slice(&pattern[..take]);
    }
    out
}

/// The paper's batch: 64 images, 2 global views of 224 (14 x 14 patches, 197 tokens) and 8
/// local views of 96 (6 x 6 patches), crops from a 320 x 320 source, the paper's scales.
fn paper_layout(batch: usize) -> StudentLayout {
    let mut rng = Stream::new(0xCE, [0, 0, 0], Purpose::Crop);
    let pairs = random_pairs(&mut rng, 320, (14, 6), 8);
    StudentLayout::new(&pairs, batch, true)
}

/// This family's benchmark cases at the paper's ImageNet-1K shape (K = 65536, batch 64,
/// PWML): teacher_stats, matched_ce (both kernels, and the row kernel alone) and
/// update_center. About 3.3 GB of teacher logits plus two `(R, K)` bf16 matrices.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    const K: usize = 65536;
    const B: usize = 64;
    let layout = paper_layout(B);
    let shape = TeacherShape {
        views: 2,
        batch: B,
        tokens: 197,
        classes: K,
    };
    let mut rng = Stream::new(0xCE, [1, 0, 0], Purpose::Init);
    let logits = Rc::new(
        gpu.pool()
            .upload(&cycled_logits(&mut rng, shape.logits_len()))?,
    );
    let center_host: Vec<f32> = (0..shape.center_len())
        .map(|i| 0.1 * (i % 17) as f32 - 0.8)
        .collect();
    let center = Rc::new(gpu.pool().upload(&center_host)?);
    let student = Rc::new(
        gpu.pool()
            .upload(&cycled_logits(&mut rng, layout.rows() * K))?,
    );
    let gl = Rc::new(GpuLayout::for_loss(gpu, &layout, LossKind::Pwml)?);
    let stats = Rc::new(RefCell::new(gpu.pool().alloc::<f32>(gl.stats_len())?));
    let grad = Rc::new(RefCell::new(gpu.pool().alloc::<bf16>(layout.rows() * K)?));
    let row_loss = Rc::new(RefCell::new(gpu.pool().alloc::<f32>(layout.rows())?));
    let mut center_ema = gpu.pool().upload(&center_host)?;

    let (nt, r, e) = (gl.teacher_tokens(), gl.rows(), gl.nonzero_terms());
    let row_bytes = (K * 2) as u64;
    let stats_read = (nt * B) as u64 * row_bytes;
    let terms_read = (e * B) as u64 * row_bytes;
    // Student read twice, gradient written once.
    let student_bytes = 3 * r as u64 * row_bytes;
    let tokens_used = layout
        .teacher_tokens()
        .iter()
        .map(|&(_, t)| t)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let center_read = (tokens_used * K * 4) as u64;
    let tau_t = 0.04;
    let tau_s = 0.1;

    let stats_case = {
        let (gl, logits, center, stats) =
            (gl.clone(), logits.clone(), center.clone(), stats.clone());
        BenchCase {
            name: format!("teacher_stats PWML {B} img x {nt} teacher tokens x K {K}"),
            bytes: stats_read + center_read,
            flops: 0,
            run: Box::new(move || {
                let teacher = GpuTeacher {
                    logits: &logits,
                    center: &center,
                    shape,
                    temperature: tau_t,
                };
                teacher_stats(gpu, &gl, &teacher, &mut stats.borrow_mut())
            }),
        }
    };
    let both_case = {
        let (gl, logits, center, student) =
            (gl.clone(), logits.clone(), center.clone(), student.clone());
        let (stats, grad, row_loss) = (stats.clone(), grad.clone(), row_loss.clone());
        BenchCase {
            name: format!(
                "matched_ce PWML {B} img x {} rows (R = {r}) x K {K}, teacher_stats + rows",
                gl.rows_per_image()
            ),
            bytes: stats_read + terms_read + student_bytes,
            flops: 0,
            run: Box::new(move || {
                let teacher = GpuTeacher {
                    logits: &logits,
                    center: &center,
                    shape,
                    temperature: tau_t,
                };
                let student = GpuStudent {
                    logits: &student,
                    temperature: tau_s,
                };
                let mut stats = stats.borrow_mut();
                teacher_stats(gpu, &gl, &teacher, &mut stats)?;
                matched_ce_rows(
                    gpu,
                    &gl,
                    &teacher,
                    &stats,
                    &student,
                    &mut grad.borrow_mut(),
                    &mut row_loss.borrow_mut(),
                )
            }),
        }
    };
    let rows_case = {
        let (gl, logits, center, student) = (gl, logits.clone(), center, student);
        BenchCase {
            name: format!("matched_ce rows only, PWML R = {r} x K {K}, {e} terms per image"),
            bytes: terms_read + student_bytes,
            flops: 0,
            run: Box::new(move || {
                let teacher = GpuTeacher {
                    logits: &logits,
                    center: &center,
                    shape,
                    temperature: tau_t,
                };
                let student = GpuStudent {
                    logits: &student,
                    temperature: tau_s,
                };
                matched_ce_rows(
                    gpu,
                    &gl,
                    &teacher,
                    &stats.borrow(),
                    &student,
                    &mut grad.borrow_mut(),
                    &mut row_loss.borrow_mut(),
                )
            }),
        }
    };
    let center_case = BenchCase {
        name: format!("update_center 2 views x {B} img x 197 tokens x K {K}"),
        bytes: shape.logits_len() as u64 * 2 + 2 * shape.center_len() as u64 * 4,
        flops: 0,
        run: Box::new(move || update_center(gpu, &mut center_ema, &logits, shape, 0.9)),
    };
    Ok(vec![stats_case, both_case, rows_case, center_case])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        teacher_view: usize,
        student_view: usize,
        first: &[u32],
        second: &[u32],
    ) -> PairMatches {
        PairMatches {
            teacher_view,
            student_view,
            matches: Matches {
                first: first.to_vec(),
                second: second.to_vec(),
            },
        }
    }

    /// Two globals and one local: the local's CLS has two terms, the global CLS one each.
    fn small_layout() -> StudentLayout {
        let pairs = vec![
            pair(0, 1, &[0, 3, 4], &[0, 5, 6]),
            pair(0, 2, &[0, 3], &[0, 1]),
            pair(1, 0, &[0, 2], &[0, 7]),
            pair(1, 2, &[0], &[0]),
        ];
        StudentLayout::new(&pairs, 2, true)
    }

    #[test]
    fn packing_keeps_the_nonzero_terms_of_each_row_in_order() {
        let layout = small_layout();
        let weights = layout.weights(LossKind::Pwml);
        let p = pack(&layout, &weights);
        assert_eq!(p.term_start.len(), layout.rows_per_image() + 1);
        assert_eq!(p.term_teacher.len(), layout.terms().len());
        for u in 0..layout.rows_per_image() {
            let (a, b) = (p.term_start[u] as usize, p.term_start[u + 1] as usize);
            let want: Vec<i32> = layout
                .terms_of(u)
                .iter()
                .map(|t| t.teacher as i32)
                .collect();
            assert_eq!(&p.term_teacher[a..b], &want[..]);
        }
        // The local view's CLS (view 2, token 0) is matched by both globals.
        assert_eq!(p.max_row_terms, 2);
        assert_eq!((p.views_needed, p.tokens_needed), (2, 5));
        let rows: Vec<(i32, i32)> = p.teacher_rows.chunks(2).map(|r| (r[0], r[1])).collect();
        let want: Vec<(i32, i32)> = layout
            .teacher_tokens()
            .iter()
            .map(|&(v, t)| (v as i32, t as i32))
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn zero_weights_leave_rows_without_terms_but_keep_totals() {
        let layout = small_layout();
        let weights = layout.weights(LossKind::Dino);
        let p = pack(&layout, &weights);
        for u in 0..layout.rows_per_image() {
            let kept = (p.term_start[u + 1] - p.term_start[u]) as usize;
            let is_cls = layout.student_tokens()[u].1 == 0;
            assert_eq!(kept > 0, is_cls, "row {u}");
            let total: f64 = layout
                .terms_of(u)
                .iter()
                .map(|t| f64::from(LossKind::Dino.term_weight(t.m as usize, t.count as usize)))
                .sum::<f64>()
                / (layout.batch() * layout.pairs()) as f64;
            assert!((p.row_total[u] - total).abs() < 1e-9, "row {u}");
        }
        let kept_weights = p.term_weight.iter().all(|&w| w != 0.0);
        assert!(kept_weights);
    }

    #[test]
    fn the_bench_layout_fits_its_memory_budget() {
        let layout = paper_layout(64);
        let bytes = 2 * layout.rows() * 65536 * 2 + 2 * 64 * 197 * 65536 * 2;
        assert!(bytes < 30 << 30, "{bytes} bytes");
        assert!(layout.rows_per_image() <= 2 * 197 + 8 * 37);
    }
}
