//! The CUDA backend: kernels compiled from `kernels/*.cu` by build.rs, loaded through the
//! driver API (cudarc, loaded at run time, so binaries without a GPU still run), and a
//! launcher per kernel. Every kernel has a CPU twin of the same name in [`crate::cpu`],
//! [`crate::loss`], [`crate::optim`] or [`crate::views`]; `pwself-engine check-kernels`
//! compares them on random inputs ([`check`]), and `pwself-engine bench --device cuda`
//! times them ([`bench`]).
//!
//! Kernel families, one `kernels/<family>.cu` and one launcher file each:
//! - [`views`]: the fused view builder (crop, resize, per-patch photometric augmentation,
//!   normalisation) from the u8 source batch to the model input;
//! - [`layers`]: patch-embedding im2col, CLS/position add, layernorm, bias + GELU,
//!   L2-normalisation and weight norm of the head;
//! - [`ce`]: the gathered matched-token cross-entropy and the teacher centre;
//! - [`optim`]: AdamW over the flat buffer, teacher EMA, gradient norm and clipping;
//! - [`attention`]: fused flash-style multi-head attention, forward and backward;
//! - [`blas`]: GEMMs through cuBLASLt.

pub mod attention;
pub mod bench;
pub mod blas;
pub mod ce;
pub mod check;
pub mod context;
pub mod emu;
pub mod head;
pub mod layers;
pub mod optim;
pub mod pool;
pub mod profile;
pub mod ptx;
pub mod step;
pub mod step_bench;
pub mod train;
pub mod upload;
pub mod views;
pub mod vit;

pub use context::{cuda_unavailable, Arg, DeviceChoice, Gpu};
pub use pool::{Buf, DevView, DevViewMut, DeviceSlice, DeviceSliceMut, Pool, PoolStats};
