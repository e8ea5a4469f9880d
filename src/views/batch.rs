//! Building a batch's views, and the loader that builds them ahead of the training step.
//!
//! A batch shares its spatial parameters: view `v` of every image uses the same crop
//! record, drawn from the stream `(seed, [batch_lo, batch_hi, v], Crop)`, so patch
//! matching runs once per batch. Photometric draws are per image and per patch (see
//! [`crate::views::photometric`]). Every draw is a function of `(seed, batch index,
//! position in batch, view, patch)`: a batch comes out bit-identical whatever the thread
//! count, and a resumed run rebuilds exactly the batches it would have seen.
//!
//! The [`ViewLoader`] builds batches on a worker thread (itself fanning out over images
//! with rayon) into a bounded queue of `prefetch` batches, so a step that is slower than
//! view building never waits for views. Spent batches can be handed back with
//! [`ViewLoader::recycle`] so their buffers are reused instead of reallocated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::data::pack::Pack;
use crate::error::{Error, Result};
use crate::rng::{Purpose, Stream};
use crate::views::config::ViewConfig;
use crate::views::crop::{sample_crop, CropRecord};
use crate::views::matching::{batch_matches, PairMatches};
use crate::views::photometric::augment_view;
use crate::views::resize::ResizePlan;

/// The views of one batch, ready for the model.
#[derive(Clone, Debug, Default)]
pub struct ViewBatch {
    /// Global batch counter (0-based, counts across epochs): names the batch's draws.
    pub index: u64,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Dataset indices of the images, in batch order.
    pub images: Vec<u32>,
    /// Their labels (unused by training; kept for evaluation and debugging).
    pub labels: Vec<u16>,
    /// One crop record per view index, shared by every image of the batch.
    pub crops: Vec<CropRecord>,
    /// One buffer per view index: `(B, C, S, S)` planar f32, normalised with the
    /// dataset's mean and std.
    pub views: Vec<Vec<f32>>,
    /// Channels of every view.
    pub channels: usize,
    /// The teacher/student pairs and their matched tokens (18 with 2 + 8 views).
    pub pairs: Vec<PairMatches>,
}

impl ViewBatch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }
    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

/// Builds the views of a batch from a pack: crops, resize, photometric augmentation,
/// normalisation, and the batch's patch matches.
#[derive(Clone, Debug)]
pub struct ViewBuilder {
    cfg: ViewConfig,
    seed: u64,
    height: usize,
    width: usize,
    channels: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    grids: Vec<u32>,
}

