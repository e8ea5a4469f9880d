//! Training checkpoints: safetensors files written atomically (temporary file, fsync,
//! rename, directory fsync), so a crash leaves either the old checkpoint or the new one.
//!
//! Names: the teacher backbone under timm's plain names (`cls_token`, `pos_embed`,
//! `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ..., `norm.bias`), so
//! `timm.create_model("vit_tiny_patch16_224", num_classes=0).load_state_dict(sd, strict=False)`
//! takes it as it is; the teacher's DINO head as `dino_head.*` (with `weight_g` = 1 as
//! DINO stores it); the student as `student.<name>`; AdamW's moments as
//! `optim.exp_avg.<name>` / `optim.exp_avg_sq.<name>`; the per-position teacher center as
//! `loss.center` `(1, T, K)`. The metadata holds the format version, the step, the epoch,
//! AdamW's step count and the training configuration (JSON). All random draws are
//! counter-based, so `(seed, step)` is the whole RNG state.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::params::ParamTable;

/// Written into every checkpoint's metadata as `format`.
pub const FORMAT: &str = "pwself-engine-checkpoint";
/// Current checkpoint format version.
pub const VERSION: u32 = 1;

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState {
    /// Student parameters (flat buffer, the table's layout).
    pub student: Vec<f32>,
    /// Teacher parameters.
    pub teacher: Vec<f32>,
    /// AdamW first moment.
    pub exp_avg: Vec<f32>,
    /// AdamW second moment.
    pub exp_avg_sq: Vec<f32>,
    /// AdamW steps taken (all tensors but the head's last layer).
    pub adam_step: u64,
    /// AdamW steps taken by the head's last layer (fewer: it is frozen at first).
    pub adam_step_last: u64,
    /// Teacher center, `(center_rows, K)`.
    pub center: Vec<f32>,
    /// Token positions of the center (1 + global grid^2).
    pub center_rows: usize,
    /// Training steps done (the next batch index).
    pub step: u64,
    /// Epoch of the next step.
    pub epoch: u64,
}

fn teacher_name(name: &str) -> String {
    match name.strip_prefix("head.") {
        Some(rest) => format!("dino_head.{rest}"),
        None => name.to_string(),
    }
}

fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `state` to `path` atomically. `config_json` is stored in the metadata.
pub fn save(
    path: &Path,
    table: &ParamTable,
    head_out_dim: usize,
    state: &TrainingState,
    config_json: &str,
) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in table.tensors() {
        let r = t.range();
        tensors.push((
            teacher_name(&t.name),
            t.shape.clone(),
            to_bytes(&state.teacher[r.clone()]),
        ));
        tensors.push((
            format!("student.{}", t.name),
            t.shape.clone(),
            to_bytes(&state.student[r.clone()]),
        ));
        tensors.push((
            format!("optim.exp_avg.{}", t.name),
            t.shape.clone(),
            to_bytes(&state.exp_avg[r.clone()]),
        ));
        tensors.push((
            format!("optim.exp_avg_sq.{}", t.name),
            t.shape.clone(),
            to_bytes(&state.exp_avg_sq[r]),
        ));
    }
    tensors.push((
        "dino_head.last_layer.weight_g".into(),
        vec![head_out_dim, 1],
        to_bytes(&vec![1.0; head_out_dim]),
    ));
    let k = state.center.len() / state.center_rows.max(1);
    tensors.push((
        "loss.center".into(),
        vec![1, state.center_rows, k],
        to_bytes(&state.center),
    ));
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::bad_file(path, format!("cannot encode tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("format_version", VERSION.to_string()),
        ("step", state.step.to_string()),
        ("epoch", state.epoch.to_string()),
        ("adam_step", state.adam_step.to_string()),
        ("adam_step_last_layer", state.adam_step_last.to_string()),
        ("config", config_json.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::bad_file(path, format!("cannot encode the checkpoint: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it over `path`
/// and fsyncs the directory. On failure the temporary file is removed and `path` is
/// untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            d.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Reads a checkpoint written by [`save`] for a network with `table`'s layout and a
/// center of `center_rows x k`. Returns the state and the stored configuration JSON.
pub fn load(
    path: &Path,
    table: &ParamTable,
    center_rows: usize,
    k: usize,
) -> Result<(TrainingState, String)> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!("not a readable safetensors file ({e}): it is truncated or not a checkpoint"),
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("bad header: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::bad_file(
            path,
            "not a pwself-engine training checkpoint (no `format` metadata)",
        ));
    }
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version > VERSION {
        return Err(Error::bad_file(
            path,
            format!("checkpoint format version {version} is newer than this pwself-engine reads ({VERSION}); upgrade"),
        ));
    }
    let num = |key: &str| -> Result<u64> {
        meta.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
            Error::bad_file(path, format!("metadata `{key}` is missing or not a number"))
        })
    };
    let config = meta.get("config").cloned().unwrap_or_default();
    let read = |name: &str, shape: &[usize], dst: &mut [f32]| -> Result<()> {
        let t = st.tensor(name).map_err(|_| {
            Error::bad_file(
                path,
                format!("has no tensor `{name}`: the checkpoint is from another architecture; resume with the settings it was trained with"),
            )
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `{name}` is {:?} {:?} but this model needs F32 {:?}: the checkpoint is from another \
                     architecture; use the model settings it was trained with (stored config: {config}), or start \
                     without --resume",
                    t.dtype(),
                    t.shape(),
                    shape
                ),
            ));
        }
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    };
    let n = table.total();
    let mut s = TrainingState {
        student: vec![0.0; n],
        teacher: vec![0.0; n],
        exp_avg: vec![0.0; n],
        exp_avg_sq: vec![0.0; n],
        adam_step: num("adam_step")?,
        adam_step_last: num("adam_step_last_layer")?,
        center: vec![0.0; center_rows * k],
        center_rows,
        step: num("step")?,
        epoch: num("epoch")?,
    };
    for t in table.tensors() {
        let r = t.range();
        read(&teacher_name(&t.name), &t.shape, &mut s.teacher[r.clone()])?;
        read(
            &format!("student.{}", t.name),
            &t.shape,
            &mut s.student[r.clone()],
        )?;
        read(
            &format!("optim.exp_avg.{}", t.name),
            &t.shape,
            &mut s.exp_avg[r.clone()],
        )?;
        read(
            &format!("optim.exp_avg_sq.{}", t.name),
            &t.shape,
            &mut s.exp_avg_sq[r],
        )?;
    }
    read("loss.center", &[1, center_rows, k], &mut s.center)?;
    Ok((s, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ParamTable {
        let mut t = ParamTable::new();
        t.push("cls_token", &[1, 1, 4]);
        t.push("blocks.0.attn.qkv.weight", &[12, 4]);
        t.push("head.last_layer.weight_v", &[5, 3]);
        t
    }

    fn state(t: &ParamTable) -> TrainingState {
        let n = t.total();
        let f = |k: f32| (0..n).map(|i| i as f32 * k).collect::<Vec<f32>>();
        TrainingState {
            student: f(1.0),
            teacher: f(2.0),
            exp_avg: f(3.0),
            exp_avg_sq: f(4.0),
            adam_step: 7,
            adam_step_last: 5,
            center: (0..10).map(|i| i as f32).collect(),
            center_rows: 2,
            step: 12,
            epoch: 1,
        }
    }

    #[test]
    fn round_trip_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt.safetensors");
        let t = table();
        let s = state(&t);
        save(&p, &t, 5, &s, "{\"x\":1}").unwrap();
        let (back, cfg) = load(&p, &t, 2, 5).unwrap();
        // Padding between tensors is not stored; compare tensor by tensor.
        for info in t.tensors() {
            assert_eq!(back.student[info.range()], s.student[info.range()]);
            assert_eq!(back.teacher[info.range()], s.teacher[info.range()]);
            assert_eq!(back.exp_avg_sq[info.range()], s.exp_avg_sq[info.range()]);
        }
        assert_eq!(
            (back.step, back.epoch, back.adam_step, &back.center),
            (12, 1, 7, &s.center)
        );
        assert_eq!(cfg, "{\"x\":1}");
        let bytes = fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        assert!(
            names.contains(&"cls_token".to_string())
                && names.contains(&"blocks.0.attn.qkv.weight".to_string())
        );
        assert!(names.contains(&"dino_head.last_layer.weight_v".to_string()));
        assert!(names.contains(&"dino_head.last_layer.weight_g".to_string()));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn other_architecture_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt.safetensors");
        let t = table();
        save(&p, &t, 5, &state(&t), "{}").unwrap();
        let mut other = ParamTable::new();
        other.push("cls_token", &[1, 1, 8]);
        let e = load(&p, &other, 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("ckpt.safetensors")
                && e.contains("another architecture")
                && e.contains("cls_token"),
            "{e}"
        );
        fs::write(&p, b"not a checkpoint").unwrap();
        let e = load(&p, &t, 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("ckpt.safetensors") && e.contains("truncated or not a checkpoint"),
            "{e}"
        );
        let e = load(&dir.path().join("missing"), &t, 2, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
