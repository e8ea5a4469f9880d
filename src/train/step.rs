//! One PW-Self training step on the CPU (SPEC.md sections 4-6):
//! teacher on the global views (no gradient) -> teacher head on all its tokens;
//! student on every view (stochastic depth) -> student head on the matched student tokens
//! only -> fused matched-token cross-entropy -> backward -> last-layer freeze -> clipping
//! -> AdamW -> teacher EMA -> center update. A step with a non-finite loss or gradient
//! changes nothing (no parameter, moment, center or EMA update) and says so.

use crate::cpu::{resize_zeroed, zero};
use crate::loss::{pwself_loss, update_center, LossConfig, LossKind, StudentLayout, TeacherLogits};
use crate::model::params::ParamTable;
use crate::model::vit::{BackboneActs, DropPath, HeadActs, LastLayer, Network};
use crate::optim::{
    cancel_last_layer_grads, clip_global_norm, clip_per_tensor, ema_update, has_non_finite,
    l2_norm, AdamW, ClipMode, OptimConfig, Schedules,
};
use crate::views::batch::ViewBatch;
use crate::views::config::ViewConfig;

/// AdamW as DINO runs it. During the last-layer freeze PyTorch leaves that layer's
/// gradients `None`, so AdamW skips it entirely: no weight decay, no moment update, and
/// its step count (for the bias corrections) only starts when the freeze ends. The last
/// layer is the tail of the flat buffer, so it gets its own [`AdamW`] over that tail.
#[derive(Clone, Debug)]
pub struct SplitAdamW {
    /// Everything before the last layer.
    pub main: AdamW,
    /// `head.last_layer.weight_v`.
    pub last: AdamW,
    /// Where the last layer starts in the flat buffer.
    pub split: usize,
}

impl SplitAdamW {
    /// Fresh state for a buffer of `len` elements whose last layer starts at `split`.
    pub fn new(len: usize, split: usize, cfg: &OptimConfig) -> SplitAdamW {
        let with = |a: AdamW| AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            ..a
        };
        SplitAdamW {
            main: with(AdamW::new(split)),
            last: with(AdamW::new(len - split)),
            split,
        }
    }

    /// Restored state: whole-buffer moments and the two step counts.
    pub fn from_state(
        m: Vec<f32>,
        v: Vec<f32>,
        steps: (u64, u64),
        split: usize,
        cfg: &OptimConfig,
    ) -> crate::Result<SplitAdamW> {
        let with = |a: AdamW| AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            ..a
        };
        let main = AdamW::from_state(m[..split].to_vec(), v[..split].to_vec(), steps.0)?;
        let last = AdamW::from_state(m[split..].to_vec(), v[split..].to_vec(), steps.1)?;
        Ok(SplitAdamW {
            main: with(main),
            last: with(last),
            split,
        })
    }

    /// The first moment over the whole buffer.
    pub fn m(&self) -> Vec<f32> {
        [self.main.m.as_slice(), self.last.m.as_slice()].concat()
    }

    /// The second moment over the whole buffer.
    pub fn v(&self) -> Vec<f32> {
        [self.main.v.as_slice(), self.last.v.as_slice()].concat()
    }

    /// One update; with `frozen` the last layer is left alone.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        wd: f32,
        mask: &[f32],
        frozen: bool,
    ) {
        let s = self.split;
        self.main
            .step(&mut params[..s], &grads[..s], lr, wd, &mask[..s]);
        if !frozen {
            self.last
                .step(&mut params[s..], &grads[s..], lr, wd, &mask[s..]);
        }
    }
}

/// The state that changes from step to step.
#[derive(Clone, Debug)]
pub struct Weights {
    pub student: Vec<f32>,
    pub teacher: Vec<f32>,
    pub adam: SplitAdamW,
    /// Teacher center, `(T_g, K)`.
    pub center: Vec<f32>,
}

/// What one step reports.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StepStats {
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f32,
    /// Gradient norm before clipping (all tensors together).
    pub grad_norm: f32,
    /// Student rows that went through the head (matched tokens of the batch).
    pub head_rows: usize,
    /// True when the step was skipped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// Runs training steps; holds the scratch buffers reused across steps.
