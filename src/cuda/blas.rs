//! GEMMs through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 outputs, with the
//! bias add fused as an epilogue. A well-kept library does these; this file only maps the
//! engine's row-major linear layers onto cuBLASLt's column-major calls, and caches the
//! algorithm its heuristic picks per shape so that a training step makes no heuristic query.
//!
//! Row-major `Y (M x N) = X (M x K) W^T` with `W (N x K)` is, read column-major,
//! `Y^T = W X^T`: A = W's storage with op T, B = X's storage with op N, m = N, n = M, k = K.
//! The two backward products follow the same reading (see each function).
//!
//! GELU is not fused here: cuBLASLt's GELU epilogue is the tanh approximation and the engine
//! uses the exact erf form (src/cpu/gelu.rs), so `layers::bias_gelu_forward` does it.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use half::bf16;

use super::bench::BenchCase;
use super::check::{self, compare, Inputs, KernelCheck, Outcome, BF16_BOUND};
use super::context::Gpu;
use super::pool::{Buf, DevView, DeviceSlice, DeviceSliceMut};
use crate::error::{Error, Result};

/// cuBLASLt's workspace: 32 MiB, what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Element types of the matrices of one GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Out {
    Bf16,
    F32,
}

/// Everything that selects a cuBLASLt algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    m: u64,
    n: u64,
    k: u64,
    trans_a: bool,
    trans_b: bool,
    lda: i64,
    ldb: i64,
    ldc: i64,
    out: Out,
    bias: bool,
    accumulate: bool,
}

/// A cuBLASLt handle bound to the GPU's compute stream, with its workspace and the cache of
/// chosen algorithms.
pub struct Blas {
    /// Null under the CPU emulator, whose GEMMs run on the host ([`host_gemm`]).
    handle: sys::cublasLtHandle_t,
    workspace: Buf<u8>,
    algos: Mutex<HashMap<Shape, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is only used with the compute stream, and cuBLASLt handles may be used
// from any thread; the algorithm cache is behind a mutex.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle was created by `new` and is destroyed once.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::cuda(what, format!("{e:?}"))
}

