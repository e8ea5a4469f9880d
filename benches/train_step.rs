//! One CPU training step (criterion): the default job's configuration (femto ViT: 64 dims,
//! 4 blocks, 2 heads, patch 4; 2 x 28 + 6 x 12 views; head 256/64/K=512; PWML with
//! per-patch augmentation) at batch 32 and 64 on the embedded Fashion-MNIST subset. View
//! building is not included (the loader builds views ahead on another thread).
//! Throughput in images.
//!
//! Run: `cargo bench --bench train_step`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pwself_engine::data::{default_pack, Split};
use pwself_engine::model::vit::Network;
use pwself_engine::train::step::StepRunner;
use pwself_engine::train::TrainConfig;
use pwself_engine::views::batch::ViewBuilder;

fn bench_step(c: &mut Criterion) {
    let pack = Arc::new(default_pack(Split::Train).expect("embedded pack"));
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    for batch in [32usize, 64] {
        let mut cfg = TrainConfig::default();
        cfg.run.batch = batch;
        let (views, vit) = cfg.resolve(28, 28, 1).expect("config");
        let net = Network::new(vit, cfg.head.clone()).expect("network");
        let spe = (pack.len() / batch) as u64;
        let sched = cfg
            .optim
            .schedules(batch, cfg.run.epochs, spe as usize)
            .expect("schedules");
        let mut runner = StepRunner::new(
            net,
            views.clone(),
            cfg.loss.clone(),
            cfg.optim.clone(),
            sched,
            spe,
            0,
        );
        let mut w = runner.init_weights();
        let builder = ViewBuilder::new(views, 0, &pack).expect("builder");
        let images: Vec<u32> = (0..batch as u32).collect();
        let batches: Vec<_> = (0..4)
            .map(|i| builder.build(&pack, i, 0, &images).expect("batch"))
            .collect();
        let mut i = 0;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("femto_small28_pwml_b{batch}"), |b| {
            b.iter(|| {
                i = (i + 1) % batches.len();
                runner.step(&mut w, &batches[i])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
