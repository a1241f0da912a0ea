#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "core/model_files.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors I/O assumes a little-endian host"
#endif

namespace amalgam::core {
namespace {

using Json = nlohmann::json;

// Headers larger than this are refused: real ones are a few MiB at most.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
// Index files (*.index.json) are refused above this size.
constexpr uint64_t kMaxIndexBytes = uint64_t{100} << 20;
// Buffer of the writer's FILE*.
constexpr size_t kWriteBufferBytes = size_t{4} << 20;
constexpr char kIndexSuffix[] = ".index.json";

std::string ErrnoText(int error) { return std::strerror(error); }

// Status for a failed open/stat of `path`.
absl::Status FileError(absl::string_view what, const std::string& path,
                       int error) {
  std::string message = absl::StrCat(what, " ", path, ": ", ErrnoText(error));
  if (error == ENOENT || error == ENOTDIR) {
    return absl::NotFoundError(message);
  }
  if (error == EACCES || error == EPERM) {
    return absl::PermissionDeniedError(message);
  }
  if (error == ENOSPC || error == EDQUOT) {
    return absl::ResourceExhaustedError(message);
  }
  return absl::InternalError(message);
}

// Prefixes the message of a non-OK `status` with `prefix`, keeping the code.
absl::Status Annotate(const absl::Status& status, absl::string_view prefix) {
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(prefix, ": ", status.message()));
}

std::string Quoted(absl::string_view name) {
  return absl::StrCat("\"", name, "\"");
}

// `text` with control characters, quotes and backslashes escaped, cut to
// 200 bytes: a name from a file, fit for a message.
std::string Printable(absl::string_view text) {
  std::string out;
  for (char c : text.substr(0, 200)) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f || c == '"' || c == '\\') {
      absl::StrAppendFormat(&out, "\\x%02x", byte);
    } else {
      out += c;
    }
  }
  if (text.size() > 200) out += "...";
  return out;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Number of elements of `shape`; INVALID_ARGUMENT on overflow or a negative
// dimension. `what` names the tensor in messages.
absl::StatusOr<int64_t> NumElements(const std::vector<int64_t>& shape,
                                    absl::string_view what) {
  int64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": negative dimension ", dim, " in shape ", ShapeText(shape)));
    }
    if (__builtin_mul_overflow(numel, dim, &numel)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": shape ", ShapeText(shape), " has too many elements"));
    }
  }
  return numel;
}

// numel * DTypeSize(dtype) with an overflow check.
absl::StatusOr<uint64_t> NumBytes(int64_t numel, DType dtype,
                                  const std::vector<int64_t>& shape,
                                  absl::string_view what) {
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel),
                             static_cast<uint64_t>(DTypeSize(dtype)),
                             &nbytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": shape ", ShapeText(shape), " of ", DTypeName(dtype),
        " needs more bytes than fit in 64 bits"));
  }
  return nbytes;
}

absl::StatusOr<DType> DTypeForTensor(const std::string& dtype,
                                     absl::string_view name) {
  absl::StatusOr<DType> parsed = ParseDType(dtype);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown dtype ", Quoted(dtype), " for tensor ",
                     Quoted(name), " (supported: F16, BF16, F32, F64)"));
  }
  return *parsed;
}

}  // namespace

absl::Status CheckJsonDepth(absl::string_view text, int max_depth,
                            absl::string_view what) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " nests JSON arrays or objects deeper than ", max_depth,
            " levels (at byte ", i, "); the format has no such nesting"));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

