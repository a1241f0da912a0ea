#include "server/upload_header.h"

#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/model_files.h"
#include "core/sha256.h"

namespace amalgam::server {

absl::Status ValidateName(const std::string& name, const std::string& field) {
  if (name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has ", name.size(), " bytes; at most ",
                     kMaxNameBytes, " are allowed"));
  }
  for (char c : name) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f || c == '/') {
      return absl::InvalidArgumentError(
          absl::StrCat(field,
                       " holds a control character or '/'; names are one line "
                       "and no path"));
    }
  }
  if (name == "." || name == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " may not be \".\" or \"..\""));
  }
  return absl::OkStatus();
}

absl::Status ValidateUploadHeader(const v1::UploadHeader& header,
                                  int64_t max_upload_bytes) {
  if (header.kind() == v1::ARTIFACT_KIND_UNSPECIFIED ||
      !v1::ArtifactKind_IsValid(header.kind())) {
    return absl::InvalidArgumentError(
        "header.kind must be weights, gram or fisher");
  }
  if (header.size_bytes() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "header.size_bytes is ", header.size_bytes(), "; must be positive"));
  }
  if (header.size_bytes() > max_upload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("header.size_bytes is ", header.size_bytes(),
                     "; this server accepts at most ", max_upload_bytes,
                     " bytes per artifact (--max-upload-bytes)"));
  }
  if (!header.sha256().empty() && !core::IsSha256Hex(header.sha256())) {
    return absl::InvalidArgumentError(
        "header.sha256 must be 64 lower-case hex digits (or empty, with the "
        "digest in the stream's trailer)");
  }
  if (absl::Status name = ValidateName(header.name(), "header.name");
      !name.ok()) {
    return name;
  }
  if (!header.describes().empty() &&
      header.kind() == v1::ARTIFACT_KIND_WEIGHTS) {
    return absl::InvalidArgumentError(
        "header.describes is for gram and fisher uploads only");
  }
  if (header.files_size() > kMaxModelFiles) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.files lists ", header.files_size(),
                     " files; at most ", kMaxModelFiles, " are accepted"));
  }
  if (header.files_size() > 0) {
    std::vector<std::string> names;
    int64_t total = 0;
    for (const v1::ModelFile& file : header.files()) {
      if (file.size_bytes() <= 0 || file.size_bytes() > header.size_bytes()) {
        return absl::InvalidArgumentError(
            absl::StrCat("header.files: file \"", absl::CHexEscape(file.name()),
                         "\" has size_bytes ", file.size_bytes(),
                         "; must be positive and within header.size_bytes"));
      }
      names.push_back(file.name());
      total += file.size_bytes();
    }
    if (absl::Status layout = core::CheckModelFiles(names).status();
        !layout.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.files: ", layout.message()));
    }
    if (total != header.size_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header.files add up to ", total, " bytes but header.size_bytes is ",
          header.size_bytes()));
    }
  }
  return ValidateIdentifier(header.upload_id(), "header.upload_id",
                            kMaxUploadIdBytes);
}

absl::Status ValidateIdentifier(const std::string& value,
                                const std::string& field, size_t max_bytes) {
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has ", value.size(),
                                                   " bytes; at most ",
                                                   max_bytes, " are allowed"));
  }
  for (char c : value) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' &&
        c != '-' && c != '.') {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " may only hold letters, digits, '_', '-' and '.'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace amalgam::server
