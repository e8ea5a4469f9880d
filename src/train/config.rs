//! The training configuration: a TOML file (every key optional, unknown keys refused)
//! with command-line overrides on top. [`TrainConfig::resolve`] turns it into the
//! concrete view and network settings for a given pack.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::model::config::{Arch, HeadConfig, VitConfig};
use crate::optim::OptimConfig;
use crate::views::config::{Preset, ViewConfig};
use crate::views::crop::Scale;
use crate::views::matching::MatchRule;
use crate::views::resize::Interpolation;

/// Where the images come from.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Training pack; default: the embedded Fashion-MNIST subset (train split).
    pub train: Option<PathBuf>,
    /// Pack for the kNN evaluation; default: the embedded test split when training on the
    /// embedded data, otherwise none (no evaluation).
    pub test: Option<PathBuf>,
}

/// View settings; unset fields come from the preset.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewSection {
    /// small28, small32 or paper224; default: from the image size.
    pub preset: Option<Preset>,
    pub global_views: Option<usize>,
    pub local_views: Option<usize>,
    pub global_side: Option<usize>,
    pub local_side: Option<usize>,
    pub global_scale: Option<[f64; 2]>,
    pub local_scale: Option<[f64; 2]>,
    pub interpolation: Option<Interpolation>,
    /// Per-patch photometric augmentation (the paper) or per view (DINO).
    pub patch_aug: Option<bool>,
    pub match_rule: Option<MatchRule>,
}

/// Backbone settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Named size: femto, tiny, small, base.
    pub arch: Arch,
    /// Patch size; default: the view preset's.
    pub patch: Option<usize>,
    /// Overrides of the named size.
    pub embed_dim: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    /// Largest stochastic-depth rate of the student (the paper: 0.1).
    pub drop_path: f32,
    /// Initialise the student and teacher backbones from this timm ViT state dict
    /// (safetensors, timm's key names; `train --init`); the DINO head starts fresh.
    /// Ignored when resuming. See docs/interop.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            arch: Arch::Femto,
            patch: None,
            embed_dim: None,
            depth: None,
            heads: None,
            drop_path: 0.1,
            init: None,
        }
    }
}

/// The run itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Epochs the schedules span.
    pub epochs: usize,
    /// Stop after this many steps (the schedules still span `epochs`).
    pub max_steps: Option<u64>,
    /// Images per step.
    pub batch: usize,
    /// Seed of every random draw (initialisation, views, drop path).
    pub seed: u64,
    /// Worker threads; default: all cores.
    pub threads: Option<usize>,
    /// kNN evaluation every this many epochs (0: only at the end).
    pub eval_every: usize,
    /// Output directory (metrics, checkpoint, curves).
    pub out: PathBuf,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            epochs: 5,
            max_steps: None,
            batch: 32,
            seed: 0,
            threads: None,
            eval_every: 1,
            out: PathBuf::from("runs/default"),
        }
    }
}

/// Everything a training run is configured by.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataSection,
    pub views: ViewSection,
    pub model: ModelSection,
    pub head: HeadConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub run: RunSection,
}