pub struct StepRunner {
    pub net: Network,
    pub views: ViewConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub schedules: Schedules,
    pub steps_per_epoch: u64,
    pub seed: u64,
    decay_mask: Vec<f32>,
    grads: Vec<f32>,
    t_acts: BackboneActs,
    t_head: HeadActs,
    s_acts: [BackboneActs; 2],
    s_head: HeadActs,
    /// The loss gradient w.r.t. the student logits, (rows, K), kept between steps: at
    /// K = 65,536 it is hundreds of MB, which the allocator would otherwise map, fault in
    /// and zero afresh every step. `matched_ce` writes every element.
    dlogits: Vec<f32>,
    /// The rest of the step's working buffers, kept for their capacity for the same
    /// reason (together with the activations above, a step allocates nothing large once
    /// the first step has run): the global and local views concatenated, the matched
    /// student tokens and their gradient, the gradient w.r.t. each student backbone's
    /// output, and both networks' weight-normalised last layers.
    work: StepBuffers,
    /// Test-only NaN injection (see [`NanFaults`]); empty in normal runs.
    pub faults: NanFaults,
}

/// Where [`NanFaults`] puts a NaN.
/// See [`StepRunner`]'s `work`.
#[derive(Default)]
struct StepBuffers {
    globals: Vec<f32>,
    locals: Vec<f32>,
    gathered: Vec<f32>,
    dgathered: Vec<f32>,
    dtokens: [Vec<f32>; 2],
    t_last: LastLayer,
    s_last: LastLayer,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NanTarget {
    /// The step's loss.
    Loss,
    /// The first gradient element of the tensor at this flat-buffer offset.
    Gradient(usize),
}

/// Test hook: steps whose loss or gradient is made NaN, to exercise the skip and abort
/// logic. Set from `PWSELF_TEST_NAN_STEPS` (test-only; read once at the start of a run):
/// a comma-separated list of `STEP` (NaN in the gradient of the middle tensor of the
/// parameter table), `STEP:loss` or `STEP:TENSOR` (NaN in that tensor's gradient).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NanFaults {
    steps: Vec<(u64, NanTarget)>,
}

impl NanFaults {
    /// The environment variable that sets the faults.
    pub const ENV: &'static str = "PWSELF_TEST_NAN_STEPS";

    /// Parses a `PWSELF_TEST_NAN_STEPS` value against `table`'s tensor names.
    pub fn parse(spec: &str, table: &ParamTable) -> crate::Result<NanFaults> {
        let bad = |reason: String| crate::Error::bad_config(Self::ENV, reason);
        let mut steps = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (step, target) = match item.split_once(':') {
                Some((s, t)) => (s, Some(t)),
                None => (item, None),
            };
            let step: u64 = step.parse().map_err(|_| {
                bad(format!(
                    "`{item}`: the step is not a number; write e.g. `3,4:loss,5:norm.weight`"
                ))
            })?;
            let tensors = table.tensors();
            if tensors.is_empty() {
                return Err(bad("the network has no parameters to fault".into()));
            }
            let target = match target {
                Some("loss") => NanTarget::Loss,
                Some(name) => NanTarget::Gradient(
                    table
                        .get(name)
                        .ok_or_else(|| bad(format!("`{item}`: no tensor `{name}`; write `loss` or a parameter name such as `{}`", tensors[0].name)))?
                        .offset,
                ),
                None => NanTarget::Gradient(tensors[tensors.len() / 2].offset),
            };
            steps.push((step, target));
        }
        Ok(NanFaults { steps })
    }

    /// Whether no step is faulted.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    fn at(&self, step: u64) -> impl Iterator<Item = &NanTarget> {
        self.steps
            .iter()
            .filter(move |(s, _)| *s == step)
            .map(|(_, t)| t)
    }
}

