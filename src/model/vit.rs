//! The network on the CPU: a ViT backbone (all tokens out) and the DINO head, forward and
//! backward, composed from the layer kernels in [`crate::cpu`]. Parameters live in one
//! flat buffer described by [`Network::table`], with timm's names for the backbone
//! (`vit_*_patch*`: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.norm1.*`,
//! `blocks.{i}.attn.qkv.*`, `blocks.{i}.attn.proj.*`, `blocks.{i}.norm2.*`,
//! `blocks.{i}.mlp.fc1.*`, `blocks.{i}.mlp.fc2.*`, `norm.*`) and DINO's for the head
//! (`head.mlp.{0,2,4}.*`, `head.last_layer.weight_v`; `weight_g` is fixed to 1 and not a
//! parameter).
//!
//! This is the reference the CUDA backend is checked against: plain, sequential over
//! layers, every activation backward needs kept in a [`BackboneActs`] / [`HeadActs`].
//! Backward passes accumulate into the gradient buffer (the caller zeroes it once per
//! step), so the globals and the locals can run through the same weights separately.

use crate::cpu::attention::{attention_backward_into, attention_forward};
use crate::cpu::drop_path::{
    drop_path_mask, residual_add_scaled_backward_into, residual_add_scaled_into,
};
use crate::cpu::head::{
    l2norm_backward, l2norm_forward, weight_norm_backward, weight_norm_forward,
};
use crate::cpu::layernorm::{layernorm_backward, layernorm_forward};
use crate::cpu::linear::{
    linear_backward, linear_backward_into, linear_forward, linear_gelu_backward_into,
    linear_gelu_forward,
};
use crate::cpu::patch_embed::{
    add_cls_and_pos, add_cls_and_pos_backward, im2col, pos_embed_backward, pos_embed_forward,
};
use crate::cpu::resize_zeroed;
use crate::error::Result;
use crate::model::config::{HeadConfig, VitConfig};
use crate::model::params::ParamTable;
use crate::rng::{Purpose, Stream};

/// Backbone + head: the layout of their parameters and the code that runs them.
#[derive(Clone, Debug)]
pub struct Network {
    /// Backbone configuration.
    pub vit: VitConfig,
    /// Head configuration.
    pub head: HeadConfig,
    /// Where each named tensor lives in the flat buffers.
    pub table: ParamTable,
}

/// What a block keeps for its backward pass. Rows are `n = B * T` tokens.
#[derive(Clone, Debug, Default)]
pub struct BlockActs {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    mask_attn: Vec<f32>,
    mask_mlp: Vec<f32>,
}

/// What the backbone keeps for its backward pass, and its output.
#[derive(Clone, Debug, Default)]
pub struct BackboneActs {
    /// Images in this call.
    pub batch: usize,
    /// Patches per side of these views.
    pub grid: usize,
    /// Tokens per image, `1 + grid^2`.
    pub tokens: usize,
    cols: Vec<f32>,
    blocks: Vec<BlockActs>,
    x_final: Vec<f32>,
    norm_mean: Vec<f32>,
    norm_rstd: Vec<f32>,
    /// The output: `(B, T, D)` tokens after the final norm.
    pub out: Vec<f32>,
    /// Buffers the forward and backward passes reuse from call to call, so that a training
    /// step allocates (and the kernel faults in) nothing once the first step has run.
    scratch: BackboneScratch,
}

/// Working buffers of [`Network::backbone_forward`] / [`Network::backbone_backward`] that
/// backward does not read from the forward: kept only for their capacity.
#[derive(Clone, Debug, Default)]
struct BackboneScratch {
    patches: Vec<f32>,
    pos_view: Vec<f32>,
    branch: Vec<f32>,
    dx: Vec<f32>,
    dbranch: Vec<f32>,
    dh: Vec<f32>,
    dln: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    dpatches: Vec<f32>,
    dpos_view: Vec<f32>,
}

/// Stochastic depth for one backbone call: the masks are drawn from
/// `Stream(seed, [step_lo, step_hi, (call << 16) | (2 * block + branch)], DropPath)`, one
/// uniform per image, so they are a function of the step and the call alone.
#[derive(Clone, Copy, Debug)]
pub struct DropPath {
    pub seed: u64,
    pub step: u64,
    /// Distinguishes the backbone calls of one step (e.g. 0 = globals, 1 = locals).
    pub call: u32,
}

