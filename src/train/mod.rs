//! `pwself-engine train`: the training loop, backend-agnostic in shape, CPU for now.
//!
//! Opens the packs, resolves the configuration, initialises (or resumes), then runs steps
//! on batches from the prefetching [`ViewLoader`], writing one JSON line of metrics per
//! step, a kNN evaluation every `eval_every` epochs, a checkpoint at the end of every
//! epoch and of the run, and a PNG of the curves. Everything a step draws is a function
//! of `(seed, step)`, so two runs with the same seed produce the same checkpoints, and a
//! resumed run continues exactly where the interrupted one would have gone.

pub mod config;
pub mod features;
pub mod step;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{self, TrainingState};
use crate::cuda::train::GpuTrainer;
use crate::cuda::Gpu;
use crate::data::{default_pack, Pack, Split};
use crate::error::{Error, Result};
use crate::eval::knn::KnnResult;
use crate::model::vit::Network;
use crate::views::batch::{LoaderPlan, ViewBuilder, ViewLoader};
use crate::viz::{plot_canvas, plot_panel, Panel, Series, SERIES};
pub use config::TrainConfig;
use step::{SplitAdamW, StepRunner, StepStats, Weights};

/// The k values of the kNN evaluation during training.
pub const KNN_KS: [usize; 2] = [10, 20];

/// How to run (not part of the configuration: it does not change the result).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (a file, or a run directory holding
    /// `checkpoint.safetensors`).
    pub resume: Option<PathBuf>,
    /// No progress bar and no text on stdout (the caller prints JSON).
    pub quiet: bool,
    /// Skip the kNN evaluations (tests that only check the optimisation).
    pub no_eval: bool,
    /// Where the steps run.
    pub device: TrainDevice,
}

/// Where a run's training steps run (the evaluations run on the CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrainDevice {
    /// The CPU reference backend (f32).
    #[default]
    Cpu,
    /// The GPU with this ordinal (bf16 storage, fp32 accumulation; views built on the GPU).
    Cuda(usize),
    /// The GPU code on the CPU emulator of the kernels (for tests: slow, exact semantics).
    Emulated,
}

/// The backend that runs the steps.
enum Backend {
    Cpu,
    Gpu(Box<GpuTrainer>),
}

impl Backend {
    /// The teacher's kNN accuracy (k in [`KNN_KS`]), with the features computed where the
    /// backend runs (`w` is the CPU's weights; the GPU uses its own teacher).
    fn knn(
        &self,
        net: &Network,
        w: &Weights,
        train: &Pack,
        test: &Pack,
        side: usize,
    ) -> Result<Vec<KnnResult>> {
        Ok(match self {
            Backend::Cpu => features::knn_of(net, &w.teacher, train, test, side, &KNN_KS),
            Backend::Gpu(t) => features::knn_of_features(
                &t.cls_features(train, side)?,
                &t.cls_features(test, side)?,
                train,
                test,
                net.vit.embed_dim,
                &KNN_KS,
            ),
        })
    }

    /// `w` as the backend holds it now (the GPU's copy is downloaded; the CPU's is `w`).
    fn sync_host(&self, w: &mut Weights) -> Result<()> {
        if let Backend::Gpu(t) = self {
            *w = t.weights()?;
        }
        Ok(())
    }
}

/// One kNN evaluation during or after training.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalPoint {
    pub epoch: u64,
    pub step: u64,
    pub knn: Vec<KnnResult>,
}

