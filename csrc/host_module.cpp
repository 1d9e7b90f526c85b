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
  dispatch_kind(kind, [&](auto sp) { host_run<decltype(sp)>(a); });  // the binding has checked the kind
}

}  // namespace fo

PYBIND11_MODULE(_fused_optim_host, m) {
  m.doc() = "fused_optim multi-tensor reductions, host build (see fused_optim/csrc.py)";
  fo::bind_module(m, &fo::host_launch);
}
