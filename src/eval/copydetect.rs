//! Copy detection as DINO evaluates it on Copydays "strong" (SPEC.md section 7):
//! GeM pooling of patch tokens, PCA whitening learned on a separate image set, cosine
//! top-20 search, trapezoid AP per query, mAP overall and per query block; plus the
//! ground-truth format of the copy benchmarks this engine builds.
//!
//! Pure functions on feature matrices (row-major f32, one row per image). Nothing here
//! reads images or runs a network: `features` extracts, the CLI wires the steps.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::ap::average_precision;
use crate::eval::knn::normalize_rows;
use crate::eval::retrieval::{map_similarity_rows, rows_of, MAX_QUERY_BLOCK};

/// DINO's GeM exponent for copy detection.
pub const GEM_P: f32 = 4.0;
/// DINO's GeM clamp: tokens below it count as it (keeps `x^(1/p)` real).
pub const GEM_EPS: f32 = 1e-6;
/// Results kept per query (DINO: `similarity.topk(20)`).
pub const TOP: usize = 20;
/// Whitening eigenvalues below `EIGEN_FLOOR * max` are raised to it (DINO's `PCA`).
pub const EIGEN_FLOOR: f64 = 1e-5;

/// Generalised-mean pooling of one image's patch tokens over the token axis:
/// `out[d] = (mean_t max(x[t, d], eps)^p)^(1/p)`. `tokens` is `(n_tokens, dim)`
/// row-major; the result has `dim` values. p = 1 is the mean of the clamped tokens,
/// p -> infinity the max. Accumulates in f64. Constant tokens `c >= eps` give `c`;
/// one token at 1 and three at 0 give `(1/4)^(1/4) = 0.7071` for p = 4.
///
/// Panics when the shapes disagree, `n_tokens` is 0, or `p` is not a positive finite
/// number: callers check user-set exponents with [`check_gem_p`].
pub fn gem(tokens: &[f32], n_tokens: usize, dim: usize, p: f32, eps: f32) -> Vec<f32> {
    assert_eq!(
        tokens.len(),
        n_tokens * dim,
        "gem: tokens must be (n_tokens, dim)"
    );
    assert!(n_tokens > 0, "gem: no tokens to pool");
    assert!(
        p.is_finite() && p > 0.0,
        "gem: p must be positive and finite"
    );
    let p = f64::from(p);
    let mut acc = vec![0.0f64; dim];
    for token in tokens.chunks_exact(dim) {
        for (a, &x) in acc.iter_mut().zip(token) {
            *a += f64::from(x.max(eps)).powf(p);
        }
    }
    acc.iter()
        .map(|a| (a / n_tokens as f64).powf(1.0 / p) as f32)
        .collect()
}

/// Checks a user-set GeM exponent (`field` names the flag): it must be positive and finite.
pub fn check_gem_p(p: f32, field: &str) -> Result<()> {
    if p.is_finite() && p > 0.0 {
        Ok(())
    } else {
        Err(Error::bad_config(
            field,
            format!(
                "GeM exponent {p} is not a positive number; use 4 (DINO's copy detection) or 3"
            ),
        ))
    }
}

/// PCA whitening learned on a separate image set, exactly as DINO's
/// `eval_copy_detection.py` does it.
///
/// Learning: the mean `mu` of the training features is kept; the covariance is
/// `C = X^T X / N` of the training features `X` as they are, *not* centred (DINO
/// subtracts the mean from the database and the queries, but computes `torch.mm(f.T, f)`
/// on the uncentred whitening features; SPEC.md's "subtract the mean, covariance of the
/// uncentred features" describes the same thing, and this follows it). `C = V diag(l) V^T`;
/// eigenvalues below `1e-5 * max(l)` are raised to it; `P = diag(l^-1/2) V^T`, rows in
/// decreasing eigenvalue order, no dimension dropped.
///
/// Applying: `project(x) = P (x - mu)`, then `apply` L2-normalises each row.
///
/// Consequence of the uncentred covariance: on the training set `P x` has second moment
/// `I` (for unfloored eigenvalues), while `P (x - mu)` has covariance `I - P mu mu^T P^T`;
/// the two agree when the training mean is 0.
#[derive(Clone, Debug)]
pub struct Whitening {
    /// Feature dimension.
    dim: usize,
    /// Training mean, subtracted before projecting. (dim)
    mean: Vec<f32>,
    /// `P`, row-major (dim, dim): row i is `v_i / sqrt(l_i)`.
    projection: Vec<f32>,
    /// Eigenvalues after the floor, decreasing. (dim)
    eigenvalues: Vec<f64>,
    /// How many eigenvalues the floor raised.
    floored: usize,
}

