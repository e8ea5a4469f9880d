//! Network configuration: the ViT backbone and the DINO head, presets, and checks.

use crate::error::{Error, Result};

/// The ViT backbone.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Patch size in pixels (the patch-embedding convolution's kernel and stride).
    pub patch: usize,
    /// Input channels (1 for Fashion-MNIST, 3 for RGB).
    pub in_chans: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; `embed_dim / heads` is the head dimension.
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio * embed_dim`.
    pub mlp_ratio: usize,
    /// Side of the reference grid of the position embeddings (global view side / patch);
    /// other grids resample it bicubically, as timm does.
    pub ref_grid: usize,
    /// Largest stochastic-depth rate (the student's last block; rates rise linearly from 0
    /// over the blocks, as in DINO). The teacher never drops.
    pub drop_path: f32,
}

/// The DINO projection head, applied to every token that enters the loss. The default is
/// the small head of the default job (3 layers, 256 hidden, 64 bottleneck, K = 1024);
/// [`HeadConfig::dino`] gives DINO's sizes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Number of Linear layers before the L2 normalisation (DINO: 3).
    pub layers: usize,
    /// Hidden width of the MLP (DINO: 2048).
    pub hidden: usize,
    /// Bottleneck width before the weight-normalised last layer (DINO: 256).
    pub bottleneck: usize,
    /// Output dimension K (DINO: 65536).
    pub out_dim: usize,
}

/// Named backbone sizes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// 64 dims, 4 blocks, 2 heads (head dim 32): the default job's network for 28x28 images.
    Femto,
    /// ViT-Tiny: 192 dims, 12 blocks, 3 heads.
    Tiny,
    /// ViT-Small: 384 dims, 12 blocks, 6 heads.
    Small,
    /// ViT-Base: 768 dims, 12 blocks, 12 heads.
    Base,
}

impl Arch {
    /// `(embed_dim, depth, heads)`.
    pub fn dims(self) -> (usize, usize, usize) {
        match self {
            Arch::Femto => (64, 4, 2),
            Arch::Tiny => (192, 12, 3),
            Arch::Small => (384, 12, 6),
            Arch::Base => (768, 12, 12),
        }
    }
    /// The backbone for `patch`-pixel patches of `in_chans`-channel images whose global
    /// views are `global_side` pixels.
    pub fn vit(self, patch: usize, in_chans: usize, global_side: usize) -> VitConfig {
        let (embed_dim, depth, heads) = self.dims();
        VitConfig {
            patch,
            in_chans,
            embed_dim,
            depth,
            heads,
            mlp_ratio: 4,
            ref_grid: global_side / patch.max(1),
            drop_path: 0.1,
        }
    }
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            layers: 3,
            hidden: 256,
            bottleneck: 64,
            out_dim: 1024,
        }
    }
}

impl HeadConfig {
    /// DINO's head: 3 layers, 2048 hidden, 256 bottleneck, K = `out_dim`.
    pub fn dino(out_dim: usize) -> HeadConfig {
        HeadConfig {
            layers: 3,
            hidden: 2048,
            bottleneck: 256,
            out_dim,
        }
    }
}

impl VitConfig {
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.heads.max(1)
    }
    /// MLP hidden width.
    pub fn mlp_dim(&self) -> usize {
        self.embed_dim * self.mlp_ratio
    }
    /// Refuses impossible sizes, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::bad_config(format!("model.{f}"), why));
        if self.patch == 0 {
            return bad("patch", "must be at least 1 pixel".into());
        }
        if self.in_chans != 1 && self.in_chans != 3 {
            return bad(
                "in_chans",
                format!("{} channels: images have 1 or 3", self.in_chans),
            );
        }
        if self.embed_dim == 0 || self.depth == 0 || self.heads == 0 || self.mlp_ratio == 0 {
            return bad(
                "embed_dim",
                "embed_dim, depth, heads and mlp_ratio must all be at least 1".into(),
            );
        }
        if self.embed_dim % self.heads != 0 {
            return bad(
                "heads",
                format!(
                    "embed_dim {} is not divisible by {} heads; pick a divisor",
                    self.embed_dim, self.heads
                ),
            );
        }
        if self.ref_grid == 0 {
            return bad(
                "ref_grid",
                "the position-embedding grid needs at least 1 patch per side".into(),
            );
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad(
                "drop_path",
                format!(
                    "{} is not a rate in [0, 1): pass e.g. 0.1 (the paper) or 0 to turn \
                     stochastic depth off",
                    self.drop_path
                ),
            );
        }
        Ok(())
    }
}

impl HeadConfig {
    /// Refuses impossible sizes, naming the field.
    pub fn validate(&self) -> Result<()> {
        for (field, v, dino) in [
            ("head.layers", self.layers, 3),
            ("head.hidden", self.hidden, 2048),
            ("head.bottleneck", self.bottleneck, 256),
            ("head.out_dim (--out-dim)", self.out_dim, 65536),
        ] {
            if v == 0 {
                return Err(Error::bad_config(
                    field,
                    format!("is 0: pass at least 1 (DINO: {dino})"),
                ));
            }
        }
        Ok(())
    }
}
