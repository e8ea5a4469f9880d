//! Photometric augmentation (being written).
