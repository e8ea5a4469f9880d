//! Crop records and random-resized-crop sampling (SPEC.md section 1).

/// Where a view came from: a half-open pixel box `[top, top+height) x [left, left+width)`
/// in source-image coordinates, and whether the view was then flipped horizontally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CropRecord {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
    pub flipped: bool,
}
