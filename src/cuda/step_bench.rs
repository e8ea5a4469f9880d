//! `pwself-engine bench --device cuda --step`: whole training steps per second and the
//! model FLOP utilisation (MFU) of a ViT at a view configuration, at the largest batch that
//! fits (or a given one), with the device memory the step held.
//!
//! The data are random RGB (or grey) images in a pack written to a temporary folder (the
//! pixels do not change the work; the crops, matches and the number of matched rows come
//! from the real view builder and matcher). Each timed step is [`GpuTrainer::step`]: views
//! built on the GPU, the full forward, backward, clipping, AdamW, EMA and centre update,
//! with the host's one wait per step (the loss and norm read-back) inside the timing.
//!
//! Model FLOPs ([`model_flops`]) count the matrix products only (2 flops per multiply-add),
//! from the configuration and the batch's matched rows: the teacher's backbone and head
//! forward on the globals, the student's backbone on every view and its head on the matched
//! rows, forward and backward (backward = 2x forward, except the patch embedding whose input
//! needs no gradient: 1x). Attention's two products are counted in full (`2 T^2 D` each per
//! block), as the flash kernels compute them. The MFU is those FLOPs per second over the
//! card's dense bf16 peak from its specification sheet.

use std::time::Instant;

use serde::Serialize;

use super::context::Gpu;
use super::profile::KernelTime;
use super::train::GpuTrainer;
use crate::data::pack::PackWriter;
use crate::data::Pack;
use crate::error::{Error, Result};
use crate::loss::LossKind;
use crate::model::config::{Arch, HeadConfig, VitConfig};
use crate::model::vit::Network;
use crate::rng::{Purpose, Stream};
use crate::train::step::StepRunner;
use crate::train::TrainConfig;
use crate::views::batch::{ViewBatch, ViewBuilder};
use crate::views::config::{Preset, ViewConfig};

/// What to time.
#[derive(Clone, Debug)]
pub struct StepBenchConfig {
    /// The backbone.
    pub arch: Arch,
    /// Patch size.
    pub patch: usize,
    /// The views (Paper224: 2 x 224 + 8 x 96).
    pub preset: Preset,
    /// The head's output dimension K.
    pub out_dim: usize,
    /// The loss.
    pub loss: LossKind,
    /// Images per step; `None`: the largest of [`BATCHES`] that fits.
    pub batch: Option<usize>,
    /// Timed steps (the median is reported).
    pub iters: usize,
    /// Untimed steps first (allocation, cuBLASLt's algorithm choice).
    pub warmup: usize,
    /// After the timed steps, one more with every launch timed ([`super::profile`]).
    pub profile: bool,
}

/// The batch sizes tried, largest first, when none is given.
pub const BATCHES: [usize; 9] = [512, 384, 256, 192, 128, 96, 64, 32, 16];

/// Model FLOPs of one image's share of a step, by part.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flops {
    /// Teacher backbone forward on the global views.
    pub teacher_backbone: f64,
    /// Teacher head forward on every global token.
    pub teacher_head: f64,
    /// Student backbone forward + backward on every view.
    pub student_backbone: f64,
    /// Student head forward + backward on the matched rows.
    pub student_head: f64,
    /// The sum.
    pub total: f64,
}

/// The FLOPs formula, as `bench` prints it.
pub const FLOPS_FORMULA: &str = "per image: teacher = sum over globals of F(T_g) + H * G * T_g; \
student = 3 * sum over views of F(T) - P(T) + 3 * H * R; F(T) = depth * (24 T D^2 + 4 T^2 D) + \
P(T), P(T) = 2 (T-1) C p^2 D (patch embedding, whose backward is weights only), \
H = 2 (D h + (layers-2) h^2 + h b + b K) (the head per row), R = matched head rows per image; \
2 flops per multiply-add, matrix products only";

/// One backbone forward on a view of `tokens` tokens, and its patch-embedding part.
fn backbone_forward_flops(v: &VitConfig, tokens: usize) -> (f64, f64) {
    let (t, d) = (tokens as f64, v.embed_dim as f64);
    let hidden = v.mlp_dim() as f64;
    // qkv 6TD^2, proj 2TD^2, MLP 4 T D hidden, attention 4 T^2 D.
    let block = 6.0 * t * d * d + 2.0 * t * d * d + 4.0 * t * d * hidden + 4.0 * t * t * d;
    let patch = 2.0 * (t - 1.0) * (v.in_chans * v.patch * v.patch) as f64 * d;
    (v.depth as f64 * block + patch, patch)
}

