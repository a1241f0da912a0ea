#include "server/storage.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace amalgam::server {
namespace {

namespace fs = std::filesystem;

// RESOURCE_EXHAUSTED when the disk is full, INTERNAL otherwise.
absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  std::string message =
      absl::StrCat("catalog: ", what, ": ", sqlite3_errmsg(db));
  if (sqlite3_errcode(db) == SQLITE_FULL) {
    return absl::ResourceExhaustedError(std::move(message));
  }
  return absl::InternalError(std::move(message));
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
  // Bind parameter `index` (1-based); false on error.
  bool Bind(int index, const std::string& text) {
    return sqlite3_bind_text(stmt_, index, text.data(),
                             static_cast<int>(text.size()),
                             SQLITE_TRANSIENT) == SQLITE_OK;
  }
  bool Bind(int index, int64_t value) {
    return sqlite3_bind_int64(stmt_, index, value) == SQLITE_OK;
  }
  bool BindBlob(int index, const std::string& bytes) {
    return sqlite3_bind_blob(stmt_, index, bytes.data(),
                             static_cast<int>(bytes.size()),
                             SQLITE_TRANSIENT) == SQLITE_OK;
  }
  // Steps a statement that returns no rows to completion.
  bool Run() { return sqlite3_step(stmt_) == SQLITE_DONE; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

}  // namespace

std::string NewId(const std::string& prefix) {
  // The kernel's CSPRNG: ids must not be guessable from earlier ones.
  uint64_t value = 0;
  auto* bytes = reinterpret_cast<uint8_t*>(&value);
  size_t got = 0;
  while (got < sizeof(value)) {
    const ssize_t n = ::getrandom(bytes + got, sizeof(value) - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  char buffer[17];
  std::snprintf(buffer, sizeof(buffer), "%016llx",
                static_cast<unsigned long long>(value));
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
  for (const char* sub : {"blobs", "tmp", "uploads"}) {
    fs::create_directories(fs::path(data_dir) / sub, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot create ", data_dir, "/",
                                              sub, ": ", error.message()));
    }
  }
  // Files in tmp/ belong to uploads and jobs of an earlier run.
  for (fs::directory_iterator it(fs::path(data_dir) / "tmp", error), end;
       !error && it != end; it.increment(error)) {
    std::error_code ignored;
    fs::remove_all(it->path(), ignored);
  }
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot list ", data_dir, "/tmp: ", error.message()));
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
  AMALGAM_RETURN_IF_ERROR(storage->Exec(
      "CREATE TABLE IF NOT EXISTS uploads ("
      " owner TEXT NOT NULL, id TEXT NOT NULL, updated_at INTEGER NOT NULL,"
      " header BLOB NOT NULL, artifact_id TEXT NOT NULL DEFAULT '',"
      " PRIMARY KEY (owner, id))"));
  AMALGAM_RETURN_IF_ERROR(storage->Migrate());
  AMALGAM_RETURN_IF_ERROR(storage->ReconcileUploads());
  return storage;
}

absl::Status Storage::Migrate() {
  Statement version_stmt(db_, "PRAGMA user_version");
  if (version_stmt.get() == nullptr ||
      sqlite3_step(version_stmt.get()) != SQLITE_ROW) {
    return SqliteError(db_, "read the schema version");
  }
  const int64_t version = sqlite3_column_int64(version_stmt.get(), 0);
  if (version >= 1) return absl::OkStatus();
  // 1: owner, content and size of each artifact as indexed columns, and its
  // grants as rows, so that lists, quotas and deletes read only the rows
  // they concern instead of parsing every record.
  return InTransaction([&]() -> absl::Status {
    AMALGAM_RETURN_IF_ERROR(Exec(
        "ALTER TABLE artifacts ADD COLUMN owner TEXT NOT NULL DEFAULT ''"));
    AMALGAM_RETURN_IF_ERROR(Exec(
        "ALTER TABLE artifacts ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''"));
    AMALGAM_RETURN_IF_ERROR(
        Exec("ALTER TABLE artifacts ADD COLUMN size_bytes INTEGER NOT NULL "
             "DEFAULT 0"));
    AMALGAM_RETURN_IF_ERROR(Exec(
        "CREATE TABLE shares (artifact_id TEXT NOT NULL, organization TEXT "
        "NOT NULL, PRIMARY KEY (organization, artifact_id))"));
    AMALGAM_RETURN_IF_ERROR(
        Exec("CREATE INDEX artifacts_by_owner ON artifacts (owner)"));
    AMALGAM_RETURN_IF_ERROR(
        Exec("CREATE INDEX artifacts_by_sha256 ON artifacts (sha256)"));
    AMALGAM_RETURN_IF_ERROR(
        Exec("CREATE INDEX shares_by_artifact ON shares (artifact_id)"));
    AMALGAM_ASSIGN_OR_RETURN(std::vector<std::string> rows,
                             ListRecords("artifacts", nullptr));
    for (const std::string& row : rows) {
      v1::Artifact artifact;
      if (!artifact.ParseFromString(row)) {
        return absl::DataLossError("catalog has a corrupt artifact row");
      }
      AMALGAM_RETURN_IF_ERROR(WriteArtifactColumns(artifact));
    }
    return Exec("PRAGMA user_version = 1");
  });
}

absl::Status Storage::WriteArtifactColumns(const v1::Artifact& artifact) {
  Statement update(db_,
                   "UPDATE artifacts SET owner = ?2, sha256 = ?3, "
                   "size_bytes = ?4 WHERE id = ?1");
  if (update.get() == nullptr || !update.Bind(1, artifact.id()) ||
      !update.Bind(2, artifact.owner()) || !update.Bind(3, artifact.sha256()) ||
      !update.Bind(4, artifact.size_bytes()) || !update.Run()) {
    return SqliteError(db_, absl::StrCat("index artifact ", artifact.id()));
  }
  Statement clear(db_, "DELETE FROM shares WHERE artifact_id = ?1");
  if (clear.get() == nullptr || !clear.Bind(1, artifact.id()) || !clear.Run()) {
    return SqliteError(db_, absl::StrCat("index artifact ", artifact.id()));
  }
  for (const std::string& org : artifact.shared_with()) {
    Statement grant(db_,
                    "INSERT OR IGNORE INTO shares (artifact_id, organization) "
                    "VALUES (?1, ?2)");
    if (grant.get() == nullptr || !grant.Bind(1, artifact.id()) ||
        !grant.Bind(2, org) || !grant.Run()) {
      return SqliteError(db_, absl::StrCat("index artifact ", artifact.id()));
    }
  }
  return absl::OkStatus();
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

absl::Status Storage::MoveToBlob(const std::string& temp_path,
                                 const v1::Artifact& artifact, bool* created) {
  const std::string blob = BlobPath(artifact);
  std::error_code error;
  *created = false;
  if (fs::exists(blob, error)) {
    // Same content already stored: blobs are content-addressed.
    fs::remove(temp_path, error);
    return absl::OkStatus();
  }
  fs::rename(temp_path, blob, error);
  if (error) {
    return absl::InternalError(absl::StrCat(
        "cannot move a new file into the blob store: ", error.message()));
  }
  *created = true;
  return SyncFileAndDir(blob);
}

absl::Status Storage::InsertArtifact(v1::Artifact* artifact) {
  artifact->set_created_at(static_cast<int64_t>(std::time(nullptr)));
  artifact->clear_tensors();
  // A colliding id is never overwritten: the insert fails and another is
  // drawn.
  absl::Status inserted;
  do {
    artifact->set_id(NewId("art"));
    inserted = InsertRecord("artifacts", artifact->id(), *artifact);
  } while (absl::IsAlreadyExists(inserted));
  AMALGAM_RETURN_IF_ERROR(inserted);
  return WriteArtifactColumns(*artifact);
}

absl::StatusOr<v1::Artifact> Storage::AddArtifact(const std::string& temp_path,
                                                  v1::Artifact artifact) {
  // The blob and its row change together under the lock, so DeleteArtifact
  // never removes a blob that a new row is about to reference.
  absl::MutexLock lock(&mu_);
  bool created = false;
  AMALGAM_RETURN_IF_ERROR(MoveToBlob(temp_path, artifact, &created));
  AMALGAM_RETURN_IF_ERROR(
      InTransaction([&] { return InsertArtifact(&artifact); }));
  return artifact;
}

absl::Status Storage::InTransaction(const std::function<absl::Status()>& body) {
  AMALGAM_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  absl::Status status = body();
  if (status.ok()) status = Exec("COMMIT");
  if (!status.ok()) Exec("ROLLBACK").IgnoreError();
  return status;
}

absl::StatusOr<v1::Job> Storage::PublishResults(
    v1::Job job, std::vector<std::pair<std::string, v1::Artifact>> results) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> created_blobs;
  absl::Status status = InTransaction([&]() -> absl::Status {
    job.clear_result_ids();
    for (auto& [temp_path, artifact] : results) {
      bool created = false;
      AMALGAM_RETURN_IF_ERROR(MoveToBlob(temp_path, artifact, &created));
      if (created) created_blobs.push_back(BlobPath(artifact));
      AMALGAM_RETURN_IF_ERROR(InsertArtifact(&artifact));
      job.add_result_ids(artifact.id());
    }
    return PutRecord("jobs", job.id(), job);
  });
  if (!status.ok()) {
    // Blobs this call brought in are referenced by no committed row.
    std::error_code error;
    for (const std::string& blob : created_blobs) fs::remove(blob, error);
    return status;
  }
  return job;
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

absl::StatusOr<v1::Artifact> Storage::ReadArtifact(const std::string& id) {
  AMALGAM_ASSIGN_OR_RETURN(std::string bytes, GetRecord("artifacts", id));
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

absl::StatusOr<v1::Artifact> Storage::GetArtifact(const std::string& id) {
  absl::MutexLock lock(&mu_);
  return ReadArtifact(id);
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

absl::StatusOr<int64_t> Storage::QueryInt(const char* sql,
                                          const std::string& param) {
  Statement stmt(db_, sql);
  if (stmt.get() == nullptr || (!param.empty() && !stmt.Bind(1, param)) ||
      sqlite3_step(stmt.get()) != SQLITE_ROW) {
    return SqliteError(db_, "query the catalog");
  }
  return sqlite3_column_int64(stmt.get(), 0);
}

absl::StatusOr<std::pair<int64_t, int64_t>> Storage::Stats() {
  absl::MutexLock lock(&mu_);
  AMALGAM_ASSIGN_OR_RETURN(const int64_t count,
                           QueryInt("SELECT COUNT(*) FROM artifacts"));
  AMALGAM_ASSIGN_OR_RETURN(
      const int64_t bytes,
      QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size_bytes) "
               "AS size FROM artifacts GROUP BY sha256)"));
  return std::make_pair(count, bytes);
}

absl::StatusOr<v1::Artifact> Storage::ModifyArtifact(
    const std::string& id,
    const std::function<absl::Status(v1::Artifact&)>& change) {
  absl::MutexLock lock(&mu_);
  AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact, ReadArtifact(id));
  AMALGAM_RETURN_IF_ERROR(change(artifact));
  AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
    // An update, never an insert: a row deleted meanwhile stays deleted.
    Statement stmt(db_, "UPDATE artifacts SET record = ?2 WHERE id = ?1");
    if (stmt.get() == nullptr || !stmt.Bind(1, id) ||
        !stmt.BindBlob(2, artifact.SerializeAsString()) || !stmt.Run()) {
      return SqliteError(db_, absl::StrCat("update artifact ", id));
    }
    if (sqlite3_changes(db_) == 0) {
      return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
    }
    return WriteArtifactColumns(artifact);
  }));
  return artifact;
}

