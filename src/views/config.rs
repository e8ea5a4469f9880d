//! What views to make: counts, sides, scales, patch size, interpolation, augmentation.
//!
//! Presets cover 28x28 and 32x32 sources (Fashion-MNIST, CIFAR) and the paper's 224/96
//! setup; every field can be overridden, and [`ViewConfig::validate`] refuses impossible
//! combinations with the name of the field at fault.

use crate::error::{Error, Result};
use crate::views::crop::Scale;
use crate::views::matching::MatchRule;
use crate::views::photometric::PhotometricConfig;
use crate::views::resize::Interpolation;

/// The most views of one family (global or local) an image may get.
pub const MAX_VIEWS: usize = 4096;
/// The most patches along one side of a view: per-patch augmentation numbers a view's
/// patches with a 20-bit region index below [`crate::views::photometric::WHOLE_VIEW`],
/// so `grid * grid` must stay below 2^20 - 1.
pub const MAX_GRID: usize = 1023;

/// The named view setups.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 28x28 sources (Fashion-MNIST, MNIST): 2 x 28 global + 8 x 12 local, patch 4.
    Small28,
    /// 32x32 sources (CIFAR-10/100): 2 x 32 global + 8 x 16 local, patch 4.
    Small32,
    /// The paper's ImageNet setup: 2 x 224 global + 8 x 96 local, patch 16.
    Paper224,
}

/// One family of views (the globals or the locals).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewFamily {
    /// How many views of this family each image gets.
    pub count: usize,
    /// Output side in pixels (square views); a multiple of the patch size.
    pub side: usize,
    /// Area-fraction range of the random-resized-crop.
    pub scale: Scale,
}

/// Everything that decides how a batch's views are built and matched.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViewConfig {
    /// ViT patch size in pixels; both sides must be multiples of it.
    pub patch_size: usize,
    /// Global views: seen by the teacher and the student.
    pub global: ViewFamily,
    /// Local views: seen by the student only.
    pub local: ViewFamily,
    /// Resize filter for crop -> view.
    pub interpolation: Interpolation,
    /// Probability of a horizontal flip per view.
    pub flip_p: f64,
    /// Photometric augmentation per patch (the paper) or per view (DINO).
    pub per_patch: bool,
    /// Photometric recipe of the first global view, the second (and every other odd
    /// one), and the locals.
    pub global1: PhotometricConfig,
    pub global2: PhotometricConfig,
    pub local_aug: PhotometricConfig,
    /// Which patch-matching rule pairs tokens.
    pub match_rule: MatchRule,
}

impl ViewConfig {
    /// A preset's configuration. DINO's blur sigma (0.1 to 2.0 pixels) is meant for
    /// 224-pixel views; the small presets see the same content in `side` pixels, so their
    /// sigma range is scaled by `side / 224` (28 px: 0.0125 to 0.25), which keeps the blur
    /// the same fraction of the image as in the paper's setup.
    pub fn preset(preset: Preset) -> ViewConfig {
        let (patch, g, l) = match preset {
            Preset::Small28 => (4, 28, 12),
            Preset::Small32 => (4, 32, 16),
            Preset::Paper224 => (16, 224, 96),
        };
        let scale = g as f32 / 224.0;
        let blur = |c: PhotometricConfig| PhotometricConfig {
            blur_sigma: (c.blur_sigma.0 * scale, c.blur_sigma.1 * scale),
            ..c
        };
        ViewConfig {
            patch_size: patch,
            global: ViewFamily {
                count: 2,
                side: g,
                scale: Scale { lo: 0.4, hi: 1.0 },
            },
            local: ViewFamily {
                count: 8,
                side: l,
                scale: Scale { lo: 0.05, hi: 0.4 },
            },
            interpolation: Interpolation::Bicubic,
            flip_p: 0.5,
            per_patch: true,
            global1: blur(PhotometricConfig::dino_global1()),
            global2: blur(PhotometricConfig::dino_global2()),
            local_aug: blur(PhotometricConfig::dino_local()),
            match_rule: MatchRule::Paper,
        }
    }

