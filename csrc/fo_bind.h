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
// The op's launch parameters: up to N_HYPER values for Args::hyper, and the hook_rows / hook_entries addresses.
using OpTuple = std::tuple<std::vector<double>, uint64_t, uint64_t>;

// plan(kind, [(addr_a, addr_b, addr_c, addr_d, addr_scalar, dtype_a, dtype_b, dtype_cd, numel, B, R, C, S), ...])
//   -> (meta: bytes of int64, n_entries, n_items, ws_extra_floats, n_stats, n_counters, K, row_out, col_out)
inline py::tuple py_plan(int kind, const std::vector<DescTuple>& descs) {
  std::vector<Desc> ds;
  ds.reserve(descs.size());
  for (const auto& t : descs) {
    Desc d;
    std::tie(d.pa, d.pb, d.pc, d.pd, d.pscalar, d.da, d.db, d.dc, d.numel, d.B, d.R, d.C, d.S) = t;
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
                      double eps, const OpTuple& op) {
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
  a.eps = eps;
  const std::vector<double>& hyper = std::get<0>(op);
  if (hyper.size() > size_t(N_HYPER))
    throw std::invalid_argument("fused_optim csrc: more than " + std::to_string(N_HYPER) + " op parameters");
  for (int i = 0; i < N_HYPER; ++i) a.hyper[i] = size_t(i) < hyper.size() ? hyper[i] : 0.0;
  a.hook_rows = ptr<float>(std::get<1>(op));
  a.hook_entries = ptr<float>(std::get<2>(op));
  return a;
}

// Registers plan(), launch() and constants. Launcher: void(int kind, const Args&, int device, uint64_t stream).
template <class Launcher>
void bind_module(py::module_& m, Launcher launcher) {
  m.def("plan", &py_plan, py::arg("kind"), py::arg("descs"));
  m.def(
      "launch",
      [launcher](int kind, uint64_t meta, int64_t n_entries, int64_t n_items, uint64_t ws_items, uint64_t ws_extra,
                 uint64_t counters, uint64_t out_t, uint64_t out_stats, uint64_t out_g, uint64_t scale_a, double eps,
                 const OpTuple& op, int device, uint64_t stream) {
        const Args a = make_args(meta, n_entries, n_items, ws_items, ws_extra, counters, out_t, out_stats, out_g,
                                 scale_a, eps, op);
        const char* err = nullptr;
        if (!dispatch_kind(kind, [&](auto sp) { err = decltype(sp)::Op::check(a); })) throw unknown_kind(kind);
        if (err) throw std::invalid_argument(std::string("fused_optim csrc: ") + err);
        if (n_entries <= 0 || n_items <= 0) return;
        py::gil_scoped_release nogil;
        launcher(kind, a, device, stream);
      },
      py::arg("kind"), py::arg("meta"), py::arg("n_entries"), py::arg("n_items"), py::arg("ws_items"),
      py::arg("ws_extra"), py::arg("counters"), py::arg("out_t"), py::arg("out_stats"), py::arg("out_g"),
      py::arg("scale_a"), py::arg("eps"), py::arg("op") = OpTuple{{}, 0, 0},
      py::arg("device") = 0, py::arg("stream") = 0);
  py::dict kinds;  // name -> code, from FO_KINDS (fo_kinds.h)
#define FO_KIND_ENTRY(NAME, ...) kinds[#NAME] = int(KIND_##NAME);
  FO_KINDS(FO_KIND_ENTRY)
#undef FO_KIND_ENTRY
  m.attr("KINDS") = kinds;
  m.attr("DTYPE_F32") = int(F32);
  m.attr("DTYPE_BF16") = int(BF16);
  m.attr("DTYPE_F16") = int(F16);
  m.attr("THREADS") = NT;
  m.attr("META_W") = int(META_W);
  m.attr("M_B") = int(M_B);  // record fields the tests inspect
  m.attr("M_NRT") = int(M_NRT);
  m.attr("M_NCT") = int(M_NCT);
  m.attr("ABI_VERSION") = 4;  // bump when plan()/launch() change; the loader checks it
}

}  // namespace fo