/// RAII owners of the descriptors of one call.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Blas {
    /// Opens cuBLASLt (libcublasLt must be loadable) for `gpu`'s compute stream.
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        if gpu.is_emulated() {
            return Ok(Blas {
                handle: std::ptr::null_mut(),
                workspace: gpu.pool().alloc::<u8>(16)?,
                algos: Mutex::new(HashMap::new()),
            });
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoCuda {
                reason: "libcublasLt.so cannot be loaded: install the CUDA 13 cuBLAS library \
                         (e.g. pip install nvidia-cublas) and add its lib folder to \
                         LD_LIBRARY_PATH (scripts/gpu-check.sh does this)"
                    .to_string(),
            });
        }
        gpu.context()?
            .bind_to_thread()
            .map_err(|e| Error::cuda("binding the context", e))?;
        let handle = lt::create_handle().map_err(|e| blas_err("creating a cuBLASLt handle", e))?;
        Ok(Blas {
            handle,
            workspace: gpu.pool().alloc::<u8>(WORKSPACE_BYTES)?,
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// `Y = X W^T (+ bias)`: `x` (M, K) bf16, `w` (N, K) bf16, `bias` (N) bf16 (a slice,
    /// e.g. of the flat bf16 parameter copy), `y` (M, N) bf16; fp32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        &self,
        gpu: &Gpu,
        y: &mut impl DeviceSliceMut<bf16>,
        x: &impl DeviceSlice<bf16>,
        w: &impl DeviceSlice<bf16>,
        bias: Option<DevView<'_, bf16>>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<()> {
        assert_eq!(x.len(), m * k, "linear_forward: x must be (M, K)");
        assert_eq!(w.len(), n * k, "linear_forward: w must be (N, K)");
        assert_eq!(y.len(), m * n, "linear_forward: y must be (M, N)");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "linear_forward: bias must be (N)");
        }
        let shape = Shape {
            m: n as u64,
            n: m as u64,
            k: k as u64,
            trans_a: true,
            trans_b: false,
            lda: k as i64,
            ldb: k as i64,
            ldc: n as i64,
            out: Out::Bf16,
            bias: bias.is_some(),
            accumulate: false,
        };
        self.run(gpu, shape, w.ptr(), x.ptr(), y.ptr(), bias.map(|b| b.ptr()))
    }

    /// `dX (+)= dY W`: `dy` (M, N), `w` (N, K), `dx` (M, K), all bf16. Column-major:
    /// `dX^T = W^T dY^T`, A = W's storage (K x N, op N), B = dY's storage (N x M, op N).
    pub fn linear_backward_data(
        &self,
        gpu: &Gpu,
        dx: &mut impl DeviceSliceMut<bf16>,
        dy: &impl DeviceSlice<bf16>,
        w: &impl DeviceSlice<bf16>,
        (m, k, n): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        assert_eq!(dy.len(), m * n, "linear_backward_data: dy must be (M, N)");
        assert_eq!(w.len(), n * k, "linear_backward_data: w must be (N, K)");
        assert_eq!(dx.len(), m * k, "linear_backward_data: dx must be (M, K)");
        let shape = Shape {
            m: k as u64,
            n: m as u64,
            k: n as u64,
            trans_a: false,
            trans_b: false,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            out: Out::Bf16,
            bias: false,
            accumulate,
        };
        self.run(gpu, shape, w.ptr(), dy.ptr(), dx.ptr(), None)
    }

    /// `dW += dY^T X` into an fp32 gradient: `dy` (M, N) bf16, `x` (M, K) bf16, `dw` (N, K)
    /// f32. Column-major: `dW^T = X^T dY`, A = X's storage (K x M, op N), B = dY's storage
    /// (N x M, op T). Always accumulates (the CPU backward functions do too).
    pub fn linear_backward_weight(
        &self,
        gpu: &Gpu,
        dw: &mut impl DeviceSliceMut<f32>,
        dy: &impl DeviceSlice<bf16>,
        x: &impl DeviceSlice<bf16>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<()> {
        assert_eq!(dy.len(), m * n, "linear_backward_weight: dy must be (M, N)");
        assert_eq!(x.len(), m * k, "linear_backward_weight: x must be (M, K)");
        assert_eq!(dw.len(), n * k, "linear_backward_weight: dw must be (N, K)");
        let shape = Shape {
            m: k as u64,
            n: n as u64,
            k: m as u64,
            trans_a: false,
            trans_b: true,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            out: Out::F32,
            bias: false,
            accumulate: true,
        };
        self.run(gpu, shape, x.ptr(), dy.ptr(), dw.ptr(), None)
    }

    fn run(&self, gpu: &Gpu, s: Shape, a: u64, b: u64, c: u64, bias: Option<u64>) -> Result<()> {
        gpu.profiled("cublasLt gemm", || {
            self.run_unprofiled(gpu, s, a, b, c, bias)
        })
    }

    fn run_unprofiled(
        &self,
        gpu: &Gpu,
        s: Shape,
        a: u64,
        b: u64,
        c: u64,
        bias: Option<u64>,
    ) -> Result<()> {
        if gpu.is_emulated() {
            // SAFETY: under the emulator every address is a host block of the size the
            // launchers asserted.
            unsafe { host_gemm(s, a, b, c, bias) };
            return Ok(());
        }
        let ab_type = sys::cudaDataType_t::CUDA_R_16BF;
        let c_type = match s.out {
            Out::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            Out::F32 => sys::cudaDataType_t::CUDA_R_32F,
        };
        let (a_rows, a_cols) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        let layout = |t, r, c, ld| {
            lt::create_matrix_layout(t, r, c, ld)
                .map(Layout)
                .map_err(|e| blas_err("describing a GEMM operand", e))
        };
        let la = layout(ab_type, a_rows, a_cols, s.lda)?;
        let lb = layout(ab_type, b_rows, b_cols, s.ldb)?;
        let lc = layout(c_type, s.m, s.n, s.ldc)?;
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| blas_err("describing a GEMM", e))?,
        );
        let set = |attr, value: *const c_void, size: usize| {
            // SAFETY: desc is live; value points at `size` readable bytes.
            unsafe { lt::set_matmul_desc_attribute(desc.0, attr, value, size) }
                .map_err(|e| blas_err("setting a GEMM attribute", e))
        };
        let (op_a, op_b): (i32, i32) = (i32::from(s.trans_a), i32::from(s.trans_b));
        use sys::cublasLtMatmulDescAttributes_t as A;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            (&op_a as *const i32).cast(),
            4,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            (&op_b as *const i32).cast(),
            4,
        )?;
        if let Some(bias) = bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )?;
            set(
                A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )?;
        }

        let algo = self.algo(s, &desc, &la, &lb, &lc)?;
        let alpha = 1.0f32;
        let beta = if s.accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: every descriptor is live; a, b, c and bias cover the shapes the launchers
        // asserted; the workspace is WORKSPACE_BYTES long.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a as *const c_void,
                la.0,
                b as *const c_void,
                lb.0,
                c as *const c_void,
                lc.0,
                c as *mut c_void,
                lc.0,
                &algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE_BYTES,
                gpu.stream()?.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_err("running a GEMM", e))?;
        Ok(())
    }

    /// The algorithm for `s`: the heuristic's first choice, asked once per shape.
    fn algo(
        &self,
        s: Shape,
        desc: &Desc,
        la: &Layout,
        lb: &Layout,
        lc: &Layout,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut cache = self.algos.lock().expect("algorithm cache lock");
        if let Some(a) = cache.get(&s) {
            return Ok(*a);
        }
        let pref = Pref(lt::create_matmul_pref().map_err(|e| blas_err("GEMM preferences", e))?);
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: pref is live; the value is a u64 as the attribute requires.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                8,
            )
        }
        .map_err(|e| blas_err("GEMM preferences", e))?;
        // SAFETY: all descriptors are live.
        let h = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0)
        }
        .map_err(|e| blas_err(&format!("finding a GEMM algorithm for {s:?}"), e))?;
        cache.insert(s, h.algo);
        Ok(h.algo)
    }
}

