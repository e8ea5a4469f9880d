//! The DINO head's forward and backward passes on the GPU, composed from the launchers of
//! [`super::layers`] and [`super::blas`] exactly as its CPU twins [`Network::head_forward`],
//! [`Network::head_backward`] and [`Network::last_layer`] compose the CPU layers.
//!
//! Forward on `M` token rows `(M, D)` bf16: the MLP (`head.mlp.{0,2,..}`: a GEMM without
//! bias, then bias + exact GELU fused, for every Linear but the last; the last Linear's GEMM
//! then its bias added in fp32), the L2 normalisation of the bottleneck vectors, and the
//! weight-normalised last layer (`W = V / ||V||` per row, gain fixed at 1, no bias) to `K`
//! logits `(M, K)` bf16. Every activation the backward needs is kept in a [`GpuHeadActs`].
//! Backward: the same layers in reverse, accumulating the parameter gradients into the
//! fp32 flat gradient buffer and writing the gradient of the input rows.
//!
//! Parameters are not owned here: the head reads the network's flat fp32 master buffer
//! (biases and `weight_v`, in fp32) and its bf16 copy of the same layout (the MLP's GEMM
//! weights), the buffers a [`super::vit::GpuBackbone`] keeps for the whole network. The
//! last layer's `W` is made in bf16 from the fp32 `V` once per step ([`GpuHead::last_layer`]),
//! as the twin's [`Network::last_layer`].

use std::ops::Range;

use half::bf16;

use super::blas::Blas;
use super::check::{self, compare_to_scale, Inputs, KernelCheck, Outcome};
use super::context::Gpu;
use super::layers;
use super::optim;
use super::pool::{Buf, DeviceSlice, DeviceSliceMut};
use super::vit::zero_device;
use crate::error::Result;
use crate::model::config::{Arch, HeadConfig};
use crate::model::vit::{HeadActs, Network};

/// One Linear of the head's MLP: where its weight `(d_out, d_in)` and bias `(d_out)` live
/// in the flat buffers, and its sizes.
struct HeadLinear {
    weight: Range<usize>,
    bias: Range<usize>,
    d_in: usize,
    d_out: usize,
}

/// The head's parameter layout in the network's flat buffers, and the code that runs it.
pub struct GpuHead {
    /// The MLP's Linears in order; every one but the last is followed by a GELU.
    linears: Vec<HeadLinear>,
    /// `head.last_layer.weight_v` `(K, Db)`.
    last_v: Range<usize>,
    /// The flat buffer's length.
    total: usize,
    /// Input width `D`.
    in_dim: usize,
    /// Bottleneck width `Db`.
    bottleneck: usize,
    /// Output dimension `K`.
    out_dim: usize,
}

/// The weight-normalised last layer for the current parameters (the twin's
/// [`crate::model::vit::LastLayer`]): make it once per step and per network.
pub struct GpuLastLayer {
    /// `W = V / ||V||` per row `(K, Db)`, bf16: the last GEMM's weight.
    pub w: Buf<bf16>,
    /// `||V[k]||` `(K)`, fp32, for the backward.
    pub row_norms: Buf<f32>,
}

/// What the head keeps for its backward pass (`M` rows; bf16 unless stated).
pub struct GpuHeadActs {
    /// Rows in this call.
    pub rows: usize,
    /// Each Linear's output: for the Linears followed by a GELU, the GEMM's output before
    /// its bias (`bias_gelu_backward` reads it); for the last one, `z` with its bias,
    /// the L2 normalisation's input `(M, Db)`.
    pub pre: Vec<Buf<bf16>>,
    /// `gelu(pre[i] + b_i)` for every Linear but the last: the next Linear's input.
    pub post: Vec<Buf<bf16>>,
    /// `||z||` per row `(M)`, fp32 (unclamped).
    pub z_norms: Buf<f32>,
    /// `z / max(||z||, 1e-12)` `(M, Db)`, the last layer's input.
    pub zn: Buf<bf16>,
}

