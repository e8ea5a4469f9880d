// Fused (flash-style) multi-head self-attention, forward and backward: the GPU twins of
// `attention_forward` / `attention_backward` in src/cpu/attention.rs (timm's Attention core,
// `softmax(q k^T * hd^-0.5) v` per head, no mask). Launchers: src/cuda/attention.rs.
//
// Layouts (B images, N tokens, H heads, head dim HD, D = H * HD):
//   qkv  (B, N, 3D) bf16: q of head h at columns [h*HD, (h+1)*HD) of a token row, k at D +
//        those columns, v at 2D + those (timm's reshape(B, N, 3, H, HD));
//   out  (B, N, D) bf16, heads concatenated; dout the same;
//   lse  (B, H, N) fp32: the natural log-sum-exp of each row of scaled scores, the only
//        softmax statistic saved (the N x N probabilities never reach global memory);
//   dvec (B, H, N) fp32 scratch: D_i = rowsum(dO_i * O_i) over the head's columns, written
//        by the dQ kernel and read by the dK/dV kernel. O is the bf16 out, as in
//        FlashAttention; the CPU twin's rowsum(P * dP) is the same with the exact O, which
//        moves dq and dk by up to ~2e-3 of their largest element (check_backward in
//        src/cuda/attention.rs measures it);
//   dqkv (B, N, 3D) bf16: OVERWRITTEN (unlike the CPU twin, which accumulates): dq by the
//        dQ kernel, dk and dv by the dK/dV kernel, every element exactly once.
//
// Work split. Every kernel runs blocks of ATT_THREADS = 128 threads over a 1-D grid of
// ceil(N / OWN) * B * H blocks, block x taking row tile x % tiles of the (image, head) pair
// x / tiles (so the tiles of one pair run side by side and share its K/V rows in L2). A
// block owns OWN = 64 rows (queries in the forward and dQ kernels, keys in the dK/dV kernel)
// and streams the other side through shared memory in tiles of STREAM rows:
//   forward: owns 64 queries, streams K and V 32 keys at a time; online softmax (running
//            max and sum per row, the output rescaled when the max grows); writes out and lse;
//   dQ:      owns 64 queries, computes D_i for them from dO and the saved out, streams K and V
//            16 keys at a time: P = exp(s - lse), dP = dO V^T, dS = P (dP - D), dQ += dS K;
//   dK/dV:   owns 64 keys, streams Q and dO 16 queries at a time: the same P and dS
//            (transposed), dV += P^T dO, dK += dS^T Q.
// dQ runs before dK/dV (same stream). No atomics: every output element has one owner thread
// and sums run in a fixed order, so results are bit-for-bit repeatable.
//
// Thread layout (all kernels): thread t owns rows 4 * (t / 8) + i (i < 4) of the block's
// tile, and streamed rows (t % 8) + 8 * j; the 8 threads of a row group are 8 consecutive
// lanes, so row reductions are three xor-shuffles. Accumulators (O, dQ, dK, dV) are 4 rows x
// HD / 8 columns per thread, column chunks of CW consecutive columns (see col_of).
//
// Two implementations share this contract: the CUDA-core kernels just below (`*_hd*`,
// fp32 arithmetic; `PWSELF_ATTENTION=simt`) and the tensor-core kernels at the end of the
// file (`*_tc_hd*`, the default), whose own comment says how they differ.
//
// Arithmetic (CUDA-core kernels): tiles are converted to fp32 in shared memory (rows padded by 4 floats, which
// keeps float4 alignment and spreads consecutive rows over the banks); products are plain
// fp32 FMA loops, exponentials base 2 with log2(e) folded into the scale. The two inner
// products, dot_tile (rows . rows over the head dim) and acc_tile (weights x rows, over the
// streamed rows), are the only places that touch the math.
//
// Alignment: every bf16 row is read with 16-byte loads, which needs HD % 8 == 0 (HD is 16,
// 32 or 64, so D and 3D are multiples of 8 too) and 16-byte aligned buffers (the launchers
// check it). Shared memory stays under the 48 KiB a block may use without an opt-in.

#include "common.cuh"

#define ATT_THREADS 128
// Blocks per SM the register allocation must allow: 2 of 128 threads lets ptxas use up to 255
// registers (it takes 128-168). With the thread count alone it spilled a few registers of
// the HD = 32 dQ kernel at 80 registers, a heuristic rather than a necessity.
#define ATT_MIN_BLOCKS 2
// Rows a block owns.
#define ATT_OWN 64
// Streamed rows per step: forward (keys) and backward (keys in dQ, queries in dK/dV).
#define ATT_FWD_STREAM 32
#define ATT_BWD_STREAM 16
// Padding of every fp32 shared row, in floats.
#define ATT_PAD 4

#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f

// Consecutive accumulator columns per chunk: 4 (float4 reads) when HD / 8 >= 4, else HD / 8.
template <int HD>
struct Cols {
    static constexpr int PER_THREAD = HD / 8;
    static constexpr int CW = PER_THREAD < 4 ? PER_THREAD : 4;
};

