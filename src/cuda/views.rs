//! (being written)

use super::bench::BenchCase;
use super::check::KernelCheck;
use super::context::Gpu;
use crate::error::Result;

/// This family's parity checks.
pub fn checks() -> Vec<KernelCheck> {
    Vec::new()
}

/// This family's benchmark cases.
pub fn benches(_gpu: &Gpu) -> Result<Vec<BenchCase<'_>>> {
    Ok(Vec::new())
}
