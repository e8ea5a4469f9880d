//! The `pwself-engine` command line: a thin layer over the library. Each subcommand parses
//! its flags, calls the library, and prints; errors go to stderr with a non-zero exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod dino_flags;
mod eval_cmd;
mod gpu_cmd;

use gpu_cmd::{BenchArgs, CheckKernelsArgs, DeviceFlag};
use pwself_engine::data::prepare::PrepareArgs;
use pwself_engine::loss::LossKind;
use pwself_engine::model::config::Arch;
use pwself_engine::train::{fmt_knn, RunOptions, TrainConfig};
use pwself_engine::views::args::{Switch, ViewArgs};
use pwself_engine::views::batch::{LoaderPlan, ViewBuilder, ViewLoader};
use pwself_engine::views::config::parse_pair;
use pwself_engine::views::crop::{parse_crop_arg, CropRecord};
use pwself_engine::views::matching::{check_grid, match_patches, MatchRule};
use pwself_engine::viz::{draw_matches, ViewPicture};

#[derive(Parser)]
#[command(
    name = "pwself-engine",
    version,
    about = "Train PW-Self (patch-wise self-supervised ViTs): data, views, patch matching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a pack file from IDX (MNIST / Fashion-MNIST), CIFAR binary or an image folder.
    Prepare(PrepareArgs),
    /// Build view batches from a pack through the prefetching loader and report views/s
    /// and matched-token statistics (a dry run of the training input pipeline).
    Views(ViewsArgs),
    /// Train PW-Self (or DINO) on the CPU or a GPU; with no arguments, the default job on
    /// the embedded Fashion-MNIST subset.
    Train(Box<TrainArgs>),
    /// Print the matched token indices of two crop boxes.
    Match(MatchArgs),
    /// Draw pictures.
    #[command(subcommand)]
    Viz(VizCommand),
    /// Run every CUDA kernel against its CPU twin on random inputs and print the error of
    /// each output against its bound (exit 3 when there is no GPU, 1 on any failure).
    CheckKernels(CheckKernelsArgs),
    /// Time every CUDA kernel at training shapes (GB/s, TFLOP/s, share of copy bandwidth).
    Bench(BenchArgs),
    /// Show how this binary's CUDA kernels were built: nvcc, modules, registers, shared
    /// memory and spills per kernel, and whether a GPU is usable.
    Kernels,
    /// Evaluate features by DINO's protocols: kNN, linear probe, copy detection, retrieval
    /// (from a checkpoint and packs, or from precomputed .npy features).
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// Write a checkpoint's teacher (or student) backbone as a timm ViT state dict
    /// (safetensors, timm's key names, no head) and print the Python that loads it
    /// (docs/interop.md). The reverse is `train --init FILE`.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ViewsArgs {
    #[command(flatten)]
    views: ViewArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Number of batches to build; default: one epoch.
    #[arg(long)]
    batches: Option<u64>,
    /// Worker threads for view building (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print a JSON summary on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// TOML configuration file (every key optional; flags below override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Loss: dino (CLS only), pwml (mean over matched tokens), pwsl (sum), pwll (lambda mix).
    #[arg(long, value_enum)]
    loss: Option<LossFlag>,
    /// PWLL's weight of the CLS term, in [0, 1].
    #[arg(long)]
    lambda: Option<f32>,
    /// Photometric augmentation per patch (on, the paper) or per view (off, DINO).
    #[arg(long, value_enum)]
    patch_aug: Option<Switch>,
    /// Training pack (default: the embedded Fashion-MNIST subset).
    #[arg(long, value_name = "PACK")]
    data: Option<PathBuf>,
    /// Pack for the kNN evaluation (default: the embedded test split with the embedded data).
    #[arg(long, value_name = "PACK")]
    test_data: Option<PathBuf>,
    /// Backbone size: femto, tiny, small, base (DINO's names vit_tiny, vit_small, vit_base,
    /// deit_tiny, deit_small work too).
    #[arg(long, value_parser = dino_flags::parse_arch, value_name = "NAME")]
    arch: Option<Arch>,
    /// Patch size in pixels.
    #[arg(long)]
    patch: Option<usize>,
    /// Sides of the global and local views, e.g. 28,12.
    #[arg(long, value_name = "G,L")]
    view_sides: Option<String>,
    /// Number of global views per image.
    #[arg(long)]
    global_views: Option<usize>,
    /// Number of local views per image.
    #[arg(long)]
    local_views: Option<usize>,
    /// Head output dimension K.
    #[arg(long)]
    out_dim: Option<usize>,
    /// Epochs the schedules span.
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many steps (the schedules still span --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Images per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Base learning rate for batch 256 (scaled by batch/256).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of every random draw.
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// kNN evaluation every N epochs (0: only at the end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Output directory: metrics.jsonl, checkpoint.safetensors, curves.png, config.toml.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue from a checkpoint file or run directory.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Initialise the student and teacher backbones from a timm ViT state dict
    /// (safetensors; `model.init`); the DINO head starts fresh (docs/interop.md).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Print a JSON summary on stdout at the end (no progress bar).
    #[arg(long)]
    json: bool,
    /// Backend: cpu, cuda, or auto (the GPU when one is usable, else the CPU, saying so).
    #[arg(long, value_enum, default_value_t = DeviceFlag::Auto)]
    device: DeviceFlag,
    /// Resolve the whole configuration (flags, --config file, DINO defaults, the pack's
    /// image size), print it as JSON and exit without training.
    #[arg(long, hide = true)]
    print_config: bool,
    /// DINO's main_dino.py flag names (docs/dino-flags.md).
    #[command(flatten)]
    dino: dino_flags::DinoFlags,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossFlag {
    Dino,
    Pwml,
    Pwsl,
    Pwll,
}

#[derive(clap::Args)]
struct MatchArgs {
    /// Source image size, HEIGHTxWIDTH.
    #[arg(long, default_value = "256x256", value_name = "HxW")]
    image: String,
    /// ViT patch size in pixels.
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// Sides of the teacher (box1) and student (box2) views.
    #[arg(long, default_value = "224,96", value_name = "S1,S2")]
    view_sides: String,
    /// The teacher view's crop box: TOP,LEFT,HEIGHT,WIDTH[,flip].
    #[arg(long, allow_hyphen_values = true)]
    box1: String,
    /// The student view's crop box: TOP,LEFT,HEIGHT,WIDTH[,flip].
    #[arg(long, allow_hyphen_values = true)]
    box2: String,
    /// Matching rule.
    #[arg(long, value_enum, default_value_t = MatchRule::Paper)]
    rule: MatchRule,
    /// Print {"teacher": [...], "student": [...]} instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum VizCommand {
    /// One source image, a teacher and a student view with their patch grids, and a line
    /// between every pair of matched patches.
    Matches(VizMatchesArgs),
    /// The CLS self-attention of each head of the last block over an image, upsampled and
    /// overlaid (DINO's figures).
    Attention(eval_cmd::VizAttentionArgs),
    /// A nearest-neighbour grid: query images and their top-k retrieved, with labels.
    Neighbours(eval_cmd::VizNeighboursArgs),
}

#[derive(clap::Args)]
struct VizMatchesArgs {
    #[command(flatten)]
    views: ViewArgs,
    /// Dataset index of the image to draw.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Batch index whose crop records to use (crops are shared by a batch).
    #[arg(long, default_value_t = 0)]
    batch_index: u64,
    /// Teacher view (a global view index).
    #[arg(long, default_value_t = 0)]
    teacher: usize,
    /// Student view; default: the first local view that overlaps the teacher.
    #[arg(long)]
    student: Option<usize>,
    /// Output PNG.
    #[arg(long, default_value = "matches.png")]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => pwself_engine::data::prepare::run(&args),
        Command::Views(args) => views(&args),
        Command::Train(args) => train(&args),
        Command::Match(args) => match_cmd(&args),
        Command::Viz(VizCommand::Matches(args)) => viz_matches(&args),
        Command::CheckKernels(args) => gpu_cmd::check_kernels(&args),
        Command::Bench(args) => gpu_cmd::bench_cmd(&args),
        Command::Kernels => gpu_cmd::kernels(),
        Command::Eval(cmd) => eval_cmd::run(&cmd),
        Command::Export(args) => export(&args),
        Command::Viz(VizCommand::Attention(args)) => eval_cmd::viz_attention(&args),
        Command::Viz(VizCommand::Neighbours(args)) => eval_cmd::viz_neighbours(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(gpu_cmd::exit_code(&e));
    }
}

/// Sizes the rayon pool, which runs every CPU kernel, GEMMs included.
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!(
                "run.threads (--threads): is 0: pass at least 1, or leave it out to use every core"
            );
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("--threads: cannot start the thread pool")?;
    }
    Ok(())
}

