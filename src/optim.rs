//! Optimisation (SPEC.md section 6, DINO's defaults): AdamW over the flat parameter
//! buffer, the cosine schedules (learning rate, weight decay, teacher momentum), gradient
//! clipping, the last-layer freeze, and the teacher EMA.
//!
//! Everything here is a single elementwise pass (or a norm, summed in f64 over fixed
//! chunks in a fixed order) over buffers with the layout of a [`ParamTable`], so the
//! results do not depend on the number of threads. Nothing here knows about layers.

use std::f64::consts::PI;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::params::ParamTable;

/// Elements per parallel task in the elementwise passes and the norms. Fixed, so that the
/// f64 partial sums of a norm are the same whatever the thread count.
const CHUNK: usize = 1 << 14;

/// How gradients are clipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// Each tensor separately to the limit (DINO's `utils.clip_gradients`, the official code).
    PerTensor,
    /// All gradients together, scaled by one factor (PyTorch's `clip_grad_norm_`): the
    /// engine's default, so the update direction is never distorted tensor by tensor.
    #[default]
    GlobalNorm,
}

/// The optimiser section of a training configuration, DINO's defaults in `Default`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate for a batch of 256 images; the schedule peaks at
    /// `lr * batch / 256` (DINO: 5e-4).
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (DINO: 1e-6).
    pub min_lr: f64,
    /// Epochs of linear learning-rate warm-up from 0 (DINO: 10).
    pub warmup_epochs: usize,
    /// Weight decay at the start of training (DINO: 0.04).
    pub weight_decay: f64,
    /// Weight decay at the end of training, reached by a cosine (DINO: 0.4).
    pub weight_decay_end: f64,
    /// Teacher EMA momentum at the start (DINO: 0.996); raised to
    /// `momentum_teacher_end` by a cosine over all iterations.
    pub momentum_teacher: f64,
    /// Teacher EMA momentum at the end (DINO: 1).
    pub momentum_teacher_end: f64,
    /// Gradient-norm limit; 0 turns clipping off (DINO: 3.0).
    pub clip_grad: f64,
    /// Per tensor (DINO's official code) or global norm.
    pub clip_mode: ClipMode,
    /// Epochs during which the head's last layer gets no update (DINO: 1).
    pub freeze_last_layer: usize,
    /// AdamW's beta1 (0.9).
    pub beta1: f64,
    /// AdamW's beta2 (0.999).
    pub beta2: f64,
    /// AdamW's epsilon (1e-8).
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            momentum_teacher_end: 1.0,
            clip_grad: 3.0,
            clip_mode: ClipMode::GlobalNorm,
            freeze_last_layer: 1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The three per-iteration schedules of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedules {
    /// Learning rate: linear warm-up from 0 to `lr * batch / 256`, then cosine to `min_lr`.
    pub lr: CosineSchedule,
    /// Weight decay: cosine from `weight_decay` to `weight_decay_end`.
    pub weight_decay: CosineSchedule,
    /// Teacher momentum: cosine from `momentum_teacher` to `momentum_teacher_end`.
    pub momentum: CosineSchedule,
}

