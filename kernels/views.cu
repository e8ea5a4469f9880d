// nvcc-flags: --fmad=false
// The fused view builder: u8 source images -> crop + antialiased resize -> per-patch (or
// per-view) photometric augmentation -> normalisation -> the model input, f32 or bf16.
// CPU twin: ViewBuilder::build_into (src/views/batch.rs), with ResizePlan::apply
// (src/views/resize.rs) and augment_view / augment_region (src/views/photometric.rs).
//
// One block per (image, view, region); a region is one patch of the view's patch grid, or
// the whole view when patch-level augmentation is off. Every thread owns a fixed set of the
// region's pixels (q = tid, tid + blockDim, ...) through every stage, so only the stages that
// read other pixels (the resize's shared row buffer, the contrast mean, the blur) need a
// barrier. Every branch on a random draw is uniform over the block.
//
// Bit-exactness with the CPU: --fmad=false (Rust never fuses a multiply and an add), every
// sum adds its terms in the CPU's order starting from 0 (the contrast mean is a serial sum by
// one thread, not a tree), IEEE division and square root (nvcc's defaults), and the three
// transcendentals (exp in the blur weights, ln and cos in Box-Muller) in double precision
// rounded to f32, which is the correctly rounded f32 value libm's expf/logf/cosf return in
// all but rare cases. The region's parameters come from its own Philox counter, so results
// do not depend on the launch shape.
//
// The host (src/cuda/views.rs) computes the resize taps with ResizePlan and packs them, per
// view, with the crop box and the photometric settings into the tables documented at the
// kernel's parameters below.
#include "common.cuh"

// Words per view in `view_info` (see build_views).
#define VIEW_WORDS 16
// Words per view in `params` (the photometric settings; see build_views).
#define CFG_WORDS 20
// The region index that names a whole view (photometric.rs WHOLE_VIEW).
#define WHOLE_VIEW 0xFFFFFu
// rng.rs: purposes in the top 4 bits of the last counter word.
#define PURPOSE_PHOTOMETRIC (2u << 28)
#define PURPOSE_NOISE (3u << 28)

// Philox4x32-10 (rng.rs philox4x32_10).
static __device__ __forceinline__ uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                      uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return make_uint4(c0, c1, c2, c3);
}

// Stream::next_f32: 24 random bits times 2^-24 (both exact).
static __device__ __forceinline__ float unit_f32(uint32_t u) {
    return (float)(u >> 8) * 5.9604644775390625e-08f;
}

// f32::clamp(x, 0, 1): comparisons, so NaN and -0.0 pass through as on the CPU.
static __device__ __forceinline__ float clamp01(float x) {
    if (x < 0.0f) x = 0.0f;
    if (x > 1.0f) x = 1.0f;
    return x;
}

// A u8 as f32, exactly: (2^23 + b) - 2^23, two full-rate instructions instead of a
// quarter-rate conversion.
static __device__ __forceinline__ float u8_to_f32(uint8_t b) {
    return __int_as_float(0x4B000000 | (int)b) - 8388608.0f;
}

// photometric.rs gray: (0.299 r + 0.587 g) + 0.114 b.
static __device__ __forceinline__ float gray(float r, float g, float b) {
    return 0.299f * r + 0.587f * g + 0.114f * b;
}

// photometric.rs wrap_unit: x mod 1 with the divisor's sign.
static __device__ __forceinline__ float wrap_unit(float x) {
    if (x >= 0.0f && x < 1.0f) return x;
    if (x >= 1.0f && x < 2.0f) return x - 1.0f;
    if (x > -1.0f && x < 0.0f) return x + 1.0f;
    const float m = fmodf(x, 1.0f);
    return m < 0.0f ? m + 1.0f : m;
}