/// The head's weight-normalised last layer for the current parameters:
/// `w[k] = v[k] / ||v[k]||` (gain fixed to 1).
#[derive(Clone, Debug, Default)]
pub struct LastLayer {
    w: Vec<f32>,
    row_norms: Vec<f32>,
}

/// What the head keeps for its backward pass, and its output.
#[derive(Clone, Debug, Default)]
pub struct HeadActs {
    rows: usize,
    pre: Vec<Vec<f32>>,
    post: Vec<Vec<f32>>,
    z: Vec<f32>,
    z_norms: Vec<f32>,
    zn: Vec<f32>,
    /// The output: `(R, K)` logits.
    pub logits: Vec<f32>,
    /// Backward's working buffers, kept for their capacity (see [`BackboneScratch`]).
    scratch: HeadScratch,
}

/// Working buffers of [`Network::head_backward`].
#[derive(Clone, Debug, Default)]
struct HeadScratch {
    dzn: Vec<f32>,
    dw_last: Vec<f32>,
    dcur: Vec<f32>,
    dnext: Vec<f32>,
}

/// Makes `buf` `n` long for a kernel that writes every element: reuses the allocation and
/// skips [`resize_zeroed`]'s zeroing (the forward activations are hundreds of MB per step; the
/// teacher's K-wide logits alone are 1.6 GB at ViT-Ti with K = 65,536). The contents are
/// stale until that kernel runs; `tests/model_grad.rs` checks that reused buffers give
/// the bits that fresh ones give.
fn fit(buf: &mut Vec<f32>, n: usize) {
    buf.resize(n, 0.0);
}

/// Makes `buf` a copy of `src`, reusing its allocation when it is large enough.
fn copy_into(buf: &mut Vec<f32>, src: &[f32]) {
    buf.clear();
    buf.extend_from_slice(src);
}

/// Two disjoint mutable ranges of one buffer (`a` must end before `b` starts).
fn two_mut(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "ranges overlap or are out of order");
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.len()])
}

impl BackboneActs {
    /// The residual stream `(B, T, D)` after block `i` (before any norm): block `i + 1`'s
    /// input, or the final norm's input for the last block.
    ///
    /// # Panics
    /// If `i` is not a block of the last forward call.
    pub fn block_output(&self, i: usize) -> &[f32] {
        assert!(i < self.blocks.len(), "block_output: no block {i}");
        if i + 1 == self.blocks.len() {
            &self.x_final
        } else {
            &self.blocks[i + 1].x_in
        }
    }

    /// Block `i`'s attention probabilities `(B, H, T, T)` (softmax rows sum to 1).
    ///
    /// # Panics
    /// If `i` is not a block of the last forward call.
    pub fn attention_probs(&self, i: usize) -> &[f32] {
        assert!(i < self.blocks.len(), "attention_probs: no block {i}");
        &self.blocks[i].probs
    }
}

impl Network {
    /// The parameter layout for `vit` + `head`. Validates both.
    pub fn new(vit: VitConfig, head: HeadConfig) -> Result<Network> {
        vit.validate()?;
        head.validate()?;
        let (d, p, c) = (vit.embed_dim, vit.patch, vit.in_chans);
        let mut t = ParamTable::new();
        t.push("cls_token", &[1, 1, d]);
        t.push("pos_embed", &[1, 1 + vit.ref_grid * vit.ref_grid, d]);
        t.push("patch_embed.proj.weight", &[d, c, p, p]);
        t.push("patch_embed.proj.bias", &[d]);
        for i in 0..vit.depth {
            let b = format!("blocks.{i}");
            t.push(format!("{b}.norm1.weight"), &[d]);
            t.push(format!("{b}.norm1.bias"), &[d]);
            t.push(format!("{b}.attn.qkv.weight"), &[3 * d, d]);
            t.push(format!("{b}.attn.qkv.bias"), &[3 * d]);
            t.push(format!("{b}.attn.proj.weight"), &[d, d]);
            t.push(format!("{b}.attn.proj.bias"), &[d]);
            t.push(format!("{b}.norm2.weight"), &[d]);
            t.push(format!("{b}.norm2.bias"), &[d]);
            t.push(format!("{b}.mlp.fc1.weight"), &[vit.mlp_dim(), d]);
            t.push(format!("{b}.mlp.fc1.bias"), &[vit.mlp_dim()]);
            t.push(format!("{b}.mlp.fc2.weight"), &[d, vit.mlp_dim()]);
            t.push(format!("{b}.mlp.fc2.bias"), &[d]);
        }
        t.push("norm.weight", &[d]);
        t.push("norm.bias", &[d]);
        for (i, (d_in, d_out)) in head_dims(&vit, &head).into_iter().enumerate() {
            t.push(format!("head.mlp.{}.weight", 2 * i), &[d_out, d_in]);
            t.push(format!("head.mlp.{}.bias", 2 * i), &[d_out]);
        }
        t.push("head.last_layer.weight_v", &[head.out_dim, head.bottleneck]);
        Ok(Network {
            vit,
            head,
            table: t,
        })
    }

