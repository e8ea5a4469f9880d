//! Pictures for people: one source image, two of its views with their patch grids, and a
//! line between every pair of matched patches (`pwself-engine viz matches`); the CLS
//! self-attention of each head over an image, like DINO's figures (`viz attention`,
//! [`attention_overlay`]); query images beside their retrieved neighbours
//! (`viz neighbours`, [`neighbour_grid`]); and the small line plots of the reports.
//!
//! Plain raster drawing on an `image::RgbImage` (nearest-neighbour upscaling, bilinear map
//! upsampling, Bresenham lines, rectangle outlines, a 3x5 bitmap font): a few lines each,
//! so no drawing crate is pulled in. Nothing here reads files or models: callers hand in
//! pixels and numbers and write the returned picture themselves.

use image::{Rgb, RgbImage};

use crate::views::crop::CropRecord;
use crate::views::matching::Matches;

const BACKGROUND: Rgb<u8> = Rgb([24, 24, 28]);
const TEACHER: Rgb<u8> = Rgb([255, 200, 40]);
const STUDENT: Rgb<u8> = Rgb([60, 200, 255]);
const GRID: Rgb<u8> = Rgb([110, 110, 120]);
const PANEL: u32 = 320;
const GAP: u32 = 40;

/// A view to draw: its pixels as `(C, S, S)` values in [0, 1] and its patch size.
pub struct ViewPicture<'a> {
    pub pixels: &'a [f32],
    pub channels: usize,
    pub side: usize,
    pub patch: usize,
    pub crop: CropRecord,
}

/// Draws `[source with both boxes] [teacher view + grid] [student view + grid]` with a line
/// between the centres of every matched patch pair (CLS excluded). `source` is HWC u8.
pub fn draw_matches(
    source: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    teacher: &ViewPicture,
    student: &ViewPicture,
    matches: &Matches,
) -> RgbImage {
    let k_src = (PANEL / height.max(width) as u32).max(1);
    let k_t = (PANEL / teacher.side as u32).max(1);
    let k_s = (PANEL / student.side as u32).max(1);
    let src_w = width as u32 * k_src;
    let t_side = teacher.side as u32 * k_t;
    let s_side = student.side as u32 * k_s;
    let x_t = GAP + src_w + GAP;
    let x_s = x_t + t_side + 2 * GAP;
    let canvas_w = x_s + s_side + GAP;
    let canvas_h = GAP + (height as u32 * k_src).max(t_side).max(s_side) + GAP;
    let mut img = RgbImage::from_pixel(canvas_w, canvas_h, BACKGROUND);

    // Source image and the two crop boxes (a flipped view's box is drawn dashed).
    for y in 0..height {
        for x in 0..width {
            let px = &source[(y * width + x) * channels..][..channels];
            let rgb = if channels == 3 {
                Rgb([px[0], px[1], px[2]])
            } else {
                Rgb([px[0]; 3])
            };
            fill_rect(
                &mut img,
                GAP + x as u32 * k_src,
                GAP + y as u32 * k_src,
                k_src,
                k_src,
                rgb,
            );
        }
    }
    for (crop, colour) in [(&teacher.crop, TEACHER), (&student.crop, STUDENT)] {
        let (x0, y0) = (GAP + crop.left * k_src, GAP + crop.top * k_src);
        let (w, h) = (crop.width * k_src, crop.height * k_src);
        for inset in 0..2 {
            rect_outline(
                &mut img,
                x0 + inset,
                y0 + inset,
                w.saturating_sub(2 * inset),
                h.saturating_sub(2 * inset),
                colour,
                crop.flipped,
            );
        }
    }

    // The two views, their grids, and a frame in their box's colour.
    for (view, x0, k, colour) in [(teacher, x_t, k_t, TEACHER), (student, x_s, k_s, STUDENT)] {
        draw_view(&mut img, view, x0, GAP, k);
        let side = view.side as u32 * k;
        let step = view.patch as u32 * k;
        for g in (step..side).step_by(step.max(1) as usize) {
            line(
                &mut img,
                (x0 + g) as i64,
                GAP as i64,
                (x0 + g) as i64,
                (GAP + side - 1) as i64,
                GRID,
            );
            line(
                &mut img,
                x0 as i64,
                (GAP + g) as i64,
                (x0 + side - 1) as i64,
                (GAP + g) as i64,
                GRID,
            );
        }
        rect_outline(
            &mut img,
            x0.saturating_sub(2),
            GAP - 2,
            side + 4,
            side + 4,
            colour,
            false,
        );
    }

    // Lines between matched patches, coloured along the match order.
    let n = matches.len().saturating_sub(1).max(1);
    let centre = |view: &ViewPicture, x0: u32, k: u32, token: u32| {
        let grid = (view.side / view.patch) as u32;
        let (r, c) = ((token - 1) / grid, (token - 1) % grid);
        let half = view.patch as u32 * k / 2;
        (
            (x0 + c * view.patch as u32 * k + half) as i64,
            (GAP + r * view.patch as u32 * k + half) as i64,
        )
    };
    for (m, (&a, &b)) in matches
        .first
        .iter()
        .zip(&matches.second)
        .enumerate()
        .skip(1)
    {
        let colour = hue_colour((m - 1) as f32 / n as f32);
        let (xa, ya) = centre(teacher, x_t, k_t, a);
        let (xb, yb) = centre(student, x_s, k_s, b);
        line(&mut img, xa, ya, xb, yb, colour);
        dot(&mut img, xa, ya, colour);
        dot(&mut img, xb, yb, colour);
    }
    img
}

