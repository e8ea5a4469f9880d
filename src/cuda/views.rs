//! The fused GPU view builder (`kernels/views.cu`): a batch's u8 source images in, the
//! model input out (every view, normalised, f32 or bf16), in one launch. The CPU twin is
//! [`ViewBuilder::build_into`]: the same crop records (from [`ViewBuilder::crops`]), the same
//! resize taps (from [`ResizePlan`]), the same photometric draws (each region draws its own
//! parameters on the GPU from its Philox counter) and the same arithmetic in the same order.
//! This module computes only the per-batch tables the kernel reads; it must not re-derive
//! crops, taps or draw rules that `crate::views` already defines.
//!
//! Launch: one block per (image, view, region), a region being one patch of the view's patch
//! grid (patch-level augmentation on) or the whole view (off); up to 128 threads per patch
//! (256 per whole view), each owning a fixed set of the region's pixels. The region and its blur buffer live in shared memory when they fit
//! (`2 * C * region^2` floats in 24 KiB: every per-patch setup up to patch 32 RGB) and in a
//! global scratch buffer otherwise (per-view mode at 224).
//!
//! Output layout: [`ViewBatch::views`](crate::views::batch::ViewBatch) concatenated: view
//! `v` is `(B, C, S_v, S_v)` planar from element [`ViewLayout::offsets`]`[v]`.

use half::bf16;

use super::bench::BenchCase;
use super::check::{
    compare, download_bf16, download_f32, poisoned_bf16, poisoned_f32, Inputs, KernelCheck,
    Outcome, BF16_BOUND,
};
use super::context::{self, Arg, Gpu};
use super::pool::Buf;
use crate::data::pack::{Pack, PackWriter};
use crate::error::{Error, Result};
use crate::views::batch::ViewBuilder;
use crate::views::config::{Preset, ViewConfig};
use crate::views::crop::CropRecord;
use crate::views::photometric::{PhotometricConfig, WHOLE_VIEW};
use crate::views::resize::{Interpolation, ResizePlan};

/// u32 words per view in the kernel's `view_info` table (`VIEW_WORDS` in views.cu).
const VIEW_WORDS: usize = 16;
/// f32 words per view in the kernel's `params` table (`CFG_WORDS` in views.cu).
const CFG_WORDS: usize = 20;
/// Most threads per block (the kernel's `__launch_bounds__`), used when a region is a whole
/// view: such launches have few blocks, so each gets as many threads as it can.
const MAX_THREADS: usize = 256;
/// Most threads per block when regions are patches (a 16x16 patch: two pixels per thread).
/// Launches have tens of thousands of blocks; at the kernel's 64 registers an SM then holds
/// eight blocks rather than four, so a block waiting at a barrier or in a serial step (the
/// contrast mean, the blur weights' sum) holds up an eighth of the SM's threads, not a quarter.
const MAX_PATCH_THREADS: usize = 128;
/// Dynamic shared memory a block may use without opting in to more (48 KiB), less a margin
/// for the kernel's 64 bytes of static shared memory.
const SHARED_BUDGET: usize = 48 * 1024 - 256;
/// The region and its blur buffer go to shared memory when together they fit in this.
const REGION_SHARED_BUDGET: usize = 24 * 1024;
/// Most blur taps (`2 ceil(3 sigma) + 1`): blur sigma up to about 170 pixels.
const MAX_BLUR_TAPS: usize = 1025;

/// Bound for the f32 output. The kernel repeats the CPU's f32 arithmetic operation for
/// operation (no fused multiply-add, the same summation orders, IEEE division and square
/// root), so only the three transcendentals can differ: blur weights use `exp`, noise `ln`
/// and `cos`, computed on the GPU in double precision and rounded to f32 (the correctly
/// rounded value), while libm's `expf`/`logf`/`cosf` are not always correctly rounded
/// (glibc 2.36: 0.06%, 0.7% and 1.3% of calls on these arguments are one ulp off). That ulp
/// reaches the output through averaging (blur) or a small addition (noise, sigma * z), which
/// moves the final value by about one f32 ulp: 6e-8 for values in [0.5, 1]. After
/// normalisation that is 6e-8 * inv_std, against the comparison's floor of 1e-3 * max|cpu|,
/// at least 1e-3 * 0.5 * inv_std (some pixel is at least 0.5 from the mean): 1.2e-4
/// relative per ulp; the bound allows two (2.4e-4), rounded up. Under the CPU emulator
/// (glibc for the double-precision functions as well) the f32 error over 41 seeds of the
/// paper224 check has median 4.5e-5 and maximum 1.1e-4, and is exactly 0 with blur and noise
/// off. Any real fault (an index, a draw, an operator order) shows up at 1e-2 or more.
pub const VIEWS_F32_BOUND: f64 = 3e-4;

/// Where each view index's block of the output lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewLayout {
    /// Images in the batch.
    pub batch: usize,
    /// Channels of every view.
    pub channels: usize,
    /// Side of each view index.
    pub sides: Vec<usize>,
    /// First element of each view index's `(B, C, S, S)` block.
    pub offsets: Vec<usize>,
    /// Elements in all.
    pub total: usize,
}

impl ViewLayout {
    /// The layout of `batch` images' views under `cfg`, `channels` channels each.
    pub fn new(cfg: &ViewConfig, batch: usize, channels: usize) -> ViewLayout {
        let sides: Vec<usize> = (0..cfg.num_views()).map(|v| cfg.side(v)).collect();
        let mut offsets = Vec::with_capacity(sides.len());
        let mut total = 0;
        for &s in &sides {
            offsets.push(total);
            total += batch * channels * s * s;
        }
        ViewLayout {
            batch,
            channels,
            sides,
            offsets,
            total,
        }
    }

