//! Per-patch photometric augmentation (SPEC.md section 2, the paper's contribution).
//!
//! A view is cut into the ViT's patch grid and every patch gets its own, independent DINO
//! photometric transform (or, with patch-level augmentation off, the whole view gets one, as in
//! DINO). This is the CPU reference for a CUDA kernel that must reproduce it draw for draw:
//! plain f32 loops, no state shared between calls, and every random number comes from
//! [`crate::rng::Stream`] at a documented counter in a documented order. It must not
//! normalise with dataset statistics (the caller does that afterwards) and must not look at
//! pixels outside the region it is augmenting.
//!
//! # Regions and streams
//!
//! A region is one patch (`per_patch`) or the whole view. Region `r` of view `v` of image `i`
//! in batch `b` reads two streams, with counter word `c2 = (v << 20) | r`, where
//! `r = row * P + col` for a patch of the `P x P` grid and `r = 0xFFFFF` ([`WHOLE_VIEW`]) for
//! the whole view:
//!
//! - parameters: `Stream::new(seed, [b, i, c2], Purpose::Photometric)`;
//! - per-pixel noise: `Stream::new(seed, [b, i, c2], Purpose::Noise)`.
//!
//! # Draw schedule of one region (always [`DRAWS_PER_REGION`] = 12 u32 draws = 3 Philox blocks)
//!
//! All parameters are drawn before any pixel is touched, in this order, whether or not the
//! operator they belong to fires or is an identity:
//!
//! | # | u32 draws | call | meaning |
//! |---|-----------|------|---------|
//! | 1 | 1 | `next_f32()` | colour jitter fires if `u < jitter_p` |
//! | 2 | 2 | `below(24)` | jitter order: Lehmer code `k = 6 d0 + 2 d1 + d2`, see [`jitter_order`] |
//! | 3 | 1 | `uniform(max(0, 1 - brightness), 1 + brightness)` | brightness factor |
//! | 4 | 1 | `uniform(max(0, 1 - contrast), 1 + contrast)` | contrast factor |
//! | 5 | 1 | `uniform(max(0, 1 - saturation), 1 + saturation)` | saturation factor |
//! | 6 | 1 | `uniform(-hue, hue)` | hue shift |
//! | 7 | 1 | `next_f32()` | grayscale fires if `u < grayscale_p` |
//! | 8 | 1 | `next_f32()` | blur fires if `u < blur_p` |
//! | 9 | 1 | `uniform(blur_sigma.0, blur_sigma.1)` | blur sigma |
//! | 10 | 1 | `next_f32()` | solarize fires if `u < solarize_p` |
//! | 11 | 1 | `next_f32()` | noise fires if `u < noise_p` |
//!
//! With `rng::Stream`'s primitives: `next_f32() = (u >> 8) * 2^-24`,
//! `uniform(lo, hi) = lo + (hi - lo) * next_f32()`, `below(24) = ((u0 << 32 | u1) * 24) >> 64`
//! (u0 drawn first), `normal() = sqrt(-2 ln(1 - next_f32())) * cos(2 pi next_f32())`.
//! torchvision's `ColorJitter` also draws the order first and then the four factors. The noise stream is
//! separate and indexed by pixel: the value for element `e` of the region in planar order
//! (`e = (ch * h + y) * w + x`) is the `e`-th `normal()`, i.e. u32 draws `2e` and `2e + 1`
//! (Box-Muller); it is read only when noise fires, which affects no other draw.
//!
//! # The operators, in DINO's order (region planar `(C, h, w)`, f32, values in [0, 1])
//!
//! 1. Colour jitter, if it fires: the four operators below in the drawn order.
//!    - brightness `b`: `x <- clamp(b * x)`;
//!    - contrast `c`: `m = mean over the region of gray(pixel)` (for C = 1 the pixel itself;
//!      summed in f32 in planar order, then divided by `h * w`); `x <- clamp(c * x + (1 - c) * m)`;
//!    - saturation `s` (C = 3 only): `x <- clamp(s * x + (1 - s) * gray(pixel))`;
//!    - hue `f` (C = 3 only; skipped when `f == 0`): RGB -> HSV, `h <- (h + f) mod 1` (result in
//!      [0, 1)), HSV -> RGB, with torchvision's `_rgb2hsv` / `_hsv2rgb` formulas (see
//!      [`adjust_hue`]).
//! 2. Grayscale (C = 3 only), if it fires: all three channels `<- gray(pixel)`.
//! 3. Gaussian blur, if it fires: radius `r = ceil(3 sigma)`, weights
//!    `g_k = exp(-(k * k) / (2 sigma^2))` for `k = -r..=r` divided by their sum (summed in
//!    ascending `k`); horizontal pass then vertical pass, each `sum_k g_k * x[clamp(i + k)]`
//!    in ascending `k` with the index clamped to the region (edge pixels replicated): a patch's
//!    blur reads only that patch.
//! 4. Solarize, if it fires: `x >= threshold -> 1 - x` (PIL's rule).
//! 5. Noise, if it fires: `x <- clamp(x + sigma * z)`, `z` from the noise stream.
//!
//! `gray(r, g, b) = (0.299 r + 0.587 g) + 0.114 b` (ITU-R 601, PIL's `convert("L")`, which is
//! what DINO's PIL pipeline uses; torchvision's tensor path uses 0.2989 for red). `clamp` is to
//! [0, 1]. torchvision clamps after brightness, contrast and saturation (and inside
//! `_hsv2rgb`); this code also clamps after grayscale and blur, where it only removes the f32
//! rounding of weights that sum to 1 (an ulp), so the output is always in [0, 1] and solarize
//! never produces a value below 0. Operators whose strength is 0 are exact identities (factor
//! 1); the hue shift is skipped when its factor is exactly 0 (always so at hue strength 0,
//! where torchvision skips it too; the HSV round trip is not bit-exact). With C = 1, saturation, hue and grayscale are identities (their draws are still
//! consumed).
//!
//! # For the GPU twin
//!
//! Every expression above is written in the order it is evaluated, one f32 rounding per
//! operation; Rust never fuses a multiply and an add, so a kernel must not either (nvcc
//! `--fmad=false`, or `__fmul_rn` / `__fadd_rn`) to match bit for bit. `exp`, `ln` and `cos`
//! (blur weights, Box-Muller) are libm's here and CUDA's there: those differ by an ulp or two,
//! so compare blurred or noisy pixels within a small tolerance and everything else exactly.
//! Gates compare the same f32 draws, so which operators fire matches exactly.
//!
//! # Additive noise (the paper lists it; DINO has none)
//!
//! All three view kinds use `noise_p = 0.2`, `noise_sigma = 0.04` in [0, 1] pixel units
//! (about 10/255): small next to the jitter (brightness alone moves a pixel by up to 40%),
//! about the level of visible sensor noise, and fired as often as grayscale so most patches
//! stay noise-free. Per channel and per pixel, so it also colours a grayscale patch slightly.

