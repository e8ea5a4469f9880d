//! Fuzzes the IDX reader (`read_idx_images`, `read_idx_labels`, `read_idx`): no input may
//! panic, every error names its file, and what reads must be self-consistent.
//!
//! Input: a mode byte, a split byte, then bytes. Mode 0: the bytes are an images file;
//! 1: a labels file; 2 and 3: the first `split * len / 255` bytes are the images file and the
//! rest the labels file, read as a pair (3 with ten class names given, as `--classes` would).
//! Files that start with the gzip magic are gunzipped, as the reader does for any name.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pwself_engine::data::idx::{read_idx, read_idx_images, read_idx_labels};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write the temporary file");
    p
}

fuzz_target!(|data: &[u8]| {
    let [mode, split, rest @ ..] = data else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let at = (*split as usize * rest.len()) / 255;
    match mode & 3 {
        0 => {
            let p = write(dir.path(), "images-idx3-ubyte", rest);
            match read_idx_images(&p) {
                Ok(im) => {
                    assert_eq!(im.pixels.len(), im.count * im.height * im.width);
                    if im.count > 0 {
                        assert!(im.height > 0 && im.width > 0);
                    }
                }
                Err(e) => assert!(e.to_string().contains("images-idx3-ubyte"), "{e}"),
            }
        }
        1 => {
            let p = write(dir.path(), "labels-idx1-ubyte", rest);
            if let Err(e) = read_idx_labels(&p) {
                assert!(e.to_string().contains("labels-idx1-ubyte"), "{e}");
            }
        }
        m => {
            let pi = write(dir.path(), "images-idx3-ubyte", &rest[..at]);
            let pl = write(dir.path(), "labels-idx1-ubyte", &rest[at..]);
            let names = (m == 3).then(|| (0..10).map(|i| format!("c{i}")).collect());
            match read_idx(&pi, &pl, names) {
                Ok(s) => {
                    assert_eq!(s.channels, 1);
                    assert_eq!(s.pixels.len(), s.len() * s.image_len());
                    assert!(s.labels.iter().all(|&l| (l as usize) < s.class_names.len()));
                    for i in 0..s.len() {
                        assert_eq!(s.image(i).len(), s.image_len());
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("-idx"), "{msg}");
                }
            }
        }
    }
});