/// cuBLASLt's operation on the host, for the CPU emulator: column-major
/// `C = op(A) op(B) (+ bias) (+ C)`, bf16 A and B, fp32 accumulation (f64 here), bf16 or
/// fp32 C. It follows the column-major description the launchers give cuBLASLt, not the
/// row-major reference of the checks, so the checks still test the launchers' mapping.
///
/// # Safety
/// `a`, `b`, `c` and `bias` are host addresses covering the shapes in `s`.
unsafe fn host_gemm(s: Shape, a: u64, b: u64, c: u64, bias: Option<u64>) {
    let (m, n, k) = (s.m as usize, s.n as usize, s.k as usize);
    let (lda, ldb, ldc) = (s.lda as usize, s.ldb as usize, s.ldc as usize);
    let a = a as *const bf16;
    let b = b as *const bf16;
    let op_a = |i: usize, p: usize| {
        let at = if s.trans_a { p + i * lda } else { i + p * lda };
        f64::from((*a.add(at)).to_f32())
    };
    let op_b = |p: usize, j: usize| {
        let at = if s.trans_b { j + p * ldb } else { p + j * ldb };
        f64::from((*b.add(at)).to_f32())
    };
    for j in 0..n {
        for i in 0..m {
            let mut acc: f64 = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
            if let Some(bias) = bias {
                acc += f64::from((*(bias as *const bf16).add(i)).to_f32());
            }
            let at = i + j * ldc;
            match s.out {
                Out::Bf16 => {
                    let cp = (c as *mut bf16).add(at);
                    if s.accumulate {
                        acc += f64::from((*cp).to_f32());
                    }
                    *cp = bf16::from_f64(acc);
                }
                Out::F32 => {
                    let cp = (c as *mut f32).add(at);
                    if s.accumulate {
                        acc += f64::from(*cp);
                    }
                    *cp = acc as f32;
                }
            }
        }
    }
}

/// Checks: the three products against the CPU's f32 GEMM on bf16-rounded inputs.
pub fn checks() -> Vec<KernelCheck> {
    vec![KernelCheck {
        name: "gemm (cuBLASLt: linear forward, backward data, backward weight)",
        run: check_linear,
    }]
}

/// Row-major reference products in f64: Y = X W^T + b, dX = dY W, dW = dY^T X.
fn reference(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dy: &[f32],
    (m, k, n): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                .sum();
            y[i * n + j] = (s + f64::from(bias[j])) as f32;
        }
    }
    let mut dx = vec![0.0f32; m * k];
    for i in 0..m {
        for t in 0..k {
            let s: f64 = (0..n)
                .map(|j| f64::from(dy[i * n + j]) * f64::from(w[j * k + t]))
                .sum();
            dx[i * k + t] = s as f32;
        }
    }
    let mut dw = vec![0.0f32; n * k];
    for j in 0..n {
        for t in 0..k {
            let s: f64 = (0..m)
                .map(|i| f64::from(dy[i * n + j]) * f64::from(x[i * k + t]))
                .sum();
            dw[j * k + t] = s as f32;
        }
    }
    (y, dx, dw)
}

