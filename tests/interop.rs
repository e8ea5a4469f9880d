//! timm interoperability without torch: export then import gives the same backbone bit
//! for bit; a timm-named file with a missing key or a wrong shape is refused naming the
//! key; a damaged checkpoint is not exported.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use pwself_engine::checkpoint::{self, TrainingState};
use pwself_engine::interop::{self, Which};
use pwself_engine::model::vit::Network;
use pwself_engine::train::TrainConfig;
use safetensors::{Dtype, SafeTensors};

/// A femto network for 28x28 grey images (patch 4) and a checkpoint of it in `dir`,
/// teacher and student different.
fn checkpoint_in(dir: &Path) -> (Network, TrainingState, std::path::PathBuf) {
    let cfg = TrainConfig::default();
    let (_, vit) = cfg.resolve(28, 28, 1).unwrap();
    let net = Network::new(vit, cfg.head.clone()).unwrap();
    let teacher = net.init(1);
    let student = net.init(2);
    let n = net.table.total();
    let state = TrainingState {
        student,
        teacher,
        exp_avg: vec![0.0; n],
        exp_avg_sq: vec![0.0; n],
        adam_step: 3,
        adam_step_last: 3,
        center: vec![0.0; 2 * net.head.out_dim],
        center_rows: 2,
        step: 3,
        epoch: 0,
    };
    let path = dir.join("checkpoint.safetensors");
    let json = serde_json::to_string(&cfg).unwrap();
    checkpoint::save(&path, &net.table, net.head.out_dim, &state, &json).unwrap();
    (net, state, path)
}

