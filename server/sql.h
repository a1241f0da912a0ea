#pragma once

// A connection to the catalog's database as the catalog uses it: one
// statement at a time, numbered parameters (?1, ?2, ...), rows of integers,
// text and bytes. Two implementations: SQLite (the embedded default) and
// PostgreSQL (libpq). Not thread-safe: the catalog serialises its calls.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace amalgam::server {

// A statement parameter or a result column.
struct SqlValue {
  enum class Type { kNull, kInt, kText, kBytes };
  Type type = Type::kNull;
  int64_t number = 0;  // kInt
  std::string text;    // kText and kBytes

  static SqlValue Int(int64_t value);
  static SqlValue Text(std::string value);
  static SqlValue Bytes(std::string value);
};

using SqlRow = std::vector<SqlValue>;

struct SqlResult {
  std::vector<SqlRow> rows;
  // Rows an INSERT, UPDATE or DELETE changed.
  int64_t changed = 0;
};

class SqlConnection {
 public:
  virtual ~SqlConnection() = default;

  // Runs one statement with ?N bound to params[N - 1]. Errors start with
  // "catalog: " and map to codes: a unique-key violation ALREADY_EXISTS, a
  // full disk RESOURCE_EXHAUSTED, an unreachable database UNAVAILABLE,
  // anything else INTERNAL.
  virtual absl::StatusOr<SqlResult> Run(
      const std::string& sql, const std::vector<SqlValue>& params = {}) = 0;

  // The statement that opens a transaction holding the write lock from the
  // start, so that read-modify-write steps never interleave.
  virtual const char* Begin() const = 0;
  // Appended to a SELECT inside a transaction to lock the rows it reads
  // ("" where Begin() locked the whole database).
  virtual const char* ForUpdate() const = 0;
  // The column type of serialised records.
  virtual const char* BytesType() const = 0;
  // The column definition, after the others, that orders rows by insertion
  // ("" where the database has one built in), and that column's name.
  virtual const char* InsertionColumn() const = 0;
  virtual const char* InsertionOrder() const = 0;

  // The schema version migrations have reached (0 for a new database).
  virtual absl::StatusOr<int64_t> SchemaVersion() = 0;
  // Inside the migration transaction: records `version`.
  virtual absl::Status SetSchemaVersion(int64_t version) = 0;
  // Inside a transaction: waits until no other process's transaction holds
  // the lock `key`, and holds it until this one ends (PostgreSQL's advisory
  // locks; SQLite's Begin() has locked the whole database already).
  virtual absl::Status TransactionLock(int64_t key) = 0;
  // Appended to a SELECT inside a transaction: locks the rows it reads for
  // sharing, or takes rows no other transaction holds and locks them.
  virtual const char* ForShare() const = 0;
  virtual const char* SkipLocked() const = 0;
  // Whether other processes use the database too (PostgreSQL), or this
  // process owns it (SQLite): then what need not survive a crash (leases of
  // open streams) stays in this process's memory.
  virtual bool Shared() const = 0;
  // The statement that tells listeners (ListenForJobChanges) at commit that
  // job ?1 changed; "" where no other process listens (SQLite).
  virtual const char* NotifyJob() const = 0;
};

// Notifications, from every process on a PostgreSQL catalog, that a job
// changed (PostgreSQL's LISTEN/NOTIFY, on a connection of its own).
class JobChanges {
 public:
  virtual ~JobChanges() = default;
  // Waits up to `timeout`; returns the ids of the jobs changed meanwhile
  // (empty at the timeout). UNAVAILABLE while the connection is lost: it is
  // re-established with backoff and listens again, and changes in between
  // are missed, so callers poll as well.
  virtual absl::StatusOr<std::vector<std::string>> Wait(
      absl::Duration timeout) = 0;
};

// Listens on the PostgreSQL database `uri` (UNAVAILABLE if unreachable).
absl::StatusOr<std::unique_ptr<JobChanges>> ListenForJobChanges(
    const std::string& uri);

// SQLite database file `path` (created if missing), in WAL mode with full
// fsyncs.
absl::StatusOr<std::unique_ptr<SqlConnection>> OpenSqlite(
    const std::string& path);

// A PostgreSQL database from a libpq connection URI. The connection is
// re-established, with backoff, after it is lost; until then statements are
// UNAVAILABLE.
absl::StatusOr<std::unique_ptr<SqlConnection>> OpenPostgres(
    const std::string& uri);

}  // namespace amalgam::server
