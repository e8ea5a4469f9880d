//! The pack file: the engine's dataset format, one file per split, read by memory-mapping so
//! that an image is a slice of the file and never a copy. This module reads and writes packs;
//! it must not decode source formats (that is `idx`, `cifar`, `folder`) nor augment anything.
//!
//! # Layout (version 1, every integer little-endian)
//!
//! ```text
//! offset        size        field
//! 0             8           magic  b"PWSPACK\0"
//! 8             4           format version, u32 = 1
//! 12            4           header length H, u32: bytes from offset 0 up to and including
//!                           the header CRC below
//! 16            8           count N, u64: number of images
//! 24            4           height, u32
//! 28            4           width, u32
//! 32            4           channels C, u32: 1 (grey) or 3 (RGB)
//! 36            4           class count K, u32 (1..=65536)
//! 40            4*C         per-channel mean of pixel/255 over the whole split, f32
//! 40+4C         4*C         per-channel (population) std of pixel/255, f32
//! 40+8C         ...         K class names, each a u16 byte length then that many UTF-8 bytes
//! H-8           4           CRC32 of the payload (pixels then labels)
//! H-4           4           CRC32 of the header bytes [0, H-4)
//! H             ...         zero padding up to P = H rounded up to a multiple of 64
//! P             N*h*w*C     pixels, u8, image after image, each HWC (row-major, channels last)
//! P+N*h*w*C     2*N         labels, u16 (each < K)
//! ```
//!
//! The file ends right after the labels: any other length is an error. CRCs are CRC-32
//! (IEEE, as `crc32fast` and zlib compute it). The pixel payload is 64-byte aligned in the
//! file (and so in the memory map).
//!
//! [`PackWriter`] streams pixels to a temporary file beside the output, appends the labels,
//! writes the header last (its length is known up front from the class names), fsyncs and
//! renames: a pack either exists complete or not at all.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The first eight bytes of every pack file.
pub const MAGIC: [u8; 8] = *b"PWSPACK\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The pixel payload starts at a multiple of this many bytes.
pub const PAYLOAD_ALIGN: usize = 64;
/// The most classes a pack can hold (labels are u16).
pub const MAX_CLASSES: usize = 1 << 16;

/// The fixed part of the header: magic, version, header length, count, height, width,
/// channels, class count.
const FIXED_HEADER: usize = 40;

const REPREPARE: &str = "re-run `pwself-engine prepare` to write it again";

/// Where a pack's bytes live.
enum Storage {
    /// A read-only memory map of the file.
    Mmap(memmap2::Mmap),
    /// Bytes in memory (a gunzipped file or an embedded dataset).
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An opened, fully validated pack: `len()` images of `height x width x channels` bytes
/// (HWC) with one label each. Images are slices of the memory map (or of the in-memory
/// bytes for a `.gz` pack). `Send + Sync`: share it between loader threads by reference.
pub struct Pack {
    storage: Storage,
    origin: PathBuf,
    layout: Layout,
}

impl fmt::Debug for Pack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pack")
            .field("origin", &self.origin)
            .field("count", &self.layout.count)
            .field("height", &self.layout.height)
            .field("width", &self.layout.width)
            .field("channels", &self.layout.channels)
            .field("num_classes", &self.layout.class_names.len())
            .field("mean", &self.layout.mean)
            .field("std", &self.layout.std)
            .field("in_memory", &matches!(self.storage, Storage::Owned(_)))
            .finish()
    }
}

/// What the header of a valid pack says, plus its labels.
struct Layout {
    count: usize,
    height: usize,
    width: usize,
    channels: usize,
    class_names: Vec<String>,
    mean: Vec<f32>,
    std: Vec<f32>,
    pixel_offset: usize,
    image_len: usize,
    labels: Vec<u16>,
}

/// True when `bytes` start with the gzip magic (1f 8b).
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Gunzips `compressed` (read from `origin`) into memory.
/// The most bytes [`gunzip`] produces: a deflate stream expands up to about 1,000 times, so a
/// small corrupt or hostile file could otherwise fill the memory before anything reads it.
pub(crate) const MAX_GUNZIP_BYTES: u64 = 8 << 30;

pub(crate) fn gunzip(compressed: &[u8], origin: &Path) -> Result<Vec<u8>> {
    gunzip_capped(compressed, origin, MAX_GUNZIP_BYTES)
}

