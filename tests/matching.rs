//! Patch matching against known answers (the paper's worked example, hand-worked boxes,
//! numpy's float64 linspace) and properties over random boxes.

use proptest::prelude::*;
use pwself_engine::views::crop::CropRecord;
use pwself_engine::views::matching::{batch_matches, match_patches, subsample, MatchRule};

fn crop(top: u32, left: u32, height: u32, width: u32, flipped: bool) -> CropRecord {
    CropRecord {
        top,
        left,
        height,
        width,
        flipped,
    }
}

/// (row, col) of token `idx` in the view's own layout.
fn rc(idx: u32, grid: u32) -> (u32, u32) {
    ((idx - 1) / grid, (idx - 1) % grid)
}

#[test]
fn paper_worked_example_rows_and_columns() {
    // 4 rows vs 3 -> rows 1, 2, 4 (1-based); 6 columns vs 4 -> 1, 2, 4, 6.
    assert_eq!(subsample(MatchRule::Paper, 4, 3), vec![0, 1, 3]);
    assert_eq!(subsample(MatchRule::Paper, 6, 4), vec![0, 1, 3, 5]);
    assert_eq!(subsample(MatchRule::Official, 4, 3), vec![0, 1, 3]);
    assert_eq!(subsample(MatchRule::Official, 6, 4), vec![0, 1, 3, 5]);
    assert_eq!(subsample(MatchRule::Paper, 5, 1), vec![0]);
    assert!(subsample(MatchRule::Paper, 5, 0).is_empty());

    // The same subsampling through whole boxes. View A: grid 16 over a 64x64 box (4-px
    // patches). View B: grid 3 over a 12x24 box (4-px rows, 8-px columns).
    let a = crop(0, 0, 64, 64, false); // grid 16: 4 px per patch
    let b = crop(0, 0, 12, 24, false);
    let m = match_patches(&a, 16, &b, 3, MatchRule::Paper);
    // Intersection [0,12) x [0,24): A covers rows 0..3 (3 rows), columns 0..6 (6);
    // B covers its 3 rows and 3 columns. Rows pair 1:1; A's columns subsample 6 -> 3:
    // floor(k*5/2) = 0, 2, 5.
    let a_cells: Vec<(u32, u32)> = m.first[1..].iter().map(|&i| rc(i, 16)).collect();
    let b_cells: Vec<(u32, u32)> = m.second[1..].iter().map(|&i| rc(i, 3)).collect();
    let mut want_a = Vec::new();
    let mut want_b = Vec::new();
    for r in 0..3 {
        for (k, c) in [0, 2, 5].into_iter().enumerate() {
            want_a.push((r, c));
            want_b.push((r, k as u32));
        }
    }
    assert_eq!(a_cells, want_a);
    assert_eq!(b_cells, want_b);
    assert_eq!((m.first[0], m.second[0]), (0, 0));
}

#[test]
fn paper_example_four_rows_against_three() {
    // A: 4 rows of 4 px inside the intersection; B: 3 rows. Rows 0, 1, 3 of A pair with
    // B's 0, 1, 2 (the paper's "rows 1, 2, 4").
    let a = crop(0, 0, 32, 32, false); // grid 8, 4 px per patch
    let b = crop(0, 0, 16, 32, false); // grid 3 -> rows of 16/3 px, columns of 32/3 px
    let m = match_patches(&a, 8, &b, 3, MatchRule::Paper);
    let rows_a: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 8).0).collect();
    let mut uniq = rows_a.clone();
    uniq.dedup();
    assert_eq!(uniq, vec![0, 1, 3]);
}

#[test]
fn identical_boxes_match_identically() {
    for flipped in [false, true] {
        let c = crop(5, 7, 100, 120, flipped);
        for rule in [MatchRule::Paper, MatchRule::Official] {
            let m = match_patches(&c, 14, &c, 14, rule);
            assert_eq!(m.first, m.second);
            assert_eq!(m.len(), 1 + 14 * 14);
            let mut sorted = m.first.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..=196).collect::<Vec<u32>>());
        }
    }
}

