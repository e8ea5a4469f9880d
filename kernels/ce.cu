// The matched-token cross-entropy and the teacher centre (SPEC.md section 5): the GPU twins
// of `matched_ce` (split into `teacher_stats` and `matched_ce`) and `update_center` in
// src/loss.rs.
//
// Shapes (G global views, B images, T_g tokens per global view, K classes, U student rows
// per image, R = B * U, NT teacher tokens, E terms of non-zero weight per image):
//   teacher (G, B, T_g, K) bf16, centre (T_g, K) fp32, stats (NT * B, 2) fp32 = (max, ln Z),
//   student (R, K) bf16, grad (R, K) bf16, row_loss (R) fp32.
// The layout (src/cuda/ce.rs, GpuLayout): teacher_rows (NT, 2) = (view, token); a CSR over
// the U rows of one image, term_start (U + 1), term_teacher (E), term_weight (E); and
// row_total (U) fp64, the sum of the row's weights.
//
// All three kernels are bandwidth-bound: rows are read with 16-byte loads when K % 8 == 0
// (every row then starts 16-byte aligned) and element by element otherwise. Nothing K-wide
// is kept in shared memory; the student row is read twice (max/sum, then the gradient).
//
// Arithmetic follows the CPU twin's operation order: x / tau is correctly rounded (see
// div_rn), maxima are exact, sums of exponentials run in fp64 per thread (so ln Z keeps its
// accuracy when one class dominates, which is the norm at tau_t = 0.04); exponentials use
// the hardware ex2 (relative error about 2^-22 + |y| * 6e-8 for exp(y), far below what the
// bf16 gradient resolves; see the loss bound in src/cuda/ce.rs).

#include "common.cuh"

// Most terms one student row may have: a row has one term per teacher view it is matched
// with, so at most the number of global views (2 in the paper). GpuLayout checks it.
#define MAX_ROW_TERMS 64

// x / d correctly rounded, given r = 1 / d correctly rounded (computed on the host), for
// |x| and |x / d| in the normal range away from overflow: one Newton correction of x * r
// (Markstein). Three instructions instead of the division routine; verified against the
// IEEE division for every float x with 1e-30 < |x| < 1e30 and nine temperatures.
static __device__ __forceinline__ float div_rn(float x, float d, float r) {
    const float q = __fmul_rn(x, r);
    const float e = __fmaf_rn(-q, d, x);
    return __fmaf_rn(e, r, q);
}

// VEC consecutive bf16 as floats; VEC is 8 (one 16-byte load, p 16-byte aligned) or 1.
template <int VEC>
static __device__ __forceinline__ void load_bf16(const bf16* p, float* out) {
    if constexpr (VEC == 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // bf16 -> fp32 is exact: the bf16 bits are the top half of the float.
            out[2 * j] = __uint_as_float(w[j] << 16);
            out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else {
        out[0] = to_f32(*p);
    }
}

// The same, streaming (evict first): data read once, so that the L2 keeps the centre rows.
template <int VEC>
static __device__ __forceinline__ void load_bf16_once(const bf16* p, float* out) {
    if constexpr (VEC == 8) {
        const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = __uint_as_float(w[j] << 16);
            out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else {
        out[0] = to_f32(*p);
    }
}

template <int VEC>
static __device__ __forceinline__ void load_f32(const float* p, float* out) {
    if constexpr (VEC == 8) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        const float4 b = *reinterpret_cast<const float4*>(p + 4);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
        out[0] = *p;
    }
}

template <int VEC>
static __device__ __forceinline__ void store_f32(float* p, const float* x) {
    if constexpr (VEC == 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
        *p = x[0];
    }
}

// Stores VEC floats as bf16 (round to nearest even), streaming.
template <int VEC>
static __device__ __forceinline__ void store_bf16_once(bf16* p, const float* x) {
    if constexpr (VEC == 8) {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
            w[j] = *reinterpret_cast<const uint32_t*>(&h);
        }
        __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
    } else {
        store(p, x[0]);
    }
}

