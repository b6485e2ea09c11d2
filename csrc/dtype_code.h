// The storage dtype of a kernel operand as every kernel takes it: one code for the CPU kernels
// (cpu/kernels.h), the CUDA launchers (cuda/launchers.h) and the CUDA emulation's C API (whose
// Python side, tests/emulated_cuda.py, passes these integers). Torch-free, so the launchers and
// the emulation compile without torch; op_args.h maps at::ScalarType to it (dtype_code).
#pragma once

namespace flatfused {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace flatfused
