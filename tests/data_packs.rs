//! Packs made from every source format, checked against an independent reading of the
//! source: a tiny IDX decoder written here (flate2 + byte offsets) for the real Fashion-MNIST
//! files, and files written here in the real CIFAR / PNG / JPEG formats with known pixels.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use image::{GrayImage, Luma, Rgb, RgbImage};
use pwself_engine::data::cifar::{self, Cifar100Labels};
use pwself_engine::data::folder::{self, FolderOptions};
use pwself_engine::data::idx;
use pwself_engine::data::{default_pack, Pack, Split, Subset};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";
const FASHION_NAMES: [&str; 10] = [
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

/// The Debian Fashion-MNIST folder, or `None` (after a visible "skipped" line) when it is not
/// installed. Under CI its absence is a failure.
fn fashion_dir(test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(FASHION);
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{FASHION} is missing: CI must install Debian's dataset-fashion-mnist \
             (scripts/test.sh installs it: apt-get install -y dataset-fashion-mnist)"
        );
    }
    // Straight to stderr, past the test harness's capture, so the skip is visible.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test}: {FASHION} is missing (apt-get install dataset-fashion-mnist)"
    );
    None
}

/// An IDX file decoded independently of the crate: gunzip, then big-endian dims after a
/// 4-byte magic, then the bytes.
struct RawIdx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn raw_idx(path: &Path) -> RawIdx {
    let gz = std::fs::read(path).unwrap();
    let mut b = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut b)
        .unwrap();
    assert_eq!(b[0..2], [0, 0]);
    assert_eq!(b[2], 0x08, "unsigned bytes");
    let nd = b[3] as usize;
    let dims: Vec<usize> = (0..nd)
        .map(|d| u32::from_be_bytes(b[4 + 4 * d..8 + 4 * d].try_into().unwrap()) as usize)
        .collect();
    let data = b[4 + 4 * nd..].to_vec();
    assert_eq!(data.len(), dims.iter().product::<usize>());
    RawIdx { dims, data }
}

/// Checks `pack` holds exactly the images `keep` of (images, labels), in that order.
fn assert_pack_is(pack: &Pack, images: &RawIdx, labels: &RawIdx, keep: &[usize]) {
    let n = 28 * 28;
    assert_eq!(pack.len(), keep.len());
    assert_eq!((pack.height(), pack.width(), pack.channels()), (28, 28, 1));
    assert_eq!(pack.class_names(), FASHION_NAMES);
    for (j, &i) in keep.iter().enumerate() {
        assert_eq!(pack.image(j), &images.data[i * n..(i + 1) * n], "image {j}");
        assert_eq!(pack.label(j), labels.data[i] as u16, "label {j}");
    }
}

/// Mean and population std of bytes/255, in f64, the plain two-pass way.
fn mean_std(bytes: &[u8]) -> (f64, f64) {
    let n = bytes.len() as f64;
    let m = bytes.iter().map(|&b| b as f64 / 255.0).sum::<f64>() / n;
    let v = bytes
        .iter()
        .map(|&b| (b as f64 / 255.0 - m).powi(2))
        .sum::<f64>()
        / n;
    (m, v.sqrt())
}

/// The first `per` indices of each class, in file order: the balanced subset, computed here.
fn first_per_class(labels: &[u8], k: usize, per: usize) -> Vec<usize> {
    let mut seen = vec![0; k];
    let mut keep = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if seen[l as usize] < per {
            seen[l as usize] += 1;
            keep.push(i);
        }
    }
    keep
}

