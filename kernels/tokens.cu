// Row gather and scatter of bf16 token rows (launchers and CPU twins: src/cuda/step.rs):
// the student's matched tokens are gathered from the backbone's output into the head's
// input, and the head's input gradient is scattered back into the backbone's output
// gradient. Rows are `d` bf16 wide; `index` holds u32 row numbers into the big buffer.
//
// One thread per element of the gathered side, flat over (rows, d), with 64-bit offsets
// (the token buffers may exceed 2^31 elements). The launcher checks every index against
// the big buffer's row count on the host before the upload.
//
// scatter_rows uses no atomics: within one launch the indices are distinct (the gather list
// of a StudentLayout has no duplicate (image, view, token)), so no two threads write the
// same element. The launcher asserts distinctness on the host in debug builds.
#include "common.cuh"

// out[r, c] = src[index[r], c] for r < rows, c < d.
extern "C" __global__ void gather_rows(bf16* __restrict__ out, const bf16* __restrict__ src,
                                       const unsigned int* __restrict__ index, int rows, int d) {
    const unsigned long long i =
        (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long n = (unsigned long long)rows * (unsigned long long)d;
    if (i >= n) return;
    const unsigned long long r = i / (unsigned long long)d;
    const unsigned long long c = i - r * (unsigned long long)d;
    out[i] = src[(unsigned long long)index[r] * (unsigned long long)d + c];
}

// dst[index[r], c] += src[r, c] for r < rows, c < d: the sum in fp32, rounded once to bf16
// (round to nearest even). Indices distinct within the launch (see above).
extern "C" __global__ void scatter_rows(bf16* __restrict__ dst, const bf16* __restrict__ src,
                                        const unsigned int* __restrict__ index, int rows, int d) {
    const unsigned long long i =
        (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long n = (unsigned long long)rows * (unsigned long long)d;
    if (i >= n) return;
    const unsigned long long r = i / (unsigned long long)d;
    const unsigned long long c = i - r * (unsigned long long)d;
    bf16* p = dst + (unsigned long long)index[r] * (unsigned long long)d + c;
    store(p, to_f32(*p) + to_f32(src[i]));
}
