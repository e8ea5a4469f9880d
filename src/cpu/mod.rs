//! CPU reference kernels: one file per layer, forward and backward side by side, f32,
//! rayon over rows. Every CUDA kernel has a twin here with the same name.
