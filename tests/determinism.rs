//! Determinism of `pwself-engine train` on the CPU backend (issue 7 item 6), through the
//! built binary, since the thread count is fixed once per process (`--threads` sizes the
//! global rayon pool, which runs every kernel, GEMMs included):
//!
//! - same seed, same thread count: the checkpoints (every tensor: weights, AdamW moments,
//!   the loss centre; and every metadata value but the checksum, the output folder and
//!   the thread count), the per-step metrics and the kNN results are bit-identical;
//! - 1, 2 and 3 threads: also bit-identical, so the tolerance across thread counts is 0.
//!   The CPU kernels split work between threads only over output elements and reduce in a
//!   fixed order (`src/cpu/mod.rs`), view building draws from `(seed, counter)`
//!   (`src/rng.rs`), and `cpu::gemm` cuts a product into blocks chosen from its shape
//!   alone (rows or columns of C, which leave each element's arithmetic as in one call, or
//!   fixed 1024-row blocks of k summed in order). Measured before asserting it (2026-11-26, 2-core x86-64): the largest
//!   relative difference of any checkpoint tensor between 1, 2 and 3 threads was 0 on this
//!   configuration, and 0 over all 246 tensors of the default job (femto, 6 steps) between
//!   1, 2 and 4 threads (measured again after the GEMM split moved into `cpu::gemm`: 0/246).
//!
//! A second seed must give different tensors, so that the comparisons can fail.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use pwself_engine::checkpoint;
use pwself_engine::data::{default_pack, PackWriter, Split};

const BIN: &str = env!("CARGO_BIN_EXE_pwself-engine");

/// 48 training and 40 test images of the embedded splits (3 steps of 16 per epoch), a
/// depth-2 femto ViT with a small head: 2 epochs = 6 steps, a checkpoint and a kNN
/// evaluation after each epoch, about a second per run.
struct Setup {
    dir: tempfile::TempDir,
    train: PathBuf,
    test: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let subset = |split: Split, n: usize, name: &str| {
            let full = default_pack(split).unwrap();
            let path = dir.path().join(name);
            let mut w = PackWriter::create(&path, 28, 28, 1, full.class_names()).unwrap();
            for i in 0..n {
                w.push(full.image(i), full.label(i)).unwrap();
            }
            w.finish().unwrap();
            path
        };
        let train = subset(Split::Train, 48, "train.pwpack");
        let test = subset(Split::Test, 40, "test.pwpack");
        let config = dir.path().join("tiny.toml");
        fs::write(
            &config,
            "[model]\ndepth = 2\n[views]\nlocal_views = 4\n[head]\nhidden = 64\nbottleneck = 32\n\
             out_dim = 128\n[run]\nbatch = 16\nepochs = 2\neval_every = 1\n[optim]\n\
             warmup_epochs = 0\nlr = 0.02\n",
        )
        .unwrap();
        Setup {
            dir,
            train,
            test,
            config,
        }
    }

    /// Trains into a fresh directory `name` with `threads` threads and `seed`; returns it.
    fn train(&self, name: &str, threads: usize, seed: u64) -> PathBuf {
        let out = self.dir.path().join(name);
        let o = Command::new(BIN)
            .args(["train", "--device", "cpu", "--config"])
            .arg(&self.config)
            .arg("--data")
            .arg(&self.train)
            .arg("--test-data")
            .arg(&self.test)
            .args(["--threads", &threads.to_string()])
            .args(["--seed", &seed.to_string()])
            .arg("--out")
            .arg(&out)
            .env("RUST_BACKTRACE", "0")
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("PWSELF_TEST_NAN_STEPS")
            .env_remove("PWSELF_TEST_SLOW_CHECKPOINT")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "train --threads {threads} --seed {seed} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }
}

