#include "server/artifact_service.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/statistics.h"
#include "core/status_macros.h"
#include "server/grpc_status.h"
#include "server/log.h"
#include "server/rpc_util.h"
#include "server/space.h"
#include "server/upload_header.h"

namespace amalgam::server {
namespace {

// What the catalog keeps of an upload, and every list, scrape and response
// carries: bounded, so that one organisation's artifact cannot slow
// another's calls or overflow a response.
constexpr int64_t kMaxHeaderBytes = int64_t{4} << 20;
constexpr int64_t kMaxMetadataBytes = int64_t{64} << 10;

// INVALID_ARGUMENT if the safetensors header at the start of `path` or its
// __metadata__ is larger than the catalog keeps.
absl::Status CheckHeaderSizes(const std::string& path,
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
        absl::StrCat("the safetensors header is ", header_bytes,
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

v1::DType ToProtoDType(core::DType dtype) {
  switch (dtype) {
    case core::DType::kF16:
      return v1::DTYPE_F16;
    case core::DType::kBF16:
      return v1::DTYPE_BF16;
    case core::DType::kF32:
      return v1::DTYPE_F32;
    case core::DType::kF64:
      return v1::DTYPE_F64;
  }
  return v1::DTYPE_UNSPECIFIED;
}

}  // namespace

absl::Status ArtifactServiceImpl::OrgSlots::Acquire(const std::string& owner) {
  absl::MutexLock lock(&mu_);
  int& count = per_org_[owner];
  if (count >= max_per_org_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("organisation ", owner, " already has ", count, " ", what_,
                     " in progress (the limit); retry later"));
  }
  ++count;
  return absl::OkStatus();
}

void ArtifactServiceImpl::OrgSlots::Release(const std::string& owner) {
  absl::MutexLock lock(&mu_);
  if (--per_org_[owner] <= 0) per_org_.erase(owner);
}

absl::Status ArtifactServiceImpl::UploadTracker::Acquire(
    const std::string& owner, const std::string& upload_id,
    grpc::CallbackServerContext* context) {
  absl::MutexLock lock(&mu_);
  if (!upload_id.empty()) {
    auto it = active_.find({owner, upload_id});
    if (it != active_.end()) {
      // Most likely the client lost that connection without the server
      // noticing: cancel it, so the client's retry finds the id free.
      it->second->TryCancel();
      return absl::AbortedError(
          absl::StrCat("upload ", upload_id,
                       " was being received on another stream; that stream "
                       "is cancelled, retry"));
    }
  }
  AMALGAM_RETURN_IF_ERROR(slots_.Acquire(owner));
  if (!upload_id.empty()) active_[{owner, upload_id}] = context;
  return absl::OkStatus();
}

void ArtifactServiceImpl::UploadTracker::Release(const std::string& owner,
                                                 const std::string& upload_id) {
  absl::MutexLock lock(&mu_);
  slots_.Release(owner);
  if (!upload_id.empty()) active_.erase({owner, upload_id});
}

void ArtifactServiceImpl::UploadTracker::RemoveIfIdle(
    Storage* storage, const std::string& owner, const std::string& upload_id,
    int64_t cutoff_unix_seconds) {
  absl::MutexLock lock(&mu_);
  if (active_.count({owner, upload_id}) > 0) return;
  absl::StatusOr<bool> removed =
      storage->RemoveStaleUpload(owner, upload_id, cutoff_unix_seconds);
  if (!removed.ok()) {
    Log(LogLevel::kWarning, LogFields("upload_expiry_failed")
                                .Add("upload", upload_id)
                                .Add("owner", owner)
                                .Add("error", removed.status().message()));
  } else if (*removed) {
    Log(LogLevel::kInfo, LogFields("upload_expired")
                             .Add("upload", upload_id)
                             .Add("owner", owner));
  }
}

// Receives header + chunks into a file, hashing as it goes; verification and
// validation of the complete file run on the executor. Without an upload_id
// the file is a temp file, removed unless the upload completes; with one, it
// is the upload's file under uploads/, kept for a later stream to resume.
class ArtifactServiceImpl::UploadReactor
    : public grpc::ServerReadReactor<v1::UploadRequest> {
 public:
  UploadReactor(ArtifactServiceImpl* service,
                grpc::CallbackServerContext* context, std::string owner,
                v1::UploadResponse* response)
      : service_(service),
        context_(context),
        owner_(std::move(owner)),
        response_(response) {
    StartRead(&request_);
  }

  // Handled on the reaction thread: a chunk is one write into the page
  // cache. (On the I/O executor, one hop per message, 64 KiB uploads under
  // load ran at 0.63x; see bench/README.md.)
  void OnReadDone(bool ok) override {
    if (!ok) {
      Complete();
      return;
    }
    absl::Status status = Consume();
    if (!status.ok()) {
      Fail(status);
      return;
    }
    if (answered_) {
      Finish(grpc::Status::OK);
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override {
    CloseFile();
    if (resumable_) {
      // Restarts the expiry clock; a no-op once the upload is gone.
      service_->storage_->TouchUpload(owner_, header_.upload_id())
          .IgnoreError();
    } else if (!temp_path_.empty()) {
      std::remove(temp_path_.c_str());
    }
    if (slot_held_) {
      service_->uploads_.Release(owner_, header_.upload_id());
      if (Metrics* metrics = service_->options_.metrics) metrics->UploadEnded();
    }
    delete this;
  }

 private:
  absl::Status Consume() {
    if (!header_seen_) {
      if (!request_.has_header()) {
        return absl::InvalidArgumentError(
            "the first upload message must carry the header");
      }
      header_seen_ = true;
      return StartUpload(request_.header());
    }
    if (!request_.has_chunk()) {
      return absl::InvalidArgumentError("upload header sent twice");
    }
    const v1::UploadChunk& chunk = request_.chunk();
    if (chunk.offset() != received_) {
      std::string message = absl::StrCat(
          "chunk offset ", chunk.offset(), " but the server holds ", received_,
          " bytes of this upload; send from there");
      // Resumable: the client asks GetUpload again and retries.
      return resumable_ ? absl::AbortedError(message)
                        : absl::FailedPreconditionError(message);
    }
    const int64_t size = static_cast<int64_t>(chunk.data().size());
    if (received_ + size > header_.size_bytes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("upload sends more than the declared size_bytes ",
                       header_.size_bytes()));
    }
    if (std::fwrite(chunk.data().data(), 1, chunk.data().size(), file_) !=
        chunk.data().size()) {
      return WriteError(errno);
    }
    if (!resumed_) {
      // Hashed on the hasher's thread while the next message is read (the
      // chunk is a oneof, freed by the next parse anyway: moved, not
      // recycled).
      hash_.Update(std::move(*request_.mutable_chunk()->mutable_data()));
    }
    received_ += size;
    if (Metrics* metrics = service_->options_.metrics) {
      metrics->BytesReceived(size);
    }
    return absl::OkStatus();
  }

  absl::Status StartUpload(const v1::UploadHeader& header) {
    header_ = header;
    AMALGAM_RETURN_IF_ERROR(
        ValidateUploadHeader(header, service_->options_.max_upload_bytes));
    AMALGAM_RETURN_IF_ERROR(
        service_->uploads_.Acquire(owner_, header.upload_id(), context_));
    slot_held_ = true;
    if (Metrics* metrics = service_->options_.metrics) metrics->UploadStarted();
    if (!header.describes().empty()) {
      AMALGAM_ASSIGN_OR_RETURN(
          v1::Artifact described,
          service_->storage_->GetArtifactFor(header.describes(), owner_));
      if (described.kind() != v1::ARTIFACT_KIND_WEIGHTS) {
        return absl::InvalidArgumentError(
            absl::StrCat("header.describes names ", header.describes(),
                         ", which is not a weights artifact"));
      }
      described_ = described;
    }
    if (header.upload_id().empty()) {
      AMALGAM_RETURN_IF_ERROR(Admit(/*held=*/0));
      temp_path_ = service_->storage_->NewTempPath("upload");
      file_ = std::fopen(temp_path_.c_str(), "wb");
    } else {
      AMALGAM_RETURN_IF_ERROR(OpenResumable());
      if (answered_) return absl::OkStatus();
      file_ = std::fopen(temp_path_.c_str(), "ab");
    }
    if (file_ == nullptr) return WriteError(errno);
    // Unbuffered: what the file holds is what GetUpload reports, also after
    // the process is killed.
    std::setvbuf(file_, nullptr, _IONBF, 0);
    return absl::OkStatus();
  }

  // Refuses an upload, before its first byte, that would take the owner
  // over its byte quota or the data volume into its reserve. `held`: the
  // bytes of it the server already has.
  absl::Status Admit(int64_t held) {
    const ArtifactServiceOptions& options = service_->options_;
    const std::string what =
        absl::StrCat("an upload of ", header_.size_bytes(), " bytes");
    AMALGAM_RETURN_IF_ERROR(CheckFreeSpace(service_->storage_->data_dir(),
                                           header_.size_bytes() - held,
                                           options.disk_reserve_bytes, what));
    if (options.quota_bytes_per_org <= 0) return absl::OkStatus();
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t stored,
        service_->storage_->OrgBytes(owner_, header_.upload_id()));
    AMALGAM_ASSIGN_OR_RETURN(const int64_t pending,
                             service_->jobs_->PendingOutputBytes(owner_));
    return CheckQuota(owner_, stored + pending, header_.size_bytes(),
                      options.quota_bytes_per_org, what);
  }

  // The upload's file cannot be opened or written: RESOURCE_EXHAUSTED when
  // the disk is full. Names no server path.
  absl::Status WriteError(int error) const {
    const std::string message =
        absl::StrCat("cannot store the upload's bytes: ", std::strerror(error));
    if (error == ENOSPC || error == EDQUOT) {
      return absl::ResourceExhaustedError(message);
    }
    return absl::InternalError(message);
  }

  // Finds the upload named by the header, or registers it.
  absl::Status OpenResumable() {
    Storage* storage = service_->storage_;
    absl::StatusOr<PartialUpload> upload =
        storage->FindUpload(owner_, header_.upload_id());
    if (absl::IsNotFound(upload.status())) {
      AMALGAM_RETURN_IF_ERROR(Admit(/*held=*/0));
      upload = storage->CreateUpload(owner_, header_);
    } else if (upload.ok() && upload->artifact_id.empty()) {
      AMALGAM_RETURN_IF_ERROR(Admit(upload->committed_bytes));
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
        *response_->mutable_artifact() = *std::move(made);
        response_->set_upload_id(header_.upload_id());
        answered_ = true;
        return absl::OkStatus();
      }
      AMALGAM_ASSIGN_OR_RETURN(upload, storage->CreateUpload(owner_, header_));
    }
    resumable_ = true;
    temp_path_ = upload->path;
    if (upload->committed_bytes > header_.size_bytes()) {
      storage->RemoveUpload(owner_, header_.upload_id()).IgnoreError();
      return absl::DataLossError(absl::StrCat(
          "upload ", header_.upload_id(), " holds more bytes than declared; ",
          "it was discarded, start again"));
    }
    received_ = upload->committed_bytes;
    // The hash of the bytes already held is computed when the upload
    // completes, off the gRPC thread.
    resumed_ = received_ > 0;
    return absl::OkStatus();
  }

