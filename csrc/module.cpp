// The extension module opt_fast._C carries no Python bindings: importing it loads the shared library,
// whose static TORCH_LIBRARY_IMPL registrars attach the kernels to the schemas defined in
// opt_fast/_ops.py. Written against the limited API so one abi3 build serves every CPython >= 3.10.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
