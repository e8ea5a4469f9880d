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
