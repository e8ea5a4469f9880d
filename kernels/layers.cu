// The kernels around the ViT's matmuls: patch-embedding im2col, CLS + position embedding
// (with its bicubic resampling), layernorm (plain and fused with the residual add), bias +
// exact GELU, bias add and bias gradient, and the DINO head's L2-normalisation and weight
// norm. Launchers and CPU twins: src/cuda/layers.rs, src/cpu/*.rs.
//
// Storage: activations and their gradients bf16; parameters (fp32 master weights: LN gamma
// and beta, biases, CLS token, position embedding, the head's V), their gradients and the
// saved statistics fp32. Arithmetic is fp32 throughout.
//
// What these kernels must not do: use float atomics, or depend on the card for an order of
// summation. Every parameter gradient that sums over rows is reduced in two deterministic
// passes (per-block partials in a fixed order, then `column_sum_finish` over the blocks in
// index order), with launch shapes that depend only on the problem's size.
//
// Backward kernels ACCUMULATE (+=) into their gradient outputs, as the CPU twins do, except
// `bias_gelu_backward`'s d(x+b), a fresh intermediate that it overwrites (see there).
//
// Where a CPU twin's exact rounding matters (a bf16 value that later feeds a normalisation,
// the small resampling products), the kernels use __fmul_rn / __fadd_rn so that nvcc does
// not contract the product and the sum into an fma: the result is then bit-identical to the
// twin's separate f32 multiply and add.
#include "common.cuh"

// nn.LayerNorm eps in timm's ViT (src/cpu/layernorm.rs LAYERNORM_EPS).
#define LN_EPS 1e-6f
// F.normalize's floor on the norm (src/cpu/head.rs L2NORM_EPS).
#define L2NORM_EPS 1e-12f

// ------------------------------------------------------------------------------------------
// im2col: images (B, C, S, S) planar -> cols (B*G*G, C*p*p) bf16, G = S / p. One block per
// output row (patch); threads stride over its C*p*p columns. Column c*p*p + ky*p + kx holds
// channel c, pixel (ky, kx) of the window: the order of a flattened conv weight (D, C, p, p).
template <typename T>
__device__ __forceinline__ void im2col_row(bf16* __restrict__ cols, const T* __restrict__ images,
                                           int c, int side, int patch) {
    const int grid = side / patch;
    const int cells = grid * grid;
    const int pp = patch * patch;
    const int width = c * pp;
    const int64_t row = blockIdx.x;
    const int64_t bi = row / cells;
    const int cell = (int)(row - bi * cells);
    const int py = cell / grid, px = cell - py * grid;
    bf16* out = cols + row * width;
    for (int col = threadIdx.x; col < width; col += blockDim.x) {
        const int ci = col / pp;
        const int k = col - ci * pp;
        const int ky = k / patch, kx = k - ky * patch;
        const int64_t src = ((bi * c + ci) * side + (py * patch + ky)) * (int64_t)side
                            + px * patch + kx;
        store(&out[col], to_f32(images[src]));
    }
}

// grid (B*G*G), any block size.
extern "C" __global__ void im2col_f32(bf16* __restrict__ cols, const float* __restrict__ images,
                                      int c, int side, int patch) {
    im2col_row(cols, images, c, side, patch);
}
extern "C" __global__ void im2col_bf16(bf16* __restrict__ cols, const bf16* __restrict__ images,
                                       int c, int side, int patch) {
    im2col_row(cols, images, c, side, patch);
}

// ------------------------------------------------------------------------------------------
// Position embedding of a g x g view from the stored G x G one, fp32: row 0 (CLS) copied, the
// patch rows resampled separably with M = pos_resample_matrix(g, G), (g, G) row-major:
//   out[1 + i*g + j] = sum_a M[i, a] * (sum_c M[j, c] * pos[1 + a*G + c]).
// The sums run in the CPU twin's order with unfused products (bit-identical to it); g == G
// copies. grid (1 + g*g) rows, threads stride over D. Tiny (a few hundred KB), so dense.
extern "C" __global__ void pos_embed_forward(float* __restrict__ out, const float* __restrict__ pos,
                                             const float* __restrict__ m, int g, int big_g, int d) {
    const int row = blockIdx.x;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float v;
        if (row == 0 || g == big_g) {
            v = pos[(int64_t)row * d + k];
        } else {
            const int i = (row - 1) / g, j = (row - 1) % g;
            v = 0.0f;
            for (int a = 0; a < big_g; a++) {
                float t = 0.0f;
                for (int c = 0; c < big_g; c++) {
                    t = __fadd_rn(t, __fmul_rn(m[j * big_g + c],
                                               pos[(int64_t)(1 + a * big_g + c) * d + k]));
                }
                v = __fadd_rn(v, __fmul_rn(m[i * big_g + a], t));
            }
        }
        out[(int64_t)row * d + k] = v;
    }
}

