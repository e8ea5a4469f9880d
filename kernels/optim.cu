// nvcc-flags: --fmad=false
// Optimizer-side kernels over the flat parameter buffer (launchers: src/cuda/optim.rs; CPU
// twins: src/optim.rs): AdamW, the teacher EMA, the gradient norm with its non-finite flag,
// global and per-tensor clipping, the last-layer freeze, and the f32 -> bf16 weight copy.
//
// AdamW and the EMA reproduce the CPU twins bit for bit: AdamW computes each element in
// f64 with the twin's operations in the twin's order, the EMA in f32 likewise. Every
// rounding step is explicit (the rn_* helpers: _rn intrinsics), and --fmad=false (first
// line) stops nvcc from fusing any other multiply-add in this file, since a fused
// multiply-add rounds once where the CPU rounds twice. Norms are summed in f64 (as the
// CPU does) over a fixed grid in a fixed order, so they are deterministic and agree with
// the CPU's f64 sums to ~1e-16.
//
// Buffers are indexed with 64-bit offsets (the flat buffer may exceed 2^31 elements).
// Nothing here uses float atomics.
#include "common.cuh"

// ---- helpers ---------------------------------------------------------------------------

// Exact IEEE operations, one rounding each, never fused: the _rn intrinsics (the CPU
// emulator implements them as the plain operators, which it never contracts).
static __device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
static __device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
static __device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
static __device__ __forceinline__ double rn_div(double a, double b) { return __ddiv_rn(a, b); }
static __device__ __forceinline__ double rn_sqrt(double a) { return __dsqrt_rn(a); }
static __device__ __forceinline__ float rn_f32(double a) { return __double2float_rn(a); }
static __device__ __forceinline__ float rn_addf(float a, float b) { return __fadd_rn(a, b); }
static __device__ __forceinline__ float rn_mulf(float a, float b) { return __fmul_rn(a, b); }