fn draw_view(img: &mut RgbImage, view: &ViewPicture, x0: u32, y0: u32, k: u32) {
    let plane = view.side * view.side;
    for y in 0..view.side {
        for x in 0..view.side {
            let v = |ch: usize| {
                (view.pixels[ch * plane + y * view.side + x].clamp(0.0, 1.0) * 255.0).round() as u8
            };
            let rgb = if view.channels == 3 {
                Rgb([v(0), v(1), v(2)])
            } else {
                Rgb([v(0); 3])
            };
            fill_rect(img, x0 + x as u32 * k, y0 + y as u32 * k, k, k, rgb);
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill_rect(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, c: Rgb<u8>) {
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            put(img, i64::from(x), i64::from(y), c);
        }
    }
}

fn rect_outline(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, c: Rgb<u8>, dashed: bool) {
    if w == 0 || h == 0 {
        return;
    }
    let (x1, y1) = (i64::from(x0 + w - 1), i64::from(y0 + h - 1));
    let (x0, y0) = (i64::from(x0), i64::from(y0));
    let on = |t: i64| !dashed || (t / 6) % 2 == 0;
    for x in x0..=x1 {
        if on(x - x0) {
            put(img, x, y0, c);
            put(img, x, y1, c);
        }
    }
    for y in y0..=y1 {
        if on(y - y0) {
            put(img, x0, y, c);
            put(img, x1, y, c);
        }
    }
}

/// Bresenham's line from (x0, y0) to (x1, y1), both ends included.
fn line(img: &mut RgbImage, mut x0: i64, mut y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            return;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

fn dot(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    for dy in -2..=2i64 {
        for dx in -2..=2i64 {
            if dx * dx + dy * dy <= 5 {
                put(img, x + dx, y + dy, c);
            }
        }
    }
}

/// A saturated colour at hue `t` in [0, 1).
fn hue_colour(t: f32) -> Rgb<u8> {
    let h = (t.fract() * 6.0).min(5.999);
    let f = h.fract();
    let (r, g, b) = match h as u32 {
        0 => (1.0, f, 0.0),
        1 => (1.0 - f, 1.0, 0.0),
        2 => (0.0, 1.0, f),
        3 => (0.0, 1.0 - f, 1.0),
        4 => (f, 0.0, 1.0),
        _ => (1.0, 0.0, 1.0 - f),
    };
    let u = |v: f32| (55.0 + 200.0 * v) as u8;
    Rgb([u(r), u(g), u(b)])
}

/// A 3x5 pixel font: digits, capitals and a few signs, one `u16` of 15 bits per glyph
/// (rows top to bottom, 3 bits each, most significant first).
fn glyph(c: char) -> u16 {
    let rows: [u8; 5] = match c.to_ascii_uppercase() {
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [6, 1, 2, 4, 7],
        '3' => [6, 1, 2, 1, 6],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 6, 1, 6],
        '6' => [3, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 6],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '%' => [5, 1, 2, 4, 5],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        '+' => [0, 2, 7, 2, 0],
        ',' => [0, 0, 0, 2, 4],
        '\'' => [2, 2, 0, 0, 0],
        '!' => [2, 2, 2, 0, 2],
        '?' => [6, 1, 2, 0, 2],
        '#' => [5, 7, 5, 7, 5],
        _ => [0; 5],
    };
    rows.iter().fold(0u16, |acc, &r| (acc << 3) | u16::from(r))
}

/// Writes `text` with its top-left corner at (x, y), each font pixel `scale` wide.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, colour: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let bits = glyph(ch);
        for row in 0..5i64 {
            for col in 0..3i64 {
                if bits >> (14 - (row * 3 + col)) & 1 == 1 {
                    let (px, py) = (x + (i as i64 * 4 + col) * scale, y + row * scale);
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, px + dx, py + dy, colour);
                        }
                    }
                }
            }
        }
    }
}

/// One line of a plot: a label, a colour and its points.
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: Rgb<u8>,
    pub points: &'a [(f64, f64)],
}

/// Where a plot goes and what it is called.
pub struct Panel<'a> {
    pub x0: u32,
    pub y0: u32,
    pub w: u32,
    pub h: u32,
    pub title: &'a str,
    pub x_label: &'a str,
}