/// What a run reports at the end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps: u64,
    pub epochs_done: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub skipped_steps: u64,
    pub parameters: usize,
    /// Where the steps ran: `cpu`, or the GPU's name.
    pub device: String,
    /// Device memory the GPU backend held at the end (its high-water mark), in bytes.
    pub device_memory: Option<u64>,
    /// kNN of the teacher at initialisation (absent when resuming or without a test set).
    pub knn_init: Option<Vec<KnnResult>>,
    /// kNN of the trained teacher.
    pub knn_trained: Option<Vec<KnnResult>>,
    /// kNN on raw pixels: the baseline.
    pub knn_raw_pixels: Option<Vec<KnnResult>>,
    pub evals: Vec<EvalPoint>,
    pub checkpoint: PathBuf,
    /// Final teacher parameters (for tests; not serialised).
    #[serde(skip)]
    pub teacher: Vec<f32>,
    /// Final student parameters (for tests; not serialised).
    #[serde(skip)]
    pub student: Vec<f32>,
}

/// The checkpoint file of a run directory.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
}

fn open_packs(cfg: &TrainConfig) -> Result<(Pack, Option<Pack>)> {
    let train = match &cfg.data.train {
        Some(p) => Pack::open(p)?,
        None => default_pack(Split::Train)?,
    };
    let test = match (&cfg.data.test, &cfg.data.train) {
        (Some(p), _) => Some(Pack::open(p)?),
        (None, None) => Some(default_pack(Split::Test)?),
        (None, Some(_)) => None,
    };
    if let Some(t) = &test {
        if (t.height(), t.width(), t.channels())
            != (train.height(), train.width(), train.channels())
        {
            return Err(Error::bad_file(
                t.origin(),
                format!(
                    "test images are {}x{}x{} but training images are {}x{}x{}; prepare both splits the same way",
                    t.height(),
                    t.width(),
                    t.channels(),
                    train.height(),
                    train.width(),
                    train.channels()
                ),
            ));
        }
    }
    Ok((train, test))
}