impl ViewBuilder {
    /// A builder for images of `pack`'s size and statistics. Validates `cfg`.
    pub fn new(cfg: ViewConfig, seed: u64, pack: &Pack) -> Result<ViewBuilder> {
        cfg.validate()?;
        if pack.std().iter().any(|&s| s.is_nan() || s <= 0.0) {
            return Err(Error::bad_file(
                pack.origin(),
                "the pack's pixel standard deviation is zero (every image is constant); views cannot be \
                 normalised: check the source data",
            ));
        }
        let grids = (0..cfg.num_views()).map(|v| cfg.grid(v) as u32).collect();
        Ok(ViewBuilder {
            seed,
            height: pack.height(),
            width: pack.width(),
            channels: pack.channels(),
            mean: pack.mean().to_vec(),
            inv_std: pack.std().iter().map(|s| 1.0 / s).collect(),
            grids,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ViewConfig {
        &self.cfg
    }

    /// Patches per side of each view.
    pub fn grids(&self) -> &[u32] {
        &self.grids
    }

    /// The batch-shared crop records of batch `index`: one per view, each from its own
    /// stream, independent of all photometric draws.
    pub fn crops(&self, index: u64) -> Vec<CropRecord> {
        (0..self.cfg.num_views())
            .map(|v| {
                let scale = if v < self.cfg.global.count {
                    self.cfg.global.scale
                } else {
                    self.cfg.local.scale
                };
                let mut rng = Stream::new(
                    self.seed,
                    [index as u32, (index >> 32) as u32, v as u32],
                    Purpose::Crop,
                );
                sample_crop(
                    &mut rng,
                    self.height as u32,
                    self.width as u32,
                    scale,
                    self.cfg.flip_p,
                )
            })
            .collect()
    }

    /// Refuses a pack whose images are not the size this builder was made for, and image
    /// indices past the pack's end: what [`build_into`](Self::build_into) and the GPU view
    /// builder check before reading images.
    pub fn check_pack(&self, pack: &Pack, images: &[u32]) -> Result<()> {
        if pack.height() != self.height
            || pack.width() != self.width
            || pack.channels() != self.channels
        {
            return Err(Error::bad_file(
                pack.origin(),
                format!(
                    "images are {}x{}x{} but the view builder was made for {}x{}x{}; make one builder per pack",
                    pack.height(),
                    pack.width(),
                    pack.channels(),
                    self.height,
                    self.width,
                    self.channels
                ),
            ));
        }
        if let Some(&bad) = images.iter().find(|&&i| i as usize >= pack.len()) {
            return Err(Error::bad_file(
                pack.origin(),
                format!(
                    "image index {bad} is out of range: the pack holds {} images",
                    pack.len()
                ),
            ));
        }
        Ok(())
    }

    /// Builds batch `index` of `images` (dataset indices into `pack`), reusing `out`'s
    /// buffers. Runs in parallel over (view, image) on the current rayon pool.
    pub fn build_into(
        &self,
        pack: &Pack,
        index: u64,
        epoch: u64,
        images: &[u32],
        out: &mut ViewBatch,
    ) -> Result<()> {
        self.fill_headers(pack, index, epoch, images, out)?;
        let cfg = &self.cfg;
        let (b, c) = (images.len(), self.channels);
        out.views.resize_with(cfg.num_views(), Vec::new);
        for (v, buf) in out.views.iter_mut().enumerate() {
            let side = cfg.side(v);
            buf.resize(b * c * side * side, 0.0);
        }
        let plans: Vec<ResizePlan> = out
            .crops
            .iter()
            .enumerate()
            .map(|(v, crop)| ResizePlan::new(crop, cfg.side(v), cfg.interpolation))
            .collect();

        let (h, w) = (self.height, self.width);
        out.views
            .par_iter_mut()
            .enumerate()
            .flat_map(|(v, buf)| {
                let per_image = c * cfg.side(v) * cfg.side(v);
                buf.par_chunks_mut(per_image)
                    .enumerate()
                    .map(move |(i, chunk)| (v, i, chunk))
            })
            .for_each(|(v, i, chunk)| {
                let side = cfg.side(v);
                plans[v].apply(pack.image(images[i] as usize), h, w, c, chunk);
                augment_view(
                    chunk,
                    c,
                    side,
                    cfg.patch_size,
                    cfg.per_patch,
                    cfg.photometric(v),
                    self.seed,
                    index as u32,
                    i as u32,
                    v as u32,
                );
                for (ch, plane) in chunk.chunks_exact_mut(side * side).enumerate() {
                    let (m, s) = (self.mean[ch], self.inv_std[ch]);
                    plane.iter_mut().for_each(|x| *x = (*x - m) * s);
                }
            });
        out.pairs = batch_matches(&out.crops, &self.grids, cfg.global.count, cfg.match_rule)?;
        Ok(())
    }

    /// Batch `index`'s metadata without its pixels: the index, epoch, images, labels, crop
    /// records and matched pairs of [`ViewBuilder::build_into`], with `views` left empty
    /// (for a backend that builds the pixels itself, as the GPU does).
    pub fn build_headers_into(
        &self,
        pack: &Pack,
        index: u64,
        epoch: u64,
        images: &[u32],
        out: &mut ViewBatch,
    ) -> Result<()> {
        self.fill_headers(pack, index, epoch, images, out)?;
        out.views.clear();
        let cfg = &self.cfg;
        out.pairs = batch_matches(&out.crops, &self.grids, cfg.global.count, cfg.match_rule)?;
        Ok(())
    }

    /// Checks `images` against `pack` and writes `out`'s index, epoch, channels, images,
    /// labels and crop records (what both builds share).
    fn fill_headers(
        &self,
        pack: &Pack,
        index: u64,
        epoch: u64,
        images: &[u32],
        out: &mut ViewBatch,
    ) -> Result<()> {
        self.check_pack(pack, images)?;
        out.index = index;
        out.epoch = epoch;
        out.channels = self.channels;
        out.images.clear();
        out.images.extend_from_slice(images);
        out.labels.clear();
        out.labels
            .extend(images.iter().map(|&i| pack.label(i as usize)));
        out.crops = self.crops(index);
        Ok(())
    }

    /// Builds batch `index` of `images` into fresh buffers.
    pub fn build(&self, pack: &Pack, index: u64, epoch: u64, images: &[u32]) -> Result<ViewBatch> {
        let mut out = ViewBatch::default();
        self.build_into(pack, index, epoch, images, &mut out)?;
        Ok(out)
    }
}

/// The order in which epoch `epoch` visits a pack of `n` images: a Fisher-Yates shuffle
/// from the stream `(seed, [epoch_lo, epoch_hi, 0], Shuffle)`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = Stream::new(
        seed,
        [epoch as u32, (epoch >> 32) as u32, 0],
        Purpose::Shuffle,
    );
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// What the loader produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderPlan {
    /// Images per batch; the last partial batch of an epoch is dropped (as DINO does).
    pub batch_size: usize,
    /// First global batch index to produce (non-zero when resuming).
    pub start: u64,
    /// Number of batches to produce.
    pub batches: u64,
    /// Batches built ahead of the consumer (2 = double buffering).
    pub prefetch: usize,
}

/// Wall-clock time the consumer spent waiting in [`ViewLoader::next_batch`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoaderStats {
    /// Batches handed out.
    pub batches: u64,
    /// Total wait, first batch included.
    pub waited: Duration,
    /// Wait for the first batch alone (the pipeline filling up).
    pub first_wait: Duration,
}