  void Complete() {
    if (!header_seen_) {
      Fail(absl::InvalidArgumentError("upload stream carried no header"));
      return;
    }
    if (received_ != header_.size_bytes()) {
      Fail(absl::InvalidArgumentError(absl::StrCat(
          "upload ended after ", received_, " of ", header_.size_bytes(),
          " declared bytes",
          resumable_ ? absl::StrCat("; resume upload ", header_.upload_id(),
                                    " from offset ", received_)
                     : "")));
      return;
    }
    if (!CloseFile()) {
      Fail(absl::InternalError(absl::StrCat("cannot flush ", temp_path_)));
      return;
    }
    const bool scheduled = service_->executor_->Schedule([this] {
      const absl::Time start = absl::Now();
      absl::StatusOr<v1::Artifact> artifact = Finalize();
      const double verify_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
      // The artifact is made (or the bytes are bad) whatever these answer;
      // a failure only leaves the upload's row to expiry, so it is logged.
      absl::Status bookkeeping;
      if (resumable_ && artifact.ok()) {
        bookkeeping = service_->storage_->CompleteUpload(
            owner_, header_.upload_id(), artifact->id());
      } else if (resumable_ && bad_content_) {
        // The bytes are bad: start again.
        bookkeeping =
            service_->storage_->RemoveUpload(owner_, header_.upload_id());
      }
      if (!bookkeeping.ok()) {
        Log(LogLevel::kError, LogFields("upload_bookkeeping_failed")
                                  .Add("upload", header_.upload_id())
                                  .Add("owner", owner_)
                                  .Add("error", bookkeeping.message()));
      }
      if (artifact.ok()) {
        *response_->mutable_artifact() = *artifact;
        response_->set_upload_id(header_.upload_id());
        Log(LogLevel::kInfo,
            LogFields("upload")
                .Add("artifact", artifact->id())
                .Add("owner", owner_)
                .Add("kind", v1::ArtifactKind_Name(artifact->kind()))
                .Add("bytes", artifact->size_bytes())
                .Add("verify_ms", verify_ms));
        Finish(grpc::Status::OK);
      } else {
        Fail(artifact.status());
      }
    });
    if (!scheduled) {
      Fail(absl::ResourceExhaustedError(
          "too many uploads are being verified; retry later"));
    }
  }

