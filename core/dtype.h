#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace amalgam::core {

// Element types the service reads and writes (safetensors names in comments).
enum class DType {
  kF16,   // "F16"
  kBF16,  // "BF16"
  kF32,   // "F32"
  kF64,   // "F64"
};

// Parses a safetensors dtype string; INVALID_ARGUMENT names an unknown one.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// The safetensors name of `dtype` ("F32", ...).
const char* DTypeName(DType dtype);

// Bytes per element.
size_t DTypeSize(DType dtype);

}  // namespace amalgam::core