// The transpose of pos_embed_forward, accumulated into the stored embedding's gradient:
//   dpos[0] += dout[0],
//   dpos[1 + a*G + c] += sum_j M[j, c] * (sum_i M[i, a] * dout[1 + i*g + j]),
// the outer sum added term by term onto dpos in j order, as the CPU twin does (bit-identical).
// grid (1 + G*G) rows, threads stride over D. Each element has one owner: no atomics.
extern "C" __global__ void pos_embed_backward(float* __restrict__ dpos, const float* __restrict__ dout,
                                              const float* __restrict__ m, int g, int big_g, int d) {
    const int row = blockIdx.x;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        const int64_t at = (int64_t)row * d + k;
        float acc = dpos[at];
        if (row == 0 || g == big_g) {
            acc = __fadd_rn(acc, dout[at]);
        } else {
            const int a = (row - 1) / big_g, c = (row - 1) % big_g;
            for (int j = 0; j < g; j++) {
                float t = 0.0f;
                for (int i = 0; i < g; i++) {
                    t = __fadd_rn(t, __fmul_rn(m[i * big_g + a], dout[(int64_t)(1 + i * g + j) * d + k]));
                }
                acc = __fadd_rn(acc, __fmul_rn(m[j * big_g + c], t));
            }
        }
        dpos[at] = acc;
    }
}

// ------------------------------------------------------------------------------------------
// tokens (B, T, D) bf16 with T = 1 + g*g: tokens[b, 0] = cls + pos[0],
// tokens[b, p] = patches[b*(T-1) + p - 1] + pos[p]. patches bf16 (the patch-embedding GEMM's
// output, bias included), cls and pos fp32. grid (B*T) token rows, threads stride over D.
extern "C" __global__ void add_cls_and_pos(bf16* __restrict__ tokens, const bf16* __restrict__ patches,
                                           const float* __restrict__ cls, const float* __restrict__ pos,
                                           int t, int d) {
    const int64_t row = blockIdx.x;
    const int64_t bi = row / t;
    const int p = (int)(row - bi * t);
    bf16* out = tokens + row * d;
    const float* pr = pos + (int64_t)p * d;
    if (p == 0) {
        for (int k = threadIdx.x; k < d; k += blockDim.x) store(&out[k], cls[k] + pr[k]);
    } else {
        const bf16* src = patches + (bi * (t - 1) + (p - 1)) * d;
        for (int k = threadIdx.x; k < d; k += blockDim.x) store(&out[k], to_f32(src[k]) + pr[k]);
    }
}

// Gradients of add_cls_and_pos, all accumulated: dpatches[b, p-1] += dtokens[b, p] (bf16),
// dpos[p] += sum_b dtokens[b, p] and dcls += sum_b dtokens[b, 0] (fp32, the batch summed in
// index order onto the old value, as the CPU twin: bit-identical). One thread per (p, k), so
// each fp32 sum has one owner: grid (T, ceil(D / blockDim.x)), thread k = blockIdx.y *
// blockDim.x + threadIdx.x (only T*D threads in all, so small blocks spread them over the SMs).
extern "C" __global__ void add_cls_and_pos_backward(bf16* __restrict__ dpatches, float* __restrict__ dcls,
                                                    float* __restrict__ dpos,
                                                    const bf16* __restrict__ dtokens, int b, int t,
                                                    int d) {
    const int p = blockIdx.x;
    const int k = blockIdx.y * blockDim.x + threadIdx.x;
    if (k >= d) return;  // no synchronisation below
    const int64_t at = (int64_t)p * d + k;
    const int64_t sample = (int64_t)t * d;  // dtokens elements per sample
    float acc = dpos[at];
    if (p == 0) {
        float cacc = dcls[k];
        for (int bi = 0; bi < b; bi++) {
            const float v = to_f32(dtokens[bi * sample + at]);
            acc += v;
            cacc += v;
        }
        dcls[k] = cacc;
    } else {
        bf16* dp = dpatches + (int64_t)(p - 1) * d + k;
        const int64_t patch_sample = (int64_t)(t - 1) * d;  // dpatches elements per sample
#pragma unroll 4
        for (int bi = 0; bi < b; bi++) {
            const float v = to_f32(dtokens[bi * sample + at]);
            acc += v;
            store(&dp[bi * patch_sample], to_f32(dp[bi * patch_sample]) + v);
        }
    }
    dpos[at] = acc;
}

