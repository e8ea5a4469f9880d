//! Average precision as DINO and the revisited Oxford/Paris benchmark compute it
//! (SPEC.md section 7): the trapezoid rule over the precision-recall curve, junk
//! removal, precision at k with the `kq` rule, and the three retrieval protocols.
//!
//! Pure functions on rankings (lists of database indices, best first). Nothing here
//! computes similarities or reads files: `retrieval` and `copydetect` build the
//! rankings and call in.

/// Trapezoid average precision of one ranking (the Holidays/Copydays `score_ap_from_ranks_1`
/// and the revisited Oxford/Paris `compute_ap`).
///
/// `positive_ranks` are the 0-based ranks `r_0 < r_1 < ...` at which positives were found
/// (after junk removal, when there is junk); `n_positives` is the number of positives the
/// query has, found or not, so a positive missing from the ranking counts as a miss. Each
/// found positive adds a trapezoid of width `1/n` between the precision before it,
/// `p0_j = j / r_j` (1 at rank 0), and after it, `p1_j = (j + 1) / (r_j + 1)`:
/// `AP = sum_j (p0_j + p1_j) / (2n)`. One positive at rank 0, 1, 2, 3 gives 1, 0.25,
/// 0.16667, 0.125; one of two positives found at rank 0 gives 0.5.
///
/// A query with no positives has no defined AP; this returns 0.0 for it rather than NaN
/// (callers leave such queries out of their means, as the protocols require).
/// `positive_ranks` must be strictly increasing and no longer than `n_positives`.
pub fn average_precision(positive_ranks: &[usize], n_positives: usize) -> f64 {
    if n_positives == 0 {
        return 0.0;
    }
    debug_assert!(
        positive_ranks.windows(2).all(|w| w[0] < w[1]),
        "average_precision: ranks must be strictly increasing"
    );
    debug_assert!(
        positive_ranks.len() <= n_positives,
        "average_precision: more ranks than positives"
    );
    let recall_step = 1.0 / n_positives as f64;
    positive_ranks
        .iter()
        .enumerate()
        .map(|(j, &rank)| {
            let precision_before = if rank == 0 {
                1.0
            } else {
                j as f64 / rank as f64
            };
            let precision_after = (j + 1) as f64 / (rank + 1) as f64;
            (precision_before + precision_after) * recall_step / 2.0
        })
        .sum()
}

/// The revisited Oxford/Paris evaluation protocols: which labelled images count as
/// positives and which are removed from the ranking as junk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Positives: easy. Junk: junk and hard.
    Easy,
    /// Positives: easy and hard. Junk: junk.
    Medium,
    /// Positives: hard. Junk: junk and easy.
    Hard,
}

impl Protocol {
    /// Every protocol, in the order papers report them.
    pub const ALL: [Protocol; 3] = [Protocol::Easy, Protocol::Medium, Protocol::Hard];

    /// The lower-case name papers and the CLI use ("easy", "medium", "hard").
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Easy => "easy",
            Protocol::Medium => "medium",
            Protocol::Hard => "hard",
        }
    }

    /// `(positives, junk)` of one query under this protocol, from its easy, hard and
    /// junk lists.
    pub fn split(self, easy: &[usize], hard: &[usize], junk: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let join = |a: &[usize], b: &[usize]| a.iter().chain(b).copied().collect::<Vec<_>>();
        match self {
            Protocol::Easy => (easy.to_vec(), join(junk, hard)),
            Protocol::Medium => (join(easy, hard), junk.to_vec()),
            Protocol::Hard => (hard.to_vec(), join(junk, easy)),
        }
    }
}

/// The score of one ranking: AP and precision at each requested cutoff.
#[derive(Clone, Debug, PartialEq)]
pub struct RankScore {
    /// Trapezoid average precision in [0, 1].
    pub ap: f64,
    /// Precision at each `k` of the request, in its order, in [0, 1], by the `kq` rule
    /// (see [`score_ranking`]).
    pub precision_at: Vec<f64>,
}

