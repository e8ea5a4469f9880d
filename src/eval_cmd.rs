//! `pwself-engine eval ...` and the evaluation pictures (`viz attention`, `viz neighbours`):
//! flags in, library calls, a table or JSON out. Every protocol takes either a checkpoint
//! plus data (packs, or a ground truth and its images) or precomputed `.npy` features, so
//! any model's features are scored by the same code. No protocol logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use pwself_engine::data::embedded::{default_pack, Split};
use pwself_engine::data::Pack;
use pwself_engine::eval::ap::Protocol;
use pwself_engine::eval::copybench::{self, BuildOptions};
use pwself_engine::eval::copydetect::{self, CopyGroundTruth, Whitening};
use pwself_engine::eval::features::{cache, Extractor, FeatureKind};
use pwself_engine::eval::knn::{self, KnnOptions};
use pwself_engine::eval::linear::{self, ProbeConfig, ProbeMode};
use pwself_engine::eval::npy;
use pwself_engine::eval::retrieval::{self, GroundTruth};
use pwself_engine::viz;
use pwself_engine::Error;

/// The evaluation protocols (SPEC.md section 7).
#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Weighted kNN (T = 0.07, k in 10/20/100/200, top-1/top-5): DINO's protocol.
    Knn(KnnArgs),
    /// Linear probe on frozen features: fast (cached features, no augmentation) or
    /// augmented (DINO's recipe: random-resized-crop + flip per epoch).
    Linear(LinearArgs),
    /// Copy detection: CLS + GeM features, PCA whitening, cosine top-k, mAP per block.
    Copy(CopyArgs),
    /// Image retrieval on revisited Oxford/Paris-style ground truth: mAP and mP@k under
    /// the Easy/Medium/Hard protocols.
    Retrieval(RetrievalArgs),
    /// Write features of a pack or of a ground truth's images to .npy files.
    Features(FeaturesArgs),
    /// Build the real-photo copy-detection benchmark from installed Debian packages.
    CopyBench(CopyBenchArgs),
}

/// Where features come from when a checkpoint gives them.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Checkpoint (checkpoint.safetensors of `pwself-engine train`, or its run directory);
    /// its teacher backbone computes the features.
    #[arg(long, value_name = "CKPT")]
    checkpoint: Option<PathBuf>,
    /// Feature: cls, last4 (last-n:N), cls+patchmean, patchmean, gem:P, cls+gem:P,
    /// multiscale. Default: the protocol's.
    #[arg(long, value_name = "KIND")]
    feature: Option<FeatureKind>,
    /// Input side in pixels (a multiple of the patch); default: the checkpoint's global
    /// view side.
    #[arg(long)]
    side: Option<usize>,
    /// Feature cache folder (default: .feature-cache next to the checkpoint).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Compute features afresh and do not store them.
    #[arg(long)]
    no_cache: bool,
    /// Per-channel mean for image files (pixel / 255), e.g. 0.485,0.456,0.406; default
    /// ImageNet's. Packs always use their own mean and std.
    #[arg(long, value_delimiter = ',', value_name = "M")]
    mean: Option<Vec<f32>>,
    /// Per-channel std for image files; default ImageNet's.
    #[arg(long, value_delimiter = ',', value_name = "S")]
    std: Option<Vec<f32>>,
}

/// Precomputed features of a labelled train/test split.
#[derive(clap::Args, Clone, Debug)]
pub struct SplitFeatureArgs {
    /// Train features, .npy float32 (rows = images).
    #[arg(long, value_name = "NPY")]
    train_features: Option<PathBuf>,
    /// Train labels, .npy integers (one per row).
    #[arg(long, value_name = "NPY")]
    train_labels: Option<PathBuf>,
    /// Test features, .npy float32.
    #[arg(long, value_name = "NPY")]
    test_features: Option<PathBuf>,
    /// Test labels, .npy integers.
    #[arg(long, value_name = "NPY")]
    test_labels: Option<PathBuf>,
}

/// Flags of `eval knn`.
#[derive(clap::Args)]
pub struct KnnArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Train pack (with --checkpoint).
    #[arg(long, value_name = "PACK")]
    train: Option<PathBuf>,
    /// Test pack (with --checkpoint).
    #[arg(long, value_name = "PACK")]
    test: Option<PathBuf>,
    #[command(flatten)]
    npy: SplitFeatureArgs,
    /// Numbers of neighbours.
    #[arg(long, value_delimiter = ',', default_value = "10,20,100,200")]
    k: Vec<usize>,
    /// Temperature of the vote weights exp(sim / T).
    #[arg(long, default_value_t = 0.07)]
    temperature: f32,
    /// Train rows per similarity block (memory bound; never changes the result).
    #[arg(long, default_value_t = 4096)]
    block_rows: usize,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The linear probe's mode on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum ModeFlag {
    /// Cached features of the whole images, no augmentation (quick; not DINO's numbers).
    Fast,
    /// DINO's recipe: new random-resized-crop + flip views of the train set every epoch.
    Augmented,
}

