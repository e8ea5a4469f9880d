//! Training checkpoints: safetensors files written crash-safely, verified on load.
//!
//! Crash safety: each write goes to a temporary file beside its target, is fsynced,
//! renamed over the target and the directory fsynced, so a crash (SIGKILL, power loss)
//! leaves either the old file or the new one, never a mix. A run directory keeps the last
//! [`KEEP_CHECKPOINTS`] as `checkpoint-stepNNNNNNNN.safetensors`; `checkpoint.safetensors`
//! is the newest of them (a hard link, renamed into place, so it too is always complete).
//! Every checkpoint carries a CRC32 (metadata `checksum`) over its tensor bytes and its
//! metadata, checked by [`load`]; [`load_newest`] falls back to an older checkpoint when
//! the newest is damaged, and says which file it skipped and why.
//!
//! Names: the teacher backbone under timm's plain names (`cls_token`, `pos_embed`,
//! `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ..., `norm.bias`), so
//! `timm.create_model("vit_tiny_patch16_224", num_classes=0).load_state_dict(sd, strict=False)`
//! takes it as it is; the teacher's DINO head as `dino_head.*` (with `weight_g` = 1 as
//! DINO stores it); the student as `student.<name>`; AdamW's moments as
//! `optim.exp_avg.<name>` / `optim.exp_avg_sq.<name>`; the per-position teacher center as
//! `loss.center` `(1, T, K)`. The metadata holds the format version, the step, the epoch,
//! AdamW's step count, the training configuration (JSON) and the checksum. All random
//! draws are counter-based, so `(seed, step)` is the whole RNG state.
//!
//! This module must not decide when to checkpoint or print anything: the training loop
//! does both.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::params::ParamTable;

/// Written into every checkpoint's metadata as `format`.
pub const FORMAT: &str = "pwself-engine-checkpoint";
/// Current checkpoint format version. 1: no checksum; 2: metadata `checksum`.
pub const VERSION: u32 = 2;
/// How many `checkpoint-stepNNNNNNNN.safetensors` a run directory keeps.
pub const KEEP_CHECKPOINTS: usize = 3;
/// The newest checkpoint of a run directory.
pub const LATEST: &str = "checkpoint.safetensors";

/// Metadata key of the checksum, `crc32:` and 8 lowercase hex digits.
const CHECKSUM_KEY: &str = "checksum";
/// The checksum's value while the file is encoded; patched in place afterwards (same
/// length, so no offset moves).
const CHECKSUM_PLACEHOLDER: &str = "crc32:00000000";

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

/// The checkpoint file of `step` in a run directory: `checkpoint-step00000012.safetensors`.
pub fn step_file_name(step: u64) -> String {
    format!("checkpoint-step{step:08}.safetensors")
}

/// The step of a `checkpoint-stepNNNNNNNN.safetensors` name, `None` for any other name.
fn step_of_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix("checkpoint-step")?
        .strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The CRC32 stored as `checksum`: over the data section (every tensor's bytes, as laid
/// out in the file), then each other metadata entry, sorted by key, as `key\0value\0`.
fn checksum_of(data: &[u8], meta: &HashMap<String, String>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != CHECKSUM_KEY).collect();
    keys.sort();
    for key in keys {
        h.update(key.as_bytes());
        h.update(&[0]);
        h.update(meta[key].as_bytes());
        h.update(&[0]);
    }
    h.finalize()
}

/// Rewrites a safetensors JSON header in place with every object's keys sorted, padded with
/// spaces to its length: the encoder writes the metadata from a `HashMap`, whose order
/// changes from process to process, and the same training state must make the same file
/// byte for byte. The tensors' offsets do not depend on the header's order.
fn sort_header(header: &mut [u8]) -> std::result::Result<(), String> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let ordered: std::collections::BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(ordered.into_iter().collect())
            }
            other => other,
        }
    }
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON ({e})"))?;
    let value = sorted(value);
    // With serde_json's preserve_order feature the map keeps this insertion order; without
    // it the map is a BTreeMap: sorted either way.
    let text = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if text.len() > header.len() {
        return Err(format!(
            "sorted header is {} bytes, the encoder's {}",
            text.len(),
            header.len()
        ));
    }
    header[..text.len()].copy_from_slice(&text);
    header[text.len()..].fill(b' ');
    Ok(())
}

/// The length of the JSON header of safetensors `bytes` (after the 8-byte length), if the
/// file is long enough to hold it.
fn header_len(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok()?;
    (bytes.len() >= 8usize.checked_add(n)?).then_some(n)
}

