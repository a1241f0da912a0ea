#!/usr/bin/env bash
# Builds the libFuzzer targets (preset fuzz: Clang with ASan + UBSan) and runs
# each for SECONDS (default 30) from a small seed corpus. A crash, leak or
# sanitizer report fails the run and leaves the input in build-fuzz/.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
bash scripts/setup.sh
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz

corpus=build-fuzz/corpus
mkdir -p "$corpus/safetensors" "$corpus/upload_header"
# Seeds: a valid two-tensor file, one whose shape nests 60 000 levels deep
# (it crashed amalgamd once; -max_len admits it), and a valid upload header.
/usr/bin/python3 - "$corpus/safetensors" <<'PY'
import json, struct, sys
header = json.dumps({"__metadata__": {"k": "v"},
                     "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}}).encode()
open(sys.argv[1] + "/seed", "wb").write(struct.pack("<Q", len(header)) + header + bytes(12))
deep = b'{"t":{"dtype":"F32","shape":' + b"[" * 60000 + b"]" * 60000 + b',"data_offsets":[0,4]}}'
open(sys.argv[1] + "/deep", "wb").write(struct.pack("<Q", len(deep)) + deep + bytes(4))
PY
protoc -I proto --encode=amalgam.v1.UploadRequest amalgam/v1/amalgam.proto \
  > "$corpus/upload_header/seed" <<'TXT'
header { kind: ARTIFACT_KIND_GRAM name: "g" size_bytes: 1024
  sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  describes: "art_1" upload_id: "u-1" }
TXT

for target in safetensors upload_header; do
  echo "== fuzz $target for ${seconds}s"
  (cd build-fuzz && "bin/${target}_fuzz" -max_total_time="$seconds" -max_len=262144 \
     -rss_limit_mb=2048 -print_final_stats=1 "corpus/$target" 2>&1 |
     grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|==ERROR|SUMMARY|^INFO: Seed" ) ||
  { echo "fuzz: $target failed; see build-fuzz/ for the crashing input" >&2; exit 1; }
done
