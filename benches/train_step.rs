//! One CPU training step.
//!
//! Criterion (`cargo bench --bench train_step`): the default job's configuration (femto
//! ViT: 64 dims, 4 blocks, 2 heads, patch 4; 2 x 28 + 6 x 12 views; head 256/64/K=512;
//! PWML with per-patch augmentation) at batch 32 and 64 on the embedded Fashion-MNIST
//! subset. View building is not included (the loader builds views ahead on another
//! thread). Throughput in images.
//!
//! Step timer (`cargo bench --bench train_step -- --step-timer [--config small28|tiny224]
//! [--batch N] [--warmup W] [--steps S] [--threads T]`): a plain loop of `W + S` calls of
//! `StepRunner::step` on prebuilt batches, each timed with `Instant` (wall) and the
//! process's CPU time (`/proc/self/stat`), then one JSON object on stdout with the resolved
//! configuration, the per-step times, their median and the peak resident memory (`VmHWM`).
//! It is the engine's side of `bench/cpu_side_by_side.py`, which times it alternately with
//! the PyTorch peer (`bench/torch_peer.py`). What a timed step includes: teacher and
//! student forwards, the head on the teacher's tokens and the matched student tokens, the
//! PWML loss, backward, the last-layer freeze check, per-tensor clipping (as the peer and
//! DINO), AdamW, the teacher EMA and the centre update. What it excludes: building views
//! and matching patches (the loader's thread does both ahead of the step). The timed
//! batches have indices from 1 on with one step per epoch, so every timed step is in epoch
//! >= 1 and the head's last layer is trained (not frozen), as the peer's timed steps.
//!
//! - `small28`: the default job (`TrainConfig::default()`), batch 64 by default, on the
//!   embedded Fashion-MNIST pack (28x28x1).
//! - `tiny224`: ViT-Tiny/16, the paper224 preset's views (2 x 224 + 8 x 96), DINO's head
//!   (2048/2048/256, K = 65536), batch 8 by default, on 32 Fashion-MNIST images upscaled to
//!   256x256x3 (the step's cost does not depend on image content).

mod common;

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use pwself_engine::data::{default_pack, Split};
use pwself_engine::model::config::{Arch, HeadConfig};
use pwself_engine::model::vit::Network;
use pwself_engine::optim::ClipMode;
use pwself_engine::train::step::StepRunner;
use pwself_engine::train::TrainConfig;
use pwself_engine::views::batch::ViewBuilder;
use pwself_engine::views::config::Preset;

