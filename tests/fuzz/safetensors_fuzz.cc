// Fuzzes the safetensors reader: any bytes must give a clean error or a
// reader whose tensors all lie inside the file.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/safetensors.h"

namespace {

// The reader maps files, so each input is written to one per process,
// removed at exit.
struct InputFile {
  InputFile() {
    const char* dir = std::getenv("TMPDIR");
    path = std::string(dir != nullptr ? dir : "/tmp") +
           "/amalgam-safetensors-fuzz-" + std::to_string(::getpid());
  }
  ~InputFile() { std::remove(path.c_str()); }
  std::string path;
};

const std::string& InputPath() {
  static const InputFile file;
  return file.path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::FILE* file = std::fopen(InputPath().c_str(), "wb");
  if (file == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, file) != size) std::abort();
  std::fclose(file);
  auto reader = amalgam::core::SafetensorsReader::Open(InputPath());
  if (!reader.ok()) return 0;
  uint64_t total = 0;
  for (const amalgam::core::TensorInfo& tensor : (*reader)->tensors()) {
    absl::Span<const uint8_t> bytes = (*reader)->Data(tensor);
    // Touch the first and last byte: out-of-file spans crash here.
    if (!bytes.empty()) total += bytes.front() + bytes.back();
    (*reader)->Release(tensor.name);
  }
  amalgam::core::CheckAllFinite(**reader).IgnoreError();
  return total == 0xdeadbeef ? 1 : 0;  // keeps `total` alive
}