impl Whitening {
    /// Learns the whitening from `feats`, `(N, dim)` row-major, `N >= 2`.
    ///
    /// Cost: the covariance is one f32 GEMM (`N dim^2`); the eigen-decomposition is the
    /// cyclic Jacobi method in f64 ([`symmetric_eigen`]), single-threaded and `O(dim^3)`
    /// per sweep: measured on the 2-core AMD EPYC dev machine (release build, random
    /// symmetric matrix) 2.1 s for dim 384 and 26 s for dim 768 (ViT-S CLS + GeM);
    /// expect several minutes for 1536 (ViT-B).
    pub fn learn(feats: &[f32], dim: usize) -> Result<Whitening> {
        const FIELD: &str = "whitening features";
        let n = rows_of(feats, dim, FIELD)?;
        if n < 2 {
            return Err(Error::bad_config(
                FIELD,
                format!("{n} image(s) cannot give a covariance; learn the whitening on many images (DINO: 20,000)"),
            ));
        }
        let mut mean = vec![0.0f64; dim];
        for row in feats.chunks_exact(dim) {
            mean.iter_mut()
                .zip(row)
                .for_each(|(m, &x)| *m += f64::from(x));
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();

        // (dim, N) @ (N, dim) -> (dim, dim): X^T X of the uncentred features, in f32 as DINO.
        let mut cov32 = vec![0.0f32; dim * dim];
        crate::cpu::gemm(
            dim,
            n,
            dim,
            1.0 / n as f32,
            feats,
            (1, dim),
            feats,
            (dim, 1),
            0.0,
            &mut cov32,
            (dim, 1),
        );
        let mut cov = vec![0.0f64; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                cov[i * dim + j] =
                    0.5 * (f64::from(cov32[i * dim + j]) + f64::from(cov32[j * dim + i]));
            }
        }
        let (mut eigenvalues, vectors) = symmetric_eigen(&cov, dim);
        let max = eigenvalues.first().copied().unwrap_or(0.0);
        if !(max > 0.0 && max.is_finite()) {
            return Err(Error::bad_config(
                FIELD,
                "are all zero (the covariance has no positive eigenvalue); extract features from real images",
            ));
        }
        let floor = EIGEN_FLOOR * max;
        let mut floored = 0;
        for l in eigenvalues.iter_mut().filter(|l| **l < floor) {
            *l = floor;
            floored += 1;
        }
        let mut projection = vec![0.0f32; dim * dim];
        for (i, l) in eigenvalues.iter().enumerate() {
            let scale = 1.0 / l.sqrt();
            for j in 0..dim {
                projection[i * dim + j] = (vectors[i * dim + j] * scale) as f32;
            }
        }
        Ok(Whitening {
            dim,
            mean,
            projection,
            eigenvalues,
            floored,
        })
    }

    /// Feature dimension the whitening was learned for (input and output).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The training mean subtracted before projecting.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Eigenvalues of the training covariance after the floor, decreasing.
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }

    /// How many eigenvalues were below `1e-5 * max` and raised to it.
    pub fn floored(&self) -> usize {
        self.floored
    }

    /// `P (x - mu)` for each `dim`-wide row of `feats`, not normalised.
    /// Panics when `feats` is not a whole number of rows: see [`Whitening::try_apply`].
    pub fn project(&self, feats: &[f32]) -> Vec<f32> {
        let dim = self.dim;
        assert_eq!(
            feats.len() % dim,
            0,
            "Whitening::project: rows of {dim} expected"
        );
        let rows = feats.len() / dim;
        let mut centred = feats.to_vec();
        for row in centred.chunks_exact_mut(dim) {
            row.iter_mut().zip(&self.mean).for_each(|(x, m)| *x -= m);
        }
        // (rows, dim) @ P^T (dim, dim) -> (rows, dim)
        let mut out = vec![0.0f32; rows * dim];
        crate::cpu::gemm(
            rows,
            dim,
            dim,
            1.0,
            &centred,
            (dim, 1),
            &self.projection,
            (1, dim),
            0.0,
            &mut out,
            (dim, 1),
        );
        out
    }

    /// Whitened, L2-normalised rows: [`Whitening::project`] then unit length, as DINO
    /// does before the cosine search. Panics on a partial row: see
    /// [`Whitening::try_apply`].
    pub fn apply(&self, feats: &[f32]) -> Vec<f32> {
        let mut out = self.project(feats);
        normalize_rows(&mut out, self.dim);
        out
    }

    /// [`Whitening::apply`] on user-supplied features: an error naming `what` when their
    /// dimension is not the whitening's or a value is not finite.
    pub fn try_apply(&self, feats: &[f32], what: &str) -> Result<Vec<f32>> {
        rows_of(feats, self.dim, what).map_err(|_| {
            Error::bad_config(
                what,
                format!(
                    "do not fit the whitening: {} values are not whole finite rows of dimension {}; \
                     learn the whitening on features of the same model and pooling",
                    feats.len(),
                    self.dim
                ),
            )
        })?;
        Ok(self.apply(feats))
    }
}

