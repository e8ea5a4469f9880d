//! DINO's linear probe (SPEC.md section 7): one Linear layer trained on frozen features.
//!
//! The recipe, as DINO's `eval_linear.py` runs it: weight init N(0, 0.01^2), bias 0;
//! cross-entropy averaged over the batch; SGD with momentum 0.9 (PyTorch semantics:
//! `buf = m * buf + g; p -= lr * buf`, no dampening, no Nesterov), no weight decay;
//! lr `0.001 * batch / 256` unless given; a cosine schedule to 0 stepped once per epoch
//! (PyTorch's `CosineAnnealingLR(T_max = epochs, eta_min = 0)`: epoch `e` trains at
//! `lr * (1 + cos(pi e / epochs)) / 2`, written in closed form here where PyTorch uses
//! an equivalent recursion); every epoch visits the train set in a new shuffled order,
//! in batches with the last partial batch kept (DINO's train loader leaves `drop_last`
//! at False); top-1 and top-5 on the test set after every epoch; the result is the best
//! top-1 over epochs. The features are used as given (no normalisation), as DINO's
//! linear evaluation does.
//!
//! Two modes, always reported with the result: [`ProbeMode::Fast`] trains on fixed
//! cached features (no augmentation; cheap, not the paper's protocol) and
//! [`ProbeMode::Augmented`] on features the caller extracts afresh each epoch from
//! random-resized-cropped and flipped train images (DINO's protocol).
//!
//! Ties: a prediction ranks classes by logit, the lower class first among equal logits.
//! Determinism: the order of batches comes from the seed (`crate::rng`), GEMMs never
//! split their inner dimension across threads and every reduction runs in a fixed order,
//! so a run gives the same numbers on any thread count.
//!
//! What this module must not do: touch the backbone, or normalise the features.

use rayon::prelude::*;
use serde::Serialize;

use crate::cpu::gemm;
use crate::error::{Error, Result};
use crate::eval::knn::check_features;
use crate::rng::{Purpose, Stream};

/// Test rows whose logits are computed at once when scoring (bounds that buffer).
const EVAL_BLOCK: usize = 4096;

/// Training settings of the probe; the defaults are DINO's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeConfig {
    /// Passes over the train set (DINO: 100).
    pub epochs: usize,
    /// Train rows per SGD step (DINO: 256 in total over its GPUs).
    pub batch: usize,
    /// Peak learning rate; `None` means DINO's linear scaling `0.001 * batch / 256`.
    pub lr: Option<f64>,
    /// SGD momentum (DINO: 0.9).
    pub momentum: f64,
    /// Seed of the weight init and of each epoch's shuffled order.
    pub seed: u64,
}

impl Default for ProbeConfig {
    /// DINO's recipe: 100 epochs, batch 256, lr 0.001 * 256 / 256, momentum 0.9, seed 0.
    fn default() -> Self {
        ProbeConfig {
            epochs: 100,
            batch: 256,
            lr: None,
            momentum: 0.9,
            seed: 0,
        }
    }
}

impl ProbeConfig {
    /// The peak learning rate: `lr` if given, else `0.001 * batch / 256`.
    pub fn base_lr(&self) -> f64 {
        self.lr.unwrap_or(0.001 * self.batch as f64 / 256.0)
    }
}

/// Which features a probe was trained on; reported with every result, since the two
/// give different numbers.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// Fixed cached features of the unaugmented train images.
    Fast,
    /// Each epoch's features of random-resized-cropped and flipped train images (DINO).
    Augmented,
}

/// What a probe run measured.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ProbeReport {
    /// The features it was trained on.
    pub mode: ProbeMode,
    /// The best test top-1 over epochs, in percent (DINO's reported number).
    pub best_top1: f64,
    /// The first epoch (0-based) that reached `best_top1`.
    pub best_epoch: usize,
    /// Per epoch: `(epoch (0-based), top-1, top-5)` on the test set, in percent (top-5 is
    /// 100 with 5 classes or fewer).
    pub epochs: Vec<(usize, f64, f64)>,
    /// The peak learning rate used.
    pub lr: f64,
}

