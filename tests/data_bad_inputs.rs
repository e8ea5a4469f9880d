//! Bad inputs: every one must give an error that names the file and the problem (never a
//! panic), and `prepare` must leave no output file behind (not even a temporary one).

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use pwself_engine::data::cifar;
use pwself_engine::data::folder::{self, FolderOptions};
use pwself_engine::data::idx;
use pwself_engine::data::{Pack, PackWriter, Subset};

/// A fresh directory for outputs, checked empty after a failed prepare.
struct OutDir(tempfile::TempDir);

impl OutDir {
    fn new() -> OutDir {
        OutDir(tempfile::tempdir().unwrap())
    }
    fn pack(&self) -> PathBuf {
        self.0.path().join("out.pwpack")
    }
    fn assert_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
    }
}

/// Asserts `msg` names `path` (its file name at least) and contains every one of `words`.
fn assert_says(msg: &str, path: &Path, words: &[&str]) {
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(msg.contains(&*name), "error does not name {name}: {msg}");
    for w in words {
        assert!(msg.contains(w), "error does not say {w:?}: {msg}");
    }
}

/// A valid grey pack of 6 images of 4x4 with 3 classes; returns its bytes too.
fn good_pack(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("good.pwpack");
    let mut w = PackWriter::create(&path, 4, 4, 1, &["a", "b", "c"]).unwrap();
    for i in 0..6u8 {
        w.push(&[i * 10; 16], (i % 3) as u16).unwrap();
    }
    w.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn header_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize
}

fn open_err(path: &Path) -> String {
    Pack::open(path).unwrap_err().to_string()
}

#[test]
fn truncated_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, bytes) = good_pack(tmp.path());
    let cut = tmp.path().join("cut.pwpack");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let msg = open_err(&cut);
    assert_says(
        &msg,
        &cut,
        &[
            "truncated",
            &bytes.len().to_string(),
            &(bytes.len() - 5).to_string(),
            "re-run",
        ],
    );
    // Cut inside the header too.
    std::fs::write(&cut, &bytes[..30]).unwrap();
    assert_says(&open_err(&cut), &cut, &["truncated"]);
    // And an empty file.
    std::fs::write(&cut, b"").unwrap();
    assert_says(&open_err(&cut), &cut, &["empty"]);
    assert!(Pack::open(&path).is_ok());
}

#[test]
fn corrupted_payload_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut bytes) = good_pack(tmp.path());
    let p = tmp.path().join("flipped.pwpack");
    let first_pixel = header_len(&bytes).div_ceil(64) * 64;
    bytes[first_pixel + 17] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    assert_says(
        &open_err(&p),
        &p,
        &["corrupt", "payload checksum", "re-run"],
    );
}

#[test]
fn corrupted_label_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut bytes) = good_pack(tmp.path());
    let p = tmp.path().join("label.pwpack");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&p, &bytes).unwrap();
    assert_says(&open_err(&p), &p, &["payload checksum"]);
}

#[test]
fn corrupted_header() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut bytes) = good_pack(tmp.path());
    let p = tmp.path().join("header.pwpack");
    bytes[26] ^= 0x01; // the height field
    std::fs::write(&p, &bytes).unwrap();
    assert_says(&open_err(&p), &p, &["header", "checksum", "re-run"]);
}

#[test]
fn wrong_magic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("photo.pwpack");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n and then some more bytes of a png").unwrap();
    assert_says(&open_err(&p), &p, &["not a pwself-engine pack", "prepare"]);
    // A .gz name on something that is neither gzip nor a pack.
    let g = tmp.path().join("x.pwpack.gz");
    std::fs::write(&g, b"hello world").unwrap();
    assert_says(&open_err(&g), &g, &["not gzip"]);
    // Real gzip but cut short.
    let (_, bytes) = good_pack(tmp.path());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut e, &bytes).unwrap();
    let gz = e.finish().unwrap();
    std::fs::write(&g, &gz[..gz.len() / 2]).unwrap();
    assert_says(&open_err(&g), &g, &["gzip", "truncated or corrupt"]);
}

#[test]
fn future_version() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut bytes) = good_pack(tmp.path());
    let p = tmp.path().join("future.pwpack");
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert_says(
        &open_err(&p),
        &p,
        &["newer pwself-engine", "version 2", "upgrade"],
    );
}

fn idx_bytes(magic: u32, dims: &[u32], payload: usize) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend(std::iter::repeat(7u8).take(payload));
    b
}

/// A valid images/labels pair of `n` 2x2 images in `dir`.
fn idx_pair(dir: &Path, n: u32, labels_n: u32) -> (PathBuf, PathBuf) {
    let im = dir.join("imgs-idx3-ubyte");
    let lb = dir.join("labs-idx1-ubyte");
    std::fs::write(&im, idx_bytes(0x803, &[n, 2, 2], 4 * n as usize)).unwrap();
    std::fs::write(&lb, idx_bytes(0x801, &[labels_n], labels_n as usize)).unwrap();
    (im, lb)
}

#[test]
fn idx_with_wrong_magic() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 3, 3);
    std::fs::write(&im, idx_bytes(0x0000_0c03, &[3, 2, 2], 12)).unwrap();
    let msg = idx::prepare_idx(&im, &lb, None, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &im, &["0x00000c03", "0x00000803"]);
    out.assert_empty();
    // Images and labels swapped: the message says which flag each belongs to.
    let (im, lb) = idx_pair(src.path(), 3, 3);
    let msg = idx::prepare_idx(&lb, &im, None, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &lb, &["0x00000801", "--labels"]);
    out.assert_empty();
}

