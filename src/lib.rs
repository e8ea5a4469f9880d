//! pwself-engine: a training engine for PW-Self, patch-wise self-supervised Vision
//! Transformers (DINO self-distillation + per-patch photometric augmentation + a
//! cross-entropy between matched patch tokens of different crops).
//!
//! The library is the engine; `src/main.rs` is a thin CLI over it. What is here so far:
//! - [`data`]: pack files (the engine's dataset format), ingest from IDX / CIFAR / image
//!   folders, and the embedded default dataset;
//! - [`views`]: crop records, batch-shared spatial parameters, resize, per-patch
//!   photometric augmentation, patch matching, and the prefetching view loader;
//! - [`rng`]: the counter-based random numbers every draw comes from.

pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod error;
pub mod eval;
pub mod interop;
pub mod loss;
pub mod model;
pub mod optim;
pub mod rng;
pub mod train;
pub mod views;
pub mod viz;

pub use error::{Error, Result};