namespace {

// One entry of the header, with its data offsets relative to the data
// section.
struct ParsedEntry {
  TensorInfo info;
  uint64_t begin = 0;
  uint64_t end = 0;
};

absl::StatusOr<ParsedEntry> ParseEntry(const std::string& name,
                                       const Json& entry, uint64_t data_size) {
  if (name.empty()) {
    return absl::InvalidArgumentError("a tensor has an empty name");
  }
  for (size_t i = 0; i < name.size(); ++i) {
    const auto byte = static_cast<unsigned char>(name[i]);
    if (byte < 0x20 || byte == 0x7f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tensor %s holds the control character 0x%02x at byte %d of its "
          "name",
          Quoted(Printable(name)), byte, i));
    }
  }
  const std::string what = absl::StrCat("tensor ", Quoted(name));
  if (!entry.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": header entry is not a JSON object"));
  }
  ParsedEntry parsed;
  parsed.info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": \"dtype\" is missing or not a string"));
  }
  AMALGAM_ASSIGN_OR_RETURN(
      parsed.info.dtype,
      DTypeForTensor(dtype_it->get_ref<const std::string&>(), name));

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": \"shape\" is missing or not an array"));
  }
  for (const Json& dim : *shape_it) {
    if (dim.is_number_unsigned()) {
      const uint64_t value = dim.get<uint64_t>();
      if (value > static_cast<uint64_t>(INT64_MAX)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": dimension ", value, " is too large"));
      }
      parsed.info.shape.push_back(static_cast<int64_t>(value));
    } else if (dim.is_number_integer()) {
      parsed.info.shape.push_back(dim.get<int64_t>());
    } else {
      // Never echo untrusted JSON: name its type only.
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": \"shape\" holds a JSON ", dim.type_name(),
                       ", not an integer"));
    }
  }
  AMALGAM_ASSIGN_OR_RETURN(parsed.info.numel,
                           NumElements(parsed.info.shape, what));
  AMALGAM_ASSIGN_OR_RETURN(
      parsed.info.nbytes,
      NumBytes(parsed.info.numel, parsed.info.dtype, parsed.info.shape, what));

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() ||
      offsets_it->size() != 2 || !(*offsets_it)[0].is_number_unsigned() ||
      !(*offsets_it)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ": \"data_offsets\" is missing or not a pair of "
                     "non-negative integers"));
  }
  parsed.begin = (*offsets_it)[0].get<uint64_t>();
  parsed.end = (*offsets_it)[1].get<uint64_t>();
  const std::string offsets_text =
      absl::StrCat("data_offsets [", parsed.begin, ", ", parsed.end, "]");
  if (parsed.end < parsed.begin) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", offsets_text, " end before they begin"));
  }
  if (parsed.end - parsed.begin != parsed.info.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": ", offsets_text, " hold ", parsed.end - parsed.begin,
        " bytes but shape ", ShapeText(parsed.info.shape), " of ",
        DTypeName(parsed.info.dtype), " needs ", parsed.info.nbytes));
  }
  if (parsed.end > data_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", offsets_text, " ends at byte ", parsed.end,
                     ", past the end of the data (", data_size, " bytes)"));
  }
  return parsed;
}

absl::StatusOr<SafetensorsHeader> ParseHeaderJson(absl::string_view text,
                                                  uint64_t data_size,
                                                  uint64_t data_start) {
  // {"name": {"shape": [..]}}: three levels.
  AMALGAM_RETURN_IF_ERROR(CheckJsonDepth(text, 3, "the header"));
  Json root;
  // JSON lets a key repeat (the parser keeps the last); a header must not.
  std::set<std::string> names;
  std::string repeated;
  try {
    root = Json::parse(text.begin(), text.end(),
                       [&](int depth, Json::parse_event_t event, Json& parsed) {
                         if (depth == 1 && event == Json::parse_event_t::key &&
                             !names.insert(parsed.get<std::string>()).second &&
                             repeated.empty()) {
                           repeated = parsed.get<std::string>();
                         }
                         return true;
                       });
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed JSON header: ", e.what()));
  }
  if (!repeated.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the header names ", Quoted(Printable(repeated)), " twice"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the header is a JSON ", root.type_name(), ", not an object"));
  }
  SafetensorsHeader header;
  std::vector<ParsedEntry> entries;
  entries.reserve(root.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_null()) continue;
      if (!it->is_object()) {
        return absl::InvalidArgumentError(
            "\"__metadata__\" is not a JSON object");
      }
      for (auto meta = it->begin(); meta != it->end(); ++meta) {
        if (!meta->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat("\"__metadata__\" value of ", Quoted(meta.key()),
                           " is a JSON ", meta->type_name(), ", not a string"));
        }
        header.metadata.emplace(meta.key(),
                                meta->get_ref<const std::string&>());
      }
      continue;
    }
    AMALGAM_ASSIGN_OR_RETURN(ParsedEntry entry,
                             ParseEntry(it.key(), *it, data_size));
    entries.push_back(std::move(entry));
  }

  std::sort(entries.begin(), entries.end(),
            [](const ParsedEntry& a, const ParsedEntry& b) {
              return std::tie(a.begin, a.end, a.info.name) <
                     std::tie(b.begin, b.end, b.info.name);
            });
  // Zero-size tensors occupy no bytes and cannot overlap anything.
  const ParsedEntry* previous = nullptr;
  for (const ParsedEntry& entry : entries) {
    if (entry.begin == entry.end) continue;
    if (previous != nullptr && entry.begin < previous->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensors ", Quoted(previous->info.name), " and ",
          Quoted(entry.info.name), " overlap: data_offsets [", previous->begin,
          ", ", previous->end, "] and [", entry.begin, ", ", entry.end, "]"));
    }
    previous = &entry;
  }
  // The tensors cover the data section without holes, as the format asks:
  // no byte rides along that no tensor accounts for.
  uint64_t covered = 0;
  for (const ParsedEntry& entry : entries) {
    if (entry.begin > covered) {
      return absl::InvalidArgumentError(
          absl::StrCat("bytes [", covered, ", ", entry.begin,
                       ") of the data belong to no tensor (a gap before ",
                       Quoted(entry.info.name), ")"));
    }
    covered = std::max(covered, entry.end);
  }
  if (covered != data_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("bytes [", covered, ", ", data_size,
                     ") at the end of the data belong to no tensor"));
  }
  header.tensors.reserve(entries.size());
  for (ParsedEntry& entry : entries) {
    entry.info.file_offset = data_start + entry.begin;
    header.tensors.push_back(std::move(entry.info));
  }
  return header;
}

