#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine that has only the Rust
# toolchain. Everything the tests need is installed or started from here:
# protoc (to build etcd-client), Python's Prometheus parser (the metrics test
# checks /metrics with it, through Debian's /usr/bin/python3), Chromium and
# its chromedriver (the dashboard's tests drive a real headless browser), and an etcd server on a free loopback port in
# a temporary directory, stopped when this script exits. Tests that need etcd
# read its URL from ERETES_TEST_ETCD and fail (never skip) without it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_debian_packages protobuf-compiler etcd-server etcd-client python3-prometheus-client chromium chromium-driver
start_test_etcd
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
