//! The PW-Self losses against hand-computed values, an independent f64 implementation of
//! SPEC.md section 5, and central finite differences of that implementation.

use pwself_engine::loss::{
    matched_ce, pwself_loss, teacher_temperature, update_center, LossConfig, LossKind,
    StudentLayout, TeacherLogits,
};
use pwself_engine::rng::{Purpose, Stream};
use pwself_engine::views::matching::{Matches, PairMatches};

const LN2: f64 = std::f64::consts::LN_2;

fn pair(teacher_view: usize, student_view: usize, first: &[u32], second: &[u32]) -> PairMatches {
    PairMatches {
        teacher_view,
        student_view,
        matches: Matches {
            first: first.to_vec(),
            second: second.to_vec(),
        },
    }
}

// ---------------------------------------------------------------------------------------
// A batch: teacher logits of the global views, the centre, and student logits of every
// token of every view (the test gathers the rows the layout asks for).

struct Case {
    b: usize,
    k: usize,
    t_g: usize,
    /// Tokens per view (the globals first).
    tokens: Vec<usize>,
    pairs: Vec<PairMatches>,
    /// Per global view, (B, T_g, K).
    teacher: Vec<Vec<f32>>,
    /// (T_g, K).
    center: Vec<f32>,
    /// Per view, (B, T_v, K): the student's logits of every token.
    student: Vec<Vec<f32>>,
    tau_s: f32,
    tau_t: f32,
}

impl Case {
    fn student_rows(&self, layout: &StudentLayout) -> Vec<f32> {
        let mut rows = Vec::with_capacity(layout.rows() * self.k);
        for (b, view, token) in layout.gather_list() {
            let (view, token) = (view as usize, token as usize);
            let at = (b * self.tokens[view] + token) * self.k;
            rows.extend_from_slice(&self.student[view][at..at + self.k]);
        }
        rows
    }

    /// The engine's loss and gradient w.r.t. the gathered rows.
    fn engine(&self, kind: LossKind, patches: bool) -> (StudentLayout, f32, Vec<f32>) {
        let layout = StudentLayout::new(&self.pairs, self.b, patches);
        let views: Vec<&[f32]> = self.teacher.iter().map(Vec::as_slice).collect();
        let teacher = TeacherLogits {
            views: &views,
            center: &self.center,
            tokens: self.t_g,
            classes: self.k,
            temperature: self.tau_t,
        };
        let student = self.student_rows(&layout);
        let mut grad = vec![f32::NAN; student.len()];
        let loss = pwself_loss(&layout, kind, &teacher, &student, self.tau_s, &mut grad);
        (layout, loss, grad)
    }

    /// SPEC.md section 5 written out in f64, straight from the equations, on the
    /// student logits `student` (per view, (B, T_v, K)).
    fn reference(&self, kind: LossKind, student: &[Vec<f64>]) -> f64 {
        let k = self.k;
        let mut total = 0.0;
        for p in &self.pairs {
            let (i, j) = (p.teacher_view, p.student_view);
            for b in 0..self.b {
                let h = |m: usize| {
                    let (ti, sj) = (p.matches.first[m] as usize, p.matches.second[m] as usize);
                    let t = &self.teacher[i][(b * self.t_g + ti) * k..][..k];
                    let c = &self.center[ti * k..][..k];
                    let x: Vec<f64> = (0..k)
                        .map(|c_| (f64::from(t[c_]) - f64::from(c[c_])) / f64::from(self.tau_t))
                        .collect();
                    let s = &student[j][(b * self.tokens[j] + sj) * k..][..k];
                    let y: Vec<f64> = s.iter().map(|&s| s / f64::from(self.tau_s)).collect();
                    let pt = softmax(&x);
                    let lq = log_softmax(&y);
                    -(0..k).map(|c_| pt[c_] * lq[c_]).sum::<f64>()
                };
                let n = p.matches.len();
                total += match kind {
                    LossKind::Dino => h(0),
                    LossKind::Pwml => (0..n).map(h).sum::<f64>() / n as f64,
                    LossKind::Pwsl => (0..n).map(h).sum::<f64>(),
                    LossKind::Pwll { lambda } => {
                        let lambda = f64::from(lambda);
                        let patches = if n > 1 {
                            (1..n).map(h).sum::<f64>() / (n - 1) as f64
                        } else {
                            0.0
                        };
                        lambda * h(0) + (1.0 - lambda) * patches
                    }
                };
            }
        }
        total / (self.b * self.pairs.len()) as f64
    }