// fp64 sum over the block; every thread gets it. Same contract as block_sum.
static __device__ __forceinline__ double block_sum_f64(double x, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// A running softmax normaliser: max m of the values seen and s = sum exp(x - m) in fp64.
struct OnlineSum {
    float m;
    double s;
};

// exp(d) for d = x - max <= 0, as fp64, exactly 1 at the maximum. When one class dominates
// (the norm at tau_t = 0.04), ln Z = ln(1 + the rest) is tiny, and the hardware exp's error
// on that 1 (up to 2^-22) would be the whole error of ln Z; exact, ln Z keeps the relative
// accuracy of the rest.
static __device__ __forceinline__ double exp_from_max(float d) {
    return d == 0.0f ? 1.0 : static_cast<double>(__expf(d));
}

// Adds VEC values: one rescale per chunk when the chunk raises the maximum.
template <int VEC>
static __device__ __forceinline__ void online_add(OnlineSum& acc, const float* x) {
    float cm = x[0];
#pragma unroll
    for (int j = 1; j < VEC; j++) cm = fmaxf(cm, x[j]);
    if (cm > acc.m) {
        // exp(-inf) = 0 on the first chunk, when s is 0 anyway.
        acc.s *= static_cast<double>(__expf(acc.m - cm));
        acc.m = cm;
    }
#pragma unroll
    for (int j = 0; j < VEC; j++) acc.s += exp_from_max(x[j] - acc.m);
}

// The block's max M and sum exp(x - M) (fp64) from every thread's OnlineSum. Every thread
// of the block must call it.
static __device__ __forceinline__ OnlineSum online_block(OnlineSum acc, float* fscratch,
                                                         double* dscratch) {
    const float m = block_max(acc.m, fscratch);
    // A thread that saw no value has m = -inf and s = 0: exp(-inf) = 0.
    // The thread that holds the maximum scales by exactly 1.
    const double part = acc.s == 0.0 ? 0.0 : acc.s * exp_from_max(acc.m - m);
    return OnlineSum{m, block_sum_f64(part, dscratch)};
}

// ---------------------------------------------------------------------------------------
// teacher_stats: per (teacher token ti, image b), the max and ln Z of x = (t - C) / tau_t
// over K, with Z = sum exp(x - max). One block per (ti, b), block index ti * B + b (the
// stats index; consecutive blocks share the centre row, which stays in L2).

template <int VEC>
static __device__ __forceinline__ void teacher_stats_impl(
    const bf16* __restrict__ t, const float* __restrict__ c, float* __restrict__ out, int K,
    float tau_t, float rtau_t) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    OnlineSum acc{-INFINITY, 0.0};
    for (int i = threadIdx.x * VEC; i < K; i += blockDim.x * VEC) {
        float tv[VEC], cv[VEC];
        load_bf16_once<VEC>(t + i, tv);
        load_f32<VEC>(c + i, cv);
#pragma unroll
        for (int j = 0; j < VEC; j++) tv[j] = div_rn(tv[j] - cv[j], tau_t, rtau_t);
        online_add<VEC>(acc, tv);
    }
    const OnlineSum all = online_block(acc, fscratch, dscratch);
    if (threadIdx.x == 0) {
        out[0] = all.m;
        out[1] = static_cast<float>(log(all.s));
    }
}

extern "C" __global__ void __launch_bounds__(256) teacher_stats(
    const bf16* __restrict__ teacher,     // (G, B, T_g, K)
    const float* __restrict__ center,     // (T_g, K)
    const int* __restrict__ teacher_rows, // (NT, 2): (view, token)
    float* __restrict__ stats,            // (NT * B, 2): (max, ln Z)
    int B, int T, int K, float tau_t, float rtau_t) {
    const int ti = blockIdx.x / B, b = blockIdx.x - ti * B;
    const int view = teacher_rows[2 * ti], token = teacher_rows[2 * ti + 1];
    const bf16* t = teacher + ((static_cast<size_t>(view) * B + b) * T + token) * K;
    const float* c = center + static_cast<size_t>(token) * K;
    float* out = stats + 2 * static_cast<size_t>(blockIdx.x);
    if ((K & 7) == 0) {
        teacher_stats_impl<8>(t, c, out, K, tau_t, rtau_t);
    } else {
        teacher_stats_impl<1>(t, c, out, K, tau_t, rtau_t);
    }
}