impl StepRunner {
    /// A runner for `net` on batches built with `views`.
    pub fn new(
        net: Network,
        views: ViewConfig,
        loss: LossConfig,
        optim: OptimConfig,
        schedules: Schedules,
        steps_per_epoch: u64,
        seed: u64,
    ) -> StepRunner {
        let n = net.table.total();
        StepRunner {
            decay_mask: net.table.decay_mask(),
            grads: vec![0.0; n],
            net,
            views,
            loss,
            optim,
            schedules,
            steps_per_epoch,
            seed,
            t_acts: BackboneActs::default(),
            t_head: HeadActs::default(),
            s_acts: [BackboneActs::default(), BackboneActs::default()],
            s_head: HeadActs::default(),
            dlogits: Vec::new(),
            work: StepBuffers::default(),
            faults: NanFaults::default(),
        }
    }

    /// Tokens per global view (`1 + grid^2`): the rows of the center.
    pub fn teacher_tokens(&self) -> usize {
        let g = self.views.grid(0);
        1 + g * g
    }

    /// Where the head's last layer starts in the flat buffer (it is the last tensor).
    pub fn last_layer_offset(&self) -> usize {
        self.net.table.info("head.last_layer.weight_v").offset
    }

    /// Fresh weights: student initialised from `seed`, the teacher a copy (as DINO), zero
    /// moments and center.
    pub fn init_weights(&self) -> Weights {
        let student = self.net.init(self.seed);
        Weights {
            teacher: student.clone(),
            adam: SplitAdamW::new(student.len(), self.last_layer_offset(), &self.optim),
            student,
            center: vec![0.0; self.teacher_tokens() * self.net.head.out_dim],
        }
    }

    /// Writes the images of views `range` of `batch` into `out`, concatenated view-major:
    /// `(n_views * B, C, S, S)`.
    fn concat_into(out: &mut Vec<f32>, batch: &ViewBatch, range: std::ops::Range<usize>) {
        out.clear();
        for view in &batch.views[range] {
            out.extend_from_slice(view);
        }
    }

