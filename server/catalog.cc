// The catalog over SQL: the same statements on SQLite and PostgreSQL (the
// connection supplies the few words that differ), records stored as
// serialised protobufs beside the indexed columns that queries filter on.

#include "server/catalog.h"

#include <sys/random.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/status_macros.h"
#include "server/sql.h"

namespace amalgam::server {

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

namespace {

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

template <typename Message>
absl::StatusOr<Message> Parse(const SqlValue& value, const std::string& what) {
  Message message;
  if (!message.ParseFromString(value.text)) {
    return absl::DataLossError(
        absl::StrCat("catalog row of ", what, " is corrupt"));
  }
  return message;
}

class SqlCatalog : public Catalog {
 public:
  explicit SqlCatalog(std::unique_ptr<SqlConnection> db) : db_(std::move(db)) {}

  absl::Status Migrate() {
    absl::MutexLock lock(&mu_);
    // 0: the tables as the first release made them (kept as they were, so
    // that existing catalogs read unchanged).
    const std::string bytes = db_->BytesType();
    const std::string order = db_->InsertionColumn();
    for (const std::string& sql :
         {absl::StrCat("CREATE TABLE IF NOT EXISTS artifacts (id TEXT "
                       "PRIMARY KEY, created_at BIGINT NOT NULL, record ",
                       bytes, " NOT NULL", order, ")"),
          absl::StrCat("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY "
                       "KEY, created_at BIGINT NOT NULL, record ",
                       bytes, " NOT NULL", order, ")"),
          absl::StrCat("CREATE TABLE IF NOT EXISTS uploads (owner TEXT NOT "
                       "NULL, id TEXT NOT NULL, updated_at BIGINT NOT NULL, "
                       "header ",
                       bytes,
                       " NOT NULL, artifact_id TEXT NOT NULL DEFAULT '', "
                       "PRIMARY KEY (owner, id))")}) {
      AMALGAM_RETURN_IF_ERROR(Run(sql).status());
    }
    return InTransaction([&]() -> absl::Status {
      AMALGAM_RETURN_IF_ERROR(db_->LockForMigration());
      AMALGAM_ASSIGN_OR_RETURN(const int64_t version, db_->SchemaVersion());
      if (version >= 1) return absl::OkStatus();
      // 1: owner, content and size of each artifact as indexed columns, and
      // its grants as rows, so that lists, quotas and deletes read only the
      // rows they concern instead of parsing every record.
      for (const char* sql :
           {"ALTER TABLE artifacts ADD COLUMN owner TEXT NOT NULL "
            "DEFAULT ''",
            "ALTER TABLE artifacts ADD COLUMN sha256 TEXT NOT NULL "
            "DEFAULT ''",
            "ALTER TABLE artifacts ADD COLUMN size_bytes BIGINT NOT NULL "
            "DEFAULT 0",
            "CREATE TABLE shares (artifact_id TEXT NOT NULL, organization "
            "TEXT NOT NULL, PRIMARY KEY (organization, artifact_id))",
            "CREATE INDEX artifacts_by_owner ON artifacts (owner)",
            "CREATE INDEX artifacts_by_sha256 ON artifacts (sha256)",
            "CREATE INDEX shares_by_artifact ON shares (artifact_id)"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql).status());
      }
      AMALGAM_ASSIGN_OR_RETURN(SqlResult rows,
                               Run("SELECT record FROM artifacts"));
      for (const SqlRow& row : rows.rows) {
        AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact,
                                 Parse<v1::Artifact>(row[0], "an artifact"));
        AMALGAM_RETURN_IF_ERROR(WriteArtifactColumns(artifact));
      }
      return db_->SetSchemaVersion(1);
    });
  }

