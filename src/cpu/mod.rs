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
//!   used by several calls (global and local views) and residual branches then add up.
//!   Where an input gradient has a single writer, an `_into` twin overwrites it instead
//!   (the same values as accumulating into zeros, a zero's sign aside, without the pass
//!   that zeroes it), and `linear_gelu_*` fuse a Linear with the GELU next to it (GEMM
//!   epilogues, [`gemm_then`]);
//! - results are bit-identical for any rayon thread count: rows are split among threads
//!   but every reduction runs in a fixed order (a parameter gradient sums fixed blocks of
//!   rows, in parallel, and adds the block sums in order: [`sum_over_rows`]; a sum along a
//!   row uses [`reduce`]'s fixed lanes).
//!
//! GEMMs go through the `gemm` crate (see [`gemm`]), single-threaded per call, and
//! [`gemm`] shares a product among rayon tasks itself: blocks of rows or columns of `C`,
//! or, for a small `C` summed over many rows (the weight gradients), fixed blocks of the
//! shared dimension whose partial products are added in order. The blocks follow from the
//! shape alone, so results do not depend on the thread count; `tests/cpu_kernels.rs`
//! checks each split against one unsplit call and across pool sizes. (The crate's own
//! rayon parallelism is not used: one split rule, ours, keeps the results independent of
//! the thread count. The crate replaced `matrixmultiply`, whose `threading` pool
//! synchronised once per 256-deep slice of `k` and whose packing of row-major activations
//! cost a fifth of the step; see docs/cpu-performance.md.)

pub mod attention;
pub mod drop_path;
pub mod exp;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod linear;
pub mod patch_embed;
pub mod reduce;

use rayon::prelude::*;

/// Sets every element of `buf` to zero (gradient buffers before a backward pass), in
/// parallel blocks when it is large: the backward pass zeroes about 40 MB per block of the
/// default model before accumulating into it, which was serial time on the calling thread.
pub fn zero(buf: &mut [f32]) {
    const BLOCK: usize = 1 << 16;
    if buf.len() <= BLOCK {
        buf.fill(0.0);
    } else {
        buf.par_chunks_mut(BLOCK).for_each(|b| b.fill(0.0));
    }
}

/// Makes `buf` `n` zeros, reusing its allocation when it is large enough (zeroed in
/// parallel, see [`zero`]).
pub fn resize_zeroed(buf: &mut Vec<f32>, n: usize) {
    buf.resize(n, 0.0);
    zero(buf);
}

/// Rows per partial sum when a parameter gradient is reduced over rows ([`sum_over_rows`]).
pub(crate) const ROW_BLOCK: usize = 512;

/// A parameter gradient summed over `n` rows: `row(i, part)` adds row `i`'s contribution
/// (`width` values) into `part`. Rows are summed in index order within fixed blocks of
/// [`ROW_BLOCK`] rows, one rayon task per block, each from zeros; `add` then receives the
/// block sums in block order (on the calling thread) to add them into the gradient. The
/// blocks follow from `n` alone, so the result does not depend on the thread count.
///
/// (Blocks of rows rather than of columns: the gradients of the default model are 64 wide,
/// and a split over columns left one task, serial, for each of them.)
pub(crate) fn sum_over_rows(
    width: usize,
    n: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
    mut add: impl FnMut(&[f32]),
) {
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut part = vec![0.0f32; width];
            for i in blk * ROW_BLOCK..n.min((blk + 1) * ROW_BLOCK) {
                row(i, &mut part);
            }
            part
        })
        .collect();
    for part in &blocks {
        add(part);
    }
}

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

/// Rows (or columns) of `C` per task when [`gemm`] splits `C` among rayon tasks, at least.
/// Each task packs the other operand afresh, so a block must be tall enough for that
/// packing to be small beside its arithmetic (about 5% at 512).
const SPLIT_BLOCK: usize = 512;

/// Rows of the shared dimension per partial product when [`gemm`] splits `k` (a small `C`
/// summed over many rows: the weight gradients).
const K_BLOCK: usize = 1024;

