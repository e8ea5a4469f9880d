//! `pwself-engine prepare` (being written).
/// Arguments of `prepare`.
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {}
/// Runs `prepare`.
pub fn run(_args: &PrepareArgs) -> anyhow::Result<()> {
    anyhow::bail!("prepare is being written")
}
