#!/usr/bin/env bash
# Sets up, builds and runs every test: formatting, unit, integration (real
# amalgamd over gRPC on loopback) and end-to-end (the CLI against the server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh

echo "== clang-format check"
git ls-files '*.cc' '*.h' '*.proto' | xargs clang-format --dry-run --Werror

echo "== ctest"
ctest --preset release -j2