/// Flags of `eval linear`.
#[derive(clap::Args)]
pub struct LinearArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Train pack (with --checkpoint).
    #[arg(long, value_name = "PACK")]
    train: Option<PathBuf>,
    /// Test pack (with --checkpoint).
    #[arg(long, value_name = "PACK")]
    test: Option<PathBuf>,
    #[command(flatten)]
    npy: SplitFeatureArgs,
    /// fast: features computed once; augmented: DINO's train-time augmentation (needs
    /// --checkpoint and --train).
    #[arg(long, value_enum, default_value_t = ModeFlag::Fast)]
    mode: ModeFlag,
    /// Epochs (DINO: 100).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (DINO: 1024 over 8 GPUs x 128... the lr scales with it).
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate (default: 0.001 * batch / 256).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of the initialisation, shuffling and augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Flags of `eval copy`.
#[derive(clap::Args)]
pub struct CopyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Copy-detection ground truth JSON (db, queries with positives and block, whitening).
    #[arg(long, value_name = "FILE")]
    gt: Option<PathBuf>,
    /// Folder the ground truth's image paths are relative to (default: its own folder).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Database features .npy (rows in the ground truth's db order).
    #[arg(long, value_name = "NPY")]
    db_features: Option<PathBuf>,
    /// Query features .npy (rows in the ground truth's queries order).
    #[arg(long, value_name = "NPY")]
    query_features: Option<PathBuf>,
    /// Features of the whitening images .npy (none: no whitening).
    #[arg(long, value_name = "NPY")]
    whiten_features: Option<PathBuf>,
    /// Skip the whitening even when whitening images are given.
    #[arg(long)]
    no_whiten: bool,
    /// Results per query (DINO: 20).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Which retrieval protocols to report.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum ProtocolFlag {
    /// Easy positives.
    Easy,
    /// Easy + hard positives.
    Medium,
    /// Hard positives.
    Hard,
    /// All three.
    All,
}

/// Flags of `eval retrieval`.
#[derive(clap::Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Ground truth: .json (imlist, qimlist, gnd) or the official revisited Oxford/Paris .pkl.
    #[arg(long, value_name = "FILE")]
    gt: PathBuf,
    /// Image folder (default: the ground truth's folder); names are tried as given, then
    /// with .jpg/.png/.jpeg, also under jpg/.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Database features .npy (rows in imlist order).
    #[arg(long, value_name = "NPY")]
    db_features: Option<PathBuf>,
    /// Query features .npy (rows in qimlist order).
    #[arg(long, value_name = "NPY")]
    query_features: Option<PathBuf>,
    /// Protocols to report.
    #[arg(long, value_enum, default_value_t = ProtocolFlag::All)]
    protocol: ProtocolFlag,
    /// Crop each query image to its box (the revisited protocol; DINO skips it).
    #[arg(long)]
    crop_queries: bool,
    /// Multi-scale CLS features (same as --feature multiscale).
    #[arg(long)]
    multiscale: bool,
    /// Ranks of the mean precision (mP@k).
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    ks: Vec<usize>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Flags of `eval features`.
#[derive(clap::Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A pack: writes OUT (features) and OUT's stem + `.labels.npy`.
    #[arg(long, value_name = "PACK", conflicts_with_all = ["retrieval_gt", "copy_gt"])]
    pack: Option<PathBuf>,
    /// Retrieval ground truth: writes OUT's stem + `.db.npy` and `.queries.npy`.
    #[arg(long, value_name = "FILE", conflicts_with = "copy_gt")]
    retrieval_gt: Option<PathBuf>,
    /// Copy-detection ground truth: writes `.db.npy`, `.queries.npy`, `.whitening.npy`.
    #[arg(long, value_name = "FILE")]
    copy_gt: Option<PathBuf>,
    /// Image folder of the ground truth (default: its folder).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Crop retrieval queries to their boxes.
    #[arg(long)]
    crop_queries: bool,
    /// Output .npy file.
    #[arg(long, value_name = "NPY")]
    out: PathBuf,
    /// Print what was written as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Flags of `eval copy-bench`.
#[derive(clap::Args)]
pub struct CopyBenchArgs {
    /// Output folder (originals, queries, distractors, whitening images, ground_truth.json).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seed of every edit.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most originals to take (distractors and whitening images shrink in proportion).
    #[arg(long)]
    max_originals: Option<usize>,
    /// Folders (searched recursively) or files to take photos from; default: the folders
    /// of the installed Debian packages the builder knows.
    #[arg(long = "source", value_name = "PATH")]
    sources: Vec<PathBuf>,
    /// Longest side of every stored image, in pixels.
    #[arg(long)]
    side: Option<u32>,
    /// Print the manifest as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Flags of `viz attention`.
#[derive(clap::Args)]
pub struct VizAttentionArgs {
    /// Checkpoint whose teacher's last-block CLS attention is drawn.
    #[arg(long, value_name = "CKPT")]
    checkpoint: PathBuf,
    /// Pack to take the image from (with --index); default: the embedded test split.
    #[arg(long, value_name = "PACK", conflicts_with = "image")]
    pack: Option<PathBuf>,
    /// Image index in the pack.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// An image file instead of a pack image (ImageNet normalisation).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Input side (a multiple of the patch); default: the checkpoint's.
    #[arg(long)]
    side: Option<usize>,
    /// Output PNG.
    #[arg(long, value_name = "PNG")]
    out: PathBuf,
}

/// Flags of `viz neighbours`.
#[derive(clap::Args)]
pub struct VizNeighboursArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Train pack: the images searched (and drawn); default: the embedded data.
    #[arg(long, value_name = "PACK")]
    train: Option<PathBuf>,
    /// Test pack: the queries.
    #[arg(long, value_name = "PACK")]
    test: Option<PathBuf>,
    /// Train features .npy instead of a checkpoint (rows = the train pack's images).
    #[arg(long, value_name = "NPY")]
    train_features: Option<PathBuf>,
    /// Test features .npy instead of a checkpoint.
    #[arg(long, value_name = "NPY")]
    test_features: Option<PathBuf>,
    /// Number of queries (spread evenly over the test pack).
    #[arg(long, default_value_t = 8)]
    queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Output PNG.
    #[arg(long, value_name = "PNG")]
    out: PathBuf,
}