absl::Status Storage::DeleteArtifact(const v1::Artifact& artifact) {
  absl::MutexLock lock(&mu_);
  Statement others(db_,
                   "SELECT COUNT(*) FROM artifacts WHERE sha256 = ?1 AND "
                   "id != ?2");
  if (others.get() == nullptr || !others.Bind(1, artifact.sha256()) ||
      !others.Bind(2, artifact.id()) ||
      sqlite3_step(others.get()) != SQLITE_ROW) {
    return SqliteError(db_, absl::StrCat("delete artifact ", artifact.id()));
  }
  const bool shared_blob = sqlite3_column_int64(others.get(), 0) > 0;
  // The blob goes first: on a full disk the row's deletion needs room in
  // the catalog's log, which the blob frees. Under the lock, so no upload
  // of the same content registers against the blob in between. A crash in
  // between leaves a row without its blob, which reads as DATA_LOSS and is
  // deleted again.
  if (!shared_blob) {
    std::error_code error;
    fs::remove(BlobPath(artifact), error);
  }
  return InTransaction([&]() -> absl::Status {
    for (const char* sql : {"DELETE FROM shares WHERE artifact_id = ?1",
                            "DELETE FROM artifacts WHERE id = ?1"}) {
      Statement stmt(db_, sql);
      if (stmt.get() == nullptr || !stmt.Bind(1, artifact.id()) ||
          !stmt.Run()) {
        return SqliteError(db_,
                           absl::StrCat("delete artifact ", artifact.id()));
      }
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<int64_t> Storage::OrgBytes(const std::string& owner,
                                          const std::string& except_upload) {
  absl::MutexLock lock(&mu_);
  AMALGAM_ASSIGN_OR_RETURN(
      int64_t bytes,
      QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size_bytes) AS "
               "size FROM artifacts WHERE owner = ?1 GROUP BY sha256)",
               owner));
  Statement stmt(db_,
                 "SELECT id, header FROM uploads WHERE owner = ?1 AND "
                 "artifact_id = ''");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner)) {
    return SqliteError(db_, "count partial uploads");
  }
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    const std::string id =
        reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 0));
    v1::UploadHeader header;
    if (id != except_upload &&
        header.ParseFromArray(sqlite3_column_blob(stmt.get(), 1),
                              sqlite3_column_bytes(stmt.get(), 1))) {
      bytes += header.size_bytes();
    }
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "count partial uploads");
  return bytes;
}