/// Trains the probe on fixed `train` features (`(N, dim)` row-major, labels below
/// `classes`) and scores it on `test` after every epoch ([`ProbeMode::Fast`]).
///
/// Errors name the argument: shapes that do not divide by `dim`, label counts that do
/// not match, empty sets, a label `>= classes`, a non-finite feature, `epochs` or `batch`
/// of 0, an `lr` that is not positive, a `momentum` outside [0, 1).
pub fn fit_fast(
    train: &[f32],
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeReport> {
    check_config(cfg, classes)?;
    check_features("train", train, "train_labels", train_labels, dim, classes)?;
    fit(
        ProbeMode::Fast,
        Source::Fixed(train),
        train_labels,
        test,
        test_labels,
        dim,
        classes,
        cfg,
    )
}

/// Trains the probe on features the caller supplies per epoch ([`ProbeMode::Augmented`]):
/// `train_features(epoch)` (0-based) returns that epoch's `(N, dim)` features of the
/// augmented train images, row `i` for label `train_labels[i]` (pack order). Scores on
/// `test` after every epoch. Errors as [`fit_fast`], plus the closure's own errors and
/// a closure result of the wrong size or with a non-finite value.
pub fn fit_augmented(
    train_features: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeReport> {
    check_config(cfg, classes)?;
    // The labels are checked before the first (expensive) call of the closure.
    if train_labels.is_empty() {
        return Err(Error::bad_config(
            "train_labels",
            "is empty; pass one label per train image",
        ));
    }
    if let Some((i, &l)) = train_labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        return Err(Error::bad_config(
            "train_labels",
            format!(
                "label {l} of row {i} is not below classes = {classes}; pass the number \
                 of classes (largest label + 1) or fix the labels"
            ),
        ));
    }
    fit(
        ProbeMode::Augmented,
        Source::PerEpoch(train_features),
        train_labels,
        test,
        test_labels,
        dim,
        classes,
        cfg,
    )
}

/// Where an epoch's train features come from.
enum Source<'a> {
    /// The same features every epoch.
    Fixed(&'a [f32]),
    /// Fresh features per epoch from the caller.
    PerEpoch(&'a mut dyn FnMut(usize) -> Result<Vec<f32>>),
}

/// Checks the settings every mode shares.
fn check_config(cfg: &ProbeConfig, classes: usize) -> Result<()> {
    if classes == 0 {
        return Err(Error::bad_config(
            "classes",
            "is 0; pass the number of classes",
        ));
    }
    if cfg.epochs == 0 {
        return Err(Error::bad_config(
            "epochs",
            "is 0; train for at least one epoch (DINO: 100)",
        ));
    }
    if cfg.batch == 0 {
        return Err(Error::bad_config(
            "batch",
            "is 0; pass the rows per step (DINO: 256)",
        ));
    }
    if let Some(lr) = cfg.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::bad_config(
                "lr",
                format!("{lr} is not a positive number; leave it unset for 0.001 * batch / 256"),
            ));
        }
    }
    if !(cfg.momentum.is_finite() && (0.0..1.0).contains(&cfg.momentum)) {
        return Err(Error::bad_config(
            "momentum",
            format!("{} is not in [0, 1) (DINO: 0.9)", cfg.momentum),
        ));
    }
    Ok(())
}

