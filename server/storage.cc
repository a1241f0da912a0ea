#include "server/storage.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace amalgam::server {
namespace {

namespace fs = std::filesystem;

absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  return absl::InternalError(
      absl::StrCat("catalog: ", what, ": ", sqlite3_errmsg(db)));
}

// Finalizes a prepared statement on scope exit.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) {
    sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  sqlite3_stmt* get() const { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

}  // namespace

std::string NewId(const std::string& prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char buffer[17];
  std::snprintf(buffer, sizeof(buffer), "%016llx",
                static_cast<unsigned long long>(rng()));
  return absl::StrCat(prefix, "_", buffer);
}

absl::Status SyncFileAndDir(const std::string& path) {
  for (const std::string& target :
       {path, fs::path(path).parent_path().string()}) {
    const int fd = ::open(target.c_str(), O_RDONLY);
    if (fd < 0 || ::fsync(fd) != 0) {
      const std::string error = std::strerror(errno);
      if (fd >= 0) ::close(fd);
      return absl::InternalError(
          absl::StrCat("cannot fsync ", target, ": ", error));
    }
    ::close(fd);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Storage>> Storage::Open(
    const std::string& data_dir) {
  std::error_code error;
  for (const char* sub : {"blobs", "tmp"}) {
    fs::create_directories(fs::path(data_dir) / sub, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot create ", data_dir, "/",
                                              sub, ": ", error.message()));
    }
  }
  // Files in tmp/ belong to uploads and jobs of an earlier run.
  for (const auto& entry : fs::directory_iterator(fs::path(data_dir) / "tmp")) {
    fs::remove_all(entry.path(), error);
  }
  const std::string db_path = (fs::path(data_dir) / "catalog.db").string();
  sqlite3* db = nullptr;
  if (sqlite3_open(db_path.c_str(), &db) != SQLITE_OK) {
    absl::Status status = SqliteError(db, "open " + db_path);
    sqlite3_close(db);
    return status;
  }
  sqlite3_busy_timeout(db, 5000);
  auto storage = std::unique_ptr<Storage>(new Storage(data_dir, db));
  absl::MutexLock lock(&storage->mu_);
  AMALGAM_RETURN_IF_ERROR(storage->Exec("PRAGMA journal_mode=WAL"));
  AMALGAM_RETURN_IF_ERROR(storage->Exec("PRAGMA synchronous=FULL"));
  AMALGAM_RETURN_IF_ERROR(storage->Exec(
      "CREATE TABLE IF NOT EXISTS artifacts ("
      " id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, record BLOB NOT "
      "NULL)"));
  AMALGAM_RETURN_IF_ERROR(storage->Exec(
      "CREATE TABLE IF NOT EXISTS jobs ("
      " id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, record BLOB NOT "
      "NULL)"));
  return storage;
}

Storage::Storage(std::string data_dir, sqlite3* db)
    : data_dir_(std::move(data_dir)), db_(db) {}

Storage::~Storage() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

std::string Storage::NewTempPath(const std::string& prefix) {
  return (fs::path(data_dir_) / "tmp" / NewId(prefix)).string();
}

std::string Storage::BlobPath(const v1::Artifact& artifact) const {
  return (fs::path(data_dir_) / "blobs" / artifact.sha256()).string();
}

absl::StatusOr<v1::Artifact> Storage::AddArtifact(const std::string& temp_path,
                                                  v1::Artifact artifact) {
  artifact.set_id(NewId("art"));
  artifact.set_created_at(static_cast<int64_t>(std::time(nullptr)));
  artifact.clear_tensors();
  const std::string blob = BlobPath(artifact);
  std::error_code error;
  // The blob and its row change together under the lock, so DeleteArtifact
  // never removes a blob that a new row is about to reference.
  absl::MutexLock lock(&mu_);
  if (fs::exists(blob, error)) {
    // Same content already stored: blobs are content-addressed.
    fs::remove(temp_path, error);
  } else {
    fs::rename(temp_path, blob, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot move ", temp_path, " to ",
                                              blob, ": ", error.message()));
    }
    AMALGAM_RETURN_IF_ERROR(SyncFileAndDir(blob));
  }
  AMALGAM_RETURN_IF_ERROR(PutRecord("artifacts", artifact.id(), artifact));
  return artifact;
}

absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> Storage::OpenBlob(
    const v1::Artifact& artifact) const {
  absl::StatusOr<std::unique_ptr<core::SafetensorsReader>> reader =
      core::SafetensorsReader::Open(BlobPath(artifact));
  if (!reader.ok()) {
    return absl::DataLossError(
        absl::StrCat("blob of artifact ", artifact.id(),
                     " cannot be read: ", reader.status().message()));
  }
  return reader;
}

absl::StatusOr<v1::Artifact> Storage::GetArtifact(const std::string& id) {
  std::string bytes;
  {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(bytes, GetRecord("artifacts", id));
  }
  v1::Artifact artifact;
  if (bytes.empty()) {
    return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
  }
  if (!artifact.ParseFromString(bytes)) {
    return absl::DataLossError(
        absl::StrCat("catalog row of ", id, " is corrupt"));
  }
  return artifact;
}

bool ViewFor(const std::string& organization, v1::Artifact* artifact) {
  if (artifact->owner() == organization) return true;
  for (const std::string& org : artifact->shared_with()) {
    if (org == organization) {
      artifact->clear_shared_with();
      return true;
    }
  }
  return false;
}

absl::StatusOr<v1::Artifact> Storage::GetArtifactFor(
    const std::string& id, const std::string& organization) {
  absl::StatusOr<v1::Artifact> artifact = GetArtifact(id);
  if (!artifact.ok()) return artifact;
  if (ViewFor(organization, &*artifact)) return artifact;
  return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
}

