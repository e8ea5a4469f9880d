//! DINO's command-line names for `pwself-engine train`: the flags of `main_dino.py` (which
//! the PW-Self authors' `patch_wise_dino.py` reuses), the few the authors added, and the
//! launcher flags of `run_with_submitit.py`, so a training command from their READMEs runs
//! with only the program name changed. docs/dino-flags.md is the mapping table.
//!
//! How a command is read:
//! - A flag with a meaning here maps to a configuration key (`--min_lr` -> `optim.min_lr`).
//! - Any DINO-spelled flag switches on DINO's defaults for every key `main_dino.py`
//!   defines and the command leaves unset (ViT-S/16, 224/96 views, K = 65536, 100 epochs,
//!   64 images, lr 5e-4 ...), below a `--config` file's keys and every flag.
//! - A flag with no meaning here is refused with what to use instead; a launcher flag
//!   that only picks cluster hardware is accepted and ignored, saying so on stderr.
//!
//! It also holds the resolver behind `train --print-config` ([`resolved_json`]). This
//! module only edits and reads a [`TrainConfig`]; it must not train or write files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use pwself_engine::checkpoint::KEEP_CHECKPOINTS;
use pwself_engine::data::{default_pack, Pack, Split};
use pwself_engine::model::config::{Arch, HeadConfig};
use pwself_engine::optim::ClipMode;
use pwself_engine::train::TrainConfig;
use pwself_engine::views::config::Preset;
use pwself_engine::views::crop::Scale;

/// `run_with_submitit.py`'s defaults for `--nodes` and `--ngpus`, used for the missing one
/// when a command gives only the other.
const SUBMITIT_NODES: usize = 2;
const SUBMITIT_NGPUS: usize = 8;