/// The training loop shared by both modes (train labels and config already checked).
#[allow(clippy::too_many_arguments)]
fn fit(
    mode: ProbeMode,
    mut source: Source<'_>,
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeReport> {
    check_features("test", test, "test_labels", test_labels, dim, classes)?;
    let n = train_labels.len();
    let base_lr = cfg.base_lr();
    let mut w = init_weights(classes, dim, cfg.seed);
    let mut b = vec![0.0f32; classes];
    let (mut buf_w, mut buf_b) = (vec![0.0f32; w.len()], vec![0.0f32; classes]);
    let (mut gw, mut gb) = (vec![0.0f32; w.len()], vec![0.0f32; classes]);
    let mut xb = vec![0.0f32; cfg.batch.min(n) * dim];
    let mut yb = vec![0u16; cfg.batch.min(n)];
    let mut history = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        let owned;
        let x: &[f32] = match &mut source {
            Source::Fixed(x) => x,
            Source::PerEpoch(f) => {
                owned = f(epoch)?;
                let name = format!("train_features (epoch {epoch})");
                if owned.len() != n * dim {
                    return Err(Error::bad_config(
                        name,
                        format!(
                            "returned {} values; it must return {n} rows x {dim} (one row \
                             per train label, in pack order)",
                            owned.len()
                        ),
                    ));
                }
                check_features(&name, &owned, "train_labels", train_labels, dim, classes)?;
                &owned
            }
        };
        let lr = epoch_lr(base_lr, epoch, cfg.epochs) as f32;
        for rows in epoch_order(n, cfg.seed, epoch).chunks(cfg.batch) {
            let xb = &mut xb[..rows.len() * dim];
            let yb = &mut yb[..rows.len()];
            // Gather the batch: (B, D) rows in shuffled order.
            xb.par_chunks_mut(dim)
                .zip(rows.par_iter())
                .for_each(|(dst, &r)| dst.copy_from_slice(&x[r * dim..(r + 1) * dim]));
            for (y, &r) in yb.iter_mut().zip(rows) {
                *y = train_labels[r];
            }
            loss_and_grad(xb, yb, &w, &b, dim, classes, &mut gw, &mut gb);
            sgd_momentum_step(&mut w, &gw, &mut buf_w, lr, cfg.momentum as f32);
            sgd_momentum_step(&mut b, &gb, &mut buf_b, lr, cfg.momentum as f32);
        }
        let (top1, top5) = accuracy(test, test_labels, &w, &b, dim, classes);
        history.push((epoch, top1, top5));
    }
    // The first epoch with the highest top-1.
    let (best_epoch, best_top1) =
        history
            .iter()
            .fold((0, f64::NEG_INFINITY), |(be, bt), &(e, t1, _)| {
                if t1 > bt {
                    (e, t1)
                } else {
                    (be, bt)
                }
            });
    Ok(ProbeReport {
        mode,
        best_top1,
        best_epoch,
        epochs: history,
        lr: base_lr,
    })
}

/// The Linear layer's initial weight `(classes, dim)`: N(0, 0.01^2) from `seed`.
fn init_weights(classes: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut s = Stream::new(seed, [0, 0, 0], Purpose::Init);
    (0..classes * dim).map(|_| 0.01 * s.normal()).collect()
}

/// The order in which `epoch` visits the `n` train rows (Fisher-Yates from the seed).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut s = Stream::new(
        seed,
        [epoch as u32, (epoch >> 32) as u32, 0],
        Purpose::Shuffle,
    );
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = s.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// The learning rate of `epoch` (0-based) under PyTorch's `CosineAnnealingLR(T_max =
/// epochs, eta_min = 0)` stepped once per epoch: `base * (1 + cos(pi epoch / epochs)) / 2`.
pub(crate) fn epoch_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    base * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos())
}

/// One SGD step with momentum, PyTorch semantics without dampening or Nesterov:
/// `buf = momentum * buf + grad; param -= lr * buf` (`buf` starts at zero, so the first
/// step's `buf` is `grad`, as PyTorch's first step copies it).
pub(crate) fn sgd_momentum_step(
    params: &mut [f32],
    grads: &[f32],
    buf: &mut [f32],
    lr: f32,
    momentum: f32,
) {
    assert!(params.len() == grads.len() && params.len() == buf.len());
    for ((p, &g), v) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
        *v = momentum * *v + g;
        *p -= lr * *v;
    }
}

/// The logits `x W^T + b` of `rows` feature rows, overwriting `out`.
// x (R, D), w (C, D), b (C) -> out (R, C)
fn logits(x: &[f32], w: &[f32], b: &[f32], dim: usize, out: &mut [f32]) {
    let classes = b.len();
    let rows = x.len() / dim;
    gemm(
        rows,
        dim,
        classes,
        1.0,
        x,
        (dim, 1),
        w,
        (1, dim),
        0.0,
        out,
        (classes, 1),
    );
    out.par_chunks_mut(classes)
        .for_each(|row| row.iter_mut().zip(b).for_each(|(z, &bias)| *z += bias));
}