// The column (within the head) of accumulator column c (< HD / 8) of the thread with row-group
// lane tx (< 8): chunks of CW columns, the 8 lanes' chunks side by side.
template <int HD>
static __device__ __forceinline__ int col_of(int c, int tx) {
    constexpr int CW = Cols<HD>::CW;
    return (c / CW) * (8 * CW) + tx * CW + (c % CW);
}

static __device__ __forceinline__ float4 ld4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
static __device__ __forceinline__ void st4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the float.
static __device__ __forceinline__ float lo_bf16(uint32_t w) { return __uint_as_float(w << 16); }
static __device__ __forceinline__ float hi_bf16(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// dst[r][0..HD) = rows r < ROWS of a bf16 matrix with row stride `stride` elements, as fp32;
// rows r >= valid are zero (so padded rows never bring NaN or garbage into a product).
// Consecutive threads take consecutive 16-byte chunks of a row (coalesced reads).
template <int HD, int ROWS>
static __device__ __forceinline__ void load_rows(float (*dst)[HD + ATT_PAD], const bf16* src,
                                                 long long stride, int valid) {
    constexpr int CHUNKS = HD / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += ATT_THREADS) {
        const int r = c / CHUNKS;
        const int e = (c % CHUNKS) * 8;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) raw = *reinterpret_cast<const uint4*>(src + r * stride + e);
        st4(&dst[r][e], lo_bf16(raw.x), hi_bf16(raw.x), lo_bf16(raw.y), hi_bf16(raw.y));
        st4(&dst[r][e + 4], lo_bf16(raw.z), hi_bf16(raw.z), lo_bf16(raw.w), hi_bf16(raw.w));
    }
}

// acc[i][j] += own[4*ty + i] . str[tx + 8*j] over the head dim (i < 4, j < NS).
template <int HD, int NS>
static __device__ __forceinline__ void dot_tile(float (&acc)[4][NS], const float (*own)[HD + ATT_PAD],
                                                const float (*str)[HD + ATT_PAD], int ty, int tx) {
#pragma unroll 4
    for (int e = 0; e < HD; e += 4) {
        float4 a[4], b[NS];
#pragma unroll
        for (int i = 0; i < 4; i++) a[i] = ld4(&own[4 * ty + i][e]);
#pragma unroll
        for (int j = 0; j < NS; j++) b[j] = ld4(&str[tx + 8 * j][e]);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < NS; j++) {
                float s = acc[i][j];
                s = fmaf(a[i].x, b[j].x, s);
                s = fmaf(a[i].y, b[j].y, s);
                s = fmaf(a[i].z, b[j].z, s);
                s = fmaf(a[i].w, b[j].w, s);
                acc[i][j] = s;
            }
    }
}

// acc[i][c] += sum_{k < K} w[k][4*ty + i] * src[k][col_of(c, tx)]: the weights are stored
// transposed (streamed row major), so the 4 owned rows' weights are one float4.
template <int HD, int K>
static __device__ __forceinline__ void acc_tile(float (&acc)[4][HD / 8], const float (*w)[ATT_OWN + ATT_PAD],
                                                const float (*src)[HD + ATT_PAD], int ty, int tx) {
    constexpr int OC = Cols<HD>::PER_THREAD, CW = Cols<HD>::CW;
#pragma unroll 4
    for (int k = 0; k < K; k++) {
        const float4 p4 = ld4(&w[k][4 * ty]);
        const float p[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
        for (int c0 = 0; c0 < OC; c0 += CW) {
            const float* row = &src[k][col_of<HD>(c0, tx)];
            float v[CW];
            if constexpr (CW == 4) {
                const float4 t = ld4(row);
                v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
            } else {
#pragma unroll
                for (int u = 0; u < CW; u++) v[u] = row[u];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int u = 0; u < CW; u++) acc[i][c0 + u] = fmaf(p[i], v[u], acc[i][c0 + u]);
        }
    }
}

// Writes row i of a thread's accumulator, times `mul`, as bf16 at `dst` (the head's column 0
// of one token row): CW consecutive columns per chunk, packed into one store.
template <int HD>
static __device__ __forceinline__ void store_cols(bf16* dst, const float (&acc)[HD / 8], float mul, int tx) {
    constexpr int OC = Cols<HD>::PER_THREAD, CW = Cols<HD>::CW;
#pragma unroll
    for (int c0 = 0; c0 < OC; c0 += CW) {
        uint32_t w[CW / 2];
#pragma unroll
        for (int u = 0; u < CW; u += 2) {
            const uint32_t a = __bfloat16_as_ushort(__float2bfloat16_rn(acc[c0 + u] * mul));
            const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(acc[c0 + u + 1] * mul));
            w[u / 2] = a | (b << 16);
        }
        bf16* p = dst + col_of<HD>(c0, tx);
        if constexpr (CW == 4) {
            *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
        } else {
            *reinterpret_cast<uint32_t*>(p) = w[0];
        }
    }
}