/// Most Jacobi sweeps before giving up (convergence is quadratic: 6 to 10 in practice).
const MAX_SWEEPS: usize = 100;

/// Eigen-decomposition of the symmetric `(n, n)` row-major matrix `a` by the cyclic
/// Jacobi method. Returns `(eigenvalues, vectors)`: eigenvalues in decreasing order and
/// `vectors` row-major `(n, n)` with row `i` the unit eigenvector of eigenvalue `i`, so
/// `a = vectors^T diag(eigenvalues) vectors`.
///
/// Each rotation zeroes one off-diagonal pair, sweeping all `n (n - 1) / 2` pairs in
/// order until the off-diagonal mass is below `1e-13` of the matrix norm. A rotation
/// reads two rows and writes two rows and two columns of `a` (using symmetry) and two rows
/// of `vectors`: about `5 n^3` flops per sweep. Only the upper triangle's symmetry is
/// assumed; `a` must be symmetric (a programming error otherwise).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "symmetric_eigen: a must be (n, n)");
    let mut a = a.to_vec();
    let mut vt = vec![0.0f64; n * n];
    for i in 0..n {
        vt[i * n + i] = 1.0;
    }
    let mut row_p = vec![0.0f64; n];
    let mut row_q = vec![0.0f64; n];
    for _sweep in 0..MAX_SWEEPS {
        let off: f64 = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        if off == 0.0 || off <= 1e-26 * (2.0 * off + diag) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                // Rutishauser's stable rotation: theta = cot(2 phi), t = tan(phi) (the
                // smaller root), so that the rotated a_pq is 0.
                let theta = (aqq - app) / (2.0 * apq);
                let t = if theta.abs() > 1e150 {
                    0.5 / theta
                } else {
                    let sign = if theta < 0.0 { -1.0 } else { 1.0 };
                    sign / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // Rows p and q of J^T A (J = rotation by phi in the (p, q) plane).
                row_p.copy_from_slice(&a[p * n..(p + 1) * n]);
                row_q.copy_from_slice(&a[q * n..(q + 1) * n]);
                for k in 0..n {
                    let (x, y) = (row_p[k], row_q[k]);
                    a[p * n + k] = c * x - s * y;
                    a[q * n + k] = s * x + c * y;
                }
                // J^T A J: columns p, q equal the new rows p, q by symmetry, except the
                // 2x2 block, which has a closed form.
                for k in 0..n {
                    a[k * n + p] = a[p * n + k];
                    a[k * n + q] = a[q * n + k];
                }
                a[p * n + p] = app - t * apq;
                a[q * n + q] = aqq + t * apq;
                a[p * n + q] = 0.0;
                a[q * n + p] = 0.0;
                // V <- V J, stored transposed: rows p and q of V^T.
                for k in 0..n {
                    let (x, y) = (vt[p * n + k], vt[q * n + k]);
                    vt[p * n + k] = c * x - s * y;
                    vt[q * n + k] = s * x + c * y;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]).then(i.cmp(&j)));
    let eigenvalues = order.iter().map(|&i| a[i * n + i]).collect();
    let vectors = order
        .iter()
        .flat_map(|&i| vt[i * n..(i + 1) * n].iter().copied())
        .collect();
    (eigenvalues, vectors)
}

/// One copy-detection query: an edited image and the database images it was made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyQuery {
    /// Image path, relative to the ground-truth file's folder.
    pub image: String,
    /// Indices into `db` of the originals this query is a copy of (at least one).
    pub positives: Vec<usize>,
    /// Name of the edit family, for per-block mAP ("jpeg", "crop", "strong", ...).
    pub block: String,
}

/// Ground truth of a copy-detection benchmark (the JSON the benchmark builder writes):
/// `{"db": [...], "queries": [{"image", "positives", "block"}], "whitening": [...]}`,
/// every path relative to the JSON file's folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyGroundTruth {
    /// Database images: originals and distractors, in database-feature-row order.
    pub db: Vec<String>,
    /// Queries, in query-feature-row order.
    pub queries: Vec<CopyQuery>,
    /// Images the whitening is learned on, disjoint from `db` and `queries`.
    #[serde(default)]
    pub whitening: Vec<String>,
}

