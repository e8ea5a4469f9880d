//! Patch matching (SPEC.md section 3): which token of one view sees the same part of the
//! source image as which token of another.
//!
//! A pure function of two crop records and the two patch grids; O(P) integer work per
//! pair, no pixels involved. Two rules:
//! - [`MatchRule::Paper`] (default): a patch row/column is inside the boxes' intersection
//!   when the intersection covers more than half of it, decided in exact integer
//!   arithmetic; subsampling of the longer run by `floor(k (n_big-1) / (n_small-1))`,
//!   also exact.
//! - [`MatchRule::Official`]: the authors' released code, bit for bit, float64 quirks
//!   included (ties-to-even rounding of start and count separately, the flipped
//!   overshoot that empties the run, float64 `linspace` floors).
//!
//! Tokens are numbered `0` (CLS) and `1 + row * P + col` in each view's own layout (a
//! flipped view's column 0 shows the source's right edge). Output pairs are in source
//! order: rows top to bottom, then columns left to right in the source image.

use crate::error::{Error, Result};
use crate::views::crop::CropRecord;

/// Which matching rule to apply.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MatchRule {
    /// The paper's rule with exact arithmetic.
    #[default]
    Paper,
    /// The released code's rule, float64 behaviour included (for comparisons with it).
    Official,
}

/// Matched token indices of two views: `first[m]` of view 1 pairs with `second[m]` of
/// view 2. Both start with 0 (CLS) and have equal length.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Matches {
    pub first: Vec<u32>,
    pub second: Vec<u32>,
}

