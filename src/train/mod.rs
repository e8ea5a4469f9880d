//! `pwself-engine train`: the training loop, backend-agnostic in shape, CPU for now.
//!
//! Opens the packs, resolves the configuration, initialises (or resumes), then runs steps
//! on batches from the prefetching [`ViewLoader`], writing one JSON line of metrics per
//! step, a kNN evaluation every `eval_every` epochs, a checkpoint at the end of every
//! epoch and of the run (the last [`KEEP_CHECKPOINTS`] kept, see [`checkpoint`]), and a
//! PNG of the curves. Everything a step draws is a function of `(seed, step)`, so two
//! runs with the same seed produce the same checkpoints, and a resumed run continues
//! exactly where the interrupted one would have gone.
//!
//! Faults: a step with a non-finite loss or gradient changes nothing and is reported
//! with the tensor at fault (stderr and `metrics.jsonl`); [`MAX_BAD_STEPS`] in a row stop
//! the run, and no checkpoint is written while such a streak lasts. A checkpoint that
//! cannot be written stops the run, the previous one intact.

pub mod config;
pub mod features;
pub mod step;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{self, TrainingState, KEEP_CHECKPOINTS};
use crate::cuda::train::GpuTrainer;
use crate::cuda::Gpu;
use crate::data::{default_pack, Pack, Split};
use crate::error::{Error, Result};
use crate::eval::knn::KnnResult;
use crate::model::vit::Network;
use crate::views::batch::{LoaderPlan, ViewBuilder, ViewLoader};
use crate::viz::{plot_canvas, plot_panel, Panel, Series, SERIES};
pub use config::TrainConfig;
use step::{NanFaults, SplitAdamW, StepRunner, StepStats, Weights};

/// The k values of the kNN evaluation during training.
pub const KNN_KS: [usize; 2] = [10, 20];

/// Consecutive steps with a non-finite loss or gradient after which a run stops.
pub const MAX_BAD_STEPS: u64 = 10;

