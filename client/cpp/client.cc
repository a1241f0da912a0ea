#include "client/cpp/client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "grpcpp/grpcpp.h"

namespace amalgam::client {
namespace {

namespace v1 = ::amalgam::v1;

// Framing and the rest of an UploadRequest around its data bytes.
constexpr int64_t kChunkOverheadBytes = 4096;

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  const int error = errno;
  std::string message =
      absl::StrCat(what, " ", path, ": ", std::strerror(error));
  if (error == ENOENT) return absl::NotFoundError(message);
  if (error == EACCES || error == EPERM) {
    return absl::PermissionDeniedError(message);
  }
  return absl::InternalError(message);
}

// Writes all of `data` to `fd`.
absl::Status WriteAll(int fd, const std::string& data,
                      const std::string& path) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("cannot write", path);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Owns a file descriptor; closes it on destruction.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now, reporting the error that close() may surface.
  int Close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

// Errors after which an upload is worth resuming: the connection or the
// server went away, or the previous stream of the upload was still open.
bool IsRetryable(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsAborted(status);
}

// The default id of an upload: a digest of its header, so that uploading the
// same bytes under the same name again (say, rerunning a command that was
// cut off) resumes where the first attempt stopped.
std::string DerivedUploadId(const v1::UploadHeader& header,
                            const std::vector<UploadPart>& parts) {
  core::Sha256 hash;
  hash.Update(absl::StrCat(header.kind(), "\n", header.name(), "\n",
                           header.describes(), "\n", header.size_bytes(), "\n",
                           header.sha256()));
  // A model directory: how its bytes divide into files, too.
  for (const v1::ModelFile& file : header.files()) {
    hash.Update(absl::StrCat("\n", file.name(), "\n", file.size_bytes()));
  }
  // Not hashed first: which files these are, as they were.
  if (header.sha256().empty()) {
    for (const UploadPart& part : parts) {
      hash.Update(
          absl::StrCat("\n", part.device, ":", part.inode, ":", part.mtime_ns));
    }
  }
  return hash.HexDigest().substr(0, 32);
}

// The files of an upload read as one stream of bytes.
class UploadSource {
 public:
  explicit UploadSource(std::vector<UploadPart> parts)
      : parts_(std::move(parts)) {}

  // Positions the stream at byte `offset` of the concatenation.
  absl::Status Seek(int64_t offset) {
    index_ = 0;
    while (index_ < parts_.size() && offset >= parts_[index_].size) {
      offset -= parts_[index_++].size;
    }
    return Open(offset);
  }

  // Reads the next `n` bytes into `out`; DATA_LOSS naming the file when it
  // holds fewer than it did when the upload began.
  absl::Status Read(char* out, int64_t n) {
    while (n > 0) {
      if (index_ >= parts_.size()) {
        return absl::DataLossError("read past the end of the upload");
      }
      const UploadPart& part = parts_[index_];
      const int64_t take = std::min(n, part.size - within_);
      if (!in_.read(out, take)) {
        return absl::DataLossError(
            absl::StrCat("cannot read ", part.path, " at offset ", within_,
                         " (was it changed during the upload?)"));
      }
      out += take;
      n -= take;
      within_ += take;
      if (within_ == part.size) {
        ++index_;
        AMALGAM_RETURN_IF_ERROR(Open(0));
      }
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Open(int64_t within) {
    in_.close();
    in_.clear();
    within_ = within;
    if (index_ >= parts_.size()) return absl::OkStatus();
    in_.open(parts_[index_].path, std::ios::binary);
    if (!in_) return ErrnoError("cannot open", parts_[index_].path);
    in_.seekg(within);
    return absl::OkStatus();
  }

  const std::vector<UploadPart> parts_;
  size_t index_ = 0;
  int64_t within_ = 0;
  std::ifstream in_;
};

// How messages name what `parts` upload: the file, or the directory.
std::string WhatIsUploaded(const std::vector<UploadPart>& parts) {
  if (parts.size() == 1) return parts.front().path;
  return std::filesystem::path(parts.front().path).parent_path().string();
}

// The regular file `path` as an upload part: NOT_FOUND when missing,
// INVALID_ARGUMENT when unreadable or not a file.
absl::StatusOr<UploadPart> Part(const std::filesystem::path& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    std::string message =
        absl::StrCat("cannot read ", path.string(), ": ", std::strerror(errno));
    if (errno == ENOENT) return absl::NotFoundError(message);
    return absl::InvalidArgumentError(message);
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.string(), " is not a regular file"));
  }
  UploadPart part;
  part.path = path.string();
  part.size = static_cast<int64_t>(st.st_size);
  part.device = static_cast<uint64_t>(st.st_dev);
  part.inode = static_cast<uint64_t>(st.st_ino);
  part.mtime_ns =
      static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return part;
}

