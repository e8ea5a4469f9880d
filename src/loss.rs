//! The PW-Self losses (SPEC.md section 5): DINO, PWML, PWSL and PWLL, all on top of one
//! fused matched-token cross-entropy, plus the teacher centring and the teacher
//! temperature schedule.
//!
//! Every loss is a weighted sum of cross-entropies `H(p_t, q_s)` between a teacher token
//! `t_i[I_m]` and the student token `s_j[J_m]` matched to it; the four losses differ only
//! in the weight of each term ([`LossKind::term_weight`]). [`matched_ce`] computes the
//! weighted sum and its gradient w.r.t. the student logits in one pass per term, with no
//! K-wide temporary: the gradient row is the only K-wide buffer it writes.
//!
//! This module must not produce gradients for the teacher (it has none: SPEC.md section 5)
//! and must not allocate per row: K reaches 65536.
//!
//! # Student-row layout ([`StudentLayout`])
//! The student head runs only on the student tokens that some term uses. Because every
//! image of a batch shares the same crops (SPEC.md section 1), the set of those tokens is
//! the same for every image: [`StudentLayout::student_tokens`] lists them once, as
//! `(view, token)` pairs sorted by view then token, `U` of them. The student logits are
//! one `(B * U, K)` matrix, image-major: **row `b * U + u` holds image `b`'s token
//! `student_tokens()[u]`**. A student token matched by several pairs (a local view's
//! patch seen by both global views, say) has one row, so the head runs on it once and its
//! gradient row already sums every term that uses it.

use rayon::prelude::*;

use crate::cpu::exp::exp_in_place;
use crate::cpu::reduce::{max, sum_f64, sum_map2_f64};
use crate::error::{Error, Result};
use crate::views::matching::PairMatches;

/// Which of the paper's losses to train with (SPEC.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// DINO (Eq 7): the CLS pair of each teacher/student pair only.
    Dino,
    /// Patch-Wise Mean Loss (Eq 8): the mean over the M matched pairs, CLS included.
    Pwml,
    /// Patch-Wise Sum Loss (Eq 9): the sum over the M matched pairs, CLS included.
    Pwsl,
    /// Patch-Wise Lambda Loss (Eq 10): `lambda * H(CLS) + (1 - lambda) * mean over the
    /// M - 1 patch pairs`; with no patch pair only `lambda * H(CLS)` (not renormalised).
    Pwll {
        /// Weight of the CLS term, in `[0, 1]` (the paper's best: 0.2 or 0.5).
        lambda: f32,
    },
}