// ------------------------------------------------------------------------------------------
// LayerNorm, one warp per row (blockDim.x = 32 * rows per block). Statistics fp32 with a
// two-pass variance (biased), rstd = 1 / sqrtf(var + eps) (IEEE sqrt and division, as the
// CPU twin); x and y bf16, gamma/beta fp32. The row is re-read from global memory for each
// pass (the second and third reads hit L1/L2), so any D works.

// Mean and rstd of the bf16 row xr (length d) for lane `lane`; every lane gets both.
__device__ __forceinline__ void row_stats(const bf16* xr, int d, int lane, float* mean, float* rstd) {
    float s = 0.0f;
    for (int k = lane; k < d; k += 32) s += to_f32(xr[k]);
    const float m = warp_sum(s) / (float)d;
    float v = 0.0f;
    for (int k = lane; k < d; k += 32) {
        const float dl = to_f32(xr[k]) - m;
        v += dl * dl;
    }
    const float var = warp_sum(v) / (float)d;
    *mean = m;
    *rstd = 1.0f / sqrtf(var + LN_EPS);
}

__device__ __forceinline__ void row_normalise(bf16* yr, const bf16* xr, const float* w, const float* b,
                                              int d, int lane, float m, float r) {
    for (int k = lane; k < d; k += 32) store(&yr[k], (to_f32(xr[k]) - m) * r * w[k] + b[k]);
}

// x (n, d), w (d), b (d) -> y (n, d), mean (n), rstd (n). grid ceil(n / rows per block).
extern "C" __global__ void layernorm_forward(bf16* __restrict__ y, float* __restrict__ mean,
                                             float* __restrict__ rstd, const bf16* __restrict__ x,
                                             const float* __restrict__ w, const float* __restrict__ b,
                                             int n, int d) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps only: row is the same for all 32 lanes
    const bf16* xr = x + row * d;
    float m, r;
    row_stats(xr, d, lane, &m, &r);
    row_normalise(y + row * d, xr, w, b, d, lane, m, r);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// The residual add of a ViT block fused with the next layernorm: x[row] += mask[row / rps] *
// branch[row] (bf16, in place; rps = rows per sample, the tokens of one image), then
// layernorm of the new x as layernorm_forward. The sum is rounded once to bf16 from an
// unfused f32 multiply and add, exactly as residual_add_scaled, and the statistics are taken
// of the stored (rounded) x, which is what the backward pass reads. Saves re-reading x.
// x (n, d) +=, branch (n, d), mask (n / rps), w, b (d) -> y (n, d), mean, rstd (n).
extern "C" __global__ void residual_layernorm_forward(bf16* __restrict__ x, bf16* __restrict__ y,
                                                      float* __restrict__ mean, float* __restrict__ rstd,
                                                      const bf16* __restrict__ branch,
                                                      const float* __restrict__ mask,
                                                      const float* __restrict__ w,
                                                      const float* __restrict__ b, int n, int d,
                                                      int rows_per_sample) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps only
    const float keep = mask[row / rows_per_sample];
    bf16* xr = x + row * d;
    const bf16* br = branch + row * d;
    // Each lane re-reads only the elements it wrote itself, so no synchronisation is needed.
    for (int k = lane; k < d; k += 32) {
        store(&xr[k], __fadd_rn(to_f32(xr[k]), __fmul_rn(keep, to_f32(br[k]))));
    }
    float m, r;
    row_stats(xr, d, lane, &m, &r);
    row_normalise(y + row * d, xr, w, b, d, lane, m, r);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// The end of both layernorm backward kernels: after every warp has written its [2][d] sums
// to shared memory, the block's partials (dw then db) are their sum in warp order.
static __device__ __forceinline__ void ln_block_partials(const float* part, float* __restrict__ partials, int d) {
    const int warps = blockDim.x >> 5;
    __syncthreads();
    float* out = partials + (int64_t)blockIdx.x * 2 * d;
    for (int k = threadIdx.x; k < 2 * d; k += blockDim.x) {
        float acc = 0.0f;
        for (int v = 0; v < warps; v++) acc += part[(size_t)v * 2 * d + k];
        out[k] = acc;
    }
}

