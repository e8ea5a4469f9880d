//! Helpers shared by the benches (`mod common;` in each; a folder, so cargo does not take
//! it for a bench of its own).

use pwself_engine::data::{default_pack, Pack, PackWriter, Split};

/// 32 Fashion-MNIST images upscaled (nearest) to 256x256x3, written to a temporary pack.
pub fn rgb256_pack(dir: &std::path::Path) -> Pack {
    let src = default_pack(Split::Train).expect("embedded pack");
    let path = dir.join("rgb256.pwpack");
    let mut w = PackWriter::create(&path, 256, 256, 3, src.class_names()).expect("create pack");
    for i in 0..32 {
        let img = src.image(i);
        let mut out = Vec::with_capacity(256 * 256 * 3);
        for y in 0..256 {
            for x in 0..256 {
                let v = img[(y * 28 / 256) * 28 + x * 28 / 256];
                out.extend_from_slice(&[v, v / 2 + 64, 255 - v]);
            }
        }
        w.push(&out, src.label(i)).expect("push");
    }
    w.finish().expect("finish");
    Pack::open(&path).expect("open")
}