use crate::rng::{Purpose, Stream};
use crate::{Error, Result};

/// Weights of red, green and blue in `gray = 0.299 R + 0.587 G + 0.114 B` (ITU-R 601, PIL).
pub const GRAY_WEIGHTS: [f32; 3] = [0.299, 0.587, 0.114];

/// The region index that names a whole view (patch-level augmentation off).
pub const WHOLE_VIEW: u32 = 0xFFFFF;

/// The number of u32 draws every region takes from its `Purpose::Photometric` stream.
pub const DRAWS_PER_REGION: usize = 12;

/// The third counter word of a region's streams: `(view_index << 20) | region`.
#[inline]
pub fn region_counter(view_index: u32, region: u32) -> u32 {
    (view_index << 20) | region
}

/// Photometric augmentation of one view kind: probabilities and strengths, torchvision's
/// conventions (`ColorJitter(brightness, contrast, saturation, hue)` etc.).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhotometricConfig {
    /// Probability that colour jitter fires.
    pub jitter_p: f32,
    /// Brightness strength: factor `~ U(max(0, 1 - brightness), 1 + brightness)`.
    pub brightness: f32,
    /// Contrast strength: factor `~ U(max(0, 1 - contrast), 1 + contrast)`.
    pub contrast: f32,
    /// Saturation strength: factor `~ U(max(0, 1 - saturation), 1 + saturation)`.
    pub saturation: f32,
    /// Hue strength: shift `~ U(-hue, hue)`, in turns; at most 0.5.
    pub hue: f32,
    /// Probability of converting to grayscale.
    pub grayscale_p: f32,
    /// Probability of a Gaussian blur.
    pub blur_p: f32,
    /// Range of the blur's sigma, in pixels: `sigma ~ U(lo, hi)`, `0 < lo <= hi`.
    pub blur_sigma: (f32, f32),
    /// Probability of solarization.
    pub solarize_p: f32,
    /// Solarization threshold in [0, 1]: values `>= threshold` are inverted.
    pub solarize_threshold: f32,
    /// Probability of additive Gaussian noise.
    pub noise_p: f32,
    /// Standard deviation of the additive noise, in [0, 1] pixel units.
    pub noise_sigma: f32,
}

impl PhotometricConfig {
    /// DINO's first global view: jitter p 0.8 (0.4, 0.4, 0.2, 0.1), grayscale p 0.2, blur
    /// p 1.0 with sigma U(0.1, 2.0), no solarization; plus this engine's noise (p 0.2,
    /// sigma 0.04, see the module docs).
    pub fn dino_global1() -> Self {
        PhotometricConfig {
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 1.0,
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.0,
            solarize_threshold: 128.0 / 255.0,
            noise_p: 0.2,
            noise_sigma: 0.04,
        }
    }

    /// DINO's second global view: as [`PhotometricConfig::dino_global1`] but blur p 0.1 and
    /// solarization p 0.2 at threshold 128/255.
    pub fn dino_global2() -> Self {
        PhotometricConfig {
            blur_p: 0.1,
            solarize_p: 0.2,
            ..Self::dino_global1()
        }
    }

    /// DINO's local views: as [`PhotometricConfig::dino_global1`] but blur p 0.5.
    pub fn dino_local() -> Self {
        PhotometricConfig {
            blur_p: 0.5,
            ..Self::dino_global1()
        }
    }

    /// No photometric change at all (every probability 0): the views are the resized crops.
    /// Strengths keep DINO's values, so switching one probability back on gives DINO's
    /// operator.
    pub fn none() -> Self {
        PhotometricConfig {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
            noise_p: 0.0,
            ..Self::dino_global1()
        }
    }

    /// Checks every field; errors name the field as `{field_prefix}.{field}`.
    pub fn validate(&self, field_prefix: &str) -> Result<()> {
        let name = |f: &str| {
            if field_prefix.is_empty() {
                f.to_string()
            } else {
                format!("{field_prefix}.{f}")
            }
        };
        let probabilities = [
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
            ("solarize_p", self.solarize_p),
            ("noise_p", self.noise_p),
        ];
        for (f, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::bad_config(
                    name(f),
                    format!("{p} is not a probability; use a value in [0, 1]"),
                ));
            }
        }
        let strengths = [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
            ("noise_sigma", self.noise_sigma),
        ];
        for (f, v) in strengths {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::bad_config(
                    name(f),
                    format!("{v} is not a strength; use a finite value >= 0 (0 turns it off)"),
                ));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(Error::bad_config(
                name("hue"),
                format!(
                    "{} is out of range; the hue shift is in turns, use a value in [0, 0.5]",
                    self.hue
                ),
            ));
        }
        let (lo, hi) = self.blur_sigma;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
            return Err(Error::bad_config(
                name("blur_sigma"),
                format!(
                    "({lo}, {hi}) is not a sigma range; use (lo, hi) with 0 < lo <= hi, in pixels"
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.solarize_threshold) {
            return Err(Error::bad_config(
                name("solarize_threshold"),
                format!(
                    "{} is out of range; use a value in [0, 1] (DINO: 128/255)",
                    self.solarize_threshold
                ),
            ));
        }
        Ok(())
    }
}

