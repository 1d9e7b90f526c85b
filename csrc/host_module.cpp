// _fused_optim_host: the engine run on the CPU, block after block, thread after thread (see fo_engine.h).
// Always built (no CUDA needed), so CI tests the kernels' math and indexing against torch references.
#include <memory>
#include <vector>

#include "fo_bind.h"

namespace fo {

template <class Sp>
void host_run(const Args& a) {
  std::vector<Regs<Sp::K>> regs(NT);
  auto sh = std::make_unique<Shared<Sp>>();
  Exec<Regs<Sp::K>, NT> ex{regs.data()};
  for (int64_t item = 0; item < a.n_items; ++item) block_program<Sp>(ex, *sh, a, item);
}

void host_launch(int kind, const Args& a, int, uint64_t) {
  switch (kind) {
    case KIND_SUMSQ: host_run<SpecSumSq>(a); break;
    case KIND_DOT: host_run<SpecDot>(a); break;
    case KIND_DOT_ROWS: host_run<SpecDotRows>(a); break;
    case KIND_FACTORED: host_run<SpecFactored>(a); break;
    case KIND_PROJ: host_run<SpecProj>(a); break;
  }
}

}  // namespace fo

PYBIND11_MODULE(_fused_optim_host, m) {
  m.doc() = "fused_optim multi-tensor reductions, host build (see fused_optim/csrc.py)";
  fo::bind_module(m, &fo::host_launch);
}