static __device__ __forceinline__ double warp_sum_f64(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Sum over the block in a fixed tree; every thread gets the result. blockDim.x a multiple
// of 32; `scratch` holds 32 doubles of shared memory.
static __device__ __forceinline__ double block_sum_f64(double x, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum_f64(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_f64(x);
}

// The step is skipped when the optional device flag is nonzero (or NaN).
static __device__ __forceinline__ bool skipped(const float* skip) {
    return skip != nullptr && *skip != 0.0f;
}

static __device__ __forceinline__ double sq_f64(float x) {
    const double d = (double)x;
    return d * d;
}

static __device__ __forceinline__ bool non_finite4(float4 x) {
    return !isfinite(x.x) || !isfinite(x.y) || !isfinite(x.z) || !isfinite(x.w);
}

// Four floats as four bf16 (round to nearest even), packed for one 8-byte store.
static __device__ __forceinline__ uint2 pack_bf16x4(float4 x) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(x.z, x.w);
    uint2 u;
    memcpy(&u.x, &lo, 4);
    memcpy(&u.y, &hi, 4);
    return u;
}

// The element mapping of the elementwise kernels: with n4 = n / 4 when the buffers are
// 16-byte aligned (else 0), thread item i < n4 covers elements 4i..4i+3 with float4
// accesses and item n4 + j covers the scalar tail element 4 n4 + j. Items: n4 + (n - 4 n4).
static __device__ __forceinline__ unsigned long long item_index() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// ---- AdamW -----------------------------------------------------------------------------

// Layout of the per-part scalars buffer that adamw_prepare writes and adamw_step reads.
#define S_B1 0
#define S_OMB1 1       // 1 - beta1
#define S_B2 2
#define S_OMB2 3       // 1 - beta2
#define S_EPS 4
#define S_STEP_SIZE 5  // lr / (1 - beta1^t)
#define S_BC2_SQRT 6   // sqrt(1 - beta2^t)
#define S_KEEP0 7      // 1 - lr wd * 0: the decay factor where the mask is 0
#define S_KEEP1 8      // 1 - lr wd * 1: where the mask is 1
#define ADAMW_SCALARS 9

// a^b as Rust's f64::powi computes it (compiler-builtins' __powidf2: square and multiply,
// from the low bit up), so the bias corrections are the CPU's to the last bit.
static __device__ double powi_like_host(double a, int b) {
    const bool recip = b < 0;
    unsigned int e = recip ? 0u - (unsigned int)b : (unsigned int)b;
    double r = 1.0;
    for (;;) {
        if (e & 1u) r = rn_mul(r, a);
        e >>= 1;
        if (e == 0u) break;
        a = rn_mul(a, a);
    }
    return recip ? rn_div(1.0, r) : r;
}

// One thread: unless the step is skipped, counts the step (`*step += 1`, the device copy
// of AdamW::step) and writes the scalars of AdamW::step for it. The step count lives on the
// device so that a skipped step (known only on the device) does not count, as on the CPU.
extern "C" __global__ void adamw_prepare(unsigned long long* __restrict__ step,
                                         double* __restrict__ s, const float* __restrict__ skip,
                                         float lr, float wd, double b1, double b2,
                                         double eps) {
    if (blockIdx.x != 0 || threadIdx.x != 0 || skipped(skip)) return;
    const unsigned long long t = *step + 1ull;
    *step = t;
    const int ti = t > 2147483647ull ? 2147483647 : (int)t;  // i32::try_from(step)
    const double lr_d = (double)lr;
    const double lr_wd = rn_mul(lr_d, (double)wd);
    s[S_B1] = b1;
    s[S_OMB1] = rn_sub(1.0, b1);
    s[S_B2] = b2;
    s[S_OMB2] = rn_sub(1.0, b2);
    s[S_EPS] = eps;
    s[S_STEP_SIZE] = rn_div(lr_d, rn_sub(1.0, powi_like_host(b1, ti)));
    s[S_BC2_SQRT] = rn_sqrt(rn_sub(1.0, powi_like_host(b2, ti)));
    s[S_KEEP0] = rn_sub(1.0, rn_mul(lr_wd, 0.0));
    s[S_KEEP1] = rn_sub(1.0, rn_mul(lr_wd, 1.0));
}

struct AdamScalars {
    double b1, omb1, b2, omb2, eps, step_size, bc2_sqrt, keep0, keep1;
};

static __device__ __forceinline__ AdamScalars load_scalars(const double* __restrict__ s) {
    AdamScalars a;
    a.b1 = __ldg(s + S_B1);
    a.omb1 = __ldg(s + S_OMB1);
    a.b2 = __ldg(s + S_B2);
    a.omb2 = __ldg(s + S_OMB2);
    a.eps = __ldg(s + S_EPS);
    a.step_size = __ldg(s + S_STEP_SIZE);
    a.bc2_sqrt = __ldg(s + S_BC2_SQRT);
    a.keep0 = __ldg(s + S_KEEP0);
    a.keep1 = __ldg(s + S_KEEP1);
    return a;
}

// One element of AdamW::step, operation for operation:
//   x = p; x *= 1 - lr wd mask; m1 = b1 m + (1-b1) g; v1 = b2 v + ((1-b2) g) g;
//   m = (f32) m1; v = (f32) v1; denom = sqrt(v) / bc2_sqrt + eps;
//   x -= (step_size m) / denom; p = (f32) x.
static __device__ __forceinline__ void adamw_one(float& p, float g, unsigned int mask, float& m,
                                                 float& v, const AdamScalars& s) {
    const double gd = (double)g;
    double x = rn_mul((double)p, mask != 0u ? s.keep1 : s.keep0);
    const double m1 = rn_add(rn_mul(s.b1, (double)m), rn_mul(s.omb1, gd));
    const double v1 = rn_add(rn_mul(s.b2, (double)v), rn_mul(rn_mul(s.omb2, gd), gd));
    m = rn_f32(m1);
    v = rn_f32(v1);
    const double denom = rn_add(rn_div(rn_sqrt((double)v), s.bc2_sqrt), s.eps);
    x = rn_sub(x, rn_div(rn_mul(s.step_size, (double)m), denom));
    p = rn_f32(x);
}

// AdamW over n elements (one part of the buffer: everything before the last layer, or the
// last layer), updating the f32 weights `p` and moments `m`, `v` in place and writing the
// bf16 copy `p_bf16` of the new weights. `mask` holds one byte per element, 1 where weight
// decay applies. `vec4` says all pointers are aligned for float4 (mask: 4 bytes, bf16: 8).
// Launch: items (see item_index) threads, any block size.
extern "C" __global__ void adamw_step(float* __restrict__ p, bf16* __restrict__ p_bf16,
                                      const float* __restrict__ g,
                                      const unsigned char* __restrict__ mask,
                                      float* __restrict__ m, float* __restrict__ v,
                                      unsigned long long n, int vec4,
                                      const double* __restrict__ scalars,
                                      const float* __restrict__ skip) {
    if (skipped(skip)) return;
    const AdamScalars s = load_scalars(scalars);
    const unsigned long long i = item_index();
    const unsigned long long n4 = vec4 ? n / 4 : 0;
    if (i < n4) {
        float4 pv = reinterpret_cast<const float4*>(p)[i];
        const float4 gv = reinterpret_cast<const float4*>(g)[i];
        float4 mv = reinterpret_cast<const float4*>(m)[i];
        float4 vv = reinterpret_cast<const float4*>(v)[i];
        const unsigned int mk = reinterpret_cast<const unsigned int*>(mask)[i];  // 4 bytes
        adamw_one(pv.x, gv.x, mk & 0xffu, mv.x, vv.x, s);
        adamw_one(pv.y, gv.y, (mk >> 8) & 0xffu, mv.y, vv.y, s);
        adamw_one(pv.z, gv.z, (mk >> 16) & 0xffu, mv.z, vv.z, s);
        adamw_one(pv.w, gv.w, mk >> 24, mv.w, vv.w, s);
        reinterpret_cast<float4*>(p)[i] = pv;
        reinterpret_cast<float4*>(m)[i] = mv;
        reinterpret_cast<float4*>(v)[i] = vv;
        reinterpret_cast<uint2*>(p_bf16)[i] = pack_bf16x4(pv);
    } else {
        const unsigned long long e = 4 * n4 + (i - n4);
        if (e < n) {
            float pe = p[e], me = m[e], ve = v[e];
            adamw_one(pe, g[e], mask[e], me, ve, s);
            p[e] = pe;
            m[e] = me;
            v[e] = ve;
            store(p_bf16 + e, pe);
        }
    }
}

// ---- teacher EMA and the bf16 copy -----------------------------------------------------

// t = t * momentum + one_minus * s in f32, two roundings as on the CPU (ema_update), and
// the bf16 copy of the new teacher. `one_minus` = 1 - momentum computed on the host in f32.
// Buffers 16-byte aligned (the launcher checks). Launch: items threads.
extern "C" __global__ void ema_update(float* __restrict__ t, bf16* __restrict__ t_bf16,
                                      const float* __restrict__ s, unsigned long long n,
                                      float momentum, float one_minus,
                                      const float* __restrict__ skip) {
    if (skipped(skip)) return;
    const unsigned long long i = item_index(), n4 = n / 4;
    if (i < n4) {
        float4 tv = reinterpret_cast<const float4*>(t)[i];
        const float4 sv = reinterpret_cast<const float4*>(s)[i];
        tv.x = rn_addf(rn_mulf(tv.x, momentum), rn_mulf(one_minus, sv.x));
        tv.y = rn_addf(rn_mulf(tv.y, momentum), rn_mulf(one_minus, sv.y));
        tv.z = rn_addf(rn_mulf(tv.z, momentum), rn_mulf(one_minus, sv.z));
        tv.w = rn_addf(rn_mulf(tv.w, momentum), rn_mulf(one_minus, sv.w));
        reinterpret_cast<float4*>(t)[i] = tv;
        reinterpret_cast<uint2*>(t_bf16)[i] = pack_bf16x4(tv);
    } else {
        const unsigned long long e = 4 * n4 + (i - n4);
        if (e < n) {
            const float te = rn_addf(rn_mulf(t[e], momentum), rn_mulf(one_minus, s[e]));
            t[e] = te;
            store(t_bf16 + e, te);
        }
    }
}

// y = bf16(x), round to nearest even: the bf16 copy of a whole f32 buffer (at start-up and
// after a restore; afterwards adamw_step and ema_update keep it current). Aligned buffers.
extern "C" __global__ void round_bf16(const float* __restrict__ x, bf16* __restrict__ y,
                                      unsigned long long n) {
    const unsigned long long i = item_index(), n4 = n / 4;
    if (i < n4) {
        reinterpret_cast<uint2*>(y)[i] = pack_bf16x4(reinterpret_cast<const float4*>(x)[i]);
    } else {
        const unsigned long long e = 4 * n4 + (i - n4);
        if (e < n) store(y + e, x[e]);
    }
}

// x[0..n) = 0 (the last-layer freeze). `vec4`: x is 16-byte aligned. Launch: items threads.
extern "C" __global__ void cancel_grads_zero(float* __restrict__ x, unsigned long long n, int vec4) {
    const unsigned long long i = item_index(), n4 = vec4 ? n / 4 : 0;
    if (i < n4) {
        reinterpret_cast<float4*>(x)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    } else {
        const unsigned long long e = 4 * n4 + (i - n4);
        if (e < n) x[e] = 0.0f;
    }
}

// ---- global gradient norm and clipping -------------------------------------------------

// Stage 1 of the gradient norm: block b sums the squares of its grid-stride share of g in
// f64 and writes partial[b], and partial_flag[b] = 1 when its share holds a NaN or an
// infinity. The grid is fixed by the launcher (depends on n only), so the sum is
// deterministic. g is 16-byte aligned. Launch: G blocks of 256 threads.
extern "C" __global__ void grad_norm_partial(const float* __restrict__ g, unsigned long long n,
                                             double* __restrict__ partial,
                                             unsigned int* __restrict__ partial_flag) {
    __shared__ double scratch[32];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long n4 = n / 4;
    double acc = 0.0;
    int bad = 0;
    for (unsigned long long i = item_index(); i < n4; i += stride) {
        const float4 x = __ldg(reinterpret_cast<const float4*>(g) + i);
        acc += (sq_f64(x.x) + sq_f64(x.y)) + (sq_f64(x.z) + sq_f64(x.w));
        bad |= non_finite4(x);
    }
    for (unsigned long long e = 4 * n4 + item_index(); e < n; e += stride) {
        const float x = g[e];
        acc += sq_f64(x);
        bad |= !isfinite(x);
    }
    const double total = block_sum_f64(acc, scratch);
    const bool any = block_sum_f64(bad ? 1.0 : 0.0, scratch) != 0.0;
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = total;
        partial_flag[blockIdx.x] = any ? 1u : 0u;
    }
}