impl LossKind {
    /// Refuses a PWLL lambda outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if let LossKind::Pwll { lambda } = *self {
            if !(0.0..=1.0).contains(&lambda) {
                return Err(Error::bad_config(
                    "loss.lambda",
                    format!(
                        "{lambda} is not a weight: PWLL mixes the CLS term and the patch terms \
                         as lambda and 1 - lambda, so give a value in [0, 1] (the paper uses 0.2 \
                         or 0.5)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether any patch term (m > 0) can have a non-zero weight. DINO needs only the CLS
    /// tokens, so a [`StudentLayout`] built without patches suffices for it.
    pub fn uses_patches(&self) -> bool {
        !matches!(self, LossKind::Dino)
    }

    /// The weight of term `m` (0 = CLS) of a pair with `count` matches (CLS included), for
    /// one image and one pair, before the mean over images and pairs.
    pub fn term_weight(&self, m: usize, count: usize) -> f32 {
        match *self {
            LossKind::Dino => f32::from(u8::from(m == 0)),
            LossKind::Pwml => 1.0 / count as f32,
            LossKind::Pwsl => 1.0,
            LossKind::Pwll { lambda } if m == 0 => lambda,
            LossKind::Pwll { lambda } => (1.0 - lambda) / (count - 1) as f32,
        }
    }
}

/// The loss section of a training configuration, with the paper's values as defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Which loss (default PWML, the paper's main one).
    pub kind: LossKind,
    /// Student temperature `tau_s` (0.1).
    pub student_temp: f32,
    /// Teacher temperature after the warm-up (paper: 0.07; DINO's default 0.04).
    pub teacher_temp: f32,
    /// Teacher temperature at epoch 0 (0.04).
    pub warmup_teacher_temp: f32,
    /// Epochs of the linear teacher-temperature warm-up (30).
    pub warmup_teacher_temp_epochs: usize,
    /// Momentum of the centre update (0.9).
    pub center_momentum: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::Pwml,
            student_temp: 0.1,
            teacher_temp: 0.07,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 30,
            center_momentum: 0.9,
        }
    }
}

impl LossConfig {
    /// Refuses impossible values, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.kind.validate()?;
        for (field, t) in [
            ("loss.student_temp", self.student_temp),
            ("loss.teacher_temp", self.teacher_temp),
            ("loss.warmup_teacher_temp", self.warmup_teacher_temp),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::bad_config(
                    field,
                    format!("{t} is not a temperature: give a positive number (DINO: 0.04 to 0.1)"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.center_momentum) {
            return Err(Error::bad_config(
                "loss.center_momentum",
                format!(
                    "{} is not a momentum: give a value in [0, 1] (DINO: 0.9)",
                    self.center_momentum
                ),
            ));
        }
        Ok(())
    }

    /// The teacher temperature of `epoch` (see [`teacher_temperature`]).
    pub fn teacher_temp_at(&self, epoch: usize) -> f32 {
        teacher_temperature(
            epoch,
            self.warmup_teacher_temp,
            self.teacher_temp,
            self.warmup_teacher_temp_epochs,
        )
    }
}

/// The teacher temperature of `epoch`: DINO's schedule,
/// `np.linspace(warmup_from, to, warmup_epochs)[epoch]` during the warm-up, then `to`.
/// So epoch 0 is `warmup_from`, epoch `warmup_epochs - 1` is already `to`, and with
/// `warmup_epochs` of 0 or 1 the warm-up is at most the single epoch 0 at `warmup_from`.
pub fn teacher_temperature(epoch: usize, warmup_from: f32, to: f32, warmup_epochs: usize) -> f32 {
    if epoch >= warmup_epochs {
        return to;
    }
    if epoch + 1 == warmup_epochs {
        // numpy sets the last point to `stop` exactly (covers warmup_epochs == 1: `start`).
        return if warmup_epochs == 1 { warmup_from } else { to };
    }
    let step = (f64::from(to) - f64::from(warmup_from)) / (warmup_epochs - 1) as f64;
    (epoch as f64 * step + f64::from(warmup_from)) as f32
}

/// One cross-entropy term of a student row: the teacher token it distils from, and where
/// the pair sits in its pair's matched lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// Index into [`StudentLayout::teacher_tokens`].
    pub teacher: u32,
    /// Index of the pair in its matched lists (0 = CLS).
    pub m: u32,
    /// The pair's match count M, CLS included.
    pub count: u32,
    /// Index of the teacher/student pair in the `&[PairMatches]` the layout was built from.
    pub pair: u32,
}

/// Where the student logits of a batch live and which teacher tokens each row is compared
/// with. See the module documentation for the row layout: row `b * U + u` is image `b`'s
/// student token [`student_tokens`](Self::student_tokens)`()[u]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StudentLayout {
    batch: usize,
    pairs: usize,
    patches: bool,
    student_tokens: Vec<(u32, u32)>,
    teacher_tokens: Vec<(u32, u32)>,
    /// CSR over rows of one image: the terms of row `u` are `terms[term_start[u]..term_start[u + 1]]`,
    /// in pair order then `m` order.
    term_start: Vec<usize>,
    terms: Vec<Term>,
}