absl::StatusOr<std::vector<v1::Artifact>> Storage::ListArtifacts(
    const std::string& organization) {
  std::vector<std::string> rows;
  {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        rows, organization.empty()
                  ? ListRecords("artifacts")
                  : ListRecords("artifacts",
                                "owner = ?1 OR id IN (SELECT artifact_id FROM "
                                "shares WHERE organization = ?1)",
                                organization));
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

absl::Status Storage::AddJob(const v1::Job& job) {
  absl::MutexLock lock(&mu_);
  return InsertRecord("jobs", job.id(), job);
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

std::string Storage::UploadPath(const std::string& owner,
                                const std::string& upload_id) const {
  // Hashed: ids are client-chosen and must not shape paths.
  core::Sha256 hash;
  hash.Update(owner);
  hash.Update("\n", 1);
  hash.Update(upload_id);
  return (fs::path(data_dir_) / "uploads" / hash.HexDigest()).string();
}

absl::StatusOr<PartialUpload> Storage::FindUpload(
    const std::string& owner, const std::string& upload_id) {
  std::string bytes, artifact_id;
  {
    absl::MutexLock lock(&mu_);
    Statement stmt(db_,
                   "SELECT header, artifact_id FROM uploads WHERE owner = ?1 "
                   "AND id = ?2");
    if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
        !stmt.Bind(2, upload_id)) {
      return SqliteError(db_, absl::StrCat("read upload ", upload_id));
    }
    const int rc = sqlite3_step(stmt.get());
    if (rc == SQLITE_DONE) {
      return absl::NotFoundError(absl::StrCat("upload ", upload_id,
                                              " not found (never started, "
                                              "finished or expired)"));
    }
    if (rc != SQLITE_ROW) {
      return SqliteError(db_, absl::StrCat("read upload ", upload_id));
    }
    const auto* data =
        static_cast<const char*>(sqlite3_column_blob(stmt.get(), 0));
    bytes.assign(data, sqlite3_column_bytes(stmt.get(), 0));
    artifact_id.assign(
        reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 1)));
  }
  PartialUpload upload;
  upload.owner = owner;
  upload.artifact_id = artifact_id;
  if (!upload.header.ParseFromString(bytes)) {
    return absl::DataLossError(
        absl::StrCat("catalog row of upload ", upload_id, " is corrupt"));
  }
  upload.path = UploadPath(owner, upload_id);
  if (!upload.artifact_id.empty()) {
    upload.committed_bytes = upload.header.size_bytes();
    return upload;
  }
  std::error_code error;
  const uintmax_t size = fs::file_size(upload.path, error);
  upload.committed_bytes = error ? 0 : static_cast<int64_t>(size);
  return upload;
}