    fn student_f64(&self) -> Vec<Vec<f64>> {
        self.student
            .iter()
            .map(|v| v.iter().map(|&x| f64::from(x)).collect())
            .collect()
    }
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&x| (x - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|e| e / z).collect()
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lz = x.iter().map(|&x| (x - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&x| x - lz).collect()
}

/// A random case: 2 global views of `t_g` tokens, one local view of 5 tokens; pairs
/// (0,1) with 3 matches, (0,2) with 2, (1,0) with 3, (1,2) with none but CLS.
fn random_case(seed: u64, b: usize, k: usize, scale: f32) -> Case {
    let t_g = 5;
    let tokens = vec![t_g, t_g, 5];
    let mut rng = Stream::new(seed, [1, 2, 3], Purpose::Noise);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| scale * rng.normal()).collect() };
    let teacher = vec![draw(b * t_g * k), draw(b * t_g * k)];
    let center = draw(t_g * k).iter().map(|x| 0.3 * x).collect();
    let student = tokens.iter().map(|&t| draw(b * t * k)).collect();
    let pairs = vec![
        pair(0, 1, &[0, 1, 4], &[0, 2, 3]),
        pair(0, 2, &[0, 3], &[0, 4]),
        pair(1, 0, &[0, 2, 4], &[0, 1, 3]),
        pair(1, 2, &[0], &[0]),
    ];
    Case {
        b,
        k,
        t_g,
        tokens,
        pairs,
        teacher,
        center,
        student,
        tau_s: 0.1,
        tau_t: 0.04,
    }
}

const KINDS: [LossKind; 5] = [
    LossKind::Dino,
    LossKind::Pwml,
    LossKind::Pwsl,
    LossKind::Pwll { lambda: 0.2 },
    LossKind::Pwll { lambda: 0.5 },
];

fn close(a: f64, b: f64, rel: f64, what: &str) {
    assert!(
        (a - b).abs() <= rel * b.abs().max(1e-3),
        "{what}: {a} vs {b} (rel tol {rel})"
    );
}

// ---------------------------------------------------------------------------------------
// Hand-computed case. One pair: teacher view 0 (3 tokens), student view 1 (4 tokens),
// matches first = [0, 2, 1], second = [0, 1, 3]. K = 3, B = 1.
// Teacher: (t - C[p]) / tau_t is (ln 2, 0, 0) for token 0, (0, 0, 0) for token 2 and
// (0, 0, ln 2) for token 1, so p_t = (1/2, 1/4, 1/4), (1/3, 1/3, 1/3), (1/4, 1/4, 1/2).
// Student: s / tau_s is (ln 2, 0, ln 2) for tokens 0 and 1, so q_s = (2/5, 1/5, 2/5), and
// a constant for token 3, so q_s = (1/3, 1/3, 1/3).
//   H0 = -(1/2 ln 2/5 + 1/4 ln 1/5 + 1/4 ln 2/5) = 3/4 ln(5/2) + 1/4 ln 5 = 1.0895775270141412
//   H1 = -(1/3)(2 ln 2/5 + ln 1/5)             = (2 ln(5/2) + ln 5) / 3  = 1.1473397920608033
//   H2 = ln 3                                                             = 1.0986122886681098

const H0: f64 = 1.089_577_527_014_141_2;
const H1: f64 = 1.147_339_792_060_803_3;
const H2: f64 = 1.098_612_288_668_109_8;