    /// The preset that fits a source of `height x width` (28 or less: small28; up to 64:
    /// small32; otherwise paper224).
    pub fn preset_for_source(height: usize, width: usize) -> Preset {
        match height.max(width) {
            0..=28 => Preset::Small28,
            29..=64 => Preset::Small32,
            _ => Preset::Paper224,
        }
    }

    /// Number of views per image.
    pub fn num_views(&self) -> usize {
        self.global.count + self.local.count
    }

    /// Side of view `v` (globals first, then locals).
    pub fn side(&self, v: usize) -> usize {
        if v < self.global.count {
            self.global.side
        } else {
            self.local.side
        }
    }

    /// Patches per side of view `v`.
    pub fn grid(&self, v: usize) -> usize {
        self.side(v) / self.patch_size
    }

    /// The photometric recipe of view `v`.
    pub fn photometric(&self, v: usize) -> &PhotometricConfig {
        if v >= self.global.count {
            &self.local_aug
        } else if v % 2 == 0 {
            &self.global1
        } else {
            &self.global2
        }
    }

    /// Refuses impossible settings, naming the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let p = self.patch_size;
        if p == 0 {
            return Err(Error::bad_config(
                "patch_size (--patch)",
                "must be at least 1 pixel (e.g. 4 for 28x28 images, 16 for 224)",
            ));
        }
        if self.global.count == 0 {
            return Err(Error::bad_config(
                "views.global_views (--global-views)",
                "is 0, but the teacher sees only global views: pass at least 1 (the paper: 2)",
            ));
        }
        for (name, fam) in [("global", &self.global), ("local", &self.local)] {
            if fam.count > MAX_VIEWS {
                return Err(Error::bad_config(
                    format!("views.{name}_views (--{name}-views)"),
                    format!(
                        "{} views per image is more than the {MAX_VIEWS} allowed: pass at most \
                         {MAX_VIEWS} (the paper: 2 global, 8 local)",
                        fam.count
                    ),
                ));
            }
        }
        for (name, fam) in [("global", &self.global), ("local", &self.local)] {
            if fam.count == 0 {
                continue;
            }
            if fam.side == 0 {
                return Err(Error::bad_config(
                    format!("views.{name}_side (--view-sides)"),
                    format!(
                        "a view side of 0 pixels holds no patch: pass a positive multiple of \
                         the patch size {p} (e.g. {}), or set views.{name}_views \
                         (--{name}-views) to 0 to make no {name} views",
                        // A huge patch size (from a TOML file or the command line) must
                        // not overflow the example: fall back to the patch size itself.
                        p.checked_mul(if name == "global" { 7 } else { 3 })
                            .unwrap_or(p)
                    ),
                ));
            }
            if fam.side % p != 0 {
                let down = fam.side / p * p;
                // The next multiple up may not exist near usize::MAX: name only the one below.
                let such_as = match down.checked_add(p) {
                    Some(up) if down > 0 => format!("{down} or {up}"),
                    _ => format!("{}", down.max(p)),
                };
                return Err(Error::bad_config(
                    format!("views.{name}_side (--view-sides)"),
                    format!(
                        "view side {} is not divisible by the patch size {p}; use a multiple of {p} such as {such_as}",
                        fam.side,
                    ),
                ));
            }
            if fam.side / p > MAX_GRID {
                return Err(Error::bad_config(
                    format!("views.{name}_side (--view-sides)"),
                    format!(
                        "view side {} is {} patches of {p} pixels, more than the {MAX_GRID} \
                         allowed per side: pass a side of at most {}",
                        fam.side,
                        fam.side / p,
                        MAX_GRID * p
                    ),
                ));
            }
            fam.scale
                .validate(&format!("views.{name}_scale (--{name}-scale)"))?;
        }
        if !(0.0..=1.0).contains(&self.flip_p) {
            return Err(Error::bad_config(
                "views.flip_p",
                format!("{} is not a probability in [0, 1]", self.flip_p),
            ));
        }
        self.global1.validate("augment.global1")?;
        self.global2.validate("augment.global2")?;
        self.local_aug.validate("augment.local")?;
        Ok(())
    }
}

