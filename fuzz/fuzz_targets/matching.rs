//! Fuzzes the patch matcher (`match_patches`, `batch_matches`, `subsample`): random boxes
//! inside a random image (as `pwself-engine match` checks them with `check_inside`), grids of
//! 0 to `MAX_GRID` patches per side (and, for pairs with few matches, 65280 to
//! `MAX_MATCH_GRID`, the largest whose tokens fit a u32), both rules. No panic, and the
//! invariants of SPEC.md section 3 and tests/matching.rs hold:
//! - two equal-length lists, both starting with CLS (0), patch tokens in `1..=grid^2`;
//! - each list in source order (rows, then source-image columns) strictly increasing;
//! - swapping the two views swaps the lists;
//! - paper rule, checked against an independent i128 count: every matched patch row/column is
//!   more than half inside the intersection, and the number of pairs is
//!   `1 + min(rows_a, rows_b) * min(cols_a, cols_b)` over the rows/columns that are;
//! - `batch_matches` gives `n_global * (views - 1)` pairs equal to `match_patches`, or an error
//!   when the grids do not fit the views;
//! - `subsample` keeps `n_small` strictly increasing positions below `n_big`, first and last
//!   included.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pwself_engine::views::config::MAX_GRID;
use pwself_engine::views::crop::CropRecord;
use pwself_engine::views::matching::{
    batch_matches, check_grid, match_patches, subsample, MatchRule, MAX_MATCH_GRID,
};

#[derive(Arbitrary, Debug)]
struct RawBox {
    top: u32,
    left: u32,
    height: u32,
    width: u32,
    flipped: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    image_h: u32,
    image_w: u32,
    a: RawBox,
    b: RawBox,
    grid_a: u16,
    grid_b: u16,
    official: bool,
    more: Vec<(RawBox, u16)>,
    n_global: u8,
    n_big: u32,
    n_small: u32,
    /// Grids just below and above 2^16 patches per side (only pairs with few matches are
    /// run): what `pwself-engine match --view-sides` allows, beyond the trainer's MAX_GRID.
    big: Option<(u16, u16)>,
}

/// A non-empty box inside an `h x w` image (what `CropRecord::check_inside` accepts).
fn boxed(r: &RawBox, h: u32, w: u32) -> CropRecord {
    let height = 1 + r.height % h;
    let width = 1 + r.width % w;
    let c = CropRecord {
        top: r.top % (h - height + 1),
        left: r.left % (w - width + 1),
        height,
        width,
        flipped: r.flipped,
    };
    c.check_inside(h, w, "box")
        .expect("the harness builds boxes inside the image");
    c
}

fn grid(g: u16) -> u32 {
    u32::from(g) % (MAX_GRID as u32 + 1)
}

/// Patch rows (or columns) `0..grid` of a box `[lo, lo + extent)` that the intersection
/// `[ilo, ihi)` covers more than half of, by direct i128 geometry in units of 1/grid pixel.
/// As a flag per row (column), so that membership is O(1).
fn covered(grid: u32, lo: u32, extent: u32, ilo: u32, ihi: u32) -> Vec<bool> {
    let (g, e) = (i128::from(grid), i128::from(extent));
    let (ilo, ihi) = (i128::from(ilo) * g, i128::from(ihi) * g);
    (0..grid)
        .map(|c| {
            let p0 = i128::from(lo) * g + i128::from(c) * e;
            let p1 = p0 + e;
            let overlap = (p1.min(ihi) - p0.max(ilo)).max(0);
            2 * overlap > e
        })
        .collect()
}

fn count(flags: &[bool]) -> usize {
    flags.iter().filter(|&&f| f).count()
}

