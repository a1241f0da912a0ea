#pragma once

#include "absl/strings/string_view.h"

namespace amalgam::server {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped. Set once at start-up.
void SetLogLevel(LogLevel level);
// Parses "debug", "info", "warning", "error"; false if unknown.
bool ParseLogLevel(absl::string_view text, LogLevel* level);

// Writes one line to stderr: `<UTC time> <LEVEL> <message>`, where the message
// is a list of key=value fields. Thread-safe (one write per line).
void Log(LogLevel level, absl::string_view message);

}  // namespace amalgam::server
