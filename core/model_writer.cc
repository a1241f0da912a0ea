#include "core/model_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/model_files.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace amalgam::core {
namespace {

uint64_t Bytes(const TensorSpec& tensor) {
  uint64_t numel = 1;
  for (const int64_t dim : tensor.shape) numel *= static_cast<uint64_t>(dim);
  return numel * DTypeSize(tensor.dtype);
}

// Writes `contents` to `path` through a temporary file, fsynced, renamed
// into place, and the directory fsynced.
absl::Status WriteFileAtomically(const std::string& dir,
                                 const std::string& name,
                                 const std::string& contents) {
  const std::string path = absl::StrCat(dir, "/", name);
  const std::string tmp = path + ".tmp";
  auto failed = [&](const char* what) {
    return absl::InternalError(
        absl::StrCat("cannot ", what, " ", tmp, ": ", std::strerror(errno)));
  };
  const int fd =
      ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return failed("create");
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n =
        ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return failed("write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    return failed("fsync");
  }
  if (::close(fd) != 0) return failed("close");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return failed("rename");
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return failed("open the directory of");
  const int synced = ::fsync(dir_fd);
  ::close(dir_fd);
  if (synced != 0) return failed("fsync the directory of");
  return absl::OkStatus();
}

}  // namespace

std::vector<int> AssignShards(const std::vector<TensorSpec>& tensors,
                              uint64_t shard_bytes) {
  std::vector<int> shard_of;
  shard_of.reserve(tensors.size());
  int shard = 0;
  uint64_t in_shard = 0;
  bool empty = true;
  for (const TensorSpec& tensor : tensors) {
    const uint64_t bytes = Bytes(tensor);
    if (!empty && in_shard + bytes > shard_bytes) {
      ++shard;
      in_shard = 0;
    }
    shard_of.push_back(shard);
    in_shard += bytes;
    empty = false;
  }
  return shard_of;
}

namespace {

// The shards of an assignment (AssignShards): 1 when there are no tensors.
int ShardsOf(const std::vector<int>& shard_of) {
  return shard_of.empty() ? 1 : shard_of.back() + 1;
}

}  // namespace

int CountShards(const std::vector<TensorSpec>& tensors, uint64_t shard_bytes) {
  return ShardsOf(AssignShards(tensors, shard_bytes));
}

std::vector<size_t> ShardTensors(const std::vector<TensorSpec>& tensors,
                                 uint64_t shard_bytes, int shard) {
  const std::vector<int> shard_of = AssignShards(tensors, shard_bytes);
  std::vector<size_t> indices;
  for (size_t i = 0; i < shard_of.size(); ++i) {
    if (shard == kEveryShard || shard_of[i] == shard) indices.push_back(i);
  }
  return indices;
}

absl::Status WriteModelIndex(const std::string& dir,
                             const std::vector<TensorSpec>& tensors,
                             uint64_t shard_bytes) {
  const std::vector<int> shard_of = AssignShards(tensors, shard_bytes);
  const int shards = ShardsOf(shard_of);
  if (shards == 1) return absl::OkStatus();
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    weight_map[tensors[i].name] = ShardFileName(shard_of[i], shards);
    total += Bytes(tensors[i]);
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total}}},
                                {"weight_map", weight_map}};
  return WriteFileAtomically(dir, kIndexFileName, index.dump(2) + "\n");
}