/// Runs an `eval` subcommand.
pub fn run(cmd: &EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Knn(a) => eval_knn(a),
        EvalCommand::Linear(a) => eval_linear(a),
        EvalCommand::Copy(a) => eval_copy(a),
        EvalCommand::Retrieval(a) => eval_retrieval(a),
        EvalCommand::Features(a) => eval_features(a),
        EvalCommand::CopyBench(a) => eval_copy_bench(a),
    }
}

// ---------------------------------------------------------------------------------------
// Feature sources.

/// A checkpoint's file: the path itself, or `checkpoint.safetensors` inside a run folder.
fn checkpoint_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("checkpoint.safetensors")
    } else {
        p.to_path_buf()
    }
}

/// The extractor of `--checkpoint`, with `--side`, `--mean` and `--std` applied.
fn extractor(m: &ModelArgs) -> Result<Extractor> {
    let Some(ck) = &m.checkpoint else {
        bail!("--checkpoint: missing; pass a checkpoint (or precomputed .npy features)");
    };
    let mut ex = Extractor::from_checkpoint(&checkpoint_file(ck))?;
    if let Some(s) = m.side {
        ex.set_side(s)?;
    }
    if m.mean.is_some() || m.std.is_some() {
        let def = ex.file_normalisation().clone();
        ex.set_file_normalisation(
            m.mean.as_deref().unwrap_or(&def.mean),
            m.std.as_deref().unwrap_or(&def.std),
        )?;
    }
    Ok(ex)
}

/// The cache folder for features of `ex`, or None with --no-cache.
fn cache_dir(m: &ModelArgs, ex: &Extractor) -> Option<PathBuf> {
    if m.no_cache {
        return None;
    }
    Some(m.cache.clone().unwrap_or_else(|| {
        ex.checkpoint()
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(".feature-cache")
    }))
}

fn pack_features(
    m: &ModelArgs,
    ex: &Extractor,
    pack: &Pack,
    kind: FeatureKind,
) -> Result<Vec<f32>> {
    let compute = || ex.features_of_pack(pack, kind, true);
    Ok(match cache_dir(m, ex) {
        Some(dir) => cache::cached(
            &dir,
            &ex.pack_key(pack, kind),
            kind.dim(ex.network().vit.embed_dim),
            compute,
        )?,
        None => compute()?,
    })
}

fn file_features(
    m: &ModelArgs,
    ex: &Extractor,
    files: &[PathBuf],
    kind: FeatureKind,
    boxes: Option<&[Option<[f64; 4]>]>,
) -> Result<Vec<f32>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let compute = || ex.features_of_files(files, kind, boxes, true);
    Ok(match cache_dir(m, ex) {
        Some(dir) => cache::cached(
            &dir,
            &ex.files_key(files, kind, boxes),
            kind.dim(ex.network().vit.embed_dim),
            compute,
        )?,
        None => compute()?,
    })
}

/// Features with their labels, and where they came from (for messages).
struct Labelled {
    feats: Vec<f32>,
    labels: Vec<u16>,
    dim: usize,
    origin: String,
}

/// Reads features `(n, d)` and labels `n` from .npy files, checking they agree.
fn labelled_npy(feats: &Path, labels: &Path) -> Result<Labelled> {
    let (f, rows, dim) = npy::read_matrix(feats)?;
    let l = npy::read_labels(labels)?;
    if l.len() != rows {
        return Err(Error::bad_file(
            labels,
            format!(
                "holds {} labels but {} has {rows} feature rows; pass the labels of the same images in the same order",
                l.len(),
                feats.display()
            ),
        )
        .into());
    }
    if rows == 0 {
        return Err(
            Error::bad_file(feats, "holds no rows; pass features of at least one image").into(),
        );
    }
    Ok(Labelled {
        feats: f,
        labels: l,
        dim,
        origin: feats.display().to_string(),
    })
}

/// The train and test packs: both given, or neither (the embedded Fashion-MNIST subset's
/// splits, what `train` evaluates on by default).
fn open_split(train: &Option<PathBuf>, test: &Option<PathBuf>) -> Result<(Pack, Pack)> {
    match (train, test) {
        (Some(tr), Some(te)) => Ok((Pack::open(tr)?, Pack::open(te)?)),
        (None, None) => {
            eprintln!("note: no --train/--test packs: using the embedded Fashion-MNIST subset");
            Ok((default_pack(Split::Train)?, default_pack(Split::Test)?))
        }
        _ => bail!("--train and --test: pass both packs (or neither, for the embedded data)"),
    }
}