/// The mean cross-entropy of the Linear layer `(w, b)` on the batch `(x, labels)`, with
/// its gradients written to `gw` and `gb` (overwritten, not accumulated). Softmax and
/// loss per row in f64; rows summed in order.
// x (B, D), labels (B), w (C, D), b (C) -> loss, gw (C, D), gb (C)
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_and_grad(
    x: &[f32],
    labels: &[u16],
    w: &[f32],
    b: &[f32],
    dim: usize,
    classes: usize,
    gw: &mut [f32],
    gb: &mut [f32],
) -> f64 {
    let rows = labels.len();
    assert!(x.len() == rows * dim && w.len() == classes * dim && b.len() == classes);
    assert!(gw.len() == w.len() && gb.len() == classes && rows > 0);
    // dz = (softmax(z) - onehot) / B, in place of the logits.
    let mut dz = vec![0.0f32; rows * classes];
    logits(x, w, b, dim, &mut dz);
    let inv_b = 1.0 / rows as f64;
    let row_losses: Vec<f64> = dz
        .par_chunks_mut(classes)
        .zip(labels.par_iter())
        .map(|(z, &label)| {
            let label = usize::from(label);
            let max = z
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let sum: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            let lse = max + sum.ln();
            let loss = lse - f64::from(z[label]);
            for (c, v) in z.iter_mut().enumerate() {
                let p = (f64::from(*v) - lse).exp();
                let target = if c == label { 1.0 } else { 0.0 };
                *v = ((p - target) * inv_b) as f32;
            }
            loss
        })
        .collect();
    // (C, B) @ (B, D) -> (C, D): dz read transposed.
    gemm(
        classes,
        rows,
        dim,
        1.0,
        &dz,
        (1, classes),
        x,
        (dim, 1),
        0.0,
        gw,
        (dim, 1),
    );
    gb.fill(0.0);
    for row in dz.chunks_exact(classes) {
        gb.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
    }
    row_losses.iter().sum::<f64>() * inv_b
}

