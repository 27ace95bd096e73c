#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 machine:
# FUSE, ext4 tools, C s3backer 1.5.4 (compatibility peer), NBD clients, and the
# s3s-fs S3 test server (built from crates.io into a cache directory), moto (atomic conditional
# PUTs), fio + python3 for scripts/bench.sh, systemd-analyze/man-db/dpkg-dev for the ops tests,
# openssl for the TLS test and g++ for cargo-fuzz (libFuzzer) in scripts/fuzz.sh.
# (cargo-deb, needed only to build the package, is installed by scripts/package.sh.)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for pkg in fuse3 e2fsprogs s3backer libnbd-bin nbdkit qemu-utils psmisc fio python3 python3-venv \
    systemd man-db dpkg-dev openssl g++; do
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
# moto: the test server whose conditional PUTs are atomic (s3s-fs checks If-None-Match before
# it writes, so two racing creates both succeed there); used by the simultaneous-mount test.
MOTO_ROOT="${MOTO_ROOT:-$HOME/.cache/s3backer-rs/moto}"
if [ ! -x "$MOTO_ROOT/bin/moto_server" ]; then
    echo "install-deps: pip install moto[server] 5.2.1 into $MOTO_ROOT"
    python3 -m venv "$MOTO_ROOT"
    "$MOTO_ROOT/bin/pip" install --quiet 'moto[server]==5.2.1'
fi
echo "install-deps: done"