/// The flags of `main_dino.py` (and the authors' and submitit's additions) that `train`
/// does not already spell the same way. `--arch`, `--epochs`, `--lr` and `--seed` are
/// shared with the engine's own flags and live in `TrainArgs`.
#[derive(clap::Args, Default, Debug)]
#[command(next_help_heading = "DINO flags (main_dino.py names, see docs/dino-flags.md)")]
pub struct DinoFlags {
    /// Patch size in pixels (DINO: 16); same as --patch.
    #[arg(long = "patch_size", value_name = "N")]
    pub patch_size: Option<usize>,
    /// Head output dimension K (DINO: 65536); same as --out-dim.
    #[arg(long = "out_dim", id = "dino_out_dim", value_name = "K")]
    pub out_dim: Option<usize>,
    /// Weight-normalised last layer with its gain fixed to 1: only `true` (DINO's default).
    #[arg(long = "norm_last_layer", value_name = "BOOL", value_parser = parse_bool)]
    pub norm_last_layer: Option<bool>,
    /// Teacher EMA momentum at the start, raised to 1 by a cosine (DINO: 0.996).
    #[arg(long = "momentum_teacher", value_name = "M")]
    pub momentum_teacher: Option<f64>,
    /// Batch norm in the head: only `false` (DINO's default).
    #[arg(long = "use_bn_in_head", value_name = "BOOL", value_parser = parse_bool)]
    pub use_bn_in_head: Option<bool>,
    /// Teacher temperature at epoch 0 (DINO: 0.04).
    #[arg(long = "warmup_teacher_temp", value_name = "T")]
    pub warmup_teacher_temp: Option<f32>,
    /// Teacher temperature after the warm-up (DINO: 0.04; the paper: 0.07).
    #[arg(long = "teacher_temp", value_name = "T")]
    pub teacher_temp: Option<f32>,
    /// Epochs of the linear teacher-temperature warm-up (DINO: 0; the paper: 30).
    #[arg(long = "warmup_teacher_temp_epochs", value_name = "N")]
    pub warmup_teacher_temp_epochs: Option<usize>,
    /// Weight decay at the start, cosine to --weight_decay_end (DINO: 0.04).
    #[arg(long = "weight_decay", value_name = "WD")]
    pub weight_decay: Option<f64>,
    /// Weight decay at the end (DINO: 0.4).
    #[arg(long = "weight_decay_end", value_name = "WD")]
    pub weight_decay_end: Option<f64>,
    /// Gradient-norm limit per tensor, as DINO clips; 0 turns clipping off (DINO: 3.0).
    #[arg(long = "clip_grad", value_name = "NORM")]
    pub clip_grad: Option<f64>,
    /// Images per GPU (DINO: 64); the step's batch is this times --nodes x --ngpus.
    #[arg(long = "batch_size_per_gpu", value_name = "N")]
    pub batch_size_per_gpu: Option<usize>,
    /// Epochs during which the head's last layer is frozen (DINO: 1).
    #[arg(long = "freeze_last_layer", value_name = "N")]
    pub freeze_last_layer: Option<usize>,
    /// Epochs of linear learning-rate warm-up (DINO: 10).
    #[arg(long = "warmup_epochs", value_name = "N")]
    pub warmup_epochs: Option<usize>,
    /// Learning rate at the end of the cosine decay (DINO: 1e-6).
    #[arg(long = "min_lr", value_name = "LR")]
    pub min_lr: Option<f64>,
    /// Only `adamw` (DINO's default, and what the engine does).
    #[arg(long = "optimizer", value_name = "NAME")]
    pub optimizer: Option<String>,
    /// Largest stochastic-depth rate of the student (DINO: 0.1).
    #[arg(long = "drop_path_rate", value_name = "P")]
    pub drop_path_rate: Option<f32>,
    /// Area-fraction range of the global crops, two numbers (DINO: 0.4 1.0).
    #[arg(long = "global_crops_scale", value_name = "LO HI", num_args = 1..)]
    pub global_crops_scale: Option<Vec<f64>>,
    /// Local views per image (DINO: 8; 0 turns multi-crop off); same as --local-views.
    #[arg(long = "local_crops_number", value_name = "N")]
    pub local_crops_number: Option<usize>,
    /// Area-fraction range of the local crops, two numbers (DINO: 0.05 0.4).
    #[arg(long = "local_crops_scale", value_name = "LO HI", num_args = 1..)]
    pub local_crops_scale: Option<Vec<f64>>,
    /// Training pack (DINO: an ImageFolder root; make a pack of one with `prepare folder`).
    #[arg(long = "data_path", value_name = "PACK")]
    pub data_path: Option<PathBuf>,
    /// Output directory; same as --out.
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Global views per image (the PW-Self authors' flag; 2); same as --global-views.
    #[arg(long = "global_crops_number", value_name = "N")]
    pub global_crops_number: Option<usize>,
    /// Side in pixels of the global views (the PW-Self authors' flag; 224).
    #[arg(long = "global_scale", value_name = "PIXELS")]
    pub global_scale: Option<usize>,
    /// Side in pixels of the local views (the PW-Self authors' flag; 96).
    #[arg(long = "local_scale", value_name = "PIXELS")]
    pub local_scale: Option<usize>,
    /// run_with_submitit.py's node count: the step's batch is --batch_size_per_gpu x
    /// --nodes x --ngpus, trained on this one device.
    #[arg(long = "nodes", value_name = "N")]
    pub nodes: Option<usize>,
    /// run_with_submitit.py's GPUs per node (see --nodes).
    #[arg(long = "ngpus", value_name = "N")]
    pub ngpus: Option<usize>,
    /// run_with_submitit.py's request for 32 GB V100s: accepted and ignored.
    #[arg(long = "use_volta32", hide = true)]
    pub use_volta32: bool,
    /// run_with_submitit.py's SLURM time limit: accepted and ignored.
    #[arg(long = "timeout", hide = true, value_name = "MINUTES")]
    pub timeout: Option<String>,
    /// run_with_submitit.py's SLURM partition: accepted and ignored.
    #[arg(long = "partition", hide = true, value_name = "NAME")]
    pub partition: Option<String>,
    /// run_with_submitit.py's SLURM comment: accepted and ignored.
    #[arg(long = "comment", hide = true, value_name = "TEXT")]
    pub comment: Option<String>,
    /// Refused: precision is the backend's.
    #[arg(long = "use_fp16", hide = true, value_name = "BOOL")]
    pub use_fp16: Option<String>,
    /// Refused: one process, no distributed setup.
    #[arg(long = "dist_url", hide = true, value_name = "URL")]
    pub dist_url: Option<String>,
    /// Refused: one process, no distributed setup.
    #[arg(long = "local_rank", hide = true, value_name = "N")]
    pub local_rank: Option<String>,
    /// Refused: use --threads.
    #[arg(long = "num_workers", hide = true, value_name = "N")]
    pub num_workers: Option<String>,
    /// Refused: a checkpoint is written every epoch.
    #[arg(long = "saveckp_freq", hide = true, value_name = "N")]
    pub saveckp_freq: Option<String>,
}

/// The engine's own flags that have a DINO twin, as the command gave them; a flag given
/// in both spellings must say the same thing.
#[derive(Default, Debug)]
pub struct OwnFlags<'a> {
    /// `--patch`.
    pub patch: Option<usize>,
    /// `--out-dim`.
    pub out_dim: Option<usize>,
    /// `--batch`.
    pub batch: Option<usize>,
    /// `--out`.
    pub out: Option<&'a Path>,
    /// `--data`.
    pub data: Option<&'a Path>,
    /// `--global-views`.
    pub global_views: Option<usize>,
    /// `--local-views`.
    pub local_views: Option<usize>,
    /// `--view-sides`, parsed.
    pub view_sides: Option<(usize, usize)>,
}

