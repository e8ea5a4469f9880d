//! Pictures for people: one source image, two of its views with their patch grids, and a
//! line between every pair of matched patches (`pwself-engine viz matches`).
//!
//! Plain raster drawing on an `image::RgbImage` (nearest-neighbour upscaling, Bresenham
//! lines, rectangle outlines): a few lines each, so no drawing crate is pulled in.

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
}
