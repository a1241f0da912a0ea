#include "server/log.h"

#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"

namespace amalgam::server {
namespace {

std::atomic<int> min_level{static_cast<int>(LogLevel::kInfo)};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarning:
      return "WARNING";
    case LogLevel::kError:
      return "ERROR";
  }
  return "INFO";
}

}  // namespace

void SetLogLevel(LogLevel level) { min_level = static_cast<int>(level); }

bool ParseLogLevel(absl::string_view text, LogLevel* level) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning,
                     LogLevel::kError}) {
    std::string name = LevelName(l);
    for (char& c : name) c = static_cast<char>(std::tolower(c));
    if (text == name) {
      *level = l;
      return true;
    }
  }
  return false;
}

LogFields& LogFields::Add(absl::string_view key, absl::string_view value) {
  if (!text_.empty()) text_ += ' ';
  absl::StrAppend(&text_, key, "=");
  const bool cut = value.size() > kMaxLogValueBytes;
  const absl::string_view kept = value.substr(0, kMaxLogValueBytes);
  bool plain = !kept.empty() && !cut;
  for (char c : kept) {
    if (!std::isalnum(static_cast<unsigned char>(c)) &&
        std::string_view("._:/@+,-").find(c) == std::string_view::npos) {
      plain = false;
      break;
    }
  }
  if (plain) {
    text_.append(kept.data(), kept.size());
    return *this;
  }
  text_ += '"';
  for (char c : kept) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      text_ += '\\';
      text_ += c;
    } else if (byte < 0x20 || byte >= 0x7f) {
      char hex[5];
      std::snprintf(hex, sizeof(hex), "\\x%02x", byte);
      text_ += hex;
    } else {
      text_ += c;
    }
  }
  if (cut) absl::StrAppend(&text_, "...(", value.size(), " bytes)");
  text_ += '"';
  return *this;
}

void Log(LogLevel level, const LogFields& fields) {
  if (static_cast<int>(level) < min_level) return;
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(
                          now.time_since_epoch())
                          .count() %
                      1000;
  std::tm tm;
  gmtime_r(&seconds, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
  char ms[8];
  std::snprintf(ms, sizeof(ms), ".%03dZ", static_cast<int>(millis));
  const std::string line =
      absl::StrCat(stamp, ms, " ", LevelName(level), " ", fields.text(), "\n");
  // One write(2) per line keeps concurrent lines whole.
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace amalgam::server