// Stage 2: one block sums the `count` partials in a fixed order and writes
//   sumsq[0] = sum of squares (f64, what clip_scale reads),
//   stats[0] = sqrt(sumsq) as f32 (l2_norm),
//   stats[1] = 1 if any gradient is NaN or infinite, else 0 (has_non_finite),
//   stats[2] = 1 if the step must be skipped: stats[1], a non-finite norm, or a non-finite
//              *loss when `loss` is given (the CPU step's test), else 0.
// Launch: 1 block of 256 threads.
extern "C" __global__ void grad_norm_finish(const double* __restrict__ partial,
                                            const unsigned int* __restrict__ partial_flag,
                                            int count, const float* __restrict__ loss,
                                            double* __restrict__ sumsq,
                                            float* __restrict__ stats) {
    __shared__ double scratch[32];
    double acc = 0.0;
    int bad = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        acc += partial[i];
        bad |= partial_flag[i] != 0u;
    }
    const double total = block_sum_f64(acc, scratch);
    const bool any = block_sum_f64(bad ? 1.0 : 0.0, scratch) != 0.0;
    if (threadIdx.x == 0) {
        const float norm = rn_f32(rn_sqrt(total));
        const bool loss_bad = loss != nullptr && !isfinite(*loss);
        sumsq[0] = total;
        stats[0] = norm;
        stats[1] = any ? 1.0f : 0.0f;
        stats[2] = (any || !isfinite(norm) || loss_bad) ? 1.0f : 0.0f;
    }
}

