#include "core/torch_util.h"

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/match.h"

namespace amalgam::core {

absl::Status FromTorchError(const c10::Error& e, absl::string_view context) {
  std::string message(e.what_without_backtrace());
  std::string text = absl::StrCat(context, ": ", message);
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr ||
      absl::StrContains(message, "out of memory") ||
      absl::StrContains(message, "can't allocate memory")) {
    return absl::ResourceExhaustedError(text);
  }
  return absl::InternalError(text);
}

at::ScalarType ScalarTypeOf(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return at::kHalf;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kF32:
      return at::kFloat;
    case DType::kF64:
      return at::kDouble;
  }
  return at::kFloat;
}

at::Tensor Load(const SafetensorsReader& reader, const TensorInfo& info,
                at::ScalarType compute, const at::Device& device) {
  const at::ScalarType stored = ScalarTypeOf(info.dtype);
  if (info.numel == 0) {
    return at::empty(info.shape,
                     at::TensorOptions().dtype(compute).device(device));
  }
  absl::Span<const uint8_t> bytes = reader.Data(info);
  TORCH_CHECK(bytes.size() == info.nbytes, "tensor \"", info.name, "\" has ",
              bytes.size(), " bytes, expected ", info.nbytes);
  if (device.is_cuda()) {
    // Through page-locked memory (LibTorch's caching host allocator keeps it
    // for the next tensor), so the copy to the device is asynchronous and
    // overlaps the device's work on the tensors before; the conversion to
    // the compute type runs on the device.
    at::Tensor staging = at::empty(
        info.shape, at::TensorOptions().dtype(stored).pinned_memory(true));
    std::memcpy(staging.data_ptr(), bytes.data(), bytes.size());
    return staging.to(device, stored, /*non_blocking=*/true).to(compute);
  }
  at::Tensor t;
  const auto address = reinterpret_cast<uintptr_t>(bytes.data());
  if (address % DTypeSize(info.dtype) != 0) {
    // Misaligned in the file: copy into an aligned buffer.
    t = at::empty(info.shape, at::TensorOptions().dtype(stored));
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  } else {
    t = at::from_blob(const_cast<uint8_t*>(bytes.data()), info.shape,
                      at::TensorOptions().dtype(stored));
  }
  return t.to(device, compute);
}

}  // namespace amalgam::core
