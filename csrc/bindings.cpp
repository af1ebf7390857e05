// The Python module reasonrl._C. Ops register themselves with TORCH_LIBRARY_FRAGMENT(reasonrl, m)
// in their family's glue file (csrc/<family>.cpp) and are called as torch.ops.reasonrl.<op>, which
// lets torch.compile and torch.library.opcheck see them. This file only makes the module importable.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "reasonrl compiled kernels (C++ CPU, and CUDA where built)";
  m.def("built_with_cuda", []() {
#ifdef REASONRL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