/// The train and test features of kNN / the linear probe: from a checkpoint and packs,
/// or from .npy files. Returns them with the class count.
fn split_features(
    m: &ModelArgs,
    train: &Option<PathBuf>,
    test: &Option<PathBuf>,
    npy_args: &SplitFeatureArgs,
    default_kind: FeatureKind,
) -> Result<(Labelled, Labelled, usize, Value)> {
    let n = npy_args;
    let any_npy = n.train_features.is_some()
        || n.train_labels.is_some()
        || n.test_features.is_some()
        || n.test_labels.is_some();
    let (a, b, source) = if m.checkpoint.is_some() {
        if any_npy {
            bail!("--checkpoint and --train-features/--test-features: pass one source of features, not both");
        }
        let ex = extractor(m)?;
        let (ptr, pte) = open_split(train, test)?;
        let (tr, te) = (ptr.origin().to_path_buf(), pte.origin().to_path_buf());
        let kind = m.feature.unwrap_or(default_kind);
        let d = kind.dim(ex.network().vit.embed_dim);
        let ftr = pack_features(m, &ex, &ptr, kind)?;
        let fte = pack_features(m, &ex, &pte, kind)?;
        let classes = ptr.num_classes().max(pte.num_classes());
        let src = json!({"checkpoint": ex.checkpoint(), "feature": kind, "side": ex.side(),
                         "train": tr, "test": te});
        let mk = |f: Vec<f32>, p: &Pack, o: &Path| Labelled {
            feats: f,
            labels: p.labels().to_vec(),
            dim: d,
            origin: o.display().to_string(),
        };
        return Ok((mk(ftr, &ptr, &tr), mk(fte, &pte, &te), classes, src));
    } else {
        if train.is_some() || test.is_some() {
            bail!("--train/--test packs need --checkpoint (or pass --train-features/--train-labels/--test-features/--test-labels)");
        }
        if m.feature.is_some() {
            bail!("--feature: only with --checkpoint; .npy features are used as they are");
        }
        let need = |o: &Option<PathBuf>, flag: &str| -> Result<PathBuf> {
            o.clone().with_context(|| {
                format!("{flag}: missing; pass --checkpoint with --train/--test packs, or all four of --train-features, --train-labels, --test-features, --test-labels")
            })
        };
        let (tf, tl) = (
            need(&n.train_features, "--train-features")?,
            need(&n.train_labels, "--train-labels")?,
        );
        let (sf, sl) = (
            need(&n.test_features, "--test-features")?,
            need(&n.test_labels, "--test-labels")?,
        );
        let a = labelled_npy(&tf, &tl)?;
        let b = labelled_npy(&sf, &sl)?;
        let src = json!({"train_features": tf, "test_features": sf});
        (a, b, src)
    };
    if a.dim != b.dim {
        bail!(
            "{}: features are {} wide but {} has {}-wide features; pass features of the same model and kind",
            b.origin, b.dim, a.origin, a.dim
        );
    }
    let classes = a
        .labels
        .iter()
        .chain(&b.labels)
        .map(|&l| usize::from(l) + 1)
        .max()
        .unwrap_or(1);
    Ok((a, b, classes, source))
}

/// Prints `report` as JSON (with --json) or runs `table` to print it for people.
fn emit(json_out: bool, report: &Value, table: impl FnOnce()) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        table();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kNN.

fn eval_knn(a: &KnnArgs) -> Result<()> {
    let (train, test, classes, source) =
        split_features(&a.model, &a.train, &a.test, &a.npy, FeatureKind::Cls)?;
    let opts = KnnOptions {
        ks: a.k.clone(),
        temperature: a.temperature,
        block_rows: a.block_rows,
    };
    let results = knn::knn_evaluate(
        &train.feats,
        &train.labels,
        &test.feats,
        &test.labels,
        train.dim,
        classes,
        &opts,
    )?;
    let report = json!({
        "protocol": "knn", "source": source, "dim": train.dim, "classes": classes,
        "train_rows": train.labels.len(), "test_rows": test.labels.len(),
        "temperature": a.temperature.to_string().parse::<f64>().unwrap_or(f64::from(a.temperature)),
        "results": results,
    });
    emit(a.json, &report, || {
        println!(
            "weighted kNN, T = {}, {} train x {} test features of dimension {}, {classes} classes",
            a.temperature,
            train.labels.len(),
            test.labels.len(),
            train.dim
        );
        println!("{:>6}  {:>8}  {:>8}", "k", "top-1 %", "top-5 %");
        for r in &results {
            println!("{:>6}  {:>8.2}  {:>8.2}", r.k, r.top1, r.top5);
        }
    })
}

// ---------------------------------------------------------------------------------------
// Linear probe.

