//! DINO's weighted k-nearest-neighbour classifier (SPEC.md section 7), exact and blocked.
//!
//! Features are L2-normalised; for each test feature the `k` most similar train
//! features by cosine similarity vote for their class with weight `exp(sim / T)`
//! (T = 0.07); the prediction is the class with the largest summed weight, and top-5
//! counts a hit when the true class is among the five best-scored classes.
//!
//! Tie rule (fixed, so results never depend on threads or block sizes): among
//! neighbours of equal similarity the lower train index ranks first, and among classes
//! of equal score the lower class index ranks first.
//!
//! How it scales: test rows are taken in blocks of [`TEST_BLOCK`], train rows in blocks
//! of [`KnnOptions::block_rows`]; each (test block, train block) pair of similarities is
//! one GEMM (`crate::cpu::gemm`, split among rayon's threads) into a buffer of the test block,
//! and a per-query running top-k list absorbs the block (queries in parallel) before the
//! next one is computed. Train rows are normalised a block at a time into a second
//! buffer, so besides the caller's features the memory is
//! `lanes x (TEST_BLOCK x block_rows + block_rows x dim + TEST_BLOCK x k)` numbers
//! (`lanes` = test blocks in flight, `rayon threads / 4` but at least 1; `block_rows`
//! rounded up to a multiple of [`TILE_ROWS`]), whatever the
//! size of the train set (1.28M ImageNet features included).
//!
//! Rounding: the GEMM sums each dot product in its own order (fused multiply-adds over
//! blocks of the feature axis), not in the plain left-to-right order of the scalar
//! [`class_scores`], so a similarity may differ from the scalar one in its last bits. The
//! tie rule applies to the similarities as computed; they do not depend on block sizes
//! or thread counts (the GEMM never splits the feature axis across threads, see
//! `crate::cpu`, and train blocks are whole tiles of [`TILE_ROWS`] rows, so each GEMM takes
//! the same path), so results are identical for every `block_rows`.
//!
//! What this module must not do: approximate (no index, no sampling), or hold more than
//! one block of similarities per test block in flight.

use rayon::prelude::*;

use crate::cpu::gemm;
use crate::error::{Error, Result};

/// DINO's kNN temperature.
pub const KNN_TEMPERATURE: f32 = 0.07;

/// Test rows per block: one GEMM computes this many queries against a train block.
/// 256 rows keep a block's similarities small (256 x 4096 f32 = 4 MiB); `cpu::gemm` splits
/// each product among the threads by blocks of train rows.
pub const TEST_BLOCK: usize = 256;

/// Test blocks run `rayon threads / GEMM_MAX_THREADS` at a time (at least one): each
/// block's GEMM is itself split among the threads by `crate::cpu::gemm`, so more blocks in
/// flight would only hold more memory; the queries of a
/// block absorb its similarities in parallel. On 2 cores (bench/results/2026-11-26-knn.md)
/// one block at a time and two at a time took the same CPU time and one at a time peaked
/// 34 MiB lower.
const GEMM_MAX_THREADS: usize = 4;

/// Train rows per block are a multiple of this (the last block padded with zero rows), so
/// that every similarity comes from a GEMM of at least this many columns and the `gemm`
/// crate sums every dot product the same way whatever `block_rows` is: with one column it
/// takes a matrix-vector path, and with at most 64 rows and columns a smaller blocking of
/// the feature axis (above 512 features), each of which can round differently.
const TILE_ROWS: usize = 128;

/// Inverse temperatures above this overflow `exp(sim / T)` in f64 (`exp(709.8)` is the
/// largest finite value).
const MAX_INV_TEMPERATURE: f64 = 700.0;

/// Accuracy of one kNN evaluation.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct KnnResult {
    /// Neighbours that voted.
    pub k: usize,
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent (100 when there are 5 classes or fewer).
    pub top5: f64,
}

/// Settings of [`knn_evaluate`]; the defaults are DINO's protocol.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KnnOptions {
    /// Numbers of neighbours to evaluate (each at least 1); the neighbours are found once,
    /// for the largest. A `k` larger than the train set uses every train row.
    pub ks: Vec<usize>,
    /// Temperature `T` of the vote weights `exp(sim / T)`.
    pub temperature: f32,
    /// Train rows per block (rounded up to a multiple of 128): bounds the memory per
    /// thread (see the module docs); it does not change the results.
    pub block_rows: usize,
}

