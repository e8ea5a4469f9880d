//! The GPU parity harness behind `pwself-engine check-kernels`: every kernel against its
//! CPU twin on fresh random inputs (never zeros), with every output poisoned with NaN before
//! the launch so that an element the kernel forgot to write fails the check.
//!
//! Error measure, per output: `max_i |gpu_i - cpu_i| / max(|cpu_i|, 1e-3 * max_j |cpu_j|)`,
//! so elements near zero are judged against the output's scale rather than against
//! themselves. A NaN or infinity where the CPU has a finite value counts as infinite error.
//! Bounds: ~1e-5 for fp32 kernels, ~1e-2 where an output or input is stored in bf16.

use half::bf16;

use super::context::Gpu;
use super::pool::Buf;
use crate::error::Result;
use crate::model::params::ParamTable;
use crate::rng::{Purpose, Stream};

/// Bound for outputs computed and stored in fp32.
pub const FP32_BOUND: f64 = 1e-5;
/// Bound for outputs stored in bf16 (8 bits of mantissa: 2^-8 = 3.9e-3 per rounding).
pub const BF16_BOUND: f64 = 1e-2;

/// The comparison of one output of one kernel.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// "kernel" or "kernel: output".
    pub name: String,
    /// Elements compared.
    pub elements: usize,
    /// The error measure above.
    pub max_rel_err: f64,
    /// The bound it must stay under.
    pub bound: f64,
    /// Index of the worst element, with the GPU and CPU values there.
    pub worst: Option<(usize, f64, f64)>,
}

impl Outcome {
    /// Whether the error is within the bound.
    pub fn passed(&self) -> bool {
        self.max_rel_err <= self.bound
    }
}

/// Compares `gpu` against `cpu` (same length) with the measure above.
pub fn compare(name: impl Into<String>, gpu: &[f32], cpu: &[f32], bound: f64) -> Outcome {
    assert_eq!(gpu.len(), cpu.len(), "compare: lengths differ");
    // The scale comes from the finite CPU values, so one infinity cannot hide the rest.
    let scale = cpu
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    let floor = (1e-3 * scale).max(f64::MIN_POSITIVE);
    let mut max = 0.0f64;
    let mut worst = None;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (f64::from(g), f64::from(c));
        let err = if g == c || (g.is_nan() && c.is_nan()) {
            0.0
        } else if !g.is_finite() || !c.is_finite() {
            // A NaN or infinity on one side only, or infinities of opposite signs.
            f64::INFINITY
        } else {
            (g - c).abs() / c.abs().max(floor)
        };
        if err > max || (worst.is_none() && err.is_infinite()) {
            max = err;
            worst = Some((i, g, c));
        }
    }
    Outcome {
        name: name.into(),
        elements: gpu.len(),
        max_rel_err: max,
        bound,
        worst,
    }
}

/// [`compare`]'s outcome with the error measured against the output's scale:
/// `max_i |gpu_i - cpu_i| / max_j |cpu_j|`; a NaN or infinity on either side counts as
/// infinite. For outputs whose elementwise errors are absolute rather than relative: a
/// composition of layers (whose bf16 drift does not shrink near zero), or a gradient whose
/// formula subtracts nearly equal terms. Each caller justifies its bound.
pub fn compare_to_scale(name: impl Into<String>, gpu: &[f32], cpu: &[f32], bound: f64) -> Outcome {
    assert_eq!(gpu.len(), cpu.len(), "compare_to_scale: lengths differ");
    let scale = cpu
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
        .max(f64::MIN_POSITIVE);
    let mut max = 0.0f64;
    let mut worst = None;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (f64::from(g), f64::from(c));
        let err = if g.is_finite() && c.is_finite() {
            (g - c).abs() / scale
        } else {
            f64::INFINITY
        };
        if err > max || (worst.is_none() && err.is_infinite()) {
            max = err;
            worst = Some((i, g, c));
        }
    }
    Outcome {
        name: name.into(),
        elements: gpu.len(),
        max_rel_err: max,
        bound,
        worst,
    }
}

/// Starting values for a gradient buffer laid out by `table`, so that a check of an
/// accumulating backward also tests the accumulation: N(0, 1) per element, scaled per tensor
/// to a quarter of the largest gradient a first run into zeros gave (`scale_run`), or 1 for
/// a tensor that run left at zero. A lost accumulation then costs about half a tensor's
/// scale without the starting values swamping the gradient.
pub fn start_gradients(table: &ParamTable, scale_run: &[f32], inputs: &mut Inputs) -> Vec<f32> {
    let mut start = inputs.normal(table.total(), 1.0);
    for info in table.tensors() {
        let r = info.range();
        let s = scale_run[r.clone()]
            .iter()
            .fold(0.0f32, |s, x| s.max(x.abs()));
        let s = if s > 0.0 { 0.25 * s } else { 1.0 };
        start[r].iter_mut().for_each(|x| *x *= s);
    }
    start
}

