//! Features for the evaluation protocols, from a checkpoint's teacher backbone: the
//! final-norm CLS token, the CLS of the last n blocks, the patch-token mean, GeM of the
//! patch tokens, CLS + GeM (copy detection) and multi-scale CLS (retrieval). Images come
//! from a pack (seen whole, resized to the model's side, normalised with the pack's mean and
//! std: exactly the trainer's kNN input, [`crate::train::features`]) or from image files
//! (optionally cropped to a box, square bicubic resize, ImageNet mean/std unless told
//! otherwise). Extraction runs in bounded chunks (the backbone itself is rayon-parallel);
//! [`cache`] keeps results on disk keyed by the checkpoint's bytes and the data.
//!
//! This module computes features; it does not score them (that is `knn`, `linear`,
//! `copydetect`, `retrieval`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::checkpoint;
use crate::data::Pack;
use crate::error::{Error, Result};
use crate::model::config::VitConfig;
use crate::model::vit::{BackboneActs, Network};
use crate::rng::{Purpose, Stream};
use crate::train::TrainConfig;
use crate::views::crop::{sample_crop, CropRecord, Scale};
use crate::views::resize::{Interpolation, ResizePlan};

/// ImageNet's per-channel mean (RGB), what image-file inputs are normalised with by default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Memory a chunk's activations may take (the backbone keeps every block's activations,
/// attention probabilities included, for the whole chunk).
const CHUNK_BYTES: usize = 512 << 20;
/// GeM's clamp (SPEC 7: clamp 1e-6).
const GEM_EPS: f32 = 1e-6;

/// Which feature of the backbone's tokens an evaluation reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureKind {
    /// The final-norm CLS token (DINO's kNN feature). `cls`.
    Cls,
    /// The CLS tokens of the last n blocks, each through the final norm, concatenated from
    /// the earliest to the last block (DINO's linear evaluation, n = 4). `last4`, `last-n:4`.
    LastCls(usize),
    /// The final-norm CLS then the mean of the final-norm patch tokens (DINO's linear
    /// evaluation with `avgpool`; DINO interleaves the two, a permutation a linear layer
    /// does not see). `cls+patchmean`.
    ClsPatchMean,
    /// The mean of the final-norm patch tokens. `patchmean`.
    PatchMean,
    /// GeM(p) of the final-norm patch tokens (clamped at 1e-6). `gem:4`.
    Gem(f32),
    /// The final-norm CLS then GeM(p) of the patch tokens (copy detection). `cls+gem:4`.
    ClsGem(f32),
    /// The mean of the final-norm CLS at sides 1, 1/sqrt 2 and 1/2 of the model's side
    /// (each rounded to a multiple of the patch), L2-normalised (retrieval). `multiscale`.
    MultiScaleCls,
}

impl FeatureKind {
    /// Feature width for a backbone of token width `embed_dim`.
    pub fn dim(self, embed_dim: usize) -> usize {
        match self {
            FeatureKind::Cls
            | FeatureKind::PatchMean
            | FeatureKind::Gem(_)
            | FeatureKind::MultiScaleCls => embed_dim,
            FeatureKind::LastCls(n) => n * embed_dim,
            FeatureKind::ClsPatchMean | FeatureKind::ClsGem(_) => 2 * embed_dim,
        }
    }
}

impl fmt::Display for FeatureKind {
    /// The canonical spelling, which [`FeatureKind::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureKind::Cls => write!(f, "cls"),
            FeatureKind::LastCls(n) => write!(f, "last-n:{n}"),
            FeatureKind::ClsPatchMean => write!(f, "cls+patchmean"),
            FeatureKind::PatchMean => write!(f, "patchmean"),
            FeatureKind::Gem(p) => write!(f, "gem:{p}"),
            FeatureKind::ClsGem(p) => write!(f, "cls+gem:{p}"),
            FeatureKind::MultiScaleCls => write!(f, "multiscale"),
        }
    }
}

impl FromStr for FeatureKind {
    type Err = Error;
    /// Reads `cls`, `last4` (any `lastN`), `last-n:4`, `cls+patchmean`, `patchmean`,
    /// `gem:4`, `cls+gem:4`, `multiscale`.
    fn from_str(s: &str) -> Result<FeatureKind> {
        let bad = |why: &str| {
            Error::bad_config(
                "--feature",
                format!(
                    "`{s}`: {why}; use one of cls, last4, last-n:N, cls+patchmean, patchmean, \
                     gem:P, cls+gem:P, multiscale"
                ),
            )
        };
        let p_of = |t: &str| -> Result<f32> {
            match t.parse::<f32>() {
                Ok(p) if p.is_finite() && p > 0.0 => Ok(p),
                _ => Err(bad("the GeM exponent p must be a positive number")),
            }
        };
        let n_of = |t: &str| -> Result<usize> {
            match t.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad("the number of blocks must be a positive integer")),
            }
        };
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "cls" => FeatureKind::Cls,
            "cls+patchmean" => FeatureKind::ClsPatchMean,
            "patchmean" => FeatureKind::PatchMean,
            "multiscale" => FeatureKind::MultiScaleCls,
            "gem" => FeatureKind::Gem(4.0),
            "cls+gem" => FeatureKind::ClsGem(4.0),
            _ => {
                if let Some(n) = t.strip_prefix("last-n:") {
                    FeatureKind::LastCls(n_of(n)?)
                } else if let Some(n) = t.strip_prefix("last") {
                    FeatureKind::LastCls(n_of(n)?)
                } else if let Some(p) = t.strip_prefix("cls+gem:") {
                    FeatureKind::ClsGem(p_of(p)?)
                } else if let Some(p) = t.strip_prefix("gem:") {
                    FeatureKind::Gem(p_of(p)?)
                } else {
                    return Err(bad("unknown feature"));
                }
            }
        })
    }
}

