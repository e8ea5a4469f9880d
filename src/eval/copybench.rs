//! The real-photo copy-detection benchmark (`pwself-engine eval copy-bench`): Copydays
//! cannot be downloaded here, so this builds a stand-in from photographs that Debian
//! packages ship, reproducibly from a seed.
//!
//! Photos are collected from installed packages (or from folders the caller names),
//! filtered (both sides at least 128 px, not a flat-colour drawing, not a near-duplicate of
//! a photo already taken), shuffled by the seed and split into three disjoint sets:
//! originals (40%, the database), distractors (30%, database images no query is made
//! from) and whitening images (30%, for learning the PCA whitening). Every original gets
//! one query per edit block ([`BLOCKS`]). The output is the JSON ground truth that
//! [`crate::eval::copydetect::CopyGroundTruth`] reads, a manifest and a `LICENSES.md` that
//! names the package and licence of every source photo.
//!
//! Every draw comes from [`crate::rng::Stream`] keyed by the seed and by what it is for,
//! so two builds with the same seed and sources write byte-identical files whatever the
//! thread count. This module evaluates nothing: scoring is [`crate::eval::copydetect`].

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};
use image::{ExtendedColorType, ImageReader, Rgb, RgbImage, RgbaImage};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::rng::{Purpose, Stream};

/// The Debian packages the default sources come from; `scripts/build-copy-benchmark.sh`
/// installs exactly these.
pub const PACKAGES: [&str; 5] = [
    "tuxpaint-stamps-default",
    "opencv-doc",
    "mate-backgrounds",
    "lomiri-wallpapers-16.04",
    "lomiri-wallpapers-20.04",
];

/// Default sources: `(package, folder)`. A file is taken when the package's dpkg file list
/// names it under the folder, so files that two packages install into one folder
/// (`/usr/share/backgrounds`) are credited to the right package. Folders were chosen by
/// looking at their images: photographs, not drawings (the filters catch the rest).
const DEFAULT_SOURCES: [(&str, &str); 8] = [
    ("tuxpaint-stamps-default", "/usr/share/tuxpaint/stamps"),
    ("opencv-doc", "/usr/share/doc/opencv-doc/examples/data"),
    ("opencv-doc", "/usr/share/doc/opencv-doc/examples/text"),
    ("opencv-doc", "/usr/share/doc/opencv-doc/examples/hfs/data"),
    (
        "opencv-doc",
        "/usr/share/doc/opencv-doc/examples/alphamat/input_images",
    ),
    ("mate-backgrounds", "/usr/share/backgrounds/mate/nature"),
    ("lomiri-wallpapers-16.04", "/usr/share/backgrounds"),
    ("lomiri-wallpapers-20.04", "/usr/share/backgrounds"),
];

/// OpenCV sample images left out by name: each is a second view of a scene another file
/// already shows (stereo pairs, optical-flow frame pairs, viewpoint pairs, a crop, an
/// edited copy). Kept, they would be database images that are copies of each other, so a
/// correct retrieval would count as a miss. The calibration chessboards
/// (`left01.jpg`..`right14.jpg`) are 26 shots of one board and are left out by
/// [`excluded_name`] too.
const OPENCV_SECOND_VIEWS: [&str; 9] = [
    "aloeR.jpg",
    "rubberwhale2.png",
    "basketball2.png",
    "graf3.png",
    "leuvenB.jpg",
    "aero3.jpg",
    "box_in_scene.png",
    "ela_modified.jpg",
    "right.jpg",
];

/// The edit blocks, in the order queries are written; each original gets one query of
/// each. See [`edit`] for what each does.
pub const BLOCKS: [&str; 7] = [
    "crop", "rotate", "jpeg", "blur", "colour", "overlay", "combo",
];

/// Shortest side a source photo may have, in pixels.
pub const MIN_SIDE: u32 = 128;

/// A photo is kept when its 16 most frequent exact colours cover less than this share of
/// its opaque pixels (measured on a copy at most 256 px long). Drawings, logos, rendered
/// icons and scanned text spend most pixels on a few flat colours; a photograph's sensor
/// noise and shading spread them over thousands. Grayscale photos have only 256 colours
/// and mostly fail: the benchmark is of colour photos.
pub const FLAT_COLOUR_SHARE_MAX: f64 = 0.06;

/// Two photos are near-duplicates when their 16x16 colour thumbnails (aspect ignored), or
/// one's and the other's mirror image, differ by less than this mean absolute difference
/// per channel (of 255); the later one in path order is dropped. A 64-bit difference hash
/// was tried first: on cut-outs against white it called an apricot and a sprig of thyme
/// duplicates, while colour thumbnails keep them apart.
pub const DUPLICATE_DISTANCE: f64 = 8.0;

/// JPEG quality of stored originals, distractors, whitening images and of queries whose
/// edit is not a JPEG compression.
const STORE_QUALITY: u8 = 95;

/// Counter word that keeps this module's random streams apart from the trainer's.
const STREAM_TAG: u32 = 0xC0B1_0000;

/// What to build and from what.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Output folder (created if missing). Its `originals/`, `distractors/`, `whiten/` and
    /// `queries/` subfolders are emptied of `.jpg` files first; nothing else is touched.
    pub out: PathBuf,
    /// Seed of the shuffle and of every edit.
    pub seed: u64,
    /// Most originals; distractors and whitening images shrink in proportion (40:30:30).
    pub max_originals: usize,
    /// Folders (searched recursively) or files to take photos from; empty: the default
    /// folders of the installed [`PACKAGES`].
    pub sources: Vec<PathBuf>,
    /// Longest side of every stored image, in pixels (keeps the benchmark small).
    pub side: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            out: PathBuf::from("copybench"),
            seed: 0,
            max_originals: 1000,
            sources: Vec::new(),
            side: 512,
        }
    }
}

/// One package (or folder) the photos came from.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SourceRecord {
    /// Debian package name, or the folder for caller-given sources.
    pub package: String,
    /// Installed package version ("-" for folders).
    pub version: String,
    /// The distinct licences of the files used, from /usr/share/doc/PKG/copyright.
    pub licence: String,
    /// Source files used (in any of the three sets), sorted.
    pub files: Vec<PathBuf>,
}

/// One stored benchmark image and the photo it was made from.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ImageRecord {
    /// Path relative to the output folder (`originals/0001.jpg`).
    pub image: String,
    /// The source photo.
    pub source: PathBuf,
    /// Its package (or folder).
    pub package: String,
    /// Its licence (short name from the copyright file).
    pub licence: String,
}

/// Source photos that were not used, by reason.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Skipped {
    /// Could not be decoded.
    pub unreadable: usize,
    /// A side shorter than [`MIN_SIDE`].
    pub too_small: usize,
    /// Failed the flat-colour rule ([`FLAT_COLOUR_SHARE_MAX`]) or mostly transparent.
    pub not_photo: usize,
    /// A near-duplicate of a photo already taken ([`DUPLICATE_DISTANCE`]).
    pub duplicate: usize,
    /// Left out by name (second views of a scene, calibration boards).
    pub excluded: usize,
    /// Usable but beyond what `max_originals` asked for.
    pub unused: usize,
}