// ---------------------------------------------------------------------------------------
// matched_ce: one block per student row r = b * U + u, block index u * B + b (the blocks of
// one token position run together and share the centre rows of their terms in L2).
// Pass 1: max and Z of x = s / tau_s. Pass 2: with d = x - max, log q = d - ln Z and
// q = exp(d) / Z, each term e (teacher row t_e, weight w_e) gives
// p = exp(((t_e - C) / tau_t - max_e) - ln Z_e); then
//   grad = (total / tau_s) q - sum_e (w_e / tau_s) p,   loss = -sum_e w_e sum_k p log q,
// total the sum of the row's weights. A row without a term of non-zero weight gets zeros.

struct TermInfo {
    const bf16* t;    // the teacher row (image b's teacher token)
    const float* c;   // its centre row
    float max_t;      // stats of (t - C) / tau_t
    float lnz_t;
    float w;          // weight
    float a;          // w / tau_s
};

template <int VEC>
static __device__ __forceinline__ void matched_ce_impl(
    const bf16* __restrict__ s, bf16* __restrict__ g, float* __restrict__ loss_out,
    const TermInfo* terms, int ne, double total, int K, float tau_s, float rtau_s,
    float tau_t, float rtau_t) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];

    // Pass 1: max and sum of exp over the student row.
    OnlineSum acc{-INFINITY, 0.0};
    for (int i = threadIdx.x * VEC; i < K; i += blockDim.x * VEC) {
        float x[VEC];
        load_bf16<VEC>(s + i, x);
#pragma unroll
        for (int j = 0; j < VEC; j++) x[j] = div_rn(x[j], tau_s, rtau_s);
        online_add<VEC>(acc, x);
    }
    const OnlineSum st = online_block(acc, fscratch, dscratch);
    const float max_s = st.m;
    const float ln_z = static_cast<float>(log(st.s));
    const float scale = static_cast<float>(total / static_cast<double>(tau_s) / st.s);

    // Pass 2: gradient and loss, one read of each term's teacher row.
    double loss = 0.0;
    for (int i = threadIdx.x * VEC; i < K; i += blockDim.x * VEC) {
        float lq[VEC], gv[VEC];
        load_bf16<VEC>(s + i, lq);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            const float d = div_rn(lq[j], tau_s, rtau_s) - max_s;
            gv[j] = __expf(d) * scale;
            lq[j] = d - ln_z;
        }
        float part = 0.0f;
        for (int e = 0; e < ne; e++) {
            const TermInfo te = terms[e];
            float tv[VEC], cv[VEC];
            load_bf16_once<VEC>(te.t + i, tv);
            load_f32<VEC>(te.c + i, cv);
#pragma unroll
            for (int j = 0; j < VEC; j++) {
                const float y = div_rn(tv[j] - cv[j], tau_t, rtau_t);
                const float p = __expf((y - te.max_t) - te.lnz_t);
                gv[j] = fmaf(-te.a, p, gv[j]);
                part = fmaf(te.w * p, lq[j], part);
            }
        }
        loss += static_cast<double>(part);
        store_bf16_once<VEC>(g + i, gv);
    }
    loss = block_sum_f64(loss, dscratch);
    if (threadIdx.x == 0) *loss_out = static_cast<float>(-loss);
}

template <int VEC>
static __device__ __forceinline__ void zero_row(bf16* __restrict__ g, int K) {
    float z[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) z[j] = 0.0f;
    for (int i = threadIdx.x * VEC; i < K; i += blockDim.x * VEC) store_bf16_once<VEC>(g + i, z);
}

