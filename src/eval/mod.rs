//! Evaluation protocols (SPEC.md section 7). So far: the weighted kNN classifier.
pub mod knn;