fn eval_linear(a: &LinearArgs) -> Result<()> {
    let mut cfg = ProbeConfig::default();
    if let Some(e) = a.epochs {
        cfg.epochs = e;
    }
    if let Some(b) = a.batch {
        cfg.batch = b;
    }
    if a.lr.is_some() {
        cfg.lr = a.lr;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    let default_kind = FeatureKind::LastCls(4);
    let (report, source, dims) = match a.mode {
        ModeFlag::Fast => {
            let mut m = a.model.clone();
            if m.checkpoint.is_some() && m.feature.is_none() {
                m.feature = Some(clamp_last(&m, default_kind)?);
            }
            let (train, test, classes, source) =
                split_features(&m, &a.train, &a.test, &a.npy, default_kind)?;
            let r = linear::fit_fast(
                &train.feats,
                &train.labels,
                &test.feats,
                &test.labels,
                train.dim,
                classes,
                &cfg,
            )?;
            (
                r,
                source,
                (train.labels.len(), test.labels.len(), train.dim, classes),
            )
        }
        ModeFlag::Augmented => {
            if a.model.checkpoint.is_none() {
                bail!("--mode augmented: needs --checkpoint (new views of the train images every epoch); use --mode fast for .npy features");
            }
            let ex = extractor(&a.model)?;
            let kind = match a.model.feature {
                Some(k) => k,
                None => clamp_last(&a.model, default_kind)?,
            };
            let (ptr, pte) = open_split(&a.train, &a.test)?;
            let (tr, te) = (ptr.origin().to_path_buf(), pte.origin().to_path_buf());
            let test_feats = pack_features(&a.model, &ex, &pte, kind)?;
            let d = kind.dim(ex.network().vit.embed_dim);
            let classes = ptr.num_classes().max(pte.num_classes());
            let seed = cfg.seed;
            let mut views = |epoch: usize| -> pwself_engine::Result<Vec<f32>> {
                eprintln!("linear probe: epoch {epoch}: features of augmented train views");
                ex.augmented_features(&ptr, kind, seed, epoch)
            };
            let r = linear::fit_augmented(
                &mut views,
                ptr.labels(),
                &test_feats,
                pte.labels(),
                d,
                classes,
                &cfg,
            )?;
            let source = json!({"checkpoint": ex.checkpoint(), "feature": kind, "side": ex.side(), "train": tr, "test": te});
            (r, source, (ptr.len(), pte.len(), d, classes))
        }
    };
    let (mode_name, mode) = match report.mode {
        ProbeMode::Fast => ("fast", "fast (features of whole images, no augmentation)"),
        ProbeMode::Augmented => (
            "augmented",
            "augmented (DINO's recipe: random-resized-crop + flip per epoch)",
        ),
    };
    let out = json!({
        "protocol": "linear", "mode": mode_name, "source": source,
        "train_rows": dims.0, "test_rows": dims.1, "dim": dims.2, "classes": dims.3,
        "best_top1": report.best_top1, "best_epoch": report.best_epoch, "lr": report.lr,
        "epochs": report.epochs.iter().map(|(e, top1, top5)| json!({"epoch": e, "top1": top1, "top5": top5})).collect::<Vec<_>>(),
    });
    emit(a.json, &out, || {
        println!("linear probe, mode: {mode}");
        println!(
            "{} train x {} test features of dimension {}, {} classes, lr {}",
            dims.0, dims.1, dims.2, dims.3, report.lr
        );
        println!(
            "best top-1 {:.2} % at epoch {} of {}",
            report.best_top1,
            report.best_epoch + 1,
            report.epochs.len()
        );
    })
}

/// DINO's last-4 CLS, or fewer blocks when the checkpoint has fewer (a depth-2 model).
fn clamp_last(m: &ModelArgs, want: FeatureKind) -> Result<FeatureKind> {
    let ex = extractor(m)?;
    let depth = ex.network().vit.depth;
    Ok(match want {
        FeatureKind::LastCls(n) if n > depth => {
            eprintln!("note: the model has {depth} blocks; the linear probe uses the CLS of all {depth} (last-n:{depth})");
            FeatureKind::LastCls(depth)
        }
        k => k,
    })
}

// ---------------------------------------------------------------------------------------
// Copy detection.

/// `p` as given when it exists, else under `root`.
fn resolve(p: &Path, root: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

fn gt_root(gt: &Path, images: &Option<PathBuf>) -> PathBuf {
    images.clone().unwrap_or_else(|| {
        gt.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    })
}

/// Checks that every file exists, naming the first missing one and the fix.
fn check_files(files: &[PathBuf], gt: &Path) -> Result<()> {
    if let Some(f) = files.iter().find(|f| !f.is_file()) {
        bail!(
            "{}: image {} does not exist; pass --images DIR (the folder the ground truth's paths are relative to)",
            gt.display(),
            f.display()
        );
    }
    Ok(())
}

fn eval_copy(a: &CopyArgs) -> Result<()> {
    let Some(gt_path) = &a.gt else {
        bail!("--gt: missing; pass the copy-detection ground truth JSON (e.g. the ground_truth.json of `eval copy-bench`)");
    };
    let gt = CopyGroundTruth::load(gt_path)?;
    if gt.queries.is_empty() {
        bail!(
            "{}: holds no queries; a copy-detection benchmark needs at least one",
            gt_path.display()
        );
    }
    let (db, queries, whiten, dim, source) = if a.model.checkpoint.is_some() {
        if a.db_features.is_some() || a.query_features.is_some() || a.whiten_features.is_some() {
            bail!("--checkpoint and --db-features/--query-features: pass one source of features, not both");
        }
        let ex = extractor(&a.model)?;
        let kind = a.model.feature.unwrap_or(FeatureKind::ClsGem(4.0));
        let root = gt_root(gt_path, &a.images);
        let files = |v: &[String]| {
            v.iter()
                .map(|s| resolve(Path::new(s), &root))
                .collect::<Vec<_>>()
        };
        let (fdb, fq, fw) = (
            files(&gt.db),
            files(
                &gt.queries
                    .iter()
                    .map(|q| q.image.clone())
                    .collect::<Vec<_>>(),
            ),
            files(&gt.whitening),
        );
        for f in [&fdb, &fq, &fw] {
            check_files(f, gt_path)?;
        }
        let db = file_features(&a.model, &ex, &fdb, kind, None)?;
        let q = file_features(&a.model, &ex, &fq, kind, None)?;
        let w = if a.no_whiten {
            Vec::new()
        } else {
            file_features(&a.model, &ex, &fw, kind, None)?
        };
        let d = kind.dim(ex.network().vit.embed_dim);
        let src = json!({"checkpoint": ex.checkpoint(), "feature": kind, "side": ex.side(), "gt": gt_path});
        (db, q, w, d, src)
    } else {
        let (Some(dbp), Some(qp)) = (&a.db_features, &a.query_features) else {
            bail!("--db-features and --query-features: pass both (or --checkpoint to compute them from the ground truth's images)");
        };
        let (db, _, d1) = npy::read_matrix(dbp)?;
        let (q, _, d2) = npy::read_matrix(qp)?;
        if d1 != d2 {
            bail!("{}: features are {d2} wide but {} has {d1}-wide features; pass features of the same model", qp.display(), dbp.display());
        }
        let w = match (&a.whiten_features, a.no_whiten) {
            (Some(wp), false) => {
                let (w, _, d3) = npy::read_matrix(wp)?;
                if d3 != d1 {
                    bail!("{}: features are {d3} wide but the database's are {d1}; pass features of the same model", wp.display());
                }
                w
            }
            _ => Vec::new(),
        };
        let src = json!({"db_features": dbp, "query_features": qp, "whiten_features": a.whiten_features, "gt": gt_path});
        (db, q, w, d1, src)
    };
    gt.validate_file(gt_path, db.len() / dim.max(1), queries.len() / dim.max(1))?;
    let whitened = !whiten.is_empty();
    let (db, queries) = if whitened {
        let w = Whitening::learn(&whiten, dim)?;
        (
            w.try_apply(&db, "database features")?,
            w.try_apply(&queries, "query features")?,
        )
    } else {
        (db, queries)
    };
    let r = copydetect::evaluate(&db, &queries, dim, &gt, a.top)?;
    let report = json!({
        "protocol": "copy", "source": source, "dim": dim, "whitened": whitened,
        "whitening_rows": whiten.len() / dim.max(1), "top": r.top, "map": r.map,
        "blocks": r.blocks.iter().map(|(b, m, n)| json!({"block": b, "map": m, "queries": n})).collect::<Vec<_>>(),
    });
    emit(a.json, &report, || {
        println!(
            "copy detection: {} database, {} queries, features of dimension {dim}, {}, top {}",
            db.len() / dim.max(1),
            queries.len() / dim.max(1),
            if whitened {
                format!("whitening learned on {} images", whiten.len() / dim.max(1))
            } else {
                "no whitening".to_string()
            },
            r.top
        );
        println!("{:<24} {:>8} {:>8}", "block", "queries", "mAP %");
        for (b, m, n) in &r.blocks {
            println!("{b:<24} {n:>8} {:>8.2}", 100.0 * m);
        }
        println!(
            "{:<24} {:>8} {:>8.2}",
            "all",
            queries.len() / dim.max(1),
            100.0 * r.map
        );
    })
}

// ---------------------------------------------------------------------------------------
// Retrieval.

/// The file of image `name` under `root`: as given, with .jpg/.png/.jpeg, or under jpg/.
fn find_image(root: &Path, name: &str, gt: &Path) -> Result<PathBuf> {
    let base = root.join(name);
    let mut tried = vec![base.clone()];
    for ext in ["jpg", "png", "jpeg", "JPG", "PNG"] {
        tried.push(root.join(format!("{name}.{ext}")));
        tried.push(root.join("jpg").join(format!("{name}.{ext}")));
    }
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("{}: image `{name}` is not under {} (tried {name}, {name}.jpg, .png, jpg/{name}.jpg); pass --images DIR", gt.display(), root.display()))
}

fn eval_retrieval(a: &RetrievalArgs) -> Result<()> {
    let gt = GroundTruth::load(&a.gt)?;
    if gt.qimlist.is_empty() || gt.gnd.is_empty() {
        bail!(
            "{}: holds no queries (qimlist/gnd empty); retrieval needs at least one query",
            a.gt.display()
        );
    }
    if a.ks.contains(&0) {
        bail!("--ks: ranks start at 1 (e.g. 1,5,10)");
    }
    let (db, queries, dim, source) = if a.model.checkpoint.is_some() {
        if a.db_features.is_some() || a.query_features.is_some() {
            bail!("--checkpoint and --db-features/--query-features: pass one source of features, not both");
        }
        if a.multiscale
            && a.model
                .feature
                .is_some_and(|k| k != FeatureKind::MultiScaleCls)
        {
            bail!("--multiscale and --feature: pick one");
        }
        let ex = extractor(&a.model)?;
        let kind = if a.multiscale {
            FeatureKind::MultiScaleCls
        } else {
            a.model.feature.unwrap_or(FeatureKind::Cls)
        };
        let root = gt_root(&a.gt, &a.images);
        let fdb = gt
            .imlist
            .iter()
            .map(|n| find_image(&root, n, &a.gt))
            .collect::<Result<Vec<_>>>()?;
        let fq = gt
            .qimlist
            .iter()
            .map(|n| find_image(&root, n, &a.gt))
            .collect::<Result<Vec<_>>>()?;
        let boxes: Option<Vec<Option<[f64; 4]>>> = a
            .crop_queries
            .then(|| gt.gnd.iter().map(|g| g.bbx).collect());
        if a.crop_queries && gt.gnd.len() != fq.len() {
            bail!(
                "{}: gnd has {} entries but qimlist {}; one gnd entry per query",
                a.gt.display(),
                gt.gnd.len(),
                fq.len()
            );
        }
        let db = file_features(&a.model, &ex, &fdb, kind, None)?;
        let q = file_features(&a.model, &ex, &fq, kind, boxes.as_deref())?;
        let d = kind.dim(ex.network().vit.embed_dim);
        let src = json!({"checkpoint": ex.checkpoint(), "feature": kind, "side": ex.side(), "gt": a.gt, "crop_queries": a.crop_queries});
        (db, q, d, src)
    } else {
        if a.multiscale || a.crop_queries {
            bail!("--multiscale/--crop-queries: they change how features are computed, so they need --checkpoint; precomputed features are used as they are");
        }
        let (Some(dbp), Some(qp)) = (&a.db_features, &a.query_features) else {
            bail!("--db-features and --query-features: pass both (or --checkpoint to compute them from the images)");
        };
        let (db, _, d1) = npy::read_matrix(dbp)?;
        let (q, _, d2) = npy::read_matrix(qp)?;
        if d1 != d2 {
            bail!("{}: features are {d2} wide but {} has {d1}-wide features; pass features of the same model", qp.display(), dbp.display());
        }
        (
            db,
            q,
            d1,
            json!({"db_features": dbp, "query_features": qp, "gt": a.gt}),
        )
    };
    gt.validate_file(&a.gt, db.len() / dim.max(1), queries.len() / dim.max(1))?;
    let r = retrieval::evaluate(&db, &queries, dim, &gt, &a.ks)?;
    let wanted = |p: Protocol| match a.protocol {
        ProtocolFlag::All => true,
        ProtocolFlag::Easy => p == Protocol::Easy,
        ProtocolFlag::Medium => p == Protocol::Medium,
        ProtocolFlag::Hard => p == Protocol::Hard,
    };
    let scores: Vec<_> = r.protocols.iter().filter(|s| wanted(s.protocol)).collect();
    let report = json!({
        "protocol": "retrieval", "source": source, "dim": dim,
        "database": db.len() / dim.max(1), "queries": queries.len() / dim.max(1),
        "scores": scores,
    });
    emit(a.json, &report, || {
        println!(
            "retrieval: {} database, {} queries, features of dimension {dim}",
            db.len() / dim.max(1),
            queries.len() / dim.max(1)
        );
        let head: String =
            a.ks.iter()
                .map(|k| format!(" {:>7}", format!("mP@{k}")))
                .collect();
        println!("{:<8} {:>8} {:>7}{head}", "protocol", "queries", "mAP %");
        for s in &scores {
            if s.queries_scored == 0 {
                println!(
                    "{:<8} {:>8}   (no query has positives under this protocol)",
                    s.protocol.name(),
                    0
                );
                continue;
            }
            let mp: String = s
                .mp_at
                .iter()
                .map(|(_, v)| format!(" {:>7.2}", 100.0 * v))
                .collect();
            println!(
                "{:<8} {:>8} {:>7.2}{mp}",
                s.protocol.name(),
                s.queries_scored,
                100.0 * s.map
            );
        }
    })
}

// ---------------------------------------------------------------------------------------
// Features to .npy, the copy benchmark.

/// `out` with its `.npy` extension replaced by `.{suffix}.npy`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.{suffix}.npy"))
}