fn train(args: &TrainArgs) -> Result<()> {
    args.dino.refuse_unsupported()?;
    let mut cfg = match &args.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    let dino_given = args.dino.given();
    if !dino_given.is_empty() {
        // DINO-spelled flags: main_dino.py's defaults under the file's keys and the flags.
        let table = match &args.config {
            Some(p) => Some(dino_flags::config_table(p)?),
            None => None,
        };
        dino_flags::apply_defaults(&mut cfg, table.as_ref());
        eprintln!(
            "note: DINO flags ({}): unset keys take main_dino.py's defaults (docs/dino-flags.md)",
            dino_given.join(" ")
        );
    }
    if let Some(l) = args.loss {
        cfg.loss.kind = match l {
            LossFlag::Dino => LossKind::Dino,
            LossFlag::Pwml => LossKind::Pwml,
            LossFlag::Pwsl => LossKind::Pwsl,
            LossFlag::Pwll => LossKind::Pwll {
                lambda: args.lambda.unwrap_or(0.5),
            },
        };
    }
    match (args.lambda, cfg.loss.kind) {
        (Some(lambda), LossKind::Pwll { .. }) => cfg.loss.kind = LossKind::Pwll { lambda },
        (Some(_), _) => bail!("--lambda: only PWLL has a lambda; add --loss pwll"),
        _ => {}
    }
    if let Some(s) = args.patch_aug {
        cfg.views.patch_aug = Some(s == Switch::On);
    }
    if args.data.is_some() {
        cfg.data.train.clone_from(&args.data);
    }
    if args.test_data.is_some() {
        cfg.data.test.clone_from(&args.test_data);
    }
    if let Some(a) = args.arch {
        cfg.model.arch = a;
    }
    if args.patch.is_some() {
        cfg.model.patch = args.patch;
    }
    let view_sides = match &args.view_sides {
        Some(s) => Some(parse_pair::<usize>(s, "--view-sides")?),
        None => None,
    };
    if let Some((g, l)) = view_sides {
        (cfg.views.global_side, cfg.views.local_side) = (Some(g), Some(l));
    }
    if args.global_views.is_some() {
        cfg.views.global_views = args.global_views;
    }
    if args.local_views.is_some() {
        cfg.views.local_views = args.local_views;
    }
    if let Some(k) = args.out_dim {
        cfg.head.out_dim = k;
    }
    if let Some(e) = args.epochs {
        cfg.run.epochs = e;
    }
    if args.max_steps.is_some() {
        cfg.run.max_steps = args.max_steps;
    }
    if let Some(b) = args.batch {
        cfg.run.batch = b;
    }
    if let Some(lr) = args.lr {
        cfg.optim.lr = lr;
    }
    if let Some(s) = args.seed {
        cfg.run.seed = s;
    }
    if args.threads.is_some() {
        cfg.run.threads = args.threads;
    }
    if let Some(e) = args.eval_every {
        cfg.run.eval_every = e;
    }
    if let Some(o) = &args.out {
        cfg.run.out.clone_from(o);
    }
    if args.init.is_some() {
        cfg.model.init.clone_from(&args.init);
    }
    let own = dino_flags::OwnFlags {
        patch: args.patch,
        out_dim: args.out_dim,
        batch: args.batch,
        out: args.out.as_deref(),
        data: args.data.as_deref(),
        global_views: args.global_views,
        local_views: args.local_views,
        view_sides,
    };
    for note in args.dino.apply(&mut cfg, &own)? {
        eprintln!("note: {note}");
    }
    if args.print_config {
        println!("{}", dino_flags::resolved_json(&cfg)?);
        return Ok(());
    }
    let device = gpu_cmd::resolve_train_device(args.device)?;
    set_threads(cfg.run.threads)?;
    let opts = RunOptions {
        resume: args.resume.clone(),
        quiet: args.json,
        no_eval: false,
        device,
    };
    let s = pwself_engine::train::run(&cfg, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "trained {} steps ({:.2} epochs) in {:.1} s, {:.1} img/s; loss {:.4} -> {:.4}{}",
        s.steps,
        s.epochs_done,
        s.seconds,
        s.images_per_second,
        s.first_loss.unwrap_or(f32::NAN),
        s.last_loss.unwrap_or(f32::NAN),
        if s.skipped_steps > 0 {
            format!(" ({} steps skipped: non-finite)", s.skipped_steps)
        } else {
            String::new()
        }
    );
    if let Some(k) = &s.knn_trained {
        println!("kNN top-1, trained teacher:        {}", fmt_knn(k));
    }
    if let Some(k) = &s.knn_init {
        println!("kNN top-1, same network at init:   {}", fmt_knn(k));
    }
    if let Some(k) = &s.knn_raw_pixels {
        println!("kNN top-1, raw pixels (baseline):  {}", fmt_knn(k));
    }
    println!(
        "wrote {} (checkpoint), {}, {}",
        s.checkpoint.display(),
        s.out.join("metrics.jsonl").display(),
        s.out.join("curves.png").display()
    );
    Ok(())
}

