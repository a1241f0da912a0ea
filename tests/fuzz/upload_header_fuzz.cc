// Fuzzes the first message of an upload stream: bytes parsed as an
// UploadRequest, then the header checks the server runs before storing a byte.
#include <cstdint>
#include <cstdlib>

#include "amalgam/v1/amalgam.pb.h"
#include "google/protobuf/stubs/logging.h"
#include "server/upload_header.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Invalid UTF-8 in string fields is logged on every such input.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  amalgam::v1::UploadRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  constexpr int64_t kMaxUploadBytes = int64_t{1} << 30;
  const amalgam::v1::UploadHeader& header = request.header();
  absl::Status status =
      amalgam::server::ValidateUploadHeader(header, kMaxUploadBytes);
  if (status.ok()) {
    // What the checks promise to the code that runs after them.
    // (An empty sha256: the trailer carries it.)
    if (header.size_bytes() < 1 || header.size_bytes() > kMaxUploadBytes ||
        (!header.sha256().empty() && header.sha256().size() != 64) ||
        header.upload_id().size() > amalgam::server::kMaxUploadIdBytes ||
        header.name().size() > amalgam::server::kMaxNameBytes) {
      std::abort();
    }
    // A model directory's files add up to the whole.
    int64_t total = 0;
    for (const amalgam::v1::ModelFile& file : header.files()) {
      if (file.size_bytes() < 1) std::abort();
      total += file.size_bytes();
    }
    if (header.files_size() > 0 && total != header.size_bytes()) std::abort();
  } else if (status.code() == absl::StatusCode::kResourceExhausted) {
    if (header.size_bytes() <= kMaxUploadBytes) std::abort();
  } else if (status.code() != absl::StatusCode::kInvalidArgument) {
    std::abort();
  }
  return 0;
}