/// [`compare_to_scale`] per tensor of a flat gradient laid out by `table` (those whose name
/// `keep` accepts), each named "`label`: d `tensor`".
pub fn compare_tensors(
    table: &ParamTable,
    label: &str,
    gpu: &[f32],
    cpu: &[f32],
    bound: f64,
    keep: impl Fn(&str) -> bool,
) -> Vec<Outcome> {
    table
        .tensors()
        .iter()
        .filter(|info| keep(&info.name))
        .map(|info| {
            let r = info.range();
            compare_to_scale(
                format!("{label}: d {}", info.name),
                &gpu[r.clone()],
                &cpu[r],
                bound,
            )
        })
        .collect()
}

/// One kernel family's checks: runs its kernels and returns one outcome per output.
pub type CheckFn = fn(&Gpu, &mut Inputs) -> Result<Vec<Outcome>>;

/// A named check in the registry.
pub struct KernelCheck {
    /// The kernel (family) under test.
    pub name: &'static str,
    /// What runs it.
    pub run: CheckFn,
}

/// Random inputs for checks, from a Philox stream (seeded per check, so a failure
/// reproduces with the same `--seed`).
pub struct Inputs {
    stream: Stream,
}

impl Inputs {
    /// The inputs of check number `index` under `seed`.
    pub fn new(seed: u64, index: u32) -> Inputs {
        Inputs {
            stream: Stream::new(seed, [index, 0xC4EC, 0], Purpose::Init),
        }
    }
    /// The underlying stream, for draws of other shapes.
    pub fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }
    /// `n` values uniform in [lo, hi), never exactly zero.
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let x = self.stream.uniform(lo, hi);
                if x != 0.0 {
                    break x;
                }
            })
            .collect()
    }
    /// `n` values from N(0, std^2).
    pub fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.stream.normal() * std).collect()
    }
    /// An integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.stream.below(n as u64) as usize
    }
}

/// `x` rounded to bf16 and back: what the CPU twin must see when the GPU reads bf16.
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// `x` as bf16 (round to nearest even).
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// An f32 device buffer holding NaN everywhere.
pub fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<Buf<f32>> {
    gpu.pool().upload(&vec![f32::NAN; n])
}

/// A bf16 device buffer holding NaN everywhere.
pub fn poisoned_bf16(gpu: &Gpu, n: usize) -> Result<Buf<bf16>> {
    gpu.pool().upload(&vec![bf16::NAN; n])
}

/// A device buffer's f32 contents.
pub fn download_f32(buf: &Buf<f32>) -> Result<Vec<f32>> {
    buf.to_vec()
}

/// A bf16 device buffer's contents, widened to f32.
pub fn download_bf16(buf: &Buf<bf16>) -> Result<Vec<f32>> {
    Ok(buf.to_vec()?.iter().map(|v| v.to_f32()).collect())
}

/// Every check, in the order `check-kernels` runs them.
pub fn registry() -> Vec<KernelCheck> {
    let mut all = Vec::new();
    all.extend(super::upload::checks());
    all.extend(super::views::checks());
    all.extend(super::layers::checks());
    all.extend(super::attention::checks());
    all.extend(super::blas::checks());
    all.extend(super::ce::checks());
    all.extend(super::optim::checks());
    all.extend(super::vit::checks());
    all.extend(super::head::checks());
    all.extend(super::step::checks());
    all
}

/// The outcome of one registered check: its outcomes, or the error that stopped it.
pub struct CheckRun {
    /// The check's name.
    pub name: &'static str,
    /// One outcome per output, or why the check could not run.
    pub result: Result<Vec<Outcome>>,
}