    /// Elements of view index `v` (all images).
    pub fn view_len(&self, v: usize) -> usize {
        self.batch * self.channels * self.sides[v] * self.sides[v]
    }

    /// A downloaded output cut into one buffer per view index, as in
    /// [`ViewBatch::views`](crate::views::batch::ViewBatch).
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        assert_eq!(flat.len(), self.total, "ViewLayout::split: wrong length");
        (0..self.sides.len())
            .map(|v| flat[self.offsets[v]..][..self.view_len(v)].to_vec())
            .collect()
    }
}

/// The launch shape and the scalars the kernel takes besides its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LaunchShape {
    /// (view, region) jobs per image: blocks per image.
    jobs_per_image: usize,
    /// Threads per block.
    threads: usize,
    /// Source rows per resize chunk.
    chunk_rows: usize,
    /// Widest region (patch side, or the largest view side per view).
    widest: usize,
    /// Blur weights the shared buffer holds.
    max_taps: usize,
    /// Offset of mean and inv_std in `params`.
    mean_at: usize,
    /// Regions live in the global scratch buffer rather than shared memory.
    scratch: bool,
    /// Dynamic shared memory per block, bytes.
    shared_bytes: usize,
}

/// The kernel's tables for one batch (see `build_views` in views.cu for the layouts).
#[derive(Clone, Debug)]
struct Tables {
    info: Vec<u32>,
    taps_u: Vec<u32>,
    taps_w: Vec<f32>,
    jobs: Vec<u32>,
    params: Vec<f32>,
    shape: LaunchShape,
}

/// `Stream::uniform(lo, hi) = lo + (hi - lo) * u` as (lo, hi - lo), both f32 as the CPU
/// computes them, so the kernel's `lo + span * u` is the same arithmetic.
fn uniform_range(lo: f32, hi: f32) -> (f32, f32) {
    (lo, hi - lo)
}

/// One view's photometric settings as the kernel reads them: the ranges of
/// `RegionDraws::draw`'s uniforms and the fixed settings.
fn photometric_words(p: &PhotometricConfig) -> [f32; CFG_WORDS] {
    let (b_lo, b_span) = uniform_range((1.0 - p.brightness).max(0.0), 1.0 + p.brightness);
    let (c_lo, c_span) = uniform_range((1.0 - p.contrast).max(0.0), 1.0 + p.contrast);
    let (s_lo, s_span) = uniform_range((1.0 - p.saturation).max(0.0), 1.0 + p.saturation);
    let (h_lo, h_span) = uniform_range(-p.hue, p.hue);
    let (g_lo, g_span) = uniform_range(p.blur_sigma.0, p.blur_sigma.1);
    let mut w = [0.0f32; CFG_WORDS];
    w[..17].copy_from_slice(&[
        p.jitter_p,
        b_lo,
        b_span,
        c_lo,
        c_span,
        s_lo,
        s_span,
        h_lo,
        h_span,
        p.grayscale_p,
        p.blur_p,
        g_lo,
        g_span,
        p.solarize_p,
        p.solarize_threshold,
        p.noise_p,
        p.noise_sigma,
    ]);
    w
}

/// The most blur taps a region of this view kind can draw. `sigma = lo + span * u` is
/// non-decreasing in `u` under f32 rounding, and `u <= 1 - 2^-24`, so the largest sigma is
/// that expression at the largest `u`; 1 when the blur never fires.
fn max_blur_taps(p: &PhotometricConfig) -> usize {
    if p.blur_p <= 0.0 {
        return 1;
    }
    let (lo, span) = uniform_range(p.blur_sigma.0, p.blur_sigma.1);
    let u_max = ((1u32 << 24) - 1) as f32 * (1.0 / (1u32 << 24) as f32);
    let sigma = lo + span * u_max;
    2 * (3.0 * sigma).ceil() as usize + 1
}