// What uploading `path` sends: the file, or the files of the directory
// sorted by name (set in `header`'s files, with the total size).
absl::StatusOr<std::vector<UploadPart>> UploadParts(const std::string& path,
                                                    v1::UploadHeader* header) {
  std::error_code error;
  if (!std::filesystem::is_directory(path, error)) {
    AMALGAM_ASSIGN_OR_RETURN(UploadPart part, Part(path));
    header->set_size_bytes(part.size);
    return std::vector<UploadPart>{std::move(part)};
  }
  std::vector<std::filesystem::path> entries;
  for (const auto& entry : std::filesystem::directory_iterator(path, error)) {
    entries.push_back(entry.path());
  }
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot list ", path, ": ", error.message()));
  }
  std::sort(entries.begin(), entries.end());
  std::vector<UploadPart> parts;
  int64_t total = 0;
  for (const std::filesystem::path& entry : entries) {
    if (!std::filesystem::is_regular_file(entry, error)) {
      return absl::InvalidArgumentError(
          absl::StrCat(entry.string(),
                       " is not a regular file; a model directory holds "
                       "files only"));
    }
    AMALGAM_ASSIGN_OR_RETURN(UploadPart part, Part(entry));
    v1::ModelFile* file = header->add_files();
    file->set_name(entry.filename().string());
    file->set_size_bytes(part.size);
    total += part.size;
    parts.push_back(std::move(part));
  }
  header->set_size_bytes(total);
  return parts;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

namespace {

// The contents of a PEM file; NOT_FOUND naming it when unreadable.
absl::StatusOr<std::string> ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Create(
    const ClientOptions& options) {
  if (options.address.empty()) {
    return absl::InvalidArgumentError("empty server address");
  }
  if (options.max_send_message_bytes <= 0 ||
      options.max_receive_message_bytes <= 0) {
    return absl::InvalidArgumentError("message size limits must be positive");
  }
  if (options.chunk_bytes <= 0 || options.chunk_bytes + kChunkOverheadBytes >
                                      options.max_send_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk size ", options.chunk_bytes, " does not fit in a message of ",
        options.max_send_message_bytes, " bytes"));
  }
  if (options.unary_deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("unary deadline must be positive");
  }
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(options.max_send_message_bytes);
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  if (!options.tls_ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    AMALGAM_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(options.tls_ca));
    if (options.tls_cert.empty() != options.tls_key.empty()) {
      return absl::InvalidArgumentError(
          "a client certificate needs both --tls-cert and --tls-key");
    }
    if (!options.tls_cert.empty()) {
      AMALGAM_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(options.tls_cert));
      AMALGAM_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(options.tls_key));
    }
    credentials = grpc::SslCredentials(ssl);
  } else if (!options.tls_cert.empty() || !options.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert/--tls-key need --tls-ca (the server's CA)");
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.address, credentials, args);
  return std::make_unique<Client>(options, std::move(channel));
}

Client::Client(const ClientOptions& options,
               std::shared_ptr<grpc::Channel> channel)
    : options_(options),
      channel_(std::move(channel)),
      artifacts_(v1::ArtifactService::NewStub(channel_)),
      jobs_(v1::JobService::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> Client::Unary(
    Stub& stub,
    grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                 Response*),
    const Request& request) const {
  grpc::ClientContext context;
  Prepare(&context, /*unary=*/true);
  Response response;
  AMALGAM_RETURN_IF_ERROR(
      FromGrpcStatus((stub.*method)(&context, request, &response)));
  return response;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus>
Client::CheckHealth(const std::string& service) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  AMALGAM_ASSIGN_OR_RETURN(
      grpc::health::v1::HealthCheckResponse response,
      Unary(*health_, &grpc::health::v1::Health::Stub::Check, request));
  return response.status();
}