static __device__ __forceinline__ float row_group_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}
static __device__ __forceinline__ float row_group_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x + __shfl_xor_sync(0xffffffffu, x, 4);
}

// Which (image, head) pair and row tile block blockIdx.x takes.
struct Tile {
    int b, h, bh, row0;
};
static __device__ __forceinline__ Tile tile_of(int n, int heads) {
    const int tiles = (n + ATT_OWN - 1) / ATT_OWN;
    const int bh = blockIdx.x / tiles;
    return Tile{bh / heads, bh % heads, bh, (int)(blockIdx.x % tiles) * ATT_OWN};
}

// ---------------------------------------------------------------------------------------
// Forward: qkv -> out, lse.

template <int HD>
static __device__ __forceinline__ void forward_block(bf16* __restrict__ out, float* __restrict__ lse,
                                                     const bf16* __restrict__ qkv, int n, int heads,
                                                     float scale) {
    constexpr int OC = Cols<HD>::PER_THREAD, NS = ATT_FWD_STREAM / 8;
    __align__(16) __shared__ float qs[ATT_OWN][HD + ATT_PAD];
    __align__(16) __shared__ float ks[ATT_FWD_STREAM][HD + ATT_PAD];
    __align__(16) __shared__ float vs[ATT_FWD_STREAM][HD + ATT_PAD];
    __align__(16) __shared__ float pt[ATT_FWD_STREAM][ATT_OWN + ATT_PAD];  // P, (key, query)

    const Tile t = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)t.b * n * stride + (long long)t.h * HD;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const float scale_log2 = scale * ATT_LOG2E;

    load_rows<HD, ATT_OWN>(qs, head + t.row0 * stride, stride, n - t.row0);
    float o[4][OC], m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < OC; c++) o[i][c] = 0.0f;
    }
    for (int k0 = 0; k0 < n; k0 += ATT_FWD_STREAM) {
        __syncthreads();  // the previous step's readers of ks, vs and pt are done
        load_rows<HD, ATT_FWD_STREAM>(ks, head + d + k0 * stride, stride, n - k0);
        load_rows<HD, ATT_FWD_STREAM>(vs, head + 2 * d + k0 * stride, stride, n - k0);
        __syncthreads();
        float s[4][NS];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < NS; j++) s[i][j] = 0.0f;
        dot_tile<HD, NS>(s, qs, ks, ty, tx);
        // Online softmax, base 2: s2 = log2(e) * scale * q.k; keys past N weigh 0. Every tile
        // holds key k0 < N, so the row max is finite from the first tile on.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < NS; j++) {
                s[i][j] = k0 + tx + 8 * j < n ? s[i][j] * scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            const float m_new = fmaxf(m[i], row_group_max(mx));
            const float alpha = exp2f(m[i] - m_new);  // 0 on the first tile (m = -inf)
            m[i] = m_new;
            l[i] *= alpha;
#pragma unroll
            for (int c = 0; c < OC; c++) o[i][c] *= alpha;
#pragma unroll
            for (int j = 0; j < NS; j++) {
                s[i][j] = exp2f(s[i][j] - m_new);
                l[i] += s[i][j];  // this thread's share of the row sum
            }
        }
#pragma unroll
        for (int j = 0; j < NS; j++) st4(&pt[tx + 8 * j][4 * ty], s[0][j], s[1][j], s[2][j], s[3][j]);
        __syncthreads();
        acc_tile<HD, ATT_FWD_STREAM>(o, pt, vs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float sum = row_group_sum(l[i]);
        const int q = t.row0 + 4 * ty + i;
        if (q < n) {
            store_cols<HD>(out + ((long long)t.b * n + q) * d + (long long)t.h * HD, o[i], 1.0f / sum, tx);
            if (tx == 0) lse[(long long)t.bh * n + q] = (m[i] + log2f(sum)) * ATT_LN2;
        }
    }
}

// out (B, N, D), lse (B, H, N) <- qkv (B, N, 3D); grid ceil(N / 64) * B * H, 128 threads.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_hd16(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_block<16>(out, lse, qkv, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_hd32(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_block<32>(out, lse, qkv, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_hd64(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_block<64>(out, lse, qkv, n, heads, scale);
}

// ---------------------------------------------------------------------------------------
// Backward, dQ (and D): dqkv's q columns, dvec <- dout, qkv, out, lse.