#[test]
fn no_overlap_gives_cls_only() {
    let a = crop(0, 0, 50, 50, false);
    let b = crop(50, 0, 50, 50, true); // touching edge, half-open: empty
    let c = crop(0, 60, 40, 40, false);
    for rule in [MatchRule::Paper, MatchRule::Official] {
        assert_eq!(match_patches(&a, 14, &b, 6, rule).first, vec![0]);
        assert_eq!(match_patches(&a, 14, &c, 6, rule).second, vec![0]);
    }
}

#[test]
fn flipped_view_pairs_mirrored_columns() {
    // Both boxes identical, one flipped: source column c is column P-1-c in the flipped
    // view, so token (r, c) of A pairs with (r, P-1-c) of B.
    let a = crop(0, 0, 64, 64, false);
    let b = crop(0, 0, 64, 64, true);
    let m = match_patches(&a, 4, &b, 4, MatchRule::Paper);
    for (&i, &j) in m.first.iter().zip(&m.second).skip(1) {
        let (ra, ca) = rc(i, 4);
        let (rb, cb) = rc(j, 4);
        assert_eq!((rb, cb), (ra, 3 - ca));
    }
    // Left half of a flipped box: its columns 2, 3 (which show the source's left half).
    let half = crop(0, 0, 64, 32, false);
    let m = match_patches(&half, 2, &b, 4, MatchRule::Paper);
    let cols: Vec<u32> = m.second[1..].iter().map(|&j| rc(j, 4).1).collect();
    assert_eq!(
        cols,
        vec![3, 2, 3, 2],
        "source order: left to right is view column 3 then 2"
    );
}

#[test]
fn one_row_intersection() {
    // Intersection 8 px tall; A has 16-px rows (a single row covered half -> not inside
    // under the paper rule), B has 8-px rows (exactly one row).
    let a = crop(0, 0, 64, 64, false); // grid 4: 16 px patches
    let b = crop(56, 0, 64, 64, false); // grid 8: 8 px patches; rows overlap [56, 64)
    let m = match_patches(&a, 4, &b, 8, MatchRule::Paper);
    // A's row 3 spans [48, 64): covered 8 of 16 = exactly half -> outside: CLS only.
    assert_eq!(m.first, vec![0]);
    let b2 = crop(52, 0, 64, 64, false); // overlap [52, 64): 12 of A's 16 -> inside
    let m = match_patches(&a, 4, &b2, 8, MatchRule::Paper);
    let rows_a: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 4).0).collect();
    assert!(rows_a.iter().all(|&r| r == 3) && !rows_a.is_empty());
    // B2 rows: [52,60) fully inside, [60,68) covers 4 of 8 = half -> outside. One row.
    let rows_b: Vec<u32> = m.second[1..].iter().map(|&j| rc(j, 8).0).collect();
    assert!(rows_b.iter().all(|&r| r == 0));
    assert_eq!(
        m.len(),
        1 + 4,
        "one row of 4 columns (8 columns subsampled to A's 4)"
    );
}

#[test]
fn paper_floor_is_exact_where_float64_is_not() {
    // numpy: floor(linspace(0, 30, 23))[11] == 14 because 11 * (30/22) = 14.999999999999998;
    // the exact floor(11 * 30 / 22) is 15. Values below were printed by numpy 2.4.6:
    // np.floor(np.linspace(0, 30, 23)).astype(int).tolist()
    let numpy = vec![
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 19, 20, 21, 23, 24, 25, 27, 28, 30,
    ];
    let exact = vec![
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15, 16, 17, 19, 20, 21, 23, 24, 25, 27, 28, 30,
    ];
    assert_eq!(subsample(MatchRule::Official, 31, 23), numpy);
    assert_eq!(subsample(MatchRule::Paper, 31, 23), exact);
    // Other (n, k) pairs where numpy's floors differ from exact ones (found by comparing
    // numpy against integer arithmetic for all 2 <= k < n <= 64).
    for (n, k) in [
        (31, 27),
        (46, 34),
        (46, 40),
        (53, 47),
        (59, 51),
        (61, 23),
        (63, 59),
    ] {
        assert_ne!(
            subsample(MatchRule::Official, n, k),
            subsample(MatchRule::Paper, n, k),
            "({n}, {k})"
        );
    }
    // ... and everywhere else they agree.
    assert_eq!(
        subsample(MatchRule::Official, 30, 23),
        subsample(MatchRule::Paper, 30, 23)
    );
}