  absl::Status InsertArtifact(v1::Artifact* artifact) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&] { return InsertArtifactLocked(artifact); });
  }

  absl::StatusOr<v1::Artifact> GetArtifact(const std::string& id) override {
    absl::MutexLock lock(&mu_);
    return ReadArtifact(id, "");
  }

  absl::StatusOr<std::vector<v1::Artifact>> ListArtifacts(
      const std::string& organization) override {
    absl::MutexLock lock(&mu_);
    const std::string order =
        absl::StrCat(" ORDER BY created_at, ", db_->InsertionOrder());
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        organization.empty()
            ? Run("SELECT record FROM artifacts" + order)
            : Run("SELECT record FROM artifacts WHERE owner = ?1 OR id IN "
                  "(SELECT artifact_id FROM shares WHERE organization = ?1)" +
                      order,
                  {SqlValue::Text(organization)}));
    std::vector<v1::Artifact> artifacts;
    for (const SqlRow& row : result.rows) {
      AMALGAM_ASSIGN_OR_RETURN(v1::Artifact artifact,
                               Parse<v1::Artifact>(row[0], "an artifact"));
      artifacts.push_back(std::move(artifact));
    }
    return artifacts;
  }

  absl::StatusOr<std::pair<int64_t, int64_t>> Stats() override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(const int64_t count,
                             QueryInt("SELECT COUNT(*) FROM artifacts", {}));
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t bytes,
        QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size_bytes) "
                 "AS size FROM artifacts GROUP BY sha256) AS contents",
                 {}));
    return std::make_pair(count, bytes);
  }

  absl::StatusOr<v1::Artifact> ModifyArtifact(
      const std::string& id,
      const std::function<absl::Status(v1::Artifact&)>& change) override {
    absl::MutexLock lock(&mu_);
    v1::Artifact artifact;
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      AMALGAM_ASSIGN_OR_RETURN(artifact, ReadArtifact(id, db_->ForUpdate()));
      AMALGAM_RETURN_IF_ERROR(change(artifact));
      // An update, never an insert: a row deleted meanwhile stays deleted.
      AMALGAM_ASSIGN_OR_RETURN(
          SqlResult updated,
          Run("UPDATE artifacts SET record = ?2 WHERE id = ?1",
              {SqlValue::Text(id),
               SqlValue::Bytes(artifact.SerializeAsString())}));
      if (updated.changed == 0) return NotFound(id);
      return WriteArtifactColumns(artifact);
    }));
    return artifact;
  }

  absl::StatusOr<bool> ContentHasOtherArtifacts(
      const std::string& sha256, const std::string& id) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        const int64_t others,
        QueryInt("SELECT COUNT(*) FROM artifacts WHERE sha256 = ?1 AND "
                 "id != ?2",
                 {SqlValue::Text(sha256), SqlValue::Text(id)}));
    return others > 0;
  }

  absl::Status DeleteArtifact(const std::string& id) override {
    absl::MutexLock lock(&mu_);
    return InTransaction([&]() -> absl::Status {
      for (const char* sql : {"DELETE FROM shares WHERE artifact_id = ?1",
                              "DELETE FROM artifacts WHERE id = ?1"}) {
        AMALGAM_RETURN_IF_ERROR(Run(sql, {SqlValue::Text(id)}).status());
      }
      return absl::OkStatus();
    });
  }

  absl::StatusOr<int64_t> OrgBytes(const std::string& owner,
                                   const std::string& except_upload) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        int64_t bytes,
        QueryInt("SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size_bytes) "
                 "AS size FROM artifacts WHERE owner = ?1 GROUP BY sha256) AS "
                 "contents",
                 {SqlValue::Text(owner)}));
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult uploads,
        Run("SELECT id, header FROM uploads WHERE owner = ?1 AND "
            "artifact_id = ''",
            {SqlValue::Text(owner)}));
    for (const SqlRow& row : uploads.rows) {
      v1::UploadHeader header;
      if (row[0].text != except_upload && header.ParseFromString(row[1].text)) {
        bytes += header.size_bytes();
      }
    }
    return bytes;
  }

  absl::StatusOr<v1::Job> PublishResults(
      v1::Job job, std::vector<v1::Artifact>* results) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_RETURN_IF_ERROR(InTransaction([&]() -> absl::Status {
      job.clear_result_ids();
      for (v1::Artifact& artifact : *results) {
        AMALGAM_RETURN_IF_ERROR(InsertArtifactLocked(&artifact));
        job.add_result_ids(artifact.id());
      }
      return PutRecord("jobs", job.id(), job);
    }));
    return job;
  }

  absl::StatusOr<UploadRow> FindUpload(const std::string& owner,
                                       const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT header, artifact_id FROM uploads WHERE owner = ?1 AND "
            "id = ?2",
            {SqlValue::Text(owner), SqlValue::Text(upload_id)}));
    if (result.rows.empty()) {
      return absl::NotFoundError(
          absl::StrCat("upload ", upload_id,
                       " not found (never started, finished or "
                       "expired)"));
    }
    UploadRow row;
    AMALGAM_ASSIGN_OR_RETURN(
        row.header,
        Parse<v1::UploadHeader>(result.rows[0][0], "upload " + upload_id));
    row.artifact_id = result.rows[0][1].text;
    return row;
  }

  absl::Status PutUpload(const std::string& owner,
                         const v1::UploadHeader& header) override {
    absl::MutexLock lock(&mu_);
    return Run("INSERT INTO uploads (owner, id, updated_at, header) VALUES "
               "(?1, ?2, ?3, ?4) ON CONFLICT (owner, id) DO UPDATE SET "
               "updated_at = excluded.updated_at, header = excluded.header, "
               "artifact_id = ''",
               {SqlValue::Text(owner), SqlValue::Text(header.upload_id()),
                SqlValue::Int(Now()),
                SqlValue::Bytes(header.SerializeAsString())})
        .status();
  }

  absl::Status CompleteUpload(const std::string& owner,
                              const std::string& upload_id,
                              const std::string& artifact_id) override {
    absl::MutexLock lock(&mu_);
    return Run("UPDATE uploads SET artifact_id = ?3, updated_at = ?4 WHERE "
               "owner = ?1 AND id = ?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id),
                SqlValue::Text(artifact_id), SqlValue::Int(Now())})
        .status();
  }

  absl::Status TouchUpload(const std::string& owner,
                           const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    return Run("UPDATE uploads SET updated_at = ?3 WHERE owner = ?1 AND id = "
               "?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id),
                SqlValue::Int(Now())})
        .status();
  }

  absl::Status DeleteUpload(const std::string& owner,
                            const std::string& upload_id) override {
    absl::MutexLock lock(&mu_);
    return Run("DELETE FROM uploads WHERE owner = ?1 AND id = ?2",
               {SqlValue::Text(owner), SqlValue::Text(upload_id)})
        .status();
  }

  absl::StatusOr<bool> UploadIsStale(const std::string& owner,
                                     const std::string& upload_id,
                                     int64_t cutoff_unix_seconds) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT 1 FROM uploads WHERE owner = ?1 AND id = ?2 AND "
            "updated_at < ?3",
            {SqlValue::Text(owner), SqlValue::Text(upload_id),
             SqlValue::Int(cutoff_unix_seconds)}));
    return !result.rows.empty();
  }

  absl::StatusOr<std::vector<UploadKey>> StaleUploads(
      int64_t cutoff_unix_seconds) override {
    absl::MutexLock lock(&mu_);
    return Keys(Run("SELECT owner, id FROM uploads WHERE updated_at < ?1",
                    {SqlValue::Int(cutoff_unix_seconds)}));
  }

  absl::StatusOr<std::vector<UploadKey>> UnfinishedUploads() override {
    absl::MutexLock lock(&mu_);
    return Keys(
        Run("SELECT owner, id FROM uploads WHERE artifact_id = ''", {}));
  }

  absl::Status AddJob(const v1::Job& job) override {
    absl::MutexLock lock(&mu_);
    return InsertRecord("jobs", job.id(), job);
  }

  absl::Status PutJob(const v1::Job& job) override {
    absl::MutexLock lock(&mu_);
    return PutRecord("jobs", job.id(), job);
  }

  absl::StatusOr<v1::Job> GetJob(const std::string& id) override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT record FROM jobs WHERE id = ?1", {SqlValue::Text(id)}));
    if (result.rows.empty()) {
      return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
    }
    return Parse<v1::Job>(result.rows[0][0], id);
  }

  absl::StatusOr<std::vector<v1::Job>> ListJobs() override {
    absl::MutexLock lock(&mu_);
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run(absl::StrCat("SELECT record FROM jobs ORDER BY created_at, ",
                         db_->InsertionOrder()),
            {}));
    std::vector<v1::Job> jobs;
    for (const SqlRow& row : result.rows) {
      AMALGAM_ASSIGN_OR_RETURN(v1::Job job, Parse<v1::Job>(row[0], "a job"));
      jobs.push_back(std::move(job));
    }
    return jobs;
  }

 private:
  static absl::Status NotFound(const std::string& id) {
    return absl::NotFoundError(absl::StrCat("artifact ", id, " not found"));
  }

  absl::StatusOr<SqlResult> Run(const std::string& sql,
                                const std::vector<SqlValue>& params = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return db_->Run(sql, params);
  }

  absl::StatusOr<int64_t> QueryInt(const std::string& sql,
                                   const std::vector<SqlValue>& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_ASSIGN_OR_RETURN(SqlResult result, Run(sql, params));
    if (result.rows.empty() || result.rows[0].empty()) {
      return absl::InternalError("catalog: a count returned no row");
    }
    return result.rows[0][0].number;
  }

  static absl::StatusOr<std::vector<UploadKey>> Keys(
      absl::StatusOr<SqlResult> result) {
    if (!result.ok()) return result.status();
    std::vector<UploadKey> keys;
    for (const SqlRow& row : result->rows) {
      keys.emplace_back(row[0].text, row[1].text);
    }
    return keys;
  }

  // Runs `body` in one transaction, rolled back if it fails.
  absl::Status InTransaction(const std::function<absl::Status()>& body)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_RETURN_IF_ERROR(Run(db_->Begin()).status());
    absl::Status status = body();
    if (status.ok()) status = Run("COMMIT").status();
    if (!status.ok()) Run("ROLLBACK").IgnoreError();
    return status;
  }

  // `lock` is appended to the SELECT (FOR UPDATE inside a transaction).
  absl::StatusOr<v1::Artifact> ReadArtifact(const std::string& id,
                                            const std::string& lock)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    AMALGAM_ASSIGN_OR_RETURN(
        SqlResult result,
        Run("SELECT record FROM artifacts WHERE id = ?1" + lock,
            {SqlValue::Text(id)}));
    if (result.rows.empty()) return NotFound(id);
    return Parse<v1::Artifact>(result.rows[0][0], id);
  }

  absl::Status InsertArtifactLocked(v1::Artifact* artifact)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    artifact->set_created_at(Now());
    artifact->clear_tensors();
    absl::Status inserted;
    do {
      artifact->set_id(NewId("art"));
      inserted = InsertRecord("artifacts", artifact->id(), *artifact);
    } while (absl::IsAlreadyExists(inserted));
    AMALGAM_RETURN_IF_ERROR(inserted);
    return WriteArtifactColumns(*artifact);
  }

  // Writes the indexed columns and share rows of `artifact` from its record.
  absl::Status WriteArtifactColumns(const v1::Artifact& artifact)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const SqlValue id = SqlValue::Text(artifact.id());
    AMALGAM_RETURN_IF_ERROR(
        Run("UPDATE artifacts SET owner = ?2, sha256 = ?3, size_bytes = ?4 "
            "WHERE id = ?1",
            {id, SqlValue::Text(artifact.owner()),
             SqlValue::Text(artifact.sha256()),
             SqlValue::Int(artifact.size_bytes())})
            .status());
    AMALGAM_RETURN_IF_ERROR(
        Run("DELETE FROM shares WHERE artifact_id = ?1", {id}).status());
    for (const std::string& org : artifact.shared_with()) {
      AMALGAM_RETURN_IF_ERROR(
          Run("INSERT INTO shares (artifact_id, organization) VALUES (?1, "
              "?2) ON CONFLICT DO NOTHING",
              {id, SqlValue::Text(org)})
              .status());
    }
    return absl::OkStatus();
  }

  // A plain insert: ALREADY_EXISTS, writing nothing, if `id` is taken.
  absl::Status InsertRecord(const char* table, const std::string& id,
                            const google::protobuf::Message& record)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::Status status =
        Run(absl::StrCat("INSERT INTO ", table,
                         " (id, created_at, record) VALUES (?1, ?2, ?3)"),
            {SqlValue::Text(id), SqlValue::Int(Now()),
             SqlValue::Bytes(record.SerializeAsString())})
            .status();
    if (absl::IsAlreadyExists(status)) {
      return absl::AlreadyExistsError(
          absl::StrCat(table, " row ", id, " exists already"));
    }
    return status;
  }

  absl::Status PutRecord(const char* table, const std::string& id,
                         const google::protobuf::Message& record)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return Run(absl::StrCat(
                   "INSERT INTO ", table,
                   " (id, created_at, record) VALUES (?1, ?2, ?3) ON CONFLICT "
                   "(id) DO UPDATE SET record = excluded.record"),
               {SqlValue::Text(id), SqlValue::Int(Now()),
                SqlValue::Bytes(record.SerializeAsString())})
        .status();
  }

  absl::Mutex mu_;
  const std::unique_ptr<SqlConnection> db_ ABSL_PT_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Catalog>> OpenCatalog(
    const std::string& uri, const std::string& data_dir) {
  std::unique_ptr<SqlConnection> db;
  if (uri == "sqlite") {
    AMALGAM_ASSIGN_OR_RETURN(
        db,
        OpenSqlite((std::filesystem::path(data_dir) / "catalog.db").string()));
  } else if (absl::StartsWith(uri, "postgresql://") ||
             absl::StartsWith(uri, "postgres://")) {
    AMALGAM_ASSIGN_OR_RETURN(db, OpenPostgres(uri));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--catalog must be \"sqlite\" or a postgresql:// URI, not \"", uri,
        "\""));
  }
  auto catalog = std::make_unique<SqlCatalog>(std::move(db));
  AMALGAM_RETURN_IF_ERROR(catalog->Migrate());
  return catalog;
}

}  // namespace amalgam::server