template <int HD>
static __device__ __forceinline__ void backward_dq_block(bf16* __restrict__ dqkv, float* __restrict__ dvec,
                                                         const bf16* __restrict__ dout,
                                                         const bf16* __restrict__ qkv,
                                                         const bf16* __restrict__ out,
                                                         const float* __restrict__ lse, int n, int heads,
                                                         float scale) {
    constexpr int OC = Cols<HD>::PER_THREAD, NS = ATT_BWD_STREAM / 8;
    __align__(16) __shared__ float qs[ATT_OWN][HD + ATT_PAD];
    __align__(16) __shared__ float dos[ATT_OWN][HD + ATT_PAD];
    __align__(16) __shared__ float ks[ATT_BWD_STREAM][HD + ATT_PAD];
    __align__(16) __shared__ float vs[ATT_BWD_STREAM][HD + ATT_PAD];
    __align__(16) __shared__ float dst[ATT_BWD_STREAM][ATT_OWN + ATT_PAD];  // dS, (key, query)

    const Tile t = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)t.b * n * stride + (long long)t.h * HD;
    const bf16* dout_head = dout + (long long)t.b * n * d + (long long)t.h * HD;
    const bf16* out_head = out + (long long)t.b * n * d + (long long)t.h * HD;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const float scale_log2 = scale * ATT_LOG2E;

    load_rows<HD, ATT_OWN>(qs, head + t.row0 * stride, stride, n - t.row0);
    load_rows<HD, ATT_OWN>(dos, dout_head + t.row0 * (long long)d, d, n - t.row0);
    __syncthreads();
    // D_i = dO_i . O_i (the 8 lanes of a row group take HD / 8 columns each) and the row's
    // lse in base 2; rows past N get 0 for both, which keeps their (unstored) values finite.
    float dd[4], lse2[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int q = t.row0 + 4 * ty + i;
        float part = 0.0f;
        if (q < n) {
            const bf16* orow = out_head + (long long)q * d;
#pragma unroll
            for (int u = 0; u < HD / 8; u++) {
                const int c = tx * (HD / 8) + u;
                part = fmaf(dos[4 * ty + i][c], to_f32(orow[c]), part);
            }
        }
        dd[i] = row_group_sum(part);
        lse2[i] = q < n ? lse[(long long)t.bh * n + q] * ATT_LOG2E : 0.0f;
        if (q < n && tx == 0) dvec[(long long)t.bh * n + q] = dd[i];
    }

    float acc[4][OC];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < OC; c++) acc[i][c] = 0.0f;
    for (int k0 = 0; k0 < n; k0 += ATT_BWD_STREAM) {
        __syncthreads();  // the previous step's readers of ks, vs and dst are done
        load_rows<HD, ATT_BWD_STREAM>(ks, head + d + k0 * stride, stride, n - k0);
        load_rows<HD, ATT_BWD_STREAM>(vs, head + 2 * d + k0 * stride, stride, n - k0);
        __syncthreads();
        float s[4][NS], dp[4][NS];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < NS; j++) s[i][j] = dp[i][j] = 0.0f;
        dot_tile<HD, NS>(s, qs, ks, ty, tx);    // q_i . k_j
        dot_tile<HD, NS>(dp, dos, vs, ty, tx);  // dP_ij = dO_i . v_j
#pragma unroll
        for (int j = 0; j < NS; j++) {
            const bool valid = k0 + tx + 8 * j < n;
            float ds[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float p = valid ? exp2f(s[i][j] * scale_log2 - lse2[i]) : 0.0f;
                ds[i] = p * (dp[i][j] - dd[i]);
            }
            st4(&dst[tx + 8 * j][4 * ty], ds[0], ds[1], ds[2], ds[3]);
        }
        __syncthreads();
        acc_tile<HD, ATT_BWD_STREAM>(acc, dst, ks, ty, tx);  // dQ_i += dS_ij k_j
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int q = t.row0 + 4 * ty + i;
        if (q < n) store_cols<HD>(dqkv + ((long long)t.b * n + q) * stride + (long long)t.h * HD, acc[i], scale, tx);
    }
}

// dqkv[.., q columns], dvec (B, H, N) <- dout (B, N, D), qkv, out (B, N, D), lse (B, H, N);
// grid ceil(N / 64) * B * H, 128 threads. Runs before the dK/dV kernel, which reads dvec.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_hd16(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_block<16>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_hd32(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_block<32>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_hd64(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_block<64>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}

// ---------------------------------------------------------------------------------------
// Backward, dK and dV: dqkv's k and v columns <- dout, qkv, lse, dvec.

