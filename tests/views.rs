//! The view pipeline end to end: batch-shared crops, per-image draws, normalisation,
//! determinism across thread counts, the loader's epochs, resume and prefetching, and the
//! matched-token statistics SPEC.md section 3 quotes for the paper's setup.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pwself_engine::data::{Pack, PackWriter};
use pwself_engine::rng::{Purpose, Stream};
use pwself_engine::views::batch::{epoch_order, LoaderPlan, ViewBuilder, ViewLoader};
use pwself_engine::views::config::{Preset, ViewConfig};
use pwself_engine::views::crop::{sample_crop, Scale};
use pwself_engine::views::matching::{batch_matches, MatchRule};
use pwself_engine::views::photometric::PhotometricConfig;

/// A pack of `n` random 32x32x3 images (two of them identical: 0 and 1) plus one
/// constant image (index n - 1, value 200).
fn make_pack(dir: &Path, n: usize) -> Pack {
    let path = dir.join("p.pwpack");
    let mut w = PackWriter::create(&path, 32, 32, 3, &["a", "b"]).unwrap();
    let mut rng = Stream::new(99, [0, 0, 0], Purpose::Noise);
    let first: Vec<u8> = (0..32 * 32 * 3).map(|_| rng.next_u32() as u8).collect();
    for i in 0..n {
        let img: Vec<u8> = match i {
            0 | 1 => first.clone(),
            _ if i == n - 1 => vec![200; 32 * 32 * 3],
            _ => (0..32 * 32 * 3).map(|_| rng.next_u32() as u8).collect(),
        };
        w.push(&img, (i % 2) as u16).unwrap();
    }
    w.finish().unwrap();
    Pack::open(&path).unwrap()
}

#[test]
fn crops_are_shared_by_the_batch_and_photometric_draws_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let pack = make_pack(dir.path(), 6);
    let cfg = ViewConfig::preset(Preset::Small32);
    let with_aug = ViewBuilder::new(cfg.clone(), 5, &pack).unwrap();
    let mut plain_cfg = cfg.clone();
    (plain_cfg.global1, plain_cfg.global2, plain_cfg.local_aug) = (
        PhotometricConfig::none(),
        PhotometricConfig::none(),
        PhotometricConfig::none(),
    );
    let plain = ViewBuilder::new(plain_cfg, 5, &pack).unwrap();

    let b = plain.build(&pack, 3, 0, &[0, 1, 2]).unwrap();
    assert_eq!(b.crops, plain.crops(3));
    assert_eq!(
        b.crops,
        with_aug.crops(3),
        "spatial draws do not depend on photometric settings"
    );
    assert_ne!(
        plain.crops(3),
        plain.crops(4),
        "each batch draws its own crops"
    );
    for (v, buf) in b.views.iter().enumerate() {
        let n = buf.len() / 3;
        // Images 0 and 1 are the same picture: same crop, no photometric draws -> same view.
        assert_eq!(buf[..n], buf[n..2 * n], "view {v}");
        assert_ne!(
            buf[..n],
            buf[2 * n..],
            "view {v}: a different image gives a different view"
        );
    }
    // With augmentation, the two copies of the same picture get their own draws.
    let b = with_aug.build(&pack, 3, 0, &[0, 1, 2]).unwrap();
    let n = b.views[0].len() / 3;
    assert_ne!(b.views[0][..n], b.views[0][n..2 * n]);
    assert_eq!(b.pairs.len(), 18);
    assert_eq!(b.labels, vec![0, 1, 0]);
}

#[test]
fn views_are_normalised_with_the_pack_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let pack = make_pack(dir.path(), 5);
    let mut cfg = ViewConfig::preset(Preset::Small32);
    (cfg.global1, cfg.global2, cfg.local_aug) = (
        PhotometricConfig::none(),
        PhotometricConfig::none(),
        PhotometricConfig::none(),
    );
    let builder = ViewBuilder::new(cfg, 1, &pack).unwrap();
    let b = builder.build(&pack, 0, 0, &[4]).unwrap(); // the constant image, value 200
    for buf in &b.views {
        let plane = buf.len() / 3;
        for (ch, values) in buf.chunks_exact(plane).enumerate() {
            let want = (200.0 / 255.0 - pack.mean()[ch]) / pack.std()[ch];
            assert!(
                values.iter().all(|&x| (x - want).abs() < 1e-4),
                "channel {ch}: want {want}"
            );
        }
    }
}

#[test]
fn batches_are_bit_identical_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let pack = make_pack(dir.path(), 12);
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Small32), 7, &pack).unwrap();
    let images: Vec<u32> = (0..12).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| builder.build(&pack, 11, 0, &images).unwrap())
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.crops, b.crops);
    for (x, y) in a.views.iter().zip(&b.views) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