impl serde::Serialize for FeatureKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The per-channel normalisation of image-file inputs: `(x - mean) / std` on pixel/255.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Normalisation {
    /// Per-channel mean (one value per model channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Normalisation {
    /// ImageNet's mean and std for 3-channel models; for 1-channel models the mean of
    /// ImageNet's three channels (the grey image is their average).
    pub fn imagenet(channels: usize) -> Normalisation {
        if channels == 3 {
            Normalisation {
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
            }
        } else {
            let m = IMAGENET_MEAN.iter().sum::<f32>() / 3.0;
            let s = IMAGENET_STD.iter().sum::<f32>() / 3.0;
            Normalisation {
                mean: vec![m; channels],
                std: vec![s; channels],
            }
        }
    }
}

/// A checkpoint's teacher backbone, ready to turn images into features.
pub struct Extractor {
    net: Network,
    params: Vec<f32>,
    side: usize,
    checkpoint: PathBuf,
    checkpoint_hash: String,
    files_norm: Normalisation,
}

/// One image, decoded: HWC bytes with the model's channel count, and the crop box to read.
struct Source<'a> {
    pixels: std::borrow::Cow<'a, [u8]>,
    h: usize,
    w: usize,
    crop: CropRecord,
}

impl Extractor {
    /// Loads the teacher backbone of a `pwself-engine train` checkpoint. The architecture
    /// (patch, channels, width, depth, MLP ratio, position grid) is read from the tensors'
    /// shapes and the head count from the stored training configuration; the two must agree.
    /// The side is the global view side the model was trained at (`ref_grid * patch`).
    pub fn from_checkpoint(path: &Path) -> Result<Extractor> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        crate::checkpoint::verify(path, &bytes)?;
        let checkpoint_hash = hash_hex(&bytes);
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::bad_file(
                path,
                format!("not a readable safetensors file ({e}): pass the checkpoint.safetensors written by `pwself-engine train`"),
            )
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::bad_file(path, format!("bad safetensors header: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(checkpoint::FORMAT) {
            return Err(Error::bad_file(
                path,
                "not a pwself-engine training checkpoint (no `format` metadata): for another model's \
                 features, save them as .npy and pass --train-features/--db-features instead",
            ));
        }
        let cfg: TrainConfig = match meta.get("config") {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                Error::bad_file(
                    path,
                    format!("its stored training configuration cannot be read ({e}); it was written by another pwself-engine version"),
                )
            })?,
            None => {
                return Err(Error::bad_file(
                    path,
                    "has no stored training configuration (`config` metadata); it was not written by `pwself-engine train`",
                ))
            }
        };
        let shape = |name: &str| -> Result<Vec<usize>> {
            st.tensor(name).map(|t| t.shape().to_vec()).map_err(|_| {
                Error::bad_file(
                    path,
                    format!("has no tensor `{name}`: it is not a ViT backbone checkpoint of this engine"),
                )
            })
        };
        let pe = shape("patch_embed.proj.weight")?;
        let pos = shape("pos_embed")?;
        let fc1 = shape("blocks.0.mlp.fc1.weight")?;
        if pe.len() != 4 || pe[2] != pe[3] || pos.len() != 3 || fc1.len() != 2 {
            return Err(Error::bad_file(
                path,
                format!("tensor shapes patch_embed {pe:?}, pos_embed {pos:?} are not a ViT's; it is from another architecture"),
            ));
        }
        let (d, c, p) = (pe[0], pe[1], pe[2]);
        let grid = ((pos[1].saturating_sub(1)) as f64).sqrt().round() as usize;
        if grid * grid + 1 != pos[1] || pos[2] != d {
            return Err(Error::bad_file(
                path,
                format!("pos_embed is {pos:?}, not (1, 1 + g^2, {d}); the checkpoint is from another architecture"),
            ));
        }
        let depth = (0..)
            .take_while(|i| st.tensor(&format!("blocks.{i}.norm1.weight")).is_ok())
            .count();
        let (arch_d, arch_depth, arch_heads) = cfg.model.arch.dims();
        let heads = cfg.model.heads.unwrap_or(arch_heads);
        let want_d = cfg.model.embed_dim.unwrap_or(arch_d);
        let want_depth = cfg.model.depth.unwrap_or(arch_depth);
        if (want_d, want_depth) != (d, depth) {
            return Err(Error::bad_file(
                path,
                format!(
                    "its tensors are a {d}-wide, {depth}-block ViT but its stored configuration says \
                     {want_d} wide, {depth_c} blocks: the file was assembled from another architecture; \
                     use the checkpoint its run wrote",
                    depth_c = want_depth
                ),
            ));
        }
        let vit = VitConfig {
            patch: p,
            in_chans: c,
            embed_dim: d,
            depth,
            heads,
            mlp_ratio: fc1[0] / d.max(1),
            ref_grid: grid,
            drop_path: 0.0,
        };
        let net = Network::new(vit, cfg.head.clone())
            .map_err(|e| Error::bad_file(path, format!("its architecture is not valid: {e}")))?;
        let mut params = vec![0.0f32; net.table.total()];
        for info in net.table.tensors() {
            if info.name.starts_with("head.") {
                continue; // Features never read the projection head.
            }
            let t = st.tensor(&info.name).map_err(|_| {
                Error::bad_file(
                    path,
                    format!(
                        "has no tensor `{}`: the checkpoint is from another architecture",
                        info.name
                    ),
                )
            })?;
            if t.dtype() != Dtype::F32 || t.shape() != info.shape.as_slice() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{}` is {:?} {:?} but a ViT with these sizes needs F32 {:?}: the checkpoint is from another architecture",
                        info.name,
                        t.dtype(),
                        t.shape(),
                        info.shape
                    ),
                ));
            }
            for (dst, b) in params[info.range()]
                .iter_mut()
                .zip(t.data().chunks_exact(4))
            {
                *dst = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(Extractor {
            side: grid * p,
            files_norm: Normalisation::imagenet(c),
            net,
            params,
            checkpoint: path.to_path_buf(),
            checkpoint_hash,
        })
    }

    /// An extractor for a network and its parameters held in memory (tests, the trainer).
    /// `side` must be a positive multiple of the patch.
    pub fn from_parts(net: Network, params: Vec<f32>, side: usize) -> Result<Extractor> {
        assert_eq!(
            params.len(),
            net.table.total(),
            "params do not fit the network"
        );
        let c = net.vit.in_chans;
        let hash = hash_hex(
            &params
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let mut e = Extractor {
            side: net.vit.ref_grid * net.vit.patch,
            files_norm: Normalisation::imagenet(c),
            net,
            params,
            checkpoint: PathBuf::from("<memory>"),
            checkpoint_hash: hash,
        };
        e.set_side(side)?;
        Ok(e)
    }

    /// Changes the input side (e.g. `--side 320` for copy detection). It must be a positive
    /// multiple of the patch; the position embeddings are resampled to the new grid.
    pub fn set_side(&mut self, side: usize) -> Result<()> {
        let p = self.net.vit.patch;
        if side == 0 || side % p != 0 {
            return Err(Error::bad_config(
                "--side",
                format!(
                    "{side} is not a positive multiple of the model's patch size {p}; pick e.g. {}",
                    (side / p).max(1) * p
                ),
            ));
        }
        self.side = side;
        Ok(())
    }

    /// Sets the mean and std image files are normalised with (one value per channel of the
    /// model, or one value for all).
    pub fn set_file_normalisation(&mut self, mean: &[f32], std: &[f32]) -> Result<()> {
        let c = self.net.vit.in_chans;
        let expand = |v: &[f32], field: &str| -> Result<Vec<f32>> {
            match v.len() {
                1 => Ok(vec![v[0]; c]),
                n if n == c => Ok(v.to_vec()),
                n => Err(Error::bad_config(
                    field,
                    format!("{n} values, but the model has {c} channels; give {c} values or one"),
                )),
            }
        };
        let mean = expand(mean, "--mean")?;
        let std = expand(std, "--std")?;
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::bad_config(
                "--std",
                "every std must be a positive number",
            ));
        }
        self.files_norm = Normalisation { mean, std };
        Ok(())
    }

    /// The network (its configuration says the embedding width, patch, heads).
    pub fn network(&self) -> &Network {
        &self.net
    }
    /// The teacher's parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    /// Input side in pixels.
    pub fn side(&self) -> usize {
        self.side
    }
    /// The checkpoint this extractor was loaded from.
    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }
    /// A hash of the checkpoint file's bytes (the cache key's model part).
    pub fn checkpoint_hash(&self) -> &str {
        &self.checkpoint_hash
    }
    /// The normalisation applied to image files.
    pub fn file_normalisation(&self) -> &Normalisation {
        &self.files_norm
    }

    /// Refuses a pack whose channel count is not the model's.
    fn check_pack(&self, pack: &Pack) -> Result<()> {
        let c = self.net.vit.in_chans;
        if pack.channels() != c {
            return Err(Error::bad_file(
                pack.origin(),
                format!(
                    "has {}-channel images but the checkpoint's model takes {c} channels; \
                     evaluate it on data prepared like its training data",
                    pack.channels()
                ),
            ));
        }
        if pack.is_empty() {
            return Err(Error::bad_file(
                pack.origin(),
                "holds no images; prepare a non-empty pack",
            ));
        }
        Ok(())
    }

    /// Images per backbone call at `side` so the chunk's activations stay near
    /// [`CHUNK_BYTES`].
    fn chunk_len(&self, side: usize) -> usize {
        let v = &self.net.vit;
        let t = 1 + (side / v.patch).pow(2);
        let per_block = v.heads * t * t + t * (12 * v.embed_dim + 2 * v.mlp_dim());
        let per_image = 4 * (v.depth * per_block + 4 * t * v.embed_dim);
        (CHUNK_BYTES / per_image.max(1)).clamp(1, 256)
    }

    /// The whole pack image `i` as the trainer's kNN sees it: `(C, side, side)`.
    pub fn pack_input(&self, pack: &Pack, i: usize) -> Result<Vec<f32>> {
        self.check_pack(pack)?;
        if i >= pack.len() {
            return Err(Error::bad_config(
                "--index",
                format!(
                    "image {i} does not exist: {} holds {} images (0..{})",
                    pack.origin().display(),
                    pack.len(),
                    pack.len()
                ),
            ));
        }
        let src = whole(pack, i);
        let mut out = vec![0.0; pack.channels() * self.side * self.side];
        resize_normalise(
            &src,
            pack.channels(),
            self.side,
            pack.mean(),
            pack.std(),
            &mut out,
        );
        Ok(out)
    }

    /// Image file `path` (optionally cropped to `bbx = [x1, y1, x2, y2]` pixels), square
    /// bicubic resized to the side, normalised: `(C, side, side)`.
    pub fn file_input(&self, path: &Path, bbx: Option<[f64; 4]>) -> Result<Vec<f32>> {
        let src = decode(path, self.net.vit.in_chans, bbx)?;
        let c = self.net.vit.in_chans;
        let mut out = vec![0.0; c * self.side * self.side];
        resize_normalise(
            &src,
            c,
            self.side,
            &self.files_norm.mean,
            &self.files_norm.std,
            &mut out,
        );
        Ok(out)
    }

    /// The last block's CLS attention of one `(C, side, side)` input: `(heads, grid^2)`
    /// (row 0 of each head's attention matrix without its CLS column), with `heads` and
    /// `grid`. What `viz attention` draws.
    pub fn cls_attention(&self, input: &[f32]) -> (Vec<f32>, usize, usize) {
        let mut acts = BackboneActs::default();
        self.net
            .backbone_forward(&self.params, input, 1, self.side, None, &mut acts);
        let (h, t) = (self.net.vit.heads, acts.tokens);
        let probs = acts.attention_probs(self.net.vit.depth - 1);
        let mut maps = Vec::with_capacity(h * (t - 1));
        for head in 0..h {
            maps.extend_from_slice(&probs[head * t * t + 1..head * t * t + t]);
        }
        (maps, h, acts.grid)
    }

    /// Features `(n, kind.dim(D))` of inputs `(n, C, side, side)` at `side`.
    fn features_of_inputs(&self, x: &[f32], n: usize, side: usize, kind: FeatureKind) -> Vec<f32> {
        let d = self.net.vit.embed_dim;
        let mut acts = BackboneActs::default();
        self.net
            .backbone_forward(&self.params, x, n, side, None, &mut acts);
        let t = acts.tokens;
        let out = &acts.out;
        let cls = |b: usize| &out[b * t * d..b * t * d + d];
        let patches = |b: usize| &out[(b * t + 1) * d..(b + 1) * t * d];
        let patch_mean = |b: usize| {
            let mut m = vec![0.0f32; d];
            for tok in patches(b).chunks_exact(d) {
                m.iter_mut().zip(tok).for_each(|(a, v)| *a += v);
            }
            m.iter_mut().for_each(|a| *a /= (t - 1) as f32);
            m
        };
        let gem = |b: usize, p: f32| crate::eval::copydetect::gem(patches(b), t - 1, d, p, GEM_EPS);
        let mut f = Vec::with_capacity(n * kind.dim(d));
        match kind {
            FeatureKind::Cls | FeatureKind::MultiScaleCls => {
                (0..n).for_each(|b| f.extend_from_slice(cls(b)))
            }
            FeatureKind::PatchMean => (0..n).for_each(|b| f.extend(patch_mean(b))),
            FeatureKind::ClsPatchMean => (0..n).for_each(|b| {
                f.extend_from_slice(cls(b));
                f.extend(patch_mean(b));
            }),
            FeatureKind::Gem(p) => (0..n).for_each(|b| f.extend(gem(b, p))),
            FeatureKind::ClsGem(p) => (0..n).for_each(|b| {
                f.extend_from_slice(cls(b));
                f.extend(gem(b, p));
            }),
            FeatureKind::LastCls(k) => {
                let depth = self.net.vit.depth;
                let per_block: Vec<Vec<f32>> = (depth - k.min(depth)..depth)
                    .map(|i| {
                        let x = acts.block_output(i);
                        let rows: Vec<f32> = (0..n)
                            .flat_map(|b| x[b * t * d..b * t * d + d].iter().copied())
                            .collect();
                        self.net.final_norm(&self.params, &rows)
                    })
                    .collect();
                for b in 0..n {
                    for blk in &per_block {
                        f.extend_from_slice(&blk[b * d..(b + 1) * d]);
                    }
                }
            }
        }
        f
    }

    fn check_kind(&self, kind: FeatureKind) -> Result<()> {
        if let FeatureKind::LastCls(n) = kind {
            let depth = self.net.vit.depth;
            if n > depth {
                return Err(Error::bad_config(
                    "--feature",
                    format!("last-n:{n} asks for {n} blocks but the model has {depth}; use at most last{depth}"),
                ));
            }
        }
        Ok(())
    }

    /// The three sides of [`FeatureKind::MultiScaleCls`]: `side * {1, 1/sqrt 2, 1/2}`, each
    /// rounded to a multiple of the patch (at least one patch).
    pub fn multiscale_sides(&self) -> [usize; 3] {
        let p = self.net.vit.patch;
        let r = |s: f64| (((self.side as f64 * s) / p as f64).round() as usize).max(1) * p;
        [self.side, r(std::f64::consts::FRAC_1_SQRT_2), r(0.5)]
    }

    /// Features of `count` images, produced chunk by chunk: `load(i, side, dst)` writes
    /// image `i`'s `(C, side, side)` input into `dst`.
    fn run<F>(
        &self,
        count: usize,
        kind: FeatureKind,
        progress: bool,
        what: &str,
        load: F,
    ) -> Result<Vec<f32>>
    where
        F: Fn(usize, usize, &mut [f32]) -> Result<()> + Sync,
    {
        self.check_kind(kind)?;
        let d = self.net.vit.embed_dim;
        let c = self.net.vit.in_chans;
        let fd = kind.dim(d);
        let sides: Vec<usize> = match kind {
            FeatureKind::MultiScaleCls => self.multiscale_sides().to_vec(),
            _ => vec![self.side],
        };
        let chunk = self.chunk_len(self.side);
        let bar = progress_bar(count, progress, what);
        let mut feats = Vec::with_capacity(count * fd);
        for start in (0..count).step_by(chunk) {
            let end = (start + chunk).min(count);
            let n = end - start;
            let mut acc = vec![0.0f32; n * fd];
            for &s in &sides {
                let per = c * s * s;
                let mut x = vec![0.0f32; n * per];
                x.par_chunks_mut(per)
                    .enumerate()
                    .try_for_each(|(j, dst)| load(start + j, s, dst))?;
                let f = self.features_of_inputs(&x, n, s, kind);
                acc.iter_mut().zip(&f).for_each(|(a, v)| *a += v);
            }
            if kind == FeatureKind::MultiScaleCls {
                for row in acc.chunks_exact_mut(fd) {
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|v| *v /= norm);
                }
            }
            feats.extend_from_slice(&acc);
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        Ok(feats)
    }

    /// Features `(pack.len(), kind.dim(D))` of every image of `pack`, each seen whole,
    /// bicubic-resized to the side and normalised with the pack's mean and std (the
    /// trainer's kNN input). With `progress`, a progress bar on stderr.
    pub fn features_of_pack(
        &self,
        pack: &Pack,
        kind: FeatureKind,
        progress: bool,
    ) -> Result<Vec<f32>> {
        self.check_pack(pack)?;
        let c = pack.channels();
        self.run(pack.len(), kind, progress, "features", |i, s, dst| {
            resize_normalise(&whole(pack, i), c, s, pack.mean(), pack.std(), dst);
            Ok(())
        })
    }

    /// Features of image files: each decoded, cropped to its box when `crop_boxes` gives
    /// one (`[x1, y1, x2, y2]` in pixels, the revisited Oxford/Paris `bbx`), square bicubic
    /// resized to the side and normalised with [`Extractor::file_normalisation`]. Grey
    /// images are expanded to 3 channels for RGB models (RGB is averaged for grey models).
    pub fn features_of_files(
        &self,
        files: &[PathBuf],
        kind: FeatureKind,
        crop_boxes: Option<&[Option<[f64; 4]>]>,
        progress: bool,
    ) -> Result<Vec<f32>> {
        if let Some(b) = crop_boxes {
            assert_eq!(b.len(), files.len(), "one crop box (or None) per file");
        }
        let c = self.net.vit.in_chans;
        let norm = &self.files_norm;
        self.run(files.len(), kind, progress, "images", |i, s, dst| {
            let bbx = crop_boxes.and_then(|b| b[i]);
            let src = decode(&files[i], c, bbx)?;
            resize_normalise(&src, c, s, &norm.mean, &norm.std, dst);
            Ok(())
        })
    }

    /// Features of one epoch of the linear probe's training views (DINO's recipe):
    /// per image, a RandomResizedCrop(side, scale (0.08, 1), ratio (3/4, 4/3)) and a
    /// horizontal flip with probability 1/2, drawn from the stream
    /// `(seed, [epoch, index, 0x4C50], Crop)`, bicubic resize, the pack's mean and std.
    pub fn augmented_features(
        &self,
        pack: &Pack,
        kind: FeatureKind,
        seed: u64,
        epoch: usize,
    ) -> Result<Vec<f32>> {
        self.check_pack(pack)?;
        if kind == FeatureKind::MultiScaleCls {
            return Err(Error::bad_config("--feature", "multiscale features are for retrieval, not the linear probe; use last4 or cls+patchmean"));
        }
        let (h, w, c) = (pack.height(), pack.width(), pack.channels());
        let scale = Scale { lo: 0.08, hi: 1.0 };
        self.run(pack.len(), kind, false, "views", |i, s, dst| {
            let mut rng = Stream::new(seed, [epoch as u32, i as u32, 0x4C50], Purpose::Crop);
            let crop = sample_crop(&mut rng, h as u32, w as u32, scale, 0.5);
            ResizePlan::new(&crop, s, Interpolation::Bicubic).apply(pack.image(i), h, w, c, dst);
            normalise(dst, s, pack.mean(), pack.std());
            Ok(())
        })
    }

    /// The cache-key parts of `kind` features of `pack` under this extractor.
    pub fn pack_key(&self, pack: &Pack, kind: FeatureKind) -> Vec<(String, String)> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(pack.pixels());
        let labels: Vec<u8> = pack.labels().iter().flat_map(|l| l.to_le_bytes()).collect();
        crc.update(&labels);
        let path =
            std::fs::canonicalize(pack.origin()).unwrap_or_else(|_| pack.origin().to_path_buf());
        vec![
            ("checkpoint".into(), self.checkpoint_hash.clone()),
            ("kind".into(), kind.to_string()),
            ("side".into(), self.side.to_string()),
            ("pack".into(), path.display().to_string()),
            (
                "pack_content".into(),
                format!("{} images, crc32 {:08x}", pack.len(), crc.finalize()),
            ),
        ]
    }

    /// The cache-key parts of `kind` features of `files` (paths, sizes, modification
    /// times), crop boxes and normalisation under this extractor.
    pub fn files_key(
        &self,
        files: &[PathBuf],
        kind: FeatureKind,
        crop_boxes: Option<&[Option<[f64; 4]>]>,
    ) -> Vec<(String, String)> {
        let mut list = String::new();
        for (i, f) in files.iter().enumerate() {
            let meta = std::fs::metadata(f).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let bbx = crop_boxes.and_then(|b| b[i]);
            list.push_str(&format!("{}|{size}|{mtime}|{bbx:?}\n", f.display()));
        }
        vec![
            ("checkpoint".into(), self.checkpoint_hash.clone()),
            ("kind".into(), kind.to_string()),
            ("side".into(), self.side.to_string()),
            (
                "files".into(),
                format!("{} files, hash {}", files.len(), hash_hex(list.as_bytes())),
            ),
            (
                "normalisation".into(),
                format!("{:?} {:?}", self.files_norm.mean, self.files_norm.std),
            ),
        ]
    }
}

/// The whole of pack image `i` as a [`Source`] (no copy).
fn whole(pack: &Pack, i: usize) -> Source<'_> {
    Source {
        pixels: std::borrow::Cow::Borrowed(pack.image(i)),
        h: pack.height(),
        w: pack.width(),
        crop: CropRecord {
            top: 0,
            left: 0,
            height: pack.height() as u32,
            width: pack.width() as u32,
            flipped: false,
        },
    }
}

/// `(x - mean[c]) / std[c]` over each `side x side` plane of `dst`.
fn normalise(dst: &mut [f32], side: usize, mean: &[f32], std: &[f32]) {
    for (ch, plane) in dst.chunks_exact_mut(side * side).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        plane.iter_mut().for_each(|x| *x = (*x - m) / s);
    }
}

/// Bicubic resize of `src`'s crop box to `(c, side, side)` in [0, 1], then normalised.
fn resize_normalise(
    src: &Source,
    c: usize,
    side: usize,
    mean: &[f32],
    std: &[f32],
    dst: &mut [f32],
) {
    ResizePlan::new(&src.crop, side, Interpolation::Bicubic).apply(
        &src.pixels,
        src.h,
        src.w,
        c,
        dst,
    );
    normalise(dst, side, mean, std);
}

/// Decodes image file `path` to HWC bytes with `channels` channels, with the crop box of
/// `bbx` (`[x1, y1, x2, y2]`, clamped to the image; an empty box is an error).
fn decode(path: &Path, channels: usize, bbx: Option<[f64; 4]>) -> Result<Source<'static>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| {
            Error::bad_file(
                path,
                format!("cannot be decoded as an image ({e}); pass PNG or JPEG files"),
            )
        })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pixels = if channels == 3 {
        img.to_rgb8().into_raw()
    } else {
        img.to_luma8().into_raw()
    };
    let crop = match bbx {
        None => CropRecord {
            top: 0,
            left: 0,
            height: h as u32,
            width: w as u32,
            flipped: false,
        },
        Some([x1, y1, x2, y2]) => {
            let clamp = |v: f64, hi: usize| v.max(0.0).min(hi as f64);
            let (l, t) = (clamp(x1, w).floor() as u32, clamp(y1, h).floor() as u32);
            let (r, b) = (clamp(x2, w).ceil() as u32, clamp(y2, h).ceil() as u32);
            if !(x1.is_finite() && y1.is_finite() && x2.is_finite() && y2.is_finite())
                || r <= l
                || b <= t
            {
                return Err(Error::bad_file(
                    path,
                    format!("its query box {:?} is empty or outside the {w}x{h} image; fix the ground truth's bbx (x1, y1, x2, y2 in pixels)", [x1, y1, x2, y2]),
                ));
            }
            CropRecord {
                top: t,
                left: l,
                height: b - t,
                width: r - l,
                flipped: false,
            }
        }
    };
    Ok(Source {
        pixels: std::borrow::Cow::Owned(pixels),
        h,
        w,
        crop,
    })
}

fn progress_bar(len: usize, show: bool, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} {{per_sec}} eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}

/// A 64-bit FNV-1a hash of `bytes` with their length, as 24 hex digits: the identity of a
/// checkpoint file's contents in cache keys (stable across runs and builds, unlike std's
/// `DefaultHasher`).
pub fn hash_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", crc32fast::hash(bytes))
}

/// The on-disk feature cache: one `.npy` per key (rows = images) plus a JSON sidecar that
/// holds the key parts in clear. A key is a list of `(name, value)` parts (checkpoint
/// hash, data identity, kind, side); the file name is a hash of them. A file that cannot
/// be read, or whose sidecar disagrees, is recomputed with a warning.
pub mod cache {
    use std::path::Path;

    use super::hash_hex;
    use crate::error::{Error, Result};
    use crate::eval::npy;

    /// The features for `key_parts`: read from `cache_dir` if there, otherwise
    /// `compute()`d (a `(rows, cols)` row-major matrix) and stored. `cache_dir` is created
    /// when missing.
    pub fn cached<F>(
        cache_dir: &Path,
        key_parts: &[(String, String)],
        cols: usize,
        compute: F,
    ) -> Result<Vec<f32>>
    where
        F: FnOnce() -> Result<Vec<f32>>,
    {
        let text: String = key_parts
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        let name = format!("features-{}", hash_hex(text.as_bytes()));
        let data_path = cache_dir.join(format!("{name}.npy"));
        let meta_path = cache_dir.join(format!("{name}.json"));
        let key_json: serde_json::Map<String, serde_json::Value> = key_parts
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        if data_path.exists() {
            match read_hit(&data_path, &meta_path, &key_json, cols) {
                Ok(data) => return Ok(data),
                Err(why) => eprintln!(
                    "warning: feature cache {} is unusable ({why}); recomputing",
                    data_path.display()
                ),
            }
        }
        let data = compute()?;
        assert!(
            cols > 0 && data.len() % cols == 0,
            "computed features are not (rows, {cols})"
        );
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
        let tmp = cache_dir.join(format!(".{name}.npy.tmp-{}", std::process::id()));
        npy::write_matrix(&tmp, &data, data.len() / cols, cols)?;
        std::fs::rename(&tmp, &data_path).map_err(|e| Error::io(&data_path, e))?;
        let sidecar =
            serde_json::json!({ "key": key_json, "rows": data.len() / cols, "cols": cols });
        std::fs::write(
            &meta_path,
            serde_json::to_string_pretty(&sidecar).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&meta_path, e))?;
        Ok(data)
    }

    fn read_hit(
        data_path: &Path,
        meta_path: &Path,
        key: &serde_json::Map<String, serde_json::Value>,
        cols: usize,
    ) -> std::result::Result<Vec<f32>, String> {
        let meta: serde_json::Value = std::fs::read_to_string(meta_path)
            .map_err(|e| format!("sidecar {}: {e}", meta_path.display()))
            .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("sidecar: {e}")))?;
        if meta.get("key").and_then(|k| k.as_object()) != Some(key) {
            return Err("its sidecar names another key".into());
        }
        let (data, rows, c) = npy::read_matrix(data_path).map_err(|e| e.to_string())?;
        if c != cols || meta.get("rows").and_then(|r| r.as_u64()) != Some(rows as u64) {
            return Err(format!(
                "it holds {rows}x{c} features, not what its sidecar says"
            ));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embedded::{default_pack, Split};
    use crate::model::config::{Arch, HeadConfig};

    fn tiny() -> Extractor {
        let mut vit = Arch::Femto.vit(4, 1, 28);
        vit.depth = 3;
        let net = Network::new(
            vit,
            HeadConfig {
                layers: 2,
                hidden: 16,
                bottleneck: 8,
                out_dim: 16,
            },
        )
        .unwrap();
        let params = net.init(3);
        Extractor::from_parts(net, params, 28).unwrap()
    }

    /// The first `n` embedded test images as a pack of their own.
    fn small_pack(dir: &Path, n: usize) -> Pack {
        let src = default_pack(Split::Test).unwrap();
        let p = dir.join("small.pwpack");
        let mut w =
            crate::data::pack::PackWriter::create(&p, 28, 28, 1, src.class_names()).unwrap();
        for i in 0..n {
            w.push(src.image(i), src.label(i)).unwrap();
        }
        w.finish().unwrap();
        Pack::open(&p).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    #[test]
    fn kinds_parse_and_print() {
        for (s, k) in [
            ("cls", FeatureKind::Cls),
            ("last4", FeatureKind::LastCls(4)),
            ("last-n:2", FeatureKind::LastCls(2)),
            ("cls+patchmean", FeatureKind::ClsPatchMean),
            ("patchmean", FeatureKind::PatchMean),
            ("gem:4", FeatureKind::Gem(4.0)),
            ("cls+gem:3", FeatureKind::ClsGem(3.0)),
            ("multiscale", FeatureKind::MultiScaleCls),
        ] {
            assert_eq!(s.parse::<FeatureKind>().unwrap(), k);
            assert_eq!(k.to_string().parse::<FeatureKind>().unwrap(), k);
        }
        for bad in ["last0", "gem:-1", "clss", "last-n:x"] {
            let e = bad.parse::<FeatureKind>().unwrap_err().to_string();
            assert!(e.contains("--feature") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn kinds_agree_with_each_other_and_with_the_trainer() {
        let dir = tempfile::tempdir().unwrap();
        let ex = tiny();
        let n = 12;
        let pack = small_pack(dir.path(), n);
        let d = ex.network().vit.embed_dim;
        let sub = |k: FeatureKind| ex.features_of_pack(&pack, k, false).unwrap();
        let cls = sub(FeatureKind::Cls);
        // The trainer's own extraction of the same images.
        let trainer = crate::train::features::cls_features(ex.network(), ex.params(), &pack, 28);
        assert!(close(&cls, &trainer, 1e-6));
        // LastCls(1) is Cls: final_norm(block_output(last)) is the forward's output.
        assert!(close(&sub(FeatureKind::LastCls(1)), &cls, 1e-5));
        // LastCls(3): its last third is Cls.
        let l3 = sub(FeatureKind::LastCls(3));
        for b in 0..n {
            assert!(close(
                &l3[b * 3 * d + 2 * d..(b + 1) * 3 * d],
                &cls[b * d..(b + 1) * d],
                1e-5
            ));
        }
        // ClsPatchMean = [Cls, PatchMean]; PatchMean is the mean of the output tokens.
        let cpm = sub(FeatureKind::ClsPatchMean);
        let pm = sub(FeatureKind::PatchMean);
        for b in 0..n {
            assert_eq!(&cpm[b * 2 * d..b * 2 * d + d], &cls[b * d..(b + 1) * d]);
            assert_eq!(
                &cpm[b * 2 * d + d..(b + 1) * 2 * d],
                &pm[b * d..(b + 1) * d]
            );
        }
        // PatchMean against a naive mean of the forward's tokens for image 0.
        let x = ex.pack_input(&pack, 0).unwrap();
        let mut acts = BackboneActs::default();
        ex.network()
            .backbone_forward(ex.params(), &x, 1, 28, None, &mut acts);
        let t = acts.tokens;
        let naive: Vec<f32> = (0..d)
            .map(|j| (1..t).map(|k| acts.out[k * d + j]).sum::<f32>() / (t - 1) as f32)
            .collect();
        assert!(close(&pm[..d], &naive, 1e-5));
        // Multi-scale: unit rows.
        let ms = sub(FeatureKind::MultiScaleCls);
        for row in ms.chunks_exact(d) {
            assert!((row.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
        }
        assert_eq!(ex.multiscale_sides(), [28, 20, 16]);
        // Too many blocks: a clear error.
        let e = ex
            .features_of_pack(&pack, FeatureKind::LastCls(9), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("last-n:9") && e.contains("3"), "{e}");
    }

    #[test]
    fn cache_hits_return_the_same_features_without_recomputing() {
        let dir = tempfile::tempdir().unwrap();
        let key = vec![("a".to_string(), "1".to_string())];
        let calls = std::cell::Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            Ok(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        };
        let a = cache::cached(dir.path(), &key, 3, compute).unwrap();
        let b = cache::cached(dir.path(), &key, 3, compute).unwrap();
        assert_eq!((a.clone(), calls.get()), (b, 1));
        // Another key computes again.
        let other = vec![("a".to_string(), "2".to_string())];
        cache::cached(dir.path(), &other, 3, compute).unwrap();
        assert_eq!(calls.get(), 2);
        // A corrupt file is recomputed (and rewritten).
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "npy") {
                std::fs::write(&p, b"garbage").unwrap();
            }
        }
        let c = cache::cached(dir.path(), &key, 3, compute).unwrap();
        assert_eq!((c, calls.get()), (a.clone(), 3));
        let d = cache::cached(dir.path(), &key, 3, compute).unwrap();
        assert_eq!((d, calls.get()), (a, 3));
    }

    #[test]
    fn files_resize_crop_and_expand_grey() {
        let dir = tempfile::tempdir().unwrap();
        let ex = tiny();
        let pack = default_pack(Split::Test).unwrap();
        // Pack image 0 written as a PNG: with the pack's normalisation it gives the pack's features.
        let img = image::GrayImage::from_raw(28, 28, pack.image(0).to_vec()).unwrap();
        let p0 = dir.path().join("a.png");
        img.save(&p0).unwrap();
        let mut ex2 = tiny();
        ex2.set_file_normalisation(pack.mean(), pack.std()).unwrap();
        let from_file = ex2
            .features_of_files(std::slice::from_ref(&p0), FeatureKind::Cls, None, false)
            .unwrap();
        let from_pack = ex
            .run(1, FeatureKind::Cls, false, "t", |i, s, dst| {
                resize_normalise(&whole(&pack, i), 1, s, pack.mean(), pack.std(), dst);
                Ok(())
            })
            .unwrap();
        assert!(close(&from_file, &from_pack, 1e-6));
        // A box that covers the whole image changes nothing; a 56x56 image cropped to its
        // top-left quarter equals the quarter saved on its own.
        let boxed = ex2
            .features_of_files(
                std::slice::from_ref(&p0),
                FeatureKind::Cls,
                Some(&[Some([0.0, 0.0, 28.0, 28.0])]),
                false,
            )
            .unwrap();
        assert_eq!(boxed, from_file);
        let mut big = image::GrayImage::new(56, 56);
        for (x, y, px) in big.enumerate_pixels_mut() {
            *px = image::Luma([((x * 7 + y * 3) % 256) as u8]);
        }
        let pb = dir.path().join("big.png");
        big.save(&pb).unwrap();
        let quarter = image::imageops::crop_imm(&big, 0, 0, 28, 28).to_image();
        let pq = dir.path().join("q.png");
        quarter.save(&pq).unwrap();
        let a = ex
            .features_of_files(
                std::slice::from_ref(&pb),
                FeatureKind::Gem(4.0),
                Some(&[Some([0.0, 0.0, 28.0, 28.0])]),
                false,
            )
            .unwrap();
        let b = ex
            .features_of_files(&[pq], FeatureKind::Gem(4.0), None, false)
            .unwrap();
        assert_eq!(a, b);
        // An RGB file into the grey model is averaged to grey: an RGB image with equal
        // channels gives the grey image's features.
        let rgb = image::RgbImage::from_fn(28, 28, |x, y| {
            let v = pack.image(0)[(y * 28 + x) as usize];
            image::Rgb([v, v, v])
        });
        let pr = dir.path().join("rgb.png");
        rgb.save(&pr).unwrap();
        let r = ex2
            .features_of_files(&[pr], FeatureKind::Cls, None, false)
            .unwrap();
        assert!(close(&r, &from_file, 1e-6));
        // Bad inputs.
        let e = ex
            .features_of_files(
                std::slice::from_ref(&pb),
                FeatureKind::Cls,
                Some(&[Some([60.0, 0.0, 70.0, 5.0])]),
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("big.png") && e.contains("box"), "{e}");
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not an image").unwrap();
        let e = ex
            .features_of_files(&[junk], FeatureKind::Cls, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("junk.png"), "{e}");
    }

    #[test]
    fn augmented_views_are_seeded_and_differ_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let ex = tiny();
        let pack = small_pack(dir.path(), 5);
        let a = ex
            .augmented_features(&pack, FeatureKind::Cls, 1, 0)
            .unwrap();
        let b = ex
            .augmented_features(&pack, FeatureKind::Cls, 1, 0)
            .unwrap();
        let c = ex
            .augmented_features(&pack, FeatureKind::Cls, 1, 1)
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), pack.len() * 64);
    }

    #[test]
    fn checkpoints_load_their_teacher_and_refuse_other_architectures() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TrainConfig::default();
        cfg.model.depth = Some(3);
        cfg.head = HeadConfig {
            layers: 2,
            hidden: 16,
            bottleneck: 8,
            out_dim: 16,
        };
        let ex = tiny();
        let net = ex.network();
        let n = net.table.total();
        let teacher = ex.params().to_vec();
        let state = checkpoint::TrainingState {
            student: vec![0.5; n],
            teacher: teacher.clone(),
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            adam_step: 0,
            adam_step_last: 0,
            center: vec![0.0; 50 * 16],
            center_rows: 50,
            step: 0,
            epoch: 0,
        };
        let p = dir.path().join("ckpt.safetensors");
        let json = serde_json::to_string(&cfg).unwrap();
        checkpoint::save(&p, &net.table, 16, &state, &json).unwrap();
        let back = Extractor::from_checkpoint(&p).unwrap();
        assert_eq!(
            back.network().vit,
            VitConfig {
                drop_path: 0.0,
                ..net.vit.clone()
            }
        );
        assert_eq!(back.side(), 28);
        for info in net
            .table
            .tensors()
            .iter()
            .filter(|t| !t.name.starts_with("head."))
        {
            assert_eq!(
                back.params()[info.range()],
                teacher[info.range()],
                "{}",
                info.name
            );
        }
        // The stored configuration says another width than the tensors.
        cfg.model.embed_dim = Some(96);
        let json = serde_json::to_string(&cfg).unwrap();
        checkpoint::save(&p, &net.table, 16, &state, &json).unwrap();
        let e = Extractor::from_checkpoint(&p).err().unwrap().to_string();
        assert!(
            e.contains("ckpt.safetensors") && e.contains("another architecture"),
            "{e}"
        );
        // Not a checkpoint at all.
        std::fs::write(&p, b"nope").unwrap();
        let e = Extractor::from_checkpoint(&p).err().unwrap().to_string();
        assert!(
            e.contains("ckpt.safetensors") && e.contains("safetensors"),
            "{e}"
        );
    }
}
