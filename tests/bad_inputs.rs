//! Bad inputs through the binary, as a user meets them (issue 7, item 4): pack files cut
//! short, corrupted, of another version or with a header that lies about its sizes; IDX,
//! CIFAR and image-folder sources that lie or fail to decode; configuration files with
//! unknown keys, wrong types or impossible values; command-line values out of range.
//! Every one must exit non-zero without a panic, with a message naming the file or the
//! field and the fix, and leave no output behind (no pack, no temporary file, no run
//! folder). `tests/data_bad_inputs.rs` checks the same readers through the library; this
//! file fills the gaps and drives the built binary. Checkpoints are in `tests/reliability.rs`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{Rgb, RgbImage};
use pwself_engine::data::{Pack, PackWriter};

/// Runs `pwself-engine ARGS` (paths allowed) without backtraces.
fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_pwself-engine"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Asserts the run failed cleanly and its stderr mentions each of `words`; returns stderr.
fn assert_refused(out: &Output, what: &str, words: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} should fail: {err}");
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for w in words {
        assert!(
            err.contains(w),
            "{what}: stderr should mention {w:?}: {err}"
        );
    }
    err
}

/// Asserts nothing named after `out` is in its folder: not the file, not a temporary one.
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} was left behind", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    if let Ok(dir) = std::fs::read_dir(out.parent().unwrap()) {
        for e in dir {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !n.contains(&name) && !n.ends_with(".tmp"),
                "temporary file {n} was left beside {}",
                out.display()
            );
        }
    }
}

/// `s` as a path argument.
fn p(s: &Path) -> &OsStr {
    s.as_os_str()
}

// ---------------------------------------------------------------------------------------
// Pack files.

/// Field offsets of the version-1 pack header (see `src/data/pack.rs`).
const COUNT_AT: usize = 16;
const HEIGHT_AT: usize = 24;
const WIDTH_AT: usize = 28;
const CHANNELS_AT: usize = 32;
const CLASSES_AT: usize = 36;

/// A valid pack of 8 RGB 4x4 images with varied pixels (so views can be normalised) and
/// 2 classes; returns its path and bytes.
fn good_pack(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("good.pwpack");
    let mut w = PackWriter::create(&path, 4, 4, 3, &["a", "b"]).unwrap();
    for i in 0..8usize {
        let img: Vec<u8> = (0..48).map(|j| ((i * 31 + j * 7) % 256) as u8).collect();
        w.push(&img, (i % 2) as u16).unwrap();
    }
    w.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn header_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize
}

/// `bytes` with `field` overwritten at `at` and the header checksum recomputed, so only
/// the sizes (not the checksum) can reveal the lie.
fn forged(bytes: &[u8], at: usize, field: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + field.len()].copy_from_slice(field);
    let h = header_len(&b);
    let crc = crc32fast::hash(&b[..h - 4]);
    b[h - 4..h].copy_from_slice(&crc.to_le_bytes());
    b
}

/// `views` and `train` both refuse the pack at `bad` with `words`; `train` makes no run
/// folder.
fn pack_refused_by_the_binary(bad: &Path, words: &[&str]) {
    let name = bad.file_name().unwrap().to_str().unwrap();
    let out = run([
        OsStr::new("views"),
        OsStr::new("--data"),
        p(bad),
        OsStr::new("--batches"),
        OsStr::new("1"),
        OsStr::new("--batch"),
        OsStr::new("2"),
    ]);
    let mut all = vec![name];
    all.extend_from_slice(words);
    assert_refused(&out, &format!("views --data {name}"), &all);
    let run_dir = bad.parent().unwrap().join(format!("run-{name}"));
    let out = run([
        OsStr::new("train"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
        OsStr::new("--data"),
        p(bad),
        OsStr::new("--out"),
        p(&run_dir),
    ]);
    assert_refused(&out, &format!("train --data {name}"), &all);
    assert!(!run_dir.exists(), "train made {}", run_dir.display());
}

#[test]
fn pack_cut_anywhere_is_refused_as_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, bytes) = good_pack(tmp.path());
    let h = header_len(&bytes);
    let payload = h.div_ceil(64) * 64;
    let cuts = [
        ("inside the magic", 5),
        ("inside the version", 10),
        ("inside the header length", 14),
        ("inside the fixed header", 30),
        ("inside the class names", h - 12),
        ("inside the header checksum", h - 2),
        ("inside the padding", h + 1),
        ("at the first pixel", payload),
        ("inside the pixels", payload + 100),
        ("inside the labels", bytes.len() - 3),
    ];
    for (i, (what, at)) in cuts.into_iter().enumerate() {
        let cut = tmp.path().join(format!("cut{i}.pwpack"));
        std::fs::write(&cut, &bytes[..at]).unwrap();
        let msg = Pack::open(&cut).unwrap_err().to_string();
        for w in ["truncated", "re-run `pwself-engine prepare`"] {
            assert!(msg.contains(w), "cut {what} (at {at}): no {w:?}: {msg}");
        }
        // The binary for a few of them (each run costs a process start).
        if i % 3 == 0 {
            pack_refused_by_the_binary(&cut, &["truncated", "prepare"]);
        }
    }
}