  absl::StatusOr<v1::Artifact> Finalize() {
    std::string sha256;
    if (resumed_) {
      AMALGAM_ASSIGN_OR_RETURN(sha256, core::Sha256File(temp_path_));
    } else {
      sha256 = hash_.HexDigest();
    }
    if (sha256 != header_.sha256()) {
      bad_content_ = true;
      return absl::DataLossError(
          absl::StrCat("upload \"", header_.name(), "\" has sha256 ", sha256,
                       " but the header declared ", header_.sha256()));
    }
    AMALGAM_RETURN_IF_ERROR(SyncFileAndDir(temp_path_));
    absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> reader =
        core::SafetensorsReader::Open(temp_path_);
    if (!reader.ok()) {
      bad_content_ = true;
      return absl::InvalidArgumentError(absl::StrCat(
          "upload \"", header_.name(),
          "\" is not a valid safetensors file: ", reader.status().message()));
    }
    std::unique_ptr<core::SafetensorsReader> described;
    if (!described_.id().empty()) {
      AMALGAM_ASSIGN_OR_RETURN(described,
                               service_->storage_->OpenBlob(described_));
    }
    v1::Artifact artifact;
    artifact.set_kind(header_.kind());
    artifact.set_owner(owner_);
    artifact.set_name(header_.name());
    artifact.set_size_bytes(header_.size_bytes());
    artifact.set_sha256(sha256);
    artifact.set_describes(header_.describes());
    absl::Status valid = CheckHeaderSizes(temp_path_, **reader);
    if (valid.ok())
      valid = ValidateContent(artifact, **reader, described.get());
    if (!valid.ok()) {
      bad_content_ =
          absl::IsInvalidArgument(valid) || absl::IsFailedPrecondition(valid);
      return valid;
    }
    artifact.set_tensor_count(
        static_cast<int64_t>((*reader)->tensors().size()));
    for (const auto& [key, value] : (*reader)->metadata()) {
      (*artifact.mutable_metadata())[key] = value;
    }
    reader->reset();
    AMALGAM_ASSIGN_OR_RETURN(
        artifact, service_->storage_->AddArtifact(temp_path_, artifact));
    temp_path_.clear();  // moved into the blob store
    return artifact;
  }

