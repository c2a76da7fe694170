// Schema of scene3d::token_gate (declared once, here) and the Python module stub of `scene3d._C`.
//
// Kernels: ops/token_gate_cpu.cpp (CPU) and ops/token_gate.cu (CUDA), registered with TORCH_LIBRARY_IMPL.
// Python adds register_fake / register_autograd in scene3d/gating/op.py. Other ops of the `scene3d`
// namespace must use TORCH_LIBRARY_FRAGMENT(scene3d, m): TORCH_LIBRARY may appear only once per namespace.
#include <Python.h>
#include <torch/library.h>

#include "token_gate.h"

TORCH_LIBRARY(scene3d, m) {
  m.def(
      "token_gate(Tensor tokens, Tensor scores, Tensor offset, float keep_ratio, int min_keep, float threshold)"
      " -> (Tensor gated, Tensor kept_index, Tensor new_offset)");
  m.def(
      "token_gate_backward(Tensor grad_gated, Tensor tokens, Tensor scores, Tensor kept_index)"
      " -> (Tensor grad_tokens, Tensor grad_scores)");
}

// `import scene3d._C` loads this shared library, which runs the registrations above; the module itself is
// empty (ops are reached through torch.ops.scene3d). A bare PyInit avoids pulling pybind11 in for nothing.
// There must be exactly one PyInit__C among the sources of scene3d._C.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "Native ops of scene3d (see torch.ops.scene3d).", -1, nullptr};
  return PyModule_Create(&module_def);
}