/// One of the four colour-jitter operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JitterOp {
    /// [`adjust_brightness`].
    Brightness = 0,
    /// [`adjust_contrast`].
    Contrast = 1,
    /// [`adjust_saturation`].
    Saturation = 2,
    /// [`adjust_hue`].
    Hue = 3,
}

/// The jitter order with Lehmer code `k` in `0..24`: `d0 = k / 6`, `d1 = (k % 6) / 2`,
/// `d2 = k % 2`; take item `d0`, then `d1`, then `d2` of what remains of
/// `[Brightness, Contrast, Saturation, Hue]`, then the last one. `k = 0` is that list in
/// order, `k = 23` its reverse.
///
/// # Panics
/// If `k >= 24`.
pub fn jitter_order(k: u32) -> [JitterOp; 4] {
    assert!(
        k < 24,
        "jitter_order: {k} is not a permutation index of 4 items"
    );
    let mut rest = [
        JitterOp::Brightness,
        JitterOp::Contrast,
        JitterOp::Saturation,
        JitterOp::Hue,
    ];
    let digits = [k / 6, (k % 6) / 2, k % 2, 0];
    let mut order = rest;
    for (slot, (len, d)) in (0..4).zip([4usize, 3, 2, 1].into_iter().zip(digits)) {
        let d = d as usize;
        order[slot] = rest[d];
        rest.copy_within(d + 1..len, d);
    }
    order
}

/// Every random parameter of one region's transform, plus the fixed ones it needs
/// (threshold, noise sigma), so that [`augment_region`] needs nothing else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegionDraws {
    /// Colour jitter fires.
    pub jitter: bool,
    /// Order of the four jitter operators.
    pub order: [JitterOp; 4],
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue shift in turns.
    pub hue: f32,
    /// Grayscale fires.
    pub grayscale: bool,
    /// Blur fires.
    pub blur: bool,
    /// Blur sigma in pixels.
    pub blur_sigma: f32,
    /// Solarization fires.
    pub solarize: bool,
    /// Solarization threshold (from the config).
    pub solarize_threshold: f32,
    /// Noise fires.
    pub noise: bool,
    /// Noise standard deviation (from the config).
    pub noise_sigma: f32,
}

impl RegionDraws {
    /// Draws one region's parameters from its `Purpose::Photometric` stream, exactly
    /// [`DRAWS_PER_REGION`] u32 draws in the order of the module docs.
    pub fn draw(cfg: &PhotometricConfig, stream: &mut Stream) -> RegionDraws {
        let jitter = stream.next_f32() < cfg.jitter_p;
        let order = jitter_order(stream.below(24) as u32);
        let brightness = stream.uniform((1.0 - cfg.brightness).max(0.0), 1.0 + cfg.brightness);
        let contrast = stream.uniform((1.0 - cfg.contrast).max(0.0), 1.0 + cfg.contrast);
        let saturation = stream.uniform((1.0 - cfg.saturation).max(0.0), 1.0 + cfg.saturation);
        let hue = stream.uniform(-cfg.hue, cfg.hue);
        let grayscale = stream.next_f32() < cfg.grayscale_p;
        let blur = stream.next_f32() < cfg.blur_p;
        let blur_sigma = stream.uniform(cfg.blur_sigma.0, cfg.blur_sigma.1);
        let solarize = stream.next_f32() < cfg.solarize_p;
        let noise = stream.next_f32() < cfg.noise_p;
        RegionDraws {
            jitter,
            order,
            brightness,
            contrast,
            saturation,
            hue,
            grayscale,
            blur,
            blur_sigma,
            solarize,
            solarize_threshold: cfg.solarize_threshold,
            noise,
            noise_sigma: cfg.noise_sigma,
        }
    }

    /// True when no operator fires (the region is left as it is).
    pub fn is_identity(&self) -> bool {
        !(self.jitter || self.grayscale || self.blur || self.solarize || self.noise)
    }
}

/// `gray = (0.299 r + 0.587 g) + 0.114 b`.
#[inline]
pub fn gray(r: f32, g: f32, b: f32) -> f32 {
    GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
}

/// Brightness: `x <- clamp(factor * x, 0, 1)` on every value.
pub fn adjust_brightness(region: &mut [f32], factor: f32) {
    for x in region {
        *x = (factor * *x).clamp(0.0, 1.0);
    }
}

/// Contrast: `x <- clamp(factor * x + (1 - factor) * m, 0, 1)`, `m` the mean of the region's
/// grayscale (of its only plane when `channels == 1`), summed in f32 in planar order.
/// `region` is planar `(channels, n)`, `channels` 1 or 3.
pub fn adjust_contrast(region: &mut [f32], channels: usize, factor: f32) {
    let n = region.len() / channels;
    let mut sum = 0.0f32;
    if channels == 3 {
        let (r, gb) = region.split_at(n);
        let (g, b) = gb.split_at(n);
        for i in 0..n {
            sum += gray(r[i], g[i], b[i]);
        }
    } else {
        for &x in &region[..n] {
            sum += x;
        }
    }
    let mean = sum / n as f32;
    let offset = (1.0 - factor) * mean;
    for x in region {
        *x = (factor * *x + offset).clamp(0.0, 1.0);
    }
}