fn views(args: &ViewsArgs) -> Result<()> {
    set_threads(args.threads)?;
    let pack = Arc::new(args.views.open_pack()?);
    let cfg = args.views.config(pack.height(), pack.width())?;
    let builder = ViewBuilder::new(cfg.clone(), args.views.seed, &pack)?;
    let steps_per_epoch = (pack.len() / args.batch.max(1)) as u64;
    if args.batches == Some(0) {
        bail!("--batches: is 0: pass at least 1, or leave it out for one epoch");
    }
    let batches = args.batches.unwrap_or(steps_per_epoch).max(1);
    let plan = LoaderPlan {
        batch_size: args.batch,
        start: 0,
        batches,
        prefetch: 2,
    };
    let mut loader = ViewLoader::start(Arc::clone(&pack), builder, plan)?;

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(batches)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} batches  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let views_per_batch = (args.batch * cfg.num_views()) as f64;
    let start = Instant::now();
    let (mut gg, mut gl, mut n_gg, mut n_gl, mut cls_only) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut done = 0u64;
    while let Some(batch) = loader.next_batch() {
        let batch = batch?;
        for p in &batch.pairs {
            if p.student_view < cfg.global.count {
                gg += p.matches.len();
                n_gg += 1;
            } else {
                gl += p.matches.len();
                n_gl += 1;
                cls_only += usize::from(p.matches.len() == 1);
            }
        }
        done += 1;
        let rate = done as f64 * views_per_batch / start.elapsed().as_secs_f64();
        bar.set_message(format!("{rate:.0} views/s"));
        bar.inc(1);
        loader.recycle(batch);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let mean = |s: usize, n: usize| if n == 0 { 0.0 } else { s as f64 / n as f64 };
    let summary = serde_json::json!({
        "data": pack.origin().display().to_string(),
        "images": pack.len(),
        "source": format!("{}x{}x{}", pack.height(), pack.width(), pack.channels()),
        "views": cfg,
        "batch": args.batch,
        "batches": done,
        "seconds": secs,
        "views_per_second": done as f64 * views_per_batch / secs,
        "images_per_second": done as f64 * args.batch as f64 / secs,
        "mean_matched_tokens_global_global": mean(gg, n_gg),
        "mean_matched_tokens_global_local": mean(gl, n_gl),
        "cls_only_fraction_global_local": mean(cls_only, n_gl),
    });
    if args.json {
        println!("{summary:#}");
    } else {
        println!(
            "{} batches of {} images ({} views each) from {} ({}x{}x{}) in {:.2} s: {:.0} views/s, {:.0} images/s",
            done,
            args.batch,
            cfg.num_views(),
            pack.origin().display(),
            pack.height(),
            pack.width(),
            pack.channels(),
            secs,
            done as f64 * views_per_batch / secs,
            done as f64 * args.batch as f64 / secs
        );
        println!(
            "views: {} x {} global + {} x {} local, patch {}, patch-level augmentation {}, {:?} matching",
            cfg.global.count,
            cfg.global.side,
            cfg.local.count,
            cfg.local.side,
            cfg.patch_size,
            if cfg.per_patch { "on" } else { "off" },
            cfg.match_rule
        );
        println!(
            "matched tokens per pair (CLS included): global-global {:.1}, global-local {:.1}; global-local pairs with CLS only: {:.2}%",
            mean(gg, n_gg),
            mean(gl, n_gl),
            100.0 * mean(cls_only, n_gl)
        );
    }
    Ok(())
}

