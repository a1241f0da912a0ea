#include "server/housekeeping.h"

#include <chrono>

#include "core/status_macros.h"
#include "server/log.h"

namespace amalgam::server {

Housekeeper::Housekeeper(Storage* storage, UploadManager* uploads,
                         HousekeepingOptions options)
    : storage_(storage), uploads_(uploads), options_(std::move(options)) {
  thread_ = std::thread([this] {
    do {
      absl::StatusOr<bool> ran = RunOnce();
      if (!ran.ok()) {
        Log(LogLevel::kWarning, LogFields("housekeeping_failed")
                                    .Add("error", ran.status().message()));
      }
    } while (!stop_.WaitForNotificationWithTimeout(options_.period));
  });
}

Housekeeper::~Housekeeper() {
  stop_.Notify();
  thread_.join();
}

absl::StatusOr<bool> Housekeeper::RunOnce() {
  AMALGAM_ASSIGN_OR_RETURN(const bool held,
                           storage_->catalog()->TryHousekeeping(
                               options_.holder, options_.period * 3));
  if (!held) return false;
  AMALGAM_ASSIGN_OR_RETURN(const int expired, uploads_->ExpireStale());
  AMALGAM_ASSIGN_OR_RETURN(const int64_t collected,
                           storage_->CollectGarbage(std::chrono::milliseconds(
                               absl::ToInt64Milliseconds(options_.blob_age))));
  if (expired > 0 || collected > 0) {
    Log(LogLevel::kInfo, LogFields("housekeeping")
                             .Add("uploads_expired", expired)
                             .Add("blobs_removed", collected));
  }
  return true;
}

}  // namespace amalgam::server
