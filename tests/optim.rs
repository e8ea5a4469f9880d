//! AdamW, schedules, clipping, the last-layer freeze and the EMA against hand-computed
//! numbers, closed forms, and a naive f64 re-implementation of PyTorch's AdamW.

use pwself_engine::model::params::ParamTable;
use pwself_engine::optim::{
    cancel_last_layer_grads, clip_global_norm, clip_per_tensor, ema_update, has_non_finite,
    l2_norm, AdamW, ClipMode, CosineSchedule, OptimConfig,
};
use pwself_engine::rng::{Purpose, Stream};

fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = Stream::new(seed, [9, 9, 9], Purpose::Noise);
    (0..n).map(|_| scale * rng.normal()).collect()
}

#[test]
fn adamw_two_steps_by_hand() {
    // p = 1, lr = 0.1, wd = 0.1, gradients 0.5 then -0.25; element 0 decays, element 1 not.
    // Step 1 (t = 1): decay p = 1 (1 - 0.01) = 0.99; m = 0.05, v = 0.00025;
    //   m^ = 0.05 / 0.1 = 0.5, v^ = 0.00025 / 0.001 = 0.25, sqrt = 0.5;
    //   p = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.890000002 (undecayed: 0.900000002).
    // Step 2 (t = 2): decay p = 0.890000002 * 0.99 = 0.88110000198;
    //   m = 0.9 * 0.05 - 0.1 * 0.25 = 0.02, v = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225;
    //   m^ = 0.02 / 0.19 = 0.105263157894737, v^ = 0.00031225 / 0.001999 = 0.156203101550775,
    //   sqrt(v^) = 0.395225381602..., step = 0.1 * m^ / (sqrt(v^) + 1e-8) = 0.0266333...;
    //   p = 0.8544662986878463 (undecayed: 0.900000002 - 0.0266333... = 0.8733662987078463).
    let mut p = vec![1.0f32, 1.0];
    let mask = [1.0f32, 0.0];
    let mut opt = AdamW::new(2);
    opt.step(&mut p, &[0.5, 0.5], 0.1, 0.1, &mask);
    assert!((f64::from(p[0]) - 0.890_000_002).abs() < 1e-7, "{}", p[0]);
    assert!((f64::from(p[1]) - 0.900_000_002).abs() < 1e-7, "{}", p[1]);
    opt.step(&mut p, &[-0.25, -0.25], 0.1, 0.1, &mask);
    assert!(
        (f64::from(p[0]) - 0.854_466_298_687_846_3).abs() < 1e-7,
        "{}",
        p[0]
    );
    assert!(
        (f64::from(p[1]) - 0.873_366_298_707_846_3).abs() < 1e-7,
        "{}",
        p[1]
    );
    assert_eq!(opt.step, 2);
    assert!((f64::from(opt.m[0]) - 0.02).abs() < 1e-8, "f32 moments");
    assert!((f64::from(opt.v[0]) - 0.000_312_25).abs() < 1e-10);
}

/// PyTorch's AdamW written out naively in f64 (`torch/optim/adamw.py`, single tensor).
struct NaiveAdamW {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl NaiveAdamW {
    fn step(&mut self, p: &mut [f64], g: &[f32], lr: f64, wd: f64, mask: &[f32]) {
        self.t += 1;
        for i in 0..p.len() {
            let g = f64::from(g[i]);
            if mask[i] == 1.0 {
                p[i] *= 1.0 - lr * wd;
            }
            self.m[i] = 0.9 * self.m[i] + 0.1 * g;
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g;
            let m_hat = self.m[i] / (1.0 - 0.9f64.powi(self.t));
            let v_hat = self.v[i] / (1.0 - 0.999f64.powi(self.t));
            p[i] -= lr * m_hat / (v_hat.sqrt() + 1e-8);
        }
    }
}

#[test]
fn adamw_matches_naive_f64_for_ten_steps() {
    // More than one rayon chunk, a mask with both values, lr and wd changing every step.
    let n = 40_000;
    let mut p = randn(1, n, 1.0);
    let mask: Vec<f32> = (0..n).map(|i| f32::from(u8::from(i % 3 != 0))).collect();
    let mut p64: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
    let mut opt = AdamW::new(n);
    let mut naive = NaiveAdamW {
        m: vec![0.0; n],
        v: vec![0.0; n],
        t: 0,
    };
    for step in 0..10u64 {
        let g = randn(100 + step, n, 0.1 + step as f32 * 0.2);
        let (lr, wd) = (1e-3 * (1.0 + step as f32), 0.04 + 0.03 * step as f32);
        opt.step(&mut p, &g, lr, wd, &mask);
        naive.step(&mut p64, &g, f64::from(lr), f64::from(wd), &mask);
    }
    let worst = p
        .iter()
        .zip(&p64)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "largest difference {worst}");
    assert_eq!(opt.step, 10);
}