void Client::Prepare(grpc::ClientContext* context, bool unary) const {
  if (!options_.token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.token);
  }
  if (unary) {
    context->set_deadline(
        absl::ToChronoTime(absl::Now() + options_.unary_deadline));
  }
}

absl::StatusOr<v1::Artifact> Client::Upload(
    v1::ArtifactKind kind, const std::string& path, const std::string& name,
    const std::string& describes, const ProgressCallback& progress,
    const std::string& upload_id, bool dedup) {
  v1::UploadHeader header;
  AMALGAM_ASSIGN_OR_RETURN(const std::vector<UploadPart> parts,
                           UploadParts(path, &header));
  header.set_kind(kind);
  header.set_name(name);
  header.set_describes(describes);
  if (dedup || header.size_bytes() < options_.dedup_below_bytes) {
    std::vector<std::string> paths;
    for (const UploadPart& part : parts) paths.push_back(part.path);
    AMALGAM_ASSIGN_OR_RETURN(const std::string sha256,
                             core::Sha256Files(paths, nullptr));
    header.set_sha256(sha256);
  }
  header.set_upload_id(upload_id.empty() ? DerivedUploadId(header, parts)
                                         : upload_id);

  absl::Duration backoff = options_.retry_backoff;
  int64_t offset = 0;
  std::string held_sha256;
  for (int attempt = 0;; ++attempt) {
    {
      // Where to go on from: what the server holds, or the start.
      absl::StatusOr<v1::UploadStatus> held = GetUpload(header.upload_id());
      if (held.ok() && !held->artifact_id().empty()) {
        // Finished already (the response of that stream was lost).
        return GetArtifact(held->artifact_id());
      }
      if (held.ok()) {
        offset = held->committed_bytes();
        held_sha256 = held->held_sha256();
      } else if (absl::IsNotFound(held.status())) {
        offset = 0;
      } else if (!IsRetryable(held.status()) ||
                 attempt >= options_.upload_retries) {
        return held.status();
      } else {
        absl::SleepFor(backoff);
        backoff = std::min(backoff * 2, absl::Seconds(10));
        continue;
      }
    }
    absl::StatusOr<v1::Artifact> artifact =
        SendUpload(header, parts, offset, held_sha256, progress);
    if (artifact.ok() || !IsRetryable(artifact.status()) ||
        attempt >= options_.upload_retries) {
      return artifact;
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(10));
  }
}

absl::StatusOr<v1::Artifact> Client::SendUpload(
    const v1::UploadHeader& header, const std::vector<UploadPart>& parts,
    int64_t offset, const std::string& held_sha256,
    const ProgressCallback& progress) {
  UploadSource in(parts);
  AMALGAM_RETURN_IF_ERROR(in.Seek(0));
  // Hashed on its own thread while the bytes are sent, unless the header
  // has the digest already.
  const bool trailer = header.sha256().empty();
  core::BackgroundSha256 hash;
  if (offset > 0) {
    // The bytes the server holds must be the files' first bytes still.
    core::Sha256 prefix;
    std::string buffer;
    for (int64_t done = 0; done < offset;) {
      const int64_t n = std::min<int64_t>(options_.chunk_bytes, offset - done);
      buffer.resize(static_cast<size_t>(n));
      AMALGAM_RETURN_IF_ERROR(in.Read(buffer.data(), n));
      prefix.Update(buffer);
      if (trailer) hash.Update(buffer);
      done += n;
    }
    if (prefix.HexDigest() != held_sha256) {
      return absl::FailedPreconditionError(absl::StrCat(
          WhatIsUploaded(parts), " changed since upload ", header.upload_id(),
          " began: its first ", offset,
          " bytes are not the ones the server holds; upload it under a new "
          "upload id"));
    }
  }

  grpc::ClientContext context;
  Prepare(&context, /*unary=*/false);
  v1::UploadResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::UploadRequest>> writer =
      artifacts_->Upload(&context, &response);

  v1::UploadRequest request;
  *request.mutable_header() = header;
  bool open = writer->Write(request);

  const int64_t total = header.size_bytes();
  if (progress) progress(offset, total);
  while (open && offset < total) {
    request.Clear();
    v1::UploadChunk* chunk = request.mutable_chunk();
    chunk->set_offset(offset);
    std::string* data = chunk->mutable_data();
    const int64_t n = std::min(options_.chunk_bytes, total - offset);
    data->resize(static_cast<size_t>(n));
    if (absl::Status read = in.Read(data->data(), n); !read.ok()) {
      context.TryCancel();
      writer->Finish().IgnoreError();
      return read;
    }
    if (trailer) {
      std::string copy = hash.TakeSpare();
      copy.assign(*data);
      hash.Update(std::move(copy));
    }
    open = writer->Write(request);
    if (open) {
      offset += n;
      if (progress) progress(offset, total);
    }
  }
  if (open && trailer) {
    request.Clear();
    request.mutable_trailer()->set_sha256(hash.HexDigest());
    open = writer->Write(request);
  }
  // When a write fails the stream is broken; Finish reports why.
  writer->WritesDone();
  AMALGAM_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
  // The server may answer before all bytes are sent: the upload had
  // finished on an earlier stream.
  if (response.has_artifact()) return std::move(*response.mutable_artifact());
  if (offset < total) {
    return absl::UnavailableError(absl::StrCat(
        "upload stream closed after ", offset, " of ", total, " bytes"));
  }
  return absl::InternalError(
      "the server answered the upload without an artifact");
}