/// Trains as `cfg` says. Progress goes to stderr (unless `opts.quiet`).
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let (train, test) = open_packs(cfg)?;
    let (views, vit) = cfg.resolve(train.height(), train.width(), train.channels())?;
    let net = Network::new(vit, cfg.head.clone())?;
    let batch = cfg.run.batch;
    if train.len() < batch {
        return Err(Error::bad_config(
            "run.batch (--batch)",
            format!(
                "{batch} is larger than the {} training images in {}",
                train.len(),
                train.origin().display()
            ),
        ));
    }
    let steps_per_epoch = (train.len() / batch) as u64;
    let schedules = cfg
        .optim
        .schedules(batch, cfg.run.epochs, steps_per_epoch as usize)?;
    let total =
        (cfg.run.epochs as u64 * steps_per_epoch).min(cfg.run.max_steps.unwrap_or(u64::MAX));
    let out = cfg.run.out.clone();
    fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let ckpt_path = checkpoint_path(&out);
    let config_json = serde_json::to_string(cfg).unwrap_or_default();

    let mut runner = StepRunner::new(
        net.clone(),
        views.clone(),
        cfg.loss.clone(),
        cfg.optim.clone(),
        schedules,
        steps_per_epoch,
        cfg.run.seed,
    );
    let (t_g, k) = (runner.teacher_tokens(), net.head.out_dim);
    let (mut w, start) = match &opts.resume {
        None => (runner.init_weights(), 0),
        Some(p) => {
            let file = if p.is_dir() {
                checkpoint_path(p)
            } else {
                p.clone()
            };
            let (s, _) = checkpoint::load(&file, &net.table, t_g, k)?;
            let split = runner.last_layer_offset();
            let steps = (s.adam_step, s.adam_step_last);
            let adam = SplitAdamW::from_state(s.exp_avg, s.exp_avg_sq, steps, split, &cfg.optim)?;
            (
                Weights {
                    student: s.student,
                    teacher: s.teacher,
                    adam,
                    center: s.center,
                },
                s.step,
            )
        }
    };
    if start > total {
        return Err(Error::bad_config(
            "--resume",
            format!("the checkpoint is at step {start}, past this run's last step {total}; raise --max-steps or --epochs"),
        ));
    }
    fs::write(
        out.join("config.toml"),
        toml::to_string(cfg).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&out, e))?;
    let metrics_path = out.join("metrics.jsonl");
    let metrics_file = if start == 0 {
        File::create(&metrics_path)
    } else {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&metrics_path)
    }
    .map_err(|e| Error::io(&metrics_path, e))?;
    let mut metrics = BufWriter::new(metrics_file);

    let eval_side = views.global.side;
    let do_eval = test.is_some() && !opts.no_eval;
    let train = Arc::new(train);
    let mut backend = match opts.device {
        TrainDevice::Cpu => Backend::Cpu,
        TrainDevice::Cuda(_) | TrainDevice::Emulated => {
            let gpu = match opts.device {
                TrainDevice::Cuda(ordinal) => Gpu::open(ordinal)?,
                _ => Gpu::emulated()?,
            };
            Backend::Gpu(Box::new(GpuTrainer::new(
                gpu,
                &runner,
                &w,
                cfg.run.seed,
                Arc::clone(&train),
            )?))
        }
    };
    let device = match &backend {
        Backend::Cpu => "cpu".to_string(),
        Backend::Gpu(t) => t.device().to_string(),
    };
    let knn_init = match (&test, start, do_eval) {
        (Some(t), 0, true) => Some(backend.knn(&net, &w, &train, t, eval_side)?),
        _ => None,
    };
    let mut evals = Vec::new();
    let builder = ViewBuilder::new(views.clone(), cfg.run.seed, &train)?;
    let plan = LoaderPlan {
        batch_size: batch,
        start,
        batches: total - start,
        prefetch: 2,
    };
    let mut loader = match backend {
        Backend::Cpu => ViewLoader::start(Arc::clone(&train), builder, plan)?,
        // The GPU builds the pixels; the loader thread draws crops and matches ahead.
        Backend::Gpu(_) => ViewLoader::start_headers(Arc::clone(&train), builder, plan)?,
    };

    let bar = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    let started = Instant::now();
    let (mut first_loss, mut last_loss, mut skipped, mut done) = (None, None, 0u64, 0u64);
    let mut losses: Vec<(f64, f64)> = Vec::new();
    while let Some(b) = loader.next_batch() {
        let b = b?;
        let stats: StepStats = match &mut backend {
            Backend::Cpu => runner.step(&mut w, &b),
            Backend::Gpu(t) => t.step(&b)?,
        };
        loader.recycle(b);
        done += 1;
        first_loss.get_or_insert(stats.loss);
        last_loss = Some(stats.loss);
        skipped += u64::from(stats.skipped);
        if stats.skipped {
            bar.println(format!(
                "step {}: non-finite loss or gradient (loss {}, grad norm {}); step skipped, nothing updated",
                stats.step, stats.loss, stats.grad_norm
            ));
        }
        losses.push((stats.step as f64, f64::from(stats.loss)));
        let ips = (done * batch as u64) as f64 / started.elapsed().as_secs_f64();
        writeln!(
            metrics,
            "{}",
            serde_json::json!({ "kind": "step", "stats": stats, "images_per_second": ips })
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
        bar.set_message(format!(
            "loss {:.4}  {:.0} img/s  epoch {}",
            stats.loss, ips, stats.epoch
        ));
        bar.inc(1);

        let next = stats.step + 1;
        let epoch_end = next % steps_per_epoch == 0;
        if epoch_end || next == total {
            backend.sync_host(&mut w)?;
            let epoch = next / steps_per_epoch;
            let due = cfg.run.eval_every > 0 && epoch_end && epoch % cfg.run.eval_every as u64 == 0;
            if let (Some(t), true, true) = (&test, do_eval, due && next != total) {
                let knn = backend.knn(&net, &w, &train, t, eval_side)?;
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({ "kind": "knn", "epoch": epoch, "step": next, "knn": knn })
                )
                .map_err(|e| Error::io(&metrics_path, e))?;
                bar.println(format!("epoch {epoch}: kNN top-1 {}", fmt_knn(&knn)));
                evals.push(EvalPoint {
                    epoch,
                    step: next,
                    knn,
                });
            }
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            let state = TrainingState {
                student: w.student.clone(),
                teacher: w.teacher.clone(),
                exp_avg: w.adam.m(),
                exp_avg_sq: w.adam.v(),
                adam_step: w.adam.main.step,
                adam_step_last: w.adam.last.step,
                center: w.center.clone(),
                center_rows: t_g,
                step: next,
                epoch: next / steps_per_epoch,
            };
            checkpoint::save(&ckpt_path, &net.table, k, &state, &config_json)?;
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    backend.sync_host(&mut w)?;
    let device_memory = match &backend {
        Backend::Cpu => None,
        Backend::Gpu(t) => Some(t.memory_held()),
    };

    let (knn_trained, knn_raw) = match (&test, do_eval) {
        (Some(t), true) => {
            let knn = backend.knn(&net, &w, &train, t, eval_side)?;
            let epoch = total.div_ceil(steps_per_epoch);
            writeln!(
                metrics,
                "{}",
                serde_json::json!({ "kind": "knn", "epoch": epoch, "step": total, "knn": knn })
            )
            .map_err(|e| Error::io(&metrics_path, e))?;
            evals.push(EvalPoint {
                epoch,
                step: total,
                knn: knn.clone(),
            });
            (
                Some(knn),
                Some(features::knn_raw_pixels(&train, t, &KNN_KS)),
            )
        }
        _ => (None, None),
    };
    metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
    write_curves(
        &out.join("curves.png"),
        &losses,
        knn_init.as_deref(),
        &evals,
    )?;
    Ok(TrainSummary {
        out: out.clone(),
        steps: done,
        epochs_done: total as f64 / steps_per_epoch as f64,
        seconds,
        images_per_second: (done * batch as u64) as f64 / seconds.max(1e-9),
        first_loss,
        last_loss,
        skipped_steps: skipped,
        parameters: net.table.num_params(),
        device,
        device_memory,
        knn_init,
        knn_trained,
        knn_raw_pixels: knn_raw,
        evals,
        checkpoint: ckpt_path,
        teacher: w.teacher,
        student: w.student,
    })
}

/// `k=10 71.2%, k=20 72.0%`.
pub fn fmt_knn(knn: &[KnnResult]) -> String {
    knn.iter()
        .map(|r| format!("k={} {:.2}%", r.k, r.top1))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_curves(
    path: &Path,
    losses: &[(f64, f64)],
    init: Option<&[KnnResult]>,
    evals: &[EvalPoint],
) -> Result<()> {
    let mut img = plot_canvas(2, 520, 320);
    let panel = |x0, title, x_label| Panel {
        x0,
        y0: 0,
        w: 520,
        h: 320,
        title,
        x_label,
    };
    let loss = [Series {
        label: "LOSS",
        colour: SERIES[0],
        points: losses,
    }];
    plot_panel(&mut img, &panel(0, "LOSS", "STEP"), &loss);
    let series: Vec<(String, Vec<(f64, f64)>)> = KNN_KS
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let mut pts: Vec<(f64, f64)> = init.map(|r| vec![(0.0, r[i].top1)]).unwrap_or_default();
            pts.extend(evals.iter().map(|e| (e.epoch as f64, e.knn[i].top1)));
            (format!("K={k}"), pts)
        })
        .collect();
    let s: Vec<Series> = series
        .iter()
        .enumerate()
        .map(|(i, (l, p))| Series {
            label: l,
            colour: SERIES[i + 1],
            points: p,
        })
        .collect();
    plot_panel(&mut img, &panel(520, "KNN TOP-1 %", "EPOCH"), &s);
    img.save(path)
        .map_err(|e| Error::bad_file(path, format!("cannot write the curves: {e}")))
}
