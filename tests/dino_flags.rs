//! `pwself-engine train` with DINO's flag names (docs/dino-flags.md): the training commands
//! printed in DINO's README (facebookresearch/dino) and the PW-Self authors' README
//! (alijavidani/Local_Global_Representation_Learning), with the program name replaced by
//! `pwself-engine train` and the data path by a pack, resolved by `--print-config` and
//! checked field by field against `main_dino.py`'s argument defaults; then every refused
//! flag, and the engine's own flags beside their DINO twins.
//!
//! The expected numbers are DINO's (its `get_args_parser` defaults and its fixed 224/96
//! multi-crop and 2048/256 head), typed in here from its source, not read back from the
//! engine.

mod common;

use std::path::{Path, PathBuf};

use common::{refused, run};
use serde_json::Value;

/// A tiny training pack (8 RGB images, 2 classes, 64x64) made by `prepare folder`, in a
/// temporary directory that lives as long as the returned guard.
fn pack() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for j in 0..4u8 {
            image::RgbImage::from_fn(20, 16, |x, y| {
                image::Rgb([j * 40, (x * 9) as u8, (y * 13) as u8])
            })
            .save(root.join(class).join(format!("{j}.png")))
            .unwrap();
        }
    }
    let out = tmp.path().join("train.pwpack");
    let r = run(&[
        "prepare",
        "folder",
        root.to_str().unwrap(),
        "--side",
        "64",
        "--channels",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        r.status.success(),
        "prepare folder: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    (tmp, out)
}

/// Splits a README command line into arguments (no quoting in these commands).
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

/// `pwself-engine train ARGS --print-config`: the resolved configuration and stderr.
fn print_config(args: &[String]) -> (Value, String) {
    let mut all: Vec<&str> = vec!["train"];
    all.extend(args.iter().map(String::as_str));
    all.push("--print-config");
    let out = run(&all);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{all:?} failed: {err}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{all:?}: stdout is not JSON ({e})"));
    (v, err)
}

/// The number at a `/`-separated JSON path.
fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
}

/// Asserts the number at `path` is `want` (to f32 precision: temperatures are f32).
fn assert_num(v: &Value, path: &str, want: f64) {
    let got = num(v, path);
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1e-6),
        "{path}: {got}, want {want}"
    );
}

/// Asserts the string at `path` is `want`.
fn assert_str(v: &Value, path: &str, want: &str) {
    assert_eq!(
        v.pointer(path).and_then(Value::as_str),
        Some(want),
        "{path} in {v:#}"
    );
}

/// What a DINO command resolves to, where it differs from `main_dino.py`'s defaults.
struct Expect<'a> {
    arch: &'a str,
    epochs: u64,
    batch: u64,
    lr: f64,
    teacher_temp: f64,
    warmup_teacher_temp_epochs: u64,
    weight_decay: f64,
    weight_decay_end: f64,
    global_scale: [f64; 2],
    local_scale: [f64; 2],
}

impl Default for Expect<'_> {
    /// `main_dino.py`'s defaults.
    fn default() -> Self {
        Expect {
            arch: "small",
            epochs: 100,
            batch: 64,
            lr: 5e-4,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            global_scale: [0.4, 1.0],
            local_scale: [0.05, 0.4],
        }
    }
}