/// Saturation: `x <- clamp(factor * x + (1 - factor) * gray(pixel), 0, 1)`. Identity when
/// `channels == 1`. `region` is planar `(channels, n)`.
pub fn adjust_saturation(region: &mut [f32], channels: usize, factor: f32) {
    if channels != 3 {
        return;
    }
    let n = region.len() / 3;
    let (r, gb) = region.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for i in 0..n {
        let offset = (1.0 - factor) * gray(r[i], g[i], b[i]);
        r[i] = (factor * r[i] + offset).clamp(0.0, 1.0);
        g[i] = (factor * g[i] + offset).clamp(0.0, 1.0);
        b[i] = (factor * b[i] + offset).clamp(0.0, 1.0);
    }
}

/// torchvision's `_rgb2hsv` for one pixel: `(h, s, v)`, `h` in [0, 1).
#[inline]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let d = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / d;
    let gc = (maxc - g) / d;
    let bc = (maxc - b) / d;
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    (wrap_unit(h / 6.0 + 1.0), s, maxc)
}

/// `x mod 1` with the sign of the divisor (torch's `%` on floats: `fmod`, plus 1 when the
/// result is negative), result in [0, 1] (1 only by rounding `x + 1` for a tiny negative
/// `x`). The common ranges avoid a libm `fmod` call and give the same value: `x - 1` is exact
/// for `x` in [1, 2) (Sterbenz), and for `x` in (-1, 0) `fmod` returns `x` itself (at -1 it
/// returns -0.0, which the general path keeps).
#[inline]
fn wrap_unit(x: f32) -> f32 {
    if (0.0..1.0).contains(&x) {
        x
    } else if (1.0..2.0).contains(&x) {
        x - 1.0
    } else if x > -1.0 && x < 0.0 {
        x + 1.0
    } else {
        let m = x % 1.0;
        if m < 0.0 {
            m + 1.0
        } else {
            m
        }
    }
}

/// torchvision's `_hsv2rgb` for one pixel (`h` in [0, 1]).
#[inline]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let i = (i as i32).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Hue: per pixel, [`rgb_to_hsv`], `h <- (h + shift) mod 1` (in [0, 1), sign of the divisor,
/// like torch's `%`), [`hsv_to_rgb`]. Identity when `channels == 1`. `region` is planar
/// `(channels, n)`.
pub fn adjust_hue(region: &mut [f32], channels: usize, shift: f32) {
    if channels != 3 {
        return;
    }
    let n = region.len() / 3;
    let (r, gb) = region.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for i in 0..n {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        (r[i], g[i], b[i]) = hsv_to_rgb(wrap_unit(h + shift), s, v);
    }
}

/// Grayscale: every channel `<- clamp(gray(pixel), 0, 1)`. Identity when `channels == 1`.
/// `region` is planar `(channels, n)`.
pub fn to_grayscale(region: &mut [f32], channels: usize) {
    if channels != 3 {
        return;
    }
    let n = region.len() / 3;
    let (r, gb) = region.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for i in 0..n {
        let y = gray(r[i], g[i], b[i]).clamp(0.0, 1.0);
        (r[i], g[i], b[i]) = (y, y, y);
    }
}

/// The normalised Gaussian weights for `sigma` into `out` (radius `ceil(3 sigma)`,
/// `2r + 1` weights for offsets `-r..=r`).
pub fn gaussian_weights(sigma: f32, out: &mut Vec<f32>) {
    let r = (3.0 * sigma).ceil() as usize;
    out.clear();
    let denom = 2.0 * sigma * sigma;
    let mut sum = 0.0f32;
    for k in 0..=2 * r {
        let d = k as f32 - r as f32;
        let w = (-(d * d) / denom).exp();
        sum += w;
        out.push(w);
    }
    for w in out.iter_mut() {
        *w /= sum;
    }
}

/// Separable Gaussian blur of a planar `(channels, h, w)` region with edge replication (never
/// reads outside the region), horizontal pass then vertical, then a clamp to [0, 1].
/// `scratch` is grown as needed and can be reused across calls.
pub fn gaussian_blur(
    region: &mut [f32],
    channels: usize,
    h: usize,
    w: usize,
    sigma: f32,
    scratch: &mut Vec<f32>,
) {
    gaussian_weights(sigma, scratch);
    let taps = scratch.len();
    let r = taps / 2;
    scratch.resize(taps + h * w, 0.0);
    let (wts, tmp) = scratch.split_at_mut(taps);
    for plane in region.chunks_exact_mut(h * w).take(channels) {
        // Horizontal: plane -> tmp. Output x reads `row[clamp(x + k - r)]`; the loops run over
        // k outside and x inside (so the inner loop vectorises), which adds the taps of every
        // output in the same ascending-k order as the formula in the module docs. Outputs
        // x < lo read row[0], x >= hi read row[w - 1], the rest row[x + k - r].
        for y in 0..h {
            let row = &plane[y * w..][..w];
            let out = &mut tmp[y * w..][..w];
            out.fill(0.0);
            for (k, &g) in wts.iter().enumerate() {
                let lo = r.saturating_sub(k).min(w);
                let hi = (w + r).saturating_sub(k).clamp(lo, w);
                for o in &mut out[..lo] {
                    *o += g * row[0];
                }
                if hi > lo {
                    let from = lo + k - r;
                    for (o, &s) in out[lo..hi].iter_mut().zip(&row[from..]) {
                        *o += g * s;
                    }
                }
                for o in &mut out[hi..] {
                    *o += g * row[w - 1];
                }
            }
        }
        // Vertical: tmp -> plane.
        for y in 0..h {
            let out = &mut plane[y * w..][..w];
            out.fill(0.0);
            for (k, &g) in wts.iter().enumerate() {
                let j = (y + k).saturating_sub(r).min(h - 1);
                let src = &tmp[j * w..][..w];
                for (o, &s) in out.iter_mut().zip(src) {
                    *o += g * s;
                }
            }
            for o in out.iter_mut() {
                *o = o.clamp(0.0, 1.0);
            }
        }
    }
}

