//! The CPU reference kernels (`pwself_engine::cpu`) against independent sources:
//! - every forward against a naive f64 implementation written here (plain loops, no GEMM,
//!   no shared code with the kernels; GELU's erf from its own series);
//! - every backward against central finite differences of that f64 implementation;
//! - known answers (hand-derived PyTorch bicubic weights, normal CDF values);
//! - properties (softmax rows sum to 1, unit rows after weight norm, drop-path keep rate);
//! - bit-identical results for any rayon pool size, GEMMs split among threads included.
//!
//! # Tolerances
//!
//! Gradients: the loss is `L = sum(out * R)` for a fixed random `R`; the numeric gradient
//! is `(L(x + h) - L(x - h)) / 2h` in f64 with `h = 1e-6`: truncation error `~h^2 |L'''|`
//! (about 1e-12) plus rounding `~1e-16 |L| / h` (about 1e-9 for the `|L| < 1e3` here). The
//! analytic gradient is f32: a sum of `K <= 300` products, each rounded with relative
//! error `2^-24 = 6e-8`, so its error is below `K * 6e-8 = 2e-5` of the typical term size,
//! and usually near `sqrt(K) * 6e-8`. We accept `|a - n| <= 1e-4 (|n| + rms(n)) + 1e-6`,
//! where `rms(n)` is the RMS of the checked numeric gradients: 5x above the worst f32 case,
//! and a wrong formula (a missing term, a transposed index, an overwrite instead of `+=`)
//! is off by O(1). Forwards use `1e-5 (|y| + rms(y))` on the same grounds.
//!
//! Every backward is called twice on zeroed buffers and half the result is compared: a
//! kernel that overwrites instead of accumulating is off by a factor 2.

use pwself_engine::cpu::attention::{
    attention_backward, attention_backward_into, attention_forward,
};
use pwself_engine::cpu::drop_path::{
    drop_path_backward, drop_path_forward, drop_path_mask, residual_add_scaled,
    residual_add_scaled_backward, residual_add_scaled_backward_into, residual_add_scaled_into,
};
use pwself_engine::cpu::gelu::{gelu_backward, gelu_backward_into, gelu_forward};
use pwself_engine::cpu::head::{
    l2norm_backward, l2norm_forward, weight_norm_backward, weight_norm_forward, L2NORM_EPS,
};
use pwself_engine::cpu::layernorm::{layernorm_backward, layernorm_forward};
use pwself_engine::cpu::linear::{
    linear_backward, linear_backward_into, linear_forward, linear_gelu_backward_into,
    linear_gelu_forward,
};
use pwself_engine::cpu::patch_embed::{
    add_cls_and_pos, add_cls_and_pos_backward, im2col, pos_embed_backward, pos_embed_forward,
    pos_resample_matrix,
};
use pwself_engine::cpu::zero;
use pwself_engine::rng::{Purpose, Stream};

// ---------------------------------------------------------------------------------------
// Helpers

/// `len` standard normal f32 values from a stream named by `(seed, tag)`, times `scale`.
fn randn(len: usize, seed: u64, tag: u32, scale: f32) -> Vec<f32> {
    let mut s = Stream::new(seed, [tag, 0, 0], Purpose::Noise);
    (0..len).map(|_| scale * s.normal()).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn rms(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt()
    }
}

/// Up to 60 distinct indices into a tensor of `len` elements (all of them when small).
fn sample_indices(len: usize, seed: u64) -> Vec<usize> {
    if len <= 60 {
        return (0..len).collect();
    }
    let mut s = Stream::new(seed, [0xFEED, 0, 0], Purpose::Shuffle);
    let mut idx: Vec<usize> = (0..60).map(|_| s.below(len as u64) as usize).collect();
    idx.sort_unstable();
    idx.dedup();
    idx
}

/// Asserts that an f32 forward output matches its f64 reference (see the module docs).
fn assert_forward_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = rms(want);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * (w.abs() + scale) + 1e-30;
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{what}[{i}]: kernel {g}, f64 reference {w} (tolerance {tol:e})"
        );
    }
}

const H: f64 = 1e-6;

/// Compares analytic gradients with central differences of `L = sum(f(inputs) * r)` in f64.
/// `grads` lists (index into `inputs`, name, analytic gradient after TWO backward calls).
fn check_grads(
    kernel: &str,
    f: &dyn Fn(&[Vec<f64>]) -> Vec<f64>,
    inputs: &[&[f32]],
    grads: &[(usize, &str, &[f32])],
    r: &[f32],
    seed: u64,
) {
    let r = to64(r);
    let mut x: Vec<Vec<f64>> = inputs.iter().map(|v| to64(v)).collect();
    assert_eq!(f(&x).len(), r.len(), "{kernel}: R must match the output");
    for &(which, name, analytic) in grads {
        assert_eq!(analytic.len(), x[which].len(), "{kernel}: d{name} length");
        let idx = sample_indices(analytic.len(), seed ^ which as u64);
        let numeric: Vec<f64> = idx
            .iter()
            .map(|&j| {
                let x0 = x[which][j];
                x[which][j] = x0 + H;
                let lp = dot(&f(&x), &r);
                x[which][j] = x0 - H;
                let lm = dot(&f(&x), &r);
                x[which][j] = x0;
                (lp - lm) / (2.0 * H)
            })
            .collect();
        let scale = rms(&numeric);
        for (&j, &n) in idx.iter().zip(&numeric) {
            let a = 0.5 * f64::from(analytic[j]); // two accumulating calls
            let tol = 1e-4 * (n.abs() + scale) + 1e-6;
            assert!(
                (a - n).abs() <= tol,
                "{kernel}: d{name}[{j}] analytic {a}, finite difference {n} (tolerance {tol:e})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Naive f64 references

// (n, din) @ (dout, din)^T + b -> (n, dout)
fn linear_ref(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; n * dout];
    for i in 0..n {
        for o in 0..dout {
            let mut s = b.map_or(0.0, |b| b[o]);
            for p in 0..din {
                s += x[i * din + p] * w[o * din + p];
            }
            y[i * dout + o] = s;
        }
    }
    y
}

// (n, d) -> (n, d)
fn layernorm_ref(x: &[f64], w: &[f64], b: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * d];
    for i in 0..n {
        let row = &x[i * d..(i + 1) * d];
        let m = row.iter().sum::<f64>() / d as f64;
        let v = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / d as f64;
        for j in 0..d {
            y[i * d + j] = (row[j] - m) / (v + 1e-6).sqrt() * w[j] + b[j];
        }
    }
    y
}

/// erf from its everywhere-convergent series of positive terms,
/// `erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (2n+1)!!` (no cancellation).
fn erf_series(x: f64) -> f64 {
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x * x / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

/// erfc for `z >= 0`: `1 - erf` below 2 (loses at most 2 digits there), else the continued
/// fraction `erfc z = exp(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...))))`.
fn erfc_ref(z: f64) -> f64 {
    if z < 2.0 {
        return 1.0 - erf_series(z);
    }
    let mut t = z;
    for k in (1..=400).rev() {
        t = z + (f64::from(k) / 2.0) / t;
    }
    (-z * z).exp() / std::f64::consts::PI.sqrt() / t
}

/// `x Phi(x)`, with the tail of `Phi` from erfc so it keeps its relative accuracy.
fn gelu_ref(x: &[f64]) -> Vec<f64> {
    let s = std::f64::consts::FRAC_1_SQRT_2;
    x.iter()
        .map(|&v| {
            let phi = if v < 0.0 {
                0.5 * erfc_ref(-v * s)
            } else {
                1.0 - 0.5 * erfc_ref(v * s)
            };
            v * phi
        })
        .collect()
}

// qkv (B, N, 3D) -> out (B, N, D), probs (B, H, N, N)
fn attention_ref(qkv: &[f64], b: usize, n: usize, d: usize, heads: usize) -> (Vec<f64>, Vec<f64>) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let at = |bi: usize, t: usize, col: usize| qkv[(bi * n + t) * 3 * d + col];
    let mut out = vec![0.0; b * n * d];
    let mut probs = vec![0.0; b * heads * n * n];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..n {
                let mut s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|t| at(bi, i, h * hd + t) * at(bi, j, d + h * hd + t))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                for v in s.iter_mut() {
                    *v = (*v - max).exp() / z;
                }
                for t in 0..hd {
                    out[(bi * n + i) * d + h * hd + t] =
                        (0..n).map(|j| s[j] * at(bi, j, 2 * d + h * hd + t)).sum();
                }
                probs[((bi * heads + h) * n + i) * n..((bi * heads + h) * n + i + 1) * n]
                    .copy_from_slice(&s);
            }
        }
    }
    (out, probs)
}

