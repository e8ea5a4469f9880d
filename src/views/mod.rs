//! Views: everything between a source image and the model's input, and the patch
//! correspondences between views. Pure data transforms: no model, no tensors beyond
//! plain `f32` buffers.
//!
//! - [`crop`]: crop records and random-resized-crop sampling;
//! - [`resize`]: crop -> view resampling (bilinear / bicubic, antialiased);
//! - [`photometric`]: per-patch (or per-view) photometric augmentation;
//! - [`matching`]: which tokens of two views see the same source pixels;
//! - [`config`]: view counts, sides, scales and presets;
//! - [`batch`]: a batch's views and the prefetching loader.
pub mod args;
pub mod batch;
pub mod config;
pub mod crop;
pub mod matching;
pub mod photometric;
pub mod resize;