#[test]
fn fashion_mnist_train_through_the_library() {
    let Some(src) = fashion_dir("fashion_mnist_train_through_the_library") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("train.pwpack");
    let images = src.join("train-images-idx3-ubyte.gz");
    let labels = src.join("train-labels-idx1-ubyte.gz");
    let names = FASHION_NAMES.iter().map(|s| s.to_string()).collect();
    let summary = idx::prepare_idx(&images, &labels, Some(names), &Subset::all(), &out).unwrap();
    assert_eq!(summary.count, 60_000);

    let pack = Pack::open(&out).unwrap();
    let ri = raw_idx(&images);
    let rl = raw_idx(&labels);
    assert_eq!(ri.dims, vec![60_000, 28, 28]);
    let all: Vec<usize> = (0..60_000).collect();
    assert_pack_is(&pack, &ri, &rl, &all);
    // Known facts about Fashion-MNIST: 6,000 training images per class.
    assert_eq!(pack.class_counts(), vec![6_000; 10]);
    let (m, s) = mean_std(&ri.data);
    assert!(
        (pack.mean()[0] as f64 - m).abs() < 1e-6,
        "{:?} vs {m}",
        pack.mean()
    );
    assert!(
        (pack.std()[0] as f64 - s).abs() < 1e-6,
        "{:?} vs {s}",
        pack.std()
    );
    // The commonly quoted Fashion-MNIST training statistics.
    assert!((m - 0.2860).abs() < 1e-3 && (s - 0.3530).abs() < 1e-3);
}

#[test]
fn fashion_mnist_test_through_the_binary() {
    let Some(src) = fashion_dir("fashion_mnist_test_through_the_binary") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("test.pwpack");
    let images = src.join("t10k-images-idx3-ubyte.gz");
    let labels = src.join("t10k-labels-idx1-ubyte.gz");
    let run = Command::new(env!("CARGO_BIN_EXE_pwself-engine"))
        .args(["prepare", "idx", "--images"])
        .arg(&images)
        .arg("--labels")
        .arg(&labels)
        .args(["--classes", "fashion-mnist", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("10000 images, 28x28x1, 10 classes") && stdout.contains("test.pwpack"),
        "{stdout}"
    );
    let pack = Pack::open(&out).unwrap();
    let ri = raw_idx(&images);
    let rl = raw_idx(&labels);
    let all: Vec<usize> = (0..10_000).collect();
    assert_pack_is(&pack, &ri, &rl, &all);
    assert_eq!(pack.class_counts(), vec![1_000; 10]);

    // A balanced subset through the library, against the selection computed here.
    let sub = tmp.path().join("sub.pwpack");
    let names = FASHION_NAMES.iter().map(|s| s.to_string()).collect();
    let subset = Subset {
        limit: Some(500),
        balanced: true,
    };
    idx::prepare_idx(&images, &labels, Some(names), &subset, &sub).unwrap();
    let pack = Pack::open(&sub).unwrap();
    assert_pack_is(&pack, &ri, &rl, &first_per_class(&rl.data, 10, 50));
    assert_eq!(pack.class_counts(), vec![50; 10]);
}

#[test]
fn embedded_default_dataset() {
    let train = default_pack(Split::Train).unwrap();
    let test = default_pack(Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (10_000, 2_000));
    assert_eq!(train.class_counts(), vec![1_000; 10]);
    assert_eq!(test.class_counts(), vec![200; 10]);
    for p in [&train, &test] {
        assert_eq!((p.height(), p.width(), p.channels()), (28, 28, 1));
        assert_eq!(p.class_names(), FASHION_NAMES);
    }
    let Some(src) = fashion_dir("embedded_default_dataset (comparison with the IDX files)") else {
        return;
    };
    for (pack, stem, per) in [(&train, "train", 1_000), (&test, "t10k", 200)] {
        let ri = raw_idx(&src.join(format!("{stem}-images-idx3-ubyte.gz")));
        let rl = raw_idx(&src.join(format!("{stem}-labels-idx1-ubyte.gz")));
        assert_pack_is(pack, &ri, &rl, &first_per_class(&rl.data, 10, per));
    }
}

/// The pixel that test image `i` has at (y, x) in channel c: distinct per image and channel.
fn pattern(i: usize, y: usize, x: usize, c: usize) -> u8 {
    ((i * 31 + y * 7 + x * 3 + c * 85) % 256) as u8
}

/// Writes CIFAR records in the official planar layout: `prefix` label bytes then R, G, B
/// planes of 32x32.
fn cifar_file(path: &Path, first: usize, labels: &[Vec<u8>]) {
    let mut b = Vec::new();
    for (j, lab) in labels.iter().enumerate() {
        b.extend_from_slice(lab);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    b.push(pattern(first + j, y, x, c));
                }
            }
        }
    }
    std::fs::write(path, b).unwrap();
}

