#include "server/upload_manager.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/model_files.h"
#include "core/safetensors.h"
#include "core/statistics.h"
#include "core/status_macros.h"
#include "server/log.h"
#include "server/space.h"
#include "server/upload_header.h"

namespace amalgam::server {
namespace {

// What the catalog keeps of an upload, and every list, scrape and response
// carries: bounded, so that one organisation's artifact cannot slow
// another's calls or overflow a response.
constexpr int64_t kMaxHeaderBytes = int64_t{4} << 20;
constexpr int64_t kMaxMetadataBytes = int64_t{64} << 10;

// INVALID_ARGUMENT if the safetensors header at the start of `path` (the
// model's file `name`) or the model's __metadata__ is larger than the
// catalog keeps.
absl::Status CheckHeaderSizes(const std::string& path, const std::string& name,
                              const core::SafetensorsReader& reader) {
  uint8_t length[8] = {};
  std::FILE* file = std::fopen(path.c_str(), "rb");
  const bool read = file != nullptr && std::fread(length, 1, 8, file) == 8;
  if (file != nullptr) std::fclose(file);
  if (!read) return absl::InternalError("cannot read the upload's header");
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length[i];
  if (header_bytes > static_cast<uint64_t>(kMaxHeaderBytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the safetensors header of ", name, " is ", header_bytes,
                     " bytes; at most ", kMaxHeaderBytes, " are accepted"));
  }
  int64_t metadata_bytes = 0;
  for (const auto& [key, value] : reader.metadata()) {
    metadata_bytes += static_cast<int64_t>(key.size() + value.size());
  }
  if (metadata_bytes > kMaxMetadataBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("__metadata__ holds ", metadata_bytes,
                     " bytes of keys and values; at most ", kMaxMetadataBytes,
                     " are accepted"));
  }
  return absl::OkStatus();
}

absl::Status ValidateContent(const v1::Artifact& artifact,
                             const core::SafetensorsReader& reader,
                             const core::SafetensorsReader* described) {
  switch (artifact.kind()) {
    case v1::ARTIFACT_KIND_WEIGHTS:
      return core::ValidateWeights(reader);
    case v1::ARTIFACT_KIND_GRAM:
      return core::ValidateGram(reader, described);
    case v1::ARTIFACT_KIND_FISHER:
      return core::ValidateFisher(reader, described);
    default:
      return absl::InvalidArgumentError("unknown artifact kind");
  }
}

// The upload's file cannot be opened or written: RESOURCE_EXHAUSTED when
// the disk is full. Names no server path.
absl::Status WriteError(int error) {
  const std::string message =
      absl::StrCat("cannot store the upload's bytes: ", std::strerror(error));
  if (error == ENOSPC || error == EDQUOT) {
    return absl::ResourceExhaustedError(message);
  }
  return absl::InternalError(message);
}

// INVALID_ARGUMENT unless the file at `path` (`size` bytes) is a config.json
// that results can be given (see core::CheckConfigJson).
absl::Status CheckConfigFile(const std::string& path, int64_t size) {
  if (size > static_cast<int64_t>(core::kMaxConfigBytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json has ", size, " bytes; at most ",
                     core::kMaxConfigBytes, " are accepted"));
  }
  std::ifstream in(path, std::ios::binary);
  const std::string text(std::istreambuf_iterator<char>(in), {});
  if (!in && !in.eof()) return absl::InternalError("cannot read config.json");
  return core::CheckConfigJson(text);
}

// Removes its files when it goes, unless they were taken (cleared).
struct TempFiles {
  std::vector<std::string> paths;
  ~TempFiles() {
    for (const std::string& path : paths) std::remove(path.c_str());
  }
};

