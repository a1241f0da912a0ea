#include "core/statistics.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace amalgam::core {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Whether element `i` of a floating tensor's `data` is below zero.
bool IsNegative(const uint8_t* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16: {
      uint16_t bits;
      std::memcpy(&bits, data + 2 * i, 2);
      return (bits & 0x8000) && (bits & 0x7fff);
    }
    case DType::kF32: {
      float v;
      std::memcpy(&v, data + 4 * i, 4);
      return v < 0;
    }
    case DType::kF64: {
      double v;
      std::memcpy(&v, data + 8 * i, 8);
      return v < 0;
    }
  }
  return false;
}

// First negative element of a floating tensor, or -1; every `stride`-th
// element from the first (stride n+1 walks an n x n matrix's diagonal).
int64_t FirstNegative(const SafetensorsReader& reader, const TensorInfo& t,
                      int64_t stride = 1) {
  const uint8_t* data = reader.Data(t).data();
  for (int64_t i = 0; i < t.numel; i += stride) {
    if (IsNegative(data, t.dtype, i)) return i;
  }
  return -1;
}

// The aliases of a Gram file's metadata: weight -> the tensor named.
std::map<std::string, std::string> GramAliases(const SafetensorsReader& gram) {
  std::map<std::string, std::string> aliases;
  for (const auto& [key, value] : gram.metadata()) {
    if (absl::StartsWith(key, kGramAliasPrefix)) {
      aliases[key.substr(kGramAliasPrefix.size())] = value;
    }
  }
  return aliases;
}

// With `weights`: FAILED_PRECONDITION unless `name` is a 2-D weight [out,
// in] whose Gram `g` ([in, in]) can be.
absl::Status CheckGramFitsWeight(const SafetensorsReader& weights,
                                 const std::string& name, const TensorInfo& g) {
  const TensorInfo* w = weights.Find(name);
  if (w == nullptr || w->shape.size() != 2) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Gram \"", name, "\" names no 2-D weight of the described model"));
  }
  if (w->shape[1] != g.shape[0]) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Gram for tensor \"", name, "\" has shape ", ShapeString(g.shape),
        " but the weight ", ShapeString(w->shape), " needs [", w->shape[1],
        ", ", w->shape[1], "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckGramAliases(const SafetensorsReader& gram) {
  for (const auto& [name, target] : GramAliases(gram)) {
    const std::string key = absl::StrCat(kGramAliasPrefix, name);
    if (name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram alias \"", key, "\" names no weight (expected \"",
                       kGramAliasPrefix, "<weight>\")"));
    }
    if (gram.Find(name) != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram \"", name,
                       "\" is both a tensor of the file and "
                       "an alias (metadata \"",
                       key, "\")"));
    }
    if (gram.Find(target) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram alias \"", key, "\" names \"", target,
                       "\", which is not a tensor of the file"));
    }
  }
  return absl::OkStatus();
}

const TensorInfo* FindGram(const SafetensorsReader& gram,
                           absl::string_view name) {
  if (const TensorInfo* own = gram.Find(name)) return own;
  const auto it = gram.metadata().find(absl::StrCat(kGramAliasPrefix, name));
  return it == gram.metadata().end() ? nullptr : gram.Find(it->second);
}

std::vector<std::string> GramNames(const SafetensorsReader& gram) {
  std::vector<std::string> names;
  for (const TensorInfo& t : gram.tensors()) names.push_back(t.name);
  for (const auto& [name, target] : GramAliases(gram)) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

std::map<std::string, std::string> IdenticalTensors(
    const SafetensorsReader& reader) {
  // By dtype and shape, in name order (tensors() is sorted).
  std::map<std::pair<DType, std::vector<int64_t>>,
           std::vector<const TensorInfo*>>
      kinds;
  for (const TensorInfo& t : reader.tensors()) {
    kinds[{t.dtype, t.shape}].push_back(&t);
  }
  std::map<std::string, std::string> identical;
  for (const auto& [kind, tensors] : kinds) {
    if (tensors.size() < 2) continue;
    std::map<std::string, std::string> first_by_digest;
    for (const TensorInfo* t : tensors) {
      Sha256 hash;
      const absl::Span<const uint8_t> bytes = reader.Data(*t);
      hash.Update(bytes.data(), bytes.size());
      reader.Release(t->name);
      const auto [it, inserted] =
          first_by_digest.emplace(hash.HexDigest(), t->name);
      if (!inserted) identical[t->name] = it->second;
    }
  }
  return identical;
}

absl::Status ValidateWeights(const SafetensorsReader& weights) {
  return CheckAllFinite(weights);
}

absl::Status ValidateGram(const SafetensorsReader& gram,
                          const SafetensorsReader* weights) {
  const auto& metadata = gram.metadata();
  if (auto it = metadata.find("reduction");
      it != metadata.end() && it->second != "sum" && it->second != "mean") {
    return absl::InvalidArgumentError(
        absl::StrCat("Gram metadata reduction is \"", it->second,
                     "\"; expected \"sum\" or \"mean\""));
  }
  if (auto it = metadata.find("num_examples"); it != metadata.end()) {
    int64_t rows = 0;
    if (!absl::SimpleAtoi(it->second, &rows) || rows <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram metadata num_examples is \"", it->second,
                       "\"; expected a positive integer"));
    }
  }
  for (const TensorInfo& t : gram.tensors()) {
    if (t.shape.size() != 2 || t.shape[0] != t.shape[1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram \"", t.name, "\" has shape ", ShapeString(t.shape),
                       "; a Gram must be square"));
    }
    // Diagonal entries are sums of squares: a negative one is no Gram (and
    // would read as a dead feature).
    if (const int64_t i = FirstNegative(gram, t, t.shape[0] + 1); i >= 0) {
      const int64_t row = i / (t.shape[0] + 1);
      return absl::InvalidArgumentError(absl::StrCat(
          "Gram \"", t.name, "\" has a negative diagonal entry at [", row, ", ",
          row, "]; a Gram's diagonal is a sum of squares"));
    }
    if (weights != nullptr) {
      AMALGAM_RETURN_IF_ERROR(CheckGramFitsWeight(*weights, t.name, t));
    }
  }
  AMALGAM_RETURN_IF_ERROR(CheckGramAliases(gram));
  if (weights != nullptr) {
    for (const auto& [name, target] : GramAliases(gram)) {
      AMALGAM_RETURN_IF_ERROR(
          CheckGramFitsWeight(*weights, name, *gram.Find(target)));
    }
  }
  return CheckAllFinite(gram);
}

absl::Status ValidateFisher(const SafetensorsReader& fisher,
                            const SafetensorsReader* weights) {
  AMALGAM_RETURN_IF_ERROR(CheckAllFinite(fisher));
  for (const TensorInfo& t : fisher.tensors()) {
    if (const int64_t i = FirstNegative(fisher, t); i >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Fisher \"", t.name, "\" is negative at element ", i));
    }
    if (weights == nullptr) continue;
    const TensorInfo* w = weights->Find(t.name);
    if (w == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Fisher \"", t.name, "\" names no tensor of the described model"));
    }
    if (w->shape != t.shape) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Fisher for tensor \"", t.name, "\" has shape ", ShapeString(t.shape),
          " but the weight has ", ShapeString(w->shape)));
    }
  }
  return absl::OkStatus();
}

}  // namespace amalgam::core