impl StudentLayout {
    /// The layout of a batch of `batch` images whose teacher/student pairs are `pairs`
    /// (from `views::matching::batch_matches`). With `patches` false only the CLS pairs
    /// (m = 0) get rows, which is all DINO needs; with `patches` true every matched token
    /// does.
    ///
    /// # Panics
    /// If `batch` is 0, `pairs` is empty, or a pair's lists differ in length or are empty
    /// (programming errors: matching always yields at least the CLS pair).
    pub fn new(pairs: &[PairMatches], batch: usize, patches: bool) -> StudentLayout {
        assert!(batch > 0, "a loss over an empty batch");
        assert!(!pairs.is_empty(), "a loss with no teacher/student pair");
        let used = |p: &PairMatches| if patches { p.matches.len() } else { 1 };
        let mut students = Vec::new();
        let mut teachers = Vec::new();
        for p in pairs {
            let mt = &p.matches;
            assert!(
                mt.first.len() == mt.second.len() && !mt.first.is_empty(),
                "pair ({}, {}): matched lists of lengths {} and {}",
                p.teacher_view,
                p.student_view,
                mt.first.len(),
                mt.second.len()
            );
            for m in 0..used(p) {
                students.push((p.student_view as u32, mt.second[m]));
                teachers.push((p.teacher_view as u32, mt.first[m]));
            }
        }
        students.sort_unstable();
        students.dedup();
        teachers.sort_unstable();
        teachers.dedup();
        // Every key was inserted above, so the search always succeeds.
        let find = |set: &[(u32, u32)], key| set.binary_search(&key).unwrap_or_default() as u32;

        // (row, term) in pair order, then a stable sort by row keeps pair order per row.
        let mut by_row: Vec<(u32, Term)> = Vec::new();
        for (pi, p) in pairs.iter().enumerate() {
            let mt = &p.matches;
            for m in 0..used(p) {
                let row = find(&students, (p.student_view as u32, mt.second[m]));
                let term = Term {
                    teacher: find(&teachers, (p.teacher_view as u32, mt.first[m])),
                    m: m as u32,
                    count: mt.len() as u32,
                    pair: pi as u32,
                };
                by_row.push((row, term));
            }
        }
        by_row.sort_by_key(|&(row, _)| row);
        let mut term_start = vec![0; students.len() + 1];
        for &(row, _) in &by_row {
            term_start[row as usize + 1] += 1;
        }
        for u in 0..students.len() {
            term_start[u + 1] += term_start[u];
        }
        StudentLayout {
            batch,
            pairs: pairs.len(),
            patches,
            student_tokens: students,
            teacher_tokens: teachers,
            term_start,
            terms: by_row.into_iter().map(|(_, t)| t).collect(),
        }
    }

    /// Images per batch, B.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Number of teacher/student pairs (18 with 2 global and 8 local views).
    pub fn pairs(&self) -> usize {
        self.pairs
    }
    /// Whether patch pairs have rows (false: CLS pairs only).
    pub fn has_patches(&self) -> bool {
        self.patches
    }
    /// U, the student rows of one image.
    pub fn rows_per_image(&self) -> usize {
        self.student_tokens.len()
    }
    /// R = B * U, the rows of the student-logit matrix.
    pub fn rows(&self) -> usize {
        self.batch * self.student_tokens.len()
    }
    /// The student tokens to gather for each image, `(view, token)`, in row order: row
    /// `b * U + u` is image `b`'s `student_tokens()[u]`. Sorted by view, then token.
    pub fn student_tokens(&self) -> &[(u32, u32)] {
        &self.student_tokens
    }
    /// The teacher tokens some term uses, `(global view, token)`, sorted.
    pub fn teacher_tokens(&self) -> &[(u32, u32)] {
        &self.teacher_tokens
    }
    /// The row of image `b`'s `u`-th student token.
    pub fn row(&self, b: usize, u: usize) -> usize {
        b * self.student_tokens.len() + u
    }
    /// Every `(image, view, token)` to gather, in row order (`rows()` entries).
    pub fn gather_list(&self) -> impl Iterator<Item = (usize, u32, u32)> + '_ {
        (0..self.batch).flat_map(move |b| self.student_tokens.iter().map(move |&(v, t)| (b, v, t)))
    }
    /// All terms, grouped by row of one image ([`terms_of`](Self::terms_of) gives a row's).
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }
    /// The terms of the `u`-th student token of an image, in pair order.
    pub fn terms_of(&self, u: usize) -> &[Term] {
        &self.terms[self.term_start[u]..self.term_start[u + 1]]
    }

    /// The coefficient of every term (same order as [`terms`](Self::terms)) for `kind`,
    /// the mean over images and pairs included: `term_weight / (B * pairs)`.
    ///
    /// # Panics
    /// If `kind` uses patch terms but the layout was built without them.
    pub fn weights(&self, kind: LossKind) -> Vec<f32> {
        assert!(
            self.patches || !kind.uses_patches(),
            "{kind:?} needs the patch pairs: build the StudentLayout with patches = true"
        );
        let scale = 1.0 / (self.batch * self.pairs) as f64;
        self.terms
            .iter()
            .map(|t| (f64::from(kind.term_weight(t.m as usize, t.count as usize)) * scale) as f32)
            .collect()
    }
}

