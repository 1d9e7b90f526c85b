// _fused_optim_cuda: the same plan()/launch() as the host module, launching the CUDA kernels asynchronously on
// the caller's stream. Built only when nvcc is found (CMake option FO_CUDA).
#include <stdexcept>

#include "cuda_launch.h"
#include "fo_bind.h"

PYBIND11_MODULE(_fused_optim_cuda, m) {
  m.doc() = "fused_optim multi-tensor reductions, CUDA build (see fused_optim/csrc.py)";
  fo::bind_module(m, [](int kind, const fo::Args& a, int device, uint64_t stream) {
    const std::string err = fo::cuda_launch(kind, a, device, stream);
    if (!err.empty()) throw std::runtime_error("fused_optim csrc: " + err);
  });
  m.def("device_info", &fo::cuda_device_info);
}