impl Default for TrainConfig {
    /// The default job: PW-Self (PWML, per-patch augmentation) on the embedded
    /// Fashion-MNIST subset, sized to finish in under 10 minutes on two CPU cores: femto
    /// ViT, 2 global + 6 local views, head K = 512, 5 epochs of batch 32, peak lr 1e-3
    /// after one warm-up epoch, teacher momentum 0.99 -> 1 and teacher temperature 0.04
    /// (DINO's default; the paper's 0.04 -> 0.07 warm-up spans 30 epochs). Everything else
    /// is DINO's default. Paper-scale runs set these in their TOML file.
    fn default() -> Self {
        TrainConfig {
            data: DataSection::default(),
            views: ViewSection {
                local_views: Some(6),
                ..ViewSection::default()
            },
            model: ModelSection::default(),
            head: HeadConfig {
                out_dim: 512,
                ..HeadConfig::default()
            },
            loss: LossConfig {
                teacher_temp: 0.04,
                warmup_teacher_temp_epochs: 0,
                ..LossConfig::default()
            },
            optim: OptimConfig {
                lr: 0.008,
                warmup_epochs: 1,
                momentum_teacher: 0.99,
                ..OptimConfig::default()
            },
            run: RunSection::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; unknown keys and wrong types are refused with the file, the key
    /// and the line.
    pub fn from_toml_file(path: &Path) -> Result<TrainConfig> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::bad_file(
                path,
                "does not exist: pass the path of a TOML configuration file (--config), or \
                 leave --config out to train with the defaults",
            ),
            _ if path.is_dir() => Error::bad_file(
                path,
                "is a folder: pass the path of a TOML configuration file (--config)",
            ),
            _ => Error::io(path, e),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::bad_file(
                path,
                format!(
                    "is not UTF-8 text (invalid byte at offset {}): a configuration is a TOML \
                     text file; save it as UTF-8",
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        toml::from_str(&text).map_err(|e| {
            let msg = e.to_string();
            // The one struct variant a user writes: `kind = "pwll"` lacks its weight.
            let hint = if msg.contains("expected struct variant") {
                "PWLL needs its CLS weight: write kind = { pwll = { lambda = 0.5 } }; "
            } else {
                ""
            };
            Error::bad_file(
                path,
                format!(
                    "{}: {hint}see `pwself-engine train --help` and the README for the keys",
                    msg.trim_end()
                ),
            )
        })
    }

    /// The concrete views and network for source images of `height x width x channels`.
    pub fn resolve(
        &self,
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<(ViewConfig, VitConfig)> {
        let v = &self.views;
        let preset = v
            .preset
            .unwrap_or_else(|| ViewConfig::preset_for_source(height, width));
        let mut views = ViewConfig::preset(preset);
        if let Some(p) = self.model.patch {
            views.patch_size = p;
        }
        if let Some(n) = v.global_views {
            views.global.count = n;
        }
        if let Some(n) = v.local_views {
            views.local.count = n;
        }
        if let Some(s) = v.global_side {
            views.global.side = s;
        }
        if let Some(s) = v.local_side {
            views.local.side = s;
        }
        if let Some([lo, hi]) = v.global_scale {
            views.global.scale = Scale::new(lo, hi, "views.global_scale")?;
        }
        if let Some([lo, hi]) = v.local_scale {
            views.local.scale = Scale::new(lo, hi, "views.local_scale")?;
        }
        if let Some(i) = v.interpolation {
            views.interpolation = i;
        }
        if let Some(p) = v.patch_aug {
            views.per_patch = p;
        }
        if let Some(r) = v.match_rule {
            views.match_rule = r;
        }
        views.validate()?;
        let m = &self.model;
        let mut vit = m.arch.vit(views.patch_size, channels, views.global.side);
        if let Some(d) = m.embed_dim {
            vit.embed_dim = d;
        }
        if let Some(d) = m.depth {
            vit.depth = d;
        }
        if let Some(h) = m.heads {
            vit.heads = h;
        }
        vit.drop_path = m.drop_path;
        vit.validate()?;
        self.head.validate()?;
        self.loss.validate()?;
        self.optim.validate()?;
        if self.run.batch == 0 {
            return Err(Error::bad_config(
                "run.batch (--batch)",
                "is 0: the batch size must be at least 1 (e.g. 32)",
            ));
        }
        if self.run.epochs == 0 {
            return Err(Error::bad_config(
                "run.epochs (--epochs)",
                "is 0: the schedules span the epochs, so pass at least 1",
            ));
        }
        if self.run.max_steps == Some(0) {
            return Err(Error::bad_config(
                "run.max_steps (--max-steps)",
                "is 0, so nothing would be trained: pass at least 1, or leave it out to \
                 train every step of every epoch",
            ));
        }
        if self.run.threads == Some(0) {
            return Err(Error::bad_config(
                "run.threads (--threads)",
                "is 0: pass at least 1, or leave it out to use every core",
            ));
        }
        Ok((views, vit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let c = TrainConfig::default();
        let text = toml::to_string(&c).unwrap();
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[run]\nbatchsize = 3\n").unwrap();
        let e = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("batchsize"), "{e}");
        std::fs::write(&p, "[run]\nbatch = \"many\"\n").unwrap();
        let e = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("batch"), "{e}");
        std::fs::write(
            &p,
            "[loss]\nkind = { pwll = { lambda = 0.3 } }\n[run]\nbatch = 8\n",
        )
        .unwrap();
        let c = TrainConfig::from_toml_file(&p).unwrap();
        assert_eq!(c.run.batch, 8);
    }

    #[test]
    fn impossible_values_name_the_field() {
        let mut c = TrainConfig::default();
        c.model.patch = Some(5);
        let e = c.resolve(28, 28, 1).unwrap_err().to_string();
        assert!(e.contains("not divisible by the patch size 5"), "{e}");
        let mut c = TrainConfig::default();
        c.run.batch = 0;
        assert!(c
            .resolve(28, 28, 1)
            .unwrap_err()
            .to_string()
            .contains("--batch"));
        let mut c = TrainConfig::default();
        c.loss.kind = crate::loss::LossKind::Pwll { lambda: 1.5 };
        assert!(c
            .resolve(28, 28, 1)
            .unwrap_err()
            .to_string()
            .contains("lambda"));
    }
}