absl::StatusOr<PartialUpload> Storage::CreateUpload(
    const std::string& owner, const v1::UploadHeader& header) {
  PartialUpload upload;
  upload.owner = owner;
  upload.header = header;
  upload.path = UploadPath(owner, header.upload_id());
  const std::string bytes = header.SerializeAsString();
  absl::MutexLock lock(&mu_);
  Statement stmt(db_,
                 "INSERT OR REPLACE INTO uploads (owner, id, updated_at, "
                 "header) VALUES (?1, ?2, ?3, ?4)");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
      !stmt.Bind(2, header.upload_id()) ||
      !stmt.Bind(3, int64_t{std::time(nullptr)}) || !stmt.BindBlob(4, bytes) ||
      !stmt.Run()) {
    return SqliteError(db_,
                       absl::StrCat("register upload ", header.upload_id()));
  }
  std::FILE* file = std::fopen(upload.path.c_str(), "wb");
  if (file == nullptr || std::fclose(file) != 0) {
    return absl::InternalError(absl::StrCat("cannot create ", upload.path, ": ",
                                            std::strerror(errno)));
  }
  return upload;
}

absl::Status Storage::CompleteUpload(const std::string& owner,
                                     const std::string& upload_id,
                                     const std::string& artifact_id) {
  absl::MutexLock lock(&mu_);
  Statement stmt(db_,
                 "UPDATE uploads SET artifact_id = ?3, updated_at = ?4 WHERE "
                 "owner = ?1 AND id = ?2");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
      !stmt.Bind(2, upload_id) || !stmt.Bind(3, artifact_id) ||
      !stmt.Bind(4, int64_t{std::time(nullptr)}) || !stmt.Run()) {
    return SqliteError(db_, absl::StrCat("complete upload ", upload_id));
  }
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  return absl::OkStatus();
}

