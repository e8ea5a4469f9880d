//! Per-patch photometric augmentation through its public entry point, `augment_view`:
//! independence of patches, patch borders, range, determinism, stream addressing and firing
//! rates, each checked against an independent expectation.

use proptest::prelude::*;
use pwself_engine::rng::{Purpose, Stream};
use pwself_engine::views::photometric::{
    augment_region, augment_view, region_counter, PhotometricConfig, RegionDraws, WHOLE_VIEW,
};

/// Every operator off; tests switch on what they need.
fn off() -> PhotometricConfig {
    PhotometricConfig::none()
}

/// Jitter always, nothing else.
fn jitter_only(p: f32) -> PhotometricConfig {
    PhotometricConfig {
        jitter_p: p,
        ..off()
    }
}

/// A planar (3, side, side) view of one colour.
fn constant_view(side: usize, rgb: [f32; 3]) -> Vec<f32> {
    rgb.iter()
        .flat_map(|&v| std::iter::repeat(v).take(side * side))
        .collect()
}

/// A deterministic pseudo-random planar view in [0, 1].
fn noisy_view(c: usize, side: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(salt, [0, 0, 0], Purpose::Shuffle);
    (0..c * side * side).map(|_| s.next_f32()).collect()
}

/// The `(C, patch, patch)` values of patch `(pr, pc)`.
fn patch_values(v: &[f32], c: usize, side: usize, patch: usize, pr: usize, pc: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(c * patch * patch);
    for ch in 0..c {
        for y in 0..patch {
            let at = (ch * side + pr * patch + y) * side + pc * patch;
            out.extend_from_slice(&v[at..at + patch]);
        }
    }
    out
}

#[test]
fn all_operators_off_is_the_identity() {
    let src = noisy_view(3, 28, 1);
    for per_patch in [true, false] {
        let mut v = src.clone();
        augment_view(&mut v, 3, 28, 4, per_patch, &off(), 5, 0, 0, 0);
        assert_eq!(v, src);
    }
}

/// On a constant view, jitter keeps each patch constant (brightness, contrast with the
/// patch's own mean, saturation and hue are per-pixel maps of equal pixels), so a patch is
/// summarised by one colour. With independent draws the 49 colours are all different.
#[test]
fn patches_get_independent_draws() {
    let (side, patch) = (28, 4);
    let mut v = constant_view(side, [0.6, 0.4, 0.3]);
    augment_view(&mut v, 3, side, patch, true, &jitter_only(1.0), 11, 2, 3, 1);
    let grid = side / patch;
    let mut colours: Vec<[f32; 3]> = Vec::new();
    for pr in 0..grid {
        for pc in 0..grid {
            let vals = patch_values(&v, 3, side, patch, pr, pc);
            let n = patch * patch;
            for ch in 0..3 {
                let first = vals[ch * n];
                assert!(vals[ch * n..(ch + 1) * n]
                    .iter()
                    .all(|&x| (x - first).abs() < 1e-6));
            }
            colours.push([vals[0], vals[n], vals[2 * n]]);
        }
    }
    for i in 0..colours.len() {
        for j in i + 1..colours.len() {
            assert_ne!(colours[i], colours[j], "patches {i} and {j} share a colour");
        }
    }
}

/// Per view: one draw for the whole view, so a constant view stays constant (and, jitter
/// having fired, changes colour).
#[test]
fn per_view_mode_draws_once_for_the_whole_view() {
    let side = 28;
    let src = constant_view(side, [0.6, 0.4, 0.3]);
    let mut v = src.clone();
    augment_view(&mut v, 3, side, 4, false, &jitter_only(1.0), 11, 2, 3, 1);
    let n = side * side;
    for ch in 0..3 {
        let first = v[ch * n];
        assert!(v[ch * n..(ch + 1) * n]
            .iter()
            .all(|&x| (x - first).abs() < 1e-6));
    }
    assert_ne!(v, src);
}

/// A view whose patches are constant but all different stays exactly piecewise constant
/// under a per-patch blur (each patch only sees its own pixels), while the per-view blur
/// mixes values across patch borders.
#[test]
fn blur_never_reads_across_a_patch_border() {
    let (side, patch) = (28, 4);
    let grid = side / patch;
    let mut src = vec![0.0f32; 3 * side * side];
    for ch in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let k = (y / patch) * grid + x / patch;
                src[(ch * side + y) * side + x] = ((k * 7 + ch * 3) % 17) as f32 / 16.0;
            }
        }
    }
    let cfg = PhotometricConfig {
        blur_p: 1.0,
        blur_sigma: (1.0, 2.0),
        ..off()
    };
    let mut v = src.clone();
    augment_view(&mut v, 3, side, patch, true, &cfg, 3, 0, 0, 0);
    for (a, b) in v.iter().zip(&src) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    let mut w = src.clone();
    augment_view(&mut w, 3, side, patch, false, &cfg, 3, 0, 0, 0);
    // Channel 0, row 0: patches 0 and 1 hold 0/16 and 7/16; pixels at the border move.
    let (left, right) = (w[patch - 1], w[patch]);
    assert!(left > 0.01 && right < 7.0 / 16.0 - 0.01, "{left} {right}");
}