// The upload's bytes are a model's files one after the other, in the order
// of `files`: copies each into its own file (the path paired with it),
// fsynced, and sets its sha256.
absl::Status SplitModelFiles(
    const std::string& path,
    std::vector<std::pair<v1::ModelFile, std::string>>* files) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> in(
      std::fopen(path.c_str(), "rb"), &std::fclose);
  if (in == nullptr) return absl::InternalError("cannot read the upload");
  std::vector<char> buffer(size_t{1} << 20);
  for (auto& [file, out_path] : *files) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> out(
        std::fopen(out_path.c_str(), "wb"), &std::fclose);
    if (out == nullptr) return WriteError(errno);
    core::Sha256 hash;
    int64_t left = file.size_bytes();
    while (left > 0) {
      const size_t want =
          static_cast<size_t>(std::min<int64_t>(left, buffer.size()));
      if (std::fread(buffer.data(), 1, want, in.get()) != want) {
        return absl::InternalError("cannot read the upload");
      }
      hash.Update(buffer.data(), want);
      if (std::fwrite(buffer.data(), 1, want, out.get()) != want) {
        return WriteError(errno);
      }
      left -= static_cast<int64_t>(want);
    }
    if (std::fflush(out.get()) != 0) return WriteError(errno);
    out.reset();
    AMALGAM_RETURN_IF_ERROR(SyncFileAndDir(out_path));
    file.set_sha256(hash.HexDigest());
  }
  return absl::OkStatus();
}

}  // namespace

UploadManager::UploadManager(Storage* storage, UploadOptions options)
    : storage_(storage), options_(std::move(options)) {
  // A restarted replica's earlier streams died with it: their uploads can
  // be resumed at once, not only once their leases run out.
  absl::Status closed = storage_->catalog()->CloseStreamsOf(options_.holder);
  if (!closed.ok()) {
    Log(LogLevel::kWarning,
        LogFields("upload_streams_not_closed").Add("error", closed.message()));
  }
  renewer_ = std::thread([this] { RenewLoop(); });
}

UploadManager::~UploadManager() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  renewer_.join();
}

absl::StatusOr<std::unique_ptr<UploadManager::Session>> UploadManager::Begin(
    const std::string& owner, const v1::UploadHeader& header,
    std::function<void()> cancel_other) {
  AMALGAM_RETURN_IF_ERROR(
      ValidateUploadHeader(header, options_.max_upload_bytes));
  const UploadKey key(owner, header.upload_id());
  if (!header.upload_id().empty()) {
    // A stream of this process on the same id is cancelled at once (a
    // stream on another replica, by the catalog's OpenStream below).
    absl::MutexLock lock(&mu_);
    bool cancelled = false;
    for (const auto& [id, active] : active_) {
      if (active.upload != key) continue;
      active.cancel();
      cancelled = true;
    }
    if (cancelled) {
      return absl::AbortedError(
          absl::StrCat("upload ", header.upload_id(),
                       " was being received on another stream; that stream "
                       "is cancelled, retry"));
    }
  }
  const std::string stream = NewId("stream");
  AMALGAM_RETURN_IF_ERROR(storage_->catalog()->OpenStream(
      stream, owner, header.upload_id(), options_.holder, options_.stream_lease,
      options_.max_uploads_per_org));
  {
    absl::MutexLock lock(&mu_);
    active_[stream] = Active{key, std::move(cancel_other)};
  }
  // From here the session owns the stream (its destructor closes it).
  std::unique_ptr<Session> session(new Session(this, owner, header));
  session->stream_ = stream;
  if (options_.metrics != nullptr) options_.metrics->UploadStarted();
  if (!header.describes().empty()) {
    AMALGAM_ASSIGN_OR_RETURN(
        v1::Artifact described,
        storage_->GetArtifactFor(header.describes(), owner));
    if (described.kind() != v1::ARTIFACT_KIND_WEIGHTS) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.describes names ", header.describes(),
                       ", which is not a weights artifact"));
    }
    session->described_ = std::move(described);
  }
  if (header.upload_id().empty()) {
    AMALGAM_RETURN_IF_ERROR(Admit(owner, header, /*held=*/0));
    session->path_ = storage_->NewTempPath("upload");
    session->file_ = std::fopen(session->path_.c_str(), "wb");
  } else {
    AMALGAM_RETURN_IF_ERROR(session->OpenResumable());
    if (session->finished_.has_value()) return session;
    session->file_ = std::fopen(session->path_.c_str(), "ab");
  }
  if (session->file_ == nullptr) return WriteError(errno);
  // Unbuffered: what the file holds is what GetUpload reports, also after
  // the process is killed.
  std::setvbuf(session->file_, nullptr, _IONBF, 0);
  return session;
}