/// What a build wrote (also saved as `manifest.json` in the output folder).
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    /// The ground-truth JSON (`OUT/ground_truth.json`).
    pub ground_truth: PathBuf,
    /// Originals (database images with queries).
    pub originals: usize,
    /// Queries (one per original and block).
    pub queries: usize,
    /// Distractors (database images without queries).
    pub distractors: usize,
    /// Whitening images.
    pub whitening: usize,
    /// Packages (or folders) the photos came from.
    pub sources: Vec<SourceRecord>,
    /// Seed of the build.
    pub seed: u64,
    /// Longest stored side.
    pub side: u32,
    /// The edit blocks, in query order.
    pub blocks: Vec<String>,
    /// Candidates not used, by reason.
    pub skipped: Skipped,
    /// Every stored original, distractor and whitening image with its source.
    pub images: Vec<ImageRecord>,
}

/// The ground truth in the layout `copydetect::CopyGroundTruth` reads.
#[derive(Serialize)]
struct GroundTruthFile<'a> {
    db: Vec<String>,
    queries: Vec<QueryRecord<'a>>,
    whitening: Vec<String>,
}

#[derive(Serialize)]
struct QueryRecord<'a> {
    image: String,
    positives: [usize; 1],
    block: &'a str,
}

/// A written query: its path relative to the output, its block, and the index in the
/// whitening set of the image an overlay patch came from.
type WrittenQuery = (String, &'static str, Option<usize>);

/// A candidate photo file and the index of its source record.
struct Candidate {
    path: PathBuf,
    source: usize,
}

/// A source's identity and the licence of each of its files.
struct Source {
    package: String,
    version: String,
    /// DEP-5 paragraphs of its copyright file (empty for folders).
    copyright: Vec<CopyrightParagraph>,
    copyright_file: Option<PathBuf>,
}

/// A decoded, accepted photo.
struct Photo {
    candidate: usize,
    rgb: RgbImage,
    /// 16x16 colour thumbnail (aspect ignored) and its mirror image, for near-duplicates.
    thumb: RgbImage,
    mirror: RgbImage,
}

enum Verdict {
    Kept(Photo),
    Unreadable,
    TooSmall,
    NotPhoto,
}

/// Builds the benchmark described by `opts` and returns its manifest.
///
/// Errors: no usable photo (names the packages to install and the script), fewer than 3
/// usable photos, an output folder that cannot be created or written.
pub fn build(opts: &BuildOptions) -> Result<Manifest> {
    if opts.side < MIN_SIDE {
        return Err(Error::bad_config(
            "side",
            format!(
                "{} is below {MIN_SIDE}: stored images must keep at least {MIN_SIDE} px",
                opts.side
            ),
        ));
    }
    if opts.max_originals == 0 {
        return Err(Error::bad_config(
            "max_originals",
            "is 0: the benchmark needs at least one original",
        ));
    }
    let mut skipped = Skipped::default();
    let (sources, candidates) = if opts.sources.is_empty() {
        default_candidates(&mut skipped)?
    } else {
        folder_candidates(&opts.sources)?
    };
    if candidates.is_empty() {
        return Err(no_photos_error(&opts.sources));
    }

    // Decode and filter in parallel; the verdicts come back in candidate (path) order.
    let verdicts: Vec<Verdict> = candidates
        .par_iter()
        .enumerate()
        .map(|(i, c)| load_candidate(i, &c.path, opts.side))
        .collect();
    let mut photos: Vec<Photo> = Vec::new();
    for v in verdicts {
        match v {
            Verdict::Kept(p) => {
                let dup = photos.iter().any(|q| {
                    thumb_distance(&p.thumb, &q.thumb) < DUPLICATE_DISTANCE
                        || thumb_distance(&p.mirror, &q.thumb) < DUPLICATE_DISTANCE
                });
                if dup {
                    skipped.duplicate += 1;
                } else {
                    photos.push(p);
                }
            }
            Verdict::Unreadable => skipped.unreadable += 1,
            Verdict::TooSmall => skipped.too_small += 1,
            Verdict::NotPhoto => skipped.not_photo += 1,
        }
    }
    if photos.is_empty() {
        return Err(no_photos_error(&opts.sources));
    }
    if photos.len() < 3 {
        return Err(Error::bad_config(
            "sources",
            format!(
                "only {} usable photo(s) found; the benchmark needs at least 3 (one original, \
                 one distractor, one whitening image): add folders with more colour photographs",
                photos.len()
            ),
        ));
    }

    // Deterministic shuffle, then the 40:30:30 split.
    let mut order: Vec<usize> = (0..photos.len()).collect();
    let mut rng = Stream::new(opts.seed, [STREAM_TAG, 0, 0], Purpose::Shuffle);
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let (n_orig, n_dist, n_white) = split_sizes(photos.len(), opts.max_originals);
    skipped.unused = photos.len() - n_orig - n_dist - n_white;
    let originals = &order[..n_orig];
    let distractors = &order[n_orig..n_orig + n_dist];
    let whiten = &order[n_orig + n_dist..n_orig + n_dist + n_white];

    prepare_output(&opts.out)?;
    let width = digits(n_orig.max(n_dist).max(n_white));
    let name = |folder: &str, i: usize| format!("{folder}/{:0width$}.jpg", i + 1);

    let mut images = Vec::new();
    for (folder, set) in [
        ("originals", originals),
        ("distractors", distractors),
        ("whiten", whiten),
    ] {
        let written: Vec<Result<ImageRecord>> = set
            .par_iter()
            .enumerate()
            .map(|(i, &k)| {
                let rel = name(folder, i);
                let photo = &photos[k];
                write_jpeg(&opts.out.join(&rel), &photo.rgb, STORE_QUALITY)?;
                let cand = &candidates[photo.candidate];
                let src = &sources[cand.source];
                Ok(ImageRecord {
                    image: rel,
                    source: cand.path.clone(),
                    package: src.package.clone(),
                    licence: licence_of(src, &cand.path).0,
                })
            })
            .collect();
        for r in written {
            images.push(r?);
        }
    }

    // Queries: one per original and block, each from its own random stream.
    let patch_pool: Vec<&RgbImage> = whiten.iter().map(|&k| &photos[k].rgb).collect();
    let query_sets: Vec<Result<Vec<WrittenQuery>>> = originals
        .par_iter()
        .enumerate()
        .map(|(i, &k)| {
            let mut out = Vec::with_capacity(BLOCKS.len());
            for (b, block) in BLOCKS.iter().enumerate() {
                let mut rng = Stream::new(
                    opts.seed,
                    [i as u32, b as u32, STREAM_TAG | 1],
                    Purpose::Photometric,
                );
                let q = edit(block, &photos[k].rgb, &mut rng, &patch_pool);
                let rel = format!("queries/{:0width$}_{block}.jpg", i + 1);
                write_jpeg(&opts.out.join(&rel), &q.image, q.quality)?;
                out.push((rel, *block, q.patch_from));
            }
            Ok(out)
        })
        .collect();
    let mut queries = Vec::new();
    let mut patched = Vec::new();
    for (i, set) in query_sets.into_iter().enumerate() {
        for (rel, block, patch) in set? {
            if let Some(p) = patch {
                patched.push((rel.clone(), name("whiten", p)));
            }
            queries.push(QueryRecord {
                image: rel,
                positives: [i],
                block,
            });
        }
    }

    let gt = GroundTruthFile {
        db: images[..n_orig + n_dist]
            .iter()
            .map(|r| r.image.clone())
            .collect(),
        queries,
        whitening: images[n_orig + n_dist..]
            .iter()
            .map(|r| r.image.clone())
            .collect(),
    };
    let gt_path = opts.out.join("ground_truth.json");
    write_json(&gt_path, &gt)?;

    let manifest = Manifest {
        ground_truth: gt_path,
        originals: n_orig,
        queries: gt.queries.len(),
        distractors: n_dist,
        whitening: n_white,
        sources: source_records(&sources, &images),
        seed: opts.seed,
        side: opts.side,
        blocks: BLOCKS.iter().map(|b| b.to_string()).collect(),
        skipped,
        images,
    };
    write_json(&opts.out.join("manifest.json"), &manifest)?;
    let licences = licences_markdown(&manifest, &sources, &patched);
    let path = opts.out.join("LICENSES.md");
    std::fs::write(&path, licences).map_err(|e| Error::io(&path, e))?;
    Ok(manifest)
}

/// Sizes of the three sets for `n` usable photos: 40:30:30, at most `max_originals`
/// originals, each set at least one image (`n >= 3`).
fn split_sizes(n: usize, max_originals: usize) -> (usize, usize, usize) {
    let used = n.min(max_originals.saturating_mul(10) / 4).max(3);
    let n_orig = (used * 4 / 10).clamp(1, max_originals);
    let n_dist = (used * 3 / 10).max(1);
    let n_white = (used - n_orig - n_dist).max(1);
    (n_orig, n_dist, n_white.min(n - n_orig - n_dist))
}

fn digits(n: usize) -> usize {
    n.to_string().len().max(4)
}

/// The error for "no photos": which packages to install and how.
fn no_photos_error(sources: &[PathBuf]) -> Error {
    if sources.is_empty() {
        Error::bad_config(
            "sources",
            format!(
                "no usable photos in the default package folders; install the packages \
                 (apt-get install {}) or run scripts/build-copy-benchmark.sh OUT_DIR, which \
                 installs them and builds the benchmark",
                PACKAGES.join(" ")
            ),
        )
    } else {
        let list: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
        Error::bad_config(
            "sources",
            format!(
                "no usable photos (.jpg/.png, colour, both sides >= {MIN_SIDE} px) in {}; \
                 name folders of photographs, or none to use the Debian packages ({})",
                list.join(", "),
                PACKAGES.join(" ")
            ),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Finding candidates.

fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// Whether a default-source file is left out by name: OpenCV's second views
/// ([`OPENCV_SECOND_VIEWS`]), calibration chessboards, crops of its scene-text photos and
/// synthetic test pictures (`gradient.png`, `pic1.png`..`pic6.png`); Tux Paint's mirrored
/// copies of stamps (`*_mirror.png`, some re-cropped so far that the thumbnail test misses
/// them).
fn excluded_name(package: &str, path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if package == "tuxpaint-stamps-default" {
        return name.ends_with("_mirror.png");
    }
    if package != "opencv-doc" {
        return false;
    }
    let synthetic = name == "gradient.png"
        || name
            .strip_prefix("pic")
            .and_then(|r| r.strip_suffix(".png"))
            .is_some_and(|d| d.len() == 1 && d.bytes().all(|b| b.is_ascii_digit()));
    let chessboard = ["left", "right"].iter().any(|p| {
        name.strip_prefix(p)
            .and_then(|r| r.strip_suffix(".jpg"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    });
    // scenetext_segmented_word*.jpg are crops of the scenetext*.jpg photos.
    chessboard || synthetic || name.contains("_segmented_") || OPENCV_SECOND_VIEWS.contains(&name)
}

/// Candidates from the default folders of the installed packages (sorted by path).
fn default_candidates(skipped: &mut Skipped) -> Result<(Vec<Source>, Vec<Candidate>)> {
    let info = Path::new("/var/lib/dpkg/info");
    let status = std::fs::read_to_string("/var/lib/dpkg/status").unwrap_or_default();
    let mut sources: Vec<Source> = Vec::new();
    let mut candidates = Vec::new();
    for package in PACKAGES {
        let Some(list) = package_file_list(info, package) else {
            continue; // not installed
        };
        let Some(version) = dpkg_version(&status, package) else {
            continue;
        };
        let copyright_file = PathBuf::from(format!("/usr/share/doc/{package}/copyright"));
        let copyright = std::fs::read_to_string(&copyright_file)
            .map(|t| parse_dep5(&t))
            .unwrap_or_default();
        let index = sources.len();
        sources.push(Source {
            package: package.to_string(),
            version,
            copyright,
            copyright_file: Some(copyright_file),
        });
        let folders: Vec<&str> = DEFAULT_SOURCES
            .iter()
            .filter(|(p, _)| *p == package)
            .map(|(_, f)| *f)
            .collect();
        for line in list.lines() {
            let path = Path::new(line);
            let in_folder = folders.iter().any(|f| path.starts_with(f));
            if !in_folder || !is_image_name(path) || !path.is_file() {
                continue;
            }
            if excluded_name(package, path) {
                skipped.excluded += 1;
                continue;
            }
            candidates.push(Candidate {
                path: path.to_path_buf(),
                source: index,
            });
        }
    }
    candidates.sort_by(|a, b| a.path.cmp(&b.path));
    candidates.dedup_by(|a, b| a.path == b.path);
    Ok((sources, candidates))
}

/// The dpkg file list of an installed package (`PKG.list` or `PKG:ARCH.list`).
fn package_file_list(info: &Path, package: &str) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(info.join(format!("{package}.list"))) {
        return Some(t);
    }
    let prefix = format!("{package}:");
    let mut names: Vec<PathBuf> = std::fs::read_dir(info)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".list"))
        })
        .collect();
    names.sort();
    names.first().and_then(|p| std::fs::read_to_string(p).ok())
}

/// The version of `package` in dpkg's status file, if it is installed.
fn dpkg_version(status: &str, package: &str) -> Option<String> {
    for para in status.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if field("Package:").as_deref() == Some(package)
            && field("Status:").is_some_and(|s| s.ends_with(" installed"))
        {
            return field("Version:");
        }
    }
    None
}