fn strong_all_on() -> PhotometricConfig {
    PhotometricConfig {
        jitter_p: 1.0,
        brightness: 0.9,
        contrast: 0.9,
        saturation: 0.9,
        hue: 0.5,
        grayscale_p: 1.0,
        blur_p: 1.0,
        blur_sigma: (0.1, 3.0),
        solarize_p: 1.0,
        solarize_threshold: 0.5,
        noise_p: 1.0,
        noise_sigma: 0.5,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random inputs, every operator forced on at high strength: outputs stay in [0, 1].
    #[test]
    fn outputs_stay_in_unit_interval(
        salt in any::<u64>(),
        seed in any::<u64>(),
        rgb in any::<bool>(),
        per_patch in any::<bool>(),
        grayscale in any::<bool>(),
    ) {
        let c = if rgb { 3 } else { 1 };
        let mut v = noisy_view(c, 16, salt);
        let cfg = PhotometricConfig {
            grayscale_p: if grayscale { 1.0 } else { 0.0 },
            ..strong_all_on()
        };
        augment_view(&mut v, c, 16, 4, per_patch, &cfg, seed, 1, 2, 3);
        prop_assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    }
}

#[test]
fn outputs_stay_in_unit_interval_at_the_extremes() {
    // All zeros, all ones, and a 0/1 checkerboard.
    let side = 16;
    let views = [
        vec![0.0f32; 3 * side * side],
        vec![1.0f32; 3 * side * side],
        (0..3 * side * side).map(|i| (i % 2) as f32).collect(),
    ];
    for src in views {
        for per_patch in [true, false] {
            for seed in 0..20 {
                let mut v = src.clone();
                augment_view(
                    &mut v,
                    3,
                    side,
                    4,
                    per_patch,
                    &strong_all_on(),
                    seed,
                    0,
                    0,
                    0,
                );
                assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
            }
        }
    }
}

#[test]
fn same_arguments_same_output_and_every_counter_matters() {
    let src = noisy_view(3, 32, 7);
    let cfg = PhotometricConfig::dino_global2();
    let run = |seed: u64, batch: u32, image: u32, view: u32| {
        let mut v = src.clone();
        augment_view(&mut v, 3, 32, 8, true, &cfg, seed, batch, image, view);
        v
    };
    let base = run(1, 2, 3, 4);
    assert_eq!(base, run(1, 2, 3, 4));
    assert_ne!(base, run(1, 2, 5, 4), "image index");
    assert_ne!(base, run(1, 7, 3, 4), "batch index");
    assert_ne!(base, run(1, 2, 3, 5), "view index");
    assert_ne!(base, run(9, 2, 3, 4), "seed");
}

/// Patch k of the view is exactly `augment_region` on that patch with the streams at counter
/// `[batch, image, (view << 20) | k]`, and per-view mode uses region `0xFFFFF`: the stream
/// addressing the GPU kernel has to reproduce.
#[test]
fn regions_read_their_documented_streams() {
    let (c, side, patch) = (3, 24, 8);
    let src = noisy_view(c, side, 3);
    let cfg = PhotometricConfig {
        noise_p: 0.6,
        ..PhotometricConfig::dino_global2()
    };
    let (seed, batch, image, view) = (77u64, 5u32, 6u32, 9u32);
    let mut v = src.clone();
    augment_view(&mut v, c, side, patch, true, &cfg, seed, batch, image, view);
    let grid = side / patch;
    let mut scratch = Vec::new();
    for pr in 0..grid {
        for pc in 0..grid {
            let k = (pr * grid + pc) as u32;
            let ctr = [batch, image, (view << 20) | k];
            let draws = RegionDraws::draw(&cfg, &mut Stream::new(seed, ctr, Purpose::Photometric));
            let mut noise = Stream::new(seed, ctr, Purpose::Noise);
            let mut want = patch_values(&src, c, side, patch, pr, pc);
            augment_region(&mut want, c, patch, patch, &draws, &mut noise, &mut scratch);
            assert_eq!(patch_values(&v, c, side, patch, pr, pc), want, "patch {k}");
        }
    }
    let mut whole = src.clone();
    augment_view(
        &mut whole, c, side, patch, false, &cfg, seed, batch, image, view,
    );
    let ctr = [batch, image, region_counter(view, WHOLE_VIEW)];
    let draws = RegionDraws::draw(&cfg, &mut Stream::new(seed, ctr, Purpose::Photometric));
    let mut want = src.clone();
    let mut noise = Stream::new(seed, ctr, Purpose::Noise);
    augment_region(&mut want, c, side, side, &draws, &mut noise, &mut scratch);
    assert_eq!(whole, want);
}

/// Jitter with p = 0.8 on a constant view changes a patch iff it fires (the factors are
/// continuous, so a fired jitter that leaves the colour unchanged has probability ~0).
/// 4 views of 56 x 56 patches: n = 12544, the fraction's standard deviation is
/// sqrt(0.8 * 0.2 / n) = 0.0036; tolerance 0.018 is 5 standard deviations.
#[test]
fn jitter_fires_in_about_eighty_percent_of_patches() {
    let (side, patch) = (224, 4);
    let src = constant_view(side, [0.6, 0.4, 0.3]);
    let grid = side / patch;
    let (mut fired, mut total) = (0usize, 0usize);
    for view in 0..4 {
        let mut v = src.clone();
        augment_view(
            &mut v,
            3,
            side,
            patch,
            true,
            &jitter_only(0.8),
            21,
            0,
            1,
            view,
        );
        for pr in 0..grid {
            for pc in 0..grid {
                let vals = patch_values(&v, 3, side, patch, pr, pc);
                let n = patch * patch;
                let changed = (0..3).any(|ch| (vals[ch * n] - [0.6, 0.4, 0.3][ch]).abs() > 1e-7);
                fired += usize::from(changed);
                total += 1;
            }
        }
    }
    let rate = fired as f64 / total as f64;
    assert!(
        (rate - 0.8).abs() < 0.018,
        "jitter fired in {rate} of {total} patches"
    );
}

/// Every gate of the DINO configs fires at its probability. n = 20000 regions per config;
/// the largest standard deviation of a rate is sqrt(0.25 / n) = 0.0035; tolerance 0.018.
#[test]
fn every_gate_fires_at_its_probability() {
    let n = 20_000u32;
    for cfg in [
        PhotometricConfig::dino_global1(),
        PhotometricConfig::dino_global2(),
        PhotometricConfig::dino_local(),
    ] {
        let mut counts = [0u32; 5];
        for k in 0..n {
            let mut s = Stream::new(4, [0, k, region_counter(0, k % 4096)], Purpose::Photometric);
            let d = RegionDraws::draw(&cfg, &mut s);
            for (c, on) in
                counts
                    .iter_mut()
                    .zip([d.jitter, d.grayscale, d.blur, d.solarize, d.noise])
            {
                *c += u32::from(on);
            }
            assert!(d.blur_sigma >= cfg.blur_sigma.0 && d.blur_sigma <= cfg.blur_sigma.1);
            assert!((0.6..=1.4).contains(&d.brightness) && d.hue.abs() <= 0.1);
        }
        let want = [
            cfg.jitter_p,
            cfg.grayscale_p,
            cfg.blur_p,
            cfg.solarize_p,
            cfg.noise_p,
        ];
        for (c, p) in counts.iter().zip(want) {
            let rate = f64::from(*c) / f64::from(n);
            assert!(
                (rate - f64::from(p)).abs() < 0.018,
                "{rate} vs {p} in {cfg:?}"
            );
        }
    }
}

/// One channel: saturation, hue and grayscale are identities.
#[test]
fn single_channel_ignores_colour_operators() {
    let src = noisy_view(1, 28, 5);
    let cfg = PhotometricConfig {
        jitter_p: 1.0,
        brightness: 0.0,
        contrast: 0.0,
        saturation: 0.5,
        hue: 0.5,
        grayscale_p: 1.0,
        ..off()
    };
    for per_patch in [true, false] {
        let mut v = src.clone();
        augment_view(&mut v, 1, 28, 4, per_patch, &cfg, 8, 0, 0, 0);
        assert_eq!(v, src);
    }
}

/// Per-view noise on a constant grey view: residuals have the configured sigma.
/// n = 3 * 224 * 224 = 150528: the sample std's standard error is 0.04 / sqrt(2n) = 7e-5.
#[test]
fn per_view_noise_has_the_configured_sigma() {
    let cfg = PhotometricConfig {
        noise_p: 1.0,
        ..off()
    };
    let mut v = constant_view(224, [0.5; 3]);
    augment_view(&mut v, 3, 224, 16, false, &cfg, 1, 0, 0, 0);
    let n = v.len() as f64;
    let var = v.iter().map(|&x| (f64::from(x) - 0.5).powi(2)).sum::<f64>() / n;
    assert!((var.sqrt() - 0.04).abs() < 4e-4, "{}", var.sqrt());
}
