//! Features for evaluation: the teacher backbone's final-norm CLS token of each image of
//! a pack, seen whole (no crop, no augmentation) at the global view side, normalised with
//! the pack's mean and std. Also the raw-pixel baseline.

use rayon::prelude::*;

use crate::data::Pack;
use crate::eval::knn::{knn_accuracy, KnnResult};
use crate::model::vit::{BackboneActs, Network};
use crate::views::crop::CropRecord;
use crate::views::resize::{Interpolation, ResizePlan};

/// Images per backbone call during extraction.
pub const CHUNK: usize = 256;

/// `(N, C, side, side)` model input of images `range` of `pack`.
pub fn inputs(pack: &Pack, range: std::ops::Range<usize>, side: usize) -> Vec<f32> {
    let (h, w, c) = (pack.height(), pack.width(), pack.channels());
    let whole = CropRecord {
        top: 0,
        left: 0,
        height: h as u32,
        width: w as u32,
        flipped: false,
    };
    let plan = ResizePlan::new(&whole, side, Interpolation::Bicubic);
    let per = c * side * side;
    let mut out = vec![0.0f32; range.len() * per];
    out.par_chunks_mut(per)
        .zip(range.into_par_iter())
        .for_each(|(dst, i)| {
            plan.apply(pack.image(i), h, w, c, dst);
            for (ch, plane) in dst.chunks_exact_mut(side * side).enumerate() {
                let (m, s) = (pack.mean()[ch], pack.std()[ch]);
                plane.iter_mut().for_each(|x| *x = (*x - m) / s);
            }
        });
    out
}

/// The final-norm CLS features `(N, D)` of every image of `pack` under `params`.
pub fn cls_features(net: &Network, params: &[f32], pack: &Pack, side: usize) -> Vec<f32> {
    let d = net.vit.embed_dim;
    let mut feats = vec![0.0f32; pack.len() * d];
    let mut acts = BackboneActs::default();
    for start in (0..pack.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(pack.len());
        let x = inputs(pack, start..end, side);
        net.backbone_forward(params, &x, end - start, side, None, &mut acts);
        let t = acts.tokens;
        for (i, row) in feats[start * d..end * d].chunks_exact_mut(d).enumerate() {
            row.copy_from_slice(&acts.out[i * t * d..i * t * d + d]);
        }
    }
    feats
}

/// Weighted kNN accuracy (k in `ks`) of CLS features `(N, D)` already extracted from
/// `train` and `test`.
pub fn knn_of_features(
    f_train: &[f32],
    f_test: &[f32],
    train: &Pack,
    test: &Pack,
    dim: usize,
    ks: &[usize],
) -> Vec<KnnResult> {
    let classes = train.num_classes().max(test.num_classes());
    knn_accuracy(
        f_train,
        train.labels(),
        f_test,
        test.labels(),
        dim,
        ks,
        classes,
    )
}

/// Weighted kNN accuracy (k in `ks`) of the teacher's CLS features, `train` vs `test`.
pub fn knn_of(
    net: &Network,
    params: &[f32],
    train: &Pack,
    test: &Pack,
    side: usize,
    ks: &[usize],
) -> Vec<KnnResult> {
    let f_train = cls_features(net, params, train, side);
    let f_test = cls_features(net, params, test, side);
    let classes = train.num_classes().max(test.num_classes());
    knn_accuracy(
        &f_train,
        train.labels(),
        &f_test,
        test.labels(),
        net.vit.embed_dim,
        ks,
        classes,
    )
}

/// The same kNN on raw pixels (pixel / 255, flattened): the baseline any learned feature
/// should beat.
pub fn knn_raw_pixels(train: &Pack, test: &Pack, ks: &[usize]) -> Vec<KnnResult> {
    let to_f32 = |p: &Pack| {
        p.pixels()
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect::<Vec<f32>>()
    };
    let classes = train.num_classes().max(test.num_classes());
    knn_accuracy(
        &to_f32(train),
        train.labels(),
        &to_f32(test),
        test.labels(),
        train.image_len(),
        ks,
        classes,
    )
}
