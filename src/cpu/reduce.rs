//! Sums and maxima over a row in a fixed order that the compiler can vectorise.
//!
//! A plain `iter().sum()` adds one element after the other: every addition waits for the
//! one before it (about 4 cycles each), and the compiler may not reorder float additions,
//! so a 64-wide LayerNorm row or a 512-wide softmax row cost a serial chain of that many
//! additions. On the CPU step's profile those chains were most of the LayerNorm's and the
//! loss's time.
//!
//! Here element `i` of a row goes to running partial `i % LANES`, so the `LANES` partials
//! are independent (vector registers, no chain between them); at the end they are
//! combined pairwise, `LANES / 2` apart first. The order depends on the row alone, so the
//! result is the same on every machine, every instruction set the compiler picks and every
//! thread count; it differs from the serial sum only by rounding (both are f32 sums of the
//! same terms).

use std::ops::AddAssign;

/// Running partials per reduction.
pub const LANES: usize = 16;

/// Adds the partials pairwise: lane `l` gets lane `l + w` for `w = LANES/2, ..., 1`.
#[inline(always)]
fn combine<T: Copy + AddAssign>(mut acc: [T; LANES]) -> T {
    let mut w = LANES / 2;
    while w >= 1 {
        for l in 0..w {
            let v = acc[l + w];
            acc[l] += v;
        }
        w /= 2;
    }
    acc[0]
}

/// `sum_i f(a[i], b[i])` with the terms and the partials in `T` (f32 or f64), element `i`
/// into partial `i % LANES`.
#[inline(always)]
fn lane_sum2<T: Copy + Default + AddAssign>(
    name: &str,
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> T,
) -> T {
    assert_eq!(a.len(), b.len(), "{name}: operands differ in length");
    let body = a.len() / LANES * LANES;
    let mut acc = [T::default(); LANES];
    for (ca, cb) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    for (l, (&x, &y)) in a[body..].iter().zip(&b[body..]).enumerate() {
        acc[l] += f(x, y);
    }
    combine(acc)
}

/// `sum_i f(a[i], b[i])` in f32, element `i` into partial `i % LANES`.
///
/// # Panics
/// If `a` and `b` differ in length.
#[inline(always)]
pub fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    lane_sum2("sum_map2", a, b, f)
}

/// `sum_i f(a[i], b[i], c[i])` in f32, element `i` into partial `i % LANES`.
///
/// # Panics
/// If the operands differ in length.
#[inline(always)]
pub fn sum_map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    assert!(
        a.len() == b.len() && a.len() == c.len(),
        "sum_map3: operands differ in length"
    );
    let body = a.len() / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for ((ca, cb), cc) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
        .zip(c[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l], cc[l]);
        }
    }
    for (l, ((&x, &y), &z)) in a[body..].iter().zip(&b[body..]).zip(&c[body..]).enumerate() {
        acc[l] += f(x, y, z);
    }
    combine(acc)
}

/// `sum_i f(a[i])` in f32.
#[inline(always)]
pub fn sum_map(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_map2(a, a, |x, _| f(x))
}

/// `sum_i a[i]` in f32.
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    sum_map(a, |x| x)
}

/// `sum_i a[i] b[i]` in f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_map2(a, b, |x, y| x * y)
}

/// `sum_i f(a[i], b[i])` accumulated in f64 (each term computed by `f`, in f64 or not),
/// element `i` into partial `i % LANES`.
///
/// # Panics
/// If `a` and `b` differ in length.
#[inline(always)]
pub fn sum_map2_f64(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    lane_sum2("sum_map2_f64", a, b, f)
}

/// `sum_i a[i]`, each element widened to f64 and the sum kept in f64.
#[inline]
pub fn sum_f64(a: &[f32]) -> f64 {
    sum_map2_f64(a, a, |x, _| f64::from(x))
}

