//! `pwself-engine prepare`: turns IDX, CIFAR binary or an image folder into a pack file and
//! prints one summary line. A thin layer of argument parsing over [`super::idx`],
//! [`super::cifar`] and [`super::folder`]; it must not contain format logic of its own.
//!
//! ```text
//! pwself-engine prepare idx --images F --labels F --out P [--classes fashion-mnist|mnist|A,B,...]
//! pwself-engine prepare cifar10 FILE... --out P
//! pwself-engine prepare cifar100 FILE... --out P [--labels fine|coarse]
//! pwself-engine prepare folder ROOT --out P --side N [--channels 1|3]
//! ```
//! Every form also takes `--limit N` and `--balanced`.

use std::path::PathBuf;

use anyhow::Context;

use super::cifar::{self, Cifar100Labels};
use super::folder::{self, FolderOptions};
use super::idx;
use super::{PackSummary, Subset};

/// Arguments of `prepare`: which source format, then its own arguments.
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// The source format.
    #[command(subcommand)]
    pub source: PrepareSource,
}

/// The source formats `prepare` reads.
#[derive(clap::Subcommand, Debug)]
pub enum PrepareSource {
    /// IDX files (MNIST / Fashion-MNIST layout), plain or gzip-compressed.
    Idx(IdxArgs),
    /// CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin).
    Cifar10(Cifar10Args),
    /// CIFAR-100 binary files (train.bin, test.bin).
    Cifar100(Cifar100Args),
    /// A folder of images, one subfolder per class: `ROOT/<class>/*.{png,jpg,jpeg}`.
    Folder(FolderArgs),
}

/// Output path and subsetting, shared by every source.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// The pack file to write (e.g. data/train.pwpack). Replaced atomically if it exists.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Keep only the first N images (with --balanced: N in total, N/classes per class).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Keep the same number of images of every class (the first ones in file order).
    #[arg(long)]
    pub balanced: bool,
}

impl OutputArgs {
    fn subset(&self) -> Subset {
        Subset {
            limit: self.limit,
            balanced: self.balanced,
        }
    }
}

/// Arguments of `prepare idx`.
#[derive(clap::Args, Debug)]
pub struct IdxArgs {
    /// The IDX images file (e.g. train-images-idx3-ubyte.gz).
    #[arg(long, value_name = "FILE")]
    pub images: PathBuf,
    /// The IDX labels file (e.g. train-labels-idx1-ubyte.gz).
    #[arg(long, value_name = "FILE")]
    pub labels: PathBuf,
    /// Class names: `fashion-mnist`, `mnist`, or a comma-separated list in label order.
    /// Default: the label numbers.
    #[arg(long, value_name = "NAMES")]
    pub classes: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Arguments of `prepare cifar10`.
#[derive(clap::Args, Debug)]
pub struct Cifar10Args {
    /// Binary batch files, read in this order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Arguments of `prepare cifar100`.
#[derive(clap::Args, Debug)]
pub struct Cifar100Args {
    /// Binary files (train.bin, test.bin), read in this order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Which labels to keep: the 100 fine classes or the 20 coarse superclasses.
    #[arg(long, value_enum, default_value_t = Cifar100Labels::Fine)]
    pub labels: Cifar100Labels,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Arguments of `prepare folder`.
#[derive(clap::Args, Debug)]
pub struct FolderArgs {
    /// The folder holding one subfolder per class.
    #[arg(value_name = "ROOT")]
    pub root: PathBuf,
    /// Every image is resized (squashed) to SIDE x SIDE pixels.
    #[arg(long, value_name = "N")]
    pub side: usize,
    /// 3 for RGB, 1 for grey.
    #[arg(long, default_value_t = 3, value_name = "1|3")]
    pub channels: usize,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Parses `--classes`: a known dataset name or a comma-separated list.
pub fn parse_class_names(spec: &str) -> anyhow::Result<Vec<String>> {
    let known: Option<&[&str]> = match spec.to_ascii_lowercase().as_str() {
        "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Some(&idx::FASHION_MNIST_CLASSES),
        "mnist" => Some(&idx::MNIST_CLASSES),
        _ => None,
    };
    if let Some(names) = known {
        return Ok(names.iter().map(|s| s.to_string()).collect());
    }
    let names: Vec<String> = spec.split(',').map(|s| s.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        anyhow::bail!(
            "--classes {spec:?}: a class name is empty; pass `fashion-mnist`, `mnist`, or \
             names separated by single commas"
        );
    }
    Ok(names)
}

/// Runs `prepare` and prints the summary line to stdout.
pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    let summary: PackSummary = match &args.source {
        PrepareSource::Idx(a) => {
            let names = a.classes.as_deref().map(parse_class_names).transpose()?;
            idx::prepare_idx(
                &a.images,
                &a.labels,
                names,
                &a.output.subset(),
                &a.output.out,
            )
            .with_context(|| {
                format!(
                    "prepare idx: could not write {} from {} and {}",
                    a.output.out.display(),
                    a.images.display(),
                    a.labels.display()
                )
            })?
        }
        PrepareSource::Cifar10(a) => {
            cifar::prepare_cifar10(&a.files, &a.output.subset(), &a.output.out).with_context(
                || {
                    format!(
                        "prepare cifar10: could not write {}",
                        a.output.out.display()
                    )
                },
            )?
        }
        PrepareSource::Cifar100(a) => {
            cifar::prepare_cifar100(&a.files, a.labels, &a.output.subset(), &a.output.out)
                .with_context(|| {
                    format!(
                        "prepare cifar100: could not write {}",
                        a.output.out.display()
                    )
                })?
        }
        PrepareSource::Folder(a) => folder::prepare_folder(
            &a.root,
            FolderOptions {
                side: a.side,
                channels: a.channels,
            },
            &a.output.subset(),
            &a.output.out,
        )
        .with_context(|| {
            format!(
                "prepare folder: could not write {} from {}",
                a.output.out.display(),
                a.root.display()
            )
        })?,
    };
    println!("{summary}");
    Ok(())
}
