#!/usr/bin/env bash
# Sets up, builds and starts amalgamd on 127.0.0.1:50051 with embedded storage
# in ./var/amalgam. Extra arguments go to amalgamd (e.g. --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec build/bin/amalgamd --listen 127.0.0.1:50051 --data-dir ./var/amalgam "$@"