extern "C" __global__ void __launch_bounds__(256) matched_ce(
    const bf16* __restrict__ student,      // (R, K), row b * U + u
    const bf16* __restrict__ teacher,      // (G, B, T_g, K)
    const float* __restrict__ center,      // (T_g, K)
    const float* __restrict__ stats,       // (NT * B, 2)
    const int* __restrict__ teacher_rows,  // (NT, 2)
    const int* __restrict__ term_start,    // (U + 1)
    const int* __restrict__ term_teacher,  // (E)
    const float* __restrict__ term_weight, // (E)
    const double* __restrict__ row_total,  // (U)
    bf16* __restrict__ grad,               // (R, K)
    float* __restrict__ row_loss,          // (R)
    int B, int U, int T, int K, float tau_s, float rtau_s, float tau_t, float rtau_t) {
    __shared__ TermInfo terms[MAX_ROW_TERMS];
    const int u = blockIdx.x / B, b = blockIdx.x - u * B;
    const size_t r = static_cast<size_t>(b) * U + u;
    const bf16* s = student + r * K;
    bf16* g = grad + r * K;
    const int e0 = term_start[u], ne = term_start[u + 1] - e0;
    const bool vec = (K & 7) == 0;
    if (ne == 0) {  // the same for the whole block
        if (vec) {
            zero_row<8>(g, K);
        } else {
            zero_row<1>(g, K);
        }
        if (threadIdx.x == 0) row_loss[r] = 0.0f;
        return;
    }
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        const int ti = term_teacher[e0 + e];
        const int view = teacher_rows[2 * ti], token = teacher_rows[2 * ti + 1];
        const size_t st = 2 * (static_cast<size_t>(ti) * B + b);
        const float w = term_weight[e0 + e];
        terms[e] = TermInfo{
            teacher + ((static_cast<size_t>(view) * B + b) * T + token) * K,
            center + static_cast<size_t>(token) * K,
            stats[st],
            stats[st + 1],
            w,
            __fdiv_rn(w, tau_s),
        };
    }
    __syncthreads();
    if (vec) {
        matched_ce_impl<8>(s, g, row_loss + r, terms, ne, row_total[u], K, tau_s, rtau_s, tau_t,
                           rtau_t);
    } else {
        matched_ce_impl<1>(s, g, row_loss + r, terms, ne, row_total[u], K, tau_s, rtau_s, tau_t,
                           rtau_t);
    }
}

// ---------------------------------------------------------------------------------------
// update_center: C[p] <- m C[p] + (1 - m) mean over views v and images b of t[v, b, p], per
// token position p. One thread per VEC consecutive elements of C (VEC = 8 when K % 8 == 0,
// so a vector never straddles two positions); reads coalesced along K. The sum runs in
// fp64 in the CPU's order (views, then images) and the update in separately rounded fp32
// operations, so the result matches the CPU bit for bit.

template <int VEC>
static __device__ __forceinline__ void update_center_impl(
    float* __restrict__ center, const bf16* __restrict__ teacher, size_t item, int G, int B,
    int T, int K, float momentum, float one_minus, double rn) {
    const size_t at = item * VEC;  // element of C, (p, k)
    const size_t p = at / K, k = at - p * K;
    double acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) acc[j] = 0.0;
    for (int v = 0; v < G; v++) {
#pragma unroll 4
        for (int b = 0; b < B; b++) {
            float x[VEC];
            load_bf16_once<VEC>(teacher + ((static_cast<size_t>(v) * B + b) * T + p) * K + k, x);
#pragma unroll
            for (int j = 0; j < VEC; j++) acc[j] += static_cast<double>(x[j]);
        }
    }
    // acc / n correctly rounded, as on the CPU, without the division routine's call (which
    // needs a stack frame): a Newton correction of acc * rn, rn = 1 / n correctly rounded
    // (from the host), as in div_rn.
    const double n = static_cast<double>(G) * B;
    float c[VEC];
    load_f32<VEC>(center + at, c);
#pragma unroll
    for (int j = 0; j < VEC; j++) {
        const double q = __dmul_rn(acc[j], rn);
        const float mean = static_cast<float>(fma(fma(-q, n, acc[j]), rn, q));
        c[j] = __fadd_rn(__fmul_rn(c[j], momentum), __fmul_rn(mean, one_minus));
    }
    store_f32<VEC>(center + at, c);
}

extern "C" __global__ void __launch_bounds__(256) update_center(
    float* __restrict__ center,       // (T_g, K)
    const bf16* __restrict__ teacher, // (G, B, T_g, K)
    int G, int B, int T, int K, float momentum, float one_minus,
    double rn) {  // rn = 1 / (G B)
    const size_t item = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const size_t elements = static_cast<size_t>(T) * K;
    if ((K & 7) == 0) {
        if (item < elements / 8)
            update_center_impl<8>(center, teacher, item, G, B, T, K, momentum, one_minus, rn);
    } else {
        if (item < elements)
            update_center_impl<1>(center, teacher, item, G, B, T, K, momentum, one_minus, rn);
    }
}