/// The kernel's tables for a batch of `batch` images with the view boxes `crops`.
/// `chunk_cap` caps the rows per resize chunk (checks use it to force several chunks).
fn tables(
    cfg: &ViewConfig,
    crops: &[CropRecord],
    batch: usize,
    channels: usize,
    mean: &[f32],
    inv_std: &[f32],
    chunk_cap: Option<usize>,
) -> Result<Tables> {
    let nv = cfg.num_views();
    assert_eq!(crops.len(), nv, "tables: one crop record per view");
    assert!(channels == 1 || channels == 3, "tables: 1 or 3 channels");
    assert!(mean.len() == channels && inv_std.len() == channels);
    let layout = ViewLayout::new(cfg, batch, channels);
    let u32_of = |x: usize| u32::try_from(x).expect("table entry fits u32");

    let mut info = Vec::with_capacity(nv * VIEW_WORDS);
    let mut taps_u = Vec::new();
    let mut taps_w = Vec::new();
    let mut jobs = Vec::new();
    let mut params = Vec::with_capacity(nv * CFG_WORDS + 6);
    let (mut max_span, mut widest, mut max_taps, mut max_pixels) = (0usize, 0usize, 1usize, 0usize);
    for (v, crop) in crops.iter().enumerate() {
        let side = cfg.side(v);
        let p = if cfg.per_patch { cfg.patch_size } else { side };
        let grid = side / p;
        if cfg.per_patch && grid * grid >= WHOLE_VIEW as usize {
            return Err(Error::bad_config(
                "patch_size (--patch)",
                format!("{grid}x{grid} patches do not fit the 20-bit region counter; use a larger patch"),
            ));
        }
        if channels * p * p >= 1 << 29 {
            return Err(Error::bad_config(
                "views (--view-sides)",
                format!(
                    "a {p}x{p} region is too large for its noise stream (2^29 values); use smaller views"
                ),
            ));
        }
        let plan = ResizePlan::new(crop, side, cfg.interpolation);
        let (cols, rows) = (plan.columns(), plan.rows());
        let col_at = taps_u.len();
        taps_u.extend_from_slice(cols.first());
        taps_u.extend_from_slice(cols.count());
        let col_w_at = taps_w.len();
        taps_w.extend_from_slice(cols.weights());
        let row_at = taps_u.len();
        taps_u.extend_from_slice(rows.first());
        taps_u.extend_from_slice(rows.count());
        let row_w_at = taps_w.len();
        taps_w.extend_from_slice(rows.weights());
        // The source rows (crop-relative) each row of regions reads: [lo, hi).
        let span_at = taps_u.len();
        for prow in 0..grid {
            let ys = prow * p..(prow + 1) * p;
            let lo = ys.clone().map(|y| rows.first()[y]).min().unwrap_or(0);
            let hi = ys
                .map(|y| rows.first()[y] + rows.count()[y])
                .max()
                .unwrap_or(lo)
                .max(lo);
            max_span = max_span.max((hi - lo) as usize);
            taps_u.extend_from_slice(&[lo, hi]);
        }
        let base = layout.offsets[v] as u64;
        info.extend_from_slice(&[
            u32_of(side),
            u32_of(p),
            u32_of(grid),
            crop.top,
            crop.left,
            u32_of(v * CFG_WORDS),
            u32_of(col_at),
            u32_of(col_w_at),
            u32_of(cols.stride()),
            u32_of(row_at),
            u32_of(row_w_at),
            u32_of(rows.stride()),
            u32_of(span_at),
            base as u32,
            (base >> 32) as u32,
            0,
        ]);
        let photometric = cfg.photometric(v);
        params.extend_from_slice(&photometric_words(photometric));
        max_taps = max_taps.max(max_blur_taps(photometric));
        widest = widest.max(p);
        max_pixels = max_pixels.max(p * p);
        for r in 0..grid * grid {
            jobs.extend_from_slice(&[u32_of(v), u32_of(r)]);
        }
    }
    let mean_at = params.len();
    for ch in 0..3 {
        params.push(mean.get(ch).copied().unwrap_or(0.0));
    }
    for ch in 0..3 {
        params.push(inv_std.get(ch).copied().unwrap_or(1.0));
    }
    if max_taps > MAX_BLUR_TAPS {
        return Err(Error::bad_config(
            "augment blur_sigma",
            format!(
                "a blur of {max_taps} taps is larger than the GPU view builder's {MAX_BLUR_TAPS}; \
                 use a blur sigma of at most 170 pixels"
            ),
        ));
    }

    let taps_pad = (max_taps + 3) & !3;
    let region_floats = channels * widest * widest;
    let scratch = 2 * region_floats * 4 > REGION_SHARED_BUDGET;
    let fixed = 2 * taps_pad + if scratch { 0 } else { 2 * region_floats };
    let row_floats = channels * widest;
    let rows_fit = (SHARED_BUDGET / 4).saturating_sub(fixed) / row_floats;
    let chunk_rows = rows_fit
        .min(max_span.max(1))
        .min(chunk_cap.unwrap_or(usize::MAX).max(1));
    if chunk_rows == 0 {
        return Err(Error::bad_config(
            "views (--view-sides)",
            format!(
                "a {widest}-pixel-wide region of {channels} channels does not fit the GPU view \
                 builder's shared memory; use smaller views or turn patch augmentation on"
            ),
        ));
    }
    let jobs_per_image = jobs.len() / 2;
    let most_threads = if cfg.per_patch {
        MAX_PATCH_THREADS
    } else {
        MAX_THREADS
    };
    if batch.saturating_mul(jobs_per_image) > i32::MAX as usize {
        return Err(Error::bad_config(
            "--batch",
            format!("{batch} images of {jobs_per_image} regions each is more than one launch holds; use a smaller batch"),
        ));
    }
    Ok(Tables {
        info,
        taps_u,
        taps_w,
        jobs,
        params,
        shape: LaunchShape {
            jobs_per_image,
            threads: max_pixels.div_ceil(32).clamp(1, most_threads / 32) * 32,
            chunk_rows,
            widest,
            max_taps,
            mean_at,
            scratch,
            shared_bytes: 4 * (fixed + chunk_rows * row_floats),
        },
    })
}

/// A batch's kernel tables on the device, with its crop records: built once per batch by
/// [`GpuViewBuilder::prepare`] (cheap: ten resize plans and a few KiB of uploads).
pub struct GpuViewPlan {
    /// Global batch counter: names the batch's draws.
    pub index: u64,
    /// One crop record per view index, as [`ViewBuilder::crops`] gives them.
    pub crops: Vec<CropRecord>,
    /// Where each view goes in the output.
    pub layout: ViewLayout,
    shape: LaunchShape,
    info: Buf<u32>,
    taps_u: Buf<u32>,
    taps_w: Buf<f32>,
    jobs: Buf<u32>,
    params: Buf<f32>,
    scratch: Option<Buf<f32>>,
}

/// A batch's views on the device.
pub struct GpuViews<T> {
    /// Every view, laid out as [`GpuViews::layout`] says.
    pub views: Buf<T>,
    /// Where each view index starts.
    pub layout: ViewLayout,
    /// The crop records (for patch matching).
    pub crops: Vec<CropRecord>,
}