// clip_global_norm's scaling, with the norm read from the device: when
// norm = sqrt(sumsq) > max_norm (in f64), g *= (f32)(max_norm / (norm + 1e-6)); else g is
// left alone. g is 16-byte aligned. Launch: items threads.
extern "C" __global__ void clip_scale(float* __restrict__ g, unsigned long long n,
                                      const double* __restrict__ sumsq, float max_norm) {
    const double norm = rn_sqrt(__ldg(sumsq));
    if (!(norm > (double)max_norm)) return;
    const float c = rn_f32(rn_div((double)max_norm, rn_add(norm, 1e-6)));
    const unsigned long long i = item_index(), n4 = n / 4;
    if (i < n4) {
        float4 x = reinterpret_cast<const float4*>(g)[i];
        x.x = rn_mulf(x.x, c);
        x.y = rn_mulf(x.y, c);
        x.z = rn_mulf(x.z, c);
        x.w = rn_mulf(x.w, c);
        reinterpret_cast<float4*>(g)[i] = x;
    } else {
        const unsigned long long e = 4 * n4 + (i - n4);
        if (e < n) g[e] = rn_mulf(g[e], c);
    }
}

// ---- per-tensor clipping -----------------------------------------------------------------
// The host cuts every tensor into chunks of at most 16384 elements; chunk c is
// chunks[2c] = first element, chunks[2c+1] = length | tensor << 32, and tensor t owns chunks
// first_chunk[t] .. first_chunk[t+1]. Padding between tensors is in no chunk.

