//! The ViT backbone's forward and backward passes on the GPU, composed from the launchers
//! of [`super::layers`], [`super::blas`] and [`super::attention`] exactly as its CPU twins
//! [`Network::backbone_forward`] and [`Network::backbone_backward`] compose the CPU layers.
//! Forward: im2col, the patch GEMM, the resampled position embedding and the CLS token,
//! then per block layernorm, qkv GEMM, fused attention, proj GEMM, residual add, layernorm,
//! fc1 GEMM, bias + exact GELU, fc2 GEMM, residual add, and the final layernorm. Every
//! activation the backward needs is kept in a [`GpuBackboneActs`]. Backward: the same
//! layers in reverse, accumulating the parameter gradients into an fp32 flat buffer with
//! the master's layout ([`GpuBackbone::backward`]).
//!
//! Parameters: the fp32 master copy is one flat buffer with the CPU's layout
//! ([`Network::table`]); the GEMMs read a bf16 copy of it made on the device
//! ([`GpuBackbone::refresh_bf16`]). LayerNorm weights, the CLS token, the position
//! embedding and the fc1 bias are read in fp32 from the master, as their launchers want.
//!
//! Stochastic depth: given a [`DropPath`], the forward scales each sample's residual
//! branches by the CPU twin's masks ([`Network::drop_path_masks`], drawn on the host: two
//! floats per image per block), kept in the activations for the backward. Without one
//! (the teacher), the masks are ones.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::attention;
use super::blas::Blas;
use super::check::{self, compare_to_scale, Inputs, KernelCheck, Outcome};
use super::context::Gpu;
use super::layers::{self, ImageElement};
use super::optim;
use super::pool::{Buf, DeviceSlice, DeviceSliceMut};
use crate::error::{Error, Result};
use crate::model::config::{Arch, HeadConfig, VitConfig};
use crate::model::params::ParamTable;
use crate::model::vit::{BackboneActs, DropPath, Network};

/// Copies `src` into `dst` (same length) on the compute stream: a device-to-device copy,
/// or a host copy under the emulator, whose device addresses are host memory.
fn copy_device<T: DeviceRepr>(
    gpu: &Gpu,
    dst: &mut impl DeviceSliceMut<T>,
    src: &impl DeviceSlice<T>,
) -> Result<()> {
    assert_eq!(dst.len(), src.len(), "copy_device: lengths differ");
    let n = src.len();
    if n == 0 {
        return Ok(());
    }
    if gpu.is_emulated() {
        // SAFETY: under the emulator both addresses are host blocks holding n elements of T
        // (checked above), and a `&mut` destination cannot alias the source.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr() as *const T, dst.ptr() as *mut T, n) };
        return Ok(());
    }
    let stream = gpu.stream()?;
    // SAFETY: both ranges hold n elements of T (checked above); the copy is ordered on the
    // compute stream with every kernel that reads or writes them.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            dst.ptr(),
            src.ptr(),
            n * std::mem::size_of::<T>(),
            stream.cu_stream(),
        )
    }
    .map_err(|e| Error::cuda("a device-to-device copy", e))
}

/// Zeroes `dst` on the compute stream (a memset; a host write under the emulator).
pub(crate) fn zero_device<T: DeviceRepr>(
    gpu: &Gpu,
    dst: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let bytes = dst.len() * std::mem::size_of::<T>();
    if bytes == 0 {
        return Ok(());
    }
    if gpu.is_emulated() {
        // SAFETY: under the emulator the address is a host block of `bytes` bytes, and
        // all-zero bytes are 0 in bf16 and f32 alike.
        unsafe { std::ptr::write_bytes(dst.ptr() as *mut u8, 0, bytes) };
        return Ok(());
    }
    let stream = gpu.stream()?;
    // SAFETY: the range holds `bytes` bytes of the slice; the memset is ordered on the
    // compute stream with every kernel that reads or writes it.
    unsafe { cudarc::driver::result::memset_d8_async(dst.ptr(), 0, bytes, stream.cu_stream()) }
        .map_err(|e| Error::cuda("zeroing device memory", e))
}

/// The backward of a Linear whose forward was `y = x W^T + b` (`(m, k, n)`: `x` `(m, k)`,
/// `W` `(n, k)`): `dx = dy W` **written** (when asked for), `dW +=` and `db +=` into their
/// slices of the fp32 `grads`. The twin's [`crate::cpu::linear::linear_backward`] into a
/// zeroed `dx`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    gpu: &Gpu,
    blas: &Blas,
    lin: &Linear,
    half: &Buf<bf16>,
    grads: &mut Buf<f32>,
    dx: Option<&mut Buf<bf16>>,
    dy: &impl DeviceSlice<bf16>,
    x: &impl DeviceSlice<bf16>,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    if let Some(dx) = dx {
        blas.linear_backward_data(
            gpu,
            dx,
            dy,
            &half.slice(lin.weight.clone()),
            (m, k, n),
            false,
        )?;
    }
    blas.linear_backward_weight(
        gpu,
        &mut grads.slice_mut(lin.weight.clone()),
        dy,
        x,
        (m, k, n),
    )?;
    layers::bias_backward(gpu, &mut grads.slice_mut(lin.bias.clone()), dy, m, n)
}

