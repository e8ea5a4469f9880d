//! The whole training objective — teacher on the globals, student on every view with
//! stochastic depth, matched-token gather, DINO head, PW-Self loss, scatter back — against
//! central finite differences w.r.t. the student's parameters, on a tiny configuration.
//! Per-tensor unit directions, as in model_grad.rs.

use pwself_engine::data::{Pack, PackWriter};
use pwself_engine::loss::LossKind;
use pwself_engine::model::vit::Network;
use pwself_engine::rng::{Purpose, Stream};
use pwself_engine::train::step::StepRunner;
use pwself_engine::train::TrainConfig;
use pwself_engine::views::batch::ViewBuilder;

fn randn(n: usize, seed: u32) -> Vec<f32> {
    let mut s = Stream::new(21, [seed, 0, 0], Purpose::Noise);
    (0..n).map(|_| s.normal()).collect()
}

fn pack(dir: &std::path::Path) -> Pack {
    let p = dir.join("p.pwpack");
    let mut w = PackWriter::create(&p, 16, 16, 1, &["a", "b"]).unwrap();
    let mut s = Stream::new(3, [0, 0, 0], Purpose::Noise);
    for i in 0..4 {
        let img: Vec<u8> = (0..256).map(|_| s.next_u32() as u8).collect();
        w.push(&img, i % 2).unwrap();
    }
    w.finish().unwrap();
    Pack::open(&p).unwrap()
}

#[test]
fn training_objective_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let pack = pack(dir.path());
    for kind in [
        LossKind::Pwml,
        LossKind::Pwll { lambda: 0.3 },
        LossKind::Dino,
    ] {
        let mut cfg = TrainConfig::default();
        cfg.model.patch = Some(4);
        cfg.model.embed_dim = Some(8);
        cfg.model.depth = Some(2);
        cfg.model.heads = Some(2);
        cfg.model.drop_path = 0.3;
        cfg.views.global_side = Some(12);
        cfg.views.local_side = Some(8);
        cfg.views.local_views = Some(3);
        cfg.head.hidden = 12;
        cfg.head.bottleneck = 6;
        cfg.head.out_dim = 7;
        cfg.loss.kind = kind;
        let (views, vit) = cfg.resolve(16, 16, 1).unwrap();
        let net = Network::new(vit, cfg.head.clone()).unwrap();
        let sched = cfg.optim.schedules(2, 10, 2).unwrap();
        let mut runner = StepRunner::new(
            net.clone(),
            views.clone(),
            cfg.loss.clone(),
            cfg.optim.clone(),
            sched,
            2,
            5,
        );
        let mut w = runner.init_weights();
        // A teacher and a center that differ from the student's start.
        let n = w.teacher.len();
        for (x, n) in w.teacher.iter_mut().zip(randn(n, 1)) {
            *x += 0.05 * n;
        }
        for (x, n) in w.student.iter_mut().zip(randn(n, 2)) {
            *x += 0.05 * n;
        }
        w.center = randn(w.center.len(), 3).iter().map(|x| 0.1 * x).collect();
        let batch = ViewBuilder::new(views, 9, &pack)
            .unwrap()
            .build(&pack, 3, 1, &[0, 1, 2])
            .unwrap();
        assert!(
            batch.pairs.iter().any(|p| p.matches.len() > 1),
            "the batch must have patch matches"
        );

        let stats = runner.forward_backward(&w, &batch);
        let g = runner.grads().to_vec();
        assert!(stats.loss.is_finite() && stats.head_rows > 0);
        // h = 1e-3: the bottleneck vectors are small at this scale, so their L2
        // normalisation curves on a 1e-2 scale; the f32 rounding of a loss of about 2 over
        // 2h is about 2e-4, inside the bound.
        let h = 1e-3f32;
        let mut loss_at = |student: Vec<f32>| {
            let probe = pwself_engine::train::step::Weights {
                student,
                ..w.clone()
            };
            f64::from(runner.forward_backward(&probe, &batch).loss)
        };
        for (ti, t) in net.table.tensors().iter().enumerate() {
            let mut u = randn(t.len(), 100 + ti as u32);
            let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
            u.iter_mut().for_each(|x| *x /= norm);
            let analytic: f64 = g[t.range()]
                .iter()
                .zip(&u)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let mut shifted = |sign: f32| {
                let mut q = w.student.clone();
                q[t.range()]
                    .iter_mut()
                    .zip(&u)
                    .for_each(|(x, d)| *x += sign * h * d);
                loss_at(q)
            };
            let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * f64::from(h));
            assert!(
                (analytic - numeric).abs() <= 1e-3 + 0.02 * numeric.abs(),
                "{kind:?} {}: analytic {analytic:.6} vs numeric {numeric:.6}",
                t.name
            );
        }
    }
}

#[test]
fn the_teacher_moves_only_by_the_ema_of_the_student() {
    // After a step: teacher_new == m * teacher_old + (1 - m) * student_new, element by
    // element, computed here independently; the loss gives the teacher no gradient.
    let dir = tempfile::tempdir().unwrap();
    let pack = pack(dir.path());
    let mut cfg = TrainConfig::default();
    cfg.model.embed_dim = Some(8);
    cfg.model.depth = Some(1);
    cfg.model.heads = Some(2);
    cfg.head.hidden = 12;
    cfg.head.bottleneck = 6;
    cfg.head.out_dim = 7;
    cfg.views.global_side = Some(12);
    cfg.views.local_side = Some(8);
    let (views, vit) = cfg.resolve(16, 16, 1).unwrap();
    let net = Network::new(vit, cfg.head.clone()).unwrap();
    let sched = cfg.optim.schedules(2, 10, 2).unwrap();
    let mut runner = StepRunner::new(
        net,
        views.clone(),
        cfg.loss.clone(),
        cfg.optim.clone(),
        sched,
        2,
        5,
    );
    let mut w = runner.init_weights();
    let batch = ViewBuilder::new(views, 9, &pack)
        .unwrap()
        .build(&pack, 3, 1, &[0, 1])
        .unwrap();
    let teacher_old = w.teacher.clone();
    let student_old = w.student.clone();
    let stats = runner.step(&mut w, &batch);
    assert!(!stats.skipped);
    assert_ne!(w.student, student_old, "the student was updated");
    let m = stats.momentum as f32;
    for ((&t_new, &t_old), &s_new) in w.teacher.iter().zip(&teacher_old).zip(&w.student) {
        let want = m * t_old + (1.0 - m) * s_new;
        assert!(
            (t_new - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{t_new} vs {want}"
        );
    }
}