impl GpuHead {
    /// The head's layout in `net`'s flat buffers (`head.mlp.{0,2,..}.{weight,bias}` and
    /// `head.last_layer.weight_v`). Uploads nothing.
    pub fn new(net: &Network) -> GpuHead {
        let t = &net.table;
        let linears = (0..net.head.layers)
            .map(|i| {
                let w = t.info(&format!("head.mlp.{}.weight", 2 * i));
                assert_eq!(w.shape.len(), 2, "GpuHead::new: a head weight is not 2-D");
                HeadLinear {
                    weight: w.range(),
                    bias: t.info(&format!("head.mlp.{}.bias", 2 * i)).range(),
                    d_out: w.shape[0],
                    d_in: w.shape[1],
                }
            })
            .collect::<Vec<_>>();
        assert!(!linears.is_empty(), "GpuHead::new: the head has no Linear");
        GpuHead {
            linears,
            last_v: t.info("head.last_layer.weight_v").range(),
            total: t.total(),
            in_dim: net.vit.embed_dim,
            bottleneck: net.head.bottleneck,
            out_dim: net.head.out_dim,
        }
    }

    /// Output dimension `K`.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The last layer's `W = V / ||V||` (bf16) and row norms from the fp32 `master` (the
    /// network's flat buffer): [`layers::weight_norm_forward`].
    pub fn last_layer(&self, gpu: &Gpu, master: &Buf<f32>) -> Result<GpuLastLayer> {
        assert_eq!(
            master.len(),
            self.total,
            "GpuHead::last_layer: master must be the network's flat buffer"
        );
        let (k, db) = (self.out_dim, self.bottleneck);
        let mut w = gpu.pool().alloc::<bf16>(k * db)?;
        let mut row_norms = gpu.pool().alloc::<f32>(k)?;
        layers::weight_norm_forward(
            gpu,
            &mut w,
            &mut row_norms,
            &master.slice(self.last_v.clone()),
            k,
            db,
        )?;
        Ok(GpuLastLayer { w, row_norms })
    }