/// Candidates from caller-named folders or files (sorted by path); one source per entry.
fn folder_candidates(roots: &[PathBuf]) -> Result<(Vec<Source>, Vec<Candidate>)> {
    let mut sources = Vec::new();
    let mut candidates = Vec::new();
    for (index, root) in roots.iter().enumerate() {
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        sources.push(Source {
            package: root.display().to_string(),
            version: "-".into(),
            copyright: Vec::new(),
            copyright_file: None,
        });
        let mut files = Vec::new();
        if meta.is_dir() {
            walk(root, &mut files)?;
        } else {
            files.push(root.clone());
        }
        files.retain(|p| is_image_name(p));
        candidates.extend(files.into_iter().map(|path| Candidate {
            path,
            source: index,
        }));
    }
    candidates.sort_by(|a, b| a.path.cmp(&b.path));
    candidates.dedup_by(|a, b| a.path == b.path);
    Ok((sources, candidates))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Licences: the machine-readable (DEP-5) copyright file of a package.

/// One `Files:` paragraph of a DEP-5 copyright file.
#[derive(Clone, Debug, PartialEq)]
struct CopyrightParagraph {
    files: Vec<String>,
    licence: String,
    holder: String,
}

/// The `Files:` paragraphs of a DEP-5 copyright file, in file order (empty if the file is
/// not DEP-5).
fn parse_dep5(text: &str) -> Vec<CopyrightParagraph> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(k) = &current {
                    let v = fields.entry(k.clone()).or_default();
                    v.push('\n');
                    v.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                current = Some(k.trim().to_string());
                fields.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        if let (Some(files), Some(licence)) = (fields.get("Files"), fields.get("License")) {
            out.push(CopyrightParagraph {
                files: files.split_whitespace().map(str::to_string).collect(),
                licence: licence.lines().next().unwrap_or("").trim().to_string(),
                holder: fields
                    .get("Copyright")
                    .and_then(|c| c.lines().next())
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            });
        }
    }
    out
}

