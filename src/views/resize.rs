//! Resize a crop box of a u8 source image to a square f32 view (SPEC.md section 1).
//!
//! This is the CPU reference for the GPU view builder: plain f32 loops, no state beyond the
//! plan, and the same arithmetic in the same order is what a kernel has to reproduce. It must
//! not read outside the crop box, draw random numbers, or normalise with dataset statistics
//! (that happens after photometric augmentation).
//!
//! # The exact math
//!
//! Semantics are those of torchvision's `resized_crop` on a PIL image with `antialias=True`,
//! i.e. `img.crop(box).resize((side, side), resample)`: PIL's separable resampling
//! (`libImaging/Resample.c`, `precompute_coeffs`) applied to the cropped region alone.
//!
//! Per axis, with `n` the crop extent on that axis (pixels) and `side` the output side:
//!
//! ```text
//! scale   = n / side                        (f64)
//! fs      = max(scale, 1)                   (filter stretch: antialiasing when downscaling)
//! support = S * fs                          (S = 1 bilinear, 2 bicubic)
//! centre  = (i + 0.5) * scale               output index i, crop-relative source coordinates
//! jmin    = max(0, trunc(centre - support + 0.5))
//! jmax    = min(n, trunc(centre + support + 0.5))           taps j in [jmin, jmax)
//! w_j     = filter((j + 0.5 - centre) * (1 / fs)) / sum_j filter(...)
//! ```
//!
//! `filter` is the triangle `max(0, 1 - |x|)` (bilinear) or Keys' cubic with `a = -0.5`
//! (bicubic): `((a+2)|x| - (a+3))|x|^2 + 1` for `|x| < 1`, `a(|x|^3 - 5|x|^2 + 8|x| - 4)` for
//! `1 <= |x| < 2`, else 0. The taps are clipped to the crop box (never outside it). Weights are
//! computed in f64 exactly as PIL does, then stored as f32; exact-zero weights at either end of
//! a tap run are dropped (they contribute nothing). If the crop is flipped, the column taps are
//! stored mirrored (output column `x` uses the taps of unflipped column `side - 1 - x`), so
//! [`ResizePlan::apply`] itself never branches on the flip.
//!
//! [`ResizePlan::apply`] runs the **horizontal pass first**, then the vertical pass, in f32:
//!
//! ```text
//! tmp[ch][y][x] = sum_k wcol[x][k] * src[top + y][left + cfirst[x] + k][ch]   (u8 as f32, 0..255)
//! acc[ch][y][x] = sum_k wrow[y][k] * tmp[ch][rfirst[y] + k][x]
//! out[ch][y][x] = clamp(acc / 255, 0, 1)
//! ```
//!
//! Each sum starts at 0.0 and adds the taps in ascending `k`. Unlike PIL's 8-bit path the
//! intermediate is not rounded to u8 (PIL's float "F" mode path matches this one to f32
//! rounding, which is what the tests compare against; PIL's 8-bit path is within about 1/255).
//!
//! A GPU twin should take the plan's f32 weights and tap ranges as input ([`AxisTaps`]) rather
//! than recompute them, and must not fuse multiply-adds (Rust never does) to match bit for bit.

use super::crop::CropRecord;

/// The resampling filter used to resize a crop to the view side.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// PIL's `BILINEAR`: triangle filter, support 1 (stretched when downscaling).
    Bilinear,
    /// PIL's `BICUBIC`: Keys' cubic convolution with `a = -0.5`, support 2.
    Bicubic,
}

impl Interpolation {
    /// Half-width of the filter at scale 1, in source pixels.
    pub fn support(self) -> f64 {
        match self {
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        }
    }