/// Keys' cubic convolution kernel with A = -0.75 (PyTorch's bicubic), at distance `s`.
fn keys_kernel(s: f64) -> f64 {
    let a = -0.75;
    let s = s.abs();
    if s <= 1.0 {
        (a + 2.0) * s * s * s - (a + 3.0) * s * s + 1.0
    } else if s < 2.0 {
        a * s * s * s - 5.0 * a * s * s + 8.0 * a * s - 4.0 * a
    } else {
        0.0
    }
}

/// 2-D bicubic resize of one `(G, G)` plane to `(g, g)`, pixel by pixel, the way PyTorch's
/// `upsample_bicubic2d` (align_corners=False) reads its 4x4 neighbourhood.
fn bicubic_ref(src: &[f64], big_g: usize, g: usize) -> Vec<f64> {
    let ratio = big_g as f64 / g as f64;
    let clamp = |i: i64| i.clamp(0, big_g as i64 - 1) as usize;
    let mut out = vec![0.0; g * g];
    for i in 0..g {
        let sy = (i as f64 + 0.5) * ratio - 0.5;
        let y0 = sy.floor() as i64;
        for j in 0..g {
            let sx = (j as f64 + 0.5) * ratio - 0.5;
            let x0 = sx.floor() as i64;
            let mut acc = 0.0;
            for ty in y0 - 1..=y0 + 2 {
                for tx in x0 - 1..=x0 + 2 {
                    let w = keys_kernel(sy - ty as f64) * keys_kernel(sx - tx as f64);
                    acc += w * src[clamp(ty) * big_g + clamp(tx)];
                }
            }
            out[i * g + j] = acc;
        }
    }
    out
}

// pos (1 + G*G, D) -> (1 + g*g, D)
fn pos_embed_ref(pos: &[f64], g: usize, big_g: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; (1 + g * g) * d];
    out[..d].copy_from_slice(&pos[..d]);
    for c in 0..d {
        let plane: Vec<f64> = (0..big_g * big_g).map(|p| pos[(1 + p) * d + c]).collect();
        for (p, v) in bicubic_ref(&plane, big_g, g).into_iter().enumerate() {
            out[(1 + p) * d + c] = v;
        }
    }
    out
}

// (n, d) -> (n, d)
fn l2norm_ref(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut y = x.to_vec();
    for row in y.chunks_mut(d).take(n) {
        let nrm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= nrm);
    }
    y
}

// ---------------------------------------------------------------------------------------
// linear

#[test]
fn linear_forward_and_backward_match_f64_reference() {
    let shapes = [
        (1, 1, 1),
        (1, 3, 5),
        (7, 5, 3),
        (13, 17, 9),
        (5, 300, 7),
        (9, 4, 130),
    ];
    for (case, &(n, din, dout)) in shapes.iter().enumerate() {
        for bias in [true, false] {
            let seed = 100 + case as u64;
            let x = randn(n * din, seed, 1, 1.0);
            let w = randn(dout * din, seed, 2, 0.5);
            let b = randn(dout, seed, 3, 1.0);
            let r = randn(n * dout, seed, 4, 1.0);
            let mut y = vec![f32::NAN; n * dout];
            linear_forward(&mut y, &x, &w, bias.then_some(&b[..]), n, din, dout);
            let b64 = to64(&b);
            let want = linear_ref(&to64(&x), &to64(&w), bias.then_some(&b64[..]), n, din, dout);
            assert_forward_close(&format!("linear {n}x{din}->{dout}"), &y, &want);

            let (mut dx, mut dw, mut db) =
                (vec![0.0; n * din], vec![0.0; dout * din], vec![0.0; dout]);
            for _ in 0..2 {
                linear_backward(
                    Some(&mut dx),
                    &mut dw,
                    bias.then_some(&mut db[..]),
                    &r,
                    &x,
                    &w,
                    n,
                    din,
                    dout,
                );
            }
            let f =
                |v: &[Vec<f64>]| linear_ref(&v[0], &v[1], bias.then_some(&v[2][..]), n, din, dout);
            let mut grads: Vec<(usize, &str, &[f32])> = vec![(0, "x", &dx), (1, "w", &dw)];
            if bias {
                grads.push((2, "b", &db));
            } else {
                assert!(db.iter().all(|&v| v == 0.0));
            }
            check_grads("linear", &f, &[&x, &w, &b], &grads, &r, seed);

            // Without dx (the patch embedding): the same parameter gradients.
            let (mut dw2, mut db2) = (vec![0.0; dout * din], vec![0.0; dout]);
            for _ in 0..2 {
                linear_backward(None, &mut dw2, Some(&mut db2), &r, &x, &w, n, din, dout);
            }
            assert_eq!(dw, dw2);
            if bias {
                assert_eq!(db, db2);
            }
        }
    }
}