/// Checks every DINO key of a resolved configuration: `e`'s values, DINO's defaults for
/// the rest, `data` and `out` as given.
fn check(v: &Value, e: &Expect<'_>, data: &Path, out: &str) {
    // Backbone: ViT-S (or e.arch) with 16-pixel patches, drop path 0.1.
    assert_str(v, "/config/model/arch", e.arch);
    assert_num(v, "/config/model/patch", 16.0);
    assert_num(v, "/resolved/vit/patch", 16.0);
    let dims = match e.arch {
        "small" => (384.0, 6.0),
        "base" => (768.0, 12.0),
        other => panic!("no dims for {other}"),
    };
    assert_num(v, "/resolved/vit/embed_dim", dims.0);
    assert_num(v, "/resolved/vit/heads", dims.1);
    assert_num(v, "/resolved/vit/depth", 12.0);
    assert_num(v, "/resolved/vit/in_chans", 3.0);
    assert_num(v, "/config/model/drop_path", 0.1);
    assert_num(v, "/resolved/vit/drop_path", 0.1);
    // Head: DINO's 3 layers, 2048 hidden, 256 bottleneck, K = 65536.
    assert_num(v, "/config/head/out_dim", 65536.0);
    assert_num(v, "/config/head/layers", 3.0);
    assert_num(v, "/config/head/hidden", 2048.0);
    assert_num(v, "/config/head/bottleneck", 256.0);
    // Temperatures and teacher momentum.
    assert_num(v, "/config/loss/teacher_temp", e.teacher_temp);
    assert_num(v, "/config/loss/warmup_teacher_temp", 0.04);
    assert_num(
        v,
        "/config/loss/warmup_teacher_temp_epochs",
        e.warmup_teacher_temp_epochs as f64,
    );
    assert_num(v, "/config/loss/student_temp", 0.1);
    assert_num(v, "/config/optim/momentum_teacher", 0.996);
    assert_num(v, "/config/optim/momentum_teacher_end", 1.0);
    // Multi-crop: 2 x 224 global + 8 x 96 local, DINO's scales.
    assert_num(v, "/resolved/views/global/count", 2.0);
    assert_num(v, "/resolved/views/local/count", 8.0);
    assert_num(v, "/resolved/views/global/side", 224.0);
    assert_num(v, "/resolved/views/local/side", 96.0);
    assert_num(v, "/resolved/views/global/scale/lo", e.global_scale[0]);
    assert_num(v, "/resolved/views/global/scale/hi", e.global_scale[1]);
    assert_num(v, "/resolved/views/local/scale/lo", e.local_scale[0]);
    assert_num(v, "/resolved/views/local/scale/hi", e.local_scale[1]);
    // Optimisation: lr per 256 images, cosine to min_lr, wd schedule, per-tensor clipping.
    assert_num(v, "/config/optim/lr", e.lr);
    assert_num(v, "/config/optim/min_lr", 1e-6);
    assert_num(v, "/config/optim/warmup_epochs", 10.0);
    assert_num(v, "/config/optim/weight_decay", e.weight_decay);
    assert_num(v, "/config/optim/weight_decay_end", e.weight_decay_end);
    assert_num(v, "/config/optim/clip_grad", 3.0);
    assert_str(v, "/config/optim/clip_mode", "per-tensor");
    assert_num(v, "/config/optim/freeze_last_layer", 1.0);
    // The run.
    assert_num(v, "/config/run/batch", e.batch as f64);
    assert_num(v, "/resolved/batch", e.batch as f64);
    assert_num(v, "/resolved/peak_lr", e.lr * e.batch as f64 / 256.0);
    assert_num(v, "/config/run/epochs", e.epochs as f64);
    assert_num(v, "/config/run/seed", 0.0);
    assert_str(v, "/config/run/out", out);
    assert_str(v, "/config/data/train", data.to_str().unwrap());
    // The objective stays the engine's (PW-Self) whatever the flags' spelling.
    assert_str(v, "/config/loss/kind", "pwml");
}

/// A README command with its program replaced: everything after `marker` (the script
/// name), with `/path/to/...train` replaced by the pack.
fn readme_command(line: &str, marker: &str, data: &Path) -> Vec<String> {
    let (_, rest) = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("{marker} not in {line}"));
    words(rest)
        .into_iter()
        .map(|w| {
            if w.starts_with("/path/to/") && w.ends_with("/train") {
                data.to_str().unwrap().to_string()
            } else {
                w
            }
        })
        .collect()
}

// DINO's README (facebookresearch/dino, "Training" section), verbatim.
const DINO_VANILLA: &str = "python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir";
const DINO_MULTI_NODE: &str = "python run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir";
const DINO_VIT_BASE: &str = "python run_with_submitit.py --nodes 2 --ngpus 8 --use_volta32 --arch vit_base  --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir";
const DINO_BOOST: &str = "python run_with_submitit.py --arch vit_small --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir";
const DINO_RESNET: &str = "python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir";
// The PW-Self authors' README (alijavidani/Local_Global_Representation_Learning).
const PWSELF_VANILLA: &str = "torchrun --nproc_per_node=4 patch_wise_dino.py --arch vit_small --data_path /path/to/imagenet-or-imagenet100-or-cifar10/train --output_dir /path/to/saving_dir";

#[test]
fn dino_readme_vanilla_command() {
    let (_tmp, data) = pack();
    let args = readme_command(DINO_VANILLA, "main_dino.py", &data);
    let (v, err) = print_config(&args);
    check(&v, &Expect::default(), &data, "/path/to/saving_dir");
    assert!(err.contains("main_dino.py's defaults"), "{err}");
    assert!(
        !Path::new("/path/to/saving_dir").exists(),
        "--print-config must not create the output directory"
    );
}