// photometric.rs adjust_hue on one pixel: rgb_to_hsv, shift, hsv_to_rgb (torchvision's).
static __device__ void hue_shift_pixel(float& r, float& g, float& b, float shift) {
    const float maxc = fmaxf(fmaxf(r, g), b);
    const float minc = fminf(fminf(r, g), b);
    const bool eqc = maxc == minc;
    const float cr = maxc - minc;
    const float s = cr / (eqc ? 1.0f : maxc);
    const float d = eqc ? 1.0f : cr;
    const float rc = (maxc - r) / d;
    const float gc = (maxc - g) / d;
    const float bc = (maxc - b) / d;
    float h;
    if (maxc == r) {
        h = bc - gc;
    } else if (maxc == g) {
        h = 2.0f + rc - bc;
    } else {
        h = 4.0f + gc - rc;
    }
    h = wrap_unit(h / 6.0f + 1.0f);
    h = wrap_unit(h + shift);
    const float v = maxc;
    const float i = floorf(h * 6.0f);
    const float f = h * 6.0f - i;
    int k = (int)i % 6;
    if (k < 0) k += 6;
    const float p = clamp01(v * (1.0f - s));
    const float q = clamp01(v * (1.0f - s * f));
    const float t = clamp01(v * (1.0f - s * (1.0f - f)));
    switch (k) {
        case 0: r = v; g = t; b = p; break;
        case 1: r = q; g = v; b = p; break;
        case 2: r = p; g = v; b = t; break;
        case 3: r = p; g = q; b = v; break;
        case 4: r = t; g = p; b = v; break;
        default: r = v; g = p; b = q; break;
    }
}

// photometric.rs adjust_contrast: m = mean of the region's gray (its only plane when C = 1),
// summed serially in pixel order like the CPU; x <- clamp(c x + (1 - c) m). `gbuf` holds hw
// floats; `mean_slot` is one shared float.
static __device__ void contrast_region(float* R, float* gbuf, float* mean_slot, int C, int hw,
                                       float factor) {
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int q = tid; q < hw; q += nt)
        gbuf[q] = C == 3 ? gray(R[q], R[hw + q], R[2 * hw + q]) : R[q];
    __syncthreads();
    if (tid == 0) {
        float sum = 0.0f;
        for (int q = 0; q < hw; ++q) sum += gbuf[q];
        *mean_slot = sum / (float)hw;
    }
    __syncthreads();
    const float offset = (1.0f - factor) * *mean_slot;
    for (int q = tid; q < hw; q += nt)
        for (int ch = 0; ch < C; ++ch) R[ch * hw + q] = clamp01(factor * R[ch * hw + q] + offset);
}

// photometric.rs gaussian_blur: weights exp(-(k^2) / (2 sigma^2)) for k = -r..=r, r =
// ceil(3 sigma), divided by their ascending sum; horizontal then vertical pass with indices
// clamped to the region; then a clamp to [0, 1]. `T` holds C*h*w floats, `wraw` and `wn`
// max_taps floats each.
static __device__ void blur_region(float* R, float* T, float* wraw, float* wn, int C, int h,
                                   int w, float sigma, int max_taps) {
    const int tid = threadIdx.x, nt = blockDim.x, hw = h * w;
    int r = (int)ceilf(3.0f * sigma);
    if (2 * r + 1 > max_taps) r = (max_taps - 1) / 2;  // unreachable: the host bounds sigma
    const int taps = 2 * r + 1;
    const float denom = 2.0f * sigma * sigma;
    for (int t = tid; t < taps; t += nt) {
        const float d = (float)t - (float)r;
        wraw[t] = (float)exp((double)(-(d * d) / denom));
    }
    __syncthreads();  // also: every pixel's earlier per-pixel stages are done
    float sum = 0.0f;
    for (int t = 0; t < taps; ++t) sum += wraw[t];
    for (int t = tid; t < taps; t += nt) wn[t] = wraw[t] / sum;
    __syncthreads();
    for (int q = tid; q < hw; q += nt) {
        const int yy = q / w, xx = q - yy * w;
        for (int ch = 0; ch < C; ++ch) {
            const float* row = R + ch * hw + yy * w;
            float acc = 0.0f;
            for (int k = 0; k < taps; ++k) {
                int xs = xx + k - r;
                xs = xs < 0 ? 0 : (xs >= w ? w - 1 : xs);
                acc += wn[k] * row[xs];
            }
            T[ch * hw + q] = acc;
        }
    }
    __syncthreads();
    for (int q = tid; q < hw; q += nt) {
        const int yy = q / w, xx = q - yy * w;
        for (int ch = 0; ch < C; ++ch) {
            const float* col = T + ch * hw + xx;
            float acc = 0.0f;
            for (int k = 0; k < taps; ++k) {
                int ys = yy + k - r;
                ys = ys < 0 ? 0 : (ys >= h ? h - 1 : ys);
                acc += wn[k] * col[ys * w];
            }
            R[ch * hw + q] = clamp01(acc);
        }
    }
}

