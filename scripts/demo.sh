#!/usr/bin/env bash
# The README's main job, from a fresh Debian machine that has only the Rust
# toolchain: builds eretes (etcd-client needs protoc) and runs `eretes demo`
# on the embedded store. Arguments go to the demo (--nodes, --tasks, --json,
# or --etcd URL).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_debian_packages protobuf-compiler
exec cargo run --release --locked -p eretes -- demo "$@"