#[test]
fn idx_size_does_not_match_header() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 5, 5);
    // Header says 5 images of 2x2 = 20 bytes; only 17 are there.
    std::fs::write(&im, idx_bytes(0x803, &[5, 2, 2], 17)).unwrap();
    let msg = idx::prepare_idx(&im, &lb, None, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &im, &["17 bytes", "20 bytes", "5 images of 2x2"]);
    out.assert_empty();
}

#[test]
fn idx_image_and_label_counts_differ() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 5, 4);
    let msg = idx::prepare_idx(&im, &lb, None, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &im, &["4 labels", "5 images"]);
    assert_says(&msg, &lb, &[]);
    out.assert_empty();
}

#[test]
fn idx_label_without_a_class_name() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 2, 2); // labels are all 7
    let names = vec!["a".to_string(), "b".to_string()];
    let msg = idx::prepare_idx(&im, &lb, Some(names), &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &lb, &["is 7", "2 class names", "--classes"]);
    out.assert_empty();
}

#[test]
fn cifar_length_not_a_multiple_of_the_record() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let f = src.path().join("data_batch_1.bin");
    std::fs::write(&f, vec![0u8; 3073 * 2 + 100]).unwrap();
    let msg = cifar::prepare_cifar10(std::slice::from_ref(&f), &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &f, &["6246 bytes", "3073-byte record"]);
    out.assert_empty();
    // A CIFAR-100 file given to cifar10: the message suggests the other command.
    std::fs::write(&f, vec![0u8; 3074 * 3]).unwrap();
    let msg = cifar::prepare_cifar10(std::slice::from_ref(&f), &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &f, &["9222 bytes", "3073", "prepare cifar100"]);
    out.assert_empty();
    // A good first file and a bad second one: still nothing written.
    let good = src.path().join("data_batch_0.bin");
    std::fs::write(&good, vec![1u8; 3073]).unwrap();
    let msg = cifar::prepare_cifar10(&[good, f.clone()], &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &f, &["3073"]);
    out.assert_empty();
}

#[test]
fn empty_image_folder() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let opts = FolderOptions {
        side: 8,
        channels: 3,
    };
    let root = src.path().join("empty_root");
    std::fs::create_dir(&root).unwrap();
    let msg = folder::prepare_folder(&root, opts, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &root, &["no class subfolders"]);
    out.assert_empty();
    // A class folder with no image in it (only a text file).
    std::fs::create_dir(root.join("cats")).unwrap();
    std::fs::write(root.join("cats").join("readme.txt"), "x").unwrap();
    let msg = folder::prepare_folder(&root, opts, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(
        &msg,
        &root.join("cats"),
        &["no .png/.jpg/.jpeg image", "remove the folder"],
    );
    out.assert_empty();
}

#[test]
fn nonexistent_folder() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let root = src.path().join("no_such_dir");
    let opts = FolderOptions {
        side: 8,
        channels: 3,
    };
    let msg = folder::prepare_folder(&root, opts, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &root, &["does not exist"]);
    out.assert_empty();
}

#[test]
fn undecodable_image() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let root = src.path().join("root");
    std::fs::create_dir_all(root.join("a")).unwrap();
    // Enough good images before the bad one that pixels were already streamed out.
    for j in 0..40 {
        RgbImage::from_pixel(9, 9, Rgb([j, 2, 3]))
            .save(root.join("a").join(format!("{j:03}.png")))
            .unwrap();
    }
    let bad = root.join("a").join("999_garbage.png");
    std::fs::write(&bad, b"this is not a png at all, just text").unwrap();
    let opts = FolderOptions {
        side: 8,
        channels: 3,
    };
    let msg = folder::prepare_folder(&root, opts, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &bad, &["cannot be decoded", "re-encode", "remove it"]);
    out.assert_empty();
    // A truncated real PNG too.
    let png = std::fs::read(root.join("a").join("000.png")).unwrap();
    std::fs::write(&bad, &png[..png.len() / 2]).unwrap();
    let msg = folder::prepare_folder(&root, opts, &Subset::all(), &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &bad, &["cannot be decoded"]);
    out.assert_empty();
}

#[test]
fn subset_asking_for_too_much() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 3, 3);
    let subset = Subset {
        limit: Some(10),
        balanced: false,
    };
    let msg = idx::prepare_idx(&im, &lb, None, &subset, &out.pack())
        .unwrap_err()
        .to_string();
    assert_says(&msg, &im, &["--limit", "only 3"]);
    out.assert_empty();
}

#[test]
fn binary_reports_a_bad_input_without_panicking() {
    let src = tempfile::tempdir().unwrap();
    let out = OutDir::new();
    let (im, lb) = idx_pair(src.path(), 3, 3);
    std::fs::write(&im, b"garbage").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_pwself-engine"))
        .args(["prepare", "idx", "--images"])
        .arg(&im)
        .arg("--labels")
        .arg(&lb)
        .arg("--out")
        .arg(out.pack())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_says(&stderr, &im, &["0x67617262", "0x00000803"]); // "garb" read as the magic
    assert!(run.stdout.is_empty());
    out.assert_empty();
}