  bool CloseFile() {
    if (file_ == nullptr) return true;
    const bool ok = std::fflush(file_) == 0;
    std::fclose(file_);
    file_ = nullptr;
    return ok;
  }

  void Fail(const absl::Status& status) {
    Log(LogLevel::kInfo,
        LogFields("upload_failed")
            .Add("owner", owner_)
            .Add("code", absl::StatusCodeToString(status.code()))
            .Add("error", status.message()));
    Finish(ToGrpcStatus(status));
  }

  ArtifactServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  const std::string owner_;
  v1::UploadResponse* const response_;
  v1::UploadRequest request_;
  v1::UploadHeader header_;
  bool header_seen_ = false;
  int64_t received_ = 0;
  bool slot_held_ = false;    // counts against the organisation's uploads
  bool resumable_ = false;    // has an upload_id: the file outlives the stream
  bool resumed_ = false;      // began past offset 0: hash the file at the end
  bool bad_content_ = false;  // sha256 or validation failed: discard
  bool answered_ = false;     // the upload had finished: response is set
  core::BackgroundSha256 hash_;
  std::string temp_path_;
  v1::Artifact described_;  // the weights a statistics upload describes
  std::FILE* file_ = nullptr;
};

// Streams a blob in chunks; the first carries the size and sha256.
class ArtifactServiceImpl::DownloadReactor
    : public grpc::ServerWriteReactor<v1::DownloadChunk> {
 public:
  // Holds one of `org`'s download slots until done. The file is opened and
  // read on `io`, off the gRPC reaction thread, one chunk ahead of the write
  // in flight (so reading and sending overlap).
  DownloadReactor(const v1::Artifact& artifact, const std::string& path,
                  int64_t offset, int64_t chunk_bytes, Metrics* metrics,
                  OrgSlots* slots, std::string org, Executor* io)
      : slots_(slots),
        org_(std::move(org)),
        artifact_(artifact),
        offset_(offset),
        buffer_(chunk_bytes),
        metrics_(metrics),
        io_(io) {
    if (!io_->Schedule([this, path] {
          file_ = std::fopen(path.c_str(), "rb");
          if (file_ == nullptr) {
            Ended(grpc::Status(grpc::StatusCode::DATA_LOSS,
                               absl::StrCat("blob of artifact ", artifact_.id(),
                                            " is missing")));
          } else if (offset_ > 0 && std::fseek(file_, offset_, SEEK_SET) != 0) {
            Ended(grpc::Status(grpc::StatusCode::INTERNAL, "cannot seek"));
          } else {
            Read();
          }
        })) {
      Finish(Busy());
    }
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && !end_.has_value()) {
        end_ = grpc::Status(grpc::StatusCode::CANCELLED, "download cancelled");
      }
    }
    Advance();
  }

  void OnDone() override {
    if (file_ != nullptr) std::fclose(file_);
    slots_->Release(org_);
    delete this;
  }

 private:
  static grpc::Status Busy() {
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        "the server has too many transfers in progress; retry later");
  }

  // On `io`: reads the next chunk into next_ (or notes the end).
  void Read() {
    const size_t n = std::fread(buffer_.data(), 1, buffer_.size(), file_);
    {
      absl::MutexLock lock(&mu_);
      if (n == 0 && std::ferror(file_)) {
        if (!end_.has_value()) {
          end_ = grpc::Status(grpc::StatusCode::INTERNAL, "cannot read blob");
        }
      } else if (n == 0 && !first_) {
        if (!end_.has_value()) end_ = grpc::Status::OK;
      } else {
        next_.Clear();
        if (first_) {
          next_.set_size_bytes(artifact_.size_bytes());
          next_.set_sha256(artifact_.sha256());
          first_ = false;
        }
        next_.set_offset(offset_);
        next_.set_data(buffer_.data(), n);
        offset_ += static_cast<int64_t>(n);
        if (metrics_ != nullptr) metrics_->BytesSent(static_cast<int64_t>(n));
      }
      reading_ = false;
    }
    Advance();
  }

  // Where the file could not be opened: the end, with nothing read.
  void Ended(grpc::Status status) {
    {
      absl::MutexLock lock(&mu_);
      end_ = std::move(status);
      reading_ = false;
    }
    Advance();
  }

  // Once neither a read nor a write is in flight: finishes at the end, or
  // sends the chunk read and reads the one after it. gRPC is called outside
  // the lock.
  void Advance() {
    bool finish = false, write = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || reading_ || finished_) return;
      if (end_.has_value()) {
        finished_ = finish = true;
        status = *end_;
      } else {
        std::swap(current_, next_);
        writing_ = reading_ = write = true;
      }
    }
    if (finish) {
      Finish(status);
      return;
    }
    if (write) {
      StartWrite(&current_);
      if (!io_->Schedule([this] { Read(); })) {
        {
          absl::MutexLock lock(&mu_);
          if (!end_.has_value()) end_ = Busy();
          reading_ = false;
        }
        Advance();
      }
    }
  }

  OrgSlots* const slots_;
  const std::string org_;
  const v1::Artifact artifact_;
  std::vector<char> buffer_;
  Metrics* const metrics_;
  Executor* const io_;
  std::FILE* file_ = nullptr;
  absl::Mutex mu_;
  int64_t offset_ ABSL_GUARDED_BY(mu_);
  bool first_ ABSL_GUARDED_BY(mu_) = true;
  // The first read is in flight from the start.
  bool reading_ ABSL_GUARDED_BY(mu_) = true;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // How the call ends, once known (end of file, an error, a cancel).
  std::optional<grpc::Status> end_ ABSL_GUARDED_BY(mu_);
  v1::DownloadChunk current_;                    // being written
  v1::DownloadChunk next_ ABSL_GUARDED_BY(mu_);  // read, not yet sent
};

