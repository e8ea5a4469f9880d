//! `pwself-engine bench --device cuda`: per-kernel times at training shapes, as achieved
//! bandwidth (GB/s) or throughput (TFLOP/s) against what this card measurably does: a
//! device-to-device copy and a large bf16 GEMM.

use super::context::Gpu;
use crate::error::Result;

/// One timed kernel launch (or short sequence), set up and ready to run repeatedly.
pub struct BenchCase<'a> {
    /// Kernel and shape, e.g. "layernorm_forward 64x197x384".
    pub name: String,
    /// Bytes the launch must read and write at least once (for GB/s); 0 when
    /// compute-bound.
    pub bytes: u64,
    /// Floating-point operations (for TFLOP/s); 0 when memory-bound.
    pub flops: u64,
    /// Enqueues one run on the compute stream (no synchronisation).
    pub run: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// A family's benchmark cases at training shapes.
pub type BenchFn = for<'a> fn(&'a Gpu) -> Result<Vec<BenchCase<'a>>>;

/// Every family's cases, in report order.
pub fn registry() -> Vec<(&'static str, BenchFn)> {
    vec![
        ("views", super::views::benches),
        ("layers", super::layers::benches),
        ("blas", super::blas::benches),
        ("ce", super::ce::benches),
        ("optim", super::optim::benches),
    ]
}

/// The timing of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    /// Family ("views", "layers", ...).
    pub family: String,
    /// Kernel and shape.
    pub name: String,
    /// Median time of one run, microseconds.
    pub median_us: f64,
    /// Achieved bandwidth (bytes / median time), GB/s; None when the case has no byte count.
    pub gb_s: Option<f64>,
    /// Achieved bandwidth as a fraction of the measured copy bandwidth.
    pub of_copy: Option<f64>,
    /// Achieved TFLOP/s; None when the case has no flop count.
    pub tflop_s: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// Card name.
    pub device: String,
    /// Device-to-device copy bandwidth (read + write), GB/s: the roofline for memory-bound
    /// kernels.
    pub copy_gb_s: f64,
    /// Runs timed per case.
    pub iters: usize,
    /// Every case.
    pub results: Vec<BenchResult>,
    /// Device allocations made while the cases ran (after set-up).
    pub mallocs_during_timing: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `run` `iters` times (after 3 warm-up runs), each between two events; returns the
/// median in microseconds.
fn time_runs(gpu: &Gpu, iters: usize, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    use crate::error::Error;
    use cudarc::driver::sys::CUevent_flags;
    let ctx = gpu.context()?;
    let stream = gpu.stream()?;
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::cuda("creating a timing event", e))
    };
    let (start, end) = (event()?, event()?);
    for _ in 0..3 {
        run()?;
    }
    gpu.sync()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        start
            .record(stream)
            .map_err(|e| Error::cuda("recording an event", e))?;
        run()?;
        end.record(stream)
            .map_err(|e| Error::cuda("recording an event", e))?;
        end.synchronize()
            .map_err(|e| Error::cuda("waiting for an event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| Error::cuda("reading an event", e))?;
        times.push(f64::from(ms) * 1e3);
    }
    Ok(median(times))
}

/// Measures the copy bandwidth: a 1 GiB device-to-device copy, bytes read plus written.
pub fn copy_bandwidth(gpu: &Gpu, iters: usize) -> Result<f64> {
    use crate::error::Error;
    let n = 1usize << 30;
    let src = gpu.pool().alloc::<u8>(n)?;
    let mut dst = gpu.pool().alloc::<u8>(n)?;
    let stream = gpu.stream()?.clone();
    let us = time_runs(gpu, iters, &mut || {
        let (Some(src), Some(mut dst)) = (src.view(), dst.view_mut()) else {
            return Err(Error::cuda("a device-to-device copy", "host buffers"));
        };
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| Error::cuda("a device-to-device copy", e))
    })?;
    Ok(2.0 * n as f64 / (us * 1e-6) / 1e9)
}

/// Runs every case of every family whose name contains `filter` (all when None).
pub fn run(
    gpu: &Gpu,
    iters: usize,
    filter: Option<&str>,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport> {
    if gpu.is_emulated() {
        return Err(crate::error::Error::cuda(
            "bench",
            "the CPU emulator checks logic, not speed: run bench on a GPU",
        ));
    }
    progress("copy bandwidth");
    let copy_gb_s = copy_bandwidth(gpu, iters)?;
    let mut results = Vec::new();
    let mut mallocs = 0;
    for (family, make) in registry() {
        let cases = make(gpu)?;
        for mut case in cases {
            if filter.is_some_and(|f| !case.name.contains(f) && !family.contains(f)) {
                continue;
            }
            progress(&case.name);
            // Warm-up inside time_runs allocates what the case needs; count what the timed
            // runs allocate after it.
            let before = gpu.pool().stats().mallocs;
            let us = time_runs(gpu, iters, &mut case.run)?;
            mallocs += gpu.pool().stats().mallocs - before;
            let secs = us * 1e-6;
            let gb_s = (case.bytes > 0).then(|| case.bytes as f64 / secs / 1e9);
            results.push(BenchResult {
                family: family.to_string(),
                name: case.name,
                median_us: us,
                gb_s,
                of_copy: gb_s.map(|g| g / copy_gb_s),
                tflop_s: (case.flops > 0).then(|| case.flops as f64 / secs / 1e12),
            });
        }
    }
    Ok(BenchReport {
        device: gpu.name().to_string(),
        copy_gb_s,
        iters,
        results,
        mallocs_during_timing: mallocs,
    })
}

/// The report as a markdown table.
pub fn to_markdown(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "Device: {}. Copy bandwidth (device-to-device, read + write): {:.0} GB/s. \
         Median of {} runs per case. Device allocations during timed runs: {}.\n\n\
         | family | kernel and shape | median µs | GB/s | of copy bw | TFLOP/s |\n|---|---|---:|---:|---:|---:|\n",
        r.device, r.copy_gb_s, r.iters, r.mallocs_during_timing
    );
    let opt = |x: Option<f64>, scale: f64, digits: usize| {
        x.map_or("".to_string(), |v| format!("{:.*}", digits, v * scale))
    };
    for c in &r.results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {} | {} |",
            c.family,
            c.name,
            c.median_us,
            opt(c.gb_s, 1.0, 0),
            opt(c.of_copy, 100.0, 0).to_string() + if c.of_copy.is_some() { "%" } else { "" },
            opt(c.tflop_s, 1.0, 1)
        );
    }
    s
}