#[test]
fn pack_with_a_corrupt_payload_or_wrong_magic_is_refused_by_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, bytes) = good_pack(tmp.path());
    let h = header_len(&bytes);
    let mut flipped = bytes.clone();
    flipped[h.div_ceil(64) * 64 + 40] ^= 0x04;
    let bad = tmp.path().join("flipped.pwpack");
    std::fs::write(&bad, &flipped).unwrap();
    pack_refused_by_the_binary(&bad, &["payload checksum mismatch", "re-run"]);

    let png = tmp.path().join("photo.pwpack");
    std::fs::write(
        &png,
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR and more bytes of a png",
    )
    .unwrap();
    pack_refused_by_the_binary(&png, &["not a pwself-engine pack", "prepare"]);

    let missing = tmp.path().join("missing.pwpack");
    pack_refused_by_the_binary(&missing, &["does not exist", "prepare"]);
    std::fs::create_dir(tmp.path().join("folder.pwpack")).unwrap();
    pack_refused_by_the_binary(&tmp.path().join("folder.pwpack"), &["is a directory"]);
}

#[test]
fn pack_of_another_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, bytes) = good_pack(tmp.path());
    for (version, words) in [
        (2u32, &["newer pwself-engine", "version 2", "upgrade"][..]),
        (u32::MAX, &["newer pwself-engine", "upgrade"][..]),
        (
            0,
            &["version 0", "no pwself-engine ever wrote", "re-run"][..],
        ),
    ] {
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let bad = tmp.path().join(format!("v{version}.pwpack"));
        std::fs::write(&bad, &b).unwrap();
        pack_refused_by_the_binary(&bad, words);
    }
}

#[test]
fn pack_header_that_lies_about_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, bytes) = good_pack(tmp.path());
    let lies: [(&str, usize, Vec<u8>, &[&str]); 9] = [
        (
            "more images than the file holds",
            COUNT_AT,
            1000u64.to_le_bytes().to_vec(),
            &["truncated", "1000 images of 4x4x3", "re-run"],
        ),
        (
            "fewer images than the file holds",
            COUNT_AT,
            7u64.to_le_bytes().to_vec(),
            &["unexpected trailing bytes", "re-run"],
        ),
        (
            "a count that overflows the label bytes",
            COUNT_AT,
            u64::MAX.to_le_bytes().to_vec(),
            &["sizes overflow", "re-run"],
        ),
        (
            "huge dimensions",
            HEIGHT_AT,
            [65536u32.to_le_bytes(), 65536u32.to_le_bytes()].concat(),
            &["truncated", "8 images of 65536x65536x3", "re-run"],
        ),
        (
            "dimensions whose product overflows",
            HEIGHT_AT,
            [u32::MAX.to_le_bytes(), u32::MAX.to_le_bytes()].concat(),
            &["sizes overflow", "re-run"],
        ),
        (
            "a zero height",
            HEIGHT_AT,
            0u32.to_le_bytes().to_vec(),
            &["malformed", "image size 0x4", "re-run"],
        ),
        (
            "a larger width",
            WIDTH_AT,
            5u32.to_le_bytes().to_vec(),
            &["truncated", "8 images of 4x5x3"],
        ),
        (
            "two channels",
            CHANNELS_AT,
            2u32.to_le_bytes().to_vec(),
            &["malformed", "2 channels; must be 1 or 3"],
        ),
        (
            "more classes than names",
            CLASSES_AT,
            70_000u32.to_le_bytes().to_vec(),
            &["malformed", "70000 classes"],
        ),
    ];
    for (i, (what, at, field, words)) in lies.iter().enumerate() {
        let name = format!("lie{i}.pwpack");
        let msg = Pack::from_bytes(forged(&bytes, *at, field), Path::new(&name))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&name), "{what}: {msg}");
        for w in *words {
            assert!(msg.contains(w), "{what}: no {w:?}: {msg}");
        }
    }
    // Huge dimensions and a huge count together: every product overflows usize.
    let b = forged(&bytes, COUNT_AT, &u64::MAX.to_le_bytes());
    let b = forged(&b, HEIGHT_AT, &u32::MAX.to_le_bytes());
    let b = forged(&b, WIDTH_AT, &u32::MAX.to_le_bytes());
    let bad = tmp.path().join("overflow.pwpack");
    std::fs::write(&bad, b).unwrap();
    pack_refused_by_the_binary(&bad, &["sizes overflow", "re-run"]);
    let bad = tmp.path().join("count.pwpack");
    std::fs::write(&bad, forged(&bytes, COUNT_AT, &1000u64.to_le_bytes())).unwrap();
    pack_refused_by_the_binary(&bad, &["truncated", "1000 images"]);
}

