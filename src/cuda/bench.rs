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
        ("attention", super::attention::benches),
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
    /// Median time of one run, microseconds (None when the case failed).
    pub median_us: Option<f64>,
    /// Achieved bandwidth (bytes / median time), GB/s; None when the case has no byte count.
    pub gb_s: Option<f64>,
    /// Achieved bandwidth as a fraction of the measured copy bandwidth.
    pub of_copy: Option<f64>,
    /// Achieved TFLOP/s; None when the case has no flop count.
    pub tflop_s: Option<f64>,
    /// Device allocations during the timed runs (after the warm-up): 0 when the kernel's
    /// buffers all come from the pool's cache.
    pub mallocs: u64,
    /// Why the case could not be set up or timed.
    pub error: Option<String>,
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
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes written before every timed run to evict the L2 cache (50 MB on an H100, 60 MB on
/// an H200): each run then reads its inputs from device memory, as in a training step,
/// and the GPU is busy with the memset while the host enqueues the run, so launch latency
/// stays out of the timing.
const FLUSH_BYTES: usize = 256 << 20;

/// Times `run` `iters` times after 3 warm-up runs, each between two events after an L2
/// flush; returns the median in microseconds and the allocations made by the timed runs.
fn time_runs(gpu: &Gpu, iters: usize, run: &mut dyn FnMut() -> Result<()>) -> Result<(f64, u64)> {
    use crate::error::Error;
    use cudarc::driver::sys::CUevent_flags;
    let ctx = gpu.context()?;
    let stream = gpu.stream()?;
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::cuda("creating a timing event", e))
    };
    let (start, end) = (event()?, event()?);
    let flush = gpu.pool().alloc::<u8>(FLUSH_BYTES)?;
    let flush_l2 = || {
        // SAFETY: the flush buffer holds FLUSH_BYTES bytes.
        unsafe {
            cudarc::driver::result::memset_d8_async(flush.ptr(), 0, FLUSH_BYTES, stream.cu_stream())
        }
        .map_err(|e| Error::cuda("flushing the L2 cache", e))
    };
    for _ in 0..3 {
        run()?;
    }
    gpu.sync()?;
    let before = gpu.pool().stats().mallocs;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        flush_l2()?;
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
    Ok((median(times), gpu.pool().stats().mallocs - before))
}

/// Measures the copy bandwidth: a 1 GiB device-to-device copy, bytes read plus written.
pub fn copy_bandwidth(gpu: &Gpu, iters: usize) -> Result<f64> {
    use crate::error::Error;
    let n = 1usize << 30;
    let src = gpu.pool().alloc::<u8>(n)?;
    let dst = gpu.pool().alloc::<u8>(n)?;
    let stream = gpu.stream()?.clone();
    let (us, _) = time_runs(gpu, iters, &mut || {
        // SAFETY: both buffers hold n bytes.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst.ptr(), src.ptr(), n, stream.cu_stream())
        }
        .map_err(|e| Error::cuda("a device-to-device copy", e))
    })?;
    Ok(2.0 * n as f64 / (us * 1e-6) / 1e9)
}

/// Runs the cases of the families named in `families` (all when empty) whose name
/// contains `filter` (all when None), handing each result to `report` as soon as it is
/// known. A case that fails is reported with its error and the run goes on, unless the GPU
/// context is lost.
pub fn run(
    gpu: &Gpu,
    iters: usize,
    families: &[String],
    filter: Option<&str>,
    mut progress: impl FnMut(&str),
    mut report: impl FnMut(&BenchReport),
) -> Result<BenchReport> {
    use crate::error::Error;
    if gpu.is_emulated() {
        return Err(Error::cuda(
            "bench",
            "the CPU emulator checks logic, not speed: run bench on a GPU",
        ));
    }
    progress("copy bandwidth");
    let mut out = BenchReport {
        device: gpu.name().to_string(),
        copy_gb_s: copy_bandwidth(gpu, iters)?,
        iters,
        results: Vec::new(),
    };
    report(&out);
    let failed = |family: &str, name: String, e: &Error| BenchResult {
        family: family.to_string(),
        name,
        median_us: None,
        gb_s: None,
        of_copy: None,
        tflop_s: None,
        mallocs: 0,
        error: Some(e.to_string()),
    };
    for (family, make) in registry() {
        if !families.is_empty() && !families.iter().any(|f| f == family) {
            continue;
        }
        progress(family);
        let cases = match make(gpu) {
            Ok(c) => c,
            Err(e) => {
                out.results.push(failed(family, "(set-up)".to_string(), &e));
                report(&out);
                gpu.sync()?;
                continue;
            }
        };
        for mut case in cases {
            if filter.is_some_and(|f| !case.name.contains(f)) {
                continue;
            }
            progress(&case.name);
            match time_runs(gpu, iters, &mut case.run) {
                Ok((us, mallocs)) => {
                    let secs = us * 1e-6;
                    let gb_s = (case.bytes > 0).then(|| case.bytes as f64 / secs / 1e9);
                    out.results.push(BenchResult {
                        family: family.to_string(),
                        name: case.name,
                        median_us: Some(us),
                        gb_s,
                        of_copy: gb_s.map(|g| g / out.copy_gb_s),
                        tflop_s: (case.flops > 0).then(|| case.flops as f64 / secs / 1e12),
                        mallocs,
                        error: None,
                    });
                }
                Err(e) => {
                    out.results.push(failed(family, case.name, &e));
                    report(&out);
                    // A lost context fails every later case too: stop here.
                    gpu.sync()?;
                    continue;
                }
            }
            report(&out);
        }
    }
    Ok(out)
}