    /// The filter's value at `x` (in filter units; zero outside `[-support, support]`).
    pub fn filter(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Interpolation::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Interpolation::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Resampling taps of one axis: for every output index, the first source index (relative to
/// the crop box) and the weights of consecutive source pixels from there.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisTaps {
    first: Vec<u32>,
    count: Vec<u32>,
    stride: usize,
    weights: Vec<f32>,
}

impl AxisTaps {
    /// Taps of one axis of extent `n` resized to `side` outputs, mirrored when `mirror`.
    fn new(n: usize, side: usize, interp: Interpolation, mirror: bool) -> AxisTaps {
        let scale = n as f64 / side as f64;
        let fs = scale.max(1.0);
        let support = interp.support() * fs;
        let inv_fs = 1.0 / fs;
        // PIL's bound on the run length; trimming only makes runs shorter.
        let stride = support.ceil() as usize * 2 + 1;
        let mut first = Vec::with_capacity(side);
        let mut count = Vec::with_capacity(side);
        let mut weights = vec![0.0f32; side * stride];
        let mut w64 = vec![0.0f64; stride];
        for i in 0..side {
            let centre = (i as f64 + 0.5) * scale;
            // `as i64` truncates toward zero, like C's `(int)` in PIL.
            let jmin = ((centre - support + 0.5) as i64).max(0) as usize;
            let jmax = ((centre + support + 0.5) as i64).min(n as i64) as usize;
            let len = jmax.saturating_sub(jmin);
            let mut total = 0.0f64;
            for (k, w) in w64[..len].iter_mut().enumerate() {
                *w = interp.filter(((jmin + k) as f64 - centre + 0.5) * inv_fs);
                total += *w;
            }
            if total != 0.0 {
                for w in &mut w64[..len] {
                    *w /= total;
                }
            }
            // Drop exact zeros at both ends of the run.
            let lead = w64[..len].iter().take_while(|&&w| w == 0.0).count();
            let trail = w64[lead..len]
                .iter()
                .rev()
                .take_while(|&&w| w == 0.0)
                .count();
            let run = &w64[lead..len - trail];
            first.push((jmin + lead) as u32);
            count.push(run.len() as u32);
            for (dst, &w) in weights[i * stride..].iter_mut().zip(run) {
                *dst = w as f32;
            }
        }
        let mut taps = AxisTaps {
            first,
            count,
            stride,
            weights,
        };
        if mirror {
            taps.first.reverse();
            taps.count.reverse();
            let mut mirrored = vec![0.0f32; side * stride];
            for i in 0..side {
                let from = &taps.weights[(side - 1 - i) * stride..][..stride];
                mirrored[i * stride..][..stride].copy_from_slice(from);
            }
            taps.weights = mirrored;
        }
        taps
    }

    /// Number of outputs on this axis (the view side).
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// True when there are no outputs (never for a plan built by [`ResizePlan::new`]).
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// The taps of output `i`: the first source index relative to the crop box, and the
    /// weights of source pixels `first, first + 1, ...`.
    #[inline]
    pub fn taps(&self, i: usize) -> (usize, &[f32]) {
        let w = &self.weights[i * self.stride..][..self.count[i] as usize];
        (self.first[i] as usize, w)
    }

    /// First source index (crop-relative) of every output, for uploading to a kernel.
    pub fn first(&self) -> &[u32] {
        &self.first
    }

    /// Number of taps of every output.
    pub fn count(&self) -> &[u32] {
        &self.count
    }

    /// Distance between consecutive outputs' weight runs in [`AxisTaps::weights`].
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// All weights, `len() * stride()` of them; output `i`'s run starts at `i * stride()`
    /// and unused slots are 0.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
}

/// A precomputed resize of one crop box to a `side x side` view. All images of a batch share
/// the crop box, so one plan serves the whole batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizePlan {
    crop: CropRecord,
    side: usize,
    interp: Interpolation,
    cols: AxisTaps,
    rows: AxisTaps,
}

impl ResizePlan {
    /// The plan that resizes `crop` to `side x side` with `interp` (mirrored if
    /// `crop.flipped`).
    ///
    /// # Panics
    /// If `side` is 0 or the crop box is empty (crop sampling never produces either).
    pub fn new(crop: &CropRecord, side: usize, interp: Interpolation) -> ResizePlan {
        assert!(side > 0, "ResizePlan: the view side must be positive");
        assert!(
            crop.width > 0 && crop.height > 0,
            "ResizePlan: empty crop box {crop:?}"
        );
        ResizePlan {
            crop: *crop,
            side,
            interp,
            cols: AxisTaps::new(crop.width as usize, side, interp, crop.flipped),
            rows: AxisTaps::new(crop.height as usize, side, interp, false),
        }
    }

    /// The crop box this plan reads.
    pub fn crop(&self) -> &CropRecord {
        &self.crop
    }

