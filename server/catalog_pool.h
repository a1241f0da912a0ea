#pragma once

#include <memory>
#include <vector>

#include "server/catalog.h"

namespace amalgam::server {

// One catalog over several: each call goes to one that no other call is
// using (waiting while all are busy). For catalogs of one connection each
// on one database, so calls of different threads run concurrently.
std::unique_ptr<Catalog> PoolOf(std::vector<std::unique_ptr<Catalog>> members);

}  // namespace amalgam::server
