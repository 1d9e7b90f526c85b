// The one list of reduction kinds. A line: X(NAME, element op, row sums?, column sums?, plan rule).
// Everything that names a kind is generated from it: the Kind codes KIND_<NAME> (list order), dispatch_kind()
// (the launchers and the launch checks), make_plan()'s rule switch (fo_plan.h) and the modules' KINDS dict, from
// which fused_optim/engine_core.py checks its own names at load.
// A new kind: its element op (fo_functors.h, or a header of its own included here), a plan rule (fo_plan.h) if
// none fits, and one line below.
#pragma once

#include "fo_functors.h"
#include "fo_projection.h"

#define FO_KINDS(X)                                   \
  X(SUMSQ, SumSqOp, false, false, rule_flat)          \
  X(FACTORED, SqEpsMeanOp, true, true, rule_factored) \
  X(PROJ, ProjOp, true, false, rule_rows)

namespace fo {

enum Kind : int {
#define FO_KIND_CODE(NAME, ...) KIND_##NAME,
  FO_KINDS(FO_KIND_CODE)
#undef FO_KIND_CODE
  N_KINDS
};

// What block_program is instantiated for: the element op plus which statistics the kernel can produce.
template <class OpT, bool ROWS_, bool COLS_>
struct Spec {
  using Op = OpT;
  static constexpr int K = OpT::K;
  static constexpr bool ROWS = ROWS_;  // per-row sums (a row: C consecutive elements)
  static constexpr bool COLS = COLS_;  // per-column sums (a column: R elements, stride C)
};

// fn(Spec<...>{}) for the kind's Spec; false for an unknown code.
template <class Fn>
bool dispatch_kind(int kind, Fn&& fn) {
  switch (kind) {
#define FO_KIND_CASE(NAME, OP, ROWS, COLS, RULE) \
  case KIND_##NAME:                              \
    fn(Spec<OP, ROWS, COLS>{});                  \
    return true;
    FO_KINDS(FO_KIND_CASE)
#undef FO_KIND_CASE
  }
  return false;
}

}  // namespace fo