/// A line plot in `panel` of `img`: frame, title, the y range and the x range as
/// numbers, a legend, and each series as a polyline.
pub fn plot_panel(img: &mut RgbImage, panel: &Panel, series: &[Series]) {
    let &Panel {
        x0,
        y0,
        w,
        h,
        title,
        x_label,
    } = panel;
    let white = Rgb([230, 230, 235]);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
        (xmin, xmax, ymin, ymax) = (xmin.min(x), xmax.max(x), ymin.min(y), ymax.max(y));
    }
    if xmin > xmax {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if (ymax - ymin).abs() < 1e-12 {
        (ymin, ymax) = (ymin - 0.5, ymax + 0.5);
    }
    if (xmax - xmin).abs() < 1e-12 {
        xmax = xmin + 1.0;
    }
    let (px0, py0, pw, ph) = (x0 + 60, y0 + 30, w - 80, h - 70);
    rect_outline(img, px0, py0, pw, ph, GRID, false);
    draw_text(img, i64::from(px0), i64::from(y0 + 8), title, 3, white);
    draw_text(
        img,
        i64::from(x0 + 4),
        i64::from(py0),
        &format!("{ymax:.3}"),
        2,
        white,
    );
    draw_text(
        img,
        i64::from(x0 + 4),
        i64::from(py0 + ph - 10),
        &format!("{ymin:.3}"),
        2,
        white,
    );
    draw_text(
        img,
        i64::from(px0),
        i64::from(py0 + ph + 6),
        &format!("{xmin:.0}"),
        2,
        white,
    );
    let right = format!("{xmax:.0}");
    draw_text(
        img,
        i64::from(px0 + pw) - 8 * right.len() as i64,
        i64::from(py0 + ph + 6),
        &right,
        2,
        white,
    );
    draw_text(
        img,
        i64::from(px0 + pw / 2 - 20),
        i64::from(py0 + ph + 22),
        x_label,
        2,
        white,
    );
    let to_px = |x: f64, y: f64| {
        (
            i64::from(px0) + ((x - xmin) / (xmax - xmin) * f64::from(pw - 1)).round() as i64,
            i64::from(py0 + ph - 1)
                - ((y - ymin) / (ymax - ymin) * f64::from(ph - 1)).round() as i64,
        )
    };
    for (si, s) in series.iter().enumerate() {
        let mut prev = None;
        for &(x, y) in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            let p = to_px(x, y);
            if let Some((a, b)) = prev {
                line(img, a, b, p.0, p.1, s.colour);
            }
            if s.points.len() < 40 {
                dot(img, p.0, p.1, s.colour);
            }
            prev = Some(p);
        }
        let ly = i64::from(py0) + 8 + 14 * si as i64;
        let lx = i64::from(px0 + pw) - 12 * 8 - 30;
        line(img, lx, ly + 4, lx + 16, ly + 4, s.colour);
        draw_text(img, lx + 22, ly, s.label, 2, s.colour);
    }
}

/// A canvas for `panels` plots side by side, each `w x h`.
pub fn plot_canvas(panels: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(panels * w, h, BACKGROUND)
}

/// Colours for series.
pub const SERIES: [Rgb<u8>; 4] = [
    Rgb([255, 200, 40]),
    Rgb([60, 200, 255]),
    Rgb([240, 90, 120]),
    Rgb([140, 230, 120]),
];

// ---------------------------------------------------------------------------------------
// Attention overlays (`viz attention`).

/// Shorter side, in pixels, that a small input image is upscaled to (at least) for display.
const MIN_DISPLAY_SIDE: u32 = 224;
/// Longer side, in pixels, that a large input image is downscaled to for display.
const MAX_DISPLAY_SIDE: u32 = 512;
/// Space around the whole picture and between panels.
const MARGIN: u32 = 16;
/// Height of the strip under each panel that holds its label.
const LABEL_STRIP: u32 = 28;
/// Panels per row of an attention picture.
const PANELS_PER_ROW: u32 = 4;
/// Weight of the colour map against the (grey) image in an overlay.
const OVERLAY_ALPHA: f32 = 0.6;
const TEXT: Rgb<u8> = Rgb([230, 230, 235]);

/// Inferno-like colour map, nine hand-picked stops from black through purple, red and
/// orange to pale yellow; luminance rises strictly along it, so brighter means more.
const INFERNO: [[u8; 3]; 9] = [
    [0, 0, 4],
    [31, 12, 72],
    [85, 15, 109],
    [136, 34, 106],
    [186, 54, 85],
    [227, 89, 51],
    [249, 140, 10],
    [249, 201, 50],
    [252, 255, 164],
];

/// The colour map at `t` in [0, 1] (clamped; NaN reads as 0), linear between stops.
fn colour_map(t: f32) -> [f32; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (INFERNO.len() - 1) as f32;
    let i = (pos.floor() as usize).min(INFERNO.len() - 2);
    let f = pos - i as f32;
    let (a, b) = (INFERNO[i], INFERNO[i + 1]);
    [0, 1, 2].map(|c| f32::from(a[c]) * (1.0 - f) + f32::from(b[c]) * f)
}

/// `map` scaled so that its smallest finite value is 0 and its largest 1; a constant map
/// (or one with no finite value) becomes all zeros, and non-finite entries become 0.
fn min_max_scaled(map: &[f32]) -> Vec<f32> {
    let finite = map.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let range = hi - lo;
    map.iter()
        .map(|&v| {
            if v.is_finite() && range > 0.0 && range.is_finite() {
                (v - lo) / range
            } else {
                0.0
            }
        })
        .collect()
}

