//! timm interoperability: the backbone out as a timm state dict, and a timm state dict in
//! as an initialisation (docs/interop.md).
//!
//! - [`read_checkpoint`] takes the teacher (or student) backbone of a verified training
//!   checkpoint; [`encode_backbone`] writes it as safetensors with timm's key names only
//!   (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`; no head),
//!   which `timm.models.vision_transformer.VisionTransformer(**kwargs, num_classes=0)`
//!   loads with `strict=True`. The metadata says which timm model it matches
//!   ([`TimmSpec`]): the keyword arguments as JSON and each one as its own key.
//! - [`read_timm`] reads a timm ViT state dict (safetensors) for a given network: every
//!   backbone tensor must be there with this network's shape (a missing key or a wrong
//!   shape is refused, naming the key and both shapes); classifier keys (`head.*`,
//!   `fc_norm.*`, ...) and a training checkpoint's extra tensors are ignored with a note;
//!   a key that would change what the backbone computes (layer scale, register tokens,
//!   more blocks than the model has) is refused. A position embedding for another grid is
//!   resampled bicubically to the model's reference grid, with a note.
//!   [`init_from_timm`] puts it into the student and teacher of a fresh run (`train
//!   --init`, `model.init`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::checkpoint;
use crate::cpu::patch_embed::pos_embed_forward;
use crate::error::{Error, Result};
use crate::model::config::VitConfig;
use crate::model::params::TensorInfo;
use crate::model::vit::{BackboneActs, Network};
use crate::train::TrainConfig;

/// Written into an exported backbone's metadata as `format`.
pub const FORMAT: &str = "pwself-engine-timm-backbone";
/// Version of that format.
pub const VERSION: u32 = 1;

/// Which backbone of a checkpoint to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The EMA teacher (what DINO evaluates and releases).
    Teacher,
    /// The student.
    Student,
}

impl Which {
    /// `teacher` or `student`.
    pub fn name(self) -> &'static str {
        match self {
            Which::Teacher => "teacher",
            Which::Student => "student",
        }
    }
    /// The prefix of this backbone's tensors in a training checkpoint.
    fn prefix(self) -> &'static str {
        match self {
            Which::Teacher => "",
            Which::Student => "student.",
        }
    }
}

/// Whether `info` is a backbone tensor (everything but the DINO head).
pub fn is_backbone(info: &TensorInfo) -> bool {
    !info.name.starts_with("head.")
}

/// One backbone read from a training checkpoint.
#[derive(Clone, Debug)]
pub struct CheckpointBackbone {
    /// The network (its table's backbone tensors are the ones filled in `params`).
    pub net: Network,
    /// Parameters in `net.table`'s layout; the head's entries are 0.
    pub params: Vec<f32>,
    /// The training configuration stored in the checkpoint.
    pub config: TrainConfig,
    /// The training step the checkpoint was written at.
    pub step: Option<u64>,
    /// The file read (a run directory's `checkpoint.safetensors`).
    pub path: PathBuf,
}

/// The checkpoint file of `path`: the path itself, or `checkpoint.safetensors` inside a
/// run directory.
pub fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(checkpoint::LATEST)
    } else {
        path.to_path_buf()
    }
}