thread_local! {
    /// The partial products of [`gemm`]'s split over `k`, per calling thread.
    static K_PARTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Below this many multiply-adds, [`gemm`] runs one call on the calling thread.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// At most this many tasks per split, so a huge matrix gets larger blocks, not more tasks.
const MAX_TASKS: usize = 64;

/// How [`gemm`] shares one product among rayon tasks. Chosen from the shape alone, never
/// from the thread count, so the arithmetic (and the result) is the same on any pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Split {
    /// One call.
    None,
    /// Blocks of this many rows of `C` (and `A`); each element is computed as unsplit.
    Rows(usize),
    /// Blocks of this many columns of `C` (and `B`); each element is computed as unsplit.
    Cols(usize),
    /// Partial products over blocks of this many rows of `B` (columns of `A`), added into
    /// `C` in block order.
    K(usize),
}

/// Rounds `dim / MAX_TASKS` up to a multiple of 64 and takes at least [`SPLIT_BLOCK`].
fn block_for(dim: usize, min: usize) -> usize {
    dim.div_ceil(MAX_TASKS).next_multiple_of(64).max(min)
}

/// The split [`gemm`] uses for an `(m, k) @ (k, n)` product: the larger side of `C` when
/// it makes at least two blocks (the other operand is the one repacked per block, so it is
/// the smaller), else the shared dimension (weight gradients: `C` is `(out, in)` and `k`
/// is the number of tokens).
pub(crate) fn split_for(m: usize, k: usize, n: usize) -> Split {
    if m.saturating_mul(n).saturating_mul(k) < SPLIT_MIN_WORK {
        Split::None
    } else if m >= n && m >= 2 * SPLIT_BLOCK {
        Split::Rows(block_for(m, SPLIT_BLOCK))
    } else if n > m && n >= 2 * SPLIT_BLOCK {
        Split::Cols(block_for(n, SPLIT_BLOCK))
    } else if k >= 2 * K_BLOCK {
        Split::K(block_for(k, K_BLOCK))
    } else {
        Split::None
    }
}

/// `C = alpha * A B + beta * C` on strided f32 matrices; `A` is `(m, k)` with strides
/// `(rsa, csa)`, `B` is `(k, n)`, `C` is `(m, n)`. A transpose is a swap of strides. With
/// `beta == 0`, `C` is overwritten and its old contents (even NaN) are ignored.
///
/// Bounds-checked, and parallel on the rayon pool: `C` is cut into blocks of rows or of
/// columns (which leaves every element's arithmetic as in one call), or, for a small `C`
/// over a long `k`, `k` is cut into fixed blocks whose products are added in order (see
/// [`split_for`]). The cut depends on the shape only, so results do not depend on the
/// number of threads.
// (m, k) @ (k, n) -> (m, n)
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
    sc: (usize, usize),
) {
    gemm_with(m, k, n, alpha, a, sa, b, sb, beta, c, sc, None);
}