// ---------------------------------------------------------------------------------------
// IDX, CIFAR and image-folder sources through `prepare`.

fn idx_bytes(magic: u32, dims: &[u32], payload: usize) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend((0..payload).map(|i| (i % 3) as u8));
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap()
}

/// `prepare idx` of `images` and `labels` (bytes written to files of those names) fails
/// naming `blamed` (a file name) and `words`, and writes nothing.
fn idx_refused(files: (&[u8], &[u8]), names: (&str, &str), blamed: &str, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (im, lb) = (tmp.path().join(names.0), tmp.path().join(names.1));
    std::fs::write(&im, files.0).unwrap();
    std::fs::write(&lb, files.1).unwrap();
    let out_path = tmp.path().join("out.pwpack");
    let out = run([
        OsStr::new("prepare"),
        OsStr::new("idx"),
        OsStr::new("--images"),
        p(&im),
        OsStr::new("--labels"),
        p(&lb),
        OsStr::new("--out"),
        p(&out_path),
    ]);
    let mut all = vec![blamed];
    all.extend_from_slice(words);
    assert_refused(&out, &format!("prepare idx ({blamed})"), &all);
    assert_no_output(&out_path);
}

#[test]
fn idx_inputs_that_lie_about_their_sizes() {
    let images = idx_bytes(0x803, &[4, 3, 3], 36);
    let labels = idx_bytes(0x801, &[4], 4);
    let names = ("im-idx3-ubyte", "lb-idx1-ubyte");
    // Labels header says 10 but holds 4.
    let lying = idx_bytes(0x801, &[10], 4);
    idx_refused(
        (&images, &lying),
        names,
        "lb-idx1-ubyte",
        &["payload is 4 bytes", "10 labels", "download it again"],
    );
    // Image dimensions whose product overflows.
    let huge = idx_bytes(0x803, &[u32::MAX, u32::MAX, u32::MAX], 36);
    idx_refused(
        (&huge, &labels),
        names,
        "im-idx3-ubyte",
        &["more bytes than fit in memory", "download it again"],
    );
    // Cut inside the header.
    idx_refused(
        (&images[..10], &labels),
        names,
        "im-idx3-ubyte",
        &["truncated", "16-byte IDX header", "download it again"],
    );
    // Images of 0 rows.
    let flat = idx_bytes(0x803, &[4, 0, 3], 0);
    idx_refused(
        (&flat, &labels),
        names,
        "im-idx3-ubyte",
        &["0x3", "corrupt", "download it again"],
    );
    // A 4-dimensional IDX file given as images: the magic differs.
    let four = idx_bytes(0x804, &[4, 3, 3, 1], 36);
    idx_refused(
        (&four, &labels),
        names,
        "im-idx3-ubyte",
        &["0x00000804", "0x00000803", "idx3-ubyte"],
    );
    // Counts that differ between the two files.
    let three = idx_bytes(0x801, &[3], 3);
    idx_refused(
        (&images, &three),
        names,
        "lb-idx1-ubyte",
        &["3 labels", "4 images", "labels file that belongs"],
    );
    // No image at all.
    let none = idx_bytes(0x803, &[0, 3, 3], 0);
    let no_labels = idx_bytes(0x801, &[0], 0);
    idx_refused(
        (&none, &no_labels),
        names,
        "im-idx3-ubyte",
        &["holds no image", "at least one"],
    );
}