/// Top-1 and top-5 accuracy (percent) of the Linear layer on `(x, labels)`; classes rank
/// by logit, the lower class first among equals.
fn accuracy(
    x: &[f32],
    labels: &[u16],
    w: &[f32],
    b: &[f32],
    dim: usize,
    classes: usize,
) -> (f64, f64) {
    let mut z = vec![0.0f32; EVAL_BLOCK.min(labels.len()) * classes];
    let (mut top1, mut top5) = (0usize, 0usize);
    for (xs, ys) in x.chunks(EVAL_BLOCK * dim).zip(labels.chunks(EVAL_BLOCK)) {
        let z = &mut z[..ys.len() * classes];
        logits(xs, w, b, dim, z);
        let (h1, h5) = z
            .par_chunks(classes)
            .zip(ys.par_iter())
            .map(|(row, &label)| {
                let label = usize::from(label);
                let own = row[label];
                let rank = row
                    .iter()
                    .enumerate()
                    .filter(|&(c, &v)| v > own || (v == own && c < label))
                    .count();
                (usize::from(rank == 0), usize::from(rank < 5))
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        top1 += h1;
        top5 += h5;
    }
    let n = labels.len() as f64;
    (100.0 * top1 as f64 / n, 100.0 * top5 as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` points around `classes` centres (centre c is `sep` on axis c) with unit normal
    /// noise, labels uniform, from `seed`.
    fn blobs(n: usize, dim: usize, classes: usize, sep: f32, seed: u64) -> (Vec<f32>, Vec<u16>) {
        let mut s = Stream::new(seed, [7, 0, 0], Purpose::Noise);
        let labels: Vec<u16> = (0..n).map(|_| s.below(classes as u64) as u16).collect();
        let mut x: Vec<f32> = (0..n * dim).map(|_| s.normal()).collect();
        for (row, &l) in x.chunks_exact_mut(dim).zip(&labels) {
            row[usize::from(l)] += sep;
        }
        (x, labels)
    }

    fn cfg(epochs: usize, batch: usize, lr: f64) -> ProbeConfig {
        ProbeConfig {
            epochs,
            batch,
            lr: Some(lr),
            ..ProbeConfig::default()
        }
    }

    #[test]
    fn separable_blobs_are_learned() {
        let (dim, classes) = (16, 4);
        let (train, train_labels) = blobs(400, dim, classes, 8.0, 1);
        let (test, test_labels) = blobs(200, dim, classes, 8.0, 2);
        let r = fit_fast(
            &train,
            &train_labels,
            &test,
            &test_labels,
            dim,
            classes,
            &cfg(5, 32, 0.1),
        )
        .unwrap();
        assert_eq!(r.mode, ProbeMode::Fast);
        assert_eq!(r.epochs.len(), 5);
        assert!(r.best_top1 >= 99.0, "{r:?}");
        assert_eq!(r.epochs[r.best_epoch].1, r.best_top1);
        assert!(
            r.epochs.iter().all(|&(_, _, t5)| t5 == 100.0),
            "4 classes: top-5 is all"
        );
        assert_eq!(r.lr, 0.1);
    }

    #[test]
    fn the_last_partial_batch_is_trained_on() {
        // 40 rows and batch 64: with drop_last the probe would never take a step and
        // stay near chance (25%) with its N(0, 0.01^2) init.
        let (dim, classes) = (16, 4);
        let (train, train_labels) = blobs(40, dim, classes, 8.0, 3);
        let (test, test_labels) = blobs(200, dim, classes, 8.0, 4);
        let r = fit_fast(
            &train,
            &train_labels,
            &test,
            &test_labels,
            dim,
            classes,
            &cfg(20, 64, 0.5),
        )
        .unwrap();
        assert!(r.best_top1 >= 99.0, "{r:?}");
    }

    /// An independent mean cross-entropy of `x W^T + b`, everything in f64.
    fn reference_loss(x: &[f64], labels: &[u16], w: &[f64], b: &[f64], dim: usize) -> f64 {
        let classes = b.len();
        let mut total = 0.0;
        for (row, &label) in x.chunks_exact(dim).zip(labels) {
            let z: Vec<f64> = (0..classes)
                .map(|c| b[c] + (0..dim).map(|d| row[d] * w[c * dim + d]).sum::<f64>())
                .collect();
            let sum_exp: f64 = z.iter().map(|v| v.exp()).sum();
            total += sum_exp.ln() - z[usize::from(label)];
        }
        total / labels.len() as f64
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (rows, dim, classes) = (5, 6, 3);
        let mut s = Stream::new(9, [0, 0, 0], Purpose::Noise);
        let x: Vec<f32> = (0..rows * dim).map(|_| s.normal()).collect();
        let w: Vec<f32> = (0..classes * dim).map(|_| 0.5 * s.normal()).collect();
        let b: Vec<f32> = (0..classes).map(|_| 0.5 * s.normal()).collect();
        let labels = [0u16, 2, 1, 2, 0];
        let (mut gw, mut gb) = (vec![9.0f32; w.len()], vec![9.0f32; classes]);
        let loss = loss_and_grad(&x, &labels, &w, &b, dim, classes, &mut gw, &mut gb);
        let f64s = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
        let want = reference_loss(&x64, &labels, &w64, &b64, dim);
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        let h = 1e-6;
        for i in 0..w.len() {
            let (mut up, mut down) = (w64.clone(), w64.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (reference_loss(&x64, &labels, &up, &b64, dim)
                - reference_loss(&x64, &labels, &down, &b64, dim))
                / (2.0 * h);
            assert!(
                (f64::from(gw[i]) - fd).abs() < 1e-5,
                "w[{i}]: {} vs {fd}",
                gw[i]
            );
        }
        for i in 0..classes {
            let (mut up, mut down) = (b64.clone(), b64.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (reference_loss(&x64, &labels, &w64, &up, dim)
                - reference_loss(&x64, &labels, &w64, &down, dim))
                / (2.0 * h);
            assert!(
                (f64::from(gb[i]) - fd).abs() < 1e-5,
                "b[{i}]: {} vs {fd}",
                gb[i]
            );
        }
    }

    #[test]
    fn cosine_schedule_per_epoch() {
        // By hand: 0.1 * (1 + cos(pi e / 4)) / 2 for e = 0..4.
        let want = [0.1, 0.085_355_339_059, 0.05, 0.014_644_660_941];
        for (e, &v) in want.iter().enumerate() {
            assert!((epoch_lr(0.1, e, 4) - v).abs() < 1e-12, "epoch {e}");
        }
        // DINO's linear scaling of the default lr.
        assert_eq!(ProbeConfig::default().base_lr(), 0.001);
        let big = ProbeConfig {
            batch: 1024,
            ..ProbeConfig::default()
        };
        assert_eq!(big.base_lr(), 0.004);
        assert_eq!(cfg(1, 1024, 0.3).base_lr(), 0.3);
    }

    #[test]
    fn momentum_sgd_two_steps_by_hand() {
        // p = [1, -2], lr 0.1, m 0.9; g1 = [0.5, 1]: buf = g1, p = [0.95, -2.1];
        // g2 = [0.25, -1]: buf = 0.9 g1 + g2 = [0.7, -0.1], p = [0.88, -2.09].
        let (mut p, mut buf) = (vec![1.0f32, -2.0], vec![0.0f32; 2]);
        sgd_momentum_step(&mut p, &[0.5, 1.0], &mut buf, 0.1, 0.9);
        assert!(
            (p[0] - 0.95).abs() < 1e-6 && (p[1] + 2.1).abs() < 1e-6,
            "{p:?}"
        );
        sgd_momentum_step(&mut p, &[0.25, -1.0], &mut buf, 0.1, 0.9);
        assert!(
            (buf[0] - 0.7).abs() < 1e-6 && (buf[1] + 0.1).abs() < 1e-6,
            "{buf:?}"
        );
        assert!(
            (p[0] - 0.88).abs() < 1e-6 && (p[1] + 2.09).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn augmented_with_fixed_features_matches_fast() {
        let (dim, classes) = (12, 6);
        let (train, train_labels) = blobs(150, dim, classes, 1.5, 5);
        let (test, test_labels) = blobs(60, dim, classes, 1.5, 6);
        let c = cfg(4, 16, 0.05);
        let fast = fit_fast(&train, &train_labels, &test, &test_labels, dim, classes, &c).unwrap();
        let mut seen = Vec::new();
        let mut same = |e: usize| {
            seen.push(e);
            Ok(train.clone())
        };
        let aug = fit_augmented(
            &mut same,
            &train_labels,
            &test,
            &test_labels,
            dim,
            classes,
            &c,
        )
        .unwrap();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        assert_eq!(aug.mode, ProbeMode::Augmented);
        assert_eq!(
            (aug.epochs, aug.best_top1, aug.lr),
            (fast.epochs.clone(), fast.best_top1, fast.lr)
        );
        // Harder blobs than the separable test: not a trivial 100%.
        assert!(
            fast.best_top1 < 100.0 && fast.best_top1 > 100.0 / 6.0,
            "{fast:?}"
        );
    }

    #[test]
    fn bad_inputs_name_the_argument() {
        let (train, labels) = blobs(8, 4, 2, 3.0, 7);
        let ok = cfg(1, 4, 0.1);
        let field = |r: Result<ProbeReport>| match r {
            Err(Error::BadConfig { field, .. }) => field,
            other => panic!("expected a BadConfig error, got {other:?}"),
        };
        let fast = |tr: &[f32], trl: &[u16], te: &[f32], tel: &[u16], d, c, o: &ProbeConfig| {
            field(fit_fast(tr, trl, te, tel, d, c, o))
        };
        assert_eq!(fast(&train, &labels, &train, &labels, 3, 2, &ok), "train");
        assert_eq!(
            fast(&train, &labels[1..], &train, &labels, 4, 2, &ok),
            "train_labels"
        );
        assert_eq!(
            fast(&train, &labels, &train[1..], &labels, 4, 2, &ok),
            "test"
        );
        assert_eq!(fast(&train, &labels, &[], &[], 4, 2, &ok), "test");
        assert_eq!(
            fast(&train, &labels, &train, &labels, 4, 1, &ok),
            "train_labels"
        );
        assert_eq!(fast(&train, &labels, &train, &labels, 4, 0, &ok), "classes");
        assert_eq!(fast(&train, &labels, &train, &labels, 0, 2, &ok), "dim");
        let mut nan = train.clone();
        nan[5] = f32::NAN;
        assert_eq!(fast(&nan, &labels, &train, &labels, 4, 2, &ok), "train");
        for (o, name) in [
            (cfg(0, 4, 0.1), "epochs"),
            (cfg(1, 0, 0.1), "batch"),
            (cfg(1, 4, 0.0), "lr"),
            (cfg(1, 4, f64::NAN), "lr"),
            (
                ProbeConfig {
                    momentum: 1.0,
                    ..ok.clone()
                },
                "momentum",
            ),
        ] {
            assert_eq!(fast(&train, &labels, &train, &labels, 4, 2, &o), name);
        }
        // Augmented: a closure of the wrong size, a failing closure, labels checked
        // before the closure runs.
        let mut short = |_| Ok(vec![0.0f32; 4]);
        let r = fit_augmented(&mut short, &labels, &train, &labels, 4, 2, &ok);
        assert_eq!(field(r), "train_features (epoch 0)");
        let mut failing = |_| Err(Error::bad_config("views", "test failure"));
        let r = fit_augmented(&mut failing, &labels, &train, &labels, 4, 2, &ok);
        assert_eq!(field(r), "views");
        let mut never = |_| -> Result<Vec<f32>> { panic!("must not be called") };
        let r = fit_augmented(&mut never, &[], &train, &labels, 4, 2, &ok);
        assert_eq!(field(r), "train_labels");
        let r = fit_augmented(&mut never, &[0, 3], &train, &labels, 4, 2, &ok);
        assert_eq!(field(r), "train_labels");
    }
}
