#pragma once

#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/dtype.h"

namespace amalgam::core {

// One tensor of a safetensors file (or of a sharded checkpoint).
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Number of elements (product of `shape`; 1 for a scalar).
  int64_t numel = 1;
  // Size of the raw data in bytes (numel * DTypeSize(dtype)).
  uint64_t nbytes = 0;
  // Which file of a sharded checkpoint holds it (0 for a single file).
  int file_index = 0;
  // Offset of the data from the start of that file.
  uint64_t file_offset = 0;
};

// The parsed JSON header of one safetensors file.
struct SafetensorsHeader {
  // In the order of their data offsets.
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

// OK unless `text` nests JSON arrays or objects deeper than `max_depth`
// (brackets inside strings do not count); INVALID_ARGUMENT naming `what`
// otherwise. Run before parsing untrusted JSON, so that no later step (a
// parser, a destructor, a dump) recurses once per level of an attacker's
// nesting. Thread-safe.
absl::Status CheckJsonDepth(absl::string_view text, int max_depth,
                            absl::string_view what);

// Parses the JSON header of a safetensors file whose data section (the bytes
// after the 8-byte length and the header) is `data_size` bytes long.
// `data_start` is the file offset of the data section; it is added to every
// tensor's `file_offset`. INVALID_ARGUMENT (naming the tensor) for malformed
// JSON, unknown dtypes, negative dims, offsets that disagree with the shape,
// overlap or point past the end of the data. Thread-safe.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view json,
                                                         uint64_t data_size,
                                                         uint64_t data_start);

// Reads a safetensors file, or a Hugging Face sharded checkpoint
// (`model.safetensors.index.json` and its shards), through mmap: nothing is
// read until a tensor's bytes are touched. Immutable after Open; thread-safe.
class SafetensorsReader {
 public:
  // `path` is a .safetensors file, a *.index.json file, or a directory that
  // holds `model.safetensors.index.json` or `model.safetensors`.
  // NOT_FOUND if the path does not exist; INVALID_ARGUMENT if the file is
  // truncated or its header is malformed (the message names the file and,
  // where one is at fault, the tensor).
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(
      const std::string& path);
  // Opens a model directory whose files are stored apart: `files` maps each
  // file name of the directory to where its bytes are. The names must pass
  // CheckModelFiles; every shard the index names must be among them, and
  // every .safetensors file must be a shard it names. INVALID_ARGUMENT
  // otherwise, and for what Open refuses; messages name the files, not the
  // paths.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> OpenModel(
      const std::map<std::string, std::string>& files);

  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  // All tensors, sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr if there is no such tensor.
  const TensorInfo* Find(absl::string_view name) const;
  // The `__metadata__` map (of the first shard, for sharded checkpoints).
  const std::map<std::string, std::string>& metadata() const {
    return metadata_;
  }
  // The raw little-endian bytes of `tensor` (which must come from tensors()).
  absl::Span<const uint8_t> Data(const TensorInfo& tensor) const;
  // Drops the mapped pages of tensor `name` from this process's resident set
  // (they stay in the page cache), so a pass over a large file keeps memory
  // bounded. The bytes stay readable. No-op for an unknown name.
  void Release(absl::string_view name) const;
  // Reads tensor `name`'s pages in and maps them (MADV_POPULATE_READ, or
  // read-ahead on kernels without it). Blocking: call it on another thread
  // for the next tensor while working on this one. No-op for an unknown
  // name.
  void Prefetch(absl::string_view name) const;
  // Sum of all tensors' nbytes.
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  struct Mapping;
  // Where the bytes of a shard (named as in the index) are.
  using ShardPath =
      std::function<absl::StatusOr<std::string>(const std::string& shard)>;
  SafetensorsReader() = default;
  // Opens `file`: a .safetensors file, or (`is_index`) an index whose shards
  // are found by `shard_path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> OpenFile(
      const std::string& file, bool is_index, const ShardPath& shard_path);

  std::vector<std::unique_ptr<Mapping>> files_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  uint64_t total_bytes_ = 0;
};

// INVALID_ARGUMENT naming the first tensor (and element index) that holds a
// NaN or an infinity. Reads every byte of the file.
absl::Status CheckAllFinite(const SafetensorsReader& reader);

// What a SafetensorsWriter will write for one tensor.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// Writes a safetensors file as a stream: the header is fixed at creation from
// the list of tensors, then each tensor's bytes are appended in that order.
// The file is written to `path` + ".tmp" and renamed into place by Finish()
// after an fsync, so a crash never leaves a partial file under `path`.
// Writeback to the disk starts while the file is still being written (every
// kWritebackBytes), so the final fsync waits for the last part only.
// Not thread-safe.
class SafetensorsWriter {
 public:
  // INVALID_ARGUMENT for duplicate names; INTERNAL if the file cannot be
  // created.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<TensorSpec> tensors,
      const std::map<std::string, std::string>& metadata);

  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Appends bytes of the current tensor; a tensor may be written in several
  // calls. FAILED_PRECONDITION if more bytes are written than the tensors
  // declared.
  absl::Status Append(absl::Span<const uint8_t> bytes);
  // FAILED_PRECONDITION unless exactly the declared bytes were written.
  absl::Status Finish();

  static constexpr uint64_t kWritebackBytes = uint64_t{16} << 20;

 private:
  // Hands what was appended since the last call to the disk, without waiting
  // for it (best effort: Finish's fsync reports any error).
  void StartWriteback();

  SafetensorsWriter(std::string path, std::FILE* file, uint64_t data_size);

  std::string path_;
  std::FILE* file_;
  // The stdio buffer of `file_` (glibc ignores setvbuf's size without one).
  std::unique_ptr<char[]> buffer_;
  uint64_t data_size_;
  uint64_t written_ = 0;
  uint64_t written_at_writeback_ = 0;  // written_ at the last StartWriteback
  off_t writeback_offset_ = 0;         // file offset it reached
  bool finished_ = false;
};

}  // namespace amalgam::core