// Backward of layernorm_forward. With xhat = (x - mean) * rstd and g = dy * w:
// dx += rstd * (g - mean(g) - xhat * mean(g * xhat)) (bf16, accumulated), and this block's
// share of dw = sum dy * xhat and db = sum dy written to partials[block] = (dw[0..d],
// db[0..d]) for column_sum_finish. One warp per row; block `blk` owns rows
// [blk * rows_per_block, +rows_per_block), warp w takes rows w, w + warps, ... of them in
// order, summing into its own slice of shared memory (each lane owns columns lane + 32 j),
// and the warps' slices are then added in warp order: a fixed order for given (n, d).
// Dynamic shared memory: warps * 2 * d floats. grid ceil(n / rows_per_block).
extern "C" __global__ void layernorm_backward(bf16* __restrict__ dx, float* __restrict__ partials,
                                              const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd,
                                              const float* __restrict__ w, int n, int d,
                                              int rows_per_block) {
    extern __shared__ float part[];  // [warps][2][d]
    const int warps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* dw_part = part + (size_t)warp * 2 * d;
    float* db_part = dw_part + d;
    for (int k = lane; k < d; k += 32) {
        dw_part[k] = 0.0f;
        db_part[k] = 0.0f;
    }
    const int64_t row0 = (int64_t)blockIdx.x * rows_per_block;
    const int64_t row_end = min((int64_t)n, row0 + rows_per_block);
    for (int64_t row = row0 + warp; row < row_end; row += warps) {  // warp-uniform
        const float m = mean[row], s = rstd[row];
        const bf16* dyr = dy + row * d;
        const bf16* xr = x + row * d;
        float gs = 0.0f, gxs = 0.0f;
        for (int k = lane; k < d; k += 32) {
            const float g = to_f32(dyr[k]) * w[k];
            gs += g;
            gxs += g * ((to_f32(xr[k]) - m) * s);
        }
        const float g_mean = warp_sum(gs) / (float)d;
        const float gx_mean = warp_sum(gxs) / (float)d;
        bf16* dxr = dx + row * d;
        for (int k = lane; k < d; k += 32) {
            const float dyk = to_f32(dyr[k]);
            const float xhat = (to_f32(xr[k]) - m) * s;
            store(&dxr[k], to_f32(dxr[k]) + (dyk * w[k] - g_mean - xhat * gx_mean) * s);
            dw_part[k] += dyk * xhat;
            db_part[k] += dyk;
        }
    }
    ln_block_partials(part, partials, d);
}