/// The bytes of a checkpoint of `state`: safetensors with the metadata and checksum.
/// `path` only names the file in errors.
pub fn encode(
    path: &Path,
    table: &ParamTable,
    head_out_dim: usize,
    state: &TrainingState,
    config_json: &str,
) -> Result<Vec<u8>> {
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
        (CHECKSUM_KEY, CHECKSUM_PLACEHOLDER.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut bytes = safetensors::serialize(views, Some(meta.clone()))
        .map_err(|e| Error::bad_file(path, format!("cannot encode the checkpoint: {e}")))?;
    let n =
        header_len(&bytes).ok_or_else(|| Error::bad_file(path, "the encoder wrote no header"))?;
    sort_header(&mut bytes[8..8 + n])
        .map_err(|e| Error::bad_file(path, format!("cannot encode the checkpoint: {e}")))?;
    // The checksum covers the data section, laid out only now: patch it into the header.
    let crc = checksum_of(&bytes[8 + n..], &meta);
    let needle = format!("\"{CHECKSUM_KEY}\":\"{CHECKSUM_PLACEHOLDER}\"");
    let at = bytes[8..8 + n]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .ok_or_else(|| Error::bad_file(path, "the encoder dropped the checksum placeholder"))?;
    let digits = 8 + at + needle.len() - 9; // the 8 hex digits before the closing quote
    bytes[digits..digits + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    Ok(bytes)
}

/// Writes `state` to `path` atomically. `config_json` is stored in the metadata.
pub fn save(
    path: &Path,
    table: &ParamTable,
    head_out_dim: usize,
    state: &TrainingState,
    config_json: &str,
) -> Result<()> {
    let bytes = encode(path, table, head_out_dim, state, config_json)?;
    write_atomic(path, &bytes)
}

/// What [`save_in_dir`] wrote and removed.
#[derive(Clone, Debug)]
pub struct Saved {
    /// `DIR/checkpoint-stepNNNNNNNN.safetensors`.
    pub path: PathBuf,
    /// Older checkpoints removed (beyond the last `keep`, or newer than this step: left
    /// by a run this one replaced).
    pub removed: Vec<PathBuf>,
}

/// Writes `state` into run directory `dir` as `checkpoint-stepNNNNNNNN.safetensors`, makes
/// `checkpoint.safetensors` that same file, and removes all but the newest `keep` step
/// files (and any step file newer than `state.step`). Each file appears complete or not
/// at all; on failure nothing already there is touched and the error names the file.
pub fn save_in_dir(
    dir: &Path,
    keep: usize,
    table: &ParamTable,
    head_out_dim: usize,
    state: &TrainingState,
    config_json: &str,
) -> Result<Saved> {
    let path = dir.join(step_file_name(state.step));
    let bytes = encode(&path, table, head_out_dim, state, config_json)?;
    remove_stale_temporaries(dir)?;
    write_atomic(&path, &bytes)?;
    link_atomic(&path, &dir.join(LATEST), &bytes)?;
    let removed = prune(dir, keep.max(1), state.step)?;
    Ok(Saved { path, removed })
}

/// The temporary file beside `path` that this process writes before renaming.
fn temporary_for(dir: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Test hook, read once: `PWSELF_TEST_SLOW_CHECKPOINT=MS` sleeps MS milliseconds before
/// each rename of a checkpoint write, so that a test can kill the process there.
fn test_pause() {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("PWSELF_TEST_SLOW_CHECKPOINT")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}

/// Renames `tmp` over `path` and fsyncs the directory; removes `tmp` on failure.
fn publish(tmp: &Path, path: &Path, write: impl FnOnce() -> std::io::Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    let result = (|| {
        write()?;
        test_pause();
        fs::rename(tmp, path)?;
        if let Ok(d) = File::open(dir) {
            d.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(tmp);
        Error::io(path, e)
    })
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it over `path`
/// and fsyncs the directory. On failure the temporary file is removed and `path` is
/// untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_for(parent_dir(path), path);
    publish(&tmp, path, || write_synced(&tmp, bytes))
}

/// Makes `link` the same file as `target` atomically: a hard link under a temporary name,
/// renamed over `link`; where the file system has no hard links, a copy of `bytes`.
fn link_atomic(target: &Path, link: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_for(parent_dir(link), link);
    publish(&tmp, link, || {
        let _ = fs::remove_file(&tmp);
        fs::hard_link(target, &tmp).or_else(|_| write_synced(&tmp, bytes))
    })
}

/// Removes the temporary checkpoint and metrics files that killed processes left in
/// `dir` (their process id is not ours).
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let own = format!(".tmp-{}", std::process::id());
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(".checkpoint") || name.starts_with(".metrics.jsonl");
        if ours && name.contains(".tmp-") && !name.ends_with(&own) {
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// The step files of `dir`, newest first.
fn step_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(step) = step_of_file_name(&entry.file_name().to_string_lossy()) {
            files.push((step, entry.path()));
        }
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(files)
}

/// Removes the step files of `dir` newer than `step` and all but the `keep` newest of
/// the rest.
fn prune(dir: &Path, keep: usize, step: u64) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut kept = 0;
    for (s, p) in step_files(dir)? {
        let stale = s > step || kept >= keep;
        if s <= step {
            kept += 1;
        }
        if stale {
            fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        if let Ok(d) = File::open(dir) {
            d.sync_all().map_err(|e| Error::io(dir, e))?;
        }
    }
    Ok(removed)
}

/// Checks the checksum of checkpoint `bytes` read from `path` (format version 2 on;
/// version 1 files have none and pass). For callers that parse checkpoints themselves.
pub fn verify(path: &Path, bytes: &[u8]) -> Result<()> {
    let (n, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::bad_file(path, format!("bad header ({e}): {DAMAGED_FIX}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version < 2 {
        return Ok(());
    }
    let stored = meta
        .get(CHECKSUM_KEY)
        .and_then(|v| v.strip_prefix("crc32:"))
        .and_then(|v| u32::from_str_radix(v, 16).ok())
        .ok_or_else(|| {
            Error::bad_file(
                path,
                format!("metadata `{CHECKSUM_KEY}` is missing or malformed: {DAMAGED_FIX}"),
            )
        })?;
    let data = bytes
        .get(8 + n..)
        .ok_or_else(|| Error::bad_file(path, format!("truncated: {DAMAGED_FIX}")))?;
    let actual = checksum_of(data, &meta);
    if actual != stored {
        return Err(Error::bad_file(
            path,
            format!(
                "checksum mismatch (stored crc32 {stored:08x}, contents {actual:08x}): the file is damaged; {DAMAGED_FIX}"
            ),
        ));
    }
    Ok(())
}

/// The fix for a damaged checkpoint file.
const DAMAGED_FIX: &str =
    "resume from the run directory (an older checkpoint-step*.safetensors is used) \
     or from another checkpoint, or start without --resume";

/// Reads a checkpoint written by [`save`] for a network with `table`'s layout and a
/// center of `center_rows x k`, checking its checksum. Returns the state and the stored
/// configuration JSON.
pub fn load(
    path: &Path,
    table: &ParamTable,
    center_rows: usize,
    k: usize,
) -> Result<(TrainingState, String)> {
    try_load(path, table, center_rows, k).map_err(|f| match f {
        Failure::Damaged(e) | Failure::Incompatible(e) => e,
    })
}

/// Why a checkpoint did not load.
enum Failure {
    /// Unreadable, truncated or failing its checksum: an older checkpoint may do.
    Damaged(Error),
    /// Intact but not for this run (another architecture, a newer format): older
    /// checkpoints of the same run will not do either.
    Incompatible(Error),
}

fn try_load(
    path: &Path,
    table: &ParamTable,
    center_rows: usize,
    k: usize,
) -> std::result::Result<(TrainingState, String), Failure> {
    let bytes = fs::read(path).map_err(|e| Failure::Damaged(Error::io(path, e)))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Failure::Damaged(Error::bad_file(
            path,
            format!(
                "not a readable safetensors file ({e}): it is truncated or not a checkpoint; {DAMAGED_FIX}"
            ),
        ))
    })?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        Failure::Damaged(Error::bad_file(
            path,
            format!("bad header ({e}): {DAMAGED_FIX}"),
        ))
    })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Failure::Incompatible(Error::bad_file(
            path,
            "not a pwself-engine training checkpoint (no `format` metadata): pass a checkpoint \
             written by `pwself-engine train`, or start without --resume",
        )));
    }
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version > VERSION {
        return Err(Failure::Incompatible(Error::bad_file(
            path,
            format!("checkpoint format version {version} is newer than this pwself-engine reads ({VERSION}); upgrade pwself-engine"),
        )));
    }
    verify(path, &bytes).map_err(Failure::Damaged)?;
    decode(path, &st, &meta, table, center_rows, k).map_err(Failure::Incompatible)
}

