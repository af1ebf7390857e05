// Helpers of the torch glue files (csrc/<family>.cpp): error messages built from plain strings.
// NOTE: streaming sizes() into TORCH_CHECK segfaulted on the GPU machine's torch (2.11+cu130,
// g++ 13.3), so shapes and numbers are formatted here first.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "reasonrl.h"

namespace reasonrl {
namespace glue {

// "(2, 3)", "(5,)"
inline std::string shape(c10::IntArrayRef a) {
  std::string s = "(";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + (a.size() == 1 ? ",)" : ")");
}

inline std::string num(int64_t v) { return std::to_string(v); }

// "1e-39" (std::to_string would print "0.000000")
inline std::string real(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

// reasonrl.ops.logprobs.MIN_TEMPERATURE: below about 1e-38, 1 / temperature is inf in float32 and
// every log-prob NaN; 1e-5 keeps logits / temperature finite for any realistic logits.
constexpr double kMinTemperature = 1e-5;

inline std::string dt_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

// The kernels' element-type code of a float32 / bfloat16 / float16 tensor; other dtypes raise,
// naming the op and the argument.
inline DType dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", dt_name(t));
  }
  return DType::f32;
}

}  // namespace glue
}  // namespace reasonrl