/// Results are bit-identical in rayon pools of 1 and 3 threads: every kernel, at sizes
/// where rows, row blocks of the parameter gradients and columns are split among threads.
#[test]
fn all_kernels_are_bit_identical_across_rayon_pool_sizes() {
    let run = || -> Vec<Vec<f32>> {
        let (n, din, dout) = (1100, 200, 150);
        let x = randn(n * din, 7, 1, 1.0);
        let w = randn(dout * din, 7, 2, 0.1);
        let bias = randn(dout, 7, 3, 1.0);
        let dy = randn(n * dout, 7, 4, 1.0);
        let mut y = vec![0.0; n * dout];
        linear_forward(&mut y, &x, &w, Some(&bias), n, din, dout);
        let (mut dx, mut dw, mut db) = (vec![0.0; n * din], vec![0.0; dout * din], vec![0.0; dout]);
        linear_backward(
            Some(&mut dx),
            &mut dw,
            Some(&mut db),
            &dy,
            &x,
            &w,
            n,
            din,
            dout,
        );

        let lw = randn(din, 7, 5, 1.0);
        let lb = randn(din, 7, 6, 1.0);
        let (mut ly, mut mean, mut rstd) = (vec![0.0; n * din], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut ly, &mut mean, &mut rstd, &x, &lw, &lb, n, din);
        let (mut ldx, mut ldw, mut ldb) = (vec![0.0; n * din], vec![0.0; din], vec![0.0; din]);
        layernorm_backward(
            &mut ldx, &mut ldw, &mut ldb, &x, &x, &mean, &rstd, &lw, n, din,
        );

        let mut gy = vec![0.0; n * din];
        gelu_forward(&mut gy, &x);
        let mut gdx = vec![0.0; n * din];
        gelu_backward(&mut gdx, &ly, &x);

        let (b, t, d, heads) = (3, 37, 48, 4);
        let qkv = randn(b * t * 3 * d, 7, 7, 1.0);
        let dout_a = randn(b * t * d, 7, 8, 1.0);
        let (mut out, mut probs) = (vec![0.0; b * t * d], vec![0.0; b * heads * t * t]);
        attention_forward(&mut out, &mut probs, &qkv, b, t, d, heads);
        let mut dqkv = vec![0.0; b * t * 3 * d];
        attention_backward(&mut dqkv, &dout_a, &qkv, &probs, b, t, d, heads);

        let (mut hy, mut norms) = (vec![0.0; n * din], vec![0.0; n]);
        l2norm_forward(&mut hy, &mut norms, &x, n, din);
        let mut hdx = vec![0.0; n * din];
        l2norm_backward(&mut hdx, &ly, &x, &norms, n, din);
        let (mut wn, mut rn) = (vec![0.0; dout * din], vec![0.0; dout]);
        weight_norm_forward(&mut wn, &mut rn, &w, dout, din);
        let mut dv = vec![0.0; dout * din];
        weight_norm_backward(&mut dv, &dw, &w, &rn, dout, din);

        let (g, pd) = (5, 70);
        let dtok = randn(b * (1 + g * g) * pd, 7, 9, 1.0);
        let (mut dp, mut dc, mut dpv) = (
            vec![0.0; b * g * g * pd],
            vec![0.0; pd],
            vec![0.0; (1 + g * g) * pd],
        );
        add_cls_and_pos_backward(&mut dp, &mut dc, &mut dpv, &dtok, b, g, pd);
        let mut dpos = vec![0.0; (1 + 9 * 9) * pd];
        pos_embed_backward(&mut dpos, &dpv, g, 9, pd);
        vec![
            y, dx, dw, db, ly, mean, rstd, ldx, ldw, ldb, gy, gdx, out, probs, dqkv, hy, hdx, wn,
            dv, dp, dc, dpv, dpos,
        ]
    };
    let in_pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a rayon pool")
            .install(run)
    };
    let one = in_pool(1);
    let three = in_pool(3);
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same && a.len() == b.len(),
            "output {i} differs between 1 and 3 rayon threads"
        );
    }
}

/// The linear layer at the shapes of a training step, large enough that `cpu::gemm` shares
/// each product among rayon tasks in each of its ways: blocks of rows of `C` (the forward
/// and the input gradient over 2,560 tokens), blocks of columns (a `(rows, K)` head output
/// with K = 2,048 > rows) and blocks of the shared dimension, whose partial products are
/// summed (the weight gradient `(out, in)` over 2,560 tokens). Each result is checked against
/// the f64 reference (entries sampled; the tolerance scales with `sqrt(k)` as the module
/// docs explain) and must be bit-identical on pools of 1 and 3 threads.
#[test]
fn split_gemms_match_f64_and_are_bit_identical_across_pool_sizes() {
    for (n, din, dout) in [(2560, 64, 192), (300, 64, 2048), (2560, 64, 64)] {
        let x = randn(n * din, 13, 1, 1.0);
        let w = randn(dout * din, 13, 2, 0.1);
        let dy = randn(n * dout, 13, 3, 1.0);
        let run = || {
            let mut y = vec![0.0; n * dout];
            linear_forward(&mut y, &x, &w, None, n, din, dout);
            let (mut dx, mut dw, mut db) =
                (vec![0.0; n * din], vec![0.5; dout * din], vec![0.25; dout]);
            let db_opt = Some(&mut db[..]);
            linear_backward(Some(&mut dx), &mut dw, db_opt, &dy, &x, &w, n, din, dout);
            (y, dx, dw, db)
        };
        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a rayon pool")
                .install(run)
        };
        let (one, three) = (in_pool(1), in_pool(3));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (what, a, b) in [
            ("y", &one.0, &three.0),
            ("dx", &one.1, &three.1),
            ("dw", &one.2, &three.2),
            ("db", &one.3, &three.3),
        ] {
            assert!(
                bits(a) == bits(b),
                "({n}, {din}, {dout}) {what}: 1 and 3 threads differ"
            );
        }
        // Against f64, on sampled entries: y = x W^T, dx = dy W, dw = 0.5 + dy^T x, and
        // db = 0.25 + the column sums of dy (in row blocks of the parameter gradients).
        let (x64, w64, dy64) = (to64(&x), to64(&w), to64(&dy));
        let (y, dx, dw, db) = one;
        let check = |what: &str, got: f32, want: f64, k: usize, scale: f64| {
            let tol = 1e-6 * (k as f64).sqrt() * scale + 1e-30;
            assert!(
                (f64::from(got) - want).abs() <= tol,
                "({n}, {din}, {dout}) {what}: {got} vs f64 {want} (tolerance {tol:e})"
            );
        };
        for j in sample_indices(n * dout, 1) {
            let (i, o) = (j / dout, j % dout);
            let want: f64 = (0..din).map(|p| x64[i * din + p] * w64[o * din + p]).sum();
            let scale: f64 = (0..din)
                .map(|p| (x64[i * din + p] * w64[o * din + p]).abs())
                .sum();
            check("y", y[j], want, din, scale);
        }
        for j in sample_indices(n * din, 2) {
            let (i, p) = (j / din, j % din);
            let want: f64 = (0..dout)
                .map(|o| dy64[i * dout + o] * w64[o * din + p])
                .sum();
            let scale: f64 = (0..dout)
                .map(|o| (dy64[i * dout + o] * w64[o * din + p]).abs())
                .sum();
            check("dx", dx[j], want, dout, scale);
        }
        for j in sample_indices(dout * din, 3) {
            let (o, p) = (j / din, j % din);
            let want: f64 = 0.5
                + (0..n)
                    .map(|i| dy64[i * dout + o] * x64[i * din + p])
                    .sum::<f64>();
            let scale: f64 = 0.5
                + (0..n)
                    .map(|i| (dy64[i * dout + o] * x64[i * din + p]).abs())
                    .sum::<f64>();
            check("dw", dw[j], want, n, scale);
        }
        for o in sample_indices(dout, 4) {
            let want: f64 = 0.25 + (0..n).map(|i| dy64[i * dout + o]).sum::<f64>();
            let scale: f64 = 0.25 + (0..n).map(|i| dy64[i * dout + o].abs()).sum::<f64>();
            check("db", db[o], want, n, scale);
        }
    }
}

