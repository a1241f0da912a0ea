#pragma once

#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace amalgam::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped. Set once at start-up.
void SetLogLevel(LogLevel level);
// Parses "debug", "info", "warning", "error"; false if unknown.
bool ParseLogLevel(absl::string_view text, LogLevel* level);

// The fields of one log line, `event=NAME key=value ...`. Keys come from the
// code; values may come from anyone (names, messages, paths), so each is cut
// to kMaxLogValueBytes and written bare only when it is a plain token
// ([A-Za-z0-9._:/@+,-]); otherwise it is quoted, with `"` and `\\` escaped
// and control and non-ASCII bytes written as \\xNN. A line therefore always
// parses back into the fields it was given.
class LogFields {
 public:
  explicit LogFields(absl::string_view event) { Add("event", event); }

  LogFields& Add(absl::string_view key, absl::string_view value);
  template <typename T,
            typename = std::enable_if_t<std::is_arithmetic<T>::value>>
  LogFields& Add(absl::string_view key, T value) {
    return Add(key, absl::string_view(absl::StrCat(value)));
  }

  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

inline constexpr size_t kMaxLogValueBytes = 512;

// Writes one line to stderr: `<UTC time> <LEVEL> <fields>`. Thread-safe (one
// write per line).
void Log(LogLevel level, const LogFields& fields);

}  // namespace amalgam::server