absl::StatusOr<v1::UploadStatus> UploadManager::Status(
    const std::string& owner, const std::string& upload_id) {
  if (upload_id.empty()) {
    return absl::InvalidArgumentError("upload_id is empty");
  }
  AMALGAM_ASSIGN_OR_RETURN(PartialUpload upload,
                           storage_->FindUpload(owner, upload_id));
  v1::UploadStatus status;
  status.set_upload_id(upload_id);
  status.set_committed_bytes(upload.committed_bytes);
  status.set_size_bytes(upload.header.size_bytes());
  status.set_artifact_id(upload.artifact_id);
  if (upload.artifact_id.empty() && upload.committed_bytes > 0) {
    AMALGAM_ASSIGN_OR_RETURN(const std::string held,
                             core::Sha256File(upload.path));
    status.set_held_sha256(held);
  }
  return status;
}

absl::StatusOr<int> UploadManager::ExpireStale() {
  const int64_t cutoff =
      absl::ToUnixSeconds(absl::Now() - options_.upload_expiry);
  AMALGAM_ASSIGN_OR_RETURN(std::vector<UploadKey> stale,
                           storage_->StaleUploads(cutoff));
  int removed = 0;
  for (const UploadKey& key : stale) {
    // Under the lock, so that no stream of this process starts on it
    // between the check and the removal.
    absl::MutexLock lock(&mu_);
    bool receiving = false;
    for (const auto& [id, active] : active_) {
      receiving = receiving || active.upload == key;
    }
    if (receiving) continue;
    AMALGAM_ASSIGN_OR_RETURN(
        const bool gone,
        storage_->RemoveStaleUpload(key.first, key.second, cutoff));
    if (!gone) continue;
    ++removed;
    Log(LogLevel::kInfo, LogFields("upload_expired")
                             .Add("upload", key.second)
                             .Add("owner", key.first));
  }
  return removed;
}

absl::Status UploadManager::Admit(const std::string& owner,
                                  const v1::UploadHeader& header,
                                  int64_t held) {
  const std::string what =
      absl::StrCat("an upload of ", header.size_bytes(), " bytes");
  AMALGAM_RETURN_IF_ERROR(CheckFreeSpace(storage_->data_dir(),
                                         header.size_bytes() - held,
                                         options_.disk_reserve_bytes, what));
  if (options_.quota_bytes_per_org <= 0) return absl::OkStatus();
  AMALGAM_ASSIGN_OR_RETURN(const int64_t stored,
                           storage_->OrgBytes(owner, header.upload_id()));
  AMALGAM_ASSIGN_OR_RETURN(const int64_t pending,
                           storage_->catalog()->PendingOutputBytes(owner));
  return CheckQuota(owner, stored + pending, header.size_bytes(),
                    options_.quota_bytes_per_org, what);
}

void UploadManager::Release(const std::string& stream) {
  const absl::Status closed = storage_->catalog()->CloseStream(stream);
  absl::MutexLock lock(&mu_);
  active_.erase(stream);
  // Else renewed with the others until closed: closed again at each renewal.
  if (!closed.ok()) unclosed_.push_back(stream);
  if (options_.metrics != nullptr) options_.metrics->UploadEnded();
}

