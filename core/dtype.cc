#include "core/dtype.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace amalgam::core {

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "F32") return DType::kF32;
  if (name == "F64") return DType::kF64;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown dtype \"", name, "\" (supported: F16, BF16, F32, F64)"));
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF32:
      return 4;
    case DType::kF64:
      return 8;
  }
  return 0;
}

}  // namespace amalgam::core
