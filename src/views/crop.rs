//! Crop records and random-resized-crop sampling (SPEC.md section 1).
//!
//! The sampler reproduces torchvision's `RandomResizedCrop.get_params` exactly (area
//! fraction `s ~ U(scale)`, aspect `r = exp(U(ln 3/4, ln 4/3))`, `w = round(sqrt(A s r))`,
//! `h = round(sqrt(A s / r))` with Python's round-half-even, up to 10 tries, then the
//! centre-crop fallback), followed by a horizontal flip with probability `flip_p`. Its
//! random numbers come from a [`Stream`] the caller names, so one record per view index
//! per batch can be drawn from a stream independent of every photometric draw.

use crate::error::{Error, Result};
use crate::rng::Stream;

/// Where a view came from: a half-open pixel box `[top, top+height) x [left, left+width)`
/// in source-image coordinates, and whether the view was then flipped horizontally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CropRecord {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
    pub flipped: bool,
}

impl CropRecord {
    /// One past the last row of the box.
    pub fn bottom(&self) -> u32 {
        self.top + self.height
    }
    /// One past the last column of the box.
    pub fn right(&self) -> u32 {
        self.left + self.width
    }
    /// The box as `T,L,H,W[,flip]`, the syntax `pwself-engine match` reads.
    pub fn to_arg(&self) -> String {
        let flip = if self.flipped { ",flip" } else { "" };
        format!(
            "{},{},{},{}{flip}",
            self.top, self.left, self.height, self.width
        )
    }
    /// Checks that the box is non-empty and lies inside an `image_h x image_w` image;
    /// `field` names the argument in the error.
    pub fn check_inside(&self, image_h: u32, image_w: u32, field: &str) -> Result<()> {
        if self.height == 0 || self.width == 0 {
            return Err(Error::bad_config(
                field,
                "the box is empty: give a height and width of at least 1",
            ));
        }
        if u64::from(self.top) + u64::from(self.height) > u64::from(image_h)
            || u64::from(self.left) + u64::from(self.width) > u64::from(image_w)
        {
            return Err(Error::bad_config(
                field,
                format!(
                    "the box rows {}..{} x columns {}..{} reach outside the {image_h}x{image_w} image; \
                     move or shrink it",
                    self.top,
                    u64::from(self.top) + u64::from(self.height),
                    self.left,
                    u64::from(self.left) + u64::from(self.width)
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `T,L,H,W[,flip]` (the last field `flip`, `1`, `true`, or `0`, `false`, `noflip`).
pub fn parse_crop_arg(text: &str, field: &str) -> Result<CropRecord> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.len() != 4 && parts.len() != 5 {
        return Err(Error::bad_config(
            field,
            format!("`{text}` is not a box: write it as TOP,LEFT,HEIGHT,WIDTH or TOP,LEFT,HEIGHT,WIDTH,flip"),
        ));
    }
    let mut n = [0u32; 4];
    for (slot, part) in n.iter_mut().zip(&parts) {
        *slot = part.parse().map_err(|_| {
            Error::bad_config(
                field,
                format!("`{part}` in `{text}` is not a non-negative integer pixel count"),
            )
        })?;
    }
    let flipped = match parts.get(4).map(|s| s.to_ascii_lowercase()) {
        None => false,
        Some(s) if s == "flip" || s == "1" || s == "true" => true,
        Some(s) if s == "noflip" || s == "0" || s == "false" => false,
        Some(s) => {
            return Err(Error::bad_config(
                field,
                format!("`{s}` is not a flip flag: write flip, 1, true, 0 or false"),
            ))
        }
    };
    Ok(CropRecord {
        top: n[0],
        left: n[1],
        height: n[2],
        width: n[3],
        flipped,
    })
}

/// The area-fraction range of a crop, `0 < lo <= hi <= 1`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
}

impl Scale {
    /// A checked scale range; `field` names the setting in the error.
    pub fn new(lo: f64, hi: f64, field: &str) -> Result<Scale> {
        let s = Scale { lo, hi };
        s.validate(field)?;
        Ok(s)
    }
    /// Checks `0 < lo <= hi <= 1`.
    pub fn validate(&self, field: &str) -> Result<()> {
        let ok = self.lo.is_finite()
            && self.hi.is_finite()
            && self.lo > 0.0
            && self.lo <= self.hi
            && self.hi <= 1.0;
        if ok {
            Ok(())
        } else {
            Err(Error::bad_config(
                field,
                format!(
                    "crop scale ({}, {}) is outside (0, 1]: the area fractions must satisfy 0 < min <= max <= 1, \
                     e.g. 0.4,1.0 for global views or 0.05,0.4 for local views",
                    self.lo, self.hi
                ),
            ))
        }
    }
}

/// The aspect-ratio range of DINO's random-resized-crop (torchvision's default).
pub const ASPECT: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// Samples a random-resized-crop box of an `image_h x image_w` image, then the flip.
/// Consumes a variable number of draws from `rng` (as torchvision does); callers give
/// every view its own stream.
pub fn sample_crop(
    rng: &mut Stream,
    image_h: u32,
    image_w: u32,
    scale: Scale,
    flip_p: f64,
) -> CropRecord {
    let (h_img, w_img) = (f64::from(image_h), f64::from(image_w));
    let area = h_img * w_img;
    let (log_lo, log_hi) = (ASPECT.0.ln(), ASPECT.1.ln());
    let mut found = None;
    for _ in 0..10 {
        let target = area * (scale.lo + (scale.hi - scale.lo) * rng.next_f64());
        let aspect = (log_lo + (log_hi - log_lo) * rng.next_f64()).exp();
        let w = (target * aspect).sqrt().round_ties_even();
        let h = (target / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= w_img && h > 0.0 && h <= h_img {
            let (h, w) = (h as u32, w as u32);
            // randint(0, H - h) and randint(0, W - w), both inclusive.
            let top = rng.below(u64::from(image_h - h) + 1) as u32;
            let left = rng.below(u64::from(image_w - w) + 1) as u32;
            found = Some((top, left, h, w));
            break;
        }
    }
    let (top, left, height, width) = found.unwrap_or_else(|| centre_crop(image_h, image_w));
    let flipped = rng.next_f64() < flip_p;
    CropRecord {
        top,
        left,
        height,
        width,
        flipped,
    }
}

/// torchvision's fallback after ten rejected tries: the largest centred box whose aspect
/// ratio is clamped into [`ASPECT`]. Returns `(top, left, height, width)`.
fn centre_crop(image_h: u32, image_w: u32) -> (u32, u32, u32, u32) {
    let in_ratio = f64::from(image_w) / f64::from(image_h);
    let (h, w) = if in_ratio < ASPECT.0 {
        let w = image_w;
        ((f64::from(w) / ASPECT.0).round_ties_even() as u32, w)
    } else if in_ratio > ASPECT.1 {
        let h = image_h;
        (h, (f64::from(h) * ASPECT.1).round_ties_even() as u32)
    } else {
        (image_h, image_w)
    };
    let (h, w) = (h.min(image_h), w.min(image_w));
    ((image_h - h) / 2, (image_w - w) / 2, h, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;

    #[test]
    fn fallback_is_torchvision_centre_crop() {
        // A 10x1000 strip: every global-scale try needs h >= sqrt(0.4*10000*3/4) = 55 > 10,
        // so all ten fail and the centre crop is h = 10, w = round(10 * 4/3) = 13,
        // left = (1000 - 13) // 2 = 493.
        let mut rng = Stream::new(3, [0, 0, 0], Purpose::Crop);
        let c = sample_crop(&mut rng, 10, 1000, Scale { lo: 0.4, hi: 1.0 }, 0.0);
        assert_eq!((c.top, c.left, c.height, c.width), (0, 493, 10, 13));
        // Tall image: in_ratio = 0.01 < 3/4 -> w = 10, h = round(10 / 0.75) = 13.
        assert_eq!(centre_crop(1000, 10), (493, 0, 13, 10));
        assert_eq!(centre_crop(30, 32), (0, 0, 30, 32));
    }

    #[test]
    fn boxes_lie_inside_the_image() {
        let mut rng = Stream::new(5, [1, 2, 0], Purpose::Crop);
        for _ in 0..10_000 {
            let c = sample_crop(&mut rng, 28, 37, Scale { lo: 0.05, hi: 1.0 }, 0.5);
            assert!(c.height >= 1 && c.width >= 1);
            assert!(c.bottom() <= 28 && c.right() <= 37, "{c:?}");
        }
    }

    #[test]
    fn parse_and_print_round_trip() {
        let c = parse_crop_arg("3, 4, 50,60,flip", "--box1").unwrap();
        assert_eq!(
            c,
            CropRecord {
                top: 3,
                left: 4,
                height: 50,
                width: 60,
                flipped: true
            }
        );
        assert_eq!(parse_crop_arg(&c.to_arg(), "x").unwrap(), c);
        let e = parse_crop_arg("1,2,3", "--box2").unwrap_err().to_string();
        assert!(
            e.contains("--box2") && e.contains("TOP,LEFT,HEIGHT,WIDTH"),
            "{e}"
        );
        assert!(parse_crop_arg("1,2,3,x", "--box2")
            .unwrap_err()
            .to_string()
            .contains("`x`"));
        assert!(parse_crop_arg("1,2,3,4,maybe", "--box2").is_err());
    }

    #[test]
    fn scale_outside_unit_interval_is_refused() {
        for (lo, hi) in [
            (0.0, 0.5),
            (-0.1, 0.5),
            (0.5, 1.2),
            (0.6, 0.5),
            (f64::NAN, 1.0),
        ] {
            let e = Scale::new(lo, hi, "views.local_scale")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("views.local_scale") && e.contains("(0, 1]"),
                "{e}"
            );
        }
        assert!(Scale::new(1.0, 1.0, "x").is_ok());
    }

    #[test]
    fn box_outside_image_is_refused() {
        let c = CropRecord {
            top: 200,
            left: 0,
            height: 100,
            width: 10,
            flipped: false,
        };
        let e = c.check_inside(256, 256, "--box1").unwrap_err().to_string();
        assert!(e.contains("--box1") && e.contains("256x256"), "{e}");
    }
}
