//! The GPU subcommands: `check-kernels`, `bench` and `kernels`, and `--device` resolution.

use std::path::PathBuf;

use anyhow::{bail, Result};

use pwself_engine::train::TrainDevice;

use pwself_engine::cuda::step_bench::{self, StepBenchConfig};
use pwself_engine::cuda::{self, bench, check, cuda_unavailable, DeviceChoice, Gpu};
use pwself_engine::error::Error;
use pwself_engine::loss::LossKind;
use pwself_engine::model::config::Arch;
use pwself_engine::views::config::Preset;

/// Exit status of `check-kernels` and `bench --device cuda` when there is no usable GPU
/// (distinct from 1, a failure).
pub const EXIT_NO_CUDA: i32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceFlag {
    Cpu,
    Cuda,
    Auto,
}

impl From<DeviceFlag> for DeviceChoice {
    fn from(d: DeviceFlag) -> DeviceChoice {
        match d {
            DeviceFlag::Cpu => DeviceChoice::Cpu,
            DeviceFlag::Cuda => DeviceChoice::Cuda,
            DeviceFlag::Auto => DeviceChoice::Auto,
        }
    }
}

#[derive(clap::Args)]
pub struct CheckKernelsArgs {
    /// Seed of the random inputs (a failure reproduces with the same seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the checks whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Run the kernels on the CPU emulator instead of a GPU (every kernel compiled as C++
    /// with CUDA's block, barrier, shared-memory and shuffle semantics): checks their logic
    /// on machines without a GPU, not their speed or the hardware's behaviour.
    #[arg(long)]
    emulate: bool,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to run: cuda times every kernel; the CPU's benchmarks are criterion's
    /// (`cargo bench`).
    #[arg(long, value_enum, default_value_t = DeviceFlag::Cuda)]
    device: DeviceFlag,
    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Only these families (views, layers, blas, ce, optim; repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    family: Vec<String>,
    /// Only the cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Also write the table to this markdown file (rewritten after every case, so a run
    /// that is stopped keeps what it measured).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Time whole training steps instead of kernels: img/s, MFU and memory per
    /// architecture (views built on the GPU, the full step, AdamW, EMA).
    #[arg(long)]
    step: bool,
    /// With --step: the backbones (repeat or comma-separate).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Arch::Tiny, Arch::Small, Arch::Base])]
    arch: Vec<Arch>,
    /// With --step: the views (paper224 = 2 x 224 + 8 x 96, patch 16).
    #[arg(long, value_enum, default_value_t = Preset::Paper224)]
    preset: Preset,
    /// With --step: patch size.
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// With --step: the head's output dimension K.
    #[arg(long, default_value_t = 65536)]
    out_dim: usize,
    /// With --step: images per step (default: the largest of 512, 384, 256, ... that fits
    /// without releasing the allocator's cache in the timed steps).
    #[arg(long)]
    batch: Option<usize>,
    /// With --step: untimed steps before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// With --step: after the timed steps, one more with every kernel and GEMM timed, and
    /// the per-kernel share of the step printed.
    #[arg(long)]
    profile: bool,
    /// Run on the CPU emulator of the kernels (checks the benchmark's code path on machines
    /// without a GPU; its times mean nothing).
    #[arg(long)]
    emulate: bool,
}

/// Which backend a training run uses, saying so on stderr when `auto` picks.
pub fn resolve_train_device(flag: DeviceFlag) -> Result<TrainDevice> {
    match DeviceChoice::from(flag) {
        DeviceChoice::Cpu => Ok(TrainDevice::Cpu),
        DeviceChoice::Cuda => match cuda_unavailable() {
            Some(reason) => Err(Error::NoCuda { reason }.into()),
            None => Ok(TrainDevice::Cuda(0)),
        },
        DeviceChoice::Auto => match cuda_unavailable() {
            Some(reason) => {
                eprintln!("device: cpu (no CUDA device: {reason})");
                Ok(TrainDevice::Cpu)
            }
            None => {
                eprintln!("device: cuda:0");
                Ok(TrainDevice::Cuda(0))
            }
        },
    }
}

fn open(ordinal: usize) -> Result<Gpu> {
    let gpu = Gpu::open(ordinal)?;
    let mem = gpu.total_memory().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let (major, minor) = gpu.capability();
    // On stderr, so that a command's --json output on stdout stays one JSON document.
    eprintln!(
        "device {ordinal}: {} (compute capability {major}.{minor}, {mem:.0} GiB)",
        gpu.name()
    );
    Ok(gpu)
}

/// `check-kernels`: every kernel against its CPU twin; non-zero exit on any failure.
pub fn check_kernels(args: &CheckKernelsArgs) -> Result<()> {
    let gpu = if args.emulate {
        let gpu = Gpu::emulated()?;
        println!("device: {}", gpu.name());
        gpu
    } else {
        open(args.gpu)?
    };
    println!(
        "error = max |gpu - cpu| / max(|cpu|, 1e-3 max|cpu|) per output; outputs poisoned with NaN before each launch; seed {}",
        args.seed
    );
    let mut failed = 0;
    let mut total = 0;
    let ran = check::run_all(&gpu, args.seed, args.filter.as_deref(), |run| {
        println!("{}", run.name);
        match &run.result {
            Ok(outcomes) => {
                for o in outcomes {
                    total += 1;
                    if !o.passed() {
                        failed += 1;
                    }
                    let verdict = if o.passed() { "ok  " } else { "FAIL" };
                    let worst = o
                        .worst
                        .filter(|_| !o.passed())
                        .map(|(i, g, c)| format!("  (worst at {i}: gpu {g:e}, cpu {c:e})"))
                        .unwrap_or_default();
                    println!(
                        "  {verdict} {:<56} {:>9} elems  err {:.2e}  bound {:.0e}{worst}",
                        o.name, o.elements, o.max_rel_err, o.bound
                    );
                }
            }
            Err(e) => {
                total += 1;
                failed += 1;
                println!("  FAIL could not run: {e}");
            }
        }
    });
    println!("{} passed, {} failed", total - failed, failed);
    match ran {
        Ok(0) => bail!(
            "--filter {:?}: no check matches",
            args.filter.as_deref().unwrap_or("")
        ),
        Ok(_) if failed > 0 => bail!("{failed} kernel output(s) out of bounds or failed to run"),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `bench`: times every kernel at training shapes.
pub fn bench_cmd(args: &BenchArgs) -> Result<()> {
    if args.device == DeviceFlag::Cpu {
        bail!(
            "--device cpu: the CPU benchmarks are criterion's: cargo bench --bench train_step \
             (or --bench views)"
        );
    }
    if args.step {
        return step_bench_cmd(args);
    }
    if args.emulate {
        bail!("--emulate: only with --step (kernel timings on the emulator mean nothing)");
    }
    let known: Vec<&str> = bench::registry().iter().map(|(f, _)| *f).collect();
    if let Some(bad) = args.family.iter().find(|f| !known.contains(&f.as_str())) {
        bail!(
            "--family {bad:?}: not a family; use one of {}",
            known.join(", ")
        );
    }
    let gpu = open(args.gpu)?;
    let mut write_error = None;
    let report = bench::run(
        &gpu,
        args.iters,
        &args.family,
        args.filter.as_deref(),
        |name| eprintln!("  timing {name}"),
        |partial| {
            if let Some(path) = &args.out {
                if let Err(e) = std::fs::write(path, bench::to_markdown(partial)) {
                    write_error = Some(format!("{}: cannot write: {e}", path.display()));
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        bail!(e);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::to_markdown(&report));
    }
    let failed = report.results.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        bail!("{failed} bench case(s) failed (see the table)");
    }
    Ok(())
}

/// `bench --step`: whole training steps per architecture.
fn step_bench_cmd(args: &BenchArgs) -> Result<()> {
    let open_gpu = || -> pwself_engine::error::Result<Gpu> {
        if args.emulate {
            Gpu::emulated()
        } else {
            Gpu::open(args.gpu)
        }
    };
    if !args.emulate {
        drop(open(args.gpu)?);
    }
    let mut results = Vec::new();
    for &arch in &args.arch {
        let cfg = StepBenchConfig {
            arch,
            patch: args.patch,
            preset: args.preset,
            out_dim: args.out_dim,
            loss: LossKind::Pwml,
            batch: args.batch,
            iters: args.iters,
            warmup: args.warmup,
            profile: args.profile,
        };
        eprintln!("  timing {arch:?}/{} steps", args.patch);
        let r = step_bench::run(&open_gpu, &cfg)?;
        for (b, e) in &r.did_not_fit {
            eprintln!("  batch {b} did not fit: {e}");
        }
        results.push(r);
        if let Some(path) = &args.out {
            std::fs::write(path, step_bench::to_markdown(&results))
                .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("{}", step_bench::to_markdown(&results));
    }
    Ok(())
}

/// The commit this binary was built from, when its builder said
/// (scripts/build-gpu-binary.sh sets PWSELF_COMMIT).
pub const SOURCE_COMMIT: &str = match option_env!("PWSELF_COMMIT") {
    Some(c) => c,
    None => "unknown (build with scripts/build-gpu-binary.sh to record it)",
};

/// `kernels`: how this binary's kernels were built and what each uses.
pub fn kernels() -> Result<()> {
    println!("source commit: {SOURCE_COMMIT}");
    match cuda::ptx::NVCC {
        None => println!("no kernels: {}", cuda::ptx::NOT_BUILT),
        Some(nvcc) => {
            println!("kernels compiled by {nvcc}");
            let names: Vec<&str> = cuda::ptx::MODULES.iter().map(|m| m.name).collect();
            println!("modules: {}", names.join(", "));
            print!("{}", cuda::ptx::PTXAS_REPORT);
        }
    }
    match cuda_unavailable() {
        None => println!("a CUDA device is available"),
        Some(r) => println!("no CUDA device: {r}"),
    }
    Ok(())
}

/// The exit status for an error: EXIT_NO_CUDA when it is "no usable GPU", else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<Error>() {
        Some(Error::NoCuda { .. }) => EXIT_NO_CUDA,
        _ => 1,
    }
}