/// Whether a `Files:` pattern of a copyright file names the installed file `path`.
/// Copyright files name files by their place in the upstream source tree, which is not
/// where they are installed; so: `*` names every file, a pattern without wildcards names
/// the file when the installed path ends with it or with its last component, and other
/// wildcard patterns (upstream folders such as `data/*`) are not matched.
fn pattern_names(pattern: &str, path: &Path) -> bool {
    if pattern == "*" {
        return true;
    }
    if pattern.contains(['*', '?', '[']) {
        return false;
    }
    let p = path.to_string_lossy();
    let base = pattern.rsplit('/').next().unwrap_or(pattern);
    p.ends_with(&format!("/{pattern}")) || path.file_name().is_some_and(|n| n == base)
}

/// `(licence, copyright holder)` of a source file: the last paragraph naming it (DEP-5's
/// rule), or a pointer to the copyright file.
fn licence_of(src: &Source, path: &Path) -> (String, String) {
    let hit = src
        .copyright
        .iter()
        .rev()
        .find(|p| p.files.iter().any(|f| pattern_names(f, path)));
    match (hit, &src.copyright_file) {
        (Some(p), _) => (p.licence.clone(), p.holder.clone()),
        (None, Some(f)) => (format!("see {}", f.display()), String::new()),
        (None, None) => (
            "unknown (not from a Debian package: check before sharing)".into(),
            String::new(),
        ),
    }
}

fn source_records(sources: &[Source], images: &[ImageRecord]) -> Vec<SourceRecord> {
    let mut records = Vec::new();
    for s in sources {
        let mut files: Vec<PathBuf> = images
            .iter()
            .filter(|r| r.package == s.package)
            .map(|r| r.source.clone())
            .collect();
        if files.is_empty() {
            continue;
        }
        files.sort();
        let mut licences: Vec<String> = images
            .iter()
            .filter(|r| r.package == s.package)
            .map(|r| r.licence.clone())
            .collect();
        licences.sort();
        licences.dedup();
        records.push(SourceRecord {
            package: s.package.clone(),
            version: s.version.clone(),
            licence: licences.join("; "),
            files,
        });
    }
    records
}

fn licences_markdown(m: &Manifest, sources: &[Source], patched: &[(String, String)]) -> String {
    let mut s = String::new();
    s.push_str("# Licences of the copy-detection benchmark\n\n");
    s.push_str(
        "Every image here is a resized (and, for queries, edited) copy of a photograph \
         shipped by a Debian package. Each stays under its source's licence; keep this file \
         with the images when sharing them. Queries are edits of the original with the same \
         number (`queries/0001_*.jpg` of `originals/0001.jpg`); overlay queries also carry a \
         patch of a whitening image (listed at the end).\n\n",
    );
    s.push_str(
        "## Packages\n\n| package | version | licences | copyright file |\n|---|---|---|---|\n",
    );
    for r in &m.sources {
        let file = sources
            .iter()
            .find(|x| x.package == r.package)
            .and_then(|x| x.copyright_file.as_ref())
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.package, r.version, r.licence, file
        ));
    }
    s.push_str("\n## Images\n\n| image | source | package | licence | copyright |\n|---|---|---|---|---|\n");
    for r in &m.images {
        let holder = sources
            .iter()
            .find(|x| x.package == r.package)
            .map(|x| licence_of(x, &r.source).1)
            .unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.image,
            r.source.display(),
            r.package,
            r.licence,
            holder.replace('|', "/")
        ));
    }
    s.push_str("\n## Overlay patches\n\n| query | patch taken from |\n|---|---|\n");
    for (q, w) in patched {
        s.push_str(&format!("| {q} | {w} |\n"));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Loading and filtering.

/// Decodes a candidate and applies the size and flat-colour rules.
fn load_candidate(index: usize, path: &Path, side: u32) -> Verdict {
    let decoded = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .ok()
        .and_then(|r| r.decode().ok());
    let Some(img) = decoded else {
        return Verdict::Unreadable;
    };
    if img.width() < MIN_SIDE || img.height() < MIN_SIDE {
        return Verdict::TooSmall;
    }
    let rgba = img.to_rgba8();
    let thumb = shrink(&rgba, 256, FilterType::Triangle);
    match flat_colour_share(&thumb) {
        Some(share) if share < FLAT_COLOUR_SHARE_MAX => {}
        _ => return Verdict::NotPhoto,
    }
    let rgb = flatten_on_white(&rgba);
    let rgb = shrink(&rgb, side, FilterType::CatmullRom);
    let thumb = imageops::resize(&rgb, 16, 16, FilterType::Triangle);
    let mirror = imageops::flip_horizontal(&thumb);
    Verdict::Kept(Photo {
        candidate: index,
        rgb,
        thumb,
        mirror,
    })
}

/// `img` scaled so its longer side is at most `max_side` (unchanged if already smaller).
fn shrink<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    max_side: u32,
    filter: FilterType,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    let long = w.max(h);
    if long <= max_side {
        return img.clone();
    }
    let scale = max_side as f64 / long as f64;
    let nw = ((w as f64 * scale).round() as u32).max(1);
    let nh = ((h as f64 * scale).round() as u32).max(1);
    imageops::resize(img, nw, nh, filter)
}

/// Share of the opaque pixels (alpha >= 128) covered by the 16 most frequent exact
/// colours; `None` when fewer than 10% of the pixels are opaque.
pub fn flat_colour_share(img: &RgbaImage) -> Option<f64> {
    let mut colours: Vec<u32> = img
        .pixels()
        .filter(|p| p[3] >= 128)
        .map(|p| (u32::from(p[0]) << 16) | (u32::from(p[1]) << 8) | u32::from(p[2]))
        .collect();
    let total = img.width() as usize * img.height() as usize;
    if colours.is_empty() || colours.len() * 10 < total {
        return None;
    }
    colours.sort_unstable();
    let mut runs: Vec<usize> = Vec::new();
    let mut start = 0;
    for i in 1..=colours.len() {
        if i == colours.len() || colours[i] != colours[start] {
            runs.push(i - start);
            start = i;
        }
    }
    runs.sort_unstable_by(|a, b| b.cmp(a));
    let top: usize = runs.iter().take(16).sum();
    Some(top as f64 / colours.len() as f64)
}