/// Solarize: values `>= threshold` become `1 - x` (PIL's `ImageOps.solarize` rule).
pub fn solarize(region: &mut [f32], threshold: f32) {
    for x in region {
        if *x >= threshold {
            *x = 1.0 - *x;
        }
    }
}

/// Additive noise: `x <- clamp(x + sigma * z, 0, 1)`, one `z = noise.normal()` per value in
/// the region's order.
pub fn add_noise(region: &mut [f32], sigma: f32, noise: &mut Stream) {
    for x in region {
        *x = (*x + sigma * noise.normal()).clamp(0.0, 1.0);
    }
}

/// Applies one region's transform (the operators of the module docs, in order) to a planar
/// `(channels, h, w)` region in place. `noise` is the region's `Purpose::Noise` stream, read
/// from its start only when noise fires. `scratch` is grown as needed (reuse it).
pub fn augment_region(
    region: &mut [f32],
    channels: usize,
    h: usize,
    w: usize,
    draws: &RegionDraws,
    noise: &mut Stream,
    scratch: &mut Vec<f32>,
) {
    debug_assert_eq!(region.len(), channels * h * w);
    if draws.jitter {
        for op in draws.order {
            match op {
                JitterOp::Brightness => adjust_brightness(region, draws.brightness),
                JitterOp::Contrast => adjust_contrast(region, channels, draws.contrast),
                JitterOp::Saturation => adjust_saturation(region, channels, draws.saturation),
                JitterOp::Hue => {
                    if draws.hue != 0.0 {
                        adjust_hue(region, channels, draws.hue)
                    }
                }
            }
        }
    }
    if draws.grayscale {
        to_grayscale(region, channels);
    }
    if draws.blur {
        gaussian_blur(region, channels, h, w, draws.blur_sigma, scratch);
    }
    if draws.solarize {
        solarize(region, draws.solarize_threshold);
    }
    if draws.noise {
        add_noise(region, draws.noise_sigma, noise);
    }
}