/// The report as a markdown table.
pub fn to_markdown(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    // The matmul peak: the best bf16 GEMM rate measured (the 8192-cube product).
    let peak = r
        .results
        .iter()
        .filter(|c| c.family == "blas")
        .filter_map(|c| c.tflop_s)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let mut s = format!(
        "Device: {}. Copy bandwidth (device-to-device, read + write): {:.0} GB/s. \
         Matmul peak (best bf16 GEMM measured here): {}. \
         Median of {} runs per case, each after a 256 MiB memset that evicts L2 (inputs come \
         from device memory). GEMM inputs are random.\n\n\
         | family | kernel and shape | median µs | GB/s | of copy bw | TFLOP/s | of peak | mallocs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        r.device,
        r.copy_gb_s,
        peak.map_or("not measured".to_string(), |p| format!("{p:.0} TFLOP/s")),
        r.iters
    );
    let opt = |x: Option<f64>, scale: f64, digits: usize, unit: &str| {
        x.map_or(String::new(), |v| format!("{:.*}{unit}", digits, v * scale))
    };
    for c in &r.results {
        if let Some(e) = &c.error {
            let _ = writeln!(
                s,
                "| {} | {} | failed: {} | | | | |",
                c.family,
                c.name,
                e.replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.family,
            c.name,
            opt(c.median_us, 1.0, 1, ""),
            opt(c.gb_s, 1.0, 0, ""),
            opt(c.of_copy, 100.0, 0, "%"),
            opt(c.tflop_s, 1.0, 1, ""),
            opt(c.tflop_s.zip(peak).map(|(t, p)| t / p), 100.0, 0, "%"),
            c.mallocs
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(family: &str, name: &str, us: f64, bytes: f64, flops: f64, copy: f64) -> BenchResult {
        let secs = us * 1e-6;
        let gb_s = (bytes > 0.0).then(|| bytes / secs / 1e9);
        BenchResult {
            family: family.into(),
            name: name.into(),
            median_us: Some(us),
            gb_s,
            of_copy: gb_s.map(|g| g / copy),
            tflop_s: (flops > 0.0).then(|| flops / secs / 1e12),
            mallocs: 0,
            error: None,
        }
    }

    #[test]
    fn the_table_states_rates_against_the_measured_ceilings() {
        let r = BenchReport {
            device: "test card".into(),
            copy_gb_s: 3000.0,
            iters: 20,
            results: vec![
                // 1.5 GB in 1 ms: 1500 GB/s, half the copy bandwidth.
                result("ce", "matched_ce", 1000.0, 1.5e9, 0.0, 3000.0),
                // 8 TFLOP in 10 ms: 800 TFLOP/s, the peak.
                result("blas", "square 8192", 10_000.0, 0.0, 8e12, 3000.0),
                // 0.4 TFLOP in 1 ms: 400 TFLOP/s, half the peak.
                result("blas", "qkv", 1000.0, 0.0, 4e11, 3000.0),
                BenchResult {
                    error: Some("launch | failed".into()),
                    ..result("views", "build_views", 1.0, 1.0, 0.0, 3000.0)
                },
            ],
        };
        let t = to_markdown(&r);
        assert!(t.contains("3000 GB/s"), "{t}");
        assert!(
            t.contains("Matmul peak (best bf16 GEMM measured here): 800 TFLOP/s"),
            "{t}"
        );
        assert!(
            t.contains("| ce | matched_ce | 1000.0 | 1500 | 50% |  |  | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("| blas | qkv | 1000.0 |  |  | 400.0 | 50% | 0 |"),
            "{t}"
        );
        assert!(t.contains("failed: launch / failed"), "{t}");
    }
}