template <int HD>
static __device__ __forceinline__ void backward_dkv_block(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                          const bf16* __restrict__ qkv,
                                                          const float* __restrict__ lse,
                                                          const float* __restrict__ dvec, int n, int heads,
                                                          float scale) {
    constexpr int OC = Cols<HD>::PER_THREAD, NS = ATT_BWD_STREAM / 8;
    __align__(16) __shared__ float ks[ATT_OWN][HD + ATT_PAD];
    __align__(16) __shared__ float vs[ATT_OWN][HD + ATT_PAD];
    __align__(16) __shared__ float qs[ATT_BWD_STREAM][HD + ATT_PAD];
    __align__(16) __shared__ float dos[ATT_BWD_STREAM][HD + ATT_PAD];
    // P, then dS, (query, key): one buffer for both keeps the block under 48 KiB at HD = 64.
    __align__(16) __shared__ float pds[ATT_BWD_STREAM][ATT_OWN + ATT_PAD];
    __shared__ float lse_s[ATT_BWD_STREAM], d_s[ATT_BWD_STREAM];

    const Tile t = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)t.b * n * stride + (long long)t.h * HD;
    const bf16* dout_head = dout + (long long)t.b * n * d + (long long)t.h * HD;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const float scale_log2 = scale * ATT_LOG2E;

    load_rows<HD, ATT_OWN>(ks, head + d + t.row0 * stride, stride, n - t.row0);
    load_rows<HD, ATT_OWN>(vs, head + 2 * d + t.row0 * stride, stride, n - t.row0);
    float dk[4][OC], dv[4][OC];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < OC; c++) dk[i][c] = dv[i][c] = 0.0f;
    for (int q0 = 0; q0 < n; q0 += ATT_BWD_STREAM) {
        __syncthreads();  // the previous step's readers of qs, dos, pds, lse_s and d_s are done
        load_rows<HD, ATT_BWD_STREAM>(qs, head + q0 * stride, stride, n - q0);
        load_rows<HD, ATT_BWD_STREAM>(dos, dout_head + q0 * (long long)d, d, n - q0);
        if (threadIdx.x < ATT_BWD_STREAM) {
            const int q = q0 + threadIdx.x;
            lse_s[threadIdx.x] = q < n ? lse[(long long)t.bh * n + q] * ATT_LOG2E : 0.0f;
            d_s[threadIdx.x] = q < n ? dvec[(long long)t.bh * n + q] : 0.0f;
        }
        __syncthreads();
        float s[4][NS], dp[4][NS];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < NS; j++) s[i][j] = dp[i][j] = 0.0f;
        dot_tile<HD, NS>(s, ks, qs, ty, tx);    // k_i . q_j
        dot_tile<HD, NS>(dp, vs, dos, ty, tx);  // dP_ji = dO_j . v_i
        // P_ji = exp(s - lse_j) (0 for queries past N) into pds; dS_ji kept in s.
#pragma unroll
        for (int j = 0; j < NS; j++) {
            const int qq = tx + 8 * j;
            const bool valid = q0 + qq < n;
            float p[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                p[i] = valid ? exp2f(s[i][j] * scale_log2 - lse_s[qq]) : 0.0f;
                s[i][j] = p[i] * (dp[i][j] - d_s[qq]);
            }
            st4(&pds[qq][4 * ty], p[0], p[1], p[2], p[3]);
        }
        __syncthreads();
        acc_tile<HD, ATT_BWD_STREAM>(dv, pds, dos, ty, tx);  // dV_i += P_ji dO_j
        __syncthreads();                                     // P is read: dS takes its place
#pragma unroll
        for (int j = 0; j < NS; j++) st4(&pds[tx + 8 * j][4 * ty], s[0][j], s[1][j], s[2][j], s[3][j]);
        __syncthreads();
        acc_tile<HD, ATT_BWD_STREAM>(dk, pds, qs, ty, tx);  // dK_i += dS_ji q_j
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int k = t.row0 + 4 * ty + i;
        if (k < n) {
            bf16* row = dqkv + ((long long)t.b * n + k) * stride + (long long)t.h * HD;
            store_cols<HD>(row + d, dk[i], scale, tx);
            store_cols<HD>(row + 2 * d, dv[i], 1.0f, tx);
        }
    }
}

// dqkv[.., k and v columns] <- dout (B, N, D), qkv, lse (B, H, N), dvec (B, H, N);
// grid ceil(N / 64) * B * H, 128 threads.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_hd16(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_block<16>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_hd32(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_block<32>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_hd64(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_block<64>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}

// =========================================================================================
// Tensor-core versions (the default; `PWSELF_ATTENTION=simt` selects the kernels above).
//
// The same contract, grid and outputs as the CUDA-core kernels (one block of 4 warps per
// 64-row tile of an (image, head) pair; dQ before dK/dV; no atomics, fixed summation
// order), with the products on the tensor cores (mma_16816, common.cuh). Each warp owns 16
// of the block's 64 rows, and keeps its own operands (Q and dO in the forward and dQ
// kernels, K and V in the dK/dV kernel) in registers as A fragments for the whole block; the
// streamed rows go through shared memory as bf16, rows padded by 8 elements so that the
// fragment loads of a warp fall in 32 different banks. A score tile's fp32 accumulators are
// exactly the A fragments of the next product once packed to bf16 (the FlashAttention-2
// layout), so P and dS never touch shared memory.
//
// Numerics: the probabilities P and dS are rounded to bf16 before their products (dV = P^T
// dO, dQ = dS K, dK = dS^T Q, O = P V), as FlashAttention does; the softmax statistics, the
// row sums and every accumulator stay fp32. check-kernels measures the effect against the
// fp32 CPU twin.

#define TC_PAD 8         // bf16 padding of a shared row
#define TC_FWD_KEYS 64   // keys per streamed tile, forward
#define TC_BWD_STREAM 32 // streamed rows per tile, backward