/// A LayerNorm's backward: `dx +=` (bf16) and its weight and bias gradients `+=` into
/// `grads`. The launcher takes both parameter gradients at once and a buffer lends one
/// writable slice at a time, so the bias gradient goes through a copy of its `d` floats
/// (copied out, accumulated, copied back: still an accumulation).
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    gpu: &Gpu,
    dx: &mut Buf<bf16>,
    grads: &mut Buf<f32>,
    norm: &Norm,
    master: &Buf<f32>,
    dy: &impl DeviceSlice<bf16>,
    x: &Buf<bf16>,
    mean: &Buf<f32>,
    rstd: &Buf<f32>,
    (n, d): (usize, usize),
) -> Result<()> {
    let mut db = gpu.pool().alloc::<f32>(norm.bias.len())?;
    copy_device(gpu, &mut db, &grads.slice(norm.bias.clone()))?;
    layers::layernorm_backward(
        gpu,
        dx,
        &mut grads.slice_mut(norm.weight.clone()),
        &mut db,
        dy,
        x,
        mean,
        rstd,
        &master.slice(norm.weight.clone()),
        n,
        d,
    )?;
    copy_device(gpu, &mut grads.slice_mut(norm.bias.clone()), &db)
}

/// A Linear whose GEMM adds the bias: where its weight and bias live in the flat buffers
/// (the GEMM reads both from the bf16 copy).
struct Linear {
    weight: Range<usize>,
    bias: Range<usize>,
}

impl Linear {
    fn new(table: &ParamTable, prefix: &str) -> Linear {
        Linear {
            weight: table.info(&format!("{prefix}.weight")).range(),
            bias: table.info(&format!("{prefix}.bias")).range(),
        }
    }
}

/// A LayerNorm's weight and bias in the flat buffer (read in fp32).
struct Norm {
    weight: Range<usize>,
    bias: Range<usize>,
}

impl Norm {
    fn new(table: &ParamTable, prefix: &str) -> Norm {
        Norm {
            weight: table.info(&format!("{prefix}.weight")).range(),
            bias: table.info(&format!("{prefix}.bias")).range(),
        }
    }
}

/// One transformer block's parameters. fc1's bias is added by `bias_gelu_forward` in fp32,
/// so it has no bf16 copy.
struct BlockParams {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    fc1_weight: Range<usize>,
    fc1_bias: Range<usize>,
    fc2: Linear,
}

/// The backbone's parameters on the device and the code that runs its forward pass.
pub struct GpuBackbone {
    vit: VitConfig,
    /// The network (for its stochastic-depth masks).
    net: Network,
    /// fp32 master parameters, the whole flat buffer of [`Network::table`].
    pub(crate) master: Buf<f32>,
    /// `master` rounded to bf16 (same layout): the GEMMs' weights.
    pub(crate) half: Buf<bf16>,
    cls: Range<usize>,
    pos: Range<usize>,
    patch: Linear,
    blocks: Vec<BlockParams>,
    norm: Norm,
    /// The position embedding's `(g, G)` resampling matrix per view grid `g`, uploaded once.
    resample: Mutex<HashMap<usize, Buf<f32>>>,
}

/// What one block keeps for its backward pass (`n = B * T` rows; bf16 unless stated).
pub struct GpuBlockActs {
    /// The block's input `(n, D)`.
    pub x_in: Buf<bf16>,
    /// `norm1(x_in)` `(n, D)`.
    pub ln1: Buf<bf16>,
    /// norm1's row means `(n)`, fp32.
    pub ln1_mean: Buf<f32>,
    /// norm1's row reciprocal standard deviations `(n)`, fp32.
    pub ln1_rstd: Buf<f32>,
    /// The qkv projection `(n, 3D)`.
    pub qkv: Buf<bf16>,
    /// The attention output before proj `(n, D)`.
    pub att: Buf<bf16>,
    /// The attention's log-sum-exp per row `(B, H, T)`, fp32.
    pub lse: Buf<f32>,
    /// `x_in + proj(att)` `(n, D)`.
    pub x_mid: Buf<bf16>,
    /// `norm2(x_mid)` `(n, D)`.
    pub ln2: Buf<bf16>,
    /// norm2's row means `(n)`, fp32.
    pub ln2_mean: Buf<f32>,
    /// norm2's row reciprocal standard deviations `(n)`, fp32.
    pub ln2_rstd: Buf<f32>,
    /// fc1's GEMM output before its bias `(n, 4D)` (`bias_gelu_backward` reads it).
    pub h: Buf<bf16>,
    /// `gelu(h + fc1.bias)` `(n, 4D)`, fc2's input.
    pub a: Buf<bf16>,
}