fn eval_features(a: &FeaturesArgs) -> Result<()> {
    let ex = extractor(&a.model)?;
    let d = |k: FeatureKind| k.dim(ex.network().vit.embed_dim);
    let mut written: Vec<(PathBuf, usize, usize)> = Vec::new();
    let kind;
    if let Some(p) = &a.pack {
        kind = a.model.feature.unwrap_or(FeatureKind::Cls);
        let pack = Pack::open(p)?;
        let f = pack_features(&a.model, &ex, &pack, kind)?;
        npy::write_matrix(&a.out, &f, pack.len(), d(kind))?;
        let lp = sibling(&a.out, "labels");
        npy::write_labels(&lp, pack.labels())?;
        written.push((a.out.clone(), pack.len(), d(kind)));
        written.push((lp, pack.len(), 1));
    } else if let Some(g) = &a.retrieval_gt {
        kind = a.model.feature.unwrap_or(FeatureKind::Cls);
        let gt = GroundTruth::load(g)?;
        let root = gt_root(g, &a.images);
        let fdb = gt
            .imlist
            .iter()
            .map(|n| find_image(&root, n, g))
            .collect::<Result<Vec<_>>>()?;
        let fq = gt
            .qimlist
            .iter()
            .map(|n| find_image(&root, n, g))
            .collect::<Result<Vec<_>>>()?;
        let boxes: Option<Vec<Option<[f64; 4]>>> = a
            .crop_queries
            .then(|| gt.gnd.iter().map(|q| q.bbx).collect());
        if boxes.as_ref().is_some_and(|b| b.len() != fq.len()) {
            bail!(
                "{}: gnd has {} entries but qimlist {}; one gnd entry per query",
                g.display(),
                gt.gnd.len(),
                fq.len()
            );
        }
        for (files, suffix, bx) in [(&fdb, "db", None), (&fq, "queries", boxes.as_deref())] {
            let f = file_features(&a.model, &ex, files, kind, bx)?;
            let p = sibling(&a.out, suffix);
            npy::write_matrix(&p, &f, files.len(), d(kind))?;
            written.push((p, files.len(), d(kind)));
        }
    } else if let Some(g) = &a.copy_gt {
        kind = a.model.feature.unwrap_or(FeatureKind::ClsGem(4.0));
        let gt = CopyGroundTruth::load(g)?;
        let root = gt_root(g, &a.images);
        let files = |v: Vec<String>| {
            v.iter()
                .map(|s| resolve(Path::new(s), &root))
                .collect::<Vec<_>>()
        };
        let sets = [
            (files(gt.db.clone()), "db"),
            (
                files(gt.queries.iter().map(|q| q.image.clone()).collect()),
                "queries",
            ),
            (files(gt.whitening.clone()), "whitening"),
        ];
        for (fs, suffix) in &sets {
            check_files(fs, g)?;
            let f = file_features(&a.model, &ex, fs, kind, None)?;
            let p = sibling(&a.out, suffix);
            npy::write_matrix(&p, &f, fs.len(), d(kind))?;
            written.push((p, fs.len(), d(kind)));
        }
    } else {
        bail!("--pack, --retrieval-gt or --copy-gt: pass what to compute features of");
    }
    let report = json!({
        "checkpoint": ex.checkpoint(), "feature": kind, "side": ex.side(),
        "files": written.iter().map(|(p, r, c)| json!({"path": p, "rows": r, "cols": c})).collect::<Vec<_>>(),
    });
    emit(a.json, &report, || {
        for (p, r, c) in &written {
            println!("wrote {} ({r} x {c})", p.display());
        }
    })
}