#[test]
fn official_rounds_start_and_count_half_to_even_separately() {
    // P = 14 over a 28-px box: one patch is 2 px. Intersection starting 1 px in:
    // start = round(14 * (1/28)) = round(0.5) = 0 (ties to even, not 1).
    let a = crop(0, 0, 28, 28, false);
    let b = crop(0, 1, 28, 5, false); // inter columns [1, 6): count = round(14*5/28 = 2.5) = 2
    let m = match_patches(&a, 14, &b, 14, MatchRule::Official);
    let mut uniq: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 14).1).collect();
    // Columns [0, 2) of A, subsampled against B's 14 columns -> A keeps both, B 2 of 14.
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq, vec![0, 1]);
    // Start 3 px in: round(1.5) = 2; count for width 5: 2 -> columns [2, 4).
    let b = crop(0, 3, 28, 5, false);
    let m = match_patches(&a, 14, &b, 14, MatchRule::Official);
    let mut cols: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 14).1).collect();
    cols.sort_unstable();
    cols.dedup();
    assert_eq!(cols, vec![2, 3]);
    // The paper rule on the same boxes: columns [3, 8) in px; A's patch 1 = [2,4) is half
    // covered (outside), patches 2, 3 = [4,8) inside.
    let m = match_patches(&a, 14, &b, 14, MatchRule::Paper);
    let mut cols: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 14).1).collect();
    cols.sort_unstable();
    cols.dedup();
    assert_eq!(cols, vec![2, 3]);
}

#[test]
fn official_flipped_overshoot_drops_the_pair_to_cls() {
    // P = 3 over a 10-px box, intersection [5, 10): start = round(1.5) = 2, count =
    // round(1.5) = 2, end = 4 > P. Unflipped the run is clipped to [2, 3); flipped the
    // Python slice [3-4 : 3-2] = [-1:1] is empty, so the pair is CLS only.
    let teacher = crop(0, 0, 10, 10, false);
    let student = crop(0, 5, 10, 5, false);
    let m = match_patches(&teacher, 3, &student, 3, MatchRule::Official);
    assert!(m.len() > 1);
    let cols: Vec<u32> = m.first[1..].iter().map(|&i| rc(i, 3).1).collect();
    assert!(cols.iter().all(|&c| c == 2), "{cols:?}");
    let flipped = crop(0, 0, 10, 10, true);
    assert_eq!(
        match_patches(&flipped, 3, &student, 3, MatchRule::Official).first,
        vec![0]
    );
    // The paper rule keeps the match: column 2 ([6.67, 10) px) is fully inside, which in
    // the flipped view is column 0.
    let m = match_patches(&flipped, 3, &student, 3, MatchRule::Paper);
    assert!(m.first[1..].iter().all(|&i| rc(i, 3).1 == 0) && m.len() > 1);
}

#[test]
fn batch_has_eighteen_pairs() {
    let crops: Vec<CropRecord> = (0..10)
        .map(|v| crop(v * 3, v * 2, 150, 160, v % 2 == 0))
        .collect();
    let mut grids = vec![14, 14];
    grids.extend([6; 8]);
    let pairs = batch_matches(&crops, &grids, 2, MatchRule::Paper).unwrap();
    assert_eq!(pairs.len(), 18);
    assert_eq!(pairs.iter().filter(|p| p.student_view < 2).count(), 2);
    assert!(pairs
        .iter()
        .all(|p| p.teacher_view < 2 && p.teacher_view != p.student_view));
    assert!(batch_matches(&crops, &grids[..9], 2, MatchRule::Paper).is_err());
}

fn arb_box(img: u32) -> impl Strategy<Value = CropRecord> {
    (1..=img, 1..=img, any::<bool>()).prop_flat_map(move |(h, w, f)| {
        (0..=img - h, 0..=img - w).prop_map(move |(t, l)| crop(t, l, h, w, f))
    })
}

