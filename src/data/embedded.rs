//! The embedded default dataset: 12,000 Fashion-MNIST images (28x28 grey, 10 classes) built
//! into the binary, so that `train` and the tests run with no download. Train: the first
//! 1,000 images of each class of Fashion-MNIST's 60,000-image training set; test: the first
//! 200 of each class of its 10,000-image test set. Built by
//! `datasets/fashion-mnist-10k/rebuild.sh` (see the README and LICENSE there: MIT, Zalando SE).
//! This module only decompresses; it must not hold any other dataset.

use std::path::Path;

use super::Pack;
use crate::error::Result;

/// A split of the embedded default dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// 10,000 images, 1,000 per class.
    Train,
    /// 2,000 images, 200 per class.
    Test,
}

static TRAIN_GZ: &[u8] = include_bytes!("../../datasets/fashion-mnist-10k/train.pwpack.gz");
static TEST_GZ: &[u8] = include_bytes!("../../datasets/fashion-mnist-10k/test.pwpack.gz");

/// Opens a split of the embedded default dataset: gunzipped into memory (about 8 MB for
/// train, 50 ms) and validated like any pack. [`Pack::origin`] reads
/// `<embedded>/fashion-mnist-10k/{train,test}.pwpack.gz`.
pub fn default_pack(split: Split) -> Result<Pack> {
    let (bytes, origin) = match split {
        Split::Train => (TRAIN_GZ, "<embedded>/fashion-mnist-10k/train.pwpack.gz"),
        Split::Test => (TEST_GZ, "<embedded>/fashion-mnist-10k/test.pwpack.gz"),
    };
    Pack::from_gz_bytes(bytes, Path::new(origin))
}