fn loader_visits_every_image_once_per_epoch_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pack = Arc::new(make_pack(dir.path(), 10));
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Small32), 3, &pack).unwrap();
    let plan = LoaderPlan {
        batch_size: 3,
        start: 0,
        batches: 7,
        prefetch: 2,
    };
    let batches: Vec<_> = ViewLoader::start(Arc::clone(&pack), builder.clone(), plan)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 7);
    // 10 images, batch 3 -> 3 batches per epoch (the last image of each epoch dropped).
    for epoch in 0..2 {
        let mut seen: Vec<u32> = batches[epoch * 3..epoch * 3 + 3]
            .iter()
            .flat_map(|b| b.images.clone())
            .collect();
        assert!(batches[epoch * 3..epoch * 3 + 3]
            .iter()
            .all(|b| b.epoch == epoch as u64));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 9, "epoch {epoch} repeats an image");
    }
    assert_ne!(epoch_order(3, 0, 10), epoch_order(3, 1, 10));
    let mut order = epoch_order(3, 1, 10);
    order.sort_unstable();
    assert_eq!(order, (0..10).collect::<Vec<u32>>());
    // Resume at batch 4: the same batches as the uninterrupted run.
    let resumed: Vec<_> = ViewLoader::start(
        pack,
        builder,
        LoaderPlan {
            start: 4,
            batches: 3,
            ..plan
        },
    )
    .unwrap()
    .map(|b| b.unwrap())
    .collect();
    for (r, b) in resumed.iter().zip(&batches[4..]) {
        assert_eq!(
            (r.index, &r.images, &r.crops),
            (b.index, &b.images, &b.crops)
        );
        assert_eq!(r.views, b.views);
    }
}

#[test]
fn the_headers_only_loader_gives_the_same_batches_without_pixels() {
    // What the GPU backend consumes: the same images, labels, crops and matches as the
    // full loader, batch for batch, and no pixels.
    let dir = tempfile::tempdir().unwrap();
    let pack = Arc::new(make_pack(dir.path(), 10));
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Small32), 3, &pack).unwrap();
    let plan = LoaderPlan {
        batch_size: 3,
        start: 1,
        batches: 5,
        prefetch: 2,
    };
    let full: Vec<_> = ViewLoader::start(Arc::clone(&pack), builder.clone(), plan)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let heads: Vec<_> = ViewLoader::start_headers(pack, builder, plan)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(heads.len(), 5);
    for (h, f) in heads.iter().zip(&full) {
        assert_eq!(
            (h.index, h.epoch, &h.images, &h.labels, &h.crops, h.channels),
            (f.index, f.epoch, &f.images, &f.labels, &f.crops, f.channels)
        );
        assert_eq!(format!("{:?}", h.pairs), format!("{:?}", f.pairs));
        assert!(h.views.is_empty());
        assert!(!f.views.is_empty());
    }
}

#[test]
fn loader_builds_ahead_of_a_slow_consumer() {
    // The consumer takes 400 ms per step while a batch of 8 small images takes about a
    // millisecond to build: every batch after the first must be waiting already. The bound
    // (150 ms of waiting for a batch that takes ~1 ms) only fails if the worker is not
    // building ahead at all.
    let dir = tempfile::tempdir().unwrap();
    let pack = Arc::new(make_pack(dir.path(), 16));
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Small32), 3, &pack).unwrap();
    let plan = LoaderPlan {
        batch_size: 8,
        start: 0,
        batches: 4,
        prefetch: 2,
    };
    let mut loader = ViewLoader::start(pack, builder, plan).unwrap();
    let mut waits = Vec::new();
    while let Some(b) = {
        let t = Instant::now();
        let b = loader.next_batch();
        waits.push(t.elapsed());
        b
    } {
        loader.recycle(b.unwrap());
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(loader.stats().batches, 4);
    for w in &waits[1..4] {
        assert!(
            *w < Duration::from_millis(150),
            "the consumer waited {w:?} for a batch: {waits:?}"
        );
    }
}

#[test]
fn batch_larger_than_the_pack_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pack = Arc::new(make_pack(dir.path(), 4));
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Small32), 3, &pack).unwrap();
    let plan = LoaderPlan {
        batch_size: 5,
        start: 0,
        batches: 1,
        prefetch: 2,
    };
    let e = ViewLoader::start(pack, builder, plan)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--batch") && e.contains("4 images") && e.contains("--batch 4 or less"),
        "{e}"
    );
}

#[test]
fn matched_token_counts_match_the_spec_for_224_96() {
    // SPEC.md section 3: with 224/96 views, patch 16, on 256x256 sources: about 132
    // matched tokens per global-global pair, about 30 per global-local pair, about 0.4%
    // of global-local pairs CLS only. 20,000 batches = 360,000 pairs; the standard errors
    // are below 0.4 tokens and 0.05 percentage points.
    let mut grids = vec![14u32, 14];
    grids.extend([6u32; 8]);
    for rule in [MatchRule::Paper, MatchRule::Official] {
        let (mut gg, mut gl, mut n_gg, mut n_gl, mut cls) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        for b in 0..20_000u32 {
            let crops: Vec<_> = (0..10u32)
                .map(|v| {
                    let mut r = Stream::new(1, [b, 0, v], Purpose::Crop);
                    let s = if v < 2 {
                        Scale { lo: 0.4, hi: 1.0 }
                    } else {
                        Scale { lo: 0.05, hi: 0.4 }
                    };
                    sample_crop(&mut r, 256, 256, s, 0.5)
                })
                .collect();
            for p in batch_matches(&crops, &grids, 2, rule).unwrap() {
                if p.student_view < 2 {
                    (gg, n_gg) = (gg + p.matches.len(), n_gg + 1);
                } else {
                    (gl, n_gl) = (gl + p.matches.len(), n_gl + 1);
                    cls += usize::from(p.matches.len() == 1);
                }
            }
        }
        let (gg, gl, cls) = (
            gg as f64 / n_gg as f64,
            gl as f64 / n_gl as f64,
            100.0 * cls as f64 / n_gl as f64,
        );
        assert!((129.0..135.0).contains(&gg), "{rule:?}: global-global {gg}");
        assert!((29.0..31.0).contains(&gl), "{rule:?}: global-local {gl}");
        assert!((0.25..0.6).contains(&cls), "{rule:?}: CLS-only {cls}%");
    }
}