/// `image` at display size: a shorter side under 224 px is upscaled by the smallest whole
/// factor that reaches 224 (nearest neighbour, so a 28x28 digit stays crisp at 224x224;
/// the factor is capped so the longer side stays within 1024), a longer side over 512 px
/// is downscaled to 512 (bilinear), anything between is kept as it is.
fn display_image(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let (short, long) = (w.min(h), w.max(h));
    if short < MIN_DISPLAY_SIDE {
        let k = MIN_DISPLAY_SIDE
            .div_ceil(short)
            .min(1024 / long.max(1))
            .max(1);
        upscale_nearest(image, k)
    } else if long > MAX_DISPLAY_SIDE {
        let scale = f64::from(MAX_DISPLAY_SIDE) / f64::from(long);
        let nw = ((f64::from(w) * scale).round() as u32).max(1);
        let nh = ((f64::from(h) * scale).round() as u32).max(1);
        image::imageops::resize(image, nw, nh, image::imageops::FilterType::Triangle)
    } else {
        image.clone()
    }
}

/// Every pixel of `image` repeated as a `k x k` block.
fn upscale_nearest(image: &RgbImage, k: u32) -> RgbImage {
    RgbImage::from_fn(image.width() * k, image.height() * k, |x, y| {
        *image.get_pixel(x / k, y / k)
    })
}

/// For each of `out` output pixels along one axis, the two grid cells it interpolates and
/// the weight of the second: cell centres sit at `(i + 0.5) * out / grid`, and pixels
/// beyond the outermost centres take the edge cell's value (no extrapolation).
fn bilinear_taps(grid: usize, out: u32) -> Vec<(usize, usize, f32)> {
    (0..out)
        .map(|p| {
            let g =
                ((p as f32 + 0.5) * grid as f32 / out as f32 - 0.5).clamp(0.0, (grid - 1) as f32);
            let i0 = (g.floor() as usize).min(grid - 1);
            let i1 = (i0 + 1).min(grid - 1);
            (i0, i1, g - i0 as f32)
        })
        .collect()
}