// The same contract as layernorm_backward (same partials layout, grid and shared memory),
// for rows whose width d is a multiple of 4 and at most 128 * LNV_MAX, with dx, dy and x
// 8-byte aligned: each lane owns the 4-column groups lane + 32 v (v < V = ceil(d / 128)),
// loads them with 8-byte loads once per row (the generic kernel reads a row twice, two bytes
// at a time), and keeps its dw and db sums in registers until the block's end, where they go
// to shared memory for the warp-order block sum. The launcher picks V.
#define LNV_MAX 6
static __device__ __forceinline__ void unpack4(uint2 u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
}
static __device__ __forceinline__ uint2 pack4(const float (&f)[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(f[0], f[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(f[2], f[3]);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&lo);
    u.y = *reinterpret_cast<const uint32_t*>(&hi);
    return u;
}

template <int V>
static __device__ __forceinline__ void layernorm_backward_rows(
    bf16* __restrict__ dx, float* __restrict__ partials, const bf16* __restrict__ dy,
    const bf16* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
    const float* __restrict__ w, int n, int d, int rows_per_block) {
    extern __shared__ float part[];  // [warps][2][d]
    const int warps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = d >> 2;
    float wv[V][4], dw_acc[V][4], db_acc[V][4];
#pragma unroll
    for (int v = 0; v < V; v++) {
        const int gi = lane + 32 * v;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            wv[v][e] = gi < groups ? w[4 * gi + e] : 0.0f;
            dw_acc[v][e] = 0.0f;
            db_acc[v][e] = 0.0f;
        }
    }
    const int64_t row0 = (int64_t)blockIdx.x * rows_per_block;
    const int64_t row_end = min((int64_t)n, row0 + rows_per_block);
    for (int64_t row = row0 + warp; row < row_end; row += warps) {  // warp-uniform
        const float m = mean[row], s = rstd[row];
        const uint2* dyr = reinterpret_cast<const uint2*>(dy + row * d);
        const uint2* xr = reinterpret_cast<const uint2*>(x + row * d);
        uint2* dxr = reinterpret_cast<uint2*>(dx + row * d);
        float g[V][4], xh[V][4], dyv[V][4];
        float gs = 0.0f, gxs = 0.0f;
#pragma unroll
        for (int v = 0; v < V; v++) {
            const int gi = lane + 32 * v;
            uint2 a = make_uint2(0u, 0u), b = make_uint2(0u, 0u);
            if (gi < groups) {
                a = dyr[gi];
                b = xr[gi];
            }
            float xv[4];
            unpack4(a, dyv[v]);
            unpack4(b, xv);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                xh[v][e] = (xv[e] - m) * s;
                g[v][e] = dyv[v][e] * wv[v][e];
                gs += g[v][e];
                gxs += g[v][e] * xh[v][e];
            }
        }
        const float g_mean = warp_sum(gs) / (float)d;
        const float gx_mean = warp_sum(gxs) / (float)d;
#pragma unroll
        for (int v = 0; v < V; v++) {
            const int gi = lane + 32 * v;
            if (gi < groups) {
                float old[4], upd[4];
                unpack4(dxr[gi], old);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    upd[e] = old[e] + (g[v][e] - g_mean - xh[v][e] * gx_mean) * s;
                    dw_acc[v][e] += dyv[v][e] * xh[v][e];
                    db_acc[v][e] += dyv[v][e];
                }
                dxr[gi] = pack4(upd);
            }
        }
    }
    float* dw_part = part + (size_t)warp * 2 * d;
    float* db_part = dw_part + d;
#pragma unroll
    for (int v = 0; v < V; v++) {
        const int gi = lane + 32 * v;
        if (gi < groups) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                dw_part[4 * gi + e] = dw_acc[v][e];
                db_part[4 * gi + e] = db_acc[v][e];
            }
        }
    }
    ln_block_partials(part, partials, d);
}

// One kernel per V = ceil(d / 128) (1..LNV_MAX = 6, so d <= 768), so that each gets the
// registers its V needs rather than the widest one's (written out: build.rs reads the
// kernel names from the source).
extern "C" __global__ void layernorm_backward_vec1(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<1>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}
extern "C" __global__ void layernorm_backward_vec2(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<2>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}
extern "C" __global__ void layernorm_backward_vec3(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<3>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}
extern "C" __global__ void layernorm_backward_vec4(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<4>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}
extern "C" __global__ void layernorm_backward_vec5(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<5>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}
extern "C" __global__ void layernorm_backward_vec6(bf16* __restrict__ dx, float* __restrict__ partials,
                                                   const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                                   const float* __restrict__ w, int n, int d, int rows_per_block) {
    layernorm_backward_rows<6>(dx, partials, dy, x, mean, rstd, w, n, d, rows_per_block);
}

// ------------------------------------------------------------------------------------------
// Second pass of every deterministic column reduction: acc[c] += sum_q partials[q*stride + c]
// for q in [0, p), c in [0, d). Block of 512 threads = 32 columns x 16 row-threads; row-thread
// ty sums q = ty, ty + 16, ... in order, then thread ty = 0 adds the 16 sums in order.
// grid ceil(d / 32).
extern "C" __global__ void column_sum_finish(float* __restrict__ acc, const float* __restrict__ partials,
                                             int p, int d, int stride) {
    __shared__ float sums[16][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + tx;
    float s = 0.0f;
    if (c < d) {
#pragma unroll 4
        for (int q = ty; q < p; q += 16) s += partials[(int64_t)q * stride + c];
    }
    sums[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < d) {
        float total = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++) total += sums[j][tx];
        acc[c] += total;
    }
}