/// Builds a batch's views on the GPU, exactly as [`ViewBuilder::build_into`] does on the CPU
/// for the same configuration, seed, pack, batch index and images.
#[derive(Clone, Debug)]
pub struct GpuViewBuilder {
    cpu: ViewBuilder,
    seed: u64,
    height: usize,
    width: usize,
    channels: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// Caps the rows per resize chunk (checks force several chunks with it).
    chunk_cap: Option<usize>,
}

impl GpuViewBuilder {
    /// A builder for images of `pack`'s size and statistics. Validates `cfg` (as
    /// [`ViewBuilder::new`] does) and the limits of the GPU path.
    pub fn new(cfg: ViewConfig, seed: u64, pack: &Pack) -> Result<GpuViewBuilder> {
        if cfg.num_views() > 1 << 12 {
            return Err(Error::bad_config(
                "views",
                "at most 4096 views per image: the view index has 12 bits in the draw counters",
            ));
        }
        let cpu = ViewBuilder::new(cfg, seed, pack)?;
        let channels = pack.channels();
        if channels != 1 && channels != 3 {
            return Err(Error::bad_file(
                pack.origin(),
                format!("{channels} channels: views are built from grey (1) or RGB (3) images"),
            ));
        }
        let (h, w) = (pack.height(), pack.width());
        if h * w * channels > i32::MAX as usize {
            return Err(Error::bad_file(
                pack.origin(),
                format!("{h}x{w} images are too large for the GPU view builder; resize them when preparing the pack"),
            ));
        }
        Ok(GpuViewBuilder {
            cpu,
            seed,
            height: h,
            width: w,
            channels,
            mean: pack.mean().to_vec(),
            inv_std: pack.std().iter().map(|s| 1.0 / s).collect(),
            chunk_cap: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ViewConfig {
        self.cpu.config()
    }

    /// Where the views of a batch of `batch` images go.
    pub fn layout(&self, batch: usize) -> ViewLayout {
        ViewLayout::new(self.config(), batch, self.channels)
    }

    /// Bytes of one source image.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The source images `images` (dataset indices into `pack`) back to back, as the kernel
    /// reads them (upload the result). Refuses a pack of another size and indices past its
    /// end, like [`ViewBuilder::build_into`].
    pub fn gather(&self, pack: &Pack, images: &[u32]) -> Result<Vec<u8>> {
        self.cpu.check_pack(pack, images)?;
        let mut out = Vec::with_capacity(images.len() * self.image_len());
        for &i in images {
            out.extend_from_slice(pack.image(i as usize));
        }
        Ok(out)
    }

    /// The tables of batch `index` (of `batch` images) on the device.
    pub fn prepare(&self, gpu: &Gpu, index: u64, batch: usize) -> Result<GpuViewPlan> {
        let crops = self.cpu.crops(index);
        let t = tables(
            self.config(),
            &crops,
            batch,
            self.channels,
            &self.mean,
            &self.inv_std,
            self.chunk_cap,
        )?;
        let layout = self.layout(batch);
        let pool = gpu.pool();
        let scratch = if t.shape.scratch {
            Some(pool.alloc::<f32>(2 * layout.total)?)
        } else {
            None
        };
        Ok(GpuViewPlan {
            index,
            crops,
            layout,
            shape: t.shape,
            info: pool.upload(&t.info)?,
            taps_u: pool.upload(&t.taps_u)?,
            taps_w: pool.upload(&t.taps_w)?,
            jobs: pool.upload(&t.jobs)?,
            params: pool.upload(&t.params)?,
            scratch,
        })
    }

    /// Builds `plan`'s batch from `src` (its images back to back, from
    /// [`GpuViewBuilder::gather`]) into `out` (f32, [`GpuViewPlan::layout`]).
    pub fn launch_f32(
        &self,
        gpu: &Gpu,
        plan: &GpuViewPlan,
        src: &Buf<u8>,
        out: &mut Buf<f32>,
    ) -> Result<()> {
        self.launch(gpu, plan, src, out.ptr(), out.len(), "build_views_f32")
    }

    /// As [`GpuViewBuilder::launch_f32`], writing bf16 (rounded to nearest even).
    pub fn launch_bf16(
        &self,
        gpu: &Gpu,
        plan: &GpuViewPlan,
        src: &Buf<u8>,
        out: &mut Buf<bf16>,
    ) -> Result<()> {
        self.launch(gpu, plan, src, out.ptr(), out.len(), "build_views_bf16")
    }

    fn launch(
        &self,
        gpu: &Gpu,
        plan: &GpuViewPlan,
        src: &Buf<u8>,
        out: u64,
        out_len: usize,
        kernel: &'static str,
    ) -> Result<()> {
        let l = &plan.layout;
        assert_eq!(
            (l.channels, &l.sides),
            (self.channels, &self.layout(l.batch).sides),
            "build_views: the plan was made by another builder"
        );
        assert_eq!(
            src.len(),
            l.batch * self.image_len(),
            "build_views: src is not batch * height * width * channels bytes"
        );
        assert_eq!(
            out_len, l.total,
            "build_views: out does not match the plan's layout"
        );
        if l.batch == 0 {
            return Ok(());
        }
        let s = plan.shape;
        let mut cfg = context::blocks(l.batch * s.jobs_per_image, s.threads as u32);
        cfg.shared_mem_bytes = s.shared_bytes as u32;
        let scratch = plan.scratch.as_ref().map_or(0, |b| b.ptr());
        let int = |x: usize| Arg::I32(i32::try_from(x).expect("checked when the plan was made"));
        let args = [
            Arg::Ptr(out),
            Arg::Ptr(src.ptr()),
            Arg::Ptr(plan.info.ptr()),
            Arg::Ptr(plan.taps_u.ptr()),
            Arg::Ptr(plan.taps_w.ptr()),
            Arg::Ptr(plan.jobs.ptr()),
            Arg::Ptr(plan.params.ptr()),
            Arg::Ptr(scratch),
            int(s.jobs_per_image),
            int(self.height),
            int(self.width),
            int(self.channels),
            int(s.chunk_rows),
            int(s.widest),
            int(s.max_taps),
            int(s.mean_at),
            int(usize::from(self.config().per_patch)),
            Arg::U32(self.seed as u32),
            Arg::U32((self.seed >> 32) as u32),
            Arg::U32(plan.index as u32),
        ];
        // SAFETY: the arguments follow build_views' parameters in order and type; the tables
        // were built for this layout (checked above), src holds batch images and out the
        // layout's elements; the scratch buffer, when the shape needs it, holds 2 * total.
        unsafe { gpu.launch("views", kernel, cfg, &args) }
    }

    /// Batch `index` of `images` on the device as f32: gathers and uploads the images,
    /// prepares the tables and launches.
    pub fn build_f32(
        &self,
        gpu: &Gpu,
        pack: &Pack,
        index: u64,
        images: &[u32],
    ) -> Result<GpuViews<f32>> {
        let src = gpu.pool().upload(&self.gather(pack, images)?)?;
        let plan = self.prepare(gpu, index, images.len())?;
        let mut views = gpu.pool().alloc::<f32>(plan.layout.total)?;
        self.launch_f32(gpu, &plan, &src, &mut views)?;
        Ok(GpuViews {
            views,
            layout: plan.layout,
            crops: plan.crops,
        })
    }

    /// As [`GpuViewBuilder::build_f32`], in bf16 (what training feeds the model).
    pub fn build_bf16(
        &self,
        gpu: &Gpu,
        pack: &Pack,
        index: u64,
        images: &[u32],
    ) -> Result<GpuViews<bf16>> {
        let src = gpu.pool().upload(&self.gather(pack, images)?)?;
        let plan = self.prepare(gpu, index, images.len())?;
        let mut views = gpu.pool().alloc::<bf16>(plan.layout.total)?;
        self.launch_bf16(gpu, &plan, &src, &mut views)?;
        Ok(GpuViews {
            views,
            layout: plan.layout,
            crops: plan.crops,
        })
    }
}

/// A pack of `n` synthetic `h x w` RGB images: per image and channel a random linear
/// gradient plus noise, with grey pixels (r = g = b, the HSV edge case) and saturated ones
/// mixed in; mean about 0.4. Written to a temporary file and read back into memory.
fn synthetic_rgb_pack(inputs: &mut Inputs, n: usize, h: usize, w: usize) -> Result<Pack> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "pwself-views-check-{}-{}.pwpack",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut writer = PackWriter::create(&path, h, w, 3, &["synthetic"])?;
    let mut img = vec![0u8; h * w * 3];
    for _ in 0..n {
        let g = inputs.uniform(9, -60.0, 60.0);
        let base = inputs.uniform(3, 40.0, 150.0);
        for y in 0..h {
            for x in 0..w {
                let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
                let kind = inputs.below(32);
                for ch in 0..3 {
                    let smooth =
                        base[ch] + g[3 * ch] * fy + g[3 * ch + 1] * fx + g[3 * ch + 2] * fx * fy;
                    let noisy = smooth + inputs.uniform(1, -25.0, 25.0)[0];
                    img[(y * w + x) * 3 + ch] = match kind {
                        0 => 255,
                        1 => 0,
                        _ => noisy.clamp(0.0, 255.0) as u8,
                    };
                }
                if kind < 6 {
                    let px = &mut img[(y * w + x) * 3..][..3];
                    (px[1], px[2]) = (px[0], px[0]);
                }
            }
        }
        writer.push(&img, 0)?;
    }
    writer.finish()?;
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e));
    let _ = std::fs::remove_file(&path);
    Pack::from_bytes(bytes?, &path)
}

