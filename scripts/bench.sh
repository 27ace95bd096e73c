#!/usr/bin/env bash
# Benchmark: our s3backer vs C s3backer 1.5.4 vs the server's raw limit, on one loopback s3s-fs.
# Writes BENCHMARKS.md. Usage: scripts/bench.sh [--quick] [--runs N] [--noisy] [--keep] ...
# (scripts/bench.py --help lists every option). Needs root for FUSE and loop mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo build --release --locked --bins -p s3backer -p s3proxy
# bench.py undoes its own mounts and processes on exit or SIGTERM/SIGINT; forward the signal.
python3 scripts/bench.py "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"' INT TERM
wait "$pid"