#[test]
fn pwself_authors_readme_command() {
    let (_tmp, data) = pack();
    let args = readme_command(PWSELF_VANILLA, "patch_wise_dino.py", &data);
    let (v, _) = print_config(&args);
    check(&v, &Expect::default(), &data, "/path/to/saving_dir");
    // Their "boosting" fragments, appended.
    let mut boosted = args.clone();
    boosted.extend(words(
        "--epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30",
    ));
    let (v, _) = print_config(&boosted);
    let e = Expect {
        epochs: 300,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 30,
        ..Expect::default()
    };
    check(&v, &e, &data, "/path/to/saving_dir");
    // Their added flags: global views, and view sides in pixels.
    let mut sides = args;
    sides.extend(words(
        "--global_crops_number 2 --global_scale 32 --local_scale 16 --patch_size 8",
    ));
    let (v, _) = print_config(&sides);
    assert_num(&v, "/resolved/views/global/count", 2.0);
    assert_num(&v, "/resolved/views/global/side", 32.0);
    assert_num(&v, "/resolved/views/local/side", 16.0);
    assert_num(&v, "/resolved/vit/patch", 8.0);
}

#[test]
fn dino_readme_multi_node_commands_train_the_total_batch() {
    let (_tmp, data) = pack();
    let args = readme_command(DINO_MULTI_NODE, "run_with_submitit.py", &data);
    let (v, err) = print_config(&args);
    let e = Expect {
        batch: 2 * 8 * 64,
        ..Expect::default()
    };
    check(&v, &e, &data, "/path/to/saving_dir");
    assert!(err.contains("--nodes") && err.contains("1024"), "{err}");

    let args = readme_command(DINO_VIT_BASE, "run_with_submitit.py", &data);
    let (v, err) = print_config(&args);
    let e = Expect {
        arch: "base",
        batch: 1024,
        ..Expect::default()
    };
    check(&v, &e, &data, "/path/to/saving_dir");
    assert!(
        err.contains("--use_volta32") && err.contains("ignored"),
        "{err}"
    );

    // One of the two given: the other at run_with_submitit.py's default (2 nodes, 8 GPUs).
    let (v, _) = print_config(&words("--ngpus 4 --batch_size_per_gpu 16"));
    assert_num(&v, "/config/run/batch", (2 * 4 * 16) as f64);
}

#[test]
fn dino_readme_boost_command_is_refused_for_norm_last_layer_false_only() {
    let (_tmp, data) = pack();
    let args = readme_command(DINO_BOOST, "run_with_submitit.py", &data);
    let mut all = vec!["train"];
    all.extend(args.iter().map(String::as_str));
    refused(
        &all,
        &["--norm_last_layer false", "gain fixed to 1", "Drop"],
    );
    // Everything else in it is taken: the same command with DINO's default `true`.
    let fixed: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "false" {
                "true".into()
            } else {
                a.clone()
            }
        })
        .collect();
    let (v, _) = print_config(&fixed);
    let e = Expect {
        epochs: 300,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 30,
        ..Expect::default()
    };
    check(&v, &e, &data, "/path/to/saving_dir");
}

