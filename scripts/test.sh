#!/usr/bin/env bash
# Runs every check and test of the project: formatting, clippy, unit, integration (real S3
# server), FUSE + ext4 end-to-end and C s3backer compatibility tests. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Mount tests share the kernel's loop devices and FUSE; nextest runs each test in its own process,
# so tests that signal their own process (ignored under plain `cargo test`) are safe here.
# The Debian package test needs a release build and cargo-deb: scripts/package.sh runs it.
cargo nextest run --workspace --locked --no-fail-fast --test-threads 2 --run-ignored all \
    -E 'not test(=debian_package_installs_and_purges_cleanly_in_a_throwaway_root)' "$@"
# Every cargo-fuzz target for 60 s over its committed corpus (builds in about 4 min cold).
bash scripts/fuzz.sh --ci
