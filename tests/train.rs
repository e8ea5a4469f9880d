//! The CPU trainer end to end on the embedded data: the loss goes down, runs are
//! bit-identical, an interrupted run resumes bit-identically, and bad input is refused
//! cleanly.

use std::path::Path;

mod common;

use common::refused;
use pwself_engine::loss::LossKind;
use pwself_engine::train::{run, RunOptions, TrainConfig, TrainSummary};

/// A small, fast configuration: depth-2 femto, 16 images, 2 + 4 views, a small head.
fn small(out: &Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.depth = Some(2);
    c.views.local_views = Some(4);
    c.head.hidden = 64;
    c.head.bottleneck = 32;
    c.head.out_dim = 128;
    c.run.batch = 16;
    c.run.epochs = 1;
    c.run.max_steps = Some(50);
    c.optim.warmup_epochs = 0;
    c.optim.lr = 0.02;
    c.run.out = out.to_path_buf();
    c
}

fn train(cfg: &TrainConfig, resume: Option<&Path>) -> TrainSummary {
    let opts = RunOptions {
        resume: resume.map(Path::to_path_buf),
        quiet: true,
        no_eval: true,
        ..RunOptions::default()
    };
    run(cfg, &opts).unwrap()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn fifty_steps_lower_the_loss_are_reproducible_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(&dir.path().join("a"));
    let a = train(&cfg, None);
    assert_eq!(a.steps, 50);
    assert_eq!(a.skipped_steps, 0);

    // The loss goes down: mean of the last 10 steps below the mean of the first 10.
    let losses: Vec<f64> = std::fs::read_to_string(dir.path().join("a/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["stats"]["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 50);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[40..]));
    assert!(
        last < first - 0.05,
        "loss did not go down: first 10 steps {first:.4}, last 10 {last:.4}"
    );

    // Same seed, same threads: the same bits.
    let b = train(&small(&dir.path().join("b")), None);
    assert!(same_bits(&a.student, &b.student) && same_bits(&a.teacher, &b.teacher));

    // Interrupted at step 25, resumed: the same bits as the uninterrupted run.
    let mut half = small(&dir.path().join("c"));
    half.run.max_steps = Some(25);
    let c = train(&half, None);
    assert_eq!(c.steps, 25);
    let resumed = train(&small(&dir.path().join("c")), Some(&dir.path().join("c")));
    assert_eq!(resumed.steps, 25);
    assert!(
        same_bits(&a.student, &resumed.student),
        "student differs after resume"
    );
    assert!(
        same_bits(&a.teacher, &resumed.teacher),
        "teacher differs after resume"
    );
    // The checkpoints hold the same tensors, center and moments included (the metadata
    // differs: it records each run's output directory).
    let read = |p: &Path| std::fs::read(p.join("checkpoint.safetensors")).unwrap();
    let (ba, bc) = (read(&dir.path().join("a")), read(&dir.path().join("c")));
    let (ta, tc) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bc).unwrap(),
    );
    let mut names = ta.names();
    names.sort();
    assert!(names.contains(&"loss.center") && names.contains(&"optim.exp_avg_sq.cls_token"));
    for n in names {
        assert!(
            ta.tensor(n).unwrap().data() == tc.tensor(n).unwrap().data(),
            "tensor {n} differs after resume"
        );
    }
}

#[test]
fn every_loss_trains_without_non_finite_steps() {
    let dir = tempfile::tempdir().unwrap();
    for (i, kind) in [
        LossKind::Dino,
        LossKind::Pwsl,
        LossKind::Pwll { lambda: 0.2 },
    ]
    .into_iter()
    .enumerate()
    {
        let mut cfg = small(&dir.path().join(i.to_string()));
        cfg.loss.kind = kind;
        cfg.run.max_steps = Some(6);
        let s = train(&cfg, None);
        assert_eq!((s.steps, s.skipped_steps), (6, 0), "{kind:?}");
        assert!(s.last_loss.unwrap().is_finite());
    }
}

#[test]
fn bad_training_input_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[run]\nbatch = 8\nlearning_rate = 3\n").unwrap();
    refused(
        &["train", "--config", cfg.to_str().unwrap(), "--out", o],
        &["c.toml", "learning_rate"],
    );
    std::fs::write(&cfg, "[model]\narch = \"huge\"\n").unwrap();
    refused(
        &["train", "--config", cfg.to_str().unwrap(), "--out", o],
        &["c.toml", "huge"],
    );
    refused(
        &["train", "--loss", "pwll", "--lambda", "1.5", "--out", o],
        &["lambda", "[0, 1]"],
    );
    refused(
        &["train", "--lambda", "0.3", "--out", o],
        &["--lambda", "--loss pwll"],
    );
    refused(
        &["train", "--patch", "5", "--out", o],
        &["not divisible by the patch size 5"],
    );
    refused(&["train", "--batch", "0", "--out", o], &["--batch"]);
    refused(
        &["train", "--data", "/nonexistent/train.pwpack", "--out", o],
        &["/nonexistent/train.pwpack"],
    );
    refused(
        &[
            "train",
            "--resume",
            "/nonexistent/ckpt.safetensors",
            "--out",
            o,
        ],
        &["/nonexistent/ckpt.safetensors"],
    );

    // A checkpoint from another architecture.
    let mut c = small(&out);
    c.run.max_steps = Some(1);
    train(&c, None);
    let toml_path = dir.path().join("small.toml");
    std::fs::write(&toml_path, toml::to_string(&c).unwrap()).unwrap();
    refused(
        &[
            "train",
            "--config",
            toml_path.to_str().unwrap(),
            "--arch",
            "tiny",
            "--resume",
            o,
            "--out",
            o,
        ],
        &["checkpoint.safetensors", "another architecture"],
    );
}