ArtifactServiceImpl::ArtifactServiceImpl(Storage* storage, Executor* executor,
                                         Executor* rpc_executor,
                                         Executor* io_executor,
                                         JobManager* jobs,
                                         const TokenStore* tokens,
                                         ArtifactServiceOptions options)
    : storage_(storage),
      executor_(executor),
      rpc_executor_(rpc_executor),
      io_executor_(io_executor),
      jobs_(jobs),
      tokens_(tokens),
      options_(options),
      uploads_(options.max_uploads_per_org),
      downloads_(options.max_downloads_per_org, "downloads") {
  expirer_ = std::thread([this] { ExpireUploads(); });
}

ArtifactServiceImpl::~ArtifactServiceImpl() {
  {
    absl::MutexLock lock(&stop_mu_);
    stopping_ = true;
  }
  expirer_.join();
}

void ArtifactServiceImpl::ExpireUploads() {
  const absl::Duration period = std::clamp(
      options_.upload_expiry / 4, absl::Milliseconds(250), absl::Minutes(10));
  absl::MutexLock lock(&stop_mu_);
  while (true) {
    const int64_t cutoff =
        absl::ToUnixSeconds(absl::Now() - options_.upload_expiry);
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> stale =
        storage_->StaleUploads(cutoff);
    if (!stale.ok()) {
      Log(LogLevel::kWarning, LogFields("upload_expiry_failed")
                                  .Add("error", stale.status().message()));
    } else {
      for (const auto& [owner, id] : *stale) {
        uploads_.RemoveIfIdle(storage_, owner, id, cutoff);
      }
    }
    if (stop_mu_.AwaitWithTimeout(absl::Condition(&stopping_), period)) {
      return;
    }
  }
}

