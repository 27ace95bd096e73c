#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 machine:
# FUSE, ext4 tools, a C++ compiler (libFuzzer), C s3backer 1.5.4 (compatibility peer), NBD clients, and the
# s3s-fs S3 test server and cargo-fuzz (built from crates.io into a cache directory).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for pkg in fuse3 e2fsprogs s3backer libnbd-bin nbdkit qemu-utils psmisc g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${need_apt[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

S3S_ROOT="${S3S_ROOT:-$HOME/.cache/s3backer-rs/s3s-fs}"
if [ ! -x "$S3S_ROOT/bin/s3s-fs" ]; then
    echo "install-deps: cargo install s3s-fs 0.14.1 (about 2 minutes)"
    # 0.15+ needs a newer rustc than this machine's 1.95.
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$S3S_ROOT" --quiet
fi
CARGO_FUZZ_ROOT="${CARGO_FUZZ_ROOT:-$HOME/.cache/s3backer-rs/cargo-fuzz}"
if [ ! -x "$CARGO_FUZZ_ROOT/bin/cargo-fuzz" ]; then
    echo "install-deps: cargo install cargo-fuzz 0.13.1 (about 3 minutes)"
    cargo install cargo-fuzz@0.13.1 --locked --root "$CARGO_FUZZ_ROOT" --quiet
fi
echo "install-deps: done"
