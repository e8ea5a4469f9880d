//! Fuzzes the training configuration: `TrainConfig::from_toml_file` then
//! `TrainConfig::resolve`. No input may panic; errors name the file (parse) or the field
//! (resolve); a configuration that resolves must satisfy what the trainer relies on, and
//! must survive being written back as TOML (the run directory's `config.toml`).
//!
//! Input: three bytes for the source image (height, width, channels), then the TOML text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwself_engine::train::config::TrainConfig;
use pwself_engine::views::config::{MAX_GRID, MAX_VIEWS};

fuzz_target!(|data: &[u8]| {
    let [h, w, c, text @ ..] = data else {
        return;
    };
    // Sources from 1x1 to 256x256 (the preset switches at 28 and 64), 0..=4 channels.
    let (h, w, c) = (*h as usize + 1, *w as usize + 1, *c as usize % 5);
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("fuzz-config.toml");
    std::fs::write(&path, text).expect("write the temporary file");
    let cfg = match TrainConfig::from_toml_file(&path) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(e.to_string().contains("fuzz-config.toml"), "{e}");
            return;
        }
    };
    let (views, vit) = match cfg.resolve(h, w, c) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // What a resolved configuration promises the trainer.
    views
        .validate()
        .expect("resolve returned views that do not validate");
    vit.validate()
        .expect("resolve returned a network that does not validate");
    let p = views.patch_size;
    assert!(p >= 1);
    assert!(views.global.count >= 1 && views.global.count <= MAX_VIEWS);
    assert!(views.local.count <= MAX_VIEWS);
    for v in 0..views.num_views().min(2 * MAX_VIEWS) {
        let side = views.side(v);
        assert!(
            side >= p && side % p == 0,
            "view {v}: side {side}, patch {p}"
        );
        assert!(views.grid(v) >= 1 && views.grid(v) <= MAX_GRID);
    }
    assert_eq!(vit.patch, p);
    assert_eq!(vit.in_chans, c);
    assert!(vit.in_chans == 1 || vit.in_chans == 3);
    assert_eq!(vit.ref_grid, views.global.side / p);
    assert!(vit.heads >= 1 && vit.embed_dim % vit.heads == 0);
    assert!(vit.head_dim() * vit.heads == vit.embed_dim);
    assert!((0.0..1.0).contains(&vit.drop_path));
    assert!(cfg.run.batch >= 1 && cfg.run.epochs >= 1);
    // Written back and read again, it is the same configuration.
    let written = toml::to_string(&cfg).expect("a parsed configuration serialises");
    std::fs::write(&path, &written).expect("write the temporary file");
    let back = TrainConfig::from_toml_file(&path).unwrap_or_else(|e| {
        panic!("the written-back configuration does not parse: {e}\n{written}")
    });
    assert_eq!(
        toml::to_string(&back).expect("serialises"),
        written,
        "the configuration changed on its way through TOML"
    );
});