/// What the backbone keeps for its backward pass.
pub struct GpuBackboneActs {
    /// Images in this call.
    pub batch: usize,
    /// Patches per side of these views.
    pub grid: usize,
    /// Tokens per image, `1 + grid^2`.
    pub tokens: usize,
    /// The im2col rows `(B*g*g, C*p*p)`, the patch GEMM's input.
    pub cols: Buf<bf16>,
    /// The per-sample residual masks `(depth, 2, B)` fp32, block by block the attention
    /// branch's then the MLP branch's ([`Network::drop_path_masks`]; all ones without
    /// stochastic depth).
    pub masks: Buf<f32>,
    /// Per block.
    pub blocks: Vec<GpuBlockActs>,
    /// The last block's output `(n, D)`, the final norm's input.
    pub x_final: Buf<bf16>,
    /// The final norm's row means `(n)`, fp32.
    pub norm_mean: Buf<f32>,
    /// The final norm's row reciprocal standard deviations `(n)`, fp32.
    pub norm_rstd: Buf<f32>,
}

impl GpuBackbone {
    /// Uploads `params` (the whole flat buffer of `net`, fp32) as the master copy and makes
    /// its bf16 copy.
    pub fn new(gpu: &Gpu, net: &Network, params: &[f32]) -> Result<GpuBackbone> {
        let t = &net.table;
        assert_eq!(
            params.len(),
            t.total(),
            "GpuBackbone::new: params must be the network's flat buffer"
        );
        let pool = gpu.pool();
        let blocks = (0..net.vit.depth)
            .map(|i| {
                let b = format!("blocks.{i}");
                BlockParams {
                    norm1: Norm::new(t, &format!("{b}.norm1")),
                    qkv: Linear::new(t, &format!("{b}.attn.qkv")),
                    proj: Linear::new(t, &format!("{b}.attn.proj")),
                    norm2: Norm::new(t, &format!("{b}.norm2")),
                    fc1_weight: t.info(&format!("{b}.mlp.fc1.weight")).range(),
                    fc1_bias: t.info(&format!("{b}.mlp.fc1.bias")).range(),
                    fc2: Linear::new(t, &format!("{b}.mlp.fc2")),
                }
            })
            .collect();
        let mut model = GpuBackbone {
            vit: net.vit.clone(),
            net: net.clone(),
            master: pool.upload(params)?,
            half: pool.alloc::<bf16>(params.len())?,
            cls: t.info("cls_token").range(),
            pos: t.info("pos_embed").range(),
            patch: Linear::new(t, "patch_embed.proj"),
            blocks,
            norm: Norm::new(t, "norm"),
            resample: Mutex::new(HashMap::new()),
        };
        model.refresh_bf16(gpu)?;
        Ok(model)
    }

    /// The fp32 master parameters (the flat buffer of [`Network::table`]).
    pub fn master(&self) -> &Buf<f32> {
        &self.master
    }

    /// The fp32 master parameters, for the optimiser. Call [`refresh_bf16`](Self::refresh_bf16)
    /// after changing them: the GEMMs read the bf16 copy.
    pub fn master_mut(&mut self) -> &mut Buf<f32> {
        &mut self.master
    }

    /// Remakes the bf16 copy of the master parameters on the device (one rounding pass over
    /// the flat buffer). Not needed after the optimizer's kernels, which write the bf16 copy
    /// of what they change.
    pub fn refresh_bf16(&mut self, gpu: &Gpu) -> Result<()> {
        optim::round_bf16(gpu, &self.master, &mut self.half)
    }

    /// Patches per side of a `side`-pixel view; an error when the view is not a positive
    /// multiple of the patch.
    fn grid(&self, side: usize) -> Result<usize> {
        let p = self.vit.patch;
        if side < p || side % p != 0 {
            return Err(Error::bad_config(
                "model.patch",
                format!(
                    "a view of {side} pixels is not a positive multiple of the {p}-pixel \
                     patch; pick crop sizes that are"
                ),
            ));
        }
        Ok(side / p)
    }

