//! The GPU side of `pwself-engine train`: a [`GpuStep`] fed by the GPU view builder.
//!
//! The training loop ([`crate::train::run`]) hands each batch's metadata (images, crop
//! records, matched pairs; no pixels, see [`ViewLoader::start_headers`]) to
//! [`GpuTrainer::step`], which uploads the batch's source images as bytes, builds every
//! view on the device in bf16 ([`GpuViewBuilder`], the same draws as the CPU's
//! [`ViewBuilder`] for the same seed and batch index), and runs the step on them. The
//! loader thread prepares the next batch's metadata and matches while the GPU works; the
//! host waits once per step, when the step reads back the loss, the gradient norm and the
//! skip flag.
//!
//! [`ViewLoader::start_headers`]: crate::views::batch::ViewLoader::start_headers
//! [`ViewBuilder`]: crate::views::batch::ViewBuilder

use std::sync::Arc;

use half::bf16;

use super::context::Gpu;
use super::step::{GpuStep, StepBatch, StepViews};
use super::views::GpuViewBuilder;
use crate::data::Pack;
use crate::error::Result;
use crate::train::features;
use crate::train::step::{StepRunner, StepStats, Weights};
use crate::views::batch::ViewBatch;

/// A training run's state on the GPU.
pub struct GpuTrainer {
    gpu: Gpu,
    step: GpuStep,
    views: GpuViewBuilder,
    pack: Arc<Pack>,
}

impl GpuTrainer {
    /// Uploads `w` for `runner`'s network, views, loss and schedules, and prepares the view
    /// builder for `pack` with the run's `seed`.
    pub fn new(
        gpu: Gpu,
        runner: &StepRunner,
        w: &Weights,
        seed: u64,
        pack: Arc<Pack>,
    ) -> Result<GpuTrainer> {
        let step = GpuStep::new(&gpu, runner, w)?;
        let views = GpuViewBuilder::new(runner.views.clone(), seed, &pack)?;
        Ok(GpuTrainer {
            gpu,
            step,
            views,
            pack,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The device, in words (`NVIDIA H100 80GB HBM3`, or the emulator's name).
    pub fn device(&self) -> &str {
        self.gpu.name()
    }

    /// One training step on `batch` (metadata only; its `views` are not read): builds its
    /// views on the device, then runs [`GpuStep::step_on`].
    pub fn step(&mut self, batch: &ViewBatch) -> Result<StepStats> {
        let pool = self.gpu.pool();
        let src = pool.upload(&self.views.gather(&self.pack, &batch.images)?)?;
        let plan = self.views.prepare(&self.gpu, batch.index, batch.len())?;
        debug_assert_eq!(
            plan.crops, batch.crops,
            "the GPU view builder drew other crops than the loader"
        );
        let mut pixels = pool.alloc::<bf16>(plan.layout.total)?;
        self.views
            .launch_bf16(&self.gpu, &plan, &src, &mut pixels)?;
        let globals = self.views.config().global.count;
        let total = plan.layout.total;
        let split = plan.layout.offsets.get(globals).copied().unwrap_or(total);
        let views = StepViews {
            globals: pixels.slice(0..split),
            locals: (split < total).then(|| pixels.slice(split..total)),
        };
        self.step.step_on(&self.gpu, StepBatch::of(batch), views)
    }

    /// The teacher's final-norm CLS features `(N, D)` of every image of `pack`, seen whole
    /// at `side` (the CPU's [`features::inputs`]), computed on the GPU in bf16.
    pub fn cls_features(&self, pack: &Pack, side: usize) -> Result<Vec<f32>> {
        let mut feats = Vec::new();
        for start in (0..pack.len()).step_by(features::CHUNK) {
            let end = (start + features::CHUNK).min(pack.len());
            let x = features::inputs(pack, start..end, side);
            feats.extend(self.step.teacher_cls(&self.gpu, &x, end - start, side)?);
        }
        Ok(feats)
    }

    /// Both networks, the AdamW state and the centre on the host (for checkpoints and the
    /// kNN evaluation).
    pub fn weights(&self) -> Result<Weights> {
        self.step.download_state()
    }

    /// Device bytes the caching pool holds, in use or cached.
    pub fn memory_held(&self) -> u64 {
        self.gpu.pool().stats().bytes_allocated
    }

    /// The most device bytes in use at once so far (PyTorch's `max_memory_allocated`).
    pub fn memory_peak(&self) -> u64 {
        self.gpu.pool().stats().peak_in_use
    }
}
