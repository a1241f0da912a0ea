#pragma once

// The layout of a Hugging Face model directory: which files it may hold and
// how its tensors are split over them.

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/dtype.h"

namespace amalgam::core {

inline constexpr char kIndexFileName[] = "model.safetensors.index.json";
inline constexpr char kSingleFileName[] = "model.safetensors";

// The files besides the tensors that a model directory may hold: the
// configuration, the tokenizer's and the preprocessor's files, in the
// Hugging Face layout.
const std::vector<std::string>& SideFileNames();
bool IsSideFile(absl::string_view name);

// How a model directory's files divide.
struct ModelLayout {
  // The index when there is one, else the one .safetensors file.
  std::string entry;
  // The .safetensors files, sorted (the shards where there is an index).
  std::vector<std::string> tensor_files;
  // Side files, sorted.
  std::vector<std::string> side_files;
};

// Checks the file names of a model directory: plain file names (no
// directory part, no control character, at most 256 bytes), each once;
// each a .safetensors file, the index or a side file; one .safetensors file
// unless there is an index. INVALID_ARGUMENT naming the file otherwise.
absl::StatusOr<ModelLayout> CheckModelFiles(
    const std::vector<std::string>& names);

// The name of shard `index` (from 0) of `count`, as the Hub names them:
// model-00001-of-00003.safetensors.
std::string ShardFileName(int index, int count);

// Largest config.json accepted.
inline constexpr size_t kMaxConfigBytes = size_t{1} << 20;

// OK for a config.json that is a JSON object of at most kMaxConfigBytes
// nesting at most 16 levels; INVALID_ARGUMENT naming config.json otherwise.
absl::Status CheckConfigJson(const std::string& text);

// How config.json's torch_dtype names `dtype`: "float32", "bfloat16", ...
const char* TorchDTypeName(DType dtype);

// The config.json of a result: `config` (an input's) with torch_dtype set to
// `torch_dtype` (unless empty) and each key of the JSON object `overrides`
// set (unless empty); `config` byte for byte where that changes nothing.
// INVALID_ARGUMENT naming config.json when it is not a JSON object.
absl::StatusOr<std::string> ResultConfig(const std::string& config,
                                         absl::string_view torch_dtype,
                                         const std::string& overrides);

}  // namespace amalgam::core