#[test]
fn dino_readme_resnet_command_is_refused_and_its_optimisation_flags_are_taken() {
    let (_tmp, data) = pack();
    let args = readme_command(DINO_RESNET, "main_dino.py", &data);
    let mut all = vec!["train"];
    all.extend(args.iter().map(String::as_str));
    refused(&all, &["--arch", "resnet50", "vit_small"]);
    // With a ViT, the optimiser is the next refusal.
    let vit: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "resnet50" {
                "vit_small".into()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut all = vec!["train"];
    all.extend(vit.iter().map(String::as_str));
    refused(&all, &["--optimizer sgd", "adamw"]);
    // With AdamW, the rest resolves: lr, weight decays and crop scales as given.
    let adamw: Vec<String> = vit
        .iter()
        .map(|a| {
            if a == "sgd" {
                "adamw".into()
            } else {
                a.clone()
            }
        })
        .collect();
    let (v, _) = print_config(&adamw);
    let e = Expect {
        lr: 0.03,
        weight_decay: 1e-4,
        weight_decay_end: 1e-4,
        global_scale: [0.14, 1.0],
        local_scale: [0.05, 0.14],
        ..Expect::default()
    };
    check(&v, &e, &data, "/path/to/saving_dir");
}

#[test]
fn every_dino_flag_maps_to_its_key() {
    let (_tmp, data) = pack();
    let line = format!(
        "--arch deit_small --patch_size 8 --out_dim 4096 --norm_last_layer True \
         --momentum_teacher 0.9995 --use_bn_in_head off --warmup_teacher_temp 0.03 \
         --teacher_temp 0.06 --warmup_teacher_temp_epochs 5 --weight_decay 0.05 \
         --weight_decay_end 0.3 --clip_grad 0 --batch_size_per_gpu 4 --epochs 7 \
         --freeze_last_layer 2 --lr 0.001 --warmup_epochs 3 --min_lr 2e-6 \
         --optimizer AdamW --drop_path_rate 0.2 --global_crops_scale 0.14 1. \
         --local_crops_number 4 --local_crops_scale 0.05 0.14 --seed 11 \
         --data_path {} --output_dir runs/x",
        data.display()
    );
    let (v, _) = print_config(&words(&line));
    assert_str(&v, "/config/model/arch", "small");
    assert_num(&v, "/resolved/vit/patch", 8.0);
    assert_num(&v, "/config/head/out_dim", 4096.0);
    assert_num(&v, "/config/optim/momentum_teacher", 0.9995);
    assert_num(&v, "/config/loss/warmup_teacher_temp", 0.03);
    assert_num(&v, "/config/loss/teacher_temp", 0.06);
    assert_num(&v, "/config/loss/warmup_teacher_temp_epochs", 5.0);
    assert_num(&v, "/config/optim/weight_decay", 0.05);
    assert_num(&v, "/config/optim/weight_decay_end", 0.3);
    assert_num(&v, "/config/optim/clip_grad", 0.0);
    assert_num(&v, "/config/run/batch", 4.0);
    assert_num(&v, "/config/run/epochs", 7.0);
    assert_num(&v, "/config/optim/freeze_last_layer", 2.0);
    assert_num(&v, "/config/optim/lr", 0.001);
    assert_num(&v, "/resolved/peak_lr", 0.001 * 4.0 / 256.0);
    assert_num(&v, "/config/optim/warmup_epochs", 3.0);
    assert_num(&v, "/config/optim/min_lr", 2e-6);
    assert_num(&v, "/config/model/drop_path", 0.2);
    assert_num(&v, "/resolved/views/global/scale/lo", 0.14);
    assert_num(&v, "/resolved/views/global/scale/hi", 1.0);
    assert_num(&v, "/resolved/views/local/count", 4.0);
    assert_num(&v, "/resolved/views/local/scale/hi", 0.14);
    assert_num(&v, "/config/run/seed", 11.0);
    assert_str(&v, "/config/run/out", "runs/x");
}

#[test]
fn a_config_file_sits_between_dino_defaults_and_flags() {
    let (tmp, data) = pack();
    let toml = tmp.path().join("c.toml");
    std::fs::write(
        &toml,
        "[run]\nepochs = 7\n[optim]\nclip_mode = \"global-norm\"\nlr = 0.002\n",
    )
    .unwrap();
    let line = format!(
        "--config {} --data_path {} --lr 0.004",
        toml.display(),
        data.display()
    );
    let (v, _) = print_config(&words(&line));
    assert_num(&v, "/config/run/epochs", 7.0); // the file's
    assert_str(&v, "/config/optim/clip_mode", "global-norm"); // the file's
    assert_num(&v, "/config/optim/lr", 0.004); // the flag's
    assert_num(&v, "/config/run/batch", 64.0); // DINO's
    assert_num(&v, "/config/head/out_dim", 65536.0); // DINO's
}

#[test]
fn own_flags_keep_their_meaning_and_defaults() {
    // No DINO-spelled flag: the engine's defaults, and `vit_tiny` is `tiny`.
    let (v, err) = print_config(&words("--arch vit_tiny --epochs 2 --seed 3 --lr 0.01"));
    assert!(!err.contains("main_dino.py"), "{err}");
    assert_str(&v, "/config/model/arch", "tiny");
    assert_num(&v, "/config/run/epochs", 2.0);
    assert_num(&v, "/config/run/seed", 3.0);
    assert_num(&v, "/config/optim/lr", 0.01);
    assert_num(&v, "/config/run/batch", 32.0);
    assert_num(&v, "/config/head/out_dim", 512.0);
    assert_str(&v, "/config/optim/clip_mode", "global-norm");
    let (w, _) = print_config(&words("--arch tiny --epochs 2 --seed 3 --lr 0.01"));
    assert_eq!(
        v, w,
        "--arch vit_tiny and --arch tiny must resolve the same"
    );
    // Both spellings of one thing, agreeing: taken.
    let (v, _) = print_config(&words(
        "--batch 16 --batch_size_per_gpu 16 --out-dim 256 --out_dim 256 --patch 4 --patch_size 4 \
         --local-views 6 --local_crops_number 6 --view-sides 28,12 --global_scale 28 --local_scale 12",
    ));
    assert_num(&v, "/config/run/batch", 16.0);
    assert_num(&v, "/config/head/out_dim", 256.0);
    assert_num(&v, "/resolved/views/local/count", 6.0);
    assert_num(&v, "/resolved/views/global/side", 28.0);
}

#[test]
fn both_spellings_disagreeing_are_refused() {
    refused(
        &["train", "--batch", "32", "--batch_size_per_gpu", "64"],
        &["--batch 32", "--batch_size_per_gpu", "64", "only one"],
    );
    refused(
        &[
            "train",
            "--batch",
            "64",
            "--batch_size_per_gpu",
            "64",
            "--nodes",
            "2",
            "--ngpus",
            "8",
        ],
        &["--batch 64", "1024", "only one"],
    );
    refused(
        &["train", "--out-dim", "10", "--out_dim", "20"],
        &["--out-dim", "--out_dim", "only one"],
    );
    refused(
        &["train", "--patch", "8", "--patch_size", "16"],
        &["--patch", "--patch_size"],
    );
    refused(
        &["train", "--out", "a", "--output_dir", "b"],
        &["--out", "--output_dir"],
    );
    refused(
        &["train", "--local-views", "6", "--local_crops_number", "8"],
        &["--local-views", "--local_crops_number"],
    );
}

#[test]
fn flags_with_no_meaning_here_are_refused_with_what_to_use() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--use_fp16", "true"], &["--use_fp16", "--device cpu"]),
        (&["--use_fp16", "false"], &["--use_fp16", "drop --use_fp16"]),
        (
            &["--dist_url", "env://"],
            &["--dist_url", "drop --dist_url"],
        ),
        (&["--local_rank=0"], &["--local_rank", "drop --local_rank"]),
        (&["--num_workers", "10"], &["--num_workers", "--threads"]),
        (&["--saveckp_freq", "20"], &["--saveckp_freq", "--resume"]),
        (&["--use_bn_in_head", "true"], &["--use_bn_in_head", "drop"]),
        (&["--optimizer", "lars"], &["--optimizer lars", "adamw"]),
        (&["--optimizer", "adam"], &["--optimizer", "adamw"]),
        (&["--norm_last_layer", "0"], &["--norm_last_layer", "Drop"]),
        (
            &["--norm_last_layer", "maybe"],
            &["--norm_last_layer", "true or false"],
        ),
        (&["--arch", "xcit"], &["--arch", "vit_small"]),
        (
            &["--global_crops_scale", "0.4"],
            &["--global_crops_scale", "two numbers"],
        ),
        (
            &["--local_crops_scale", "0.05", "0.4", "0.5"],
            &["--local_crops_scale", "two numbers"],
        ),
        (
            &["--local_crops_scale", "0.5", "0.1"],
            &["--local_crops_scale"],
        ),
        (
            &["--drop_path_rate", "1.5"],
            &["--drop_path_rate", "[0, 1)"],
        ),
        (
            &["--batch_size_per_gpu", "0"],
            &["--batch_size_per_gpu", "at least 1"],
        ),
    ];
    for (args, mention) in cases {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        refused(&all, mention);
    }
    // An ImageFolder root: say how to make a pack of it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    refused(
        &["train", "--data_path", dir],
        &[
            "--data_path",
            "is a folder",
            "pwself-engine prepare folder",
            "--side 256",
        ],
    );
}

#[test]
fn help_lists_the_dino_flags_and_hides_the_refused_ones() {
    let out = run(&["train", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for f in [
        "--patch_size",
        "--out_dim",
        "--teacher_temp",
        "--warmup_teacher_temp_epochs",
        "--momentum_teacher",
        "--global_crops_scale",
        "--local_crops_number",
        "--min_lr",
        "--weight_decay_end",
        "--clip_grad",
        "--freeze_last_layer",
        "--norm_last_layer",
        "--batch_size_per_gpu",
        "--warmup_epochs",
        "--drop_path_rate",
        "--data_path",
        "--output_dir",
        "--batch",
        "--out-dim",
    ] {
        assert!(help.contains(f), "train --help lacks {f}");
    }
    for f in ["--use_fp16", "--dist_url", "--print-config"] {
        assert!(!help.contains(f), "train --help shows {f}");
    }
}
