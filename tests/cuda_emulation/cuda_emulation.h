// A host emulation of the CUDA execution model, just enough to run flatfused's CUDA kernels
// (csrc/cuda/*.cu, unchanged) on the CPU: tests/backends/test_cuda_emulated.py checks them against the
// torch specification without a GPU. Force-included (g++ -include) before each .cu file, which is
// compiled as C++ (tests/emulated_cuda.py builds it).
//
// - A launch, FF_LAUNCH(grid, block, stream, kernel)(args...), runs the blocks one after another
//   and each block's threads as fibers of the host thread (emulation.cpp). A fiber runs until it
//   finishes or waits at a barrier: __syncthreads() (the block) or a warp shuffle (its warp). A
//   warp goes on when all its running lanes wait at its shuffle, the block when all its running
//   threads wait at __syncthreads(); a block whose threads can go on no more is reported as an
//   error of the kernel, and so is a full-mask shuffle in a warp with exited lanes.
// - The kernels are compiled with -fsanitize=alignment: an access misaligned for its type (a
//   vector load or store the alignment checks should have ruled out) stops the thread and fails
//   the launch with the source line, where a GPU would fault.
// - threadIdx, blockIdx, blockDim and gridDim are the running fiber's; __shared__ variables are
//   static (one block runs at a time).
// - Device memory is host memory: the launchers get CPU tensors' pointers.
// - cudaGetDevice and cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) answer from a table
//   the tests set, so a small SM count brings the grid cap, and the grid-stride loops beyond it,
//   within small sizes.
//
// Not emulated: the GPU's math library (logf, sinf, cosf are glibc's here), nvcc's contraction of
// a*b+c into FMA (compiled here with -ffp-contract=off), the memory model and timing, and nvcc's
// code generation (tests/backends/test_cuda_sass.py reads the real machine code).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace ff_emulation {

// Runs body(arg) as every thread of a 1-D grid of 1-D blocks; on a kernel error, records it
// (error()) and stops.
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* arg);

// The running thread's index in its block; its 8-byte slot for warp shuffles.
int current_thread();
uint64_t* shuffle_slot(int thread);
// Wait until every running lane of the current warp waits at a shuffle (warp_barrier), or every
// running thread of the block at __syncthreads() (block_barrier).
void warp_barrier(unsigned mask);
void block_barrier();
// Stop the current thread with an error of the kernel (the launch fails with it).
void fail_thread(const std::string& why);

// A launch configuration applied to the kernel's arguments, copied as a launch copies them.
template <typename... Params>
struct Launch {
  dim3 grid, block;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Call {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(grid, block,
             [](void* p) {
               Call* c = static_cast<Call*>(p);
               std::apply(c->kernel, c->params);
             },
             &call);
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return Launch<Params...>{grid, block, kernel};
}

}  // namespace ff_emulation

#define FF_LAUNCH(grid, block, stream, ...) \
  ((void)(stream), ::ff_emulation::launch((grid), (block), __VA_ARGS__))

void __syncthreads();

// __shfl_down_sync over a full warp: lane l gets lane l + delta's value (its own beyond the warp).
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "8-byte shuffles at most");
  const int t = ff_emulation::current_thread();
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  *ff_emulation::shuffle_slot(t) = bits;
  ff_emulation::warp_barrier(mask);  // every lane has written its slot
  T result = value;
  const int lane = t % 32;
  if (lane % width + static_cast<int>(delta) < width) {
    memcpy(&result, ff_emulation::shuffle_slot(t + static_cast<int>(delta)), sizeof(T));
  }
  ff_emulation::warp_barrier(mask);  // every lane has read before any slot is written again
  return result;
}
