#pragma once

#include "absl/status/status.h"
#include "core/safetensors.h"

namespace amalgam::core {

// Upload-time checks of an artifact's content, by kind. Each returns
// INVALID_ARGUMENT naming the offending tensor or metadata key, or
// FAILED_PRECONDITION when statistics do not fit the weights they describe
// (`weights` may be null when the upload names none).

// Every value finite.
absl::Status ValidateWeights(const SafetensorsReader& weights);

// Every tensor a square 2-D matrix of finite values; `__metadata__`
// `reduction` absent, "sum" or "mean"; `num_examples`, if present, a positive
// integer. With `weights`: each Gram names a 2-D weight [out, in] and is
// [in, in].
absl::Status ValidateGram(const SafetensorsReader& gram,
                          const SafetensorsReader* weights);

// Every value finite and non-negative. With `weights`: each tensor names a
// weight of the same shape.
absl::Status ValidateFisher(const SafetensorsReader& fisher,
                            const SafetensorsReader* weights);

}  // namespace amalgam::core
