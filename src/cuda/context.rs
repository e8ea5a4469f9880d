//! Opening the GPU: the driver library, the device, its context and streams, the kernels'
//! modules, and kernel launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::pool::Pool;
use super::ptx::{self, MODULES};
use crate::error::{Error, Result};

/// Which backend a command runs on (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU reference backend.
    Cpu,
    /// The GPU; an error when there is none.
    Cuda,
    /// The GPU when one can be used, else the CPU (saying so).
    #[default]
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(Error::bad_config(
                "--device",
                format!("{s:?} is not a device: use cpu, cuda or auto"),
            )),
        }
    }
}

/// Why no GPU can be used, with the fix; `None` when one can. Cheap: it opens the driver
/// library and counts devices, but creates no context.
pub fn cuda_unavailable() -> Option<String> {
    if !ptx::kernels_built() {
        return Some(ptx::NOT_BUILT.to_string());
    }
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "libcuda.so (the NVIDIA driver) cannot be loaded: install the driver, or add its \
             folder to LD_LIBRARY_PATH"
                .to_string(),
        );
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => {
            Some("the driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)".to_string())
        }
        Err(e) => Some(format!(
            "the driver failed to start: {e} (check nvidia-smi)"
        )),
    }
}

/// One kernel argument: a device address or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (from [`Buf::ptr`](super::pool::Buf::ptr)).
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    /// An unsigned 64-bit integer (`unsigned long long`, `size_t`).
    U64(u64),
    /// A `double`.
    F64(f64),
}

impl From<i32> for Arg {
    fn from(x: i32) -> Arg {
        Arg::I32(x)
    }
}
impl From<u32> for Arg {
    fn from(x: u32) -> Arg {
        Arg::U32(x)
    }
}
impl From<f32> for Arg {
    fn from(x: f32) -> Arg {
        Arg::F32(x)
    }
}