// ---------------------------------------------------------------------------------------
// layernorm

#[test]
fn layernorm_forward_and_backward_match_f64_reference() {
    // (1100, 3): three blocks of the row-blocked weight and bias gradients.
    for (case, &(n, d)) in [(1, 5), (4, 1), (6, 7), (5, 130), (3, 384), (1100, 3)]
        .iter()
        .enumerate()
    {
        let seed = 200 + case as u64;
        // A non-zero mean and a spread other than 1 exercise both statistics.
        let x: Vec<f32> = randn(n * d, seed, 1, 2.0).iter().map(|v| v + 0.7).collect();
        let w = randn(d, seed, 2, 1.0);
        let b = randn(d, seed, 3, 1.0);
        let r = randn(n * d, seed, 4, 1.0);
        let (mut y, mut mean, mut rstd) = (vec![f32::NAN; n * d], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, n, d);
        assert_forward_close(
            "layernorm",
            &y,
            &layernorm_ref(&to64(&x), &to64(&w), &to64(&b), n, d),
        );
        let (mut dx, mut dw, mut db) = (vec![0.0; n * d], vec![0.0; d], vec![0.0; d]);
        for _ in 0..2 {
            layernorm_backward(&mut dx, &mut dw, &mut db, &r, &x, &mean, &rstd, &w, n, d);
        }
        let f = |v: &[Vec<f64>]| layernorm_ref(&v[0], &v[1], &v[2], n, d);
        check_grads(
            "layernorm",
            &f,
            &[&x, &w, &b],
            &[(0, "x", &dx), (1, "w", &dw), (2, "b", &db)],
            &r,
            seed,
        );
    }
}

// ---------------------------------------------------------------------------------------
// gelu

#[test]
fn gelu_matches_known_values_and_f64_reference() {
    // x * Phi(x) with Phi(0.5) = 0.6914624612740131, Phi(1) = 0.8413447460685429,
    // Phi(2) = 0.9772498680518208, Phi(-5) = 2.866515718791946e-07,
    // Phi(-8) = 6.220960574271819e-16 (Python: `0.5 * math.erfc(-x / math.sqrt(2))`).
    // The tail values check that the kernel does not lose them to the cancellation in
    // `1 + erf(x / sqrt 2)`.
    let x = [0.0f32, 0.5, 1.0, -1.0, 2.0, -2.0, -5.0, -8.0];
    let want: [f64; 8] = [
        0.0,
        0.5 * 0.691_462_461_274_013_1,
        0.841_344_746_068_542_9,
        -(1.0 - 0.841_344_746_068_542_9),
        2.0 * 0.977_249_868_051_820_8,
        -2.0 * (1.0 - 0.977_249_868_051_820_8),
        -5.0 * 2.866_515_718_791_946e-7,
        -8.0 * 6.220_960_574_271_819e-16,
    ];
    let mut y = [0.0f32; 8];
    gelu_forward(&mut y, &x);
    let reference = gelu_ref(&to64(&x));
    for i in 0..8 {
        let tol = 1e-13 * want[i].abs();
        assert!(
            (reference[i] - want[i]).abs() <= tol,
            "reference gelu({}) = {}, want {}",
            x[i],
            reference[i],
            want[i]
        );
        let tol = 1e-7 * want[i].abs();
        assert!(
            (f64::from(y[i]) - want[i]).abs() <= tol,
            "gelu({}) = {}, want {}",
            x[i],
            y[i],
            want[i]
        );
    }
    // Random values: the f32 evaluation is within 4 f32 ulp of the reference (measured 3;
    // src/cpu/gelu.rs).
    let n = 9001; // more than two parallel chunks
    let x = randn(n, 300, 1, 3.0);
    let mut y = vec![0.0f32; n];
    gelu_forward(&mut y, &x);
    for (i, (&g, w)) in y.iter().zip(gelu_ref(&to64(&x))).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= w.abs() * 4.0 * 2f64.powi(-23) + 1e-40,
            "gelu({}) = {g}, want {w}",
            x[i]
        );
    }
    let r = randn(n, 300, 2, 1.0);
    let mut dx = vec![0.0f32; n];
    for _ in 0..2 {
        gelu_backward(&mut dx, &r, &x);
    }
    // Elementwise: L = sum(gelu(x) * r) has dL/dx_i = r_i gelu'(x_i); check every 97th.
    let f = |v: &[Vec<f64>]| gelu_ref(&v[0]);
    let xs: Vec<f32> = x.iter().step_by(97).copied().collect();
    let rs: Vec<f32> = r.iter().step_by(97).copied().collect();
    let ds: Vec<f32> = dx.iter().step_by(97).copied().collect();
    check_grads("gelu", &f, &[&xs], &[(0, "x", &ds)], &rs, 300);
}

// ---------------------------------------------------------------------------------------
// attention