absl::StatusOr<std::unique_ptr<ModelWriter>> ModelWriter::Create(
    const std::string& dir, std::vector<TensorSpec> tensors,
    std::map<std::string, std::string> metadata, uint64_t shard_bytes,
    int shard) {
  if (shard_bytes == 0) {
    return absl::InvalidArgumentError("the shard size must be positive");
  }
  std::vector<int> shard_of = AssignShards(tensors, shard_bytes);
  const int shards = ShardsOf(shard_of);
  if (shard != kEveryShard && (shard < 0 || shard >= shards)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", shard, " is not one of the model's ", shards));
  }
  std::set<std::string> names;
  for (const TensorSpec& tensor : tensors) {
    if (!names.insert(tensor.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", tensor.name, "\" is listed twice"));
    }
  }
  std::error_code error;
  const bool made = std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot create directory ", dir, ": ", error.message()));
  }
  auto writer = std::unique_ptr<ModelWriter>(new ModelWriter());
  writer->dir_ = dir;
  writer->made_dir_ = made;
  writer->only_ = shard;
  writer->max_shard_bytes_ = shard_bytes;
  writer->shard_of_ = std::move(shard_of);
  writer->shard_bytes_.assign(static_cast<size_t>(shards), 0);
  writer->first_tensor_.assign(static_cast<size_t>(shards), tensors.size());
  for (size_t i = tensors.size(); i-- > 0;) {
    const int shard = writer->shard_of_[i];
    writer->shard_bytes_[shard] += Bytes(tensors[i]);
    writer->first_tensor_[shard] = i;
  }
  writer->tensors_ = std::move(tensors);
  writer->metadata_ = std::move(metadata);
  AMALGAM_RETURN_IF_ERROR(writer->Advance());
  return writer;
}

ModelWriter::~ModelWriter() {
  if (finished_) return;
  writer_.reset();  // removes its temporary file
  for (const std::string& name : files_) {
    std::remove(absl::StrCat(dir_, "/", name).c_str());
  }
  std::error_code ignored;
  if (made_dir_) std::filesystem::remove(dir_, ignored);
}

absl::Status ModelWriter::Advance() {
  const int shards = static_cast<int>(shard_bytes_.size());
  while (shard_ < 0 || (written_in_shard_ == shard_bytes_[shard_] &&
                        shard_ + 1 < shards && only_ == kEveryShard)) {
    if (writer_ != nullptr) {
      AMALGAM_RETURN_IF_ERROR(writer_->Finish());
      writer_.reset();
    }
    shard_ = only_ == kEveryShard ? shard_ + 1 : only_;
    written_in_shard_ = 0;
    const std::string name =
        shards == 1 ? kSingleFileName : ShardFileName(shard_, shards);
    std::vector<TensorSpec> specs;
    for (size_t i = first_tensor_[shard_];
         i < tensors_.size() && shard_of_[i] == shard_; ++i) {
      specs.push_back(tensors_[i]);
    }
    AMALGAM_ASSIGN_OR_RETURN(
        writer_, SafetensorsWriter::Create(absl::StrCat(dir_, "/", name),
                                           std::move(specs), metadata_));
    files_.push_back(name);
  }
  return absl::OkStatus();
}

absl::Status ModelWriter::Append(absl::Span<const uint8_t> bytes) {
  while (!bytes.empty()) {
    AMALGAM_RETURN_IF_ERROR(Advance());
    if (writer_ == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "more bytes were written to ", dir_, " than its tensors declared"));
    }
    const uint64_t room = shard_bytes_[shard_] - written_in_shard_;
    const size_t take =
        static_cast<size_t>(std::min<uint64_t>(room, bytes.size()));
    if (take == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "more bytes were written to ", dir_, " than its tensors declared"));
    }
    AMALGAM_RETURN_IF_ERROR(writer_->Append(bytes.subspan(0, take)));
    written_in_shard_ += take;
    bytes.remove_prefix(take);
  }
  return absl::OkStatus();
}

absl::Status ModelWriter::Finish() {
  AMALGAM_RETURN_IF_ERROR(Advance());
  if (writer_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the writer of ", dir_, " is already finished"));
  }
  AMALGAM_RETURN_IF_ERROR(writer_->Finish());
  writer_.reset();
  if (only_ == kEveryShard && shard_bytes_.size() > 1) {
    AMALGAM_RETURN_IF_ERROR(WriteModelIndex(dir_, tensors_, max_shard_bytes_));
    files_.push_back(kIndexFileName);
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace amalgam::core