// rows [0, ROWS) of a (., HD) bf16 matrix with row stride `stride` into shared memory (row
// stride HD + TC_PAD), 16 bytes per thread per step; rows >= valid are zero.
template <int HD, int ROWS>
static __device__ __forceinline__ void tc_load_rows(bf16* dst, const bf16* src, long long stride, int valid) {
    constexpr int CHUNKS = HD / 8, RS = HD + TC_PAD;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += ATT_THREADS) {
        const int r = c / CHUNKS;
        const int e = (c % CHUNKS) * 8;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) raw = *reinterpret_cast<const uint4*>(src + r * stride + e);
        *reinterpret_cast<uint4*>(dst + r * RS + e) = raw;
    }
}

// Two consecutive bf16 (an even column) as one register.
static __device__ __forceinline__ uint32_t ld_pair(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }
// Elements p[0] and p[step] as one register (a column pair of two rows: the transposed operand).
static __device__ __forceinline__ uint32_t ld_cross(const bf16* p, int step) {
    return (uint32_t)__bfloat16_as_ushort(p[0]) | ((uint32_t)__bfloat16_as_ushort(p[step]) << 16);
}

// A fragments of the 16 rows r0.. of a (., HD) bf16 matrix in global memory (row stride
// `stride`), for k-steps over the head dim; rows >= n are zero.
template <int HD>
static __device__ __forceinline__ void tc_row_frags(uint32_t (&a)[HD / 16][4], const bf16* base, long long stride,
                                                    int r0, int n) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ra = r0 + g, rb = r0 + g + 8;
    const bf16* pa = base + (long long)ra * stride + 2 * t;
    const bf16* pb = base + (long long)rb * stride + 2 * t;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        a[kk][0] = ra < n ? ld_pair(pa + 16 * kk) : 0u;
        a[kk][1] = rb < n ? ld_pair(pb + 16 * kk) : 0u;
        a[kk][2] = ra < n ? ld_pair(pa + 16 * kk + 8) : 0u;
        a[kk][3] = rb < n ? ld_pair(pb + 16 * kk + 8) : 0u;
    }
}

// acc[j] = A (16 x HD, fragments a) times rows 8j.. of a shared tile (NT rows, HD columns)
// transposed: the 16 x NT product of the warp's rows with the tile's rows.
template <int HD, int NT>
static __device__ __forceinline__ void tc_dot_rows(float (&acc)[NT / 8][4], const uint32_t (&a)[HD / 16][4],
                                                   const bf16* tile) {
    constexpr int RS = HD + TC_PAD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < NT / 8; j++) {
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        const bf16* row = tile + (j * 8 + g) * RS + 2 * t;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t b[2] = {ld_pair(row + 16 * kk), ld_pair(row + 16 * kk + 8)};
            mma_16816(acc[j], a[kk], b);
        }
    }
}

// acc (16 x HD) += W (16 x NT, fp32 accumulators in the C layout, rounded to bf16 here)
// times a shared tile (NT rows, HD columns).
template <int HD, int NT>
static __device__ __forceinline__ void tc_acc_rows(float (&acc)[HD / 8][4], const float (&w)[NT / 8][4],
                                                   const bf16* tile) {
    constexpr int RS = HD + TC_PAD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < NT / 16; kk++) {
        const uint32_t a[4] = {pack_bf16x2(w[2 * kk][0], w[2 * kk][1]), pack_bf16x2(w[2 * kk][2], w[2 * kk][3]),
                               pack_bf16x2(w[2 * kk + 1][0], w[2 * kk + 1][1]),
                               pack_bf16x2(w[2 * kk + 1][2], w[2 * kk + 1][3])};
        const bf16* col = tile + (kk * 16 + 2 * t) * RS + g;
#pragma unroll
        for (int jd = 0; jd < HD / 8; jd++) {
            const uint32_t b[2] = {ld_cross(col + jd * 8, RS), ld_cross(col + jd * 8 + 8 * RS, RS)};
            mma_16816(acc[jd], a, b);
        }
    }
}

// Writes the warp's rows r0 + g and r0 + g + 8 (< n) of a 16 x HD accumulator, times `mul`,
// as bf16 into a (., .) matrix at `base` (the head's column 0 of row 0), row stride `stride`.
template <int HD>
static __device__ __forceinline__ void tc_store_rows(bf16* base, long long stride, const float (&acc)[HD / 8][4],
                                                     const float (&mul)[2], int r0, int n) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = r0 + g + 8 * r;
        if (row < n) {
            bf16* p = base + (long long)row * stride + 2 * t;
#pragma unroll
            for (int jd = 0; jd < HD / 8; jd++)
                *reinterpret_cast<uint32_t*>(p + jd * 8) = pack_bf16x2(acc[jd][2 * r] * mul[r], acc[jd][2 * r + 1] * mul[r]);
        }
    }
}