#[test]
fn attention_forward_and_backward_match_f64_reference() {
    let shapes = [
        (1, 1, 4, 1),
        (2, 5, 12, 3),
        (1, 7, 8, 2),
        (3, 4, 6, 1),
        (2, 17, 16, 2),
    ];
    for (case, &(b, n, d, heads)) in shapes.iter().enumerate() {
        let seed = 400 + case as u64;
        let qkv = randn(b * n * 3 * d, seed, 1, 1.0);
        let r = randn(b * n * d, seed, 2, 1.0);
        let (mut out, mut probs) = (vec![f32::NAN; b * n * d], vec![f32::NAN; b * heads * n * n]);
        attention_forward(&mut out, &mut probs, &qkv, b, n, d, heads);
        let (want_out, want_probs) = attention_ref(&to64(&qkv), b, n, d, heads);
        assert_forward_close("attention out", &out, &want_out);
        assert_forward_close("attention probs", &probs, &want_probs);
        for row in probs.chunks(n) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "a probability row sums to {s}");
        }
        let mut dqkv = vec![0.0; b * n * 3 * d];
        for _ in 0..2 {
            attention_backward(&mut dqkv, &r, &qkv, &probs, b, n, d, heads);
        }
        let f = |v: &[Vec<f64>]| attention_ref(&v[0], b, n, d, heads).0;
        check_grads("attention", &f, &[&qkv], &[(0, "qkv", &dqkv)], &r, seed);
    }
}

#[test]
fn attention_survives_huge_logits() {
    let (b, n, d, heads) = (2, 9, 12, 3);
    let qkv: Vec<f32> = randn(b * n * 3 * d, 450, 1, 1.0)
        .iter()
        .map(|v| v * 1000.0)
        .collect();
    let (mut out, mut probs) = (vec![0.0; b * n * d], vec![0.0; b * heads * n * n]);
    attention_forward(&mut out, &mut probs, &qkv, b, n, d, heads);
    assert!(probs
        .iter()
        .all(|p| p.is_finite() && (0.0..=1.0).contains(p)));
    for row in probs.chunks(n) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "a probability row sums to {s}");
    }
    // Each output is a convex combination of the values of its head.
    let hd = d / heads;
    for bi in 0..b {
        for col in 0..d {
            let vals: Vec<f32> = (0..n)
                .map(|j| qkv[(bi * n + j) * 3 * d + 2 * d + col])
                .collect();
            let (lo, hi) = vals
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            for i in 0..n {
                let o = out[(bi * n + i) * d + col];
                assert!(
                    o.is_finite() && o >= lo - 1e-2 && o <= hi + 1e-2,
                    "head {} out {o}",
                    col / hd
                );
            }
        }
    }
    let mut dqkv = vec![0.0; b * n * 3 * d];
    attention_backward(&mut dqkv, &out, &qkv, &probs, b, n, d, heads);
    assert!(dqkv.iter().all(|g| g.is_finite()));
}

// ---------------------------------------------------------------------------------------
// patch embedding and position embeddings

#[test]
fn im2col_then_linear_is_the_pytorch_conv() {
    for (case, &(b, c, side, patch, dim)) in [
        (2, 3, 8, 4, 5),
        (1, 1, 6, 3, 2),
        (2, 2, 6, 1, 3),
        (1, 3, 4, 4, 4),
    ]
    .iter()
    .enumerate()
    {
        let seed = 500 + case as u64;
        let grid = side / patch;
        let images = randn(b * c * side * side, seed, 1, 1.0);
        let w = randn(dim * c * patch * patch, seed, 2, 1.0); // (D, C, p, p)
        let bias = randn(dim, seed, 3, 1.0);
        let mut cols = vec![f32::NAN; b * grid * grid * c * patch * patch];
        im2col(&mut cols, &images, b, c, side, patch);
        let mut y = vec![0.0; b * grid * grid * dim];
        linear_forward(
            &mut y,
            &cols,
            &w,
            Some(&bias),
            b * grid * grid,
            c * patch * patch,
            dim,
        );
        // Direct conv, kernel = stride = patch, output as (B, P*P, D) (timm's flatten(2).transpose(1, 2)).
        let mut want = vec![0.0f64; b * grid * grid * dim];
        for bi in 0..b {
            for py in 0..grid {
                for px in 0..grid {
                    for o in 0..dim {
                        let mut s = f64::from(bias[o]);
                        for ci in 0..c {
                            for ky in 0..patch {
                                for kx in 0..patch {
                                    let wv = w[((o * c + ci) * patch + ky) * patch + kx];
                                    let iv = images[((bi * c + ci) * side + py * patch + ky)
                                        * side
                                        + px * patch
                                        + kx];
                                    s += f64::from(wv) * f64::from(iv);
                                }
                            }
                        }
                        want[((bi * grid + py) * grid + px) * dim + o] = s;
                    }
                }
            }
        }
        assert_forward_close("patch embedding", &y, &want);
    }
}

#[test]
fn pos_resample_matrix_matches_hand_derived_pytorch_bicubic() {
    // G = 2 -> g = 4: scale 1/2, source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25.
    // With A = -0.75, W1(s) = 1.25 s^3 - 2.25 s^2 + 1, W2(s) = -0.75 s^3 + 3.75 s^2 - 6 s + 3:
    // t = 0.25: W2(1.25) = -0.10546875, W1(0.25) = 0.87890625, W1(0.75) = 0.26171875,
    // W2(1.75) = -0.03515625 (t = 0.75 gives them reversed). Row 0 (floor -1, taps -2..1 ->
    // 0,0,0,1): [-0.03515625 + 0.26171875 + 0.87890625, -0.10546875]; row 1 (floor 0, taps
    // -1..2 -> 0,0,1,1): [-0.10546875 + 0.87890625, 0.26171875 - 0.03515625]; rows 2, 3 mirror.
    // All weights are dyadic fractions, exact in f32, so the comparison is exact.
    let want_up: [f64; 8] = [
        1.10546875,
        -0.10546875, //
        0.7734375,
        0.2265625, //
        0.2265625,
        0.7734375, //
        -0.10546875,
        1.10546875,
    ];
    assert_eq!(to64(&pos_resample_matrix(4, 2)), want_up);
    // G = 4 -> g = 2: scale 2, x = 0.5, 2.5, t = 0.5: W2(1.5) = -0.09375, W1(0.5) = 0.59375.
    // Row 0 taps -1..2 -> 0,0,1,2; row 1 taps 1..4 -> 1,2,3,3.
    let want_down: [f64; 8] = [0.5, 0.59375, -0.09375, 0.0, 0.0, -0.09375, 0.59375, 0.5];
    assert_eq!(to64(&pos_resample_matrix(2, 4)), want_down);
    // The 2-D case [[1, 2], [3, 4]] -> 4x4, from the rows above: out = M X M^T.
    let pos: Vec<f32> = vec![0.0, 1.0, 2.0, 3.0, 4.0]; // (1 + 2*2, D = 1), CLS = 0
    let mut out = vec![f32::NAN; 17];
    pos_embed_forward(&mut out, &pos, 4, 2, 1);
    let want: [f64; 17] = [
        0.0, 0.68359375, 1.015625, 1.5625, 1.89453125, 1.34765625, 1.6796875, 2.2265625,
        2.55859375, 2.44140625, 2.7734375, 3.3203125, 3.65234375, 3.10546875, 3.4375, 3.984375,
        4.31640625,
    ];
    for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
        assert!((f64::from(o) - w).abs() <= 1e-6, "out[{i}] = {o}, want {w}");
    }
}

