//! Image folders, `root/<class>/**/*.{png,jpg,jpeg}` (extensions in any case), as
//! torchvision's `ImageFolder` reads them: classes are the sorted subdirectory names, files
//! are sorted paths within each class. Images are decoded in parallel (rayon) in bounded
//! chunks, converted to RGB or grey, squashed (no crop, aspect ratio not kept, as the
//! official PW-Self code squashes to 256x256) to `side x side` with a Catmull-Rom filter,
//! and streamed into a [`PackWriter`]. This module must not hold the whole dataset in memory.
//!
//! # What is refused and what is only reported
//!
//! Errors (nothing is written, the message names the path and the fix):
//! - the root does not exist, is not a folder, or has no class subfolder;
//! - a class folder holds no `.png`/`.jpg`/`.jpeg` file (its label would have no image);
//! - a folder cannot be listed, or a symbolic link leads back to a folder above it (a loop);
//! - an image file cannot be read or decoded (garbage, truncated, or another format under an
//!   image extension): `prepare` stops rather than silently train on fewer images.
//!
//! Warnings (one line on stderr, the pack is still written):
//! - files without an image extension (`readme.txt`, `.webp`, ...) are skipped, as
//!   torchvision's `ImageFolder` skips them;
//! - files directly in the root, outside every class folder, are skipped.
//!
//! Accepted silently: images of mixed sizes and aspect ratios (each is squashed to
//! `side x side`, by design), grey, RGBA or 16-bit images (converted), hidden files and
//! folders (names starting with `.`, never read).

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{PackSummary, PackWriter, Subset};
use crate::error::{Error, Result};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// How folder images become pack images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderOptions {
    /// Output side in pixels: every image is resized to `side x side`.
    pub side: usize,
    /// Output channels: 3 (RGB) or 1 (grey, ITU-R BT.709 luma).
    pub channels: usize,
}

/// The images of a folder, before decoding.
#[derive(Debug, Clone)]
pub struct FolderListing {
    /// Class names: the sorted names of the root's subdirectories.
    pub class_names: Vec<String>,
    /// Image paths, class by class, sorted within each class.
    pub files: Vec<PathBuf>,
    /// The label of each file.
    pub labels: Vec<u16>,
    /// Files that were skipped: not images (by extension), or directly in the root.
    pub ignored: Vec<PathBuf>,
}

impl FolderListing {
    /// The warning `prepare` prints about [`FolderListing::ignored`], if any was skipped.
    pub fn ignored_warning(&self, root: &Path) -> Option<String> {
        let first = self.ignored.first()?;
        Some(format!(
            "{}: skipped {} file(s) that are not .png/.jpg/.jpeg images inside a class \
             folder (e.g. {}); move images into root/<class>/ and convert other formats to \
             PNG if they belong in the pack",
            root.display(),
            self.ignored.len(),
            first.display()
        ))
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The entries of `dir`, sorted, with hidden ones left out.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let unreadable = |e: std::io::Error| {
        Error::bad_file(
            dir,
            format!("cannot be listed ({e}): check that it exists and you may read it"),
        )
    };
    let read = fs::read_dir(dir).map_err(unreadable)?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(unreadable)?;
        let path = entry.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Appends the image files under `dir` (recursively, sorted) to `out` and the other files
/// to `ignored`. `above` holds the canonical paths of the folders above `dir` (and `dir`
/// itself last), to refuse symbolic-link loops instead of recursing forever.
fn collect_images(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    ignored: &mut Vec<PathBuf>,
    above: &mut Vec<PathBuf>,
) -> Result<()> {
    for path in sorted_entries(dir)? {
        // Follow symlinks: a class folder of links into another tree is common.
        let meta = fs::metadata(&path).map_err(|e| {
            Error::bad_file(
                &path,
                format!("cannot be read ({e}): fix or remove it (a dangling link?)"),
            )
        })?;
        if meta.is_dir() {
            let canonical = fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
            if let Some(ancestor) = above.iter().find(|a| **a == canonical) {
                return Err(Error::bad_file(
                    &path,
                    format!(
                        "leads back to {} (a symbolic-link loop): remove the link",
                        ancestor.display()
                    ),
                ));
            }
            above.push(canonical);
            collect_images(&path, out, ignored, above)?;
            above.pop();
        } else if meta.is_file() && is_image(&path) {
            out.push(path);
        } else {
            ignored.push(path);
        }
    }
    Ok(())
}

/// Lists the classes and image files of `root` (no decoding).
pub fn list_image_folder(root: &Path) -> Result<FolderListing> {
    match fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::bad_file(
                root,
                "does not exist: pass the folder that holds one subfolder per class",
            ))
        }
        Err(e) => return Err(Error::io(root, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::bad_file(
                root,
                "is not a folder: pass the folder that holds one subfolder per class \
                 (root/<class>/*.png|jpg)",
            ))
        }
        Ok(_) => {}
    }
    let mut class_dirs = Vec::new();
    let mut ignored = Vec::new();
    for path in sorted_entries(root)? {
        let meta = fs::metadata(&path).map_err(|e| {
            Error::bad_file(
                &path,
                format!("cannot be read ({e}): fix or remove it (a dangling link?)"),
            )
        })?;
        if meta.is_dir() {
            class_dirs.push(path);
        } else {
            ignored.push(path);
        }
    }
    if class_dirs.is_empty() {
        return Err(Error::bad_file(
            root,
            "has no class subfolders: put the images in one subfolder per class \
             (root/<class>/*.png|jpg), even if there is only one class",
        ));
    }
    if class_dirs.len() > super::pack::MAX_CLASSES {
        return Err(Error::bad_file(
            root,
            format!(
                "has {} class subfolders, more than the {} a pack can label",
                class_dirs.len(),
                super::pack::MAX_CLASSES
            ),
        ));
    }
    let root_canonical = fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let mut class_names = Vec::with_capacity(class_dirs.len());
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::bad_file(dir, "has a name that is not UTF-8: rename the class folder")
            })?
            .to_string();
        let before = files.len();
        let mut above = vec![
            root_canonical.clone(),
            fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?,
        ];
        collect_images(dir, &mut files, &mut ignored, &mut above)?;
        if files.len() == before {
            return Err(Error::bad_file(
                dir,
                "is a class folder with no .png/.jpg/.jpeg image: add images or remove the \
                 folder",
            ));
        }
        labels.resize(files.len(), label as u16);
        class_names.push(name);
    }
    Ok(FolderListing {
        class_names,
        files,
        labels,
        ignored,
    })
}

