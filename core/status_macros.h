#pragma once

// Local status helpers: Abseil 20220623 ships none.

#define AMALGAM_STATUS_CONCAT_INNER(a, b) a##b
#define AMALGAM_STATUS_CONCAT(a, b) AMALGAM_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define AMALGAM_RETURN_IF_ERROR(expr)        \
  do {                                       \
    ::absl::Status amalgam_status_ = (expr); \
    if (!amalgam_status_.ok()) {             \
      return amalgam_status_;                \
    }                                        \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>); returns its status when not OK,
// otherwise moves the value into `lhs` (which may be a declaration).
#define AMALGAM_ASSIGN_OR_RETURN(lhs, rexpr) \
  AMALGAM_ASSIGN_OR_RETURN_IMPL(             \
      AMALGAM_STATUS_CONCAT(amalgam_statusor_, __LINE__), lhs, rexpr)

#define AMALGAM_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  if (!statusor.ok()) {                                     \
    return statusor.status();                               \
  }                                                         \
  lhs = std::move(statusor).value()