#[test]
fn pos_resample_rows_sum_to_one_and_same_grid_is_identity() {
    for big_g in 1..=16 {
        for g in 1..=16 {
            let m = pos_resample_matrix(g, big_g);
            for row in m.chunks(big_g) {
                let s: f32 = row.iter().sum();
                assert!(
                    (s - 1.0).abs() < 1e-5,
                    "g {g}, G {big_g}: a row sums to {s}"
                );
            }
        }
        let m = pos_resample_matrix(big_g, big_g);
        for i in 0..big_g {
            for j in 0..big_g {
                assert_eq!(m[i * big_g + j], if i == j { 1.0 } else { 0.0 });
            }
        }
        let d = 3;
        let pos = randn((1 + big_g * big_g) * d, 600, big_g as u32, 1.0);
        let mut out = vec![0.0; pos.len()];
        pos_embed_forward(&mut out, &pos, big_g, big_g, d);
        assert_eq!(out, pos);
    }
}

#[test]
fn pos_embed_forward_and_backward_match_f64_bicubic() {
    let cases = [
        (4, 2, 3),
        (2, 4, 3),
        (6, 14, 5),
        (14, 14, 2),
        (5, 3, 2),
        (3, 7, 1),
        (1, 3, 2),
        (7, 4, 2),
    ];
    for (case, &(g, big_g, d)) in cases.iter().enumerate() {
        let seed = 700 + case as u64;
        let pos = randn((1 + big_g * big_g) * d, seed, 1, 1.0);
        let r = randn((1 + g * g) * d, seed, 2, 1.0);
        let mut out = vec![f32::NAN; (1 + g * g) * d];
        pos_embed_forward(&mut out, &pos, g, big_g, d);
        assert_forward_close(
            &format!("pos_embed {big_g}->{g}"),
            &out,
            &pos_embed_ref(&to64(&pos), g, big_g, d),
        );
        let mut dpos = vec![0.0; pos.len()];
        for _ in 0..2 {
            pos_embed_backward(&mut dpos, &r, g, big_g, d);
        }
        let f = |v: &[Vec<f64>]| pos_embed_ref(&v[0], g, big_g, d);
        check_grads("pos_embed", &f, &[&pos], &[(0, "pos", &dpos)], &r, seed);
    }
}

#[test]
fn add_cls_and_pos_forward_and_backward() {
    for (case, &(b, g, d)) in [(1, 1, 1), (3, 2, 5), (2, 3, 70)].iter().enumerate() {
        let seed = 800 + case as u64;
        let t = 1 + g * g;
        let patches = randn(b * g * g * d, seed, 1, 1.0);
        let cls = randn(d, seed, 2, 1.0);
        let pos = randn(t * d, seed, 3, 1.0);
        let r = randn(b * t * d, seed, 4, 1.0);
        let reference = |v: &[Vec<f64>]| {
            let mut y = vec![0.0; b * t * d];
            for bi in 0..b {
                for p in 0..t {
                    for c in 0..d {
                        let x = if p == 0 {
                            v[1][c]
                        } else {
                            v[0][(bi * g * g + p - 1) * d + c]
                        };
                        y[(bi * t + p) * d + c] = x + v[2][p * d + c];
                    }
                }
            }
            y
        };
        let mut tokens = vec![f32::NAN; b * t * d];
        add_cls_and_pos(&mut tokens, &patches, &cls, &pos, b, g, d);
        assert_forward_close(
            "add_cls_and_pos",
            &tokens,
            &reference(&[to64(&patches), to64(&cls), to64(&pos)]),
        );
        let (mut dp, mut dc, mut dpos) = (vec![0.0; patches.len()], vec![0.0; d], vec![0.0; t * d]);
        for _ in 0..2 {
            add_cls_and_pos_backward(&mut dp, &mut dc, &mut dpos, &r, b, g, d);
        }
        check_grads(
            "add_cls_and_pos",
            &reference,
            &[&patches, &cls, &pos],
            &[(0, "patches", &dp), (1, "cls", &dc), (2, "pos_view", &dpos)],
            &r,
            seed,
        );
    }
}

// ---------------------------------------------------------------------------------------
// DINO head pieces

#[test]
fn l2norm_forward_and_backward_match_f64_reference() {
    for (case, &(n, d)) in [(1, 1), (1, 5), (7, 3), (4, 256)].iter().enumerate() {
        let seed = 900 + case as u64;
        let x = randn(n * d, seed, 1, 3.0);
        let r = randn(n * d, seed, 2, 1.0);
        let (mut y, mut norms) = (vec![f32::NAN; n * d], vec![0.0; n]);
        l2norm_forward(&mut y, &mut norms, &x, n, d);
        assert_forward_close("l2norm", &y, &l2norm_ref(&to64(&x), n, d));
        let mut dx = vec![0.0; n * d];
        for _ in 0..2 {
            l2norm_backward(&mut dx, &r, &x, &norms, n, d);
        }
        let f = |v: &[Vec<f64>]| l2norm_ref(&v[0], n, d);
        check_grads("l2norm", &f, &[&x], &[(0, "x", &dx)], &r, seed);
    }
}

#[test]
fn l2norm_of_a_zero_row_is_zero_with_clamped_gradient() {
    let x = [0.0f32; 4];
    let (mut y, mut norms) = ([f32::NAN; 4], [f32::NAN; 1]);
    l2norm_forward(&mut y, &mut norms, &x, 1, 4);
    assert_eq!(y, [0.0; 4]);
    assert_eq!(norms, [0.0]);
    // y = x / 1e-12 near zero: the Jacobian is 1e12 times the identity.
    let dy = [1.0f32, -2.0, 0.5, 0.0];
    let mut dx = [0.0f32; 4];
    l2norm_backward(&mut dx, &dy, &x, &norms, 1, 4);
    for (g, d) in dx.iter().zip(dy) {
        assert_eq!(*g, d / L2NORM_EPS);
    }
}

