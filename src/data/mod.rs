//! Datasets: the pack format and its ingest paths.
pub mod prepare;