absl::Status Storage::UpdateArtifact(const v1::Artifact& artifact) {
  absl::MutexLock lock(&mu_);
  return PutRecord("artifacts", artifact.id(), artifact);
}

absl::Status Storage::DeleteArtifact(const v1::Artifact& artifact) {
  std::vector<std::string> rows;
  {
    absl::MutexLock lock(&mu_);
    Statement stmt(db_, "DELETE FROM artifacts WHERE id = ?1");
    if (stmt.get() == nullptr ||
        sqlite3_bind_text(stmt.get(), 1, artifact.id().data(),
                          static_cast<int>(artifact.id().size()),
                          SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_step(stmt.get()) != SQLITE_DONE) {
      return SqliteError(db_, absl::StrCat("delete artifact ", artifact.id()));
    }
    AMALGAM_ASSIGN_OR_RETURN(rows, ListRecords("artifacts"));
    for (const std::string& row : rows) {
      v1::Artifact other;
      if (other.ParseFromString(row) && other.sha256() == artifact.sha256()) {
        return absl::OkStatus();  // the blob is still in use
      }
    }
    // Removed under the lock, so no upload of the same content can register
    // against the blob in between.
    std::error_code error;
    fs::remove(BlobPath(artifact), error);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::Artifact>> Storage::ListArtifacts() {
  std::vector<std::string> rows;
  {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(rows, ListRecords("artifacts"));
  }
  std::vector<v1::Artifact> artifacts(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!artifacts[i].ParseFromString(rows[i])) {
      return absl::DataLossError("catalog has a corrupt artifact row");
    }
  }
  return artifacts;
}

absl::Status Storage::PutJob(const v1::Job& job) {
  absl::MutexLock lock(&mu_);
  return PutRecord("jobs", job.id(), job);
}

absl::StatusOr<v1::Job> Storage::GetJob(const std::string& id) {
  std::string bytes;
  {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(bytes, GetRecord("jobs", id));
  }
  v1::Job job;
  if (bytes.empty()) {
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  }
  if (!job.ParseFromString(bytes)) {
    return absl::DataLossError(
        absl::StrCat("catalog row of ", id, " is corrupt"));
  }
  return job;
}

absl::StatusOr<std::vector<v1::Job>> Storage::ListJobs() {
  std::vector<std::string> rows;
  {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(rows, ListRecords("jobs"));
  }
  std::vector<v1::Job> jobs(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!jobs[i].ParseFromString(rows[i])) {
      return absl::DataLossError("catalog has a corrupt job row");
    }
  }
  return jobs;
}

absl::Status Storage::Exec(const char* sql) {
  char* error = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &error) != SQLITE_OK) {
    absl::Status status = absl::InternalError(
        absl::StrCat("catalog: ", sql, ": ", error ? error : "unknown"));
    sqlite3_free(error);
    return status;
  }
  return absl::OkStatus();
}

absl::Status Storage::PutRecord(const char* table, const std::string& id,
                                const google::protobuf::Message& record) {
  const std::string sql =
      absl::StrCat("INSERT INTO ", table,
                   " (id, created_at, record) VALUES (?1, ?2, ?3) "
                   "ON CONFLICT(id) DO UPDATE SET record = excluded.record");
  Statement stmt(db_, sql.c_str());
  const std::string bytes = record.SerializeAsString();
  if (stmt.get() == nullptr ||
      sqlite3_bind_text(stmt.get(), 1, id.data(), static_cast<int>(id.size()),
                        SQLITE_TRANSIENT) != SQLITE_OK ||
      sqlite3_bind_int64(stmt.get(), 2, std::time(nullptr)) != SQLITE_OK ||
      sqlite3_bind_blob(stmt.get(), 3, bytes.data(),
                        static_cast<int>(bytes.size()),
                        SQLITE_TRANSIENT) != SQLITE_OK ||
      sqlite3_step(stmt.get()) != SQLITE_DONE) {
    return SqliteError(db_, absl::StrCat("write ", table, " row ", id));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Storage::GetRecord(const char* table,
                                               const std::string& id) {
  const std::string sql =
      absl::StrCat("SELECT record FROM ", table, " WHERE id = ?1");
  Statement stmt(db_, sql.c_str());
  if (stmt.get() == nullptr ||
      sqlite3_bind_text(stmt.get(), 1, id.data(), static_cast<int>(id.size()),
                        SQLITE_TRANSIENT) != SQLITE_OK) {
    return SqliteError(db_, absl::StrCat("read ", table, " row ", id));
  }
  const int rc = sqlite3_step(stmt.get());
  if (rc == SQLITE_DONE) return std::string();
  if (rc != SQLITE_ROW) {
    return SqliteError(db_, absl::StrCat("read ", table, " row ", id));
  }
  const auto* data =
      static_cast<const char*>(sqlite3_column_blob(stmt.get(), 0));
  return std::string(data, sqlite3_column_bytes(stmt.get(), 0));
}

absl::StatusOr<std::vector<std::string>> Storage::ListRecords(
    const char* table) {
  const std::string sql =
      absl::StrCat("SELECT record FROM ", table, " ORDER BY created_at, rowid");
  Statement stmt(db_, sql.c_str());
  if (stmt.get() == nullptr) {
    return SqliteError(db_, absl::StrCat("list ", table));
  }
  std::vector<std::string> rows;
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    const auto* data =
        static_cast<const char*>(sqlite3_column_blob(stmt.get(), 0));
    rows.emplace_back(data, sqlite3_column_bytes(stmt.get(), 0));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, absl::StrCat("list ", table));
  return rows;
}

}  // namespace amalgam::server