std::string DirName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return absl::StrCat(dir, "/", name);
}

bool EndsWith(const std::string& text, absl::string_view suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix.data(),
                      suffix.size()) == 0;
}

// The parsed `weight_map` of a sharded checkpoint's index.
struct ShardIndex {
  // Tensor name -> shard file name (relative to the index's directory).
  std::map<std::string, std::string> weight_map;
  // Distinct shard file names, sorted.
  std::vector<std::string> shards;
};

absl::StatusOr<ShardIndex> ReadShardIndex(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    return FileError("cannot stat", path, errno);
  if (static_cast<uint64_t>(st.st_size) > kMaxIndexBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": index of ", st.st_size,
                     " bytes exceeds the limit of ", kMaxIndexBytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return FileError("cannot open", path, errno);
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return FileError("cannot read", path, errno);
  const std::string text = buffer.str();

  // {"metadata": {..}, "weight_map": {..}}: two levels, one spare.
  AMALGAM_RETURN_IF_ERROR(
      CheckJsonDepth(text, 3, absl::StrCat(path, ": the index")));
  Json root;
  try {
    root = Json::parse(text);
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": malformed JSON index: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the index is not a JSON object"));
  }
  auto map_it = root.find("weight_map");
  if (map_it == root.end() || !map_it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"weight_map\" is missing or not a JSON object"));
  }
  ShardIndex index;
  std::set<std::string> shards;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": weight_map entry of tensor ", Quoted(it.key()),
                       " is not a string"));
    }
    const std::string& shard = it->get_ref<const std::string&>();
    // Shards live beside the index; refuse paths that leave its directory.
    bool escapes = shard.empty() || shard.front() == '/';
    for (absl::string_view part : absl::StrSplit(shard, '/')) {
      if (part == "..") escapes = true;
    }
    if (escapes) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": weight_map puts tensor ", Quoted(it.key()), " in shard ",
          Quoted(shard),
          ", which is not a file name inside the index's directory"));
    }
    index.weight_map.emplace(it.key(), shard);
    shards.insert(shard);
  }
  index.shards.assign(shards.begin(), shards.end());
  return index;
}