impl OptimConfig {
    /// Refuses impossible values, naming the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let non_negative = [
            (
                "optim.lr",
                self.lr,
                "a learning rate (DINO: 5e-4 per 256 images)",
            ),
            ("optim.min_lr", self.min_lr, "a learning rate (DINO: 1e-6)"),
            (
                "optim.weight_decay",
                self.weight_decay,
                "a weight decay (DINO: 0.04)",
            ),
            (
                "optim.weight_decay_end",
                self.weight_decay_end,
                "a weight decay (DINO: 0.4)",
            ),
            (
                "optim.clip_grad",
                self.clip_grad,
                "a norm limit (DINO: 3.0; 0 turns clipping off)",
            ),
        ];
        for (field, x, what) in non_negative {
            if !(x.is_finite() && x >= 0.0) {
                return Err(Error::bad_config(
                    field,
                    format!("{x} is not {what}: give a finite number >= 0"),
                ));
            }
        }
        let unit = [
            (
                "optim.momentum_teacher",
                self.momentum_teacher,
                "DINO: 0.996",
            ),
            (
                "optim.momentum_teacher_end",
                self.momentum_teacher_end,
                "DINO: 1",
            ),
        ];
        for (field, x, dino) in unit {
            if !(0.0..=1.0).contains(&x) {
                return Err(Error::bad_config(
                    field,
                    format!("{x} is not an EMA momentum: give a value in [0, 1] ({dino})"),
                ));
            }
        }
        let betas = [
            ("optim.beta1", self.beta1, "0.9"),
            ("optim.beta2", self.beta2, "0.999"),
        ];
        for (field, x, usual) in betas {
            if !(0.0..1.0).contains(&x) {
                return Err(Error::bad_config(
                    field,
                    format!("{x} is not an Adam beta: give a value in [0, 1) (usually {usual})"),
                ));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::bad_config(
                "optim.eps",
                format!(
                    "{} is not an Adam epsilon: give a small positive number (1e-8)",
                    self.eps
                ),
            ));
        }
        Ok(())
    }

    /// The learning rate at the top of the warm-up: `lr * batch / 256` (DINO's linear
    /// scaling rule; `batch` is the total over all devices).
    pub fn peak_lr(&self, batch: usize) -> f64 {
        self.lr * batch as f64 / 256.0
    }

    /// The schedules of a run of `epochs` epochs of `steps_per_epoch` iterations with a
    /// total batch of `batch` images, as DINO builds them in `main_dino.py`.
    pub fn schedules(
        &self,
        batch: usize,
        epochs: usize,
        steps_per_epoch: usize,
    ) -> Result<Schedules> {
        self.validate()?;
        if self.warmup_epochs > epochs {
            return Err(Error::bad_config(
                "optim.warmup_epochs",
                format!(
                    "a warm-up of {} epochs is longer than the {epochs} epochs of training: \
                     give at most {epochs}",
                    self.warmup_epochs
                ),
            ));
        }
        let cosine = |base, end, warmup| CosineSchedule {
            base,
            final_value: end,
            iters: (epochs * steps_per_epoch) as u64,
            warmup_iters: (warmup * steps_per_epoch) as u64,
            start_warmup: 0.0,
        };
        Ok(Schedules {
            lr: cosine(self.peak_lr(batch), self.min_lr, self.warmup_epochs),
            weight_decay: cosine(self.weight_decay, self.weight_decay_end, 0),
            momentum: cosine(self.momentum_teacher, self.momentum_teacher_end, 0),
        })
    }

    /// A fresh AdamW with this configuration's betas and epsilon for a buffer of `len`.
    pub fn adamw(&self, len: usize) -> AdamW {
        AdamW {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            ..AdamW::new(len)
        }
    }
}

/// DINO's `utils.cosine_scheduler` in closed form: iteration `i` of `iters` is
/// - during the warm-up (`i < warmup_iters`): `np.linspace(start_warmup, base,
///   warmup_iters)[i]`, so the warm-up's last iteration is already `base`;
/// - then, with `j = i - warmup_iters` and `n = iters - warmup_iters`:
///   `final + 0.5 (base - final) (1 + cos(pi j / n))`; the last iteration (`j = n - 1`)
///   is close to, not exactly, `final`.
///
/// Iterations at or past `iters` (DINO would index out of range) give `final`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CosineSchedule {
    /// Value at the end of the warm-up, where the cosine starts.
    pub base: f64,
    /// Value the cosine reaches after the last iteration.
    pub final_value: f64,
    /// Total iterations, `epochs * steps_per_epoch`.
    pub iters: u64,
    /// Warm-up iterations, `warmup_epochs * steps_per_epoch`.
    pub warmup_iters: u64,
    /// Value at iteration 0 when there is a warm-up.
    pub start_warmup: f64,
}

impl CosineSchedule {
    /// DINO's `cosine_scheduler(base, final, epochs, steps_per_epoch, warmup_epochs,
    /// start_warmup)`. A warm-up longer than the run is cut to the run.
    pub fn new(
        base: f64,
        final_value: f64,
        epochs: usize,
        steps_per_epoch: usize,
        warmup_epochs: usize,
        start_warmup: f64,
    ) -> CosineSchedule {
        let iters = (epochs * steps_per_epoch) as u64;
        CosineSchedule {
            base,
            final_value,
            iters,
            warmup_iters: ((warmup_epochs * steps_per_epoch) as u64).min(iters),
            start_warmup,
        }
    }