#[test]
fn weight_norm_forward_and_backward_match_f64_reference() {
    let reference = |v: &[f64], k: usize, db: usize| l2norm_ref(v, k, db);
    for (case, &(k, db)) in [(1, 1), (3, 5), (10, 256), (65, 7)].iter().enumerate() {
        let seed = 1000 + case as u64;
        let v = randn(k * db, seed, 1, 0.3);
        let r = randn(k * db, seed, 2, 1.0);
        let (mut w, mut norms) = (vec![f32::NAN; k * db], vec![0.0; k]);
        weight_norm_forward(&mut w, &mut norms, &v, k, db);
        // Row norms of v are far above 1e-12, where weight norm and F.normalize agree.
        assert_forward_close("weight_norm", &w, &reference(&to64(&v), k, db));
        for row in w.chunks(db) {
            let nrm: f64 = row
                .iter()
                .map(|&a| f64::from(a) * f64::from(a))
                .sum::<f64>()
                .sqrt();
            assert!(
                (nrm - 1.0).abs() < 1e-6,
                "a weight-normalised row has norm {nrm}"
            );
        }
        let mut dv = vec![0.0; k * db];
        for _ in 0..2 {
            weight_norm_backward(&mut dv, &r, &v, &norms, k, db);
        }
        let f = |x: &[Vec<f64>]| reference(&x[0], k, db);
        check_grads("weight_norm", &f, &[&v], &[(0, "v", &dv)], &r, seed);
    }
}

// ---------------------------------------------------------------------------------------
// drop path

#[test]
fn drop_path_rate_zero_is_the_identity() {
    let (b, l) = (5, 7);
    let mut mask = vec![f32::NAN; b];
    drop_path_mask(&mut mask, 0.0, 1, [0, 0, 0]);
    assert_eq!(mask, vec![1.0; b]);
    let x = randn(b * l, 1100, 1, 1.0);
    let mut y = vec![f32::NAN; b * l];
    drop_path_forward(&mut y, &x, &mask, b, l);
    assert_eq!(y, x);
    let branch = randn(b * l, 1100, 2, 1.0);
    let mut acc = x.clone();
    residual_add_scaled(&mut acc, &branch, &mask, b, l);
    for i in 0..b * l {
        assert_eq!(acc[i], x[i] + branch[i]);
    }
}

#[test]
fn drop_path_keeps_a_fraction_one_minus_p_scaled_by_its_inverse() {
    let n = 100_000;
    for p in [0.1f32, 0.5, 0.9] {
        let mut mask = vec![f32::NAN; n];
        drop_path_mask(&mut mask, p, 42, [3, 0, 5]);
        let scale = 1.0 / (1.0 - p);
        assert!(mask.iter().all(|&m| m == 0.0 || m == scale));
        let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / n as f64;
        // Standard error sqrt(p (1 - p) / n) <= 1.6e-3; allow 5 of them.
        assert!(
            (kept - (1.0 - f64::from(p))).abs() < 8e-3,
            "p {p}: kept {kept}"
        );
        let mean: f64 = mask.iter().map(|&m| f64::from(m)).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 8e-3 / (1.0 - f64::from(p)),
            "p {p}: E[mask] = {mean}"
        );
    }
    let mut all = vec![f32::NAN; 16];
    drop_path_mask(&mut all, 1.0, 1, [0, 0, 0]);
    assert_eq!(all, vec![0.0; 16]);
    // Same counter, same mask; another counter, another mask.
    let (mut a, mut b, mut c) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
    drop_path_mask(&mut a, 0.5, 9, [1, 2, 0]);
    drop_path_mask(&mut b, 0.5, 9, [1, 2, 0]);
    drop_path_mask(&mut c, 0.5, 9, [1, 3, 0]);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn drop_path_forward_backward_and_residual_match_reference() {
    let (b, l) = (6, 11);
    let mut mask = vec![0.0; b];
    drop_path_mask(&mut mask, 0.5, 7, [0, 0, 0]);
    assert!(
        mask.contains(&0.0) && mask.contains(&2.0),
        "this seed drops and keeps"
    );
    let x = randn(b * l, 1200, 1, 1.0);
    let base = randn(b * l, 1200, 2, 1.0);
    let r = randn(b * l, 1200, 3, 1.0);
    let m64 = to64(&mask);
    let scaled =
        |v: &[Vec<f64>]| -> Vec<f64> { (0..b * l).map(|i| m64[i / l] * v[0][i]).collect() };

    let mut y = vec![f32::NAN; b * l];
    drop_path_forward(&mut y, &x, &mask, b, l);
    assert_forward_close("drop_path", &y, &scaled(&[to64(&x)]));
    let mut dx = vec![0.0; b * l];
    for _ in 0..2 {
        drop_path_backward(&mut dx, &r, &mask, b, l);
    }
    check_grads("drop_path", &scaled, &[&x], &[(0, "x", &dx)], &r, 1200);

    // Residual: out = base + mask * branch.
    let mut out = base.clone();
    residual_add_scaled(&mut out, &x, &mask, b, l);
    let residual = |v: &[Vec<f64>]| -> Vec<f64> {
        (0..b * l).map(|i| v[1][i] + m64[i / l] * v[0][i]).collect()
    };
    assert_forward_close(
        "residual_add_scaled",
        &out,
        &residual(&[to64(&x), to64(&base)]),
    );
    // Into a separate output (NaN-poisoned): the same bits as the in-place add.
    let mut into = vec![f32::NAN; b * l];
    residual_add_scaled_into(&mut into, &base, &x, &mask, b, l);
    assert!(
        into.iter()
            .zip(&out)
            .all(|(p, q)| p.to_bits() == q.to_bits()),
        "residual_add_scaled_into differs from copy + residual_add_scaled"
    );
    let mut dbranch = vec![0.0; b * l];
    for _ in 0..2 {
        residual_add_scaled_backward(&mut dbranch, &r, &mask, b, l);
    }
    check_grads(
        "residual_add_scaled",
        &residual,
        &[&x, &base],
        &[(0, "branch", &dbranch)],
        &r,
        1201,
    );
}

/// `a` and `b` hold equal values (signed zeros aside: `fma(x, y, +0)` is `+0` where `x * y`
/// is `-0`) and no NaN.
fn same_values(name: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{name}: lengths differ");
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        assert!(
            p == q,
            "{name}: element {i} is {p} overwritten, {q} accumulated into zeros"
        );
    }
}