// Index of the first non-finite element of `count` elements of type U at
// `data`, or -1. An element is non-finite when all exponent bits (`kMask`)
// are set. Scans in blocks so the inner loop has no early exit.
template <typename U, U kMask>
int64_t FirstNonFinite(const uint8_t* data, uint64_t count) {
  constexpr uint64_t kBlock = 4096;
  for (uint64_t start = 0; start < count; start += kBlock) {
    const uint64_t stop = std::min(count, start + kBlock);
    unsigned bad = 0;
    for (uint64_t i = start; i < stop; ++i) {
      U bits;
      std::memcpy(&bits, data + i * sizeof(U), sizeof(U));
      bad |= static_cast<unsigned>((bits & kMask) == kMask);
    }
    if (bad == 0) continue;
    for (uint64_t i = start; i < stop; ++i) {
      U bits;
      std::memcpy(&bits, data + i * sizeof(U), sizeof(U));
      if ((bits & kMask) == kMask) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view json,
                                                         uint64_t data_size,
                                                         uint64_t data_start) {
  // nlohmann::json throws for some misuse besides parse errors (and
  // std::bad_alloc); keep every exception inside core.
  try {
    return ParseHeaderJson(json, data_size, data_start);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        "out of memory while parsing a safetensors header");
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid safetensors header: ", e.what()));
  }
}

// One memory-mapped file.
struct SafetensorsReader::Mapping {
  std::string path;
  int fd = -1;
  void* addr = nullptr;
  size_t size = 0;

  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr != nullptr) ::munmap(addr, size);
    if (fd >= 0) ::close(fd);
  }

  const uint8_t* bytes() const { return static_cast<const uint8_t*>(addr); }

  // Maps `path` and parses its header into `header`.
  static absl::StatusOr<std::unique_ptr<Mapping>> Open(
      const std::string& path, SafetensorsHeader* header) {
    auto mapping = std::make_unique<Mapping>();
    mapping->path = path;
    mapping->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (mapping->fd < 0) return FileError("cannot open", path, errno);
    struct stat st;
    if (::fstat(mapping->fd, &st) != 0) {
      return FileError("cannot stat", path, errno);
    }
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " is not a regular file"));
    }
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < 8) {
      return absl::InvalidArgumentError(
          absl::StrCat("truncated: ", path, " is ", file_size,
                       " bytes, shorter than the 8-byte header length"));
    }
    mapping->size = static_cast<size_t>(file_size);
    // file_size >= 8, so this never maps zero bytes.
    void* addr =
        ::mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, mapping->fd, 0);
    if (addr == MAP_FAILED) {
      const int error = errno;
      return absl::InternalError(
          absl::StrCat("cannot mmap ", path, ": ", ErrnoText(error)));
    }
    mapping->addr = addr;
    ::madvise(addr, mapping->size, MADV_SEQUENTIAL);

    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) {
      header_size = (header_size << 8) | mapping->bytes()[i];
    }
    if (header_size > file_size - 8) {
      return absl::InvalidArgumentError(absl::StrCat(
          "truncated: ", path, " declares a header of ", header_size,
          " bytes but holds only ", file_size - 8, " after the length"));
    }
    if (header_size > kMaxHeaderBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": header length ", header_size, " bytes exceeds the limit of ",
          kMaxHeaderBytes, " (100 MiB); not a safetensors file?"));
    }
    const uint64_t data_start = 8 + header_size;
    absl::StatusOr<SafetensorsHeader> parsed = ParseSafetensorsHeader(
        absl::string_view(reinterpret_cast<const char*>(mapping->bytes()) + 8,
                          header_size),
        file_size - data_start, data_start);
    if (!parsed.ok()) return Annotate(parsed.status(), path);
    *header = *std::move(parsed);
    return mapping;
  }
};

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    return FileError("cannot open", path, errno);
  std::string file = path;
  if (S_ISDIR(st.st_mode)) {
    const std::string index = JoinPath(path, kIndexFileName);
    const std::string single = JoinPath(path, kSingleFileName);
    if (::access(index.c_str(), F_OK) == 0) {
      file = index;
    } else if (::access(single.c_str(), F_OK) == 0) {
      file = single;
    } else {
      return absl::NotFoundError(absl::StrCat("directory ", path,
                                              " holds neither ", kIndexFileName,
                                              " nor ", kSingleFileName));
    }
  }
  const std::string dir = DirName(file);
  return OpenFile(
      file, EndsWith(file, kIndexSuffix),
      [&dir](const std::string& shard) { return JoinPath(dir, shard); });
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::OpenModel(
    const std::map<std::string, std::string>& files) {
  std::vector<std::string> names;
  for (const auto& entry : files) names.push_back(entry.first);
  AMALGAM_ASSIGN_OR_RETURN(const ModelLayout layout, CheckModelFiles(names));
  std::set<std::string> unclaimed;
  if (layout.entry == kIndexFileName) {
    unclaimed.insert(layout.tensor_files.begin(), layout.tensor_files.end());
  }
  absl::Status missing;
  absl::StatusOr<std::unique_ptr<SafetensorsReader>> reader = OpenFile(
      files.at(layout.entry), layout.entry == kIndexFileName,
      [&](const std::string& shard) -> absl::StatusOr<std::string> {
        auto it = files.find(shard);
        if (it == files.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              kIndexFileName, " names shard ", Quoted(Printable(shard)),
              ", which is not among the model's files"));
        }
        unclaimed.erase(shard);
        return it->second;
      });
  if (reader.ok() && !unclaimed.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("file ", Quoted(*unclaimed.begin()),
                     " is not a shard that ", kIndexFileName, " names"));
  }
  if (reader.ok()) return reader;
  // Messages name the model's files, not where they are stored.
  std::string message(reader.status().message());
  for (const auto& [name, path] : files) {
    message = absl::StrReplaceAll(message, {{path, name}});
  }
  return absl::Status(reader.status().code(), message);
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::OpenFile(
    const std::string& file, bool is_index, const ShardPath& shard_path) {
  const std::string& path = file;
  auto reader = absl::WrapUnique(new SafetensorsReader());
  try {
    if (!is_index) {
      SafetensorsHeader header;
      AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<Mapping> mapping,
                               Mapping::Open(file, &header));
      reader->files_.push_back(std::move(mapping));
      reader->tensors_ = std::move(header.tensors);
      reader->metadata_ = std::move(header.metadata);
    } else {
      AMALGAM_ASSIGN_OR_RETURN(ShardIndex index, ReadShardIndex(file));
      // Open every shard first: a missing or broken shard is the error to
      // report before any disagreement with the weight_map.
      std::vector<SafetensorsHeader> headers(index.shards.size());
      for (size_t i = 0; i < index.shards.size(); ++i) {
        AMALGAM_ASSIGN_OR_RETURN(const std::string shard,
                                 shard_path(index.shards[i]));
        AMALGAM_ASSIGN_OR_RETURN(std::unique_ptr<Mapping> mapping,
                                 Mapping::Open(shard, &headers[i]));
        reader->files_.push_back(std::move(mapping));
      }
      // Tensor name -> shard that holds it.
      std::map<std::string, std::string> found;
      for (size_t i = 0; i < index.shards.size(); ++i) {
        const std::string& shard = index.shards[i];
        SafetensorsHeader& header = headers[i];
        for (TensorInfo& tensor : header.tensors) {
          auto [seen, inserted] = found.emplace(tensor.name, shard);
          if (!inserted) {
            return absl::InvalidArgumentError(absl::StrCat(
                file, ": tensor ", Quoted(tensor.name), " is in both shard ",
                Quoted(seen->second), " and shard ", Quoted(shard)));
          }
          auto listed = index.weight_map.find(tensor.name);
          if (listed == index.weight_map.end()) {
            return absl::InvalidArgumentError(absl::StrCat(
                file, ": shard ", Quoted(shard), " holds tensor ",
                Quoted(tensor.name), ", which the weight_map does not list"));
          }
          if (listed->second != shard) {
            return absl::InvalidArgumentError(absl::StrCat(
                file, ": tensor ", Quoted(tensor.name), " is in shard ",
                Quoted(shard), " but the weight_map puts it in shard ",
                Quoted(listed->second)));
          }
          tensor.file_index = static_cast<int>(i);
          reader->tensors_.push_back(std::move(tensor));
        }
        if (i == 0) reader->metadata_ = std::move(header.metadata);
      }
      for (const auto& [name, shard] : index.weight_map) {
        if (found.count(name) == 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              file, ": the weight_map puts tensor ", Quoted(name), " in shard ",
              Quoted(shard), ", which does not hold it"));
        }
      }
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of memory while opening ", path));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("cannot open ", path, ": ", e.what()));
  }

  std::sort(
      reader->tensors_.begin(), reader->tensors_.end(),
      [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  for (const TensorInfo& tensor : reader->tensors_) {
    reader->total_bytes_ += tensor.nbytes;
  }
  return reader;
}

SafetensorsReader::~SafetensorsReader() = default;

const TensorInfo* SafetensorsReader::Find(absl::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& tensor, absl::string_view n) {
                               return absl::string_view(tensor.name) < n;
                             });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

