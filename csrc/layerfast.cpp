// The schema file: every op of the `layerfast` library is declared here, once.
// Kernels register themselves next to their code (csrc/cpu/<op>_kernel.cpp, csrc/cuda/<op>_kernel.cu).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import layerfast._C` only has to load this library so its static registrations run; the
// module itself is empty. Plain Python.h keeps pybind11 (and its compile time) out of the build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(layerfast, m) {
  // Exchange the contents of a[i] and b[i] for every i, in place. Same shapes, dtypes, devices.
  m.def("swap_(Tensor(a!)[] a, Tensor(b!)[] b) -> ()");
}