fn assert_hwc_pattern(pack: &Pack, count: usize) {
    assert_eq!(pack.len(), count);
    assert_eq!((pack.height(), pack.width(), pack.channels()), (32, 32, 3));
    for i in 0..count {
        let img = pack.image(i);
        for y in 0..32 {
            for x in 0..32 {
                for c in 0..3 {
                    assert_eq!(
                        img[(y * 32 + x) * 3 + c],
                        pattern(i, y, x, c),
                        "{i} {y} {x} {c}"
                    );
                }
            }
        }
    }
}

#[test]
fn cifar10_planar_to_hwc_and_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("data_batch_1.bin");
    let b = tmp.path().join("data_batch_2.bin");
    let labels: Vec<u8> = vec![3, 0, 9, 9, 1];
    cifar_file(
        &a,
        0,
        &labels[..3].iter().map(|&l| vec![l]).collect::<Vec<_>>(),
    );
    cifar_file(
        &b,
        3,
        &labels[3..].iter().map(|&l| vec![l]).collect::<Vec<_>>(),
    );
    let out = tmp.path().join("out").join("c10.pwpack");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    cifar::prepare_cifar10(&[a.clone(), b.clone()], &Subset::all(), &out).unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_hwc_pattern(&pack, 5);
    assert_eq!(pack.labels(), &[3, 0, 9, 9, 1]);
    assert_eq!(pack.class_names()[0], "airplane");
    assert_eq!(pack.class_names()[9], "truck");

    // batches.meta.txt beside the files overrides the names; --limit keeps the first N.
    let meta: String = (0..10).map(|i| format!("name{i}\n")).collect::<String>() + "\n";
    std::fs::write(tmp.path().join("batches.meta.txt"), meta).unwrap();
    let subset = Subset {
        limit: Some(4),
        balanced: false,
    };
    cifar::prepare_cifar10(&[a, b], &subset, &out).unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_hwc_pattern(&pack, 4);
    assert_eq!(pack.class_names()[3], "name3");
    assert_eq!(pack.class_names().len(), 10);
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("train.bin");
    // (coarse, fine) pairs.
    let pairs: Vec<Vec<u8>> = vec![vec![4, 99], vec![19, 0], vec![0, 57]];
    cifar_file(&f, 0, &pairs);
    let out = tmp.path().join("c100.pwpack");
    cifar::prepare_cifar100(
        std::slice::from_ref(&f),
        Cifar100Labels::Fine,
        &Subset::all(),
        &out,
    )
    .unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_hwc_pattern(&pack, 3);
    assert_eq!(pack.labels(), &[99, 0, 57]);
    assert_eq!(pack.num_classes(), 100);
    assert_eq!(pack.class_names()[57], "class_57");

    let coarse: String = (0..20).map(|i| format!("super{i}\n")).collect();
    std::fs::write(tmp.path().join("coarse_label_names.txt"), coarse).unwrap();
    cifar::prepare_cifar100(&[f], Cifar100Labels::Coarse, &Subset::all(), &out).unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_hwc_pattern(&pack, 3);
    assert_eq!(pack.labels(), &[4, 19, 0]);
    assert_eq!(pack.num_classes(), 20);
    assert_eq!(pack.class_names()[19], "super19");
}