/// Builds view batches on a background thread, `prefetch` batches ahead of the consumer.
pub struct ViewLoader {
    rx: Option<Receiver<Result<ViewBatch>>>,
    recycle: Sender<ViewBatch>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
    stats: LoaderStats,
    steps_per_epoch: u64,
}

impl ViewLoader {
    /// Starts the worker. Fails when the pack holds fewer images than one batch.
    pub fn start(pack: Arc<Pack>, builder: ViewBuilder, plan: LoaderPlan) -> Result<ViewLoader> {
        Self::spawn(pack, builder, plan, true)
    }

    /// As [`ViewLoader::start`], but the batches carry no pixels
    /// ([`ViewBuilder::build_headers_into`]): for a backend that builds the views itself.
    pub fn start_headers(
        pack: Arc<Pack>,
        builder: ViewBuilder,
        plan: LoaderPlan,
    ) -> Result<ViewLoader> {
        Self::spawn(pack, builder, plan, false)
    }

    fn spawn(
        pack: Arc<Pack>,
        builder: ViewBuilder,
        plan: LoaderPlan,
        pixels: bool,
    ) -> Result<ViewLoader> {
        if plan.batch_size == 0 {
            return Err(Error::bad_config(
                "--batch",
                "the batch size must be at least 1",
            ));
        }
        if pack.len() < plan.batch_size {
            return Err(Error::bad_config(
                "--batch",
                format!(
                    "batch size {} is larger than the {} images in {}; use --batch {} or less",
                    plan.batch_size,
                    pack.len(),
                    pack.origin().display(),
                    pack.len()
                ),
            ));
        }
        let steps_per_epoch = (pack.len() / plan.batch_size) as u64;
        let (tx, rx) = mpsc::sync_channel(plan.prefetch.max(1) - 1);
        let (recycle, spent) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_worker = Arc::clone(&stop);
        let worker = std::thread::Builder::new()
            .name("view-loader".into())
            .spawn(move || {
                produce(
                    &pack,
                    &builder,
                    plan,
                    pixels,
                    steps_per_epoch,
                    &tx,
                    &spent,
                    &stop_worker,
                )
            })
            .map_err(|e| Error::io("<view-loader thread>", e))?;
        Ok(ViewLoader {
            rx: Some(rx),
            recycle,
            stop,
            worker: Some(worker),
            stats: LoaderStats::default(),
            steps_per_epoch,
        })
    }

    /// Full batches per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The next batch, `None` after the last one. Errors from the worker (a bad pack
    /// index, a config error) come out here.
    pub fn next_batch(&mut self) -> Option<Result<ViewBatch>> {
        let t = Instant::now();
        let got = match self.rx.as_ref()?.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The worker hung up: after its last batch, or because it panicked. A
                // panic must not pass for the end of the data.
                self.rx = None;
                if let Some(Err(p)) = self.worker.take().map(|w| w.join()) {
                    let why = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    return Some(Err(Error::bad_config(
                        "views",
                        format!(
                            "the view-loader thread panicked ({why}): this is a bug; please \
                             report it with the command line"
                        ),
                    )));
                }
                None
            }
        };
        let waited = t.elapsed();
        if got.is_some() {
            if self.stats.batches == 0 {
                self.stats.first_wait = waited;
            }
            self.stats.batches += 1;
            self.stats.waited += waited;
        }
        got
    }

    /// Hands a spent batch back so the worker reuses its buffers.
    pub fn recycle(&self, batch: ViewBatch) {
        // The worker may already have finished; then the batch is simply dropped.
        let _ = self.recycle.send(batch);
    }

    /// How long the consumer has waited so far.
    pub fn stats(&self) -> LoaderStats {
        self.stats
    }
}

impl Iterator for ViewLoader {
    type Item = Result<ViewBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for ViewLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a worker waiting to send.
        self.rx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The worker's loop: build each batch (its pixels only when `pixels`), send it (blocking
/// while the queue is full).
#[allow(clippy::too_many_arguments)]
fn produce(
    pack: &Pack,
    builder: &ViewBuilder,
    plan: LoaderPlan,
    pixels: bool,
    steps_per_epoch: u64,
    tx: &SyncSender<Result<ViewBatch>>,
    spent: &Receiver<ViewBatch>,
    stop: &AtomicBool,
) {
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    for index in plan.start..plan.start.saturating_add(plan.batches) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (epoch, k) = (index / steps_per_epoch, (index % steps_per_epoch) as usize);
        if epoch != order_epoch {
            order = epoch_order(builder.seed, epoch, pack.len());
            order_epoch = epoch;
        }
        let images = &order[k * plan.batch_size..(k + 1) * plan.batch_size];
        let mut batch = spent.try_recv().unwrap_or_default();
        let built = if pixels {
            builder.build_into(pack, index, epoch, images, &mut batch)
        } else {
            builder.build_headers_into(pack, index, epoch, images, &mut batch)
        };
        let result = built.map(|()| batch);
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}