    /// The loss of `batch` under `w` and its gradient w.r.t. the student parameters (in
    /// [`grads`](Self::grads)); the teacher's logits stay in the runner for the center
    /// update. Changes no weight.
    pub fn forward_backward(&mut self, w: &Weights, batch: &ViewBatch) -> StepStats {
        let step = batch.index;
        let epoch = step / self.steps_per_epoch.max(1);
        let (b, d, k) = (batch.len(), self.net.vit.embed_dim, self.net.head.out_dim);
        let (ng, nl) = (self.views.global.count, self.views.local.count);
        let (gside, lside) = (self.views.global.side, self.views.local.side);
        let t_g = self.teacher_tokens();
        let mut stats = StepStats {
            step,
            epoch,
            lr: self.schedules.lr.at(step),
            weight_decay: self.schedules.weight_decay.at(step),
            momentum: self.schedules.momentum.at(step),
            teacher_temp: self.loss.teacher_temp_at(epoch as usize),
            ..StepStats::default()
        };
        let net = &self.net;
        let work = &mut self.work;

        // Teacher: globals only, no drop path, head on every token.
        Self::concat_into(&mut work.globals, batch, 0..ng);
        let globals = &work.globals;
        net.backbone_forward(&w.teacher, globals, ng * b, gside, None, &mut self.t_acts);
        net.last_layer_into(&w.teacher, &mut work.t_last);
        net.head_forward(
            &w.teacher,
            &work.t_last,
            &self.t_acts.out,
            ng * b * t_g,
            &mut self.t_head,
        );

        // Student: globals (call 0) and locals (call 1) with stochastic depth.
        let drop = |call| {
            Some(DropPath {
                seed: self.seed,
                step,
                call,
            })
        };
        net.backbone_forward(
            &w.student,
            globals,
            ng * b,
            gside,
            drop(0),
            &mut self.s_acts[0],
        );
        Self::concat_into(&mut work.locals, batch, ng..ng + nl);
        if nl > 0 {
            net.backbone_forward(
                &w.student,
                &work.locals,
                nl * b,
                lside,
                drop(1),
                &mut self.s_acts[1],
            );
        }
        let t_l = self.s_acts[1].tokens;

        // Only the matched student tokens go through the head.
        let layout = StudentLayout::new(&batch.pairs, b, self.loss.kind.uses_patches());
        let rows = layout.rows();
        let token_at = |view: usize, image: usize, token: usize| -> (usize, usize) {
            if view < ng {
                (0, ((view * b + image) * t_g + token) * d)
            } else {
                (1, (((view - ng) * b + image) * t_l + token) * d)
            }
        };
        let gathered = &mut work.gathered;
        gathered.resize(rows * d, 0.0); // every row is overwritten below
        for (r, (image, view, token)) in layout.gather_list().enumerate() {
            let (call, at) = token_at(view as usize, image, token as usize);
            gathered[r * d..(r + 1) * d].copy_from_slice(&self.s_acts[call].out[at..at + d]);
        }
        net.last_layer_into(&w.student, &mut work.s_last);
        net.head_forward(&w.student, &work.s_last, gathered, rows, &mut self.s_head);
        stats.head_rows = rows;

        // Loss and its gradient w.r.t. the student logits.
        let per_view = b * t_g * k;
        let t_views: Vec<&[f32]> = self.t_head.logits.chunks_exact(per_view).collect();
        let teacher = TeacherLogits {
            views: &t_views,
            center: &w.center,
            tokens: t_g,
            classes: k,
            temperature: stats.teacher_temp,
        };
        let mut dlogits = std::mem::take(&mut self.dlogits);
        dlogits.resize(rows * k, 0.0); // capacity kept between steps; every element rewritten
        stats.loss = pwself_loss(
            &layout,
            self.loss.kind,
            &teacher,
            &self.s_head.logits,
            self.loss.student_temp,
            &mut dlogits,
        );

        // Backward.
        zero(&mut self.grads);
        let dgathered = &mut work.dgathered;
        resize_zeroed(dgathered, rows * d);
        net.head_backward(
            &w.student,
            &mut self.grads,
            &work.s_last,
            &mut self.s_head,
            &work.gathered,
            &dlogits,
            dgathered,
        );
        self.dlogits = dlogits;
        let dtokens = &mut work.dtokens;
        for (buf, acts) in dtokens.iter_mut().zip(&self.s_acts) {
            resize_zeroed(buf, acts.out.len());
        }
        for (r, (image, view, token)) in layout.gather_list().enumerate() {
            let (call, at) = token_at(view as usize, image, token as usize);
            dtokens[call][at..at + d]
                .iter_mut()
                .zip(&dgathered[r * d..(r + 1) * d])
                .for_each(|(a, g)| *a += g);
        }
        net.backbone_backward(
            &w.student,
            &mut self.grads,
            &mut self.s_acts[0],
            &dtokens[0],
        );
        if nl > 0 {
            net.backbone_backward(
                &w.student,
                &mut self.grads,
                &mut self.s_acts[1],
                &dtokens[1],
            );
        }
        stats
    }

    /// The gradient of the last [`forward_backward`](Self::forward_backward).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// The name of the first tensor (in the table's order) whose gradient from the last
    /// step holds a NaN or an infinity.
    pub fn first_non_finite_grad(&self) -> Option<&str> {
        self.net
            .table
            .tensors()
            .iter()
            .find(|t| self.grads[t.range()].iter().any(|g| !g.is_finite()))
            .map(|t| t.name.as_str())
    }

