// CPU emulation of the subset of CUDA C++ the engine's kernels use, so that every kernel can
// run against its CPU twin on machines without a GPU (CI's): `check-kernels --emulate`.
//
// build.rs compiles each kernels/*.cu as ordinary C++ with this header force-included. A
// launch runs the grid's blocks one after another; the threads of a block are fibers
// (ucontext) on one OS thread, switched at __syncthreads and at warp-level operations, so
// barriers, shared memory and shuffles have their CUDA meaning. It checks logic (indexing,
// reductions, what is written where), not timing, the memory model or warp-synchronous
// code without __syncwarp; the GPU run of check-kernels stays the final word.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstddef>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

namespace emu {
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;
void syncthreads();
void syncwarp();
unsigned lane();
uint64_t* warp_exchange();  // 32 slots of this thread's warp
void* dynamic_shared();
}  // namespace emu

#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)
static const int warpSize = 32;

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
inline T emu_exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t* slots = emu::warp_exchange();
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    slots[emu::lane()] = bits;
    emu::syncwarp();
    uint64_t got = slots[src_lane & 31];
    emu::syncwarp();
    T r;
    memcpy(&r, &got, sizeof(T));
    return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    unsigned l = emu::lane();
    unsigned src = l ^ (unsigned)mask;
    if ((src & ~(unsigned)(width - 1)) != (l & ~(unsigned)(width - 1))) src = l;
    return emu_exchange(v, src);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned l = emu::lane();
    unsigned src = (l % width) + delta < (unsigned)width ? l + delta : l;
    return emu_exchange(v, src);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    unsigned l = emu::lane();
    unsigned src = (l % width) >= delta ? l - delta : l;
    return emu_exchange(v, src);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    unsigned l = emu::lane();
    return emu_exchange(v, (l & ~(unsigned)(width - 1)) + ((unsigned)src_lane % width));
}
inline unsigned __ballot_sync(unsigned, int pred) {
    uint64_t* slots = emu::warp_exchange();
    slots[emu::lane()] = pred ? 1 : 0;
    emu::syncwarp();
    unsigned bits = 0;
    for (int i = 0; i < 32; i++) bits |= (slots[i] == 1 ? 1u : 0u) << i;
    emu::syncwarp();
    return bits;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, !pred) == 0; }

// The emulator's tensor-core product (common.cuh's mma_16816 calls it under PWSELF_EMU):
// the warp's 32 fragments are exchanged in three rounds, then each lane computes its four
// outputs in fp32, k in order. Fragment layout as in common.cuh.
#define PWSELF_EMU 1
inline float emu_bf16_half(uint32_t w, int hi) {
    uint32_t bits = hi ? (w & 0xffff0000u) : (w << 16);
    float x;
    memcpy(&x, &bits, 4);
    return x;
}
inline void emu_mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    uint64_t* slots = emu::warp_exchange();
    const unsigned l = emu::lane();
    uint32_t A[32][4], B[32][2];
    const uint64_t mine[3] = {(uint64_t)a[0] | ((uint64_t)a[1] << 32), (uint64_t)a[2] | ((uint64_t)a[3] << 32),
                              (uint64_t)b[0] | ((uint64_t)b[1] << 32)};
    for (int round = 0; round < 3; round++) {
        slots[l] = mine[round];
        emu::syncwarp();
        for (int i = 0; i < 32; i++) {
            const uint32_t lo = (uint32_t)slots[i], hi = (uint32_t)(slots[i] >> 32);
            if (round == 0) { A[i][0] = lo; A[i][1] = hi; }
            if (round == 1) { A[i][2] = lo; A[i][3] = hi; }
            if (round == 2) { B[i][0] = lo; B[i][1] = hi; }
        }
        emu::syncwarp();
    }
    const int g = (int)l / 4, t = (int)l % 4;
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e >> 1), c = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; k++) {
            const float av = emu_bf16_half(A[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
            const float bv = emu_bf16_half(B[c * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k & 1);
            acc += av * bv;
        }
        d[e] = acc;
    }
}

// Arithmetic intrinsics: the exact IEEE forms (the emulator never fuses a multiply-add).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __double2float_rn(double x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline double __ull2double_rn(unsigned long long x) { return (double)x; }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double cospi(double x) { return cos(x * 3.14159265358979323846); }
inline double sinpi(double x) { return sin(x * 3.14159265358979323846); }
inline float cospif(float x) { return (float)cospi((double)x); }
inline float sinpif(float x) { return (float)sinpi((double)x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float saturatef(float x) { return __saturatef(x); }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; memcpy(&x, &u, 4); return x; }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline uint64_t __umul64hi(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) >> 64); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// CUDA's global min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Atomics: one fiber runs at a time, so plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <class T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <class T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T> inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <class T> inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

#include "cuda_bf16.h"

// Registration of extern "C" kernels, for the launcher (emu_runtime.cpp). Each kernel is
// registered with its parameters' kinds and sizes, which every launch is checked against:
// the emulator reads each argument from an 8-byte slot, so without this a 4-byte value passed
// for an 8-byte parameter would work here and fail on the GPU.
namespace emu {
typedef void (*Invoker)(void** args);
enum ArgKind { KIND_POINTER = 0, KIND_INTEGER = 1, KIND_FLOAT = 2 };
struct Signature {
    int count;
    const int* kinds;
    const int* sizes;
};
void register_kernel(const char* name, Invoker invoke, Signature sig, int max_threads);

template <class T>
constexpr int kind_of() {
    return std::is_pointer_v<T> ? KIND_POINTER
                                : (std::is_floating_point_v<T> ? KIND_FLOAT : KIND_INTEGER);
}
template <class... A, size_t... I>
inline void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <auto K>
struct Registrar;
template <class... A, void (*K)(A...)>
struct Registrar<K> {
    static void invoke(void** args) { call_with(K, args, std::index_sequence_for<A...>{}); }
    static constexpr int kinds[sizeof...(A) + 1] = {kind_of<std::remove_cv_t<A>>()..., -1};
    static constexpr int sizes[sizeof...(A) + 1] = {(int)sizeof(A)..., 0};
    static Signature signature() { return Signature{(int)sizeof...(A), kinds, sizes}; }
};
}  // namespace emu
// build.rs appends to each emulated kernels/<name>.cu a function that registers its
// extern "C" kernels, with the block-size limit of their __launch_bounds__ (from the PTX's
// .maxntid when nvcc built it, else 1024); the launcher calls them all before the first launch.
#define EMU_REGISTER(name, max_threads) \
    ::emu::register_kernel(#name, &::emu::Registrar<&name>::invoke, ::emu::Registrar<&name>::signature(), max_threads);