/// The head's forward FLOPs per row.
fn head_flops(v: &VitConfig, h: &HeadConfig) -> f64 {
    let (d, hid, b, k) = (
        v.embed_dim as f64,
        h.hidden as f64,
        h.bottleneck as f64,
        h.out_dim as f64,
    );
    let mlp = match h.layers {
        0 | 1 => d * b,
        n => d * hid + (n - 2) as f64 * hid * hid + hid * b,
    };
    2.0 * (mlp + b * k)
}

/// Model FLOPs per image of a step of `net` on `views`, with `rows_per_image` matched head
/// rows (the student head's input) per image.
pub fn model_flops(net: &Network, views: &ViewConfig, rows_per_image: f64) -> Flops {
    let v = &net.vit;
    let tokens = |side: usize| 1 + (side / v.patch) * (side / v.patch);
    let t_g = tokens(views.global.side);
    let t_l = tokens(views.local.side);
    let (g, l) = (views.global.count as f64, views.local.count as f64);
    let (fg, pg) = backbone_forward_flops(v, t_g);
    let (fl, pl) = backbone_forward_flops(v, t_l);
    let head = head_flops(v, &net.head);
    let mut f = Flops {
        teacher_backbone: g * fg,
        teacher_head: g * t_g as f64 * head,
        student_backbone: g * (3.0 * fg - pg) + l * (3.0 * fl - pl),
        student_head: 3.0 * rows_per_image * head,
        total: 0.0,
    };
    f.total = f.teacher_backbone + f.teacher_head + f.student_backbone + f.student_head;
    f
}

/// The dense bf16 tensor-core peak of a card from its specification sheet, in TFLOP/s,
/// with the sheet's name for it; `None` for a card not listed.
pub fn spec_peak_tflops(device: &str) -> Option<(f64, &'static str)> {
    let d = device.to_ascii_uppercase();
    if d.contains("H200") {
        Some((989.4, "H200 SXM dense bf16"))
    } else if d.contains("H100") && d.contains("PCIE") {
        Some((756.0, "H100 PCIe dense bf16"))
    } else if d.contains("H100") {
        Some((989.4, "H100 SXM dense bf16"))
    } else if d.contains("A100") {
        Some((312.0, "A100 dense bf16"))
    } else {
        None
    }
}

/// One configuration's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepBenchResult {
    /// `ViT-S/16, 2x224 + 8x96, K 65536, PWML`.
    pub name: String,
    /// The device.
    pub device: String,
    /// Images per step.
    pub batch: usize,
    /// Median step time in milliseconds.
    pub median_ms: f64,
    /// Every timed step, milliseconds.
    pub steps_ms: Vec<f64>,
    /// `batch / median`.
    pub images_per_second: f64,
    /// Matched head rows per image (mean over the timed steps).
    pub head_rows_per_image: f64,
    /// Model FLOPs per image.
    pub flops: Flops,
    /// Model TFLOP/s achieved.
    pub tflop_s: f64,
    /// The card's dense bf16 peak (specification sheet), TFLOP/s, and its source.
    pub peak_tflop_s: Option<(f64, String)>,
    /// `tflop_s / peak`.
    pub mfu: Option<f64>,
    /// The most device memory the step's buffers used at once, bytes (PyTorch's
    /// `max_memory_allocated`).
    pub memory_bytes: u64,
    /// Device memory the allocator held at the end, in use or cached, bytes (PyTorch's
    /// `memory_reserved`).
    pub memory_held_bytes: u64,
    /// Larger batches tried first that did not fit, with the error.
    pub did_not_fit: Vec<(usize, String)>,
    /// Times the allocator gave its cache back to the driver during the timed steps (the
    /// buffers of a step did not all fit at once beside the cache: each such step frees and
    /// allocates device memory again, which costs more than the step's kernels).
    pub cache_releases: u64,
    /// The profiled step's time per kernel, largest first (empty without `profile`).
    pub profile: Vec<KernelTime>,
    /// The profiled step's wall time, milliseconds.
    pub profiled_step_ms: Option<f64>,
}

/// A pack of `n` random images of `side x side x channels` in `dir`.
fn random_pack(dir: &std::path::Path, n: usize, side: usize, channels: usize) -> Result<Pack> {
    let path = dir.join("bench.pack");
    let mut w = PackWriter::create(&path, side, side, channels, &["a", "b"])?;
    let mut rng = Stream::new(0x5eed, [0, 0, 0], Purpose::Shuffle);
    let mut img = vec![0u8; side * side * channels];
    for i in 0..n {
        img.iter_mut()
            .for_each(|p| *p = (rng.next_u32() >> 24) as u8);
        w.push(&img, (i % 2) as u16)?;
    }
    w.finish()?;
    Pack::open(&path)
}