/// Parses `A,B` into two numbers (for `--view-sides 224,96` and `--global-scale 0.4,1`).
pub fn parse_pair<T: std::str::FromStr + Copy>(text: &str, field: &str) -> Result<(T, T)> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let parse = |s: &str| {
        s.parse::<T>().map_err(|_| {
            Error::bad_config(
                field,
                format!("`{s}` in `{text}` is not a number; write two numbers as A,B"),
            )
        })
    };
    match parts.as_slice() {
        [a, b] => Ok((parse(a)?, parse(b)?)),
        [a] => parse(a).map(|v| (v, v)),
        _ => Err(Error::bad_config(
            field,
            format!("`{text}` should be two numbers written A,B"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in [Preset::Small28, Preset::Small32, Preset::Paper224] {
            ViewConfig::preset(p).validate().unwrap();
        }
        let c = ViewConfig::preset(Preset::Paper224);
        assert_eq!(
            (c.grid(0), c.grid(1), c.grid(2), c.num_views()),
            (14, 14, 6, 10)
        );
    }

    #[test]
    fn side_not_divisible_by_patch_is_refused() {
        let mut c = ViewConfig::preset(Preset::Small28);
        c.local.side = 14;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("views.local_side") && e.contains("not divisible by the patch size 4"),
            "{e}"
        );
        assert!(e.contains("12 or 16"), "{e}");
    }

    #[test]
    fn scale_outside_unit_interval_is_refused() {
        let mut c = ViewConfig::preset(Preset::Small32);
        c.global.scale = Scale { lo: 0.4, hi: 1.5 };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("views.global_scale") && e.contains("(0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn largest_grid_fits_the_patch_index() {
        use crate::views::photometric::WHOLE_VIEW;
        // Patch indices run 0..grid^2 and must stay below the whole-view marker.
        assert!(MAX_GRID * MAX_GRID < WHOLE_VIEW as usize);
        assert!((MAX_GRID + 1) * (MAX_GRID + 1) >= WHOLE_VIEW as usize);
        let mut c = ViewConfig::preset(Preset::Small28);
        c.global.side = MAX_GRID * 4;
        c.validate().unwrap();
        c.global.side += 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--view-sides") && e.contains("at most 4092"),
            "{e}"
        );
        c.global.side = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("views.global_side") && e.contains("0 pixels"),
            "{e}"
        );
    }

    /// Found with the config fuzz target (fuzz/fuzz_targets/config.rs) on a hand-written
    /// input: a huge patch size with a view side of 0 overflowed `7 * patch` while writing
    /// the error (a panic with overflow checks, a wrong number without), and a side near
    /// usize::MAX not divisible by the patch overflowed `down + patch`.
    #[test]
    fn huge_patch_or_side_is_refused_without_overflow() {
        let mut c = ViewConfig::preset(Preset::Small28);
        c.patch_size = 9_223_372_036_854_775_807; // i64::MAX, the largest TOML integer
        c.global.side = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("views.global_side") && e.contains("e.g. 9223372036854775807"),
            "{e}"
        );
        let mut c = ViewConfig::preset(Preset::Small28);
        c.patch_size = 7_000_000_000_000_000_000; // 3 * this > u64::MAX
        c.global.side = c.patch_size;
        c.local.side = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("views.local_side") && e.contains("e.g. 7000000000000000000"),
            "{e}"
        );
        let mut c = ViewConfig::preset(Preset::Small28);
        c.patch_size = 2;
        c.global.side = usize::MAX;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("not divisible by the patch size 2")
                && e.contains(&format!("such as {}", usize::MAX - 1)),
            "{e}"
        );
    }

    #[test]
    fn pair_parsing() {
        assert_eq!(
            parse_pair::<usize>("224,96", "--view-sides").unwrap(),
            (224, 96)
        );
        assert_eq!(parse_pair::<usize>("32", "--view-sides").unwrap(), (32, 32));
        assert!(parse_pair::<usize>("a,3", "--view-sides")
            .unwrap_err()
            .to_string()
            .contains("--view-sides"));
        assert!(parse_pair::<f64>("1,2,3", "--scale").is_err());
    }
}
