// The op schemas of flatfused (docs/kernels.md), and the Python module flatfused._C whose
// import loads this library: the TORCH_LIBRARY block and the backends' TORCH_LIBRARY_IMPL
// blocks (csrc/cpu/register.cpp, csrc/cuda/) register at load time.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(flatfused, m) {
  m.def("philox_bits_(Tensor(a!) out, Tensor rng, int base) -> ()");
  m.def("noise_(Tensor(a!) out, Tensor rng, int base, int dist) -> ()");
  m.def(
      "perturb_(Tensor(a!) w, Tensor(b!) w0, Tensor rng, int base, int dist, float sigma, bool save, "
      "Tensor(c!)? grad=None) -> ()");
  m.def(
      "accumulate_perturb_(Tensor(a!) w, Tensor(b!) w0, Tensor(c!) acc, Tensor(d!) grad, Tensor rng, "
      "int base, int dist, float sigma, bool save, float weight, bool init, bool zero_grad) -> ()");
  m.def("accumulate_(Tensor(a!) acc, Tensor(b!) grad, float weight, bool init, bool zero_grad) -> ()");
  m.def("zero_(Tensor(a!) grad) -> ()");
  m.def("restore_(Tensor(a!) w, Tensor w0, Tensor(b!)? grad, Tensor? src, float scale) -> ()");
  m.def(
      "sgd_step_(Tensor(a!) w, Tensor? w0, Tensor(b!) grad, Tensor? src, Tensor(c!)? momentum_buffer, "
      "float scale, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool first_step, bool write_grad, float grad_weight=0., float sharpness_weight=0.) -> ()");
  m.def(
      "adam_step_(Tensor(a!) w, Tensor? w0, Tensor(b!) grad, Tensor? src, Tensor(c!) exp_avg, "
      "Tensor(d!) exp_avg_sq, float scale, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float step_size, float bias_correction2_sqrt, bool decoupled, bool maximize, "
      "bool write_grad, float grad_weight=0., float sharpness_weight=0.) -> ()");
  m.def("grad_norm_sq_(Tensor(a!) out, Tensor grad, Tensor? w) -> ()");
  m.def(
      "sam_ascent_(Tensor(a!) w, Tensor(b!) w0, Tensor(c!) grad, Tensor(d!)? g0, Tensor norm_sq, float rho, "
      "float eps, bool adaptive, bool zero_grad) -> ()");
}

namespace {

// flatfused._C.cpu_isa() -> str: the instruction set the CPU kernels use ("avx512", "avx2", "generic").
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(flatfused::cpu::current_isa_name()); }

// flatfused._C.set_cpu_isa(name) -> str: lowers the instruction set ("generic", "avx2", "avx512",
// or "auto" for the best one; capped at what the CPU supports); returns the one in use.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyUnicode_FromString(flatfused::cpu::select_isa(name));
}

// flatfused._C.set_cpu_stream_bytes(n) -> int: write-only outputs of arrays of at least n bytes
// use streaming stores (csrc/cpu/stream_store.h); returns the previous threshold.
PyObject* set_cpu_stream_bytes(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(flatfused::cpu::set_stream_bytes(bytes));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the flatfused CPU kernels use."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Select the CPU kernels' instruction set (for tests)."},
    {"set_cpu_stream_bytes", set_cpu_stream_bytes, METH_O,
     "Array size in bytes from which the CPU kernels' write-only outputs use streaming stores; returns the previous one."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flatfused C++/CUDA ops (torch.ops.flatfused)", -1,
                          methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