// The max and the sum over the 4 lanes of a quad (one accumulator row's 8 columns per n-tile).
static __device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
static __device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int HD>
static __device__ __forceinline__ void forward_tc_block(bf16* __restrict__ out, float* __restrict__ lse,
                                                        const bf16* __restrict__ qkv, int n, int heads,
                                                        float scale) {
    constexpr int NT = TC_FWD_KEYS, RS = HD + TC_PAD;
    __align__(16) __shared__ bf16 ks[NT * RS];
    __align__(16) __shared__ bf16 vs[NT * RS];
    const Tile tl = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)tl.b * n * stride + (long long)tl.h * HD;
    const int lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = tl.row0 + (threadIdx.x >> 5) * 16;
    const float scale_log2 = scale * ATT_LOG2E;

    uint32_t qa[HD / 16][4];
    tc_row_frags<HD>(qa, head, stride, r0, n);
    float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int jd = 0; jd < HD / 8; jd++) o[jd][0] = o[jd][1] = o[jd][2] = o[jd][3] = 0.0f;
    for (int k0 = 0; k0 < n; k0 += NT) {
        __syncthreads();  // the previous tile's readers are done
        tc_load_rows<HD, NT>(ks, head + d + k0 * stride, stride, n - k0);
        tc_load_rows<HD, NT>(vs, head + 2 * d + k0 * stride, stride, n - k0);
        __syncthreads();
        float s[NT / 8][4];
        tc_dot_rows<HD, NT>(s, qa, ks);
        // Online softmax in base 2; keys past N weigh 0 (the tile holds key k0 < N, so the
        // row max is finite).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + j * 8 + 2 * t + (e & 1);
                s[j][e] = key < n ? s[j][e] * scale_log2 : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const float m_new = fmaxf(m[r], quad_max(mx[r]));
            const float alpha = exp2f(m[r] - m_new);  // 0 on the first tile
            m[r] = m_new;
            l[r] *= alpha;
#pragma unroll
            for (int jd = 0; jd < HD / 8; jd++) {
                o[jd][2 * r] *= alpha;
                o[jd][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int j = 0; j < NT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[j][e] = exp2f(s[j][e] - m[e >> 1]);
                l[e >> 1] += s[j][e];
            }
        tc_acc_rows<HD, NT>(o, s, vs);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        inv[r] = 1.0f / l[r];
    }
    tc_store_rows<HD>(out + (long long)tl.b * n * d + (long long)tl.h * HD, d, o, inv, r0, n);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int row = r0 + (lane >> 2) + 8 * r;
            if (row < n) lse[(long long)tl.bh * n + row] = (m[r] + log2f(l[r])) * ATT_LN2;
        }
    }
}

template <int HD>
static __device__ __forceinline__ void backward_dq_tc_block(bf16* __restrict__ dqkv, float* __restrict__ dvec,
                                                            const bf16* __restrict__ dout,
                                                            const bf16* __restrict__ qkv,
                                                            const bf16* __restrict__ out,
                                                            const float* __restrict__ lse, int n, int heads,
                                                            float scale) {
    constexpr int NT = TC_BWD_STREAM, RS = HD + TC_PAD;
    __align__(16) __shared__ bf16 ks[NT * RS];
    __align__(16) __shared__ bf16 vs[NT * RS];
    const Tile tl = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)tl.b * n * stride + (long long)tl.h * HD;
    const bf16* dout_head = dout + (long long)tl.b * n * d + (long long)tl.h * HD;
    const bf16* out_head = out + (long long)tl.b * n * d + (long long)tl.h * HD;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = tl.row0 + (threadIdx.x >> 5) * 16;
    const float scale_log2 = scale * ATT_LOG2E;

    uint32_t qa[HD / 16][4], da[HD / 16][4], oa[HD / 16][4];
    tc_row_frags<HD>(qa, head, stride, r0, n);
    tc_row_frags<HD>(da, dout_head, d, r0, n);
    tc_row_frags<HD>(oa, out_head, d, r0, n);
    // D_i = dO_i . O_i: each lane holds HD / 4 columns of rows g and g + 8 (fragments 0, 2 and
    // 1, 3), the quad the rest. lse in base 2. Rows past N: 0 for both.
    float dd[2] = {0.0f, 0.0f}, lse2[2];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
        for (int f = 0; f < 4; f++) {
            const uint32_t x = da[kk][f], y = oa[kk][f];
            dd[f & 1] += __uint_as_float(x << 16) * __uint_as_float(y << 16) +
                         __uint_as_float(x & 0xffff0000u) * __uint_as_float(y & 0xffff0000u);
        }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = r0 + g + 8 * r;
        dd[r] = quad_sum(dd[r]);
        lse2[r] = row < n ? lse[(long long)tl.bh * n + row] * ATT_LOG2E : 0.0f;
        if (row < n && t == 0) dvec[(long long)tl.bh * n + row] = dd[r];
    }

    float acc[HD / 8][4];