void UploadManager::RenewLoop() {
  const absl::Duration period = std::clamp(
      std::min(options_.stream_lease / 3, options_.upload_expiry / 4),
      absl::Milliseconds(100), absl::Seconds(10));
  absl::Time renewed = absl::Now();
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stopping_), period)) {
    std::vector<UploadKey> receiving;
    for (const auto& [id, active] : active_) {
      if (!active.upload.second.empty()) receiving.push_back(active.upload);
    }
    std::vector<std::string> unclosed = std::move(unclosed_);
    unclosed_.clear();
    mu_.Unlock();
    for (std::string& stream : unclosed) {
      if (storage_->catalog()->CloseStream(stream).ok()) stream.clear();
    }
    absl::StatusOr<std::vector<std::string>> stop =
        storage_->catalog()->RenewStreams(options_.holder,
                                          options_.stream_lease);
    for (const UploadKey& upload : receiving) {
      storage_->TouchUpload(upload.first, upload.second).IgnoreError();
    }
    mu_.Lock();
    for (std::string& stream : unclosed) {
      if (!stream.empty()) unclosed_.push_back(std::move(stream));
    }
    if (stop.ok()) {
      renewed = absl::Now();
      for (const std::string& id : *stop) {
        auto it = active_.find(id);
        if (it != active_.end()) it->second.cancel();
      }
    } else if (absl::Now() - renewed > options_.stream_lease * 2 / 3) {
      Log(LogLevel::kWarning, LogFields("upload_streams_cancelled")
                                  .Add("streams", active_.size())
                                  .Add("error", stop.status().message()));
      for (const auto& [id, active] : active_) active.cancel();
    }
  }
}

UploadManager::Session::Session(UploadManager* manager, std::string owner,
                                v1::UploadHeader header)
    : manager_(manager), owner_(std::move(owner)), header_(std::move(header)) {
  expected_sha256_ = header_.sha256();
}

UploadManager::Session::~Session() {
  CloseFile();
  Storage* storage = manager_->storage_;
  if (resumable_) {
    // Restarts the expiry clock; a no-op once the upload is gone.
    storage->TouchUpload(owner_, header_.upload_id()).IgnoreError();
  } else if (!path_.empty()) {
    std::remove(path_.c_str());
  }
  if (!stream_.empty()) manager_->Release(stream_);
}

absl::Status UploadManager::Session::OpenResumable() {
  Storage* storage = manager_->storage_;
  absl::StatusOr<PartialUpload> upload =
      storage->FindUpload(owner_, header_.upload_id());
  if (absl::IsNotFound(upload.status())) {
    AMALGAM_RETURN_IF_ERROR(manager_->Admit(owner_, header_, /*held=*/0));
    upload = storage->CreateUpload(owner_, header_);
  } else if (upload.ok() && upload->artifact_id.empty()) {
    AMALGAM_RETURN_IF_ERROR(
        manager_->Admit(owner_, header_, upload->committed_bytes));
  }
  if (!upload.ok()) return upload.status();
  if (upload->header.SerializeAsString() != header_.SerializeAsString()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "upload ", header_.upload_id(),
        " was started with a different header (kind, name, size_bytes, "
        "sha256 or describes); use a new upload_id"));
  }
  if (!upload->artifact_id.empty()) {
    // Finished before: the client lost the response. Answer with the
    // artifact it made, unless that was deleted since (then start over).
    absl::StatusOr<v1::Artifact> made =
        storage->GetArtifactFor(upload->artifact_id, owner_);
    if (made.ok()) {
      finished_ = *std::move(made);
      return absl::OkStatus();
    }
    AMALGAM_ASSIGN_OR_RETURN(upload, storage->CreateUpload(owner_, header_));
  }
  resumable_ = true;
  path_ = upload->path;
  if (upload->committed_bytes > header_.size_bytes()) {
    storage->RemoveUpload(owner_, header_.upload_id()).IgnoreError();
    return absl::DataLossError(absl::StrCat("upload ", header_.upload_id(),
                                            " holds more bytes than declared; ",
                                            "it was discarded, start again"));
  }
  received_ = upload->committed_bytes;
  // The hash of the bytes already held is computed at Complete.
  resumed_ = received_ > 0;
  return absl::OkStatus();
}