absl::Span<const uint8_t> SafetensorsReader::Data(
    const TensorInfo& tensor) const {
  const Mapping& mapping = *files_[tensor.file_index];
  return absl::Span<const uint8_t>(mapping.bytes() + tensor.file_offset,
                                   tensor.nbytes);
}

namespace {

// madvise(advice) over the pages that hold `tensor`; madvise's result.
int AdvisePages(const void* bytes, uint64_t offset, uint64_t nbytes,
                int advice) {
  static const uintptr_t kPage =
      static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(bytes) + offset;
  const uintptr_t first = begin & ~(kPage - 1);
  const uintptr_t last = begin + nbytes;
  return ::madvise(reinterpret_cast<void*>(first), last - first, advice);
}

}  // namespace

void SafetensorsReader::Release(absl::string_view name) const {
  const TensorInfo* tensor = Find(name);
  if (tensor == nullptr || tensor->nbytes == 0) return;
  // Read-only private file pages: dropping them costs at most a re-read from
  // the page cache if a neighbour on a shared page is touched again.
  AdvisePages(files_[tensor->file_index]->bytes(), tensor->file_offset,
              tensor->nbytes, MADV_DONTNEED);
}

void SafetensorsReader::Prefetch(absl::string_view name) const {
  const TensorInfo* tensor = Find(name);
  if (tensor == nullptr || tensor->nbytes == 0) return;
  const void* bytes = files_[tensor->file_index]->bytes();
#ifdef MADV_POPULATE_READ
  // Reads the pages in and maps them (Linux 5.14+), so the merge that follows
  // takes no page faults; older kernels refuse it and get read-ahead only.
  if (AdvisePages(bytes, tensor->file_offset, tensor->nbytes,
                  MADV_POPULATE_READ) == 0) {
    return;
  }
#endif
  AdvisePages(bytes, tensor->file_offset, tensor->nbytes, MADV_WILLNEED);
}

