#pragma once

// Products of a float64 matrix of kSketchRows rows (a sketch: a few fixed
// combinations of a weight's columns) with a float32 matrix, in float64:
// what the fast RegMean mode's check multiplies by every weight and Gram.
// On the CPU the float32 matrix is read once, as it lies (mapped), with no
// float64 copy of it; each output element is summed in one order whatever
// the threads (so the check, which decides a fallback, does not depend on
// them). Elsewhere the float32 matrix is converted and multiplied.

#include <ATen/ATen.h>

#include <cstdint>

namespace amalgam::core {

inline constexpr int64_t kSketchRows = 4;

// s m: s [kSketchRows, r] float64, m [r, c] float32; [kSketchRows, c].
at::Tensor SketchTimes(const at::Tensor& s, const at::Tensor& m);

// s m^T: s [kSketchRows, c] float64, m [r, c] float32; [kSketchRows, r].
at::Tensor SketchTimesTransposed(const at::Tensor& s, const at::Tensor& m);

}  // namespace amalgam::core
