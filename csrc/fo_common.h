// Portability layer: the same source is compiled by a host C++ compiler (host build, tests on CPU) and by nvcc
// (device build). Nothing here includes torch: the modules take raw addresses, so one build serves every torch.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FO_HD __host__ __device__
#define FO_INLINE __forceinline__
#else
#define FO_HD
#define FO_INLINE inline
#endif

// Unrolls the next loop in device code (a host compiler does as it likes).
#if defined(__CUDA_ARCH__)
#define FO_UNROLL _Pragma("unroll")
#else
#define FO_UNROLL
#endif

namespace fo {

// Dtype codes shared with Python (fused_optim/engine_core.py checks the modules' DTYPE_* against its own).
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Tag types: loads are templated on them so a block picks its dtype once, not per element.
struct f32_tag {};
struct bf16_tag {};
struct f16_tag {};

FO_HD FO_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FO_HD FO_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Exact fp16 -> fp32 (every fp16 value is an fp32 value), so host and device agree bit for bit.
FO_HD FO_INLINE float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in fp32
    const float f = float(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

// Inputs are read-only during a launch: __ldg gives global (not generic) loads through the read-only path.
template <class T>
FO_HD FO_INLINE T load_ro(const void* p, int64_t i) {
#if defined(__CUDA_ARCH__)
  return __ldg(static_cast<const T*>(p) + i);
#else
  return static_cast<const T*>(p)[i];
#endif
}

FO_HD FO_INLINE float load(f32_tag, const void* p, int64_t i) { return load_ro<float>(p, i); }
FO_HD FO_INLINE float load(bf16_tag, const void* p, int64_t i) { return bf16_to_float(load_ro<unsigned short>(p, i)); }
FO_HD FO_INLINE float load(f16_tag, const void* p, int64_t i) { return f16_to_float(load_ro<unsigned short>(p, i)); }

template <class Fn>
FO_HD FO_INLINE void dispatch_dtype(int code, Fn&& fn) {
  switch (code) {
    case BF16: fn(bf16_tag{}); break;
    case F16: fn(f16_tag{}); break;
    default: fn(f32_tag{}); break;  // the planner rejects unknown codes
  }
}

// dispatch_dtype for an input the op reads; f32 alone (one instantiation) for one it does not.
template <bool READ, class Fn>
FO_HD FO_INLINE void dispatch_input(int code, Fn&& fn) {
  if constexpr (READ) dispatch_dtype(code, static_cast<Fn&&>(fn));
  else fn(f32_tag{});
}

// Cross-block primitives. On the host, blocks run one after another, so plain operations are exact equivalents.
FO_HD FO_INLINE int atomic_inc(int* p) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(p, 1);
#else
  return (*p)++;
#endif
}

FO_HD FO_INLINE void fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

// Reads of values another block wrote in this launch: bypass L1, which is not coherent across SMs.
FO_HD FO_INLINE float load_l2(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// A block of NT threads, written as phases separated by sync(). On the device each thread runs each phase for
// itself; on the host each phase runs for thread 0..NT-1 in turn. A phase body must not communicate with other
// threads except through shared memory written in an earlier phase, so both executions give identical results.
template <class Regs, int NT>
struct Exec {
  Regs* regs;  // device: this thread's registers; host: NT of them
  template <class Fn>
  FO_HD FO_INLINE void each(Fn&& fn) {
#if defined(__CUDA_ARCH__)
    fn(int(threadIdx.x), *regs);
#else
    for (int t = 0; t < NT; ++t) fn(t, regs[t]);
#endif
  }
  FO_HD FO_INLINE void sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

}  // namespace fo