fn match_cmd(args: &MatchArgs) -> Result<()> {
    let (h, w) = args
        .image
        .split_once(['x', 'X'])
        .and_then(|(h, w)| Some((h.trim().parse::<u32>().ok()?, w.trim().parse::<u32>().ok()?)))
        .filter(|&(h, w)| h > 0 && w > 0)
        .with_context(|| {
            format!(
                "--image: `{}` is not a size; write HEIGHTxWIDTH, e.g. 256x256",
                args.image
            )
        })?;
    if args.patch == 0 {
        bail!("--patch: must be at least 1 pixel");
    }
    let (s1, s2): (usize, usize) = parse_pair(&args.view_sides, "--view-sides")?;
    for s in [s1, s2] {
        if s == 0 || s % args.patch != 0 {
            bail!("--view-sides: view side {s} is not divisible by the patch size {}; use a multiple of {}", args.patch, args.patch);
        }
    }
    let b1 = parse_crop_arg(&args.box1, "--box1")?;
    let b2 = parse_crop_arg(&args.box2, "--box2")?;
    b1.check_inside(h, w, "--box1")?;
    b2.check_inside(h, w, "--box2")?;
    // Grids past u32 saturate, and check_grid refuses them with the rest of the too-large.
    let grid = |s: usize| u32::try_from(s / args.patch).unwrap_or(u32::MAX);
    let (g1, g2) = (grid(s1), grid(s2));
    check_grid(g1, "--view-sides")?;
    check_grid(g2, "--view-sides")?;
    let m = match_patches(&b1, g1, &b2, g2, args.rule);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "teacher": m.first, "student": m.second })
        );
        return Ok(());
    }
    let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    println!(
        "teacher view: box {} -> {s1}x{s1}, grid {g1}x{g1}",
        b1.to_arg()
    );
    println!(
        "student view: box {} -> {s2}x{s2}, grid {g2}x{g2}",
        b2.to_arg()
    );
    println!(
        "{} matched tokens (CLS + {} patch pairs), {:?} rule",
        m.len(),
        m.len() - 1,
        args.rule
    );
    println!("teacher: {}", join(&m.first));
    println!("student: {}", join(&m.second));
    Ok(())
}