fn check_linear(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let blas = Blas::new(gpu)?;
    let mut out = Vec::new();
    // Odd sizes (not multiples of any tile), and a ViT-like one.
    for &(m, k, n) in &[(37usize, 72usize, 40usize), (394, 384, 1536)] {
        let x = check::round_bf16(&inputs.normal(m * k, 1.0));
        let w = check::round_bf16(&inputs.normal(n * k, 0.05));
        let bias = check::round_bf16(&inputs.normal(n, 0.1));
        let dy = check::round_bf16(&inputs.normal(m * n, 1.0));
        let dw0 = inputs.normal(n * k, 0.01);
        let (y_ref, dx_ref, dw_prod) = reference(&x, &w, &bias, &dy, (m, k, n));
        let dw_ref: Vec<f32> = dw0.iter().zip(&dw_prod).map(|(a, b)| a + b).collect();

        let pool = gpu.pool();
        let (xd, wd, bd, dyd) = (
            pool.upload(&check::to_bf16(&x))?,
            pool.upload(&check::to_bf16(&w))?,
            pool.upload(&check::to_bf16(&bias))?,
            pool.upload(&check::to_bf16(&dy))?,
        );
        let mut y = check::poisoned_bf16(gpu, m * n)?;
        blas.linear_forward(gpu, &mut y, &xd, &wd, Some(bd.slice(0..n)), (m, k, n))?;
        let mut dx = check::poisoned_bf16(gpu, m * k)?;
        blas.linear_backward_data(gpu, &mut dx, &dyd, &wd, (m, k, n), false)?;
        let mut dw = pool.upload(&dw0)?;
        blas.linear_backward_weight(gpu, &mut dw, &dyd, &xd, (m, k, n))?;
        let shape = format!("{m}x{k}x{n}");
        out.push(compare(
            format!("linear_forward {shape}"),
            &check::download_bf16(&y)?,
            &y_ref,
            BF16_BOUND,
        ));
        out.push(compare(
            format!("linear_backward_data {shape}"),
            &check::download_bf16(&dx)?,
            &dx_ref,
            BF16_BOUND,
        ));
        // fp32 output, but the products of bf16 inputs are summed in an order cuBLASLt
        // chooses (split-K included), and the tensor cores' fp32 accumulation is not IEEE
        // summation (it aligns the products before adding them): the first H200 run
        // measured 1.42e-4 at 394x384x1536, an absolute error of 1.3e-5 on a sum of 394
        // products of size ~1. 5e-4 relative to the output's scale still catches any wrong
        // index or missed term (errors of order 1).
        out.push(compare(
            format!("linear_backward_weight {shape}"),
            &check::download_f32(&dw)?,
            &dw_ref,
            5e-4,
        ));
    }
    Ok(out)
}

/// ViT-S/16 shapes (B = 64 at 224: 12 608 tokens) and a large square product for the
/// card's matmul peak.
pub fn benches(gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    let blas = std::sync::Arc::new(Blas::new(gpu)?);
    let mut cases = Vec::new();
    let shapes: [(&str, usize, usize, usize); 4] = [
        ("qkv", 64 * 197, 384, 1152),
        ("mlp fc1", 64 * 197, 384, 1536),
        ("mlp fc2", 64 * 197, 1536, 384),
        ("square 8192", 8192, 8192, 8192),
    ];
    // Random inputs: tensor cores draw less power on constant data (and run faster on
    // zeros), which would flatter the figures.
    let mut inputs = Inputs::new(0, 0xB1A5);
    let mut random = |n: usize, std: f32| check::to_bf16(&inputs.normal(n, std));
    for (label, m, k, n) in shapes {
        let pool = gpu.pool();
        let x = pool.upload(&random(m * k, 1.0))?;
        let w = pool.upload(&random(n * k, 0.05))?;
        let mut y = pool.alloc::<bf16>(m * n)?;
        let b = blas.clone();
        cases.push(BenchCase {
            name: format!("linear_forward {label} {m}x{k}x{n}"),
            bytes: 0,
            flops: 2 * (m * n * k) as u64,
            run: Box::new(move || b.linear_forward(gpu, &mut y, &x, &w, None, (m, k, n))),
        });
    }
    let (m, k, n) = (64 * 197, 384, 1536);
    let pool = gpu.pool();
    let dy = pool.upload(&random(m * n, 1.0))?;
    let x = pool.upload(&random(m * k, 1.0))?;
    let mut dw = pool.upload(&vec![0.0f32; n * k])?;
    let b = blas.clone();
    cases.push(BenchCase {
        name: format!("linear_backward_weight mlp fc1 {m}x{k}x{n}"),
        bytes: 0,
        flops: 2 * (m * n * k) as u64,
        run: Box::new(move || b.linear_backward_weight(gpu, &mut dw, &dy, &x, (m, k, n))),
    });
    Ok(cases)
}
