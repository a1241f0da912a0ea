#pragma once

// LibTorch helpers shared by the core translation units that use it (merge,
// grow). Internal to core: nothing above core includes torch headers.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <exception>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/safetensors.h"

namespace amalgam::core {

// RESOURCE_EXHAUSTED for out-of-memory errors, INTERNAL otherwise.
absl::Status FromTorchError(const c10::Error& e, absl::string_view context);

// Runs `f` (returning absl::Status or absl::StatusOr<T>) and turns any
// exception into a status: no exception leaves core.
template <typename F>
auto GuardTorch(absl::string_view context, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    return FromTorchError(e, context);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what()));
  }
}

at::ScalarType ScalarTypeOf(DType dtype);

// A read-only view of a tensor's bytes, converted to `compute` on `device`.
// The result may alias the mapped file: callers never write into it.
at::Tensor Load(const SafetensorsReader& reader, const TensorInfo& info,
                at::ScalarType compute, const at::Device& device);

}  // namespace amalgam::core
