// Device build of the engine: one __global__ per reduction kind, one launch per call, grid = number of tiles.
// Compiled with --fmad=false (see CMakeLists.txt) so its rounding equals the host build's.
#include <cuda_runtime.h>

#include <string>

#include "cuda_launch.h"
#include "fo_kinds.h"

namespace fo {

// Min 2 blocks per SM caps registers at 128: without it ptxas picked ~48-64 for some kinds and spilled; with it,
// 72-124 and no spills (ptxas -v, sm_80 / sm_90), i.e. 2-3 blocks of 256 threads, each with LOADS_IN_FLIGHT
// independent loads per input in flight per thread, which is what a bandwidth-bound pass needs.
template <class Sp>
__global__ void __launch_bounds__(NT, 2) reduce_kernel(Args a) {
  __shared__ Shared<Sp> sh;
  Regs<Sp::K> regs;
  Exec<Regs<Sp::K>, NT> ex{&regs};
  block_program<Sp>(ex, sh, a, int64_t(blockIdx.x));
}

template <class Sp>
static cudaError_t launch_one(const Args& a, cudaStream_t stream) {
  reduce_kernel<Sp><<<unsigned(a.n_items), NT, 0, stream>>>(a);
  return cudaGetLastError();
}

std::string cuda_launch(int kind, const Args& a, int device, uint64_t stream) {
  // Our cudart is linked statically: its current device is not torch's, so set it from the tensors' device.
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return std::string("cudaSetDevice: ") + cudaGetErrorString(err);
  const auto s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  if (!dispatch_kind(kind, [&](auto sp) { err = launch_one<decltype(sp)>(a, s); })) return "unknown kind";
  return err == cudaSuccess ? std::string() : std::string("kernel launch: ") + cudaGetErrorString(err);
}

std::string cuda_device_info() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) return std::string("error: ") + cudaGetErrorString(err);
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  return "devices=" + std::to_string(n) + " runtime=" + std::to_string(rt) + " driver=" + std::to_string(drv);
}

}  // namespace fo
