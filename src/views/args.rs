//! Command-line settings of the views, shared by every command that builds them
//! (`views`, `viz`, and later `train`). Turns flags into a validated [`ViewConfig`].

use std::path::PathBuf;

use crate::data::{default_pack, Pack, Split};
use crate::error::Result;
use crate::views::config::{parse_pair, Preset, ViewConfig};
use crate::views::crop::Scale;
use crate::views::matching::MatchRule;
use crate::views::resize::Interpolation;

/// `on` / `off` switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Where the images come from and how views are made of them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ViewArgs {
    /// Pack file (from `pwself-engine prepare`); default: the embedded Fashion-MNIST subset.
    #[arg(long, value_name = "PACK")]
    pub data: Option<PathBuf>,
    /// View preset; default: chosen from the image size (small28, small32 or paper224).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// ViT patch size in pixels (view sides must be multiples of it).
    #[arg(long, value_name = "PX")]
    pub patch: Option<usize>,
    /// Number of global views per image.
    #[arg(long, value_name = "N")]
    pub global_views: Option<usize>,
    /// Number of local views per image.
    #[arg(long, value_name = "N")]
    pub local_views: Option<usize>,
    /// Sides of the global and local views, e.g. 224,96.
    #[arg(long, value_name = "G,L")]
    pub view_sides: Option<String>,
    /// Area-fraction range of global crops, e.g. 0.4,1.0.
    #[arg(long, value_name = "MIN,MAX")]
    pub global_scale: Option<String>,
    /// Area-fraction range of local crops, e.g. 0.05,0.4.
    #[arg(long, value_name = "MIN,MAX")]
    pub local_scale: Option<String>,
    /// Resize filter.
    #[arg(long, value_enum)]
    pub interpolation: Option<Interpolation>,
    /// Photometric augmentation per patch (on, the paper) or per view (off, DINO).
    #[arg(long, value_enum)]
    pub patch_aug: Option<Switch>,
    /// Patch-matching rule: the paper's, or the released code's (float64 quirks included).
    #[arg(long, value_enum)]
    pub match_rule: Option<MatchRule>,
    /// Seed of every random draw (crops, photometric draws, shuffling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl ViewArgs {
    /// Opens `--data`, or the embedded default training split.
    pub fn open_pack(&self) -> Result<Pack> {
        match &self.data {
            Some(p) => Pack::open(p),
            None => default_pack(Split::Train),
        }
    }

    /// The view configuration for images of `height x width`: the preset, then each flag.
    pub fn config(&self, height: usize, width: usize) -> Result<ViewConfig> {
        let preset = self
            .preset
            .unwrap_or_else(|| ViewConfig::preset_for_source(height, width));
        let mut c = ViewConfig::preset(preset);
        if let Some(p) = self.patch {
            c.patch_size = p;
        }
        if let Some(n) = self.global_views {
            c.global.count = n;
        }
        if let Some(n) = self.local_views {
            c.local.count = n;
        }
        if let Some(s) = &self.view_sides {
            (c.global.side, c.local.side) = parse_pair(s, "--view-sides")?;
        }
        if let Some(s) = &self.global_scale {
            let (lo, hi) = parse_pair(s, "--global-scale")?;
            c.global.scale = Scale::new(lo, hi, "--global-scale")?;
        }
        if let Some(s) = &self.local_scale {
            let (lo, hi) = parse_pair(s, "--local-scale")?;
            c.local.scale = Scale::new(lo, hi, "--local-scale")?;
        }
        if let Some(i) = self.interpolation {
            c.interpolation = i;
        }
        if let Some(s) = self.patch_aug {
            c.per_patch = s == Switch::On;
        }
        if let Some(r) = self.match_rule {
            c.match_rule = r;
        }
        c.validate()?;
        Ok(c)
    }
}