fn viz_matches(args: &VizMatchesArgs) -> Result<()> {
    let pack = args.views.open_pack()?;
    if args.index >= pack.len() {
        bail!(
            "--index: {} is out of range: {} holds {} images",
            args.index,
            pack.origin().display(),
            pack.len()
        );
    }
    let cfg = args.views.config(pack.height(), pack.width())?;
    if args.teacher >= cfg.global.count {
        bail!(
            "--teacher: view {} is not a global view (there are {})",
            args.teacher,
            cfg.global.count
        );
    }
    let builder = ViewBuilder::new(cfg.clone(), args.views.seed, &pack)?;
    let batch = builder.build(&pack, args.batch_index, 0, &[args.index as u32])?;
    let pair = match args.student {
        Some(s) => batch
            .pairs
            .iter()
            .find(|p| p.teacher_view == args.teacher && p.student_view == s)
            .with_context(|| {
                format!(
                    "--student: view {s} does not pair with teacher view {} (views are 0..{})",
                    args.teacher,
                    cfg.num_views()
                )
            })?,
        None => batch
            .pairs
            .iter()
            .filter(|p| p.teacher_view == args.teacher)
            .find(|p| p.student_view >= cfg.global.count && p.matches.len() > 1)
            .or_else(|| batch.pairs.iter().find(|p| p.teacher_view == args.teacher))
            .context("no teacher/student pair: the configuration has a single view")?,
    };
    // Views come normalised; undo it for display.
    let denorm = |v: usize| -> Vec<f32> {
        let side = cfg.side(v);
        let mut px = batch.views[v].clone();
        for (ch, plane) in px.chunks_exact_mut(side * side).enumerate() {
            plane
                .iter_mut()
                .for_each(|x| *x = *x * pack.std()[ch] + pack.mean()[ch]);
        }
        px
    };
    let (t_px, s_px) = (denorm(pair.teacher_view), denorm(pair.student_view));
    fn picture<'a>(
        pixels: &'a [f32],
        channels: usize,
        side: usize,
        patch: usize,
        crop: CropRecord,
    ) -> ViewPicture<'a> {
        ViewPicture {
            pixels,
            channels,
            side,
            patch,
            crop,
        }
    }
    let (t, s) = (pair.teacher_view, pair.student_view);
    let img = draw_matches(
        pack.image(args.index),
        pack.height(),
        pack.width(),
        pack.channels(),
        &picture(
            &t_px,
            pack.channels(),
            cfg.side(t),
            cfg.patch_size,
            batch.crops[t],
        ),
        &picture(
            &s_px,
            pack.channels(),
            cfg.side(s),
            cfg.patch_size,
            batch.crops[s],
        ),
        &pair.matches,
    );
    img.save(&args.out)
        .with_context(|| format!("--out: cannot write {}", args.out.display()))?;
    println!(
        "wrote {}: image {} of {}, teacher view {} (box {}), student view {} (box {}), {} matched tokens",
        args.out.display(),
        args.index,
        pack.origin().display(),
        pair.teacher_view,
        batch.crops[pair.teacher_view].to_arg(),
        pair.student_view,
        batch.crops[pair.student_view].to_arg(),
        pair.matches.len()
    );
    Ok(())
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Checkpoint written by `pwself-engine train` (a file or its run directory).
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// The safetensors file to write (timm's key names only).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Which backbone: the EMA teacher (DINO's released weights) or the student.
    #[arg(long, value_enum, default_value_t = pwself_engine::interop::Which::Teacher)]
    which: pwself_engine::interop::Which,
    /// Also write probe_input.npy (the first N images of --pack exactly as the model sees
    /// them, (N, C, S, S) float32) and probe_cls.npy (the engine's final-norm CLS, (N, D)).
    #[arg(long, value_name = "N")]
    probe_input: Option<usize>,
    /// The pack of --probe-input (default: the checkpoint's training pack).
    #[arg(long, value_name = "PACK")]
    pack: Option<PathBuf>,
    /// Folder of the probe files (default: --out's folder).
    #[arg(long, value_name = "DIR")]
    probe_dir: Option<PathBuf>,
}

