#include "server/artifact_service.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "server/grpc_status.h"
#include "server/log.h"
#include "server/rpc_util.h"

namespace amalgam::server {
namespace {

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

// The file of `artifact` a download of `name` sends: that file (NOT_FOUND
// naming the files there are), or, for an empty name, the one .safetensors
// file (FAILED_PRECONDITION where the model is sharded).
absl::StatusOr<v1::ModelFile> FileToSend(const v1::Artifact& artifact,
                                         const std::string& name) {
  const std::vector<v1::ModelFile> files = ArtifactFiles(artifact);
  std::vector<std::string> names;
  std::vector<const v1::ModelFile*> tensors;
  for (const v1::ModelFile& file : files) {
    if (!name.empty() && file.name() == name) return file;
    names.push_back(file.name());
    if (absl::EndsWith(file.name(), ".safetensors")) tensors.push_back(&file);
  }
  if (!name.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "artifact ", artifact.id(), " has no file \"", absl::CHexEscape(name),
        "\"; its files: ", absl::StrJoin(names, ", ")));
  }
  if (tensors.size() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "artifact ", artifact.id(), " is a model in ", tensors.size(),
        " shards; download its files one by one (DownloadRequest.file), as "
        "`amalgam download ",
        artifact.id(), " --out DIR` does"));
  }
  return *tensors.front();
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

// Moves an upload stream's messages into its UploadManager::Session. The
// header begins it and each chunk is appended on the reaction thread (a
// chunk is one write into the page cache; on the I/O executor, one hop per
// message, 64 KiB uploads under load ran at 0.63x, see bench/README.md);
// the verification of the complete upload runs on the executor.
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

  void OnReadDone(bool ok) override {
    if (!ok) {
      Complete();
    } else if (session_ == nullptr) {
      BeginSession();
    } else if (request_.has_header()) {
      Fail(absl::InvalidArgumentError("upload header sent twice"));
    } else if (absl::Status received =
                   request_.has_trailer()
                       ? session_->Trailer(request_.trailer())
                       : session_->Append(request_.mutable_chunk());
               !received.ok()) {
      Fail(received);
    } else {
      StartRead(&request_);
    }
  }

  void OnDone() override { delete this; }

 private:
  // Inline: one hop to the I/O executor at the start and one at the end of
  // each stream measured 0.69x in load_test (64 KiB uploads, 2 cores); the
  // catalog calls here are short (bench/README.md).
  void BeginSession() {
    if (!request_.has_header()) {
      Fail(absl::InvalidArgumentError(
          "the first upload message must carry the header"));
      return;
    }
    grpc::CallbackServerContext* context = context_;
    absl::StatusOr<std::unique_ptr<UploadManager::Session>> session =
        service_->uploads_->Begin(owner_, request_.header(),
                                  [context] { context->TryCancel(); });
    if (!session.ok()) {
      Fail(session.status());
      return;
    }
    session_ = *std::move(session);
    upload_id_ = request_.header().upload_id();
    if (session_->finished().has_value()) {
      Answer(*session_->finished());
    } else {
      StartRead(&request_);
    }
  }

  void Complete() {
    if (session_ == nullptr) {
      Fail(absl::InvalidArgumentError("upload stream carried no header"));
      return;
    }
    absl::Status ended = session_->EndOfStream();
    if (!ended.ok()) {
      Fail(ended);
      return;
    }
    const bool scheduled = service_->executor_->Schedule([this] {
      const absl::Time start = absl::Now();
      absl::StatusOr<v1::Artifact> artifact = session_->Complete();
      if (!artifact.ok()) {
        Fail(artifact.status());
        return;
      }
      Log(LogLevel::kInfo,
          LogFields("upload")
              .Add("artifact", artifact->id())
              .Add("owner", owner_)
              .Add("kind", v1::ArtifactKind_Name(artifact->kind()))
              .Add("bytes", artifact->size_bytes())
              .Add("verify_ms",
                   absl::ToDoubleMilliseconds(absl::Now() - start)));
      Answer(*artifact);
    });
    if (!scheduled) {
      Fail(absl::ResourceExhaustedError(
          "too many uploads are being verified; retry later"));
    }
  }

  void Answer(const v1::Artifact& artifact) {
    *response_->mutable_artifact() = artifact;
    response_->set_upload_id(upload_id_);
    End(grpc::Status::OK);
  }

  void Fail(const absl::Status& status) {
    Log(LogLevel::kInfo,
        LogFields("upload_failed")
            .Add("owner", owner_)
            .Add("code", absl::StatusCodeToString(status.code()))
            .Add("error", status.message()));
    End(ToGrpcStatus(status));
  }

  // Closes the session (its stream's slot is free again before the client
  // hears the answer), then answers.
  void End(const grpc::Status& status) {
    session_.reset();
    Finish(status);
  }

  ArtifactServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  const std::string owner_;
  v1::UploadResponse* const response_;
  v1::UploadRequest request_;
  std::string upload_id_;
  std::unique_ptr<UploadManager::Session> session_;
};