/// Parses `--arch`: the engine's names (femto, tiny, small, base) and DINO's (vit_tiny,
/// vit_small, vit_base, and deit_tiny / deit_small, which DINO renames to the ViTs).
pub fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    match s.to_ascii_lowercase().as_str() {
        "femto" => Ok(Arch::Femto),
        "tiny" | "vit_tiny" | "deit_tiny" => Ok(Arch::Tiny),
        "small" | "vit_small" | "deit_small" => Ok(Arch::Small),
        "base" | "vit_base" => Ok(Arch::Base),
        other => Err(format!(
            "`{other}` is not a backbone this engine trains: it trains ViTs only; use one of \
             femto, tiny (vit_tiny), small (vit_small), base (vit_base)"
        )),
    }
}

/// Parses a boolean the way DINO's `utils.bool_flag` does: on/true/1 or off/false/0, any
/// case.
pub fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!(
            "`{s}` is not a boolean: write true or false (also on/off, 1/0)"
        )),
    }
}

impl DinoFlags {
    /// The DINO-spelled flags the command gave (refused ones excluded: they fail first).
    pub fn given(&self) -> Vec<&'static str> {
        let present = [
            ("--patch_size", self.patch_size.is_some()),
            ("--out_dim", self.out_dim.is_some()),
            ("--norm_last_layer", self.norm_last_layer.is_some()),
            ("--momentum_teacher", self.momentum_teacher.is_some()),
            ("--use_bn_in_head", self.use_bn_in_head.is_some()),
            ("--warmup_teacher_temp", self.warmup_teacher_temp.is_some()),
            ("--teacher_temp", self.teacher_temp.is_some()),
            (
                "--warmup_teacher_temp_epochs",
                self.warmup_teacher_temp_epochs.is_some(),
            ),
            ("--weight_decay", self.weight_decay.is_some()),
            ("--weight_decay_end", self.weight_decay_end.is_some()),
            ("--clip_grad", self.clip_grad.is_some()),
            ("--batch_size_per_gpu", self.batch_size_per_gpu.is_some()),
            ("--freeze_last_layer", self.freeze_last_layer.is_some()),
            ("--warmup_epochs", self.warmup_epochs.is_some()),
            ("--min_lr", self.min_lr.is_some()),
            ("--optimizer", self.optimizer.is_some()),
            ("--drop_path_rate", self.drop_path_rate.is_some()),
            ("--global_crops_scale", self.global_crops_scale.is_some()),
            ("--local_crops_number", self.local_crops_number.is_some()),
            ("--local_crops_scale", self.local_crops_scale.is_some()),
            ("--data_path", self.data_path.is_some()),
            ("--output_dir", self.output_dir.is_some()),
            ("--global_crops_number", self.global_crops_number.is_some()),
            ("--global_scale", self.global_scale.is_some()),
            ("--local_scale", self.local_scale.is_some()),
            ("--nodes", self.nodes.is_some()),
            ("--ngpus", self.ngpus.is_some()),
            ("--use_volta32", self.use_volta32),
            ("--timeout", self.timeout.is_some()),
            ("--partition", self.partition.is_some()),
            ("--comment", self.comment.is_some()),
        ];
        present
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect()
    }

    /// Refuses the flags that have no meaning here, and the values of meaningful ones that
    /// ask for something the engine does not do, each with what to use instead.
    pub fn refuse_unsupported(&self) -> Result<()> {
        if self.use_fp16.is_some() {
            bail!(
                "--use_fp16: precision is the backend's, not a flag: --device cpu trains in \
                 fp32; --device cuda keeps fp32 master weights and stores activations in bf16 \
                 with fp32 accumulation (no fp16, no loss scaling); drop --use_fp16 (for fp32 \
                 throughout, pass --device cpu)"
            );
        }
        for (flag, given) in [
            ("--dist_url", self.dist_url.is_some()),
            ("--local_rank", self.local_rank.is_some()),
        ] {
            if given {
                bail!(
                    "{flag}: this engine trains in one process on one device, with no \
                     distributed setup; drop {flag} and start `pwself-engine train` directly \
                     (not through torchrun or torch.distributed.launch)"
                );
            }
        }
        if self.num_workers.is_some() {
            bail!(
                "--num_workers: there are no data-loader processes here; use --threads N \
                 (threads for view building and compute; default: all cores)"
            );
        }
        if self.saveckp_freq.is_some() {
            bail!(
                "--saveckp_freq: a checkpoint is written at the end of every epoch and the \
                 newest {KEEP_CHECKPOINTS} are kept (resume with --resume DIR); drop \
                 --saveckp_freq"
            );
        }
        if self.norm_last_layer == Some(false) {
            bail!(
                "--norm_last_layer false: the head's last layer is weight-normalised with its \
                 gain fixed to 1 (DINO's default, --norm_last_layer true); a trainable gain is \
                 not implemented. Drop --norm_last_layer false (DINO's README lists it only \
                 as an optional boost for vit_small)"
            );
        }
        if self.use_bn_in_head == Some(true) {
            bail!(
                "--use_bn_in_head true: the projection head has no batch norm (DINO's \
                 default for ViTs, --use_bn_in_head false); drop the flag"
            );
        }
        if let Some(o) = &self.optimizer {
            match o.to_ascii_lowercase().as_str() {
                "adamw" => {}
                "sgd" | "lars" => bail!(
                    "--optimizer {o}: only AdamW is implemented (DINO's choice for ViTs); \
                     drop --optimizer or pass --optimizer adamw"
                ),
                _ => bail!(
                    "--optimizer: `{o}` is not an optimizer DINO knows (adamw, sgd, lars); \
                     this engine uses adamw: drop --optimizer or pass --optimizer adamw"
                ),
            }
        }
        for (flag, v) in [
            ("--patch_size", self.patch_size),
            ("--batch_size_per_gpu", self.batch_size_per_gpu),
            ("--nodes", self.nodes),
            ("--ngpus", self.ngpus),
        ] {
            if v == Some(0) {
                bail!("{flag}: must be at least 1");
            }
        }
        Ok(())
    }

    /// GPUs in DINO's job: `--nodes` x `--ngpus` when either is given (the missing one at
    /// run_with_submitit.py's default), else 1.
    pub fn world_size(&self) -> usize {
        match (self.nodes, self.ngpus) {
            (None, None) => 1,
            (n, g) => n.unwrap_or(SUBMITIT_NODES) * g.unwrap_or(SUBMITIT_NGPUS),
        }
    }

    /// The step's total batch DINO's flags ask for, if they ask for one.
    fn total_batch(&self) -> Option<usize> {
        let given = self.batch_size_per_gpu.is_some() || self.world_size() > 1;
        given.then(|| self.batch_size_per_gpu.unwrap_or(DINO_BATCH) * self.world_size())
    }

    /// Applies the DINO flags to `cfg` (after the engine's own flags), refusing one that
    /// disagrees with its twin in `own`. Returns notes for stderr (flags accepted and
    /// ignored, the batch of a multi-GPU command).
    pub fn apply(&self, cfg: &mut TrainConfig, own: &OwnFlags<'_>) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        agree("--patch", own.patch, "--patch_size", self.patch_size)?;
        agree("--out-dim", own.out_dim, "--out_dim", self.out_dim)?;
        agree(
            "--global-views",
            own.global_views,
            "--global_crops_number",
            self.global_crops_number,
        )?;
        agree(
            "--local-views",
            own.local_views,
            "--local_crops_number",
            self.local_crops_number,
        )?;
        agree("--out", own.out, "--output_dir", self.output_dir.as_deref())?;
        agree("--data", own.data, "--data_path", self.data_path.as_deref())?;
        if let Some((g, l)) = own.view_sides {
            agree("--view-sides", Some(g), "--global_scale", self.global_scale)?;
            agree("--view-sides", Some(l), "--local_scale", self.local_scale)?;
        }
        let total = self.total_batch();
        if let (Some(b), Some(t)) = (own.batch, total) {
            if b != t {
                bail!(
                    "--batch {b} and --batch_size_per_gpu disagree: --batch is the images per \
                     step, and DINO's flags ask for {} x {} GPU(s) = {t}; give only one of them",
                    self.batch_size_per_gpu.unwrap_or(DINO_BATCH),
                    self.world_size()
                );
            }
        }

        if let Some(p) = self.patch_size {
            cfg.model.patch = Some(p);
        }
        if let Some(k) = self.out_dim {
            cfg.head.out_dim = k;
        }
        if let Some(m) = self.momentum_teacher {
            cfg.optim.momentum_teacher = m;
        }
        if let Some(t) = self.warmup_teacher_temp {
            cfg.loss.warmup_teacher_temp = t;
        }
        if let Some(t) = self.teacher_temp {
            cfg.loss.teacher_temp = t;
        }
        if let Some(e) = self.warmup_teacher_temp_epochs {
            cfg.loss.warmup_teacher_temp_epochs = e;
        }
        if let Some(w) = self.weight_decay {
            cfg.optim.weight_decay = w;
        }
        if let Some(w) = self.weight_decay_end {
            cfg.optim.weight_decay_end = w;
        }
        if let Some(c) = self.clip_grad {
            cfg.optim.clip_grad = c;
        }
        if let Some(t) = total {
            cfg.run.batch = t;
        }
        if let Some(e) = self.freeze_last_layer {
            cfg.optim.freeze_last_layer = e;
        }
        if let Some(e) = self.warmup_epochs {
            cfg.optim.warmup_epochs = e;
        }
        if let Some(lr) = self.min_lr {
            cfg.optim.min_lr = lr;
        }
        if let Some(p) = self.drop_path_rate {
            if !(0.0..1.0).contains(&p) {
                bail!("--drop_path_rate: {p} is not a drop probability: give a value in [0, 1) (DINO: 0.1)");
            }
            cfg.model.drop_path = p;
        }
        if let Some(v) = &self.global_crops_scale {
            cfg.views.global_scale = Some(scale_pair(v, "--global_crops_scale", "0.4 1.0")?);
        }
        if let Some(v) = &self.local_crops_scale {
            cfg.views.local_scale = Some(scale_pair(v, "--local_crops_scale", "0.05 0.4")?);
        }
        if self.local_crops_number.is_some() {
            cfg.views.local_views = self.local_crops_number;
        }
        if self.global_crops_number.is_some() {
            cfg.views.global_views = self.global_crops_number;
        }
        if self.global_scale.is_some() {
            cfg.views.global_side = self.global_scale;
        }
        if self.local_scale.is_some() {
            cfg.views.local_side = self.local_scale;
        }
        if let Some(p) = &self.data_path {
            if p.is_dir() {
                bail!(
                    "--data_path: {} is a folder; DINO reads an ImageFolder, this engine a pack \
                     file. Make one with `pwself-engine prepare folder {} --side 256 \
                     --channels 3 --out train.pwpack` and pass --data_path train.pwpack",
                    p.display(),
                    p.display()
                );
            }
            cfg.data.train = Some(p.clone());
        }
        if let Some(o) = &self.output_dir {
            cfg.run.out.clone_from(o);
        }
        if self.world_size() > 1 {
            notes.push(format!(
                "--nodes/--ngpus: DINO's job of {} GPU(s) x {} images is one step of {} images \
                 here, on this one device (the learning rate scales by {}/256 as in DINO); \
                 drop --nodes/--ngpus for a step of --batch_size_per_gpu images",
                self.world_size(),
                self.batch_size_per_gpu.unwrap_or(DINO_BATCH),
                cfg.run.batch,
                cfg.run.batch
            ));
        }
        for (flag, given) in [
            ("--use_volta32", self.use_volta32),
            ("--timeout", self.timeout.is_some()),
            ("--partition", self.partition.is_some()),
            ("--comment", self.comment.is_some()),
        ] {
            if given {
                notes.push(format!(
                    "{flag}: a SLURM setting of run_with_submitit.py; ignored (the run starts \
                     here, now)"
                ));
            }
        }
        Ok(notes)
    }
}