/// Alpha composited over white (stamps are cut-outs on a transparent background).
fn flatten_on_white(img: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y);
        let a = u32::from(p[3]);
        let c = |v: u8| ((u32::from(v) * a + 255 * (255 - a) + 127) / 255) as u8;
        Rgb([c(p[0]), c(p[1]), c(p[2])])
    })
}

/// Mean absolute difference per channel (0-255) of two 16x16 thumbnails.
fn thumb_distance(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u32 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| u32::from(x.abs_diff(y)))
        .sum();
    f64::from(sum) / a.as_raw().len() as f64
}

// ---------------------------------------------------------------------------------------
// Edits.

/// A query: the edited pixels, the JPEG quality to store them at, and the whitening image
/// a patch was taken from (overlay blocks).
pub struct Query {
    /// Edited image.
    pub image: RgbImage,
    /// JPEG quality it is stored at (low for the `jpeg` and `combo` blocks).
    pub quality: u8,
    /// Index into the patch pool of the image a pasted patch came from.
    pub patch_from: Option<usize>,
}

/// The query of block `block` made from `original`, drawing every parameter from `rng`;
/// `patch_pool` supplies the pasted patch of the `overlay` block (a mid-grey noise patch
/// when empty).
///
/// Blocks: `crop` keeps 40-70% of the area (aspect 3:4..4:3) and rescales it to 60-100%
/// of the original's longer side; `rotate` turns by 90 or 270 degrees (30%) or by 10-30
/// degrees either way with a grey fill; `jpeg` stores at quality 10-20; `blur` is a
/// Gaussian of sigma 2-4; `colour` rotates hue by 30-150 degrees either way, scales
/// saturation by 0.4-1.6, shifts brightness by 15-45 either way and contrast by -25..25;
/// `overlay` pastes a patch of another photo (8-20% of the area) and a text block;
/// `combo` is crop + colour + JPEG quality 10-20.
pub fn edit(block: &str, original: &RgbImage, rng: &mut Stream, patch_pool: &[&RgbImage]) -> Query {
    assert!(BLOCKS.contains(&block), "unknown edit block {block}");
    let plain = |image| Query {
        image,
        quality: STORE_QUALITY,
        patch_from: None,
    };
    match block {
        "crop" => plain(crop_rescale(original, rng)),
        "rotate" => plain(rotate(original, rng)),
        "jpeg" => Query {
            image: original.clone(),
            quality: 10 + rng.below(11) as u8,
            patch_from: None,
        },
        "blur" => plain(imageops::blur(original, rng.uniform(2.0, 4.0))),
        "colour" => plain(colour_shift(original, rng)),
        "overlay" => {
            let (image, from) = overlay(original, rng, patch_pool);
            Query {
                image,
                quality: STORE_QUALITY,
                patch_from: from,
            }
        }
        _ => {
            // combo
            let cropped = crop_rescale(original, rng);
            Query {
                image: colour_shift(&cropped, rng),
                quality: 10 + rng.below(11) as u8,
                patch_from: None,
            }
        }
    }
}

/// A random box of `area` (a fraction) of a `w` x `h` image with aspect in 3:4..4:3:
/// `(x, y, width, height)`.
fn random_box(w: u32, h: u32, area: f32, rng: &mut Stream) -> (u32, u32, u32, u32) {
    let aspect = (rng.uniform((0.75f32).ln(), (4.0f32 / 3.0).ln())).exp();
    let a = area * w as f32 * h as f32;
    let bw = ((a * aspect).sqrt().round() as u32).clamp(1, w);
    let bh = ((a / aspect).sqrt().round() as u32).clamp(1, h);
    let x = rng.below(u64::from(w - bw) + 1) as u32;
    let y = rng.below(u64::from(h - bh) + 1) as u32;
    (x, y, bw, bh)
}

fn crop_rescale(img: &RgbImage, rng: &mut Stream) -> RgbImage {
    let (w, h) = img.dimensions();
    let area = rng.uniform(0.4, 0.7);
    let (x, y, bw, bh) = random_box(w, h, area, rng);
    let crop = imageops::crop_imm(img, x, y, bw, bh).to_image();
    let target = w.max(h) as f32 * rng.uniform(0.6, 1.0);
    let scale = target / bw.max(bh) as f32;
    let nw = ((bw as f32 * scale).round() as u32).max(1);
    let nh = ((bh as f32 * scale).round() as u32).max(1);
    imageops::resize(&crop, nw, nh, FilterType::CatmullRom)
}

fn rotate(img: &RgbImage, rng: &mut Stream) -> RgbImage {
    if rng.next_f32() < 0.3 {
        return if rng.next_f32() < 0.5 {
            imageops::rotate90(img)
        } else {
            imageops::rotate270(img)
        };
    }
    let sign = if rng.next_f32() < 0.5 { -1.0 } else { 1.0 };
    let degrees = sign * rng.uniform(10.0, 30.0);
    let grey = (rng.below(256)) as u8;
    rotate_free(img, degrees, Rgb([grey, grey, grey]))
}

