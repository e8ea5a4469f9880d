//! Weighted kNN at the size (issue 6, Speed): 60,000 train x 10,000 test random
//! features of dimension 384, 10 classes, k in {10, 20, 100, 200}, DINO's settings
//! (`KnnOptions::default()`: T = 0.07, train blocks of 4096 rows). Times
//! `knn_evaluate` (median of 3 runs; no separate warm-up, each run takes seconds), wall
//! clock and the process's CPU time (user + system, /proc/self/stat: on a shared machine
//! the wall time mostly measures the other load), and reads the memory peak (VmHWM in
//! /proc/self/status) before and after, so the difference is what the evaluation added on
//! top of the features. Prints a markdown table.
//!
//! Run: `cargo bench --bench knn`.

use std::time::Instant;

use pwself_engine::eval::knn::{knn_evaluate, KnnOptions};
use pwself_engine::rng::{Purpose, Stream};

const TRAIN: usize = 60_000;
const TEST: usize = 10_000;
const DIM: usize = 384;
const CLASSES: usize = 10;

/// The peak resident memory of this process in MiB (VmHWM), if /proc says.
fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds (user + system) this process has used, if /proc says; fields 14 and 15
/// of /proc/self/stat, in Linux's USER_HZ ticks of 1/100 s.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `rows` feature rows of standard normal noise and uniform labels, from `seed`.
fn random_set(rows: usize, seed: u64) -> (Vec<f32>, Vec<u16>) {
    let mut s = Stream::new(seed, [0, 0, 0], Purpose::Noise);
    let x = (0..rows * DIM).map(|_| s.normal()).collect();
    let labels = (0..rows).map(|_| s.below(CLASSES as u64) as u16).collect();
    (x, labels)
}

fn main() {
    let (train, train_labels) = random_set(TRAIN, 1);
    let (test, test_labels) = random_set(TEST, 2);
    let opts = KnnOptions::default();
    let before = peak_mib();
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut results = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        results = knn_evaluate(
            &train,
            &train_labels,
            &test,
            &test_labels,
            DIM,
            CLASSES,
            &opts,
        )
        .expect("the bench's own inputs are valid");
        times.push(t0.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (c0, cpu_seconds()) {
            cpu.push(b - a);
        }
    }
    let after = peak_mib();
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let cpu = cpu
        .get(1)
        .map_or("n/a".to_string(), |c| format!("{c:.2} s"));
    let mib = |m: Option<f64>| m.map_or("n/a".to_string(), |v| format!("{v:.0} MiB"));
    let top1: Vec<String> = results
        .iter()
        .map(|r| format!("k={}: {:.2}%", r.k, r.top1))
        .collect();
    println!("| train x test x dim | threads | wall: median of 3 (min, max) | CPU: median of 3 | VmHWM before -> after | top-1 (chance 10%) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {TRAIN} x {TEST} x {DIM} | {} | {:.2} s ({:.2}, {:.2}) | {cpu} | {} -> {} | {} |",
        rayon::current_num_threads(),
        times[1],
        times[0],
        times[2],
        mib(before),
        mib(after),
        top1.join(", ")
    );
}