grpc::ServerUnaryReactor* ArtifactServiceImpl::GetUpload(
    grpc::CallbackServerContext* context, const v1::GetUploadRequest* request,
    v1::UploadStatus* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) -> absl::StatusOr<v1::UploadStatus> {
        if (request->upload_id().empty()) {
          return absl::InvalidArgumentError("upload_id is empty");
        }
        AMALGAM_ASSIGN_OR_RETURN(
            PartialUpload upload,
            storage_->FindUpload(org, request->upload_id()));
        v1::UploadStatus status;
        status.set_upload_id(request->upload_id());
        status.set_committed_bytes(upload.committed_bytes);
        status.set_size_bytes(upload.header.size_bytes());
        status.set_artifact_id(upload.artifact_id);
        return status;
      });
}

grpc::ServerReadReactor<v1::UploadRequest>* ArtifactServiceImpl::Upload(
    grpc::CallbackServerContext* context, v1::UploadResponse* response) {
  absl::StatusOr<std::string> org = Authenticate(*context, tokens_);
  if (!org.ok()) {
    return new FailedReactor<grpc::ServerReadReactor<v1::UploadRequest>>(
        org.status());
  }
  return new UploadReactor(this, context, *org, response);
}

grpc::ServerUnaryReactor* ArtifactServiceImpl::ListArtifacts(
    grpc::CallbackServerContext* context,
    const v1::ListArtifactsRequest* request,
    v1::ListArtifactsResponse* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) -> absl::StatusOr<v1::ListArtifactsResponse> {
        AMALGAM_ASSIGN_OR_RETURN(std::vector<v1::Artifact> artifacts,
                                 storage_->ListArtifacts(org));
        v1::ListArtifactsResponse list;
        for (v1::Artifact& artifact : artifacts) {
          if (request->kind() != v1::ARTIFACT_KIND_UNSPECIFIED &&
              request->kind() != artifact.kind()) {
            continue;
          }
          if (ViewFor(org, &artifact)) {
            *list.add_artifacts() = std::move(artifact);
          }
        }
        return list;
      });
}