#pragma unroll
    for (int jd = 0; jd < HD / 8; jd++) acc[jd][0] = acc[jd][1] = acc[jd][2] = acc[jd][3] = 0.0f;
    for (int k0 = 0; k0 < n; k0 += NT) {
        __syncthreads();
        tc_load_rows<HD, NT>(ks, head + d + k0 * stride, stride, n - k0);
        tc_load_rows<HD, NT>(vs, head + 2 * d + k0 * stride, stride, n - k0);
        __syncthreads();
        float s[NT / 8][4], dp[NT / 8][4];
        tc_dot_rows<HD, NT>(s, qa, ks);   // q_i . k_j
        tc_dot_rows<HD, NT>(dp, da, vs);  // dP_ij = dO_i . v_j
#pragma unroll
        for (int j = 0; j < NT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + j * 8 + 2 * t + (e & 1);
                const float p = key < n ? exp2f(s[j][e] * scale_log2 - lse2[e >> 1]) : 0.0f;
                s[j][e] = p * (dp[j][e] - dd[e >> 1]);  // dS
            }
        tc_acc_rows<HD, NT>(acc, s, ks);  // dQ_i += dS_ij k_j
    }
    const float mul[2] = {scale, scale};
    tc_store_rows<HD>(dqkv + (long long)tl.b * n * stride + (long long)tl.h * HD, stride, acc, mul, r0, n);
}

template <int HD>
static __device__ __forceinline__ void backward_dkv_tc_block(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                             const bf16* __restrict__ qkv,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ dvec, int n, int heads,
                                                             float scale) {
    constexpr int NT = TC_BWD_STREAM, RS = HD + TC_PAD;
    __align__(16) __shared__ bf16 qs[NT * RS];
    __align__(16) __shared__ bf16 dos[NT * RS];
    __shared__ float lse_s[NT], d_s[NT];
    const Tile tl = tile_of(n, heads);
    const int d = heads * HD;
    const long long stride = 3LL * d;
    const bf16* head = qkv + (long long)tl.b * n * stride + (long long)tl.h * HD;
    const bf16* dout_head = dout + (long long)tl.b * n * d + (long long)tl.h * HD;
    const int lane = threadIdx.x & 31, t = lane & 3;
    const int r0 = tl.row0 + (threadIdx.x >> 5) * 16;  // this warp's 16 keys
    const float scale_log2 = scale * ATT_LOG2E;

    uint32_t ka[HD / 16][4], va[HD / 16][4];
    tc_row_frags<HD>(ka, head + d, stride, r0, n);
    tc_row_frags<HD>(va, head + 2 * d, stride, r0, n);
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int jd = 0; jd < HD / 8; jd++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[jd][e] = dv[jd][e] = 0.0f;
    for (int q0 = 0; q0 < n; q0 += NT) {
        __syncthreads();
        tc_load_rows<HD, NT>(qs, head + q0 * stride, stride, n - q0);
        tc_load_rows<HD, NT>(dos, dout_head + q0 * (long long)d, d, n - q0);
        if (threadIdx.x < NT) {
            const int q = q0 + threadIdx.x;
            lse_s[threadIdx.x] = q < n ? lse[(long long)tl.bh * n + q] * ATT_LOG2E : 0.0f;
            d_s[threadIdx.x] = q < n ? dvec[(long long)tl.bh * n + q] : 0.0f;
        }
        __syncthreads();
        float s[NT / 8][4], dp[NT / 8][4];
        tc_dot_rows<HD, NT>(s, ka, qs);    // k_i . q_j  (S^T)
        tc_dot_rows<HD, NT>(dp, va, dos);  // dP_ji = dO_j . v_i  (dP^T)
#pragma unroll
        for (int j = 0; j < NT / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qq = j * 8 + 2 * t + (e & 1);
                const float p = q0 + qq < n ? exp2f(s[j][e] * scale_log2 - lse_s[qq]) : 0.0f;
                s[j][e] = p;                          // P^T
                dp[j][e] = p * (dp[j][e] - d_s[qq]);  // dS^T
            }
        tc_acc_rows<HD, NT>(dv, s, dos);  // dV_i += P_ji dO_j
        tc_acc_rows<HD, NT>(dk, dp, qs);  // dK_i += dS_ji q_j
    }
    bf16* base = dqkv + (long long)tl.b * n * stride + (long long)tl.h * HD;
    const float mul_k[2] = {scale, scale}, one[2] = {1.0f, 1.0f};
    tc_store_rows<HD>(base + d, stride, dk, mul_k, r0, n);
    tc_store_rows<HD>(base + 2 * d, stride, dv, one, r0, n);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_tc_hd16(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_tc_block<16>(out, lse, qkv, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_tc_hd16(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_tc_block<16>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_tc_hd16(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_tc_block<16>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_tc_hd32(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_tc_block<32>(out, lse, qkv, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_tc_hd32(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_tc_block<32>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_tc_hd32(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_tc_block<32>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_forward_tc_hd64(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int n, int heads, float scale) {
    forward_tc_block<64>(out, lse, qkv, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dq_tc_hd64(
    bf16* __restrict__ dqkv, float* __restrict__ dvec, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const bf16* __restrict__ out, const float* __restrict__ lse, int n, int heads, float scale) {
    backward_dq_tc_block<64>(dqkv, dvec, dout, qkv, out, lse, n, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS, ATT_MIN_BLOCKS) attention_backward_dkv_tc_hd64(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
    const float* __restrict__ lse, const float* __restrict__ dvec, int n, int heads, float scale) {
    backward_dkv_tc_block<64>(dqkv, dout, qkv, lse, dvec, n, heads, scale);
}