absl::Status UploadManager::Session::Append(v1::UploadChunk* chunk) {
  if (chunk->offset() != received_) {
    std::string message =
        absl::StrCat("chunk offset ", chunk->offset(), " but the server holds ",
                     received_, " bytes of this upload; send from there");
    // Resumable: the client asks GetUpload again and retries.
    return resumable_ ? absl::AbortedError(message)
                      : absl::FailedPreconditionError(message);
  }
  const int64_t size = static_cast<int64_t>(chunk->data().size());
  if (trailer_) {
    return absl::InvalidArgumentError("upload chunk after the trailer");
  }
  if (received_ + size > header_.size_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("upload sends more than the declared size_bytes ",
                     header_.size_bytes()));
  }
  if (std::fwrite(chunk->data().data(), 1, chunk->data().size(), file_) !=
      chunk->data().size()) {
    return WriteError(errno);
  }
  // Hashed on the hasher's thread while the next message is read.
  if (!resumed_) hash_.Update(std::move(*chunk->mutable_data()));
  received_ += size;
  if (Metrics* metrics = manager_->options_.metrics) {
    metrics->BytesReceived(size);
  }
  return absl::OkStatus();
}

absl::Status UploadManager::Session::Trailer(const v1::UploadTrailer& trailer) {
  if (trailer_) return absl::InvalidArgumentError("upload trailer sent twice");
  if (received_ != header_.size_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("upload trailer after ", received_, " of ",
                     header_.size_bytes(), " declared bytes"));
  }
  if (!core::IsSha256Hex(trailer.sha256())) {
    return absl::InvalidArgumentError(
        "trailer.sha256 must be 64 lower-case hex digits");
  }
  if (!expected_sha256_.empty() && expected_sha256_ != trailer.sha256()) {
    return absl::InvalidArgumentError(
        absl::StrCat("trailer.sha256 ", trailer.sha256(),
                     " contradicts header.sha256 ", expected_sha256_));
  }
  trailer_ = true;
  expected_sha256_ = trailer.sha256();
  return absl::OkStatus();
}