absl::Status CheckAllFinite(const SafetensorsReader& reader) {
  for (const TensorInfo& tensor : reader.tensors()) {
    const absl::Span<const uint8_t> data = reader.Data(tensor);
    const uint64_t count = data.size() / DTypeSize(tensor.dtype);
    int64_t bad = -1;
    switch (tensor.dtype) {
      case DType::kF16:
        bad = FirstNonFinite<uint16_t, 0x7C00>(data.data(), count);
        break;
      case DType::kBF16:
        bad = FirstNonFinite<uint16_t, 0x7F80>(data.data(), count);
        break;
      case DType::kF32:
        bad = FirstNonFinite<uint32_t, 0x7F800000u>(data.data(), count);
        break;
      case DType::kF64:
        bad =
            FirstNonFinite<uint64_t, 0x7FF0000000000000ull>(data.data(), count);
        break;
    }
    reader.Release(tensor.name);
    if (bad >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quoted(tensor.name),
                       " holds a NaN or infinity at element ", bad));
    }
  }
  return absl::OkStatus();
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::FILE* file,
                                     uint64_t data_size)
    : path_(std::move(path)), file_(file), data_size_(data_size) {}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<TensorSpec> tensors,
    const std::map<std::string, std::string>& metadata) {
  std::string header_text;
  uint64_t data_size = 0;
  try {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata) meta[key] = value;
      header["__metadata__"] = std::move(meta);
    }
    std::set<std::string> names;
    for (const TensorSpec& spec : tensors) {
      const std::string what = absl::StrCat("tensor ", Quoted(spec.name));
      if (spec.name == "__metadata__") {
        return absl::InvalidArgumentError(
            "\"__metadata__\" is reserved and cannot name a tensor");
      }
      if (!names.insert(spec.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, " is listed twice"));
      }
      AMALGAM_ASSIGN_OR_RETURN(int64_t numel, NumElements(spec.shape, what));
      AMALGAM_ASSIGN_OR_RETURN(uint64_t nbytes,
                               NumBytes(numel, spec.dtype, spec.shape, what));
      uint64_t end = 0;
      if (__builtin_add_overflow(data_size, nbytes, &end)) {
        return absl::InvalidArgumentError(
            "the tensors hold more bytes than fit in 64 bits");
      }
      nlohmann::ordered_json entry = nlohmann::ordered_json::object();
      entry["dtype"] = DTypeName(spec.dtype);
      entry["shape"] = spec.shape;
      entry["data_offsets"] = {data_size, end};
      header[spec.name] = std::move(entry);
      data_size = end;
    }
    try {
      header_text = header.dump();
    } catch (const nlohmann::ordered_json::type_error& e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a tensor name or metadata string is not valid UTF-8: ", e.what()));
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        "out of memory while building a safetensors header");
  }
  // Like the Python library: pad with spaces so the data starts 8-aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  const std::string tmp_path = path + ".tmp";
  std::FILE* file = std::fopen(tmp_path.c_str(), "wb");
  if (file == nullptr) {
    const int error = errno;
    return absl::InternalError(
        absl::StrCat("cannot create ", tmp_path, ": ", ErrnoText(error)));
  }
  auto writer = absl::WrapUnique(new SafetensorsWriter(path, file, data_size));
  writer->buffer_ = std::make_unique<char[]>(kWriteBufferBytes);
  std::setvbuf(file, writer->buffer_.get(), _IOFBF, kWriteBufferBytes);

  uint8_t length[8];
  uint64_t header_size = header_text.size();
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<uint8_t>(header_size >> (8 * i));
  }
  if (std::fwrite(length, 1, sizeof(length), file) != sizeof(length) ||
      std::fwrite(header_text.data(), 1, header_text.size(), file) !=
          header_text.size()) {
    return FileError("cannot write", tmp_path, errno);
  }
  return writer;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (finished_) return;
  if (file_ != nullptr) std::fclose(file_);
  std::remove((path_ + ".tmp").c_str());
}