fn eval_copy_bench(a: &CopyBenchArgs) -> Result<()> {
    let mut opts = BuildOptions {
        out: a.out.clone(),
        seed: a.seed,
        ..BuildOptions::default()
    };
    if let Some(n) = a.max_originals {
        opts.max_originals = n;
    }
    if let Some(side) = a.side {
        opts.side = side;
    }
    opts.sources.clone_from(&a.sources);
    let manifest = copybench::build(&opts)?;
    let v = serde_json::to_value(&manifest)?;
    emit(a.json, &v, || {
        println!("copy-detection benchmark in {}", a.out.display());
        println!("ground truth: {}", manifest.ground_truth.display());
        println!(
            "evaluate with: pwself-engine eval copy --checkpoint CKPT --gt {}",
            manifest.ground_truth.display()
        );
    })
}

// ---------------------------------------------------------------------------------------
// Pictures.

/// `(C, S, S)` normalised model input back to a displayable RGB picture (min-max per
/// image, so any normalisation shows).
fn input_picture(x: &[f32], c: usize, side: usize) -> image::RgbImage {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
    image::RgbImage::from_fn(side as u32, side as u32, |px, py| {
        let at = |ch: usize| {
            let v = x[ch * side * side + py as usize * side + px as usize];
            ((v - lo) * scale).round().clamp(0.0, 255.0) as u8
        };
        if c == 3 {
            image::Rgb([at(0), at(1), at(2)])
        } else {
            let g = at(0);
            image::Rgb([g, g, g])
        }
    })
}