absl::Status UploadManager::Session::EndOfStream() {
  if (received_ != header_.size_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "upload ended after ", received_, " of ", header_.size_bytes(),
        " declared bytes",
        resumable_ ? absl::StrCat("; resume upload ", header_.upload_id(),
                                  " from offset ", received_)
                   : ""));
  }
  if (expected_sha256_.empty()) {
    return absl::InvalidArgumentError(
        "upload ended without its sha256: the header has none, so a trailer "
        "must follow the last byte");
  }
  if (!CloseFile()) {
    return absl::InternalError("cannot flush the upload's bytes");
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Artifact> UploadManager::Session::Complete() {
  Storage* storage = manager_->storage_;
  absl::StatusOr<v1::Artifact> artifact = Verify();
  // The artifact is made (or the bytes are bad) whatever these answer; a
  // failure only leaves the upload's row to expiry, so it is logged.
  absl::Status bookkeeping;
  if (resumable_ && artifact.ok()) {
    bookkeeping =
        storage->CompleteUpload(owner_, header_.upload_id(), artifact->id());
  } else if (resumable_ && bad_content_) {
    bookkeeping = storage->RemoveUpload(owner_, header_.upload_id());
  }
  if (!bookkeeping.ok()) {
    Log(LogLevel::kError, LogFields("upload_bookkeeping_failed")
                              .Add("upload", header_.upload_id())
                              .Add("owner", owner_)
                              .Add("error", bookkeeping.message()));
  }
  return artifact;
}

absl::StatusOr<v1::Artifact> UploadManager::Session::Verify() {
  Storage* storage = manager_->storage_;
  std::string sha256;
  if (resumed_) {
    AMALGAM_ASSIGN_OR_RETURN(sha256, core::Sha256File(path_));
  } else {
    sha256 = hash_.HexDigest();
  }
  if (sha256 != expected_sha256_) {
    bad_content_ = true;
    return absl::DataLossError(absl::StrCat(
        "upload \"", header_.name(), "\" has sha256 ", sha256, " but the ",
        trailer_ ? "trailer" : "header", " declared ", expected_sha256_));
  }
  AMALGAM_RETURN_IF_ERROR(SyncFileAndDir(path_));
  // The model's files, sorted by name, and where each one's bytes are: the
  // upload's file itself for a one-file model, else copies of its parts.
  std::vector<std::pair<v1::ModelFile, std::string>> files;
  TempFiles parts;
  if (header_.files_size() <= 1) {
    v1::ModelFile file;
    file.set_name(header_.files_size() == 1 ? header_.files(0).name()
                                            : core::kSingleFileName);
    file.set_size_bytes(header_.size_bytes());
    file.set_sha256(sha256);
    files.emplace_back(file, path_);
  } else {
    for (const v1::ModelFile& file : header_.files()) {
      files.emplace_back(file, storage->NewTempPath("part"));
      parts.paths.push_back(files.back().second);
    }
    AMALGAM_RETURN_IF_ERROR(SplitModelFiles(path_, &files));
    std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) {
      return a.first.name() < b.first.name();
    });
  }
  std::map<std::string, std::string> paths;
  for (const auto& [file, file_path] : files) paths[file.name()] = file_path;
  absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> reader =
      core::SafetensorsReader::OpenModel(paths);
  if (!reader.ok()) {
    bad_content_ = true;
    return absl::InvalidArgumentError(absl::StrCat(
        "upload \"", header_.name(), "\" is not a valid ",
        header_.files_size() <= 1 ? "safetensors file" : "model directory",
        ": ", reader.status().message()));
  }
  std::unique_ptr<core::SafetensorsReader> described;
  if (described_.has_value()) {
    AMALGAM_ASSIGN_OR_RETURN(described, storage->OpenBlob(*described_));
  }
  v1::Artifact artifact;
  artifact.set_kind(header_.kind());
  artifact.set_owner(owner_);
  artifact.set_name(header_.name());
  artifact.set_size_bytes(header_.size_bytes());
  artifact.set_sha256(sha256);
  artifact.set_describes(header_.describes());
  std::vector<std::string> temp_paths;
  absl::Status valid;
  for (const auto& [file, file_path] : files) {
    *artifact.add_files() = file;
    temp_paths.push_back(file_path);
    if (valid.ok() && absl::EndsWith(file.name(), ".safetensors")) {
      valid = CheckHeaderSizes(file_path, file.name(), **reader);
    }
  }
  for (const auto& [file, file_path] : files) {
    if (valid.ok() && file.name() == "config.json") {
      valid = CheckConfigFile(file_path, file.size_bytes());
    }
  }
  if (valid.ok()) valid = ValidateContent(artifact, **reader, described.get());
  if (!valid.ok()) {
    bad_content_ =
        absl::IsInvalidArgument(valid) || absl::IsFailedPrecondition(valid);
    return valid;
  }
  DescribeTensors(**reader, &artifact);
  if (artifact.kind() == v1::ARTIFACT_KIND_GRAM) {
    for (const auto& [name, same] : core::IdenticalTensors(**reader)) {
      (*artifact.mutable_identical_tensors())[name] = same;
    }
  }
  reader->reset();
  AMALGAM_ASSIGN_OR_RETURN(artifact,
                           storage->AddArtifact(temp_paths, artifact));
  // Moved into the blob store (or copied out, for a model of several files).
  if (!parts.paths.empty()) std::remove(path_.c_str());
  parts.paths.clear();
  path_.clear();
  return artifact;
}

bool UploadManager::Session::CloseFile() {
  if (file_ == nullptr) return true;
  const bool ok = std::fflush(file_) == 0;
  std::fclose(file_);
  file_ = nullptr;
  return ok;
}

}  // namespace amalgam::server
