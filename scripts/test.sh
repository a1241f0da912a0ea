#!/usr/bin/env bash
# Sets up, builds and runs every test: formatting, unit, integration (real
# amalgamd over gRPC on loopback), end-to-end (the CLI against the server),
# pytest, a short run of each libFuzzer target, and the container image built
# and run with podman.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh

echo "== clang-format check"
git ls-files '*.cc' '*.h' '*.proto' | xargs clang-format --dry-run --Werror

echo "== ctest"
ctest --preset release -j2

echo "== fuzz (short run)"
bash scripts/fuzz.sh 30

echo "== container image (podman)"
bash scripts/container-test.sh