/// `img` turned by `degrees` (counter-clockwise) about its centre on a canvas of the
/// same size, bilinear; pixels from outside the source get `fill`.
pub fn rotate_free(img: &RgbImage, degrees: f32, fill: Rgb<u8>) -> RgbImage {
    let (w, h) = img.dimensions();
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    RgbImage::from_fn(w, h, |x, y| {
        // Inverse map: the source point that lands on (x, y).
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let sx = c * dx - s * dy + cx;
        let sy = s * dx + c * dy + cy;
        if sx < -0.5 || sy < -0.5 || sx > w as f32 - 0.5 || sy > h as f32 - 0.5 {
            return fill;
        }
        let (sx, sy) = (sx.clamp(0.0, w as f32 - 1.0), sy.clamp(0.0, h as f32 - 1.0));
        let (x0, y0) = (sx.floor() as u32, sy.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
        let p = |xx, yy, ch: usize| f32::from(img.get_pixel(xx, yy)[ch]);
        let v = |ch| {
            let top = p(x0, y0, ch) * (1.0 - fx) + p(x1, y0, ch) * fx;
            let bottom = p(x0, y1, ch) * (1.0 - fx) + p(x1, y1, ch) * fx;
            (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8
        };
        Rgb([v(0), v(1), v(2)])
    })
}

fn colour_shift(img: &RgbImage, rng: &mut Stream) -> RgbImage {
    let sign = |rng: &mut Stream| if rng.next_f32() < 0.5 { -1.0f32 } else { 1.0 };
    let hue = (sign(rng) * rng.uniform(30.0, 150.0)).round() as i32;
    let saturation = rng.uniform(0.4, 1.6);
    let bright = (sign(rng) * rng.uniform(15.0, 45.0)).round() as i32;
    let contrast = rng.uniform(-25.0, 25.0);
    let mut out = imageops::huerotate(img, hue);
    for p in out.pixels_mut() {
        let l = 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
        for ch in 0..3 {
            let v = l + saturation * (f32::from(p[ch]) - l);
            p[ch] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    let out = imageops::brighten(&out, bright);
    imageops::contrast(&out, contrast)
}

/// Words of the pasted text (the bitmap font has capitals, digits and a few signs).
const WORDS: [&str; 12] = [
    "COPY", "SAMPLE", "2024", "PHOTO", "NEWS", "SALE", "LIVE", "(C)", "DRAFT", "50%", "TOP", "BEST",
];

fn overlay(img: &RgbImage, rng: &mut Stream, pool: &[&RgbImage]) -> (RgbImage, Option<usize>) {
    let mut out = img.clone();
    let (w, h) = img.dimensions();
    // A patch of another photo.
    let area = rng.uniform(0.08, 0.2);
    let (x, y, bw, bh) = random_box(w, h, area, rng);
    let (patch, from) = if pool.is_empty() {
        let patch = RgbImage::from_fn(bw, bh, |_, _| {
            let v = 128u8.wrapping_add((rng.below(64) as u8).wrapping_sub(32));
            Rgb([v, v, v])
        });
        (patch, None)
    } else {
        let k = rng.below(pool.len() as u64) as usize;
        let src = pool[k];
        let (sw, sh) = src.dimensions();
        let (px, py, pw, ph) = random_box(sw, sh, rng.uniform(0.2, 0.6), rng);
        let piece = imageops::crop_imm(src, px, py, pw, ph).to_image();
        (
            imageops::resize(&piece, bw, bh, FilterType::Triangle),
            Some(k),
        )
    };
    imageops::replace(&mut out, &patch, i64::from(x), i64::from(y));
    // A text block: 1-2 lines on a solid box.
    let lines = 1 + rng.below(2) as usize;
    let text: Vec<String> = (0..lines)
        .map(|_| {
            let a = WORDS[rng.below(WORDS.len() as u64) as usize];
            let b = WORDS[rng.below(WORDS.len() as u64) as usize];
            format!("{a} {b}")
        })
        .collect();
    let longest = text.iter().map(|t| t.chars().count()).max().unwrap_or(1) as u32;
    let max_scale = (w / (longest * 4 + 2)).clamp(1, 8);
    let scale = 1 + rng.below(u64::from(max_scale)) as u32;
    let scale = scale.max(max_scale.min(2));
    let tw = (longest * 4 + 1) * scale;
    let th = (lines as u32 * 6 + 1) * scale;
    let tx = rng.below(u64::from(w.saturating_sub(tw)) + 1) as u32;
    let ty = rng.below(u64::from(h.saturating_sub(th)) + 1) as u32;
    let bg = Rgb([
        rng.below(256) as u8,
        rng.below(256) as u8,
        rng.below(256) as u8,
    ]);
    let luma = 0.299 * f32::from(bg[0]) + 0.587 * f32::from(bg[1]) + 0.114 * f32::from(bg[2]);
    let ink = if luma > 128.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    };
    for yy in ty..(ty + th).min(h) {
        for xx in tx..(tx + tw).min(w) {
            out.put_pixel(xx, yy, bg);
        }
    }
    for (i, line) in text.iter().enumerate() {
        crate::viz::draw_text(
            &mut out,
            i64::from(tx + scale),
            i64::from(ty + scale + i as u32 * 6 * scale),
            line,
            i64::from(scale),
            ink,
        );
    }
    (out, from)
}

// ---------------------------------------------------------------------------------------
// Output.

/// Creates `out` and its image folders, and removes `.jpg` files a previous build left in
/// them (so a smaller rebuild leaves no stale images).
fn prepare_output(out: &Path) -> Result<()> {
    let unwritable = |path: &Path, e: std::io::Error| {
        Error::bad_file(
            path,
            format!("cannot create or write the output folder ({e}); pass a writable folder as the output (--out)"),
        )
    };
    for sub in ["originals", "distractors", "whiten", "queries"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| unwritable(&dir, e))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| unwritable(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| unwritable(&dir, e))?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "jpg") {
                std::fs::remove_file(&path).map_err(|e| unwritable(&path, e))?;
            }
        }
    }
    Ok(())
}