/// Little-endian tensor bytes as f32, from F32, F16, BF16 or F64 (`None` for other
/// dtypes).
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// Reads the `which` backbone of a `pwself-engine train` checkpoint (a file, or a run
/// directory's `checkpoint.safetensors`), checking its checksum first: a damaged file is
/// refused. The architecture comes from the tensors' shapes and the head count from the
/// stored configuration.
pub fn read_checkpoint(path: &Path, which: Which) -> Result<CheckpointBackbone> {
    let path = checkpoint_file(path);
    let bytes = fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::bad_file(
            &path,
            "does not exist: pass a checkpoint written by `pwself-engine train` (a \
             checkpoint*.safetensors file or its run directory)",
        ),
        _ => Error::io(&path, e),
    })?;
    const DAMAGED: &str = "export an older checkpoint-step*.safetensors of the run instead";
    checkpoint::verify(&path, &bytes).map_err(|e| match e {
        // verify's reason ends with the fix for --resume; give export's instead.
        Error::BadFile { reason, .. } => {
            let what = reason
                .split("resume from the run directory")
                .next()
                .unwrap_or_default()
                .trim_end_matches([' ', ';', ':']);
            Error::bad_file(&path, format!("{what}; {DAMAGED}"))
        }
        other => other,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::bad_file(
            &path,
            format!("not a readable safetensors file ({e}): it is truncated or not a checkpoint; {DAMAGED}"),
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(&path, format!("bad header ({e}); {DAMAGED}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(checkpoint::FORMAT) {
        return Err(Error::bad_file(
            &path,
            "not a pwself-engine training checkpoint (no `format` metadata): pass the \
             checkpoint.safetensors (or run directory) written by `pwself-engine train`",
        ));
    }
    let config: TrainConfig = match meta.get("config") {
        Some(text) => serde_json::from_str(text).map_err(|e| {
            Error::bad_file(
                &path,
                format!("its stored training configuration cannot be read ({e}); it was written by another pwself-engine version"),
            )
        })?,
        None => {
            return Err(Error::bad_file(
                &path,
                "has no stored training configuration (`config` metadata); it was not written by `pwself-engine train`",
            ))
        }
    };
    let pre = which.prefix();
    let shape = |name: &str| -> Result<Vec<usize>> {
        st.tensor(&format!("{pre}{name}"))
            .map(|t| t.shape().to_vec())
            .map_err(|_| {
                Error::bad_file(
                    &path,
                    format!(
                        "has no tensor `{pre}{name}`: it is not a ViT checkpoint of this engine"
                    ),
                )
            })
    };
    let pe = shape("patch_embed.proj.weight")?;
    let pos = shape("pos_embed")?;
    let fc1 = shape("blocks.0.mlp.fc1.weight")?;
    if pe.len() != 4 || pe[2] != pe[3] || pos.len() != 3 || fc1.len() != 2 {
        return Err(Error::bad_file(
            &path,
            format!("tensor shapes patch_embed {pe:?}, pos_embed {pos:?} are not a ViT's; it is from another architecture"),
        ));
    }
    let (d, c, p) = (pe[0], pe[1], pe[2]);
    let grid = (pos[1].saturating_sub(1) as f64).sqrt().round() as usize;
    if grid * grid + 1 != pos[1] || pos[2] != d {
        return Err(Error::bad_file(
            &path,
            format!("pos_embed is {pos:?}, not (1, 1 + g^2, {d}); the checkpoint is from another architecture"),
        ));
    }
    let depth = (0..)
        .take_while(|i| st.tensor(&format!("{pre}blocks.{i}.norm1.weight")).is_ok())
        .count();
    let (arch_d, _, arch_heads) = config.model.arch.dims();
    let heads = config.model.heads.unwrap_or(arch_heads);
    if config.model.embed_dim.unwrap_or(arch_d) != d {
        return Err(Error::bad_file(
            &path,
            format!(
                "its tensors are {d} wide but its stored configuration says {}: the file was \
                 assembled from another architecture; export the checkpoint its run wrote",
                config.model.embed_dim.unwrap_or(arch_d)
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
    let net = Network::new(vit, config.head.clone())
        .map_err(|e| Error::bad_file(&path, format!("its architecture is not valid: {e}")))?;
    let mut params = vec![0.0f32; net.table.total()];
    for info in net.table.tensors().iter().filter(|t| is_backbone(t)) {
        let name = format!("{pre}{}", info.name);
        let t = st.tensor(&name).map_err(|_| {
            Error::bad_file(
                &path,
                format!("has no tensor `{name}`: the checkpoint is from another architecture"),
            )
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != info.shape.as_slice() {
            return Err(Error::bad_file(
                &path,
                format!(
                    "tensor `{name}` is {:?} {:?} but this ViT needs F32 {:?}: the checkpoint is from another architecture",
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
    Ok(CheckpointBackbone {
        net,
        params,
        config,
        step: meta.get("step").and_then(|s| s.parse().ok()),
        path,
    })
}

/// The timm model a backbone matches: `VisionTransformer`'s keyword arguments, and the
/// registered model name when one has these sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct TimmSpec {
    /// `img_size`: the reference grid times the patch.
    pub img_size: usize,
    /// `patch_size`.
    pub patch_size: usize,
    /// `in_chans`.
    pub in_chans: usize,
    /// `embed_dim`.
    pub embed_dim: usize,
    /// `depth`.
    pub depth: usize,
    /// `num_heads`.
    pub num_heads: usize,
    /// `mlp_ratio`.
    pub mlp_ratio: usize,
    /// `vit_{tiny,small,base,large}_patch{P}_224` when width, depth, heads and patch are
    /// one of timm's registered ViTs (`img_size`/`in_chans` are then passed as overrides).
    pub model_name: Option<String>,
}

impl TimmSpec {
    /// The timm model of `vit`.
    pub fn of(vit: &VitConfig) -> TimmSpec {
        let size = match (vit.embed_dim, vit.depth, vit.heads) {
            (192, 12, 3) => Some(("tiny", &[16][..])),
            (384, 12, 6) => Some(("small", &[8, 16, 32][..])),
            (768, 12, 12) => Some(("base", &[8, 16, 32][..])),
            (1024, 24, 16) => Some(("large", &[16, 32][..])),
            _ => None,
        };
        let model_name = size
            .filter(|(_, patches)| patches.contains(&vit.patch) && vit.mlp_ratio == 4)
            .map(|(s, _)| format!("vit_{s}_patch{}_224", vit.patch));
        TimmSpec {
            img_size: vit.ref_grid * vit.patch,
            patch_size: vit.patch,
            in_chans: vit.in_chans,
            embed_dim: vit.embed_dim,
            depth: vit.depth,
            num_heads: vit.heads,
            mlp_ratio: vit.mlp_ratio,
            model_name,
        }
    }

    /// `VisionTransformer`'s keyword arguments as a JSON object.
    pub fn kwargs_json(&self) -> serde_json::Value {
        serde_json::json!({
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio as f64,
            "qkv_bias": true,
            "class_token": true,
            "global_pool": "token",
            "num_classes": 0,
        })
    }

    /// The Python expression that builds this model in timm.
    pub fn python_constructor(&self) -> String {
        match &self.model_name {
            Some(name) => {
                let mut extra = String::new();
                if self.img_size != 224 {
                    extra.push_str(&format!(", img_size={}", self.img_size));
                }
                if self.in_chans != 3 {
                    extra.push_str(&format!(", in_chans={}", self.in_chans));
                }
                format!("timm.create_model('{name}', num_classes=0{extra})")
            }
            None => format!(
                "VisionTransformer(img_size={}, patch_size={}, in_chans={}, embed_dim={}, depth={}, \
                 num_heads={}, mlp_ratio={}.0, qkv_bias=True, class_token=True, global_pool='token', \
                 num_classes=0)",
                self.img_size,
                self.patch_size,
                self.in_chans,
                self.embed_dim,
                self.depth,
                self.num_heads,
                self.mlp_ratio
            ),
        }
    }

    /// A ready-to-paste Python snippet that loads the exported file `path` into timm.
    pub fn python_snippet(&self, path: &Path) -> String {
        format!(
            "import timm, torch\n\
             from safetensors.torch import load_file\n\
             from timm.models.vision_transformer import VisionTransformer\n\
             model = {}\n\
             model.load_state_dict(load_file({:?}), strict=True)\n\
             model.eval()\n\
             # x: (N, {c}, {s}, {s}) float32, normalised like the training pack (its mean/std)\n\
             # cls = model.forward_features(x)[:, 0]   # the final-norm CLS, as the engine's features\n",
            self.python_constructor(),
            path.display().to_string(),
            c = self.in_chans,
            s = self.img_size,
        )
    }
}

/// The safetensors bytes of the backbone of `net` in `params`: timm's names only, in
/// layout order, with metadata `format`, `format_version`, the [`TimmSpec`] (each keyword
/// argument as a key, `timm_kwargs` as JSON, `timm_model` = the registered name or
/// `custom`) and `extra` (e.g. the source checkpoint and step). `path` only names the file
/// in errors.
pub fn encode_backbone(
    path: &Path,
    net: &Network,
    params: &[f32],
    extra: &[(&str, String)],
) -> Result<Vec<u8>> {
    let spec = TimmSpec::of(&net.vit);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = net
        .table
        .tensors()
        .iter()
        .filter(|t| is_backbone(t))
        .map(|t| {
            let bytes = params[t.range()]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::bad_file(path, format!("cannot encode tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("format_version", VERSION.to_string()),
        (
            "timm_model",
            spec.model_name.clone().unwrap_or_else(|| "custom".into()),
        ),
        ("timm_kwargs", spec.kwargs_json().to_string()),
        ("img_size", spec.img_size.to_string()),
        ("patch_size", spec.patch_size.to_string()),
        ("in_chans", spec.in_chans.to_string()),
        ("embed_dim", spec.embed_dim.to_string()),
        ("depth", spec.depth.to_string()),
        ("num_heads", spec.num_heads.to_string()),
        ("mlp_ratio", spec.mlp_ratio.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        meta.insert((*k).to_string(), v.clone());
    }
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::bad_file(path, format!("cannot encode the backbone: {e}")))
}

/// The final-norm CLS token `(n, D)` of `n` inputs `(n, C, side, side)`: the engine's
/// `cls` feature.
pub fn cls_features(net: &Network, params: &[f32], x: &[f32], n: usize, side: usize) -> Vec<f32> {
    let d = net.vit.embed_dim;
    let mut acts = BackboneActs::default();
    net.backbone_forward(params, x, n, side, None, &mut acts);
    let t = acts.tokens;
    (0..n)
        .flat_map(|b| acts.out[b * t * d..b * t * d + d].iter().copied())
        .collect()
}

/// A timm state dict read for a network: the backbone's values and what was noted.
#[derive(Clone, Debug)]
pub struct TimmBackbone {
    /// Values in the network table's layout; only backbone entries are filled.
    pub values: Vec<f32>,
    /// Notes for the user (ignored keys, a resampled position embedding).
    pub notes: Vec<String>,
}

/// Keys a timm (or engine) file may hold that the backbone does not use: classifier and
/// pooling heads, and a training checkpoint's other tensors.
const IGNORED_PREFIXES: [&str; 9] = [
    "head.",
    "head_dist.",
    "fc_norm.",
    "pre_logits.",
    "attn_pool.",
    "dino_head.",
    "student.",
    "optim.",
    "loss.",
];

/// Reads the timm ViT state dict `path` (safetensors, timm's key names) for `net`'s
/// backbone. Refuses a missing backbone key or a wrong shape (naming the key, the file's
/// shape and the model's), and a key that would change what the backbone computes;
/// ignores classifier keys with a note; resamples a position embedding of another grid.
pub fn read_timm(path: &Path, net: &Network) -> Result<TimmBackbone> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::bad_file(
            path,
            "does not exist: pass a timm ViT state dict saved as safetensors \
             (safetensors.torch.save_file(model.state_dict(), PATH))",
        ),
        _ => Error::io(path, e),
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "not a readable safetensors file ({e}): save the timm model with \
                 safetensors.torch.save_file(model.state_dict(), PATH)"
            ),
        )
    })?;
    let v = &net.vit;
    let arch = format!(
        "embed_dim {}, depth {}, heads {}, patch {}, in_chans {}, mlp_ratio {}, grid {}",
        v.embed_dim, v.depth, v.heads, v.patch, v.in_chans, v.mlp_ratio, v.ref_grid
    );
    let fix =
        "set --arch/--patch/--view-sides (or model.embed_dim, model.depth, model.heads) to the \
               file's architecture";
    let mut values = vec![0.0f32; net.table.total()];
    let mut notes = Vec::new();
    for info in net.table.tensors().iter().filter(|t| is_backbone(t)) {
        let name = info.name.as_str();
        let t = st.tensor(name).map_err(|_| {
            Error::bad_file(
                path,
                format!(
                    "has no tensor `{name}` (the model needs it, shape {:?}; model: {arch}): \
                     it is not a timm ViT of this architecture; {fix}",
                    info.shape
                ),
            )
        })?;
        let data = to_f32(t.dtype(), t.data()).ok_or_else(|| {
            Error::bad_file(
                path,
                format!(
                    "tensor `{name}` is {:?}: only F32, F16, BF16 and F64 are read; save the state dict in float32",
                    t.dtype()
                ),
            )
        })?;
        let dst = &mut values[info.range()];
        if t.shape() == info.shape.as_slice() {
            dst.copy_from_slice(&data);
            continue;
        }
        // A position embedding of another grid with the right width: resample it.
        let d = v.embed_dim;
        let s = t.shape();
        if name == "pos_embed" && s.len() == 3 && s[0] == 1 && s[2] == d {
            let g = (s[1].saturating_sub(1) as f64).sqrt().round() as usize;
            if g > 0 && g * g + 1 == s[1] {
                pos_embed_forward(dst, &data, v.ref_grid, g, d);
                notes.push(format!(
                    "{}: pos_embed is for a {g}x{g} patch grid, the model's is {r}x{r}: resampled \
                     bicubically (as timm's resample_abs_pos_embed without antialiasing)",
                    path.display(),
                    r = v.ref_grid
                ));
                continue;
            }
        }
        return Err(Error::bad_file(
            path,
            format!(
                "tensor `{name}` is {:?} in the file but the model needs {:?} (model: {arch}); {fix}",
                s, info.shape
            ),
        ));
    }
    let mut ignored: Vec<String> = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        if net.table.get(&name).is_some_and(is_backbone) {
            continue;
        }
        if IGNORED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            ignored.push(name);
            continue;
        }
        let block = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let why = match block {
            Some(i) if i >= v.depth => format!(
                "the file has block {i} but the model has {} blocks; set model.depth (or --arch) to the file's depth",
                v.depth
            ),
            _ => "this engine's ViT has no such tensor (layer scale, register or distillation \
                  tokens, qk-norm and pre-norm change what the backbone computes); export a plain \
                  timm ViT (class token, qkv bias, no layer scale)"
                .to_string(),
        };
        return Err(Error::bad_file(path, format!("tensor `{name}`: {why}")));
    }
    if !ignored.is_empty() {
        let shown: Vec<&str> = ignored.iter().take(4).map(String::as_str).collect();
        notes.push(format!(
            "{}: ignored {} tensor(s) the backbone does not use ({}{})",
            path.display(),
            ignored.len(),
            shown.join(", "),
            if ignored.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    Ok(TimmBackbone { values, notes })
}

/// Copies the backbone entries of `src` (a [`TimmBackbone::values`]) into `dst` (same
/// layout); the head's entries of `dst` are left as they are.
pub fn copy_backbone(net: &Network, src: &[f32], dst: &mut [f32]) {
    for info in net.table.tensors().iter().filter(|t| is_backbone(t)) {
        dst[info.range()].copy_from_slice(&src[info.range()]);
    }
}

/// Initialises the backbones of `student` and `teacher` from the timm state dict `path`
/// (`train --init`); the DINO head keeps its fresh initialisation. Returns notes for the
/// user.
pub fn init_from_timm(
    path: &Path,
    net: &Network,
    student: &mut [f32],
    teacher: &mut [f32],
) -> Result<Vec<String>> {
    let b = read_timm(path, net)?;
    copy_backbone(net, &b.values, student);
    copy_backbone(net, &b.values, teacher);
    Ok(b.notes)
}