fn save_png(img: &image::RgbImage, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    img.save_with_format(out, image::ImageFormat::Png)
        .with_context(|| format!("{}: cannot write the PNG", out.display()))
}

/// `viz attention`: the last block's CLS attention of each head over one image.
pub fn viz_attention(a: &VizAttentionArgs) -> Result<()> {
    let mut ex = Extractor::from_checkpoint(&checkpoint_file(&a.checkpoint))?;
    if let Some(s) = a.side {
        ex.set_side(s)?;
    }
    let x = match (&a.pack, &a.image) {
        (Some(p), None) => ex.pack_input(&Pack::open(p)?, a.index)?,
        (None, Some(f)) => ex.file_input(f, None)?,
        (None, None) => ex.pack_input(&default_pack(Split::Test)?, a.index)?,
        _ => bail!("--pack (with --index) or --image: pass one"),
    };
    let (maps, heads, grid) = ex.cls_attention(&x);
    let picture = viz::attention_overlay(
        &input_picture(&x, ex.network().vit.in_chans, ex.side()),
        &maps,
        heads,
        grid,
    );
    save_png(&picture, &a.out)?;
    eprintln!(
        "wrote {} ({heads} heads, {grid}x{grid} patches)",
        a.out.display()
    );
    Ok(())
}

/// `viz neighbours`: queries of the test pack with their top-k train images by cosine.
pub fn viz_neighbours(a: &VizNeighboursArgs) -> Result<()> {
    let (train, test) = open_split(&a.train, &a.test)?;
    if a.queries == 0 || a.k == 0 {
        bail!("--queries and --k: both must be at least 1");
    }
    let (ftr, fte, d) = match (&a.model.checkpoint, &a.train_features, &a.test_features) {
        (Some(_), None, None) => {
            let ex = extractor(&a.model)?;
            let kind = a.model.feature.unwrap_or(FeatureKind::Cls);
            (pack_features(&a.model, &ex, &train, kind)?, pack_features(&a.model, &ex, &test, kind)?, kind.dim(ex.network().vit.embed_dim))
        }
        (None, Some(tf), Some(sf)) => {
            let (ftr, rtr, d1) = npy::read_matrix(tf)?;
            let (fte, rte, d2) = npy::read_matrix(sf)?;
            if d1 != d2 {
                bail!("{}: features are {d2} wide but {} has {d1}-wide features", sf.display(), tf.display());
            }
            for (rows, pack, f) in [(rtr, &train, tf), (rte, &test, sf)] {
                if rows != pack.len() {
                    bail!("{}: {rows} feature rows but {} holds {} images; the rows must be the pack's images in order", f.display(), pack.origin().display(), pack.len());
                }
            }
            (ftr, fte, d1)
        }
        _ => bail!("--checkpoint, or both --train-features and --test-features: pass one source of features"),
    };
    let mut ftr = ftr;
    let mut fte = fte;
    knn::normalize_rows(&mut ftr, d);
    knn::normalize_rows(&mut fte, d);
    let nq = a.queries.min(test.len());
    let k = a.k.min(train.len());
    let picture_of = |p: &Pack, i: usize| -> image::RgbImage {
        let (h, w, c) = (p.height() as u32, p.width() as u32, p.channels());
        let px = p.image(i);
        image::RgbImage::from_fn(w, h, |x, y| {
            let o = (y * w + x) as usize * c;
            if c == 3 {
                image::Rgb([px[o], px[o + 1], px[o + 2]])
            } else {
                image::Rgb([px[o]; 3])
            }
        })
    };
    let name = |p: &Pack, l: u16| {
        p.class_names()
            .get(usize::from(l))
            .cloned()
            .unwrap_or_else(|| l.to_string())
    };
    let mut queries = Vec::new();
    let mut rows = Vec::new();
    for qi in 0..nq {
        let q = qi * test.len() / nq;
        let fq = &fte[q * d..(q + 1) * d];
        let mut sims: Vec<(f32, usize)> = ftr
            .chunks_exact(d)
            .enumerate()
            .map(|(j, r)| (r.iter().zip(fq).map(|(a, b)| a * b).sum::<f32>(), j))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let ql = test.label(q);
        queries.push((picture_of(&test, q), name(&test, ql)));
        rows.push(
            sims[..k]
                .iter()
                .map(|&(_, j)| {
                    (
                        picture_of(&train, j),
                        name(&train, train.label(j)),
                        train.label(j) == ql,
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    save_png(&viz::neighbour_grid(&queries, &rows), &a.out)?;
    eprintln!("wrote {} ({nq} queries x {k} neighbours)", a.out.display());
    Ok(())
}
