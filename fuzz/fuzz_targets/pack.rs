//! Fuzzes the pack reader (`Pack::from_bytes`, `Pack::from_gz_bytes`, `Pack::open`): no
//! input may panic, and a pack that opens must be self-consistent.
//!
//! The first input byte picks a mode; the rest is the file:
//! - 0: the bytes as they are, in memory;
//! - 1: the same after the harness re-seals both CRCs (header and payload), so that mutations
//!   reach the field checks behind the checksums (a forged header must still be an error);
//! - 2: re-sealed, written to a temporary file and opened with `Pack::open` (the memory map;
//!   the name ends in `.gz` when bit 2 of the mode byte is set);
//! - 3: the bytes as a gzip stream (`Pack::from_gz_bytes`).
#![no_main]

use std::io::Write;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pwself_engine::data::Pack;

/// Rewrites the payload CRC (at H-8) and the header CRC (at H-4) the way the writer does, if
/// the header-length field points inside the file.
fn reseal(bytes: &mut [u8]) {
    let Some(h) = bytes.get(12..16) else { return };
    let h = u32::from_le_bytes(h.try_into().unwrap()) as usize;
    if h < 16 || h > bytes.len() {
        return;
    }
    let p = h.div_ceil(64) * 64;
    let payload = crc32fast::hash(bytes.get(p..).unwrap_or(&[]));
    bytes[h - 8..h - 4].copy_from_slice(&payload.to_le_bytes());
    let header = crc32fast::hash(&bytes[..h - 4]);
    bytes[h - 4..h].copy_from_slice(&header.to_le_bytes());
}

/// What every opened pack must satisfy.
fn check(pack: &Pack) {
    let n = pack.len();
    let len = pack.image_len();
    assert_eq!(len, pack.height() * pack.width() * pack.channels());
    assert!(pack.channels() == 1 || pack.channels() == 3);
    assert_eq!(pack.pixels().len(), n * len);
    assert_eq!(pack.labels().len(), n);
    assert_eq!(pack.mean().len(), pack.channels());
    assert_eq!(pack.std().len(), pack.channels());
    assert_eq!(pack.class_names().len(), pack.num_classes());
    for i in 0..n {
        assert_eq!(pack.image(i).len(), len);
        assert!((pack.label(i) as usize) < pack.num_classes());
    }
    assert_eq!(pack.class_counts().iter().sum::<usize>(), n);
    let _ = pack.summary().to_string();
    let _ = format!("{pack:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let origin = Path::new("fuzz.pwpack");
    let opened = match mode & 3 {
        0 => Pack::from_bytes(rest.to_vec(), origin),
        1 => {
            let mut b = rest.to_vec();
            reseal(&mut b);
            Pack::from_bytes(b, origin)
        }
        2 => {
            let mut b = rest.to_vec();
            reseal(&mut b);
            let suffix = if mode & 4 != 0 {
                ".pwpack.gz"
            } else {
                ".pwpack"
            };
            let mut f = tempfile::Builder::new()
                .suffix(suffix)
                .tempfile()
                .expect("temporary file");
            f.write_all(&b).expect("write the temporary file");
            f.flush().expect("flush the temporary file");
            Pack::open(f.path())
        }
        _ => Pack::from_gz_bytes(rest, origin),
    };
    match opened {
        Ok(pack) => check(&pack),
        Err(e) => {
            // Every error names the file.
            let msg = e.to_string();
            assert!(msg.contains("fuzz.pwpack") || msg.contains(".tmp"), "{msg}");
        }
    }
});
