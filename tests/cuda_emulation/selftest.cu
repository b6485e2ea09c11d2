// Kernels that check the emulation itself (tests/backends/test_cuda_emulated.py, "the emulation"): a
// correct block reduction, and the kernel errors it must report instead of computing on.
#include <stdint.h>

namespace {

// out[b] = the sum of block b's blockDim.x elements of in: warp shuffles, then warp 0 over the
// warps' sums.
__global__ void block_sum_kernel(const double* in, double* out) {
  __shared__ double warp_sums[32];
  double v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Lane 3 exits before the others shuffle.
__global__ void exited_lane_kernel(double* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0, 1);
}

// Half of warp 0 shuffles while the other half waits at __syncthreads: neither completes.
__global__ void divergent_barriers_kernel(double* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0, 1);
  } else {
    __syncthreads();
  }
}

// A 16-byte load from an address that is not a multiple of 16.
__global__ void misaligned_kernel(const float* in, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(in + 1);
  out[threadIdx.x] = static_cast<float>(v.x);
}

}  // namespace

extern "C" {

const char* ffe_error();
void ffe_clear_error();

// 0 when the launch ran clean, -1 with ffe_error() set when the emulation stopped it.
int ffe_selftest(int which, const void* in, void* out, int threads, int blocks) {
  ffe_clear_error();
  switch (which) {
    case 0:
      FF_LAUNCH(blocks, threads, nullptr, block_sum_kernel)(static_cast<const double*>(in),
                                                            static_cast<double*>(out));
      break;
    case 1:
      FF_LAUNCH(blocks, threads, nullptr, exited_lane_kernel)(static_cast<double*>(out));
      break;
    case 2:
      FF_LAUNCH(blocks, threads, nullptr, divergent_barriers_kernel)(static_cast<double*>(out));
      break;
    default:
      FF_LAUNCH(blocks, threads, nullptr, misaligned_kernel)(static_cast<const float*>(in),
                                                             static_cast<float*>(out));
  }
  return ffe_error()[0] == '\0' ? 0 : -1;
}

}  // extern "C"