/// An elementwise pass over whole rows of a GEMM's `C`: called with the first row's index
/// and those rows, `(rows, n)` contiguous.
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// [`gemm`] into a row-major `C` (strides `(n, 1)`), then `epilogue` over every row of `C`
/// once, in blocks of whole rows: where the product is split by rows, each block as soon as
/// its task has computed it, while it is still in that core's cache; otherwise in blocks of
/// [`SPLIT_BLOCK`] rows after the product. A bias add and a GELU after a Linear, or the
/// GELU's derivative after an input gradient, then cost no extra pass through memory. The
/// epilogue must treat each element alone (no sums over rows), so the result is the same
/// as the GEMM followed by the epilogue over all of `C`.
// (m, k) @ (k, n) -> (m, n)
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_then(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
    epilogue: Epilogue,
) {
    assert_eq!(c.len(), m * n, "gemm_then: C must be (m, n), row-major");
    gemm_with(
        m,
        k,
        n,
        alpha,
        a,
        sa,
        b,
        sb,
        beta,
        c,
        (n, 1),
        Some(epilogue),
    );
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
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
    epilogue: Option<Epilogue>,
) {
    if k > 0 {
        assert!(extent(m, k, rsa, csa) <= a.len(), "gemm: A out of bounds");
        assert!(extent(k, n, rsb, csb) <= b.len(), "gemm: B out of bounds");
    }
    assert!(extent(m, n, rsc, csc) <= c.len(), "gemm: C out of bounds");
    let split = split_for(m, k, n);
    let (pa, pb, pc) = (ConstPtr(a.as_ptr()), ConstPtr(b.as_ptr()), SendPtr::new(c));
    // SAFETY (every call below): the asserts above keep every element addressed by the
    // full shapes inside the slices, and each block addresses a subset of them; `c` is
    // borrowed mutably, so it cannot alias `a` or `b`; the blocks of `C` written by
    // different tasks are disjoint (row or column ranges), and the K split writes `C` from
    // one task only. `block` computes rows [r0, r0 + rows) and columns [c0, c0 + cols) of
    // C; every caller below passes ranges inside C.
    let block = |r0: usize, rows: usize, c0: usize, cols: usize| unsafe {
        gemm_raw(
            rows,
            k,
            cols,
            alpha,
            pa.get().add(r0 * rsa),
            (rsa, csa),
            pb.get().add(c0 * csb),
            (rsb, csb),
            beta,
            pc.get().add(r0 * rsc + c0 * csc),
            (rsc, csc),
        );
    };
    match split {
        Split::None => block(0, m, 0, n),
        Split::Rows(size) => (0..m.div_ceil(size)).into_par_iter().for_each(|i| {
            let (r0, rows) = (i * size, size.min(m - i * size));
            block(r0, rows, 0, n);
            if let Some(e) = epilogue {
                // SAFETY: with an epilogue C is row-major (gemm_then), so these rows are
                // `rows * n` contiguous elements inside C, computed by this task and
                // touched by no other.
                e(r0, unsafe {
                    std::slice::from_raw_parts_mut(pc.get().add(r0 * n), rows * n)
                });
            }
        }),
        Split::Cols(size) => (0..n.div_ceil(size))
            .into_par_iter()
            .for_each(|j| block(0, m, j * size, size.min(n - j * size))),
        Split::K(block) => {
            // Block 0 goes straight into C (with beta); blocks 1.. into dense partials,
            // then added to C in block order. The partials live in this thread's buffer,
            // kept for its capacity (a fresh allocation would be mapped and faulted in
            // anew each call); a nested call on the same thread gets its own.
            let blocks = k.div_ceil(block);
            let len = (blocks - 1) * m * n;
            let run = |partials: &mut [f32]| {
                let pp = SendPtr::new(partials);
                (0..blocks).into_par_iter().for_each(|p| {
                    let (k0, len) = (p * block, block.min(k - p * block));
                    let (a0, b0) = unsafe { (pa.get().add(k0 * csa), pb.get().add(k0 * rsb)) };
                    let (beta, c, sc) = if p == 0 {
                        (beta, pc.get(), (rsc, csc))
                    } else {
                        (0.0, unsafe { pp.get().add((p - 1) * m * n) }, (n, 1))
                    };
                    unsafe {
                        gemm_raw(
                            m,
                            len,
                            n,
                            alpha,
                            a0,
                            (rsa, csa),
                            b0,
                            (rsb, csb),
                            beta,
                            c,
                            sc,
                        )
                    };
                });
                // C rows in parallel; within an element, the partials in block order.
                let partials = &*partials;
                (0..m).into_par_iter().for_each(|i| {
                    for part in partials.chunks_exact(m * n) {
                        for (j, v) in part[i * n..(i + 1) * n].iter().enumerate() {
                            // SAFETY: row i of C is written by this task only.
                            unsafe { *pc.get().add(i * rsc + j * csc) += v };
                        }
                    }
                });
            };
            K_PARTIALS.with(|buf| match buf.try_borrow_mut() {
                Ok(mut partials) => {
                    partials.resize(len, 0.0); // every element is written by its block
                    run(&mut partials[..len]);
                }
                Err(_) => run(&mut vec![0.0; len]),
            });
        }
    }
    if let Some(e) = epilogue {
        // Row splits ran it in their tasks.
        if !matches!(split, Split::Rows(_)) && n > 0 {
            c[..m * n]
                .par_chunks_mut(SPLIT_BLOCK * n)
                .enumerate()
                .for_each(|(i, rows)| e(i * SPLIT_BLOCK, rows));
        }
    }
}

/// Unchecked [`gemm`] on raw pointers, single-threaded, for kernels whose threads write
/// disjoint strided blocks of one buffer (attention heads) and for [`gemm`]'s blocks.
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
    sa: (usize, usize),
    b: *const f32,
    sb: (usize, usize),
    beta: f32,
    c: *mut f32,
    sc: (usize, usize),
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { sgemm(m, k, n, alpha, a, sa, b, sb, beta, c, sc) };
}