impl Matches {
    /// Only the CLS pair.
    pub fn cls_only() -> Matches {
        Matches {
            first: vec![0],
            second: vec![0],
        }
    }
    /// Number of matched pairs, CLS included.
    pub fn len(&self) -> usize {
        self.first.len()
    }
    /// Always false: the CLS pair is always there.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

/// The most patches per side a view may have here: token `1 + row * P + col` of a
/// `P x P` grid must fit the `u32` of [`Matches`], so `P * P <= u32::MAX`. The trainer's
/// views stay far below ([`crate::views::config::MAX_GRID`]); `pwself-engine match` takes
/// any `--view-sides`, so it must check with [`check_grid`].
pub const MAX_MATCH_GRID: u32 = 65_535;

/// Refuses a grid of more than [`MAX_MATCH_GRID`] patches per side; `field` names the
/// setting in the error.
pub fn check_grid(grid: u32, field: &str) -> Result<()> {
    if grid > MAX_MATCH_GRID {
        return Err(Error::bad_config(
            field,
            format!(
                "{grid} patches per side is more than the {MAX_MATCH_GRID} whose token \
                 indices fit 32 bits: use a smaller view side or a larger patch"
            ),
        ));
    }
    Ok(())
}

/// The matched tokens of two views of one source image.
/// `grid_a` / `grid_b` are the patches per side of each view (`side / patch_size`).
///
/// # Panics
/// If a grid exceeds [`MAX_MATCH_GRID`] (its token indices would not fit a `u32`); check
/// user-given grids with [`check_grid`] first.
pub fn match_patches(
    a: &CropRecord,
    grid_a: u32,
    b: &CropRecord,
    grid_b: u32,
    rule: MatchRule,
) -> Matches {
    assert!(
        grid_a <= MAX_MATCH_GRID && grid_b <= MAX_MATCH_GRID,
        "match_patches: grids {grid_a} and {grid_b} must be at most {MAX_MATCH_GRID} \
         patches per side (check them with check_grid)"
    );
    let top = a.top.max(b.top);
    let bottom = a.bottom().min(b.bottom());
    let left = a.left.max(b.left);
    let right = a.right().min(b.right());
    if top >= bottom || left >= right || grid_a == 0 || grid_b == 0 {
        return Matches::cls_only();
    }
    // Runs of rows / columns inside the intersection, in source order, as indices into
    // each view's own grid (columns of a flipped view already mirrored).
    let rows_a = axis_run(rule, grid_a, a.top, a.height, top, bottom, false);
    let rows_b = axis_run(rule, grid_b, b.top, b.height, top, bottom, false);
    let cols_a = axis_run(rule, grid_a, a.left, a.width, left, right, a.flipped);
    let cols_b = axis_run(rule, grid_b, b.left, b.width, left, right, b.flipped);
    let (rows_a, rows_b) = pair_up(rule, &rows_a, &rows_b);
    let (cols_a, cols_b) = pair_up(rule, &cols_a, &cols_b);

    let n = 1 + rows_a.len() * cols_a.len();
    let mut m = Matches {
        first: Vec::with_capacity(n),
        second: Vec::with_capacity(n),
    };
    m.first.push(0);
    m.second.push(0);
    for (&ra, &rb) in rows_a.iter().zip(&rows_b) {
        for (&ca, &cb) in cols_a.iter().zip(&cols_b) {
            m.first.push(1 + ra * grid_a + ca);
            m.second.push(1 + rb * grid_b + cb);
        }
    }
    m
}

/// The patch indices (in the view's own grid) of the rows or columns that lie inside
/// `[inter_lo, inter_hi)`, listed in source order. `crop_lo`/`extent` describe the
/// view's box on this axis; `flipped` mirrors the columns of a flipped view.
fn axis_run(
    rule: MatchRule,
    grid: u32,
    crop_lo: u32,
    extent: u32,
    inter_lo: u32,
    inter_hi: u32,
    flipped: bool,
) -> Vec<u32> {
    match rule {
        MatchRule::Paper => {
            // Patch c spans [c*E, (c+1)*E) in units of 1/P pixels (E = extent); the
            // intersection spans [P*(lo-crop), P*(hi-crop)). Inside when covered > E/2.
            let (p, e) = (i64::from(grid), i64::from(extent));
            let a = p * (i64::from(inter_lo) - i64::from(crop_lo));
            let b = p * (i64::from(inter_hi) - i64::from(crop_lo));
            let inside = |c: i64| 2 * (b.min((c + 1) * e) - a.max(c * e)) > e;
            // Coverage is unimodal in c, so the inside patches form one run.
            let run: Vec<u32> = (0..p).filter(|&c| inside(c)).map(|c| c as u32).collect();
            if flipped {
                run.iter().map(|&c| grid - 1 - c).collect()
            } else {
                run
            }
        }
        MatchRule::Official => {
            let p = f64::from(grid);
            let start = (p * ((f64::from(inter_lo) - f64::from(crop_lo)) / f64::from(extent)))
                .round_ties_even() as i64;
            let count = (p * ((f64::from(inter_hi) - f64::from(inter_lo)) / f64::from(extent)))
                .round_ties_even() as i64;
            let end = start + count;
            let g = i64::from(grid);
            if flipped {
                // view[:, P-end : P-start], a Python slice (negative start wraps, so an
                // overshooting end empties the run), then reversed into source order.
                let r = python_slice(g, g - end, g - start);
                r.rev().map(|c| c as u32).collect()
            } else {
                (start.max(0)..end.min(g)).map(|c| c as u32).collect()
            }
        }
    }
}

/// The index range a Python slice `[start:stop]` selects from a sequence of length `len`.
fn python_slice(len: i64, start: i64, stop: i64) -> std::ops::Range<i64> {
    let norm = |x: i64| if x < 0 { (x + len).max(0) } else { x.min(len) };
    let (s, e) = (norm(start), norm(stop));
    s..e.max(s)
}

/// Pairs two runs of equal or unequal length: the longer run keeps `n_small` evenly
/// spaced entries (first and last always), the shorter keeps all.
fn pair_up(rule: MatchRule, a: &[u32], b: &[u32]) -> (Vec<u32>, Vec<u32>) {
    if a.len() >= b.len() {
        let pick = subsample(rule, a.len(), b.len());
        (pick.iter().map(|&i| a[i]).collect(), b.to_vec())
    } else {
        let pick = subsample(rule, b.len(), a.len());
        (a.to_vec(), pick.iter().map(|&i| b[i]).collect())
    }
}

/// Which of `n_big` positions pair with `n_small` (`n_small <= n_big`).
pub fn subsample(rule: MatchRule, n_big: usize, n_small: usize) -> Vec<usize> {
    match n_small {
        0 => Vec::new(),
        1 => vec![0],
        _ => match rule {
            MatchRule::Paper => (0..n_small)
                .map(|k| k * (n_big - 1) / (n_small - 1))
                .collect(),
            MatchRule::Official => {
                // numpy.linspace(0, n_big - 1, n_small): k * step, the last set to the end.
                let step = (n_big - 1) as f64 / (n_small - 1) as f64;
                (0..n_small)
                    .map(|k| {
                        if k == n_small - 1 {
                            n_big - 1
                        } else {
                            (k as f64 * step).floor() as usize
                        }
                    })
                    .collect()
            }
        },
    }
}

/// One teacher/student pair of views in a batch and their matched tokens.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PairMatches {
    /// Index of the teacher's view (one of the global views).
    pub teacher_view: usize,
    /// Index of the student's view (any view but the teacher's).
    pub student_view: usize,
    /// `matches.first` indexes the teacher view's tokens, `matches.second` the student's.
    pub matches: Matches,
}

