#pragma once

// Writes a model's tensors into a directory, sharded the way the Hugging
// Face Hub shards them.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/safetensors.h"

namespace amalgam::core {

// The Hub's default largest shard: 5 GB of tensor data.
inline constexpr uint64_t kDefaultShardBytes = 5'000'000'000;

// The shard (from 0) of each tensor, in order: a new shard begins where the
// next tensor would take the current one past `shard_bytes` of tensor data;
// a tensor larger than that is a shard of its own.
std::vector<int> AssignShards(const std::vector<TensorSpec>& tensors,
                              uint64_t shard_bytes);

// What a ModelWriter (or a merge, a growth) writes: every shard, or the one
// numbered (from 0).
inline constexpr int kEveryShard = -1;

// The shards `tensors` take (1 when there are none).
int CountShards(const std::vector<TensorSpec>& tensors, uint64_t shard_bytes);

// The indices, in order, of the tensors in shard `shard` (every tensor for
// kEveryShard).
std::vector<size_t> ShardTensors(const std::vector<TensorSpec>& tensors,
                                 uint64_t shard_bytes, int shard);

// Writes model.safetensors.index.json of the model of `tensors` into `dir`
// (atomically), where they take more than one shard; nothing for one.
absl::Status WriteModelIndex(const std::string& dir,
                             const std::vector<TensorSpec>& tensors,
                             uint64_t shard_bytes);

// Streams tensors, in the order given, into the directory `dir` (created if
// missing): one shard is model.safetensors; several are
// model-0000K-of-0000N.safetensors and model.safetensors.index.json
// ({"metadata": {"total_size": bytes of tensor data}, "weight_map": {tensor:
// shard}}), written last. Every shard carries `metadata`; each file is
// written atomically (see SafetensorsWriter). Not thread-safe.
class ModelWriter {
 public:
  // INVALID_ARGUMENT for a zero `shard_bytes` or duplicate names; INTERNAL
  // when the directory cannot be made.
  static absl::StatusOr<std::unique_ptr<ModelWriter>> Create(
      const std::string& dir, std::vector<TensorSpec> tensors,
      std::map<std::string, std::string> metadata, uint64_t shard_bytes,
      int shard = kEveryShard);

  // Unless finished: removes the files written, and the directory if it
  // made it, so that a cancelled or failed run leaves nothing.
  ~ModelWriter();
  ModelWriter(const ModelWriter&) = delete;
  ModelWriter& operator=(const ModelWriter&) = delete;

  // Appends bytes of the current tensor (a tensor may come in several
  // calls, which may cross into the next shard). FAILED_PRECONDITION past
  // the declared bytes.
  absl::Status Append(absl::Span<const uint8_t> bytes);
  // Finishes the shards and writes the index (one shard: its file);
  // FAILED_PRECONDITION unless exactly the declared bytes were written.
  absl::Status Finish();

  // The files it writes, in the order written (the index last).
  const std::vector<std::string>& files() const { return files_; }

 private:
  ModelWriter() = default;
  // Finishes the current shard while it is full and opens the next, until
  // one has room (or none is left).
  absl::Status Advance();

  std::string dir_;
  std::vector<TensorSpec> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<int> shard_of_;
  // Per shard: its tensors' bytes, and its first tensor.
  std::vector<uint64_t> shard_bytes_;
  std::vector<size_t> first_tensor_;
  uint64_t max_shard_bytes_ = 0;
  // The shard written alone, or kEveryShard.
  int only_ = kEveryShard;
  std::vector<std::string> files_;
  int shard_ = -1;  // the shard being written; -1 before the first
  uint64_t written_in_shard_ = 0;
  std::unique_ptr<SafetensorsWriter> writer_;
  bool made_dir_ = false;
  bool finished_ = false;
};

}  // namespace amalgam::core
