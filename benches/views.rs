//! View building and patch matching throughput (criterion).
//!
//! - `views/small28_b64`: one batch of 64 Fashion-MNIST images (the embedded pack), the
//!   small28 preset (2 x 28 + 8 x 12 views, patch 4): crops, bicubic resize, per-patch
//!   photometric augmentation, normalisation, matching. Throughput in views.
//! - `views/paper224_b32`: one batch of 32 RGB 256x256 images, the paper's 2 x 224 + 8 x 96
//!   views with patch 16. The cost does not depend on image content, so the images are
//!   Fashion-MNIST upscaled to 256x256 and replicated to three channels.
//! - `matching/18_pairs_224_96`: the 18 teacher/student pairs of one batch.
//!
//! Run: `cargo bench --bench views` (add `-- --quick` for a short run).

mod common;

use common::rgb256_pack;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pwself_engine::data::{default_pack, Split};
use pwself_engine::views::batch::{ViewBatch, ViewBuilder};
use pwself_engine::views::config::{Preset, ViewConfig};
use pwself_engine::views::matching::batch_matches;

fn bench_views(c: &mut Criterion) {
    let mut g = c.benchmark_group("views");
    let small = default_pack(Split::Train).expect("embedded pack");
    let builder =
        ViewBuilder::new(ViewConfig::preset(Preset::Small28), 0, &small).expect("builder");
    let images: Vec<u32> = (0..64).collect();
    let mut batch = ViewBatch::default();
    let mut index = 0u64;
    g.throughput(Throughput::Elements(64 * 10));
    g.bench_function("small28_b64", |b| {
        b.iter(|| {
            index += 1;
            builder
                .build_into(&small, index, 0, &images, &mut batch)
                .expect("build");
            black_box(&batch);
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let big = rgb256_pack(dir.path());
    let builder = ViewBuilder::new(ViewConfig::preset(Preset::Paper224), 0, &big).expect("builder");
    let images: Vec<u32> = (0..32).collect();
    g.throughput(Throughput::Elements(32 * 10));
    g.sample_size(10);
    g.bench_function("paper224_b32", |b| {
        b.iter(|| {
            index += 1;
            builder
                .build_into(&big, index, 0, &images, &mut batch)
                .expect("build");
            black_box(&batch);
        })
    });
    g.finish();

    let cfg = ViewConfig::preset(Preset::Paper224);
    let grids: Vec<u32> = (0..10).map(|v| cfg.grid(v) as u32).collect();
    let crops: Vec<_> = (0..1000).map(|i| builder.crops(i)).collect();
    let mut k = 0;
    c.bench_function("matching/18_pairs_224_96", |b| {
        b.iter(|| {
            k = (k + 1) % crops.len();
            black_box(batch_matches(&crops[k], &grids, 2, cfg.match_rule).expect("matches"))
        })
    });
}

criterion_group!(benches, bench_views);
criterion_main!(benches);