fn gunzip_capped(compressed: &[u8], origin: &Path, cap: u64) -> Result<Vec<u8>> {
    // The gzip trailer holds the uncompressed size mod 2^32: a capacity hint, capped so a
    // corrupt trailer cannot make us allocate gigabytes up front.
    let hint = compressed
        .len()
        .checked_sub(4)
        .and_then(|at| compressed.get(at..))
        .and_then(|t| t.try_into().ok())
        .map(|t: [u8; 4]| u32::from_le_bytes(t) as usize)
        .unwrap_or(0)
        .min(compressed.len().saturating_mul(64));
    let mut out = Vec::with_capacity(hint.min(cap as usize));
    flate2::read::GzDecoder::new(compressed)
        .take(cap + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            Error::bad_file(
                origin,
                format!(
                    "looks gzip-compressed but cannot be decompressed ({e}): the file is \
                     truncated or corrupt; download or write it again"
                ),
            )
        })?;
    if out.len() as u64 > cap {
        return Err(Error::bad_file(
            origin,
            format!(
                "decompresses to more than {} GiB, the limit for gzip input read into \
                 memory: gunzip it yourself and pass the plain file",
                cap >> 30
            ),
        ));
    }
    Ok(out)
}

/// The error for an input file that cannot be opened: a missing file says so and how to
/// fix it (`fix`); any other failure keeps the operating system's reason.
pub(crate) fn open_failed(path: &Path, e: std::io::Error, fix: &str) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::bad_file(path, format!("does not exist: check the path; {fix}"))
        }
        std::io::ErrorKind::PermissionDenied => Error::bad_file(
            path,
            format!("cannot be read ({e}): give yourself read permission"),
        ),
        _ => Error::io(path, e),
    }
}

/// Reads a whole file into memory, gunzipping it when it starts with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let fix = "pass an existing source file";
    if fs::metadata(path)
        .map_err(|e| open_failed(path, e, fix))?
        .is_dir()
    {
        return Err(Error::bad_file(path, "is a directory: pass a file instead"));
    }
    let bytes = fs::read(path).map_err(|e| open_failed(path, e, fix))?;
    if is_gzip(&bytes) {
        gunzip(&bytes, path)
    } else {
        Ok(bytes)
    }
}

/// A little-endian reader over the header bytes that reports running off the end as `None`.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn f32(&mut self) -> Option<f32> {
        self.array().map(f32::from_le_bytes)
    }
}

/// Rounds `n` up to a multiple of [`PAYLOAD_ALIGN`].
fn align_up(n: usize) -> Option<usize> {
    n.checked_add(PAYLOAD_ALIGN - 1)
        .map(|m| m / PAYLOAD_ALIGN * PAYLOAD_ALIGN)
}

/// The header length for `channels` and `class_names` (without padding).
fn header_len(channels: usize, class_names: &[String]) -> Option<usize> {
    let names: usize = class_names
        .iter()
        .try_fold(0usize, |acc, n| acc.checked_add(2 + n.len()))?;
    FIXED_HEADER
        .checked_add(8 * channels)?
        .checked_add(names)?
        .checked_add(8)
}