grpc::ServerUnaryReactor* ArtifactServiceImpl::GetArtifact(
    grpc::CallbackServerContext* context, const v1::GetArtifactRequest* request,
    v1::Artifact* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) -> absl::StatusOr<v1::Artifact> {
        AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact,
                                 storage_->GetArtifactFor(request->id(), org));
        AMALGAM_ASSIGN_OR_RETURN(auto reader, storage_->OpenBlob(artifact));
        for (const core::TensorInfo& tensor : reader->tensors()) {
          v1::TensorInfo* info = artifact.add_tensors();
          info->set_name(tensor.name);
          info->set_dtype(ToProtoDType(tensor.dtype));
          for (int64_t dim : tensor.shape) info->add_shape(dim);
        }
        return artifact;
      });
}

grpc::ServerUnaryReactor* ArtifactServiceImpl::DeleteArtifact(
    grpc::CallbackServerContext* context,
    const v1::DeleteArtifactRequest* request,
    v1::DeleteArtifactResponse* response) {
  return ServeUnary(context, tokens_, rpc_executor_, response,
                    [=](const std::string& org)
                        -> absl::StatusOr<v1::DeleteArtifactResponse> {
                      AMALGAM_ASSIGN_OR_RETURN(
                          v1::Artifact artifact,
                          OwnedArtifact(request->id(), org));
                      AMALGAM_RETURN_IF_ERROR(jobs_->DeleteIfUnused(artifact));
                      Log(LogLevel::kInfo, LogFields("delete")
                                               .Add("artifact", artifact.id())
                                               .Add("owner", org));
                      return v1::DeleteArtifactResponse();
                    });
}

grpc::ServerUnaryReactor* ArtifactServiceImpl::ShareArtifact(
    grpc::CallbackServerContext* context,
    const v1::ShareArtifactRequest* request,
    v1::ShareArtifactResponse* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) -> absl::StatusOr<v1::ShareArtifactResponse> {
        if (request->organization().empty()) {
          return absl::InvalidArgumentError("organization is empty");
        }
        AMALGAM_RETURN_IF_ERROR(OwnedArtifact(request->id(), org).status());
        AMALGAM_ASSIGN_OR_RETURN(
            v1::Artifact artifact,
            // Owners never change: OwnedArtifact's check holds here too.
            storage_->ModifyArtifact(
                request->id(), [&](v1::Artifact& artifact) -> absl::Status {
                  auto* shared = artifact.mutable_shared_with();
                  shared->erase(std::remove(shared->begin(), shared->end(),
                                            request->organization()),
                                shared->end());
                  if (!request->revoke() && request->organization() != org) {
                    artifact.add_shared_with(request->organization());
                  }
                  return absl::OkStatus();
                }));
        Log(LogLevel::kInfo, LogFields(request->revoke() ? "revoke" : "share")
                                 .Add("artifact", artifact.id())
                                 .Add("owner", org)
                                 .Add("with", request->organization()));
        return v1::ShareArtifactResponse();
      });
}

absl::StatusOr<v1::Artifact> ArtifactServiceImpl::OwnedArtifact(
    const std::string& id, const std::string& org) {
  AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact,
                           storage_->GetArtifactFor(id, org));
  if (artifact.owner() != org) {
    return absl::PermissionDeniedError(
        absl::StrCat("artifact ", id, " is shared with ", org,
                     " read-only; only its owner ", "may delete or share it"));
  }
  return artifact;
}

grpc::ServerWriteReactor<v1::DownloadChunk>* ArtifactServiceImpl::Download(
    grpc::CallbackServerContext* context, const v1::DownloadRequest* request) {
  std::string org;
  absl::StatusOr<v1::Artifact> artifact =
      [&]() -> absl::StatusOr<v1::Artifact> {
    AMALGAM_ASSIGN_OR_RETURN(org, Authenticate(*context, tokens_));
    AMALGAM_ASSIGN_OR_RETURN(
        v1::Artifact found,
        storage_->GetArtifactFor(request->artifact_id(), org));
    if (request->offset() < 0 || request->offset() > found.size_bytes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("offset ", request->offset(), " is outside artifact ",
                       found.id(), " of ", found.size_bytes(), " bytes"));
    }
    AMALGAM_RETURN_IF_ERROR(downloads_.Acquire(org));
    return found;
  }();
  if (!artifact.ok()) {
    return new FailedReactor<grpc::ServerWriteReactor<v1::DownloadChunk>>(
        artifact.status());
  }
  return new DownloadReactor(*artifact, storage_->BlobPath(*artifact),
                             request->offset(), options_.chunk_bytes,
                             options_.metrics, &downloads_, org, io_executor_);
}

}  // namespace amalgam::server
