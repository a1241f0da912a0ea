#pragma once

// Fusion growth (Deep Fusion): from models A and B of the same layout (or A
// alone: self-fusion), a model whose hidden widths are A's plus B's. Each
// tensor has a role that says how A's and B's versions combine; the roles
// come from a layout (`mlp`, `bert`, `gpt2`) or from user rules.

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/model_writer.h"
#include "core/safetensors.h"

namespace amalgam::core {

// How one tensor of the grown model is made, for weights in Linear
// orientation ([out, in]; Conv1D weights are transposed around it).
enum class GrowRole {
  kInput,      // first layer: rows concatenate, [W_A; W_B] (inputs equal)
  kHidden,     // block diagonal [[W_A, 0], [0, W_B]]
  kOutput,     // last layer: columns concatenate, [W_A/2, W_B/2]
  kConcat,     // concatenate along the first axis (biases)
  kNorm,       // LayerNorm parameters: concatenate (not function-preserving)
  kAverage,    // (A + B) / 2 (the last layer's bias)
  kEmbedding,  // concatenate along the last axis (feature width)
  kQkv,        // packed q, k, v (3 blocks of rows), each block diagonal
  kQkvBias,    // packed q, k, v biases, each block concatenated
  kCopy,       // A's tensor unchanged (buffers such as attention masks)
};

struct GrowOptions {
  // "mlp", "bert", "gpt2" or "rules".
  std::string layout;
  // For "rules": lines `REGEX ROLE [conv1d]`; ROLE is one of input, hidden,
  // output, concat, norm, average, embedding, qkv, qkv_bias, copy; the first
  // rule whose RE2 pattern fully matches a tensor name applies; `#` starts a
  // comment.
  std::string rules;
  // Standard deviation of noise in the off-diagonal blocks (0: zeros, which
  // keeps the function exactly). Deterministic per tensor name.
  double noise_scale = 0.0;
  std::string device = "cpu";
  // The dtype of the grown tensors; unset: each input tensor's own.
  std::optional<DType> out_dtype;
  // Largest shard of the result, in bytes of tensor data (see ModelWriter).
  uint64_t shard_bytes = kDefaultShardBytes;
  // The shard written alone (from 0), as MergeOptions::shard.
  int shard = kEveryShard;
};

struct GrowTensor {
  TensorInfo info;  // name, shape of the output and the inputs' dtype
  GrowRole role = GrowRole::kCopy;
  bool conv1d = false;  // weight stored [in, out]
  // The dtype written (GrowOptions::out_dtype, else info's) and its bytes.
  DType out_dtype = DType::kF32;
  uint64_t out_nbytes = 0;
};

// The validated recipe of a growth.
struct GrowPlan {
  std::vector<GrowTensor> tensors;
  // {"layout", "self_fusion", "noise_scale", "config": {...},
  //  "properties": {...}, "caveats": [...]}: the grown model's config
  // (widths, head counts) and which properties hold exactly.
  std::string report_json;
  uint64_t output_bytes = 0;
};

// The tensors the growth writes, in order (name, output dtype, shape).
std::vector<TensorSpec> TensorSpecs(const GrowPlan& plan);

// Validates the growth without reading tensor data. `b` may be null
// (self-fusion). INVALID_ARGUMENT for an unknown layout or bad rules, or a
// tensor that fits no rule of the layout (naming the first);
// FAILED_PRECONDITION when A and B differ where the layout needs them equal
// (naming the tensor).
absl::StatusOr<GrowPlan> PlanGrow(const SafetensorsReader& a,
                                  const SafetensorsReader* b,
                                  const GrowOptions& options);

// The keys of the grown model's config.json, as a JSON object, for the
// bert and gpt2 layouts (empty for the others): the widths (hidden_size or
// n_embd, intermediate_size or n_inner), the layer count, and the heads
// (from the weights' metadata, else A's plus B's from their config.json
// texts `config_a` and `config_b`, where both are given).
// INVALID_ARGUMENT when a config is malformed.
absl::StatusOr<std::string> GrownConfigKeys(const GrowPlan& plan,
                                            const std::string& config_a,
                                            const std::string& config_b);

// Writes the grown model into the model directory `out_dir`, a tensor at a
// time, sharded by `options.shard_bytes`; the report goes into each shard's
// metadata as `amalgam.grow.report` (`options.shard` set: that shard
// alone, bitwise as in the whole model). `progress` gets
// tensors done and total. CANCELLED when `cancelled` becomes true.
absl::Status ExecuteGrow(
    const GrowPlan& plan, const SafetensorsReader& a,
    const SafetensorsReader* b, const GrowOptions& options,
    const std::string& out_dir,
    const std::function<void(int64_t done, int64_t total)>& progress,
    const std::atomic<bool>* cancelled);

}  // namespace amalgam::core
