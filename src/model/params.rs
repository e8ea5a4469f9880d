//! One flat `f32` buffer for all parameters of a network, addressed through a table of
//! named tensors (DESIGN.md). AdamW, EMA, clipping and checkpoints are single passes
//! over one buffer; a layer borrows its slices by name or by offset. The same table
//! addresses the gradient buffer and each optimiser moment, which have the same layout.

use std::collections::HashMap;

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorInfo {
    /// timm-style name, e.g. `blocks.0.attn.qkv.weight`.
    pub name: String,
    /// Shape, PyTorch order (a Linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for a zero-element tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The element range in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
    /// Whether weight decay applies: DINO's rule (`get_params_groups`), no decay on biases
    /// and on 1-D tensors; everything with more than one dimension decays, the CLS token
    /// and position embeddings (shape `[1, n, D]`) included (SPEC.md section 6).
    pub fn decays(&self) -> bool {
        self.shape.len() > 1 && !self.name.ends_with(".bias")
    }
}

/// The table of every tensor of a network, in layout order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamTable {
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    total: usize,
}

impl ParamTable {
    /// An empty table.
    pub fn new() -> ParamTable {
        ParamTable::default()
    }

    /// Appends a tensor and returns its offset. Offsets are 16-element aligned so every
    /// tensor starts on a 64-byte boundary (SIMD loads, and the CUDA side's vector loads).
    ///
    /// # Panics
    /// On a duplicate name (a programming error in the model's constructor).
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) -> usize {
        let name = name.into();
        assert!(
            !self.by_name.contains_key(&name),
            "duplicate tensor name {name}"
        );
        let offset = self.total.next_multiple_of(16);
        let info = TensorInfo {
            name: name.clone(),
            shape: shape.to_vec(),
            offset,
        };
        self.total = offset + info.len();
        self.by_name.insert(name, self.tensors.len());
        self.tensors.push(info);
        offset
    }

    /// Total buffer length (with alignment padding).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Number of elements that are parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorInfo::len).sum()
    }

    /// All tensors in layout order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor called `name`, which the model defined.
    ///
    /// # Panics
    /// If the name is not in the table (a programming error).
    pub fn info(&self, name: &str) -> &TensorInfo {
        self.get(name)
            .unwrap_or_else(|| panic!("no tensor named {name}"))
    }

    /// `name`'s elements in `buf` (any buffer with this table's layout).
    pub fn slice<'a>(&self, buf: &'a [f32], name: &str) -> &'a [f32] {
        &buf[self.info(name).range()]
    }

    /// `name`'s elements in `buf`, mutable.
    pub fn slice_mut<'a>(&self, buf: &'a mut [f32], name: &str) -> &'a mut [f32] {
        &mut buf[self.info(name).range()]
    }

    /// A 0/1 mask over the buffer: 1 where weight decay applies (see
    /// [`TensorInfo::decays`]), 0 on biases, norms and padding.
    pub fn decay_mask(&self) -> Vec<f32> {
        let mut m = vec![0.0; self.total];
        for t in self.tensors.iter().filter(|t| t.decays()) {
            m[t.range()].iter_mut().for_each(|x| *x = 1.0);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_named() {
        let mut t = ParamTable::new();
        assert_eq!(t.push("patch_embed.proj.weight", &[8, 3, 2, 2]), 0);
        assert_eq!(t.push("patch_embed.proj.bias", &[8]), 96);
        assert_eq!(t.push("norm.weight", &[8]), 112);
        assert_eq!(t.total(), 120);
        assert_eq!(t.num_params(), 96 + 8 + 8);
        let buf: Vec<f32> = (0..120).map(|x| x as f32).collect();
        assert_eq!(t.slice(&buf, "norm.weight")[0], 112.0);
        let mask = t.decay_mask();
        assert_eq!(mask.iter().sum::<f32>(), 96.0);
    }

    #[test]
    fn decay_follows_ndim() {
        let info = |name: &str, shape: &[usize]| TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            offset: 0,
        };
        assert!(info("blocks.0.attn.qkv.weight", &[24, 8]).decays());
        assert!(!info("blocks.0.attn.qkv.bias", &[24]).decays());
        assert!(!info("blocks.0.norm1.weight", &[8]).decays());
        assert!(
            info("cls_token", &[1, 1, 8]).decays(),
            "DINO decays the 3-D tokens"
        );
        assert!(info("pos_embed", &[1, 50, 8]).decays());
        assert!(info("head.last_layer.weight_v", &[64, 16]).decays());
    }
}