/// Photometric settings that fire every operator often, at strong settings (contrast and
/// saturation factors reach 0, the full hue range, blur radii past the patch edge).
fn stress_photometric(blur_sigma: (f32, f32)) -> PhotometricConfig {
    PhotometricConfig {
        jitter_p: 0.9,
        brightness: 0.9,
        contrast: 1.5,
        saturation: 1.2,
        hue: 0.5,
        grayscale_p: 0.3,
        blur_p: 0.6,
        blur_sigma,
        solarize_p: 0.4,
        solarize_threshold: 0.45,
        noise_p: 0.5,
        noise_sigma: 0.05,
    }
}

/// One parity case: the CPU's `build` and the GPU's f32 and bf16 launches on the same batch.
fn parity(
    gpu: &Gpu,
    inputs: &mut Inputs,
    pack: &Pack,
    cfg: ViewConfig,
    batch: usize,
    chunk_cap: Option<usize>,
    label: &str,
) -> Result<Vec<Outcome>> {
    let seed =
        (u64::from(inputs.stream().next_u32()) << 32) | u64::from(inputs.stream().next_u32());
    // Above 2^32: the crops read both words of the index, the photometric draws the low one.
    let index = (1u64 << 32) + inputs.below(1000) as u64;
    let images: Vec<u32> = (0..batch)
        .map(|_| inputs.below(pack.len()) as u32)
        .collect();
    let cpu = ViewBuilder::new(cfg.clone(), seed, pack)?.build(pack, index, 0, &images)?;
    let want: Vec<f32> = cpu.views.concat();

    let mut builder = GpuViewBuilder::new(cfg, seed, pack)?;
    builder.chunk_cap = chunk_cap;
    let plan = builder.prepare(gpu, index, batch)?;
    assert_eq!(plan.crops, cpu.crops, "GPU and CPU crop records differ");
    let src = gpu.pool().upload(&builder.gather(pack, &images)?)?;
    let mut out32 = poisoned_f32(gpu, plan.layout.total)?;
    builder.launch_f32(gpu, &plan, &src, &mut out32)?;
    let mut out16 = poisoned_bf16(gpu, plan.layout.total)?;
    builder.launch_bf16(gpu, &plan, &src, &mut out16)?;
    Ok(vec![
        compare(
            format!("build_views_f32: {label}"),
            &download_f32(&out32)?,
            &want,
            VIEWS_F32_BOUND,
        ),
        compare(
            format!("build_views_bf16: {label}"),
            &download_bf16(&out16)?,
            &want,
            BF16_BOUND,
        ),
    ])
}