absl::Status Storage::TouchUpload(const std::string& owner,
                                  const std::string& upload_id) {
  absl::MutexLock lock(&mu_);
  Statement stmt(db_,
                 "UPDATE uploads SET updated_at = ?3 WHERE owner = ?1 AND "
                 "id = ?2");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
      !stmt.Bind(2, upload_id) || !stmt.Bind(3, int64_t{std::time(nullptr)}) ||
      !stmt.Run()) {
    return SqliteError(db_, absl::StrCat("touch upload ", upload_id));
  }
  return absl::OkStatus();
}

absl::Status Storage::DeleteUploadRow(const std::string& owner,
                                      const std::string& upload_id) {
  Statement stmt(db_, "DELETE FROM uploads WHERE owner = ?1 AND id = ?2");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
      !stmt.Bind(2, upload_id) || !stmt.Run()) {
    return SqliteError(db_, absl::StrCat("remove upload ", upload_id));
  }
  return absl::OkStatus();
}

absl::Status Storage::RemoveUpload(const std::string& owner,
                                   const std::string& upload_id) {
  absl::MutexLock lock(&mu_);
  // File first: it frees the room a full disk needs for the row's deletion
  // (a row without its file is dropped at the next start).
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  return DeleteUploadRow(owner, upload_id);
}

absl::StatusOr<bool> Storage::RemoveStaleUpload(const std::string& owner,
                                                const std::string& upload_id,
                                                int64_t cutoff_unix_seconds) {
  absl::MutexLock lock(&mu_);
  // Decided by a read, so that the file can go before the row (see
  // RemoveUpload); touches take the same lock, so none comes in between.
  Statement stmt(db_,
                 "SELECT 1 FROM uploads WHERE owner = ?1 AND id = ?2 AND "
                 "updated_at < ?3");
  if (stmt.get() == nullptr || !stmt.Bind(1, owner) ||
      !stmt.Bind(2, upload_id) || !stmt.Bind(3, cutoff_unix_seconds)) {
    return SqliteError(db_, absl::StrCat("expire upload ", upload_id));
  }
  const int rc = sqlite3_step(stmt.get());
  if (rc == SQLITE_DONE) return false;  // touched since, or gone
  if (rc != SQLITE_ROW) {
    return SqliteError(db_, absl::StrCat("expire upload ", upload_id));
  }
  std::error_code error;
  fs::remove(UploadPath(owner, upload_id), error);
  AMALGAM_RETURN_IF_ERROR(DeleteUploadRow(owner, upload_id));
  return true;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>>
Storage::StaleUploads(int64_t cutoff_unix_seconds) {
  absl::MutexLock lock(&mu_);
  Statement stmt(db_, "SELECT owner, id FROM uploads WHERE updated_at < ?1");
  if (stmt.get() == nullptr || !stmt.Bind(1, cutoff_unix_seconds)) {
    return SqliteError(db_, "list stale uploads");
  }
  std::vector<std::pair<std::string, std::string>> stale;
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    stale.emplace_back(
        reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 0)),
        reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 1)));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "list stale uploads");
  return stale;
}