/// Runs every check whose name contains `filter` (all when None), each with its own inputs
/// from `seed`, handing each result to `report` as soon as it is known. The pool runs in
/// guard mode: a kernel that writes past the end of a buffer adds a failing outcome. Stops
/// early when the GPU context is lost (an error that every later launch would repeat), and
/// returns how many checks ran.
pub fn run_all(
    gpu: &Gpu,
    seed: u64,
    filter: Option<&str>,
    mut report: impl FnMut(&CheckRun),
) -> Result<usize> {
    gpu.pool().set_guard(true);
    let mut ran = 0;
    for (i, c) in registry().into_iter().enumerate() {
        if !filter.map_or(true, |f| c.name.contains(f)) {
            continue;
        }
        let before = gpu.pool().stats().guard_violations;
        let mut inputs = Inputs::new(seed, i as u32);
        let mut result = (c.run)(gpu, &mut inputs).and_then(|o| gpu.sync().map(|_| o));
        let overwritten = gpu.pool().stats().guard_violations - before;
        if let Ok(outcomes) = &mut result {
            outcomes.push(Outcome {
                name: format!("{}: nothing written past a buffer's end", c.name),
                elements: 0,
                max_rel_err: if overwritten == 0 { 0.0 } else { f64::INFINITY },
                bound: 0.0,
                worst: None,
            });
        }
        ran += 1;
        let failed_to_run = result.is_err();
        report(&CheckRun {
            name: c.name,
            result,
        });
        // A failed launch on a real GPU usually poisons the context: later checks would only
        // repeat its error and hide their own results.
        if failed_to_run && !gpu.is_emulated() && gpu.sync().is_err() {
            gpu.pool().set_guard(false);
            return Err(crate::error::Error::cuda(
                format!("after the check {:?}", c.name),
                "the GPU context is lost; rerun the remaining checks with --filter",
            ));
        }
    }
    gpu.pool().set_guard(false);
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_measures_relative_error_with_a_floor_at_the_outputs_scale() {
        let cpu = [1.0f32, -2.0, 1e-6, 4.0];
        assert_eq!(compare("same", &cpu, &cpu, 1e-5).max_rel_err, 0.0);
        // 1% off on the 2.0 element: 0.01.
        let gpu = [1.0f32, -2.02, 1e-6, 4.0];
        let o = compare("off", &gpu, &cpu, 1e-5);
        assert!((o.max_rel_err - 0.01).abs() < 1e-6, "{}", o.max_rel_err);
        assert!(!o.passed());
        assert_eq!(o.worst.map(|w| w.0), Some(1));
        // Near zero the floor (1e-3 * 4.0) is the denominator, not 1e-6.
        let gpu = [1.0f32, -2.0, 5e-6, 4.0];
        let o = compare("tiny", &gpu, &cpu, 1e-2);
        assert!(
            (o.max_rel_err - 4e-6 / 4e-3).abs() < 1e-6,
            "{}",
            o.max_rel_err
        );
    }

    #[test]
    fn an_unwritten_nan_output_fails_with_infinite_error() {
        let cpu = [1.0f32, 2.0];
        let gpu = [1.0f32, f32::NAN];
        let o = compare("poisoned", &gpu, &cpu, 1.0);
        assert!(o.max_rel_err.is_infinite() && !o.passed());
        assert_eq!(o.worst.map(|w| w.0), Some(1));
    }

    #[test]
    fn infinities_must_match_and_do_not_hide_other_errors() {
        let cpu = [f32::INFINITY, 1.0, 2.0];
        assert_eq!(compare("same inf", &cpu, &cpu, 0.0).max_rel_err, 0.0);
        let o = compare("finite vs inf", &[1e30, 1.0, 2.0], &cpu, 1.0);
        assert!(o.max_rel_err.is_infinite());
        let o = compare("other error", &[f32::INFINITY, 1.5, 2.0], &cpu, 1e-5);
        assert!((o.max_rel_err - 0.5).abs() < 1e-9, "{}", o.max_rel_err);
    }

    #[test]
    fn compare_to_scale_judges_every_element_against_the_largest() {
        let cpu = [4.0f32, 1e-6, -2.0];
        // 0.04 off on a near-zero element: 1% of the scale (4.0).
        let o = compare_to_scale("near zero", &[4.0, 0.04, -2.0], &cpu, 2e-2);
        assert!(
            (o.max_rel_err - 0.01).abs() < 1e-6 && o.passed(),
            "{}",
            o.max_rel_err
        );
        assert_eq!(o.worst.map(|w| w.0), Some(1));
        let o = compare_to_scale("nan", &[4.0, f32::NAN, -2.0], &cpu, 1.0);
        assert!(o.max_rel_err.is_infinite() && !o.passed());
    }

    #[test]
    fn inputs_are_reproducible_and_never_zero() {
        let a = Inputs::new(7, 3).uniform(1000, -1.0, 1.0);
        let b = Inputs::new(7, 3).uniform(1000, -1.0, 1.0);
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x != 0.0 && (-1.0..1.0).contains(&x)));
        assert_ne!(a, Inputs::new(7, 4).uniform(1000, -1.0, 1.0));
    }
}