/// DINO's `--batch_size_per_gpu` default.
const DINO_BATCH: usize = 64;

/// Sets DINO's defaults (`main_dino.py`'s argument defaults and its fixed choices: the
/// 224/96 multi-crop, DINO's head sizes, per-tensor clipping) on every key of `cfg` that
/// `file` (the `--config` file's table, if any) does not set. The loss, the per-patch
/// augmentation, the evaluation, the threads and the output directory stay the engine's.
pub fn apply_defaults(cfg: &mut TrainConfig, file: Option<&toml::Table>) {
    let unset = |section: &str, key: &str| {
        file.and_then(|t| t.get(section))
            .and_then(|s| s.as_table())
            .map_or(true, |s| !s.contains_key(key))
    };
    if unset("model", "arch") {
        cfg.model.arch = Arch::Small;
    }
    if unset("model", "patch") {
        cfg.model.patch = Some(16);
    }
    if unset("model", "drop_path") {
        cfg.model.drop_path = 0.1;
    }
    let dino_head = HeadConfig::dino(65536);
    if unset("head", "layers") {
        cfg.head.layers = dino_head.layers;
    }
    if unset("head", "hidden") {
        cfg.head.hidden = dino_head.hidden;
    }
    if unset("head", "bottleneck") {
        cfg.head.bottleneck = dino_head.bottleneck;
    }
    if unset("head", "out_dim") {
        cfg.head.out_dim = dino_head.out_dim;
    }
    if unset("views", "preset") {
        cfg.views.preset = Some(Preset::Paper224);
    }
    if unset("views", "global_views") {
        cfg.views.global_views = Some(2);
    }
    if unset("views", "local_views") {
        cfg.views.local_views = Some(8);
    }
    if unset("views", "global_scale") {
        cfg.views.global_scale = Some([0.4, 1.0]);
    }
    if unset("views", "local_scale") {
        cfg.views.local_scale = Some([0.05, 0.4]);
    }
    if unset("loss", "teacher_temp") {
        cfg.loss.teacher_temp = 0.04;
    }
    if unset("loss", "warmup_teacher_temp") {
        cfg.loss.warmup_teacher_temp = 0.04;
    }
    if unset("loss", "warmup_teacher_temp_epochs") {
        cfg.loss.warmup_teacher_temp_epochs = 0;
    }
    let d = pwself_engine::optim::OptimConfig::default();
    let o = &mut cfg.optim;
    for (key, field, value) in [
        ("lr", &mut o.lr, d.lr),
        ("min_lr", &mut o.min_lr, d.min_lr),
        ("weight_decay", &mut o.weight_decay, d.weight_decay),
        (
            "weight_decay_end",
            &mut o.weight_decay_end,
            d.weight_decay_end,
        ),
        (
            "momentum_teacher",
            &mut o.momentum_teacher,
            d.momentum_teacher,
        ),
        (
            "momentum_teacher_end",
            &mut o.momentum_teacher_end,
            d.momentum_teacher_end,
        ),
        ("clip_grad", &mut o.clip_grad, d.clip_grad),
    ] {
        if unset("optim", key) {
            *field = value;
        }
    }
    if unset("optim", "clip_mode") {
        cfg.optim.clip_mode = ClipMode::PerTensor;
    }
    if unset("optim", "warmup_epochs") {
        cfg.optim.warmup_epochs = 10;
    }
    if unset("optim", "freeze_last_layer") {
        cfg.optim.freeze_last_layer = 1;
    }
    if unset("run", "epochs") {
        cfg.run.epochs = 100;
    }
    if unset("run", "batch") {
        cfg.run.batch = DINO_BATCH;
    }
    if unset("run", "seed") {
        cfg.run.seed = 0;
    }
}