    /// The value at iteration `step` (0-based, counted over the whole run).
    pub fn at(&self, step: u64) -> f64 {
        let w = self.warmup_iters.min(self.iters);
        if step < w {
            // numpy's linspace: start + i * step, the last point set to stop exactly.
            if step + 1 == w {
                return if w == 1 { self.start_warmup } else { self.base };
            }
            let delta = (self.base - self.start_warmup) / (w - 1) as f64;
            return step as f64 * delta + self.start_warmup;
        }
        if step >= self.iters {
            return self.final_value;
        }
        let (j, n) = ((step - w) as f64, (self.iters - w) as f64);
        self.final_value + 0.5 * (self.base - self.final_value) * (1.0 + (PI * j / n).cos())
    }

    /// The whole schedule as DINO's array (`iters` values); for comparisons and plots.
    pub fn to_vec(&self) -> Vec<f64> {
        (0..self.iters).map(|i| self.at(i)).collect()
    }
}

/// AdamW over a flat buffer with PyTorch's semantics (`torch.optim.AdamW`, default
/// non-amsgrad path): per element, with `t` the step count after incrementing,
/// `p -= lr * wd * mask * p` (decoupled weight decay, applied first), `m = b1 m + (1-b1) g`,
/// `v = b2 v + (1-b2) g^2`, `p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
/// Moments are stored in f32 (as PyTorch); each element's update is computed in f64.
///
/// The fields are public so that checkpoints can save and restore the state.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// First moment, same layout as the parameters.
    pub m: Vec<f32>,
    /// Second moment, same layout as the parameters.
    pub v: Vec<f32>,
    /// Steps taken so far (PyTorch's `state['step']`).
    pub step: u64,
    /// Decay rate of the first moment (0.9).
    pub beta1: f64,
    /// Decay rate of the second moment (0.999).
    pub beta2: f64,
    /// Added to the denominator (1e-8).
    pub eps: f64,
}

