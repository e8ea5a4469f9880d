//! DINO's weighted k-nearest-neighbour classifier (SPEC.md section 7).
//!
//! Features are L2-normalised; for each test feature the `k` most similar train
//! features by cosine similarity vote for their class with weight `exp(sim / T)`
//! (T = 0.07); the prediction is the class with the largest summed weight. Ties are
//! broken deterministically: among neighbours of equal similarity the lower train index
//! ranks first, and among classes of equal score the lower class index wins. The train
//! set is scanned in blocks, so memory stays at one block of similarities per thread
//! however large the train set is.

use rayon::prelude::*;

/// DINO's kNN temperature.
pub const KNN_TEMPERATURE: f32 = 0.07;

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

/// L2-normalises each `dim`-wide row in place (rows of norm 0 stay 0).
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim).for_each(|row| {
        let norm = row
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            let inv = (1.0 / norm) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

/// The class scores `sum exp(sim / t)` over the `k` nearest train rows of `query`
/// (features already normalised). Returns one score per class.
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

/// The `k` most similar train rows as `(similarity, index)`, best first; equal
/// similarities rank by lower index.
fn nearest(query: &[f32], train: &[f32], dim: usize, k: usize) -> Vec<(f32, usize)> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (idx, row) in train.chunks_exact(dim).enumerate() {
        let sim: f32 = query.iter().zip(row).map(|(a, b)| a * b).sum();
        if best.len() == k && sim <= best[k - 1].0 {
            continue;
        }
        // Insert after every entry with similarity >= sim (earlier index wins ties).
        let pos = best.partition_point(|&(s, _)| s >= sim);
        best.insert(pos, (sim, idx));
        best.truncate(k);
    }
    best
}

/// Weighted kNN accuracy of `test` against `train` for each `k` in `ks` (features are
/// normalised here; pass raw features). Parallel over test rows; deterministic.
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[u16],
    test: &[f32],
    test_labels: &[u16],
    dim: usize,
    ks: &[usize],
    classes: usize,
) -> Vec<KnnResult> {
    let mut train = train.to_vec();
    let mut test = test.to_vec();
    normalize_rows(&mut train, dim);
    normalize_rows(&mut test, dim);
    let kmax = ks
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .min(train_labels.len());
    // For every test row: its neighbours once (for the largest k), then each k's vote.
    let hits: Vec<Vec<(bool, bool)>> = test
        .par_chunks_exact(dim)
        .zip(test_labels.par_iter())
        .map(|(q, &label)| {
            let nb = nearest(q, &train, dim, kmax);
            ks.iter()
                .map(|&k| {
                    let scores = vote(
                        &nb[..k.min(nb.len())],
                        train_labels,
                        classes,
                        KNN_TEMPERATURE,
                    );
                    let mut order: Vec<usize> = (0..classes).collect();
                    // Highest score first; lower class index first among equals.
                    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                    let label = label as usize;
                    (order[0] == label, order.iter().take(5).any(|&c| c == label))
                })
                .collect()
        })
        .collect();
    let n = test_labels.len().max(1) as f64;
    ks.iter()
        .enumerate()
        .map(|(i, &k)| KnnResult {
            k,
            top1: 100.0 * hits.iter().filter(|h| h[i].0).count() as f64 / n,
            top5: 100.0 * hits.iter().filter(|h| h[i].1).count() as f64 / n,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let train = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        assert_eq!(nearest(&[1.0, 0.0], &train, 2, 1), vec![(1.0, 0)]);
        // Equal class scores: the lower class wins.
        let r = knn_accuracy(&train[..4], &[1, 0], &[1.0, 0.0], &[0], 2, &[2], 2);
        assert_eq!(r[0].top1, 100.0);
    }
}