    /// The `(g, G)` position-resampling matrix for grid `g` from `cache`, uploaded on first
    /// use.
    fn resample_matrix<'c>(
        &self,
        gpu: &Gpu,
        cache: &'c mut HashMap<usize, Buf<f32>>,
        g: usize,
    ) -> Result<&'c Buf<f32>> {
        Ok(match cache.entry(g) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(layers::pos_resample_matrix(gpu, g, self.vit.ref_grid)?)
            }
        })
    }

    /// The backbone forward on `images` `(B, C, S, S)` (S = `side`): returns the tokens
    /// after the final norm `(B, T, D)` bf16 and what the backward pass needs.
    pub fn forward<T: ImageElement>(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        images: &impl DeviceSlice<T>,
        batch: usize,
        side: usize,
        drop: Option<DropPath>,
    ) -> Result<(Buf<bf16>, GpuBackboneActs)> {
        let g = self.grid(side)?;
        let mut out = gpu
            .pool()
            .alloc::<bf16>(batch * (1 + g * g) * self.vit.embed_dim)?;
        let acts = self.forward_into(gpu, blas, &mut out, images, batch, side, drop)?;
        Ok((out, acts))
    }

    /// [`forward`](Self::forward) into a given output `(B, T, D)` bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into<T: ImageElement>(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        out: &mut impl DeviceSliceMut<bf16>,
        images: &impl DeviceSlice<T>,
        batch: usize,
        side: usize,
        drop: Option<DropPath>,
    ) -> Result<GpuBackboneActs> {
        let v = &self.vit;
        let (d, p, c, heads, hdim) = (v.embed_dim, v.patch, v.in_chans, v.heads, v.mlp_dim());
        let g = self.grid(side)?;
        let t = 1 + g * g;
        let n = batch * t;
        assert_eq!(
            images.len(),
            batch * c * side * side,
            "GpuBackbone::forward: images must be (B, C, S, S)"
        );
        assert_eq!(
            out.len(),
            n * d,
            "GpuBackbone::forward: out must be (B, T, D)"
        );
        let pool = gpu.pool();
        let (m, h16) = (&self.master, &self.half);

        // Patch embedding: im2col, then a GEMM with the conv weight as (D, C*p*p).
        // images (B, C, S, S) -> cols (B*g*g, C*p*p) -> patches (B*g*g, D)
        let mut cols = pool.alloc::<bf16>(batch * g * g * c * p * p)?;
        layers::im2col(gpu, &mut cols, images, batch, c, side, p)?;
        let mut patches = pool.alloc::<bf16>(batch * g * g * d)?;
        blas.linear_forward(
            gpu,
            &mut patches,
            &cols,
            &h16.slice(self.patch.weight.clone()),
            Some(h16.slice(self.patch.bias.clone())),
            (batch * g * g, c * p * p, d),
        )?;
        // pos (1 + G*G, D) -> pos_view (1 + g*g, D), fp32
        let mut pos_view = pool.alloc::<f32>(t * d)?;
        {
            let mut cache = self.resample.lock().expect("resample cache lock");
            let resample = self.resample_matrix(gpu, &mut cache, g)?;
            layers::pos_embed_forward(
                gpu,
                &mut pos_view,
                &m.slice(self.pos.clone()),
                resample,
                g,
                v.ref_grid,
                d,
            )?;
        }
        // -> x (B, T, D)
        let mut x = pool.alloc::<bf16>(n * d)?;
        layers::add_cls_and_pos(
            gpu,
            &mut x,
            &patches,
            &m.slice(self.cls.clone()),
            &pos_view,
            batch,
            g,
            d,
        )?;
        std::mem::drop(patches);

        // Stochastic depth: the CPU's masks, drawn on the host (2 * depth * B floats).
        let host_masks: Vec<f32> = (0..self.blocks.len())
            .flat_map(|i| self.net.drop_path_masks(i, drop, batch).concat())
            .collect();
        let masks = pool.upload(&host_masks)?;
        let mask_of = |i: usize, branch: usize| {
            masks.slice((2 * i + branch) * batch..(2 * i + branch + 1) * batch)
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut branch = pool.alloc::<bf16>(n * d)?;
        for (i, bp) in self.blocks.iter().enumerate() {
            let x_in = x;
            let mut ln1 = pool.alloc::<bf16>(n * d)?;
            let mut ln1_mean = pool.alloc::<f32>(n)?;
            let mut ln1_rstd = pool.alloc::<f32>(n)?;
            layers::layernorm_forward(
                gpu,
                &mut ln1,
                &mut ln1_mean,
                &mut ln1_rstd,
                &x_in,
                &m.slice(bp.norm1.weight.clone()),
                &m.slice(bp.norm1.bias.clone()),
                n,
                d,
            )?;
            // (n, D) -> (n, 3D)
            let mut qkv = pool.alloc::<bf16>(n * 3 * d)?;
            blas.linear_forward(
                gpu,
                &mut qkv,
                &ln1,
                &h16.slice(bp.qkv.weight.clone()),
                Some(h16.slice(bp.qkv.bias.clone())),
                (n, d, 3 * d),
            )?;
            // (B, T, 3D) -> (B, T, D), lse (B, H, T)
            let mut att = pool.alloc::<bf16>(n * d)?;
            let mut lse = pool.alloc::<f32>(batch * heads * t)?;
            attention::attention_forward(gpu, &mut att, &mut lse, &qkv, batch, t, d, heads)?;
            blas.linear_forward(
                gpu,
                &mut branch,
                &att,
                &h16.slice(bp.proj.weight.clone()),
                Some(h16.slice(bp.proj.bias.clone())),
                (n, d, d),
            )?;
            // x_mid = x_in + mask * proj(att); x_in is kept for norm1's backward.
            let mut x_mid = pool.alloc::<bf16>(n * d)?;
            copy_device(gpu, &mut x_mid, &x_in)?;
            layers::residual_add_scaled(gpu, &mut x_mid, &branch, &mask_of(i, 0), batch, t * d)?;

            let mut ln2 = pool.alloc::<bf16>(n * d)?;
            let mut ln2_mean = pool.alloc::<f32>(n)?;
            let mut ln2_rstd = pool.alloc::<f32>(n)?;
            layers::layernorm_forward(
                gpu,
                &mut ln2,
                &mut ln2_mean,
                &mut ln2_rstd,
                &x_mid,
                &m.slice(bp.norm2.weight.clone()),
                &m.slice(bp.norm2.bias.clone()),
                n,
                d,
            )?;
            // (n, D) -> h (n, 4D) without bias -> a = gelu(h + b) -> (n, D)
            let mut h = pool.alloc::<bf16>(n * hdim)?;
            blas.linear_forward(
                gpu,
                &mut h,
                &ln2,
                &h16.slice(bp.fc1_weight.clone()),
                None,
                (n, d, hdim),
            )?;
            let mut a = pool.alloc::<bf16>(n * hdim)?;
            layers::bias_gelu_forward(gpu, &mut a, &h, &m.slice(bp.fc1_bias.clone()), n, hdim)?;
            blas.linear_forward(
                gpu,
                &mut branch,
                &a,
                &h16.slice(bp.fc2.weight.clone()),
                Some(h16.slice(bp.fc2.bias.clone())),
                (n, hdim, d),
            )?;
            // x_out = x_mid + mask * fc2(a); x_mid is kept for norm2's backward.
            x = pool.alloc::<bf16>(n * d)?;
            copy_device(gpu, &mut x, &x_mid)?;
            layers::residual_add_scaled(gpu, &mut x, &branch, &mask_of(i, 1), batch, t * d)?;
            blocks.push(GpuBlockActs {
                x_in,
                ln1,
                ln1_mean,
                ln1_rstd,
                qkv,
                att,
                lse,
                x_mid,
                ln2,
                ln2_mean,
                ln2_rstd,
                h,
                a,
            });
        }

        let mut norm_mean = pool.alloc::<f32>(n)?;
        let mut norm_rstd = pool.alloc::<f32>(n)?;
        layers::layernorm_forward(
            gpu,
            out,
            &mut norm_mean,
            &mut norm_rstd,
            &x,
            &m.slice(self.norm.weight.clone()),
            &m.slice(self.norm.bias.clone()),
            n,
            d,
        )?;
        Ok(GpuBackboneActs {
            batch,
            grid: g,
            tokens: t,
            cols,
            masks,
            blocks,
            x_final: x,
            norm_mean,
            norm_rstd,
        })
    }

    /// The backbone backward: given `dout` `(B, T, D)` bf16, the gradient with respect to
    /// [`forward`](Self::forward)'s output, **accumulates** the parameter gradients into
    /// `grads` (fp32, the flat layout of [`Network::table`], like the master), in the order
    /// of its twin [`Network::backbone_backward`]: the final norm, the blocks in reverse
    /// (MLP branch, norm2, attention branch, norm1, each branch with the forward's masks),
    /// then the CLS token, the position embedding and the patch embedding (whose input, the
    /// images, needs no gradient). The residual-stream gradient is kept in bf16, as the
    /// layer kernels take it. Tensors outside the backbone (the head's) are not touched.
    pub fn backward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        acts: &GpuBackboneActs,
        dout: &impl DeviceSlice<bf16>,
        grads: &mut Buf<f32>,
    ) -> Result<()> {
        let v = &self.vit;
        let (d, p, c, heads, hdim) = (v.embed_dim, v.patch, v.in_chans, v.heads, v.mlp_dim());
        let (batch, g, t) = (acts.batch, acts.grid, acts.tokens);
        let n = batch * t;
        assert_eq!(
            acts.blocks.len(),
            self.blocks.len(),
            "GpuBackbone::backward: acts are not from this backbone"
        );
        assert_eq!(
            dout.len(),
            n * d,
            "GpuBackbone::backward: dout must be (B, T, D)"
        );
        assert_eq!(
            grads.len(),
            self.master.len(),
            "GpuBackbone::backward: grads must be the network's flat buffer"
        );
        let pool = gpu.pool();
        let (m, h16) = (&self.master, &self.half);

        // dx: the gradient of the residual stream, accumulated by each layernorm backward.
        let mut dx = pool.alloc::<bf16>(n * d)?;
        zero_device(gpu, &mut dx)?;
        norm_backward(
            gpu,
            &mut dx,
            grads,
            &self.norm,
            m,
            dout,
            &acts.x_final,
            &acts.norm_mean,
            &acts.norm_rstd,
            (n, d),
        )?;
        let mut dbranch = pool.alloc::<bf16>(n * d)?;
        let mut da = pool.alloc::<bf16>(n * hdim)?;
        let mut dh = pool.alloc::<bf16>(n * hdim)?;
        let mut dln = pool.alloc::<bf16>(n * d)?;
        let mut datt = pool.alloc::<bf16>(n * d)?;
        let mut dqkv = pool.alloc::<bf16>(n * 3 * d)?;
        for (i, (bp, ba)) in self.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            let mask_of = |branch: usize| {
                acts.masks
                    .slice((2 * i + branch) * batch..(2 * i + branch + 1) * batch)
            };
            // x_out = x_mid + mask * fc2(gelu(fc1(ln2(x_mid)) + b)); dx holds d x_out.
            zero_device(gpu, &mut dbranch)?;
            layers::residual_add_scaled_backward(
                gpu,
                &mut dbranch,
                &dx,
                &mask_of(1),
                batch,
                t * d,
            )?;
            // (n, D) -> da (n, 4D)
            linear_backward(
                gpu,
                blas,
                &bp.fc2,
                h16,
                grads,
                Some(&mut da),
                &dbranch,
                &ba.a,
                (n, hdim, d),
            )?;
            // da -> dh = d(h + b) (n, 4D), fc1.bias +=
            layers::bias_gelu_backward(
                gpu,
                &mut dh,
                &mut grads.slice_mut(bp.fc1_bias.clone()),
                &da,
                &ba.h,
                &m.slice(bp.fc1_bias.clone()),
                n,
                hdim,
            )?;
            // dh (n, 4D) -> dln (n, D); fc1's bias gradient came with the GELU's.
            blas.linear_backward_data(
                gpu,
                &mut dln,
                &dh,
                &h16.slice(bp.fc1_weight.clone()),
                (n, d, hdim),
                false,
            )?;
            blas.linear_backward_weight(
                gpu,
                &mut grads.slice_mut(bp.fc1_weight.clone()),
                &dh,
                &ba.ln2,
                (n, d, hdim),
            )?;
            // dx becomes d x_mid: the skip path plus norm2's input gradient.
            norm_backward(
                gpu,
                &mut dx,
                grads,
                &bp.norm2,
                m,
                &dln,
                &ba.x_mid,
                &ba.ln2_mean,
                &ba.ln2_rstd,
                (n, d),
            )?;

            // x_mid = x_in + mask * proj(attention(qkv(ln1(x_in)))).
            zero_device(gpu, &mut dbranch)?;
            layers::residual_add_scaled_backward(
                gpu,
                &mut dbranch,
                &dx,
                &mask_of(0),
                batch,
                t * d,
            )?;
            linear_backward(
                gpu,
                blas,
                &bp.proj,
                h16,
                grads,
                Some(&mut datt),
                &dbranch,
                &ba.att,
                (n, d, d),
            )?;
            // datt (B, T, D) -> dqkv (B, T, 3D), overwritten
            attention::attention_backward(
                gpu, &mut dqkv, &datt, &ba.qkv, &ba.att, &ba.lse, batch, t, d, heads,
            )?;
            linear_backward(
                gpu,
                blas,
                &bp.qkv,
                h16,
                grads,
                Some(&mut dln),
                &dqkv,
                &ba.ln1,
                (n, d, 3 * d),
            )?;
            // dx becomes d x_in.
            norm_backward(
                gpu,
                &mut dx,
                grads,
                &bp.norm1,
                m,
                &dln,
                &ba.x_in,
                &ba.ln1_mean,
                &ba.ln1_rstd,
                (n, d),
            )?;
        }
        drop((dbranch, da, dh, dln, datt, dqkv));

        // Tokens = [cls; patches] + pos_view: dx (B, T, D) -> dpatches (B*g*g, D),
        // cls_token +=, dpos_view (1 + g*g, D) -> pos_embed +=
        let mut dpatches = pool.alloc::<bf16>(batch * g * g * d)?;
        zero_device(gpu, &mut dpatches)?;
        let mut dpos_view = pool.alloc::<f32>(t * d)?;
        zero_device(gpu, &mut dpos_view)?;
        layers::add_cls_and_pos_backward(
            gpu,
            &mut dpatches,
            &mut grads.slice_mut(self.cls.clone()),
            &mut dpos_view,
            &dx,
            batch,
            g,
            d,
        )?;
        {
            let mut cache = self.resample.lock().expect("resample cache lock");
            let resample = self.resample_matrix(gpu, &mut cache, g)?;
            layers::pos_embed_backward(
                gpu,
                &mut grads.slice_mut(self.pos.clone()),
                &dpos_view,
                resample,
                g,
                v.ref_grid,
                d,
            )?;
        }
        // Patch GEMM: weight and bias gradients only (the images need none).
        linear_backward(
            gpu,
            blas,
            &self.patch,
            h16,
            grads,
            None,
            &dpatches,
            &acts.cols,
            (batch * g * g, c * p * p, d),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// Bound on [`compare_to_scale`] of the backbone's output. The GPU stores every activation in
/// bf16 (2^-9 relative per rounding) where the twin keeps f32, about ten roundings per
/// block over four blocks, and each layernorm rescales what the previous roundings left;
/// the errors do not cancel per element the way they do for one kernel, so the usual
/// per-element measure (floored at 1e-3 of the scale) would judge near-zero outputs by
/// noise. Against the output's scale the drift is ~1e-2; a wrong index, a missed bias or
/// a wrong weight gives an error of the order of the output itself.
const BACKBONE_BOUND: f64 = 3e-2;

/// The checks' network and parameters (see [`check_forward`]): Femto with 4-pixel patches
/// on 1-channel 28x28 images, `Network::init`'s parameters moved toward a trained
/// network's, rounded to bf16.
/// The backbone checks' cases: (batch, side, bf16 images, stochastic depth). The second
/// draws masks (seed 11, step 5, call 1) that drop 3 of the 16 sample-branches of its 4
/// images, so a GPU that ignored or misplaced a mask would fail.
const CASES: [(usize, usize, bool, Option<DropPath>); 2] = [
    (3, 28, false, None),
    (
        4,
        12,
        true,
        Some(DropPath {
            seed: 11,
            step: 5,
            call: 1,
        }),
    ),
];

fn check_network(inputs: &mut Inputs) -> Result<(Network, Vec<f32>)> {
    let mut vit = Arch::Femto.vit(4, 1, 28);
    // Stochastic depth for the cases that pass a DropPath (rates 0, 1/6, 1/3, 1/2 by block).
    vit.drop_path = 0.5;
    let net = Network::new(vit, HeadConfig::default())?;
    let mut params = net.init(inputs.below(1 << 30) as u64);
    for info in net.table.tensors() {
        if info.shape.len() == 1 {
            let noise = inputs.normal(info.len(), 0.2);
            for (x, z) in params[info.range()].iter_mut().zip(noise) {
                *x += z;
            }
        } else if info.name.starts_with("blocks.") {
            params[info.range()].iter_mut().for_each(|x| *x *= 5.0);
        }
    }
    // The master holds the rounded values too, so that both sides see the same parameters
    // whether a launcher reads the fp32 master or the bf16 copy.
    Ok((net, check::round_bf16(&params)))
}

/// Femto (D = 64, 4 blocks, 2 heads of 32) with 4-pixel patches on 1-channel images, the
/// small28 preset: 28x28 views (7 x 7 grid, T = 50, the reference grid) as f32 and 12x12
/// views (3 x 3 grid, T = 10, the position embedding resampled) as bf16, against
/// [`Network::backbone_forward`] on the same bf16-rounded parameters and images.
///
/// The parameters are `Network::init`'s, moved toward a trained network's so that every
/// tensor matters: the 1-D ones (biases 0, norm weights 1) get N(0, 0.2^2) added, and the
/// blocks' Linear weights are scaled from std 0.02 to 0.1. At init scale the residual
/// branches barely move the stream: zeroing a block's norm bias changes the output by
/// ~5e-3 of its scale, under the bf16 drift. With these, zeroing any one tensor tried
/// (CLS token, position embedding, each kind of bias and norm parameter, proj and fc2
/// weights, in the first and the last block) changes it by 6e-2 to 6e-1, while the drift
/// stays ~1e-2 (seeds 0-2, depths 1, 2 and 4, on the emulator).
fn check_forward(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let (net, params) = check_network(inputs)?;
    let blas = Blas::new(gpu)?;
    let model = GpuBackbone::new(gpu, &net, &params)?;
    let d = net.vit.embed_dim;
    let mut outcomes = Vec::new();
    for &(batch, side, bf16_images, drop) in &CASES {
        let images = check::round_bf16(&inputs.normal(batch * side * side, 1.0));
        let g = side / net.vit.patch;
        let mut out = check::poisoned_bf16(gpu, batch * (1 + g * g) * d)?;
        let acts = if bf16_images {
            let dev = gpu.pool().upload(&check::to_bf16(&images))?;
            model.forward_into(gpu, &blas, &mut out, &dev, batch, side, drop)?
        } else {
            let dev = gpu.pool().upload(&images)?;
            model.forward_into(gpu, &blas, &mut out, &dev, batch, side, drop)?
        };
        let mut cpu = BackboneActs::default();
        net.backbone_forward(&params, &images, batch, side, drop, &mut cpu);
        let kind = if bf16_images { "bf16" } else { "f32" };
        let dp = if drop.is_some() { ", drop path" } else { "" };
        outcomes.push(compare_to_scale(
            format!(
                "vit backbone forward: tokens {batch}x{}x{d} ({side}x{side} {kind} views{dp}), \
                 max|gpu-cpu| / max|cpu|",
                acts.tokens
            ),
            &check::download_bf16(&out)?,
            &cpu.out,
            BACKBONE_BOUND,
        ));
    }
    Ok(outcomes)
}

/// Bound on [`compare_to_scale`] of each parameter gradient. Every activation the backward
/// reads was stored in bf16 by the forward (which already drifts ~1e-2 from the twin's f32
/// ones, [`BACKBONE_BOUND`]), and the backward stores every gradient it passes on in bf16
/// too (the residual stream's, accumulated in bf16 once per branch, and each GEMM's input
/// gradient): about twice the forward's roundings between `dout` and the first block's
/// gradients, with the weight gradients summing bf16 products over all rows. The twin keeps
/// f32 throughout, so 5e-2 of the tensor's scale; a missed or doubled term (a bias gradient
/// left out, a branch not accumulated, an overwrite where the twin adds) moves a tensor by
/// the order of its own scale. Measured on the emulator (seeds 0-2): at most 1.6e-2 (the
/// norm weights and the position embedding, whose gradients sum over every row), most
/// tensors ~5e-3; each wiring mistake tried (a Linear bias gradient skipped, a weight
/// gradient overwritten instead of accumulated, the skip path's gradient dropped, a norm
/// bias or the position embedding not accumulated) gave 0.6 to 1.2.
const BACKWARD_BOUND: f64 = 5e-2;

/// The backbone backward against [`Network::backbone_backward`] after the forward of
/// [`check_forward`] (same network, parameters and views), with `dout` ~ N(0, 1) rounded
/// to bf16 and both gradient buffers starting from the same random values, so that an
/// overwrite where the twin accumulates shows. Those values are drawn per tensor at a
/// quarter of the twin's gradient scale for that tensor (from a first twin run into
/// zeros): large enough that losing them is an error of ~1/2 of the tensor's scale, small
/// enough not to swamp the gradient. One outcome per backbone tensor, and one for the whole
/// flat buffer (which also shows a stray write into the head's gradients).
fn check_backward(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let (net, params) = check_network(inputs)?;
    let blas = Blas::new(gpu)?;
    let model = GpuBackbone::new(gpu, &net, &params)?;
    let d = net.vit.embed_dim;
    let total = net.table.total();
    let mut outcomes = Vec::new();
    for &(batch, side, bf16_images, drop) in &CASES {
        let images = check::round_bf16(&inputs.normal(batch * side * side, 1.0));
        let g = side / net.vit.patch;
        let n = batch * (1 + g * g);
        let dout = check::round_bf16(&inputs.normal(n * d, 1.0));

        let mut cpu_acts = BackboneActs::default();
        net.backbone_forward(&params, &images, batch, side, drop, &mut cpu_acts);
        let mut scale_run = vec![0.0f32; total];
        net.backbone_backward(&params, &mut scale_run, &mut cpu_acts, &dout);
        let start = check::start_gradients(&net.table, &scale_run, inputs);
        let mut cpu = start.clone();
        net.backbone_backward(&params, &mut cpu, &mut cpu_acts, &dout);

        let acts = if bf16_images {
            let dev = gpu.pool().upload(&check::to_bf16(&images))?;
            model.forward(gpu, &blas, &dev, batch, side, drop)?.1
        } else {
            let dev = gpu.pool().upload(&images)?;
            model.forward(gpu, &blas, &dev, batch, side, drop)?.1
        };
        let mut grads = gpu.pool().upload(&start)?;
        let dout_dev = gpu.pool().upload(&check::to_bf16(&dout))?;
        model.backward(gpu, &blas, &acts, &dout_dev, &mut grads)?;
        let gpu_grads = check::download_f32(&grads)?;

        let kind = if bf16_images { "bf16" } else { "f32" };
        let dp = if drop.is_some() { ", drop path" } else { "" };
        let what = format!("{batch}x{side}x{side} {kind} views{dp}");
        outcomes.extend(check::compare_tensors(
            &net.table,
            &format!("vit backbone backward ({what})"),
            &gpu_grads,
            &cpu,
            BACKWARD_BOUND,
            |name| !name.starts_with("head."),
        ));
        outcomes.push(compare_to_scale(
            format!("vit backbone backward ({what}): the whole gradient buffer"),
            &gpu_grads,
            &cpu,
            BACKWARD_BOUND,
        ));
    }
    Ok(outcomes)
}

/// This family's parity checks (`check-kernels --filter "vit backbone"`).
pub fn checks() -> Vec<KernelCheck> {
    vec![
        KernelCheck {
            name: "vit backbone forward (Femto, patch 4, 28x28 and 12x12 views)",
            run: check_forward,
        },
        KernelCheck {
            name: "vit backbone backward (Femto, patch 4, 28x28 and 12x12 views)",
            run: check_backward,
        },
    ]
}
