#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine that has only the Rust
# toolchain. Everything the tests need is installed or started from here.
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing beyond the Rust toolchain is needed yet: the embedded store is in
# process. (The etcd backend's tests will install and start etcd here.)
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