// ------------------------------------------------------------------------------------------
// Exact GELU, gelu(x) = x Phi(x), Phi(x) = 0.5 erfc(-x / sqrt 2) (accurate in the left tail,
// like the CPU twin's f64 erfc; here in f32).
__device__ __forceinline__ float normal_cdf(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
__device__ __forceinline__ float gelu_grad(float x) {
    return normal_cdf(x) + x * (0.39894228040143268f * expf(-0.5f * x * x));
}

// y = gelu(x + b): x (n, h) bf16 (the GEMM's output without bias), b (h) fp32, y (n, h) bf16.
// x is kept by the caller and the backward recomputes x + b from it (one f32 add, the same
// value), so nothing else is saved. grid (n) rows, threads stride over h.
extern "C" __global__ void bias_gelu_forward(bf16* __restrict__ y, const bf16* __restrict__ x,
                                             const float* __restrict__ b, int h) {
    const int64_t off = (int64_t)blockIdx.x * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        const float pre = to_f32(x[off + c]) + b[c];
        store(&y[off + c], pre * normal_cdf(pre));
    }
}

// Backward of bias_gelu_forward: dpre = dy * gelu'(x + b) is WRITTEN (bf16, not accumulated:
// d(x+b) is a fresh intermediate whose only consumer is the GEMM's backward), and this
// block's column sums of the unrounded fp32 dpre go to partials[chunk] (h floats) for
// column_sum_finish into db. grid (chunks = ceil(n / rows_per_chunk), ceil(h / blockDim.x)):
// thread c of block (q, j) owns column j * blockDim.x + c over rows [q * rpc, +rpc), in order.
extern "C" __global__ void bias_gelu_backward(bf16* __restrict__ dpre, float* __restrict__ partials,
                                              const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                              const float* __restrict__ b, int n, int h,
                                              int rows_per_chunk) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= h) return;  // no block-wide synchronisation below
    const int64_t r0 = (int64_t)blockIdx.x * rows_per_chunk;
    const int64_t r1 = min((int64_t)n, r0 + rows_per_chunk);
    const float bc = b[c];
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t r = r0; r < r1; r++) {
        const int64_t at = r * h + c;
        const float g = to_f32(dy[at]) * gelu_grad(to_f32(x[at]) + bc);
        store(&dpre[at], g);
        acc += g;
    }
    partials[(int64_t)blockIdx.x * h + c] = acc;
}

// y += b per row (bf16 y, fp32 b): the bias of a Linear whose GEMM wrote no bias. grid (n)
// rows, threads stride over h.
extern "C" __global__ void bias_add(bf16* __restrict__ y, const float* __restrict__ b, int h) {
    const int64_t off = (int64_t)blockIdx.x * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) store(&y[off + c], to_f32(y[off + c]) + b[c]);
}

// First pass of db += sum over rows of dy (bf16): partials[chunk][c] = sum of dy[r, c] over the
// chunk's rows, in order. Launch as bias_gelu_backward.
extern "C" __global__ void bias_backward(float* __restrict__ partials, const bf16* __restrict__ dy,
                                         int n, int h, int rows_per_chunk) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= h) return;
    const int64_t r0 = (int64_t)blockIdx.x * rows_per_chunk;
    const int64_t r1 = min((int64_t)n, r0 + rows_per_chunk);
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t r = r0; r < r1; r++) acc += to_f32(dy[r * h + c]);
    partials[(int64_t)blockIdx.x * h + c] = acc;
}

// ------------------------------------------------------------------------------------------
// DINO head. One warp per row (blockDim.x = 32 * rows per block), grid ceil(rows / that).

// y = x / max(||x||, 1e-12) per row, norms = ||x|| unclamped. x, y (n, d) bf16; norms fp32.
extern "C" __global__ void l2norm_forward(bf16* __restrict__ y, float* __restrict__ norms,
                                          const bf16* __restrict__ x, int n, int d) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps only
    const bf16* xr = x + row * d;
    float s = 0.0f;
    for (int k = lane; k < d; k += 32) {
        const float v = to_f32(xr[k]);
        s += v * v;
    }
    const float nrm = sqrtf(warp_sum(s));
    const float inv = 1.0f / fmaxf(nrm, L2NORM_EPS);
    bf16* yr = y + row * d;
    for (int k = lane; k < d; k += 32) store(&yr[k], to_f32(xr[k]) * inv);
    if (lane == 0) norms[row] = nrm;
}