/// How to run (not part of the configuration: it does not change the result).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (a file, or a run directory: its newest checkpoint
    /// that loads, see [`checkpoint::load_newest`]).
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
    /// The most device memory the GPU backend's buffers used at once, in bytes.
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
    if let Ok(spec) = std::env::var(NanFaults::ENV) {
        runner.faults = NanFaults::parse(&spec, &net.table)?;
    }
    let (t_g, k) = (runner.teacher_tokens(), net.head.out_dim);
    let mut last_checkpoint: Option<(PathBuf, u64)> = None;
    let (mut w, start) = match &opts.resume {
        None => {
            let mut w = runner.init_weights();
            if let Some(init) = &cfg.model.init {
                let notes =
                    crate::interop::init_from_timm(init, &net, &mut w.student, &mut w.teacher)?;
                if !opts.quiet {
                    eprintln!("initialised the backbone from {}", init.display());
                    notes.iter().for_each(|n| eprintln!("note: {n}"));
                }
            }
            (w, 0)
        }
        Some(p) => {
            let r = checkpoint::load_newest(p, &net.table, t_g, k)?;
            if let (Some(init), false) = (&cfg.model.init, opts.quiet) {
                eprintln!(
                    "note: model.init ({}) is not read: the checkpoint holds the weights",
                    init.display()
                );
            }
            for e in &r.skipped {
                eprintln!("warning: skipping a damaged checkpoint: {e}");
            }
            if !opts.quiet || !r.skipped.is_empty() {
                eprintln!(
                    "resuming from {} at step {}",
                    r.path.display(),
                    r.state.step
                );
            }
            let s = r.state;
            last_checkpoint = Some((r.path, s.step));
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
    let config_path = out.join("config.toml");
    fs::write(&config_path, toml::to_string(cfg).unwrap_or_default()).map_err(|e| {
        Error::bad_file(
            &config_path,
            format!(
                "cannot write ({e}): make {} writable or choose another --out",
                out.display()
            ),
        )
    })?;
    let metrics_path = out.join("metrics.jsonl");
    if start > 0 {
        keep_metrics_before(&metrics_path, start)?;
    }
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
    let mut bad_streak = 0u64;
    if start == total && opts.resume.is_some() {
        // Nothing left to train, but the run directory may lack its last steps: a crash
        // between writing the final step file and pointing checkpoint.safetensors at it.
        let state = training_state(&w, t_g, total, steps_per_epoch);
        let saved =
            checkpoint::save_in_dir(&out, KEEP_CHECKPOINTS, &net.table, k, &state, &config_json)
                .map_err(|e| write_failed(e, total, last_checkpoint.as_ref(), &out))?;
        last_checkpoint = Some((saved.path, total));
    }
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
        // What was non-finite: the loss, else the first tensor with a bad gradient.
        let fault: Option<String> = stats.skipped.then(|| match &backend {
            _ if !stats.loss.is_finite() => "loss".to_string(),
            Backend::Cpu => runner.first_non_finite_grad().map_or_else(
                || "gradient norm".to_string(),
                |n| format!("gradient of {n}"),
            ),
            Backend::Gpu(_) => "gradient (the GPU step does not say which tensor)".to_string(),
        });
        if let Some(f) = &fault {
            bad_streak += 1;
            bar.suspend(|| {
                eprintln!(
                    "step {}: non-finite {f} (loss {}, grad norm {}); step skipped, nothing updated ({bad_streak} in a row, the run stops at {MAX_BAD_STEPS})",
                    stats.step, stats.loss, stats.grad_norm
                )
            });
        } else {
            bad_streak = 0;
        }
        losses.push((stats.step as f64, f64::from(stats.loss)));
        let ips = (done * batch as u64) as f64 / started.elapsed().as_secs_f64();
        writeln!(
            metrics,
            "{}",
            serde_json::json!({ "kind": "step", "stats": stats, "images_per_second": ips, "non_finite": fault })
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
        if bad_streak >= MAX_BAD_STEPS {
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            bar.finish_and_clear();
            let last = match &last_checkpoint {
                Some((p, s)) => format!(
                    "the last checkpoint, {} (step {s}), is intact and holds the weights before them",
                    p.display()
                ),
                None => "no checkpoint was written".to_string(),
            };
            return Err(Error::bad_config(
                "training",
                format!(
                    "steps {}..={} ({MAX_BAD_STEPS} in a row) had a non-finite loss or gradient (the last: {}); \
                     the run stopped, {last}. Lower the learning rate (--lr) or optim.clip_grad, check the data, \
                     then continue with --resume {}",
                    stats.step + 1 - bad_streak,
                    stats.step,
                    fault.as_deref().unwrap_or("?"),
                    out.display()
                ),
            ));
        }
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
            if bad_streak > 0 && next != total {
                // The weights are the last good step's, but a streak that goes on to stop
                // the run must not rotate the good checkpoints out.
                bar.suspend(|| {
                    eprintln!(
                        "step {}: end of epoch, no checkpoint written while non-finite steps go on ({bad_streak} in a row)",
                        stats.step
                    )
                });
                continue;
            }
            let state = training_state(&w, t_g, next, steps_per_epoch);
            let saved = checkpoint::save_in_dir(
                &out,
                KEEP_CHECKPOINTS,
                &net.table,
                k,
                &state,
                &config_json,
            )
            .map_err(|e| write_failed(e, next, last_checkpoint.as_ref(), &out))?;
            last_checkpoint = Some((saved.path, next));
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    backend.sync_host(&mut w)?;
    let device_memory = match &backend {
        Backend::Cpu => None,
        Backend::Gpu(t) => Some(t.memory_peak()),
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

/// What a checkpoint of `w` after `step` steps holds.
fn training_state(w: &Weights, t_g: usize, step: u64, steps_per_epoch: u64) -> TrainingState {
    TrainingState {
        student: w.student.clone(),
        teacher: w.teacher.clone(),
        exp_avg: w.adam.m(),
        exp_avg_sq: w.adam.v(),
        adam_step: w.adam.main.step,
        adam_step_last: w.adam.last.step,
        center: w.center.clone(),
        center_rows: t_g,
        step,
        epoch: step / steps_per_epoch,
    }
}

/// The error of a checkpoint write that failed (disk full, read-only folder): the file
/// and the OS error, what is left, and the fix.
fn write_failed(e: Error, step: u64, previous: Option<&(PathBuf, u64)>, out: &Path) -> Error {
    let left = match previous {
        Some((p, s)) => format!(
            "the previous checkpoint {} (step {s}) is intact",
            p.display()
        ),
        None => "no earlier checkpoint exists".to_string(),
    };
    match e {
        Error::Io { path, err } => Error::bad_file(
            path,
            format!(
                "cannot write the checkpoint of step {step} ({err}); the run stopped, {left}. \
                 Free disk space or make {} writable, then continue with --resume {}",
                out.display(),
                out.display()
            ),
        ),
        other => other,
    }
}

/// Drops the lines of `metrics.jsonl` at `path` from step `start` on (and any torn last
/// line), so a resumed run does not log the steps it replays twice.
fn keep_metrics_before(path: &Path, start: u64) -> Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["stats"]["step"].as_u64().or_else(|| {
            // A kNN line's `step` counts the steps done before it.
            v["step"].as_u64().map(|s| s.saturating_sub(1))
        });
        if step.is_some_and(|s| s < start) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    checkpoint::write_atomic(path, kept.as_bytes())
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