/// Threads per block and blocks for `n` independent elements. For `n` = 0 the grid is
/// empty and [`Gpu::launch`] launches nothing.
pub fn grid_for(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(u64::from(block)) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of `blocks` blocks of `threads` threads (one block per row, typically). With 0
/// blocks [`Gpu::launch`] launches nothing.
pub fn blocks(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The driver-side objects of a real GPU.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy_stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

/// An open GPU: context, compute stream, copy stream, loaded kernels and the caching
/// allocator. All kernels run on the compute stream, in order. Or the CPU emulator
/// ([`Gpu::emulated`]): the same kernels compiled as C++, launched on host memory.
pub struct Gpu {
    /// None under the emulator.
    device: Option<Device>,
    pool: Pool,
    name: String,
    capability: (i32, i32),
    /// Synchronise and check for errors after every launch (debug builds, or
    /// PWSELF_CUDA_SYNC=1).
    check_each_launch: bool,
    /// Per-launch timing spans while profiling is on.
    profiler: super::profile::Profiler,
}

fn no_device_part(what: &str) -> Error {
    Error::cuda(
        what,
        "the CPU emulator has no CUDA streams or context (a real GPU is needed)",
    )
}

impl Gpu {
    /// Opens device `ordinal` and loads every kernel module.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if let Some(reason) = cuda_unavailable() {
            return Err(Error::NoCuda { reason });
        }
        let count = CudaContext::device_count().map_err(|e| Error::cuda("counting devices", e))?;
        if ordinal as i32 >= count {
            return Err(Error::NoCuda {
                reason: format!("device {ordinal} asked for but the driver sees {count}"),
            });
        }
        // cudarc's cuda-13000 bindings and the PTX (ISA 9.0) need a CUDA 13 driver (R580+).
        let mut driver = 0i32;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(|e| Error::cuda("reading the driver version", e))?;
        if driver < 13000 {
            return Err(Error::NoCuda {
                reason: format!(
                    "the driver supports CUDA {}.{}; these kernels need CUDA 13.0 (driver R580 or newer)",
                    driver / 1000,
                    driver % 1000 / 10
                ),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("creating the context", e))?;
        // One compute stream orders everything; the copy stream is synchronised by hand with
        // events, so cudarc's per-buffer event tracking is not needed.
        // SAFETY: no buffer exists yet, and this engine orders its streams itself.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx
            .name()
            .map_err(|e| Error::cuda("reading the device name", e))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| Error::cuda("reading the compute capability", e))?;
        if capability.0 < 8 {
            return Err(Error::NoCuda {
                reason: format!(
                    "{name} has compute capability {}.{}; the kernels need 8.0 or newer (bf16)",
                    capability.0, capability.1
                ),
            });
        }
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("creating a stream", e))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("creating a stream", e))?;
        let mut modules = HashMap::new();
        for m in MODULES {
            let ptx = ptx::module_ptx(m.name, capability.0).expect("capability checked above");
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| Error::cuda(format!("loading kernels/{}.cu", m.name), e))?;
            modules.insert(m.name, module);
        }
        let check_each_launch = cfg!(debug_assertions)
            || std::env::var_os("PWSELF_CUDA_SYNC").is_some_and(|v| v == "1");
        Ok(Gpu {
            pool: Pool::new(stream.clone()),
            device: Some(Device {
                ctx,
                stream,
                copy_stream,
                modules,
                functions: Mutex::new(HashMap::new()),
            }),
            name,
            capability,
            check_each_launch,
            profiler: Default::default(),
        })
    }

    /// The CPU emulator: every kernel compiled as C++ by build.rs (kernels/emu/), run with
    /// CUDA's block, barrier, shared-memory and shuffle semantics on host memory. It checks
    /// the kernels' logic on machines without a GPU; it says nothing about speed.
    pub fn emulated() -> Result<Gpu> {
        if !super::emu::AVAILABLE {
            return Err(Error::NoCuda {
                reason: "this binary was built without a C++ compiler, so it has no kernel \
                         emulator: install g++ and cargo build again"
                    .to_string(),
            });
        }
        Ok(Gpu {
            device: None,
            pool: Pool::host(),
            name: "CPU emulator (the kernels compiled as C++; logic only, no timing)".to_string(),
            capability: (9, 0),
            check_each_launch: false,
            profiler: Default::default(),
        })
    }

    /// Starts timing every kernel launch and GEMM on the compute stream (see
    /// [`super::profile`]); [`Gpu::profile_take`] ends it.
    pub fn profile_start(&self) {
        self.profiler.start();
    }

    /// Waits for the compute stream, stops profiling and returns the time per kernel since
    /// [`Gpu::profile_start`], largest first.
    pub fn profile_take(&self) -> Result<Vec<super::profile::KernelTime>> {
        self.sync()?;
        super::profile::summarise(self.profiler.take())
    }

    /// Brackets `f` (work enqueued on the compute stream, e.g. a library call) as one span
    /// named `what` when profiling is on.
    pub(crate) fn profiled<T>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let stream = self.device.as_ref().map(|d| d.stream.as_ref());
        let span = self.profiler.begin(stream)?;
        let out = f()?;
        self.profiler.end(span, stream, what)?;
        Ok(out)
    }

    /// Whether this is the CPU emulator.
    pub fn is_emulated(&self) -> bool {
        self.device.is_none()
    }
    /// The card's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }
    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        self.context()?
            .total_mem()
            .map_err(|e| Error::cuda("reading the memory size", e))
    }
    /// The context (an error under the emulator).
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        self.device
            .as_ref()
            .map(|d| &d.ctx)
            .ok_or_else(|| no_device_part("the context"))
    }
    /// The compute stream (an error under the emulator).
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        self.device
            .as_ref()
            .map(|d| &d.stream)
            .ok_or_else(|| no_device_part("the compute stream"))
    }
    /// The stream uploads run on (an error under the emulator).
    pub fn copy_stream(&self) -> Result<&Arc<CudaStream>> {
        self.device
            .as_ref()
            .map(|d| &d.copy_stream)
            .ok_or_else(|| no_device_part("the copy stream"))
    }
    /// The caching allocator.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
    /// Waits for the compute stream (nothing to wait for under the emulator).
    pub fn sync(&self) -> Result<()> {
        match &self.device {
            Some(d) => d
                .stream
                .synchronize()
                .map_err(|e| Error::cuda("waiting for the GPU", e)),
            None => Ok(()),
        }
    }

    /// Kernel `kernel` of `kernels/<module>.cu`.
    fn function(
        &self,
        d: &Device,
        module: &'static str,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        let mut cache = d.functions.lock().expect("function cache lock");
        if let Some(f) = cache.get(&(module, kernel)) {
            return Ok(f.clone());
        }
        let m = d.modules.get(module).ok_or_else(|| {
            Error::cuda(
                format!("kernel {module}::{kernel}"),
                "no such module in this binary",
            )
        })?;
        let f = m
            .load_function(kernel)
            .map_err(|e| Error::cuda(format!("finding kernel {module}::{kernel}"), e))?;
        cache.insert((module, kernel), f.clone());
        Ok(f)
    }

    /// Launches `module::kernel` on the compute stream. In debug builds (or with
    /// PWSELF_CUDA_SYNC=1) it then waits and reports a failure under the kernel's name.
    /// Under the emulator the kernel runs to completion before this returns. A grid with no
    /// block (some dimension 0: no work) launches nothing.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every address must
    /// cover what the kernel reads and writes for `cfg`.
    pub unsafe fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let (gx, gy, gz) = cfg.grid_dim;
        if gx == 0 || gy == 0 || gz == 0 {
            return Ok(());
        }
        let Some(d) = &self.device else {
            let span = self.profiler.begin(None)?;
            super::emu::launch(module, kernel, cfg, args)?;
            return self.profiler.end(span, None, kernel);
        };
        let f = self.function(d, module, kernel)?;
        let span = self.profiler.begin(Some(&d.stream))?;
        let mut b = d.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::I32(x) => b.arg(x),
                Arg::U32(x) => b.arg(x),
                Arg::F32(x) => b.arg(x),
                Arg::F64(x) => b.arg(x),
            };
        }
        b.launch(cfg)
            .map_err(|e| Error::cuda(format!("launching {module}::{kernel}"), e))?;
        self.profiler.end(span, Some(&d.stream), kernel)?;
        if self.check_each_launch {
            d.stream
                .synchronize()
                .map_err(|e| Error::cuda(format!("running {module}::{kernel}"), e))?;
        }
        Ok(())
    }
}