/// `export`: the backbone as a timm state dict, optionally with a probe input and the
/// engine's CLS features of it.
fn export(a: &ExportArgs) -> Result<()> {
    use pwself_engine::eval::features::Extractor;
    use pwself_engine::eval::npy;
    use pwself_engine::interop;

    let b = interop::read_checkpoint(&a.checkpoint, a.which)?;
    let spec = interop::TimmSpec::of(&b.net.vit);
    let mut extra = vec![
        ("source", b.path.display().to_string()),
        ("which", a.which.name().to_string()),
    ];
    if let Some(step) = b.step {
        extra.push(("step", step.to_string()));
    }
    let bytes = interop::encode_backbone(&a.out, &b.net, &b.params, &extra)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out: cannot create the folder {}", dir.display()))?;
    }
    pwself_engine::checkpoint::write_atomic(&a.out, &bytes)?;
    let n_tensors = b
        .net
        .table
        .tensors()
        .iter()
        .filter(|t| interop::is_backbone(t))
        .count();
    let n_params: usize = b
        .net
        .table
        .tensors()
        .iter()
        .filter(|t| interop::is_backbone(t))
        .map(|t| t.len())
        .sum();
    println!(
        "wrote {}: the {} backbone of {}{} ({n_tensors} tensors, {n_params} parameters), timm model {}",
        a.out.display(),
        a.which.name(),
        b.path.display(),
        b.step.map(|s| format!(" at step {s}")).unwrap_or_default(),
        spec.model_name.as_deref().unwrap_or("custom (VisionTransformer with the sizes below)")
    );
    if let Some(n) = a.probe_input {
        if n == 0 {
            bail!("--probe-input: is 0; pass the number of images to probe (e.g. 8)");
        }
        let pack = match a.pack.as_ref().or(b.config.data.train.as_ref()) {
            Some(p) => pwself_engine::data::Pack::open(p)?,
            None => pwself_engine::data::default_pack(pwself_engine::data::Split::Train)?,
        };
        if n > pack.len() {
            bail!(
                "--probe-input: {n} images asked for, but {} holds {}; pass at most {}",
                pack.origin().display(),
                pack.len(),
                pack.len()
            );
        }
        let side = spec.img_size;
        let c = b.net.vit.in_chans;
        let ex = Extractor::from_parts(b.net.clone(), b.params.clone(), side)?;
        let mut x = Vec::with_capacity(n * c * side * side);
        for i in 0..n {
            x.extend(ex.pack_input(&pack, i)?);
        }
        let cls = interop::cls_features(&b.net, &b.params, &x, n, side);
        let dir = match &a.probe_dir {
            Some(d) => d.clone(),
            None => a
                .out
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("--probe-dir: cannot create {}", dir.display()))?;
        let input_path = dir.join("probe_input.npy");
        let payload: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dict = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {c}, {side}, {side}), }}"
        );
        npy::write_bytes(&input_path, &npy::raw_npy_bytes(&dict, &payload))?;
        let cls_path = dir.join("probe_cls.npy");
        npy::write_matrix(&cls_path, &cls, n, b.net.vit.embed_dim)?;
        println!(
            "wrote {} ({n}, {c}, {side}, {side}) from {} and {} ({n}, {}): the engine's final-norm CLS",
            input_path.display(),
            pack.origin().display(),
            cls_path.display(),
            b.net.vit.embed_dim
        );
    }
    println!("\nload it in Python:\n\n{}", spec.python_snippet(&a.out));
    Ok(())
}