/// Fashion-MNIST with the small28 preset: grey, patch 4 (32-thread blocks), per patch.
fn check_fmnist_per_patch(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let pack = crate::data::embedded::default_pack(crate::data::Split::Test)?;
    let cfg = ViewConfig::preset(Preset::Small28);
    parity(
        gpu,
        inputs,
        &pack,
        cfg,
        13,
        None,
        "fmnist small28 per patch, 13 images",
    )
}

/// Fashion-MNIST, small28, patch augmentation off (whole 28x28 and 12x12 views as regions).
fn check_fmnist_per_view(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let pack = crate::data::embedded::default_pack(crate::data::Split::Test)?;
    let cfg = ViewConfig {
        per_patch: false,
        ..ViewConfig::preset(Preset::Small28)
    };
    parity(
        gpu,
        inputs,
        &pack,
        cfg,
        11,
        None,
        "fmnist small28 per view, 11 images",
    )
}

/// Synthetic RGB 61x53, patch 16 (256-thread blocks), views 48 and 32, strong photometric
/// settings, the resize in chunks of 5 source rows.
fn check_rgb_per_patch(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let pack = synthetic_rgb_pack(inputs, 7, 61, 53)?;
    let mut cfg = ViewConfig::preset(Preset::Paper224);
    cfg.global.side = 48;
    cfg.local.side = 32;
    cfg.local.count = 3;
    cfg.global1 = stress_photometric((0.5, 5.0));
    cfg.global2 = stress_photometric((0.2, 1.5));
    cfg.local_aug = stress_photometric((0.3, 3.0));
    cfg.validate()?;
    parity(
        gpu,
        inputs,
        &pack,
        cfg,
        5,
        Some(5),
        "rgb 61x53 -> 48/32 patch 16 per patch, chunked",
    )
}

/// Synthetic RGB 70x50, patch augmentation off with 48-pixel views (regions in the global
/// scratch buffer, 9 pixels per thread), bilinear, strong photometric settings.
fn check_rgb_per_view(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let pack = synthetic_rgb_pack(inputs, 6, 70, 50)?;
    let mut cfg = ViewConfig::preset(Preset::Paper224);
    cfg.global.side = 48;
    cfg.local.side = 24;
    cfg.local.count = 4;
    cfg.patch_size = 8;
    cfg.per_patch = false;
    cfg.interpolation = Interpolation::Bilinear;
    cfg.global1 = stress_photometric((0.5, 3.0));
    cfg.global2 = stress_photometric((0.1, 1.0));
    cfg.local_aug = stress_photometric((0.2, 2.0));
    cfg.validate()?;
    parity(
        gpu,
        inputs,
        &pack,
        cfg,
        4,
        None,
        "rgb 70x50 -> 48/24 per view, bilinear",
    )
}

/// The paper's setup at training shape (2 x 224 + 8 x 96 views of 256x256 RGB, patch 16,
/// DINO's photometric settings), three images.
fn check_paper224(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let pack = synthetic_rgb_pack(inputs, 4, 256, 256)?;
    let cfg = ViewConfig::preset(Preset::Paper224);
    parity(
        gpu,
        inputs,
        &pack,
        cfg,
        3,
        None,
        "rgb 256x256 -> paper224 per patch",
    )
}

/// This family's parity checks: each builds one small batch on the GPU (f32 and bf16) and
/// compares it with [`ViewBuilder::build`] on the same images, seed and batch index.
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "build_views (paper224, per patch)",
            run: check_paper224,
        },
        KernelCheck {
            name: "build_views (fashion-mnist, per patch)",
            run: check_fmnist_per_patch,
        },
        KernelCheck {
            name: "build_views (fashion-mnist, per view)",
            run: check_fmnist_per_view,
        },
        KernelCheck {
            name: "build_views (synthetic rgb, per patch)",
            run: check_rgb_per_patch,
        },
        KernelCheck {
            name: "build_views (synthetic rgb, per view)",
            run: check_rgb_per_view,
        },
    ]
}

/// Source bytes a batch must read at least once: the pixels inside any crop box (all images
/// share the boxes), times channels and images.
fn source_bytes(crops: &[CropRecord], h: usize, w: usize, c: usize, batch: usize) -> u64 {
    let mut covered = vec![false; h * w];
    for r in crops {
        for y in r.top as usize..r.bottom() as usize {
            covered[y * w + r.left as usize..y * w + r.right() as usize].fill(true);
        }
    }
    (covered.iter().filter(|&&x| x).count() * c * batch) as u64
}