fn check_properties(
    a: &CropRecord,
    ga: u32,
    b: &CropRecord,
    gb: u32,
    rule: MatchRule,
) -> Result<(), TestCaseError> {
    let m = match_patches(a, ga, b, gb, rule);
    prop_assert_eq!(m.first.len(), m.second.len());
    prop_assert_eq!((m.first[0], m.second[0]), (0, 0));
    prop_assert!(m.first.iter().all(|&i| i <= ga * ga));
    prop_assert!(m.second.iter().all(|&i| i <= gb * gb));
    prop_assert!(m.first[1..].iter().all(|&i| i >= 1) && m.second[1..].iter().all(|&i| i >= 1));
    // Monotone in source order: (row, source column) strictly increasing.
    for (list, grid, c) in [(&m.first, ga, a), (&m.second, gb, b)] {
        let keys: Vec<(u32, u32)> = list[1..]
            .iter()
            .map(|&i| {
                let (r, col) = rc(i, grid);
                (r, if c.flipped { grid - 1 - col } else { col })
            })
            .collect();
        prop_assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "not in source order: {:?}",
            keys
        );
    }
    // Symmetric under swapping the two views.
    let s = match_patches(b, gb, a, ga, rule);
    prop_assert_eq!(&s.first, &m.second);
    prop_assert_eq!(&s.second, &m.first);
    Ok(())
}

/// Fraction of patch `idx` (rows and columns separately) of view `c` that lies inside the
/// intersection, computed in f64 from pixel geometry: an independent statement of the
/// paper rule's "covers more than half".
fn coverage(c: &CropRecord, grid: u32, idx: u32, inter: (f64, f64, f64, f64)) -> (f64, f64) {
    let (r, col) = rc(idx, grid);
    let col = if c.flipped { grid - 1 - col } else { col };
    let ph = f64::from(c.height) / f64::from(grid);
    let pw = f64::from(c.width) / f64::from(grid);
    let (y0, x0) = (
        f64::from(c.top) + f64::from(r) * ph,
        f64::from(c.left) + f64::from(col) * pw,
    );
    let cov = |lo: f64, hi: f64, a: f64, b: f64| ((hi.min(b) - lo.max(a)).max(0.0)) / (hi - lo);
    (
        cov(y0, y0 + ph, inter.0, inter.1),
        cov(x0, x0 + pw, inter.2, inter.3),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn properties_hold_for_random_boxes(a in arb_box(256), b in arb_box(256), ga in 1u32..20, gb in 1u32..20) {
        check_properties(&a, ga, &b, gb, MatchRule::Paper)?;
        check_properties(&a, ga, &b, gb, MatchRule::Official)?;
    }

    #[test]
    fn paper_rule_selects_patches_more_than_half_inside(a in arb_box(96), b in arb_box(96), ga in 1u32..16, gb in 1u32..16) {
        let m = match_patches(&a, ga, &b, gb, MatchRule::Paper);
        let inter = (
            f64::from(a.top.max(b.top)), f64::from(a.bottom().min(b.bottom())),
            f64::from(a.left.max(b.left)), f64::from(a.right().min(b.right())),
        );
        for (&i, &j) in m.first.iter().zip(&m.second).skip(1) {
            for (c, g, t) in [(&a, ga, i), (&b, gb, j)] {
                let (cy, cx) = coverage(c, g, t, inter);
                prop_assert!(cy > 0.5 - 1e-9 && cx > 0.5 - 1e-9, "patch {} of {:?} covers ({}, {})", t, c, cy, cx);
            }
        }
        // And when both views have a patch row and column more than half inside, the pair
        // is not CLS only (f64 check with a margin that keeps it off exact halves).
        let covered = |c: &CropRecord, g: u32| (0..g * g).any(|t| {
            let (cy, cx) = coverage(c, g, t + 1, inter);
            cy > 0.5 + 1e-9 && cx > 0.5 + 1e-9
        });
        if covered(&a, ga) && covered(&b, gb) {
            prop_assert!(m.len() > 1);
        }
    }
}
