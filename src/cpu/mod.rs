//! CPU reference kernels: one file per layer, forward and backward side by side, f32,
//! rayon over rows. Every CUDA kernel has a twin here with the same name.
//!
//! These kernels are the oracle the GPU kernels are checked against, so they favour a
//! plain, checkable shape over speed tricks. What they must not do: allocate per element,
//! hold state between calls, or produce results that depend on the number of threads.
//!
//! Conventions shared by every file:
//! - plain functions on `f32` slices, row-major, PyTorch layouts (a Linear weight is
//!   `(out, in)`, a conv weight `(out, C, kh, kw)`); shapes in a comment on each function;
//! - forward functions overwrite their outputs and save what backward needs in buffers
//!   the caller provides (layernorm mean/rstd, attention probabilities, norms);
//! - **backward functions accumulate** (`+=`) into every gradient they write, input and
//!   parameter gradients alike; the caller zeroes gradient buffers (see [`zero`]). Weights
//!   used by several calls (global and local views) and residual branches then add up;
//! - results are bit-identical for any rayon thread count: rows are split among threads
//!   but every reduction runs in a fixed order (a parameter gradient sums rows in index
//!   order, in parallel only across columns).
//!
//! GEMMs go through `matrixmultiply::sgemm` (see [`gemm`]). Its `threading` feature runs
//! on its own pool (crate `thread-tree`), sized once per process by the environment
//! variable `MATMUL_NUM_THREADS` (1..=4; default: the number of physical cores), not by
//! rayon. It only splits the two loops over output blocks (its "loop 3" over rows of C and
//! "loop 2" over columns of C); the loop over the shared dimension `k` stays sequential,
//! so every output element is computed by one thread in one order and results do not
//! depend on the thread count. `tests/cpu_kernels.rs` checks this bit for bit by running a
//! GEMM large enough to split under `MATMUL_NUM_THREADS=1` and `=4`.

pub mod attention;
pub mod drop_path;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod linear;
pub mod patch_embed;

/// Sets every element of `buf` to zero (gradient buffers before a backward pass).
pub fn zero(buf: &mut [f32]) {
    buf.fill(0.0);
}

/// Columns per task when a parameter gradient is reduced over rows: each task owns a
/// block of columns and sums the rows in index order, so the result is independent of
/// how tasks are scheduled.
pub(crate) const COLUMN_BLOCK: usize = 64;

/// Elements per task for elementwise kernels (large enough to amortise rayon's overhead).
pub(crate) const ELEMENTWISE_CHUNK: usize = 4096;

/// The largest offset a strided `(rows, cols)` matrix touches, plus one; 0 if empty.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C = alpha * A B + beta * C` on strided f32 matrices (bounds-checked wrapper over
/// `matrixmultiply::sgemm`); `A` is `(m, k)` with strides `(rsa, csa)`, `B` is `(k, n)`,
/// `C` is `(m, n)`. A transpose is a swap of strides. With `beta == 0`, `C` is overwritten
/// and its old contents (even NaN) are ignored.
// (m, k) @ (k, n) -> (m, n)
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if k > 0 {
        assert!(extent(m, k, rsa, csa) <= a.len(), "gemm: A out of bounds");
        assert!(extent(k, n, rsb, csb) <= b.len(), "gemm: B out of bounds");
    }
    assert!(extent(m, n, rsc, csc) <= c.len(), "gemm: C out of bounds");
    // SAFETY: the asserts above keep every element sgemm reads or writes inside the
    // slices; `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            (rsa, csa),
            b.as_ptr(),
            (rsb, csb),
            beta,
            c.as_mut_ptr(),
            (rsc, csc),
        );
    }
}

/// Unchecked [`gemm`] on raw pointers, for kernels whose threads write disjoint strided
/// blocks of one buffer (attention heads).
///
/// # Safety
/// Every element addressed by the shapes and strides must be valid; the elements of `c`
/// written here must not be read or written by anyone else during the call.
// (m, k) @ (k, n) -> (m, n)
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    (rsa, csa): (usize, usize),
    b: *const f32,
    (rsb, csb): (usize, usize),
    beta: f32,
    c: *mut f32,
    (rsc, csc): (usize, usize),
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
            csc as isize,
        );
    }
}

/// A raw pointer that may cross threads; used only where threads write provably disjoint
/// elements of one buffer (each use says why in a `SAFETY` comment).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(*mut f32);

// SAFETY: SendPtr is a plain address; the code that dereferences it guarantees that no two
// threads touch the same element.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Wraps the start of a mutable slice.
    pub(crate) fn new(s: &mut [f32]) -> Self {
        SendPtr(s.as_mut_ptr())
    }

    /// The pointer. A method (not field access) so closures capture the whole `SendPtr`.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_with_transposes_and_accumulation() {
        // A (2, 3), B^T stored as (4, 3), C (2, 4) starting from ones with beta = 1.
        let a: Vec<f32> = (0..6).map(|i| i as f32 - 2.0).collect();
        let bt: Vec<f32> = (0..12).map(|i| 0.5 * i as f32 - 1.0).collect();
        let mut c = vec![1.0f32; 8];
        gemm(2, 3, 4, 2.0, &a, (3, 1), &bt, (1, 3), 1.0, &mut c, (4, 1));
        for i in 0..2 {
            for j in 0..4 {
                let dot: f32 = (0..3).map(|p| a[i * 3 + p] * bt[j * 3 + p]).sum();
                assert_eq!(c[i * 4 + j], 1.0 + 2.0 * dot);
            }
        }
    }

    #[test]
    fn gemm_beta_zero_ignores_nan_in_c() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 4.0];
        let mut c = [f32::NAN];
        gemm(1, 2, 1, 1.0, &a, (2, 1), &b, (1, 1), 0.0, &mut c, (1, 1));
        assert_eq!(c[0], 11.0);
    }

    #[test]
    #[should_panic(expected = "gemm: A out of bounds")]
    fn gemm_rejects_short_a() {
        let mut c = [0.0f32; 4];
        gemm(
            2,
            2,
            2,
            1.0,
            &[0.0; 3],
            (2, 1),
            &[0.0; 4],
            (2, 1),
            0.0,
            &mut c,
            (2, 1),
        );
    }
}