// dx += (dy - y (y . dy)) / r with y = x / r, r = norms[row]; a clamped row (r <= 1e-12) is a
// plain scaling, dx += dy / 1e-12. dx, dy, x (n, d) bf16; norms fp32.
extern "C" __global__ void l2norm_backward(bf16* __restrict__ dx, const bf16* __restrict__ dy,
                                           const bf16* __restrict__ x, const float* __restrict__ norms,
                                           int n, int d) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps only
    const bf16* dyr = dy + row * d;
    const bf16* xr = x + row * d;
    bf16* dxr = dx + row * d;
    const float r = norms[row];
    if (r > L2NORM_EPS) {  // the same for the whole warp
        const float inv = 1.0f / r;
        float s = 0.0f;
        for (int k = lane; k < d; k += 32) s += to_f32(dyr[k]) * to_f32(xr[k]);
        const float dot = warp_sum(s) * inv;
        for (int k = lane; k < d; k += 32) {
            store(&dxr[k], to_f32(dxr[k]) + (to_f32(dyr[k]) - to_f32(xr[k]) * inv * dot) * inv);
        }
    } else {
        for (int k = lane; k < d; k += 32) store(&dxr[k], to_f32(dxr[k]) + to_f32(dyr[k]) / L2NORM_EPS);
    }
}

// W[k] = V[k] / ||V[k]|| (gain 1, no epsilon, as PyTorch's weight_norm), row_norms = ||V[k]||.
// v (K, Db) fp32 master weight -> w (K, Db) bf16, the last layer's GEMM operand.
extern "C" __global__ void weight_norm_forward(bf16* __restrict__ w, float* __restrict__ row_norms,
                                               const float* __restrict__ v, int k, int db) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= k) return;  // whole warps only
    const float* vr = v + row * db;
    float s = 0.0f;
    for (int j = lane; j < db; j += 32) s += vr[j] * vr[j];
    const float nrm = sqrtf(warp_sum(s));
    const float inv = 1.0f / nrm;
    bf16* wr = w + row * db;
    for (int j = lane; j < db; j += 32) store(&wr[j], vr[j] * inv);
    if (lane == 0) row_norms[row] = nrm;
}

// dV[k] += (dW[k] - (dW[k] . w_k) w_k) / ||V[k]||, w_k = V[k] / ||V[k]||. All fp32: dw is the
// GEMM's fp32 weight gradient, dv a slice of the flat gradient buffer.
extern "C" __global__ void weight_norm_backward(float* __restrict__ dv, const float* __restrict__ dw,
                                                const float* __restrict__ v,
                                                const float* __restrict__ row_norms, int k, int db) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= k) return;  // whole warps only
    const float* dwr = dw + row * db;
    const float* vr = v + row * db;
    float* dvr = dv + row * db;
    const float inv = 1.0f / row_norms[row];
    float s = 0.0f;
    for (int j = lane; j < db; j += 32) s += dwr[j] * vr[j];
    const float dot = warp_sum(s) * inv;
    for (int j = lane; j < db; j += 32) dvr[j] += (dwr[j] - dot * vr[j] * inv) * inv;
}

// ------------------------------------------------------------------------------------------
// Residual add with per-sample drop path: x[b] += mask[b] * branch[b] (bf16 x and branch,
// fp32 mask; unfused multiply and add, so the sum before rounding is the CPU twin's).
// grid (ceil(l / blockDim.x) capped, B): blockIdx.y is the sample, threads stride over its l.
extern "C" __global__ void residual_add_scaled(bf16* __restrict__ x, const bf16* __restrict__ branch,
                                               const float* __restrict__ mask, int l) {
    const float keep = mask[blockIdx.y];
    const int64_t off = (int64_t)blockIdx.y * l;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < l;
         j += (int64_t)gridDim.x * blockDim.x) {
        store(&x[off + j], __fadd_rn(to_f32(x[off + j]), __fmul_rn(keep, to_f32(branch[off + j]))));
    }
}

// Its branch gradient: dbranch[b] += mask[b] * dx[b] (bf16). The skip path's gradient is dx
// itself, which the caller keeps accumulating in place. Launch as residual_add_scaled.
extern "C" __global__ void residual_add_scaled_backward(bf16* __restrict__ dbranch,
                                                        const bf16* __restrict__ dx,
                                                        const float* __restrict__ mask, int l) {
    const float keep = mask[blockIdx.y];
    const int64_t off = (int64_t)blockIdx.y * l;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < l;
         j += (int64_t)gridDim.x * blockDim.x) {
        store(&dbranch[off + j], __fadd_rn(to_f32(dbranch[off + j]), __fmul_rn(keep, to_f32(dx[off + j]))));
    }
}