    /// The head forward on `x` `(M, D)` bf16 (`M = rows`): returns the logits `(M, K)` bf16
    /// and what the backward pass needs. `master` is the network's fp32 flat buffer, `half`
    /// its bf16 copy, `last` from [`last_layer`](Self::last_layer) on the same `master`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        master: &Buf<f32>,
        half: &Buf<bf16>,
        last: &GpuLastLayer,
        x: &impl DeviceSlice<bf16>,
        rows: usize,
    ) -> Result<(Buf<bf16>, GpuHeadActs)> {
        let mut out = gpu.pool().alloc::<bf16>(rows * self.out_dim)?;
        let acts = self.forward_into(gpu, blas, master, half, last, &mut out, x, rows)?;
        Ok((out, acts))
    }

    /// [`forward`](Self::forward) into a given output `(M, K)` bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        master: &Buf<f32>,
        half: &Buf<bf16>,
        last: &GpuLastLayer,
        out: &mut impl DeviceSliceMut<bf16>,
        x: &impl DeviceSlice<bf16>,
        rows: usize,
    ) -> Result<GpuHeadActs> {
        let (m, db, k) = (rows, self.bottleneck, self.out_dim);
        self.check_params(master, half, last);
        assert_eq!(
            x.len(),
            m * self.in_dim,
            "GpuHead::forward: x must be (M, D)"
        );
        assert_eq!(out.len(), m * k, "GpuHead::forward: out must be (M, K)");
        let pool = gpu.pool();
        let n_lin = self.linears.len();
        let mut pre = Vec::with_capacity(n_lin);
        let mut post: Vec<Buf<bf16>> = Vec::with_capacity(n_lin - 1);
        for (i, lin) in self.linears.iter().enumerate() {
            // (M, d_in) -> (M, d_out), no bias yet
            let mut p = pool.alloc::<bf16>(m * lin.d_out)?;
            let w = half.slice(lin.weight.clone());
            let shape = (m, lin.d_in, lin.d_out);
            if i == 0 {
                blas.linear_forward(gpu, &mut p, x, &w, None, shape)?;
            } else {
                blas.linear_forward(gpu, &mut p, &post[i - 1], &w, None, shape)?;
            }
            let bias = master.slice(lin.bias.clone());
            if i + 1 < n_lin {
                // gelu(p + b); p stays the pre-bias value the backward reads.
                let mut a = pool.alloc::<bf16>(m * lin.d_out)?;
                layers::bias_gelu_forward(gpu, &mut a, &p, &bias, m, lin.d_out)?;
                post.push(a);
            } else {
                // z = p + b (fp32 bias), the L2 normalisation's input.
                layers::bias_add(gpu, &mut p, &bias, m, lin.d_out)?;
            }
            pre.push(p);
        }
        let z = &pre[n_lin - 1];
        let mut zn = pool.alloc::<bf16>(m * db)?;
        let mut z_norms = pool.alloc::<f32>(m)?;
        layers::l2norm_forward(gpu, &mut zn, &mut z_norms, z, m, db)?;
        // (M, Db) -> (M, K), no bias
        blas.linear_forward(gpu, out, &zn, &last.w, None, (m, db, k))?;
        Ok(GpuHeadActs {
            rows: m,
            pre,
            post,
            z_norms,
            zn,
        })
    }

    /// The head backward: given `dlogits` `(M, K)` bf16, **accumulates** the gradients of
    /// `head.mlp.*` and `head.last_layer.weight_v` into `grads` (fp32, the network's flat
    /// layout; nothing else in it is touched) and **writes** (overwrites) the gradient of
    /// the input rows into `dx` `(M, D)` bf16: the head's input is a gather of backbone
    /// tokens, so the caller scatters `dx` back itself. `x` is the input of the forward that
    /// made `acts`, and `master`, `half`, `last` the parameters it ran with. Order of the
    /// twin [`Network::head_backward`]: the last layer (its `dW` in fp32, then through the
    /// weight norm to `dV`), the L2 normalisation, then the MLP in reverse.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        master: &Buf<f32>,
        half: &Buf<bf16>,
        last: &GpuLastLayer,
        acts: &GpuHeadActs,
        x: &impl DeviceSlice<bf16>,
        dlogits: &impl DeviceSlice<bf16>,
        dx: &mut impl DeviceSliceMut<bf16>,
        grads: &mut Buf<f32>,
    ) -> Result<()> {
        let (m, db, k) = (acts.rows, self.bottleneck, self.out_dim);
        let n_lin = self.linears.len();
        self.check_params(master, half, last);
        assert!(
            acts.pre.len() == n_lin && acts.post.len() + 1 == n_lin,
            "GpuHead::backward: acts are not from this head"
        );
        assert_eq!(
            x.len(),
            m * self.in_dim,
            "GpuHead::backward: x must be (M, D)"
        );
        assert_eq!(
            dx.len(),
            m * self.in_dim,
            "GpuHead::backward: dx must be (M, D)"
        );
        assert_eq!(
            dlogits.len(),
            m * k,
            "GpuHead::backward: dlogits must be (M, K)"
        );
        assert_eq!(
            grads.len(),
            self.total,
            "GpuHead::backward: grads must be the network's flat buffer"
        );
        let pool = gpu.pool();

        // Last layer: dzn = dlogits W (M, Db); dW (K, Db) fp32 from zero, then dV +=.
        let mut dzn = pool.alloc::<bf16>(m * db)?;
        blas.linear_backward_data(gpu, &mut dzn, dlogits, &last.w, (m, db, k), false)?;
        let mut dw_last = pool.alloc::<f32>(k * db)?;
        zero_device(gpu, &mut dw_last)?;
        blas.linear_backward_weight(gpu, &mut dw_last, dlogits, &acts.zn, (m, db, k))?;
        layers::weight_norm_backward(
            gpu,
            &mut grads.slice_mut(self.last_v.clone()),
            &dw_last,
            &master.slice(self.last_v.clone()),
            &last.row_norms,
            k,
            db,
        )?;
        drop(dw_last);

        // L2 normalisation: dz (M, Db), accumulated into zeros.
        let mut dcur = pool.alloc::<bf16>(m * db)?;
        zero_device(gpu, &mut dcur)?;
        layers::l2norm_backward(
            gpu,
            &mut dcur,
            &dzn,
            &acts.pre[n_lin - 1],
            &acts.z_norms,
            m,
            db,
        )?;
        drop(dzn);

        // The MLP in reverse; dcur holds d(output of Linear i), after its GELU if it has one.
        for (i, lin) in self.linears.iter().enumerate().rev() {
            let (d_in, d_out) = (lin.d_in, lin.d_out);
            let dpre = if i + 1 < n_lin {
                // Through the GELU to d(pre + b) (written), bias +=.
                let mut dpre = pool.alloc::<bf16>(m * d_out)?;
                layers::bias_gelu_backward(
                    gpu,
                    &mut dpre,
                    &mut grads.slice_mut(lin.bias.clone()),
                    &dcur,
                    &acts.pre[i],
                    &master.slice(lin.bias.clone()),
                    m,
                    d_out,
                )?;
                dpre
            } else {
                layers::bias_backward(
                    gpu,
                    &mut grads.slice_mut(lin.bias.clone()),
                    &dcur,
                    m,
                    d_out,
                )?;
                dcur
            };
            if i == 0 {
                blas.linear_backward_weight(
                    gpu,
                    &mut grads.slice_mut(lin.weight.clone()),
                    &dpre,
                    x,
                    (m, d_in, d_out),
                )?;
                blas.linear_backward_data(
                    gpu,
                    dx,
                    &dpre,
                    &half.slice(lin.weight.clone()),
                    (m, d_in, d_out),
                    false,
                )?;
                break;
            }
            blas.linear_backward_weight(
                gpu,
                &mut grads.slice_mut(lin.weight.clone()),
                &dpre,
                &acts.post[i - 1],
                (m, d_in, d_out),
            )?;
            let mut dinput = pool.alloc::<bf16>(m * d_in)?;
            blas.linear_backward_data(
                gpu,
                &mut dinput,
                &dpre,
                &half.slice(lin.weight.clone()),
                (m, d_in, d_out),
                false,
            )?;
            dcur = dinput;
        }
        Ok(())
    }

    /// Asserts that the parameter buffers fit this head.
    fn check_params(&self, master: &Buf<f32>, half: &Buf<bf16>, last: &GpuLastLayer) {
        assert_eq!(
            master.len(),
            self.total,
            "GpuHead: master must be the network's flat buffer"
        );
        assert_eq!(
            half.len(),
            self.total,
            "GpuHead: half must be the bf16 copy of the flat buffer"
        );
        assert!(
            last.w.len() == self.out_dim * self.bottleneck && last.row_norms.len() == self.out_dim,
            "GpuHead: last is not this head's last layer"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// Bound on [`compare_to_scale`] of the logits. The GPU stores each of the head's activations in
/// bf16 (2^-9 relative per rounding) where the twin keeps f32: the three GEMM outputs, the
/// two GELUs, the bias add, the normalised bottleneck and the last layer's `W`, with the L2
/// normalisation rescaling what came before. A wrong weight, a missed bias or a wrong
/// normalisation moves the logits by the order of their scale.
const HEAD_FORWARD_BOUND: f64 = 3e-2;

/// Bound on [`compare_to_scale`] of the input gradient and each parameter gradient: the
/// backward reads the forward's bf16 activations and stores each gradient it passes on in
/// bf16 (`dzn`, `dz`, each GEMM's input gradient, the GELU's), about twice the forward's
/// roundings; the weight gradients sum bf16 products over the rows. A missed or doubled
/// term, or an overwrite where the twin accumulates, moves a tensor by the order of its
/// scale.
const HEAD_BACKWARD_BOUND: f64 = 5e-2;

/// Rows of the checks: not a multiple of a warp's 32 or of the 8 rows per block.
const CHECK_ROWS: usize = 37;

/// The checks' network and parameters: a Femto backbone (D = 64) with a small 3-layer head
/// (hidden 96, bottleneck 32, K = 200), `Network::init`'s parameters with the head's moved
/// toward a trained network's, rounded to bf16 (master and bf16 copy then agree). The
/// head's 1-D tensors (its biases, 0 at init) get N(0, 0.2^2) added, and its Linear weights
/// are scaled from std 0.02 to 0.1, so that every layer's output has unit order and every
/// bias matters against the bf16 drift.
fn check_network(inputs: &mut Inputs) -> Result<(Network, Vec<f32>)> {
    let vit = Arch::Femto.vit(4, 1, 28);
    let head = HeadConfig {
        layers: 3,
        hidden: 96,
        bottleneck: 32,
        out_dim: 200,
    };
    let net = Network::new(vit, head)?;
    let mut params = net.init(inputs.below(1 << 30) as u64);
    for info in net.table.tensors() {
        if !info.name.starts_with("head.mlp.") {
            continue;
        }
        if info.shape.len() == 1 {
            let noise = inputs.normal(info.len(), 0.2);
            for (x, z) in params[info.range()].iter_mut().zip(noise) {
                *x += z;
            }
        } else {
            params[info.range()].iter_mut().for_each(|x| *x *= 5.0);
        }
    }
    Ok((net, check::round_bf16(&params)))
}

/// The head forward and backward against [`Network::head_forward`] and
/// [`Network::head_backward`] on the same parameters (see [`check_network`]), `M` =
/// [`CHECK_ROWS`] input rows ~ N(0, 1) and `dlogits` ~ N(0, 1), both rounded to bf16.
/// Outcomes: the logits; the input gradient (the GPU's poisoned, so an unwritten element
/// fails; the twin's accumulated into zeros); each head tensor's gradient, with both
/// gradient buffers starting from the same random values (per tensor a quarter of the
/// twin's gradient scale there, from a first twin run into zeros), so that an overwrite
/// where the twin accumulates shows; and every tensor outside the head left exactly as it
/// was.
fn check_head(gpu: &Gpu, inputs: &mut Inputs) -> Result<Vec<Outcome>> {
    let (net, params) = check_network(inputs)?;
    let blas = Blas::new(gpu)?;
    let head = GpuHead::new(&net);
    let (m, d, k) = (CHECK_ROWS, net.vit.embed_dim, net.head.out_dim);
    let total = net.table.total();
    let pool = gpu.pool();
    let mut outcomes = Vec::new();

    let master = pool.upload(&params)?;
    let mut half = pool.alloc::<bf16>(total)?;
    optim::round_bf16(gpu, &master, &mut half)?;
    let last = head.last_layer(gpu, &master)?;
    let x = check::round_bf16(&inputs.normal(m * d, 1.0));
    let x_dev = pool.upload(&check::to_bf16(&x))?;
    let mut logits = check::poisoned_bf16(gpu, m * k)?;
    let acts = head.forward_into(gpu, &blas, &master, &half, &last, &mut logits, &x_dev, m)?;

    let cpu_last = net.last_layer(&params);
    let mut cpu_acts = HeadActs::default();
    net.head_forward(&params, &cpu_last, &x, m, &mut cpu_acts);
    outcomes.push(compare_to_scale(
        format!("head forward ({m} rows of {d} -> {k}): logits, max|gpu-cpu| / max|cpu|"),
        &check::download_bf16(&logits)?,
        &cpu_acts.logits,
        HEAD_FORWARD_BOUND,
    ));

    let dlogits = check::round_bf16(&inputs.normal(m * k, 1.0));
    let mut scale_run = vec![0.0f32; total];
    let mut scale_dx = vec![0.0f32; m * d];
    net.head_backward(
        &params,
        &mut scale_run,
        &cpu_last,
        &mut cpu_acts,
        &x,
        &dlogits,
        &mut scale_dx,
    );
    let start = check::start_gradients(&net.table, &scale_run, inputs);
    let mut cpu = start.clone();
    let mut cpu_dx = vec![0.0f32; m * d];
    net.head_backward(
        &params,
        &mut cpu,
        &cpu_last,
        &mut cpu_acts,
        &x,
        &dlogits,
        &mut cpu_dx,
    );

    let mut grads = pool.upload(&start)?;
    let dlogits_dev = pool.upload(&check::to_bf16(&dlogits))?;
    let mut dx = check::poisoned_bf16(gpu, m * d)?;
    head.backward(
        gpu,
        &blas,
        &master,
        &half,
        &last,
        &acts,
        &x_dev,
        &dlogits_dev,
        &mut dx,
        &mut grads,
    )?;
    let gpu_grads = check::download_f32(&grads)?;
    outcomes.push(compare_to_scale(
        format!("head backward ({m} rows): d input rows"),
        &check::download_bf16(&dx)?,
        &cpu_dx,
        HEAD_BACKWARD_BOUND,
    ));
    let (mut others_gpu, mut others_start) = (Vec::new(), Vec::new());
    for info in net.table.tensors() {
        let r = info.range();
        if info.name.starts_with("head.") {
            outcomes.push(compare_to_scale(
                format!("head backward ({m} rows): d {}", info.name),
                &gpu_grads[r.clone()],
                &cpu[r],
                HEAD_BACKWARD_BOUND,
            ));
        } else {
            others_gpu.extend_from_slice(&gpu_grads[r.clone()]);
            others_start.extend_from_slice(&start[r]);
        }
    }
    outcomes.push(check::compare(
        format!("head backward ({m} rows): the backbone's gradients untouched"),
        &others_gpu,
        &others_start,
        0.0,
    ));
    Ok(outcomes)
}

/// The head's parity check (`check-kernels --filter head`).
pub fn checks() -> Vec<KernelCheck> {
    vec![KernelCheck {
        name: "head forward/backward (Femto D 64, hidden 96, bottleneck 32, K 200, 37 rows)",
        run: check_head,
    }]
}