/// Validates `bytes` as a whole pack file read from `origin`.
fn parse(bytes: &[u8], origin: &Path) -> Result<Layout> {
    let bad = |reason: String| Error::bad_file(origin, reason);
    let len = bytes.len();

    // Magic.
    if len < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        if len < MAGIC.len() && MAGIC.starts_with(bytes) {
            return Err(bad(format!(
                "is truncated: only {len} bytes, less than a pack header: {REPREPARE}"
            )));
        }
        return Err(bad(
            "is not a pwself-engine pack (it does not start with the magic bytes \
             \"PWSPACK\\0\"): pass a file written by `pwself-engine prepare`, or run \
             `pwself-engine prepare` on this source first"
                .to_string(),
        ));
    }
    let mut c = Cursor {
        bytes,
        pos: MAGIC.len(),
    };
    let truncated_early = || {
        bad(format!(
            "is truncated: only {len} bytes, less than a pack header: {REPREPARE}"
        ))
    };

    // Version, before anything else whose layout it could change.
    let version = c.u32().ok_or_else(truncated_early)?;
    if version > FORMAT_VERSION {
        return Err(bad(format!(
            "was written by a newer pwself-engine (pack format version {version}; this build \
             reads version {FORMAT_VERSION}): upgrade pwself-engine, or re-run prepare with \
             this version"
        )));
    }
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "has pack format version {version}, which no pwself-engine ever wrote: the header \
             is corrupt; {REPREPARE}"
        )));
    }

    // Header length, then the header checksum over it.
    let hlen = c.u32().ok_or_else(truncated_early)? as usize;
    let min_hlen = FIXED_HEADER + 8 + 2 + 8; // one channel, one empty class name
    if hlen < min_hlen {
        return Err(bad(format!(
            "header is corrupt: its length field says {hlen} bytes, less than the minimum \
             {min_hlen}; {REPREPARE}"
        )));
    }
    if hlen > len {
        return Err(bad(format!(
            "is truncated (or its header is corrupt): the header alone should be {hlen} bytes \
             but the file has {len} bytes; {REPREPARE}"
        )));
    }
    let stored_hcrc = u32::from_le_bytes([
        bytes[hlen - 4],
        bytes[hlen - 3],
        bytes[hlen - 2],
        bytes[hlen - 1],
    ]);
    let computed_hcrc = crc32fast::hash(&bytes[..hlen - 4]);
    if stored_hcrc != computed_hcrc {
        return Err(bad(format!(
            "header is corrupt: header checksum mismatch (stored {stored_hcrc:#010x}, computed \
             {computed_hcrc:#010x}); {REPREPARE}"
        )));
    }

    // Fields. The checksum matched, so anything odd from here on is a writer bug or a
    // deliberately forged header: still an error, never a panic.
    let mut c = Cursor {
        bytes: &bytes[..hlen - 8],
        pos: c.pos,
    };
    let malformed = |what: &str| {
        bad(format!(
            "header is malformed ({what}) although its checksum matches: the writer was \
             faulty; {REPREPARE}"
        ))
    };
    let count = c.u64().ok_or_else(|| malformed("no count"))?;
    let height = c.u32().ok_or_else(|| malformed("no height"))? as usize;
    let width = c.u32().ok_or_else(|| malformed("no width"))? as usize;
    let channels = c.u32().ok_or_else(|| malformed("no channel count"))? as usize;
    let num_classes = c.u32().ok_or_else(|| malformed("no class count"))? as usize;
    if channels != 1 && channels != 3 {
        return Err(malformed(&format!("{channels} channels; must be 1 or 3")));
    }
    if height == 0 || width == 0 {
        return Err(malformed(&format!("image size {height}x{width}")));
    }
    if num_classes == 0 || num_classes > MAX_CLASSES {
        return Err(malformed(&format!(
            "{num_classes} classes; must be 1..={MAX_CLASSES}"
        )));
    }
    let mut mean = Vec::with_capacity(channels);
    for _ in 0..channels {
        mean.push(c.f32().ok_or_else(|| malformed("mean cut short"))?);
    }
    let mut std = Vec::with_capacity(channels);
    for _ in 0..channels {
        std.push(c.f32().ok_or_else(|| malformed("std cut short"))?);
    }
    let mut class_names = Vec::with_capacity(num_classes);
    for k in 0..num_classes {
        let n = c
            .u16()
            .ok_or_else(|| malformed(&format!("class name {k} cut short")))?;
        let raw = c
            .take(n as usize)
            .ok_or_else(|| malformed(&format!("class name {k} cut short")))?;
        let name = std::str::from_utf8(raw)
            .map_err(|_| malformed(&format!("class name {k} is not UTF-8")))?;
        class_names.push(name.to_string());
    }
    if c.pos != hlen - 8 {
        return Err(malformed(&format!(
            "{} unexplained bytes after the class names",
            (hlen - 8).saturating_sub(c.pos)
        )));
    }
    let stored_pcrc = u32::from_le_bytes([
        bytes[hlen - 8],
        bytes[hlen - 7],
        bytes[hlen - 6],
        bytes[hlen - 5],
    ]);

    // Sizes against the file length.
    let too_big = || bad(format!("header is corrupt: sizes overflow; {REPREPARE}"));
    let count_usize = usize::try_from(count).map_err(|_| too_big())?;
    let pixel_offset = align_up(hlen).ok_or_else(too_big)?;
    let image_len = height
        .checked_mul(width)
        .and_then(|x| x.checked_mul(channels))
        .ok_or_else(too_big)?;
    let pixel_bytes = image_len.checked_mul(count_usize).ok_or_else(too_big)?;
    let label_offset = pixel_offset.checked_add(pixel_bytes).ok_or_else(too_big)?;
    let expected = count_usize
        .checked_mul(2)
        .and_then(|l| label_offset.checked_add(l))
        .ok_or_else(too_big)?;
    if len < expected {
        return Err(bad(format!(
            "is truncated: expected {expected} bytes ({count} images of \
             {height}x{width}x{channels} plus labels) but the file has {len} bytes; the write \
             or copy was cut short: {REPREPARE}"
        )));
    }
    if len > expected {
        return Err(bad(format!(
            "has {} unexpected trailing bytes: expected {expected} bytes ({count} images of \
             {height}x{width}x{channels} plus labels) but the file has {len} bytes; {REPREPARE}",
            len - expected
        )));
    }

    // Payload checksum, then labels.
    let payload = &bytes[pixel_offset..expected];
    let computed_pcrc = crc32fast::hash(payload);
    if stored_pcrc != computed_pcrc {
        return Err(bad(format!(
            "is corrupt: payload checksum mismatch (stored {stored_pcrc:#010x}, computed \
             {computed_pcrc:#010x}), so some pixels or labels changed after it was written \
             (bad disk or incomplete copy); {REPREPARE}"
        )));
    }
    let labels: Vec<u16> = bytes[label_offset..expected]
        .chunks_exact(2)
        .map(|p| u16::from_le_bytes([p[0], p[1]]))
        .collect();
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(bad(format!(
            "is corrupt: image {i} has label {l} but the pack has {num_classes} classes; \
             {REPREPARE}"
        )));
    }

    Ok(Layout {
        count: count_usize,
        height,
        width,
        channels,
        class_names,
        mean,
        std,
        pixel_offset,
        image_len,
        labels,
    })
}

