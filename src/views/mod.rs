//! Views: everything between a source image and the model's input, and the patch
//! correspondences between views. Pure data transforms: no model, no tensors beyond
//! plain `f32` buffers.
pub mod crop;
pub mod matching;
pub mod photometric;
pub mod resize;