// Streams a blob in chunks; the first carries the size and sha256.
class ArtifactServiceImpl::DownloadReactor
    : public grpc::ServerWriteReactor<v1::DownloadChunk> {
 public:
  // Holds one of `org`'s download slots until done. The file is opened and
  // read on `io`, off the gRPC reaction thread, one chunk ahead of the write
  // in flight (so reading and sending overlap).
  DownloadReactor(std::string artifact_id, v1::ModelFile file,
                  const std::string& path, int64_t offset, int64_t chunk_bytes,
                  Metrics* metrics, OrgSlots* slots, std::string org,
                  Executor* io)
      : slots_(slots),
        org_(std::move(org)),
        artifact_id_(std::move(artifact_id)),
        file_info_(std::move(file)),
        offset_(offset),
        buffer_(chunk_bytes),
        metrics_(metrics),
        io_(io) {
    if (!io_->Schedule([this, path] {
          file_ = std::fopen(path.c_str(), "rb");
          if (file_ == nullptr) {
            Ended(grpc::Status(
                grpc::StatusCode::DATA_LOSS,
                absl::StrCat("file ", file_info_.name(), " of artifact ",
                             artifact_id_, " is missing")));
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
          next_.set_size_bytes(file_info_.size_bytes());
          next_.set_sha256(file_info_.sha256());
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
  const std::string artifact_id_;
  const v1::ModelFile file_info_;
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

ArtifactServiceImpl::ArtifactServiceImpl(
    Storage* storage, UploadManager* uploads, Executor* executor,
    Executor* rpc_executor, Executor* io_executor, JobManager* jobs,
    const TokenStore* tokens, ArtifactServiceOptions options)
    : storage_(storage),
      uploads_(uploads),
      executor_(executor),
      rpc_executor_(rpc_executor),
      io_executor_(io_executor),
      jobs_(jobs),
      tokens_(tokens),
      options_(options),
      downloads_(options.max_downloads_per_org, "downloads") {}

grpc::ServerUnaryReactor* ArtifactServiceImpl::GetUpload(
    grpc::CallbackServerContext* context, const v1::GetUploadRequest* request,
    v1::UploadStatus* response) {
  return ServeUnary(
      context, tokens_, rpc_executor_, response,
      [=](const std::string& org) -> absl::StatusOr<v1::UploadStatus> {
        return uploads_->Status(org, request->upload_id());
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
        // Artifacts stored before models had files are described the same.
        if (artifact.files().empty()) {
          for (const v1::ModelFile& file : ArtifactFiles(artifact)) {
            *artifact.add_files() = file;
          }
        }
        DescribeTensors(*reader, &artifact);
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
  v1::ModelFile file;
  absl::StatusOr<v1::Artifact> artifact =
      [&]() -> absl::StatusOr<v1::Artifact> {
    AMALGAM_ASSIGN_OR_RETURN(org, Authenticate(*context, tokens_));
    AMALGAM_ASSIGN_OR_RETURN(
        v1::Artifact found,
        storage_->GetArtifactFor(request->artifact_id(), org));
    AMALGAM_ASSIGN_OR_RETURN(file, FileToSend(found, request->file()));
    if (request->offset() < 0 || request->offset() > file.size_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "offset ", request->offset(), " is outside file ", file.name(),
          " of artifact ", found.id(), " (", file.size_bytes(), " bytes)"));
    }
    AMALGAM_RETURN_IF_ERROR(downloads_.Acquire(org));
    return found;
  }();
  if (!artifact.ok()) {
    return new FailedReactor<grpc::ServerWriteReactor<v1::DownloadChunk>>(
        artifact.status());
  }
  return new DownloadReactor(artifact->id(), file,
                             storage_->BlobPath(file.sha256()),
                             request->offset(), options_.chunk_bytes,
                             options_.metrics, &downloads_, org, io_executor_);
}

}  // namespace amalgam::server