#[test]
fn idx_gzip_that_is_corrupt_or_cut_short() {
    let images = gzip(&idx_bytes(0x803, &[4, 3, 3], 36));
    let labels = gzip(&idx_bytes(0x801, &[4], 4));
    let names = ("im-idx3-ubyte.gz", "lb-idx1-ubyte.gz");
    idx_refused(
        (&images[..images.len() / 2], &labels),
        names,
        "im-idx3-ubyte.gz",
        &["gzip", "truncated or corrupt", "download or write it again"],
    );
    let mut flipped = labels.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    idx_refused(
        (&images, &flipped),
        names,
        "lb-idx1-ubyte.gz",
        &["gzip", "truncated or corrupt"],
    );
    // A gzip trailer whose size field lies (the size hint must not allocate gigabytes).
    let mut trailer = labels.clone();
    let n = trailer.len();
    trailer[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    idx_refused(
        (&images, &trailer),
        names,
        "lb-idx1-ubyte.gz",
        &["gzip", "truncated or corrupt"],
    );
}

/// A CIFAR file of `labels.len()` records of `label_bytes` label bytes each.
fn cifar_records(label_bytes: usize, labels: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    for (r, l) in labels.iter().enumerate() {
        assert_eq!(l.len(), label_bytes);
        b.extend_from_slice(l);
        b.extend((0..3072).map(|i| ((i + r * 5) % 256) as u8));
    }
    b
}

/// `prepare ARGS... FILE --out OUT` fails naming the file and `words`; nothing is written.
fn cifar_refused(command: &[&str], file: &str, bytes: &[u8], words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join(file);
    std::fs::write(&f, bytes).unwrap();
    let out_path = tmp.path().join("c.pwpack");
    let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
    args.extend([p(&f), OsStr::new("--out"), p(&out_path)]);
    let out = run(args);
    let mut all = vec![file];
    all.extend_from_slice(words);
    assert_refused(&out, &format!("{command:?} {file}"), &all);
    assert_no_output(&out_path);
}

#[test]
fn cifar_with_labels_out_of_range_or_a_bad_length() {
    let c10 = ["prepare", "cifar10"];
    let good = cifar_records(1, &[&[3], &[9]]);
    // Label 10 in CIFAR-10 (labels are 0..=9), in the second record.
    let bad = cifar_records(1, &[&[3], &[10]]);
    cifar_refused(
        &c10,
        "data_batch_1.bin",
        &bad,
        &["record 1 has label 10", "not below 10", "download it again"],
    );
    // CIFAR-100: fine label 100, then coarse label 20.
    let fine = cifar_records(2, &[&[0, 100]]);
    cifar_refused(
        &["prepare", "cifar100"],
        "train.bin",
        &fine,
        &["record 0 has label 100", "not below 100"],
    );
    let coarse = cifar_records(2, &[&[20, 5]]);
    cifar_refused(
        &["prepare", "cifar100", "--labels", "coarse"],
        "train.bin",
        &coarse,
        &["record 0 has label 20", "not below 20"],
    );
    // A length that is not a whole number of records: cut inside the last record.
    cifar_refused(
        &c10,
        "data_batch_2.bin",
        &good[..good.len() - 1],
        &["6145 bytes", "3073-byte record", "download it again"],
    );
    // Empty, gzip cut short, and missing.
    cifar_refused(
        &c10,
        "test_batch.bin",
        b"",
        &["is empty", "download it again"],
    );
    let gz = gzip(&good);
    cifar_refused(
        &c10,
        "data_batch_3.bin.gz",
        &gz[..gz.len() - 9],
        &["gzip", "truncated or corrupt"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("c.pwpack");
    let missing = tmp.path().join("data_batch_9.bin");
    let out = run([
        OsStr::new("prepare"),
        OsStr::new("cifar10"),
        p(&missing),
        OsStr::new("--out"),
        p(&out_path),
    ]);
    assert_refused(
        &out,
        "missing batch",
        &["data_batch_9.bin", "does not exist"],
    );
    assert_no_output(&out_path);
}

#[test]
fn cifar_class_names_file_with_the_wrong_count() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("data_batch_1.bin");
    std::fs::write(&f, cifar_records(1, &[&[1]])).unwrap();
    std::fs::write(tmp.path().join("batches.meta.txt"), "cat\ndog\n").unwrap();
    let out_path = tmp.path().join("c.pwpack");
    let out = run([
        OsStr::new("prepare"),
        OsStr::new("cifar10"),
        p(&f),
        OsStr::new("--out"),
        p(&out_path),
    ]);
    assert_refused(
        &out,
        "short batches.meta.txt",
        &[
            "batches.meta.txt",
            "2 class names",
            "10 are needed",
            "fix the file",
        ],
    );
    assert_no_output(&out_path);
}

/// `prepare folder ROOT --side SIDE --out OUT`.
fn prepare_folder(root: &Path, side: &str, out: &Path) -> Output {
    run([
        OsStr::new("prepare"),
        OsStr::new("folder"),
        p(root),
        OsStr::new("--side"),
        OsStr::new(side),
        OsStr::new("--out"),
        p(out),
    ])
}

fn save_rgb(path: &Path, w: u32, h: u32, seed: u8) {
    RgbImage::from_fn(w, h, |x, y| Rgb([seed, (x * 7) as u8, (y * 3) as u8]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder_with_an_image_that_fails_to_decode_midway() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    // 24 small images squashed to 256x256x3 (192 KiB each, 4.5 MiB in all) before the bad
    // one, so the writer has streamed megabytes (past its 1 MiB buffer) to its temporary
    // file when the bad image is reached.
    for j in 0..12u8 {
        save_rgb(&root.join("a").join(format!("{j:02}.png")), 16, 16, j);
        save_rgb(&root.join("b").join(format!("{j:02}.png")), 16, 16, j);
    }
    // A PNG whose header claims 60000x60000 pixels (10 GB decoded): refused by the
    // decoder's memory limit, never allocated.
    let small = tmp.path().join("small.png");
    save_rgb(&small, 2, 2, 9);
    let mut huge_png = std::fs::read(&small).unwrap();
    std::fs::remove_file(&small).unwrap();
    assert_eq!(&huge_png[12..16], b"IHDR");
    huge_png[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    huge_png[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32fast::hash(&huge_png[12..29]);
    huge_png[29..33].copy_from_slice(&crc.to_be_bytes());
    // An earlier pack at the output path must survive the failed run untouched.
    let out_path = tmp.path().join("folder.pwpack");
    let (_, old) = good_pack(tmp.path());
    std::fs::write(&out_path, &old).unwrap();
    for (name, bytes) in [
        ("zz_huge.png", &huge_png[..]),
        ("zz_garbage.jpg", &b"GIF89a, not a jpeg at all"[..]),
        (
            "zz_garbage.JPEG",
            &b"\xff\xd8\xff\xe0 a jpeg header and nothing else"[..],
        ),
        ("zz_empty.png", &b""[..]),
    ] {
        let bad = root.join("b").join(name);
        std::fs::write(&bad, bytes).unwrap();
        let out = prepare_folder(&root, "256", &out_path);
        assert_refused(
            &out,
            name,
            &[
                name,
                "cannot be decoded",
                "re-encode it as PNG or JPEG, or remove it",
            ],
        );
        assert_eq!(std::fs::read(&out_path).unwrap(), old, "old pack changed");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        std::fs::remove_file(&bad).unwrap();
    }
}

#[test]
fn image_folder_errors_and_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("f.pwpack");
    // A class folder whose only image is hidden (hidden files are never read).
    let root = tmp.path().join("hidden");
    std::fs::create_dir_all(root.join("cats")).unwrap();
    save_rgb(&root.join("cats").join(".secret.png"), 8, 8, 1);
    let out = prepare_folder(&root, "8", &out_path);
    assert_refused(
        &out,
        "hidden only",
        &[
            "cats",
            "no .png/.jpg/.jpeg image",
            "add images or remove the folder",
        ],
    );
    assert_no_output(&out_path);

    // A symbolic link back to the root: refused instead of recursing forever.
    #[cfg(unix)]
    {
        let root = tmp.path().join("looped");
        std::fs::create_dir_all(root.join("cats")).unwrap();
        save_rgb(&root.join("cats").join("0.png"), 8, 8, 1);
        std::os::unix::fs::symlink(&root, root.join("cats").join("again")).unwrap();
        let out = prepare_folder(&root, "8", &out_path);
        assert_refused(
            &out,
            "link loop",
            &["again", "symbolic-link loop", "remove the link"],
        );
        assert_no_output(&out_path);
    }

    // Out-of-range flags, checked before anything is read.
    let out = prepare_folder(&root, "0", &out_path);
    assert_refused(&out, "--side 0", &["--side", "from 1 to 16384"]);
    let out = run([
        OsStr::new("prepare"),
        OsStr::new("folder"),
        p(&root),
        OsStr::new("--side"),
        OsStr::new("8"),
        OsStr::new("--channels"),
        OsStr::new("2"),
        OsStr::new("--out"),
        p(&out_path),
    ]);
    assert_refused(
        &out,
        "--channels 2",
        &["--channels", "pass 1 (grey) or 3 (RGB)"],
    );
    assert_no_output(&out_path);

    // Warnings, not errors: mixed sizes are squashed; a text file in a class folder and an
    // image loose in the root are skipped, and stderr says so.
    let root = tmp.path().join("mixed");
    std::fs::create_dir_all(root.join("cats")).unwrap();
    std::fs::create_dir_all(root.join("dogs")).unwrap();
    save_rgb(&root.join("cats").join("0.png"), 30, 10, 1);
    save_rgb(&root.join("dogs").join("0.png"), 5, 41, 2);
    std::fs::write(root.join("dogs").join("notes.txt"), "x").unwrap();
    save_rgb(&root.join("loose.png"), 8, 8, 3);
    let out = prepare_folder(&root, "8", &out_path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("skipped 2 file(s)") && err.contains("loose.png"),
        "{err}"
    );
    let pack = Pack::open(&out_path).unwrap();
    assert_eq!((pack.len(), pack.height(), pack.width()), (2, 8, 8));
}

#[test]
fn prepare_output_path_that_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let im = tmp.path().join("im");
    let lb = tmp.path().join("lb");
    std::fs::write(&im, idx_bytes(0x803, &[2, 2, 2], 8)).unwrap();
    std::fs::write(&lb, idx_bytes(0x801, &[2], 2)).unwrap();
    let prepare = |out: &Path| {
        run([
            OsStr::new("prepare"),
            OsStr::new("idx"),
            OsStr::new("--images"),
            p(&im),
            OsStr::new("--labels"),
            p(&lb),
            OsStr::new("--out"),
            p(out),
        ])
    };
    let out_path = tmp.path().join("ok.pwpack");
    let limit = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = ["prepare", "idx", "--images"].map(OsStr::new).to_vec();
        args.extend([p(&im), OsStr::new("--labels"), p(&lb)]);
        args.extend([OsStr::new("--out"), p(&out_path)]);
        args.extend(extra.iter().map(OsStr::new));
        run(args)
    };
    assert_refused(
        &limit(&["--limit", "0"]),
        "--limit 0",
        &["--limit", "is 0", "pass at least 1"],
    );
    assert_refused(
        &limit(&["--limit", "3"]),
        "--limit 3",
        &["--limit", "only 2", "at most 2"],
    );
    assert_no_output(&out_path);
    let nowhere = tmp.path().join("no_such_dir").join("x.pwpack");
    assert_refused(
        &prepare(&nowhere),
        "missing folder",
        &["x.pwpack", "no_such_dir does not exist", "create it first"],
    );
    assert!(!tmp.path().join("no_such_dir").exists());
    let dir = tmp.path().join("a_dir");
    std::fs::create_dir(&dir).unwrap();
    assert_refused(
        &prepare(&dir),
        "folder as --out",
        &["a_dir", "is a directory", "e.g. out/train.pwpack"],
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------
// Configuration files and command-line values.

/// `train --config FILE` with `toml` as the file is refused with `words`; the run folder
/// is not created.
fn config_refused(toml: &str, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, toml).unwrap();
    let run_dir = tmp.path().join("run");
    let out = run([
        OsStr::new("train"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
        OsStr::new("--config"),
        p(&cfg),
        OsStr::new("--out"),
        p(&run_dir),
    ]);
    assert_refused(&out, &format!("config {toml:?}"), words);
    assert!(!run_dir.exists(), "config {toml:?} made the run folder");
}

#[test]
fn config_files_with_unknown_keys_or_wrong_types() {
    // Unknown keys: a section, a key in a section.
    config_refused(
        "[trainer]\nbatch = 3\n",
        &[
            "job.toml",
            "line 1",
            "unknown field `trainer`",
            "expected one of",
        ],
    );
    config_refused(
        "[views]\nlocal_sides = 12\n",
        &[
            "job.toml",
            "line 2",
            "unknown field `local_sides`",
            "local_side",
        ],
    );
    // Wrong types.
    config_refused(
        "[run]\nepochs = \"ten\"\n",
        &["job.toml", "line 2", "expected usize"],
    );
    config_refused(
        "[run]\nbatch = -1\n",
        &["job.toml", "line 2", "invalid value: integer `-1`"],
    );
    config_refused(
        "[views]\nglobal_scale = [0.4]\n",
        &["job.toml", "line 2", "array of length 2"],
    );
    config_refused(
        "[views]\npreset = \"small64\"\n",
        &["job.toml", "unknown variant `small64`", "small28"],
    );
    config_refused(
        "[loss]\nkind = \"pwll\"\n",
        &["job.toml", "line 2", "kind = { pwll = { lambda = 0.5 } }"],
    );
    config_refused("[run\nbatch = 3\n", &["job.toml", "line 1"]);
    config_refused(
        "[run]\nbatch = 8\n[run]\nbatch = 9\n",
        &["job.toml", "duplicate key `run`"],
    );
    // Not UTF-8, missing.
    let tmp = tempfile::tempdir().unwrap();
    let latin1 = tmp.path().join("latin1.toml");
    std::fs::write(&latin1, b"[run]\n# caf\xe9\n").unwrap();
    let out = run([
        OsStr::new("train"),
        OsStr::new("--config"),
        p(&latin1),
        OsStr::new("--out"),
        p(&tmp.path().join("r")),
    ]);
    assert_refused(
        &out,
        "latin-1",
        &["latin1.toml", "not UTF-8", "save it as UTF-8"],
    );
    let out = run([
        OsStr::new("train"),
        OsStr::new("--config"),
        p(&tmp.path().join("nope.toml")),
    ]);
    assert_refused(
        &out,
        "missing",
        &["nope.toml", "does not exist", "--config"],
    );
}

#[test]
fn config_files_with_impossible_values() {
    let cases: [(&str, &[&str]); 22] = [
        ("[optim]\nlr = -0.5\n", &["optim.lr", "-0.5", ">= 0"]),
        ("[optim]\nlr = nan\n", &["optim.lr", "NaN", "finite"]),
        ("[run]\nbatch = 0\n", &["run.batch", "at least 1"]),
        ("[run]\nepochs = 0\n", &["run.epochs", "at least 1"]),
        ("[run]\nmax_steps = 0\n", &["run.max_steps", "at least 1"]),
        ("[run]\nthreads = 0\n", &["threads", "at least 1"]),
        (
            "[model]\npatch = 5\n",
            &[
                "views.global_side",
                "not divisible by the patch size 5",
                "multiple of 5",
            ],
        ),
        ("[model]\npatch = 0\n", &["patch", "at least 1 pixel"]),
        (
            "[views]\nlocal_side = 0\n",
            &[
                "views.local_side",
                "0 pixels",
                "positive multiple of the patch size 4",
            ],
        ),
        (
            "[views]\nglobal_side = 8192\n",
            &["views.global_side", "2048 patches", "at most 4092"],
        ),
        (
            "[views]\nglobal_views = 0\n",
            &["views.global_views", "pass at least 1"],
        ),
        (
            "[views]\nlocal_views = 5000\n",
            &["views.local_views", "at most 4096"],
        ),
        (
            "[views]\nlocal_scale = [0.4, 0.05]\n",
            &["views.local_scale", "0 < min <= max <= 1", "0.05,0.4"],
        ),
        (
            "[views]\nglobal_scale = [0.4, 1.5]\n",
            &["views.global_scale", "(0, 1]"],
        ),
        (
            "[views]\nglobal_scale = [0.0, 1.0]\n",
            &["views.global_scale", "(0, 1]"],
        ),
        (
            "[loss]\nteacher_temp = 0.0\n",
            &["loss.teacher_temp", "positive"],
        ),
        (
            "[loss]\nteacher_temp = -0.04\n",
            &["loss.teacher_temp", "positive"],
        ),
        (
            "[loss]\nkind = { pwll = { lambda = 3.0 } }\n",
            &["loss.lambda", "[0, 1]"],
        ),
        ("[head]\nout_dim = 0\n", &["head", "out_dim", "at least 1"]),
        ("[model]\ndrop_path = 1.0\n", &["model.drop_path", "[0, 1)"]),
        (
            "[model]\ndrop_path = -0.1\n",
            &["model.drop_path", "[0, 1)"],
        ),
        (
            "[optim]\nmomentum_teacher = 1.5\n",
            &["optim.momentum_teacher", "[0, 1]"],
        ),
    ];
    for (toml, words) in cases {
        config_refused(toml, words);
    }
    config_refused(
        "[model]\nembed_dim = 100\nheads = 3\n",
        &["model.heads", "not divisible by 3 heads"],
    );
}

/// `pwself-engine ARGS` is refused with `words`; for `train`, its `--out` is not created.
fn cli_refused(args: &[&str], words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    if args[0] == "train" {
        all.extend([OsStr::new("--device"), OsStr::new("cpu")]);
        all.extend([OsStr::new("--out"), p(&run_dir)]);
    }
    assert_refused(&run(all), &args.join(" "), words);
    assert!(!run_dir.exists(), "{args:?} made the run folder");
}

#[test]
fn command_line_values_out_of_range() {
    let views = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["views", "--batches", "1"];
        v.extend_from_slice(extra);
        v
    };
    cli_refused(&views(&["--batch", "0"]), &["--batch", "at least 1"]);
    cli_refused(
        &views(&["--view-sides", "28,0"]),
        &["--view-sides", "0 pixels", "positive multiple"],
    );
    cli_refused(
        &views(&["--view-sides", "8192,12"]),
        &["--view-sides", "at most 4092"],
    );
    // 1024 x 1024 patches overflow the 20-bit patch index of per-patch augmentation.
    cli_refused(
        &views(&["--view-sides", "4096,12"]),
        &["--view-sides", "1024 patches", "at most 4092"],
    );
    cli_refused(
        &views(&["--view-sides", "28,-12"]),
        &["--view-sides", "not a number"],
    );
    cli_refused(&views(&["--threads", "0"]), &["--threads", "at least 1"]);
    cli_refused(&views(&["--patch", "0"]), &["--patch", "at least 1 pixel"]);
    cli_refused(
        &views(&["--local-views", "5000"]),
        &["--local-views", "at most 4096"],
    );
    cli_refused(
        &views(&["--global-scale", "1,0.4"]),
        &["--global-scale", "0 < min <= max <= 1"],
    );

    cli_refused(
        &["train", "--loss", "pwll", "--lambda", "2"],
        &["lambda", "[0, 1]"],
    );
    cli_refused(
        &["train", "--loss", "pwll", "--lambda", "NaN"],
        &["lambda", "[0, 1]"],
    );
    cli_refused(&["train", "--threads", "0"], &["--threads", "at least 1"]);
    cli_refused(&["train", "--patch", "0"], &["--patch", "at least 1 pixel"]);
    cli_refused(&["train", "--epochs", "0"], &["--epochs", "at least 1"]);
    cli_refused(
        &["train", "--max-steps", "0"],
        &["--max-steps", "at least 1"],
    );
    cli_refused(&["train", "--out-dim", "0"], &["out_dim", "at least 1"]);
    cli_refused(&["train", "--lr=-1"], &["optim.lr", ">= 0"]);
    cli_refused(
        &["train", "--view-sides", "28,0"],
        &["--view-sides", "positive multiple"],
    );
    cli_refused(
        &["train", "--global-views", "0"],
        &["--global-views", "at least 1"],
    );
    cli_refused(
        &["train", "--batch", "20000"],
        &["--batch", "20000", "10000 training images"],
    );
    cli_refused(&["train", "--batch=-3"], &["--batch", "-3"]);

    cli_refused(
        &[
            "match", "--patch", "0", "--box1", "0,0,9,9", "--box2", "0,0,9,9",
        ],
        &["--patch", "at least 1"],
    );
    // Found by the matching fuzz target: 65,536 patches per side overflowed the u32 token
    // number (a silent wrong answer in release builds).
    cli_refused(
        &[
            "match",
            "--image",
            "65536x65536",
            "--patch",
            "1",
            "--view-sides",
            "65536,1",
            "--box1",
            "0,0,65536,65536",
            "--box2",
            "65535,65535,1,1",
        ],
        &["--view-sides", "65536 patches per side", "larger patch"],
    );
}