static __device__ __forceinline__ void read_chunk(const unsigned long long* __restrict__ chunks,
                                                  unsigned long long& start, unsigned int& len,
                                                  unsigned int& tensor) {
    start = __ldg(chunks + 2 * (unsigned long long)blockIdx.x);
    const unsigned long long w = __ldg(chunks + 2 * (unsigned long long)blockIdx.x + 1);
    len = (unsigned int)(w & 0xffffffffull);
    tensor = (unsigned int)(w >> 32);
}

// partial[c] = sum of squares of chunk c, in f64. Launch: one block of 256 per chunk.
extern "C" __global__ void tensor_sumsq(const float* __restrict__ g,
                                        const unsigned long long* __restrict__ chunks,
                                        double* __restrict__ partial) {
    __shared__ double scratch[32];
    unsigned long long start;
    unsigned int len, tensor;
    read_chunk(chunks, start, len, tensor);
    const float* x = g + start;
    const unsigned int n4 = (reinterpret_cast<uintptr_t>(x) & 15) == 0 ? len / 4 : 0;
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 y = __ldg(reinterpret_cast<const float4*>(x) + i);
        acc += (sq_f64(y.x) + sq_f64(y.y)) + (sq_f64(y.z) + sq_f64(y.w));
    }
    for (unsigned int e = 4 * n4 + threadIdx.x; e < len; e += blockDim.x) acc += sq_f64(x[e]);
    const double total = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Per tensor t: norm = sqrt(sum of its chunks' partials, in chunk order by lane then a
// fixed warp tree), norms[t] = (f32) norm, coef = max_norm / (norm + 1e-6) in f64, and
// scales[t] = (f32) coef when coef < 1, else exactly 1 (clip_per_tensor leaves the tensor
// alone). Launch: one warp (32 threads) per tensor.
extern "C" __global__ void tensor_clip_scales(const double* __restrict__ partial,
                                              const unsigned int* __restrict__ first_chunk,
                                              float max_norm, float* __restrict__ norms,
                                              float* __restrict__ scales) {
    const unsigned int t = blockIdx.x;
    const unsigned int a = first_chunk[t], b = first_chunk[t + 1];
    double acc = 0.0;
    for (unsigned int c = a + threadIdx.x; c < b; c += 32) acc += partial[c];
    acc = warp_sum_f64(acc);
    if (threadIdx.x == 0) {
        const double norm = rn_sqrt(acc);
        const double coef = rn_div((double)max_norm, rn_add(norm, 1e-6));
        norms[t] = rn_f32(norm);
        scales[t] = coef < 1.0 ? rn_f32(coef) : 1.0f;
    }
}

// Chunk c of tensor t: g *= scales[t], unless scales[t] is 1 (multiplying by 1 would change
// nothing). Launch: one block of 256 per chunk.
extern "C" __global__ void tensor_clip_apply(float* __restrict__ g,
                                             const unsigned long long* __restrict__ chunks,
                                             const float* __restrict__ scales) {
    unsigned long long start;
    unsigned int len, tensor;
    read_chunk(chunks, start, len, tensor);
    const float c = scales[tensor];
    if (c == 1.0f) return;
    float* x = g + start;
    const unsigned int n4 = (reinterpret_cast<uintptr_t>(x) & 15) == 0 ? len / 4 : 0;
    for (unsigned int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 y = reinterpret_cast<const float4*>(x)[i];
        y.x = rn_mulf(y.x, c);
        y.y = rn_mulf(y.y, c);
        y.z = rn_mulf(y.z, c);
        y.w = rn_mulf(y.w, c);
        reinterpret_cast<float4*>(x)[i] = y;
    }
    for (unsigned int e = 4 * n4 + threadIdx.x; e < len; e += blockDim.x) x[e] = rn_mulf(x[e], c);
}