fn backbone_bits(net: &Network, buf: &[f32]) -> Vec<(String, Vec<u32>)> {
    net.table
        .tensors()
        .iter()
        .filter(|t| interop::is_backbone(t))
        .map(|t| {
            (
                t.name.clone(),
                buf[t.range()].iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    fs::write(
        path,
        safetensors::serialize(views, None::<HashMap<String, String>>).unwrap(),
    )
    .unwrap();
}

/// The exported file's tensors.
fn exported(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect()
}

#[test]
fn export_then_import_is_bit_identical_and_names_are_timms() {
    let dir = tempfile::tempdir().unwrap();
    let (net, state, ckpt) = checkpoint_in(dir.path());
    for (which, want) in [
        (Which::Teacher, &state.teacher),
        (Which::Student, &state.student),
    ] {
        let b = interop::read_checkpoint(dir.path(), which).unwrap();
        assert_eq!(b.path, ckpt);
        assert_eq!(b.step, Some(3));
        let out = dir.path().join(format!("{}.safetensors", which.name()));
        let bytes = interop::encode_backbone(&out, &b.net, &b.params, &[]).unwrap();
        fs::write(&out, &bytes).unwrap();

        // timm's names only: no head, no prefixes; metadata says the timm config.
        let tensors = exported(&out);
        let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
        assert!(names.contains(&"cls_token") && names.contains(&"norm.bias"));
        assert!(names.contains(&"blocks.3.mlp.fc2.weight"));
        assert!(
            names.iter().all(|n| !n.starts_with("head.")
                && !n.starts_with("dino_head.")
                && !n.starts_with("student.")),
            "{names:?}"
        );
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], interop::FORMAT);
        assert_eq!(
            (
                meta["img_size"].as_str(),
                meta["patch_size"].as_str(),
                meta["in_chans"].as_str()
            ),
            ("28", "4", "1")
        );
        assert_eq!(
            (
                meta["embed_dim"].as_str(),
                meta["depth"].as_str(),
                meta["num_heads"].as_str()
            ),
            ("64", "4", "2")
        );
        assert_eq!(meta["timm_model"], "custom");
        let kwargs: serde_json::Value = serde_json::from_str(&meta["timm_kwargs"]).unwrap();
        assert_eq!(kwargs["num_classes"], 0);

        // Back in: the same bits, head untouched.
        let mut student = vec![7.0f32; net.table.total()];
        let mut teacher = vec![7.0f32; net.table.total()];
        let notes = interop::init_from_timm(&out, &net, &mut student, &mut teacher).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(backbone_bits(&net, &student), backbone_bits(&net, want));
        assert_eq!(backbone_bits(&net, &teacher), backbone_bits(&net, want));
        let head = net.table.info("head.last_layer.weight_v").range();
        assert!(student[head].iter().all(|&v| v == 7.0));
    }
    // A training checkpoint is itself timm-named: its teacher loads, the rest is noted.
    let mut s = vec![0.0f32; net.table.total()];
    let mut t = vec![0.0f32; net.table.total()];
    let notes = interop::init_from_timm(&ckpt, &net, &mut s, &mut t).unwrap();
    assert_eq!(backbone_bits(&net, &t), backbone_bits(&net, &state.teacher));
    assert!(notes.iter().any(|n| n.contains("ignored")), "{notes:?}");
}

#[test]
fn missing_keys_wrong_shapes_and_foreign_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (net, _, _) = checkpoint_in(dir.path());
    let b = interop::read_checkpoint(dir.path(), Which::Teacher).unwrap();
    let good = dir.path().join("good.safetensors");
    fs::write(
        &good,
        interop::encode_backbone(&good, &b.net, &b.params, &[]).unwrap(),
    )
    .unwrap();
    let tensors = exported(&good);
    let (mut s, mut t) = (vec![0.0; net.table.total()], vec![0.0; net.table.total()]);

    // A classifier head is ignored with a note.
    let p = dir.path().join("with-head.safetensors");
    let mut with_head = tensors.clone();
    with_head.push(("head.weight".into(), vec![10, 64], vec![0.5; 640]));
    with_head.push(("head.bias".into(), vec![10], vec![0.0; 10]));
    write_tensors(&p, &with_head);
    let notes = interop::init_from_timm(&p, &net, &mut s, &mut t).unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ignored 2") && n.contains("head.weight")),
        "{notes:?}"
    );

    // Missing key.
    let p = dir.path().join("missing.safetensors");
    let fewer: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "blocks.2.attn.qkv.bias")
        .cloned()
        .collect();
    write_tensors(&p, &fewer);
    let e = interop::init_from_timm(&p, &net, &mut s, &mut t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing.safetensors") && e.contains("`blocks.2.attn.qkv.bias`"),
        "{e}"
    );

    // Wrong shape: both shapes named.
    let p = dir.path().join("shape.safetensors");
    let mut wrong = tensors.clone();
    for t in wrong
        .iter_mut()
        .filter(|t| t.0 == "blocks.1.mlp.fc1.weight")
    {
        t.1 = vec![128, 64];
        t.2.truncate(128 * 64);
    }
    write_tensors(&p, &wrong);
    let e = interop::init_from_timm(&p, &net, &mut s, &mut t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`blocks.1.mlp.fc1.weight`")
            && e.contains("[128, 64]")
            && e.contains("[256, 64]"),
        "{e}"
    );

    // Layer scale would change the function: refused by name.
    let p = dir.path().join("layerscale.safetensors");
    let mut ls = tensors.clone();
    ls.push(("blocks.0.ls1.gamma".into(), vec![64], vec![1e-5; 64]));
    write_tensors(&p, &ls);
    let e = interop::init_from_timm(&p, &net, &mut s, &mut t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`blocks.0.ls1.gamma`"), "{e}");

    // A deeper file: the extra block is named.
    let p = dir.path().join("deeper.safetensors");
    let mut deeper = tensors.clone();
    deeper.push(("blocks.4.norm1.weight".into(), vec![64], vec![1.0; 64]));
    write_tensors(&p, &deeper);
    let e = interop::init_from_timm(&p, &net, &mut s, &mut t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 4") && e.contains("model.depth"), "{e}");

    // A position embedding of another grid is resampled; the identity grid is a copy.
    let p = dir.path().join("grid.safetensors");
    let mut grid = tensors.clone();
    for t in grid.iter_mut().filter(|t| t.0 == "pos_embed") {
        t.1 = vec![1, 1 + 14 * 14, 64];
        t.2 = (0..(1 + 14 * 14) * 64).map(|i| (i % 64) as f32).collect();
    }
    write_tensors(&p, &grid);
    let notes = interop::init_from_timm(&p, &net, &mut s, &mut t).unwrap();
    assert!(notes.iter().any(|n| n.contains("resampled")), "{notes:?}");
    // Constant along the grid, so any resampling keeps it (rows sum to 1).
    let pos = &t[net.table.info("pos_embed").range()];
    assert!(pos.chunks_exact(64).all(|row| row
        .iter()
        .enumerate()
        .all(|(i, &v)| (v - i as f32).abs() < 1e-4)));

    // Not safetensors at all.
    let p = dir.path().join("junk.safetensors");
    fs::write(&p, b"junk").unwrap();
    let e = interop::init_from_timm(&p, &net, &mut s, &mut t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("save_file"),
        "{e}"
    );
}

#[test]
fn a_damaged_checkpoint_is_not_exported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ckpt) = checkpoint_in(dir.path());
    let good = fs::read(&ckpt).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 5;
    bad[at] ^= 0x01;
    fs::write(&ckpt, &bad).unwrap();
    let e = interop::read_checkpoint(&ckpt, Which::Teacher)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checkpoint.safetensors") && e.contains("checksum mismatch"),
        "{e}"
    );
    fs::write(&ckpt, &good[..good.len() / 2]).unwrap();
    let e = interop::read_checkpoint(dir.path(), Which::Teacher)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint.safetensors"), "{e}");
    let e = interop::read_checkpoint(&dir.path().join("none"), Which::Teacher)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn train_init_starts_both_backbones_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (net, state, _) = checkpoint_in(dir.path());
    // The student of the checkpoint as a timm file.
    let b = interop::read_checkpoint(dir.path(), Which::Student).unwrap();
    let file = dir.path().join("timm.safetensors");
    fs::write(
        &file,
        interop::encode_backbone(&file, &b.net, &b.params, &[]).unwrap(),
    )
    .unwrap();
    let mut cfg = TrainConfig::default();
    cfg.model.init = Some(file.clone());
    cfg.run.batch = 4;
    cfg.run.max_steps = Some(1);
    cfg.optim.lr = 0.0; // the weights stay the file's
    cfg.run.out = dir.path().join("run");
    let opts = pwself_engine::train::RunOptions {
        quiet: true,
        no_eval: true,
        ..Default::default()
    };
    let s = pwself_engine::train::run(&cfg, &opts).unwrap();
    assert_eq!(
        backbone_bits(&net, &s.student),
        backbone_bits(&net, &state.student)
    );
    for t in net
        .table
        .tensors()
        .iter()
        .filter(|t| interop::is_backbone(t))
    {
        for (a, b) in s.teacher[t.range()].iter().zip(&state.student[t.range()]) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{}: {a} vs {b}",
                t.name
            );
        }
    }
    // The path is part of the configuration the run stored.
    let toml = fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
    assert!(toml.contains("timm.safetensors"), "{toml}");
    // A file for another architecture is refused before training.
    cfg.model.arch = pwself_engine::model::config::Arch::Tiny;
    cfg.run.out = dir.path().join("run2");
    let e = pwself_engine::train::run(&cfg, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("timm.safetensors") && e.contains("`cls_token`"),
        "{e}"
    );
}
