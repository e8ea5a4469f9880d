//! Datasets: the pack file (one memory-mapped file per split, see [`pack`]), ingest from
//! IDX (MNIST / Fashion-MNIST), CIFAR-10/100 binary batches and image folders, subsetting,
//! and the embedded default dataset. This module turns files into packs and packs into
//! byte slices; it must not augment, shuffle or batch (that is `views` and the loader).

pub mod cifar;
pub mod embedded;
pub mod folder;
pub mod idx;
pub mod pack;
pub mod prepare;

pub use embedded::{default_pack, Split};
pub use pack::{Pack, PackSummary, PackWriter};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Which images of a source go into a pack. The default takes them all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subset {
    /// Take at most this many images (the first ones in file order; with `balanced`, the
    /// total over all classes).
    pub limit: Option<usize>,
    /// Take the same number of images from every class: `limit / num_classes` each (the
    /// first ones of each class in file order), or, without `limit`, as many as the
    /// smallest class has.
    pub balanced: bool,
}

impl Subset {
    /// Every image of the source.
    pub fn all() -> Subset {
        Subset::default()
    }

    /// The indices (ascending, i.e. in file order) of the images to keep, given every
    /// image's label. `source` names the input in error messages.
    pub fn select(
        &self,
        labels: &[u16],
        class_names: &[String],
        source: &Path,
    ) -> Result<Vec<usize>> {
        let n = labels.len();
        if self.limit == Some(0) {
            return Err(Error::bad_config(
                "--limit",
                "is 0: pass at least 1, or leave --limit out to take every image",
            ));
        }
        if !self.balanced {
            let take = match self.limit {
                Some(l) if l > n => {
                    return Err(Error::bad_config(
                        "--limit",
                        format!(
                            "asks for {l} images but {} has only {n}: lower --limit to at \
                             most {n}",
                            source.display()
                        ),
                    ))
                }
                Some(l) => l,
                None => n,
            };
            return Ok((0..take).collect());
        }

        let k = class_names.len();
        let mut counts = vec![0usize; k];
        for &l in labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        let name = |c: usize| class_names.get(c).map(String::as_str).unwrap_or("?");
        let per_class = match self.limit {
            Some(l) => {
                let per = l / k.max(1);
                if per == 0 {
                    return Err(Error::bad_config(
                        "--limit",
                        format!(
                            "{l} is fewer than the {k} classes, so --balanced cannot take an \
                             image of each: pass --limit {k} or more"
                        ),
                    ));
                }
                if let Some((c, &have)) = counts.iter().enumerate().find(|(_, &h)| h < per) {
                    return Err(Error::bad_config(
                        "--balanced",
                        format!(
                            "--limit {l} over {k} classes needs {per} images of each class, \
                             but class {c} ({:?}) has only {have} in {}: lower --limit to at \
                             most {}, or drop --balanced",
                            name(c),
                            source.display(),
                            counts.iter().min().copied().unwrap_or(0) * k
                        ),
                    ));
                }
                per
            }
            None => {
                let (c, &min) = counts
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, &h)| h)
                    .unwrap_or((0, &0));
                if min == 0 {
                    return Err(Error::bad_config(
                        "--balanced",
                        format!(
                            "class {c} ({:?}) has no image in {}, so no balanced subset \
                             exists: drop --balanced, or add images of that class",
                            name(c),
                            source.display()
                        ),
                    ));
                }
                min
            }
        };
        let mut taken = vec![0usize; k];
        let mut keep = Vec::with_capacity(per_class * k);
        for (i, &l) in labels.iter().enumerate() {
            if let Some(t) = taken.get_mut(l as usize) {
                if *t < per_class {
                    *t += 1;
                    keep.push(i);
                }
            }
        }
        Ok(keep)
    }
}

/// A whole decoded dataset in memory (IDX and CIFAR files are small enough): images back
/// to back, each `height * width * channels` bytes HWC, and one label per image.
#[derive(Debug, Clone)]
pub struct Samples {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Channels per pixel (1 or 3).
    pub channels: usize,
    /// Class names, indexed by label.
    pub class_names: Vec<String>,
    /// `len() * height * width * channels` bytes.
    pub pixels: Vec<u8>,
    /// One label per image, each below `class_names.len()`.
    pub labels: Vec<u16>,
    /// The file the samples came from (the first one, for several files): error messages
    /// name it.
    pub source: PathBuf,
}

impl Samples {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }
    /// Image `i` (HWC). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }
    /// Writes the images `subset` picks to a pack at `out`.
    pub fn write_pack(&self, subset: &Subset, out: &Path) -> Result<PackSummary> {
        if self.is_empty() {
            return Err(Error::bad_file(
                &self.source,
                "holds no image: pass a file with at least one record",
            ));
        }
        if self.pixels.len() != self.len() * self.image_len() {
            return Err(Error::bad_file(
                &self.source,
                format!(
                    "decoded to {} pixel bytes for {} labels of {}x{}x{} images: the reader \
                     is inconsistent; report this as a bug",
                    self.pixels.len(),
                    self.len(),
                    self.height,
                    self.width,
                    self.channels
                ),
            ));
        }
        let keep = subset.select(&self.labels, &self.class_names, &self.source)?;
        let mut w = PackWriter::create(
            out,
            self.height,
            self.width,
            self.channels,
            &self.class_names,
        )?;
        for i in keep {
            w.push(self.image(i), self.labels[i])?;
        }
        w.finish_with_summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| i.to_string()).collect()
    }

    #[test]
    fn limit_takes_the_first_n() {
        let s = Subset {
            limit: Some(3),
            balanced: false,
        };
        let got = s
            .select(&[2, 2, 1, 0, 1], &names(3), Path::new("f"))
            .unwrap();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(Subset {
            limit: Some(6),
            balanced: false
        }
        .select(&[0; 5], &names(1), Path::new("f"))
        .is_err());
    }

    #[test]
    fn balanced_takes_the_first_of_each_class_in_file_order() {
        let labels = [2, 2, 1, 0, 2, 1, 0, 0, 1];
        let s = Subset {
            limit: Some(6),
            balanced: true,
        };
        assert_eq!(
            s.select(&labels, &names(3), Path::new("f")).unwrap(),
            vec![0, 1, 2, 3, 5, 6]
        );
        // Without a limit: as many as the smallest class (3 each here).
        let all = Subset {
            limit: None,
            balanced: true,
        };
        assert_eq!(
            all.select(&labels, &names(3), Path::new("f"))
                .unwrap()
                .len(),
            9
        );
        // Too few of a class.
        let e = Subset {
            limit: Some(12),
            balanced: true,
        }
        .select(&labels, &names(3), Path::new("src.idx"))
        .unwrap_err()
        .to_string();
        assert!(e.contains("src.idx") && e.contains("only 3"), "{e}");
        // A class with no image at all.
        assert!(all.select(&labels, &names(4), Path::new("f")).is_err());
    }
}