    /// The output side.
    pub fn side(&self) -> usize {
        self.side
    }

    /// The resampling filter.
    pub fn interpolation(&self) -> Interpolation {
        self.interp
    }

    /// Per-output-column taps (already mirrored when the crop is flipped).
    pub fn columns(&self) -> &AxisTaps {
        &self.cols
    }

    /// Per-output-row taps.
    pub fn rows(&self) -> &AxisTaps {
        &self.rows
    }

    /// Resize the crop box of `src` into `out`.
    ///
    /// `src` is an `h x w x c` image, interleaved (HWC) u8; `out` receives the planar (CHW)
    /// view, `c x side x side`, in [0, 1]. Allocates one intermediate buffer of
    /// `c x crop.height x side` floats.
    ///
    /// # Panics
    /// If `src.len() != h * w * c`, `out.len() != c * side * side`, `c == 0`, or the crop box
    /// does not lie inside the `h x w` image. These are the caller's invariants (the crop was
    /// sampled for this source size), not user input.
    pub fn apply(&self, src: &[u8], h: usize, w: usize, c: usize, out: &mut [f32]) {
        let side = self.side;
        let (top, left) = (self.crop.top as usize, self.crop.left as usize);
        let (ch_, cw) = (self.crop.height as usize, self.crop.width as usize);
        assert!(c > 0, "ResizePlan::apply: zero channels");
        assert_eq!(src.len(), h * w * c, "ResizePlan::apply: src is not h*w*c");
        assert_eq!(
            out.len(),
            c * side * side,
            "ResizePlan::apply: out is not c*side*side"
        );
        assert!(
            top + ch_ <= h && left + cw <= w,
            "ResizePlan::apply: crop {:?} outside a {h}x{w} image",
            self.crop
        );

        // Horizontal pass: (crop_h, crop_w, c) u8 -> (c, crop_h, side) f32 in 0..255.
        let mut tmp = vec![0.0f32; c * ch_ * side];
        for y in 0..ch_ {
            let row = &src[((top + y) * w + left) * c..][..cw * c];
            for x in 0..side {
                let (first, wts) = self.cols.taps(x);
                for ch in 0..c {
                    let mut acc = 0.0f32;
                    for (k, &wk) in wts.iter().enumerate() {
                        acc += wk * f32::from(row[(first + k) * c + ch]);
                    }
                    tmp[(ch * ch_ + y) * side + x] = acc;
                }
            }
        }

        // Vertical pass: (c, crop_h, side) -> (c, side, side), then to [0, 1].
        for ch in 0..c {
            let plane = &tmp[ch * ch_ * side..][..ch_ * side];
            for y in 0..side {
                let (first, wts) = self.rows.taps(y);
                let dst = &mut out[(ch * side + y) * side..][..side];
                dst.fill(0.0);
                for (k, &wk) in wts.iter().enumerate() {
                    let srow = &plane[(first + k) * side..][..side];
                    for (d, &s) in dst.iter_mut().zip(srow) {
                        *d += wk * s;
                    }
                }
                for d in dst.iter_mut() {
                    *d = (*d / 255.0).clamp(0.0, 1.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(top: u32, left: u32, height: u32, width: u32, flipped: bool) -> CropRecord {
        CropRecord {
            top,
            left,
            height,
            width,
            flipped,
        }
    }

    /// A deterministic test image, HWC u8.
    fn image(h: usize, w: usize, c: usize) -> Vec<u8> {
        (0..h * w * c)
            .map(|i| ((i * 2_654_435_761usize) >> 7) as u8)
            .collect()
    }

    #[test]
    fn identity_returns_pixels_over_255() {
        let (h, w, c) = (7, 7, 3);
        let src = image(h, w, c);
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            let plan = ResizePlan::new(&rec(0, 0, 7, 7, false), 7, interp);
            let mut out = vec![0.0; c * 49];
            plan.apply(&src, h, w, c, &mut out);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        let want = f32::from(src[(y * w + x) * c + ch]) / 255.0;
                        let got = out[(ch * 7 + y) * 7 + x];
                        assert!((got - want).abs() <= 1e-6, "{interp:?} {got} {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let (h, w, c) = (20, 17, 3);
        let src: Vec<u8> = (0..h * w * c).map(|i| [10u8, 128, 250][i % 3]).collect();
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for side in [3, 8, 29] {
                let plan = ResizePlan::new(&rec(2, 3, 15, 11, true), side, interp);
                let mut out = vec![0.0; c * side * side];
                plan.apply(&src, h, w, c, &mut out);
                for ch in 0..c {
                    let want = [10.0f32, 128.0, 250.0][ch] / 255.0;
                    for &v in &out[ch * side * side..][..side * side] {
                        assert!((v - want).abs() <= 1e-6, "{interp:?} {side} {v} {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn flip_mirrors_columns() {
        let (h, w, c) = (16, 16, 3);
        let src = image(h, w, c);
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            let side = 6;
            let plan = ResizePlan::new(&rec(1, 2, 13, 11, false), side, interp);
            let flip = ResizePlan::new(&rec(1, 2, 13, 11, true), side, interp);
            let (mut a, mut b) = (vec![0.0; c * 36], vec![0.0; c * 36]);
            plan.apply(&src, h, w, c, &mut a);
            flip.apply(&src, h, w, c, &mut b);
            for ch in 0..c {
                for y in 0..side {
                    for x in 0..side {
                        let i = (ch * side + y) * side;
                        assert_eq!(a[i + x], b[i + side - 1 - x]);
                    }
                }
            }
        }
    }

    /// Pixels outside the crop box never reach the output: painting them 0 or 255 changes
    /// nothing, for downscales (wide stretched filters) and upscales alike.
    #[test]
    fn never_reads_outside_the_crop_box() {
        let (h, w, c) = (24, 24, 3);
        let crop = rec(5, 7, 11, 9, true);
        let inside = |y: usize, x: usize| (5..16).contains(&y) && (7..16).contains(&x);
        let base = image(h, w, c);
        let paint = |v: u8| -> Vec<u8> {
            let mut img = base.clone();
            for y in 0..h {
                for x in 0..w {
                    if !inside(y, x) {
                        img[(y * w + x) * c..][..c].fill(v);
                    }
                }
            }
            img
        };
        let (dark, light) = (paint(0), paint(255));
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for side in [3, 5, 20] {
                let plan = ResizePlan::new(&crop, side, interp);
                let (mut a, mut b) = (vec![0.0; c * side * side], vec![0.0; c * side * side]);
                plan.apply(&dark, h, w, c, &mut a);
                plan.apply(&light, h, w, c, &mut b);
                assert_eq!(a, b, "{interp:?} side {side}");
            }
        }
    }

    /// PIL's antialiased triangle at scale 2: support 2, centre of output i at 2i + 1, taps
    /// 2i-1 .. 2i+2 at distances 1.5, 0.5, 0.5, 1.5 -> triangle(d / 2) = 1/4, 3/4, 3/4, 1/4,
    /// normalised: 1/8, 3/8, 3/8, 1/8; at the image edge the out-of-box tap is dropped and the
    /// other three renormalised: 3/7, 3/7, 1/7.
    #[test]
    fn bilinear_2x_downscale_matches_hand_weights() {
        let (h, w, c) = (8, 8, 1);
        let src = image(h, w, c);
        let plan = ResizePlan::new(&rec(0, 0, 8, 8, false), 4, Interpolation::Bilinear);
        let mut out = vec![0.0; 16];
        plan.apply(&src, h, w, c, &mut out);
        let axis = |i: usize| -> Vec<(usize, f64)> {
            let full = [(1.0, -1i64), (3.0, 0), (3.0, 1), (1.0, 2)];
            let taps: Vec<(usize, f64)> = full
                .iter()
                .map(|&(wt, d)| (2 * i as i64 + d, wt))
                .filter(|&(j, _)| (0..8).contains(&j))
                .map(|(j, wt)| (j as usize, wt))
                .collect();
            let total: f64 = taps.iter().map(|t| t.1).sum();
            taps.into_iter().map(|(j, wt)| (j, wt / total)).collect()
        };
        for oy in 0..4 {
            for ox in 0..4 {
                let mut want = 0.0f64;
                for &(y, wy) in &axis(oy) {
                    for &(x, wx) in &axis(ox) {
                        want += wy * wx * f64::from(src[y * w + x]);
                    }
                }
                let want = want / 255.0;
                let got = f64::from(out[oy * 4 + ox]);
                assert!((got - want).abs() < 1e-6, "({oy},{ox}) {got} {want}");
            }
        }
        // The interior weights really are 1/8, 3/8, 3/8, 1/8.
        let (first, wts) = plan.columns().taps(1);
        assert_eq!(first, 1);
        let want = [0.125f32, 0.375, 0.375, 0.125];
        assert!(wts.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-7));
    }

    /// Upscale 2x2 -> 4x4 bilinear: output 1 has centre 0.75 in source pixel units, i.e.
    /// 0.25 past the centre of pixel 0 (at 0.5) toward pixel 1: weights 0.75, 0.25.
    #[test]
    fn bilinear_upscale_matches_hand_value() {
        let src = [0u8, 100, 200, 40]; // 2x2, 1 channel: [[0, 100], [200, 40]]
        let plan = ResizePlan::new(&rec(0, 0, 2, 2, false), 4, Interpolation::Bilinear);
        let mut out = vec![0.0; 16];
        plan.apply(&src, 2, 2, 1, &mut out);
        // Output (1, 2): rows 0.75*row0 + 0.25*row1; column 2 has centre 1.25: 0.25*col0 + 0.75*col1.
        let row0 = 0.25 * 0.0 + 0.75 * 100.0;
        let row1 = 0.25 * 200.0 + 0.75 * 40.0;
        let want = (0.75 * row0 + 0.25 * row1) / 255.0;
        assert!((out[4 + 2] - want).abs() < 1e-6, "{} {want}", out[6]);
        // Output (0, 0): centre 0.25 on both axes; taps clipped to the box -> pixel (0, 0) alone.
        assert!(out[0].abs() < 1e-7);
    }

    /// Reference values from Pillow 13.0.0 (pip install pillow), generated with:
    ///
    /// ```python
    /// from PIL import Image
    /// H, W = 11, 13
    /// px = lambda y, x, c: (y * 89 + x * 53 + c * 71 + (x * y * 37) % 101 + ((x ^ y) * 29) % 67) % 256
    /// def ref(box, side, resample):
    ///     out = []
    ///     for c in range(3):
    ///         im = Image.new("F", (W, H))
    ///         im.putdata([float(px(y, x, c)) for y in range(H) for x in range(W)])
    ///         # crop first, then resize: torchvision's resized_crop; `resize(box=...)` would
    ///         # read pixels outside the box.
    ///         r = im.crop(box).resize((side, side), resample=resample)
    ///         out += [round(v, 4) for v in r.getdata()]
    ///     return out
    /// ref((2, 1, 2 + 9, 1 + 7), 4, Image.BILINEAR)   # left, top, right, bottom
    /// ref((2, 1, 2 + 9, 1 + 7), 4, Image.BICUBIC)
    /// ref((3, 2, 3 + 4, 2 + 5), 7, Image.BILINEAR)
    /// ref((3, 2, 3 + 4, 2 + 5), 7, Image.BICUBIC)
    /// ```
    ///
    /// Mode "F" resamples in float (f64 sums, f32 storage, intermediate not rounded), so it
    /// matches this f32 implementation to ~1e-5 of 255; values are in 0..255 and may overshoot
    /// (bicubic), so the comparison clamps `ref / 255` to [0, 1].
    const PIL_H: usize = 11;
    const PIL_W: usize = 13;
    fn pil_px(y: usize, x: usize, c: usize) -> u8 {
        ((y * 89 + x * 53 + c * 71 + (x * y * 37) % 101 + ((x ^ y) * 29) % 67) % 256) as u8
    }

    fn check_against_pil(crop: CropRecord, side: usize, interp: Interpolation, want: &[f32]) {
        let c = 3;
        let mut src = vec![0u8; PIL_H * PIL_W * c];
        for y in 0..PIL_H {
            for x in 0..PIL_W {
                for ch in 0..c {
                    src[(y * PIL_W + x) * c + ch] = pil_px(y, x, ch);
                }
            }
        }
        assert_eq!(want.len(), c * side * side);
        for flipped in [false, true] {
            let plan = ResizePlan::new(&CropRecord { flipped, ..crop }, side, interp);
            let mut out = vec![0.0; c * side * side];
            plan.apply(&src, PIL_H, PIL_W, c, &mut out);
            for ch in 0..c {
                for y in 0..side {
                    for x in 0..side {
                        let xs = if flipped { side - 1 - x } else { x };
                        let r = (want[(ch * side + y) * side + xs] / 255.0).clamp(0.0, 1.0);
                        let got = out[(ch * side + y) * side + x];
                        // 1e-5: f32 rounding of sums of ~10 terms of size 255, over 255, plus
                        // the 4 decimals kept in the table.
                        assert!(
                            (got - r).abs() < 1e-5,
                            "{interp:?} flip={flipped} ch{ch} ({y},{x}): {got} vs PIL {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bilinear_downscale_matches_pil() {
        let crop = rec(1, 2, 7, 9, false);
        check_against_pil(crop, 4, Interpolation::Bilinear, &PIL_BILINEAR_DOWN);
    }

    #[test]
    fn bicubic_downscale_matches_pil() {
        let crop = rec(1, 2, 7, 9, false);
        check_against_pil(crop, 4, Interpolation::Bicubic, &PIL_BICUBIC_DOWN);
    }

    #[test]
    fn bilinear_upscale_matches_pil() {
        let crop = rec(2, 3, 5, 4, false);
        check_against_pil(crop, 7, Interpolation::Bilinear, &PIL_BILINEAR_UP);
    }

    #[test]
    fn bicubic_upscale_matches_pil() {
        let crop = rec(2, 3, 5, 4, false);
        check_against_pil(crop, 7, Interpolation::Bicubic, &PIL_BICUBIC_UP);
    }

    /// Pillow's 8-bit RGB path on the same image (same `px` and boxes as above):
    ///
    /// ```python
    /// im = Image.new("RGB", (W, H))
    /// im.putdata([tuple(px(y, x, c) for c in range(3)) for y in range(H) for x in range(W)])
    /// d = list(im.crop(box).resize((side, side), resample=resample).getdata())
    /// [d[i][c] for c in range(3) for i in range(side * side)]   # planar, like the view
    /// ```
    ///
    /// PIL's 8-bit path uses 22-bit fixed-point weights and rounds the intermediate (after
    /// the horizontal pass) to u8 as well as the result. The final rounding is at most 0.5/255;
    /// the intermediate rounding (0.5/255 per tap) is carried through the vertical weights,
    /// whose absolute sum is 1 for bilinear and at most 1.25 for Keys' cubic (1 + 2 * 0.125,
    /// the two negative lobes at the upscale worst case). Tolerance: (0.5 + 0.5 * 1.25)/255
    /// plus 1e-5 for the fixed-point weights.
    #[test]
    fn rgb_u8_outputs_match_pil_within_rounding() {
        let cases: [(CropRecord, usize, Interpolation, &[f32]); 2] = [
            (
                rec(1, 2, 7, 9, false),
                4,
                Interpolation::Bicubic,
                &PIL_RGB_BICUBIC_DOWN,
            ),
            (
                rec(2, 3, 5, 4, false),
                7,
                Interpolation::Bilinear,
                &PIL_RGB_BILINEAR_UP,
            ),
        ];
        let mut src = vec![0u8; PIL_H * PIL_W * 3];
        for y in 0..PIL_H {
            for x in 0..PIL_W {
                for ch in 0..3 {
                    src[(y * PIL_W + x) * 3 + ch] = pil_px(y, x, ch);
                }
            }
        }
        let tol = (0.5 + 0.5 * 1.25) / 255.0 + 1e-5;
        for (crop, side, interp, want) in cases {
            let plan = ResizePlan::new(&crop, side, interp);
            let mut out = vec![0.0; 3 * side * side];
            plan.apply(&src, PIL_H, PIL_W, 3, &mut out);
            let mut worst = 0.0f32;
            for (&got, &r) in out.iter().zip(want) {
                worst = worst.max((got - r / 255.0).abs());
            }
            assert!(worst < tol, "{interp:?}: {} / 255", worst * 255.0);
        }
    }

    const PIL_BILINEAR_DOWN: [f32; 48] = [
        74.6286, 105.1475, 114.8281, 155.8299, 116.9074, 92.4312, 118.5932, 131.92, 147.4514,
        159.68, 145.6468, 143.0206, 186.951, 119.4495, 149.1568, 147.732, 140.4041, 119.3577,
        140.0395, 103.532, 130.856, 150.4439, 116.9141, 94.6686, 150.8674, 131.5268, 77.7824,
        93.4811, 117.9347, 141.6876, 106.2799, 139.3197, 159.8558, 150.2184, 133.1394, 90.2435,
        116.1326, 139.5239, 151.6995, 134.9486, 140.24, 79.6468, 111.319, 114.744, 104.298,
        124.381, 171.928, 169.5687,
    ];
    const PIL_BICUBIC_DOWN: [f32; 48] = [
        70.5294, 102.6264, 118.79, 158.3728, 117.5916, 83.7902, 114.7936, 131.9766, 146.6564,
        165.8746, 145.3315, 143.4302, 195.2202, 111.9191, 155.3654, 147.443, 140.0206, 115.8578,
        145.5174, 98.6668, 130.7823, 153.8097, 119.7951, 89.1959, 152.6708, 135.2128, 73.4799,
        91.8646, 113.1111, 146.2709, 102.6151, 144.0755, 161.8308, 156.1079, 128.5819, 87.8395,
        113.3762, 138.6473, 159.2336, 136.332, 148.3837, 65.0009, 110.3012, 109.7875, 98.3037,
        126.1954, 178.7666, 172.6975,
    ];
    const PIL_BILINEAR_UP: [f32; 147] = [
        130.0, 87.8571, 20.4286, 6.0, 5.2143, 46.9286, 73.0, 170.0, 112.9592, 21.6939, 36.5714,
        66.4796, 95.4592, 113.5714, 155.7143, 116.9898, 55.0306, 87.3571, 126.5714, 119.7143,
        115.4286, 45.0, 80.0, 136.0, 157.0, 161.9286, 89.3571, 44.0, 142.8571, 159.2347, 185.4388,
        195.2143, 194.0714, 132.9286, 94.7143, 212.0, 196.2857, 171.1429, 177.5, 181.4898,
        137.4082, 109.8571, 252.0, 203.4286, 125.7143, 133.5, 147.5714, 120.1429, 103.0, 201.0,
        158.8571, 91.4286, 77.0, 76.2143, 117.9286, 144.0, 94.7143, 89.9184, 82.2449, 107.5714,
        137.4796, 166.4592, 184.5714, 43.8571, 70.4388, 112.9694, 158.3571, 197.5714, 190.7143,
        186.4286, 116.0, 151.0, 207.0, 228.0, 232.9286, 160.3571, 115.0, 213.8571, 164.9286,
        86.6429, 83.3571, 95.2755, 138.6225, 165.7143, 173.2857, 144.5102, 98.4694, 102.2143,
        116.6531, 156.1633, 180.8571, 67.0, 109.8571, 178.4286, 204.5, 218.5714, 191.1429, 174.0,
        16.0, 65.2857, 144.1429, 148.0, 147.2143, 188.9286, 215.0, 56.0, 90.3878, 145.4082,
        178.5714, 198.0306, 143.4184, 109.2857, 114.8571, 115.3163, 116.051, 156.2143, 187.5918,
        118.0408, 74.5714, 187.0, 130.5714, 40.2857, 43.0, 66.2143, 139.9286, 186.0, 102.0,
        92.2551, 76.6633, 81.2143, 85.2959, 65.949, 53.8571, 98.0, 82.2857, 57.1429, 63.5, 75.3265,
        93.9388, 105.5714, 138.0, 89.4286, 11.7143, 19.5, 51.8571, 170.7143, 245.0,
    ];
    const PIL_BICUBIC_UP: [f32; 147] = [
        134.9456, 92.274, 17.8944, -8.9302, -3.5715, 45.4185, 74.8352, 193.5987, 123.5485, 7.7496,
        14.4579, 62.0198, 102.8267, 124.2856, 173.4577, 122.5479, 42.1336, 78.2054, 133.9667,
        129.0295, 122.2231, 37.226, 73.5322, 137.7039, 171.0625, 166.1116, 83.4298, 33.9255,
        134.2437, 157.9018, 198.9657, 217.072, 205.0395, 130.571, 86.7204, 225.966, 205.9206,
        172.9213, 181.6371, 186.2817, 137.6758, 108.5111, 267.6101, 210.767, 116.1542, 122.7427,
        146.4172, 117.3008, 98.729, 222.0412, 173.6822, 89.5694, 61.1377, 67.4285, 116.4185,
        145.8352, 91.6194, 82.6914, 71.4953, 95.4745, 133.0198, 173.8267, 195.2856, 14.2805,
        47.3411, 110.6311, 170.8963, 212.0924, 202.2839, 192.631, 108.226, 144.5322, 208.7039,
        242.0625, 237.1116, 154.4298, 104.9255, 250.3121, 182.8837, 68.065, 47.139, 72.9564,
        137.3208, 174.5941, 187.9816, 149.8159, 85.806, 79.385, 104.2701, 160.267, 192.2245,
        45.0239, 97.1888, 189.129, 227.4515, 231.6548, 192.8052, 168.546, 0.6379, 55.5996,
        148.3067, 148.1377, 139.1035, 197.8267, 232.9308, 39.5714, 80.1363, 153.6405, 202.6851,
        213.0145, 138.1104, 91.9561, 118.9814, 115.6074, 116.5443, 175.0042, 207.5328, 109.066,
        47.6077, 199.5337, 138.2065, 35.2916, 25.0625, 63.6993, 148.1042, 196.2332, 95.753,
        90.0927, 80.9818, 87.1653, 86.2111, 49.7389, 28.0906, 93.5966, 80.042, 58.1509, 62.7175,
        76.615, 90.4931, 97.8395, 153.6101, 96.767, 2.1542, -8.1893, 44.68, 192.3833, 277.1322,
    ];
    const PIL_RGB_BICUBIC_DOWN: [f32; 48] = [
        70.0, 102.0, 119.0, 158.0, 118.0, 84.0, 115.0, 132.0, 147.0, 166.0, 145.0, 143.0, 195.0,
        112.0, 156.0, 148.0, 140.0, 116.0, 146.0, 99.0, 131.0, 154.0, 120.0, 89.0, 152.0, 135.0,
        74.0, 92.0, 113.0, 146.0, 103.0, 144.0, 162.0, 156.0, 128.0, 88.0, 113.0, 138.0, 159.0,
        136.0, 148.0, 65.0, 110.0, 110.0, 98.0, 126.0, 179.0, 173.0,
    ];
    const PIL_RGB_BILINEAR_UP: [f32; 147] = [
        130.0, 88.0, 20.0, 6.0, 5.0, 47.0, 73.0, 170.0, 113.0, 22.0, 37.0, 66.0, 96.0, 114.0,
        156.0, 117.0, 55.0, 88.0, 126.0, 120.0, 115.0, 45.0, 80.0, 136.0, 157.0, 162.0, 89.0, 44.0,
        143.0, 159.0, 185.0, 196.0, 194.0, 133.0, 95.0, 212.0, 196.0, 171.0, 178.0, 182.0, 137.0,
        110.0, 252.0, 203.0, 126.0, 134.0, 148.0, 120.0, 103.0, 201.0, 159.0, 91.0, 77.0, 76.0,
        118.0, 144.0, 95.0, 90.0, 82.0, 108.0, 137.0, 167.0, 185.0, 44.0, 70.0, 113.0, 159.0,
        197.0, 191.0, 186.0, 116.0, 151.0, 207.0, 228.0, 233.0, 160.0, 115.0, 214.0, 165.0, 86.0,
        84.0, 95.0, 139.0, 166.0, 173.0, 144.0, 98.0, 103.0, 117.0, 156.0, 181.0, 67.0, 110.0,
        178.0, 205.0, 219.0, 191.0, 174.0, 16.0, 65.0, 144.0, 148.0, 147.0, 189.0, 215.0, 56.0,
        90.0, 145.0, 179.0, 198.0, 143.0, 109.0, 115.0, 115.0, 116.0, 157.0, 187.0, 118.0, 75.0,
        187.0, 131.0, 40.0, 43.0, 66.0, 140.0, 186.0, 102.0, 92.0, 76.0, 82.0, 85.0, 66.0, 54.0,
        98.0, 82.0, 57.0, 64.0, 75.0, 94.0, 106.0, 138.0, 89.0, 12.0, 20.0, 52.0, 171.0, 245.0,
    ];
}
