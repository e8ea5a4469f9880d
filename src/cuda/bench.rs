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
