//! `pwself-engine eval ...` and the evaluation pictures (`viz attention`, `viz neighbours`).
//! (Stub: being written.)

use anyhow::{bail, Result};

/// The evaluation protocols.
#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Weighted kNN (DINO's protocol).
    Knn(KnnArgs),
}

/// Flags of `eval knn`.
#[derive(clap::Args)]
pub struct KnnArgs {}

/// Flags of `viz attention`.
#[derive(clap::Args)]
pub struct VizAttentionArgs {}

/// Flags of `viz neighbours`.
#[derive(clap::Args)]
pub struct VizNeighboursArgs {}

/// Runs an `eval` subcommand.
pub fn run(_cmd: &EvalCommand) -> Result<()> {
    bail!("eval is not built yet")
}

/// `viz attention`.
pub fn viz_attention(_args: &VizAttentionArgs) -> Result<()> {
    bail!("viz attention is not built yet")
}

/// `viz neighbours`.
pub fn viz_neighbours(_args: &VizNeighboursArgs) -> Result<()> {
    bail!("viz neighbours is not built yet")
}