/// One bench case: batch 64 of 256x256 RGB at the paper's 2 x 224 + 8 x 96 views.
fn bench_case<'a>(
    gpu: &'a Gpu,
    pack: &Pack,
    per_patch: bool,
    bf16_out: bool,
) -> Result<BenchCase<'a>> {
    let batch = 64;
    let cfg = ViewConfig {
        per_patch,
        ..ViewConfig::preset(Preset::Paper224)
    };
    let builder = GpuViewBuilder::new(cfg, 17, pack)?;
    let images: Vec<u32> = (0..batch as u32).collect();
    let src = gpu.pool().upload(&builder.gather(pack, &images)?)?;
    let plan = builder.prepare(gpu, 3, batch)?;
    let elem = if bf16_out { 2 } else { 4 };
    let bytes = source_bytes(&plan.crops, pack.height(), pack.width(), 3, batch)
        + (plan.layout.total * elem) as u64;
    let name = format!(
        "build_views_{} 64x(2x224^2 + 8x96^2)x3 from 256x256, {}",
        if bf16_out { "bf16" } else { "f32" },
        if per_patch { "per patch" } else { "per view" }
    );
    let run: Box<dyn FnMut() -> Result<()> + 'a> = if bf16_out {
        let mut out = gpu.pool().alloc::<bf16>(plan.layout.total)?;
        Box::new(move || builder.launch_bf16(gpu, &plan, &src, &mut out))
    } else {
        let mut out = gpu.pool().alloc::<f32>(plan.layout.total)?;
        Box::new(move || builder.launch_f32(gpu, &plan, &src, &mut out))
    };
    Ok(BenchCase {
        name,
        bytes,
        flops: 0,
        run,
    })
}

