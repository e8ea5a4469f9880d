//! Fuzzes the CIFAR-10 / CIFAR-100 binary-batch reader (`read_cifar10`, `read_cifar100`):
//! no input may panic, every error names its file, and what reads must be self-consistent
//! (32x32x3 images, one label each, below the class count).
//!
//! Input: a mode byte, a split byte, then bytes. Bit 0-1 of the mode: CIFAR-10, CIFAR-100
//! fine, CIFAR-100 coarse; bit 2: two batch files (split at `split * len / 255`) instead of
//! one; bit 3: also a class-names file beside the batches, taken from the bytes after the
//! 0xFF separator if there is one (names files must be UTF-8 with the right line count).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwself_engine::data::cifar::{read_cifar10, read_cifar100, Cifar100Labels};

fuzz_target!(|data: &[u8]| {
    let [mode, split, rest @ ..] = data else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let (batches, names) = match rest.iter().rposition(|&b| b == 0xFF) {
        Some(i) if mode & 8 != 0 => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let mut files = Vec::new();
    if mode & 4 != 0 {
        let at = (*split as usize * batches.len()) / 255;
        for (k, part) in [&batches[..at], &batches[at..]].into_iter().enumerate() {
            let p = dir.path().join(format!("data_batch_{k}.bin"));
            std::fs::write(&p, part).expect("write the temporary file");
            files.push(p);
        }
    } else {
        let p = dir.path().join("data_batch_0.bin");
        std::fs::write(&p, batches).expect("write the temporary file");
        files.push(p);
    }
    let (read, names_file, k) = match mode & 3 {
        0 => (read_cifar10(&files), "batches.meta.txt", 10),
        1 => (
            read_cifar100(&files, Cifar100Labels::Fine),
            "fine_label_names.txt",
            100,
        ),
        _ => (
            read_cifar100(&files, Cifar100Labels::Coarse),
            "coarse_label_names.txt",
            20,
        ),
    };
    // The names file is written after a first read without it, then the read is repeated.
    let reads = match names {
        Some(text) => {
            std::fs::write(dir.path().join(names_file), text).expect("write the names file");
            let again = match mode & 3 {
                0 => read_cifar10(&files),
                1 => read_cifar100(&files, Cifar100Labels::Fine),
                _ => read_cifar100(&files, Cifar100Labels::Coarse),
            };
            vec![read, again]
        }
        None => vec![read],
    };
    for r in reads {
        match r {
            Ok(s) => {
                assert_eq!((s.height, s.width, s.channels), (32, 32, 3));
                assert_eq!(s.class_names.len(), k);
                assert_eq!(s.pixels.len(), s.len() * 3072);
                assert!(s.labels.iter().all(|&l| (l as usize) < k));
                assert!(!s.is_empty());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("data_batch_") || msg.contains(names_file),
                    "{msg}"
                );
            }
        }
    }
});
