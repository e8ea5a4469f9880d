//! Fuzzes the checkpoint loader (`checkpoint::load`, `checkpoint::verify`): no input may
//! panic, every error names the file, and an intact checkpoint round-trips exactly.
//!
//! The network is a small fixed table (three tensors, one of them in the head) with a
//! `2 x 3` teacher center. The first input byte picks a mode; the rest is:
//! - 0: a whole checkpoint file, as it is;
//! - 1: the same, re-sealed: the harness recomputes the `checksum` metadata (the documented
//!   rule: CRC32 over the data section, then every other metadata entry sorted by key as
//!   `key\0value\0`) so that mutations reach the decoder behind the checksum;
//! - 2: edits to a valid checkpoint the harness encodes: (u16 offset, u8 xor) triples, the
//!   last byte, if the count is odd, a truncation; re-sealed when the mode byte's bit 2 is set;
//! - 3: the values of a state (arbitrary f32 bits and counters): encode, then load must give
//!   back every tensor bit for bit, and loading it for another architecture must fail.
#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use pwself_engine::checkpoint::{self, TrainingState};
use pwself_engine::model::params::ParamTable;

const CENTER_ROWS: usize = 2;
const K: usize = 3;
const HEAD_OUT: usize = 3;

fn table() -> ParamTable {
    let mut t = ParamTable::new();
    t.push("cls_token", &[1, 1, 2]);
    t.push("blocks.0.attn.qkv.weight", &[6, 2]);
    t.push("head.last_layer.weight_v", &[3, 2]);
    t
}

fn state(t: &ParamTable, u: &mut Unstructured) -> arbitrary::Result<TrainingState> {
    let n = t.total();
    let mut f = |len: usize| -> arbitrary::Result<Vec<f32>> {
        (0..len)
            .map(|_| Ok(f32::from_bits(u32::arbitrary(u)?)))
            .collect()
    };
    Ok(TrainingState {
        student: f(n)?,
        teacher: f(n)?,
        exp_avg: f(n)?,
        exp_avg_sq: f(n)?,
        center: f(CENTER_ROWS * K)?,
        center_rows: CENTER_ROWS,
        adam_step: u64::arbitrary(u)?,
        adam_step_last: u64::arbitrary(u)?,
        step: u64::arbitrary(u)?,
        epoch: u64::arbitrary(u)?,
    })
}

/// Recomputes the `checksum` metadata of safetensors `bytes` in place, when the header
/// parses and holds the checksum in the writer's spelling.
fn reseal(bytes: &mut [u8]) {
    let Ok((n, meta)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return;
    };
    let Some(meta) = meta.metadata().clone() else {
        return;
    };
    let Some(data) = bytes.get(8 + n..) else {
        return;
    };
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "checksum").collect();
    keys.sort();
    for k in keys {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(meta[k].as_bytes());
        h.update(&[0]);
    }
    let crc = format!("{:08x}", h.finalize());
    let needle = b"\"checksum\":\"crc32:";
    if let Some(at) = bytes[8..8 + n]
        .windows(needle.len())
        .position(|w| w == needle)
    {
        let d = 8 + at + needle.len();
        if d + 8 <= 8 + n {
            bytes[d..d + 8].copy_from_slice(crc.as_bytes());
        }
    }
}

fn load(dir: &Path, bytes: &[u8], t: &ParamTable) -> pwself_engine::Result<TrainingState> {
    let p = dir.join("checkpoint.safetensors");
    std::fs::write(&p, bytes).expect("write the temporary file");
    let verified = checkpoint::verify(&p, bytes);
    let loaded = checkpoint::load(&p, t, CENTER_ROWS, K);
    // A checkpoint that loads has passed its checksum (format 2), so verify agrees.
    if loaded.is_ok() {
        verified.expect("load accepted a checkpoint verify refuses");
    }
    match loaded {
        Ok((s, _config)) => {
            assert_eq!(s.student.len(), t.total());
            assert_eq!(s.teacher.len(), t.total());
            assert_eq!(s.center.len(), CENTER_ROWS * K);
            Ok(s)
        }
        Err(e) => {
            assert!(e.to_string().contains("checkpoint.safetensors"), "{e}");
            Err(e)
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let t = table();
    let origin = dir.path().join("checkpoint.safetensors");
    match mode & 3 {
        0 => {
            let _ = load(dir.path(), rest, &t);
        }
        1 => {
            let mut b = rest.to_vec();
            reseal(&mut b);
            let _ = load(dir.path(), &b, &t);
        }
        2 => {
            let mut u = Unstructured::new(&[]);
            let s = state(&t, &mut u).expect("a state from no bytes");
            let mut b = checkpoint::encode(&origin, &t, HEAD_OUT, &s, "{\"fuzz\":true}")
                .expect("encode a valid state");
            for e in rest.chunks(3) {
                match *e {
                    [hi, lo, x] => {
                        let at = usize::from(u16::from_be_bytes([hi, lo]));
                        if let Some(byte) = b.get_mut(at) {
                            *byte ^= x;
                        }
                    }
                    [cut] | [cut, _] => {
                        let keep = usize::from(cut) * b.len() / 255;
                        b.truncate(keep);
                    }
                    _ => {}
                }
            }
            if mode & 4 != 0 {
                reseal(&mut b);
            }
            let _ = load(dir.path(), &b, &t);
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok(s) = state(&t, &mut u) else { return };
            let b = checkpoint::encode(&origin, &t, HEAD_OUT, &s, "{}").expect("encode a state");
            let back = load(dir.path(), &b, &t).expect("a fresh checkpoint loads");
            for info in t.tensors() {
                let r = info.range();
                assert_eq!(bits(&back.student[r.clone()]), bits(&s.student[r.clone()]));
                assert_eq!(bits(&back.teacher[r.clone()]), bits(&s.teacher[r.clone()]));
                assert_eq!(bits(&back.exp_avg[r.clone()]), bits(&s.exp_avg[r.clone()]));
                assert_eq!(bits(&back.exp_avg_sq[r.clone()]), bits(&s.exp_avg_sq[r]));
            }
            assert_eq!(bits(&back.center), bits(&s.center));
            assert_eq!(
                (back.step, back.epoch, back.adam_step, back.adam_step_last),
                (s.step, s.epoch, s.adam_step, s.adam_step_last)
            );
            // Another architecture: a wider first tensor.
            let mut other = ParamTable::new();
            other.push("cls_token", &[1, 1, 3]);
            other.push("blocks.0.attn.qkv.weight", &[6, 2]);
            other.push("head.last_layer.weight_v", &[3, 2]);
            let p = dir.path().join("checkpoint.safetensors");
            assert!(checkpoint::load(&p, &other, CENTER_ROWS, K).is_err());
            assert!(checkpoint::load(&p, &t, CENTER_ROWS + 1, K).is_err());
        }
    }
});
