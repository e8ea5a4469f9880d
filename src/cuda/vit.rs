//! The ViT backbone's forward pass on the GPU, composed from the launchers of
//! [`super::layers`], [`super::blas`] and [`super::attention`] exactly as its CPU twin
//! [`Network::backbone_forward`] composes the CPU layers: im2col, the patch GEMM, the
//! resampled position embedding and the CLS token, then per block layernorm, qkv GEMM,
//! fused attention, proj GEMM, residual add, layernorm, fc1 GEMM, bias + exact GELU, fc2
//! GEMM, residual add, and the final layernorm. Every activation a backward pass needs is
//! kept in a [`GpuBackboneActs`].
//!
//! Parameters: the fp32 master copy is one flat buffer with the CPU's layout
//! ([`Network::table`]); the GEMMs read a bf16 copy of it made on the device
//! ([`GpuBackbone::refresh_bf16`]). LayerNorm weights, the CLS token, the position
//! embedding and the fc1 bias are read in fp32 from the master, as their launchers want.
//!
//! What this module must not do: change the twin's semantics, or drop stochastic depth in
//! silently (this forward has none: it is the teacher's, or a first step toward the
//! student's).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use cudarc::driver::DeviceRepr;
use half::bf16;

use super::attention;
use super::blas::Blas;
use super::check::{self, Inputs, KernelCheck, Outcome};
use super::context::Gpu;
use super::layers::{self, ImageElement};
use super::optim;
use super::pool::{Buf, DeviceSlice, DeviceSliceMut};
use crate::error::{Error, Result};
use crate::model::config::{Arch, HeadConfig, VitConfig};
use crate::model::params::ParamTable;
use crate::model::vit::{BackboneActs, Network};

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

/// A Linear whose GEMM adds the bias: where its weight and bias live in the flat buffers,
/// and the bias's bf16 copy as a buffer of its own (cuBLASLt's bias epilogue takes one).
struct Linear {
    weight: Range<usize>,
    bias: Range<usize>,
    bias_bf16: Buf<bf16>,
}

