//! Image retrieval on the revisited Oxford/Paris benchmarks (SPEC.md section 7): the
//! ground-truth format, its checks, and the scoring of a database/query feature pair
//! under the Easy, Medium and Hard protocols.
//!
//! The ground truth is read from the official pickle (`gnd_roxford5k.pkl`) or from JSON
//! with the same fields, so features from any model are scored by the same rules.
//! Scoring takes feature matrices (row-major f32, one row per image): this module does
//! not extract features or crop queries; the caller does, in `imlist`/`qimlist` order.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_pickle::{HashableValue, Value};

use crate::error::{Error, Result};
use crate::eval::ap::{score_ranking, Protocol, RankScore};
use crate::eval::knn::normalize_rows;

/// Ground truth of one query: database indices (into `imlist`) by label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueryGnd {
    /// Clearly visible views of the query's landmark.
    pub easy: Vec<usize>,
    /// Views that are hard to match (occlusion, viewpoint, lighting).
    pub hard: Vec<usize>,
    /// Images that must not count either way (unclear views); removed from rankings.
    pub junk: Vec<usize>,
    /// Query box `[x1, y1, x2, y2]` in pixels of the query image; cropping to it is the
    /// protocol (a flag of the CLI). Absent in JSON written for uncropped queries.
    #[serde(default)]
    pub bbx: Option<[f64; 4]>,
}

/// A retrieval benchmark's ground truth, as in the revisited Oxford/Paris pickle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Database image names (no extension in the official files), in feature-row order.
    pub imlist: Vec<String>,
    /// Query image names, in query-feature-row order.
    pub qimlist: Vec<String>,
    /// One entry per query, in `qimlist` order.
    pub gnd: Vec<QueryGnd>,
}

/// Scores under one protocol.
#[derive(serde::Serialize, Debug, Clone)]
pub struct ProtocolScore {
    /// Which protocol.
    pub protocol: Protocol,
    /// Mean AP over the queries with at least one positive, as a fraction in [0, 1]
    /// (papers and the CLI print percent). 0.0 when no query has a positive.
    pub map: f64,
    /// `(k, mean precision at k)` for each requested k, fraction in [0, 1], over the same
    /// queries as `map`, by the `kq` rule of [`score_ranking`].
    pub mp_at: Vec<(usize, f64)>,
    /// Queries that had positives under this protocol (the others are left out).
    pub queries_scored: usize,
}

/// The result of one retrieval evaluation: one score per protocol, Easy/Medium/Hard.
#[derive(serde::Serialize, Debug, Clone)]
pub struct RetrievalReport {
    /// Scores in the order of [`Protocol::ALL`].
    pub protocols: Vec<ProtocolScore>,
}

/// Largest similarity block (queries x database) held at once, in floats (64 MiB).
const MAX_BLOCK_FLOATS: usize = 1 << 24;

/// Most queries scored per similarity block.
pub(crate) const MAX_QUERY_BLOCK: usize = 64;

