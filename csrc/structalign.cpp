// Module entry point of structalign._C. Each op declares its own schema with TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp and registers one implementation per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu;
// loading this .so runs those static registrations. There are no Python bindings: Python reaches every op
// through torch.ops.structalign.<op>.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
