//! Random-resized-crop sampling against the distributions SPEC.md section 1 defines.
//!
//! Kolmogorov-Smirnov statistics against closed-form CDFs. With n = 20,000 draws the
//! 0.1% critical value of D is 1.95 / sqrt(n) = 0.0138; integer rounding of the box on a
//! 1024x1024 image shifts the CDFs by less than 0.001, so the bound is 0.015. A fixed seed
//! makes the test deterministic; a correct sampler passes for 999 seeds in 1000, while the
//! classic mistakes fail by a wide margin (aspect uniform instead of log-uniform: D = 0.07
//! on the log-aspect; scale taken as a side fraction instead of an area fraction: D > 0.1).

use pwself_engine::rng::{Purpose, Stream};
use pwself_engine::views::crop::{sample_crop, Scale};

const N: usize = 20_000;
const SIDE: u32 = 1024;
const BOUND: f64 = 0.015;

fn ks(mut xs: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len() as f64;
    xs.iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = cdf(x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0, f64::max)
}

struct Draws {
    area: Vec<f64>,
    log_aspect: Vec<f64>,
    top_frac: Vec<f64>,
    flips: usize,
}

fn draw(scale: Scale, seed: u64) -> Draws {
    let mut d = Draws {
        area: vec![],
        log_aspect: vec![],
        top_frac: vec![],
        flips: 0,
    };
    for i in 0..N {
        // One stream per (batch, view), as the batch builder does.
        let mut rng = Stream::new(seed, [i as u32, 0, 0], Purpose::Crop);
        let c = sample_crop(&mut rng, SIDE, SIDE, scale, 0.5);
        let a = f64::from(c.height) * f64::from(c.width) / f64::from(SIDE * SIDE);
        d.area.push(a);
        d.log_aspect
            .push((f64::from(c.width) / f64::from(c.height)).ln());
        if c.height < SIDE {
            d.top_frac
                .push((f64::from(c.top) + 0.5) / f64::from(SIDE - c.height + 1));
        }
        d.flips += usize::from(c.flipped);
    }
    d
}

fn uniform_cdf(lo: f64, hi: f64) -> impl Fn(f64) -> f64 {
    move |x| ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
}

#[test]
fn local_scale_area_and_log_aspect_are_uniform() {
    // With scale <= 0.4 no draw is ever rejected on a square image (the widest box is
    // sqrt(0.4 * 4/3) = 0.73 of the side), so the area fraction is U(0.05, 0.4) and the
    // log-aspect U(ln 3/4, ln 4/3), up to rounding.
    let d = draw(Scale { lo: 0.05, hi: 0.4 }, 11);
    let a = (0.75f64.ln(), (4.0f64 / 3.0).ln());
    let d_area = ks(d.area, uniform_cdf(0.05, 0.4));
    let d_aspect = ks(d.log_aspect, uniform_cdf(a.0, a.1));
    let d_top = ks(d.top_frac, uniform_cdf(0.0, 1.0));
    assert!(d_area < BOUND, "area fraction KS D = {d_area}");
    assert!(d_aspect < BOUND, "log-aspect KS D = {d_aspect}");
    assert!(d_top < BOUND, "top position KS D = {d_top}");
    let flip = d.flips as f64 / N as f64;
    assert!((flip - 0.5).abs() < 0.015, "flip rate {flip}"); // 4 binomial standard deviations
}

#[test]
fn global_scale_area_follows_the_rejection_sampled_law() {
    // On a square image a try (s, u = ln r) is accepted when s <= exp(-|u|). With
    // a = ln(4/3), P(S <= x, accepted) = I(x) / (0.6 * 2a) where
    //   I(x) = 2 a (x - 0.4)                                     for x <= 3/4,
    //   I(x) = 2 [(x - 0.4)(-ln x) + (x - 3/4) - 0.4 (a + ln x)]  for x >= 3/4,
    // so the accepted crops' CDF is I(x) / I(1); all ten tries fail with probability
    // (1 - I(1)/(1.2a))^10 < 1e-6, which the bound absorbs.
    let a = (4.0f64 / 3.0).ln();
    let i = |x: f64| {
        if x <= 0.75 {
            2.0 * a * (x - 0.4)
        } else {
            2.0 * ((x - 0.4) * (-x.ln()) + (x - 0.75) - 0.4 * (a + x.ln()))
        }
    };
    let i1 = i(1.0);
    let acceptance = i1 / (1.2 * a);
    assert!(
        (acceptance - 0.7817).abs() < 1e-3,
        "closed form sanity: {acceptance}"
    );
    let d = draw(Scale { lo: 0.4, hi: 1.0 }, 12);
    let d_area = ks(d.area, |x| (i(x.clamp(0.4, 1.0)) / i1).clamp(0.0, 1.0));
    assert!(d_area < BOUND, "area fraction KS D = {d_area}");
    // The uniform law on (0.4, 1) would be rejected: the sampler is not a plain U(scale).
    let d_naive = ks(
        draw(Scale { lo: 0.4, hi: 1.0 }, 12).area,
        uniform_cdf(0.4, 1.0),
    );
    assert!(
        d_naive > 0.05,
        "rejection must reshape the law, D vs uniform = {d_naive}"
    );
}