fn write_jpeg(path: &Path, img: &RgbImage, quality: u8) -> Result<()> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(Cursor::new(&mut bytes), quality)
        .encode(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::copydetect::CopyGroundTruth;
    use image::GrayImage;
    use std::collections::BTreeSet;

    /// A photo-like synthetic image: three random sinusoid fields per channel, two random
    /// discs and noise, so colours spread like a photograph's and every image has its own
    /// structure.
    fn synthetic_photo(k: u32, w: u32, h: u32) -> RgbImage {
        let mut rng = Stream::new(1234, [k, 0, 0], Purpose::Noise);
        let mut waves = Vec::new();
        for _ in 0..9 {
            let angle = rng.uniform(0.0, std::f32::consts::TAU);
            let freq = rng.uniform(1.0, 6.0) * std::f32::consts::TAU;
            let phase = rng.uniform(0.0, std::f32::consts::TAU);
            waves.push((
                angle.cos() * freq,
                angle.sin() * freq,
                phase,
                rng.uniform(20.0, 40.0),
            ));
        }
        let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..2)
            .map(|_| {
                let c = [
                    rng.uniform(0.0, 255.0),
                    rng.uniform(0.0, 255.0),
                    rng.uniform(0.0, 255.0),
                ];
                (
                    rng.uniform(0.1, 0.9),
                    rng.uniform(0.1, 0.9),
                    rng.uniform(0.1, 0.3),
                    c,
                )
            })
            .collect();
        RgbImage::from_fn(w, h, |x, y| {
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            let mut c = [0u8; 3];
            for (ch, out) in c.iter_mut().enumerate() {
                let mut s = 128.0;
                for &(a, b, phase, amp) in &waves[ch * 3..ch * 3 + 3] {
                    s += amp * (a * u + b * v + phase).sin();
                }
                for &(cx, cy, r, col) in &discs {
                    if (u - cx).powi(2) + (v - cy).powi(2) < r * r {
                        s = 0.5 * s + 0.5 * col[ch];
                    }
                }
                s += rng.uniform(-12.0, 12.0);
                *out = s.round().clamp(0.0, 255.0) as u8;
            }
            Rgb(c)
        })
    }

    /// 20 usable photos plus one of each kind of reject: a flat drawing, a too-small
    /// photo, a resized duplicate, a mirrored duplicate, a broken file and a non-image.
    fn synthetic_folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("nested");
        std::fs::create_dir_all(&sub).unwrap();
        for k in 0..20u32 {
            let (w, h) = (160 + (k * 37) % 140, 150 + (k * 53) % 150);
            let img = synthetic_photo(k, w, h);
            let path = if k % 3 == 0 {
                sub.join(format!("photo{k:02}.jpg"))
            } else {
                dir.path().join(format!("photo{k:02}.png"))
            };
            img.save(&path).unwrap();
            if k == 2 {
                let smaller = imageops::resize(&img, w * 4 / 5, h * 4 / 5, FilterType::Triangle);
                smaller
                    .save(dir.path().join("zz_resized_copy.png"))
                    .unwrap();
            }
            if k == 1 {
                imageops::flip_horizontal(&img)
                    .save(dir.path().join("zz_mirror_copy.png"))
                    .unwrap();
            }
        }
        let drawing = RgbImage::from_fn(200, 200, |x, y| match (x / 70, y / 70) {
            (0, _) => Rgb([250, 20, 20]),
            (1, 0) => Rgb([20, 20, 250]),
            _ => Rgb([255, 255, 255]),
        });
        drawing.save(dir.path().join("drawing.png")).unwrap();
        synthetic_photo(99, 100, 140)
            .save(dir.path().join("tiny.png"))
            .unwrap();
        std::fs::write(dir.path().join("broken.png"), b"not a png at all").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        dir
    }

    fn options(src: &Path, out: &Path, seed: u64) -> BuildOptions {
        BuildOptions {
            out: out.to_path_buf(),
            seed,
            max_originals: 1000,
            sources: vec![src.to_path_buf()],
            side: 256,
        }
    }

    fn read_rgb(path: &Path) -> RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = Vec::new();
        walk(dir, &mut files).unwrap();
        files
            .into_iter()
            .map(|p| {
                (
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    }

    /// Mean absolute difference per channel of two same-sized images.
    fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let s: u64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&x, &y)| u64::from(x.abs_diff(y)))
            .sum();
        s as f64 / a.as_raw().len() as f64
    }

    #[test]
    fn build_splits_disjoint_sets_and_writes_readable_ground_truth() {
        let src = synthetic_folder();
        let out = tempfile::tempdir().unwrap();
        let m = build(&options(src.path(), out.path(), 7)).unwrap();
        // 20 usable photos -> 8 : 6 : 6; every reject counted under its reason.
        assert_eq!((m.originals, m.distractors, m.whitening), (8, 6, 6));
        assert_eq!(m.queries, 8 * BLOCKS.len());
        let want = Skipped {
            unreadable: 1,
            too_small: 1,
            not_photo: 1,
            duplicate: 2,
            excluded: 0,
            unused: 0,
        };
        assert_eq!(m.skipped, want);

        // The three sets come from distinct source files (and none is a reject).
        let sources: Vec<&PathBuf> = m.images.iter().map(|r| &r.source).collect();
        let distinct: BTreeSet<&PathBuf> = sources.iter().copied().collect();
        assert_eq!(distinct.len(), 20);
        assert!(sources.iter().all(|s| {
            let n = s.file_name().unwrap().to_string_lossy();
            n.starts_with("photo")
        }));

        // The copy-detection reader accepts the file; indices are in range and every
        // query's positive is the original with its number.
        let gt = CopyGroundTruth::load(&m.ground_truth).unwrap();
        gt.validate(gt.db.len(), gt.queries.len()).unwrap();
        assert_eq!(gt.db.len(), 14);
        assert_eq!(gt.whitening.len(), 6);
        assert!(gt.db[..8].iter().all(|p| p.starts_with("originals/")));
        assert!(gt.db[8..].iter().all(|p| p.starts_with("distractors/")));
        assert!(gt.whitening.iter().all(|p| p.starts_with("whiten/")));
        let db: BTreeSet<&String> = gt.db.iter().collect();
        assert!(gt.whitening.iter().all(|w| !db.contains(w)));
        for q in &gt.queries {
            assert_eq!(q.positives.len(), 1);
            let i = q.positives[0];
            assert!(i < 8, "{} points at a distractor", q.image);
            let number = &q.image["queries/".len().."queries/".len() + 4];
            assert_eq!(gt.db[i], format!("originals/{number}.jpg"));
            assert!(q.image.ends_with(&format!("_{}.jpg", q.block)));
            for path in gt
                .db_paths(&m.ground_truth)
                .iter()
                .chain(&gt.query_paths(&m.ground_truth))
            {
                assert!(path.is_file(), "{} missing", path.display());
            }
        }
        let blocks: BTreeSet<&str> = gt.queries.iter().map(|q| q.block.as_str()).collect();
        assert_eq!(blocks, BLOCKS.iter().copied().collect());
        assert!(out.path().join("manifest.json").is_file());
        let licences = std::fs::read_to_string(out.path().join("LICENSES.md")).unwrap();
        assert!(m.images.iter().all(|r| licences.contains(&r.image)));
    }

    #[test]
    fn mild_edits_are_nearest_to_their_own_original() {
        // Independent of the ground truth's bookkeeping: by pixels (16x16 grey), a JPEG
        // or blurred query is closer to the original it names than to any database image.
        let src = synthetic_folder();
        let out = tempfile::tempdir().unwrap();
        let m = build(&options(src.path(), out.path(), 3)).unwrap();
        let gt = CopyGroundTruth::load(&m.ground_truth).unwrap();
        let tiny = |p: &Path| {
            imageops::resize(
                &imageops::grayscale(&read_rgb(p)),
                16,
                16,
                FilterType::Triangle,
            )
        };
        let db: Vec<GrayImage> = gt
            .db_paths(&m.ground_truth)
            .iter()
            .map(|p| tiny(p))
            .collect();
        let paths = gt.query_paths(&m.ground_truth);
        let mut checked = 0;
        for (q, path) in gt.queries.iter().zip(&paths) {
            if q.block != "jpeg" && q.block != "blur" {
                continue;
            }
            let t = tiny(path);
            let dist = |d: &GrayImage| -> u32 {
                t.as_raw()
                    .iter()
                    .zip(d.as_raw())
                    .map(|(&a, &b)| u32::from(a.abs_diff(b)))
                    .sum()
            };
            let nearest = (0..db.len()).min_by_key(|&j| dist(&db[j])).unwrap();
            assert_eq!(nearest, q.positives[0], "{}", q.image);
            checked += 1;
        }
        assert_eq!(checked, 16);
    }

    #[test]
    fn every_edit_changes_the_image_and_keeps_a_sane_size() {
        let src = synthetic_folder();
        let out = tempfile::tempdir().unwrap();
        let m = build(&options(src.path(), out.path(), 11)).unwrap();
        let gt = CopyGroundTruth::load(&m.ground_truth).unwrap();
        let db = gt.db_paths(&m.ground_truth);
        for (q, path) in gt.queries.iter().zip(gt.query_paths(&m.ground_truth)) {
            let orig_path = &db[q.positives[0]];
            let (orig, query) = (read_rgb(orig_path), read_rgb(&path));
            let (ow, oh) = orig.dimensions();
            let (qw, qh) = query.dimensions();
            assert!(qw.max(qh) <= m.side, "{}: {qw}x{qh}", q.image);
            assert!(
                qw.min(qh) * 4 >= ow.min(oh),
                "{}: {qw}x{qh} from {ow}x{oh}",
                q.image
            );
            if (qw, qh) == (ow, oh) {
                let d = mad(&orig, &query);
                assert!(
                    d > 1.5,
                    "{} barely differs from its original (MAD {d:.2})",
                    q.image
                );
            }
            if q.block == "jpeg" || q.block == "combo" {
                // Stored at quality 10-20: far smaller than the quality-95 original.
                let (a, b) = (
                    std::fs::metadata(&path).unwrap().len(),
                    std::fs::metadata(orig_path).unwrap().len(),
                );
                assert!(a * 2 < b, "{}: {a} bytes vs original {b}", q.image);
            }
        }
    }

    #[test]
    fn same_seed_is_byte_identical_and_another_seed_differs() {
        let src = synthetic_folder();
        let out = tempfile::tempdir().unwrap();
        build(&options(src.path(), out.path(), 5)).unwrap();
        let first = snapshot(out.path());
        build(&options(src.path(), out.path(), 5)).unwrap();
        assert!(
            first == snapshot(out.path()),
            "a rebuild with the same seed changed files"
        );
        build(&options(src.path(), out.path(), 6)).unwrap();
        let other = snapshot(out.path());
        let q = Path::new("queries/0001_crop.jpg");
        assert_ne!(first.get(q), other.get(q));
        assert_ne!(first.get(Path::new("ground_truth.json")), None);
    }

    #[test]
    fn max_originals_shrinks_all_three_sets() {
        let src = synthetic_folder();
        let out = tempfile::tempdir().unwrap();
        let mut opts = options(src.path(), out.path(), 1);
        opts.max_originals = 4;
        let m = build(&opts).unwrap();
        assert_eq!((m.originals, m.distractors, m.whitening), (4, 3, 3));
        assert_eq!(m.skipped.unused, 10);
        assert_eq!(split_sizes(3, 1000), (1, 1, 1));
        assert_eq!(split_sizes(100, 1000), (40, 30, 30));
    }

    #[test]
    fn no_photos_and_unwritable_output_are_clear_errors() {
        let empty = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let e = build(&options(empty.path(), out.path(), 0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no usable photos") && e.contains(&empty.path().display().to_string()),
            "{e}"
        );
        let e = no_photos_error(&[]).to_string();
        assert!(
            e.contains("apt-get install tuxpaint-stamps-default")
                && e.contains("scripts/build-copy-benchmark.sh"),
            "{e}"
        );

        let src = synthetic_folder();
        let blocker = out.path().join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let e = build(&options(src.path(), &blocker.join("bench"), 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a-file") && e.contains("writable"), "{e}");

        let missing = out.path().join("no-such-folder");
        let e = build(&options(&missing, out.path(), 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-folder"), "{e}");
    }

    #[test]
    fn dep5_licence_is_the_last_paragraph_naming_the_file() {
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
                    Upstream-Name: x\n\n\
                    Files: *\nCopyright: 2001 Someone\nLicense: GPL-2\n\n\
                    Files: nature/Wood.jpg\n       16.04/Bar_by_Me.jpg\n\
                    Copyright: 2008, A Person\n           2009, B\nLicense: CC-BY-SA-4.0\n \
                    long text of the licence\n\n\
                    Files: data/*\nCopyright: 2000 C\nLicense: BSD-3-Clause\n";
        let src = Source {
            package: "p".into(),
            version: "1".into(),
            copyright: parse_dep5(text),
            copyright_file: Some(PathBuf::from("/usr/share/doc/p/copyright")),
        };
        assert_eq!(src.copyright.len(), 3);
        let lic = |p: &str| licence_of(&src, Path::new(p));
        assert_eq!(
            lic("/usr/share/backgrounds/mate/nature/Wood.jpg"),
            ("CC-BY-SA-4.0".to_string(), "2008, A Person".to_string())
        );
        // Continuation line, installed without the upstream folder.
        assert_eq!(
            lic("/usr/share/backgrounds/Bar_by_Me.jpg").0,
            "CC-BY-SA-4.0"
        );
        // `data/*` names an upstream folder, not the installed examples/data.
        assert_eq!(lic("/usr/share/doc/p/examples/data/apple.jpg").0, "GPL-2");
        let no_dep5 = Source {
            copyright: parse_dep5("This package was debianized by ...\n"),
            ..src
        };
        assert_eq!(lic_of(&no_dep5), "see /usr/share/doc/p/copyright");
        fn lic_of(s: &Source) -> String {
            licence_of(s, Path::new("/a/b.jpg")).0
        }
    }

    #[test]
    fn dpkg_version_needs_an_installed_paragraph() {
        let status = "Package: a\nStatus: install ok installed\nVersion: 1.2-3\n\n\
                      Package: b\nStatus: deinstall ok config-files\nVersion: 9\n\n\
                      Package: opencv-doc\nStatus: install ok installed\nArchitecture: all\nVersion: 4.6.0+dfsg-12\n";
        assert_eq!(dpkg_version(status, "a").as_deref(), Some("1.2-3"));
        assert_eq!(dpkg_version(status, "b"), None);
        assert_eq!(dpkg_version(status, "c"), None);
        assert_eq!(
            dpkg_version(status, "opencv-doc").as_deref(),
            Some("4.6.0+dfsg-12")
        );
    }

    #[test]
    fn excluded_names_are_second_views_synthetic_pictures_and_mirrors() {
        let ex = |p: &str, f: &str| excluded_name(p, Path::new(f));
        assert!(ex("opencv-doc", "/e/data/left01.jpg"));
        assert!(ex("opencv-doc", "/e/data/right14.jpg"));
        assert!(ex("opencv-doc", "/e/data/aloeR.jpg"));
        assert!(ex("opencv-doc", "/e/text/scenetext_segmented_word01.jpg"));
        assert!(!ex("opencv-doc", "/e/data/left.jpg"));
        assert!(!ex("opencv-doc", "/e/data/aloeL.jpg"));
        assert!(ex("opencv-doc", "/e/data/pic3.png"));
        assert!(ex("opencv-doc", "/e/data/gradient.png"));
        assert!(!ex("opencv-doc", "/e/data/pic10.png"));
        assert!(ex("tuxpaint-stamps-default", "/s/dumper_mirror.png"));
        assert!(!ex("tuxpaint-stamps-default", "/s/left01.jpg"));
        assert!(!ex("mate-backgrounds", "/b/gradient.png"));
    }

    #[test]
    fn flat_colour_share_known_values() {
        // Two colours: the top 16 cover everything.
        let two = RgbaImage::from_fn(32, 32, |x, _| {
            if x < 5 {
                image::Rgba([0, 0, 0, 255])
            } else {
                image::Rgba([9, 9, 9, 255])
            }
        });
        assert_eq!(flat_colour_share(&two), Some(1.0));
        // 1024 distinct colours: 16 / 1024.
        let all = RgbaImage::from_fn(32, 32, |x, y| image::Rgba([x as u8, y as u8, 7, 255]));
        assert_eq!(flat_colour_share(&all), Some(16.0 / 1024.0));
        // Transparent pixels do not count; under 10% opaque is no photo.
        let cut = RgbaImage::from_fn(32, 32, |x, y| {
            image::Rgba([x as u8, y as u8, 7, if x < 16 { 255 } else { 0 }])
        });
        assert_eq!(flat_colour_share(&cut), Some(16.0 / 512.0));
        let ghost = RgbaImage::from_fn(32, 32, |x, y| {
            image::Rgba([x as u8, y as u8, 7, if x < 3 { 255 } else { 0 }])
        });
        assert_eq!(flat_colour_share(&ghost), None);
    }

    #[test]
    fn free_rotation_by_0_is_identity_and_by_90_is_a_quarter_turn() {
        let img = synthetic_photo(5, 41, 41);
        assert_eq!(rotate_free(&img, 0.0, Rgb([0, 0, 0])), img);
        // Counter-clockwise quarter turn of a square = image's rotate270.
        assert_eq!(
            rotate_free(&img, 90.0, Rgb([0, 0, 0])),
            imageops::rotate270(&img)
        );
        // A 30-degree turn fills the corners and keeps the centre pixel.
        let r = rotate_free(&img, 30.0, Rgb([1, 2, 3]));
        assert_eq!(r.get_pixel(0, 0), &Rgb([1, 2, 3]));
        assert_eq!(r.get_pixel(20, 20), img.get_pixel(20, 20));
    }
}
