//! IDX files, the MNIST / Fashion-MNIST layout, plain or gzip-compressed (detected by the
//! gzip magic bytes, whatever the extension). Images: magic 0x00000803 (unsigned bytes,
//! three dimensions), then count, rows, columns as big-endian u32, then the pixels.
//! Labels: magic 0x00000801, then count, then one byte per label. This module only reads;
//! packing is [`crate::data::Samples::write_pack`].

use std::path::Path;

use super::pack::read_maybe_gz;
use super::{PackSummary, Samples, Subset};
use crate::error::{Error, Result};

/// Magic of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Fashion-MNIST's ten class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// MNIST's ten class names (the digits), in label order.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// The images of an IDX images file.
#[derive(Debug, Clone)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// `count * height * width` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Checks `bytes` start with `want` and returns the dims that follow.
fn header(bytes: &[u8], path: &Path, want: u32, ndims: usize, role: &str) -> Result<Vec<usize>> {
    let magic = be_u32(bytes, 0).ok_or_else(|| {
        Error::bad_file(
            path,
            format!(
                "is only {} bytes, too short for an IDX header: pass an IDX {role} file \
                 (e.g. train-{role}-idx{ndims}-ubyte.gz)",
                bytes.len()
            ),
        )
    })?;
    if magic != want {
        let hint = match magic {
            IMAGES_MAGIC => " (that is an IDX images file: pass it to --images)",
            LABELS_MAGIC => " (that is an IDX labels file: pass it to --labels)",
            _ => "",
        };
        return Err(Error::bad_file(
            path,
            format!(
                "is not an IDX {role} file: magic number is {magic:#010x}, expected \
                 {want:#010x}{hint}; pass the *-{role}-idx{ndims}-ubyte file"
            ),
        ));
    }
    let head_len = 4 + 4 * ndims;
    if bytes.len() < head_len {
        return Err(Error::bad_file(
            path,
            format!(
                "is truncated: {} bytes, less than the {head_len}-byte IDX header; download \
                 it again",
                bytes.len()
            ),
        ));
    }
    Ok((0..ndims)
        .map(|d| be_u32(bytes, 4 + 4 * d).unwrap_or(0) as usize)
        .collect())
}

/// Checks that the payload after a `head_len`-byte header is exactly `want` bytes.
fn check_payload(
    bytes: &[u8],
    head_len: usize,
    want: Option<usize>,
    dims: &str,
    path: &Path,
) -> Result<()> {
    let have = bytes.len().saturating_sub(head_len);
    let says = match want {
        Some(w) if w == have => return Ok(()),
        Some(w) => format!("{w} bytes"),
        None => "more bytes than fit in memory".to_string(),
    };
    Err(Error::bad_file(
        path,
        format!(
            "payload is {have} bytes but its header ({dims}) says {says}: the file is \
             truncated or corrupt; download it again"
        ),
    ))
}

/// Reads an IDX images file (magic 0x00000803), plain or gzip.
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let mut bytes = read_maybe_gz(path)?;
    let dims = header(&bytes, path, IMAGES_MAGIC, 3, "images")?;
    let (count, height, width) = (dims[0], dims[1], dims[2]);
    let want = count.checked_mul(height).and_then(|x| x.checked_mul(width));
    check_payload(
        &bytes,
        16,
        want,
        &format!("{count} images of {height}x{width}"),
        path,
    )?;
    if count > 0 && (height == 0 || width == 0) {
        return Err(Error::bad_file(
            path,
            format!(
                "header says images are {height}x{width}: the file is corrupt; download it again"
            ),
        ));
    }
    bytes.drain(..16);
    Ok(IdxImages {
        count,
        height,
        width,
        pixels: bytes,
    })
}

/// Reads an IDX labels file (magic 0x00000801), plain or gzip: one byte per label.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = read_maybe_gz(path)?;
    let dims = header(&bytes, path, LABELS_MAGIC, 1, "labels")?;
    check_payload(
        &bytes,
        8,
        Some(dims[0]),
        &format!("{} labels", dims[0]),
        path,
    )?;
    bytes.drain(..8);
    Ok(bytes)
}

/// Reads an IDX images file and its labels file into [`Samples`] (one channel).
/// `class_names`: the names by label; `None` names them "0", "1", ... up to the largest
/// label. Errors if the counts differ or a label has no name.
pub fn read_idx(images: &Path, labels: &Path, class_names: Option<Vec<String>>) -> Result<Samples> {
    let imgs = read_idx_images(images)?;
    let labs = read_idx_labels(labels)?;
    if imgs.count != labs.len() {
        return Err(Error::bad_file(
            labels,
            format!(
                "has {} labels but the images file {} has {} images: pass the labels file \
                 that belongs to these images (train with train, t10k with t10k)",
                labs.len(),
                images.display(),
                imgs.count
            ),
        ));
    }
    let max = labs.iter().copied().max().unwrap_or(0) as usize;
    let class_names = match class_names {
        Some(names) => {
            if let Some((i, &l)) = labs
                .iter()
                .enumerate()
                .find(|(_, &l)| l as usize >= names.len())
            {
                return Err(Error::bad_file(
                    labels,
                    format!(
                        "label {i} is {l} but only {} class names were given: pass one name \
                         per class with --classes (labels go up to {max})",
                        names.len()
                    ),
                ));
            }
            names
        }
        None => (0..=max).map(|l| l.to_string()).collect(),
    };
    Ok(Samples {
        height: imgs.height,
        width: imgs.width,
        channels: 1,
        class_names,
        pixels: imgs.pixels,
        labels: labs.into_iter().map(u16::from).collect(),
        source: images.to_path_buf(),
    })
}

/// Reads an IDX pair and writes the images `subset` picks to a pack at `out`.
pub fn prepare_idx(
    images: &Path,
    labels: &Path,
    class_names: Option<Vec<String>>,
    subset: &Subset,
    out: &Path,
) -> Result<PackSummary> {
    read_idx(images, labels, class_names)?.write_pack(subset, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(n: u32, h: u32, w: u32, pixels: &[u8]) -> Vec<u8> {
        let mut b = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [n, h, w] {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(pixels);
        b
    }

    #[test]
    fn reads_plain_and_gzip_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let px: Vec<u8> = (0..2 * 2 * 3).map(|i| i as u8).collect();
        let raw = idx_images(2, 2, 3, &px);
        let plain = dir.path().join("a.idx");
        std::fs::write(&plain, &raw).unwrap();
        // Gzip data under a name without .gz: detected by its magic.
        let gz = dir.path().join("b.idx");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &raw).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let im = read_idx_images(p).unwrap();
            assert_eq!((im.count, im.height, im.width), (2, 2, 3));
            assert_eq!(im.pixels, px);
        }
    }

    #[test]
    fn labels_file_passed_as_images_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels");
        let mut b = LABELS_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(3);
        std::fs::write(&p, b).unwrap();
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("0x00000801") && e.contains("--labels"), "{e}");
        assert_eq!(read_idx_labels(&p).unwrap(), vec![3]);
    }
}
