// The fiber scheduler behind cuda_emulation.h, and the few CUDA runtime calls the launchers make.
#include "cuda_emulation.h"

#include <ucontext.h>

#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace ff_emulation {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarpSize = 32;

enum class State { kRunnable, kAtSyncthreads, kAtShuffle, kDone };

struct Block {
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<State> states;
  std::vector<uint64_t> slots;
  int current = -1;
};

Block* running = nullptr;
std::vector<char> stacks;  // kStackBytes per thread, reused by every block
std::string last_error;

constexpr int kDevices = 8;  // tests/emulated_cuda.py's EmulatedCuda.set_device checks the same

struct DeviceTable {
  int current = 0;
  int sm_count[kDevices] = {1, 1, 1, 1, 1, 1, 1, 1};
};
DeviceTable devices;

void fiber_main() {
  running->body(running->arg);
  running->states[running->current] = State::kDone;
}  // returns to uc_link: the scheduler

void wait(State state) {
  Block* b = running;
  b->states[b->current] = state;
  swapcontext(&b->contexts[b->current], &b->scheduler);
}

// Lets the waiting threads of block `block` go on; false (and the error set) when none can.
bool release(Block& b, unsigned block) {
  const int n = static_cast<int>(b.states.size());
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = w0 + kWarpSize < n ? w0 + kWarpSize : n;
    int waiting = 0, done = 0;
    for (int t = w0; t < w1; ++t) {
      waiting += b.states[t] == State::kAtShuffle;
      done += b.states[t] == State::kDone;
    }
    if (waiting == 0) continue;
    if (done > 0) {
      last_error = "block " + std::to_string(block) + ", warp " + std::to_string(w0 / kWarpSize) +
                   ": a full-warp shuffle while lanes of the warp have exited";
      return false;
    }
    if (waiting == w1 - w0) {
      for (int t = w0; t < w1; ++t) b.states[t] = State::kRunnable;
      released = true;
    }
  }
  if (released) return true;
  int at_sync = 0, alive = 0;
  for (State s : b.states) {
    at_sync += s == State::kAtSyncthreads;
    alive += s != State::kDone;
  }
  if (at_sync > 0 && at_sync == alive) {
    for (State& s : b.states) {
      if (s == State::kAtSyncthreads) s = State::kRunnable;
    }
    return true;
  }
  last_error = "block " + std::to_string(block) +
               ": threads wait at barriers that can never complete (divergent __syncthreads or "
               "shuffles)";
  return false;
}

}  // namespace

int current_thread() { return running->current; }

uint64_t* shuffle_slot(int thread) { return &running->slots[thread]; }

void warp_barrier(unsigned mask) {
  if (mask != 0xffffffffu) {
    last_error = "only full-warp shuffles are emulated";
  }
  wait(State::kAtShuffle);
}

void block_barrier() { wait(State::kAtSyncthreads); }

void fail_thread(const std::string& why) {
  if (last_error.empty()) {
    last_error = "block " + std::to_string(blockIdx.x) + ", thread " +
                 std::to_string(threadIdx.x) + ": " + why;
  }
  wait(State::kDone);  // never resumed: the scheduler stops at the error
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  if (!last_error.empty()) return;  // an earlier launch of this op failed: the op fails
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x == 0) {
    last_error = "only 1-D launches are emulated";
    return;
  }
  const int n = static_cast<int>(block.x);
  Block b;
  b.body = body;
  b.arg = arg;
  b.contexts.resize(n);
  b.states.resize(n);
  b.slots.resize(n);
  if (stacks.size() < n * kStackBytes) stacks.resize(n * kStackBytes);
  running = &b;
  gridDim = grid;
  blockDim = block;
  for (unsigned bx = 0; bx < grid.x && last_error.empty(); ++bx) {
    blockIdx = uint3{bx, 0, 0};
    for (int t = 0; t < n; ++t) {
      ucontext_t& c = b.contexts[t];
      getcontext(&c);
      c.uc_stack.ss_sp = &stacks[t * kStackBytes];
      c.uc_stack.ss_size = kStackBytes;
      c.uc_link = &b.scheduler;
      makecontext(&c, fiber_main, 0);
      b.states[t] = State::kRunnable;
    }
    for (;;) {
      bool all_done = true;
      for (int t = 0; t < n; ++t) {
        if (b.states[t] != State::kRunnable) continue;
        b.current = t;
        threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
        swapcontext(&b.scheduler, &b.contexts[t]);
      }
      for (State s : b.states) all_done = all_done && s == State::kDone;
      if (all_done || !last_error.empty() || !release(b, bx)) break;
    }
  }
  running = nullptr;
}

const char* error() { return last_error.c_str(); }
void clear_error() { last_error.clear(); }

void set_device(int device, int sm_count) {
  devices.current = device;
  devices.sm_count[device] = sm_count;
}

}  // namespace ff_emulation

void __syncthreads() { ff_emulation::block_barrier(); }

// The kernels are compiled with -fsanitize=alignment (and linked without its runtime): a load or
// store through a pointer misaligned for its type, such as a 16-byte vector access where the
// launcher wrongly took the vector path, lands here instead of faulting. The thread stops and
// the launch fails, naming the access.
struct UbsanSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeMismatchData {
  UbsanSourceLocation location;
  const void* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};

extern "C" void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatchData* data, uintptr_t pointer) {
  ff_emulation::fail_thread(std::string("misaligned access at ") + data->location.file + ":" +
                            std::to_string(data->location.line) + ": address " +
                            std::to_string(pointer) + " is not a multiple of " +
                            std::to_string(1u << data->log_alignment) + " bytes");
}

// The CUDA runtime calls of csrc/cuda/elementwise.cuh (declared by cuda_runtime_api.h).
cudaError_t cudaGetDevice(int* device) {
  *device = ff_emulation::devices.current;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device < 0 ||
      device >= ff_emulation::kDevices) {
    return cudaErrorInvalidValue;
  }
  *value = ff_emulation::devices.sm_count[device];
  return cudaSuccess;
}