impl AdamW {
    /// Fresh state (zero moments, step 0) for a buffer of `len`, PyTorch's default betas
    /// (0.9, 0.999) and eps 1e-8.
    pub fn new(len: usize) -> AdamW {
        AdamW {
            m: vec![0.0; len],
            v: vec![0.0; len],
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// State restored from a checkpoint, default betas and eps (set the fields to change
    /// them). Refuses moments of different lengths.
    pub fn from_state(m: Vec<f32>, v: Vec<f32>, step: u64) -> Result<AdamW> {
        if m.len() != v.len() {
            return Err(Error::bad_config(
                "optimizer state",
                format!(
                    "first moment has {} elements but second moment {}: the checkpoint is \
                     damaged or from another model; resume from another checkpoint",
                    m.len(),
                    v.len()
                ),
            ));
        }
        Ok(AdamW {
            m,
            v,
            step,
            ..AdamW::new(0)
        })
    }

    /// One step over the whole buffer. Weight decay applies where `decay_mask` is 1
    /// (a [`ParamTable::decay_mask`]); elsewhere `wd` is ignored.
    ///
    /// # Panics
    /// If `params`, `grads`, `decay_mask` and the moments differ in length.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        wd: f32,
        decay_mask: &[f32],
    ) {
        let n = self.m.len();
        assert!(
            params.len() == n && grads.len() == n && decay_mask.len() == n && self.v.len() == n,
            "AdamW: params, grads, mask and moments must have one layout"
        );
        self.step += 1;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let step_size = f64::from(lr) / (1.0 - b1.powi(t));
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let lr_wd = f64::from(lr) * f64::from(wd);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(decay_mask.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .for_each(|((((p, g), mask), m), v)| {
                for ((((p, &g), &mask), m), v) in p.iter_mut().zip(g).zip(mask).zip(m).zip(v) {
                    let g = f64::from(g);
                    let mut x = f64::from(*p);
                    x *= 1.0 - lr_wd * f64::from(mask);
                    let m1 = b1 * f64::from(*m) + (1.0 - b1) * g;
                    let v1 = b2 * f64::from(*v) + (1.0 - b2) * g * g;
                    *m = m1 as f32;
                    *v = v1 as f32;
                    let denom = f64::from(*v).sqrt() / bc2_sqrt + eps;
                    x -= step_size * f64::from(*m) / denom;
                    *p = x as f32;
                }
            });
    }
}

/// Name prefix of the head's last layer, frozen during the first epochs.
pub const LAST_LAYER_PREFIX: &str = "head.last_layer";

/// Zeroes the gradients of every tensor whose name starts with `head.last_layer` while
/// `epoch < freeze_epochs` (DINO's `cancel_gradients_last_layer`); returns whether it did.
///
/// DINO sets those gradients to `None`, so PyTorch's AdamW skips the tensors altogether.
/// Zeroed gradients take them out of the gradient norm and the clipping; the trainer also
/// skips the layer in the optimiser while frozen (`train::step::SplitAdamW`), so it gets
/// no weight decay and its bias correction counts its own steps, as in PyTorch.
pub fn cancel_last_layer_grads(
    grads: &mut [f32],
    table: &ParamTable,
    epoch: usize,
    freeze_epochs: usize,
) -> bool {
    if epoch >= freeze_epochs {
        return false;
    }
    let mut any = false;
    for t in table
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(LAST_LAYER_PREFIX))
    {
        grads[t.range()].fill(0.0);
        any = true;
    }
    any
}

/// Sum of squares in f64: fixed chunks summed in parallel, the partial sums added in
/// chunk order, so the result does not depend on the number of threads.
fn sum_squares(x: &[f32]) -> f64 {
    let square = |c: &[f32]| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
    if x.len() <= CHUNK {
        return square(x);
    }
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(square).collect();
    partial.iter().sum()
}

/// Multiplies every element by `s`, in parallel.
fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// The L2 norm of a buffer, summed in f64 in a fixed order.
pub fn l2_norm(x: &[f32]) -> f32 {
    sum_squares(x).sqrt() as f32
}

/// Clips the whole gradient buffer to a global L2 norm of `max_norm`: when the norm
/// exceeds it, every element is scaled by `max_norm / (norm + 1e-6)` (PyTorch's
/// `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = sum_squares(grads).sqrt();
    if norm > f64::from(max_norm) {
        scale(grads, (f64::from(max_norm) / (norm + 1e-6)) as f32);
    }
    norm as f32
}

/// Clips each tensor of `table` separately (DINO's `utils.clip_gradients`, the official
/// code's choice): `coef = max_norm / (norm + 1e-6)`, and the tensor is scaled by `coef`
/// when `coef < 1`. Returns every tensor's norm before clipping, in table order. Padding
/// between tensors is not touched.
pub fn clip_per_tensor(grads: &mut [f32], table: &ParamTable, max_norm: f32) -> Vec<f32> {
    table
        .tensors()
        .iter()
        .map(|t| {
            let g = &mut grads[t.range()];
            let norm = sum_squares(g).sqrt();
            let coef = f64::from(max_norm) / (norm + 1e-6);
            if coef < 1.0 {
                scale(g, coef as f32);
            }
            norm as f32
        })
        .collect()
}

/// The teacher's exponential moving average of the student, over the whole buffer (head
/// included): `t = m * t + (1 - m) * s`, as DINO computes it in f32.
///
/// # Panics
/// If the buffers differ in length.
pub fn ema_update(teacher: &mut [f32], student: &[f32], momentum: f32) {
    assert_eq!(
        teacher.len(),
        student.len(),
        "teacher and student must have one layout"
    );
    let one_minus = 1.0 - momentum;
    teacher
        .par_chunks_mut(CHUNK)
        .zip(student.par_chunks(CHUNK))
        .for_each(|(t, s)| {
            for (t, &s) in t.iter_mut().zip(s) {
                *t = *t * momentum + one_minus * s;
            }
        });
}

/// Whether any element is NaN or infinite (DINO stops training on a non-finite loss).
pub fn has_non_finite(buf: &[f32]) -> bool {
    buf.par_chunks(CHUNK)
        .any(|c| c.iter().any(|v| !v.is_finite()))
}