    /// One training step on `batch` (its index is the step number).
    pub fn step(&mut self, w: &mut Weights, batch: &ViewBatch) -> StepStats {
        let mut stats = self.forward_backward(w, batch);
        let (epoch, b, k, t_g) = (
            stats.epoch,
            batch.len(),
            self.net.head.out_dim,
            self.teacher_tokens(),
        );
        let net = &self.net;
        // Optimisation.
        // Frozen: the gradients are zeroed (out of the norm and the clipping, as DINO's
        // `None`), and the optimiser skips the layer (see SplitAdamW).
        let frozen = cancel_last_layer_grads(
            &mut self.grads,
            &net.table,
            epoch as usize,
            self.optim.freeze_last_layer,
        );
        for target in self.faults.at(stats.step) {
            match *target {
                NanTarget::Loss => stats.loss = f32::NAN,
                NanTarget::Gradient(at) => self.grads[at] = f32::NAN,
            }
        }
        stats.grad_norm = l2_norm(&self.grads);
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() || has_non_finite(&self.grads) {
            stats.skipped = true;
            return stats;
        }
        if self.optim.clip_grad > 0.0 {
            match self.optim.clip_mode {
                ClipMode::PerTensor => {
                    clip_per_tensor(&mut self.grads, &net.table, self.optim.clip_grad as f32);
                }
                ClipMode::GlobalNorm => {
                    clip_global_norm(&mut self.grads, self.optim.clip_grad as f32);
                }
            }
        }
        w.adam.step(
            &mut w.student,
            &self.grads,
            stats.lr as f32,
            stats.weight_decay as f32,
            &self.decay_mask,
            frozen,
        );
        ema_update(&mut w.teacher, &w.student, stats.momentum as f32);
        let t_views: Vec<&[f32]> = self.t_head.logits.chunks_exact(b * t_g * k).collect();
        update_center(
            &mut w.center,
            &t_views,
            b,
            t_g,
            k,
            self.loss.center_momentum,
        );
        stats
    }
}

/// Whether the loss kind trains patch tokens (for messages).
pub fn describes(kind: LossKind) -> &'static str {
    match kind {
        LossKind::Dino => "DINO (CLS only)",
        LossKind::Pwml => "PWML (mean over matched tokens)",
        LossKind::Pwsl => "PWSL (sum over matched tokens)",
        LossKind::Pwll { .. } => "PWLL (lambda CLS + (1-lambda) patch mean)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_last_layer_gets_no_decay_and_counts_its_own_steps() {
        let cfg = OptimConfig::default();
        let mut opt = SplitAdamW::new(8, 5, &cfg);
        let mut p = vec![1.0f32; 8];
        let (g, mask) = (vec![0.0f32; 8], vec![1.0f32; 8]);
        opt.step(&mut p, &g, 0.1, 0.5, &mask, true);
        // Decoupled decay on the main part: 1 - lr * wd = 0.95; the frozen tail untouched.
        assert!(p[..5].iter().all(|&x| (x - 0.95).abs() < 1e-7), "{p:?}");
        assert!(p[5..].iter().all(|&x| x == 1.0), "{p:?}");
        assert_eq!((opt.main.step, opt.last.step), (1, 0));
        opt.step(&mut p, &g, 0.1, 0.5, &mask, false);
        assert_eq!((opt.main.step, opt.last.step), (2, 1));
        assert!(p[5..].iter().all(|&x| (x - 0.95).abs() < 1e-7));
        assert_eq!(opt.m().len(), 8);
    }

    #[test]
    fn nan_fault_specs_parse_or_name_what_is_wrong() {
        let mut t = ParamTable::new();
        t.push("a", &[2]);
        t.push("b", &[3]);
        t.push("c", &[4]);
        let f = NanFaults::parse("3, 4:loss,5:c", &t).unwrap();
        let (b, c) = (t.info("b").offset, t.info("c").offset);
        assert_eq!(f.at(3).collect::<Vec<_>>(), [&NanTarget::Gradient(b)]);
        assert_eq!(f.at(4).collect::<Vec<_>>(), [&NanTarget::Loss]);
        assert_eq!(f.at(5).collect::<Vec<_>>(), [&NanTarget::Gradient(c)]);
        assert_eq!(f.at(6).count(), 0);
        let e = NanFaults::parse("3:nope", &t).unwrap_err().to_string();
        assert!(
            e.contains("PWSELF_TEST_NAN_STEPS") && e.contains("nope"),
            "{e}"
        );
        let e = NanFaults::parse("x", &t).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }
}
