#!/usr/bin/env bash
# Installs every Debian package Amalgam needs to build, test and run. Idempotent.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libtorch-dev libopenblas0-pthread
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libre2-dev libsqlite3-dev libpq-dev postgresql-15 nlohmann-json3-dev libcpp-httplib-dev libssl-dev
  clang-format clang libclang-rt-14-dev
  podman runc debootstrap uidmap prometheus
  python3-grpcio python3-protobuf python3-torch python3-numpy python3-pytest
  python3-tqdm python3-sklearn python3-matplotlib python3-yaml
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${#missing[@]} missing packages: ${missing[*]}" >&2

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${packages[@]}"
