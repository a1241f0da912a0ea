#!/usr/bin/env bash
# Installs the dependencies (if missing) and builds the release preset into build/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release -DAMALGAM_BUILD_TESTS=ON -DAMALGAM_BUILD_BENCH=ON >/dev/null
cmake --build --preset release
