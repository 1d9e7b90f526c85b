// Element functors of the reductions: value() maps one element (a, b, c, d from lists A..D; N_IN of them are
// read) to K fp32 terms that are summed; finish() turns a row/column sum over n elements into the reported
// statistic. OpBase holds the defaults of the optional members; ops with parameters or an entry hook (the
// projection, fo_projection.h) override them.
// Compiled for host and device; the build disables FMA contraction so both round identically.
#pragma once

#include "fo_engine.h"

namespace fo {

struct OpBase {
  // Per-tile constants value() may use, built once per tile from the launch and the tile's tensor.
  struct Ctx {};
  FO_HD FO_INLINE static Ctx ctx(const Args&, const Tile&) { return {}; }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
  // Entry hook, run by the entry's last block once every statistic of the entry is final (fo_engine.h);
  // `scratch`: SCRATCH doubles per thread of shared memory.
  static constexpr int SCRATCH = 0;
  template <class Ex>
  FO_HD FO_INLINE static void finish_entry(Ex&, double (*)[NT], const Args&, const Tile&) {}
  // Launch-time check of the op's parameters (host): an error message, or nullptr.
  static const char* check(const Args&) { return nullptr; }
};

// Sum of squares: NovoGrad per-layer second moments, global grad norm, Adafactor's update RMS.
struct SumSqOp : OpBase {
  static constexpr int K = 1;
  static constexpr int N_IN = 1;
  FO_HD FO_INLINE static void value(const Ctx&, float a, float, float, float, float* v) { v[0] = a * a; }
};

// Adafactor: means of g*g + eps (the reference computes `grad ** 2 + eps` in fp32, then `.mean`).
struct SqEpsMeanOp : OpBase {
  static constexpr int K = 1;
  static constexpr int N_IN = 1;
  struct Ctx {
    float eps;
  };
  FO_HD FO_INLINE static Ctx ctx(const Args& a, const Tile&) { return {float(a.eps)}; }
  FO_HD FO_INLINE static void value(const Ctx& x, float a, float, float, float, float* v) { v[0] = a * a + x.eps; }
  // torch's mean divides the sum by n (a 0-length dim gives nan, as here).
  FO_HD FO_INLINE static float finish(float s, int64_t n) { return s / float(n); }
};

}  // namespace fo
