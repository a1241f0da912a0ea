#include "server/sql.h"

#include <utility>

namespace amalgam::server {

SqlValue SqlValue::Int(int64_t value) {
  SqlValue v;
  v.type = Type::kInt;
  v.number = value;
  return v;
}

SqlValue SqlValue::Text(std::string value) {
  SqlValue v;
  v.type = Type::kText;
  v.text = std::move(value);
  return v;
}

SqlValue SqlValue::Bytes(std::string value) {
  SqlValue v;
  v.type = Type::kBytes;
  v.text = std::move(value);
  return v;
}

}  // namespace amalgam::server