impl GroundTruth {
    /// Reads ground truth from `path`: `.json` (fields `imlist`, `qimlist`,
    /// `gnd: [{easy, hard, junk, bbx}]`) or `.pkl`/`.pickle` (the official revisited
    /// Oxford/Paris pickle: a dict with the same keys, any pickle protocol). The result is
    /// not yet checked against features: call [`GroundTruth::validate_file`].
    pub fn load(path: &Path) -> Result<GroundTruth> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        match ext.as_deref() {
            Some("json") => serde_json::from_slice(&bytes).map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "not retrieval ground truth JSON ({e}); expected \
                         {{\"imlist\": [..], \"qimlist\": [..], \"gnd\": [{{\"easy\": [..], \
                         \"hard\": [..], \"junk\": [..], \"bbx\": [x1, y1, x2, y2]}}]}}"
                    ),
                )
            }),
            Some("pkl") | Some("pickle") => Self::from_pickle(&bytes, path),
            _ => Err(Error::bad_file(
                path,
                "unknown ground-truth format: name the file .json (imlist/qimlist/gnd fields) \
                 or .pkl (the official revisited Oxford/Paris pickle)",
            )),
        }
    }

    /// Parses the official pickle layout from `bytes` (`path` only names errors).
    /// Lists of ints and floats are read as Python wrote them; numpy objects are not
    /// supported (convert with `.tolist()`).
    pub fn from_pickle(bytes: &[u8], path: &Path) -> Result<GroundTruth> {
        let value =
            serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new().decode_strings())
                .map_err(|e| {
                    Error::bad_file(
                        path,
                        format!(
                            "cannot unpickle ({e}); expected a plain dict of lists \
                         (numpy arrays inside are not supported: convert them with .tolist())"
                        ),
                    )
                })?;
        let bad = |field: &str, what: &str| {
            Error::bad_file(
                path,
                format!("{field}: {what}; expected the revisited Oxford/Paris layout (dict with imlist, qimlist, gnd)"),
            )
        };
        let top = as_dict(&value)
            .ok_or_else(|| bad("top level", &format!("is a {}, not a dict", kind(&value))))?;
        let strings = |key: &str| -> Result<Vec<String>> {
            let list = get(top, key).ok_or_else(|| bad(key, "missing"))?;
            let items = as_list(list)
                .ok_or_else(|| bad(key, &format!("is a {}, not a list", kind(list))))?;
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    as_string(v).ok_or_else(|| {
                        bad(
                            &format!("{key}[{i}]"),
                            &format!("is a {}, not a string", kind(v)),
                        )
                    })
                })
                .collect()
        };
        let imlist = strings("imlist")?;
        let qimlist = strings("qimlist")?;
        let gnd_value = get(top, "gnd").ok_or_else(|| bad("gnd", "missing"))?;
        let gnd_items = as_list(gnd_value)
            .ok_or_else(|| bad("gnd", &format!("is a {}, not a list", kind(gnd_value))))?;
        let mut gnd = Vec::with_capacity(gnd_items.len());
        for (q, entry) in gnd_items.iter().enumerate() {
            let field = format!("gnd[{q}]");
            let dict = as_dict(entry)
                .ok_or_else(|| bad(&field, &format!("is a {}, not a dict", kind(entry))))?;
            let indices = |key: &str| -> Result<Vec<usize>> {
                let name = format!("{field}.{key}");
                let list = get(dict, key).ok_or_else(|| bad(&name, "missing"))?;
                let items = as_list(list)
                    .ok_or_else(|| bad(&name, &format!("is a {}, not a list", kind(list))))?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        as_index(v).ok_or_else(|| {
                            bad(
                                &format!("{name}[{i}]"),
                                &format!("is a {}, not a non-negative integer", kind(v)),
                            )
                        })
                    })
                    .collect()
            };
            let bbx = match get(dict, "bbx") {
                None | Some(Value::None) => None,
                Some(b) => {
                    let name = format!("{field}.bbx");
                    let items = as_list(b)
                        .ok_or_else(|| bad(&name, &format!("is a {}, not a list", kind(b))))?;
                    if items.len() != 4 {
                        return Err(bad(
                            &name,
                            &format!("has {} numbers, not 4 (x1, y1, x2, y2)", items.len()),
                        ));
                    }
                    let mut out = [0.0; 4];
                    for (o, v) in out.iter_mut().zip(items) {
                        *o = as_f64(v).ok_or_else(|| {
                            bad(&name, &format!("holds a {}, not a number", kind(v)))
                        })?;
                    }
                    Some(out)
                }
            };
            gnd.push(QueryGnd {
                easy: indices("easy")?,
                hard: indices("hard")?,
                junk: indices("junk")?,
                bbx,
            });
        }
        Ok(GroundTruth {
            imlist,
            qimlist,
            gnd,
        })
    }

    /// Checks the ground truth against itself and against features with `db_rows`
    /// database rows and `query_rows` query rows. Errors name the field
    /// (`gnd[3].junk[0]`, `qimlist`, ...) as a [`Error::BadConfig`]; prefer
    /// [`GroundTruth::validate_file`] when the file is known.
    pub fn validate(&self, db_rows: usize, query_rows: usize) -> Result<()> {
        self.check(db_rows, query_rows)
            .map_err(|(field, reason)| Error::bad_config(field, reason))
    }

    /// [`GroundTruth::validate`], with errors naming the ground-truth file `path` and the
    /// field inside it.
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
        let n = self.imlist.len();
        if n == 0 {
            return Err((
                "imlist".into(),
                "is empty: the benchmark has no database images; use a complete ground-truth file"
                    .into(),
            ));
        }
        if self.qimlist.is_empty() {
            return Err((
                "qimlist".into(),
                "is empty: there are no queries to evaluate; use a ground-truth file with queries"
                    .into(),
            ));
        }
        if self.gnd.len() != self.qimlist.len() {
            return Err((
                "gnd".into(),
                format!(
                    "has {} entries but qimlist has {} queries; the ground truth needs one gnd entry per query",
                    self.gnd.len(),
                    self.qimlist.len()
                ),
            ));
        }
        for (q, g) in self.gnd.iter().enumerate() {
            let mut labelled: Vec<(usize, &str)> =
                Vec::with_capacity(g.easy.len() + g.hard.len() + g.junk.len());
            for (label, list) in [("easy", &g.easy), ("hard", &g.hard), ("junk", &g.junk)] {
                for (i, &idx) in list.iter().enumerate() {
                    if idx >= n {
                        return Err((
                            format!("gnd[{q}].{label}[{i}]"),
                            format!("index {idx} is out of range: imlist has {n} images (indices 0..{}); fix the ground truth or use the matching imlist", n - 1),
                        ));
                    }
                    labelled.push((idx, label));
                }
            }
            labelled.sort_unstable();
            if let Some(w) = labelled.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err((
                    format!("gnd[{q}].{}", w[1].1),
                    format!(
                        "lists image {} which gnd[{q}].{} also lists; each image has one label per query",
                        w[1].0, w[0].1
                    ),
                ));
            }
            if let Some(b) = g.bbx {
                if b.iter().any(|v| !v.is_finite()) || b[0] > b[2] || b[1] > b[3] {
                    return Err((
                        format!("gnd[{q}].bbx"),
                        format!("{b:?} is not a box [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2"),
                    ));
                }
            }
        }
        if db_rows != n {
            return Err((
                "database features".into(),
                format!("have {db_rows} rows but imlist lists {n} images; extract features for exactly the images of imlist, in its order"),
            ));
        }
        if query_rows != self.qimlist.len() {
            return Err((
                "query features".into(),
                format!(
                    "have {query_rows} rows but qimlist lists {} queries; extract features for exactly the images of qimlist, in its order",
                    self.qimlist.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Scores database and query features against `gt` under the Easy, Medium and Hard
/// protocols.
///
/// `db` is `(imlist.len(), dim)` and `queries` `(qimlist.len(), dim)`, row-major. Rows
/// are L2-normalised here (so any scale works), every query ranks the whole database by
/// cosine similarity (descending; equal similarities rank by lower database index),
/// and [`score_ranking`] scores the ranking per protocol: Easy = easy positives, junk +
/// hard removed; Medium = easy + hard positives, junk removed; Hard = hard positives,
/// junk + easy removed. A query without positives under a protocol is left out of that
/// protocol's means. mAP and mP@k are fractions in [0, 1].
///
/// Similarities come from blocked GEMMs (queries x database, at most 64 MiB per block);
/// the queries of a block are ranked in parallel.
pub fn evaluate(
    db: &[f32],
    queries: &[f32],
    dim: usize,
    gt: &GroundTruth,
    ks: &[usize],
) -> Result<RetrievalReport> {
    evaluate_blocked(db, queries, dim, gt, ks, MAX_QUERY_BLOCK)
}

/// [`evaluate`] with at most `max_block` queries per similarity block.
fn evaluate_blocked(
    db: &[f32],
    queries: &[f32],
    dim: usize,
    gt: &GroundTruth,
    ks: &[usize],
    max_block: usize,
) -> Result<RetrievalReport> {
    let (db_rows, query_rows) = (
        rows_of(db, dim, "database features")?,
        rows_of(queries, dim, "query features")?,
    );
    if let Some(k) = ks.iter().find(|&&k| k == 0) {
        return Err(Error::bad_config(
            "retrieval k",
            format!("precision at k = {k} is undefined; use k >= 1 (1, 5, 10 in the papers)"),
        ));
    }
    gt.validate(db_rows, query_rows)?;
    let mut db = db.to_vec();
    let mut queries = queries.to_vec();
    normalize_rows(&mut db, dim);
    normalize_rows(&mut queries, dim);

    let per_query: Vec<[Option<RankScore>; 3]> =
        map_similarity_rows(&db, &queries, dim, max_block, |q, row| {
            let g = &gt.gnd[q];
            let ranking = rank_database(row);
            Protocol::ALL.map(|protocol| {
                let (positives, junk) = protocol.split(&g.easy, &g.hard, &g.junk);
                (!positives.is_empty()).then(|| score_ranking(&ranking, &positives, &junk, ks))
            })
        });

    let protocols = Protocol::ALL
        .iter()
        .enumerate()
        .map(|(p, &protocol)| {
            let scores: Vec<&RankScore> = per_query.iter().filter_map(|s| s[p].as_ref()).collect();
            let n = scores.len();
            let mean = |f: &dyn Fn(&RankScore) -> f64| {
                if n == 0 {
                    0.0
                } else {
                    scores.iter().map(|s| f(s)).sum::<f64>() / n as f64
                }
            };
            ProtocolScore {
                protocol,
                map: mean(&|s| s.ap),
                mp_at: ks
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| (k, mean(&|s| s.precision_at[i])))
                    .collect(),
                queries_scored: n,
            }
        })
        .collect();
    Ok(RetrievalReport { protocols })
}

/// `f(query index, similarities of that query to every database row)` for each query
/// row, in query order. `db` and `queries` are `(rows, dim)` row-major and should be
/// L2-normalised (the similarity is the dot product). Similarities are computed by GEMM
/// in blocks of at most `max_block` queries and 64 MiB, and the rows of a block are
/// handed to `f` in parallel, so memory stays bounded whatever the number of queries.
pub(crate) fn map_similarity_rows<T, F>(
    db: &[f32],
    queries: &[f32],
    dim: usize,
    max_block: usize,
    f: F,
) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &[f32]) -> T + Sync,
{
    assert!(
        dim > 0 && db.len() % dim == 0 && queries.len() % dim == 0,
        "map_similarity_rows: shapes"
    );
    let (db_rows, query_rows) = (db.len() / dim, queries.len() / dim);
    let mut out = Vec::with_capacity(query_rows);
    if db_rows == 0 {
        return (0..query_rows).map(|q| f(q, &[])).collect();
    }
    let block = (MAX_BLOCK_FLOATS / db_rows).clamp(1, max_block.max(1));
    let mut sims = vec![0.0f32; block.min(query_rows) * db_rows];
    for start in (0..query_rows).step_by(block) {
        let rows = block.min(query_rows - start);
        let sims = &mut sims[..rows * db_rows];
        // (rows, dim) @ (dim, db_rows) -> (rows, db_rows); the database is read transposed.
        crate::cpu::gemm(
            rows,
            dim,
            db_rows,
            1.0,
            &queries[start * dim..(start + rows) * dim],
            (dim, 1),
            db,
            (1, dim),
            0.0,
            sims,
            (db_rows, 1),
        );
        let block_out: Vec<T> = sims
            .par_chunks(db_rows)
            .enumerate()
            .map(|(i, row)| f(start + i, row))
            .collect();
        out.extend(block_out);
    }
    out
}

/// Database indices ordered by decreasing similarity; equal similarities rank by lower
/// index (a total, deterministic order for finite similarities).
pub fn rank_database(similarities: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..similarities.len()).collect();
    order.sort_unstable_by(|&a, &b| {
        similarities[b]
            .partial_cmp(&similarities[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order
}

/// Rows of a `(rows, dim)` feature matrix, or an error naming `what` when `dim` does not
/// divide its length or a value is not finite.
pub(crate) fn rows_of(feats: &[f32], dim: usize, what: &str) -> Result<usize> {
    if dim == 0 {
        return Err(Error::bad_config(
            what,
            "feature dimension is 0; pass features with at least one column",
        ));
    }
    if feats.len() % dim != 0 {
        return Err(Error::bad_config(
            what,
            format!(
                "hold {} values, not a whole number of rows of dimension {dim}; database and query features must come from the same model and pooling",
                feats.len()
            ),
        ));
    }
    if let Some(i) = feats.iter().position(|v| !v.is_finite()) {
        return Err(Error::bad_config(
            what,
            format!(
                "row {} holds a non-finite value ({}); re-extract the features",
                i / dim,
                feats[i]
            ),
        ));
    }
    Ok(feats.len() / dim)
}

/// A pickle dict's entries.
fn as_dict(v: &Value) -> Option<&BTreeMap<HashableValue, Value>> {
    match v {
        Value::Dict(d) => Some(d),
        _ => None,
    }
}

/// The value under a string key (Python 3 `str` or Python 2 `bytes`).
fn get<'a>(dict: &'a BTreeMap<HashableValue, Value>, key: &str) -> Option<&'a Value> {
    dict.get(&HashableValue::String(key.to_string()))
        .or_else(|| dict.get(&HashableValue::Bytes(key.as_bytes().to_vec())))
}

/// A list or tuple's items.
fn as_list(v: &Value) -> Option<&[Value]> {
    match v {
        Value::List(items) | Value::Tuple(items) => Some(items),
        _ => None,
    }
}

/// A string (`str`, or UTF-8 `bytes`).
fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

/// A non-negative integer.
fn as_index(v: &Value) -> Option<usize> {
    match v {
        Value::I64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// A float or integer as f64.
fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F64(f) => Some(*f),
        Value::I64(i) => Some(*i as f64),
        _ => None,
    }
}

/// The Python type name of a pickle value, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::I64(_) | Value::Int(_) => "int",
        Value::F64(_) => "float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "str",
        Value::List(_) => "list",
        Value::Tuple(_) => "tuple",
        Value::Set(_) => "set",
        Value::FrozenSet(_) => "frozenset",
        Value::Dict(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-6
    }

    fn q(easy: &[usize], hard: &[usize], junk: &[usize]) -> QueryGnd {
        QueryGnd {
            easy: easy.to_vec(),
            hard: hard.to_vec(),
            junk: junk.to_vec(),
            bbx: None,
        }
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    /// Five 2-D database vectors and two queries whose rankings are worked out by hand in
    /// `hand_built_dataset_scores`.
    fn hand_dataset() -> (Vec<f32>, Vec<f32>, GroundTruth) {
        let db = vec![1.0, 0.0, 0.8, 0.6, 0.6, 0.8, 0.0, 1.0, -1.0, 0.0];
        let queries = vec![1.0, 0.0, 0.0, 1.0];
        let gt = GroundTruth {
            imlist: names("db", 5),
            qimlist: names("q", 2),
            gnd: vec![q(&[2], &[4], &[1]), q(&[3, 0], &[], &[])],
        };
        (db, queries, gt)
    }

    fn check_report(r: &RetrievalReport, want: &[(f64, [f64; 2], usize)]) {
        assert_eq!(r.protocols.len(), 3);
        for (p, (map, mp, n)) in r.protocols.iter().zip(want) {
            assert!(
                close(p.map, *map),
                "{:?}: mAP {} vs {map}",
                p.protocol,
                p.map
            );
            assert_eq!(p.queries_scored, *n, "{:?}", p.protocol);
            for ((_, got), want) in p.mp_at.iter().zip(mp) {
                assert!(
                    close(*got, *want),
                    "{:?}: {:?} vs {mp:?}",
                    p.protocol,
                    p.mp_at
                );
            }
        }
    }

    #[test]
    fn hand_built_dataset_scores() {
        // Query 0 = (1, 0): ranking [0, 1, 2, 3, 4]; easy {2}, hard {4}, junk {1}.
        //   Easy   (junk 1, 4): [0, 2, 3]    -> rank 1      -> AP 1/4, P@1 0, P@5 (kq 2) 1/2
        //   Medium (junk 1):    [0, 2, 3, 4] -> ranks 1, 3  -> AP 1/3, P@1 0, P@5 (kq 4) 2/4
        //   Hard   (junk 1, 2): [0, 3, 4]    -> rank 2      -> AP 1/6, P@1 0, P@5 (kq 3) 1/3
        // Query 1 = (0, 1): similarities 0, .6, .8, 1, 0 -> ranking [3, 2, 1, 0, 4] (the
        // tie between 0 and 4 goes to the lower index); easy {3, 0}, no hard.
        //   Easy = Medium: ranks 0, 3 -> AP (1 + 1)/4 + (1/3 + 2/4)/4 = 0.708333,
        //   P@1 1, P@5 (kq 4) 2/4. Hard: no positives, left out.
        let (db, queries, gt) = hand_dataset();
        let r = evaluate(&db, &queries, 2, &gt, &[1, 5]).unwrap();
        let q1 = 0.5 + (1.0 / 3.0 + 0.5) / 4.0;
        check_report(
            &r,
            &[
                ((0.25 + q1) / 2.0, [0.5, 0.5], 2),
                ((1.0 / 3.0 + q1) / 2.0, [0.5, 0.5], 2),
                (1.0 / 6.0, [0.0, 1.0 / 3.0], 1),
            ],
        );
        assert_eq!(r.protocols[0].mp_at[1].0, 5);
    }

    #[test]
    fn invariant_to_feature_scale_and_block_size() {
        let (db, queries, gt) = hand_dataset();
        let base = evaluate(&db, &queries, 2, &gt, &[1, 5]).unwrap();
        let scaled_db: Vec<f32> = db
            .chunks(2)
            .enumerate()
            .flat_map(|(i, r)| r.iter().map(move |v| v * (i as f32 + 0.5) * 3.0))
            .collect();
        let scaled_q: Vec<f32> = queries.iter().map(|v| v * 0.01).collect();
        for block in [1, 2, 64] {
            let r = evaluate_blocked(&scaled_db, &scaled_q, 2, &gt, &[1, 5], block).unwrap();
            for (a, b) in r.protocols.iter().zip(&base.protocols) {
                assert_eq!(a.map, b.map);
                assert_eq!(a.mp_at, b.mp_at);
            }
        }
    }

    #[test]
    fn spec_protocol_example_through_evaluate() {
        // SPEC 7: ranking [E, H, N, J, H]. Put E, H, N, J, H at database indices 3, 0, 4,
        // 1, 2 and give them angles 0, 0.2, 0.4, 0.6, 0.8 from the query (1, 0).
        let mut db = vec![0.0f32; 10];
        for (step, idx) in [3usize, 0, 4, 1, 2].into_iter().enumerate() {
            let angle = 0.2 * step as f32;
            db[idx * 2] = angle.cos();
            db[idx * 2 + 1] = angle.sin();
        }
        let gt = GroundTruth {
            imlist: names("db", 5),
            qimlist: names("q", 1),
            gnd: vec![q(&[3], &[0, 2], &[1])],
        };
        let r = evaluate(&db, &[1.0, 0.0], 2, &gt, &[1, 5, 10]).unwrap();
        let maps: Vec<f64> = r.protocols.iter().map(|p| p.map).collect();
        assert!(
            close(maps[0], 1.0) && close(maps[1], 0.902778) && close(maps[2], 0.791667),
            "{maps:?}"
        );
        let mp: Vec<f64> = r.protocols[1].mp_at.iter().map(|&(_, p)| p).collect();
        assert!(
            close(mp[0], 1.0) && close(mp[1], 0.75) && close(mp[2], 0.75),
            "{mp:?}"
        );
        assert_eq!(r.protocols[1].protocol, Protocol::Medium);
    }

    #[test]
    fn protocol_without_any_positive_reports_zero_queries() {
        let gt = GroundTruth {
            imlist: names("db", 2),
            qimlist: names("q", 1),
            gnd: vec![q(&[0], &[], &[])],
        };
        let r = evaluate(&[1.0, 0.0, 0.0, 1.0], &[1.0, 0.0], 2, &gt, &[1]).unwrap();
        assert_eq!(r.protocols[2].queries_scored, 0);
        assert_eq!(r.protocols[2].map, 0.0);
        assert!(close(r.protocols[0].map, 1.0));
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_ground_truth_is_refused_with_the_field() {
        let (db, queries, gt) = hand_dataset();
        let mut out_of_range = gt.clone();
        out_of_range.gnd[1].junk = vec![5];
        let msg = err_text(evaluate(&db, &queries, 2, &out_of_range, &[1]));
        assert!(
            msg.contains("gnd[1].junk[0]") && msg.contains("out of range"),
            "{msg}"
        );

        let mut short = gt.clone();
        short.gnd.pop();
        let msg = err_text(short.validate(5, 2));
        assert!(
            msg.contains("gnd") && msg.contains("qimlist has 2"),
            "{msg}"
        );

        let mut no_queries = gt.clone();
        no_queries.qimlist.clear();
        no_queries.gnd.clear();
        let msg = err_text(evaluate(&db, &[], 2, &no_queries, &[1]));
        assert!(msg.contains("qimlist") && msg.contains("empty"), "{msg}");

        let mut overlap = gt.clone();
        overlap.gnd[0].hard = vec![2];
        let msg = err_text(overlap.validate(5, 2));
        assert!(msg.contains("gnd[0].") && msg.contains("image 2"), "{msg}");

        let msg = err_text(gt.validate(4, 2));
        assert!(
            msg.contains("database features") && msg.contains("imlist lists 5"),
            "{msg}"
        );
        let msg = err_text(gt.validate_file(Path::new("gt.json"), 5, 3));
        assert!(
            msg.contains("gt.json") && msg.contains("query features"),
            "{msg}"
        );

        // Feature matrices of the wrong width, or k = 0.
        let msg = err_text(evaluate(&db[..9], &queries, 2, &gt, &[1]));
        assert!(
            msg.contains("database features") && msg.contains("dimension 2"),
            "{msg}"
        );
        let msg = err_text(evaluate(&db, &queries, 2, &gt, &[0]));
        assert!(msg.contains("k = 0"), "{msg}");
        let mut nan = queries.clone();
        nan[1] = f32::NAN;
        let msg = err_text(evaluate(&db, &nan, 2, &gt, &[1]));
        assert!(
            msg.contains("query features") && msg.contains("non-finite"),
            "{msg}"
        );
    }

    /// The ground truth that [`PICKLE_PROTOCOL_2`] and [`PICKLE_PROTOCOL_4`] hold.
    fn python_gt() -> GroundTruth {
        GroundTruth {
            imlist: vec!["a".into(), "b".into(), "c".into()],
            qimlist: vec!["q0".into(), "q1".into()],
            gnd: vec![
                QueryGnd {
                    bbx: Some([1.5, 2.0, 30.25, 40.0]),
                    ..q(&[0], &[2], &[1])
                },
                QueryGnd {
                    bbx: Some([0.0, 0.0, 10.0, 10.0]),
                    ..q(&[], &[1], &[])
                },
            ],
        }
    }

    /// `pickle.dumps(gt, protocol=2)` by Python 3.11 of the ground truth in [`python_gt`].
    const PICKLE_PROTOCOL_2: &[u8] = b"\
        \x80\x02\x7d\x71\x00\x28\x58\x06\x00\x00\x00\x69\x6d\x6c\x69\x73\x74\x71\x01\x5d\x71\x02\x28\x58\
        \x01\x00\x00\x00\x61\x71\x03\x58\x01\x00\x00\x00\x62\x71\x04\x58\x01\x00\x00\x00\x63\x71\x05\x65\
        \x58\x07\x00\x00\x00\x71\x69\x6d\x6c\x69\x73\x74\x71\x06\x5d\x71\x07\x28\x58\x02\x00\x00\x00\x71\
        \x30\x71\x08\x58\x02\x00\x00\x00\x71\x31\x71\x09\x65\x58\x03\x00\x00\x00\x67\x6e\x64\x71\x0a\x5d\
        \x71\x0b\x28\x7d\x71\x0c\x28\x58\x03\x00\x00\x00\x62\x62\x78\x71\x0d\x5d\x71\x0e\x28\x47\x3f\xf8\
        \x00\x00\x00\x00\x00\x00\x47\x40\x00\x00\x00\x00\x00\x00\x00\x47\x40\x3e\x40\x00\x00\x00\x00\x00\
        \x47\x40\x44\x00\x00\x00\x00\x00\x00\x65\x58\x04\x00\x00\x00\x65\x61\x73\x79\x71\x0f\x5d\x71\x10\
        \x4b\x00\x61\x58\x04\x00\x00\x00\x68\x61\x72\x64\x71\x11\x5d\x71\x12\x4b\x02\x61\x58\x04\x00\x00\
        \x00\x6a\x75\x6e\x6b\x71\x13\x5d\x71\x14\x4b\x01\x61\x75\x7d\x71\x15\x28\x68\x0d\x5d\x71\x16\x28\
        \x47\x00\x00\x00\x00\x00\x00\x00\x00\x47\x00\x00\x00\x00\x00\x00\x00\x00\x47\x40\x24\x00\x00\x00\
        \x00\x00\x00\x47\x40\x24\x00\x00\x00\x00\x00\x00\x65\x68\x0f\x5d\x71\x17\x68\x11\x5d\x71\x18\x4b\
        \x01\x61\x68\x13\x5d\x71\x19\x75\x65\x75\x2e\
    ";
    /// `pickle.dumps(gt, protocol=4)` by Python 3.11 of the ground truth in [`python_gt`].
    const PICKLE_PROTOCOL_4: &[u8] = b"\
        \x80\x04\x95\xd3\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x06\x69\x6d\x6c\x69\x73\x74\x94\x5d\
        \x94\x28\x8c\x01\x61\x94\x8c\x01\x62\x94\x8c\x01\x63\x94\x65\x8c\x07\x71\x69\x6d\x6c\x69\x73\x74\
        \x94\x5d\x94\x28\x8c\x02\x71\x30\x94\x8c\x02\x71\x31\x94\x65\x8c\x03\x67\x6e\x64\x94\x5d\x94\x28\
        \x7d\x94\x28\x8c\x03\x62\x62\x78\x94\x5d\x94\x28\x47\x3f\xf8\x00\x00\x00\x00\x00\x00\x47\x40\x00\
        \x00\x00\x00\x00\x00\x00\x47\x40\x3e\x40\x00\x00\x00\x00\x00\x47\x40\x44\x00\x00\x00\x00\x00\x00\
        \x65\x8c\x04\x65\x61\x73\x79\x94\x5d\x94\x4b\x00\x61\x8c\x04\x68\x61\x72\x64\x94\x5d\x94\x4b\x02\
        \x61\x8c\x04\x6a\x75\x6e\x6b\x94\x5d\x94\x4b\x01\x61\x75\x7d\x94\x28\x68\x0d\x5d\x94\x28\x47\x00\
        \x00\x00\x00\x00\x00\x00\x00\x47\x00\x00\x00\x00\x00\x00\x00\x00\x47\x40\x24\x00\x00\x00\x00\x00\
        \x00\x47\x40\x24\x00\x00\x00\x00\x00\x00\x65\x68\x0f\x5d\x94\x68\x11\x5d\x94\x4b\x01\x61\x68\x13\
        \x5d\x94\x75\x65\x75\x2e\
    ";

    #[test]
    fn reads_pickles_written_by_python() {
        for bytes in [PICKLE_PROTOCOL_2, PICKLE_PROTOCOL_4] {
            let gt = GroundTruth::from_pickle(bytes, Path::new("gnd.pkl")).unwrap();
            assert_eq!(gt, python_gt());
            gt.validate(3, 2).unwrap();
        }
    }

    #[test]
    fn loads_json_and_pickle_files() {
        let dir = tempfile::tempdir().unwrap();
        let gt = python_gt();

        let json = dir.path().join("gnd.json");
        std::fs::write(&json, serde_json::to_vec(&gt).unwrap()).unwrap();
        assert_eq!(GroundTruth::load(&json).unwrap(), gt);

        // JSON without boxes (queries not cropped).
        let plain = dir.path().join("plain.json");
        std::fs::write(&plain, r#"{"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}"#).unwrap();
        let loaded = GroundTruth::load(&plain).unwrap();
        assert_eq!(loaded.gnd[0].bbx, None);
        assert_eq!(loaded.gnd[0].easy, vec![0]);

        for opts in [
            serde_pickle::SerOptions::new(),
            serde_pickle::SerOptions::new().proto_v2(),
        ] {
            let pkl = dir.path().join("gnd.pkl");
            std::fs::write(&pkl, serde_pickle::to_vec(&gt, opts).unwrap()).unwrap();
            assert_eq!(GroundTruth::load(&pkl).unwrap(), gt);
        }
    }

    #[test]
    fn malformed_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bad.json");
        std::fs::write(&json, r#"{"imlist": ["a"], "gnd": []}"#).unwrap();
        let msg = err_text(GroundTruth::load(&json));
        assert!(msg.contains("bad.json") && msg.contains("qimlist"), "{msg}");

        let mut value =
            serde_pickle::value_from_slice(PICKLE_PROTOCOL_4, serde_pickle::DeOptions::new())
                .unwrap();
        if let Value::Dict(top) = &mut value {
            if let Some(Value::List(gnd)) = top.get_mut(&HashableValue::String("gnd".into())) {
                if let Value::Dict(first) = &mut gnd[1] {
                    first.insert(
                        HashableValue::String("hard".into()),
                        Value::List(vec![Value::F64(1.0)]),
                    );
                }
            }
        }
        let bytes = serde_pickle::value_to_vec(&value, serde_pickle::SerOptions::new()).unwrap();
        let msg = err_text(GroundTruth::from_pickle(&bytes, Path::new("gnd.pkl")));
        assert!(
            msg.contains("gnd.pkl") && msg.contains("gnd[1].hard[0]") && msg.contains("float"),
            "{msg}"
        );

        let msg = err_text(GroundTruth::from_pickle(
            b"not a pickle",
            Path::new("x.pkl"),
        ));
        assert!(
            msg.contains("x.pkl") && msg.contains("cannot unpickle"),
            "{msg}"
        );

        let other = dir.path().join("gnd.txt");
        std::fs::write(&other, "").unwrap();
        let msg = err_text(GroundTruth::load(&other));
        assert!(msg.contains("gnd.txt") && msg.contains(".json"), "{msg}");
    }

    #[test]
    fn rank_database_orders_ties_by_index() {
        assert_eq!(
            rank_database(&[0.5, 0.9, 0.5, -1.0, 0.9]),
            vec![1, 4, 0, 2, 3]
        );
        assert_eq!(rank_database(&[0.0, -0.0]), vec![0, 1]);
    }
}