impl Pack {
    /// Opens and validates the pack at `path`: magic, version, header checksum, every size
    /// against the file length, the payload checksum (one pass over the file at memory
    /// speed) and the label range. A plain pack is memory-mapped; a gzip-compressed one
    /// (detected by its first bytes, e.g. `train.pwpack.gz`) is gunzipped into memory.
    ///
    /// The map assumes nobody rewrites the file while it is open; `prepare` never does (it
    /// writes a new file and renames it over the old one).
    pub fn open(path: impl AsRef<Path>) -> Result<Pack> {
        let path = path.as_ref();
        let fix = "pass a pack written by `pwself-engine prepare` (or run prepare first)";
        let meta = fs::metadata(path).map_err(|e| open_failed(path, e, fix))?;
        if meta.is_dir() {
            return Err(Error::bad_file(
                path,
                "is a directory, not a pack file: pass the .pwpack file written by \
                 `pwself-engine prepare`",
            ));
        }
        let mut file = File::open(path).map_err(|e| open_failed(path, e, fix))?;
        let mut head = [0u8; 2];
        let mut got = 0;
        while got < head.len() {
            match file.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        if got == 0 {
            return Err(Error::bad_file(
                path,
                format!("is empty (0 bytes), not a pack: {REPREPARE}"),
            ));
        }
        let named_gz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        if is_gzip(&head[..got]) {
            let mut compressed = Vec::new();
            file.seek(SeekFrom::Start(0))
                .and_then(|_| file.read_to_end(&mut compressed))
                .map_err(|e| Error::io(path, e))?;
            let bytes = gunzip(&compressed, path)?;
            return Pack::from_bytes(bytes, path);
        }
        if named_gz && head[..got] != MAGIC[..got] {
            return Err(Error::bad_file(
                path,
                "ends in .gz but is not gzip-compressed (and not a plain pack either): pass \
                 the file written by `gzip` or by `pwself-engine prepare`",
            ));
        }
        // SAFETY: the map is read-only and lives as long as `Pack`; we rely on the file not
        // being truncated or rewritten in place while open (documented above). Every read
        // goes through slices checked against the validated layout.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let layout = parse(&map, path)?;
        Ok(Pack::assemble(Storage::Mmap(map), path, layout))
    }

    /// Validates `bytes` (a whole, uncompressed pack file) and keeps them in memory.
    /// `origin` is the path that error messages and [`Pack::origin`] name.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Pack> {
        let layout = parse(&bytes, origin)?;
        Ok(Pack::assemble(Storage::Owned(bytes), origin, layout))
    }

    /// Gunzips `compressed` (a gzip-compressed pack file) and validates it like
    /// [`Pack::from_bytes`].
    pub fn from_gz_bytes(compressed: &[u8], origin: &Path) -> Result<Pack> {
        let bytes = gunzip(compressed, origin)?;
        Pack::from_bytes(bytes, origin)
    }

    fn assemble(storage: Storage, origin: &Path, layout: Layout) -> Pack {
        Pack {
            storage,
            origin: origin.to_path_buf(),
            layout,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.layout.count
    }
    /// True when the pack holds no image.
    pub fn is_empty(&self) -> bool {
        self.layout.count == 0
    }
    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.layout.height
    }
    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.layout.width
    }
    /// Channels per pixel: 1 (grey) or 3 (RGB).
    pub fn channels(&self) -> usize {
        self.layout.channels
    }
    /// Bytes per image: `height * width * channels`.
    pub fn image_len(&self) -> usize {
        self.layout.image_len
    }
    /// Number of classes (every label is below it).
    pub fn num_classes(&self) -> usize {
        self.layout.class_names.len()
    }
    /// Class names, indexed by label.
    pub fn class_names(&self) -> &[String] {
        &self.layout.class_names
    }
    /// Image `i`: `height * width * channels` bytes, HWC (row-major, channels last).
    /// A slice of the memory map, never a copy.
    ///
    /// # Panics
    /// If `i >= len()` (a programming error, like slice indexing).
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            i < self.layout.count,
            "image index {i} out of range for a pack of {} images",
            self.layout.count
        );
        let start = self.layout.pixel_offset + i * self.layout.image_len;
        &self.storage.bytes()[start..start + self.layout.image_len]
    }
    /// All images back to back: `len() * image_len()` bytes.
    pub fn pixels(&self) -> &[u8] {
        let end = self.layout.pixel_offset + self.layout.count * self.layout.image_len;
        &self.storage.bytes()[self.layout.pixel_offset..end]
    }
    /// Label of image `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn label(&self, i: usize) -> u16 {
        self.layout.labels[i]
    }
    /// All labels, in image order.
    pub fn labels(&self) -> &[u16] {
        &self.layout.labels
    }
    /// How many images each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.layout.labels {
            counts[l as usize] += 1;
        }
        counts
    }
    /// Per-channel mean of pixel/255 over the whole pack (computed by the writer).
    pub fn mean(&self) -> &[f32] {
        &self.layout.mean
    }
    /// Per-channel population standard deviation of pixel/255 over the whole pack.
    pub fn std(&self) -> &[f32] {
        &self.layout.std
    }
    /// The path the pack was read from (or named after, for in-memory packs).
    pub fn origin(&self) -> &Path {
        &self.origin
    }
    /// A summary of this pack (what `prepare` prints).
    pub fn summary(&self) -> PackSummary {
        PackSummary {
            path: self.origin.clone(),
            count: self.layout.count,
            height: self.layout.height,
            width: self.layout.width,
            channels: self.layout.channels,
            class_names: self.layout.class_names.clone(),
            mean: self.layout.mean.clone(),
            std: self.layout.std.clone(),
        }
    }
}