#[test]
fn adamw_state_round_trips() {
    let mut p = randn(2, 100, 1.0);
    let g = randn(3, 100, 1.0);
    let mask = vec![1.0; 100];
    let mut a = AdamW::new(100);
    a.step(&mut p, &g, 1e-2, 0.1, &mask);
    let mut b = AdamW::from_state(a.m.clone(), a.v.clone(), a.step).unwrap();
    let mut q = p.clone();
    a.step(&mut p, &g, 1e-2, 0.1, &mask);
    b.step(&mut q, &g, 1e-2, 0.1, &mask);
    assert_eq!(p, q);
    let err = AdamW::from_state(vec![0.0; 3], vec![0.0; 4], 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3") && err.contains("4"), "{err}");
}

#[test]
fn cosine_schedule_endpoints_and_midpoints() {
    // lr-like: 100 epochs of 10 iterations, 10 warm-up epochs from 0.
    let (base, fin) = (1e-3, 1e-6);
    let s = CosineSchedule::new(base, fin, 100, 10, 10, 0.0);
    assert_eq!(s.at(0), 0.0, "warm-up starts at start_warmup");
    assert_eq!(
        s.at(99),
        base,
        "np.linspace ends at base on the last warm-up iteration"
    );
    assert!((s.at(50) - 50.0 * base / 99.0).abs() < 1e-18);
    assert!(
        (s.at(100) - base).abs() < 1e-18,
        "the cosine starts at base"
    );
    // 900 cosine iterations: the midpoint j = 450 is (base + final) / 2.
    assert!((s.at(550) - (base + fin) / 2.0).abs() < 1e-15);
    // The last iteration is close to final: final + (base - final)(1 + cos(pi 899/900))/2.
    let last = fin + 0.5 * (base - fin) * (1.0 + (std::f64::consts::PI * 899.0 / 900.0).cos());
    assert!((s.at(999) - last).abs() < 1e-18);
    assert!((s.at(999) - fin).abs() < 1e-5 * (base - fin));
    assert_eq!(s.at(1000), fin);
    assert_eq!(s.at(5000), fin);
    assert_eq!(s.to_vec().len(), 1000);

    // The same values as DINO's array, built the numpy way in the test.
    let warm: Vec<f64> = (0..100)
        .map(|i| {
            if i == 99 {
                base
            } else {
                i as f64 * (base / 99.0)
            }
        })
        .collect();
    let cos: Vec<f64> = (0..900)
        .map(|i| fin + 0.5 * (base - fin) * (1.0 + (std::f64::consts::PI * i as f64 / 900.0).cos()))
        .collect();
    let dino: Vec<f64> = warm.into_iter().chain(cos).collect();
    for (i, (a, b)) in s.to_vec().iter().zip(&dino).enumerate() {
        assert!((a - b).abs() <= 1e-18, "iteration {i}: {a} vs {b}");
    }

    // No warm-up (weight decay, rising): starts at base, ends near final.
    let wd = CosineSchedule::new(0.04, 0.4, 100, 10, 0, 0.0);
    // final + (base - final) rounds to 0.03999999999999998, in numpy too.
    assert!((wd.at(0) - 0.04).abs() < 1e-15);
    assert!((wd.at(500) - 0.22).abs() < 1e-12);
    assert!((wd.at(999) - 0.4).abs() < 1e-5);
}

#[test]
fn dino_default_schedules() {
    let cfg = OptimConfig::default();
    assert_eq!(cfg.clip_mode, ClipMode::GlobalNorm);
    let s = cfg.schedules(512, 100, 20).unwrap();
    assert!((cfg.peak_lr(512) - 1e-3).abs() < 1e-15, "5e-4 * 512 / 256");
    assert_eq!(s.lr.at(0), 0.0);
    assert_eq!(s.lr.at(199), 1e-3, "10 warm-up epochs of 20 iterations");
    assert!((s.lr.at(1999) - 1e-6).abs() < 1e-8);
    assert!((s.weight_decay.at(0) - 0.04).abs() < 1e-15);
    assert!((s.weight_decay.at(1000) - 0.22).abs() < 1e-12);
    assert!((s.momentum.at(0) - 0.996).abs() < 1e-15);
    assert!((s.momentum.at(1000) - 0.998).abs() < 1e-12);
    assert!(s.momentum.at(1999) < 1.0 && s.momentum.at(1999) > 0.999_999);
}

#[test]
fn config_validation_names_the_field() {
    let field = |cfg: OptimConfig| {
        cfg.validate()
            .unwrap_err()
            .to_string()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let d = OptimConfig::default;
    assert!(d().validate().is_ok());
    assert_eq!(field(OptimConfig { lr: -1e-4, ..d() }), "optim.lr");
    assert_eq!(
        field(OptimConfig {
            min_lr: f64::NAN,
            ..d()
        }),
        "optim.min_lr"
    );
    assert_eq!(
        field(OptimConfig {
            weight_decay: -0.1,
            ..d()
        }),
        "optim.weight_decay"
    );
    assert_eq!(
        field(OptimConfig {
            momentum_teacher: 1.5,
            ..d()
        }),
        "optim.momentum_teacher"
    );
    assert_eq!(field(OptimConfig { beta2: 1.0, ..d() }), "optim.beta2");
    assert_eq!(field(OptimConfig { eps: 0.0, ..d() }), "optim.eps");
    assert_eq!(
        field(OptimConfig {
            clip_grad: -3.0,
            ..d()
        }),
        "optim.clip_grad"
    );
    let err = d().schedules(64, 5, 10).unwrap_err().to_string();
    assert!(err.starts_with("optim.warmup_epochs:"), "{err}");

    // serde: missing fields take DINO's defaults, unknown ones are refused.
    let cfg: OptimConfig =
        serde_json::from_str(r#"{"lr": 1e-3, "clip_mode": "global-norm"}"#).unwrap();
    assert_eq!(cfg.lr, 1e-3);
    assert_eq!(cfg.clip_mode, ClipMode::GlobalNorm);
    assert_eq!(cfg.min_lr, 1e-6);
    assert!(serde_json::from_str::<OptimConfig>(r#"{"learning_rate": 1e-3}"#).is_err());
    let back: OptimConfig = serde_json::from_str(&serde_json::to_string(&d()).unwrap()).unwrap();
    assert_eq!(back, d());
}

fn table() -> ParamTable {
    let mut t = ParamTable::new();
    t.push("blocks.0.mlp.fc1.weight", &[64, 300]);
    t.push("blocks.0.mlp.fc1.bias", &[64]);
    t.push("head.last_layer.weight_v", &[10, 7]);
    t.push("norm.weight", &[5]);
    t
}

#[test]
fn global_norm_clipping() {
    let mut g = randn(5, 50_000, 1.0);
    let before = l2_norm(&g);
    let norm = clip_global_norm(&mut g, 3.0);
    assert_eq!(norm, before);
    assert!(norm > 3.0);
    assert!((l2_norm(&g) - 3.0).abs() < 1e-5, "{}", l2_norm(&g));
    // Below the limit nothing changes.
    let mut small = randn(6, 100, 0.01);
    let copy = small.clone();
    let norm = clip_global_norm(&mut small, 3.0);
    assert!(norm < 3.0);
    assert_eq!(small, copy);
    // The norm itself against a plain f64 sum.
    let direct: f64 = copy
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    assert!((f64::from(norm) - direct).abs() < 1e-7);
}

#[test]
fn per_tensor_clipping() {
    let t = table();
    let mut g = randn(7, t.total(), 1.0);
    // The bias and the norm weight stay below the limit.
    for name in ["blocks.0.mlp.fc1.bias", "norm.weight"] {
        t.slice_mut(&mut g, name)
            .iter_mut()
            .for_each(|x| *x *= 0.01);
    }
    let copy = g.clone();
    let norms = clip_per_tensor(&mut g, &t, 3.0);
    assert_eq!(norms.len(), 4);
    for (info, &norm) in t.tensors().iter().zip(&norms) {
        let before = l2_norm(t.slice(&copy, &info.name));
        let after = l2_norm(t.slice(&g, &info.name));
        assert_eq!(norm, before, "{}", info.name);
        assert!(after <= 3.0 + 1e-5, "{}: {after}", info.name);
        if before > 3.0 {
            assert!((after - 3.0).abs() < 1e-5, "{}: {after}", info.name);
        } else {
            assert_eq!(t.slice(&g, &info.name), t.slice(&copy, &info.name));
        }
    }
    assert!(norms[0] > 3.0 && norms[2] > 3.0 && norms[1] < 3.0 && norms[3] < 3.0);
}

#[test]
fn norms_do_not_depend_on_thread_count() {
    let g = randn(8, 300_000, 1.0);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut x = g.clone();
            let n = clip_global_norm(&mut x, 1.0);
            (n.to_bits(), x)
        })
    };
    let one = run(1);
    assert!(run(2) == one && run(3) == one);
}

#[test]
fn ema_closed_form() {
    // t_n = s + (t_0 - s) m^n for a fixed student.
    let s = randn(9, 1000, 1.0);
    let t0 = randn(10, 1000, 1.0);
    let mut t = t0.clone();
    for _ in 0..20 {
        ema_update(&mut t, &s, 0.9);
    }
    let m20 = 0.9f64.powi(20);
    for i in 0..1000 {
        let want = f64::from(s[i]) + (f64::from(t0[i]) - f64::from(s[i])) * m20;
        assert!((f64::from(t[i]) - want).abs() < 1e-5, "{i}");
    }
    // One step by hand: 0.996 * 1 + 0.004 * 3 = 1.008; momentum 1 leaves the teacher.
    let mut one = vec![1.0f32];
    ema_update(&mut one, &[3.0], 0.996);
    assert!((f64::from(one[0]) - 1.008).abs() < 1e-6);
    ema_update(&mut one, &[100.0], 1.0);
    assert!((f64::from(one[0]) - 1.008).abs() < 1e-6);
}

#[test]
fn last_layer_cancelled_only_in_the_first_epoch() {
    let t = table();
    let g0 = vec![1.0f32; t.total()];
    let mut g = g0.clone();
    assert!(cancel_last_layer_grads(&mut g, &t, 0, 1));
    for info in t.tensors() {
        let zero = info.name.starts_with("head.last_layer");
        assert!(
            t.slice(&g, &info.name)
                .iter()
                .all(|&x| x == if zero { 0.0 } else { 1.0 }),
            "{}",
            info.name
        );
    }
    let mut g = g0.clone();
    assert!(!cancel_last_layer_grads(&mut g, &t, 1, 1));
    assert_eq!(g, g0);
    let mut g = g0.clone();
    assert!(
        !cancel_last_layer_grads(&mut g, &t, 0, 0),
        "freeze 0 = never"
    );
    assert_eq!(g, g0);
}

#[test]
fn non_finite_detection() {
    let mut x = vec![0.5f32; 100_000];
    assert!(!has_non_finite(&x));
    x[77_777] = f32::NAN;
    assert!(has_non_finite(&x));
    x[77_777] = f32::NEG_INFINITY;
    assert!(has_non_finite(&x));
}
