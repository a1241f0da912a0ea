#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
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
// integer; every alias (below) naming a tensor of the file, and no tensor
// itself. With `weights`: each Gram and alias names a 2-D weight [out, in]
// and is [in, in].
absl::Status ValidateGram(const SafetensorsReader& gram,
                          const SafetensorsReader* weights);

// Gram aliases: weights that share their input (a layer's query, key and
// value; gate and up) share one Gram, stored once. `__metadata__` entry
// "alias.<weight>" = <tensor> says that the Gram of <weight> is the file's
// tensor <tensor> (of the first shard's metadata, for a sharded Gram).
inline constexpr absl::string_view kGramAliasPrefix = "alias.";

// Every alias of `gram` names a weight that is no tensor of the file itself,
// and a tensor of the file: INVALID_ARGUMENT naming the alias otherwise.
absl::Status CheckGramAliases(const SafetensorsReader& gram);

// The Gram of weight `name`: its own tensor, else the tensor its alias names;
// nullptr where there is neither (or the alias names no tensor).
const TensorInfo* FindGram(const SafetensorsReader& gram,
                           absl::string_view name);

// The weights `gram` holds a Gram for: its tensors and its aliases, sorted.
std::vector<std::string> GramNames(const SafetensorsReader& gram);

// Tensors whose bytes equal those of another tensor of `reader` (same dtype
// and shape, equal SHA-256 of the bytes): each such tensor's name -> the
// first tensor (by name) of its kind. Only tensors that share their dtype
// and shape with another are hashed.
std::map<std::string, std::string> IdenticalTensors(
    const SafetensorsReader& reader);

// Every value finite and non-negative. With `weights`: each tensor names a
// weight of the same shape.
absl::Status ValidateFisher(const SafetensorsReader& fisher,
                            const SafetensorsReader* weights);

}  // namespace amalgam::core