// photometric.rs add_noise: x <- clamp(x + sigma z), z the e-th normal() of the region's
// Noise stream for element e (planar order): u32 draws 2e and 2e + 1, i.e. words 2(e % 2)
// and 2(e % 2) + 1 of Philox block e / 2. Not inlined: its double-precision ln and cos would
// otherwise raise the register count of the whole kernel.
static __device__ __noinline__ void noise_region(float* R, int C, int hw, float sigma,
                                                 uint32_t batch, uint32_t image, uint32_t c2,
                                                 uint32_t seed_lo, uint32_t seed_hi) {
    for (int q = threadIdx.x; q < hw; q += blockDim.x) {
        for (int ch = 0; ch < C; ++ch) {
            const uint32_t e = (uint32_t)(ch * hw + q);
            const uint4 o = philox4x32_10(batch, image, c2, PURPOSE_NOISE | (e >> 1), seed_lo,
                                          seed_hi);
            const uint32_t a = (e & 1u) ? o.z : o.x, b = (e & 1u) ? o.w : o.y;
            const float u1 = 1.0f - unit_f32(a), u2 = unit_f32(b);
            const float radius = sqrtf(-2.0f * (float)log((double)u1));
            // cos through cospi: the angle over pi in double is off by an ulp of a double,
            // far below an f32 ulp of the result, and cospi has no slow path (no local memory).
            const double angle = (double)(6.28318548202514648f * u2);
            const float z = radius * (float)cospi(angle / 3.141592653589793);
            R[e] = clamp01(R[e] + sigma * z);
        }
    }
}