absl::Status SafetensorsWriter::Append(absl::Span<const uint8_t> bytes) {
  if (finished_ || file_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("writer of ", path_, " is already finished"));
  }
  if (bytes.size() > data_size_ - written_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "appending ", bytes.size(), " bytes to ", path_, " after ", written_,
        " would exceed the ", data_size_, " bytes the tensors declare"));
  }
  if (bytes.empty()) return absl::OkStatus();
  if (std::fwrite(bytes.data(), 1, bytes.size(), file_) != bytes.size()) {
    return FileError("cannot write", path_ + ".tmp", errno);
  }
  written_ += bytes.size();
  if (written_ - written_at_writeback_ >= kWritebackBytes) StartWriteback();
  return absl::OkStatus();
}

void SafetensorsWriter::StartWriteback() {
  written_at_writeback_ = written_;
  if (std::fflush(file_) != 0) return;  // reported by Finish
  const off_t end = ::ftello(file_);
  if (end <= writeback_offset_) return;
  ::sync_file_range(fileno(file_), writeback_offset_, end - writeback_offset_,
                    SYNC_FILE_RANGE_WRITE);
  writeback_offset_ = end;
}

absl::Status SafetensorsWriter::Finish() {
  if (finished_ || file_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("writer of ", path_, " is already finished"));
  }
  if (written_ != data_size_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot finish ", path_, ": ", written_, " of ",
                     data_size_, " declared bytes were written"));
  }
  const std::string tmp_path = path_ + ".tmp";
  if (std::fflush(file_) != 0 || std::ferror(file_) != 0) {
    return FileError("cannot write", tmp_path, errno);
  }
  if (::fsync(fileno(file_)) != 0) {
    return FileError("cannot fsync", tmp_path, errno);
  }
  const int close_result = std::fclose(file_);
  file_ = nullptr;
  if (close_result != 0) return FileError("cannot close", tmp_path, errno);
  if (std::rename(tmp_path.c_str(), path_.c_str()) != 0) {
    const int error = errno;
    return absl::InternalError(absl::StrCat("cannot rename ", tmp_path, " to ",
                                            path_, ": ", ErrnoText(error)));
  }
  finished_ = true;
  const std::string dir = DirName(path_);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    const int error = errno;
    return absl::InternalError(
        absl::StrCat("cannot open directory ", dir, ": ", ErrnoText(error)));
  }
  const int sync_result = ::fsync(dir_fd);
  const int sync_error = errno;
  ::close(dir_fd);
  if (sync_result != 0) {
    return absl::InternalError(absl::StrCat("cannot fsync directory ", dir,
                                            ": ", ErrnoText(sync_error)));
  }
  return absl::OkStatus();
}

}  // namespace amalgam::core