/// The table of a `--config` file, to see which keys it sets (the file was already read
/// and checked by `TrainConfig::from_toml_file`).
pub fn config_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config: cannot read {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("--config: {} is not a TOML table", path.display()))
}

/// Refuses a flag given in both spellings with different values.
fn agree<T: PartialEq + std::fmt::Debug>(
    own_flag: &str,
    own: Option<T>,
    dino_flag: &str,
    dino: Option<T>,
) -> Result<()> {
    if let (Some(a), Some(b)) = (own, dino) {
        if a != b {
            bail!(
                "{own_flag} {a:?} and {dino_flag} {b:?} disagree: they set the same thing; \
                 give only one of them"
            );
        }
    }
    Ok(())
}

/// Reads a crop-scale flag: exactly two numbers `LO HI` with 0 < LO <= HI <= 1.
fn scale_pair(v: &[f64], flag: &str, dino: &str) -> Result<[f64; 2]> {
    let [lo, hi] = v else {
        bail!(
            "{flag}: takes two numbers, the smallest and largest area fraction, e.g. {flag} \
             {dino} (DINO's default); got {}",
            v.len()
        );
    };
    if !(lo.is_finite() && hi.is_finite() && 0.0 < *lo && lo <= hi && *hi <= 1.0) {
        bail!(
            "{flag}: {lo} {hi} is not an area-fraction range: give LO HI with \
             0 < LO <= HI <= 1, e.g. {flag} {dino} (DINO's default)"
        );
    }
    Scale::new(*lo, *hi, flag)?;
    Ok([*lo, *hi])
}

/// `train --print-config`: the configuration after every flag, the `--config` file and the
/// DINO defaults, with what it resolves to for the training pack (views, backbone, peak
/// learning rate), as pretty JSON.
pub fn resolved_json(cfg: &TrainConfig) -> Result<String> {
    let pack = match &cfg.data.train {
        Some(p) => Pack::open(p)?,
        None => default_pack(Split::Train)?,
    };
    let (views, vit) = cfg.resolve(pack.height(), pack.width(), pack.channels())?;
    let v = serde_json::json!({
        "config": cfg,
        "resolved": {
            "data": pack.origin().display().to_string(),
            "images": pack.len(),
            "source": [pack.height(), pack.width(), pack.channels()],
            "views": views,
            "vit": vit,
            "batch": cfg.run.batch,
            "peak_lr": cfg.optim.peak_lr(cfg.run.batch),
        },
    });
    Ok(serde_json::to_string_pretty(&v)?)
}