fn check(a: &CropRecord, ga: u32, b: &CropRecord, gb: u32, rule: MatchRule) {
    let m = match_patches(a, ga, b, gb, rule);
    assert_eq!(m.first.len(), m.second.len());
    assert_eq!((m.first[0], m.second[0]), (0, 0));
    for (list, g, c) in [(&m.first, ga, a), (&m.second, gb, b)] {
        let mut prev: Option<(u32, u32)> = None;
        for &i in &list[1..] {
            assert!(
                i >= 1 && u64::from(i) <= u64::from(g) * u64::from(g),
                "token {i} outside a {g}x{g} grid"
            );
            let (r, col) = ((i - 1) / g, (i - 1) % g);
            let key = (r, if c.flipped { g - 1 - col } else { col });
            if let Some(p) = prev {
                assert!(p < key, "not in source order: {p:?} then {key:?}");
            }
            prev = Some(key);
        }
    }
    let s = match_patches(b, gb, a, ga, rule);
    assert_eq!(s.first, m.second, "not symmetric");
    assert_eq!(s.second, m.first, "not symmetric");
    if rule == MatchRule::Paper {
        let top = a.top.max(b.top);
        let bottom = (a.top + a.height).min(b.top + b.height);
        let left = a.left.max(b.left);
        let right = (a.left + a.width).min(b.left + b.width);
        let want = if top >= bottom || left >= right || ga == 0 || gb == 0 {
            1
        } else {
            let ra = covered(ga, a.top, a.height, top, bottom);
            let rb = covered(gb, b.top, b.height, top, bottom);
            let ca = covered(ga, a.left, a.width, left, right);
            let cb = covered(gb, b.left, b.width, left, right);
            for (list, g, c, rows, cols) in
                [(&m.first, ga, a, &ra, &ca), (&m.second, gb, b, &rb, &cb)]
            {
                for &i in &list[1..] {
                    let (r, col) = ((i - 1) / g, (i - 1) % g);
                    let col = if c.flipped { g - 1 - col } else { col };
                    assert!(
                        rows[r as usize],
                        "row {r} of {c:?} is not more than half inside"
                    );
                    assert!(
                        cols[col as usize],
                        "column {col} of {c:?} is not more than half inside"
                    );
                }
            }
            1 + count(&ra).min(count(&rb)) * count(&ca).min(count(&cb))
        };
        assert_eq!(m.len(), want, "pair count");
    }
}

fuzz_target!(|input: Input| {
    let h = input.image_h.max(1);
    let w = input.image_w.max(1);
    let a = boxed(&input.a, h, w);
    let b = boxed(&input.b, h, w);
    let (ga, gb) = (grid(input.grid_a), grid(input.grid_b));
    let rule = if input.official {
        MatchRule::Official
    } else {
        MatchRule::Paper
    };
    check(&a, ga, &b, gb, rule);

    if let Some((x, y)) = input.big {
        // Beyond MAX_MATCH_GRID the tokens do not fit a u32: refused by check_grid (and
        // match_patches panics by contract), so only the allowed top of the range is run.
        let (ga, gb) = (65_280 + u32::from(x) % 512, 65_280 + u32::from(y) % 512);
        assert_eq!(check_grid(ga, "a").is_ok(), ga <= MAX_MATCH_GRID);
        let (ga, gb) = (ga.min(MAX_MATCH_GRID), gb.min(MAX_MATCH_GRID));
        let top = a.top.max(b.top);
        let bottom = (a.top + a.height).min(b.top + b.height);
        let left = a.left.max(b.left);
        let right = (a.left + a.width).min(b.left + b.width);
        if top < bottom && left < right {
            let n = |g: u32, c: &CropRecord| {
                count(&covered(g, c.top, c.height, top, bottom))
                    * count(&covered(g, c.left, c.width, left, right))
            };
            // Keep the output small: the pair count is at most either view's covered block.
            if n(ga, &a).min(n(gb, &b)) <= 4096 {
                check(&a, ga, &b, gb, rule);
            }
        }
    }

    // A batch of up to 8 views (small grids: the cost is quadratic in the views).
    let mut crops = vec![a, b];
    let mut grids = vec![ga % 33, gb % 33];
    for (r, g) in input.more.iter().take(6) {
        crops.push(boxed(r, h, w));
        grids.push(grid(*g) % 33);
    }
    let n_global = usize::from(input.n_global % 10);
    let skip_grid = input.n_global >= 250;
    let gs = if skip_grid { &grids[1..] } else { &grids[..] };
    match batch_matches(&crops, gs, n_global, rule) {
        Ok(pairs) => {
            assert!(!skip_grid && n_global <= crops.len());
            assert_eq!(pairs.len(), n_global * (crops.len() - 1));
            for p in &pairs {
                assert!(p.teacher_view < n_global && p.student_view != p.teacher_view);
                let (i, j) = (p.teacher_view, p.student_view);
                assert_eq!(
                    p.matches,
                    match_patches(&crops[i], grids[i], &crops[j], grids[j], rule)
                );
            }
        }
        Err(e) => {
            assert!(skip_grid || n_global > crops.len(), "{e}");
        }
    }

    let n_big = (input.n_big % 100_000) as usize;
    let n_small = (input.n_small as usize) % (n_big + 1);
    let pick = subsample(rule, n_big, n_small);
    assert_eq!(pick.len(), n_small);
    assert!(
        pick.windows(2).all(|p| p[0] < p[1]),
        "subsample({n_big}, {n_small}) not increasing"
    );
    assert!(pick.iter().all(|&i| i < n_big));
    if n_small >= 1 {
        assert_eq!(pick[0], 0);
    }
    if n_small >= 2 {
        assert_eq!(pick[n_small - 1], n_big - 1);
    }
});