/// Scores one query's ranking by the revisited Oxford/Paris rules (`compute_map`).
///
/// `ranking` lists database indices best first (normally every database image).
/// Images in `junk` are removed from it first; the remaining positions are the ranks of
/// the positives (an image listed both as positive and as junk stays, as a positive, as
/// in the reference code). AP is [`average_precision`] over those ranks with
/// `n = positives.len()`.
///
/// Precision at `k` uses the `kq` rule: with `pos` the 1-based junk-free ranks of the
/// positives found, `kq = min(max(pos), k)` and `P@k = |{pos <= kq}| / kq`. So when
/// every positive is found before rank `k`, precision is measured at the last positive
/// instead of at `k`, and a query with fewer than `k` positives can still score 1.
/// (Checks: ranking [J, P, N, P] gives pos = [1, 3] and P@[1, 2, 5] = [1, 1/2, 2/3];
/// SPEC's medium example gives pos = [1, 2, 4] and P@5 = 3/4.)
///
/// When `positives` is empty, or none of them is in the ranking, AP and every precision
/// are 0.0 (the reference code has no value there; callers skip queries without
/// positives). Every `k` must be at least 1.
pub fn score_ranking(
    ranking: &[usize],
    positives: &[usize],
    junk: &[usize],
    ks: &[usize],
) -> RankScore {
    assert!(ks.iter().all(|&k| k >= 1), "score_ranking: k must be >= 1");
    let ranks = junk_free_positive_ranks(ranking, positives, junk);
    let ap = average_precision(&ranks, positives.len());
    let precision_at = match ranks.last() {
        None => vec![0.0; ks.len()],
        Some(&last) => ks
            .iter()
            .map(|&k| {
                // 1-based ranks: a 0-based rank r is 1-based r + 1.
                let kq = (last + 1).min(k);
                let hits = ranks.iter().filter(|&&r| r < kq).count();
                hits as f64 / kq as f64
            })
            .collect(),
    };
    RankScore { ap, precision_at }
}