absl::StatusOr<v1::UploadStatus> Client::GetUpload(
    const std::string& upload_id) {
  v1::GetUploadRequest request;
  request.set_upload_id(upload_id);
  return Unary(*artifacts_, &v1::ArtifactService::Stub::GetUpload, request);
}

absl::StatusOr<v1::ListArtifactsResponse> Client::ListArtifacts(
    v1::ArtifactKind kind) {
  v1::ListArtifactsRequest request;
  request.set_kind(kind);
  return Unary(*artifacts_, &v1::ArtifactService::Stub::ListArtifacts, request);
}

absl::StatusOr<v1::Artifact> Client::GetArtifact(const std::string& id) {
  v1::GetArtifactRequest request;
  request.set_id(id);
  return Unary(*artifacts_, &v1::ArtifactService::Stub::GetArtifact, request);
}

absl::StatusOr<v1::DeleteArtifactResponse> Client::DeleteArtifact(
    const v1::DeleteArtifactRequest& request) {
  return Unary(*artifacts_, &v1::ArtifactService::Stub::DeleteArtifact,
               request);
}

absl::StatusOr<v1::ShareArtifactResponse> Client::ShareArtifact(
    const v1::ShareArtifactRequest& request) {
  return Unary(*artifacts_, &v1::ArtifactService::Stub::ShareArtifact, request);
}

absl::StatusOr<v1::Artifact> Client::DownloadModel(
    const std::string& artifact_id, const std::string& dir,
    const ProgressCallback& progress) {
  AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact, GetArtifact(artifact_id));
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot create directory ", dir, ": ", error.message()));
  }
  int64_t done = 0;
  for (const v1::ModelFile& file : artifact.files()) {
    AMALGAM_RETURN_IF_ERROR(
        Download(
            artifact_id, (std::filesystem::path(dir) / file.name()).string(),
            [&](int64_t bytes, int64_t) {
              if (progress) progress(done + bytes, artifact.size_bytes());
            },
            file.name())
            .status());
    done += file.size_bytes();
  }
  return artifact;
}