/// Every tensor of the run's newest checkpoint (verified against its checksum), by name,
/// and every metadata value as `meta.KEY`, except two that must differ between runs: the
/// checksum (it covers the metadata, so the configuration below) and, in the recorded
/// configuration, the output folder and the thread count. (Runs into the same folder with
/// the same threads make byte-identical files: see the test of that below.)
fn tensors(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let path = out.join("checkpoint.safetensors");
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    checkpoint::verify(&path, &bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, Vec<u8>> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(
        meta["step"],
        "6",
        "{}: not the end of the run",
        path.display()
    );
    for (key, value) in meta.iter().filter(|(k, _)| *k != "checksum") {
        let value = if key == "config" {
            let mut c: serde_json::Value = serde_json::from_str(value).unwrap();
            let run = c["run"].as_object_mut().unwrap();
            assert!(run.remove("out").is_some() && run.remove("threads").is_some());
            c.to_string()
        } else {
            value.clone()
        };
        map.insert(format!("meta.{key}"), value.into_bytes());
    }
    assert!(map.contains_key("meta.adam_step") && map.contains_key("meta.config"));
    map
}

/// The run's metrics without the timings: each step's statistics and each kNN result.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("images_per_second");
            v
        })
        .collect();
    let knn = lines.iter().filter(|v| v["kind"] == "knn").count();
    assert!(
        knn >= 2,
        "{}: {knn} kNN lines, want one per epoch",
        out.display()
    );
    lines
}

/// The largest `|a - b| / max(|a|, |b|)` over the f32 tensors both maps hold (0 where
/// both are 0), and the tensor it is in.
fn max_rel_diff(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> (f64, String) {
    let floats = |v: &[u8]| -> Vec<f32> {
        v.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut worst = (0.0f64, String::new());
    for (name, x) in a.iter().filter(|(n, _)| !n.starts_with("meta.")) {
        let (x, y) = (floats(x), floats(&b[name]));
        assert_eq!(x.len(), y.len(), "{name}: sizes differ");
        for (&x, &y) in x.iter().zip(&y) {
            let scale = f64::from(x.abs().max(y.abs()));
            let d = if scale == 0.0 {
                0.0
            } else {
                f64::from((x - y).abs()) / scale
            };
            if d > worst.0 || d.is_nan() {
                worst = (d, name.clone());
            }
        }
    }
    worst
}

/// Asserts that two runs' checkpoints hold the same tensors, bit for bit, and that their
/// metrics agree; on a mismatch, names the tensor and the largest relative difference.
fn assert_bit_identical(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    assert!(
        ta.contains_key("loss.center") && ta.contains_key("optim.exp_avg_sq.cls_token"),
        "the checkpoint lacks the centre or the moments: {:?}",
        ta.keys().collect::<Vec<_>>()
    );
    let differing: Vec<&String> = ta.keys().filter(|n| ta[*n] != tb[*n]).collect();
    assert!(
        differing.is_empty(),
        "{} and {}: {} tensors differ, e.g. {:?}; largest relative difference {:?}",
        a.display(),
        b.display(),
        differing.len(),
        &differing[..differing.len().min(5)],
        max_rel_diff(&ta, &tb)
    );
    assert_eq!(
        metrics(a),
        metrics(b),
        "{} and {}",
        a.display(),
        b.display()
    );
}

#[test]
fn same_seed_and_threads_give_bit_identical_checkpoints() {
    let s = Setup::new();
    let a = s.train("a", 2, 7);
    let b = s.train("b", 2, 7);
    assert_bit_identical(&a, &b);

    // Into the same folder with the same settings, the checkpoint files are identical byte
    // for byte (the header's keys are written sorted).
    let again = |name: &str| {
        let out = s.train("same", 2, 7);
        let bytes = fs::read(out.join("checkpoint.safetensors")).unwrap();
        fs::rename(&out, s.dir.path().join(name)).unwrap();
        bytes
    };
    let (first, second) = (again("same-1"), again("same-2"));
    assert!(
        first == second,
        "two identical runs wrote different checkpoint files"
    );

    // The comparison can fail: another seed trains other weights, and training moved them.
    let other = tensors(&s.train("other-seed", 2, 8));
    let ta = tensors(&a);
    let (d, name) = max_rel_diff(&ta, &other);
    assert!(d > 1e-3, "seeds 7 and 8 agree to {d:e} (in {name})");
}

#[test]
fn one_two_and_three_threads_give_bit_identical_checkpoints() {
    let s = Setup::new();
    let one = s.train("t1", 1, 3);
    for threads in [2, 3] {
        let many = s.train(&format!("t{threads}"), threads, 3);
        let (d, name) = max_rel_diff(&tensors(&one), &tensors(&many));
        eprintln!("1 vs {threads} threads: largest relative difference {d:e} ({name})");
        assert_bit_identical(&one, &many);
    }
}