/// The 0-based ranks of the positives in `ranking` once the junk images are taken out,
/// in increasing order.
fn junk_free_positive_ranks(ranking: &[usize], positives: &[usize], junk: &[usize]) -> Vec<usize> {
    const OTHER: u8 = 0;
    const POSITIVE: u8 = 1;
    const JUNK: u8 = 2;
    let size = ranking
        .iter()
        .chain(positives)
        .chain(junk)
        .max()
        .map_or(0, |m| m + 1);
    let mut label = vec![OTHER; size];
    for &j in junk {
        label[j] = JUNK;
    }
    // Positives win over junk, as in compute_map (a positive is never shifted by itself).
    for &p in positives {
        label[p] = POSITIVE;
    }
    let mut ranks = Vec::with_capacity(positives.len());
    let mut junk_seen = 0;
    for (position, &image) in ranking.iter().enumerate() {
        match label[image] {
            POSITIVE => ranks.push(position - junk_seen),
            JUNK => junk_seen += 1,
            _ => {}
        }
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-6
    }

    #[test]
    fn single_positive_at_each_rank() {
        // SPEC 7: one positive at rank 0, 1, 2, 3 -> 1, 0.25, 0.16667, 0.125.
        for (rank, want) in [(0, 1.0), (1, 0.25), (2, 1.0 / 6.0), (3, 0.125)] {
            let got = average_precision(&[rank], 1);
            assert!(close(got, want), "rank {rank}: {got} vs {want}");
        }
    }

    #[test]
    fn two_positives() {
        // SPEC 7: [0, 2] -> 0.791667; [1, 3] -> 0.333333; one of two at rank 0 -> 0.5.
        assert!(close(average_precision(&[0, 2], 2), 0.791667));
        assert!(close(average_precision(&[1, 3], 2), 0.333333));
        assert!(close(average_precision(&[0], 2), 0.5));
        // Hand: [0, 1] is a perfect ranking.
        assert!(close(average_precision(&[0, 1], 2), 1.0));
    }

    #[test]
    fn no_positives_is_zero_not_nan() {
        assert_eq!(average_precision(&[], 0), 0.0);
        let s = score_ranking(&[0, 1, 2], &[], &[], &[1, 5]);
        assert_eq!(s.ap, 0.0);
        assert_eq!(s.precision_at, vec![0.0, 0.0]);
    }

    #[test]
    fn junk_removed_before_scoring() {
        // SPEC 7: ranking [J, P, N, P] -> AP 0.791667, P@[1, 2, 5] = [1, 0.5, 0.6667].
        let (j, p1, n, p2) = (10, 11, 12, 13);
        let s = score_ranking(&[j, p1, n, p2], &[p1, p2], &[j], &[1, 2, 5]);
        assert!(close(s.ap, 0.791667), "{}", s.ap);
        let want = [1.0, 0.5, 2.0 / 3.0];
        for (got, want) in s.precision_at.iter().zip(want) {
            assert!(close(*got, want), "{:?}", s.precision_at);
        }
    }

    #[test]
    fn three_protocols_on_spec_example() {
        // SPEC 7: ranking [E, H, N, J, H] with easy {0}, hard {1, 4}, junk {3}.
        let ranking = [0, 1, 2, 3, 4];
        let (easy, hard, junk) = (vec![0], vec![1, 4], vec![3]);
        let want = [
            (Protocol::Easy, 1.0),
            (Protocol::Medium, 0.902778),
            (Protocol::Hard, 0.791667),
        ];
        for (protocol, want_ap) in want {
            let (pos, jk) = protocol.split(&easy, &hard, &junk);
            let s = score_ranking(&ranking, &pos, &jk, &[1, 5, 10]);
            assert!(close(s.ap, want_ap), "{protocol:?}: {}", s.ap);
            if protocol == Protocol::Medium {
                let want_p = [1.0, 0.75, 0.75];
                for (got, want) in s.precision_at.iter().zip(want_p) {
                    assert!(close(*got, want), "{:?}", s.precision_at);
                }
            }
        }
    }

    #[test]
    fn positive_listed_as_junk_stays_positive() {
        // compute_map finds 1 both as positive and as junk; it is not shifted by itself.
        let s = score_ranking(&[0, 1], &[1], &[1], &[1]);
        assert!(close(s.ap, 0.25));
    }

    #[test]
    fn matches_a_naive_precision_recall_sum() {
        // Second implementation: build the junk-free hit list, then sum trapezoids from
        // the running counts.
        let ranking = [5, 3, 9, 0, 7, 1, 8, 2, 6, 4];
        let positives = [3, 7, 2, 11]; // 11 never retrieved
        let junk = [9, 6];
        let hits: Vec<bool> = ranking
            .iter()
            .filter(|i| !junk.contains(i))
            .map(|i| positives.contains(i))
            .collect();
        let mut ap = 0.0;
        let mut found = 0.0;
        for (rank, &hit) in hits.iter().enumerate() {
            if hit {
                let before = if rank == 0 { 1.0 } else { found / rank as f64 };
                found += 1.0;
                let after = found / (rank + 1) as f64;
                ap += (before + after) / (2.0 * positives.len() as f64);
            }
        }
        let s = score_ranking(&ranking, &positives, &junk, &[1]);
        assert!(close(s.ap, ap), "{} vs {ap}", s.ap);
    }

    #[test]
    fn protocol_names_and_order() {
        let names: Vec<_> = Protocol::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["easy", "medium", "hard"]);
        assert_eq!(
            serde_json::to_string(&Protocol::Medium).ok().as_deref(),
            Some("\"medium\"")
        );
    }
}
