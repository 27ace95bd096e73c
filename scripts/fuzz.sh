#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time over its committed seed corpus (fuzz/corpus/T);
# exits non-zero on the first crash, leaving the input in fuzz/artifacts/T/.
#   scripts/fuzz.sh [--ci] [-t SECONDS] [TARGET...]   (or FUZZ_SECONDS=N; default 30 s per target)
# --ci: what scripts/test.sh runs, 60 s per target without a sanitizer (see below).
# New inputs found go to fuzz/corpus-work/T (git-ignored); `cargo fuzz cmin T` can fold them in.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
if [ "${1:-}" = "--ci" ]; then
    # Coverage-guided, with debug assertions (overflow checks) but without AddressSanitizer:
    # a cold ASan build of the fuzz crate takes 15-30 min here, a plain one 4 min. Our code is
    # safe Rust, so ASan mostly guards the C in zstd; the opt-in default mode keeps it.
    seconds="${FUZZ_SECONDS:-60}"
    sanitizer="${FUZZ_SANITIZER:-none}"
    shift
fi
if [ "${1:-}" = "-t" ]; then
    seconds="$2"
    shift 2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(codec_decode config_args cache_file nbd_protocol)
fi

CARGO_FUZZ_ROOT="${CARGO_FUZZ_ROOT:-$HOME/.cache/s3backer-rs/cargo-fuzz}"
export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    # Installed here, not by install-deps.sh: only fuzzing needs it.
    dpkg -s g++ >/dev/null 2>&1 || apt-get install -y -q g++
    echo "fuzz: cargo install cargo-fuzz 0.13.1 (about 3 minutes, once)"
    cargo install cargo-fuzz@0.13.1 --locked --root "$CARGO_FUZZ_ROOT" --quiet
fi
# cargo-fuzz passes -Z sanitizer flags; the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"

cd fuzz
cargo fuzz build --sanitizer "$sanitizer"
for target in "${targets[@]}"; do
    mkdir -p "corpus-work/$target" "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    log="corpus-work/$target.log"
    # One malloc of more than 64 MiB is a crash (enforced under a sanitizer; --ci has only the
    # RSS limit): decoders must stay bounded by the block size.
    status=0
    cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus-work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -malloc_limit_mb=64 -rss_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        echo "fuzz: $target FAILED (exit $status); reproduce with:"
        echo "  cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target artifacts/$target/<file>"
        exit 1
    fi
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
