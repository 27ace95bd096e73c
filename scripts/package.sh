#!/usr/bin/env bash
# Builds the Debian package target/debian/s3backer-rs_*.deb: release binary, man page and shell
# completions generated from the flag definition, example systemd units and fstab lines.
# Then checks it (contents, and an install + purge into a throwaway dpkg root, never this system).
# Installs cargo-deb (pinned) into the cache directory when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
CARGO_DEB_ROOT="${CARGO_DEB_ROOT:-$HOME/.cache/s3backer-rs/cargo-deb}"
CARGO_DEB="$CARGO_DEB_ROOT/bin/cargo-deb"
if [ ! -x "$CARGO_DEB" ]; then
    echo "package: cargo install cargo-deb 3.8.0 into $CARGO_DEB_ROOT (a few minutes, once)"
    cargo install cargo-deb@3.8.0 --locked --root "$CARGO_DEB_ROOT" --quiet
fi

cargo run --locked --quiet --example gen_docs -- target/docs
# Stripped like any Debian binary (the release profile keeps line tables: 49 MB -> a few MB).
"$CARGO_DEB" --locked --strip
deb=$(ls -t target/debian/s3backer-rs_*.deb | head -n 1)
echo "package: built $deb"
if [ "${1:-}" != "--no-check" ]; then
    S3BACKER_DEB="$deb" cargo nextest run --locked --test e2e_ops --run-ignored only debian_package
fi