// Builds one region. Parameters:
//   out        all views, view after view; view v is (B, C, S_v, S_v) planar from element
//              view_info[v].out_base (ViewBatch::views concatenated).
//   src        the batch's images, image after image, each height x width x C u8 (HWC).
//   view_info  per view VIEW_WORDS u32: 0 side S, 1 region side p (S when per view),
//              2 regions per side S/p, 3 crop top, 4 crop left, 5 params offset (floats),
//              6 column taps offset in taps_u (first[S] then count[S]), 7 column weights
//              offset in taps_w, 8 column weight stride, 9-11 the same for rows, 12 offset
//              in taps_u of the per-region-row source row spans (lo, hi) pairs, 13-14 the
//              view's first output element (lo, hi words).
//   taps_u     the taps' first source index (crop-relative) and count per output, the spans.
//   taps_w     the taps' f32 weights, `stride` per output (ResizePlan's AxisTaps).
//   jobs       per block of one image: (view, region) pairs; block b is image
//              b / jobs_per_image, job b % jobs_per_image.
//   params     per view CFG_WORDS floats: jitter_p, brightness lo, span, contrast lo, span,
//              saturation lo, span, hue lo, span, grayscale_p, blur_p, sigma lo, span,
//              solarize_p, threshold, noise_p, noise sigma; then mean[3] and inv_std[3] at
//              mean_at.
//   scratch    null: the region and its blur buffer live in shared memory. Otherwise 2x the
//              output's element count of f32: the region at 2 * (its first output element
//              in region-major order), its blur buffer right after.
// Dynamic shared memory: 2 * max_taps (rounded up to 4) floats of blur weights, then
// C * chunk_rows * (widest region) floats of resize rows, then (without scratch) the region
// and its blur buffer, C * (largest region) floats each.
template <typename T>
static __device__ void build_views(T* __restrict__ out, const uint8_t* __restrict__ src,
                                   const uint32_t* __restrict__ view_info,
                                   const uint32_t* __restrict__ taps_u,
                                   const float* __restrict__ taps_w,
                                   const uint32_t* __restrict__ jobs,
                                   const float* __restrict__ params, float* scratch,
                                   int jobs_per_image, int height, int width, int C,
                                   int chunk_rows, int widest, int max_taps, int mean_at,
                                   int per_patch, uint32_t seed_lo, uint32_t seed_hi,
                                   uint32_t batch) {
    extern __shared__ float smem[];
    __shared__ uint32_t draw[12];
    __shared__ float mean_slot;
    const int tid = threadIdx.x, nt = blockDim.x;
    const uint32_t image = blockIdx.x / (uint32_t)jobs_per_image;
    const uint32_t job = blockIdx.x - image * (uint32_t)jobs_per_image;
    const uint32_t v = jobs[2 * job], region = jobs[2 * job + 1];
    const uint32_t* vi = view_info + (size_t)v * VIEW_WORDS;
    const int S = (int)vi[0], p = (int)vi[1], grid = (int)vi[2];
    const int top = (int)vi[3], left = (int)vi[4];
    const float* cfg = params + vi[5];
    const int prow = (int)region / grid, pcol = (int)region - prow * grid;
    const int y0 = prow * p, x0 = pcol * p;
    const int h = p, w = p, hw = p * p, rn = C * hw;
    const size_t view_image = (((size_t)vi[14] << 32) | vi[13]) + (size_t)image * C * S * S;
    const uint32_t c2 = (v << 20) | (per_patch ? region : WHOLE_VIEW);

    const int taps_pad = (max_taps + 3) & ~3;
    float* wraw = smem;
    float* wn = wraw + taps_pad;
    float* tmp = wn + taps_pad;
    float* R;
    if (scratch != nullptr) {
        R = scratch + 2 * (view_image + (size_t)region * rn);
    } else {
        R = tmp + (size_t)C * chunk_rows * widest;
    }
    float* Tb = R + rn;

    // The region's 12 parameter draws: three Philox blocks of its Photometric stream.
    if (tid < 3) {
        const uint4 o = philox4x32_10(batch, image, c2, PURPOSE_PHOTOMETRIC | (uint32_t)tid,
                                      seed_lo, seed_hi);
        draw[4 * tid] = o.x;
        draw[4 * tid + 1] = o.y;
        draw[4 * tid + 2] = o.z;
        draw[4 * tid + 3] = o.w;
    }

    // Resize (ResizePlan::apply): tmp[ch][row][x] = sum_k wcol[x][k] * src[row][cfirst[x]+k]
    // for the source rows this region's output rows read, chunk_rows rows at a time; every
    // output adds the taps of the chunk's rows to its running sum (ascending k overall).
    const uint32_t* cfirst = taps_u + vi[6];
    const uint32_t* ccount = cfirst + S;
    const float* cw = taps_w + vi[7];
    const int cstride = (int)vi[8];
    const uint32_t* rfirst = taps_u + vi[9];
    const uint32_t* rcount = rfirst + S;
    const float* rw = taps_w + vi[10];
    const int rstride = (int)vi[11];
    const int span_lo = (int)taps_u[vi[12] + 2 * prow];
    const int span_hi = (int)taps_u[vi[12] + 2 * prow + 1];
    const uint8_t* img = src + (size_t)image * height * width * C;

    for (int q = tid; q < hw; q += nt)
        for (int ch = 0; ch < C; ++ch) R[ch * hw + q] = 0.0f;

    for (int c0 = span_lo; c0 < span_hi; c0 += chunk_rows) {
        const int nrows = min(chunk_rows, span_hi - c0);
        for (int it = tid; it < nrows * w; it += nt) {
            const int j = it / w, xx = it - j * w, x = x0 + xx;
            const int f = (int)cfirst[x], n = (int)ccount[x];
            const float* wt = cw + (size_t)x * cstride;
            const uint8_t* px = img + ((size_t)(top + c0 + j) * width + left + f) * C;
            if (C == 3) {
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
#pragma unroll 2
                for (int k = 0; k < n; ++k) {
                    const float wk = wt[k];
                    a0 += wk * u8_to_f32(px[3 * k]);
                    a1 += wk * u8_to_f32(px[3 * k + 1]);
                    a2 += wk * u8_to_f32(px[3 * k + 2]);
                }
                tmp[j * w + xx] = a0;
                tmp[(chunk_rows + j) * w + xx] = a1;
                tmp[(2 * chunk_rows + j) * w + xx] = a2;
            } else {
                float a0 = 0.0f;
                for (int k = 0; k < n; ++k) a0 += wt[k] * u8_to_f32(px[k]);
                tmp[j * w + xx] = a0;
            }
        }
        __syncthreads();
        for (int q = tid; q < hw; q += nt) {
            const int yy = q / w, xx = q - yy * w, y = y0 + yy;
            const int f = (int)rfirst[y], n = (int)rcount[y];
            const int k0 = max(c0 - f, 0), k1 = min(n, c0 + nrows - f);
            const float* wt = rw + (size_t)y * rstride;
            for (int ch = 0; ch < C; ++ch) {
                const float* col = tmp + (size_t)ch * chunk_rows * w + xx;
                float acc = R[ch * hw + q];
#pragma unroll 2
                for (int k = k0; k < k1; ++k) acc += wt[k] * col[(f + k - c0) * w];
                R[ch * hw + q] = acc;
            }
        }
        __syncthreads();  // tmp is rewritten by the next chunk
    }
    __syncthreads();  // the draws are visible (also when the span is empty)
    for (int q = tid; q < hw; q += nt)
        for (int ch = 0; ch < C; ++ch) R[ch * hw + q] = clamp01(R[ch * hw + q] / 255.0f);

    // The parameters follow RegionDraws::draw's order: word 0 jitter gate, 1-2 the jitter
    // order, 3 brightness, 4 contrast, 5 saturation, 6 hue, 7 grayscale gate, 8 blur gate,
    // 9 blur sigma, 10 solarize gate, 11 noise gate. Each is decoded where it is used (every
    // thread reads the same shared words), which keeps them out of registers in between.
    if (unit_f32(draw[0]) < cfg[0]) {
        // jitter_order: Lehmer digits k/6, (k%6)/2, k%2 pick from [B, C, S, H] (one nibble
        // each) what is left.
        const uint32_t korder =
            (uint32_t)__umul64hi(((uint64_t)draw[1] << 32) | draw[2], 24ull);
        uint32_t rest = 0x3210u;
        for (int slot = 0; slot < 4; ++slot) {
            const uint32_t d =
                slot == 0 ? korder / 6 : slot == 1 ? (korder % 6) / 2 : slot == 2 ? korder % 2 : 0;
            const uint32_t op = (rest >> (4 * d)) & 0xFu;
            rest = (rest & ((1u << (4 * d)) - 1u)) | ((rest >> (4 * d + 4)) << (4 * d));
            if (op == 0) {
                const float brightness = cfg[1] + cfg[2] * unit_f32(draw[3]);
                for (int q = tid; q < hw; q += nt)
                    for (int ch = 0; ch < C; ++ch)
                        R[ch * hw + q] = clamp01(brightness * R[ch * hw + q]);
            } else if (op == 1) {
                contrast_region(R, Tb, &mean_slot, C, hw, cfg[3] + cfg[4] * unit_f32(draw[4]));
            } else if (op == 2) {
                if (C == 3) {
                    const float saturation = cfg[5] + cfg[6] * unit_f32(draw[5]);
                    for (int q = tid; q < hw; q += nt) {
                        const float r = R[q], g = R[hw + q], b = R[2 * hw + q];
                        const float offset = (1.0f - saturation) * gray(r, g, b);
                        R[q] = clamp01(saturation * r + offset);
                        R[hw + q] = clamp01(saturation * g + offset);
                        R[2 * hw + q] = clamp01(saturation * b + offset);
                    }
                }
            } else if (C == 3) {
                const float hue = cfg[7] + cfg[8] * unit_f32(draw[6]);
                if (hue != 0.0f) {
                    for (int q = tid; q < hw; q += nt) {
                        float r = R[q], g = R[hw + q], b = R[2 * hw + q];
                        hue_shift_pixel(r, g, b, hue);
                        R[q] = r;
                        R[hw + q] = g;
                        R[2 * hw + q] = b;
                    }
                }
            }
        }
    }
    if (unit_f32(draw[7]) < cfg[9] && C == 3) {
        for (int q = tid; q < hw; q += nt) {
            const float y = clamp01(gray(R[q], R[hw + q], R[2 * hw + q]));
            R[q] = y;
            R[hw + q] = y;
            R[2 * hw + q] = y;
        }
    }
    if (unit_f32(draw[8]) < cfg[10])
        blur_region(R, Tb, wraw, wn, C, h, w, cfg[11] + cfg[12] * unit_f32(draw[9]), max_taps);
    if (unit_f32(draw[10]) < cfg[13]) {
        const float threshold = cfg[14];
        for (int q = tid; q < hw; q += nt)
            for (int ch = 0; ch < C; ++ch) {
                const float x = R[ch * hw + q];
                if (x >= threshold) R[ch * hw + q] = 1.0f - x;
            }
    }
    if (unit_f32(draw[11]) < cfg[15])
        noise_region(R, C, hw, cfg[16], batch, image, c2, seed_lo, seed_hi);

    // Normalise ((x - mean) * inv_std) and write the model input.
    for (int q = tid; q < hw; q += nt) {
        const int yy = q / w, xx = q - yy * w;
        for (int ch = 0; ch < C; ++ch) {
            const float x = (R[ch * hw + q] - params[mean_at + ch]) * params[mean_at + 3 + ch];
            store(out + view_image + ((size_t)ch * S + y0 + yy) * S + x0 + xx, x);
        }
    }
}