impl Linear {
    fn new(gpu: &Gpu, table: &ParamTable, prefix: &str) -> Result<Linear> {
        let bias = table.info(&format!("{prefix}.bias")).range();
        Ok(Linear {
            weight: table.info(&format!("{prefix}.weight")).range(),
            bias_bf16: gpu.pool().alloc::<bf16>(bias.len())?,
            bias,
        })
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
    /// fp32 master parameters, the whole flat buffer of [`Network::table`].
    master: Buf<f32>,
    /// `master` rounded to bf16 (same layout): the GEMMs' weights.
    half: Buf<bf16>,
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
    /// The per-sample residual masks `(B)`, fp32: all ones (no stochastic depth here).
    pub mask: Buf<f32>,
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
                Ok(BlockParams {
                    norm1: Norm::new(t, &format!("{b}.norm1")),
                    qkv: Linear::new(gpu, t, &format!("{b}.attn.qkv"))?,
                    proj: Linear::new(gpu, t, &format!("{b}.attn.proj"))?,
                    norm2: Norm::new(t, &format!("{b}.norm2")),
                    fc1_weight: t.info(&format!("{b}.mlp.fc1.weight")).range(),
                    fc1_bias: t.info(&format!("{b}.mlp.fc1.bias")).range(),
                    fc2: Linear::new(gpu, t, &format!("{b}.mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut model = GpuBackbone {
            vit: net.vit.clone(),
            master: pool.upload(params)?,
            half: pool.alloc::<bf16>(params.len())?,
            cls: t.info("cls_token").range(),
            pos: t.info("pos_embed").range(),
            patch: Linear::new(gpu, t, "patch_embed.proj")?,
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
    /// the flat buffer, then a copy of each GEMM bias into its own buffer).
    pub fn refresh_bf16(&mut self, gpu: &Gpu) -> Result<()> {
        optim::round_bf16(gpu, &self.master, &mut self.half)?;
        let linears = std::iter::once(&mut self.patch).chain(
            self.blocks
                .iter_mut()
                .flat_map(|b| [&mut b.qkv, &mut b.proj, &mut b.fc2]),
        );
        for l in linears {
            copy_device(gpu, &mut l.bias_bf16, &self.half.slice(l.bias.clone()))?;
        }
        Ok(())
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

    /// The backbone forward on `images` `(B, C, S, S)` (S = `side`): returns the tokens
    /// after the final norm `(B, T, D)` bf16 and what the backward pass needs.
    pub fn forward<T: ImageElement>(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        images: &impl DeviceSlice<T>,
        batch: usize,
        side: usize,
    ) -> Result<(Buf<bf16>, GpuBackboneActs)> {
        let g = self.grid(side)?;
        let mut out = gpu
            .pool()
            .alloc::<bf16>(batch * (1 + g * g) * self.vit.embed_dim)?;
        let acts = self.forward_into(gpu, blas, &mut out, images, batch, side)?;
        Ok((out, acts))
    }

    /// [`forward`](Self::forward) into a given output `(B, T, D)` bf16.
    pub fn forward_into<T: ImageElement>(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        out: &mut impl DeviceSliceMut<bf16>,
        images: &impl DeviceSlice<T>,
        batch: usize,
        side: usize,
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
            Some(&self.patch.bias_bf16),
            (batch * g * g, c * p * p, d),
        )?;
        // pos (1 + G*G, D) -> pos_view (1 + g*g, D), fp32
        let mut pos_view = pool.alloc::<f32>(t * d)?;
        {
            let mut cache = self.resample.lock().expect("resample cache lock");
            let resample = match cache.entry(g) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(layers::pos_resample_matrix(gpu, g, v.ref_grid)?)
                }
            };
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
        drop(patches);

        // No stochastic depth: every sample keeps both residual branches.
        let mask = pool.upload(&vec![1.0f32; batch])?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut branch = pool.alloc::<bf16>(n * d)?;
        for bp in &self.blocks {
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
                Some(&bp.qkv.bias_bf16),
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
                Some(&bp.proj.bias_bf16),
                (n, d, d),
            )?;
            // x_mid = x_in + mask * proj(att); x_in is kept for norm1's backward.
            let mut x_mid = pool.alloc::<bf16>(n * d)?;
            copy_device(gpu, &mut x_mid, &x_in)?;
            layers::residual_add_scaled(gpu, &mut x_mid, &branch, &mask, batch, t * d)?;

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
                Some(&bp.fc2.bias_bf16),
                (n, hdim, d),
            )?;
            // x_out = x_mid + mask * fc2(a); x_mid is kept for norm2's backward.
            x = pool.alloc::<bf16>(n * d)?;
            copy_device(gpu, &mut x, &x_mid)?;
            layers::residual_add_scaled(gpu, &mut x, &branch, &mask, batch, t * d)?;
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
            mask,
            blocks,
            x_final: x,
            norm_mean,
            norm_rstd,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// `max_i |gpu_i - cpu_i| / max_j |cpu_j|`: the error against the output's scale (a NaN
/// or infinity on the GPU side counts as infinite).
fn scale_error(name: String, gpu: &[f32], cpu: &[f32], bound: f64) -> Outcome {
    assert_eq!(gpu.len(), cpu.len(), "scale_error: lengths differ");
    let scale = cpu
        .iter()
        .fold(0.0f64, |s, &x| s.max(f64::from(x).abs()))
        .max(f64::MIN_POSITIVE);
    let mut max = 0.0f64;
    let mut worst = None;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (f64::from(g), f64::from(c));
        let err = if g.is_finite() && c.is_finite() {
            (g - c).abs() / scale
        } else {
            f64::INFINITY
        };
        if err > max || (worst.is_none() && err.is_infinite()) {
            max = err;
            worst = Some((i, g, c));
        }
    }
    Outcome {
        name,
        elements: gpu.len(),
        max_rel_err: max,
        bound,
        worst,
    }
}

/// Bound on [`scale_error`] of the backbone's output. The GPU stores every activation in
/// bf16 (2^-9 relative per rounding) where the twin keeps f32, about ten roundings per
/// block over four blocks, and each layernorm rescales what the previous roundings left;
/// the errors do not cancel per element the way they do for one kernel, so the usual
/// per-element measure (floored at 1e-3 of the scale) would judge near-zero outputs by
/// noise. Against the output's scale the drift is ~1e-2; a wrong index, a missed bias or
/// a wrong weight gives an error of the order of the output itself.
const BACKBONE_BOUND: f64 = 3e-2;

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
    let vit = Arch::Femto.vit(4, 1, 28);
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
    let params = check::round_bf16(&params);
    let blas = Blas::new(gpu)?;
    let model = GpuBackbone::new(gpu, &net, &params)?;
    let d = net.vit.embed_dim;
    let mut outcomes = Vec::new();
    for &(batch, side, bf16_images) in &[(3usize, 28usize, false), (2, 12, true)] {
        let images = check::round_bf16(&inputs.normal(batch * side * side, 1.0));
        let g = side / net.vit.patch;
        let mut out = check::poisoned_bf16(gpu, batch * (1 + g * g) * d)?;
        let acts = if bf16_images {
            let dev = gpu.pool().upload(&check::to_bf16(&images))?;
            model.forward_into(gpu, &blas, &mut out, &dev, batch, side)?
        } else {
            let dev = gpu.pool().upload(&images)?;
            model.forward_into(gpu, &blas, &mut out, &dev, batch, side)?
        };
        let mut cpu = BackboneActs::default();
        net.backbone_forward(&params, &images, batch, side, None, &mut cpu);
        let kind = if bf16_images { "bf16" } else { "f32" };
        outcomes.push(scale_error(
            format!(
                "vit backbone forward: tokens {batch}x{}x{d} ({side}x{side} {kind} views), \
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

/// This family's parity checks (`check-kernels --filter "vit backbone"`).
pub fn checks() -> Vec<KernelCheck> {
    vec![KernelCheck {
        name: "vit backbone forward (Femto, patch 4, 28x28 and 12x12 views)",
        run: check_forward,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_error_is_relative_to_the_largest_reference_value() {
        let cpu = [4.0f32, -2.0, 1e-6];
        let o = scale_error("s".into(), &[4.0, -2.0, 0.04], &cpu, 3e-2);
        assert!((o.max_rel_err - 0.01).abs() < 1e-6, "{}", o.max_rel_err);
        assert!(o.passed());
        assert_eq!(o.worst.map(|w| w.0), Some(2));
        let o = scale_error("nan".into(), &[4.0, f32::NAN, 0.0], &cpu, 3e-2);
        assert!(o.max_rel_err.is_infinite() && !o.passed());
    }
}