    /// Fresh parameters as DINO initialises them: Linear weights, `cls_token` and
    /// `pos_embed` truncated normal (std 0.02, cut at +-2 as timm's `trunc_normal_`),
    /// Linear biases 0, LayerNorm weight 1 and bias 0; the patch-embedding convolution and
    /// the last layer keep PyTorch's default (uniform +-1/sqrt(fan_in)), since DINO's
    /// `_init_weights` does not touch them. Every tensor draws from its own stream.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0f32; self.table.total()];
        for (ti, info) in self.table.tensors().iter().enumerate() {
            let mut rng = Stream::new(seed, [ti as u32, 0, 0], Purpose::Init);
            let dst = &mut buf[info.range()];
            let name = info.name.as_str();
            if name.ends_with("norm1.weight")
                || name.ends_with("norm2.weight")
                || name == "norm.weight"
            {
                dst.fill(1.0);
            } else if name == "patch_embed.proj.weight"
                || name == "patch_embed.proj.bias"
                || name.ends_with("weight_v")
            {
                let fan_in = if name.ends_with("weight_v") {
                    self.head.bottleneck
                } else {
                    self.vit.in_chans * self.vit.patch * self.vit.patch
                };
                let bound = 1.0 / (fan_in as f32).sqrt();
                dst.iter_mut().for_each(|x| *x = rng.uniform(-bound, bound));
            } else if name.ends_with(".weight") || name == "cls_token" || name == "pos_embed" {
                dst.iter_mut().for_each(|x| {
                    *x = loop {
                        let z = 0.02 * rng.normal();
                        if (-2.0..=2.0).contains(&z) {
                            break z;
                        }
                    }
                });
            }
            // Biases stay 0.
        }
        buf
    }

    fn r(&self, name: &str) -> std::ops::Range<usize> {
        self.table.info(name).range()
    }

    fn wb<'a>(&self, params: &'a [f32], prefix: &str) -> (&'a [f32], &'a [f32]) {
        (
            &params[self.r(&format!("{prefix}.weight"))],
            &params[self.r(&format!("{prefix}.bias"))],
        )
    }

    fn wb_mut<'a>(&self, grads: &'a mut [f32], prefix: &str) -> (&'a mut [f32], &'a mut [f32]) {
        two_mut(
            grads,
            self.r(&format!("{prefix}.weight")),
            self.r(&format!("{prefix}.bias")),
        )
    }

    /// Stochastic-depth rate of block `i` (linear from 0 to `drop_path`, as DINO).
    pub fn drop_rate(&self, i: usize) -> f32 {
        if self.vit.depth <= 1 {
            return self.vit.drop_path;
        }
        self.vit.drop_path * i as f32 / (self.vit.depth - 1) as f32
    }

    /// Block `i`'s per-sample stochastic-depth masks `[attention branch, MLP branch]`, each
    /// `(batch)`: 0 (dropped) or `1 / (1 - rate)`, drawn from the stream the [`DropPath`]
    /// documentation names; all ones without `drop`. The CPU and GPU backbones both use
    /// these, so they drop the same samples.
    pub fn drop_path_masks(&self, i: usize, drop: Option<DropPath>, batch: usize) -> [Vec<f32>; 2] {
        let (mut m_attn, mut m_mlp) = (vec![1.0; batch], vec![1.0; batch]);
        if let Some(dp) = drop {
            let ctr = |branch: u32| {
                [
                    dp.step as u32,
                    (dp.step >> 32) as u32,
                    (dp.call << 16) | (2 * i as u32 + branch),
                ]
            };
            drop_path_mask(&mut m_attn, self.drop_rate(i), dp.seed, ctr(0));
            drop_path_mask(&mut m_mlp, self.drop_rate(i), dp.seed, ctr(1));
        }
        [m_attn, m_mlp]
    }

    /// The backbone's final LayerNorm applied to `x` `(n, D)` (any residual-stream rows,
    /// e.g. [`BackboneActs::block_output`]), as the forward applies it to the last block's.
    pub fn final_norm(&self, params: &[f32], x: &[f32]) -> Vec<f32> {
        let d = self.vit.embed_dim;
        let n = x.len() / d;
        let (mut y, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        let (w, b) = self.wb(params, "norm");
        layernorm_forward(&mut y, &mut mean, &mut rstd, x, w, b, n, d);
        y
    }

    /// Backbone forward on `images` `(B, C, S, S)` (S = `side`); the output tokens are in
    /// `acts.out` `(B, T, D)`. With `drop`, stochastic depth is on (the student).
    pub fn backbone_forward(
        &self,
        params: &[f32],
        images: &[f32],
        batch: usize,
        side: usize,
        drop: Option<DropPath>,
        acts: &mut BackboneActs,
    ) {
        let v = &self.vit;
        let (d, p, c) = (v.embed_dim, v.patch, v.in_chans);
        let g = side / p;
        let t = 1 + g * g;
        let n = batch * t;
        (acts.batch, acts.grid, acts.tokens) = (batch, g, t);

        // Patch embedding: im2col, then a GEMM with the conv weight as (D, C*p*p).
        let BackboneActs {
            cols,
            blocks,
            x_final,
            norm_mean,
            norm_rstd,
            out,
            scratch,
            ..
        } = acts;
        let BackboneScratch {
            patches,
            pos_view,
            branch,
            ..
        } = scratch;
        resize_zeroed(cols, batch * g * g * c * p * p);
        im2col(cols, images, batch, c, side, p);
        resize_zeroed(patches, batch * g * g * d);
        let (w, b) = self.wb(params, "patch_embed.proj");
        linear_forward(patches, cols, w, Some(b), batch * g * g, c * p * p, d);
        resize_zeroed(pos_view, t * d);
        pos_embed_forward(pos_view, &params[self.r("pos_embed")], g, v.ref_grid, d);
        blocks.resize_with(v.depth, BlockActs::default);
        // The residual stream: block i's `x_in` is written by block i - 1 (block 0's here),
        // the last block writes `x_final`.
        let x0 = match blocks.first_mut() {
            Some(first) => &mut first.x_in,
            None => &mut *x_final,
        };
        resize_zeroed(x0, n * d);
        add_cls_and_pos(
            x0,
            patches,
            &params[self.r("cls_token")],
            pos_view,
            batch,
            g,
            d,
        );
        fit(branch, n * d);

        for i in 0..v.depth {
            let (done, rest) = blocks.split_at_mut(i + 1);
            let ba = &mut done[i];
            let x_out = match rest.first_mut() {
                Some(next) => &mut next.x_in,
                None => &mut *x_final,
            };
            let pre = format!("blocks.{i}");
            // Per-sample masks of the two residual branches (all ones without drop path).
            let [m_attn, m_mlp] = self.drop_path_masks(i, drop, batch);
            fit(&mut ba.ln1, n * d);
            fit(&mut ba.ln1_mean, n);
            fit(&mut ba.ln1_rstd, n);
            let (w, b) = self.wb(params, &format!("{pre}.norm1"));
            layernorm_forward(
                &mut ba.ln1,
                &mut ba.ln1_mean,
                &mut ba.ln1_rstd,
                &ba.x_in,
                w,
                b,
                n,
                d,
            );
            fit(&mut ba.qkv, n * 3 * d);
            let (w, b) = self.wb(params, &format!("{pre}.attn.qkv"));
            linear_forward(&mut ba.qkv, &ba.ln1, w, Some(b), n, d, 3 * d);
            fit(&mut ba.probs, batch * v.heads * t * t);
            fit(&mut ba.att, n * d);
            attention_forward(&mut ba.att, &mut ba.probs, &ba.qkv, batch, t, d, v.heads);
            let (w, b) = self.wb(params, &format!("{pre}.attn.proj"));
            linear_forward(branch, &ba.att, w, Some(b), n, d, d);
            fit(&mut ba.x_mid, n * d);
            residual_add_scaled_into(&mut ba.x_mid, &ba.x_in, branch, &m_attn, batch, t * d);

            fit(&mut ba.ln2, n * d);
            fit(&mut ba.ln2_mean, n);
            fit(&mut ba.ln2_rstd, n);
            let (w, b) = self.wb(params, &format!("{pre}.norm2"));
            layernorm_forward(
                &mut ba.ln2,
                &mut ba.ln2_mean,
                &mut ba.ln2_rstd,
                &ba.x_mid,
                w,
                b,
                n,
                d,
            );
            let hdim = v.mlp_dim();
            fit(&mut ba.h, n * hdim);
            fit(&mut ba.a, n * hdim);
            let (w, b) = self.wb(params, &format!("{pre}.mlp.fc1"));
            linear_gelu_forward(&mut ba.h, &mut ba.a, &ba.ln2, w, b, n, d, hdim);
            let (w, b) = self.wb(params, &format!("{pre}.mlp.fc2"));
            linear_forward(branch, &ba.a, w, Some(b), n, hdim, d);
            fit(x_out, n * d);
            residual_add_scaled_into(x_out, &ba.x_mid, branch, &m_mlp, batch, t * d);
            (ba.mask_attn, ba.mask_mlp) = (m_attn, m_mlp);
        }
        fit(out, n * d);
        fit(norm_mean, n);
        fit(norm_rstd, n);
        let (w, b) = self.wb(params, "norm");
        layernorm_forward(out, norm_mean, norm_rstd, x_final, w, b, n, d);
    }

    /// Backbone backward: accumulates parameter gradients into `grads` given `dout`
    /// `(B, T, D)`, the gradient w.r.t. `acts.out`. `acts` is mutable only for its working
    /// buffers; what the forward saved is read, not changed.
    pub fn backbone_backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut BackboneActs,
        dout: &[f32],
    ) {
        let mut scratch = std::mem::take(&mut acts.scratch);
        self.backbone_backward_with(params, grads, acts, dout, &mut scratch);
        acts.scratch = scratch;
    }

    fn backbone_backward_with(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &BackboneActs,
        dout: &[f32],
        scratch: &mut BackboneScratch,
    ) {
        let v = &self.vit;
        let (d, p, c) = (v.embed_dim, v.patch, v.in_chans);
        let (batch, g, t) = (acts.batch, acts.grid, acts.tokens);
        let n = batch * t;
        let hdim = v.mlp_dim();
        let BackboneScratch {
            dx,
            dbranch,
            dh,
            dln,
            datt,
            dqkv,
            dpatches,
            dpos_view,
            ..
        } = scratch;

        resize_zeroed(dx, n * d);
        {
            let w = &params[self.r("norm.weight")];
            let (dw, db) = self.wb_mut(grads, "norm");
            layernorm_backward(
                dx,
                dw,
                db,
                dout,
                &acts.x_final,
                &acts.norm_mean,
                &acts.norm_rstd,
                w,
                n,
                d,
            );
        }
        // Each is overwritten in the loop before it is read (the `_into` kernels).
        fit(dbranch, n * d);
        fit(dh, n * hdim);
        fit(dln, n * d);
        fit(datt, n * d);
        fit(dqkv, n * 3 * d);
        for i in (0..v.depth).rev() {
            let ba = &acts.blocks[i];
            let pre = format!("blocks.{i}");
            // x_out = x_mid + m_mlp * fc2(gelu(fc1(ln2(x_mid)))); dx holds d x_out.
            residual_add_scaled_backward_into(dbranch, dx, &ba.mask_mlp, batch, t * d);
            {
                // Through fc2 and the GELU: dh = (dbranch W2) * gelu'(h).
                let w = &params[self.r(&format!("{pre}.mlp.fc2.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.mlp.fc2"));
                let (a, h) = (&ba.a, &ba.h);
                linear_gelu_backward_into(dh, dw, Some(db), dbranch, a, w, h, n, hdim, d);
            }
            {
                let w = &params[self.r(&format!("{pre}.mlp.fc1.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.mlp.fc1"));
                linear_backward_into(Some(dln), dw, Some(db), dh, &ba.ln2, w, n, d, hdim);
            }
            {
                // dx becomes d x_mid: the residual path plus the norm's input gradient.
                let w = &params[self.r(&format!("{pre}.norm2.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.norm2"));
                layernorm_backward(
                    dx,
                    dw,
                    db,
                    dln,
                    &ba.x_mid,
                    &ba.ln2_mean,
                    &ba.ln2_rstd,
                    w,
                    n,
                    d,
                );
            }
            // x_mid = x_in + m_attn * proj(attention(qkv(ln1(x_in)))).
            residual_add_scaled_backward_into(dbranch, dx, &ba.mask_attn, batch, t * d);
            {
                let w = &params[self.r(&format!("{pre}.attn.proj.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.attn.proj"));
                linear_backward_into(Some(datt), dw, Some(db), dbranch, &ba.att, w, n, d, d);
            }
            attention_backward_into(dqkv, datt, &ba.qkv, &ba.probs, batch, t, d, v.heads);
            {
                let w = &params[self.r(&format!("{pre}.attn.qkv.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.attn.qkv"));
                linear_backward_into(Some(dln), dw, Some(db), dqkv, &ba.ln1, w, n, d, 3 * d);
            }
            {
                let w = &params[self.r(&format!("{pre}.norm1.weight"))];
                let (dw, db) = self.wb_mut(grads, &format!("{pre}.norm1"));
                layernorm_backward(
                    dx,
                    dw,
                    db,
                    dln,
                    &ba.x_in,
                    &ba.ln1_mean,
                    &ba.ln1_rstd,
                    w,
                    n,
                    d,
                );
            }
        }
        // Tokens = [cls; patches] + pos_view.
        resize_zeroed(dpatches, batch * g * g * d);
        resize_zeroed(dpos_view, t * d);
        {
            let (dcls_r, dpos_r) = (self.r("cls_token"), self.r("pos_embed"));
            let dcls = &mut grads[dcls_r];
            add_cls_and_pos_backward(dpatches, dcls, dpos_view, dx, batch, g, d);
            pos_embed_backward(&mut grads[dpos_r], dpos_view, g, v.ref_grid, d);
        }
        let w = &params[self.r("patch_embed.proj.weight")];
        let (dw, db) = self.wb_mut(grads, "patch_embed.proj");
        linear_backward(
            None,
            dw,
            Some(db),
            dpatches,
            &acts.cols,
            w,
            batch * g * g,
            c * p * p,
            d,
        );
    }

    /// The last layer's weight-normalised matrix for `params` (compute once per step and
    /// per network).
    pub fn last_layer(&self, params: &[f32]) -> LastLayer {
        let mut l = LastLayer::default();
        self.last_layer_into(params, &mut l);
        l
    }

    /// [`Network::last_layer`] into `l`, reusing its buffers.
    pub fn last_layer_into(&self, params: &[f32], l: &mut LastLayer) {
        let (k, db) = (self.head.out_dim, self.head.bottleneck);
        resize_zeroed(&mut l.w, k * db);
        resize_zeroed(&mut l.row_norms, k);
        weight_norm_forward(
            &mut l.w,
            &mut l.row_norms,
            &params[self.r("head.last_layer.weight_v")],
            k,
            db,
        );
    }

    /// Head forward on `rows` token vectors `x` `(R, D)`; logits in `acts.logits` `(R, K)`.
    pub fn head_forward(
        &self,
        params: &[f32],
        last: &LastLayer,
        x: &[f32],
        rows: usize,
        acts: &mut HeadActs,
    ) {
        let dims = head_dims(&self.vit, &self.head);
        acts.rows = rows;
        acts.pre.resize_with(dims.len(), Vec::new);
        acts.post.resize_with(dims.len() - 1, Vec::new);
        for (i, &(d_in, d_out)) in dims.iter().enumerate() {
            let (w, b) = self.wb(params, &format!("head.mlp.{}", 2 * i));
            // post[i - 1] is this layer's input, post[i] its output after the GELU.
            let (done, rest) = acts.post.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &done[i - 1] };
            let pre = &mut acts.pre[i];
            fit(pre, rows * d_out);
            match rest.first_mut() {
                Some(post) => {
                    fit(post, rows * d_out);
                    linear_gelu_forward(pre, post, input, w, b, rows, d_in, d_out);
                }
                None => linear_forward(pre, input, w, Some(b), rows, d_in, d_out),
            }
        }
        let db = self.head.bottleneck;
        copy_into(&mut acts.z, &acts.pre[dims.len() - 1]);
        fit(&mut acts.zn, rows * db);
        resize_zeroed(&mut acts.z_norms, rows);
        l2norm_forward(&mut acts.zn, &mut acts.z_norms, &acts.z, rows, db);
        fit(&mut acts.logits, rows * self.head.out_dim);
        linear_forward(
            &mut acts.logits,
            &acts.zn,
            &last.w,
            None,
            rows,
            db,
            self.head.out_dim,
        );
    }

    /// Head backward: accumulates parameter gradients into `grads` and the input gradient
    /// into `dx` `(R, D)` given `dlogits` `(R, K)`. `acts` is mutable only for its working
    /// buffers.
    #[allow(clippy::too_many_arguments)] // one buffer per operand, as every backward here
    pub fn head_backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        last: &LastLayer,
        acts: &mut HeadActs,
        x: &[f32],
        dlogits: &[f32],
        dx: &mut [f32],
    ) {
        let mut scratch = std::mem::take(&mut acts.scratch);
        self.head_backward_with(params, grads, last, acts, x, dlogits, dx, &mut scratch);
        acts.scratch = scratch;
    }

    #[allow(clippy::too_many_arguments)]
    fn head_backward_with(
        &self,
        params: &[f32],
        grads: &mut [f32],
        last: &LastLayer,
        acts: &HeadActs,
        x: &[f32],
        dlogits: &[f32],
        dx: &mut [f32],
        scratch: &mut HeadScratch,
    ) {
        let dims = head_dims(&self.vit, &self.head);
        let (rows, db, k) = (acts.rows, self.head.bottleneck, self.head.out_dim);
        let HeadScratch {
            dzn,
            dw_last,
            dcur,
            dnext,
        } = scratch;
        fit(dzn, rows * db);
        resize_zeroed(dw_last, k * db);
        linear_backward_into(
            Some(dzn),
            dw_last,
            None,
            dlogits,
            &acts.zn,
            &last.w,
            rows,
            db,
            k,
        );
        let v_range = self.r("head.last_layer.weight_v");
        let v = &params[v_range.clone()];
        weight_norm_backward(&mut grads[v_range], dw_last, v, &last.row_norms, k, db);
        resize_zeroed(dcur, rows * db);
        l2norm_backward(dcur, dzn, &acts.z, &acts.z_norms, rows, db);
        // dcur is d pre[i], from the last layer (whose output z has no GELU) down.
        for (i, &(d_in, d_out)) in dims.iter().enumerate().rev() {
            let w = &params[self.r(&format!("head.mlp.{}.weight", 2 * i))];
            let (dw, dbias) = self.wb_mut(grads, &format!("head.mlp.{}", 2 * i));
            if i == 0 {
                // The input gradient is added to the caller's `dx`.
                let g = Some(&mut *dx);
                linear_backward(g, dw, Some(dbias), dcur, x, w, rows, d_in, d_out);
            } else {
                // Through this Linear and the GELU before it: d pre[i - 1].
                fit(dnext, rows * d_in);
                let (a, h) = (&acts.post[i - 1], &acts.pre[i - 1]);
                let bias_grad = Some(dbias);
                linear_gelu_backward_into(dnext, dw, bias_grad, dcur, a, w, h, rows, d_in, d_out);
                std::mem::swap(dcur, dnext);
            }
        }
    }
}

/// `(d_in, d_out)` of each head Linear before the L2 normalisation.
fn head_dims(vit: &VitConfig, head: &HeadConfig) -> Vec<(usize, usize)> {
    let d = vit.embed_dim;
    if head.layers == 1 {
        return vec![(d, head.bottleneck)];
    }
    let mut dims = vec![(d, head.hidden)];
    dims.extend(std::iter::repeat((head.hidden, head.hidden)).take(head.layers - 2));
    dims.push((head.hidden, head.bottleneck));
    dims
}