#[test]
fn image_folder_classes_order_colours_and_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    // Classes created out of order: labels follow sorted names (apple=0, kiwi=1, zebra=2).
    let zebra = [(10u8, 200u8, 30u8), (250, 250, 250)];
    let apple = [(200u8, 20u8, 20u8), (0, 0, 255), (128, 64, 32)];
    let kiwi = [(90u8, 160u8, 40u8)];
    for (class, colours) in [
        ("zebra", &zebra[..]),
        ("apple", &apple[..]),
        ("kiwi", &kiwi[..]),
    ] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for (j, &(r, g, b)) in colours.iter().enumerate() {
            // Different sizes and aspect ratios: every one is squashed to side x side.
            let img = RgbImage::from_pixel(20 + 7 * j as u32, 13 + 5 * j as u32, Rgb([r, g, b]));
            // File names sort as 0.png < 1.JPG < 2.jpeg, with mixed-case extensions.
            let name = ["0.png", "1.JPG", "2.jpeg"][j];
            img.save(root.join(class).join(name)).unwrap();
        }
    }
    // Ignored: a text file and a hidden file.
    std::fs::write(root.join("apple").join("notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("apple").join(".DS_Store"), "junk").unwrap();

    let out = tmp.path().join("folder.pwpack");
    let opts = FolderOptions {
        side: 16,
        channels: 3,
    };
    folder::prepare_folder(&root, opts, &Subset::all(), &out).unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_eq!(pack.class_names(), ["apple", "kiwi", "zebra"]);
    assert_eq!(pack.labels(), &[0, 0, 0, 1, 2, 2]);
    assert_eq!((pack.height(), pack.width(), pack.channels()), (16, 16, 3));
    // (colour, written as PNG) in pack order: apple 0.png 1.JPG 2.jpeg, kiwi 0.png, zebra
    // 0.png 1.JPG.
    let expect: Vec<((u8, u8, u8), bool)> = [&apple[..], &kiwi[..], &zebra[..]]
        .iter()
        .flat_map(|cs| cs.iter().enumerate().map(|(j, &c)| (c, j == 0)))
        .collect();
    for (i, &((r, g, b), png)) in expect.iter().enumerate() {
        // PNG is lossless; JPEG of a flat colour comes back within a few levels.
        let tol = if png { 0 } else { 3 };
        for px in pack.image(i).chunks_exact(3) {
            for (got, want) in px.iter().zip([r, g, b]) {
                assert!(
                    got.abs_diff(want) <= tol,
                    "image {i}: got {px:?}, want {:?}",
                    (r, g, b)
                );
            }
        }
    }

    // Grey: BT.709 luma of the colour.
    let grey_out = tmp.path().join("grey.pwpack");
    let opts = FolderOptions {
        side: 5,
        channels: 1,
    };
    folder::prepare_folder(&root, opts, &Subset::all(), &grey_out).unwrap();
    let pack = Pack::open(&grey_out).unwrap();
    assert_eq!(pack.channels(), 1);
    let (r, g, b) = apple[0];
    let luma = (0.2126 * r as f64 + 0.7152 * g as f64 + 0.0722 * b as f64).round() as u8;
    assert!(
        pack.image(0).iter().all(|&v| v.abs_diff(luma) <= 1),
        "{:?}",
        pack.image(0)
    );
}

#[test]
fn image_folder_resizes_a_gradient_sensibly_and_balances() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for j in 0..3 {
            // A horizontal ramp, 64 wide: halving must keep it monotone, left dark, right
            // bright, and each output column near the mean of its two source columns.
            let img = GrayImage::from_fn(64, 8, |x, _| Luma([(x * 4) as u8]));
            img.save(root.join(class).join(format!("{j}.png"))).unwrap();
        }
    }
    let out = tmp.path().join("p.pwpack");
    let subset = Subset {
        limit: Some(4),
        balanced: true,
    };
    let opts = FolderOptions {
        side: 32,
        channels: 1,
    };
    folder::prepare_folder(&root, opts, &subset, &out).unwrap();
    let pack = Pack::open(&out).unwrap();
    assert_eq!(pack.labels(), &[0, 0, 1, 1]);
    let row = &pack.image(0)[..32];
    for x in 2..30 {
        let want = (8 * x + 2) as f64; // mean of source columns 2x and 2x+1
        assert!((row[x] as f64 - want).abs() <= 3.0, "column {x}: {row:?}");
        assert!(row[x] >= row[x - 1], "{row:?}");
    }
}