/// Times `cfg` at one batch size on a fresh device from `open`.
fn run_at(
    open: &dyn Fn() -> Result<Gpu>,
    cfg: &StepBenchConfig,
    batch: usize,
    dir: &std::path::Path,
) -> Result<StepBenchResult> {
    let mut tc = TrainConfig::default();
    tc.views.preset = Some(cfg.preset);
    // The preset's view counts (paper224: 2 + 8), not the default job's 6 locals.
    tc.views.local_views = None;
    tc.model.arch = cfg.arch;
    tc.model.patch = Some(cfg.patch);
    tc.head.out_dim = cfg.out_dim;
    tc.loss.kind = cfg.loss;
    tc.run.batch = batch;
    tc.optim.warmup_epochs = 0;
    let channels = 3;
    // Sources a little larger than the global view, as ImageNet's are.
    let side = match cfg.preset {
        Preset::Paper224 => 256,
        Preset::Small32 => 32,
        Preset::Small28 => 28,
    };
    let pack = std::sync::Arc::new(random_pack(dir, batch, side, channels)?);
    let (views, vit) = tc.resolve(side, side, channels)?;
    let net = Network::new(vit, tc.head.clone())?;
    let steps = (cfg.warmup + cfg.iters) as u64;
    let schedules = tc.optim.schedules(batch, 1, steps as usize)?;
    let runner = StepRunner::new(
        net.clone(),
        views.clone(),
        tc.loss.clone(),
        tc.optim.clone(),
        schedules,
        steps,
        tc.run.seed,
    );
    let w = runner.init_weights();
    let gpu = open()?;
    let device = gpu.name().to_string();
    let mut trainer = GpuTrainer::new(gpu, &runner, &w, tc.run.seed, pack.clone())?;
    let builder = ViewBuilder::new(views.clone(), tc.run.seed, &pack)?;
    let images: Vec<u32> = (0..batch as u32).collect();
    let mut b = ViewBatch::default();
    let (mut times, mut rows) = (Vec::new(), 0usize);
    let mut releases_before = 0;
    for i in 0..steps {
        if i == cfg.warmup as u64 {
            releases_before = trainer.gpu().pool().stats().cache_releases;
        }
        builder.build_headers_into(&pack, i, 0, &images, &mut b)?;
        let t = Instant::now();
        let stats = trainer.step(&b)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i >= cfg.warmup as u64 {
            times.push(ms);
            rows += stats.head_rows;
        }
    }
    let cache_releases = trainer.gpu().pool().stats().cache_releases - releases_before;
    let (mut profile, mut profiled_step_ms) = (Vec::new(), None);
    if cfg.profile {
        builder.build_headers_into(&pack, steps, 0, &images, &mut b)?;
        trainer.gpu().profile_start();
        let t = Instant::now();
        trainer.step(&b)?;
        profile = trainer.gpu().profile_take()?;
        profiled_step_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let head_rows_per_image = rows as f64 / (cfg.iters.max(1) * batch) as f64;
    let flops = model_flops(&net, &views, head_rows_per_image);
    let images_per_second = batch as f64 / (median_ms / 1e3);
    let tflop_s = flops.total * images_per_second / 1e12;
    let peak = spec_peak_tflops(&device);
    Ok(StepBenchResult {
        name: format!(
            "{:?}/{}, {}x{} + {}x{}, K {}, {:?}",
            cfg.arch,
            cfg.patch,
            views.global.count,
            views.global.side,
            views.local.count,
            views.local.side,
            cfg.out_dim,
            cfg.loss
        ),
        device,
        batch,
        median_ms,
        steps_ms: times,
        images_per_second,
        head_rows_per_image,
        flops,
        tflop_s,
        peak_tflop_s: peak.map(|(p, s)| (p, s.to_string())),
        mfu: peak.map(|(p, _)| tflop_s / p),
        memory_bytes: trainer.gpu().pool().stats().peak_in_use,
        memory_held_bytes: trainer.memory_held(),
        did_not_fit: Vec::new(),
        cache_releases,
        profile,
        profiled_step_ms,
    })
}

/// Times `cfg`: at its batch, or at the largest of [`BATCHES`] that fits: runs out of device
/// memory neither at allocation nor in the steady state, where a step would need the
/// allocator to release its cache (each try on a fresh device from `open`, so a failed one
/// leaves nothing behind).
pub fn run(open: &dyn Fn() -> Result<Gpu>, cfg: &StepBenchConfig) -> Result<StepBenchResult> {
    if cfg.iters == 0 {
        return Err(Error::bad_config("--iters", "at least 1 timed step"));
    }
    let dir = tempfile_dir()?;
    let batches: Vec<usize> = match cfg.batch {
        Some(b) => vec![b],
        None => BATCHES.to_vec(),
    };
    let mut did_not_fit = Vec::new();
    for &b in &batches {
        match run_at(open, cfg, b, dir.path()) {
            // A batch that only runs by releasing the allocator's cache in the timed steps
            // thrashes device memory (on the first H200 run ViT-S at batch 384 took 562 ms a
            // step for 279 ms of kernels); the next smaller batch is the one that fits.
            Ok(r)
                if cfg.batch.is_none()
                    && r.cache_releases > 0
                    && b != batches[batches.len() - 1] =>
            {
                did_not_fit.push((
                    b,
                    format!(
                        "runs only by releasing the allocator's cache ({} times in {} timed \
                         steps, {:.1} GiB peak): memory-bound thrash",
                        r.cache_releases,
                        cfg.iters,
                        r.memory_bytes as f64 / (1u64 << 30) as f64
                    ),
                ));
            }
            Ok(mut r) => {
                r.did_not_fit = did_not_fit;
                return Ok(r);
            }
            Err(e) if cfg.batch.is_none() && super::pool::is_out_of_memory(&e) => {
                did_not_fit.push((b, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::bad_config(
        "--batch",
        format!(
            "no batch of {batches:?} fits on this device: {}",
            did_not_fit.last().map_or("", |(_, e)| e.as_str())
        ),
    ))
}

/// A temporary folder for the benchmark's pack, removed when dropped.
fn tempfile_dir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!("pwself-step-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    Ok(TempDir(base))
}

/// Removes its folder on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The results as a markdown table, with the FLOPs formula.
pub fn to_markdown(results: &[StepBenchResult]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "| model and views | device | batch | median ms/step | img/s | head rows/img | \
         GFLOP/img | TFLOP/s | MFU | peak memory GiB | held GiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {:.2} | {:.2} |",
            r.name,
            r.device,
            r.batch,
            r.median_ms,
            r.images_per_second,
            r.head_rows_per_image,
            r.flops.total / 1e9,
            r.tflop_s,
            r.mfu
                .map_or("peak unknown".to_string(), |m| format!("{:.1}%", 100.0 * m)),
            r.memory_bytes as f64 / (1u64 << 30) as f64,
            r.memory_held_bytes as f64 / (1u64 << 30) as f64
        );
    }
    let _ = writeln!(
        s,
        "\nModel FLOPs ({FLOPS_FORMULA}). MFU is against the card's dense bf16 peak from its \
         specification sheet. Peak memory: the most bytes the step's buffers used at once \
         (PyTorch's max_memory_allocated); held: what the caching allocator kept."
    );
    for r in results.iter().filter(|r| !r.profile.is_empty()) {
        let total: f64 = r.profile.iter().map(|k| k.ms).sum();
        let _ = write!(
            s,
            "\n**Where the time goes: {} at batch {}** (one profiled step: {:.2} ms of \
             kernels and GEMMs in a step of {:.2} ms wall)\n\n\
             | kernel | calls | ms | share |\n|---|---:|---:|---:|\n",
            r.name,
            r.batch,
            total,
            r.profiled_step_ms.unwrap_or(f64::NAN)
        );
        for k in &r.profile {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.1}% |",
                k.name,
                k.calls,
                k.ms,
                100.0 * k.share
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_by_hand_for_a_one_block_vit() {
        // D = 4, depth 1, mlp 16, patch 2, 1 channel; a 4x4 view: 4 patches, T = 5.
        let vit = VitConfig {
            patch: 2,
            in_chans: 1,
            embed_dim: 4,
            depth: 1,
            heads: 1,
            mlp_ratio: 4,
            ..Arch::Femto.vit(2, 1, 4)
        };
        let (f, p) = backbone_forward_flops(&vit, 5);
        // qkv 2*5*4*12 = 480, proj 2*5*4*4 = 160, fc1 + fc2 2*2*5*4*16 = 1280,
        // attention 2 * 2*5*5*4 = 400; patch 2*4*4*4 = 128.
        assert_eq!(p, 128.0);
        assert_eq!(f, 480.0 + 160.0 + 1280.0 + 400.0 + 128.0);
        let head = HeadConfig {
            layers: 3,
            hidden: 8,
            bottleneck: 2,
            out_dim: 10,
        };
        // 2 * (4*8 + 8*8 + 8*2 + 2*10) = 264.
        assert_eq!(head_flops(&vit, &head), 264.0);
    }

    #[test]
    fn peaks_by_card_name() {
        assert_eq!(
            spec_peak_tflops("NVIDIA H100 80GB HBM3").map(|p| p.0),
            Some(989.4)
        );
        assert_eq!(
            spec_peak_tflops("NVIDIA H100 PCIe").map(|p| p.0),
            Some(756.0)
        );
        assert_eq!(spec_peak_tflops("NVIDIA H200").map(|p| p.0), Some(989.4));
        assert!(spec_peak_tflops("CPU emulator").is_none());
    }
}
