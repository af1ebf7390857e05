// Helpers of the torch glue files (csrc/<family>.cpp): error messages built from plain strings.
// NOTE: streaming sizes() into TORCH_CHECK segfaulted on the GPU machine's torch (2.11+cu130,
// g++ 13.3), so shapes and numbers are formatted here first.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace reasonrl {
namespace glue {

// "(2, 3)", "(5,)"
inline std::string shape(c10::IntArrayRef a) {
  std::string s = "(";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + (a.size() == 1 ? ",)" : ")");
}

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string dt_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

}  // namespace glue
}  // namespace reasonrl