/// `map` (a `grid x grid` array of values in [0, 1], row-major) upsampled bilinearly to
/// `w x h`: returns `(h, w)` row-major values.
fn upsample_bilinear(map: &[f32], grid: usize, w: u32, h: u32) -> Vec<f32> {
    let (xs, ys) = (bilinear_taps(grid, w), bilinear_taps(grid, h));
    let mut out = Vec::with_capacity(xs.len() * ys.len());
    for &(r0, r1, fy) in &ys {
        for &(c0, c1, fx) in &xs {
            let top = map[r0 * grid + c0] * (1.0 - fx) + map[r0 * grid + c1] * fx;
            let bottom = map[r1 * grid + c0] * (1.0 - fx) + map[r1 * grid + c1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// The grey version of `base` with `values` (`(h, w)` in [0, 1]) blended over it through
/// the colour map: `(1 - 0.6) * grey + 0.6 * colour(value)`. The image is made grey so
/// that every hue in the panel comes from the attention alone.
fn overlay(base: &RgbImage, values: &[f32]) -> RgbImage {
    let w = base.width() as usize;
    RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let [r, g, b] = base.get_pixel(x, y).0.map(f32::from);
        let grey = 0.299 * r + 0.587 * g + 0.114 * b;
        let colour = colour_map(values[y as usize * w + x as usize]);
        Rgb(colour.map(|c| {
            ((1.0 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * c)
                .round()
                .clamp(0.0, 255.0) as u8
        }))
    })
}

/// Width in pixels of `text` in the bitmap font at `scale` (4 font pixels per character,
/// less the trailing space).
fn text_width(text: &str, scale: u32) -> u32 {
    (4 * text.chars().count() as u32).saturating_sub(1) * scale
}

/// `text` centred under a box that starts at `x0` and is `w` wide, top at `y`: at scale 2
/// if it fits, else scale 1, else cut short with ".." at scale 1.
fn draw_label(img: &mut RgbImage, x0: u32, w: u32, y: u32, text: &str, colour: Rgb<u8>) {
    let (text, scale) = if text_width(text, 2) <= w {
        (text.to_string(), 2)
    } else if text_width(text, 1) <= w {
        (text.to_string(), 1)
    } else {
        let keep = ((w + 1) / 4).saturating_sub(2) as usize;
        (
            format!("{}..", text.chars().take(keep).collect::<String>()),
            1,
        )
    };
    let tw = text_width(&text, scale);
    let x = i64::from(x0) + (i64::from(w) - i64::from(tw)) / 2;
    draw_text(img, x, i64::from(y), &text, i64::from(scale), colour);
}

/// Where panel `index` of a picture of `panel_w x panel_h` panels (each with its label
/// strip under it), `PANELS_PER_ROW` to a row, has its top-left corner.
fn panel_origin(index: u32, panel_w: u32, panel_h: u32) -> (u32, u32) {
    let (row, col) = (index / PANELS_PER_ROW, index % PANELS_PER_ROW);
    (
        MARGIN + col * (panel_w + MARGIN),
        MARGIN + row * (panel_h + LABEL_STRIP + MARGIN),
    )
}

/// DINO-style picture of the CLS token's self-attention in the last block.
///
/// `maps` is `(heads, grid * grid)` row-major: for each head, the CLS token's attention to
/// each patch, patches in raster order (row by row). Rows need not sum to 1.
///
/// The picture holds `heads + 2` panels, at most 4 to a row, each with a label under it:
/// the input image (`"image"`), one panel per head (`"head 0"`, ...), and the mean over
/// heads (`"mean"`). A head's panel is the image in grey with the head's map overlaid in
/// an inferno-like colour map (black, purple, red, orange, pale yellow: brighter means more
/// attention); the map is upsampled bilinearly to the image size, assuming the `grid x
/// grid` patches tile the whole image.
///
/// Display normalisation: each map is min-max scaled over its patches (least-attended
/// patch 0, most-attended 1; a constant map shows as all 0; non-finite values count as 0),
/// so every panel uses the full colour range and shows where a head looks rather than how
/// peaked it is. The mean panel averages the raw maps over heads, then scales it the same
/// way.
///
/// Display size: the image is upscaled by the smallest whole factor that makes its shorter
/// side at least 224 px (nearest neighbour, e.g. 28x28 -> 224x224; the factor is capped so
/// the longer side stays within 1024 px), a longer side over 512 px is downscaled to 512
/// (bilinear), otherwise it is kept. With panels `w x h` and `n = heads + 2`, the picture
/// is `16 + c * (w + 16)` wide and `16 + r * (h + 28 + 16)` high, `c = min(n, 4)` columns
/// and `r = ceil(n / 4)` rows.
///
/// Panics (programming errors): `heads` or `grid` is 0, `maps.len() != heads * grid *
/// grid`, or the image has no pixels.
pub fn attention_overlay(image: &RgbImage, maps: &[f32], heads: usize, grid: usize) -> RgbImage {
    assert!(
        heads > 0 && grid > 0,
        "attention_overlay: heads {heads} and grid {grid} must be positive"
    );
    assert_eq!(
        maps.len(),
        heads * grid * grid,
        "attention_overlay: maps must be (heads {heads}, grid {grid} * grid {grid})"
    );
    assert!(
        image.width() > 0 && image.height() > 0,
        "attention_overlay: the image has no pixels"
    );
    let base = display_image(image);
    let (w, h) = base.dimensions();
    let patches = grid * grid;

    // (heads, P) -> (P): the mean map over heads, of the raw values.
    let mut mean = vec![0.0f32; patches];
    for head in maps.chunks_exact(patches) {
        for (m, &v) in mean.iter_mut().zip(head) {
            *m += (if v.is_finite() { v } else { 0.0 }) / heads as f32;
        }
    }
    let mut panels: Vec<(RgbImage, String)> = vec![(base.clone(), "image".to_string())];
    for (i, head) in maps.chunks_exact(patches).enumerate() {
        let values = upsample_bilinear(&min_max_scaled(head), grid, w, h);
        panels.push((overlay(&base, &values), format!("head {i}")));
    }
    let values = upsample_bilinear(&min_max_scaled(&mean), grid, w, h);
    panels.push((overlay(&base, &values), "mean".to_string()));

    let n = panels.len() as u32;
    let (cols, rows) = (n.min(PANELS_PER_ROW), n.div_ceil(PANELS_PER_ROW));
    let mut canvas = RgbImage::from_pixel(
        MARGIN + cols * (w + MARGIN),
        MARGIN + rows * (h + LABEL_STRIP + MARGIN),
        BACKGROUND,
    );
    for (i, (panel, label)) in panels.iter().enumerate() {
        let (x0, y0) = panel_origin(i as u32, w, h);
        image::imageops::replace(&mut canvas, panel, i64::from(x0), i64::from(y0));
        draw_label(&mut canvas, x0, w, y0 + h + 9, label, TEXT);
    }
    canvas
}

// ---------------------------------------------------------------------------------------
// Nearest-neighbour grids (`viz neighbours`).

/// Side of the square tile each image of a neighbour grid is fitted into.
const TILE: u32 = 96;
/// Width of the frame drawn around each tile.
const FRAME: u32 = 4;
/// Gap between two tiles of a row, and the extra gap between a query and its neighbours.
const TILE_GAP: u32 = 8;
const QUERY_GAP: u32 = 24;
/// Frame of a query, of a neighbour with the query's label, and of one without.
const QUERY_FRAME: Rgb<u8> = Rgb([200, 200, 205]);
const SAME_LABEL: Rgb<u8> = Rgb([40, 200, 70]);
const OTHER_LABEL: Rgb<u8> = Rgb([225, 45, 45]);

/// `image` fitted into a `TILE x TILE` square, aspect kept: an image no larger than the
/// tile is upscaled by a whole factor (nearest neighbour, crisp pixels), a larger one is
/// downscaled bilinearly; either way it is centred on the background colour.
fn tile_image(image: &RgbImage) -> RgbImage {
    let mut tile = RgbImage::from_pixel(TILE, TILE, BACKGROUND);
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return tile;
    }
    let fitted = if w.max(h) <= TILE {
        upscale_nearest(image, TILE / w.max(h))
    } else {
        let scale = f64::from(TILE) / f64::from(w.max(h));
        let nw = ((f64::from(w) * scale).round() as u32).clamp(1, TILE);
        let nh = ((f64::from(h) * scale).round() as u32).clamp(1, TILE);
        image::imageops::resize(image, nw, nh, image::imageops::FilterType::Triangle)
    };
    let (x, y) = ((TILE - fitted.width()) / 2, (TILE - fitted.height()) / 2);
    image::imageops::replace(&mut tile, &fitted, i64::from(x), i64::from(y));
    tile
}

/// Top-left corner of the frame of tile `col` (0 = the query) in row `row`.
fn cell_origin(row: u32, col: u32) -> (u32, u32) {
    let cell = TILE + 2 * FRAME;
    let x = if col == 0 {
        MARGIN
    } else {
        MARGIN + cell + QUERY_GAP + (col - 1) * (cell + TILE_GAP)
    };
    (x, MARGIN + row * (cell + LABEL_STRIP + MARGIN))
}

/// One tile with its `FRAME`-wide frame in `colour` and its label under it.
fn draw_cell(
    canvas: &mut RgbImage,
    origin: (u32, u32),
    image: &RgbImage,
    label: &str,
    colour: Rgb<u8>,
) {
    let (x0, y0) = origin;
    let cell = TILE + 2 * FRAME;
    fill_rect(canvas, x0, y0, cell, cell, colour);
    let tile = tile_image(image);
    image::imageops::replace(canvas, &tile, i64::from(x0 + FRAME), i64::from(y0 + FRAME));
    draw_label(canvas, x0, cell, y0 + cell + 9, label, TEXT);
}

/// Query images beside their retrieved neighbours: one row per query, the query first
/// (grey frame), then its neighbours in the given order, each with a green frame when the
/// neighbour's flag is true (it has the query's label) and red otherwise, and each image's
/// label text under it (at scale 2 when it fits the 104 px cell, else smaller, else cut
/// short with "..").
///
/// Every image is fitted into a 96 x 96 tile (aspect kept, centred; small images upscaled
/// by a whole factor with nearest neighbour, large ones downscaled bilinearly) inside a
/// 4 px frame. Rows may hold different numbers of neighbours, including none. With
/// `k` the largest neighbour count (0 if there are no queries) and `q` queries, the
/// picture is `16 + 104 + 16` wide when `k = 0`, else `16 + 104 + 24 + k * 104 + (k - 1)
/// * 8 + 16`, and `16 + q * (104 + 28 + 16)` high.
///
/// Panics (programming error): `queries` and `neighbours` differ in length.
pub fn neighbour_grid(
    queries: &[(RgbImage, String)],
    neighbours: &[Vec<(RgbImage, String, bool)>],
) -> RgbImage {
    assert_eq!(
        queries.len(),
        neighbours.len(),
        "neighbour_grid: one neighbour list per query"
    );
    let cell = TILE + 2 * FRAME;
    let k = neighbours.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let width = if k == 0 {
        MARGIN + cell + MARGIN
    } else {
        cell_origin(0, k).0 + cell + MARGIN
    };
    let height = MARGIN + queries.len() as u32 * (cell + LABEL_STRIP + MARGIN);
    let mut canvas = RgbImage::from_pixel(width, height, BACKGROUND);
    for (row, ((query, label), row_neighbours)) in queries.iter().zip(neighbours).enumerate() {
        let row = row as u32;
        draw_cell(&mut canvas, cell_origin(row, 0), query, label, QUERY_FRAME);
        for (col, (image, label, same)) in row_neighbours.iter().enumerate() {
            let colour = if *same { SAME_LABEL } else { OTHER_LABEL };
            draw_cell(
                &mut canvas,
                cell_origin(row, col as u32 + 1),
                image,
                label,
                colour,
            );
        }
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bresenham_reaches_both_ends_and_stays_connected() {
        let mut img = RgbImage::from_pixel(20, 20, BACKGROUND);
        line(&mut img, 2, 3, 17, 11, TEACHER);
        assert_eq!(*img.get_pixel(2, 3), TEACHER);
        assert_eq!(*img.get_pixel(17, 11), TEACHER);
        // One lit pixel per column along the x-major line.
        for x in 2..=17 {
            assert_eq!(
                (0..20).filter(|&y| *img.get_pixel(x, y) == TEACHER).count(),
                1,
                "column {x}"
            );
        }
    }
    /// Luminance (Rec. 709) of a pixel, for ordering colours.
    fn luma(p: &Rgb<u8>) -> f32 {
        0.2126 * f32::from(p.0[0]) + 0.7152 * f32::from(p.0[1]) + 0.0722 * f32::from(p.0[2])
    }

    #[test]
    fn colour_map_brightens_monotonically_from_black_to_pale_yellow() {
        assert_eq!(colour_map(0.0), [0.0, 0.0, 4.0]);
        assert_eq!(colour_map(1.0), [252.0, 255.0, 164.0]);
        assert_eq!(colour_map(f32::NAN), colour_map(0.0));
        assert_eq!(colour_map(7.0), colour_map(1.0));
        let lum = |c: [f32; 3]| 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
        for i in 0..255 {
            let (a, b) = (i as f32 / 255.0, (i + 1) as f32 / 255.0);
            assert!(lum(colour_map(a)) < lum(colour_map(b)), "at {a}");
        }
    }

    #[test]
    fn min_max_scaling_hand_values() {
        assert_eq!(min_max_scaled(&[2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(min_max_scaled(&[0.3; 4]), vec![0.0; 4]);
        assert_eq!(
            min_max_scaled(&[1.0, f32::NAN, 3.0, f32::INFINITY]),
            vec![0.0, 0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn bilinear_upsampling_hand_values() {
        // Two cells [0, 1] over 4 pixels: cell centres at pixel 0.5 and 2.5 of a 4-wide
        // row in grid units, i.e. pixels 0 and 3 clamp to the edge cells, 1 and 2 mix.
        let row = upsample_bilinear(&[0.0, 1.0, 0.0, 1.0], 2, 4, 1);
        assert_eq!(row, vec![0.0, 0.25, 0.75, 1.0]);
        // One cell: constant everywhere.
        assert!(upsample_bilinear(&[0.7], 1, 5, 3).iter().all(|&v| v == 0.7));
    }

    #[test]
    fn attention_picture_sizes_follow_the_documented_layout() {
        let digit = RgbImage::from_pixel(28, 28, Rgb([9, 9, 9]));
        // 28 -> x8 = 224 px panels; 6 heads + image + mean = 8 panels = 2 rows of 4.
        let img = attention_overlay(&digit, &vec![0.1; 6 * 16], 6, 4);
        assert_eq!(img.dimensions(), (16 + 4 * 240, 16 + 2 * (224 + 28 + 16)));
        // 1 head: image, head 0, mean = 3 panels in one row.
        let img = attention_overlay(&digit, &[0.5], 1, 1);
        assert_eq!(img.dimensions(), (16 + 3 * 240, 16 + 268));
        // 100x50: shorter side 50 -> factor 5 -> 500x250 panels.
        let wide = RgbImage::new(100, 50);
        let img = attention_overlay(&wide, &[0.0; 2], 2, 1);
        assert_eq!(img.dimensions(), (16 + 4 * 516, 16 + 250 + 44));
        // 300x250 is kept; 1000x600 is brought down to 512x307.
        let img = attention_overlay(&RgbImage::new(300, 250), &[0.0; 9], 1, 3);
        assert_eq!(img.dimensions(), (16 + 3 * 316, 16 + 250 + 44));
        let img = attention_overlay(&RgbImage::new(1000, 600), &[0.0; 4], 1, 2);
        assert_eq!(img.dimensions(), (16 + 3 * 528, 16 + 307 + 44));
    }

    #[test]
    fn the_image_panel_is_the_input_repeated_in_8x8_blocks() {
        let digit = RgbImage::from_fn(28, 28, |x, y| Rgb([(x * 9) as u8, (y * 9) as u8, 77]));
        let img = attention_overlay(&digit, &[0.0; 4], 1, 2);
        for y in 0..224 {
            for x in 0..224 {
                assert_eq!(img.get_pixel(16 + x, 16 + y), digit.get_pixel(x / 8, y / 8));
            }
        }
    }

    #[test]
    fn a_one_hot_map_lights_its_patch_brightest() {
        // Grey 28x28 image, 4x4 grid of 56 px patches on the 224 px panel. Head 0 is
        // one-hot on patch (row 1, col 2); head 1 is uniform.
        let grey = RgbImage::from_pixel(28, 28, Rgb([128, 128, 128]));
        let mut maps = vec![0.0f32; 2 * 16];
        maps[6] = 0.9;
        maps[16..].fill(1.0 / 16.0);
        let img = attention_overlay(&grey, &maps, 2, 4);
        // Panels: image at x 16, head 0 at 256, head 1 at 496, mean at 736; all at y 16.
        let (cold, hot) = (Rgb([51, 51, 54]), [202.1, 199.6, 139.9]);
        for (x0, name) in [(256, "head 0"), (736, "mean")] {
            let at = |x: u32, y: u32| *img.get_pixel(x0 + x, 16 + y);
            // Brightest pixel of the panel lies inside the patch (x 112..168, y 56..112).
            let (mut best, mut best_xy) = (-1.0, (0, 0));
            for y in 0..224 {
                for x in 0..224 {
                    if luma(&at(x, y)) > best {
                        (best, best_xy) = (luma(&at(x, y)), (x, y));
                    }
                }
            }
            assert!((112..168).contains(&best_xy.0), "{name}: {best_xy:?}");
            assert!((56..112).contains(&best_xy.1), "{name}: {best_xy:?}");
            // Next to the patch centre (on a pixel boundary, 112 + 28 = 140 and 56 + 28 =
            // 84) the map reads (1 - 0.5 / 56)^2 = 0.98222, i.e. 7.858 of the way along
            // the 8 colour-map steps: 0.4 * 128 + 0.6 * (251.57, 247.32, 147.79).
            for (x, y) in [(139, 83), (140, 84), (139, 84)] {
                let centre = at(x, y);
                for (&got, want) in centre.0.iter().zip(hot) {
                    assert!((f32::from(got) - want).abs() <= 1.0, "{name}: {centre:?}");
                }
            }
            // Far from it: 0.4 * 128 + 0.6 * the map's bottom colour, exactly.
            assert_eq!(at(10, 200), cold, "{name}");
            // Along the patch's middle row, brightness falls off away from the centre.
            for x in 140..223 {
                assert!(luma(&at(x, 84)) >= luma(&at(x + 1, 84)), "{name}: x {x}");
            }
            assert!(luma(&at(139, 84)) > luma(&at(168, 84)));
            assert!(luma(&at(168, 84)) > luma(&at(196, 84)));
        }
        // The uniform head shows as the bottom colour everywhere.
        for (x, y) in [(0, 0), (139, 83), (223, 223)] {
            assert_eq!(*img.get_pixel(496 + x, 16 + y), cold);
        }
    }

    #[test]
    fn one_head_one_patch_does_not_panic() {
        let img = attention_overlay(&RgbImage::new(1, 1), &[f32::NAN], 1, 1);
        assert_eq!(img.dimensions(), (16 + 3 * 240, 16 + 268));
    }

    #[test]
    #[should_panic(expected = "maps must be")]
    fn maps_of_the_wrong_length_are_a_programming_error() {
        attention_overlay(&RgbImage::new(28, 28), &[0.0; 15], 1, 4);
    }

    #[test]
    fn neighbour_grid_size_frames_and_tiles() {
        let solid = |c: [u8; 3], w: u32, h: u32| RgbImage::from_pixel(w, h, Rgb(c));
        let query = |c| (solid(c, 10, 10), "query".to_string());
        let nb = |same: bool| (solid([200, 0, 200], 300, 150), "n".to_string(), same);
        let queries = vec![query([0, 0, 255]), query([0, 255, 0]), query([255, 0, 0])];
        let neighbours = vec![
            vec![nb(true), nb(false), nb(true), nb(false)],
            vec![nb(false), nb(true)],
            vec![],
        ];
        let img = neighbour_grid(&queries, &neighbours);
        // 4 neighbours at most: 16 + 104 + 24 + 4 * 104 + 3 * 8 + 16 wide; rows 148 high.
        assert_eq!(img.dimensions(), (600, 16 + 3 * 148));
        // Frames: query at x 16, neighbours at 144, 256, 368, 480; rows at y 16, 164, 312.
        assert_eq!(*img.get_pixel(16, 16), QUERY_FRAME);
        assert_eq!(*img.get_pixel(144 + 2, 16 + 50), SAME_LABEL);
        assert_eq!(*img.get_pixel(256 + 103, 16 + 103), OTHER_LABEL);
        assert_eq!(*img.get_pixel(368, 16), SAME_LABEL);
        assert_eq!(*img.get_pixel(480, 16), OTHER_LABEL);
        assert_eq!(*img.get_pixel(144, 164), OTHER_LABEL);
        assert_eq!(*img.get_pixel(256, 164), SAME_LABEL);
        assert_eq!(*img.get_pixel(368, 164), BACKGROUND);
        assert_eq!(*img.get_pixel(144, 312), BACKGROUND);
        assert_eq!(*img.get_pixel(16, 312), QUERY_FRAME);
        // A 10x10 query is repeated 9x (90 px), centred in the 96 px tile at offset 3.
        assert_eq!(*img.get_pixel(20 + 3, 20 + 3), Rgb([0, 0, 255]));
        assert_eq!(*img.get_pixel(20 + 92, 20 + 92), Rgb([0, 0, 255]));
        assert_eq!(*img.get_pixel(20 + 2, 20 + 50), BACKGROUND);
        assert_eq!(*img.get_pixel(20 + 93, 20 + 50), BACKGROUND);
        // A 300x150 neighbour is brought down to 96x48, centred vertically (rows 24..72).
        assert_eq!(*img.get_pixel(148, 20 + 24), Rgb([200, 0, 200]));
        assert_eq!(*img.get_pixel(148 + 95, 20 + 71), Rgb([200, 0, 200]));
        assert_eq!(*img.get_pixel(148, 20 + 23), BACKGROUND);
        assert_eq!(*img.get_pixel(148, 20 + 72), BACKGROUND);
    }

    #[test]
    fn neighbour_grid_without_neighbours_or_queries() {
        let q = vec![(RgbImage::new(28, 28), "7".to_string())];
        let img = neighbour_grid(&q, &[vec![]]);
        assert_eq!(img.dimensions(), (136, 164));
        assert_eq!(*img.get_pixel(16, 16), QUERY_FRAME);
        assert_eq!(neighbour_grid(&[], &[]).dimensions(), (136, 16));
        // An image with no pixels leaves an empty tile.
        let q = vec![(RgbImage::new(0, 5), String::new())];
        let img = neighbour_grid(&q, &[vec![]]);
        assert_eq!(*img.get_pixel(60, 60), BACKGROUND);
    }

    #[test]
    #[should_panic(expected = "one neighbour list per query")]
    fn neighbour_lists_must_match_queries() {
        neighbour_grid(&[(RgbImage::new(2, 2), String::new())], &[]);
    }

    #[test]
    fn long_labels_stay_under_their_cell() {
        let mut img = RgbImage::from_pixel(200, 20, BACKGROUND);
        let label = "a very long class name that cannot fit";
        draw_label(&mut img, 50, 104, 2, label, TEXT);
        let lit: Vec<u32> = (0..200)
            .filter(|&x| (0..20).any(|y| *img.get_pixel(x, y) == TEXT))
            .collect();
        assert!(!lit.is_empty());
        assert!(lit.iter().all(|x| (50..154).contains(x)), "{lit:?}");
    }
}
