// The extension module opt_fast._C carries no Python bindings: importing it loads the shared library,
// whose static TORCH_LIBRARY_IMPL registrars attach the kernels to the schemas defined in
// opt_fast/_ops.py. Written against the limited API so one abi3 build serves every CPython >= 3.10.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  // Whether this build compiled at::parallel_for's OpenMP body (setup.py's -fopenmp): without it every
  // kernel's at::parallel_for runs serially (tests/test_build_checks.py checks it against torch's backend).
#ifdef _OPENMP
  const long openmp = 1;
#else
  const long openmp = 0;
#endif
  if (m && PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}
