#pragma once

#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/storage.h"
#include "server/upload_manager.h"

namespace amalgam::server {

struct HousekeepingOptions {
  // The name this process holds the housekeeping lease under.
  std::string holder;
  // How often a pass runs (on the replica holding the lease).
  absl::Duration period = absl::Minutes(1);
  // Unreferenced blobs are removed once they are older than this.
  absl::Duration blob_age = absl::Hours(1);
};

// Runs housekeeping passes until destroyed, on one process of those sharing
// a catalog at a time (Catalog::TryHousekeeping, a lease of three periods,
// renewed by each pass): expiry of abandoned resumable uploads, then the
// removal of blobs no artifact references. A pass that fails is logged and
// retried at the next period.
class Housekeeper {
 public:
  Housekeeper(Storage* storage, UploadManager* uploads,
              HousekeepingOptions options);
  ~Housekeeper();

  // One pass, if this process holds (or takes) the lease; false otherwise.
  absl::StatusOr<bool> RunOnce();

 private:
  Storage* const storage_;
  UploadManager* const uploads_;
  const HousekeepingOptions options_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace amalgam::server
