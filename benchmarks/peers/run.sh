#!/usr/bin/env bash
# eretes against Celery (and RQ), side by side, on this machine:
#
#   bash benchmarks/peers/run.sh [--tasks 2000] [--rounds 3]
#
# Installs what it needs (Debian's redis-server; Celery and RQ in a virtual
# environment under target/), builds eretes, and runs peers.py, which
# starts a Redis server (without persistence, as it ships), a Celery worker
# and an RQ worker, and an `eretes agent` on the durable embedded store
# (every submission fsync'd), all on loopback ports, in alternating rounds,
# and prints the ratios. Everything it started is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
ensure_debian_packages redis-server protobuf-compiler
venv=target/peers-venv
if [ ! -x "$venv/bin/celery" ] || [ ! -x "$venv/bin/rq" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'celery[redis]>=5.4,<6' 'rq>=2,<3'
fi
cargo build -q --release -p eretes
exec "$venv/bin/python" benchmarks/peers/peers.py --eretes target/release/eretes "$@"