absl::StatusOr<v1::DownloadChunk> Client::Download(
    const std::string& artifact_id, const std::string& out_path,
    const ProgressCallback& progress, const std::string& file) {
  const std::string tmp_path = out_path + ".tmp";
  Fd fd(
      ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return ErrnoError("cannot create", tmp_path);

  // Removes the temporary file unless the download completes.
  bool done = false;
  struct Cleanup {
    const std::string& path;
    const bool& done;
    ~Cleanup() {
      if (!done) std::remove(path.c_str());
    }
  } cleanup{tmp_path, done};

  grpc::ClientContext context;
  Prepare(&context, /*unary=*/false);
  v1::DownloadRequest request;
  request.set_artifact_id(artifact_id);
  request.set_file(file);
  std::unique_ptr<grpc::ClientReader<v1::DownloadChunk>> reader =
      artifacts_->Download(&context, request);

  v1::DownloadChunk first;
  bool have_first = false;
  core::BackgroundSha256 hash;
  int64_t offset = 0;
  v1::DownloadChunk chunk;
  absl::Status local = absl::OkStatus();
  while (reader->Read(&chunk)) {
    if (!have_first) {
      have_first = true;
      first.set_size_bytes(chunk.size_bytes());
      first.set_sha256(chunk.sha256());
      if (progress) progress(0, first.size_bytes());
    }
    if (chunk.offset() != offset) {
      local = absl::DataLossError(absl::StrCat(
          "chunk at offset ", chunk.offset(), ", expected ", offset));
      break;
    }
    if (offset + static_cast<int64_t>(chunk.data().size()) >
        first.size_bytes()) {
      local = absl::DataLossError(
          absl::StrCat("server sent more than the announced ",
                       first.size_bytes(), " bytes"));
      break;
    }
    local = WriteAll(fd.get(), chunk.data(), tmp_path);
    if (!local.ok()) break;
    offset += static_cast<int64_t>(chunk.data().size());
    // Hashed on its own thread; the next chunk is read into a buffer the
    // hasher is done with.
    std::string data = hash.TakeSpare();
    data.swap(*chunk.mutable_data());
    hash.Update(std::move(data));
    if (progress) progress(offset, first.size_bytes());
  }
  if (!local.ok()) {
    context.TryCancel();
    reader->Finish().IgnoreError();
    return local;
  }
  AMALGAM_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  if (!have_first) {
    return absl::DataLossError("download stream ended without any chunk");
  }
  if (offset != first.size_bytes()) {
    return absl::DataLossError(absl::StrCat("received ", offset, " of ",
                                            first.size_bytes(), " bytes"));
  }
  const std::string digest = hash.HexDigest();
  if (digest != first.sha256()) {
    return absl::DataLossError(absl::StrCat(
        "sha256 mismatch: received ", digest, ", announced ", first.sha256()));
  }
  if (::fsync(fd.get()) != 0) return ErrnoError("cannot fsync", tmp_path);
  if (fd.Close() != 0) return ErrnoError("cannot close", tmp_path);
  if (std::rename(tmp_path.c_str(), out_path.c_str()) != 0) {
    return ErrnoError("cannot rename to", out_path);
  }
  done = true;
  return first;
}

absl::StatusOr<v1::Job> Client::SubmitJob(const v1::SubmitJobRequest& request) {
  return Unary(*jobs_, &v1::JobService::Stub::SubmitJob, request);
}

absl::StatusOr<v1::Job> Client::GetJob(const std::string& id) {
  v1::GetJobRequest request;
  request.set_id(id);
  return Unary(*jobs_, &v1::JobService::Stub::GetJob, request);
}

absl::StatusOr<v1::ListJobsResponse> Client::ListJobs() {
  v1::ListJobsRequest request;
  return Unary(*jobs_, &v1::JobService::Stub::ListJobs, request);
}

absl::StatusOr<v1::Job> Client::WatchJob(const std::string& id,
                                         const JobEventCallback& callback) {
  grpc::ClientContext context;
  Prepare(&context, /*unary=*/false);
  v1::WatchJobRequest request;
  request.set_id(id);
  std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader =
      jobs_->WatchJob(&context, request);
  v1::JobEvent event;
  v1::Job last;
  while (reader->Read(&event)) {
    if (callback) callback(event);
    last = event.job();
  }
  // The server ends the stream after a final state.
  const absl::Status status = FromGrpcStatus(reader->Finish());
  if (IsFinal(last.state())) return last;
  AMALGAM_RETURN_IF_ERROR(status);
  // The stream ended without a final state: ask once more.
  AMALGAM_ASSIGN_OR_RETURN(v1::Job job, GetJob(id));
  if (!IsFinal(job.state())) {
    return absl::AbortedError(absl::StrCat("watch of job ", id,
                                           " ended while the job is ",
                                           v1::JobState_Name(job.state())));
  }
  if (callback) {
    v1::JobEvent final_event;
    *final_event.mutable_job() = job;
    callback(final_event);
  }
  return job;
}

absl::StatusOr<v1::Job> Client::CancelJob(const std::string& id) {
  v1::CancelJobRequest request;
  request.set_id(id);
  return Unary(*jobs_, &v1::JobService::Stub::CancelJob, request);
}

}  // namespace amalgam::client
