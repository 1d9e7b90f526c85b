// pybind11 glue shared by the host and the CUDA module: both expose the same plan() and launch().
// Only integers cross the boundary (addresses, sizes, dtype codes, stream handle): no torch C++ ABI involved.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "fo_plan.h"

namespace fo {

namespace py = pybind11;

using DescTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int64_t, int64_t, int64_t,
                             int64_t, int64_t>;
// The projection's direction and decision parameters (Args' KIND_PROJ fields; eps is the launch's own): dir,
// nesterov, k0..k3, beta2, delta, coef_rows address, mode_t address.
using ProjTuple = std::tuple<int, int, double, double, double, double, double, double, uint64_t, uint64_t>;

// plan(kind, [(addr_a, addr_b, addr_c, addr_d, addr_step, dtype_a, dtype_b, dtype_cd, numel, B, R, C, S), ...])
//   -> (meta: bytes of int64, n_entries, n_items, ws_extra_floats, n_stats, n_counters, K, row_out, col_out)
inline py::tuple py_plan(int kind, const std::vector<DescTuple>& descs) {
  std::vector<Desc> ds;
  ds.reserve(descs.size());
  for (const auto& t : descs) {
    Desc d;
    std::tie(d.pa, d.pb, d.pc, d.pd, d.pstep, d.da, d.db, d.dc, d.numel, d.B, d.R, d.C, d.S) = t;
    ds.push_back(d);
  }
  const Plan p = make_plan(kind, ds);
  py::bytes meta(reinterpret_cast<const char*>(p.meta.data()), p.meta.size() * sizeof(int64_t));
  return py::make_tuple(meta, p.n_entries, p.n_items, p.ws_extra, p.n_stats, p.n_counters, p.K, p.row_out,
                        p.col_out);
}

template <class T>
T* ptr(uint64_t addr) { return reinterpret_cast<T*>(static_cast<uintptr_t>(addr)); }

inline Args make_args(uint64_t meta, int64_t n_entries, int64_t n_items, uint64_t ws_items, uint64_t ws_extra,
                      uint64_t counters, uint64_t out_t, uint64_t out_stats, uint64_t out_g, uint64_t scale_a,
                      double eps, const ProjTuple& proj) {
  Args a;
  a.meta = ptr<const int64_t>(meta);
  a.n_entries = n_entries;
  a.n_items = n_items;
  a.ws_items = ptr<float>(ws_items);
  a.ws_extra = ptr<float>(ws_extra);
  a.counters = ptr<int>(counters);
  a.out_t = ptr<float>(out_t);
  a.out_stats = ptr<float>(out_stats);
  a.out_g = ptr<float>(out_g);
  a.scale_a = scale_a ? ptr<const float>(scale_a) : nullptr;
  a.eps = float(eps);
  a.eps64 = eps;  // the projection's decision is taken in fp64, as in the Triton kernel
  double k[4];
  uint64_t coef_rows, mode_t;
  std::tie(a.dir, a.nesterov, k[0], k[1], k[2], k[3], a.beta2, a.delta, coef_rows, mode_t) = proj;
  for (int i = 0; i < 4; ++i) a.k[i] = float(k[i]);  // rounded like the Triton kernel's .to(tl.float32)
  a.coef_rows = ptr<float>(coef_rows);
  a.mode_t = ptr<float>(mode_t);
  return a;
}

inline void check_kind(int kind) {
  if (kind < 0 || kind >= N_KINDS) throw std::invalid_argument("fused_optim csrc: unknown kind " + std::to_string(kind));
}

// Registers plan(), launch() and constants. Launcher: void(int kind, const Args&, int device, uint64_t stream).
template <class Launcher>
void bind_module(py::module_& m, Launcher launcher) {
  m.def("plan", &py_plan, py::arg("kind"), py::arg("descs"));
  m.def(
      "launch",
      [launcher](int kind, uint64_t meta, int64_t n_entries, int64_t n_items, uint64_t ws_items, uint64_t ws_extra,
                 uint64_t counters, uint64_t out_t, uint64_t out_stats, uint64_t out_g, uint64_t scale_a, double eps,
                 const ProjTuple& proj, int device, uint64_t stream) {
        check_kind(kind);
        if (n_entries <= 0 || n_items <= 0) return;
        if (kind == KIND_PROJ && (std::get<8>(proj) == 0 || std::get<9>(proj) == 0))
          throw std::invalid_argument("fused_optim csrc: the projection needs its coef_rows and mode_t outputs");
        const Args a = make_args(meta, n_entries, n_items, ws_items, ws_extra, counters, out_t, out_stats, out_g,
                                 scale_a, eps, proj);
        py::gil_scoped_release nogil;
        launcher(kind, a, device, stream);
      },
      py::arg("kind"), py::arg("meta"), py::arg("n_entries"), py::arg("n_items"), py::arg("ws_items"),
      py::arg("ws_extra"), py::arg("counters"), py::arg("out_t"), py::arg("out_stats"), py::arg("out_g"),
      py::arg("scale_a"), py::arg("eps"), py::arg("proj") = ProjTuple{0, 0, 0., 0., 0., 0., 0., 0., 0, 0},
      py::arg("device") = 0, py::arg("stream") = 0);
  m.attr("KIND_SUMSQ") = int(KIND_SUMSQ);
  m.attr("KIND_DOT") = int(KIND_DOT);
  m.attr("KIND_DOT_ROWS") = int(KIND_DOT_ROWS);
  m.attr("KIND_FACTORED") = int(KIND_FACTORED);
  m.attr("KIND_PROJ") = int(KIND_PROJ);
  m.attr("DTYPE_F32") = int(F32);
  m.attr("DTYPE_BF16") = int(BF16);
  m.attr("DTYPE_F16") = int(F16);
  m.attr("THREADS") = NT;
  m.attr("META_W") = int(META_W);
  m.attr("M_B") = int(M_B);  // record fields the tests inspect
  m.attr("M_NRT") = int(M_NRT);
  m.attr("M_NCT") = int(M_NCT);
  m.attr("ABI_VERSION") = 3;  // bump when plan()/launch() change; the loader checks it
}

}  // namespace fo
