//! Evaluation protocols (SPEC.md section 7): features from a checkpoint or from `.npy`
//! files, weighted kNN, linear probe, copy detection, image retrieval.
pub mod ap;
pub mod copybench;
pub mod copydetect;
pub mod features;
pub mod knn;
pub mod linear;
pub mod npy;
pub mod retrieval;