/// What a written (or opened) pack holds: the line `prepare` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct PackSummary {
    /// Where the pack is.
    pub path: PathBuf,
    /// Number of images.
    pub count: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Channels per pixel.
    pub channels: usize,
    /// Class names, indexed by label.
    pub class_names: Vec<String>,
    /// Per-channel mean of pixel/255.
    pub mean: Vec<f32>,
    /// Per-channel std of pixel/255.
    pub std: Vec<f32>,
}

impl fmt::Display for PackSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[f32]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "{} images, {}x{}x{}, {} classes -> {} (mean [{}], std [{}])",
            self.count,
            self.height,
            self.width,
            self.channels,
            self.class_names.len(),
            self.path.display(),
            list(&self.mean),
            list(&self.std)
        )
    }
}

/// Writes a pack: create, push images one by one, finish. Pixels stream to a temporary
/// file beside the output (only labels are kept in memory); `finish` writes the header,
/// fsyncs, and renames the temporary file over the output. If the writer is dropped before
/// `finish`, or `finish` fails, the temporary file is removed: no partial pack is left.
pub struct PackWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    file: Option<BufWriter<File>>,
    height: usize,
    width: usize,
    channels: usize,
    class_names: Vec<String>,
    header_len: usize,
    labels: Vec<u16>,
    crc: crc32fast::Hasher,
    /// Per-channel sums of pixel values and of their squares: exact integers.
    sum: Vec<u64>,
    sum_sq: Vec<u64>,
    done: bool,
}

impl fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackWriter")
            .field("path", &self.path)
            .field("tmp_path", &self.tmp_path)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("channels", &self.channels)
            .field("num_classes", &self.class_names.len())
            .field("count", &self.labels.len())
            .finish()
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary files `.{name}.{pid}-{n}.tmp` in `dir` that a writer of `name` left
/// when its process was killed (SIGKILL gives it no chance to clean up): those whose process
/// no longer runs. A live process's file is left alone, and so is everything on a system
/// without `/proc` to ask. Returns the files removed (each also said on stderr).
fn remove_stale_temps(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if !Path::new("/proc/self").exists() {
        return removed;
    }
    let prefix = format!(".{name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(prefix.as_str()))
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), counter.parse::<u64>()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if fs::remove_file(&path).is_ok() {
            eprintln!(
                "removed {}: a temporary file left by a writer that was killed (process {pid} has ended)",
                path.display()
            );
            removed.push(path);
        }
    }
    removed
}