/// The largest element (NaNs ignored, as `f32::max`); `-inf` for an empty slice. Exact, so
/// the same as a serial fold whatever the order.
#[inline]
pub fn max(a: &[f32]) -> f32 {
    // `if x > m { x } else { m }` rather than `f32::max`: a NaN `x` compares false and is
    // skipped, and `m` is never NaN, so this is `f32::max` here; unlike `f32::max` it is a
    // single vector instruction (no NaN fix-up of either operand).
    #[inline(always)]
    fn keep_larger(m: f32, x: f32) -> f32 {
        if x > m {
            x
        } else {
            m
        }
    }
    let body = a.len() / LANES * LANES;
    let mut acc = [f32::NEG_INFINITY; LANES];
    for c in a[..body].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = keep_larger(acc[l], c[l]);
        }
    }
    for (l, &x) in a[body..].iter().enumerate() {
        acc[l] = keep_larger(acc[l], x);
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, keep_larger)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the lane count and its multiples, and a long row.
    const LENS: [usize; 10] = [0, 1, 7, 15, 16, 17, 33, 64, 511, 2049];

    fn row(n: usize, seed: u32) -> Vec<f32> {
        // Mixed signs and magnitudes, no two equal.
        (0..n)
            .map(|i| {
                let t = (i as f32 + 0.37 * seed as f32) * 0.618_034;
                (t.fract() - 0.5) * (1.0 + (i % 13) as f32)
            })
            .collect()
    }

    #[test]
    fn sums_agree_with_f64_sums() {
        for n in LENS {
            let (a, b, c) = (row(n, 1), row(n, 2), row(n, 3));
            let exact: f64 = a.iter().map(|&x| f64::from(x)).sum();
            let abs: f64 = a.iter().map(|&x| f64::from(x).abs()).sum();
            // f32 summation: error at most about n * eps * sum |x|.
            let tol = (n as f64 + 1.0) * f64::from(f32::EPSILON) * abs;
            assert!((f64::from(sum(&a)) - exact).abs() <= tol, "sum, n = {n}");
            assert!(
                (sum_f64(&a) - exact).abs() <= 1e-12 * (abs + 1.0),
                "sum_f64, n = {n}"
            );
            let dot_exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let dot_abs: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (f64::from(x) * f64::from(y)).abs())
                .sum();
            let tol = (n as f64 + 2.0) * f64::from(f32::EPSILON) * dot_abs;
            assert!(
                (f64::from(dot(&a, &b)) - dot_exact).abs() <= tol,
                "dot, n = {n}"
            );
            let s3: f64 = a
                .iter()
                .zip(&b)
                .zip(&c)
                .map(|((&x, &y), &z)| f64::from(x) * f64::from(y) + f64::from(z))
                .sum();
            let got = sum_map3(&a, &b, &c, |x, y, z| x * y + z);
            let s3_abs: f64 = a
                .iter()
                .zip(&b)
                .zip(&c)
                .map(|((&x, &y), &z)| (f64::from(x) * f64::from(y)).abs() + f64::from(z).abs())
                .sum();
            let tol = (n as f64 + 3.0) * f64::from(f32::EPSILON) * s3_abs;
            assert!((f64::from(got) - s3).abs() <= tol, "sum_map3, n = {n}");
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a).to_bits(), m.to_bits(), "max, n = {n}");
        }
    }

    #[test]
    fn order_is_lane_then_pairwise() {
        // Terms that expose the order: the partial of lane l holds element l plus element
        // l + 16; a serial sum of [1e8, 1, -1e8, 1, ...] would lose the ones differently.
        let mut a = vec![0.0f32; 32];
        a[0] = 1.0e8;
        a[16] = -1.0e8;
        a[1] = 1.0;
        a[17] = 1.0;
        // Lane 0: 1e8 + -1e8 = 0; lane 1: 2; everything else 0.
        assert_eq!(sum(&a), 2.0);
        // Serially: 1e8 + 1 = 1e8 (the 1 is lost), ..., + -1e8 = 0, + 1 = 1.
        assert_eq!(a.iter().sum::<f32>(), 1.0);
    }

    #[test]
    fn max_ignores_nan_and_handles_empty() {
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut a = row(40, 4);
        a[3] = f32::NAN;
        a[20] = 100.0;
        assert_eq!(max(&a), 100.0);
    }
}