/// The `_into` backwards overwrite their input gradient: from a NaN-filled buffer they give
/// what the accumulating kernel gives from zeros, and the parameter gradients still add up.
/// Shapes large enough for the GEMM's row split and for several elementwise chunks.
#[test]
fn overwriting_backwards_match_accumulating_into_zeros() {
    // Linear: (n, d_in) -> (n, d_out), n * d_in * d_out above the GEMM's split threshold.
    let (n, d_in, d_out) = (1100, 48, 40);
    let x = randn(n * d_in, 3, 1, 1.0);
    let w = randn(d_out * d_in, 3, 2, 0.2);
    let dy = randn(n * d_out, 3, 3, 1.0);
    let (dw0, db0) = (randn(d_out * d_in, 3, 4, 1.0), randn(d_out, 3, 5, 1.0));
    let (mut dx_acc, mut dw_acc, mut db_acc) = (vec![0.0; n * d_in], dw0.clone(), db0.clone());
    linear_backward(
        Some(&mut dx_acc),
        &mut dw_acc,
        Some(&mut db_acc),
        &dy,
        &x,
        &w,
        n,
        d_in,
        d_out,
    );
    let (mut dx_set, mut dw_set, mut db_set) = (vec![f32::NAN; n * d_in], dw0, db0);
    linear_backward_into(
        Some(&mut dx_set),
        &mut dw_set,
        Some(&mut db_set),
        &dy,
        &x,
        &w,
        n,
        d_in,
        d_out,
    );
    same_values("linear_backward_into dx", &dx_set, &dx_acc);
    same_values("linear_backward_into dw", &dw_set, &dw_acc);
    same_values("linear_backward_into db", &db_set, &db_acc);

    // GELU over several chunks of the elementwise split.
    let len = 10_000;
    let (xg, dyg) = (randn(len, 4, 1, 2.0), randn(len, 4, 2, 1.0));
    let mut acc = vec![0.0; len];
    gelu_backward(&mut acc, &dyg, &xg);
    let mut set = vec![f32::NAN; len];
    gelu_backward_into(&mut set, &dyg, &xg);
    same_values("gelu_backward_into", &set, &acc);

    // Attention: B = 3, N = 7 tokens, D = 8 in 2 heads.
    let (b, t, d, heads) = (3, 7, 8, 2);
    let qkv = randn(b * t * 3 * d, 5, 1, 1.0);
    let mut out = vec![0.0; b * t * d];
    let mut probs = vec![0.0; b * heads * t * t];
    attention_forward(&mut out, &mut probs, &qkv, b, t, d, heads);
    let dout = randn(b * t * d, 5, 2, 1.0);
    let mut acc = vec![0.0; qkv.len()];
    attention_backward(&mut acc, &dout, &qkv, &probs, b, t, d, heads);
    let mut set = vec![f32::NAN; qkv.len()];
    attention_backward_into(&mut set, &dout, &qkv, &probs, b, t, d, heads);
    same_values("attention_backward_into", &set, &acc);

    // Residual branch: per-sample masks with a dropped sample.
    let (b, l) = (4, 300);
    let dx = randn(b * l, 6, 1, 1.0);
    let mask = [1.25, 0.0, 1.25, 1.25];
    let mut acc = vec![0.0; b * l];
    residual_add_scaled_backward(&mut acc, &dx, &mask, b, l);
    let mut set = vec![f32::NAN; b * l];
    residual_add_scaled_backward_into(&mut set, &dx, &mask, b, l);
    same_values("residual_add_scaled_backward_into", &set, &acc);
}

/// The fused Linear + GELU kernels give the bits of the unfused calls, for products the
/// GEMM splits by rows (epilogue inside its tasks), by columns (epilogue after the product)
/// and not at all.
#[test]
fn fused_linear_gelu_matches_the_unfused_calls() {
    for (case, &(n, d_in, d_out)) in [(1100, 48, 40), (300, 64, 2048), (9, 5, 7)]
        .iter()
        .enumerate()
    {
        let seed = 40 + case as u64;
        let x = randn(n * d_in, seed, 1, 1.0);
        let w = randn(d_out * d_in, seed, 2, 0.3);
        let b = randn(d_out, seed, 3, 1.0);
        // Forward: h = x W^T + b, a = gelu(h).
        let (mut h_ref, mut a_ref) = (vec![0.0; n * d_out], vec![0.0; n * d_out]);
        linear_forward(&mut h_ref, &x, &w, Some(&b), n, d_in, d_out);
        gelu_forward(&mut a_ref, &h_ref);
        let (mut h, mut a) = (vec![f32::NAN; n * d_out], vec![f32::NAN; n * d_out]);
        linear_gelu_forward(&mut h, &mut a, &x, &w, &b, n, d_in, d_out);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&h) == bits(&h_ref),
            "({n}, {d_in}, {d_out}): h differs"
        );
        assert!(
            bits(&a) == bits(&a_ref),
            "({n}, {d_in}, {d_out}): a differs"
        );
        // Backward through a second Linear (d_out -> d_in) after the GELU:
        // dh = (dy W2) * gelu'(h), dW2 += dy^T a, db2 += column sums of dy.
        let w2 = randn(d_in * d_out, seed, 4, 0.3);
        let dy = randn(n * d_in, seed, 5, 1.0);
        let (dw0, db0) = (randn(d_in * d_out, seed, 6, 1.0), randn(d_in, seed, 7, 1.0));
        let (mut da, mut dw_ref, mut db_ref) = (vec![0.0; n * d_out], dw0.clone(), db0.clone());
        let db_opt = Some(&mut db_ref[..]);
        linear_backward_into(
            Some(&mut da),
            &mut dw_ref,
            db_opt,
            &dy,
            &a,
            &w2,
            n,
            d_out,
            d_in,
        );
        let mut dh_ref = vec![0.0; n * d_out];
        gelu_backward_into(&mut dh_ref, &da, &h);
        let (mut dh, mut dw, mut db) = (vec![f32::NAN; n * d_out], dw0, db0);
        let db_opt = Some(&mut db[..]);
        linear_gelu_backward_into(&mut dh, &mut dw, db_opt, &dy, &a, &w2, &h, n, d_out, d_in);
        assert!(
            bits(&dh) == bits(&dh_ref),
            "({n}, {d_in}, {d_out}): dh differs"
        );
        assert!(
            bits(&dw) == bits(&dw_ref),
            "({n}, {d_in}, {d_out}): dw differs"
        );
        assert!(
            bits(&db) == bits(&db_ref),
            "({n}, {d_in}, {d_out}): db differs"
        );
    }
}

#[test]
fn zero_clears_a_buffer() {
    let mut g = vec![1.5f32; 10];
    zero(&mut g);
    assert!(g.iter().all(|&v| v == 0.0));
}