/// All teacher/student pairs of a batch: for each global view `i < n_global` and each
/// view `j != i`, the matches between them. With 2 global and 8 local views that is
/// 2 global-global + 16 global-local = 18 pairs. `grids[v]` is view `v`'s patches per side.
pub fn batch_matches(
    crops: &[CropRecord],
    grids: &[u32],
    n_global: usize,
    rule: MatchRule,
) -> Result<Vec<PairMatches>> {
    if crops.len() != grids.len() {
        return Err(Error::bad_config(
            "views",
            format!(
                "{} crop records but {} grids: give one grid per view",
                crops.len(),
                grids.len()
            ),
        ));
    }
    if n_global > crops.len() {
        return Err(Error::bad_config(
            "views.global_count",
            format!(
                "{n_global} teacher views but only {} views in all",
                crops.len()
            ),
        ));
    }
    for (v, &g) in grids.iter().enumerate() {
        check_grid(g, &format!("views (grid of view {v})"))?;
    }
    let mut pairs = Vec::with_capacity(n_global * crops.len().saturating_sub(1));
    for i in 0..n_global {
        for j in (0..crops.len()).filter(|&j| j != i) {
            let matches = match_patches(&crops[i], grids[i], &crops[j], grids[j], rule);
            pairs.push(PairMatches {
                teacher_view: i,
                student_view: j,
                matches,
            });
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crop(top: u32, left: u32, height: u32, width: u32) -> CropRecord {
        CropRecord {
            top,
            left,
            height,
            width,
            flipped: false,
        }
    }

    /// Found by fuzz/fuzz_targets/matching.rs: with 65536 patches per side the last
    /// token, 1 + 65535 * 65536 + 65535 = 2^32, overflowed (a panic in debug builds, token 0,
    /// the CLS index, in release). The largest allowed grid's last token is 65535^2.
    #[test]
    fn largest_grid_numbers_its_last_patch_exactly() {
        let g = MAX_MATCH_GRID;
        let whole = crop(0, 0, g, g);
        let corner = crop(g - 1, g - 1, 1, 1);
        for rule in [MatchRule::Paper, MatchRule::Official] {
            let m = match_patches(&whole, g, &corner, 1, rule);
            assert_eq!(m.first, vec![0, 65_535 * 65_535], "{rule:?}");
            assert_eq!(m.second, vec![0, 1], "{rule:?}");
        }
        assert!(check_grid(g, "--view-sides").is_ok());
        let e = check_grid(g + 1, "--view-sides").unwrap_err().to_string();
        assert!(e.contains("--view-sides") && e.contains("65536"), "{e}");
    }

    #[test]
    #[should_panic(expected = "at most 65535")]
    fn grid_beyond_the_token_range_panics_with_a_message() {
        let big = MAX_MATCH_GRID + 1;
        match_patches(
            &crop(0, 0, big, big),
            big,
            &crop(big - 1, big - 1, 1, 1),
            1,
            MatchRule::Paper,
        );
    }

    #[test]
    fn batch_matches_refuses_a_grid_beyond_the_token_range() {
        let c = crop(0, 0, 8, 8);
        let e = batch_matches(&[c, c], &[4, MAX_MATCH_GRID + 1], 1, MatchRule::Paper)
            .unwrap_err()
            .to_string();
        assert!(e.contains("grid of view 1"), "{e}");
    }
}