impl CopyGroundTruth {
    /// Reads the JSON ground truth at `path` (not yet checked against features: call
    /// [`CopyGroundTruth::validate_file`]).
    pub fn load(path: &Path) -> Result<CopyGroundTruth> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::bad_file(
                path,
                format!(
                    "not copy-detection ground truth ({e}); expected {{\"db\": [paths], \
                     \"queries\": [{{\"image\": path, \"positives\": [db indices], \"block\": name}}], \
                     \"whitening\": [paths]}}"
                ),
            )
        })
    }

    /// `relative` (a path from the ground truth) resolved against the folder of the
    /// ground-truth file `gt_path`.
    pub fn resolve(gt_path: &Path, relative: &str) -> PathBuf {
        gt_path
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .join(relative)
    }

    /// The database image paths, resolved against `gt_path`'s folder.
    pub fn db_paths(&self, gt_path: &Path) -> Vec<PathBuf> {
        self.db.iter().map(|p| Self::resolve(gt_path, p)).collect()
    }

    /// The query image paths, resolved against `gt_path`'s folder.
    pub fn query_paths(&self, gt_path: &Path) -> Vec<PathBuf> {
        self.queries
            .iter()
            .map(|q| Self::resolve(gt_path, &q.image))
            .collect()
    }

    /// The whitening image paths, resolved against `gt_path`'s folder.
    pub fn whitening_paths(&self, gt_path: &Path) -> Vec<PathBuf> {
        self.whitening
            .iter()
            .map(|p| Self::resolve(gt_path, p))
            .collect()
    }

    /// Checks the ground truth against itself and against `db_rows` database and
    /// `query_rows` query feature rows; errors name the field (`queries[3].positives[0]`).
    /// Prefer [`CopyGroundTruth::validate_file`] when the file is known.
    pub fn validate(&self, db_rows: usize, query_rows: usize) -> Result<()> {
        self.check(db_rows, query_rows)
            .map_err(|(field, reason)| Error::bad_config(field, reason))
    }

    /// [`CopyGroundTruth::validate`], with errors naming the file `path` and the field.
    pub fn validate_file(&self, path: &Path, db_rows: usize, query_rows: usize) -> Result<()> {
        self.check(db_rows, query_rows)
            .map_err(|(field, reason)| Error::bad_file(path, format!("{field}: {reason}")))
    }

    /// The checks of `validate`: `Err((field, reason))`.
    fn check(
        &self,
        db_rows: usize,
        query_rows: usize,
    ) -> std::result::Result<(), (String, String)> {
        let n = self.db.len();
        if n == 0 {
            return Err((
                "db".into(),
                "is empty: there is nothing to search; list the originals and distractors".into(),
            ));
        }
        if self.queries.is_empty() {
            return Err((
                "queries".into(),
                "is empty: there are no queries to evaluate; list the edited copies".into(),
            ));
        }
        for (i, q) in self.queries.iter().enumerate() {
            if q.positives.is_empty() {
                return Err((
                    format!("queries[{i}].positives"),
                    "is empty: a copy query needs the index of its original in db".into(),
                ));
            }
            for (j, &p) in q.positives.iter().enumerate() {
                if p >= n {
                    return Err((
                        format!("queries[{i}].positives[{j}]"),
                        format!(
                            "index {p} is out of range: db has {n} images (indices 0..{})",
                            n - 1
                        ),
                    ));
                }
                if q.positives[..j].contains(&p) {
                    return Err((
                        format!("queries[{i}].positives[{j}]"),
                        format!("repeats index {p}; list each original once"),
                    ));
                }
            }
            if q.block.is_empty() {
                return Err((
                    format!("queries[{i}].block"),
                    "is empty; name the edit family (jpeg, crop, ...)".into(),
                ));
            }
        }
        if db_rows != n {
            return Err((
                "database features".into(),
                format!("have {db_rows} rows but db lists {n} images; extract features for exactly the images of db, in its order"),
            ));
        }
        if query_rows != self.queries.len() {
            return Err((
                "query features".into(),
                format!(
                    "have {query_rows} rows but queries lists {}; extract features for exactly the query images, in their order",
                    self.queries.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The result of one copy-detection evaluation. mAPs are fractions in [0, 1].
#[derive(Serialize, Debug, Clone)]
pub struct CopyReport {
    /// Mean AP over all queries.
    pub map: f64,
    /// `(block, mAP, queries)` per query block, in order of first appearance.
    pub blocks: Vec<(String, f64, usize)>,
    /// Results kept per query.
    pub top: usize,
}

/// Scores copy detection: each query's `top` nearest database rows by cosine similarity
/// (descending; equal similarities rank by lower database index) and the trapezoid AP of
/// the positives found among them, with `n_positives` = all of the query's positives, so
/// a positive outside the top list counts as a miss. This is what DINO's Copydays code
/// does (`score_ap_from_ranks_1` over the `topk(20)` list with `nres = len(positives)`);
/// mAP is the plain mean over queries, overall and per block.
///
/// `db` is `(gt.db.len(), dim)` and `queries` `(gt.queries.len(), dim)`, already
/// whitened by the caller ([`Whitening::apply`]); rows are L2-normalised again here
/// (a no-op on whitened rows), so unwhitened features are scored by plain cosine.
pub fn evaluate(
    db: &[f32],
    queries: &[f32],
    dim: usize,
    gt: &CopyGroundTruth,
    top: usize,
) -> Result<CopyReport> {
    let (db_rows, query_rows) = (
        rows_of(db, dim, "database features")?,
        rows_of(queries, dim, "query features")?,
    );
    if top == 0 {
        return Err(Error::bad_config(
            "copy detection top",
            "keeping 0 results scores nothing; use 20 (DINO)",
        ));
    }
    gt.validate(db_rows, query_rows)?;
    let mut db = db.to_vec();
    let mut queries = queries.to_vec();
    normalize_rows(&mut db, dim);
    normalize_rows(&mut queries, dim);

    let aps: Vec<f64> = map_similarity_rows(&db, &queries, dim, MAX_QUERY_BLOCK, |q, row| {
        let positives = &gt.queries[q].positives;
        let ranks: Vec<usize> = top_indices(row, top)
            .iter()
            .enumerate()
            .filter(|(_, idx)| positives.contains(idx))
            .map(|(rank, _)| rank)
            .collect();
        average_precision(&ranks, positives.len())
    });

    let mut blocks: Vec<(String, f64, usize)> = Vec::new();
    for (q, ap) in gt.queries.iter().zip(&aps) {
        match blocks.iter_mut().find(|b| b.0 == q.block) {
            Some(b) => {
                b.1 += ap;
                b.2 += 1;
            }
            None => blocks.push((q.block.clone(), *ap, 1)),
        }
    }
    for b in &mut blocks {
        b.1 /= b.2 as f64;
    }
    Ok(CopyReport {
        map: aps.iter().sum::<f64>() / aps.len() as f64,
        blocks,
        top,
    })
}

/// The `top` most similar database indices, best first; equal similarities rank by
/// lower index. Linear-time selection, then a sort of the kept entries.
pub fn top_indices(similarities: &[f32], top: usize) -> Vec<usize> {
    let better = |a: &usize, b: &usize| {
        similarities[*b]
            .partial_cmp(&similarities[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let mut idx: Vec<usize> = (0..similarities.len()).collect();
    if top < idx.len() {
        if top > 0 {
            idx.select_nth_unstable_by(top - 1, better);
        }
        idx.truncate(top);
    }
    idx.sort_unstable_by(better);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for test data.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Roughly normal: sum of 12 uniforms minus 6.
        fn normal(&mut self) -> f64 {
            (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
        }
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gem_known_values() {
        // Constant tokens c -> c, for any p.
        for p in [1.0, 3.0, 4.0] {
            let out = gem(&[2.5; 12], 4, 3, p, GEM_EPS);
            assert!(out.iter().all(|v| (v - 2.5).abs() < 1e-6), "{out:?}");
        }
        // One-hot over 4 tokens, p = 4: (1/4 + 3 eps^4 / 4)^(1/4) = 0.70711.
        let out = gem(&[1.0, 0.0, 0.0, 0.0], 4, 1, 4.0, GEM_EPS);
        assert!((out[0] - 0.5f32.sqrt()).abs() < 1e-6, "{out:?}");
        // p = 1 is the mean of the clamped tokens: negatives count as eps.
        let out = gem(&[3.0, -5.0, 1.0, 2.0], 2, 2, 1.0, 0.5);
        assert!(
            (out[0] - 2.0).abs() < 1e-6 && (out[1] - 1.25).abs() < 1e-6,
            "{out:?}"
        );
        // All tokens below the clamp give eps.
        let out = gem(&[-1.0, -2.0], 2, 1, 4.0, GEM_EPS);
        assert!((out[0] - GEM_EPS).abs() < 1e-12, "{out:?}");
        assert!(check_gem_p(4.0, "--gem-p").is_ok());
        assert!(err_text(check_gem_p(0.0, "--gem-p")).contains("--gem-p"));
    }

    fn check_eigen(a: &[f64], n: usize, tol: f64) -> (Vec<f64>, Vec<f64>) {
        let (l, v) = symmetric_eigen(a, n);
        assert!(l.windows(2).all(|w| w[0] >= w[1]), "not decreasing: {l:?}");
        for i in 0..n {
            for j in 0..n {
                // Orthonormal rows, and A = V^T diag(l) V.
                let dot: f64 = (0..n).map(|k| v[i * n + k] * v[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < tol, "V V^T [{i},{j}] = {dot}");
                let rebuilt: f64 = (0..n).map(|k| v[k * n + i] * l[k] * v[k * n + j]).sum();
                assert!((rebuilt - a[i * n + j]).abs() < tol, "rebuilt [{i},{j}]");
            }
        }
        (l, v)
    }

    #[test]
    fn jacobi_known_matrices() {
        // [[2, 1], [1, 2]]: eigenvalues 3 and 1, vectors (1, 1)/sqrt2 and (1, -1)/sqrt2.
        let (l, v) = check_eigen(&[2.0, 1.0, 1.0, 2.0], 2, 1e-12);
        assert!((l[0] - 3.0).abs() < 1e-12 && (l[1] - 1.0).abs() < 1e-12);
        assert!((v[0].abs() - 0.5f64.sqrt()).abs() < 1e-12 && (v[0] - v[1]).abs() < 1e-12);
        // The 1-D Laplacian [[2, -1, 0], [-1, 2, -1], [0, -1, 2]]: 2 + sqrt2, 2, 2 - sqrt2.
        let a = [2.0, -1.0, 0.0, -1.0, 2.0, -1.0, 0.0, -1.0, 2.0];
        let (l, _) = check_eigen(&a, 3, 1e-12);
        let s = 2f64.sqrt();
        for (got, want) in l.iter().zip([2.0 + s, 2.0, 2.0 - s]) {
            assert!((got - want).abs() < 1e-12, "{l:?}");
        }
        // Already diagonal (with a repeated eigenvalue): returned as is, sorted.
        let (l, _) = check_eigen(&[1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0], 3, 1e-15);
        assert_eq!(l, vec![5.0, 1.0, 1.0]);
    }

    #[test]
    fn jacobi_random_symmetric() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let n = 24;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let x = rng.normal();
                a[i * n + j] = x;
                a[j * n + i] = x;
            }
        }
        let (l, _) = check_eigen(&a, n, 1e-10);
        // The trace is the sum of eigenvalues.
        let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
        assert!((l.iter().sum::<f64>() - trace).abs() < 1e-10);
    }

    /// Timing of the eigen-solver at whitening sizes (the numbers in
    /// [`Whitening::learn`]'s docs): `cargo test --release --lib jacobi_timing --
    /// --ignored --nocapture`. Checks the trace so the run is also a correctness test.
    #[test]
    #[ignore = "timing: seconds at dim 384, ~30 s at 768 in release; run by hand for the docs' numbers"]
    fn jacobi_timing() {
        for n in [384usize, 768] {
            let mut rng = Rng(12345);
            let mut a = vec![0.0f64; n * n];
            for i in 0..n {
                for j in i..n {
                    let x = rng.uniform() - 0.5;
                    a[i * n + j] = x;
                    a[j * n + i] = x;
                }
            }
            let start = std::time::Instant::now();
            let (l, _) = symmetric_eigen(&a, n);
            eprintln!(
                "symmetric_eigen n = {n}: {:.2} s",
                start.elapsed().as_secs_f64()
            );
            let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
            assert!((l.iter().sum::<f64>() - trace).abs() < 1e-8);
        }
    }

    /// `(n, dim)` correlated features with mean `offset`: x = M z + offset.
    fn correlated(n: usize, dim: usize, offset: f64, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        let mix: Vec<f64> = (0..dim * dim).map(|_| rng.normal()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let z: Vec<f64> = (0..dim).map(|i| rng.normal() * (1.0 + i as f64)).collect();
            for r in 0..dim {
                let x: f64 = (0..dim).map(|c| mix[r * dim + c] * z[c]).sum();
                out.push((x + offset * (r as f64 - 1.0)) as f32);
            }
        }
        out
    }

    /// `A^T B / N` of two `(N, dim)` matrices, in f64.
    fn second_moment(a: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
        let n = a.len() / dim;
        let mut m = vec![0.0; dim * dim];
        for (ra, rb) in a.chunks(dim).zip(b.chunks(dim)) {
            for i in 0..dim {
                for j in 0..dim {
                    m[i * dim + j] += f64::from(ra[i]) * f64::from(rb[j]) / n as f64;
                }
            }
        }
        m
    }

    fn assert_identity(m: &[f64], dim: usize, tol: f64) {
        for i in 0..dim {
            for j in 0..dim {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (m[i * dim + j] - want).abs() < tol,
                    "[{i},{j}] = {}",
                    m[i * dim + j]
                );
            }
        }
    }

    #[test]
    fn whitening_gives_identity_covariance_on_its_training_set() {
        let dim = 6;
        // Zero-mean training set (each row and its negation): centred and uncentred
        // covariance coincide, and P (x - mu) has identity covariance.
        let half = correlated(1500, dim, 0.0, 7);
        let feats: Vec<f32> = half
            .iter()
            .copied()
            .chain(half.iter().map(|v| -v))
            .collect();
        let w = Whitening::learn(&feats, dim).unwrap();
        assert_eq!(w.floored(), 0);
        let z = w.project(&feats);
        assert_identity(&second_moment(&z, &z, dim), dim, 1e-3);

        // Shifted training set: DINO's uncentred covariance makes P x (without the mean)
        // the exactly white one; P (x - mu) then has covariance I - P mu mu^T P^T.
        let feats = correlated(3000, dim, 5.0, 11);
        let w = Whitening::learn(&feats, dim).unwrap();
        let zero_mean = Whitening {
            mean: vec![0.0; dim],
            ..w.clone()
        };
        let z = zero_mean.project(&feats);
        assert_identity(&second_moment(&z, &z, dim), dim, 1e-3);
        let centred = w.project(&feats);
        let pm = zero_mean.project(w.mean());
        let cov = second_moment(&centred, &centred, dim);
        for i in 0..dim {
            for j in 0..dim {
                let want = if i == j { 1.0 } else { 0.0 } - f64::from(pm[i]) * f64::from(pm[j]);
                assert!((cov[i * dim + j] - want).abs() < 1e-3, "[{i},{j}]");
            }
        }
    }

    #[test]
    fn whitening_floors_small_eigenvalues() {
        // The third coordinate is always 0: its eigenvalue 0 is raised to 1e-5 * max.
        let mut rng = Rng(3);
        let feats: Vec<f32> = (0..200)
            .flat_map(|_| [rng.normal() as f32 * 3.0, rng.normal() as f32, 0.0])
            .collect();
        let w = Whitening::learn(&feats, 3).unwrap();
        assert_eq!(w.floored(), 1);
        let l = w.eigenvalues();
        assert!((l[2] - EIGEN_FLOOR * l[0]).abs() <= 1e-12 * l[0], "{l:?}");
        assert!(l[0] > l[1] && l[1] > l[2]);
    }

    #[test]
    fn apply_normalises_rows_of_the_projection() {
        let dim = 4;
        let feats = correlated(50, dim, 1.0, 5);
        let w = Whitening::learn(&feats, dim).unwrap();
        let projected = w.project(&feats[..8]);
        let applied = w.apply(&feats[..8]);
        for (p, a) in projected.chunks(dim).zip(applied.chunks(dim)) {
            let norm = p.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (x, y) in p.iter().zip(a) {
                assert!((x / norm - y).abs() < 1e-5);
            }
        }
        let msg = err_text(w.try_apply(&feats[..7], "query features"));
        assert!(
            msg.contains("query features") && msg.contains("dimension 4"),
            "{msg}"
        );
    }

    #[test]
    fn whitening_refuses_bad_input() {
        let msg = err_text(Whitening::learn(&[1.0, 2.0], 2));
        assert!(
            msg.contains("whitening features") && msg.contains("1 image"),
            "{msg}"
        );
        let msg = err_text(Whitening::learn(&[1.0, 2.0, 3.0], 2));
        assert!(
            msg.contains("whitening features") && msg.contains("dimension 2"),
            "{msg}"
        );
        let msg = err_text(Whitening::learn(&[0.0; 8], 2));
        assert!(msg.contains("all zero"), "{msg}");
    }

    fn query(positives: &[usize], block: &str) -> CopyQuery {
        CopyQuery {
            image: format!("queries/{block}.jpg"),
            positives: positives.to_vec(),
            block: block.into(),
        }
    }

    fn hand_dataset() -> (Vec<f32>, Vec<f32>, CopyGroundTruth) {
        let db = vec![1.0, 0.0, 0.8, 0.6, 0.6, 0.8, 0.0, 1.0];
        let queries = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let gt = CopyGroundTruth {
            db: (0..4).map(|i| format!("originals/{i}.jpg")).collect(),
            queries: vec![
                query(&[0], "jpeg"),
                query(&[2], "jpeg"),
                query(&[3, 1], "crop"),
            ],
            whitening: vec!["whiten/0.jpg".into()],
        };
        (db, queries, gt)
    }

    #[test]
    fn copy_detection_hand_computed() {
        // Queries (1, 0), (1, 0) rank the database [0, 1, 2, 3]; (0, 1) ranks [3, 2, 1, 0].
        //   q0 positive 0 at rank 0: AP 1.
        //   q1 positive 2 at rank 2: AP 1/6 in the top 20; outside the top 2, AP 0.
        //   q2 positives 3, 1 at ranks 0, 2: AP 0.791667; in the top 2 only rank 0: 0.5.
        let (db, queries, gt) = hand_dataset();
        let r = evaluate(&db, &queries, 2, &gt, TOP).unwrap();
        let (q0, q1, q2) = (1.0, 1.0 / 6.0, 0.5 + (0.5 + 2.0 / 3.0) / 4.0);
        assert!((r.map - (q0 + q1 + q2) / 3.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.blocks.len(), 2);
        assert_eq!((r.blocks[0].0.as_str(), r.blocks[0].2), ("jpeg", 2));
        assert!((r.blocks[0].1 - (q0 + q1) / 2.0).abs() < 1e-9);
        assert_eq!((r.blocks[1].0.as_str(), r.blocks[1].2), ("crop", 1));
        assert!((r.blocks[1].1 - 0.791667).abs() < 1e-6);
        assert_eq!(r.top, TOP);

        let r = evaluate(&db, &queries, 2, &gt, 2).unwrap();
        assert!((r.map - 0.5).abs() < 1e-9, "{r:?}");
        assert!((r.blocks[0].1 - 0.5).abs() < 1e-9 && (r.blocks[1].1 - 0.5).abs() < 1e-9);

        // Scaled features score the same (rows are normalised here).
        let scaled: Vec<f32> = db.iter().map(|v| v * 7.0).collect();
        let r2 = evaluate(&scaled, &queries, 2, &gt, 2).unwrap();
        assert_eq!(r2.map, r.map);
    }

    #[test]
    fn top_indices_matches_a_full_sort() {
        let sims = [0.1, 0.9, 0.5, 0.9, -0.3, 0.5, 0.7];
        assert_eq!(top_indices(&sims, 4), vec![1, 3, 6, 2]);
        assert_eq!(
            top_indices(&sims, 100),
            crate::eval::retrieval::rank_database(&sims)
        );
        assert!(top_indices(&sims, 0).is_empty());
    }

    #[test]
    fn copy_ground_truth_loads_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench").join("gt.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            r#"{"db": ["originals/0001.jpg", "distractors/0007.jpg"],
                "queries": [{"image": "queries/0001_jpeg.jpg", "positives": [0], "block": "jpeg"}],
                "whitening": ["whiten/0001.jpg"]}"#,
        )
        .unwrap();
        let gt = CopyGroundTruth::load(&path).unwrap();
        gt.validate_file(&path, 2, 1).unwrap();
        assert_eq!(gt.queries[0].block, "jpeg");
        assert_eq!(
            gt.db_paths(&path)[1],
            dir.path().join("bench/distractors/0007.jpg")
        );
        assert_eq!(
            gt.query_paths(&path)[0],
            dir.path().join("bench/queries/0001_jpeg.jpg")
        );
        assert_eq!(
            gt.whitening_paths(&path)[0],
            dir.path().join("bench/whiten/0001.jpg")
        );

        std::fs::write(&path, r#"{"db": []}"#).unwrap();
        let msg = err_text(CopyGroundTruth::load(&path));
        assert!(msg.contains("gt.json") && msg.contains("queries"), "{msg}");
    }

    #[test]
    fn bad_copy_ground_truth_names_the_field() {
        let (db, queries, gt) = hand_dataset();
        let mut bad = gt.clone();
        bad.queries[2].positives = vec![3, 4];
        let msg = err_text(evaluate(&db, &queries, 2, &bad, TOP));
        assert!(
            msg.contains("queries[2].positives[1]") && msg.contains("out of range"),
            "{msg}"
        );

        let mut bad = gt.clone();
        bad.queries[0].positives.clear();
        assert!(err_text(bad.validate(4, 3)).contains("queries[0].positives"));

        let mut bad = gt.clone();
        bad.queries[1].positives = vec![2, 2];
        assert!(err_text(bad.validate(4, 3)).contains("repeats"));

        let mut bad = gt.clone();
        bad.queries.clear();
        let msg = err_text(evaluate(&db, &[], 2, &bad, TOP));
        assert!(msg.contains("queries") && msg.contains("empty"), "{msg}");

        let msg = err_text(gt.validate_file(Path::new("copy.json"), 3, 3));
        assert!(
            msg.contains("copy.json") && msg.contains("database features"),
            "{msg}"
        );
        let msg = err_text(evaluate(&db, &queries[..5], 2, &gt, TOP));
        assert!(msg.contains("query features"), "{msg}");
        let msg = err_text(evaluate(&db, &queries, 2, &gt, 0));
        assert!(msg.contains("top"), "{msg}");
    }
}