fn hand_case() -> Case {
    let (tau_s, tau_t) = (0.1f32, 0.04f32);
    let ln2t = (LN2 * f64::from(tau_t)) as f32;
    let ln2s = (LN2 * f64::from(tau_s)) as f32;
    // A different centre per token position, so a wrong position would show.
    // (The components that carry ln 2 have centre 0, so t - C is exact in f32.)
    let center = vec![0.0, 2.0, 3.0, 0.5, 0.5, 0.0, -1.0, 0.0, 1.0];
    let teacher = vec![
        ln2t, 2.0, 3.0, // token 0: C[0] + tau_t (ln 2, 0, 0)
        0.5, 0.5, ln2t, // token 1: C[1] + tau_t (0, 0, ln 2)
        -1.0, 0.0, 1.0, // token 2: C[2]
    ];
    let student = vec![
        ln2s, 0.0, ln2s, // token 0
        ln2s, 0.0, ln2s, // token 1
        9.0, 9.0, 9.0, // token 2 (unmatched)
        7.0, 7.0, 7.0, // token 3
    ];
    Case {
        b: 1,
        k: 3,
        t_g: 3,
        tokens: vec![3, 4],
        pairs: vec![pair(0, 1, &[0, 2, 1], &[0, 1, 3])],
        teacher: vec![teacher],
        center,
        student: vec![vec![0.0; 9], student],
        tau_s,
        tau_t,
    }
}

#[test]
fn hand_computed_losses_and_gradients() {
    let case = hand_case();
    let expected = [
        (LossKind::Dino, H0),
        (LossKind::Pwml, (H0 + H1 + H2) / 3.0),
        (LossKind::Pwsl, H0 + H1 + H2),
        (
            LossKind::Pwll { lambda: 0.2 },
            0.2 * H0 + 0.8 * (H1 + H2) / 2.0,
        ),
    ];
    // Written out: 1.0895775270141412, 1.111843202581018, 3.3355296077430543, 1.1162963376943937.
    let written = [
        1.089_577_527_014_141_2,
        1.111_843_202_581_018,
        3.335_529_607_743_054_3,
        1.116_296_337_694_393_7,
    ];
    for ((kind, want), written) in expected.into_iter().zip(written) {
        close(want, written, 1e-15, "hand arithmetic");
        let (layout, loss, grad) = case.engine(kind, true);
        assert_eq!(layout.student_tokens(), &[(1, 0), (1, 1), (1, 3)]);
        close(f64::from(loss), want, 1e-6, &format!("{kind:?} loss"));
        // Gradient rows (q_s - p_t) / tau_s times the weights:
        // row 0 (m = 0): (2/5 - 1/2, 1/5 - 1/4, 2/5 - 1/4) / 0.1 = (-1, -1/2, 3/2)
        // row 1 (m = 1): (2/5 - 1/3, 1/5 - 1/3, 2/5 - 1/3) / 0.1 = (2/3, -4/3, 2/3)
        // row 2 (m = 2): (1/3 - 1/4, 1/3 - 1/4, 1/3 - 1/2) / 0.1 = (5/6, 5/6, -5/3)
        let unit = [
            [-1.0, -0.5, 1.5],
            [2.0 / 3.0, -4.0 / 3.0, 2.0 / 3.0],
            [5.0 / 6.0, 5.0 / 6.0, -5.0 / 3.0],
        ];
        let w: [f64; 3] = match kind {
            LossKind::Dino => [1.0, 0.0, 0.0],
            LossKind::Pwml => [1.0 / 3.0; 3],
            LossKind::Pwsl => [1.0; 3],
            LossKind::Pwll { lambda } => {
                let l = f64::from(lambda);
                [l, (1.0 - l) / 2.0, (1.0 - l) / 2.0]
            }
        };
        for r in 0..3 {
            for c in 0..3 {
                let got = f64::from(grad[r * 3 + c]);
                let want = w[r] * unit[r][c];
                assert!(
                    (got - want).abs() < 2e-6,
                    "{kind:?} grad[{r}][{c}] = {got}, want {want}"
                );
            }
        }
    }
}