/// The state in verified checkpoint `st` (metadata `meta`), read from `path`.
fn decode(
    path: &Path,
    st: &SafeTensors,
    meta: &HashMap<String, String>,
    table: &ParamTable,
    center_rows: usize,
    k: usize,
) -> Result<(TrainingState, String)> {
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

/// A checkpoint found by [`load_newest`].
#[derive(Debug)]
pub struct Resumed {
    /// The restored state.
    pub state: TrainingState,
    /// The stored configuration JSON.
    pub config: String,
    /// The file it came from.
    pub path: PathBuf,
    /// Newer checkpoints that were skipped, each with why (for a warning).
    pub skipped: Vec<Error>,
}

/// Loads `path` if it is a file; if it is a run directory, the newest of its checkpoints
/// that loads: `checkpoint.safetensors` (the newest step file under its usual name), then
/// the older `checkpoint-stepNNNNNNNN.safetensors`. Damaged ones (unreadable, truncated,
/// failing the checksum) are skipped and listed in [`Resumed::skipped`]; one that is
/// intact but not for this network (another architecture, a newer format) is an error
/// at once, since the older ones come from the same run.
pub fn load_newest(
    path: &Path,
    table: &ParamTable,
    center_rows: usize,
    k: usize,
) -> Result<Resumed> {
    if !path.is_dir() {
        let (state, config) = load(path, table, center_rows, k)?;
        return Ok(Resumed {
            state,
            config,
            path: path.to_path_buf(),
            skipped: Vec::new(),
        });
    }
    // Step files newest first. `checkpoint.safetensors` is normally a hard link to the
    // newest: then it is tried under that name; otherwise (a crash between the two
    // renames, or a directory from before step files) it comes last.
    let mut candidates: Vec<PathBuf> = step_files(path)?.into_iter().map(|(_, p)| p).collect();
    let latest = path.join(LATEST);
    if latest.exists() {
        match candidates.first() {
            Some(newest) if file_id(newest).is_some() && file_id(newest) == file_id(&latest) => {
                candidates[0] = latest;
            }
            _ => candidates.push(latest),
        }
    }
    if candidates.is_empty() {
        return Err(Error::bad_file(
            path,
            format!(
                "holds no checkpoint ({LATEST} or checkpoint-step*.safetensors): pass the --out \
                 directory of an earlier run or a checkpoint file, or start without --resume"
            ),
        ));
    }
    let mut damaged: Vec<Error> = Vec::new();
    let mut damaged_ids = Vec::new();
    for candidate in candidates {
        let id = file_id(&candidate);
        if id.is_some() && damaged_ids.contains(&id) {
            continue; // another name of a file that already failed
        }
        match try_load(&candidate, table, center_rows, k) {
            Ok((state, config)) => {
                return Ok(Resumed {
                    state,
                    config,
                    path: candidate,
                    skipped: damaged,
                })
            }
            Err(Failure::Damaged(e)) => {
                damaged.push(e);
                damaged_ids.push(id);
            }
            Err(Failure::Incompatible(e)) => return Err(e),
        }
    }
    let why: Vec<String> = damaged.iter().map(ToString::to_string).collect();
    Err(Error::bad_file(
        path,
        format!("no checkpoint in this directory loads: {}", why.join("; ")),
    ))
}

/// The device and inode of `path`, to tell hard links to one file apart from copies.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &Path) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sorted_header_keeps_its_length_and_its_meaning() {
        let original = br#"{"__metadata__":{"z":"1","a":"2"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   "#;
        let mut header = original.to_vec();
        sort_header(&mut header).unwrap();
        assert_eq!(header.len(), original.len());
        let text = std::str::from_utf8(&header).unwrap();
        assert!(
            text.starts_with(r#"{"__metadata__":{"a":"2","z":"1"},"w":{"#),
            "{text}"
        );
        let a: serde_json::Value = serde_json::from_slice(original).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(a, b);
    }

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
    fn the_same_state_encodes_to_the_same_bytes() {
        // Each HashMap draws its own hash seed, so without the sorted header the metadata's
        // order (and the file) would change from one encoding to the next.
        let t = table();
        let s = state(&t);
        let p = Path::new("x.safetensors");
        let first = encode(p, &t, 5, &s, "{\"x\":1}").unwrap();
        for _ in 0..8 {
            assert_eq!(encode(p, &t, 5, &s, "{\"x\":1}").unwrap(), first);
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

    #[test]
    fn a_flipped_bit_fails_the_checksum_and_truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt.safetensors");
        let t = table();
        save(&p, &t, 5, &state(&t), "{}").unwrap();
        let good = fs::read(&p).unwrap();
        // The checksum is the CRC32 of the data section and the sorted metadata.
        let n = header_len(&good).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&good).unwrap();
        let meta = meta.metadata().clone().unwrap();
        let want = format!(
            "crc32:{:08x}",
            crc32fast::hash(&{
                let mut b = good[8 + n..].to_vec();
                let mut keys: Vec<_> = meta.keys().filter(|k| *k != "checksum").collect();
                keys.sort();
                for k in keys {
                    b.extend_from_slice(k.as_bytes());
                    b.push(0);
                    b.extend_from_slice(meta[k].as_bytes());
                    b.push(0);
                }
                b
            })
        );
        assert_eq!(meta["checksum"], want);
        // One bit of one tensor value flipped: still a valid safetensors file.
        let mut bad = good.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x10;
        fs::write(&p, &bad).unwrap();
        let e = load(&p, &t, 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("ckpt.safetensors") && e.contains("checksum mismatch"),
            "{e}"
        );
        // A changed metadata digit (step 12 -> 13): the same length, caught too.
        let text = String::from_utf8_lossy(&good[8..8 + n]).into_owned();
        let at = 8 + text.find("\"step\":\"12\"").unwrap() + 9;
        let mut bad = good.clone();
        bad[at] = b'3';
        fs::write(&p, &bad).unwrap();
        let e = load(&p, &t, 2, 5).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        // Truncated at half its length.
        fs::write(&p, &good[..good.len() / 2]).unwrap();
        let e = load(&p, &t, 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("ckpt.safetensors") && e.contains("truncated"),
            "{e}"
        );
        fs::write(&p, &good).unwrap();
        assert!(load(&p, &t, 2, 5).is_ok());
    }

    #[test]
    fn a_future_format_version_asks_for_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("future.safetensors");
        let data = vec![0u8; 16];
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![4], &data).unwrap();
        let meta: HashMap<String, String> = [
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), (VERSION + 1).to_string()),
        ]
        .into_iter()
        .collect();
        fs::write(
            &p,
            safetensors::serialize([("x", view)], Some(meta)).unwrap(),
        )
        .unwrap();
        let e = load(&p, &table(), 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("future.safetensors")
                && e.contains(&format!("version {}", VERSION + 1))
                && e.contains("upgrade"),
            "{e}"
        );
    }

    fn at_step(t: &ParamTable, step: u64) -> TrainingState {
        let mut s = state(t);
        s.step = step;
        s.student[0] = step as f32;
        s
    }

    #[test]
    fn a_run_directory_keeps_the_last_k_and_falls_back_past_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t = table();
        // A temporary file a killed process left behind.
        fs::write(
            d.join(".checkpoint-step00000099.safetensors.tmp-1"),
            b"partial",
        )
        .unwrap();
        for step in [4, 8, 12, 16] {
            let saved = save_in_dir(d, 3, &t, 5, &at_step(&t, step), "{}").unwrap();
            assert_eq!(saved.path, d.join(step_file_name(step)));
        }
        let mut names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint-step00000008.safetensors",
                "checkpoint-step00000012.safetensors",
                "checkpoint-step00000016.safetensors",
                "checkpoint.safetensors"
            ]
        );
        assert_eq!(
            fs::read(d.join(LATEST)).unwrap(),
            fs::read(d.join(step_file_name(16))).unwrap()
        );
        let r = load_newest(d, &t, 2, 5).unwrap();
        assert_eq!((r.state.step, r.skipped.len()), (16, 0));

        // The newest damaged (checkpoint.safetensors is the same file): step 12, warned.
        let newest = d.join(step_file_name(16));
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() - 100]).unwrap();
        let r = load_newest(d, &t, 2, 5).unwrap();
        assert_eq!((r.state.step, r.state.student[0]), (12, 12.0));
        assert_eq!(r.path, d.join(step_file_name(12)));
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        // The newest is tried under its usual name, and not read again under the other.
        assert!(r.skipped[0].to_string().contains("checkpoint.safetensors"));

        // Resumed from 12, the run writes 16 again; a step file newer than the state
        // written (from a run this one replaced) is removed.
        fs::write(d.join(step_file_name(20)), b"old run").unwrap();
        let saved = save_in_dir(d, 3, &t, 5, &at_step(&t, 16), "{}").unwrap();
        assert_eq!(saved.removed, [d.join(step_file_name(20))]);
        assert_eq!(load_newest(d, &t, 2, 5).unwrap().state.step, 16);

        // Nothing loads: the error names each file.
        for (_, p) in step_files(d).unwrap() {
            fs::write(p, b"junk").unwrap();
        }
        let e = load_newest(d, &t, 2, 5).unwrap_err().to_string();
        assert!(
            e.contains("no checkpoint in this directory loads")
                && e.contains("checkpoint-step00000008")
                && e.contains("checkpoint-step00000012"),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        let e = load_newest(empty.path(), &t, 2, 5).unwrap_err().to_string();
        assert!(e.contains("holds no checkpoint"), "{e}");
    }
}