/// Augments one view in place: per patch (every patch of the `side / patch` grid its own
/// draws) or, with `per_patch == false`, the whole view as one region. `view` is planar
/// `(channels, side, side)` in [0, 1] and stays in [0, 1]. Deterministic: the output is a
/// function of the arguments alone (see the module docs for the streams and draw order).
///
/// # Panics
/// If `channels` is not 1 or 3, `patch` is 0 or does not divide `side`, `view.len()` is not
/// `channels * side * side`, `view_index >= 4096`, or (per patch) the grid has `2^20 - 1` or
/// more patches: the caller's invariants, checked when the configuration is validated.
// The signature is the view builder's contract (SPEC.md section 2): one argument per counter word.
#[allow(clippy::too_many_arguments)]
pub fn augment_view(
    view: &mut [f32],
    channels: usize,
    side: usize,
    patch: usize,
    per_patch: bool,
    cfg: &PhotometricConfig,
    seed: u64,
    batch: u32,
    image: u32,
    view_index: u32,
) {
    assert!(
        channels == 1 || channels == 3,
        "augment_view: {channels} channels (1 or 3 supported)"
    );
    assert!(
        patch > 0 && side % patch == 0,
        "augment_view: patch {patch} does not divide side {side}"
    );
    assert_eq!(
        view.len(),
        channels * side * side,
        "augment_view: view is not channels*side*side"
    );
    assert!(
        view_index < 1 << 12,
        "augment_view: view index {view_index} >= 4096"
    );
    let streams = |region: u32| {
        let c2 = region_counter(view_index, region);
        (
            Stream::new(seed, [batch, image, c2], Purpose::Photometric),
            Stream::new(seed, [batch, image, c2], Purpose::Noise),
        )
    };
    let mut scratch = Vec::new();
    if !per_patch {
        let (mut params, mut noise) = streams(WHOLE_VIEW);
        let draws = RegionDraws::draw(cfg, &mut params);
        augment_region(view, channels, side, side, &draws, &mut noise, &mut scratch);
        return;
    }
    let grid = side / patch;
    assert!(
        grid * grid < WHOLE_VIEW as usize,
        "augment_view: {grid}x{grid} patches do not fit the 20-bit region index"
    );
    // (C, patch, patch) copy of the current patch.
    let mut region = vec![0.0f32; channels * patch * patch];
    for prow in 0..grid {
        for pcol in 0..grid {
            let (mut params, mut noise) = streams((prow * grid + pcol) as u32);
            let draws = RegionDraws::draw(cfg, &mut params);
            if draws.is_identity() {
                continue;
            }
            let at = |ch: usize, y: usize| (ch * side + prow * patch + y) * side + pcol * patch;
            for ch in 0..channels {
                for y in 0..patch {
                    region[(ch * patch + y) * patch..][..patch]
                        .copy_from_slice(&view[at(ch, y)..][..patch]);
                }
            }
            augment_region(
                &mut region,
                channels,
                patch,
                patch,
                &draws,
                &mut noise,
                &mut scratch,
            );
            for ch in 0..channels {
                for y in 0..patch {
                    view[at(ch, y)..][..patch]
                        .copy_from_slice(&region[(ch * patch + y) * patch..][..patch]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64, tol: f64) -> bool {
        (f64::from(a) - b).abs() <= tol
    }

    fn off() -> PhotometricConfig {
        PhotometricConfig::none()
    }

    /// Lexicographic permutations by the textbook next-permutation step, independent of the
    /// Lehmer decoding in `jitter_order`.
    #[test]
    fn jitter_order_is_lexicographic_permutation_k() {
        let mut p = [0usize, 1, 2, 3];
        for k in 0..24 {
            let got: Vec<usize> = jitter_order(k).iter().map(|&op| op as usize).collect();
            assert_eq!(got, p, "k = {k}");
            // next permutation
            if let Some(i) = (0..3).rev().find(|&i| p[i] < p[i + 1]) {
                let j = (i + 1..4).rev().find(|&j| p[j] > p[i]).unwrap();
                p.swap(i, j);
                p[i + 1..].reverse();
            }
        }
    }

    #[test]
    fn every_region_takes_exactly_twelve_draws() {
        let all_on = PhotometricConfig {
            jitter_p: 1.0,
            grayscale_p: 1.0,
            blur_p: 1.0,
            solarize_p: 1.0,
            noise_p: 1.0,
            ..PhotometricConfig::dino_global1()
        };
        let cfgs = [
            off(),
            all_on,
            PhotometricConfig::dino_global1(),
            PhotometricConfig::dino_global2(),
            PhotometricConfig::dino_local(),
        ];
        for cfg in &cfgs {
            for c2 in 0..50 {
                let mut s = Stream::new(3, [1, 2, c2], Purpose::Photometric);
                let _ = RegionDraws::draw(cfg, &mut s);
                let mut fresh = Stream::new(3, [1, 2, c2], Purpose::Photometric);
                for _ in 0..DRAWS_PER_REGION {
                    fresh.next_u32();
                }
                assert_eq!(s.next_u32(), fresh.next_u32());
            }
        }
    }

    /// Each field of `draw` is the documented draw: replay the stream by hand.
    #[test]
    fn draws_follow_the_documented_schedule() {
        let cfg = PhotometricConfig::dino_global2();
        let d = RegionDraws::draw(&cfg, &mut Stream::new(9, [4, 5, 6], Purpose::Photometric));
        let mut s = Stream::new(9, [4, 5, 6], Purpose::Photometric);
        let u: Vec<u32> = (0..12).map(|_| s.next_u32()).collect();
        let f = |x: u32| (x >> 8) as f32 / (1u32 << 24) as f32;
        assert_eq!(d.jitter, f(u[0]) < 0.8);
        let k = (((u128::from(u[1]) << 32 | u128::from(u[2])) * 24) >> 64) as u32;
        assert_eq!(d.order, jitter_order(k));
        assert_eq!(d.brightness, 0.6 + (1.4 - 0.6) * f(u[3]));
        assert_eq!(d.contrast, 0.6 + (1.4 - 0.6) * f(u[4]));
        assert_eq!(d.saturation, 0.8 + (1.2 - 0.8) * f(u[5]));
        assert_eq!(d.hue, -0.1 + (0.1 - -0.1) * f(u[6]));
        assert_eq!(d.grayscale, f(u[7]) < 0.2);
        assert_eq!(d.blur, f(u[8]) < 0.1);
        assert_eq!(d.blur_sigma, 0.1 + (2.0 - 0.1) * f(u[9]));
        assert_eq!(d.solarize, f(u[10]) < 0.2);
        assert_eq!(d.noise, f(u[11]) < 0.2);
    }

    #[test]
    fn brightness_hand_values() {
        let mut r = [0.5f32, 0.9, 0.2];
        adjust_brightness(&mut r, 1.3);
        // 0.65, 1.17 clamped to 1, 0.26
        assert!(close(r[0], 0.65, 1e-6) && r[1] == 1.0 && close(r[2], 0.26, 1e-6));
    }

    #[test]
    fn contrast_hand_values() {
        // Two RGB pixels, planar: R = [0.2, 0.6], G = [0.4, 0.8], B = [0.1, 0.3].
        // gray0 = 0.0598 + 0.2348 + 0.0114 = 0.306, gray1 = 0.1794 + 0.4696 + 0.0342 = 0.6832,
        // mean 0.4946; factor 0.5: x' = 0.5 x + 0.2473.
        let mut r = [0.2f32, 0.6, 0.4, 0.8, 0.1, 0.3];
        adjust_contrast(&mut r, 3, 0.5);
        let want = [0.3473, 0.5473, 0.4473, 0.6473, 0.2973, 0.3973];
        for (a, b) in r.iter().zip(want) {
            assert!(close(*a, b, 1e-6), "{r:?}");
        }
        // One channel: mean 0.4, factor 2: 2x - 0.4 -> [0, 0.8]; factor 3 clamps 1.2 to 1.
        let mut g = [0.2f32, 0.6];
        adjust_contrast(&mut g, 1, 2.0);
        assert!(close(g[0], 0.0, 1e-6) && close(g[1], 0.8, 1e-6), "{g:?}");
        let mut g = [0.2f32, 0.6];
        adjust_contrast(&mut g, 1, 3.0);
        assert!(g[0] == 0.0 && g[1] == 1.0, "{g:?}");
    }

    #[test]
    fn saturation_hand_values() {
        // (0.8, 0.3, 0.1): gray = 0.2392 + 0.1761 + 0.0114 = 0.4267.
        let mut r = [0.8f32, 0.3, 0.1];
        adjust_saturation(&mut r, 3, 0.0);
        assert!(r.iter().all(|&x| close(x, 0.4267, 1e-6)), "{r:?}");
        // factor 1.5: 1.5 x - 0.21335 -> 0.98665, 0.23665, -0.06335 clamped to 0.
        let mut r = [0.8f32, 0.3, 0.1];
        adjust_saturation(&mut r, 3, 1.5);
        assert!(close(r[0], 0.98665, 1e-6) && close(r[1], 0.23665, 1e-6) && r[2] == 0.0);
        let mut one = [0.3f32, 0.7];
        adjust_saturation(&mut one, 1, 0.0);
        assert_eq!(one, [0.3, 0.7]);
    }

    #[test]
    fn hue_shift_zero_is_identity() {
        let steps = [0.0f32, 0.1, 0.25, 0.5, 0.77, 1.0];
        for &r in &steps {
            for &g in &steps {
                for &b in &steps {
                    let mut px = [r, g, b];
                    adjust_hue(&mut px, 3, 0.0);
                    for (a, w) in px.iter().zip([r, g, b]) {
                        assert!((a - w).abs() < 1e-6, "{:?} -> {px:?}", [r, g, b]);
                    }
                }
            }
        }
    }

    /// The fast paths of `wrap_unit` agree bit for bit with fmod-then-add-1.
    #[test]
    fn wrap_unit_equals_torch_remainder() {
        let torch = |x: f32| {
            let m = x % 1.0;
            if m < 0.0 {
                m + 1.0
            } else {
                m
            }
        };
        let mut s = Stream::new(0, [0, 0, 0], Purpose::Noise);
        let specials = [0.0f32, -0.0, 1.0, 2.0, -1.0, -1e-9, 1.0 - 1e-7, 3.25, -2.5];
        let randoms = (0..100_000).map(|_| s.uniform(-3.0, 3.0));
        for x in specials.into_iter().chain(randoms) {
            assert_eq!(wrap_unit(x).to_bits(), torch(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn hue_red_plus_a_third_is_green() {
        let mut px = [1.0f32, 0.0, 0.0];
        adjust_hue(&mut px, 3, 1.0 / 3.0);
        assert!(close(px[0], 0.0, 1e-6) && close(px[1], 1.0, 1e-6) && close(px[2], 0.0, 1e-6));
        // A whole turn back: h = 2/3 - 1 < 0 wraps to 2/3, blue stays blue.
        let mut px = [0.0f32, 0.0, 1.0];
        adjust_hue(&mut px, 3, -1.0);
        assert!(close(px[0], 0.0, 1e-6) && close(px[1], 0.0, 1e-6) && close(px[2], 1.0, 1e-6));
    }

    /// Python's `colorsys` (an independent HSV implementation), generated with:
    /// ```python
    /// import colorsys
    /// h, s, v = colorsys.rgb_to_hsv(r, g, b); h = (h + f) % 1.0
    /// [round(x, 7) for x in colorsys.hsv_to_rgb(h, s, v)]
    /// ```
    #[test]
    fn hue_matches_python_colorsys() {
        let cases: [([f32; 3], f32, [f64; 3]); 6] = [
            ([0.8, 0.3, 0.1], 0.07, [0.8, 0.594, 0.1]),
            ([0.2, 0.6, 0.9], -0.1, [0.2, 0.9, 0.78]),
            ([0.5, 0.5, 0.2], 0.333, [0.2, 0.5, 0.4994]),
            ([0.9, 0.1, 0.7], 0.05, [0.9, 0.1, 0.46]),
            ([0.1, 0.9, 0.4], -0.45, [0.9, 0.1, 0.36]),
            ([0.3, 0.3, 0.3], 0.1, [0.3, 0.3, 0.3]),
        ];
        for (rgb, f, want) in cases {
            let mut px = rgb;
            adjust_hue(&mut px, 3, f);
            for (a, b) in px.iter().zip(want) {
                assert!(close(*a, b, 2e-6), "{rgb:?} + {f}: {px:?} vs {want:?}");
            }
        }
        let mut one = [0.3f32, 0.7];
        adjust_hue(&mut one, 1, 0.25);
        assert_eq!(one, [0.3, 0.7]);
    }

    #[test]
    fn grayscale_weights() {
        // Two pixels, planar: pure red, green, blue on separate regions.
        for (i, w) in [0.299, 0.587, 0.114].into_iter().enumerate() {
            let mut px = [0.0f32; 3];
            px[i] = 1.0;
            to_grayscale(&mut px, 3);
            assert!(px.iter().all(|&x| close(x, w, 1e-7)), "{px:?}");
        }
        let mut px = [0.2f32, 0.5, 0.9];
        to_grayscale(&mut px, 3);
        let want = 0.299 * 0.2 + 0.587 * 0.5 + 0.114 * 0.9;
        assert!(px.iter().all(|&x| close(x, want, 1e-6)));
        let mut one = [0.3f32];
        to_grayscale(&mut one, 1);
        assert_eq!(one, [0.3]);
    }

    #[test]
    fn solarize_threshold_boundary() {
        let t = 128.0f32 / 255.0;
        let mut r = [128.0 / 255.0, 127.0 / 255.0, 1.0, 0.0, 0.9];
        solarize(&mut r, t);
        assert!(close(r[0], 127.0 / 255.0, 1e-7)); // at the threshold: inverted
        assert_eq!(r[1], 127.0 / 255.0); // just below: kept
        assert_eq!(r[2], 0.0);
        assert_eq!(r[3], 0.0);
        assert!(close(r[4], 0.1, 1e-7));
    }

    #[test]
    fn gaussian_weights_shape() {
        let mut w = Vec::new();
        gaussian_weights(1.0, &mut w);
        assert_eq!(w.len(), 7); // radius ceil(3) = 3
        let sum: f32 = w.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(close(w[4] / w[3], (-0.5f64).exp(), 1e-6));
        assert!(close(w[6] / w[3], (-4.5f64).exp(), 1e-6));
        gaussian_weights(0.1, &mut w);
        assert_eq!(w.len(), 3); // radius ceil(0.3) = 1
        gaussian_weights(2.0, &mut w);
        assert_eq!(w.len(), 13);
    }

    /// Separable blur against a direct 2-D sum in f64 with clamped (replicated) indices.
    #[test]
    fn blur_matches_direct_2d_sum_with_edge_replication() {
        let (c, h, w) = (3, 5, 7);
        let src: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37 + 11) % 23) as f32 / 22.0)
            .collect();
        for sigma in [0.3f32, 0.9, 2.0] {
            let mut out = src.clone();
            gaussian_blur(&mut out, c, h, w, sigma, &mut Vec::new());
            let r = (3.0 * sigma).ceil() as i64;
            let g: Vec<f64> = (-r..=r)
                .map(|k| (-((k * k) as f64) / (2.0 * f64::from(sigma).powi(2))).exp())
                .collect();
            let total: f64 = g.iter().sum();
            for ch in 0..c {
                for y in 0..h as i64 {
                    for x in 0..w as i64 {
                        let mut want = 0.0;
                        for (ky, gy) in (-r..=r).zip(&g) {
                            for (kx, gx) in (-r..=r).zip(&g) {
                                let yy = (y + ky).clamp(0, h as i64 - 1) as usize;
                                let xx = (x + kx).clamp(0, w as i64 - 1) as usize;
                                want += gy * gx * f64::from(src[(ch * h + yy) * w + xx]);
                            }
                        }
                        want /= total * total;
                        let got = out[(ch * h + y as usize) * w + x as usize];
                        assert!(close(got, want, 2e-6), "sigma {sigma} ({ch},{y},{x})");
                    }
                }
            }
        }
    }

    #[test]
    fn noise_has_the_configured_sigma() {
        let mut region = vec![0.5f32; 100_000];
        let mut s = Stream::new(1, [2, 3, 4], Purpose::Noise);
        add_noise(&mut region, 0.04, &mut s);
        let n = region.len() as f64;
        let mean = region.iter().map(|&x| f64::from(x) - 0.5).sum::<f64>() / n;
        let var = region
            .iter()
            .map(|&x| (f64::from(x) - 0.5 - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard error of the mean 0.04/sqrt(n) = 1.3e-4; of the std about
        // 0.04/sqrt(2n) = 9e-5. Tolerances are about 5 standard errors. (Clamping at 12.5
        // sigma never happens.)
        assert!(mean.abs() < 6e-4, "{mean}");
        assert!((var.sqrt() - 0.04).abs() < 5e-4, "{}", var.sqrt());
    }

    #[test]
    fn dino_configs_are_valid_and_bad_fields_are_named() {
        for cfg in [
            PhotometricConfig::dino_global1(),
            PhotometricConfig::dino_global2(),
            PhotometricConfig::dino_local(),
        ] {
            cfg.validate("views.global1").unwrap();
        }
        let base = PhotometricConfig::dino_global1();
        let bad: Vec<(PhotometricConfig, &str)> = vec![
            (
                PhotometricConfig {
                    jitter_p: 1.5,
                    ..base.clone()
                },
                "jitter_p",
            ),
            (
                PhotometricConfig {
                    grayscale_p: -0.1,
                    ..base.clone()
                },
                "grayscale_p",
            ),
            (
                PhotometricConfig {
                    blur_p: f32::NAN,
                    ..base.clone()
                },
                "blur_p",
            ),
            (
                PhotometricConfig {
                    solarize_p: 2.0,
                    ..base.clone()
                },
                "solarize_p",
            ),
            (
                PhotometricConfig {
                    noise_p: -1.0,
                    ..base.clone()
                },
                "noise_p",
            ),
            (
                PhotometricConfig {
                    brightness: -0.4,
                    ..base.clone()
                },
                "brightness",
            ),
            (
                PhotometricConfig {
                    contrast: f32::INFINITY,
                    ..base.clone()
                },
                "contrast",
            ),
            (
                PhotometricConfig {
                    saturation: -1.0,
                    ..base.clone()
                },
                "saturation",
            ),
            (
                PhotometricConfig {
                    noise_sigma: -0.1,
                    ..base.clone()
                },
                "noise_sigma",
            ),
            (
                PhotometricConfig {
                    hue: 0.6,
                    ..base.clone()
                },
                "hue",
            ),
            (
                PhotometricConfig {
                    hue: -0.1,
                    ..base.clone()
                },
                "hue",
            ),
            (
                PhotometricConfig {
                    blur_sigma: (0.0, 1.0),
                    ..base.clone()
                },
                "blur_sigma",
            ),
            (
                PhotometricConfig {
                    blur_sigma: (2.0, 1.0),
                    ..base.clone()
                },
                "blur_sigma",
            ),
            (
                PhotometricConfig {
                    solarize_threshold: 1.5,
                    ..base.clone()
                },
                "solarize_threshold",
            ),
        ];
        for (cfg, field) in bad {
            match cfg.validate("views.local") {
                Err(Error::BadConfig { field: f, .. }) => {
                    assert_eq!(f, format!("views.local.{field}"))
                }
                other => panic!("{field}: expected BadConfig, got {other:?}"),
            }
        }
        match base.validate("") {
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
        let e = PhotometricConfig { hue: 0.6, ..base }
            .validate("")
            .unwrap_err();
        assert!(e.to_string().starts_with("hue: "), "{e}");
    }
}