/// The teacher's side of the loss: logits of every token of every global view, the
/// centre, and the temperature. The teacher gets no gradient.
#[derive(Clone, Copy, Debug)]
pub struct TeacherLogits<'a> {
    /// Per global view: `(B, T_g, K)` logits, all tokens.
    pub views: &'a [&'a [f32]],
    /// The centre C, `(T_g, K)`: one vector per token position.
    pub center: &'a [f32],
    /// Tokens per global view, `T_g = 1 + P_g^2`.
    pub tokens: usize,
    /// Output dimension K.
    pub classes: usize,
    /// Teacher temperature `tau_t` of this epoch.
    pub temperature: f32,
}

/// The loss of kind `kind` (mean over images and pairs) and its gradient w.r.t. the
/// student logits, written to `grad` (same `(R, K)` layout as `student`; every element is
/// written). See [`matched_ce`].
pub fn pwself_loss(
    layout: &StudentLayout,
    kind: LossKind,
    teacher: &TeacherLogits,
    student: &[f32],
    student_temp: f32,
    grad: &mut [f32],
) -> f32 {
    let weights = layout.weights(kind);
    matched_ce(layout, &weights, teacher, student, student_temp, grad) as f32
}

/// Teacher token `ti` of the layout for image `b`: its logits row and its centre row.
fn teacher_row<'a>(
    layout: &StudentLayout,
    teacher: &TeacherLogits<'a>,
    ti: usize,
    b: usize,
) -> (&'a [f32], &'a [f32]) {
    let (k, t_g) = (teacher.classes, teacher.tokens);
    let (view, token) = layout.teacher_tokens[ti];
    let (view, token) = (view as usize, token as usize);
    let at = (b * t_g + token) * k;
    (
        &teacher.views[view][at..at + k],
        &teacher.center[token * k..(token + 1) * k],
    )
}

/// Per (teacher token, image), index `ti * B + b`: the max and the log-sum-exp of
/// `(t - C) / tau_t` (sum in f64 of `exp(x - max)`), so that each term of
/// [`matched_ce`] needs a single pass for `p_t`. The CPU twin of the GPU's `teacher_stats`.
/// Shapes as [`matched_ce`] checks them.
pub fn teacher_stats(layout: &StudentLayout, teacher: &TeacherLogits) -> Vec<(f32, f32)> {
    let (b_n, tau_t) = (layout.batch, teacher.temperature);
    (0..layout.teacher_tokens.len() * b_n)
        .into_par_iter()
        .map_init(Vec::new, |e, i| {
            let (t, c) = teacher_row(layout, teacher, i / b_n, i % b_n);
            e.clear();
            e.extend(t.iter().zip(c).map(|(&t, &c)| (t - c) / tau_t));
            let m = max(e);
            e.iter_mut().for_each(|x| *x -= m);
            exp_in_place(e);
            (m, sum_f64(e).ln() as f32)
        })
        .collect()
}