impl Default for KnnOptions {
    /// DINO's protocol: k in {10, 20, 100, 200}, T = 0.07, train blocks of 4096 rows.
    fn default() -> Self {
        KnnOptions {
            ks: vec![10, 20, 100, 200],
            temperature: KNN_TEMPERATURE,
            block_rows: 4096,
        }
    }
}

/// L2-normalises each `dim`-wide row in place (rows of norm 0 stay 0).
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim).for_each(normalize_row);
}

/// L2-normalises one row in place; the norm is summed in f64 (a row of norm 0 stays 0).
fn normalize_row(row: &mut [f32]) {
    let norm = row
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The class scores `sum exp(sim / t)` over the `k` nearest train rows of `query`
/// (features already normalised). Returns one score per class.
///
/// This is the plain scalar reference for one query (dot products summed left to
/// right); [`knn_evaluate`] computes the same scores from GEMM similarities.
pub fn class_scores(
    query: &[f32],
    train: &[f32],
    train_labels: &[u16],
    dim: usize,
    k: usize,
    classes: usize,
    t: f32,
) -> Vec<f64> {
    vote(&nearest(query, train, dim, k), train_labels, classes, t)
}

/// Class scores from neighbours `(similarity, train index)`.
fn vote(neighbours: &[(f32, usize)], train_labels: &[u16], classes: usize, t: f32) -> Vec<f64> {
    let mut scores = vec![0.0f64; classes];
    for &(sim, idx) in neighbours {
        scores[train_labels[idx] as usize] += (f64::from(sim) / f64::from(t)).exp();
    }
    scores
}

/// Where `label` ranks among the classes by score, 0 = best: the number of classes that
/// score higher, or score the same and have a lower index (the tie rule).
fn label_rank(scores: &[f64], label: usize) -> usize {
    let own = scores[label];
    scores
        .iter()
        .enumerate()
        .filter(|&(c, &s)| s > own || (s == own && c < label))
        .count()
}

/// Absorbs one block of similarities (train rows `base..base + sims.len()`, in index
/// order) into the running list `best` of the `k` nearest, best first. A new row goes
/// after every entry of greater or equal similarity: rows arrive in index order, so the
/// lower index wins ties.
fn absorb(best: &mut Vec<(f32, usize)>, sims: &[f32], base: usize, k: usize) {
    // Once the list is full, its last similarity is the bar a new row must beat.
    let bar = |best: &[(f32, usize)]| {
        if best.len() == k {
            best[k - 1].0
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut worst = bar(best);
    for (j, &sim) in sims.iter().enumerate() {
        if sim <= worst && best.len() == k {
            continue;
        }
        let pos = best.partition_point(|&(s, _)| s >= sim);
        best.insert(pos, (sim, base + j));
        best.truncate(k);
        worst = bar(best);
    }
}

/// The `k` most similar train rows as `(similarity, index)`, best first; equal
/// similarities rank by lower index. Scalar dot products, one query.
fn nearest(query: &[f32], train: &[f32], dim: usize, k: usize) -> Vec<(f32, usize)> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (idx, row) in train.chunks_exact(dim).enumerate() {
        let sim: f32 = query.iter().zip(row).map(|(a, b)| a * b).sum();
        absorb(&mut best, &[sim], idx, k);
    }
    best
}

/// The `k` nearest train rows of every row of `queries` (raw features: both sides are
/// normalised here, a block at a time), best first, by GEMM over train blocks of
/// `train_block` rows. `k >= 1`.
// queries (Q, D), train (N, D) -> Q lists of min(k, N) (similarity, train index)
fn nearest_blocked(
    queries: &[f32],
    train: &[f32],
    dim: usize,
    k: usize,
    train_block: usize,
) -> Vec<Vec<(f32, usize)>> {
    assert!(
        k >= 1 && train_block >= 1 && dim >= 1,
        "nearest_blocked: bad sizes"
    );
    let nq = queries.len() / dim;
    let n_train = train.len() / dim;
    let block = train_block.min(n_train.max(1)).next_multiple_of(TILE_ROWS);
    let mut q = queries.to_vec();
    q.chunks_exact_mut(dim).for_each(normalize_row);
    let mut rows_buf = vec![0.0f32; block * dim];
    let mut sims_buf = vec![0.0f32; nq * block];
    let mut best: Vec<Vec<(f32, usize)>> = (0..nq)
        .map(|_| Vec::with_capacity(k.min(n_train) + 1))
        .collect();
    for (b, chunk) in train.chunks(block * dim).enumerate() {
        let rows = chunk.len() / dim;
        // A whole number of tiles: the padding rows are zeros, their similarities unread.
        let padded = rows.next_multiple_of(TILE_ROWS);
        let t = &mut rows_buf[..padded * dim];
        t[..rows * dim].copy_from_slice(chunk);
        t[rows * dim..].fill(0.0);
        t[..rows * dim]
            .chunks_exact_mut(dim)
            .for_each(normalize_row);
        let sims = &mut sims_buf[..nq * padded];
        // (Q, D) @ (D, padded) -> (Q, padded); the train block read transposed.
        gemm(
            nq,
            dim,
            padded,
            1.0,
            &q,
            (dim, 1),
            t,
            (1, dim),
            0.0,
            sims,
            (padded, 1),
        );
        best.par_iter_mut()
            .zip(sims.par_chunks_exact(padded))
            .for_each(|(list, row)| absorb(list, &row[..rows], b * block, k));
    }
    best
}

/// Checks one side of an evaluation: `x` is whole `dim`-wide rows, one label per row,
/// every label below `classes`, every value finite, at least one row. Returns the row
/// count. `name` and `labels_name` are the argument names the errors quote.
pub(crate) fn check_features(
    name: &str,
    x: &[f32],
    labels_name: &str,
    labels: &[u16],
    dim: usize,
    classes: usize,
) -> Result<usize> {
    if dim == 0 {
        return Err(Error::bad_config(
            "dim",
            "is 0; pass the width of one feature row",
        ));
    }
    if x.len() % dim != 0 {
        return Err(Error::bad_config(
            name,
            format!(
                "{} values do not divide into rows of dim = {dim}; pass features of \
                 shape (rows, {dim}) or the right dim",
                x.len()
            ),
        ));
    }
    let rows = x.len() / dim;
    if rows == 0 {
        return Err(Error::bad_config(
            name,
            "has no rows; pass at least one feature row",
        ));
    }
    if labels.len() != rows {
        return Err(Error::bad_config(
            labels_name,
            format!(
                "{} labels for {rows} rows of {name}; pass one label per row",
                labels.len()
            ),
        ));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        return Err(Error::bad_config(
            labels_name,
            format!(
                "label {l} of row {i} is not below classes = {classes}; pass the number \
                 of classes (largest label + 1) or fix the labels"
            ),
        ));
    }
    if let Some(pos) = x.par_iter().position_first(|v| !v.is_finite()) {
        return Err(Error::bad_config(
            name,
            format!(
                "row {} holds a non-finite value ({}); the model diverged or the \
                 feature file is corrupt",
                pos / dim,
                x[pos]
            ),
        ));
    }
    Ok(rows)
}

/// Weighted kNN accuracy of `test` against `train` (raw features, `dim` wide, row-major;
/// normalised here) for each `k` in `opts.ks`, with labels below `classes`. Exact;
/// parallel over blocks of test rows; deterministic (see the module docs for the tie
/// rule and rounding).
///
/// Errors name the argument: rows that do not divide by `dim`, a label count that does
/// not match the rows, an empty set, a label `>= classes`, a non-finite value, an empty
/// `ks` or a `k` of 0, a temperature that is not positive or overflows `exp(1 / T)`, a
/// `block_rows` of 0.
pub fn knn_evaluate(
    train: &[f32],
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    classes: usize,
    opts: &KnnOptions,
) -> Result<Vec<KnnResult>> {
    if classes == 0 {
        return Err(Error::bad_config(
            "classes",
            "is 0; pass the number of classes",
        ));
    }
    check_features("train", train, "train_labels", train_labels, dim, classes)?;
    check_features("test", test, "test_labels", test_labels, dim, classes)?;
    if opts.ks.is_empty() {
        return Err(Error::bad_config(
            "ks",
            "is empty; pass at least one k (DINO: 10, 20, 100, 200)",
        ));
    }
    if opts.ks.contains(&0) {
        return Err(Error::bad_config(
            "ks",
            format!("{:?} holds k = 0; every k must be at least 1", opts.ks),
        ));
    }
    let t = f64::from(opts.temperature);
    if !(t.is_finite() && t > 0.0 && 1.0 / t <= MAX_INV_TEMPERATURE) {
        return Err(Error::bad_config(
            "temperature",
            format!(
                "{} is not in [{:.5}, inf); exp(sim / T) must stay finite (DINO: 0.07)",
                opts.temperature,
                1.0 / MAX_INV_TEMPERATURE
            ),
        ));
    }
    if opts.block_rows == 0 {
        return Err(Error::bad_config(
            "block_rows",
            "is 0; pass the train rows per block (default 4096)",
        ));
    }
    Ok(evaluate_blocked(
        train,
        train_labels,
        test,
        test_labels,
        dim,
        classes,
        &opts.ks,
        opts.temperature,
        (TEST_BLOCK, opts.block_rows),
    ))
}

/// [`knn_evaluate`] on checked inputs, with both block sizes given: `(test rows, train
/// rows)` per block.
#[allow(clippy::too_many_arguments)]
fn evaluate_blocked(
    train: &[f32],
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    classes: usize,
    ks: &[usize],
    t: f32,
    (test_block, train_block): (usize, usize),
) -> Vec<KnnResult> {
    let kmax = ks.iter().copied().max().unwrap_or(1);
    // Per test block, per k: (top-1 hits, top-5 hits). Integer counts, so their sum does
    // not depend on the order blocks finish in.
    let zero = || vec![(0usize, 0usize); ks.len()];
    // Test blocks in `lanes` contiguous groups, the groups in parallel and the blocks of a
    // group in order (see GEMM_MAX_THREADS).
    let lanes = (rayon::current_num_threads() / GEMM_MAX_THREADS).max(1);
    let blocks = test_labels.len().div_ceil(test_block);
    let group = blocks.div_ceil(lanes) * test_block;
    let hits = test
        .par_chunks(group * dim)
        .zip(test_labels.par_chunks(group))
        .map(|(queries, labels)| {
            let mut hits = zero();
            for (queries, labels) in queries
                .chunks(test_block * dim)
                .zip(labels.chunks(test_block))
            {
                let lists = nearest_blocked(queries, train, dim, kmax, train_block);
                for (list, &label) in lists.iter().zip(labels) {
                    for (h, &k) in hits.iter_mut().zip(ks) {
                        let scores = vote(&list[..k.min(list.len())], train_labels, classes, t);
                        let rank = label_rank(&scores, usize::from(label));
                        h.0 += usize::from(rank == 0);
                        h.1 += usize::from(rank < 5);
                    }
                }
            }
            hits
        })
        .reduce(zero, |mut a, b| {
            a.iter_mut().zip(b).for_each(|(x, y)| {
                x.0 += y.0;
                x.1 += y.1;
            });
            a
        });
    let n = test_labels.len().max(1) as f64;
    ks.iter()
        .zip(hits)
        .map(|(&k, (top1, top5))| KnnResult {
            k,
            top1: 100.0 * top1 as f64 / n,
            top5: 100.0 * top5 as f64 / n,
        })
        .collect()
}

/// Weighted kNN accuracy with DINO's settings (T = 0.07, train blocks of 4096) for each
/// `k` in `ks`; the trainer's entry point, a thin wrapper over [`knn_evaluate`].
///
/// Features with a non-finite value (a diverged model) give NaN accuracies rather than an
/// error, so a training log shows the divergence.
///
/// # Panics
/// On inputs [`knn_evaluate`] rejects for any other reason (mismatched shapes or labels,
/// an empty set or `ks`, k = 0): the caller builds these itself, so that is a bug there.
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    ks: &[usize],
    classes: usize,
) -> Vec<KnnResult> {
    let finite = |x: &[f32]| x.par_iter().all(|v| v.is_finite());
    if !(finite(train) && finite(test)) {
        return ks
            .iter()
            .map(|&k| KnnResult {
                k,
                top1: f64::NAN,
                top5: f64::NAN,
            })
            .collect();
    }
    let opts = KnnOptions {
        ks: ks.to_vec(),
        ..KnnOptions::default()
    };
    match knn_evaluate(train, train_labels, test, test_labels, dim, classes, &opts) {
        Ok(r) => r,
        Err(e) => panic!("knn_accuracy: inconsistent inputs from the caller: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Stream};

    /// `n` rows of standard normal noise, `dim` wide, from `seed`.
    fn noise(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = Stream::new(seed, [0, 0, 0], Purpose::Noise);
        (0..n * dim).map(|_| s.normal()).collect()
    }

    /// Labels drawn uniformly below `classes`.
    fn random_labels(n: usize, classes: usize, seed: u64) -> Vec<u16> {
        let mut s = Stream::new(seed, [1, 0, 0], Purpose::Noise);
        (0..n).map(|_| s.below(classes as u64) as u16).collect()
    }

    /// `n` points around `classes` well-separated centres in `dim` dimensions (centre c
    /// is 10 on axis c, noise sd 0.3), label = centre.
    fn clusters(n: usize, dim: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u16>) {
        let mut x = noise(n, dim, seed);
        x.iter_mut().for_each(|v| *v *= 0.3);
        let labels = random_labels(n, classes, seed + 1);
        for (row, &l) in x.chunks_exact_mut(dim).zip(&labels) {
            row[usize::from(l)] += 10.0;
        }
        (x, labels)
    }

    fn opts(ks: &[usize], block_rows: usize) -> KnnOptions {
        KnnOptions {
            ks: ks.to_vec(),
            temperature: KNN_TEMPERATURE,
            block_rows,
        }
    }

    #[test]
    fn spec_known_answer() {
        // SPEC.md section 7: train (1,0)->0, (0.8,0.6)->1, (0.6,0.8)->1; test (1,0), k = 3.
        let train = [1.0, 0.0, 0.8, 0.6, 0.6, 0.8];
        let labels = [0u16, 1, 1];
        let s = class_scores(&[1.0, 0.0], &train, &labels, 2, 3, 2, 0.07);
        assert!((s[0] - 1_600_320.19).abs() < 0.5, "{s:?}");
        assert!((s[1] - 97_189.25).abs() < 0.5, "{s:?}");
        let r = knn_accuracy(&train, &labels, &[1.0, 0.0], &[0], 2, &[3], 2);
        assert_eq!(r[0].top1, 100.0);
        // With T = 1 class 1 wins: e^0.8 + e^0.6 = 4.048 > e^1 = 2.718.
        let s = class_scores(&[1.0, 0.0], &train, &labels, 2, 3, 2, 1.0);
        assert!(s[1] > s[0]);
        let t1 = KnnOptions {
            temperature: 1.0,
            ..opts(&[3], 2)
        };
        let r = knn_evaluate(&train, &labels, &[1.0, 0.0], &[0], 2, 2, &t1).unwrap();
        assert_eq!(r[0].top1, 0.0);
        let r = knn_evaluate(&train, &labels, &[1.0, 0.0], &[1], 2, 2, &t1).unwrap();
        assert_eq!(r[0].top1, 100.0);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let train = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        assert_eq!(nearest(&[1.0, 0.0], &train, 2, 1), vec![(1.0, 0)]);
        // The same through the blocked path, with the tie split across two blocks.
        for block in [1, 2, 3] {
            let nb = nearest_blocked(&[1.0, 0.0], &train, 2, 2, block);
            assert_eq!(nb, vec![vec![(1.0, 0), (1.0, 1)]], "block {block}");
        }
        // Equal class scores: the lower class wins.
        let r = knn_accuracy(&train[..4], &[1, 0], &[1.0, 0.0], &[0], 2, &[2], 2);
        assert_eq!(r[0].top1, 100.0);
        let r = knn_accuracy(&train[..4], &[1, 0], &[1.0, 0.0], &[1], 2, &[2], 2);
        assert_eq!(r[0].top1, 0.0);
        // k = 1 with identical rows of different classes: train row 0 (class 1) votes.
        let r = knn_accuracy(&train[..4], &[1, 0], &[1.0, 0.0], &[1], 2, &[1], 2);
        assert_eq!(r[0].top1, 100.0);
    }

    #[test]
    fn separable_clusters_are_always_right() {
        let (dim, classes) = (32, 5);
        let (train, train_labels) = clusters(500, dim, classes, 10);
        let (test, test_labels) = clusters(100, dim, classes, 20);
        let ks = [10, 20, 100, 200];
        let r = knn_evaluate(
            &train,
            &train_labels,
            &test,
            &test_labels,
            dim,
            classes,
            &KnnOptions::default(),
        )
        .unwrap();
        assert_eq!(r.len(), ks.len());
        for (res, &k) in r.iter().zip(&ks) {
            assert_eq!(res.k, k);
            assert_eq!(res.top1, 100.0, "{res:?}");
            assert_eq!(res.top5, 100.0, "{res:?}");
        }
    }

    #[test]
    fn invariant_to_feature_scale() {
        let (dim, classes) = (32, 5);
        let (train, train_labels) = clusters(500, dim, classes, 10);
        let (test, test_labels) = clusters(100, dim, classes, 20);
        // Random data too, where the accuracy is far from 100%.
        let (rtrain, rtest) = (noise(400, 16, 3), noise(120, 16, 4));
        let (rl_train, rl_test) = (random_labels(400, 7, 5), random_labels(120, 7, 6));
        let o = opts(&[1, 10, 20, 100, 200], 64);
        let scaled = |x: &[f32]| x.iter().map(|v| v * 3.7).collect::<Vec<f32>>();
        for (tr, trl, te, tel, d, c) in [
            (&train, &train_labels, &test, &test_labels, dim, classes),
            (&rtrain, &rl_train, &rtest, &rl_test, 16, 7),
        ] {
            let a = knn_evaluate(tr, trl, te, tel, d, c, &o).unwrap();
            let b = knn_evaluate(&scaled(tr), trl, &scaled(te), tel, d, c, &o).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn invariant_to_block_sizes_past_one_feature_block() {
        // 600 features: more than the GEMM's largest block of the feature axis (512), and
        // 30 queries, so a small train block would make a GEMM of at most 64 x 64.
        let dim = 600;
        let (train, test) = (noise(300, dim, 7), noise(30, dim, 8));
        let reference = nearest_blocked(&test, &train, dim, 50, 4096);
        for block in [1, 7, 64, 200] {
            assert_eq!(
                nearest_blocked(&test, &train, dim, 50, block),
                reference,
                "train block {block}"
            );
        }
    }

    #[test]
    fn invariant_to_block_sizes() {
        let (dim, classes) = (16, 7);
        let (train, test) = (noise(300, dim, 3), noise(40, dim, 4));
        let (train_labels, test_labels) = (random_labels(300, classes, 5), random_labels(40, 7, 6));
        let ks = [1, 5, 10, 20, 100, 200];
        // Neighbour lists bit for bit, including the similarities.
        let reference = nearest_blocked(&test, &train, dim, 200, 4096);
        for block in [1, 7, 64, 300, 4096] {
            assert_eq!(
                nearest_blocked(&test, &train, dim, 200, block),
                reference,
                "train block {block}"
            );
        }
        let want = evaluate_blocked(
            &train,
            &train_labels,
            &test,
            &test_labels,
            dim,
            classes,
            &ks,
            KNN_TEMPERATURE,
            (TEST_BLOCK, 4096),
        );
        assert!(want[0].top1 > 0.0 && want[0].top1 < 100.0, "{want:?}");
        for blocks in [(1, 1), (7, 7), (1, 4096), (256, 7), (13, 300)] {
            let got = evaluate_blocked(
                &train,
                &train_labels,
                &test,
                &test_labels,
                dim,
                classes,
                &ks,
                KNN_TEMPERATURE,
                blocks,
            );
            assert_eq!(got, want, "blocks {blocks:?}");
        }
        for block_rows in [1, 7, 4096] {
            let got = knn_evaluate(
                &train,
                &train_labels,
                &test,
                &test_labels,
                dim,
                classes,
                &opts(&ks, block_rows),
            )
            .unwrap();
            assert_eq!(got, want, "block_rows {block_rows}");
        }
    }

    /// A second implementation: every similarity in f64, a full sort (similarity
    /// descending, index ascending), f64 votes. Returns per query the classes in score
    /// order (score descending, class ascending) and the scores.
    fn naive(
        train: &[f32],
        train_labels: &[u16],
        query: &[f32],
        dim: usize,
        k: usize,
        classes: usize,
    ) -> (Vec<usize>, Vec<f64>) {
        let unit = |r: &[f32]| {
            let n = r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            r.iter().map(|v| f64::from(*v) / n).collect::<Vec<f64>>()
        };
        let q = unit(query);
        let mut sims: Vec<(f64, usize)> = train
            .chunks_exact(dim)
            .map(|r| unit(r).iter().zip(&q).map(|(a, b)| a * b).sum::<f64>())
            .zip(0..)
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut scores = vec![0.0f64; classes];
        for &(s, i) in &sims[..k] {
            scores[usize::from(train_labels[i])] += (s / 0.07).exp();
        }
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        (order, scores)
    }

    #[test]
    fn agrees_with_a_naive_f64_implementation() {
        let (dim, classes, n_train, n_test) = (24, 10, 600, 80);
        let (train, test) = (noise(n_train, dim, 30), noise(n_test, dim, 31));
        let (train_labels, test_labels) = (
            random_labels(n_train, classes, 32),
            random_labels(n_test, classes, 33),
        );
        let ks = [1, 3, 10, 20, 100, 200];
        let o = opts(&ks, 97);
        let mut skipped = 0;
        for (q, &label) in test.chunks_exact(dim).zip(&test_labels) {
            // This query alone: 100 or 0 per k.
            let got = knn_evaluate(&train, &train_labels, q, &[label], dim, classes, &o).unwrap();
            for (res, &k) in got.iter().zip(&ks) {
                let (order, scores) = naive(&train, &train_labels, q, dim, k, classes);
                // f32 GEMM vs f64 similarities: each weight exp(s / 0.07) may differ by a
                // relative ~1e-6, so a class order decided by less than 1e-5 is left out.
                let close = order.windows(2).take(5).any(|w| {
                    let (a, b) = (scores[w[0]], scores[w[1]]);
                    a != b && a - b < 1e-5 * a
                });
                if close {
                    skipped += 1;
                    continue;
                }
                let label = usize::from(label);
                let hit = |h: bool| if h { 100.0 } else { 0.0 };
                assert_eq!(res.top1, hit(order[0] == label), "k {k}");
                assert_eq!(res.top5, hit(order[..5].contains(&label)), "k {k}");
            }
        }
        assert!(skipped <= n_test * ks.len() / 50, "{skipped} near ties");
        // And the neighbour lists themselves: same indices, similarities to 1e-6.
        let lists = nearest_blocked(&test, &train, dim, 50, 97);
        let kth = |q: &[f32], i: usize| {
            let qn = q.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let r = &train[i * dim..(i + 1) * dim];
            let rn = r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            q.iter()
                .zip(r)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                / (qn * rn)
        };
        for (q, list) in test.chunks_exact(dim).zip(&lists) {
            let mut all: Vec<(f64, usize)> = (0..n_train).map(|i| (kth(q, i), i)).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (&(s, i), &(s64, i64)) in list.iter().zip(&all) {
                assert_eq!(i, i64);
                assert!((f64::from(s) - s64).abs() < 1e-6, "{s} vs {s64}");
            }
        }
    }

    #[test]
    fn top5_counts_the_fifth_class_but_not_the_sixth() {
        // One train row per class 0..7 at decreasing similarity to the query (1, 0):
        // class c at angle c * 0.1 rad, so class order by score is 0, 1, 2, ..., 6.
        let classes = 7;
        let train: Vec<f32> = (0..classes)
            .flat_map(|c| {
                let a = c as f32 * 0.1;
                [a.cos(), a.sin()]
            })
            .collect();
        let labels: Vec<u16> = (0..classes as u16).collect();
        let q = [1.0, 0.0];
        let o = opts(&[7], 4096);
        for (label, top1, top5) in [(0u16, 100.0, 100.0), (4, 0.0, 100.0), (5, 0.0, 0.0)] {
            let r = knn_evaluate(&train, &labels, &q, &[label], 2, classes, &o).unwrap();
            assert_eq!((r[0].top1, r[0].top5), (top1, top5), "label {label}");
        }
        // Classes without neighbours score 0 and rank by index: with k = 2 the order is
        // 0, 1, then 2, 3, 4 (score 0), so class 4 is in the top 5 and class 5 is not.
        let o = opts(&[2], 4096);
        let r = knn_evaluate(&train, &labels, &q, &[4], 2, classes, &o).unwrap();
        assert_eq!(r[0].top5, 100.0);
        let r = knn_evaluate(&train, &labels, &q, &[5], 2, classes, &o).unwrap();
        assert_eq!(r[0].top5, 0.0);
    }

    #[test]
    fn k_beyond_the_train_set_uses_every_row() {
        let train = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        let labels = [0u16, 1, 1];
        // k = 50 > 3: every row votes; class 1 gets 2 e^0 = 2 < e^(1/0.07).
        let r = knn_evaluate(&train, &labels, &[1.0, 0.0], &[0], 2, 2, &opts(&[50], 2)).unwrap();
        assert_eq!(
            r[0],
            KnnResult {
                k: 50,
                top1: 100.0,
                top5: 100.0
            }
        );
    }

    #[test]
    fn bad_inputs_name_the_argument() {
        let train = [1.0, 0.0, 0.0, 1.0];
        let labels = [0u16, 1];
        let test = [1.0, 0.0];
        let ok = KnnOptions::default();
        let field = |r: Result<Vec<KnnResult>>| match r {
            Err(Error::BadConfig { field, .. }) => field,
            other => panic!("expected a BadConfig error, got {other:?}"),
        };
        let run = |tr: &[f32], trl: &[u16], te: &[f32], tel: &[u16], d, c, o: &KnnOptions| {
            field(knn_evaluate(tr, trl, te, tel, d, c, o))
        };
        assert_eq!(run(&train, &labels, &test, &[0], 3, 2, &ok), "train");
        assert_eq!(
            run(&train, &labels, &[1.0, 0.0, 0.0], &[0], 2, 2, &ok),
            "test"
        );
        assert_eq!(run(&train, &labels, &test, &[0], 0, 2, &ok), "dim");
        assert_eq!(run(&train, &[0], &test, &[0], 2, 2, &ok), "train_labels");
        assert_eq!(
            run(&train, &labels, &test, &[0, 1], 2, 2, &ok),
            "test_labels"
        );
        assert_eq!(run(&[], &[], &test, &[0], 2, 2, &ok), "train");
        assert_eq!(run(&train, &labels, &[], &[], 2, 2, &ok), "test");
        assert_eq!(run(&train, &[0, 2], &test, &[0], 2, 2, &ok), "train_labels");
        assert_eq!(run(&train, &labels, &test, &[5], 2, 2, &ok), "test_labels");
        assert_eq!(run(&train, &labels, &test, &[0], 2, 0, &ok), "classes");
        assert_eq!(
            run(&[f32::NAN, 0.0, 0.0, 1.0], &labels, &test, &[0], 2, 2, &ok),
            "train"
        );
        assert_eq!(run(&train, &labels, &test, &[0], 2, 2, &opts(&[], 8)), "ks");
        assert_eq!(
            run(&train, &labels, &test, &[0], 2, 2, &opts(&[10, 0], 8)),
            "ks"
        );
        assert_eq!(
            run(&train, &labels, &test, &[0], 2, 2, &opts(&[1], 0)),
            "block_rows"
        );
        for t in [0.0, -0.07, 1e-4, f32::NAN, f32::INFINITY] {
            let o = KnnOptions {
                temperature: t,
                ..KnnOptions::default()
            };
            assert_eq!(run(&train, &labels, &test, &[0], 2, 2, &o), "temperature");
        }
        // The trainer's wrapper reports a diverged model as NaN instead of failing.
        let r = knn_accuracy(&[f32::NAN, 0.0, 0.0, 1.0], &labels, &test, &[0], 2, &[1], 2);
        assert!(r[0].top1.is_nan() && r[0].top5.is_nan());
    }
}