// The two entry points: the same body, f32 output (for parity checks) or bf16 (training).
extern "C" __global__ void __launch_bounds__(256, 4)
build_views_f32(float* __restrict__ out, const uint8_t* __restrict__ src,
                const uint32_t* __restrict__ view_info, const uint32_t* __restrict__ taps_u,
                const float* __restrict__ taps_w, const uint32_t* __restrict__ jobs,
                const float* __restrict__ params, float* scratch, int jobs_per_image,
                int height, int width, int channels, int chunk_rows, int widest, int max_taps,
                int mean_at, int per_patch, uint32_t seed_lo, uint32_t seed_hi, uint32_t batch) {
    build_views<float>(out, src, view_info, taps_u, taps_w, jobs, params, scratch,
                       jobs_per_image, height, width, channels, chunk_rows, widest, max_taps,
                       mean_at, per_patch, seed_lo, seed_hi, batch);
}

extern "C" __global__ void __launch_bounds__(256, 4)
build_views_bf16(bf16* __restrict__ out, const uint8_t* __restrict__ src,
                 const uint32_t* __restrict__ view_info, const uint32_t* __restrict__ taps_u,
                 const float* __restrict__ taps_w, const uint32_t* __restrict__ jobs,
                 const float* __restrict__ params, float* scratch, int jobs_per_image,
                 int height, int width, int channels, int chunk_rows, int widest, int max_taps,
                 int mean_at, int per_patch, uint32_t seed_lo, uint32_t seed_hi, uint32_t batch) {
    build_views<bf16>(out, src, view_info, taps_u, taps_w, jobs, params, scratch,
                      jobs_per_image, height, width, channels, chunk_rows, widest, max_taps,
                      mean_at, per_patch, seed_lo, seed_hi, batch);
}