fn bench_step(c: &mut Criterion) {
    let pack = Arc::new(default_pack(Split::Train).expect("embedded pack"));
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    for batch in [32usize, 64] {
        let mut cfg = TrainConfig::default();
        cfg.run.batch = batch;
        let (views, vit) = cfg.resolve(28, 28, 1).expect("config");
        let net = Network::new(vit, cfg.head.clone()).expect("network");
        let spe = (pack.len() / batch) as u64;
        let sched = cfg
            .optim
            .schedules(batch, cfg.run.epochs, spe as usize)
            .expect("schedules");
        let mut runner = StepRunner::new(
            net,
            views.clone(),
            cfg.loss.clone(),
            cfg.optim.clone(),
            sched,
            spe,
            0,
        );
        let mut w = runner.init_weights();
        let builder = ViewBuilder::new(views, 0, &pack).expect("builder");
        let images: Vec<u32> = (0..batch as u32).collect();
        let batches: Vec<_> = (0..4)
            .map(|i| builder.build(&pack, i, 0, &images).expect("batch"))
            .collect();
        let mut i = 0;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("femto_small28_pwml_b{batch}"), |b| {
            b.iter(|| {
                i = (i + 1) % batches.len();
                runner.step(&mut w, &batches[i])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_step);

fn main() {
    if std::env::args().any(|a| a == "--step-timer") {
        step_timer::run();
    } else {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

/// The `--step-timer` mode (see the module comment).
mod step_timer {
    use super::*;

    struct Args {
        config: String,
        batch: Option<usize>,
        warmup: usize,
        steps: usize,
        threads: usize,
    }

    fn parse() -> Args {
        let mut a = Args {
            config: "small28".into(),
            batch: None,
            warmup: 2,
            steps: 5,
            threads: 2,
        };
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        let value = |i: usize| -> &str {
            argv.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value", argv[i]))
        };
        let number = |i: usize| -> usize {
            value(i)
                .parse()
                .unwrap_or_else(|_| panic!("{} takes a whole number", argv[i]))
        };
        while i < argv.len() {
            match argv[i].as_str() {
                "--step-timer" | "--bench" => {}
                "--config" => {
                    a.config = value(i).to_string();
                    i += 1;
                }
                "--batch" => {
                    a.batch = Some(number(i));
                    i += 1;
                }
                "--warmup" => {
                    a.warmup = number(i);
                    i += 1;
                }
                "--steps" => {
                    a.steps = number(i);
                    i += 1;
                }
                "--threads" => {
                    a.threads = number(i).max(1);
                    i += 1;
                }
                other => panic!(
                    "--step-timer: unknown argument {other}; use --config small28|tiny224, \
                     --batch, --warmup, --steps, --threads"
                ),
            }
            i += 1;
        }
        a
    }

    /// User + system CPU time of this process (all threads), in ms (clock ticks of 10 ms).
    fn process_cpu_ms() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14, 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let tick = |k: usize| f.get(k).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        (tick(11) + tick(12)) * 10.0
    }

    /// `VmHWM` (peak resident set) of this process, in bytes.
    fn peak_rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    pub fn run() {
        let a = parse();
        // rayon's pool runs every kernel, GEMMs included.
        rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build_global()
            .expect("rayon pool");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = TrainConfig::default();
        let (pack, batch) = match a.config.as_str() {
            "small28" => (default_pack(Split::Train).expect("embedded pack"), 64),
            "tiny224" => {
                cfg.model.arch = Arch::Tiny;
                cfg.views.preset = Some(Preset::Paper224);
                cfg.views.local_views = None; // the preset's 8 (the default job sets 6)
                cfg.head = HeadConfig::dino(65536);
                (common::rgb256_pack(dir.path()), 8)
            }
            other => panic!("--config {other}: use small28 or tiny224"),
        };
        cfg.run.batch = a.batch.unwrap_or(batch);
        // DINO's and the peer's clipping (the engine's default is the global norm).
        cfg.optim.clip_mode = ClipMode::PerTensor;
        let batch = cfg.run.batch;
        let (views, vit) = cfg
            .resolve(pack.height(), pack.width(), pack.channels())
            .expect("config");
        let net = Network::new(vit.clone(), cfg.head.clone()).expect("network");
        // One step per epoch: batch index i is epoch i, so timed steps (i >= 1) train the
        // last layer.
        let spe = 1u64;
        let total = (a.warmup + a.steps + 1) as u64;
        let epochs = total as usize + 1;
        let sched = cfg
            .optim
            .schedules(batch, epochs, spe as usize)
            .expect("schedules");
        let mut runner = StepRunner::new(
            net,
            views.clone(),
            cfg.loss.clone(),
            cfg.optim.clone(),
            sched,
            spe,
            0,
        );
        let mut w = runner.init_weights();
        let builder = ViewBuilder::new(views.clone(), 0, &pack).expect("builder");
        let images: Vec<u32> = (0..batch as u32).map(|i| i % pack.len() as u32).collect();
        // Batches 1..=3 built ahead (outside timing); step k uses batch 1 + k % 3 but with
        // the index (step number) 1 + k, so the schedules and drop path move on.
        let mut batches: Vec<_> = (1..=3u64)
            .map(|i| builder.build(&pack, i, 0, &images).expect("batch"))
            .collect();
        let params = runner.net.table.total();

        let (mut wall, mut cpu, mut losses, mut rows) = (vec![], vec![], vec![], vec![]);
        for k in 0..a.warmup + a.steps {
            let slot = k % batches.len();
            batches[slot].index = 1 + k as u64;
            let (t0, c0) = (Instant::now(), process_cpu_ms());
            let stats = runner.step(&mut w, &batches[slot]);
            let dt = t0.elapsed().as_secs_f64() * 1e3;
            let dc = process_cpu_ms() - c0;
            assert!(
                !stats.skipped,
                "step {k} was skipped (non-finite loss or gradient)"
            );
            eprintln!(
                "engine step {k:3} ({}): {dt:9.1} ms  loss {:.4}  head rows {}",
                if k < a.warmup { "warm-up" } else { "timed" },
                stats.loss,
                stats.head_rows
            );
            if k >= a.warmup {
                wall.push(dt);
                cpu.push(dc);
                losses.push(stats.loss);
                rows.push(stats.head_rows);
            }
        }
        let med = median(&wall);
        let round3 =
            |v: &[f64]| -> Vec<f64> { v.iter().map(|x| (x * 1e3).round() / 1e3).collect() };
        let report = serde_json::json!({
            "engine": "benches/train_step.rs --step-timer",
            "config_name": a.config,
            "config": {
                "batch": batch,
                "threads": a.threads,
                "vit": vit,
                "head": cfg.head,
                "views": {
                    "patch": views.patch_size,
                    "globals": views.global.count, "global_side": views.global.side,
                    "locals": views.local.count, "local_side": views.local.side,
                },
                "loss": cfg.loss,
                "clip_grad": cfg.optim.clip_grad,
                "clip_mode": cfg.optim.clip_mode,
                "precision": "fp32",
                "parameters_per_network": params,
            },
            "timed": "teacher + student forward, head on teacher tokens and matched student \
                      tokens, PWML, backward, clip per tensor, AdamW, EMA, centre; views and \
                      matching built ahead (not timed)",
            "step_ms": round3(&wall),
            "median_ms": (med * 1e3).round() / 1e3,
            "step_cpu_ms": round3(&cpu),
            "img_per_s": batch as f64 / (med / 1e3),
            "peak_memory_bytes": peak_rss_bytes(),
            "peak_memory_measure": "VmHWM (whole process, bytes)",
            "head_rows_per_step": rows,
            "loss": losses,
        });
        println!("{report}");
    }
}