/// The fused matched-token cross-entropy: `sum over images b and terms e of w_e *
/// H(p_t, q_s)` with `p_t = softmax((t_i[b, I] - C[I]) / tau_t)` and
/// `q_s = softmax(s[b, u] / tau_s)`, and its gradient
/// `grad[b, u] = sum over u's terms of w_e * (q_s - p_t) / tau_s`.
///
/// `weights` has one entry per [`StudentLayout::terms`] entry (the same for every image);
/// terms of weight 0 cost nothing. Softmaxes subtract their maximum, so logits of any
/// finite size give finite results. Parallel over student rows; each row is computed by
/// one task in a fixed order and the row losses are summed sequentially, so the result
/// does not depend on the number of threads.
///
/// # Panics
/// On shapes that disagree with the layout, or a temperature that is not positive.
pub fn matched_ce(
    layout: &StudentLayout,
    weights: &[f32],
    teacher: &TeacherLogits,
    student: &[f32],
    student_temp: f32,
    grad: &mut [f32],
) -> f64 {
    let (k, t_g, b_n) = (teacher.classes, teacher.tokens, layout.batch);
    let tau_t = teacher.temperature;
    let tau_s = student_temp;
    assert!(tau_s > 0.0 && tau_t > 0.0, "temperatures must be positive");
    assert_eq!(weights.len(), layout.terms.len(), "one weight per term");
    assert_eq!(teacher.center.len(), t_g * k, "center must be (T_g, K)");
    assert_eq!(
        student.len(),
        layout.rows() * k,
        "student logits must be (R, K)"
    );
    assert_eq!(grad.len(), student.len(), "grad must be (R, K)");
    for v in teacher.views {
        assert_eq!(
            v.len(),
            b_n * t_g * k,
            "teacher logits must be (B, T_g, K) per view"
        );
    }
    for &(view, token) in &layout.teacher_tokens {
        assert!(
            (view as usize) < teacher.views.len() && (token as usize) < t_g,
            "teacher token ({view}, {token}) is outside {} views of {t_g} tokens",
            teacher.views.len()
        );
    }
    let teacher_row = |ti: usize, b: usize| teacher_row(layout, teacher, ti, b);
    let stats = teacher_stats(layout, teacher);

    let u_n = layout.rows_per_image();
    let mut row_loss = vec![0.0f64; layout.rows()];
    grad.par_chunks_mut(k)
        .zip(row_loss.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |p_t, (r, (g, loss))| {
            let (b, u) = (r / u_n, r % u_n);
            let range = layout.term_start[u]..layout.term_start[u + 1];
            let (terms, w) = (&layout.terms[range.clone()], &weights[range]);
            let total: f64 = w.iter().map(|&w| f64::from(w)).sum();
            if w.iter().all(|&w| w == 0.0) {
                g.fill(0.0);
                *loss = 0.0;
                return;
            }
            // Student: g <- exp(s/tau_s - max), then g <- (total / tau_s) * q_s.
            let s = &student[r * k..(r + 1) * k];
            let max_s = max(s) / tau_s;
            for (g, &s) in g.iter_mut().zip(s) {
                *g = s / tau_s - max_s;
            }
            exp_in_place(g);
            let z = sum_f64(g);
            let ln_z = z.ln() as f32;
            let scale = (total / f64::from(tau_s) / z) as f32;
            g.iter_mut().for_each(|g| *g *= scale);
            // Each term: one pass computing p_t, its CE against log q_s, and g -= w/tau_s p_t.
            let mut acc = 0.0f64;
            for (term, &w) in terms.iter().zip(w).filter(|(_, &w)| w != 0.0) {
                let (t, c) = teacher_row(term.teacher as usize, b);
                let (max_t, ln_zt) = stats[term.teacher as usize * b_n + b];
                let a = w / tau_s;
                p_t.clear();
                p_t.extend(
                    t.iter()
                        .zip(c)
                        .map(|(&t, &c)| ((t - c) / tau_t - max_t) - ln_zt),
                );
                exp_in_place(p_t);
                // H(p_t, q_s) = -sum p_t log q_s, the terms in f32, their sum in f64.
                let h = -sum_map2_f64(s, p_t, |s, p| f64::from(p * ((s / tau_s - max_s) - ln_z)));
                for (g, &p) in g.iter_mut().zip(p_t.iter()) {
                    *g -= a * p;
                }
                acc += f64::from(w) * h;
            }
            *loss = acc;
        });
    row_loss.iter().sum()
}

/// Updates the centre: `C <- m * C + (1 - m) * mean over the batch and all global views
/// of t[p]`, per token position p, over all teacher tokens (SPEC.md section 5; DINO's
/// `update_center`, with one vector per token position as in the official PW-Self code).
///
/// `center` is `(t_g, k)`; `teacher_logits` has one `(b, t_g, k)` slice per global view.
/// Sums run in f64 in a fixed order; parallel over token positions.
///
/// # Panics
/// On shapes that disagree, or no view.
pub fn update_center(
    center: &mut [f32],
    teacher_logits: &[&[f32]],
    b: usize,
    t_g: usize,
    k: usize,
    momentum: f32,
) {
    assert!(
        !teacher_logits.is_empty() && b > 0,
        "centre update over no teacher output"
    );
    assert_eq!(center.len(), t_g * k, "center must be (T_g, K)");
    for v in teacher_logits {
        assert_eq!(
            v.len(),
            b * t_g * k,
            "teacher logits must be (B, T_g, K) per view"
        );
    }
    let n = (teacher_logits.len() * b) as f64;
    center.par_chunks_mut(k).enumerate().for_each_init(
        || vec![0.0f64; k],
        |acc, (p, c)| {
            acc.fill(0.0);
            for v in teacher_logits {
                for bi in 0..b {
                    let row = &v[(bi * t_g + p) * k..(bi * t_g + p + 1) * k];
                    acc.iter_mut()
                        .zip(row)
                        .for_each(|(a, &x)| *a += f64::from(x));
                }
            }
            for (c, &a) in c.iter_mut().zip(acc.iter()) {
                *c = *c * momentum + (a / n) as f32 * (1.0 - momentum);
            }
        },
    );
}
