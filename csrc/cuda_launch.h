// Boundary between the pybind11 module (host compiler) and the kernels (nvcc): plain C++ types only, so
// pybind11's headers never go through nvcc.
#pragma once

#include <cstdint>
#include <string>

#include "fo_engine.h"  // Args

namespace fo {

// Launches the kind's kernel on `stream` (a cudaStream_t as an integer). Returns "" or an error message.
std::string cuda_launch(int kind, const Args& a, int device, uint64_t stream);
std::string cuda_device_info();

}  // namespace fo