/// Decodes the image at `path`, converts it to `channels` (1 or 3) and squashes it to
/// `side x side`: `side * side * channels` bytes, HWC.
pub fn load_image(path: &Path, side: usize, channels: usize) -> Result<Vec<u8>> {
    let bytes = fs::read(path)
        .map_err(|e| super::pack::open_failed(path, e, "remove it or fix the link"))?;
    let undecodable = |why: String| {
        Error::bad_file(
            path,
            format!(
                "cannot be decoded as an image ({why}): re-encode it as PNG or JPEG, or \
                 remove it"
            ),
        )
    };
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(e.to_string()))?
        .decode()
        .map_err(|e| undecodable(e.to_string()))?;
    let s = side as u32;
    let filter = FilterType::CatmullRom;
    Ok(if channels == 1 {
        let g = img.to_luma8();
        if g.dimensions() == (s, s) {
            g.into_raw()
        } else {
            image::imageops::resize(&g, s, s, filter).into_raw()
        }
    } else {
        let rgb = img.to_rgb8();
        if rgb.dimensions() == (s, s) {
            rgb.into_raw()
        } else {
            image::imageops::resize(&rgb, s, s, filter).into_raw()
        }
    })
}

/// Lists `root`, decodes the images `subset` picks and writes them to a pack at `out`.
/// Shows a progress bar on stderr when it is a terminal, and prints a warning there when
/// files were skipped (see the module documentation for what is refused and what skipped).
pub fn prepare_folder(
    root: &Path,
    opts: FolderOptions,
    subset: &Subset,
    out: &Path,
) -> Result<PackSummary> {
    if opts.channels != 1 && opts.channels != 3 {
        return Err(Error::bad_config(
            "--channels",
            format!("is {}: pass 1 (grey) or 3 (RGB)", opts.channels),
        ));
    }
    if opts.side == 0 || opts.side > 1 << 14 {
        return Err(Error::bad_config(
            "--side",
            format!("is {}: pass a side in pixels from 1 to 16384", opts.side),
        ));
    }
    let listing = list_image_folder(root)?;
    if let Some(w) = listing.ignored_warning(root) {
        eprintln!("warning: {w}");
    }
    let keep = subset.select(&listing.labels, &listing.class_names, root)?;
    let mut writer = PackWriter::create(
        out,
        opts.side,
        opts.side,
        opts.channels,
        &listing.class_names,
    )?;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(keep.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("decoding {}", root.display()));
    // Bounded chunks: at most this many decoded images are in memory at once.
    let chunk = 32 * rayon::current_num_threads().max(1);
    for ids in keep.chunks(chunk) {
        let decoded: Vec<Result<Vec<u8>>> = ids
            .par_iter()
            .map(|&i| load_image(&listing.files[i], opts.side, opts.channels))
            .collect();
        for (&i, img) in ids.iter().zip(decoded) {
            writer.push(&img?, listing.labels[i])?;
        }
        bar.inc(ids.len() as u64);
    }
    bar.finish_and_clear();
    writer.finish_with_summary()
}