/// One single-threaded `gemm::gemm` call with `(row, column)` stride pairs. The crate's
/// convention is `dst = alpha dst + beta lhs rhs` with column stride first, and it reads
/// `dst` only when asked: `read_dst = beta != 0` keeps "`beta == 0` overwrites `C`".
///
/// # Safety
/// As [`gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
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
        gemm::gemm(
            m,
            n,
            k,
            c,
            csc as isize,
            rsc as isize,
            beta != 0.0,
            a,
            csa as isize,
            rsa as isize,
            b,
            csb as isize,
            rsb as isize,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A read-only raw pointer that may cross threads (the operands of a split [`gemm`]).
#[derive(Clone, Copy)]
struct ConstPtr(*const f32);

// SAFETY: ConstPtr is a plain address of data nobody writes while it is shared.
unsafe impl Send for ConstPtr {}
// SAFETY: as above.
unsafe impl Sync for ConstPtr {}

impl ConstPtr {
    /// The pointer; a method so that closures capture the whole `ConstPtr`.
    fn get(self) -> *const f32 {
        self.0
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
    fn split_follows_the_shape_of_each_training_gemm() {
        // small28: forward (10,240 tokens, 64 -> 256), weight gradient (256, 64) over
        // 10,240 tokens, an attention-sized product; tiny224: head logits (4,800 rows,
        // 256 -> 65,536) and the last layer's weight gradient (65,536, 256) over 4,800 rows.
        assert_eq!(split_for(10_240, 64, 256), Split::Rows(512));
        assert_eq!(split_for(256, 10_240, 64), Split::K(1024));
        assert_eq!(split_for(50, 32, 50), Split::None);
        assert_eq!(split_for(4_800, 256, 65_536), Split::Cols(1024));
        assert_eq!(split_for(65_536, 4_800, 256), Split::Rows(1024));
        // Not enough of any dimension to make two blocks.
        assert_eq!(split_for(600, 600, 600), Split::None);
    }

    /// Pseudo-random values in [-1, 1) (a fixed LCG; no dependency on the crate's rng).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// One plain unsplit GEMM call on the operands as given (no split, no copies).
    #[allow(clippy::too_many_arguments)]
    fn plain(
        (m, k, n): (usize, usize, usize),
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
        c: &mut [f32],
    ) {
        // SAFETY: the callers pass shapes their buffers hold.
        unsafe {
            sgemm(
                m,
                k,
                n,
                1.5,
                a.as_ptr(),
                sa,
                b.as_ptr(),
                sb,
                0.5,
                c.as_mut_ptr(),
                (n, 1),
            )
        };
    }

    #[test]
    fn row_and_column_splits_are_bit_identical_to_one_call() {
        // (m, k, n): the row split, the column split, no split; each with A stored by rows
        // and by columns, B by rows and by columns, and C accumulated (beta = 0.5) from
        // non-zero values.
        for (m, k, n, want) in [
            (1500, 40, 30, Split::Rows(512)),
            (30, 40, 1500, Split::Cols(512)),
            (1100, 700, 40, Split::Rows(512)),
            (40, 700, 1100, Split::Cols(512)),
            (60, 40, 50, Split::None),
        ] {
            assert_eq!(split_for(m, k, n), want);
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let c0 = values(m * n, 3);
            for (sa, sb) in [
                ((1, m), (n, 1)),
                ((k, 1), (n, 1)),
                ((1, m), (1, k)),
                ((k, 1), (1, k)),
            ] {
                let mut ours = c0.clone();
                gemm(m, k, n, 1.5, &a, sa, &b, sb, 0.5, &mut ours, (n, 1));
                let mut one = c0.clone();
                plain((m, k, n), &a, sa, &b, sb, &mut one);
                assert!(
                    ours.iter()
                        .zip(&one)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{want:?}, A strides {sa:?}, B strides {sb:?}: differs from one sgemm call"
                );
            }
        }
    }

    #[test]
    fn k_split_sums_its_blocks_into_c_with_alpha_and_beta() {
        let (m, k, n) = (24, 2500, 20);
        assert_eq!(split_for(m, k, n), Split::K(1024));
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let c0 = values(m * n, 6);
        let mut c = c0.clone();
        gemm(m, k, n, -2.0, &a, (k, 1), &b, (n, 1), 0.25, &mut c, (n, 1));
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                    .sum();
                let want = 0.25 * f64::from(c0[i * n + j]) - 2.0 * dot;
                let got = f64::from(c[i * n + j]);
                // 2,500 products of terms below 1: f32 rounding stays far below 1e-3.
                assert!((got - want).abs() < 1e-3, "C[{i},{j}] = {got}, want {want}");
            }
        }
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
