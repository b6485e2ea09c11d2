// The registration of flatfused's op schemas (flatfused/op_schemas.def), and the Python module
// flatfused._C whose import loads this library: the TORCH_LIBRARY block and the backends'
// TORCH_LIBRARY_IMPL blocks (csrc/cpu/register.cpp, csrc/cuda/) register at load time.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(flatfused, m) {
#define FLATFUSED_OP(schema) m.def(schema);
#include "../flatfused/op_schemas.def"
#undef FLATFUSED_OP
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
