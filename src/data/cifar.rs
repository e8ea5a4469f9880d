//! CIFAR-10 and CIFAR-100 binary batches (the "binary version" of the official archives).
//! CIFAR-10 (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`): records of one
//! label byte then 3072 pixel bytes. CIFAR-100 (`train.bin`, `test.bin`): a coarse label
//! byte, a fine label byte, then 3072 pixel bytes. Pixels are planar: 1024 red, 1024 green,
//! 1024 blue, each plane 32x32 row-major; this module converts them to HWC. It only reads;
//! packing is [`crate::data::Samples::write_pack`].

use std::path::{Path, PathBuf};

use super::pack::read_maybe_gz;
use super::{PackSummary, Samples, Subset};
use crate::error::{Error, Result};

/// Pixels per image side.
pub const SIDE: usize = 32;
/// Pixel bytes per record: 3 planes of 32x32.
pub const PIXEL_BYTES: usize = 3 * SIDE * SIDE;
/// Bytes per CIFAR-10 record: 1 label + 3072 pixels.
pub const CIFAR10_RECORD: usize = 1 + PIXEL_BYTES;
/// Bytes per CIFAR-100 record: coarse label + fine label + 3072 pixels.
pub const CIFAR100_RECORD: usize = 2 + PIXEL_BYTES;

/// CIFAR-10's class names, in label order (as in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Which CIFAR-100 label to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Cifar100Labels {
    /// The 100 fine classes (the usual benchmark).
    #[default]
    Fine,
    /// The 20 coarse superclasses.
    Coarse,
}

/// Which of the two layouts a file is read as.
#[derive(Clone, Copy)]
enum Variant {
    Cifar10,
    Cifar100(Cifar100Labels),
}

impl Variant {
    fn record(self) -> usize {
        match self {
            Variant::Cifar10 => CIFAR10_RECORD,
            Variant::Cifar100(_) => CIFAR100_RECORD,
        }
    }
    fn num_classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100(Cifar100Labels::Fine) => 100,
            Variant::Cifar100(Cifar100Labels::Coarse) => 20,
        }
    }
    /// The label of a record.
    fn label(self, rec: &[u8]) -> u8 {
        match self {
            Variant::Cifar10 | Variant::Cifar100(Cifar100Labels::Coarse) => rec[0],
            Variant::Cifar100(Cifar100Labels::Fine) => rec[1],
        }
    }
}

/// Reads names, one per non-empty line, from `path`; expects exactly `k`.
fn read_names(path: &Path, k: usize) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::bad_file(
            path,
            "is not UTF-8 text: write one class name per line as UTF-8, or remove the file \
             to use the default names",
        )
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != k {
        return Err(Error::bad_file(
            path,
            format!(
                "has {} class names (one per non-empty line) but {k} are needed: fix the file \
                 or remove it to use the default names",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// Class names: from the names file beside the first batch if present, else built in.
fn class_names(first: &Path, variant: Variant) -> Result<Vec<String>> {
    let dir = first.parent().unwrap_or(Path::new(""));
    let (file, k) = match variant {
        Variant::Cifar10 => ("batches.meta.txt", 10),
        Variant::Cifar100(Cifar100Labels::Fine) => ("fine_label_names.txt", 100),
        Variant::Cifar100(Cifar100Labels::Coarse) => ("coarse_label_names.txt", 20),
    };
    let beside = dir.join(file);
    if beside.is_file() {
        return read_names(&beside, k);
    }
    Ok(match variant {
        Variant::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        Variant::Cifar100(_) => (0..k).map(|i| format!("class_{i}")).collect(),
    })
}

fn read(files: &[PathBuf], variant: Variant) -> Result<Samples> {
    let first = files.first().ok_or_else(|| {
        Error::bad_config(
            "FILE",
            "no batch file given: pass one or more CIFAR binary files (e.g. data_batch_1.bin)",
        )
    })?;
    let class_names = class_names(first, variant)?;
    let rec = variant.record();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = read_maybe_gz(path)?;
        let len = bytes.len();
        if len == 0 {
            return Err(Error::bad_file(
                path,
                "is empty: pass a CIFAR binary batch file (download it again if it should not \
                 be empty)",
            ));
        }
        if len % rec != 0 {
            let (other, name, cmd) = match variant {
                Variant::Cifar10 => (CIFAR100_RECORD, "CIFAR-100", "prepare cifar100"),
                Variant::Cifar100(_) => (CIFAR10_RECORD, "CIFAR-10", "prepare cifar10"),
            };
            let hint = if len % other == 0 {
                format!("; its length fits {name} records of {other} bytes: use `{cmd}` instead")
            } else {
                "; the file is truncated or not a CIFAR binary batch: download it again \
                 (the binary version, not the Python or MATLAB one)"
                    .to_string()
            };
            return Err(Error::bad_file(
                path,
                format!("is {len} bytes, not a multiple of the {rec}-byte record size{hint}"),
            ));
        }
        let n = len / rec;
        pixels.reserve(n * PIXEL_BYTES);
        labels.reserve(n);
        for (r, record) in bytes.chunks_exact(rec).enumerate() {
            let label = variant.label(record);
            if label as usize >= variant.num_classes() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "record {r} has label {label}, not below {}: the file is corrupt or \
                         of the other CIFAR variant; download it again",
                        variant.num_classes()
                    ),
                ));
            }
            labels.push(label as u16);
            // (3, 32, 32) planar -> (32, 32, 3) interleaved.
            let planes = &record[rec - PIXEL_BYTES..];
            let (r_plane, gb) = planes.split_at(SIDE * SIDE);
            let (g_plane, b_plane) = gb.split_at(SIDE * SIDE);
            for ((&r, &g), &b) in r_plane.iter().zip(g_plane).zip(b_plane) {
                pixels.extend_from_slice(&[r, g, b]);
            }
        }
    }
    Ok(Samples {
        height: SIDE,
        width: SIDE,
        channels: 3,
        class_names,
        pixels,
        labels,
        source: first.clone(),
    })
}

/// Reads CIFAR-10 binary batches, in the order given. Class names come from
/// `batches.meta.txt` beside the first file if present, else the built-in ten.
pub fn read_cifar10(files: &[PathBuf]) -> Result<Samples> {
    read(files, Variant::Cifar10)
}

/// Reads CIFAR-100 binary files (`train.bin`, `test.bin`), keeping the fine or coarse
/// labels. Class names come from `fine_label_names.txt` / `coarse_label_names.txt` beside
/// the first file if present, else `class_0`, `class_1`, ...
pub fn read_cifar100(files: &[PathBuf], labels: Cifar100Labels) -> Result<Samples> {
    read(files, Variant::Cifar100(labels))
}

/// Reads CIFAR-10 batches and writes the images `subset` picks to a pack at `out`.
pub fn prepare_cifar10(files: &[PathBuf], subset: &Subset, out: &Path) -> Result<PackSummary> {
    read_cifar10(files)?.write_pack(subset, out)
}

/// Reads CIFAR-100 files and writes the images `subset` picks to a pack at `out`.
pub fn prepare_cifar100(
    files: &[PathBuf],
    labels: Cifar100Labels,
    subset: &Subset,
    out: &Path,
) -> Result<PackSummary> {
    read_cifar100(files, labels)?.write_pack(subset, out)
}