/// This family's benchmark cases: the paper's setup (batch 64, 2 x 224 + 8 x 96 views of
/// 256x256 RGB sources, patch 16), bf16 and f32 output per patch, and bf16 per view. Bytes:
/// the source pixels inside any crop box plus the output.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    let mut inputs = Inputs::new(0, 0xBE);
    let pack = synthetic_rgb_pack(&mut inputs, 64, 256, 256)?;
    Ok(vec![
        bench_case(gpu, &pack, true, true)?,
        bench_case(gpu, &pack, true, false)?,
        bench_case(gpu, &pack, false, true)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Stream};
    use crate::views::crop::sample_crop;
    use crate::views::photometric::{jitter_order, RegionDraws};

    fn crops_for(cfg: &ViewConfig, h: u32, w: u32, seed: u64) -> Vec<CropRecord> {
        (0..cfg.num_views())
            .map(|v| {
                let scale = if v < cfg.global.count {
                    cfg.global.scale
                } else {
                    cfg.local.scale
                };
                let mut rng = Stream::new(seed, [v as u32, 0, 0], Purpose::Crop);
                sample_crop(&mut rng, h, w, scale, cfg.flip_p)
            })
            .collect()
    }

    fn tables_for(cfg: &ViewConfig, crops: &[CropRecord], c: usize) -> Tables {
        let mean = vec![0.4; c];
        let inv_std = vec![3.0; c];
        tables(cfg, crops, 64, c, &mean, &inv_std, None).unwrap()
    }

    /// Every tap of every output row of a region row lies inside that region row's span,
    /// and the view words point at the plan's taps.
    #[test]
    fn spans_cover_every_row_tap() {
        for per_patch in [true, false] {
            let cfg = ViewConfig {
                per_patch,
                ..ViewConfig::preset(Preset::Paper224)
            };
            for seed in 0..20 {
                let crops = crops_for(&cfg, 256, 300, seed);
                let t = tables_for(&cfg, &crops, 3);
                for (v, crop) in crops.iter().enumerate() {
                    let vi = &t.info[v * VIEW_WORDS..][..VIEW_WORDS];
                    let (side, p, grid) = (vi[0] as usize, vi[1] as usize, vi[2] as usize);
                    assert_eq!((side, grid * p), (cfg.side(v), side));
                    let plan = ResizePlan::new(crop, side, cfg.interpolation);
                    let first = &t.taps_u[vi[9] as usize..][..side];
                    let count = &t.taps_u[vi[9] as usize + side..][..side];
                    assert_eq!((first, count), (plan.rows().first(), plan.rows().count()));
                    let cfirst = &t.taps_u[vi[6] as usize..][..side];
                    assert_eq!(cfirst, plan.columns().first());
                    for prow in 0..grid {
                        let lo = t.taps_u[vi[12] as usize + 2 * prow];
                        let hi = t.taps_u[vi[12] as usize + 2 * prow + 1];
                        for y in prow * p..(prow + 1) * p {
                            assert!(lo <= first[y] && first[y] + count[y] <= hi);
                            assert!(hi <= crop.height);
                        }
                    }
                }
                let s = t.shape;
                assert!(s.shared_bytes <= SHARED_BUDGET && s.chunk_rows >= 1);
                assert_eq!(s.scratch, !per_patch, "224 views need the scratch buffer");
                assert_eq!(s.threads, if per_patch { 128 } else { 256 });
                assert_eq!(
                    t.jobs.len() / 2,
                    if per_patch { 2 * 196 + 8 * 36 } else { 10 }
                );
            }
        }
    }

    #[test]
    fn small_presets_keep_regions_in_shared_memory() {
        for per_patch in [true, false] {
            let cfg = ViewConfig {
                per_patch,
                ..ViewConfig::preset(Preset::Small28)
            };
            let t = tables_for(&cfg, &crops_for(&cfg, 28, 28, 1), 1);
            assert!(!t.shape.scratch);
            assert_eq!(t.shape.threads, if per_patch { 32 } else { 256 });
            assert!(t.shape.shared_bytes <= SHARED_BUDGET);
        }
    }

    #[test]
    fn layout_concatenates_the_views() {
        let cfg = ViewConfig::preset(Preset::Paper224);
        let l = ViewLayout::new(&cfg, 64, 3);
        assert_eq!(l.offsets[1], 64 * 3 * 224 * 224);
        assert_eq!(l.offsets[2], 2 * 64 * 3 * 224 * 224);
        assert_eq!(l.total, 64 * 3 * (2 * 224 * 224 + 8 * 96 * 96));
        let flat: Vec<f32> = (0..l.total).map(|i| i as f32).collect();
        let views = l.split(&flat);
        assert_eq!(views.len(), 10);
        assert_eq!(views[9].len(), 64 * 3 * 96 * 96);
        assert_eq!(views[9][0], l.offsets[9] as f32);
    }

    /// The kernel's decoding of a region's twelve words (`lo + span * u`, the gates, the
    /// 64-bit multiply-high for the order, the nibble list for the permutation), written out
    /// in Rust, gives exactly what `RegionDraws::draw` gives.
    #[test]
    fn kernel_decoding_of_the_draws_matches_region_draws() {
        let unit = |u: u32| (u >> 8) as f32 * 5.960_464_5e-8_f32;
        let configs = [
            PhotometricConfig::dino_global1(),
            PhotometricConfig::dino_global2(),
            PhotometricConfig::dino_local(),
            stress_photometric((0.5, 5.0)),
        ];
        for p in &configs {
            let w = photometric_words(p);
            for c2 in 0..300u32 {
                let mut s = Stream::new(99, [7, 3, c2], Purpose::Photometric);
                let d = RegionDraws::draw(p, &mut s);
                let mut s = Stream::new(99, [7, 3, c2], Purpose::Photometric);
                let u: Vec<u32> = (0..12).map(|_| s.next_u32()).collect();
                assert_eq!(d.jitter, unit(u[0]) < w[0]);
                let k = (((u128::from(u[1]) << 32 | u128::from(u[2])) * 24) >> 64) as u32;
                assert_eq!(d.order, jitter_order(k));
                assert_eq!(d.brightness.to_bits(), (w[1] + w[2] * unit(u[3])).to_bits());
                assert_eq!(d.contrast.to_bits(), (w[3] + w[4] * unit(u[4])).to_bits());
                assert_eq!(d.saturation.to_bits(), (w[5] + w[6] * unit(u[5])).to_bits());
                assert_eq!(d.hue.to_bits(), (w[7] + w[8] * unit(u[6])).to_bits());
                assert_eq!(d.grayscale, unit(u[7]) < w[9]);
                assert_eq!(d.blur, unit(u[8]) < w[10]);
                assert_eq!(
                    d.blur_sigma.to_bits(),
                    (w[11] + w[12] * unit(u[9])).to_bits()
                );
                assert_eq!(d.solarize, unit(u[10]) < w[13]);
                assert_eq!(d.solarize_threshold, w[14]);
                assert_eq!(d.noise, unit(u[11]) < w[15]);
                assert_eq!(d.noise_sigma, w[16]);
                let taps = 2 * (3.0 * d.blur_sigma).ceil() as usize + 1;
                assert!(p.blur_p == 0.0 || taps <= max_blur_taps(p));
            }
        }
        // The kernel's permutation: pick nibble d of what is left, remove it.
        for k in 0..24u32 {
            let mut rest = 0x3210u32;
            let mut got = Vec::new();
            for slot in 0..4 {
                let d = [k / 6, (k % 6) / 2, k % 2, 0][slot];
                got.push((rest >> (4 * d)) & 0xF);
                rest = (rest & ((1 << (4 * d)) - 1)) | ((rest >> (4 * d + 4)) << (4 * d));
            }
            let want: Vec<u32> = jitter_order(k).iter().map(|&op| op as u32).collect();
            assert_eq!(got, want, "k = {k}");
        }
    }

    /// The largest sigma is reached at the largest uniform draw, so the tap bound holds.
    #[test]
    fn blur_tap_bound_holds_at_the_top_of_the_range() {
        let mut s = Stream::new(5, [0, 0, 0], Purpose::Init);
        for _ in 0..2000 {
            let lo = s.uniform(0.01, 5.0);
            let hi = lo + s.uniform(0.0, 5.0);
            let p = PhotometricConfig {
                blur_sigma: (lo, hi),
                ..PhotometricConfig::dino_global1()
            };
            let (l, span) = uniform_range(lo, hi);
            let top = l + span * (((1u32 << 24) - 1) as f32 * (1.0 / (1u32 << 24) as f32));
            for u in [0.0f32, 0.5, 0.999, top] {
                let sigma = if u == top { top } else { l + span * u };
                assert!((2 * (3.0 * sigma).ceil() as usize) < max_blur_taps(&p));
            }
        }
    }

    #[test]
    fn source_bytes_count_the_union_of_boxes() {
        let r = |top, left, height, width| CropRecord {
            top,
            left,
            height,
            width,
            flipped: false,
        };
        // 4x4 and an overlapping 4x4 shifted by 2 columns: 16 + 16 - 8 pixels.
        assert_eq!(
            source_bytes(&[r(0, 0, 4, 4), r(0, 2, 4, 4)], 10, 10, 3, 2),
            24 * 3 * 2
        );
    }
}
