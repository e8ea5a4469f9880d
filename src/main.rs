//! The `pwself-engine` command line: a thin layer over the library.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pwself-engine", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a pack file from IDX, CIFAR binary or an image folder.
    Prepare(pwself_engine::data::prepare::PrepareArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Prepare(args) => pwself_engine::data::prepare::run(&args),
    }
}