#[test]
fn random_batches_match_the_f64_reference() {
    for (seed, b, k) in [(1, 1, 3), (2, 2, 4), (3, 2, 17)] {
        let case = random_case(seed, b, k, 1.0);
        let s64 = case.student_f64();
        for kind in KINDS {
            let (_, loss, _) = case.engine(kind, true);
            let want = case.reference(kind, &s64);
            close(
                f64::from(loss),
                want,
                2e-6,
                &format!("seed {seed} {kind:?}"),
            );
        }
    }
}

#[test]
fn gradient_matches_central_finite_differences() {
    let case = random_case(7, 2, 4, 1.0);
    let h = 1e-5;
    for kind in KINDS {
        let (layout, _, grad) = case.engine(kind, true);
        let base = case.student_f64();
        for (view, &t_v) in case.tokens.iter().enumerate() {
            for b in 0..case.b {
                for token in 0..t_v {
                    let u = layout
                        .student_tokens()
                        .iter()
                        .position(|&x| x == (view as u32, token as u32));
                    for c in 0..case.k {
                        let at = (b * t_v + token) * case.k + c;
                        let mut s = base.clone();
                        s[view][at] += h;
                        let plus = case.reference(kind, &s);
                        s[view][at] -= 2.0 * h;
                        let minus = case.reference(kind, &s);
                        let fd = (plus - minus) / (2.0 * h);
                        let got = u.map_or(0.0, |u| f64::from(grad[layout.row(b, u) * case.k + c]));
                        assert!(
                            (got - fd).abs() < 1e-5 + 1e-4 * fd.abs(),
                            "{kind:?} view {view} image {b} token {token} k {c}: {got} vs fd {fd}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn pwll_without_patch_pairs_is_lambda_times_cls() {
    // Every pair CLS only (M = 1): PWLL = lambda * H(CLS), not renormalised to H(CLS).
    let mut case = random_case(11, 2, 5, 1.0);
    for p in &mut case.pairs {
        p.matches = Matches::cls_only();
    }
    let s64 = case.student_f64();
    let h_cls = case.reference(LossKind::Dino, &s64);
    for lambda in [0.0f32, 0.2, 0.5, 1.0] {
        let (_, loss, grad) = case.engine(LossKind::Pwll { lambda }, true);
        close(
            f64::from(loss),
            f64::from(lambda) * h_cls,
            1e-6,
            &format!("lambda {lambda}"),
        );
        if lambda == 0.0 {
            assert!(
                grad.iter().all(|&g| g == 0.0),
                "lambda 0 with no patch: no gradient"
            );
        }
    }
    // With no overlap every loss falls back to the CLS term alone.
    for kind in [LossKind::Dino, LossKind::Pwml, LossKind::Pwsl] {
        let (layout, loss, _) = case.engine(kind, true);
        assert_eq!(layout.rows_per_image(), 3, "one CLS row per student view");
        close(
            f64::from(loss),
            h_cls,
            1e-6,
            &format!("{kind:?} CLS fallback"),
        );
    }
}

#[test]
fn no_overlap_pair_counts_its_cls_term() {
    // Pair (1, 2) of the random case has no overlap: it still counts in the mean over
    // pairs with its CLS term, for every loss.
    let case = random_case(13, 2, 4, 1.0);
    assert_eq!(case.pairs[3].matches, Matches::cls_only());
    let s64 = case.student_f64();
    let mut without = random_case(13, 2, 4, 1.0);
    without.pairs.truncate(3);
    let mut cls_only = random_case(13, 2, 4, 1.0);
    cls_only.pairs = vec![case.pairs[3].clone()];
    for kind in KINDS {
        let all = case.reference(kind, &s64) * 4.0;
        let parts = without.reference(kind, &s64) * 3.0 + cls_only.reference(kind, &s64);
        close(all, parts, 1e-12, "reference decomposes over pairs");
        let cls = cls_only.reference(kind, &s64);
        let h_cls = cls_only.reference(LossKind::Dino, &s64);
        let weight = match kind {
            LossKind::Pwll { lambda } => f64::from(lambda),
            _ => 1.0,
        };
        close(
            cls,
            weight * h_cls,
            1e-12,
            &format!("{kind:?} CLS-only pair"),
        );
        let (_, loss, _) = cls_only.engine(kind, true);
        close(
            f64::from(loss),
            cls,
            1e-6,
            &format!("{kind:?} engine CLS-only pair"),
        );
    }
}

#[test]
fn dino_with_or_without_patch_rows_agrees() {
    let case = random_case(17, 2, 6, 1.0);
    let (full, loss_full, grad_full) = case.engine(LossKind::Dino, true);
    let (cls, loss_cls, grad_cls) = case.engine(LossKind::Dino, false);
    assert_eq!(loss_full.to_bits(), loss_cls.to_bits());
    assert_eq!(cls.rows_per_image(), 3, "CLS of each student view");
    let k = case.k;
    for b in 0..case.b {
        for (u, &tok) in full.student_tokens().iter().enumerate() {
            let g = &grad_full[full.row(b, u) * k..][..k];
            match cls.student_tokens().iter().position(|&x| x == tok) {
                Some(v) => assert_eq!(g, &grad_cls[cls.row(b, v) * k..][..k]),
                None => assert!(
                    g.iter().all(|&x| x == 0.0),
                    "patch rows get no DINO gradient"
                ),
            }
        }
    }
}

#[test]
fn layout_rows_are_unique_sorted_and_cover_every_term() {
    let case = random_case(19, 3, 2, 1.0);
    let layout = StudentLayout::new(&case.pairs, case.b, true);
    let toks = layout.student_tokens();
    assert!(
        toks.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    assert_eq!(layout.rows(), 3 * toks.len());
    let gather: Vec<_> = layout.gather_list().collect();
    assert_eq!(gather.len(), layout.rows());
    for (r, &(b, v, t)) in gather.iter().enumerate() {
        assert_eq!(r, layout.row(b, r % toks.len()));
        assert_eq!((v, t), toks[r % toks.len()]);
    }
    // Every (pair, m) appears exactly once, in the row of its student token.
    let mut seen = Vec::new();
    for (u, &(view, token)) in toks.iter().enumerate() {
        for term in layout.terms_of(u) {
            let p = &case.pairs[term.pair as usize];
            assert_eq!(
                (p.student_view as u32, p.matches.second[term.m as usize]),
                (view, token)
            );
            let tt = layout.teacher_tokens()[term.teacher as usize];
            assert_eq!(
                (p.teacher_view as u32, p.matches.first[term.m as usize]),
                tt
            );
            assert_eq!(term.count as usize, p.matches.len());
            seen.push((term.pair, term.m));
        }
    }
    seen.sort_unstable();
    let total: usize = case.pairs.iter().map(|p| p.matches.len()).sum();
    assert_eq!(seen.len(), total);
    seen.dedup();
    assert_eq!(seen.len(), total);
    // Student token (2, 0), the local view's CLS, is shared by pairs (0, 2) and (1, 2).
    let u = toks.iter().position(|&x| x == (2, 0)).unwrap();
    assert_eq!(layout.terms_of(u).len(), 2);
}

#[test]
fn weights_average_over_images_and_pairs() {
    let case = random_case(23, 2, 3, 1.0);
    let layout = StudentLayout::new(&case.pairs, case.b, true);
    // PWSL terms weigh 1 / (B * pairs); PWML's of a pair sum to that.
    let w = layout.weights(LossKind::Pwsl);
    assert!(w.iter().all(|&w| (w - 1.0 / 8.0).abs() < 1e-9));
    let w = layout.weights(LossKind::Pwml);
    let mut per_pair = [0.0f64; 4];
    for (t, &w) in layout.terms().iter().zip(&w) {
        per_pair[t.pair as usize] += f64::from(w);
    }
    assert!(
        per_pair.iter().all(|&s| (s - 1.0 / 8.0).abs() < 1e-7),
        "{per_pair:?}"
    );
}

#[test]
fn large_logits_stay_finite() {
    let case = random_case(29, 2, 8, 1e3);
    let s64 = case.student_f64();
    for kind in KINDS {
        let (_, loss, grad) = case.engine(kind, true);
        assert!(loss.is_finite(), "{kind:?}: loss {loss}");
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{kind:?}: non-finite gradient"
        );
        let want = case.reference(kind, &s64);
        close(f64::from(loss), want, 1e-4, &format!("{kind:?} at 1e3"));
        // Each row's gradient sums to 0 (both softmaxes sum to 1).
        for row in grad.chunks(case.k) {
            let s: f64 = row.iter().map(|&g| f64::from(g)).sum();
            assert!(s.abs() < 1e-4, "{kind:?}: row sums to {s}");
        }
    }
}

#[test]
fn same_bits_for_any_thread_count() {
    let case = random_case(31, 4, 1000, 2.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (_, loss, grad) = case.engine(LossKind::Pwll { lambda: 0.3 }, true);
            let mut center = case.center.clone();
            let views: Vec<&[f32]> = case.teacher.iter().map(Vec::as_slice).collect();
            update_center(&mut center, &views, case.b, case.t_g, case.k, 0.9);
            (loss.to_bits(), grad, center)
        })
    };
    let one = run(1);
    for threads in [2, 3, 5] {
        assert!(run(threads) == one, "{threads} threads differ from 1");
    }
}

#[test]
fn matched_ce_weights_are_free() {
    // matched_ce with arbitrary per-term weights = the weighted sum of reference terms.
    let case = random_case(37, 1, 4, 1.0);
    let layout = StudentLayout::new(&case.pairs, 1, true);
    let views: Vec<&[f32]> = case.teacher.iter().map(Vec::as_slice).collect();
    let teacher = TeacherLogits {
        views: &views,
        center: &case.center,
        tokens: case.t_g,
        classes: case.k,
        temperature: case.tau_t,
    };
    let student = case.student_rows(&layout);
    let weights: Vec<f32> = (0..layout.terms().len()).map(|i| 0.25 * i as f32).collect();
    let mut grad = vec![0.0; student.len()];
    let got = matched_ce(&layout, &weights, &teacher, &student, case.tau_s, &mut grad);
    let s64 = case.student_f64();
    let mut want = 0.0;
    for (t, &w) in layout.terms().iter().zip(&weights) {
        let p = &case.pairs[t.pair as usize];
        let mut single = random_case(37, 1, 4, 1.0);
        single.pairs = vec![pair(
            p.teacher_view,
            p.student_view,
            &[p.matches.first[t.m as usize]],
            &[p.matches.second[t.m as usize]],
        )];
        want += f64::from(w) * single.reference(LossKind::Pwsl, &s64);
    }
    close(got, want, 1e-6, "weighted matched CE");
}

#[test]
fn centering_converges_to_the_mean_teacher_output() {
    let (b, t_g, k) = (3, 4, 5);
    let mut rng = Stream::new(41, [0, 0, 0], Purpose::Noise);
    let views: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..b * t_g * k).map(|_| 3.0 * rng.normal()).collect())
        .collect();
    let refs: Vec<&[f32]> = views.iter().map(Vec::as_slice).collect();
    // The mean over the batch and both views, per token position, in f64.
    let mut mean = vec![0.0f64; t_g * k];
    for v in &views {
        for bi in 0..b {
            for i in 0..t_g * k {
                mean[i] += f64::from(v[bi * t_g * k + i]) / (2 * b) as f64;
            }
        }
    }
    let mut center = vec![1.0f32; t_g * k];
    let err0: Vec<f64> = center
        .iter()
        .zip(&mean)
        .map(|(&c, m)| f64::from(c) - m)
        .collect();
    for n in 1..=200 {
        update_center(&mut center, &refs, b, t_g, k, 0.9);
        // C_n - mean = 0.9^n (C_0 - mean), elementwise.
        let decay = 0.9f64.powi(n);
        for ((&c, m), e0) in center.iter().zip(&mean).zip(&err0) {
            let err = f64::from(c) - m;
            assert!(
                (err - decay * e0).abs() < 1e-5,
                "step {n}: error {err}, want {}",
                decay * e0
            );
        }
    }
    for (&c, m) in center.iter().zip(&mean) {
        assert!(
            (f64::from(c) - m).abs() < 1e-5,
            "after 200 steps {c} vs mean {m}"
        );
    }
}

#[test]
fn teacher_temperature_schedule() {
    let t = |e| teacher_temperature(e, 0.04, 0.07, 30);
    assert_eq!(t(0), 0.04);
    assert_eq!(t(29), 0.07, "np.linspace's last point is the end value");
    assert_eq!(t(30), 0.07);
    assert_eq!(t(299), 0.07);
    close(
        f64::from(t(10)),
        0.04 + 0.03 * 10.0 / 29.0,
        1e-6,
        "epoch 10",
    );
    // Odd number of warm-up epochs: the middle one is the midpoint.
    close(
        f64::from(teacher_temperature(1, 0.04, 0.07, 3)),
        0.055,
        1e-6,
        "midpoint",
    );
    close(
        f64::from(teacher_temperature(15, 0.04, 0.07, 31)),
        0.055,
        1e-6,
        "midpoint 31",
    );
    // np.linspace(a, b, 1) = [a]; no warm-up = constant.
    assert_eq!(teacher_temperature(0, 0.04, 0.07, 1), 0.04);
    assert_eq!(teacher_temperature(1, 0.04, 0.07, 1), 0.07);
    assert_eq!(teacher_temperature(0, 0.04, 0.07, 0), 0.07);
    let cfg = LossConfig::default();
    assert_eq!(cfg.teacher_temp_at(0), 0.04);
    assert_eq!(cfg.teacher_temp_at(30), 0.07);
}

#[test]
fn config_validation_and_serde() {
    let bad = LossKind::Pwll { lambda: 1.5 };
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.starts_with("loss.lambda:") && err.contains("[0, 1]"),
        "{err}"
    );
    assert!(LossKind::Pwll { lambda: f32::NAN }.validate().is_err());
    assert!(LossKind::Pwll { lambda: 0.0 }.validate().is_ok());
    assert!(LossKind::Pwll { lambda: 1.0 }.validate().is_ok());

    let kind: LossKind = serde_json::from_str(r#"{"pwll":{"lambda":0.2}}"#).unwrap();
    assert_eq!(kind, LossKind::Pwll { lambda: 0.2 });
    let kind: LossKind = serde_json::from_str(r#""pwml""#).unwrap();
    assert_eq!(kind, LossKind::Pwml);

    let cfg: LossConfig = serde_json::from_str(r#"{"kind":"dino"}"#).unwrap();
    assert_eq!(cfg.kind, LossKind::Dino);
    assert_eq!(cfg.student_temp, 0.1);
    assert!(cfg.validate().is_ok());
    assert!(serde_json::from_str::<LossConfig>(r#"{"studnet_temp":0.1}"#).is_err());
    let cfg = LossConfig {
        student_temp: 0.0,
        ..LossConfig::default()
    };
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("loss.student_temp:"));
    let cfg = LossConfig {
        center_momentum: 1.1,
        ..LossConfig::default()
    };
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("loss.center_momentum:"));
    let cfg = LossConfig {
        kind: bad,
        ..LossConfig::default()
    };
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("loss.lambda:"));
}