impl PackWriter {
    /// Starts a pack at `path` for images of `height x width x channels` (channels 1 or 3)
    /// and the given class names (labels index them). Nothing appears at `path` until
    /// [`PackWriter::finish`] succeeds.
    pub fn create(
        path: impl AsRef<Path>,
        height: usize,
        width: usize,
        channels: usize,
        class_names: &[impl AsRef<str>],
    ) -> Result<PackWriter> {
        let path = path.as_ref();
        let cfg = |field: &str, reason: String| Error::bad_config(field, reason);
        if channels != 1 && channels != 3 {
            return Err(cfg(
                "channels",
                format!("{channels} channels: a pack holds 1 (grey) or 3 (RGB); pass 1 or 3"),
            ));
        }
        if height == 0 || width == 0 || height > u32::MAX as usize || width > u32::MAX as usize {
            return Err(cfg(
                "image size",
                format!("{height}x{width}: each side must be 1..={}", u32::MAX),
            ));
        }
        if class_names.is_empty() || class_names.len() > MAX_CLASSES {
            return Err(cfg(
                "class names",
                format!(
                    "{} classes: a pack holds 1..={MAX_CLASSES}",
                    class_names.len()
                ),
            ));
        }
        let class_names: Vec<String> = class_names.iter().map(|n| n.as_ref().to_string()).collect();
        if let Some(n) = class_names.iter().find(|n| n.len() > u16::MAX as usize) {
            return Err(cfg(
                "class names",
                format!(
                    "a class name is {} bytes long, over the {} limit: shorten it",
                    n.len(),
                    u16::MAX
                ),
            ));
        }
        let header_len = header_len(channels, &class_names)
            .filter(|&h| h <= u32::MAX as usize)
            .ok_or_else(|| cfg("class names", "too many bytes of class names".into()))?;
        let pixel_offset = align_up(header_len)
            .ok_or_else(|| cfg("class names", "too many bytes of class names".into()))?;

        if path.is_dir() {
            return Err(Error::bad_file(
                path,
                "is a directory: pass a file path for the pack, e.g. out/train.pwpack",
            ));
        }
        let file_name = path.file_name().ok_or_else(|| {
            Error::bad_file(
                path,
                "has no file name: pass a file path such as out/train.pwpack",
            )
        })?;
        let dir = parent_dir(path);
        if !dir.is_dir() {
            return Err(Error::bad_file(
                path,
                format!(
                    "cannot be written: the directory {} does not exist; create it first",
                    dir.display()
                ),
            ));
        }
        remove_stale_temps(&dir, &file_name.to_string_lossy());
        let tmp_path = dir.join(format!(
            ".{}.{}-{}.tmp",
            file_name.to_string_lossy(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "cannot be written: creating the temporary file {} failed ({e}); \
                         check that the folder is writable, or choose another --out",
                        tmp_path.display()
                    ),
                )
            })?;
        let mut writer = PackWriter {
            path: path.to_path_buf(),
            tmp_path,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            height,
            width,
            channels,
            class_names,
            header_len,
            labels: Vec::new(),
            crc: crc32fast::Hasher::new(),
            sum: vec![0; channels],
            sum_sq: vec![0; channels],
            done: false,
        };
        // Reserve the header and padding; the header is written by `finish`.
        let zeros = vec![0u8; pixel_offset];
        writer.write(&zeros)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self.file.as_mut() {
            Some(f) => f
                .write_all(bytes)
                .map_err(|e| write_failed(&self.path, &self.tmp_path, e)),
            None => Err(Error::bad_file(
                &self.path,
                "pack writer used after a failed write: start again",
            )),
        }
    }

    /// Bytes each pushed image must have: `height * width * channels`.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Number of images pushed so far.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when no image was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends one image (`height * width * channels` bytes, HWC) with its label
    /// (below the number of class names).
    pub fn push(&mut self, image: &[u8], label: u16) -> Result<()> {
        if image.len() != self.image_len() {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "image {} has {} bytes but this pack holds {}x{}x{} = {} bytes per image: \
                     resize or convert the source image",
                    self.labels.len(),
                    image.len(),
                    self.height,
                    self.width,
                    self.channels,
                    self.image_len()
                ),
            ));
        }
        if label as usize >= self.class_names.len() {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "image {} has label {label} but there are only {} class names: pass the \
                     full list of classes",
                    self.labels.len(),
                    self.class_names.len()
                ),
            ));
        }
        self.write(image)?;
        self.crc.update(image);
        if self.channels == 1 {
            let (s, q) = image.iter().fold((0u64, 0u64), |(s, q), &p| {
                (s + p as u64, q + (p as u64) * (p as u64))
            });
            self.sum[0] += s;
            self.sum_sq[0] += q;
        } else {
            for px in image.chunks_exact(self.channels) {
                for (c, &p) in px.iter().enumerate() {
                    self.sum[c] += p as u64;
                    self.sum_sq[c] += (p as u64) * (p as u64);
                }
            }
        }
        self.labels.push(label);
        Ok(())
    }

    /// Per-channel mean and std of pixel/255 over the images pushed so far.
    fn stats(&self) -> (Vec<f32>, Vec<f32>) {
        let n = (self.labels.len() * self.height * self.width) as u128;
        if n == 0 {
            return (vec![0.0; self.channels], vec![0.0; self.channels]);
        }
        let mut mean = Vec::with_capacity(self.channels);
        let mut std = Vec::with_capacity(self.channels);
        for c in 0..self.channels {
            let s = self.sum[c] as u128;
            let q = self.sum_sq[c] as u128;
            // Exact integer variance numerator: n*q - s^2 = n^2 * var(pixel).
            let num = (n * q).saturating_sub(s * s) as f64;
            let n = n as f64;
            mean.push((s as f64 / n / 255.0) as f32);
            std.push(((num / (n * n)).sqrt() / 255.0) as f32);
        }
        (mean, std)
    }

    fn header_bytes(&self, payload_crc: u32) -> Vec<u8> {
        let (mean, std) = self.stats();
        let mut h = Vec::with_capacity(self.header_len);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.header_len as u32).to_le_bytes());
        h.extend_from_slice(&(self.labels.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.height as u32).to_le_bytes());
        h.extend_from_slice(&(self.width as u32).to_le_bytes());
        h.extend_from_slice(&(self.channels as u32).to_le_bytes());
        h.extend_from_slice(&(self.class_names.len() as u32).to_le_bytes());
        for v in mean.iter().chain(&std) {
            h.extend_from_slice(&v.to_le_bytes());
        }
        for n in &self.class_names {
            h.extend_from_slice(&(n.len() as u16).to_le_bytes());
            h.extend_from_slice(n.as_bytes());
        }
        h.extend_from_slice(&payload_crc.to_le_bytes());
        let hcrc = crc32fast::hash(&h);
        h.extend_from_slice(&hcrc.to_le_bytes());
        debug_assert_eq!(h.len(), self.header_len);
        h
    }

    /// Appends the labels, writes the header, fsyncs, renames the temporary file to the
    /// output path and fsyncs the directory.
    pub fn finish(self) -> Result<()> {
        self.finish_with_summary().map(|_| ())
    }

    /// Like [`PackWriter::finish`], and returns what the pack holds.
    pub fn finish_with_summary(mut self) -> Result<PackSummary> {
        if self.labels.is_empty() {
            return Err(Error::bad_file(
                &self.path,
                "no images were written, so no pack was made: check that the source holds \
                 images (and --limit is not 0)",
            ));
        }
        let label_bytes: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        self.write(&label_bytes)?;
        self.crc.update(&label_bytes);
        let payload_crc = self.crc.clone().finalize();
        let header = self.header_bytes(payload_crc);
        let tmp = self.tmp_path.clone();
        let buf = self
            .file
            .take()
            .ok_or_else(|| Error::bad_file(&self.path, "pack writer already failed"))?;
        let mut file = buf
            .into_inner()
            .map_err(|e| write_failed(&self.path, &tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .map_err(|e| write_failed(&self.path, &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(|e| {
            Error::bad_file(
                &self.path,
                format!(
                    "cannot be replaced by the finished pack {} ({e}): check that the folder \
                     is writable, or choose another --out",
                    tmp.display()
                ),
            )
        })?;
        self.done = true;
        let dir = parent_dir(&self.path);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&dir, e))?;
        let (mean, std) = self.stats();
        Ok(PackSummary {
            path: self.path.clone(),
            count: self.labels.len(),
            height: self.height,
            width: self.width,
            channels: self.channels,
            class_names: self.class_names.clone(),
            mean,
            std,
        })
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.done {
            self.file = None;
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// The error of a failed write to `tmp`, the temporary file of the pack at `path` (the
/// writer removes `tmp` when dropped, so nothing is left behind).
fn write_failed(path: &Path, tmp: &Path, e: std::io::Error) -> Error {
    Error::bad_file(
        path,
        format!(
            "cannot be written: writing {} failed ({e}); nothing was left behind: free some \
             disk space or choose another --out, then run prepare again",
            tmp.display()
        ),
    )
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gunzip_refuses_output_past_its_cap_and_keeps_what_fits() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 3 << 20]).unwrap();
        let bytes = gz.finish().unwrap();
        assert!(
            bytes.len() < 20_000,
            "3 MiB of zeros compress to {} bytes",
            bytes.len()
        );
        let origin = Path::new("bomb.gz");
        assert_eq!(
            super::gunzip_capped(&bytes, origin, 3 << 20).unwrap().len(),
            3 << 20
        );
        let e = super::gunzip_capped(&bytes, origin, 2 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bomb.gz") && e.contains("gunzip it yourself"),
            "{e}"
        );
    }

    #[test]
    fn a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("pwself-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // pid_max is at most 2^22 on Linux: this process cannot exist.
        let dead = dir.join(".out.pwpack.4294967295-0.tmp");
        let live = dir.join(format!(".out.pwpack.{}-7.tmp", std::process::id()));
        let other = dir.join(".other.pwpack.4294967295-0.tmp");
        for p in [&dead, &live, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let removed = super::remove_stale_temps(&dir, "out.pwpack");
        if Path::new("/proc/self").exists() {
            assert_eq!(removed, vec![dead.clone()]);
            assert!(!dead.exists());
        }
        assert!(live.exists(), "a running process's file is kept");
        assert!(other.exists(), "another output's file is kept");
        fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("c{i}")).collect()
    }

    /// A pack of `n` RGB 3x5 images whose pixel values are a known function of position.
    fn write_rgb(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("p.pwpack");
        let mut w = PackWriter::create(&path, 3, 5, 3, &names(4)).unwrap();
        for i in 0..n {
            let img: Vec<u8> = (0..45).map(|j| ((i * 7 + j * 3) % 256) as u8).collect();
            w.push(&img, (i % 4) as u16).unwrap();
        }
        w.finish().unwrap();
        path
    }

    #[test]
    fn round_trip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_rgb(dir.path(), 11);
        let bytes = fs::read(&path).unwrap();
        // Layout by hand: fixed 40 + 24 stats + 4 names of 2+2 bytes + 8 CRCs = 88 -> 128.
        assert_eq!(&bytes[..8], b"PWSPACK\0");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 88);
        assert_eq!(bytes.len(), 128 + 11 * 45 + 22);
        assert_eq!(bytes[128 + 45], 7); // image 1, pixel byte 0: (1*7 + 0*3) % 256
        let p = Pack::open(&path).unwrap();
        assert_eq!(
            (p.len(), p.height(), p.width(), p.channels()),
            (11, 3, 5, 3)
        );
        assert_eq!(p.class_names(), names(4).as_slice());
        for i in 0..11 {
            let want: Vec<u8> = (0..45).map(|j| ((i * 7 + j * 3) % 256) as u8).collect();
            assert_eq!(p.image(i), want.as_slice());
            assert_eq!(p.label(i), (i % 4) as u16);
        }
        assert_eq!(p.class_counts(), vec![3, 3, 3, 2]);
        // Only the output file is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn mean_std_match_a_naive_two_pass_computation() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_rgb(dir.path(), 9);
        let p = Pack::open(&path).unwrap();
        for c in 0..3 {
            let xs: Vec<f64> = p
                .pixels()
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| v as f64 / 255.0)
                .collect();
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
            assert!((p.mean()[c] as f64 - m).abs() < 1e-6);
            assert!((p.std()[c] as f64 - v.sqrt()).abs() < 1e-6);
        }
    }

    #[test]
    fn gz_and_from_bytes_give_the_same_pack() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_rgb(dir.path(), 5);
        let raw = fs::read(&path).unwrap();
        let gz_path = dir.path().join("p.pwpack.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&raw).unwrap();
        fs::write(&gz_path, enc.finish().unwrap()).unwrap();
        let a = Pack::open(&path).unwrap();
        let b = Pack::open(&gz_path).unwrap();
        let c = Pack::from_bytes(raw, Path::new("mem")).unwrap();
        assert_eq!(a.pixels(), b.pixels());
        assert_eq!(a.pixels(), c.pixels());
        assert_eq!(a.labels(), b.labels());
        assert_eq!(c.origin(), Path::new("mem"));
    }

    #[test]
    fn dropped_or_failed_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pwpack");
        {
            let mut w = PackWriter::create(&path, 2, 2, 1, &names(2)).unwrap();
            w.push(&[1, 2, 3, 4], 0).unwrap();
            assert!(w.push(&[1, 2, 3], 0).is_err());
            assert!(w.push(&[1, 2, 3, 4], 2).is_err());
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let w = PackWriter::create(&path, 2, 2, 1, &names(2)).unwrap();
        assert!(w.finish().is_err(), "an empty pack is refused");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn pack_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pack>();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Any shape, class list and label sequence reads back exactly as pushed.
        #[test]
        fn any_shape_round_trips(
            h in 1usize..9, w in 1usize..9, grey in proptest::bool::ANY, k in 1usize..70,
            n in 1usize..20, seed in 0u64..1000,
        ) {
            let c = if grey { 1 } else { 3 };
            let class_names: Vec<String> = (0..k).map(|i| "x".repeat(i % 5)).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r.pwpack");
            let mut wr = PackWriter::create(&path, h, w, c, &class_names).unwrap();
            let img = |i: usize| -> Vec<u8> {
                (0..h * w * c).map(|j| ((j as u64 * 2654435761 + i as u64 * 97 + seed) % 251) as u8).collect()
            };
            let lab = |i: usize| ((i as u64 * 31 + seed) % k as u64) as u16;
            for i in 0..n {
                wr.push(&img(i), lab(i)).unwrap();
            }
            wr.finish().unwrap();
            let p = Pack::open(&path).unwrap();
            proptest::prop_assert_eq!((p.len(), p.height(), p.width(), p.channels()), (n, h, w, c));
            proptest::prop_assert_eq!(p.class_names(), class_names.as_slice());
            proptest::prop_assert_eq!(p.pixels().as_ptr() as usize % PAYLOAD_ALIGN, 0);
            for i in 0..n {
                let want = img(i);
                proptest::prop_assert_eq!(p.image(i), want.as_slice());
                proptest::prop_assert_eq!(p.label(i), lab(i));
            }
        }
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_rgb(dir.path(), 3);
        let raw = fs::read(&path).unwrap();
        let hlen = 88;
        for at in (0..raw.len()).filter(|&a| !(hlen..128).contains(&a)) {
            let mut b = raw.clone();
            b[at] ^= 0x10;
            let r = Pack::from_bytes(b, Path::new("flip.pwpack"));
            assert!(r.is_err(), "flip at byte {at} was not caught");
        }
        // Every truncation too.
        for len in 0..raw.len() {
            assert!(Pack::from_bytes(raw[..len].to_vec(), Path::new("t")).is_err());
        }
    }
}