absl::Status Storage::ReconcileUploads() {
  std::vector<std::pair<std::string, std::string>> missing;
  std::set<std::string> paths;
  {
    // Finished uploads have no file: only their artifact id is kept.
    Statement stmt(db_, "SELECT owner, id FROM uploads WHERE artifact_id = ''");
    if (stmt.get() == nullptr) return SqliteError(db_, "list uploads");
    int rc;
    while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
      std::string owner =
          reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 0));
      std::string id =
          reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), 1));
      std::string path = UploadPath(owner, id);
      std::error_code error;
      if (fs::exists(path, error)) {
        paths.insert(std::move(path));
      } else {
        missing.emplace_back(std::move(owner), std::move(id));
      }
    }
    if (rc != SQLITE_DONE) return SqliteError(db_, "list uploads");
  }
  // Files first: they free room that a full disk needs for the row writes.
  std::error_code error;
  for (fs::directory_iterator it(fs::path(data_dir_) / "uploads", error), end;
       !error && it != end; it.increment(error)) {
    if (paths.count(it->path().string()) == 0) {
      std::error_code ignored;
      fs::remove_all(it->path(), ignored);
    }
  }
  for (const auto& [owner, id] : missing) {
    AMALGAM_RETURN_IF_ERROR(DeleteUploadRow(owner, id));
  }
  return absl::OkStatus();
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
  if (stmt.get() == nullptr || !stmt.Bind(1, id) ||
      !stmt.Bind(2, int64_t{std::time(nullptr)}) || !stmt.BindBlob(3, bytes) ||
      !stmt.Run()) {
    return SqliteError(db_, absl::StrCat("write ", table, " row ", id));
  }
  return absl::OkStatus();
}

absl::Status Storage::InsertRecord(const char* table, const std::string& id,
                                   const google::protobuf::Message& record) {
  const std::string sql = absl::StrCat(
      "INSERT INTO ", table, " (id, created_at, record) VALUES (?1, ?2, ?3)");
  Statement stmt(db_, sql.c_str());
  const std::string bytes = record.SerializeAsString();
  if (stmt.get() == nullptr || !stmt.Bind(1, id) ||
      !stmt.Bind(2, int64_t{std::time(nullptr)}) || !stmt.BindBlob(3, bytes)) {
    return SqliteError(db_, absl::StrCat("write ", table, " row ", id));
  }
  const int rc = sqlite3_step(stmt.get());
  if (rc == SQLITE_CONSTRAINT) {
    return absl::AlreadyExistsError(
        absl::StrCat(table, " row ", id, " exists already"));
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, absl::StrCat("write ", table, " row ", id));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Storage::GetRecord(const char* table,
                                               const std::string& id) {
  const std::string sql =
      absl::StrCat("SELECT record FROM ", table, " WHERE id = ?1");
  Statement stmt(db_, sql.c_str());
  if (stmt.get() == nullptr || !stmt.Bind(1, id)) {
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
    const char* table, const char* where, const std::string& param) {
  const std::string sql = absl::StrCat("SELECT record FROM ", table, " WHERE ",
                                       where != nullptr ? where : "1",
                                       " ORDER BY created_at, rowid");
  Statement stmt(db_, sql.c_str());
  if (stmt.get() == nullptr ||
      (where != nullptr && !param.empty() && !stmt.Bind(1, param))) {
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
